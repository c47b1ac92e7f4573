"""PCA of DELF descriptors: learned once on training images, applied at extraction.

DELF post-processes every descriptor as ``l2(PCA_40(l2(f)))``: L2-normalise the raw
map cell, project onto the first 40 principal directions learned on training images
(optionally whitened, the authors' ``use_whitening``; off in their example config), and
L2-normalise again. The learned projection is a
:class:`~jaxretrieval.whitening.Whitening` NamedTuple: plain PCA is
:func:`~jaxretrieval.whitening.learn_pca_whitening` with ``shrinkage=0`` (rows are the
orthonormal eigenvectors), whitening is ``shrinkage=1`` (rows scaled by
``1 / sqrt(variance)``), and applying it is
:func:`~jaxretrieval.whitening.apply_whitening`. A saved DELF model keeps it in its
``pca`` variable collection (:func:`pca_variables`).
"""

from typing import Any

import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.whitening import Whitening, apply_whitening, learn_pca_whitening

__all__ = [
    "DELF_PCA_DIM",
    "apply_descriptor_pca",
    "learn_descriptor_pca",
    "pca_from_variables",
    "pca_variables",
]

DELF_PCA_DIM = 40  # the paper's and the authors' example config's pca_dim


def learn_descriptor_pca(
    descriptors: Float[AnyArray, "N C"],
    *,
    dim: int = DELF_PCA_DIM,
    whitening: bool = False,
    eps: float = 1e-6,
) -> Whitening:
    """PCA (or PCA whitening) of raw local descriptors, after L2-normalising them.

    Fits on the host in float64 (:func:`~jaxretrieval.whitening.learn_pca_whitening`).

    Args:
      descriptors: Raw local descriptors (map cells) of training images, rows.
      dim: Output dimension, at most C.
      whitening: Also divide each direction by its standard deviation.
      eps: Ridge added to the covariance.

    Returns:
      The projection, ``projection`` of shape ``(dim, C)``; for plain PCA its rows are
      orthonormal.

    Raises:
      ValueError: Fewer than two descriptors, or ``dim`` outside ``[1, C]``.
    """
    x = validation.as_host_float_array(
        "learn_descriptor_pca: descriptors", descriptors, axes="N C", dtype=np.float64
    )
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)  # (N, 1)
    return learn_pca_whitening(x / norms, shrinkage=1.0 if whitening else 0.0, eps=eps, dim=dim)


def apply_descriptor_pca(
    pca: Whitening, descriptors: Float[AnyArray, "M C"]
) -> Float[Array, "M dim"]:
    """``l2(P (l2(f) - mean))``: DELF's descriptor post-processing (pure JAX).

    Args:
      pca: From :func:`learn_descriptor_pca`.
      descriptors: Raw local descriptors, rows. A zero padding row becomes
        ``l2(-P mean)``, not zero: keep the features' ``valid`` mask with the output.

    Returns:
      Unit-norm descriptors of the PCA's dimension.
    """
    return apply_whitening(pca, l2_normalize(descriptors))


def pca_variables(pca: Whitening) -> dict[str, Any]:
    """The ``pca`` variable collection of a saved DELF model (NumPy float32)."""
    return {
        "mean": np.asarray(pca.mean, np.float32),
        "projection": np.asarray(pca.projection, np.float32),
    }


def pca_from_variables(variables: dict[str, Any]) -> Whitening | None:
    """The PCA stored in a DELF model's variables, or None if it has none."""
    stored = variables.get("pca")
    if stored is None:
        return None
    return Whitening(mean=stored["mean"], projection=stored["projection"])
