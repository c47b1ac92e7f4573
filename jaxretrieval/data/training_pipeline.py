"""Training input pipelines on grain: tuples of augmented images, no TensorFlow.

:func:`tuple_dataset` turns the tuples of :func:`~jaxretrieval.data.tuple_mining.mine_tuples`
into a ``grain.MapDataset`` of NumPy dicts; :func:`single_image_dataset` does the same for
single labelled images (classification training, e.g. DELF's attention). :func:`batches`
slices, batches and prefetches either of them with threads.

Every image is read through :func:`jaxretrieval.data.images.load_scaled` (already shrunk
to ``ceil(image_size / crop_fraction)``, the largest size a crop can still use), then
augmented in this order:

1. (synthetic positives only) a random homography: each corner moves by up to
   ``homography_jitter`` times the image side in x and y (``cv2.warpPerspective``,
   reflected border so that no black wedge gives the warp away);
2. a random crop keeping a fraction ``U[crop_fraction, 1]`` of each side, at a random
   position;
3. a resize of the longer side to ``round(U[min_scale, 1] * image_size)``;
4. an optional horizontal flip (probability 1/2);
5. brightness and contrast jitter: ``x -> c * b * x + (1 - c) * b * mean(x)`` with
   ``b, c ~ U[1 - color_jitter, 1 + color_jitter]``, rounded back to ``uint8``;
6. :func:`~jaxretrieval.data.images.normalize_image`, then placement at the top-left of
   an ``image_size x image_size`` canvas of zeros. Padding is 0 *after* normalisation
   (the mean colour), and the real ``(height, width)`` is returned with the image so
   that pooling can mask the padding.

Images are NHWC ``float32``; sizes are ``int32`` ``(height, width)``.

Determinism: image ``j`` of element ``i`` draws from
``np.random.default_rng([seed, epoch, i, j])`` and nothing else, so an element is the
same whichever thread reads it and in whatever order, and ``dataset[start:]`` is exactly
the tail of ``dataset``: a killed run resumes by slicing at the number of elements
already consumed (:func:`batches` does it from a batch count).

grain 0.2 notes (measured with 0.2.18): ``MapDataset.batch`` stacks ``batch_size``
consecutive elements with ``np.stack`` per dict key, reading them one after another in
the calling thread; ``to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))``
then computes whole *batches* on a thread pool, ``prefetch_buffer_size`` batches ahead, in
order. So parallelism is across batches, not within one, and the buffer should hold at
least ``num_threads`` batches. Decoding (OpenCV) and NumPy release the GIL, so threads
do scale; no process pool is used. An exception raised while loading an element (e.g.
:class:`~jaxretrieval.data.images.ImageDecodeError`) is re-raised by ``next()``.
"""

import concurrent.futures
import dataclasses
import math
from collections.abc import Sequence

import cv2
import grain
import numpy as np
from jaxtyping import Float32, Int32, UInt8

from jaxretrieval.data import images
from jaxretrieval.data.labelled import LabelledImages
from jaxretrieval.data.tuple_mining import Tuples


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random augmentation of training images (see the module docstring for the order).

    Attributes:
      image_size: Side S of the square canvas every image is placed in (top-left, zero
        padding); the longer side of an image is at most S.
      min_scale: The longer side is resized to ``U[min_scale, 1] * image_size``.
      crop_fraction: A random crop keeps at least this fraction of each side (1: no
        crop).
      flip: Random horizontal flip. Off by default: covers, paintings and buildings
        carry text and asymmetric details that a mirror image does not have.
      color_jitter: Amplitude of the brightness and contrast factors ``U[1 - a, 1 + a]``.
      homography_jitter: Corner displacement, as a fraction of the side, of the warp
        that makes a synthetic positive from its query.

    Raises:
      ValueError: On a value outside its range.
    """

    image_size: int = 224
    min_scale: float = 0.7
    crop_fraction: float = 0.8
    flip: bool = False
    color_jitter: float = 0.1
    homography_jitter: float = 0.15

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an integer, found {self.image_size!r}.")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, found {self.image_size}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], found {self.min_scale}.")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], found {self.crop_fraction}.")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), found {self.color_jitter}.")
        if not 0.0 <= self.homography_jitter < 0.5:
            raise ValueError(
                f"homography_jitter must be in [0, 0.5), found {self.homography_jitter}."
            )

    @classmethod
    def none(cls, image_size: int) -> "Augmentation":
        """No randomness: the longer side resized to ``image_size`` (evaluation, tests).

        The result equals ``load_scaled(path, max_side=image_size)`` placed in the canvas.
        A synthetic positive is then the query itself.
        """
        return cls(
            image_size=image_size,
            min_scale=1.0,
            crop_fraction=1.0,
            flip=False,
            color_jitter=0.0,
            homography_jitter=0.0,
        )

    @property
    def load_side(self) -> int:
        """Longer side images are loaded at: the largest a crop of them can still use."""
        return math.ceil(self.image_size / self.crop_fraction)


def _check_seed(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, found {value!r}.")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    # normalize_image checks them too, but only once an element is read (in a thread).
    if np.shape(mean) != (3,) or np.shape(std) != (3,):
        raise ValueError(
            f"mean and std need 3 entries, got shapes {np.shape(mean)} and {np.shape(std)}."
        )
    if np.any(np.asarray(std, np.float64) == 0):
        raise ValueError(f"std must be non-zero, got {tuple(std)}.")


def _homography_warp(
    image: UInt8[np.ndarray, "H W 3"], jitter: float, rng: np.random.Generator
) -> UInt8[np.ndarray, "H W 3"]:
    """The image under a homography moving each corner by up to ``jitter`` of the side."""
    height, width = image.shape[:2]
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)  # (4, 2)
    shifts = rng.uniform(-jitter, jitter, size=(4, 2)) * np.array([width, height])  # (4, 2)
    homography = cv2.getPerspectiveTransform(corners, (corners + shifts).astype(np.float32))
    return cv2.warpPerspective(
        image,
        homography,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def _augment(
    image: UInt8[np.ndarray, "H W 3"],
    augmentation: Augmentation,
    rng: np.random.Generator,
    *,
    warp: bool,
) -> UInt8[np.ndarray, "h w 3"]:
    """Steps 1-5 of the module docstring on a loaded image."""
    if warp and augmentation.homography_jitter > 0:
        image = _homography_warp(image, augmentation.homography_jitter, rng)
    if augmentation.crop_fraction < 1.0:
        height, width = image.shape[:2]
        fractions = rng.uniform(augmentation.crop_fraction, 1.0, size=2)
        crop_height = max(1, round(fractions[0] * height))
        crop_width = max(1, round(fractions[1] * width))
        top = int(rng.integers(0, height - crop_height + 1))
        left = int(rng.integers(0, width - crop_width + 1))
        image = images.crop_to_box(image, (left, top, left + crop_width, top + crop_height))
    scale = rng.uniform(augmentation.min_scale, 1.0) if augmentation.min_scale < 1.0 else 1.0
    image = images.resize_max_side(image, max(1, round(scale * augmentation.image_size)))
    if augmentation.flip and rng.random() < 0.5:
        image = image[:, ::-1]
    if augmentation.color_jitter > 0:
        brightness, contrast = rng.uniform(
            1.0 - augmentation.color_jitter, 1.0 + augmentation.color_jitter, size=2
        )
        x = image.astype(np.float32)
        x = (contrast * brightness) * x + (1.0 - contrast) * brightness * x.mean()
        image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _on_canvas(
    image: UInt8[np.ndarray, "h w 3"],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Float32[np.ndarray, "S S 3"], Int32[np.ndarray, "2"]]:
    canvas = np.zeros((image_size, image_size, 3), np.float32)
    height, width = image.shape[:2]
    canvas[:height, :width] = images.normalize_image(image, mean=mean, std=std)
    return canvas, np.array([height, width], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class _ImageLoader:
    """Loads and augments images; picklable, so grain may run it in any worker."""

    paths: tuple[str, ...]
    augmentation: Augmentation
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    epoch: int

    def load(self, index: int) -> UInt8[np.ndarray, "H W 3"]:
        side = self.augmentation.load_side
        return images.load_scaled(self.paths[index], max_side=side, upscale=False)[0]

    def place(
        self, image: UInt8[np.ndarray, "H W 3"], element: int, slot: int, *, warp: bool = False
    ) -> tuple[Float32[np.ndarray, "S S 3"], Int32[np.ndarray, "2"]]:
        rng = np.random.default_rng([self.seed, self.epoch, element, slot])
        augmented = _augment(image, self.augmentation, rng, warp=warp)
        return _on_canvas(augmented, self.augmentation.image_size, self.mean, self.std)


@dataclasses.dataclass(frozen=True, eq=False)
class _TupleElement:
    loader: _ImageLoader
    indices: np.ndarray  # (num_tuples, T)
    scenes: np.ndarray  # (N,)
    synthetic_positives: bool

    def __call__(self, element: int) -> dict[str, np.ndarray]:
        row = self.indices[element].tolist()
        decoded: dict[int, np.ndarray] = {}
        placed = []
        for slot, index in enumerate(row):
            if index not in decoded:
                decoded[index] = self.loader.load(index)
            warp = slot == 1 and self.synthetic_positives
            placed.append(self.loader.place(decoded[index], element, slot, warp=warp))
        return {
            "images": np.stack([image for image, _ in placed]),  # (T, S, S, 3)
            "image_sizes": np.stack([size for _, size in placed]),  # (T, 2)
            "scenes": self.scenes[self.indices[element]].astype(np.int32),  # (T,)
        }


@dataclasses.dataclass(frozen=True, eq=False)
class _SingleElement:
    loader: _ImageLoader
    indices: np.ndarray  # (num_elements,)
    scenes: np.ndarray  # (N,)

    def __call__(self, element: int) -> dict[str, np.ndarray]:
        index = int(self.indices[element])
        image, size = self.loader.place(self.loader.load(index), element, 0)
        return {"image": image, "image_size": size, "label": self.scenes[index].astype(np.int32)}


def _loader(
    labelled: LabelledImages,
    augmentation: Augmentation,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    epoch: int,
) -> _ImageLoader:
    _check_seed("seed", seed)
    _check_seed("epoch", epoch)
    _check_mean_std(mean, std)
    return _ImageLoader(
        paths=labelled.paths,
        augmentation=augmentation,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        seed=int(seed),
        epoch=int(epoch),
    )


def _index_table(name: str, values, num_images: int, ndim: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != ndim or array.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be a {ndim}-D integer array, found shape {array.shape} and dtype "
            f"{array.dtype}."
        )
    if array.size and (array.min() < 0 or array.max() >= num_images):
        bad = array[(array < 0) | (array >= num_images)][0]
        raise ValueError(f"{name} holds index {bad}, outside [0, {num_images}) (the images).")
    array = array.astype(np.int64)
    array.flags.writeable = False
    return array


def tuple_dataset(
    labelled: LabelledImages,
    tuples: Tuples,
    *,
    augmentation: Augmentation,
    mean: Sequence[float] = images.IMAGENET_MEAN,
    std: Sequence[float] = images.IMAGENET_STD,
    seed: int,
    epoch: int,
) -> grain.MapDataset:
    """The tuples as a random-access dataset of augmented images, one element per tuple.

    Element ``i`` is a dict of NumPy arrays:

    * ``"images"``: ``(T, S, S, 3)`` ``float32``, normalised, zero outside each image;
    * ``"image_sizes"``: ``(T, 2)`` ``int32``, the real ``(height, width)`` of each image
      in its canvas;
    * ``"scenes"``: ``(T,)`` ``int32`` scene ids (query, positive, negatives).

    With synthetic positives, slot 1 (the positive, the query's own file) is loaded once
    with the query and warped by a random homography before its own crop, resize and
    colour jitter (see the module docstring).

    Args:
      labelled: The images the tuples index.
      tuples: The tuples of one epoch.
      augmentation: Augmentation settings; :meth:`Augmentation.none` for none.
      mean: Per-channel mean of the normalisation, RGB, in [0, 1] units.
      std: Per-channel standard deviation of the normalisation.
      seed: Seed of the run (non-negative).
      epoch: Epoch number (non-negative); the augmentation changes with it.

    Returns:
      A ``grain.MapDataset`` of ``len(tuples.indices)`` elements, each computed on access
      from ``(seed, epoch, i)`` only. Slice it to resume (``dataset[start:]``) and batch
      it with :func:`batches`.

    Raises:
      ValueError: On tuple indices that are not a 2-D integer array of image indices,
        a negative seed or epoch, or a mean/std without 3 entries.

    Reading an element raises
    :class:`~jaxretrieval.data.images.ImageDecodeError`, naming the file, if an image
    cannot be decoded: training data should be clean, check it first with
    :func:`check_images`.
    """
    loader = _loader(labelled, augmentation, mean, std, seed, epoch)
    indices = _index_table("tuples.indices", tuples.indices, len(labelled), ndim=2)
    element = _TupleElement(
        loader=loader,
        indices=indices,
        scenes=labelled.scenes,
        synthetic_positives=labelled.synthetic_positives,
    )
    return grain.MapDataset.range(indices.shape[0]).map(element)


def single_image_dataset(
    labelled: LabelledImages,
    indices: Sequence[int] | np.ndarray,
    *,
    augmentation: Augmentation,
    mean: Sequence[float] = images.IMAGENET_MEAN,
    std: Sequence[float] = images.IMAGENET_STD,
    seed: int,
    epoch: int,
) -> grain.MapDataset:
    """Single augmented images with their scene label (classification training).

    Element ``i`` shows image ``indices[i]`` (pass a permutation to shuffle) as a dict:
    ``"image"`` ``(S, S, 3)`` ``float32``, ``"image_size"`` ``(2,)`` ``int32`` (height,
    width), ``"label"`` ``()`` ``int32`` scene id. With :meth:`Augmentation.none` it is
    also the loader for describing images (e.g. the mining pool). Randomness and
    resuming work as in :func:`tuple_dataset`.

    Raises:
      ValueError: As :func:`tuple_dataset`, for a 1-D ``indices``.
    """
    loader = _loader(labelled, augmentation, mean, std, seed, epoch)
    table = _index_table("indices", indices, len(labelled), ndim=1)
    element = _SingleElement(loader=loader, indices=table, scenes=labelled.scenes)
    return grain.MapDataset.range(table.shape[0]).map(element)


def batches(
    dataset: grain.MapDataset,
    *,
    batch_size: int,
    start_batch: int = 0,
    num_threads: int = 2,
    prefetch_batches: int | None = None,
) -> grain.IterDataset:
    """Full batches of a dataset from batch ``start_batch`` on, loaded by a thread pool.

    Equivalent to ``dataset[start_batch * batch_size:].batch(batch_size,
    drop_remainder=True).to_iter_dataset(grain.ReadOptions(...))``: every array gains a
    leading batch axis B (``images`` ``(B, T, S, S, 3)``...), a final partial batch is
    dropped, and batch ``b`` of the result is batch ``start_batch + b`` of a run that
    started at 0, so a killed run resumes exactly.

    Args:
      dataset: A dataset of dicts of arrays, e.g. from :func:`tuple_dataset`.
      batch_size: Elements per batch.
      start_batch: Batches already consumed (from the checkpoint).
      num_threads: Threads computing batches (each thread a whole batch); 0 loads in the
        calling thread.
      prefetch_batches: Batches computed ahead; default ``max(2, num_threads)``.

    Returns:
      A ``grain.IterDataset``; iterate it (``iter(...)`` / ``for``), and ``close()`` the
      iterator when stopping early to shut its threads down.

    Raises:
      ValueError: ``batch_size < 1``, ``num_threads < 0``, ``prefetch_batches < 1`` or
        ``start_batch`` outside ``[0, len(dataset) // batch_size]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, found {num_threads}.")
    if prefetch_batches is None:
        prefetch_batches = max(2, num_threads)
    if prefetch_batches < 1:
        raise ValueError(f"prefetch_batches must be >= 1, found {prefetch_batches}.")
    num_batches = len(dataset) // batch_size
    if not 0 <= start_batch <= num_batches:
        raise ValueError(
            f"start_batch must be in [0, {num_batches}] ({len(dataset)} elements in batches "
            f"of {batch_size}), found {start_batch}."
        )
    batched = dataset[start_batch * batch_size :].batch(batch_size, drop_remainder=True)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return batched.to_iter_dataset(read_options)


def check_images(labelled: LabelledImages, *, num_threads: int = 1) -> list[tuple[str, str]]:
    """Finds the images that would fail to load, cheaply, before a run starts.

    Uses :func:`jaxretrieval.data.images.image_size`: JPEG and PNG files are read and their
    headers parsed (missing, empty, truncated, not an image, too many pixels), without
    decoding; other formats are decoded.

    Args:
      labelled: The images to check.
      num_threads: Files checked in parallel (reading is I/O bound).

    Returns:
      ``(path, reason)`` for each bad image, in the order of ``labelled.paths``; empty if
      all are fine.
    """

    def problem(path: str) -> tuple[str, str] | None:
        try:
            height, width = images.image_size(path)
        except images.ImageDecodeError as e:
            return (e.path, e.reason)
        if height * width > images.DEFAULT_MAX_PIXELS:  # what load_image refuses
            return (path, f"{width} x {height} pixels is more than load_image's limit")
        return None

    if num_threads > 1:
        with concurrent.futures.ThreadPoolExecutor(num_threads) as executor:
            found = list(executor.map(problem, labelled.paths))
    else:
        found = [problem(path) for path in labelled.paths]
    return [item for item in found if item is not None]


__all__ = [
    "Augmentation",
    "batches",
    "check_images",
    "single_image_dataset",
    "tuple_dataset",
]
