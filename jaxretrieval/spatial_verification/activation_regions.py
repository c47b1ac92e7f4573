"""Host side of DSM: MSER regions on activation channels become ellipse local features.

Each channel of a non-negative activation tensor ``(H, W, C)`` is quantised to uint8 and
searched for maximally stable extremal regions (bright on dark: high activations). Every
region becomes one feature: an ellipse (mean and covariance of the region's pixels, in
image coordinates), a strength (the maximum activation inside the region) and its channel
id, which DSM uses as a visual word. Near-duplicate nested regions of one channel are
pruned, features of several scales are merged, and non-maximum suppression across
channels and scales keeps the strongest of overlapping features. The result is padded to a
fixed size with a ``valid`` mask for the device side (:mod:`.correspondences`).

Coordinates: ``(x, y)`` image pixels with pixel centres at integers (OpenCV's convention).
Activation cell ``(row i, column j)`` of a map with stride ``s`` covers image pixels
``[j s, (j + 1) s)`` horizontally, so its centre is ``x = (j + 0.5) s - 0.5`` (same for y).
A region's covariance is that of the union of its cells taken as uniform squares: the
covariance of the cell centres times ``s**2`` plus ``s**2 / 12`` on the diagonal (the
variance of one cell), so a one-cell region is a small circle, not a singular matrix.

OpenCV versus VLFeat (which the paper used; measured with OpenCV 5.0): OpenCV's
``min_diversity`` prunes differently from VLFeat's ``MinDiversity`` and removes almost every
region of the small, smooth blobs that activations are made of (on 32x32 maps with blobs of
sigma 1-3 cells it found 0-22% of the blobs at 0.2-0.7, 99% at 0). With 0, on the other
hand, OpenCV returns the same blob at many grey levels (concentric regions). We therefore
run OpenCV with ``min_diversity=0`` and serve VLFeat's intent (no near-duplicate nested
regions) ourselves: each chain of nested regions is reduced to its outermost region
(:func:`prune_nested_regions`).
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Bool, Float, Int


class LocalFeatures(NamedTuple):
    """Fixed-size DSM local features of one image (or a batch, with leading axes).

    Attributes:
      means: ``(M, 2)`` ellipse centres ``(x, y)`` in image pixels.
      covariances: ``(M, 2, 2)`` ellipse covariances ``[[xx, xy], [xy, yy]]`` in pixels².
      strengths: ``(M,)`` maximum activation inside each region.
      channels: ``(M,)`` int32 activation channel of each feature (its visual word).
      valid: ``(M,)`` which rows are real features (the rest is zero padding).
    """

    means: Float[AnyArray, "*batch M 2"]
    covariances: Float[AnyArray, "*batch M 2 2"]
    strengths: Float[AnyArray, "*batch M"]
    channels: Int[AnyArray, "*batch M"]
    valid: Bool[AnyArray, "*batch M"]


def local_features_nbytes(features: LocalFeatures) -> int:
    """Bytes one image's features occupy as stored (all fields, padding included)."""
    return int(sum(np.asarray(x).nbytes for x in features))


@dataclasses.dataclass(frozen=True)
class MSERParams:
    """MSER settings for activation channels (OpenCV's detector plus our nested pruning).

    Attributes:
      delta: Grey-level step of the stability test. None chooses it per tensor like DSM:
        the ``delta_quantile`` quantile of the non-zero quantised activations, capped at
        ``max_delta`` and at least 1.
      delta_quantile: Quantile for the automatic delta (DSM: 0.6 of the cumulative
        histogram).
      max_delta: Cap on the automatic delta (DSM: 12).
      min_area: Smallest region, in activation cells (VLFeat MinArea 0.001 of a 32x32 map
        is about one cell).
      max_area_fraction: Largest region as a fraction of the map area.
      max_variation: Largest relative area change over ``delta`` grey levels (paper: 0.5).
      prune_nested: Keep one region per chain of nested regions
        (:func:`prune_nested_regions`); serves VLFeat's ``MinDiversity`` (paper: 0.7).
      opencv_min_diversity: OpenCV's own ``min_diversity`` (see the module docstring for
        why it is 0).
      max_regions_per_channel: Channels with more regions than this are skipped as
        cluttered (DSM's ``nb_max``); None keeps all.
      per_channel_scaling: Quantise each channel by its own maximum instead of the
        tensor's maximum. The default (tensor maximum) keeps weak channels weak, as DSM's
        ``uint8`` cast of raw activations does.
    """

    delta: int | None = None
    delta_quantile: float = 0.6
    max_delta: int = 12
    min_area: int = 1
    max_area_fraction: float = 0.5
    max_variation: float = 0.5
    prune_nested: bool = True
    opencv_min_diversity: float = 0.0
    max_regions_per_channel: int | None = None
    per_channel_scaling: bool = False


def quantize_activations(
    activations: Float[AnyArray, "H W C"], *, per_channel: bool = False
) -> np.ndarray:
    """Scales non-negative activations to uint8 ``[0, 255]`` (negative values become 0).

    Args:
      activations: One activation tensor.
      per_channel: Divide each channel by its own maximum (else by the tensor's maximum).

    Returns:
      The ``(H, W, C)`` uint8 tensor.
    """
    x = np.maximum(np.asarray(activations, np.float32), 0.0)
    peak = x.max(axis=(0, 1), keepdims=True) if per_channel else x.max()
    scale = np.where(peak > 0, 255.0 / np.maximum(peak, 1e-30), 0.0)
    return np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)


def automatic_delta(quantized: np.ndarray, params: MSERParams) -> int:
    """DSM's MSER delta: a quantile of the non-zero quantised values, capped."""
    if params.delta is not None:
        return int(params.delta)
    nonzero = quantized[quantized > 0]
    if nonzero.size == 0:
        return 1
    value = int(np.rint(np.quantile(nonzero, params.delta_quantile)))
    return int(min(max(value, 1), params.max_delta))


def prune_nested_regions(regions: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Indices of the regions kept when each chain of nested regions is reduced to one.

    Extremal regions of one image and polarity are either nested or disjoint, so region i
    lies inside region j exactly when i's first pixel does. A chain is a run of regions
    each of which is the only region directly inside the next one: the same blob seen at
    several grey levels. Only the outermost region of each chain is kept; a region that
    directly contains two or more regions (blobs that merge) starts a new chain.

    Args:
      regions: OpenCV MSER regions, each ``(n, 2)`` integer ``(x, y)`` cell coordinates.
      shape: ``(H, W)`` of the map.

    Returns:
      Sorted indices of the regions kept.
    """
    count = len(regions)
    if count <= 1:
        return np.arange(count)
    height, width = shape
    masks = np.zeros((count, height * width), bool)
    for r, pts in enumerate(regions):
        masks[r, pts[:, 1] * width + pts[:, 0]] = True
    areas = masks.sum(axis=1)  # (R,)
    first = np.array([pts[0, 1] * width + pts[0, 0] for pts in regions])  # (R,)
    # inside[i, j]: region i lies strictly inside region j.
    inside = masks[:, first].T & (areas[None, :] > areas[:, None])  # (R, R)
    has_parent = inside.any(axis=1)  # (R,)
    # The direct parent is the smallest region containing i.
    parent = np.argmin(np.where(inside, areas[None, :], np.iinfo(np.int64).max), axis=1)  # (R,)
    num_children = np.bincount(parent[has_parent], minlength=count)  # (R,)
    drop = has_parent & (num_children[parent] == 1)
    return np.flatnonzero(~drop)


class _Candidates(NamedTuple):
    means: np.ndarray  # (K, 2)
    covariances: np.ndarray  # (K, 2, 2)
    strengths: np.ndarray  # (K,)
    channels: np.ndarray  # (K,)


def _channel_regions(activations: np.ndarray, stride: float, params: MSERParams) -> _Candidates:
    """MSER on every channel of one map -> candidate features in image coordinates."""
    import cv2  # host-only dependency; the device side does not need it

    height, width, num_channels = activations.shape  # checked by the caller
    quantized = quantize_activations(activations, per_channel=params.per_channel_scaling)
    delta = automatic_delta(quantized, params)
    detector = cv2.MSER_create(
        delta=delta,
        min_area=int(params.min_area),
        max_area=max(int(params.max_area_fraction * height * width), int(params.min_area)),
        max_variation=float(params.max_variation),
        min_diversity=float(params.opencv_min_diversity),
    )
    detector.setPass2Only(True)  # bright-on-dark regions only: high activations
    means, covs, strengths, channels = [], [], [], []
    for c in range(num_channels):
        channel = quantized[:, :, c]
        if channel.max() == 0:
            continue
        regions, _ = detector.detectRegions(np.ascontiguousarray(channel))
        if not regions:
            continue
        keep = prune_nested_regions(regions, (height, width)) if params.prune_nested else None
        if keep is not None:
            regions = [regions[r] for r in keep]
        if params.max_regions_per_channel is not None and len(regions) > (
            params.max_regions_per_channel
        ):
            continue
        sizes = np.array([len(r) for r in regions])  # (R,)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (R,)
        pts = np.concatenate(regions)  # (sum n, 2) as (x, y) cells
        xy = pts.astype(np.float64)
        # First and second moments of every region at once, by segment sums.
        first = np.add.reduceat(xy, starts, axis=0) / sizes[:, None]  # (R, 2)
        second = np.add.reduceat(xy[:, :, None] * xy[:, None, :], starts, axis=0)  # (R, 2, 2)
        cov = second / sizes[:, None, None] - first[:, :, None] * first[:, None, :]  # (R, 2, 2)
        means.append((first + 0.5) * stride - 0.5)
        covs.append(cov * stride**2 + np.eye(2) * stride**2 / 12.0)
        values = activations[pts[:, 1], pts[:, 0], c]  # (sum n,)
        strengths.append(np.maximum.reduceat(values, starts))
        channels.append(np.full(len(regions), c))
    if not means:
        return _Candidates(
            np.zeros((0, 2)), np.zeros((0, 2, 2)), np.zeros((0,)), np.zeros((0,), np.int64)
        )
    return _Candidates(
        np.concatenate(means),
        np.concatenate(covs),
        np.concatenate(strengths).astype(np.float64),
        np.concatenate(channels),
    )


def ellipse_boxes(
    means: Float[AnyArray, "M 2"], covariances: Float[AnyArray, "M 2 2"]
) -> np.ndarray:
    """Axis-aligned boxes ``(x0, y0, x1, y1)`` around the region ellipses.

    A uniform ellipse with semi-axis a has variance a²/4 along it, so the region's ellipse
    is ``{p : (p - mean)^T cov^{-1} (p - mean) <= 4}`` and its half-extent along x is
    ``2 sqrt(cov_xx)``.
    """
    means = np.asarray(means, np.float64)
    covariances = np.asarray(covariances, np.float64)
    half = 2.0 * np.sqrt(np.stack([covariances[:, 0, 0], covariances[:, 1, 1]], axis=1))
    return np.concatenate([means - half, means + half], axis=1)  # (M, 4)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box pair, ``(K_a, K_b)``."""
    lo = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # (K_a, K_b, 2)
    hi = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # (K_a, K_b, 2)
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
    area_a = np.prod(boxes_a[:, 2:] - boxes_a[:, :2], axis=1)
    area_b = np.prod(boxes_b[:, 2:] - boxes_b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def non_maximum_suppression(
    boxes: np.ndarray,
    strengths: np.ndarray,
    *,
    iou_threshold: float,
    max_keep: int,
    max_candidates: int | None = None,
) -> np.ndarray:
    """Greedy NMS: strongest first, dropping boxes whose IoU with a kept one exceeds it.

    Ties in strength keep the lower index first (stable sort). Stops after ``max_keep``.
    Only the ``max_candidates`` strongest boxes are considered (None: all), which bounds the
    cost at ``O(max_keep * max_candidates)`` on cluttered maps.

    Returns:
      Indices of the kept boxes, strongest first.
    """
    order = np.argsort(-np.asarray(strengths), kind="stable")
    if max_candidates is not None:
        order = order[:max_candidates]
    kept: list[int] = []
    suppressed = np.zeros(len(order), bool)
    for pos, idx in enumerate(order):
        if suppressed[pos]:
            continue
        kept.append(int(idx))
        if len(kept) == max_keep:
            break
        rest = order[pos + 1 :]
        suppressed[pos + 1 :] |= box_iou(boxes[idx : idx + 1], boxes[rest])[0] > iou_threshold
    return np.array(kept, np.int64)


def activation_local_features(
    activation_maps: Sequence[tuple[AnyArray, float | int]],
    *,
    max_features: int = 512,
    mser: MSERParams = MSERParams(),
    nms_iou: float = 0.7,
    max_candidates: int | None = None,
) -> LocalFeatures:
    """DSM local features of one image from its activation maps at one or more scales.

    For each ``(map, stride)``: per-channel MSER (:class:`MSERParams`), nested-duplicate
    pruning, and conversion of each region to an ellipse in image pixels (``stride`` is the
    number of image pixels per map cell, e.g. 32 for MobileNetV2's last convolution at
    scale 1 and 64 for the same map computed at scale 1/2). The features of all maps are
    merged, and non-maximum suppression over all channels and scales
    (:func:`non_maximum_suppression` on the ellipses' bounding boxes, as DSM's ``cmp_nms``)
    keeps the strongest of overlapping features, at most ``max_features``. Strength is the
    maximum raw activation inside the region; across scales it is comparable because the
    same network produced every map.

    Unlike DSM, which runs NMS only on database images and verifies each pair of scales
    separately, NMS is applied to every image (so matching is symmetric) and scales are
    merged into one feature set verified once.

    Args:
      activation_maps: ``(activations (H, W, C), stride)`` per scale; activations are
        non-negative (post-ReLU), float.
      max_features: M, the fixed output size.
      mser: MSER settings.
      nms_iou: Box IoU above which the weaker of two features is suppressed; >= 1 disables.
        0.7 was measured best on the Oxford affine sequences
        (``python -m benchmarks.dsm_homography_check --sweep``, MobileNetV2, max side 512):
        AUC of true versus different-scene pairs by inlier count 0.943 / 0.969 / 1.000 /
        1.000 at IoU 0.5 / 0.6 / 0.7 / none, with fewer negative inliers at 0.7 than none.
      max_candidates: Strongest candidates entering NMS; None means ``16 * max_features``.

    Returns:
      :class:`LocalFeatures` of size M as NumPy arrays (float32 / int32 / bool), strongest
      first, zero-padded with ``valid`` False.

    Raises:
      ValueError: If no map is given, a map is not (H, W, C), a stride is not positive, or
        ``max_features < 1``.

    References:
      Simeoni, Avrithis, Chum. Local features and visual words emerge in activations.
      CVPR 2019.
      Matas, Chum, Urban, Pajdla. Robust wide baseline stereo from maximally stable
      extremal regions. BMVC 2002.
    """
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}.")
    if len(activation_maps) == 0:
        raise ValueError("activation_maps is empty; pass at least one (activations, stride).")
    parts = []
    for i, (activations, stride) in enumerate(activation_maps):
        activations = validation.as_host_float_array(
            f"activation_maps[{i}]", activations, axes="H W C"
        )
        if not stride > 0:
            raise ValueError(f"stride must be positive, got {stride}.")
        parts.append(_channel_regions(activations, float(stride), mser))
    means = np.concatenate([p.means for p in parts])
    covs = np.concatenate([p.covariances for p in parts])
    strengths = np.concatenate([p.strengths for p in parts])
    channels = np.concatenate([p.channels for p in parts])
    keep = non_maximum_suppression(
        ellipse_boxes(means, covs),
        strengths,
        iou_threshold=nms_iou,
        max_keep=max_features,
        max_candidates=16 * max_features if max_candidates is None else max_candidates,
    )
    count = len(keep)
    out = LocalFeatures(
        means=np.zeros((max_features, 2), np.float32),
        covariances=np.zeros((max_features, 2, 2), np.float32),
        strengths=np.zeros((max_features,), np.float32),
        channels=np.zeros((max_features,), np.int32),
        valid=np.zeros((max_features,), bool),
    )
    out.means[:count] = means[keep]
    out.covariances[:count] = covs[keep]
    out.strengths[:count] = strengths[keep]
    out.channels[:count] = channels[keep]
    out.valid[:count] = True
    return out


def stack_local_features(features: Sequence[LocalFeatures]) -> LocalFeatures:
    """Stacks per-image features (same M) into one batch with a leading axis."""
    if not features:
        raise ValueError("stack_local_features needs at least one LocalFeatures.")
    return LocalFeatures(*(np.stack(field) for field in zip(*features, strict=True)))


__all__ = [
    "LocalFeatures",
    "MSERParams",
    "activation_local_features",
    "automatic_delta",
    "box_iou",
    "ellipse_boxes",
    "local_features_nbytes",
    "non_maximum_suppression",
    "prune_nested_regions",
    "quantize_activations",
    "stack_local_features",
]
