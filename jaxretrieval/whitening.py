"""Descriptor whitening: learn a projection once on the host, apply it anywhere.

A :class:`Whitening` is a plain NamedTuple ``(mean, projection)``, so it is a pytree: it
passes through ``jit``/``vmap``, pickles, and goes into checkpoints. The learning functions
are a one-off fit over a training set of descriptors; they run on the host in float64
NumPy (``eigh`` of a ``D x D`` matrix), like cirtorch's ``whiten.py``. Applying is pure JAX:

    whitened = l2_normalize((x - mean) @ projection[:dim].T)

Eigenvectors are defined up to sign (and up to rotation inside repeated eigenvalues),
so two correct fits can have different projections; what is unique is what the projection
does to distances: compare Gram matrices or rankings, never the matrices themselves.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float, Int
from jaxretrieval.normalization import l2_normalize


class Whitening(NamedTuple):
    """A learned affine projection ``x -> projection @ (x - mean)``.

    Attributes:
      mean: The training mean subtracted first, shape ``(D,)``.
      projection: Rows are the output directions, most significant first, shape
        ``(D_out, D)``; keep a prefix of rows to reduce the dimension.
    """

    mean: Float[Array, " D"]
    projection: Float[Array, "D_out D"]


def _training_descriptors(name: str, descriptors: AnyArray) -> np.ndarray:
    """Host float64 rows (the fit's ``eigh`` precision), finite, at least two of them."""
    x = validation.as_host_float_array(
        f"{name}: descriptors", descriptors, axes="N D", dtype=np.float64
    )
    if x.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 descriptors to fit, found shape {x.shape}.")
    validation.check_finite(f"{name}: descriptors", x)
    return x


def _check_dim(name: str, dim: int | None, available: int) -> int:
    if dim is None:
        return available
    if not 1 <= dim <= available:
        raise ValueError(f"{name}: dim must be in [1, {available}], found {dim}.")
    return dim


def _descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric matrix, largest eigenvalue first."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], eigenvectors[:, order]


def _to_whitening(mean: np.ndarray, projection: np.ndarray) -> Whitening:
    return Whitening(
        mean=jnp.asarray(mean, dtype=jnp.float32),
        projection=jnp.asarray(projection, dtype=jnp.float32),
    )


def learn_pca_whitening(
    descriptors: Float[AnyArray, "N D"],
    *,
    shrinkage: float = 1.0,
    eps: float = 1e-6,
    dim: int | None = None,
) -> Whitening:
    """PCA whitening learned without labels (cirtorch ``pcawhitenlearn``), with shrinkage.

    With ``C = (X - m)^T (X - m) / N + eps * I = V diag(lambda) V^T`` (eigenvalues in
    decreasing order), the projection is ``diag(lambda ** (-shrinkage / 2)) V^T``.
    ``shrinkage = 1`` is full whitening (unit variance in every direction, cirtorch's
    form); ``shrinkage = 0.5`` whitens with the square roots of the eigenvalues, the
    shrinkage of Jégou & Chum that damps the noisy low-variance directions;
    ``shrinkage = 0`` is a plain PCA rotation. The explicit ``eps * I`` keeps the inverse
    finite when ``N <= D`` (then only the first ``N - 1`` directions carry data).

    Fitting runs on the host in float64 NumPy; the result is float32 JAX arrays.

    Args:
      descriptors: Training descriptors, rows (typically L2-normalised).
      shrinkage: Exponent applied to the eigenvalues' inverse square root.
      eps: Ridge added to the covariance's diagonal.
      dim: Keep only the first ``dim`` output directions (default: all ``D``).

    Returns:
      The learned :class:`Whitening`, projection of shape ``(dim, D)``.

    Raises:
      ValueError: For a non-matrix input, fewer than 2 rows, or ``dim`` out of range.
      TypeError: For non-floating descriptors.

    References:
      Jégou, Chum. Negative evidences and co-occurrences in image retrieval: the benefit
      of PCA and whitening. ECCV 2012.
      Radenović, Tolias, Chum. Fine-tuning CNN image retrieval with no human annotation.
      TPAMI 2018.
    """
    x = _training_descriptors("learn_pca_whitening", descriptors)
    n, d = x.shape
    dim = _check_dim("learn_pca_whitening", dim, d)
    mean = x.mean(axis=0)  # (D,)
    centred = x - mean  # (N, D)
    covariance = centred.T @ centred / n + eps * np.eye(d)  # (D, D)
    eigenvalues, eigenvectors = _descending_eigh(covariance)
    # Row k of the projection is eigenvector k scaled by lambda_k ** (-shrinkage / 2).
    projection = (eigenvalues ** (-shrinkage / 2.0))[:, None] * eigenvectors.T  # (D, D)
    return _to_whitening(mean, projection[:dim])


def _check_pairs(
    name: str, query_idx: AnyArray, positive_idx: AnyArray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    q = validation.index_array(f"{name}: query_idx", query_idx, upper=n)
    p = validation.index_array(f"{name}: positive_idx", positive_idx, upper=n)
    if q.shape != p.shape or q.size == 0:
        raise ValueError(
            f"{name}: query_idx and positive_idx must be non-empty and of equal length, "
            f"found {q.shape} and {p.shape}."
        )
    return q, p


CENTERINGS = ("queries", "all")


def learn_supervised_whitening(
    descriptors: Float[AnyArray, "N D"],
    query_idx: Int[AnyArray, " P"],
    positive_idx: Int[AnyArray, " P"],
    *,
    centering: str = "queries",
    eps: float = 1e-6,
    dim: int | None = None,
) -> Whitening:
    """Learned whitening Lw from matching pairs (Radenović et al., cirtorch ``whitenlearn``).

    1. ``m``, the centre: with ``centering="queries"`` (the default, cirtorch's
       definition) the mean of ``x[query_idx]``, one term per pair, so an image counts as
       often as it is a query and images in no pair do not count; with
       ``centering="all"`` the mean of all ``N`` descriptors.
    2. ``C_S`` = covariance of the matching-pair differences ``x_q - x_p`` (plus
       ``eps * I``); ``C_S^{-1/2}`` (symmetric, from ``eigh``) whitens the intra-class
       variation, so that matching pairs end up close. The centre does not enter here.
    3. PCA of all ``N`` whitened descriptors about the centre: eigenvectors ``U`` of
       ``Y^T Y / N`` with ``Y = (X - m) C_S^{-1/2}``, in decreasing eigenvalue order.
       With ``"all"`` this is the covariance; with ``"queries"`` it is the second moment
       about the queries' mean, as in cirtorch, so the centre changes the rotation too,
       not only the vector subtracted at apply time.
    4. ``projection = U^T C_S^{-1/2}``.

    The two centrings agree when every descriptor is a query equally often (e.g. all
    ordered pairs of scenes of equal size); real pairs are not like that. cirtorch
    factors ``C_S`` by Cholesky instead of the symmetric square root; the two differ by a
    rotation that the PCA step absorbs, so the learned projections agree up to
    eigenvector signs. cirtorch regularises by retrying Cholesky with a growing ridge;
    here the ridge is the explicit ``eps``. With fewer independent pair differences than
    ``D`` (``N - num_scenes < D``), ``C_S`` is singular and ``eps`` sets the gain of the
    directions no pair varies along.

    Fitting runs on the host in float64 NumPy; the result is float32 JAX arrays.

    Args:
      descriptors: Training descriptors, rows (unwhitened, typically L2-normalised).
      query_idx: Row index of the first image (the query) of each matching pair.
      positive_idx: Row index of the second image of each matching pair.
      centering: ``"queries"`` (cirtorch) or ``"all"``; see above.
      eps: Ridge added to ``C_S``'s diagonal (needed when there are fewer pairs than D).
      dim: Keep only the first ``dim`` output directions (default: all ``D``).

    Returns:
      The learned :class:`Whitening`, projection of shape ``(dim, D)``.

    Raises:
      ValueError: For bad shapes, out-of-range or mismatched indices, an unknown
        ``centering``, or ``dim`` out of range.
      TypeError: For non-floating descriptors.

    References:
      Radenović, Tolias, Chum. Fine-tuning CNN image retrieval with no human annotation.
      TPAMI 2018 (section 3.3, learned whitening).
      Mikolajczyk, Matas. Improving descriptors for fast tree matching by optimal linear
      projection. ICCV 2007.
    """
    name = "learn_supervised_whitening"
    if centering not in CENTERINGS:
        raise ValueError(f"{name}: centering must be one of {CENTERINGS}, found {centering!r}.")
    x = _training_descriptors(name, descriptors)
    n, d = x.shape
    dim = _check_dim(name, dim, d)
    q, p = _check_pairs(name, query_idx, positive_idx, n)
    mean = x[q].mean(axis=0) if centering == "queries" else x.mean(axis=0)  # (D,)
    differences = x[q] - x[p]  # (P, D)
    intra = differences.T @ differences / len(q) + eps * np.eye(d)  # (D, D) C_S
    values, vectors = np.linalg.eigh(intra)
    # C_S^{-1/2} = V diag(values^{-1/2}) V^T, symmetric.
    inverse_sqrt = (vectors * values**-0.5) @ vectors.T  # (D, D)
    whitened = (x - mean) @ inverse_sqrt  # (N, D); inverse_sqrt is symmetric
    _, rotation = _descending_eigh(whitened.T @ whitened / n)  # (D, D) columns U
    projection = rotation.T @ inverse_sqrt  # (D, D)
    return _to_whitening(mean, projection[:dim])


def apply_whitening(
    whitening: Whitening, x: Float[AnyArray, "N D"], *, dim: int | None = None
) -> Float[Array, "N dim"]:
    """Projects descriptors with a learned whitening, keeps ``dim`` outputs, L2-normalises.

    ``l2_normalize((x - mean) @ projection[:dim].T)``; pure JAX, jit-able with ``dim``
    static. Use it for queries and database alike.

    Args:
      whitening: From :func:`learn_pca_whitening` or :func:`learn_supervised_whitening`.
      x: Descriptors, rows.
      dim: Output dimension (a prefix of the projection's rows); default all of them.

    Returns:
      Whitened, L2-normalised descriptors, float32 (float64 if given float64).

    Raises:
      ValueError: If ``x``'s dimension differs from the whitening's or ``dim`` is out of
        range.

    Examples:
      >>> import jax.numpy as jnp
      >>> w = Whitening(mean=jnp.zeros(2), projection=jnp.array([[0.0, 2.0], [1.0, 0.0]]))
      >>> [round(v, 4) for v in apply_whitening(w, jnp.array([[3.0, 4.0]]))[0].tolist()]
      [0.9363, 0.3511]
      >>> apply_whitening(w, jnp.array([[3.0, 4.0]]), dim=1).tolist()
      [[1.0]]
    """
    x = validation.as_float_array("apply_whitening: descriptors", x, axes="N D")
    mean, projection = jnp.asarray(whitening.mean), jnp.asarray(whitening.projection)
    if x.shape[1] != projection.shape[1] or mean.shape != (x.shape[1],):
        raise ValueError(
            f"apply_whitening: descriptors {x.shape} do not fit a whitening with mean "
            f"{mean.shape} and projection {projection.shape}."
        )
    dim = _check_dim("apply_whitening", dim, projection.shape[0])
    centred = x - mean.astype(x.dtype)[None, :]  # (N, D)
    projected = centred @ projection[:dim].astype(x.dtype).T  # (N, dim)
    return l2_normalize(projected)
