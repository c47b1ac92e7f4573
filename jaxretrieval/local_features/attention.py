"""DELF's attention-weighted pooling of a local-feature map (the functional core).

The attention head (:class:`jaxretrieval.layers.AttentionPooling`) scores every cell of a
feature map with a non-negative weight; :func:`attention_pooling` turns the map and
the weights into one vector per image, the input of the classifier that trains the
attention implicitly (DELF's second stage). Feature maps are NHWC.
"""

import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Bool, Float
from jaxretrieval.normalization import l2_normalize

__all__ = ["attention_pooling", "feature_norms"]


def attention_pooling(
    features: Float[AnyArray, "B H W C"],
    scores: Float[AnyArray, "B H W"],
    valid: Bool[AnyArray, "B H W"] | None = None,
    *,
    normalize_features: bool = True,
) -> Float[Array, "B C"]:
    """Attention-weighted average of a feature map: ``mean over valid n of a_n f_n``.

    The paper writes the pooled vector as ``sum_n a(f_n) f_n``; the authors' code takes
    the spatial mean (``reduce_mean``), which differs by the constant ``1 / (H W)`` that
    the following linear classifier absorbs. The mean over *valid* cells is used here so
    that an image padded into a larger canvas pools exactly as it would alone. As in
    the authors' ``use_l2_normalized_feature`` setting (the paper's DELF+FT+ATT), the
    features are L2-normalised per cell before weighting (``normalize_features``), so
    the weights alone decide how much each location counts.

    Args:
      features: Local-feature map.
      scores: Non-negative attention weight of each cell (e.g. softplus outputs).
      valid: Optional mask of real cells (padding excluded); None means all.
      normalize_features: L2-normalise each cell's feature vector first (static).

    Returns:
      The pooled vectors (not normalised), float32 (float64 if given float64).

    Raises:
      ValueError: If ``scores`` or ``valid`` does not match the map's ``(B, H, W)``.
      TypeError: If ``features`` or ``scores`` is not floating, or ``valid`` not boolean.

    References:
      Noh, Araujo, Sim, Weyand, Han. Large-scale image retrieval with attentive deep
      local features. ICCV 2017.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = jnp.array([[[[3.0, 4.0], [1.0, 0.0]]]])  # (1, 1, 2, 2): two cells
      >>> attention_pooling(f, jnp.array([[[1.0, 0.0]]])).tolist()
      [[0.30000001192092896, 0.4000000059604645]]
    """
    name = "attention_pooling"
    features = validation.as_float_array(f"{name}: features", features, axes="B H W C")
    scores = validation.as_float_array(f"{name}: scores", scores, axes="B H W")
    if scores.shape != features.shape[:3]:
        raise ValueError(
            f"{name}: scores must have shape (B, H, W) = {features.shape[:3]} to match "
            f"features {features.shape}, found {scores.shape}."
        )
    features, scores = validation.common_float(features, scores)
    if normalize_features:
        features = l2_normalize(features)
    if valid is None:
        weights = scores  # (B, H, W)
        count = jnp.asarray(scores.shape[1] * scores.shape[2], scores.dtype)
    else:
        valid = validation.as_mask(f"{name}: valid", valid, shape=scores.shape, axes="B H W")
        weights = jnp.where(valid, scores, 0.0)  # (B, H, W)
        count = jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1).astype(scores.dtype)[:, None]  # (B, 1)
    pooled = jnp.einsum("bhw,bhwc->bc", weights, features)  # (B, C)
    return pooled / count


def feature_norms(features: Float[AnyArray, "B H W C"]) -> Float[Array, "B H W"]:
    """L2 norm of each cell's feature vector: the keypoint score without attention.

    The attention-free baseline of the ablations (a model before, or without, the
    attention stage): keypoints are the cells with the strongest activations.
    """
    features = validation.as_float_array("feature_norms: features", features, axes="B H W C")
    return jnp.sqrt(jnp.sum(features * features, axis=-1))
