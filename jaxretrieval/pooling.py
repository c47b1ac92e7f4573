"""Global pooling of convolutional feature maps into one descriptor per image.

All functions take NHWC feature maps ``(B, H, W, C)`` and return ``(B, C)`` descriptors
(not L2-normalised), or ``(B, R, D)`` / ``(B, N, C)`` per-region or per-class vectors for
the regional (:func:`ramac`) and class-weighted (:func:`cam_weighted`) poolings, whose
``*_aggregate`` functions reduce them to one descriptor. Reductions run in float32 even
for bf16 input. An optional boolean ``valid`` mask ``(B, H, W)`` marks the real pixels of
images padded into one batch, so a padded image pools exactly as it would alone; the
grid-based :func:`rmac` and :func:`ramac` refuse a mask (a padded image's grid depends on
its real size), so bucket their inputs by exact map size. DARAC's grid
(:func:`darac_regions`) has a fixed number of regions and is placed on each image's real
map size inside the traced program, so :func:`darac_regional` accepts a mask.

Shape-like arguments (``levels``, ``num_classes``) are static; float arguments (``p``,
CroW's ``a`` and ``b``, region weights) are traced, so sweeping them does not recompile.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int, Scalar
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.regions import region_masks, rmac_regions
from jaxretrieval.whitening import Whitening, apply_whitening


def _check_features(
    name: str, features: AnyArray, valid: AnyArray | None
) -> tuple[Array, Array | None]:
    """Validates shapes (statically) and casts to float32 (float64 kept)."""
    features = validation.as_float_array(f"{name}: features", features, axes="B H W C")
    if valid is not None:
        valid = validation.as_mask(
            f"{name}: valid mask", valid, shape=features.shape[:3], axes="B H W"
        )
    return features, valid


def _masked_mean(x: Array, valid: Array | None) -> Array:
    """Spatial mean over the valid pixels of ``x`` (B, H, W, C) -> (B, C)."""
    if valid is None:
        return jnp.mean(x, axis=(1, 2))
    weight = valid[..., None].astype(x.dtype)  # (B, H, W, 1)
    count = jnp.maximum(jnp.sum(weight, axis=(1, 2)), 1.0)  # (B, 1)
    return jnp.sum(x * weight, axis=(1, 2)) / count


def spoc(
    features: Float[AnyArray, "B H W C"], valid: Bool[AnyArray, "B H W"] | None = None
) -> Float[Array, "B C"]:
    """SPoC: sum-pooled convolutional features (computed as the spatial mean).

    The mean differs from the paper's sum only by a per-image constant, which the final
    L2 normalisation removes; the mean keeps a padded image equal to the unpadded one.
    The optional centre prior of the paper is not applied (cirtorch omits it too).

    Args:
      features: Activations, NHWC.
      valid: Optional mask of real (non-padding) pixels.

    Returns:
      Pooled descriptors.

    References:
      Babenko, Lempitsky. Aggregating local deep features for image retrieval. ICCV 2015.

    Examples:
      >>> import jax.numpy as jnp
      >>> spoc(jnp.arange(6.0).reshape(1, 2, 3, 1)).tolist()
      [[2.5]]
    """
    features, valid = _check_features("spoc", features, valid)
    return _masked_mean(features, valid)


def mac(
    features: Float[AnyArray, "B H W C"], valid: Bool[AnyArray, "B H W"] | None = None
) -> Float[Array, "B C"]:
    """MAC: maximum activation of each channel over the (valid) spatial positions.

    Args:
      features: Activations, NHWC.
      valid: Optional mask of real (non-padding) pixels.

    Returns:
      Pooled descriptors; zeros for an image without any valid pixel.

    References:
      Tolias, Sicre, Jégou. Particular object retrieval with integral max-pooling of CNN
      activations. ICLR 2016.

    Examples:
      >>> import jax.numpy as jnp
      >>> mac(jnp.arange(6.0).reshape(1, 2, 3, 1)).tolist()
      [[5.0]]
    """
    features, valid = _check_features("mac", features, valid)
    if valid is None:
        return jnp.max(features, axis=(1, 2))
    masked = jnp.where(valid[..., None], features, -jnp.inf)  # (B, H, W, C)
    # An image with no valid pixel (a blank batch filler) pools to zeros, not -inf.
    has_pixels = jnp.any(valid, axis=(1, 2))[:, None]  # (B, 1)
    return jnp.where(has_pixels, jnp.max(masked, axis=(1, 2)), 0.0)


def gem(
    features: Float[AnyArray, "B H W C"],
    p: Scalar = 3.0,
    eps: float = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B C"]:
    """Generalised-mean (GeM) pooling over the spatial axes.

    ``(mean over pixels of clip(x, eps) ** p) ** (1 / p)``.

    Args:
      features: Non-negative activations (e.g. post-ReLU), NHWC.
      p: Pooling exponent. p=1 is average pooling (SPoC); large p approaches MAC.
        Traced, not static: sweeping or learning p does not recompile.
      eps: Lower clamp applied before the power; keeps gradients finite at 0.
      valid: Optional mask of real (non-padding) pixels.

    Returns:
      Pooled descriptors.

    References:
      Radenović, Tolias, Chum. Fine-tuning CNN image retrieval with no human annotation.
      TPAMI 2018.

    Examples:
      >>> import jax.numpy as jnp
      >>> round(float(gem(jnp.array([1.0, 2.0]).reshape(1, 1, 2, 1), p=1.0)[0, 0]), 4)
      1.5
    """
    features, valid = _check_features("gem", features, valid)
    p = jnp.asarray(p, dtype=features.dtype)
    powered = jnp.clip(features, eps) ** p  # (B, H, W, C)
    return _masked_mean(powered, valid) ** (1.0 / p)


# --------------------------------------------------------------------------- regional


def _reject_valid(name: str, valid: Array | None) -> None:
    """Regional poolings need each image's own grid; a padded batch has none static."""
    if valid is not None:
        raise NotImplementedError(
            f"{name} does not support a padding mask: its regions are a static grid of the "
            "map size, and a padded image's grid depends on its real size. Bucket images by "
            "exact feature-map size (or crop the padding) and call it without `valid`."
        )


def _safe_norm(x: Array, axis: int = -1) -> Array:
    """L2 norm with keepdims whose gradient is 0 (not NaN) at the zero vector."""
    squared = jnp.sum(x * x, axis=axis, keepdims=True)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _regional_max(features: Array, boxes: np.ndarray) -> Array:
    """Per-box spatial max, (B, H, W, C) -> (B, R, C), one static slice per box.

    A separable sparse-table max (log2 passes per axis) ran the forward pass about 2.7x
    faster on 8x32x24x1280 maps here, but its gradient compiled twice as long and ran
    twice as slow; per-box slices keep compile time and training cost lower, and the
    pooling is negligible next to the backbone either way.
    """
    return jnp.stack(
        [
            jnp.max(features[:, top:bottom, left:right], axis=(1, 2))
            for top, left, bottom, right in boxes.tolist()
        ],
        axis=1,
    )  # (B, R, C)


def _regional_mean(features: Array, boxes: np.ndarray) -> Array:
    """Per-box spatial mean, (B, H, W, C) -> (B, R, C), as one matmul with box masks.

    About 7x faster than reducing per-box slices (8x32x24x1280 maps, CPU) and quicker to
    compile.
    """
    batch, height, width, channels = features.shape
    masks = region_masks(boxes, height, width).astype(np.float64)  # (R, H, W)
    averaging = masks / masks.sum(axis=(1, 2), keepdims=True)
    averaging = jnp.asarray(averaging.reshape(len(boxes), height * width), features.dtype)
    flat = features.reshape(batch, height * width, channels)  # (B, H*W, C)
    # HIGHEST: full float32 on accelerators, whose default matmul precision is bf16.
    return jnp.einsum("rp,bpc->brc", averaging, flat, precision=lax.Precision.HIGHEST)


def rmac(
    features: Float[AnyArray, "B H W C"],
    *,
    levels: int = 3,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B C"]:
    """R-MAC: sum of the L2-normalised MACs of a fixed multi-scale grid of square regions.

    The regions are :func:`jaxretrieval.regions.rmac_regions` of the static map size
    (whole map first, then ``levels`` levels of overlapping squares), each max-pooled,
    divided by ``norm + eps`` (cirtorch's form) and summed. As the other poolings here,
    the result is not L2-normalised. Regions are static slices, so the function has
    static shapes and is differentiable (used for end-to-end fine-tuning).

    Args:
      features: Activations, NHWC.
      levels: Number of region scales ``L`` (static).
      eps: Added to each regional norm.
      valid: Must be None: see Raises.

    Returns:
      Pooled descriptors.

    Raises:
      NotImplementedError: If ``valid`` is given. The grid of a padded image depends on
        its real size, which is data; bucket images by exact map size instead.

    References:
      Tolias, Sicre, Jégou. Particular object retrieval with integral max-pooling of CNN
      activations. ICLR 2016.
    """
    features, valid = _check_features("rmac", features, valid)
    _reject_valid("rmac", valid)
    boxes = rmac_regions(features.shape[1], features.shape[2], levels=levels)
    regional = _regional_max(features, boxes)  # (B, R, C)
    return jnp.sum(regional / (_safe_norm(regional) + eps), axis=1)


def ramac(
    features: Float[AnyArray, "B H W C"],
    *,
    levels: int = 3,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B R 2*C"]:
    """RAMAC: regional max AND average activations over the R-MAC grid, one row per region.

    For each region ``r`` of :func:`jaxretrieval.regions.rmac_regions` (the whole map
    first; at ``levels=3``, 21 regions for maps of aspect ratio in (1, 1.8], 15 for square
    maps, 27 for aspect ratios in (1.8, 2.44]) the output row is
    ``[mac_r / (|mac_r| + eps), avg_r / (|avg_r| + eps)]``: the two halves are
    L2-normalised separately so that the larger max activations do not drown the averages.
    Regions are returned unaggregated so that an aggregator (DARAC) can learn one weight
    per region; :func:`ramac_aggregate` is the fixed equal-weight sum. The first ``C``
    columns aggregated alone give :func:`rmac`.

    Args:
      features: Activations, NHWC.
      levels: Number of region scales (static).
      eps: Added to each norm.
      valid: Must be None (see :func:`rmac`).

    Returns:
      Regional vectors ``(B, R, 2C)``: max half first, average half second.

    Raises:
      NotImplementedError: If ``valid`` is given (see :func:`rmac`).

    References:
      DARAC: learned region weighting over regional average and max activations (the
      project's DARAC poster); Tolias et al. ICLR 2016 for the grid.
    """
    features, valid = _check_features("ramac", features, valid)
    _reject_valid("ramac", valid)
    boxes = rmac_regions(features.shape[1], features.shape[2], levels=levels)
    maxima = _regional_max(features, boxes)  # (B, R, C)
    means = _regional_mean(features, boxes)  # (B, R, C)
    maxima = maxima / (_safe_norm(maxima) + eps)
    means = means / (_safe_norm(means) + eps)
    return jnp.concatenate([maxima, means], axis=-1)  # (B, R, 2C)


def ramac_aggregate(
    regional: Float[AnyArray, "B R D"],
    region_weights: Float[AnyArray, "*#B R"] | None = None,
    *,
    eps: Scalar = 1e-6,
) -> Float[Array, "B D"]:
    """Weighted sum of L2-normalised regional vectors (the R-MAC/RAMAC aggregation).

    ``sum_r w_r * v_r / (|v_r| + eps)``, not L2-normalised afterwards. With the default
    equal weights this is RAMAC's fixed aggregation; DARAC learns ``w``.

    Args:
      regional: Regional vectors, e.g. :func:`ramac`'s ``(B, R, 2C)`` or one half of it.
      region_weights: Weights per region, ``(R,)`` shared or ``(B, R)`` per image; traced.
        Default: all ones.
      eps: Added to each norm.

    Returns:
      Aggregated descriptors ``(B, D)``.

    Raises:
      ValueError: If ``regional`` is not rank 3 or the weights do not match its regions.
    """
    regional = jnp.asarray(regional)
    if regional.ndim != 3:
        raise ValueError(
            f"ramac_aggregate expects regional vectors (B, R, D), found shape {regional.shape}."
        )
    if regional.dtype != jnp.float64:
        regional = regional.astype(jnp.float32)
    normalised = regional / (_safe_norm(regional) + eps)  # (B, R, D)
    if region_weights is None:
        return jnp.sum(normalised, axis=1)
    weights = jnp.asarray(region_weights, dtype=regional.dtype)
    if weights.shape not in ((regional.shape[1],), regional.shape[:2]):
        raise ValueError(
            f"ramac_aggregate: region_weights must have shape (R,) or (B, R) for regional "
            f"vectors {regional.shape}, found {weights.shape}."
        )
    weights = jnp.broadcast_to(weights, regional.shape[:2])  # (B, R)
    return jnp.einsum("br,brd->bd", weights, normalised)


# --------------------------------------------------------------------------- DARAC


def num_darac_regions(levels: int = 3) -> int:
    """Regions ``R`` of the DARAC grid: 1 + sum over levels l of l (l + 1); 21 at L = 3."""
    return 1 + sum(level * (level + 1) for level in range(1, levels + 1))


def _darac_layout(levels: int) -> np.ndarray:
    """Static ``(R, 3)`` rows ``(level, short-axis index, long-axis index)``, region 0 first."""
    rows = [(0, 0, 0)]
    for level in range(1, levels + 1):
        rows += [(level, i, j) for i in range(level) for j in range(level + 1)]
    return np.asarray(rows, np.int32)  # (R, 3)


def darac_regions(map_sizes: Int[AnyArray, "B 2"], *, levels: int = 3) -> Int[Array, "B R 4"]:
    """The DARAC region grid of each map: a fixed number of regions for every aspect ratio.

    The R-MAC grid (:func:`jaxretrieval.regions.rmac_regions`) with one more square along
    the long side than along the short side at every level, whatever the aspect ratio:
    region 0 is the whole map, and level ``l`` (1..levels) adds ``l x (l + 1)`` squares of
    side ``max(1, floor(2 min(h, w) / (l + 1)))``, spread uniformly with the first flush
    with the top/left border and the last with the bottom/right one (start positions
    rounded down). For maps whose aspect ratio makes R-MAC choose one extra square
    (landscape, ratio in (1, 1.8] at L = 3) this is exactly R-MAC's grid, 21 regions.

    A learned per-region weight needs region ``r`` to mean the same place in every image,
    so the count never changes: square maps get two coincident level-1 squares, and
    portrait maps (h > w) use the transposed grid (row ``r`` is then the same position
    along the long and short axes as in a landscape map). The integer arithmetic is
    traced, so the sizes may be data: each image of a padded batch gets the grid of its
    real map size.

    Args:
      map_sizes: Real ``(height, width)`` of each feature map, in cells (at least 1).
      levels: Number of scale levels ``L`` (static).

    Returns:
      Half-open boxes ``(top, left, bottom, right)`` in cells, region 0 the whole map.

    Examples:
      >>> darac_regions(np.array([[6, 9]]), levels=1)[0].tolist()
      [[0, 0, 6, 9], [0, 0, 6, 6], [0, 3, 6, 9]]
    """
    sizes = validation.as_int_array("darac_regions: map_sizes", map_sizes, axes="B 2")
    height, width = sizes[:, :1], sizes[:, 1:]  # (B, 1) each
    portrait = height > width
    short, long_ = jnp.minimum(height, width), jnp.maximum(height, width)  # (B, 1)
    layout = _darac_layout(levels)[None]  # (1, R, 3), static
    level, i, j = layout[..., 0], layout[..., 1], layout[..., 2]  # (1, R) each
    side = jnp.maximum(2 * short // (level + 1), 1)  # (B, R)
    whole = jnp.broadcast_to(level == 0, side.shape)  # (B, R)
    short_extent = jnp.where(whole, short, side)  # (B, R)
    long_extent = jnp.where(whole, long_, side)
    # Start k of n along an axis: floor(k * (extent - side) / (n - 1)); zero for region 0.
    short_start = jnp.where(whole, 0, i * (short - side) // np.maximum(level - 1, 1))
    long_start = jnp.where(whole, 0, j * (long_ - side) // np.maximum(level, 1))
    top = jnp.where(portrait, long_start, short_start)  # (B, R)
    left = jnp.where(portrait, short_start, long_start)
    bottom = top + jnp.where(portrait, long_extent, short_extent)
    right = left + jnp.where(portrait, short_extent, long_extent)
    return jnp.stack([top, left, bottom, right], axis=-1).astype(jnp.int32)  # (B, R, 4)


def box_masks(boxes: Int[AnyArray, "B R 4"], height: int, width: int) -> Bool[Array, "B R H W"]:
    """Masks of half-open ``(top, left, bottom, right)`` boxes on a static ``H x W`` grid."""
    boxes = jnp.asarray(boxes).astype(jnp.int32)
    rows = jnp.arange(height, dtype=jnp.int32)[None, None, :, None]  # (1, 1, H, 1)
    cols = jnp.arange(width, dtype=jnp.int32)[None, None, None, :]  # (1, 1, 1, W)
    top, left, bottom, right = (boxes[..., k, None, None] for k in range(4))  # (B, R, 1, 1)
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (B, R, H, W)


def _real_map_sizes(valid: Array | None, batch: int, height: int, width: int) -> Array:
    """``(B, 2)`` real map sizes: rows and columns holding a valid (top-left) cell."""
    if valid is None:
        return jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))
    rows = jnp.sum(jnp.any(valid, axis=2), axis=1)  # (B,)
    cols = jnp.sum(jnp.any(valid, axis=1), axis=1)  # (B,)
    return jnp.maximum(jnp.stack([rows, cols], axis=-1), 1).astype(jnp.int32)  # (B, 2)


def darac_regional(
    features: Float[AnyArray, "B H W C"],
    *,
    levels: int = 3,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B R 2*C"]:
    """RAMAC vectors (regional max and average) over the DARAC grid of each image.

    Row ``r`` is ``[mac_r / (|mac_r| + eps), avg_r / (|avg_r| + eps)]`` as in
    :func:`ramac`, over the regions of :func:`darac_regions` (a fixed ``R``: 21 at
    ``levels=3``). Unlike :func:`ramac`, padding is supported: with ``valid`` (a top-left
    rectangle of real cells, as extraction and the training pipeline pad) each image's
    grid is placed on its real map size, so a padded image gives exactly its unpadded
    vectors. For a landscape map whose R-MAC grid has 21 regions this equals
    :func:`ramac`.

    Args:
      features: Activations, NHWC.
      levels: Number of scale levels (static).
      eps: Added to each norm.
      valid: Optional mask of real (non-padding) cells, a top-left rectangle per image.

    Returns:
      Regional vectors, max half first, average half second.

    References:
      DARAC: learned region weighting over regional average and max activations (the
      project's DARAC poster; Schall, Barthel, Hezel, Jung, MMSP 2019).
    """
    features, valid = _check_features("darac_regional", features, valid)
    batch, height, width, _ = features.shape
    boxes = darac_regions(_real_map_sizes(valid, batch, height, width), levels=levels)
    masks = box_masks(boxes, height, width)  # (B, R, H, W)
    weights = masks.astype(features.dtype)
    counts = jnp.sum(weights, axis=(2, 3))[..., None]  # (B, R, 1), at least 1 cell
    means = (
        jnp.einsum("brhw,bhwc->brc", weights, features, precision=lax.Precision.HIGHEST) / counts
    )  # (B, R, C)
    # One masked max per region keeps memory at one feature map (R x that for a vmap);
    # lax.map compiles the body once instead of R unrolled copies (half the compile time).
    maxima = lax.map(
        lambda mask: jnp.max(jnp.where(mask[..., None], features, -jnp.inf), axis=(1, 2)),
        jnp.moveaxis(masks, 1, 0),
    )  # (R, B, C)
    maxima = jnp.moveaxis(maxima, 0, 1)  # (B, R, C)
    maxima = maxima / (_safe_norm(maxima) + eps)
    means = means / (_safe_norm(means) + eps)
    return jnp.concatenate([maxima, means], axis=-1)  # (B, R, 2C)


def darac(
    regional: Float[AnyArray, "B R D"], region_weights: Float[AnyArray, "R 2"]
) -> Float[Array, "B C"]:
    """DARAC's learned aggregation: one weight per region and per part (max, average).

    ``sum_r w[r, 0] * max_r + w[r, 1] * avg_r``: the max and average halves of each
    regional vector (as :func:`darac_regional` or :func:`ramac` give them, each already
    L2-normalised) are summed into one ``C``-dimensional vector, not concatenated, so the
    descriptor keeps the backbone's width. Not L2-normalised. Equal weights give RAMAC's
    fixed aggregation of both parts.

    Args:
      regional: Regional vectors, max half first.
      region_weights: ``w``, traced (learned); any sign.

    Returns:
      Aggregated descriptors.

    Raises:
      ValueError: For an odd last axis or weights that do not match the regions.
    """
    regional = validation.as_float_array("darac: regional", regional, axes="B R D")
    batch, num_regions, dim = regional.shape
    if dim % 2:
        raise ValueError(f"darac: regional vectors must be [max, avg] halves, found {dim}.")
    weights = jnp.asarray(region_weights)
    if weights.shape != (num_regions, 2):
        raise ValueError(
            f"darac: region_weights must have shape (R, 2) = ({num_regions}, 2) for "
            f"regional vectors {regional.shape}, found {weights.shape}."
        )
    weights = weights.astype(regional.dtype)
    channels = dim // 2
    maxima, means = regional[..., :channels], regional[..., channels:]  # (B, R, C) each
    return jnp.einsum("r,brc->bc", weights[:, 0], maxima) + jnp.einsum(
        "r,brc->bc", weights[:, 1], means
    )


def darac_pooling(
    features: Float[AnyArray, "B H W C"],
    region_weights: Float[AnyArray, "R 2"] | None = None,
    *,
    levels: int = 3,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B C"]:
    """:func:`darac` of :func:`darac_regional`: the DARAC descriptor of feature maps.

    Args:
      features: Activations, NHWC.
      region_weights: Learned ``(R, 2)`` weights; None gives equal weights (DARAC's
        initialisation: RAMAC's sum of both parts over the fixed grid).
      levels: Number of scale levels (static).
      eps: Added to each regional norm.
      valid: Optional mask of real (non-padding) cells.

    Returns:
      Descriptors, not L2-normalised.
    """
    regional = darac_regional(features, levels=levels, eps=eps, valid=valid)
    if region_weights is None:
        region_weights = jnp.ones((regional.shape[1], 2), regional.dtype)
    return darac(regional, region_weights)


# --------------------------------------------------------------------------- CroW


def _crow_channel_weights(features: Array, valid: Array | None) -> Array:
    """``log(sum_h Q_h / Q_k)`` with ``Q_k`` the fraction of non-zero (valid) pixels of k.

    A channel that never fires (``Q_k = 0``) gets weight 0, as in the authors' code.
    """
    nonzero = (features != 0).astype(features.dtype)  # (B, H, W, C)
    fraction = _masked_mean(nonzero, valid)  # (B, C)
    total = jnp.sum(fraction, axis=-1, keepdims=True)  # (B, 1)
    fires = fraction > 0
    ratio = total / jnp.where(fires, fraction, 1.0)  # (B, C); masked where Q_k = 0
    return jnp.where(fires, jnp.log(ratio), 0.0)


def crow(
    features: Float[AnyArray, "B H W C"],
    *,
    a: Scalar = 2.0,
    b: Scalar = 2.0,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B C"]:
    """CroW: cross-dimensional (spatial and channel) weighted sum pooling.

    Spatial weight of pixel ``(i, j)``: ``(S_ij / |S|_a) ** (1 / b)`` with ``S`` the
    channel-summed map and ``|S|_a = (sum_ij S_ij ** a) ** (1 / a)``. Channel weight of
    channel ``k``: ``log(sum_h Q_h / Q_k)`` where ``Q_k`` is the fraction of (valid)
    pixels at which channel ``k`` is non-zero, and 0 for a channel that never fires
    (rather than infinity). The descriptor is ``w_k * sum_ij s_ij x_ijk``, not
    L2-normalised. This follows the authors' released code, which has no epsilon in the
    channel weights (the paper writes an optional one).

    Args:
      features: Non-negative (post-ReLU) activations, NHWC.
      a: Norm used to normalise the spatial map (traced).
      b: Power normalisation of the spatial weights, ``1 / b`` (traced).
      valid: Optional mask of real (non-padding) pixels: padding gets zero spatial weight
        and does not count in ``Q``.

    Returns:
      Pooled descriptors. An all-zero image gives an all-zero descriptor.

    References:
      Kalantidis, Mellina, Osindero. Cross-dimensional weighting for aggregated deep
      convolutional features. ECCV Workshops 2016.
    """
    features, valid = _check_features("crow", features, valid)
    a = jnp.asarray(a, dtype=features.dtype)
    b = jnp.asarray(b, dtype=features.dtype)
    summed = jnp.sum(features, axis=-1)  # (B, H, W)
    if valid is not None:
        summed = jnp.where(valid, summed, 0.0)
    norm = jnp.sum(summed**a, axis=(1, 2), keepdims=True) ** (1.0 / a)  # (B, 1, 1)
    spatial = (summed / jnp.where(norm > 0, norm, 1.0)) ** (1.0 / b)  # (B, H, W)
    pooled = jnp.einsum("bhw,bhwc->bc", spatial, features)  # (B, C)
    return pooled * _crow_channel_weights(features, valid)


# --------------------------------------------------------------------------- CAM-weighted


def _masked_extrema(maps: Array, valid: Array | None) -> tuple[Array, Array]:
    """Min and max of (B, N, H, W) maps over the valid pixels -> two (B, N, 1, 1)."""
    if valid is None:
        low, high = maps, maps
    else:
        mask = valid[:, None]  # (B, 1, H, W)
        low = jnp.where(mask, maps, jnp.inf)
        high = jnp.where(mask, maps, -jnp.inf)
    return (
        jnp.min(low, axis=(2, 3), keepdims=True),
        jnp.max(high, axis=(2, 3), keepdims=True),
    )


def class_activation_maps(
    features: Float[AnyArray, "B H W C"],
    classifier_weights: Float[AnyArray, "C K"],
    *,
    num_classes: int = 64,
    classifier_bias: Float[AnyArray, " K"] | None = None,
    normalization: str = "minmax",
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> tuple[Float[Array, "B N H W"], Int[Array, "B N"]]:
    """Normalised class activation maps of each image's top-N predicted classes.

    The prediction is the classifier applied to the globally average-pooled features,
    ``logits = mean_ij(x_ij) @ W + bias``; for each of the ``N = num_classes`` highest
    logits, the CAM is ``sum_c W[c, k] x_ijc`` (Zhou et al. 2016), then normalised per map:

    * ``"minmax"``: ``(cam - min) / (max - min)`` over the (valid) pixels, in [0, 1]
      (the paper). A constant map (``max - min <= eps``) becomes all ones: no spatial
      preference, i.e. plain sum pooling.
    * ``"max"``: ``max(cam, 0) / max(cam)``, the authors' released code; all zeros when
      no pixel is positive.

    Padding pixels (``valid`` False) get CAM 0.

    Args:
      features: Activations of the layer that feeds the global-average-pooled classifier.
      classifier_weights: Classifier matrix ``(C, K)`` for ``K`` classes (e.g. ImageNet's
        1000; a PyTorch ``fc.weight`` of shape ``(K, C)`` must be transposed).
      num_classes: ``N``, how many top classes (static).
      classifier_bias: Optional ``(K,)`` bias; it only affects which classes are top.
      normalization: ``"minmax"`` or ``"max"`` (static).
      eps: Smallest range treated as non-constant.
      valid: Optional mask of real (non-padding) pixels.

    Returns:
      ``(cams, classes)``: maps ``(B, N, H, W)`` in [0, 1] and the class indices
      ``(B, N)``, most probable first.

    Raises:
      ValueError: For mismatched shapes, ``num_classes`` outside ``[1, K]`` or an unknown
        ``normalization``.

    References:
      Jimenez, Alvarez, Giro-i-Nieto. Class-weighted convolutional features for visual
      instance search. BMVC 2017.
    """
    features, valid = _check_features("class_activation_maps", features, valid)
    weights = jnp.asarray(classifier_weights)
    if weights.ndim != 2 or weights.shape[0] != features.shape[-1]:
        raise ValueError(
            f"class_activation_maps: classifier_weights must be (C, K) with C = "
            f"{features.shape[-1]} for features {features.shape}, found {weights.shape}."
        )
    num_total = weights.shape[1]
    if not 1 <= num_classes <= num_total:
        raise ValueError(
            f"class_activation_maps: num_classes must be in [1, {num_total}], found {num_classes}."
        )
    if normalization not in ("minmax", "max"):
        raise ValueError(
            f"class_activation_maps: normalization must be 'minmax' or 'max', "
            f"found {normalization!r}."
        )
    weights = weights.astype(features.dtype)
    logits = _masked_mean(features, valid) @ weights  # (B, K)
    if classifier_bias is not None:
        bias = jnp.asarray(classifier_bias)
        if bias.shape != (num_total,):
            raise ValueError(
                f"class_activation_maps: classifier_bias must have shape ({num_total},), "
                f"found {bias.shape}."
            )
        logits = logits + bias.astype(features.dtype)[None, :]  # (B, K)
    _, classes = lax.top_k(logits, num_classes)  # (B, N)
    # Select the classes' weight columns by a one-hot matmul rather than a gather: the
    # batch sharding of a data-parallel mesh propagates through it unambiguously (a gather
    # needs an explicit out_sharding), and its cost (B N K C) is small next to a backbone.
    one_hot = jax.nn.one_hot(classes, num_total, dtype=weights.dtype)  # (B, N, K)
    class_weights = jnp.einsum(
        "bnk,ck->bnc", one_hot, weights, precision=lax.Precision.HIGHEST
    )  # (B, N, C)
    cams = jnp.einsum("bhwc,bnc->bnhw", features, class_weights)  # (B, N, H, W)
    low, high = _masked_extrema(cams, valid)  # (B, N, 1, 1) each
    if normalization == "minmax":
        spread = high - low
        varies = spread > eps
        cams = jnp.where(varies, (cams - low) / jnp.where(varies, spread, 1.0), 1.0)
    else:
        positive = high > 0
        cams = jnp.where(positive, jnp.maximum(cams, 0.0) / jnp.where(positive, high, 1.0), 0.0)
    if valid is not None:
        cams = jnp.where(valid[:, None], cams, 0.0)  # (B, N, H, W)
    return cams, classes.astype(jnp.int32)


def cam_weighted(
    features: Float[AnyArray, "B H W C"],
    classifier_weights: Float[AnyArray, "C K"],
    *,
    num_classes: int = 64,
    classifier_bias: Float[AnyArray, " K"] | None = None,
    normalization: str = "minmax",
    channel_weighting: bool = True,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B N C"]:
    """Class-weighted convolutional features: one CAM-weighted sum pooling per top class.

    For each of the image's ``N`` most probable classes (see
    :func:`class_activation_maps`), the descriptor is ``sum_ij cam_ij * x_ij``; with
    ``channel_weighting`` each is multiplied by CroW's channel weights (computed once per
    image), as the authors do. Aggregate with :func:`cam_aggregate`.

    Args:
      features: Activations feeding the classifier, NHWC (non-negative).
      classifier_weights: ``(C, K)``.
      num_classes: ``N`` (static).
      classifier_bias: Optional ``(K,)``.
      normalization: CAM normalisation, ``"minmax"`` (paper) or ``"max"`` (code).
      channel_weighting: Multiply by CroW channel weights (static).
      eps: See :func:`class_activation_maps`.
      valid: Optional mask of real (non-padding) pixels.

    Returns:
      One descriptor per class ``(B, N, C)``, most probable class first, unnormalised.

    References:
      Jimenez, Alvarez, Giro-i-Nieto. Class-weighted convolutional features for visual
      instance search. BMVC 2017.
    """
    features, valid = _check_features("cam_weighted", features, valid)
    cams, _ = class_activation_maps(
        features,
        classifier_weights,
        num_classes=num_classes,
        classifier_bias=classifier_bias,
        normalization=normalization,
        eps=eps,
        valid=valid,
    )
    pooled = jnp.einsum("bnhw,bhwc->bnc", cams, features)  # (B, N, C)
    if channel_weighting:
        pooled = pooled * _crow_channel_weights(features, valid)[:, None, :]  # (B, N, C)
    return pooled


def cam_aggregate(
    class_vectors: Float[AnyArray, "B N C"],
    *,
    whitening: Whitening | None = None,
    dim: int | None = None,
    eps: Scalar = 1e-6,
) -> Float[Array, "B D"]:
    """Aggregates per-class vectors: L2 each, optional PCA/whitening (+L2), sum, L2.

    Args:
      class_vectors: :func:`cam_weighted`'s ``(B, N, C)`` (any prefix of the classes).
      whitening: Optional learned :class:`~jaxretrieval.whitening.Whitening` applied to
        every normalised class vector (the paper's PCA), which re-normalises them.
      dim: Output dimension of the whitening (static); needs ``whitening``.
      eps: Lower bound on the norms.

    Returns:
      One L2-normalised descriptor per image, ``(B, C)`` or ``(B, dim)`` when whitened.

    Raises:
      ValueError: If ``class_vectors`` is not rank 3, or ``dim`` is given without
        ``whitening``.
    """
    class_vectors = jnp.asarray(class_vectors)
    if class_vectors.ndim != 3:
        raise ValueError(
            f"cam_aggregate expects class vectors (B, N, C), found shape {class_vectors.shape}."
        )
    if dim is not None and whitening is None:
        raise ValueError("cam_aggregate: dim is the whitening's output size; pass whitening.")
    vectors = l2_normalize(class_vectors, eps=eps)  # (B, N, C)
    if whitening is not None:
        batch, num, channels = vectors.shape
        flat = apply_whitening(whitening, vectors.reshape(batch * num, channels), dim=dim)
        vectors = flat.reshape(batch, num, flat.shape[-1])  # (B, N, D)
    return l2_normalize(jnp.sum(vectors, axis=1), eps=eps)


# --- the registry: every global pooling behind one calling convention ----------------------

# Name -> pool(feature_map (B, H, W, C), valid (B, H, W) | None, p, classifier) -> (B, D).
# Extraction, the Flax retrieval model and training all look poolings up here.
POOLINGS = {
    "spoc": lambda x, valid, p, classifier: spoc(x, valid=valid),
    "mac": lambda x, valid, p, classifier: mac(x, valid=valid),
    "gem": lambda x, valid, p, classifier: gem(x, p, valid=valid),
    "crow": lambda x, valid, p, classifier: crow(x, valid=valid),
    # Regional poolings place their grid from the map size, so they run without a mask:
    # callers must give maps of the images' real size (see extraction's buckets).
    "rmac": lambda x, valid, p, classifier: rmac(x),
    "ramac": lambda x, valid, p, classifier: ramac_aggregate(ramac(x)),
    "cam": lambda x, valid, p, classifier: cam_aggregate(
        cam_weighted(x, classifier["kernel"], classifier_bias=classifier["bias"], valid=valid)
    ),
    # DARAC with equal weights (its initialisation). A model's learned weights live in
    # params["darac"] and are applied by RetrievalModel, as GeM's learned p is.
    "darac": lambda x, valid, p, classifier: darac_pooling(x, valid=valid),
}
REGIONAL_POOLINGS = frozenset({"rmac", "ramac"})


def global_descriptor(
    feature_map: Float[AnyArray, "B H W C"],
    valid: Bool[AnyArray, "B H W"] | None,
    *,
    pooling_name: str,
    p: Scalar = 3.0,
    classifier: dict | None = None,
) -> Float[Array, "B D"]:
    """L2-normalised global descriptors of one registered pooling (pure; callers jit).

    Args:
      feature_map: Backbone activations, NHWC.
      valid: Real-pixel mask of padded images, or None.
      pooling_name: Key of :data:`POOLINGS` (static).
      p: GeM exponent (traced).
      classifier: ``{"kernel": (C, K), "bias": (K,)}`` for ``"cam"``.

    Raises:
      ValueError: For an unknown pooling, or ``"cam"`` without a classifier.
    """
    if pooling_name not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, found {pooling_name!r}.")
    if pooling_name == "cam" and classifier is None:
        raise ValueError("'cam' pooling needs the backbone's classifier weights.")
    return l2_normalize(POOLINGS[pooling_name](feature_map, valid, p, classifier))
