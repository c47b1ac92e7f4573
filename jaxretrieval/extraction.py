"""Batched, jitted, multi-scale descriptor extraction over lists of image files.

An :class:`Extractor` is built from a model and its variables
(:class:`~jaxretrieval.retrieval_model.ModelConfig` + Flax variables: pretrained, from a
saved model directory, or the current state of a training run), so GeM's ``p``, a
whitening layer or a fine-tuned backbone are what every CLI runs.

Host side: decoding (OpenCV, in a thread pool) through
:func:`jaxretrieval.data.images.load_scaled`, bucketing and padding. Device side: one
jitted ``RetrievalModel.apply`` per bucket shape, the batch sharded over every device (a
``data`` mesh axis, :mod:`jaxretrieval.sharding`) and the variables replicated.

Why buckets: every distinct input shape costs a 1-2.5 s compile on a 2-core CPU, and a
folder of photos has dozens of aspect ratios. Each resized image is zero-padded up to a
multiple of ``size_multiple`` pixels on both sides, so an image set at one max side
compiles at most ``(max_side / size_multiple) * 2`` shapes per scale, and batches are
padded to ``batch_size`` with blank images. The pooling ignores padded feature positions
through its ``valid`` mask, so a padded image pools its own pixels only.

Multi-scale (cirtorch convention): the image is resized to ``max_side * s`` for each scale
``s``; per-scale L2-normalised poolings are combined by a generalised mean with the
model's GeM exponent (``p = 1`` for other poolings), L2-normalised, and only then whitened
(as cirtorch applies its learned whitening to the multi-scale descriptor). With one scale
this is exactly the model's ``descriptors`` output.

Several processes (hosts): extraction needs no communication between them. An
:class:`Extractor` runs on its own process's devices, and :func:`extract_across_processes`
gives each process a contiguous slice of the image list and gathers the descriptors on
every process (or leaves each process's part in its own file, ready for
:func:`jaxretrieval.search.build_sharded_index`). With one process it is exactly
``Extractor.__call__`` / :func:`extract_cached`.

Descriptor caches (:func:`extract_cached`) are keyed by :attr:`Extractor.cache_key`: the
model config, a digest of the variables actually used, the settings, and each file's
path, size and mtime. Extraction saves its progress in chunks with atomic writes, so an
interrupted run resumes without recomputing finished images.
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
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxretrieval import (
    jit_cache,
    layers,
    model_io,
    normalization,
    pooling,
    retrieval_model,
    sharding,
)
from jaxretrieval.data import images as image_io
from jaxretrieval.retrieval_model import ModelConfig

logger = logging.getLogger(__name__)

MULTI_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
POOLINGS = pooling.POOLINGS
REGIONAL_POOLINGS = pooling.REGIONAL_POOLINGS
Box = Sequence[float | int]  # (x1, y1, x2, y2) in pixels
CACHE_FORMAT = 2  # bump when the cache's meaning changes
DEFAULT_SIZE_MULTIPLE = 32  # shape buckets of global poolings, whatever the stride


class NonFiniteDescriptorsError(ValueError):
    """Descriptors came out NaN or infinite; they are neither returned nor saved."""


_MAX_LISTED = 3


def check_finite_descriptors(
    descriptors: dict[str, np.ndarray], valid: np.ndarray, paths: Sequence[str]
) -> None:
    """Raises :class:`NonFiniteDescriptorsError` naming the images with NaN/inf rows.

    Args:
      descriptors: ``(N, D)`` arrays by name (final descriptors, extra poolings).
      valid: ``(N,)`` rows that hold an image (others are zeros by construction).
      paths: The N image files.
    """
    finite = np.ones(len(paths), bool)
    for x in descriptors.values():
        finite &= np.isfinite(x).all(axis=1)
    bad = np.flatnonzero(valid & ~finite)
    if bad.size:
        listed = ", ".join(str(paths[i]) for i in bad[:_MAX_LISTED])
        more = f" and {bad.size - _MAX_LISTED} more" if bad.size > _MAX_LISTED else ""
        raise NonFiniteDescriptorsError(
            f"{bad.size} of {int(valid.sum())} images got NaN or infinite descriptors: "
            f"{listed}{more}; nothing of them was saved or indexed. The model's variables "
            "(--checkpoint / --weights) are the usual cause: check them for NaN/inf."
        )


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """How to extract (what to extract is the model); hashable.

    Attributes:
      max_side: Longer image side in pixels at scale 1 (images are resized up or down);
        None uses the model's ``max_side``.
      scales: Scales relative to ``max_side``; ``MULTI_SCALES`` is 1, 1/sqrt(2), 1/2.
        None uses the model's ``scales``.
      size_multiple: Padding granularity in pixels for shape buckets. None: 32, or the
        model's feature stride when a regional pooling is asked for (those need buckets of
        the stride: 16 for VGG16 and the dilated ResNet, 32 for the others).
      batch_size: Images per device call (rounded up to a multiple of the device count;
        the last batch is padded with blank images).
      extra_poolings: More poolings computed from the same feature maps in the same pass
        (``ExtractionResult.by_pooling``, not whitened); used to compare poolings at the
        cost of one.
      max_pixels: Refuse images with more pixels than this (decompression bombs).
    """

    max_side: int | None = None
    scales: tuple[float, ...] | None = None
    size_multiple: int | None = None
    batch_size: int = 8
    extra_poolings: tuple[str, ...] = ()
    max_pixels: int | None = image_io.DEFAULT_MAX_PIXELS

    def __post_init__(self):
        for name in self.extra_poolings:
            if name not in POOLINGS:
                raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, found {name!r}.")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, found {self.max_side}.")
        if self.batch_size < 1 or (self.size_multiple is not None and self.size_multiple < 1):
            raise ValueError(f"batch_size and size_multiple must be positive in {self}.")
        if self.scales is not None:
            if not self.scales or any(s <= 0 for s in self.scales):
                raise ValueError(f"scales must be positive, found {self.scales}.")
            object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def resolved(self, model: ModelConfig) -> "ExtractionSettings":
        """These settings with ``max_side`` and ``scales`` taken from the model if None."""
        return dataclasses.replace(
            self,
            max_side=model.max_side if self.max_side is None else self.max_side,
            scales=model.scales if self.scales is None else self.scales,
        )


@dataclasses.dataclass
class ExtractionResult:
    """Descriptors of a list of images, row-aligned with the list.

    Attributes:
      descriptors: (N, D) float32, L2-normalised; zero rows where ``valid`` is False.
      valid: (N,) bool, False for images that could not be read.
      paths: The N image paths, in input order.
      failures: (path, reason) for each unreadable image.
      compiled_shapes: The distinct (batch, height, width) input shapes run on the device.
      by_pooling: Unwhitened descriptors of the model's pooling and of every extra one.
      reused_from: The cache file the descriptors were read from, or None if extracted.
    """

    descriptors: np.ndarray
    valid: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]
    compiled_shapes: list[tuple[int, int, int]]
    by_pooling: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    reused_from: str | None = None


def concatenate_results(results: Sequence[ExtractionResult]) -> ExtractionResult:
    """Results of consecutive lists of images as one result (e.g. resumed chunks)."""
    if not results:
        raise ValueError("concatenate_results needs at least one result.")
    names = results[0].by_pooling.keys()
    return ExtractionResult(
        descriptors=np.concatenate([r.descriptors for r in results]),
        valid=np.concatenate([r.valid for r in results]),
        paths=[p for r in results for p in r.paths],
        failures=[f for r in results for f in r.failures],
        compiled_shapes=sorted({s for r in results for s in r.compiled_shapes}),
        by_pooling={n: np.concatenate([r.by_pooling[n] for r in results]) for n in names},
    )


class Extractor:
    """Global descriptors of image files with one model and its variables.

    Args:
      model: What the model is.
      variables: Its Flax variables (``params``/``batch_stats``, backbone under
        ``"backbone"``), e.g. from :func:`jaxretrieval.model_io.load_model`.
      settings: How to extract; ``max_side``/``scales`` default to the model's.
      num_decode_threads: Threads decoding and resizing images (OpenCV releases the GIL).
      devices: Devices to shard batches over (default: all of this process's; with one
        process, every device).

    Examples:
      ``Extractor.pretrained(ModelConfig(max_side=224))(paths).descriptors``
    """

    def __init__(
        self,
        model: ModelConfig,
        variables: dict[str, Any],
        settings: ExtractionSettings = ExtractionSettings(),
        *,
        num_decode_threads: int = 2,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.model = model
        self.spec = model.spec
        self.settings = settings.resolved(model)
        # Local devices: in a multi-process run each process extracts its own images.
        self.mesh = sharding.data_mesh(jax.local_devices() if devices is None else devices)
        self.batch_size = sharding.round_up_to_devices(self.settings.batch_size, self.mesh)
        self.module = retrieval_model.make_model(model)
        poolings = (model.pooling, *self.settings.extra_poolings)
        regional = bool(set(poolings) & REGIONAL_POOLINGS)
        if self.settings.size_multiple is None:
            multiple = self.module.feature_stride if regional else DEFAULT_SIZE_MULTIPLE
            self.settings = dataclasses.replace(self.settings, size_multiple=multiple)
        if regional and self.settings.size_multiple != self.module.feature_stride:
            raise ValueError(
                f"regional poolings need size_multiple == the feature stride "
                f"({self.module.feature_stride}) so that padded maps have the real size; "
                f"found {self.settings.size_multiple}."
            )
        if "cam" in poolings and "classifier" not in variables.get("params", {}).get(
            "backbone", {}
        ):
            raise ValueError(f"'cam' pooling needs a classifier; {model.backbone} has none.")
        self._kernel = _descriptor_kernel(self.module, tuple(dict.fromkeys(poolings)))
        self._whiten = _whitening_kernel(model.whitening_dim)
        self._num_decode_threads = num_decode_threads
        self._set_variables(variables)

    @classmethod
    def pretrained(
        cls,
        model: ModelConfig = ModelConfig(),
        settings: ExtractionSettings = ExtractionSettings(),
        *,
        weights_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "Extractor":
        """An extractor with the backbone's ImageNet weights (shipped, or ``weights_path``).

        Raises:
          FileNotFoundError: No weights available offline for this backbone.
        """
        variables = retrieval_model.init_model_variables(model, weights_path=weights_path)
        return cls(model, variables, settings, **kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        settings: ExtractionSettings = ExtractionSettings(),
        **kwargs: Any,
    ) -> "Extractor":
        """An extractor for a saved model directory (or a training work directory).

        Raises:
          jaxretrieval.model_io.ModelDirectoryError: Not a usable model directory.
        """
        model, variables = model_io.load_model(path)
        return cls(model, variables, settings, **kwargs)

    def with_variables(self, variables: dict[str, Any]) -> "Extractor":
        """The same extractor (and compiled kernels) with other variables of the model."""
        clone = object.__new__(Extractor)
        clone.__dict__.update(self.__dict__)
        clone._set_variables(variables)
        return clone

    def _set_variables(self, variables: dict[str, Any]) -> None:
        self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
        self.variables_digest = model_io.variables_digest(variables)
        self.gem_p = retrieval_model.gem_exponent(self.model, variables)

    @property
    def cache_key(self) -> str:
        """What the descriptors depend on besides the images: model, weights, settings."""
        document = {
            "format": CACHE_FORMAT,
            "model": self.model.to_json_dict(),
            "variables": self.variables_digest,
            "settings": dataclasses.asdict(self.settings),
            "batch_size": self.batch_size,
        }
        return json.dumps(document, sort_keys=True, default=list)

    def __call__(
        self,
        paths: Sequence[str | os.PathLike],
        boxes: Sequence[Box | None] | None = None,
        *,
        strict: bool = False,
        progress: bool = True,
        chunk_images: int = 256,
        on_chunk: Callable[[ExtractionResult], None] | None = None,
        done: ExtractionResult | None = None,
    ) -> ExtractionResult:
        """Extracts one descriptor per image.

        Args:
          paths: Image files.
          boxes: Optional per-image crop (x1, y1, x2, y2) in pixels, applied before
            resizing (revisitop query boxes); None entries mean the whole image.
          strict: Raise on the first unreadable image instead of skipping it.
          progress: Show a tqdm progress bar.
          chunk_images: Images decoded and bucketed together (bounds host memory).
          on_chunk: Called with the result so far after each chunk (saves progress).
          done: A result for the first ``len(done.paths)`` images (a resumed run); only
            the rest is extracted.

        Returns:
          An :class:`ExtractionResult` aligned with ``paths``.

        Raises:
          jaxretrieval.data.images.ImageDecodeError: With ``strict``, for a bad image.
          NonFiniteDescriptorsError: Descriptors of some images are NaN or infinite (the
            message names them); the chunk holding them is not passed to ``on_chunk``.
          ValueError: If ``boxes`` does not match ``paths`` in length.
        """
        paths = [os.fspath(p) for p in paths]
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
        parts = [] if done is None else [done]
        start = 0 if done is None else len(done.paths)
        bar = tqdm(
            total=len(paths), initial=start, desc="extracting", unit="img", disable=not progress
        )
        with concurrent.futures.ThreadPoolExecutor(self._num_decode_threads) as decoders:
            for chunk_start in range(start, len(paths), chunk_images):
                chunk = slice(chunk_start, min(chunk_start + chunk_images, len(paths)))
                parts.append(
                    self._extract_chunk(
                        paths[chunk], boxes[chunk] if boxes else None, strict, decoders, bar
                    )
                )
                if on_chunk is not None:
                    on_chunk(concatenate_results(parts))
        bar.close()
        if not parts:  # no images at all
            return self._empty_result()
        result = concatenate_results(parts)
        logger.info(
            "extracted %d images (%d unreadable) with %d input shapes: %s",
            len(paths), len(result.failures), len(result.compiled_shapes),
            result.compiled_shapes,
        )  # fmt: skip
        return result

    def _empty_result(self) -> ExtractionResult:
        dims = self._dims()
        return ExtractionResult(
            descriptors=np.zeros(
                (0, self.model.whitening_dim or dims[self.model.pooling]), np.float32
            ),
            valid=np.zeros(0, bool),
            paths=[],
            failures=[],
            compiled_shapes=[],
            by_pooling={n: np.zeros((0, d), np.float32) for n, d in dims.items()},
        )

    @functools.cached_property
    def _pooling_dims(self) -> dict[str, int]:
        # Traced once, not run: the dimensions of whatever feature map the model pools.
        size = 2 * self.module.feature_stride
        shapes = jax.eval_shape(
            self._kernel,
            self.variables,
            jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
            jax.ShapeDtypeStruct((1, 2), np.int32),
            np.float32(self.model.gem_p),
        )
        return {name: shape.shape[-1] for name, shape in shapes.items()}

    def _dims(self) -> dict[str, int]:
        """Output dimension of each pooling (before whitening)."""
        return self._pooling_dims

    def _extract_chunk(self, paths, boxes, strict, decoders, bar=None) -> ExtractionResult:
        """Decodes, buckets and runs one chunk of images; combines scales per image.

        ``bar`` (tqdm) advances as each image's last scale is computed, not once per chunk:
        at 1024 px with exact sizes a chunk of 256 VGG16 images is half an hour of work.
        """
        settings = self.settings
        num_scales = len(settings.scales)
        prepared = decoders.map(
            lambda i: self._prepare(paths[i], boxes[i] if boxes else None, strict),
            range(len(paths)),
        )
        valid = np.zeros(len(paths), bool)
        failures: list[tuple[str, str]] = []
        buckets: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        scales_left = np.zeros(len(paths), int)  # per image, until its descriptor is whole
        for index, item in enumerate(prepared):
            if isinstance(item, str):
                failures.append((paths[index], item))
                logger.debug("skipping unreadable image %s: %s", paths[index], item)
                if bar is not None:
                    bar.update(1)
                continue
            valid[index] = True
            scales_left[index] = len(item)
            for scale_index, image in enumerate(item):
                key = self._bucket(image.shape[:2])
                buckets.setdefault(key, []).append((index, scale_index, image))
        dims = self._dims()
        per_scale = {
            name: np.zeros((num_scales, len(paths), dim), np.float32) for name, dim in dims.items()
        }
        shapes = set()
        for (height, width), items in buckets.items():
            # Buckets run once per chunk: dropping compiled shapes here recompiles none
            # of this chunk's (exact sizes compile a shape per image; see jit_cache).
            jit_cache.drop_compiled_if_full(self._kernel)
            for batch_start in range(0, len(items), self.batch_size):
                batch = items[batch_start : batch_start + self.batch_size]
                outputs = self._run_batch(batch, height, width)
                shapes.add((self.batch_size, height, width))
                for name, descriptors in outputs.items():
                    for slot, (index, scale_index, _) in enumerate(batch):
                        per_scale[name][scale_index, index] = descriptors[slot]
                if bar is not None:
                    finished = [index for index, _, _ in batch]
                    np.subtract.at(scales_left, finished, 1)
                    completed = int(np.sum(scales_left[np.unique(finished)] == 0))
                    if completed:
                        bar.update(completed)
        by_pooling = {}
        for name, stacked in per_scale.items():
            exponent = self.gem_p if name == self.model.pooling else _pooling_exponent(name)
            by_pooling[name] = combine_scales(stacked, exponent) * valid[:, None]
        descriptors = by_pooling[self.model.pooling]
        if self.model.whitening_dim is not None:
            descriptors = np.asarray(self._whiten(self.variables["params"], descriptors))
            descriptors = descriptors * valid[:, None]
        # Before anything is returned, saved (on_chunk) or indexed.
        check_finite_descriptors({"descriptors": descriptors, **by_pooling}, valid, paths)
        return ExtractionResult(
            descriptors=descriptors.astype(np.float32),
            valid=valid,
            paths=list(paths),
            failures=failures,
            compiled_shapes=sorted(shapes),
            by_pooling=by_pooling,
        )

    def _prepare(self, path: str, box: Box | None, strict: bool) -> list[np.ndarray] | str:
        """Decodes, crops and resizes one image per scale; an error string if unreadable."""
        try:
            scaled = image_io.load_scaled(
                path,
                max_side=self.settings.max_side,
                scales=self.settings.scales,
                box=box,
                max_pixels=self.settings.max_pixels,
            )
        except image_io.ImageDecodeError as e:
            if strict:
                raise
            return e.reason
        mean, std = self.spec.input_mean, self.spec.input_std
        return [image_io.normalize_image(image, mean=mean, std=std) for image in scaled]

    def _bucket(self, size: tuple[int, int]) -> tuple[int, int]:
        multiple = self.settings.size_multiple
        return tuple(-(-s // multiple) * multiple for s in size)

    def _run_batch(self, batch, height: int, width: int) -> dict[str, np.ndarray]:
        images = np.zeros((self.batch_size, height, width, 3), np.float32)
        sizes = np.ones((self.batch_size, 2), np.int32)  # blank padding images: 1x1 real pixels
        for slot, (_, _, image) in enumerate(batch):
            images[slot, : image.shape[0], : image.shape[1]] = image
            sizes[slot] = image.shape[:2]
        placement = sharding.batch_sharding(self.mesh)
        out = self._kernel(
            self.variables,
            jax.device_put(images, placement),
            jax.device_put(sizes, placement),
            np.float32(self.model.gem_p),
        )
        return {name: np.asarray(x)[: len(batch)] for name, x in out.items()}


def _pooling_exponent(name: str) -> float:
    """Scale-combination exponent of an extra pooling: 3 for GeM (cirtorch), else 1."""
    return 3.0 if name == "gem" else 1.0


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
def _descriptor_kernel(module: retrieval_model.RetrievalModel, pooling_names: tuple[str, ...]):
    """One jitted ``images -> {pooling: pooled}`` function per model and pooling set.

    Cached so repeated extractors share compiled code (big_vision's get_eval_fn pattern).
    The first name is the model's own pooling (its learnt GeM ``p``); the others are
    computed from the same masked feature map.
    """

    @jax.jit
    def kernel(variables, images, sizes, p):
        out = module.apply(variables, images, sizes)
        pooled = {pooling_names[0]: out["pooled"]}
        classifier = variables["params"]["backbone"].get("classifier")
        for name in pooling_names[1:]:
            pooled[name] = pooling.global_descriptor(
                out["features"], out["valid"], pooling_name=name, p=p, classifier=classifier
            )
        return pooled

    return kernel


@functools.cache
def _whitening_kernel(dim: int | None):
    """Jitted ``(params, pooled) -> whitened`` with the model's whitening layer."""
    if dim is None:
        return None
    layer = layers.WhiteningLayer(features=dim)
    return jax.jit(lambda params, x: layer.apply({"params": params["whitening"]}, x))


# --- descriptors on disk --------------------------------------------------------------


def fingerprint(paths: Sequence[str], boxes: Sequence[Box | None] | None, model_key: str) -> str:
    """Hash of the model key, paths, boxes and each file's size and mtime (cache validity).

    Args:
      paths: Image files.
      boxes: Their crops, or None.
      model_key: What else the descriptors depend on (:attr:`Extractor.cache_key`).
    """
    digest = hashlib.sha256(model_key.encode())
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
    """Writes descriptors with their image list as .npz (no pickled objects), atomically."""
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
    """Reads :func:`save_descriptors` output.

    Returns:
      The result, or None if the file is absent, saved for another key, or unreadable
      (a corrupt or truncated file is reported in the log and will be recomputed).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        # Our own handle: np.load leaks its file when the zip directory is corrupt.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            if key is not None and str(data["key"]) != key:
                return None
            failures = [tuple(f.split("\t", 1)) for f in data["failures"].tolist()]
            by_pooling = {
                name.removeprefix("pooling__"): data[name]
                for name in data.files
                if name.startswith("pooling__")
            }
            result = ExtractionResult(
                descriptors=data["descriptors"],
                valid=data["valid"],
                paths=data["paths"].tolist(),
                failures=failures,
                compiled_shapes=[],
                by_pooling=by_pooling,
                reused_from=str(path),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning(
            "descriptor cache %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e
        )
        return None
    if len(result.paths) != len(result.descriptors) or len(result.valid) != len(result.paths):
        logger.warning("descriptor cache %s is inconsistent; recomputing", path)
        return None
    return result


def _partial_file(cache_file: pathlib.Path) -> pathlib.Path:
    return cache_file.with_name(cache_file.name + ".partial.npz")


def check_writable(directory: str | os.PathLike) -> None:
    """Raises ``PermissionError`` naming ``directory`` if files cannot be written there.

    Called before long work whose result is saved there, so the failure comes first.
    """
    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to {directory} ({e.strerror or e})") from e


def extract_cached(
    extractor: Extractor,
    paths: Sequence[str | os.PathLike],
    boxes: Sequence[Box | None] | None = None,
    *,
    cache_file: str | os.PathLike | None = None,
    chunk_images: int = 128,
    **kwargs: Any,
) -> ExtractionResult:
    """Runs ``extractor`` unless ``cache_file`` holds descriptors for the same inputs.

    The cache is keyed by :func:`fingerprint` of the extractor's model, variables and
    settings and of the files, so changed weights, settings, files or boxes trigger a
    fresh extraction. Progress is saved every ``chunk_images`` images to
    ``<cache_file>.partial.npz``; an interrupted run resumes from it.

    Raises:
      PermissionError: ``cache_file``'s folder is not writable (checked first).
    """
    paths = [os.fspath(p) for p in paths]
    if cache_file is None:
        return extractor(paths, boxes, chunk_images=chunk_images, **kwargs)
    cache_file = pathlib.Path(cache_file)
    check_writable(cache_file.parent)
    key = fingerprint(paths, boxes, extractor.cache_key)
    cached = load_descriptors(cache_file, key)
    if cached is not None:
        logger.info("reusing descriptors from %s", cache_file)
        return cached
    partial_file = _partial_file(cache_file)
    done = load_descriptors(partial_file, key)
    if done is not None:
        if done.paths != paths[: len(done.paths)]:
            done = None
        else:
            logger.info("resuming after %d images from %s", len(done.paths), partial_file)
    result = extractor(
        paths,
        boxes,
        chunk_images=chunk_images,
        done=done,
        on_chunk=lambda so_far: save_descriptors(partial_file, so_far, key),
        **kwargs,
    )
    save_descriptors(cache_file, result, key)
    partial_file.unlink(missing_ok=True)
    return result


# --- several processes ------------------------------------------------------------------

_MAX_REASON_BYTES = 512


def process_part_file(cache_file: str | os.PathLike) -> pathlib.Path:
    """This process's part of ``cache_file``: ``name.part00001-of-00004.npz``.

    With one process, ``cache_file`` itself.
    """
    cache_file = pathlib.Path(cache_file)
    if jax.process_count() == 1:
        return cache_file
    part = f"part{jax.process_index():05d}-of-{jax.process_count():05d}"
    return cache_file.with_name(f"{cache_file.stem}.{part}{cache_file.suffix or '.npz'}")


def extract_across_processes(
    extractor: Extractor,
    paths: Sequence[str | os.PathLike],
    boxes: Sequence[Box | None] | None = None,
    *,
    cache_file: str | os.PathLike | None = None,
    gather: bool = True,
    **kwargs: Any,
) -> ExtractionResult:
    """Extracts ``paths`` with every process of a multi-process run, each its own slice.

    Process p describes :func:`jaxretrieval.sharding.process_slice` of the list on its
    own devices; with ``cache_file`` it goes through :func:`extract_cached`, so each
    process saves and resumes its part in :func:`process_part_file`. With ``gather``, the
    descriptors, masks and failures are then gathered so that every process returns the
    result for the whole list, the same as one process would; all processes must call
    this together. Without ``gather`` each returns its own part (the part files are
    what :func:`jaxretrieval.search.build_sharded_index` reads, in process order).

    With one process this is ``extractor(paths, boxes, **kwargs)``, or
    :func:`extract_cached` with ``cache_file`` (the file itself).

    Args:
      extractor: The extractor (same model and variables in every process).
      paths: The whole image list, identical in every process.
      boxes: Optional crops, as for :meth:`Extractor.__call__`.
      cache_file: Optional descriptor file; each process uses its own part file.
      gather: Return the whole list's result (True) or this process's part.
      **kwargs: More :meth:`Extractor.__call__` arguments (``strict``, ``progress``...).

    Returns:
      An :class:`ExtractionResult` for ``paths`` (or for this process's slice).
    """
    paths = [os.fspath(p) for p in paths]
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
    part = sharding.process_slice(len(paths))
    part_boxes = boxes[part] if boxes is not None else None
    if cache_file is None:
        local = extractor(paths[part], part_boxes, **kwargs)
    else:
        local = extract_cached(
            extractor, paths[part], part_boxes, cache_file=process_part_file(cache_file), **kwargs
        )
    if not gather or jax.process_count() == 1:
        return local
    reasons = dict(local.failures)
    encoded = np.zeros((len(local.paths), _MAX_REASON_BYTES), np.uint8)
    for row, path in enumerate(local.paths):
        if path in reasons:
            text = reasons[path].encode()[:_MAX_REASON_BYTES]
            encoded[row, : len(text)] = np.frombuffer(text, np.uint8)
    valid = sharding.gather_rows(local.valid, len(paths))
    encoded = sharding.gather_rows(encoded, len(paths))
    failures = [
        (paths[i], bytes(encoded[i]).rstrip(b"\0").decode(errors="replace"))
        for i in np.flatnonzero(~valid)
    ]
    return ExtractionResult(
        descriptors=sharding.gather_rows(local.descriptors, len(paths)),
        valid=valid,
        paths=paths,
        failures=failures,
        compiled_shapes=local.compiled_shapes,
        by_pooling={
            name: sharding.gather_rows(x, len(paths)) for name, x in local.by_pooling.items()
        },
    )
