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
(:func:`prune_nested_regions`). The published setting (:meth:`DSMSettings.published
<jaxretrieval.spatial_verification.DSMSettings.published>`) instead applies VLFeat's own
duplicate rule with the paper's 0.7 to OpenCV's regions (:func:`diverse_regions`), finds
dark-on-bright regions too (VLFeat's default), and drops the regions DSM's
``cmp_mser_regions.m`` drops (:attr:`MSERParams.drop_degenerate`).
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
      scale_ids: ``(M,)`` int32 index of the activation map (image scale) each feature
        came from, or None when unknown (one scale). Verification with ``num_scales``
        (:func:`~jaxretrieval.spatial_verification.verify_pair`) pairs features by it.
    """

    means: Float[AnyArray, "*batch M 2"]
    covariances: Float[AnyArray, "*batch M 2 2"]
    strengths: Float[AnyArray, "*batch M"]
    channels: Int[AnyArray, "*batch M"]
    valid: Bool[AnyArray, "*batch M"]
    scale_ids: Int[AnyArray, "*batch M"] | None = None


def local_features_nbytes(features: LocalFeatures) -> int:
    """Bytes one image's features occupy as stored (all fields, padding included)."""
    return int(sum(np.asarray(x).nbytes for x in features if x is not None))


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
      min_area_fraction: Smallest region as a fraction of the map area (VLFeat's
        ``MinArea``, DSM: 0.001), on top of ``min_area``; None: ``min_area`` only.
      min_diversity: VLFeat's duplicate rule applied to OpenCV's regions
        (:func:`diverse_regions`, DSM: 0.7); None skips it.
      dark_on_bright: Also detect dark-on-bright regions (low activations surrounded by
        higher ones), as VLFeat's ``vl_mser`` does by default and DSM therefore does.
      drop_degenerate: Drop the regions DSM's ``cmp_mser_regions.m`` drops: a singular
        second-moment matrix (one cell, or collinear cells) before the
        ``max_regions_per_channel`` count, and after it a region whose one-sigma
        ellipse's rounded bounding box is one cell wide or high, or that holds no
        activation.
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
    min_area_fraction: float | None = None
    min_diversity: float | None = None
    dark_on_bright: bool = False
    drop_degenerate: bool = False


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


def _nesting(
    regions: Sequence[np.ndarray], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Areas ``(R,)`` and ``inside[i, j]``: region i lies strictly inside region j ``(R, R)``.

    Extremal regions of one image and polarity are either nested or disjoint, so region i
    lies inside region j exactly when j is larger and holds i's first pixel.
    """
    height, width = shape
    masks = np.zeros((len(regions), height * width), bool)
    for r, pts in enumerate(regions):
        masks[r, pts[:, 1] * width + pts[:, 0]] = True
    areas = masks.sum(axis=1)  # (R,)
    first = np.array([pts[0, 1] * width + pts[0, 0] for pts in regions])  # (R,)
    inside = masks[:, first].T & (areas[None, :] > areas[:, None])  # (R, R)
    return areas, inside


def prune_nested_regions(regions: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Indices of the regions kept when each chain of nested regions is reduced to one.

    A chain is a run of regions each of which is the only region directly inside the next
    one: the same blob seen at several grey levels. Only the outermost region of each
    chain is kept; a region that directly contains two or more regions (blobs that merge)
    starts a new chain.

    Args:
      regions: OpenCV MSER regions of one polarity, each ``(n, 2)`` integer ``(x, y)``
        cell coordinates.
      shape: ``(H, W)`` of the map.

    Returns:
      Sorted indices of the regions kept.
    """
    count = len(regions)
    if count <= 1:
        return np.arange(count)
    areas, inside = _nesting(regions, shape)
    has_parent = inside.any(axis=1)  # (R,)
    # The direct parent is the smallest region containing i.
    parent = np.argmin(np.where(inside, areas[None, :], np.iinfo(np.int64).max), axis=1)  # (R,)
    num_children = np.bincount(parent[has_parent], minlength=count)  # (R,)
    drop = has_parent & (num_children[parent] == 1)
    return np.flatnonzero(~drop)


def diverse_regions(
    regions: Sequence[np.ndarray], shape: tuple[int, int], *, min_diversity: float
) -> np.ndarray:
    """Indices of the regions VLFeat's ``MinDiversity`` duplicate rule keeps.

    VLFeat (``vl/mser.c``, "Remove duplicates") visits the maximally stable regions from
    the largest down and drops a region when its nearest enclosing region that is still
    kept is too similar: ``(area_parent - area) / area_parent < min_diversity``. At DSM's
    0.7 a region survives inside another only if it covers less than 30% of it. OpenCV's
    own ``min_diversity`` is a different test that finds no region at all at 0.7, so DSM's
    published setting runs OpenCV with 0 (every maximally stable region) and applies this
    rule to the result.

    Args:
      regions: OpenCV MSER regions of one polarity, each ``(n, 2)`` integer ``(x, y)``
        cell coordinates.
      shape: ``(H, W)`` of the map.
      min_diversity: VLFeat's ``MinDiversity``, in [0, 1].

    Returns:
      Sorted indices of the regions kept.
    """
    count = len(regions)
    if count <= 1:
        return np.arange(count)
    areas, inside = _nesting(regions, shape)
    kept = np.zeros(count, bool)
    # Largest first: every enclosing region is decided before the regions inside it.
    for i in np.argsort(-areas, kind="stable"):
        enclosing = inside[i] & kept
        if enclosing.any():
            parent_area = areas[enclosing].min()  # the nearest kept enclosing region
            if (parent_area - areas[i]) / parent_area < min_diversity:
                continue
        kept[i] = True
    return np.flatnonzero(kept)


class _Candidates(NamedTuple):
    means: np.ndarray  # (K, 2) image pixels
    covariances: np.ndarray  # (K, 2, 2) image pixels²
    strengths: np.ndarray  # (K,)
    channels: np.ndarray  # (K,)
    cell_boxes: np.ndarray  # (K, 4) DSM's region boxes, see _dsm_cell_boxes


def _empty_candidates() -> _Candidates:
    return _Candidates(
        np.zeros((0, 2)),
        np.zeros((0, 2, 2)),
        np.zeros((0,)),
        np.zeros((0,), np.int64),
        np.zeros((0, 4)),
    )


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB's ``round`` (halves away from zero), unlike NumPy's half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _dsm_cell_boxes(means: np.ndarray, covariances: np.ndarray, shape: tuple[int, int]):
    """DSM's region boxes ``(x0, y0, x1, y1)``: the one-sigma ellipse, rounded, in cells.

    ``cmp_mser_regions.m`` draws the ellipse ``{mean + A u : |u| = 1}`` with
    ``A A^T = cov`` (VLFeat's frame: the pixels' second moments), so its extent along x is
    ``sqrt(cov_xx)``; the box is rounded to whole cells (1-based, as MATLAB indexes) and
    clipped to the map. Boxes of one map only are comparable.

    Args:
      means: ``(R, 2)`` region centres in 0-based cells ``(x, y)``.
      covariances: ``(R, 2, 2)`` second moments of the cells' centres (cells²).
      shape: ``(H, W)`` of the map.
    """
    height, width = shape
    centre = means + 1.0  # 1-based, as MATLAB
    half = np.sqrt(np.maximum(np.stack([covariances[:, 0, 0], covariances[:, 1, 1]], 1), 0))
    low = np.maximum(_round_half_away(centre - half), 1.0)  # (R, 2)
    high = np.minimum(_round_half_away(centre + half), [float(width), float(height)])  # (R, 2)
    return np.concatenate([low, high], axis=1)


def _polarity_regions(detector, channel: np.ndarray, params: MSERParams) -> list[np.ndarray]:
    """OpenCV's bright-on-dark MSER regions of one uint8 map, pruned per ``params``."""
    regions, _ = detector.detectRegions(np.ascontiguousarray(channel))
    regions = list(regions)
    if params.prune_nested and regions:
        regions = [regions[r] for r in prune_nested_regions(regions, channel.shape)]
    if params.min_diversity is not None and regions:
        regions = [
            regions[r]
            for r in diverse_regions(regions, channel.shape, min_diversity=params.min_diversity)
        ]
    return regions


def _map_candidates(activations: np.ndarray, stride: float, params: MSERParams) -> _Candidates:
    """MSER on every channel of one map -> candidate features in image coordinates."""
    import cv2  # host-only dependency; the device side does not need it

    height, width, num_channels = activations.shape  # checked by the caller
    quantized = quantize_activations(activations, per_channel=params.per_channel_scaling)
    delta = automatic_delta(quantized, params)
    min_area = int(params.min_area)
    if params.min_area_fraction is not None:
        # VLFeat drops area < MinArea * (H W); the smallest area kept is the ceiling.
        min_area = max(min_area, int(np.ceil(params.min_area_fraction * height * width - 1e-9)))
    detector = cv2.MSER_create(
        delta=delta,
        min_area=min_area,
        max_area=max(int(params.max_area_fraction * height * width), min_area),
        max_variation=float(params.max_variation),
        min_diversity=float(params.opencv_min_diversity),
    )
    detector.setPass2Only(True)  # bright-on-dark regions only: high activations
    parts = []
    for c in range(num_channels):
        channel = quantized[:, :, c]
        if channel.max() == 0:
            continue
        regions = _polarity_regions(detector, channel, params)
        if params.dark_on_bright:  # VLFeat inverts the image for the other polarity
            regions += _polarity_regions(detector, 255 - channel, params)
        if not regions:
            continue
        sizes = np.array([len(r) for r in regions])  # (R,)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (R,)
        pts = np.concatenate(regions)  # (sum n, 2) as (x, y) cells
        xy = pts.astype(np.float64)
        # First and second moments of every region at once, by segment sums.
        first = np.add.reduceat(xy, starts, axis=0) / sizes[:, None]  # (R, 2)
        second = np.add.reduceat(xy[:, :, None] * xy[:, None, :], starts, axis=0)  # (R, 2, 2)
        cov = second / sizes[:, None, None] - first[:, :, None] * first[:, None, :]  # (R, 2, 2)
        keep = np.ones(len(regions), bool)
        if params.drop_degenerate:
            det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
            trace = cov[:, 0, 0] + cov[:, 1, 1]
            keep &= det > 1e-9 * trace * trace  # one cell or collinear cells: singular
        if params.max_regions_per_channel is not None and (
            int(keep.sum()) > params.max_regions_per_channel
        ):
            continue  # a cluttered channel (DSM's nb_max)
        values = activations[pts[:, 1], pts[:, 0], c]  # (sum n,)
        strengths = np.maximum.reduceat(values, starts).astype(np.float64)  # (R,)
        boxes = _dsm_cell_boxes(first, cov, (height, width))  # (R, 4)
        if params.drop_degenerate:
            keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (strengths > 0)
        parts.append(
            _Candidates(
                (first[keep] + 0.5) * stride - 0.5,
                cov[keep] * stride**2 + np.eye(2) * stride**2 / 12.0,
                strengths[keep],
                np.full(int(keep.sum()), c),
                boxes[keep],
            )
        )
    if not parts:
        return _empty_candidates()
    return _Candidates(*(np.concatenate(field) for field in zip(*parts, strict=True)))


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


NMS_BOXES = ("region", "dsm")


def strongest_per_channel(
    channels: Int[AnyArray, " K"], strengths: Float[AnyArray, " K"], *, max_per_channel: int
) -> np.ndarray:
    """Indices of the ``max_per_channel`` strongest features of every channel, sorted.

    DSM's per-channel budget (``get_max_feats_ms.m``): within each channel, features are
    ordered by decreasing strength (ties: lower index first, as MATLAB's stable ``sort``)
    and the first ``max_per_channel`` are kept.
    """
    channels = np.asarray(channels)
    strengths = np.asarray(strengths)
    if channels.size == 0:
        return np.zeros((0,), np.int64)
    order = np.lexsort((-strengths, channels))  # by channel, then by decreasing strength
    grouped = channels[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])  # first of each channel
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, sizes)  # position within its channel
    return np.sort(order[rank < max_per_channel])


def _nms_boxes(candidates: _Candidates, kind: str) -> np.ndarray:
    if kind == "dsm":
        return candidates.cell_boxes
    return ellipse_boxes(candidates.means, candidates.covariances)


def _subset(candidates: _Candidates, keep: np.ndarray) -> _Candidates:
    return _Candidates(*(field[keep] for field in candidates))


def activation_local_features(
    activation_maps: Sequence[tuple[AnyArray, float | int]],
    *,
    max_features: int = 512,
    mser: MSERParams = MSERParams(),
    nms_iou: float | None = 0.7,
    max_candidates: int | None = None,
    max_per_channel: int | None = None,
    nms_per_scale: bool = False,
    nms_boxes: str = "region",
) -> LocalFeatures:
    """DSM local features of one image from its activation maps at one or more scales.

    For each ``(map, stride)``: per-channel MSER (:class:`MSERParams`), region pruning,
    and conversion of each region to an ellipse in image pixels (``stride`` is the
    number of image pixels per map cell, e.g. 32 for MobileNetV2's last convolution at
    scale 1 and 64 for the same map computed at scale 1/2). Then, in this order (DSM's,
    ``fit_localfeatures.m`` then ``get_max_feats_ms.m``):

    1. per scale, if ``nms_per_scale``: non-maximum suppression over the map's features
       (:func:`non_maximum_suppression`, across channels);
    2. per scale, if ``max_per_channel``: the strongest ``max_per_channel`` features of
       each channel (:func:`strongest_per_channel`);
    3. the scales are merged (each feature keeps its ``scale_ids``);
    4. if NMS is on and not per scale: NMS over all channels and scales (ours);
    5. the ``max_features`` strongest are kept.

    Strength is the maximum raw activation inside the region; across scales it is
    comparable because the same network produced every map. Our default runs NMS across
    scales on every image (so matching is symmetric) and verifies merged scales; DSM
    runs NMS per scale on database images only, budgets features per channel, and
    verifies every pair of scales separately (see :class:`~jaxretrieval.
    spatial_verification.DSMSettings`).

    Args:
      activation_maps: ``(activations (H, W, C), stride)`` per scale; activations are
        non-negative (post-ReLU), float.
      max_features: M, the fixed output size.
      mser: MSER settings.
      nms_iou: Box IoU above which the weaker of two features is suppressed; None or
        >= 1 disables NMS. 0.7 was measured best on the Oxford affine sequences
        (``python -m benchmarks.dsm_homography_check --sweep``, MobileNetV2, max side 512):
        AUC of true versus different-scene pairs by inlier count 0.943 / 0.969 / 1.000 /
        1.000 at IoU 0.5 / 0.6 / 0.7 / none, with fewer negative inliers at 0.7 than none.
        DSM: 0.2 on database images, none on queries.
      max_candidates: Strongest candidates entering the cross-scale NMS; None means
        ``16 * max_features``.
      max_per_channel: Largest number of features per channel and scale; None: no
        limit. DSM: 20 for a query, 10 for a database image.
      nms_per_scale: Run NMS within each scale (DSM) instead of across scales (ours).
      nms_boxes: The boxes NMS compares: ``"region"``, the bounding box of the region's
        ellipse (:func:`ellipse_boxes`, twice the one-sigma extent, in image pixels);
        ``"dsm"``, DSM's box of the one-sigma ellipse rounded to whole cells of its map
        (needs ``nms_per_scale``: cells of different scales are not comparable).

    Returns:
      :class:`LocalFeatures` of size M as NumPy arrays (float32 / int32 / bool), strongest
      first, zero-padded with ``valid`` False; ``scale_ids`` indexes ``activation_maps``.

    Raises:
      ValueError: If no map is given, a map is not (H, W, C), a stride is not positive,
        ``max_features < 1``, ``max_per_channel < 1``, or ``nms_boxes`` is unknown or
        ``"dsm"`` without ``nms_per_scale``.

    References:
      Simeoni, Avrithis, Chum. Local features and visual words emerge in activations.
      CVPR 2019.
      Matas, Chum, Urban, Pajdla. Robust wide baseline stereo from maximally stable
      extremal regions. BMVC 2002.
    """
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}.")
    if max_per_channel is not None and max_per_channel < 1:
        raise ValueError(f"max_per_channel must be >= 1 or None, got {max_per_channel}.")
    if nms_boxes not in NMS_BOXES:
        raise ValueError(f"nms_boxes must be one of {NMS_BOXES}, got {nms_boxes!r}.")
    nms = nms_iou is not None and nms_iou < 1.0
    if nms and nms_boxes == "dsm" and not nms_per_scale:
        raise ValueError(
            "nms_boxes='dsm' are in cells of each scale's map; it needs nms_per_scale=True."
        )
    if len(activation_maps) == 0:
        raise ValueError("activation_maps is empty; pass at least one (activations, stride).")
    parts, scale_ids = [], []
    for i, (activations, stride) in enumerate(activation_maps):
        activations = validation.as_host_float_array(
            f"activation_maps[{i}]", activations, axes="H W C"
        )
        if not stride > 0:
            raise ValueError(f"stride must be positive, got {stride}.")
        candidates = _map_candidates(activations, float(stride), mser)
        if nms and nms_per_scale and len(candidates.strengths):
            keep = non_maximum_suppression(
                _nms_boxes(candidates, nms_boxes),
                candidates.strengths,
                iou_threshold=nms_iou,
                max_keep=len(candidates.strengths),
            )
            candidates = _subset(candidates, np.sort(keep))
        if max_per_channel is not None:
            keep = strongest_per_channel(
                candidates.channels, candidates.strengths, max_per_channel=max_per_channel
            )
            candidates = _subset(candidates, keep)
        parts.append(candidates)
        scale_ids.append(np.full(len(candidates.strengths), i))
    merged = _Candidates(*(np.concatenate(field) for field in zip(*parts, strict=True)))
    scale_ids = np.concatenate(scale_ids)
    if nms and not nms_per_scale:
        keep = non_maximum_suppression(
            _nms_boxes(merged, nms_boxes),
            merged.strengths,
            iou_threshold=nms_iou,
            max_keep=max_features,
            max_candidates=16 * max_features if max_candidates is None else max_candidates,
        )
    else:
        keep = np.argsort(-merged.strengths, kind="stable")[:max_features]
    count = len(keep)
    out = LocalFeatures(
        means=np.zeros((max_features, 2), np.float32),
        covariances=np.zeros((max_features, 2, 2), np.float32),
        strengths=np.zeros((max_features,), np.float32),
        channels=np.zeros((max_features,), np.int32),
        valid=np.zeros((max_features,), bool),
        scale_ids=np.zeros((max_features,), np.int32),
    )
    out.means[:count] = merged.means[keep]
    out.covariances[:count] = merged.covariances[keep]
    out.strengths[:count] = merged.strengths[keep]
    out.channels[:count] = merged.channels[keep]
    out.valid[:count] = True
    out.scale_ids[:count] = scale_ids[keep]
    return out


def stack_local_features(features: Sequence[LocalFeatures]) -> LocalFeatures:
    """Stacks per-image features (same M) into one batch with a leading axis.

    Raises:
      ValueError: If ``features`` is empty, or some images have ``scale_ids`` and others
        do not.
    """
    if not features:
        raise ValueError("stack_local_features needs at least one LocalFeatures.")
    fields = []
    for name, values in zip(LocalFeatures._fields, zip(*features, strict=True), strict=True):
        missing = [value is None for value in values]
        if all(missing):
            fields.append(None)
        elif any(missing):
            raise ValueError(
                f"stack_local_features: {name} is None for {sum(missing)} of "
                f"{len(values)} images; stack features of one extractor."
            )
        else:
            fields.append(np.stack(values))
    return LocalFeatures(*fields)


__all__ = [
    "NMS_BOXES",
    "LocalFeatures",
    "MSERParams",
    "activation_local_features",
    "automatic_delta",
    "box_iou",
    "diverse_regions",
    "ellipse_boxes",
    "local_features_nbytes",
    "non_maximum_suppression",
    "prune_nested_regions",
    "quantize_activations",
    "stack_local_features",
    "strongest_per_channel",
]
