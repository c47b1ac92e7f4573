"""Labelled image sets as tensorflow-datasets array_record files, with no TensorFlow.

The ``tfds`` extra (``pip install -e ".[tfds]"``: tensorflow-datasets and array-record,
no TensorFlow) turns any labelled set into a TFDS dataset on disk:

* :func:`labelled_source` reads the set: a revisitop-layout folder (``gnd_<name>.pkl``,
  scenes from :func:`jaxretrieval.data.labelled.from_revisitop`) or a labelled CSV
  (:func:`jaxretrieval.data.labelled.from_csv`, e.g. Google Landmarks v2's
  ``index_image_to_landmark.csv`` or ``smvs_train/labels.csv``);
* :func:`build_tfds_dataset` writes it as array_record shards with TFDS's own metadata
  (``dataset_info.json``, ``features.json``, the label names), one split ``"train"``;
* ``tfds.data_source(name, data_dir=...)`` (or :func:`load_data_source`) reads it back
  with random access, and :func:`grain_dataset` feeds it to grain as normalised images on
  a fixed canvas, the element format of
  :func:`jaxretrieval.data.training_pipeline.single_image_dataset`.

What works without TensorFlow (tensorflow-datasets 4.9.10, checked with
``"tensorflow" not in sys.modules`` in the tests): ``GeneratorBasedBuilder`` with
``file_format="array_record"`` serialises examples with its own protobuf code, and
``tfds.features.Image`` stores bytes it is given as they are (encoding an array would
need TensorFlow, so images are encoded here with OpenCV). Reading decodes images with
OpenCV in NumPy (``decode_example_np``). ``tf.data`` (``as_dataset``) is the one part
that needs TensorFlow; it is not used.

Every image is decoded once at build time with :func:`jaxretrieval.data.images.load_image`
(EXIF orientation applied, grayscale/CMYK/alpha/16-bit made 8-bit RGB), optionally
shrunk to ``max_side``, and re-encoded (JPEG quality 95 by default, or lossless PNG), so
the stored image is exactly what our loaders would see and any TFDS reader gets the same
pixels. Unreadable images are skipped and listed in the report, not fatal. Each example
holds ``image`` (uint8 ``(H, W, 3)``), ``label`` (the scene, a ``ClassLabel`` whose names
are the scene names) and ``name`` (the file, relative to the set's folder). Records keep
the order of the labelled set, less the skipped images; shuffle in grain.
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import re
import shutil
import tempfile
import types
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from jaxretrieval.data import images, labelled

SPLIT = "train"
ENCODINGS = ("jpeg", "png")
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # the optional extra
        raise ImportError(
            "jaxretrieval.data.tfds_builder needs the 'tfds' extra: "
            'pip install -e ".[tfds]" (tensorflow-datasets and array-record, no TensorFlow)'
        ) from e
    return tfds


def labelled_source(
    source: str | os.PathLike,
    *,
    image_column: str = "image",
    scene_column: str = "scene",
    image_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> labelled.LabelledImages:
    """A revisitop-layout folder or a labelled CSV as labelled images.

    Args:
      source: A folder holding ``gnd_<name>.pkl`` (each query with its easy and hard
        positives is a scene; junk and distractors are left out), or a CSV file with one
        row per image.
      image_column: The CSV's image column (``"id"`` for Google Landmarks v2).
      scene_column: The CSV's scene column (``"landmark_id"`` for Google Landmarks v2).
      image_dir: Folder of the CSV's images (default: next to the CSV, see ``from_csv``).
      name: Which ground truth of a folder holding several.

    Raises:
      FileNotFoundError: ``source`` does not exist, or images are missing (named).
      ValueError: ``source`` is neither a CSV nor a folder with a ground truth, or the
        CSV/ground truth is invalid.
    """
    path = pathlib.Path(source)
    if path.is_file() and path.suffix.lower() == ".csv":
        return labelled.from_csv(
            path, image_dir=image_dir, image_column=image_column, scene_column=scene_column
        )
    if path.is_dir():
        if not any(path.glob("gnd_*.pkl")):
            raise ValueError(
                f"{str(path)!r} holds no gnd_<name>.pkl; give a revisitop-layout folder or a "
                "labelled CSV file."
            )
        return labelled.from_revisitop(path, name=name)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    raise ValueError(f"{str(path)!r} is neither a .csv file nor a folder.")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What :func:`build_tfds_dataset` wrote.

    Attributes:
      dataset_dir: ``data_dir/name/version``, holding the shards and metadata.
      num_examples: Examples written (readable images).
      skipped: ``(path, reason)`` of each image that could not be read.
      reused: True if the dataset already existed and was kept as it was.
    """

    dataset_dir: pathlib.Path
    num_examples: int
    skipped: list[tuple[str, str]]
    reused: bool = False


def _encode(
    path: str, max_side: int | None, encoding: str, quality: int, max_pixels: int | None
) -> bytes | str:
    """The image re-encoded, or the reason it cannot be read."""
    try:
        image = images.load_image(path, max_pixels=max_pixels)
    except images.ImageDecodeError as e:
        return e.reason
    image = images.resize_max_side(image, max_side, upscale=False)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if encoding == "png":
        ok, data = cv2.imencode(".png", bgr)
    else:
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return f"OpenCV could not encode it as {encoding}"
    return data.tobytes()


def _relative_name(path: str, base: pathlib.Path | None) -> str:
    if base is not None:
        try:
            return pathlib.Path(path).resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return pathlib.Path(path).name


def _check_scene_names(names: Sequence[str]) -> None:
    for name in names:
        if not name or "\n" in name or "\r" in name:
            raise ValueError(f"scene name {name!r} cannot be a TFDS label (empty or multi-line).")


def build_tfds_dataset(
    images_set: labelled.LabelledImages,
    *,
    name: str,
    data_dir: str | os.PathLike,
    version: str = "1.0.0",
    max_side: int | None = None,
    encoding: str = "jpeg",
    jpeg_quality: int = 95,
    max_pixels: int | None = images.DEFAULT_MAX_PIXELS,
    relative_to: str | os.PathLike | None = None,
    description: str = "",
    overwrite: bool = False,
    num_threads: int = 2,
) -> BuildReport:
    """Writes labelled images as a TFDS array_record dataset, without TensorFlow.

    Args:
      images_set: The images and their scenes (see :func:`labelled_source`).
      name: Dataset name (lower-case snake case, e.g. ``"landmarks_mini"``).
      data_dir: TFDS data folder; the dataset goes to ``data_dir/name/version``.
      version: TFDS version string ``"x.y.z"``.
      max_side: Shrink images whose longer side exceeds it (never enlarges); None keeps
        the decoded size.
      encoding: ``"jpeg"`` (quality ``jpeg_quality``) or ``"png"`` (lossless).
      jpeg_quality: 0-100.
      max_pixels: Skip images with more pixels (decompression bombs); None: no limit.
      relative_to: Folder that the stored ``name`` of each image is relative to
        (default: the common folder of the images).
      description: Stored in ``dataset_info.json``.
      overwrite: Rebuild if the dataset exists (otherwise it is reused as it is).
      num_threads: Threads decoding and encoding images.

    Returns:
      A :class:`BuildReport`; unreadable images are skipped and listed there.

    Raises:
      ValueError: A bad name, version, encoding or quality, a scene name that cannot be
        a label, or no readable image at all.
      ImportError: The ``tfds`` extra is not installed.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name must be lower-case snake case (e.g. 'gldv2_index'), found {name!r}."
        )
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise ValueError(f"version must look like '1.0.0', found {version!r}.")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, found {encoding!r}.")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [0, 100], found {jpeg_quality}.")
    _check_scene_names(images_set.scene_names)
    tfds = _tfds()
    data_dir = pathlib.Path(data_dir)
    dataset_dir = data_dir / name / version
    if dataset_dir.is_dir() and (dataset_dir / "dataset_info.json").is_file():
        if not overwrite:
            info = tfds.builder_from_directory(str(dataset_dir)).info
            return BuildReport(dataset_dir, info.splits[SPLIT].num_examples, [], reused=True)
        shutil.rmtree(dataset_dir)
    paths = list(images_set.paths)
    base = (
        pathlib.Path(relative_to)
        if relative_to is not None
        else pathlib.Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
        if paths
        else None
    )
    if base is not None and base.is_file():
        base = base.parent
    skipped: list[tuple[str, str]] = []

    def examples() -> Iterator[tuple[int, dict[str, Any]]]:
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            encoded = pool.map(
                lambda p: _encode(p, max_side, encoding, jpeg_quality, max_pixels), paths
            )
            for index, (path, data) in enumerate(zip(paths, encoded, strict=True)):
                if isinstance(data, str):
                    skipped.append((path, data))
                    continue
                yield (
                    index,
                    {
                        "image": data,
                        "label": int(images_set.scenes[index]),
                        "name": _relative_name(path, base),
                    },
                )

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding),
            "label": tfds.features.ClassLabel(names=list(images_set.scene_names)),
            "name": tfds.features.Text(),
        }
    )

    def body(namespace: dict[str, Any]) -> None:
        namespace.update(
            name=name,
            VERSION=tfds.core.Version(version),
            RELEASE_NOTES={version: "Built by jaxretrieval.data.tfds_builder."},
            _info=lambda self: tfds.core.DatasetInfo(
                builder=self,
                description=description or f"{name}: labelled images (jaxretrieval).",
                features=features,
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # records keep the set's order (shuffle in grain)
            ),
            _split_generators=lambda self, dl_manager: {SPLIT: examples()},
            _generate_examples=lambda self: examples(),
        )

    # skip_registration: a builder made at run time must not enter TFDS's global
    # registry (a second build of the same name would clash); reading goes through the
    # metadata files, not the class.
    builder_class = types.new_class(
        "JaxretrievalLabelledImages",
        (tfds.core.GeneratorBasedBuilder,),
        {"skip_registration": True},
        body,
    )
    builder = builder_class(data_dir=str(data_dir), file_format="array_record")
    try:
        with tempfile.TemporaryDirectory() as unused:  # nothing is downloaded
            builder.download_and_prepare(download_dir=unused)
    except AssertionError:  # TFDS's "No examples were yielded."
        if len(skipped) != len(paths):
            raise
        for incomplete in (data_dir / name).glob(f"incomplete.*{version}"):
            shutil.rmtree(incomplete, ignore_errors=True)
        listed = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise ValueError(f"none of the {len(paths)} images could be read ({listed}).") from None
    return BuildReport(dataset_dir, builder.info.splits[SPLIT].num_examples, skipped)


def load_data_source(name: str, data_dir: str | os.PathLike, *, split: str = SPLIT):
    """``tfds.data_source`` of a built dataset: random access, decoded with NumPy.

    Element ``i`` is ``{"image": uint8 (H, W, 3), "label": int, "name": bytes}``.
    """
    return _tfds().data_source(name, data_dir=os.fspath(data_dir), split=split)


@dataclasses.dataclass(frozen=True)
class _CanvasElement:
    """A record as a normalised image on an ``image_size`` canvas (picklable for grain)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        image = images.resize_max_side(np.asarray(record["image"]), self.image_size)
        height, width = image.shape[:2]
        canvas = np.zeros((self.image_size, self.image_size, 3), np.float32)
        canvas[:height, :width] = images.normalize_image(image, mean=self.mean, std=self.std)
        return {
            "image": canvas,  # (S, S, 3)
            "image_size": np.array([height, width], np.int32),
            "label": np.int32(record["label"]),
        }


def grain_dataset(
    data_source: Sequence[dict[str, Any]],
    *,
    image_size: int,
    mean: Sequence[float] = images.IMAGENET_MEAN,
    std: Sequence[float] = images.IMAGENET_STD,
):
    """A grain ``MapDataset`` over a data source, as classification training reads it.

    Element ``i`` is record ``i`` resized so its longer side is ``image_size``, normalised
    and placed top-left on a zero ``(image_size, image_size, 3)`` canvas: ``"image"``
    ``float32``, ``"image_size"`` ``(2,)`` ``int32`` (real height, width), ``"label"``
    ``int32``; the format of
    :func:`jaxretrieval.data.training_pipeline.single_image_dataset`, so
    :func:`jaxretrieval.data.training_pipeline.batches` batches it.

    Args:
      data_source: E.g. :func:`load_data_source`'s result.
      image_size: Canvas side S in pixels.
      mean: Per-channel mean of the normalisation, RGB, in [0, 1] units.
      std: Per-channel standard deviation.
    """
    import grain

    if image_size < 1:
        raise ValueError(f"image_size must be positive, found {image_size}.")
    element = _CanvasElement(int(image_size), tuple(map(float, mean)), tuple(map(float, std)))
    return grain.MapDataset.source(data_source).map(element)
