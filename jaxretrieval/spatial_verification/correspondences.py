"""Tentative correspondences between two sets of DSM local features, as fixed-size arrays.

In DSM each activation channel acts as a visual word: a feature of image a may correspond
only to features of image b detected in the same channel. All same-channel pairs are
candidates; if there are more than the fixed budget ``P``, the pairs with the highest
strength product are kept.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import Array, Bool, Int
from jaxretrieval.spatial_verification.activation_regions import LocalFeatures


class Correspondences(NamedTuple):
    """Fixed-size index pairs into two feature sets.

    Attributes:
      index_a: ``(P,)`` feature index in image a (0 for padding).
      index_b: ``(P,)`` feature index in image b (0 for padding).
      valid: ``(P,)`` which rows are real correspondences.
    """

    index_a: Int[Array, "*batch P"]
    index_b: Int[Array, "*batch P"]
    valid: Bool[Array, "*batch P"]


def check_local_features(name: str, features: LocalFeatures) -> LocalFeatures:
    """Validates one image's :class:`LocalFeatures` (static shapes) and casts dtypes."""
    if not isinstance(features, LocalFeatures):
        raise TypeError(f"{name} must be LocalFeatures, got {type(features).__name__}.")
    means = validation.as_float_array(f"{name}.means", features.means, axes="M 2")
    num = means.shape[0]
    expected = {
        "covariances": (num, 2, 2),
        "strengths": (num,),
        "channels": (num,),
        "valid": (num,),
    }
    if features.scale_ids is not None:
        expected["scale_ids"] = (num,)
    for field, shape in expected.items():
        found = jnp.shape(getattr(features, field))
        if found != shape:
            raise ValueError(
                f"{name}.{field} must have shape {shape} to match means {means.shape}, "
                f"found {found}."
            )
    means, covariances, strengths = validation.common_float(
        means,
        validation.as_float_array(f"{name}.covariances", features.covariances),
        validation.as_float_array(f"{name}.strengths", features.strengths),
    )
    return LocalFeatures(
        means=means,
        covariances=covariances,
        strengths=strengths,
        channels=validation.as_int_array(f"{name}.channels", features.channels),
        valid=validation.as_mask(f"{name}.valid", features.valid),
        scale_ids=None
        if features.scale_ids is None
        else validation.as_int_array(f"{name}.scale_ids", features.scale_ids),
    )


def tentative_correspondences(
    features_a: LocalFeatures, features_b: LocalFeatures, *, max_correspondences: int
) -> Correspondences:
    """Same-channel feature pairs, at most ``max_correspondences``, strongest first.

    Every pair (i, j) of valid features with ``channels_a[i] == channels_b[j]`` is a
    candidate. Candidates are ordered by ``strengths_a[i] * strengths_b[j]`` (descending;
    ties by the flat index ``i * M_b + j``, i.e. lower i, then lower j) and the first
    ``max_correspondences`` are returned; unused rows are padding with ``valid`` False.
    Strengths are non-negative pooled activations, so the product ranks pairs that are
    strong in both images first.

    Args:
      features_a: Features of image a, leading axis M_a (one image; vmap for batches).
      features_b: Features of image b, leading axis M_b.
      max_correspondences: P, the fixed output size (static).

    Returns:
      A :class:`Correspondences` of shape (P,).

    Raises:
      ValueError: If ``max_correspondences < 1`` or a feature set is malformed.
      TypeError: If a feature set has the wrong dtypes.

    References:
      Simeoni, Avrithis, Chum. Local features and visual words emerge in activations.
      CVPR 2019.
    """
    features_a = check_local_features("features_a", features_a)
    features_b = check_local_features("features_b", features_b)
    if max_correspondences < 1:
        raise ValueError(f"max_correspondences must be >= 1, got {max_correspondences}.")
    num_a, num_b = features_a.means.shape[0], features_b.means.shape[0]
    same = (
        (features_a.channels[:, None] == features_b.channels[None, :])
        & features_a.valid[:, None]
        & features_b.valid[None, :]
    )  # (M_a, M_b)
    score = features_a.strengths[:, None] * features_b.strengths[None, :]  # (M_a, M_b)
    score = jnp.where(same, score, -jnp.inf).reshape(-1)  # (M_a * M_b,)
    k = min(max_correspondences, num_a * num_b)
    top_scores, flat = jax.lax.top_k(score, k)  # (k,), ties keep the lower index first
    valid = top_scores > -jnp.inf
    index_a = jnp.where(valid, flat // num_b, 0).astype(jnp.int32)
    index_b = jnp.where(valid, flat % num_b, 0).astype(jnp.int32)
    pad = max_correspondences - k
    if pad:
        index_a = jnp.pad(index_a, (0, pad))
        index_b = jnp.pad(index_b, (0, pad))
        valid = jnp.pad(valid, (0, pad))
    return Correspondences(index_a=index_a, index_b=index_b, valid=valid)
