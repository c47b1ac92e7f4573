"""CAM region proposals and region re-ranking (Jimenez, Alvarez, Giro-i-Nieto, BMVC 2017).

The paper's unsupervised re-ranking: every class activation map (CAM) of an image's top
classes is binarised at several thresholds, a box is fitted to the largest connected
component of each binary map, and a descriptor is pooled inside each box. A query's
top-``L`` database images are then re-scored by their best query-to-region similarity,
and the query is expanded with the best regions of the top re-ranked images.

The split, as in DSM (DESIGN.md decision 9):

* host (NumPy + OpenCV): :func:`largest_component_box` and :func:`cam_boxes` turn CAMs
  into a fixed number ``R`` of boxes per image plus a ``valid`` mask;
* device (pure JAX, callers jit): :func:`regional_descriptors` pools a feature map inside
  every box at once (masks, no dynamic shapes), and :func:`region_rerank` re-ranks and
  expands on a fixed-size shortlist;
* :class:`CAMRegionExtractor` runs both over image files (decoding, padded shape buckets,
  one jitted kernel per bucket for the CAMs and one for the regions).

Where we differ from the paper, and why:

* Regions are proposed offline from each database image's own top classes, not online
  from the query's classes (which needs a network pass per query and database image).
  Region descriptors are stored like the global ones, and re-ranking is a matrix product.
* A region is described as a crop would be: the model's own pooling (and whitening)
  restricted to the box's cells, through the poolings' ``valid`` mask. For the CAM
  pooling that means the region's own top classes and CAMs, as for the cropped query
  the paper describes; any model with a classifier can propose regions, and its regions
  live in the space of its global descriptors. A caller may pass another pooling (the
  benchmark passes the paper's per-class PCA aggregation).
* Region 0 is always the whole image (the paper's lowest threshold, 0.01, gives nearly
  that), so re-ranking can fall back on the whole image.
* Boxes come from the paper's min-max normalised CAMs (those the descriptor weights
  with), thresholded at fractions of each map's maximum as the authors' ``extract_ROI``
  does; their released code max-normalises instead, which keeps a backbone's positive
  CAM floor (MobileNetV2's is large) above every threshold. OpenCV's
  ``connectedComponentsWithStats`` (8-connectivity) finds the components.

Boxes are ``(top, left, bottom, right)`` in feature-map cells, half-open (as
:mod:`jaxretrieval.regions`). Descriptors are rows, L2-normalised; invalid regions are
zero rows.
"""

import concurrent.futures
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxretrieval import layers, pooling, retrieval_model, validation
from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int
from jaxretrieval.data import images as image_io
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.retrieval_model import ModelConfig

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4)
# (features (B, H, W, C), valid (B, H, W)) -> L2-normalised descriptors (B, D).
PoolFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- host: boxes


def largest_component_box(mask: Bool[np.ndarray, "H W"]) -> tuple[Int[np.ndarray, "4"], bool]:
    """Bounding box of the largest 8-connected component of a binary map.

    Ties between components of equal area go to the one whose first cell comes first in
    raster order (OpenCV's label order is not that, so it is resolved here).

    Args:
      mask: The binary map.

    Returns:
      ``(box, found)``: half-open ``(top, left, bottom, right)`` in cells, and False (with
      an all-zero box) when the map has no set cell.

    Examples:
      >>> mask = np.zeros((4, 6), bool); mask[1:3, 1:4] = True; mask[0, 5] = True
      >>> box, found = largest_component_box(mask); box.tolist(), found
      ([1, 1, 3, 4], True)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"largest_component_box: mask must be (H, W), found {mask.shape}.")
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count < 2:  # label 0 is the background
        return np.zeros(4, np.int32), False
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = 1 + np.flatnonzero(areas == areas.max())  # labels of the largest components
    if len(largest) > 1:  # OpenCV's label order is not raster order: break ties ourselves
        first_cell = [np.flatnonzero(labels.ravel() == label)[0] for label in largest]
        largest = largest[np.argmin(first_cell) :]
    left, top, width, height = stats[largest[0], :4]
    return np.array([top, left, top + height, left + width], np.int32), True


def num_cam_regions(num_classes: int, num_thresholds: int, *, include_image: bool = True) -> int:
    """``R`` of :func:`cam_boxes`: one box per class and threshold, plus the whole image."""
    return int(include_image) + num_classes * num_thresholds


def cam_boxes(
    cams: Float[AnyArray, "B K H W"],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    map_sizes: Int[AnyArray, "B 2"] | None = None,
    include_image: bool = True,
    min_side: int = 1,
) -> tuple[Int[np.ndarray, "B R 4"], Bool[np.ndarray, "B R"]]:
    """Region proposals of CAMs: the largest connected component at each threshold.

    Map ``k`` of image ``b`` is cropped to the image's real cells, binarised as
    ``cam >= t * max(cam)`` for each threshold ``t`` and boxed with
    :func:`largest_component_box`. Region order: the whole image first (if
    ``include_image``), then class-major, threshold-minor. Host NumPy + OpenCV.

    Args:
      cams: Class activation maps of each image's top ``K`` classes, non-negative.
      thresholds: Fractions of each map's maximum, in (0, 1].
      map_sizes: Real ``(height, width)`` of each (padded) map in cells; default the
        whole map.
      include_image: Make region 0 the whole (real) map.
      min_side: Boxes narrower or shorter than this many cells are not valid.

    Returns:
      ``(boxes, valid)``: half-open cell boxes (zeros where not valid) and the mask of
      real proposals (False for a map without a positive cell, or a box below
      ``min_side``).

    Raises:
      ValueError: For maps that are not rank 4, a threshold outside (0, 1], or sizes
        that do not fit the maps.
    """
    cams = np.asarray(cams, np.float32)
    if cams.ndim != 4:
        raise ValueError(f"cam_boxes: cams must have shape (B, K, H, W), found {cams.shape}.")
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"cam_boxes: thresholds must be in (0, 1], found {thresholds}.")
    batch, num_classes, height, width = cams.shape
    if map_sizes is None:
        map_sizes = np.broadcast_to(np.array([height, width]), (batch, 2))
    map_sizes = np.asarray(map_sizes)
    if map_sizes.shape != (batch, 2) or np.any(map_sizes < 1):
        raise ValueError(
            f"cam_boxes: map_sizes must be (B, 2) = ({batch}, 2) positive sizes, found "
            f"{map_sizes.shape}."
        )
    if np.any(map_sizes > [height, width]):
        raise ValueError(f"cam_boxes: map_sizes exceed the {height}x{width} maps.")
    num_regions = num_cam_regions(num_classes, len(thresholds), include_image=include_image)
    boxes = np.zeros((batch, num_regions, 4), np.int32)
    valid = np.zeros((batch, num_regions), bool)
    for b in range(batch):
        real_height, real_width = (int(s) for s in map_sizes[b])
        region = 0
        if include_image:
            boxes[b, 0] = (0, 0, real_height, real_width)
            valid[b, 0] = real_height >= min_side and real_width >= min_side
            region = 1
        for k in range(num_classes):
            cam = cams[b, k, :real_height, :real_width]
            peak = float(cam.max())
            for t in thresholds:
                if peak > 0:
                    box, found = largest_component_box(cam >= t * peak)
                    big_enough = min(box[2] - box[0], box[3] - box[1]) >= min_side
                    if found and big_enough:
                        boxes[b, region], valid[b, region] = box, True
                region += 1
    return boxes, valid


# ----------------------------------------------------------------------------- device


def regional_descriptors(
    features: Float[AnyArray, "B H W C"],
    boxes: Int[AnyArray, "B R 4"],
    box_valid: Bool[AnyArray, "B R"],
    pool: PoolFn,
    *,
    valid: Bool[AnyArray, "B H W"] | None = None,
) -> Float[Array, "B R D"]:
    """Descriptors pooled inside every box at once: ``pool`` with the box as its mask.

    Each region is pooled as the whole image would be with every cell outside the box
    masked out (the poolings' ``valid`` argument), so a box covering the image gives the
    image's own descriptor. Pure JAX; jit with the pool closed over.

    Args:
      features: Feature maps, NHWC.
      boxes: Half-open cell boxes ``(top, left, bottom, right)``.
      box_valid: Which boxes are real proposals.
      pool: ``(features, mask) -> (B, D)`` L2-normalised descriptors.
      valid: Optional real-cell mask of padded maps (intersected with every box).

    Returns:
      L2-normalised region descriptors; zero rows where ``box_valid`` is False.
    """
    features = validation.as_float_array("regional_descriptors: features", features, axes="B H W C")
    batch, height, width, _ = features.shape
    box_valid = validation.as_mask(
        "regional_descriptors: box_valid", box_valid, shape=np.shape(boxes)[:2], axes="B R"
    )
    image = jnp.ones((batch, 1, height, width), bool)
    if valid is not None:
        image = jnp.asarray(valid)[:, None]  # (B, 1, H, W)
    masks = pooling.box_masks(boxes, height, width) & image  # (B, R, H, W)
    # Invalid boxes pool the whole image (finite, never empty); their rows are zeroed.
    masks = jnp.where(box_valid[:, :, None, None], masks, image)
    described = jax.vmap(lambda mask: pool(features, mask), in_axes=1, out_axes=1)(masks)
    return jnp.where(box_valid[..., None], described, 0.0)  # (B, R, D)


class RegionReranking(NamedTuple):
    """What :func:`region_rerank` did for each query.

    Attributes:
      ranks: Final ranking of the database, best first.
      shortlist: The shortlist re-ordered by region score (before query expansion).
      shortlist_scores: Best query-to-region similarity of each shortlisted image.
      best_regions: Index of that best region.
    """

    ranks: Int[Array, "Q N"]
    shortlist: Int[Array, "Q L"]
    shortlist_scores: Float[Array, "Q L"]
    best_regions: Int[Array, "Q L"]


def region_rerank(
    query_descriptors: Float[AnyArray, "Q D"],
    database_descriptors: Float[AnyArray, "N D"],
    region_descriptors: Float[AnyArray, "N R D"],
    region_valid: Bool[AnyArray, "N R"],
    *,
    shortlist_size: int = 100,
    num_expansion: int = 10,
    exclude: Int[AnyArray, " Q"] | None = None,
) -> RegionReranking:
    """The paper's re-ranking: best region of the top ``L``, then query expansion.

    1. Rank the database by the global similarity ``q . x_n``.
    2. Re-score the first ``L = shortlist_size`` images by their best region,
       ``max_r q . x_nr`` over valid regions (the global similarity for an image without
       one), and re-order the shortlist by it (stable: ties keep the global order); the
       rest keeps its global order.
    3. With ``K = num_expansion > 0``: expand the query with the best regions of the
       first ``K`` re-ranked images, ``q' = l2(q + sum_k x_{n_k r_k})``, and rank the whole
       database by ``q' . x_n`` (the authors' code ranks the expanded query against the
       global descriptors; the region order of step 2 only picks the expansion images).

    Args:
      query_descriptors: L2-normalised query descriptors.
      database_descriptors: L2-normalised global database descriptors.
      region_descriptors: Each database image's region descriptors, in the same space.
      region_valid: Which regions are real.
      shortlist_size: ``L``, at most ``N`` (static).
      num_expansion: ``K`` in ``[0, L]`` (static); 0 stops after step 2.
      exclude: Optional database row of each query itself (leave-one-out): never in its
        shortlist or expansion, ranked last (needs ``L < N``).

    Returns:
      A :class:`RegionReranking`.

    Raises:
      ValueError: For mismatched shapes or sizes out of range.

    References:
      Jimenez, Alvarez, Giro-i-Nieto. Class-weighted convolutional features for visual
      instance search. BMVC 2017.
    """
    queries = validation.as_float_array("region_rerank: queries", query_descriptors, axes="Q D")
    database = validation.as_float_array(
        "region_rerank: database", database_descriptors, axes="N D"
    )
    regions = validation.as_float_array(
        "region_rerank: region_descriptors", region_descriptors, axes="N R D"
    )
    queries, database, regions = validation.common_float(queries, database, regions)
    num_queries, dim = queries.shape
    num_database = database.shape[0]
    if database.shape[1] != dim or regions.shape[::2] != (num_database, dim):
        raise ValueError(
            f"region_rerank: queries {queries.shape}, database {database.shape} and regions "
            f"{regions.shape} must share N and D."
        )
    region_valid = validation.as_mask(
        "region_rerank: region_valid", region_valid, shape=regions.shape[:2], axes="N R"
    )
    candidates = num_database - (exclude is not None)
    if not 1 <= shortlist_size <= candidates:
        raise ValueError(
            f"region_rerank: shortlist_size must be in [1, {candidates}], found {shortlist_size}."
        )
    if not 0 <= num_expansion <= shortlist_size:
        raise ValueError(
            f"region_rerank: num_expansion must be in [0, {shortlist_size}], found {num_expansion}."
        )
    rows = jnp.arange(num_queries)
    scores = jnp.einsum("qd,nd->qn", queries, database, precision=jax.lax.Precision.HIGHEST)
    region_scores = jnp.einsum(
        "qd,nrd->qnr", queries, regions, precision=jax.lax.Precision.HIGHEST
    )  # (Q, N, R)
    region_scores = jnp.where(region_valid[None], region_scores, -jnp.inf)
    has_region = jnp.any(region_valid, axis=1)[None, :]  # (1, N)
    best_scores = jnp.where(has_region, jnp.max(region_scores, axis=2), scores)  # (Q, N)
    best_regions = jnp.argmax(region_scores, axis=2)  # (Q, N)
    if exclude is not None:
        exclude = validation.as_int_array("region_rerank: exclude", exclude, axes="Q")
        scores = scores.at[rows, exclude].set(-jnp.inf)
    order = jnp.argsort(-scores, axis=1, stable=True)  # (Q, N)
    shortlist = order[:, :shortlist_size]  # (Q, L)
    shortlist_scores = jnp.take_along_axis(best_scores, shortlist, axis=1)  # (Q, L)
    reorder = jnp.argsort(-shortlist_scores, axis=1, stable=True)  # (Q, L)
    shortlist = jnp.take_along_axis(shortlist, reorder, axis=1)
    shortlist_scores = jnp.take_along_axis(shortlist_scores, reorder, axis=1)
    shortlist_regions = jnp.take_along_axis(best_regions, shortlist, axis=1)  # (Q, L)
    ranks = jnp.concatenate([shortlist, order[:, shortlist_size:]], axis=1)  # (Q, N)
    if num_expansion > 0:
        top = shortlist[:, :num_expansion]  # (Q, K)
        expansion = regions[top, shortlist_regions[:, :num_expansion]]  # (Q, K, D)
        expansion = jnp.where(has_region[0, top][..., None], expansion, database[top])
        expanded = l2_normalize(queries + jnp.sum(expansion, axis=1))  # (Q, D)
        scores = jnp.einsum(
            "qd,nd->qn", expanded, database, precision=jax.lax.Precision.HIGHEST
        )  # (Q, N)
        if exclude is not None:
            scores = scores.at[rows, exclude].set(-jnp.inf)
        ranks = jnp.argsort(-scores, axis=1, stable=True)
    return RegionReranking(
        ranks=ranks.astype(jnp.int32),
        shortlist=shortlist.astype(jnp.int32),
        shortlist_scores=shortlist_scores,
        best_regions=shortlist_regions.astype(jnp.int32),
    )


# ----------------------------------------------------------------------------- host loop


def model_pool(config: ModelConfig, variables: dict[str, Any]) -> PoolFn:
    """A model's own descriptor head as a :data:`PoolFn`: its pooling, then its whitening.

    The same maths as :class:`~jaxretrieval.retrieval_model.RetrievalModel` after the
    backbone (learned GeM ``p``, DARAC weights, whitening layer), for any mask.

    Raises:
      ValueError: For the grid poolings ``rmac`` and ``ramac``, which cannot take a mask.
    """
    if config.pooling in pooling.REGIONAL_POOLINGS:
        raise ValueError(
            f"{config.pooling!r} places its own grid and cannot pool inside a box; use a "
            f"masked pooling ({sorted(set(pooling.POOLINGS) - pooling.REGIONAL_POOLINGS)})."
        )
    params = variables["params"]
    classifier = params["backbone"].get("classifier")
    whitening_layer = None
    if config.whitening_dim is not None:
        whitening_layer = layers.WhiteningLayer(features=config.whitening_dim)

    def pool(features, mask):
        if config.pooling == "gem" and "gem" in params:
            pooled = l2_normalize(pooling.gem(features, params["gem"]["p"], valid=mask))
        elif config.pooling == "darac":
            weights = params["darac"]["region_weights"]
            pooled = l2_normalize(pooling.darac_pooling(features, weights, valid=mask))
        else:
            pooled = pooling.global_descriptor(
                features, mask, pooling_name=config.pooling, p=config.gem_p, classifier=classifier
            )
        if whitening_layer is None:
            return pooled
        return whitening_layer.apply({"params": params["whitening"]}, pooled)

    return pool


class RegionDescriptors(NamedTuple):
    """Region proposals and their descriptors for a list of images (row-aligned).

    Attributes:
      descriptors: ``(N, R, D)`` float32, L2-normalised; zero rows where not valid.
      valid: ``(N, R)`` real proposals (all False for an unreadable image).
      boxes: ``(N, R, 4)`` cell boxes ``(top, left, bottom, right)``.
      map_sizes: ``(N, 2)`` real feature-map size of each image, in cells.
      classes: ``(N, K)`` the top classes whose CAMs proposed the boxes, most probable
        first.
      paths: The N image paths.
      failures: ``(path, reason)`` of each unreadable image.
    """

    descriptors: np.ndarray
    valid: np.ndarray
    boxes: np.ndarray
    map_sizes: np.ndarray
    classes: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]


class CAMRegionExtractor:
    """CAM region proposals and region descriptors of image files, for re-ranking.

    Each image is resized (longer side ``max_side``, enlarged if smaller, as global
    extraction does), padded to a multiple of the feature stride and batched with images
    of the same padded size. Per batch, one jitted call gives the feature maps and the
    top classes' CAMs (kept on the device), the host fits the boxes
    (:func:`cam_boxes`), and a second jitted call pools every region
    (:func:`regional_descriptors`). With ``include_image``, region 0 is the image's own
    global descriptor at this size.

    Args:
      model: The model (its backbone must have a classifier).
      variables: Its variables.
      pool: ``(features, mask) -> descriptors`` for the regions; default the model's own
        head (:func:`model_pool`), so regions share the global descriptors' space.
      batch_size: Images per device call.
      num_decode_threads: Threads decoding images.

    Raises:
      ValueError: The backbone has no classifier (no CAMs), or the default pool cannot
        mask (``rmac``/``ramac``).
    """

    def __init__(
        self,
        model: ModelConfig,
        variables: dict[str, Any],
        *,
        pool: PoolFn | None = None,
        batch_size: int = 4,
        num_decode_threads: int = 2,
    ):
        if "classifier" not in variables.get("params", {}).get("backbone", {}):
            raise ValueError(f"CAM regions need a classifier; {model.backbone} has none.")
        self.model = model
        # On one device, transferred once (not per batch): variables replicated over a
        # mesh (an Extractor's) would make every call run on every device.
        self.variables = jax.device_put(variables, jax.local_devices()[0])
        self.module = retrieval_model.make_model(model)
        self.feature_stride = self.module.feature_stride
        self.batch_size = batch_size
        self._num_decode_threads = num_decode_threads
        pool = model_pool(model, variables) if pool is None else pool
        module = self.module

        def features_and_cams(variables, images, sizes, num_classes):
            out = module.apply(variables, images, sizes)
            classifier = variables["params"]["backbone"]["classifier"]
            cams, classes = pooling.class_activation_maps(
                out["features"],
                classifier["kernel"],
                num_classes=num_classes,
                classifier_bias=classifier["bias"],
                normalization="minmax",
                valid=out["valid"],
            )
            return out["features"], out["valid"], cams, classes

        self._features_and_cams = jax.jit(features_and_cams, static_argnames="num_classes")
        self._map_kernels: dict[Callable, Callable] = {}
        self._regions = jax.jit(
            lambda features, valid, boxes, box_valid: regional_descriptors(
                features, boxes, box_valid, pool, valid=valid
            )
        )

    def _load(self, path: str, box, max_side: int, strict: bool):
        try:
            (image,) = image_io.load_scaled(path, max_side=max_side, box=box)
        except image_io.ImageDecodeError as e:
            if strict:
                raise
            return e.reason
        return image

    def _padded_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        stride = self.feature_stride
        height = max(-(-image.shape[0] // stride) * stride for image in images)
        width = max(-(-image.shape[1] // stride) * stride for image in images)
        batch = np.zeros((self.batch_size, height, width, 3), np.float32)
        sizes = np.ones((self.batch_size, 2), np.int32)  # blank fillers: 1x1 real pixels
        spec = self.model.spec
        for slot, image in enumerate(images):
            normalized = image_io.normalize_image(image, mean=spec.input_mean, std=spec.input_std)
            batch[slot, : image.shape[0], : image.shape[1]] = normalized
            sizes[slot] = image.shape[:2]
        return batch, sizes

    def _run(self, images, *, thresholds, num_box_classes, include_image, min_side):
        """One batch of resized RGB images -> (descriptors, valid, boxes, map sizes, classes)."""
        batch, sizes = self._padded_batch(images)
        features, valid, cams, classes = self._features_and_cams(
            self.variables, batch, sizes, num_classes=num_box_classes
        )
        map_sizes = -(-sizes // self.feature_stride)  # (B, 2) ceil division
        boxes, box_valid = cam_boxes(
            np.asarray(cams),
            thresholds=thresholds,
            map_sizes=map_sizes,
            include_image=include_image,
            min_side=min_side,
        )
        descriptors = self._regions(features, valid, boxes, box_valid)
        count = len(images)
        return (
            np.asarray(descriptors)[:count],
            box_valid[:count],
            boxes[:count],
            map_sizes[:count],
            np.asarray(classes)[:count],
            np.asarray(cams)[:count],
        )

    def _batches(self, paths, boxes, max_side, strict, progress, failures, chunk_images=128):
        """Yields ``(indices, images)`` of same-bucket images, decoding a chunk at a time.

        Unreadable images are appended to ``failures`` as ``(path, reason)``.
        """
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
        max_side = self.model.max_side if max_side is None else max_side
        stride = self.feature_stride
        bar = tqdm(total=len(paths), desc="images", unit="img", disable=not progress)
        with concurrent.futures.ThreadPoolExecutor(self._num_decode_threads) as decoders:
            for chunk_start in range(0, len(paths), chunk_images):
                chunk = range(chunk_start, min(chunk_start + chunk_images, len(paths)))
                loaded = decoders.map(
                    lambda i: self._load(paths[i], boxes[i] if boxes else None, max_side, strict),
                    chunk,
                )
                buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
                for index, image in zip(chunk, loaded, strict=True):
                    if isinstance(image, str):
                        failures.append((paths[index], image))
                        continue
                    key = tuple(-(-s // stride) * stride for s in image.shape[:2])
                    buckets.setdefault(key, []).append((index, image))
                for items in buckets.values():
                    for start in range(0, len(items), self.batch_size):
                        batch = items[start : start + self.batch_size]
                        yield [i for i, _ in batch], [image for _, image in batch]
                bar.update(len(chunk))
        bar.close()

    def map_images(
        self,
        paths: Sequence[str | os.PathLike],
        fn: Callable[[jax.Array, jax.Array], jax.Array],
        *,
        boxes: Sequence[Sequence[float] | None] | None = None,
        max_side: int | None = None,
        strict: bool = False,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """``fn(features, valid)`` of every image: one backbone pass, any per-image output.

        The images are resized, padded and batched as for :meth:`__call__`; ``fn`` gets
        the padded feature maps ``(B, H, W, C)`` and their real-cell mask and returns a
        ``(B, ...)`` array (e.g. per-class CAM vectors, several descriptors at once). It is
        jitted once per padded shape (cached per ``fn`` object).

        Returns:
          ``(outputs, failures)``: outputs stacked in input order (zeros for unreadable
          images) and ``(path, reason)`` of each unreadable image.
        """
        paths = [os.fspath(p) for p in paths]
        kernel = self._map_kernels.get(fn)
        if kernel is None:
            module = self.module

            def run(variables, images, sizes):
                out = module.apply(variables, images, sizes)
                return fn(out["features"], out["valid"])

            kernel = self._map_kernels[fn] = jax.jit(run)
        result = None
        failures: list[tuple[str, str]] = []
        for indices, images in self._batches(paths, boxes, max_side, strict, progress, failures):
            batch, sizes = self._padded_batch(images)
            values = np.asarray(kernel(self.variables, batch, sizes))[: len(images)]
            if result is None:
                result = np.zeros((len(paths), *values.shape[1:]), values.dtype)
            result[indices] = values
        if result is None:  # no readable image
            result = np.zeros((len(paths), 0), np.float32)
        return result, failures

    def __call__(
        self,
        paths: Sequence[str | os.PathLike],
        boxes: Sequence[Sequence[float] | None] | None = None,
        *,
        max_side: int | None = None,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        num_box_classes: int = 3,
        include_image: bool = True,
        min_side: int = 1,
        strict: bool = False,
        progress: bool = False,
    ) -> RegionDescriptors:
        """Region proposals and descriptors of every image.

        Args:
          paths: Image files.
          boxes: Optional crop ``(x1, y1, x2, y2)`` in pixels per image (None: whole).
          max_side: Longer image side in pixels (default: the model's).
          thresholds: CAM thresholds, fractions of each map's maximum.
          num_box_classes: ``K``: the CAMs of this many top classes propose boxes.
          include_image: Region 0 is the whole image.
          min_side: Smallest valid box side, in cells.
          strict: Raise on an unreadable image instead of skipping it.
          progress: Show a progress bar.

        Returns:
          :class:`RegionDescriptors` aligned with ``paths``.
        """
        paths = [os.fspath(p) for p in paths]
        settings = dict(
            thresholds=tuple(thresholds),
            num_box_classes=num_box_classes,
            include_image=include_image,
            min_side=min_side,
        )
        num_regions = num_cam_regions(num_box_classes, len(thresholds), include_image=include_image)
        out = {
            "descriptors": np.zeros((len(paths), num_regions, 0), np.float32),
            "valid": np.zeros((len(paths), num_regions), bool),
            "boxes": np.zeros((len(paths), num_regions, 4), np.int32),
            "map_sizes": np.zeros((len(paths), 2), np.int32),
            "classes": np.zeros((len(paths), num_box_classes), np.int32),
        }
        failures: list[tuple[str, str]] = []
        for indices, images in self._batches(paths, boxes, max_side, strict, progress, failures):
            results = self._run(images, **settings)
            if out["descriptors"].shape[-1] == 0:
                dim = results[0].shape[-1]
                out["descriptors"] = np.zeros((len(paths), num_regions, dim), np.float32)
            for name, values in zip(out, results[:5], strict=True):
                out[name][indices] = values
        return RegionDescriptors(**out, paths=paths, failures=failures)

    def proposals(
        self,
        path: str | os.PathLike,
        *,
        max_side: int | None = None,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        num_box_classes: int = 3,
        include_image: bool = True,
    ) -> dict[str, np.ndarray]:
        """One image's resized pixels, CAMs, classes and boxes (for pictures).

        Returns:
          ``{"image": (h, w, 3) uint8 RGB, "cams": (K, H, W) over the real cells,
          "classes": (K,), "boxes": (R, 4) cells, "valid": (R,), "feature_stride": s}``.
        """
        max_side = self.model.max_side if max_side is None else max_side
        image = self._load(os.fspath(path), None, max_side, strict=True)
        _, valid, boxes, map_sizes, classes, cams = self._run(
            [image],
            thresholds=tuple(thresholds),
            num_box_classes=num_box_classes,
            include_image=include_image,
            min_side=1,
        )
        height, width = map_sizes[0]
        return {
            "image": image,
            "cams": cams[0, :, :height, :width],
            "classes": classes[0],
            "boxes": boxes[0],
            "valid": valid[0],
            "feature_stride": np.array(self.feature_stride),
        }


@functools.cache
def _jitted_region_rerank(shortlist_size: int, num_expansion: int, leave_one_out: bool):
    if leave_one_out:
        return jax.jit(
            lambda q, x, r, v, exclude: region_rerank(
                q, x, r, v, shortlist_size=shortlist_size, num_expansion=num_expansion,
                exclude=exclude,
            )
        )  # fmt: skip
    return jax.jit(
        lambda q, x, r, v: region_rerank(
            q, x, r, v, shortlist_size=shortlist_size, num_expansion=num_expansion
        )
    )


def rerank_with_regions(
    query_descriptors: np.ndarray,
    database_descriptors: np.ndarray,
    regions: RegionDescriptors,
    *,
    shortlist_size: int = 100,
    num_expansion: int = 10,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """(Q, N) ranks of :func:`region_rerank` on host arrays (jitted once per setting).

    ``shortlist_size`` and ``num_expansion`` are capped at what the database allows.

    Raises:
      ValueError: When the region descriptors do not share the queries' dimension (they
        come from another model or pooling).
    """
    dim = np.shape(query_descriptors)[1]
    if regions.descriptors.shape[-1] != dim:
        raise ValueError(
            f"region descriptors have dimension {regions.descriptors.shape[-1]} but the "
            f"global descriptors {dim}: regions must be described by the same model."
        )
    candidates = len(database_descriptors) - (exclude is not None)
    shortlist_size = min(shortlist_size, candidates)
    num_expansion = min(num_expansion, shortlist_size)
    rerank = _jitted_region_rerank(shortlist_size, num_expansion, exclude is not None)
    args = (query_descriptors, database_descriptors, regions.descriptors, regions.valid)
    if exclude is not None:
        args = (*args, np.asarray(exclude, np.int32))
    return np.asarray(rerank(*args).ranks)
