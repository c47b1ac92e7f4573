"""Batched, jitted, multi-scale descriptor extraction over lists of image files.

Host side of the pipeline: decoding (OpenCV, in a thread pool), resizing, bucketing and
padding happen here; the device runs one jitted function ``backbone -> feature map ->
masked pooling -> L2`` per bucket shape.

Why buckets: every distinct input shape costs a 1-2.5 s compile on a 2-core CPU, and a
folder of photos has dozens of aspect ratios. Each resized image is zero-padded up to a
multiple of ``size_multiple`` pixels on both sides, so an image set at one max side
compiles at most ``(max_side / size_multiple) * 2`` shapes per scale, and batches are
padded to ``batch_size`` with blank images. The pooling ignores padded feature positions
through its ``valid`` mask, so a padded image pools its own pixels only.

Multi-scale (cirtorch convention): the image is resized to ``max_side * s`` for each scale
``s``; per-scale L2-normalised descriptors are combined by a generalised mean with the GeM
exponent (``p = 1`` for SPoC/MAC), then L2-normalised again.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxretrieval import backbones, normalization, pooling
from jaxretrieval.data import images as image_io

logger = logging.getLogger(__name__)

MULTI_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
POOLINGS = pooling.POOLINGS
REGIONAL_POOLINGS = pooling.REGIONAL_POOLINGS
Box = Sequence[float | int]  # (x1, y1, x2, y2) in pixels


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """What to extract; hashable, so it keys the compiled-kernel and on-disk caches.

    Attributes:
      backbone: Name in :data:`jaxretrieval.backbones.BACKBONES`.
      feature_name: Feature map to pool; None uses the backbone's default (last conv).
      pooling: ``"gem"``, ``"mac"`` or ``"spoc"``.
      gem_p: GeM exponent (also the multi-scale combination exponent for GeM).
      max_side: Longer image side in pixels at scale 1 (images are resized up or down).
      scales: Scales relative to ``max_side``; ``MULTI_SCALES`` is 1, 1/sqrt(2), 1/2.
      size_multiple: Padding granularity in pixels for shape buckets.
      batch_size: Images per device call (last batch padded with blank images).
      extra_poolings: More poolings computed from the same feature maps in the same pass
        (``ExtractionResult.by_pooling``); used to compare poolings at the cost of one.
    """

    backbone: str = "mobilenet_v2"
    feature_name: str | None = None
    pooling: str = "gem"
    gem_p: float = 3.0
    max_side: int = 224
    scales: tuple[float, ...] = (1.0,)
    size_multiple: int = 32
    batch_size: int = 8
    extra_poolings: tuple[str, ...] = ()

    @property
    def poolings(self) -> tuple[str, ...]:
        """The main pooling first, then the extra ones (without repeats)."""
        return tuple(dict.fromkeys((self.pooling, *self.extra_poolings)))

    def __post_init__(self):
        for name in self.poolings:
            if name not in POOLINGS:
                raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, found {name!r}.")
        if self.backbone not in backbones.BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; available: {sorted(backbones.BACKBONES)}."
            )
        if self.max_side < 16 or self.batch_size < 1 or self.size_multiple < 1:
            raise ValueError(f"invalid sizes in {self}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, found {self.scales}.")


@dataclasses.dataclass
class ExtractionResult:
    """Descriptors of a list of images, row-aligned with the list.

    Attributes:
      descriptors: (N, D) float32, L2-normalised; zero rows where ``valid`` is False.
      valid: (N,) bool, False for images that could not be read.
      paths: The N image paths, in input order.
      failures: (path, reason) for each unreadable image.
      compiled_shapes: The distinct (batch, height, width) input shapes run on the device.
      by_pooling: Descriptors of every pooling in ``settings.poolings`` (the main one is
        ``descriptors``).
    """

    descriptors: np.ndarray
    valid: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]
    compiled_shapes: list[tuple[int, int, int]]
    by_pooling: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Extractor:
    """Extracts global descriptors for image files with one backbone and pooling.

    Args:
      settings: What to extract.
      weights_path: Optional ``.pth`` file; default is the backbone's shipped weights.
      num_decode_threads: Threads decoding and resizing images (OpenCV releases the GIL).

    Examples:
      ``Extractor(ExtractionSettings(max_side=224))(paths).descriptors``
    """

    def __init__(
        self,
        settings: ExtractionSettings = ExtractionSettings(),
        *,
        weights_path: str | os.PathLike | None = None,
        num_decode_threads: int = 2,
    ):
        self.settings = settings
        module, variables, spec = backbones.load_backbone(settings.backbone, weights_path)
        self.spec = spec
        self.feature_name = settings.feature_name or spec.feature_name
        self.variables = variables
        if set(settings.poolings) & REGIONAL_POOLINGS and settings.size_multiple != (
            spec.feature_stride
        ):
            raise ValueError(
                f"regional poolings need size_multiple == the feature stride "
                f"({spec.feature_stride}) so that padded maps have the real size; "
                f"found {settings.size_multiple}."
            )
        if "cam" in settings.poolings and "classifier" not in variables.get("params", {}):
            raise ValueError(f"'cam' pooling needs a classifier; {settings.backbone} has none.")
        self._kernel = _descriptor_kernel(
            module, self.feature_name, settings.poolings, spec.feature_stride
        )
        self._num_decode_threads = num_decode_threads

    def __call__(
        self,
        paths: Sequence[str | os.PathLike],
        boxes: Sequence[Box | None] | None = None,
        *,
        strict: bool = False,
        progress: bool = True,
        chunk_images: int = 256,
    ) -> ExtractionResult:
        """Extracts one descriptor per image.

        Args:
          paths: Image files.
          boxes: Optional per-image crop (x1, y1, x2, y2) in pixels, applied before
            resizing (revisitop query boxes); None entries mean the whole image.
          strict: Raise on the first unreadable image instead of skipping it.
          progress: Show a tqdm progress bar.
          chunk_images: Images decoded and bucketed together (bounds host memory).

        Returns:
          An :class:`ExtractionResult` aligned with ``paths``.

        Raises:
          jaxretrieval.data.images.ImageDecodeError: With ``strict``, for a bad image.
          ValueError: If ``boxes`` does not match ``paths`` in length.
        """
        paths = [os.fspath(p) for p in paths]
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
        settings = self.settings
        num_scales = len(settings.scales)
        per_scale: dict[str, np.ndarray] = {}  # pooling -> (S, N, D), D known after 1st batch
        valid = np.zeros(len(paths), bool)
        failures: list[tuple[str, str]] = []
        shapes: set[tuple[int, int, int]] = set()
        bar = tqdm(total=len(paths), desc="extracting", unit="img", disable=not progress)
        with concurrent.futures.ThreadPoolExecutor(self._num_decode_threads) as pool:
            for start in range(0, len(paths), chunk_images):
                indices = range(start, min(start + chunk_images, len(paths)))
                prepared = pool.map(
                    lambda i: self._prepare(paths[i], boxes[i] if boxes else None, strict),
                    indices,
                )
                buckets: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
                for index, item in zip(indices, prepared, strict=True):
                    if isinstance(item, str):
                        failures.append((paths[index], item))
                        logger.warning("skipping unreadable image %s: %s", paths[index], item)
                        continue
                    valid[index] = True
                    for scale_index, image in enumerate(item):
                        key = self._bucket(image.shape[:2])
                        buckets.setdefault(key, []).append((index, scale_index, image))
                for (height, width), items in buckets.items():
                    for batch_start in range(0, len(items), settings.batch_size):
                        batch = items[batch_start : batch_start + settings.batch_size]
                        outputs = self._run_batch(batch, height, width)
                        shapes.add((settings.batch_size, height, width))
                        for name, descriptors in outputs.items():
                            if name not in per_scale:
                                per_scale[name] = np.zeros(
                                    (num_scales, len(paths), descriptors.shape[1]), np.float32
                                )
                            for slot, (index, scale_index, _) in enumerate(batch):
                                per_scale[name][scale_index, index] = descriptors[slot]
                bar.update(len(indices))
        bar.close()
        logger.info(
            "extracted %d images (%d failed) with %d input shapes: %s",
            len(paths), len(failures), len(shapes), sorted(shapes),
        )  # fmt: skip
        if failures:
            logger.warning("%d unreadable images: %s", len(failures), [p for p, _ in failures])
        by_pooling = {}
        for name in settings.poolings:
            if name not in per_scale:  # no readable image: dimension from the backbone
                channels = self.spec.feature_channels * (2 if name == "ramac" else 1)
                per_scale[name] = np.zeros((num_scales, len(paths), channels), np.float32)
            exponent = settings.gem_p if name == "gem" else 1.0
            combined = combine_scales(per_scale[name], exponent) * valid[:, None]
            by_pooling[name] = combined.astype(np.float32)
        return ExtractionResult(
            descriptors=by_pooling[settings.pooling],
            valid=valid,
            paths=paths,
            failures=failures,
            compiled_shapes=sorted(shapes),
            by_pooling=by_pooling,
        )

    def _prepare(self, path: str, box: Box | None, strict: bool) -> list[np.ndarray] | str:
        """Decodes, crops and resizes one image per scale; an error string if unreadable."""
        try:
            image = image_io.load_image(path)
        except image_io.ImageDecodeError as e:
            if strict:
                raise
            return str(e)
        if box is not None:
            image = image_io.crop_to_box(image, box)
        resized = []
        for scale in self.settings.scales:
            max_side = max(1, round(self.settings.max_side * scale))
            resized.append(
                image_io.normalize_image(
                    image_io.resize_max_side(image, max_side),
                    mean=self.spec.input_mean,
                    std=self.spec.input_std,
                )
            )
        return resized

    def _bucket(self, size: tuple[int, int]) -> tuple[int, int]:
        multiple = self.settings.size_multiple
        return tuple(-(-s // multiple) * multiple for s in size)

    def _run_batch(self, batch, height: int, width: int) -> dict[str, np.ndarray]:
        batch_size = self.settings.batch_size
        images = np.zeros((batch_size, height, width, 3), np.float32)
        sizes = np.ones((batch_size, 2), np.int32)  # blank padding images: 1x1 real pixels
        for slot, (_, _, image) in enumerate(batch):
            images[slot, : image.shape[0], : image.shape[1]] = image
            sizes[slot] = image.shape[:2]
        out = self._kernel(self.variables, images, sizes, np.float32(self.settings.gem_p))
        return {name: np.asarray(x)[: len(batch)] for name, x in out.items()}


def combine_scales(per_scale: np.ndarray, exponent: float) -> np.ndarray:
    """Generalised mean over scales of (S, N, D) descriptors, then L2 (cirtorch ``ms``).

    With one scale this is just the L2 normalisation. Exponent 1 (SPoC/MAC/...) is the
    plain mean, which also keeps signed descriptors (e.g. after PCA in CAM) intact.
    """
    if per_scale.shape[0] == 1:
        return np.asarray(normalization.l2_normalize(per_scale[0]))
    if exponent == 1.0:
        combined = np.mean(per_scale, axis=0)
    else:
        combined = np.mean(np.clip(per_scale, 0.0, None) ** exponent, axis=0) ** (1 / exponent)
    return np.asarray(normalization.l2_normalize(combined))


@functools.cache
def _descriptor_kernel(module, feature_name: str, pooling_names: tuple[str, ...], stride: int):
    """One jitted ``images -> {pooling: descriptors}`` function per backbone/layer/poolings.

    Cached so repeated extractors share compiled code (big_vision's get_eval_fn pattern).
    """

    @jax.jit
    def kernel(variables, images, sizes, p):
        _, features = module.apply(variables, images, train=False)
        feature_map = features[feature_name]  # (B, h, w, C)
        _, map_height, map_width, _ = feature_map.shape
        # Real extent of each image on the feature map: ceil(size / stride), which is what
        # stride-2 convolutions with symmetric or 'SAME' padding produce.
        real = -(-sizes // stride)  # (B, 2)
        valid = (jnp.arange(map_height)[None, :, None] < real[:, 0, None, None]) & (
            jnp.arange(map_width)[None, None, :] < real[:, 1, None, None]
        )  # (B, h, w)
        classifier = variables["params"].get("classifier")
        return {
            name: pooling.global_descriptor(
                feature_map, valid, pooling_name=name, p=p, classifier=classifier
            )
            for name in pooling_names
        }

    return kernel


# --- descriptors on disk --------------------------------------------------------------


def fingerprint(paths: Sequence[str], boxes: Sequence[Box | None] | None, settings) -> str:
    """Hash of settings, paths, boxes and each file's size and mtime (cache validity)."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        box = boxes[i] if boxes else None
        digest.update(f"{path}|{stamp}|{box}\n".encode())
    return digest.hexdigest()


def save_descriptors(path: str | os.PathLike, result: ExtractionResult, key: str) -> None:
    """Writes descriptors with their image list as .npz (no pickled objects)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        descriptors=result.descriptors,
        **{f"pooling__{name}": x for name, x in result.by_pooling.items()},
        valid=result.valid,
        paths=np.array(result.paths, dtype=str),
        failures=np.array([f"{p}\t{r}" for p, r in result.failures], dtype=str),
        key=np.array(key),
    )
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written file


def load_descriptors(path: str | os.PathLike, key: str | None = None) -> ExtractionResult | None:
    """Reads :func:`save_descriptors` output; None if absent or saved for another key."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        if key is not None and str(data["key"]) != key:
            return None
        failures = [tuple(f.split("\t", 1)) for f in data["failures"].tolist()]
        by_pooling = {
            name.removeprefix("pooling__"): data[name]
            for name in data.files
            if name.startswith("pooling__")
        }
        return ExtractionResult(
            descriptors=data["descriptors"],
            valid=data["valid"],
            paths=data["paths"].tolist(),
            failures=failures,
            compiled_shapes=[],
            by_pooling=by_pooling,
        )


def extract_cached(
    extractor: Extractor,
    paths: Sequence[str | os.PathLike],
    boxes: Sequence[Box | None] | None = None,
    *,
    cache_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ExtractionResult:
    """Runs ``extractor`` unless ``cache_file`` holds descriptors for the same inputs.

    The cache is keyed by :func:`fingerprint`, so changed settings, files or boxes
    trigger a fresh extraction.
    """
    paths = [os.fspath(p) for p in paths]
    if cache_file is None:
        return extractor(paths, boxes, **kwargs)
    key = fingerprint(paths, boxes, extractor.settings)
    cached = load_descriptors(cache_file, key)
    if cached is not None:
        logger.info("reusing descriptors from %s", cache_file)
        return cached
    result = extractor(paths, boxes, **kwargs)
    save_descriptors(cache_file, result, key)
    return result
