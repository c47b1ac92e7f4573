"""Labelled image sets for training: image files with a scene id each.

A :class:`LabelledImages` is the training counterpart of
:class:`~jaxretrieval.data.datasets.RetrievalDataset`: a flat list of image files and,
for each, the scene (landmark, object, building) it shows. Tuple mining
(:mod:`jaxretrieval.data.tuple_mining`) draws queries, positives and negatives from it,
and the training pipeline (:mod:`jaxretrieval.data.training_pipeline`) loads them.

Four sources give one:

* :func:`from_csv`: a Google-Landmarks-style CSV (one row per image, an image column
  and a scene column), e.g. ``smvs_train/labels.csv``;
* :func:`from_scene_folders`: ``root/<scene>/<images>``;
* :func:`from_revisitop`: the scenes of a revisitop ground truth (a query and its
  positives);
* :func:`from_unlabelled_folder`: every image its own scene; positives are synthetic
  (random homography warps of the query, made by the training pipeline).

:func:`split_scenes` holds out whole scenes for validation, and
:func:`to_retrieval_dataset` turns a labelled set into an in-memory revisitop-style
evaluation set, so validation uses the same evaluation code as the benchmarks.

Files are listed and checked for existence here; they are decoded only when loaded
(:func:`jaxretrieval.data.training_pipeline.check_images` validates them all up front).
"""

import csv
import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from jaxtyping import Int

from jaxretrieval.data import datasets

_MAX_LISTED = 5
# Image file suffixes recognised when listing folders (compared lower-case).
_IMAGE_SUFFIXES = frozenset(ext.lower() for ext in datasets.IMAGE_EXTENSIONS) | {".bmp"}


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImages:
    """Image files, each labelled with a scene.

    Every scene has at least one image; scene ids are dense, ``0 ..
    len(scene_names) - 1``. Equality is identity (``eq=False``), as for
    :class:`~jaxretrieval.data.datasets.RetrievalDataset`.

    Attributes:
      paths: Image files, unique.
      scenes: ``(N,)`` read-only ``int32`` scene id of each image; ids index
        ``scene_names``.
      scene_names: Name of each scene (landmark id, folder name, query name...), unique.
      synthetic_positives: True for an unlabelled set: each image is its own scene and a
        query's positive is a random warp of the query itself, made by the loader.

    Raises:
      ValueError: On mismatched lengths, a scene id out of range, a scene without
        images, or a repeated path or scene name.
    """

    paths: tuple[str, ...]
    scenes: np.ndarray
    scene_names: tuple[str, ...]
    synthetic_positives: bool = False

    def __post_init__(self):
        paths = tuple(os.fspath(p) for p in self.paths)
        scene_names = tuple(str(name) for name in self.scene_names)
        scenes = np.asarray(self.scenes)
        if scenes.size == 0:
            scenes = np.zeros(0, np.int32)
        if scenes.ndim != 1 or scenes.shape[0] != len(paths):
            raise ValueError(
                f"scenes must have shape ({len(paths)},) (one id per path), found {scenes.shape}."
            )
        if scenes.dtype.kind not in "iu":
            raise TypeError(f"scenes must hold integer ids, got dtype {scenes.dtype}.")
        num_scenes = len(scene_names)
        if scenes.size and (scenes.min() < 0 or scenes.max() >= num_scenes):
            bad = scenes[(scenes < 0) | (scenes >= num_scenes)][0]
            raise ValueError(f"scene id {bad} is outside [0, {num_scenes}) (len(scene_names)).")
        sizes = np.bincount(scenes, minlength=num_scenes) if num_scenes else np.zeros(0, int)
        if sizes.size and sizes.min() == 0:
            empty = np.flatnonzero(sizes == 0)
            raise ValueError(
                f"{empty.size} scenes have no image, e.g. {scene_names[empty[0]]!r}; "
                "scene ids must be dense (use subset() to renumber)."
            )
        for what, values in (("path", paths), ("scene name", scene_names)):
            if len(set(values)) != len(values):
                seen: set[str] = set()
                repeated = next(v for v in values if v in seen or seen.add(v))
                raise ValueError(f"{what} {repeated!r} is listed more than once.")
        scenes = scenes.astype(np.int32)  # a fresh copy
        scenes.flags.writeable = False
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "scene_names", scene_names)
        object.__setattr__(self, "scenes", scenes)
        object.__setattr__(self, "synthetic_positives", bool(self.synthetic_positives))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_scenes(self) -> int:
        """Number of scenes."""
        return len(self.scene_names)

    @functools.cached_property
    def scene_sizes(self) -> Int[np.ndarray, " num_scenes"]:
        """Number of images of each scene, ``int64``."""
        sizes = np.bincount(self.scenes, minlength=self.num_scenes).astype(np.int64)
        sizes.flags.writeable = False
        return sizes

    @functools.cached_property
    def _scene_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Image indices grouped by scene (stable), and where each scene's group starts."""
        order = np.argsort(self.scenes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.scene_sizes)])  # (num_scenes + 1,)
        return order, starts

    def images_of_scene(self, scene_id: int | np.integer) -> Int[np.ndarray, " n"]:
        """Indices (ascending, ``int64``) of the images of one scene."""
        scene_id = int(scene_id)
        if not 0 <= scene_id < self.num_scenes:
            raise IndexError(f"scene id {scene_id} out of range [0, {self.num_scenes}).")
        order, starts = self._scene_order
        return order[starts[scene_id] : starts[scene_id + 1]].astype(np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "LabelledImages":
        """The images at ``indices`` (in that order), scenes renumbered densely.

        Scenes keep their relative order (new ids follow the old ones) and their names;
        scenes with no image in the subset are dropped.

        Raises:
          ValueError: An index is out of range or repeated.
        """
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = np.zeros(0, np.int64)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise ValueError(
                f"indices must be a flat list of integers, got shape {indices.shape} and "
                f"dtype {indices.dtype}."
            )
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise ValueError(f"index {bad} is outside [0, {len(self)}) (the number of images).")
        if np.unique(indices).size != indices.size:
            raise ValueError("indices must not repeat an image.")
        old_scenes = self.scenes[indices]
        kept = np.unique(old_scenes)  # old ids, ascending
        return LabelledImages(
            paths=tuple(self.paths[i] for i in indices.tolist()),
            scenes=np.searchsorted(kept, old_scenes),
            scene_names=tuple(self.scene_names[s] for s in kept.tolist()),
            synthetic_positives=self.synthetic_positives,
        )


def _from_lists(
    paths: Sequence[str], scene_of_image: Sequence[str], *, synthetic_positives: bool = False
) -> LabelledImages:
    """Scenes numbered in sorted order of their names."""
    scene_names = sorted(set(scene_of_image))
    scene_id = {name: i for i, name in enumerate(scene_names)}
    return LabelledImages(
        paths=tuple(paths),
        scenes=np.array([scene_id[s] for s in scene_of_image], np.int32),
        scene_names=tuple(scene_names),
        synthetic_positives=synthetic_positives,
    )


def _listing(names: Sequence[str], total: int) -> str:
    more = f" and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _csv_layout(image_dir: pathlib.Path, name: str):
    """How a CSV image name maps to a file, decided from the first row.

    Tried in order: the name as a relative path; the name plus an image extension; the
    Google Landmarks v2 layout ``a/b/c/abc....jpg``. The first that exists is used for
    every row (so listing a million files costs one ``is_file`` each); if none exists,
    the name as given.
    """
    candidates = [lambda n: image_dir / n]
    if not pathlib.PurePath(name).suffix:
        for extension in datasets.IMAGE_EXTENSIONS:
            candidates.append(lambda n, e=extension: image_dir / f"{n}{e}")
        if len(name) >= 3:
            candidates.append(lambda n: image_dir / n[0] / n[1] / n[2] / f"{n}.jpg")
    for candidate in candidates:
        if candidate(name).is_file():
            return candidate
    return candidates[0]


def from_csv(
    csv_path: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    scene_column: str = "scene",
) -> LabelledImages:
    """A labelled set from a CSV with one row per image (Google-Landmarks style).

    Image names are relative to ``image_dir``. A name without extension may also be found
    with one (``.jpg``, ``.png``...) or in Google Landmarks v2's ``a/b/c/abc...jpg``
    layout: the first row decides which, for all rows. Other columns are ignored. Images
    keep the row order; scenes are numbered in sorted order of their names.

    Args:
      csv_path: The CSV file (UTF-8, a header row naming the columns).
      image_dir: Folder of the images; default ``<csv folder>/images`` if it exists,
        else the CSV's folder.
      image_column: Column of image names (e.g. ``"id"`` for Google Landmarks v2).
      scene_column: Column of scene labels (e.g. ``"landmark_id"``).

    Returns:
      The labelled images.

    Raises:
      FileNotFoundError: The CSV does not exist, or image files are missing (the message
        lists the first few with their rows, and the count).
      ValueError: The CSV is empty, lacks a column (the message lists the columns
        found), has an empty cell in those columns, or lists an image twice; each message
        names the file and the row.
    """
    csv_path = pathlib.Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file {str(csv_path)!r} does not exist.")
    if image_dir is None:
        image_dir = csv_path.parent / "images"
        if not image_dir.is_dir():
            image_dir = csv_path.parent
    image_dir = pathlib.Path(image_dir)
    names: list[str] = []
    scene_labels: list[str] = []
    rows: list[int] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{str(csv_path)!r} is empty: expected a header row.")
        header = [name.strip() for name in reader.fieldnames]
        reader.fieldnames = header
        missing = [c for c in (image_column, scene_column) if c not in header]
        if missing:
            raise ValueError(f"{str(csv_path)!r} has no column {missing}; its columns: {header}.")
        first_row: dict[str, int] = {}
        for record in reader:
            row = reader.line_num
            name = (record.get(image_column) or "").strip()
            label = (record.get(scene_column) or "").strip()
            if not name or not label:
                empty = image_column if not name else scene_column
                raise ValueError(f"{str(csv_path)!r} row {row}: the {empty!r} cell is empty.")
            if name in first_row:
                raise ValueError(
                    f"{str(csv_path)!r} row {row}: image {name!r} is already listed in row "
                    f"{first_row[name]}."
                )
            first_row[name] = row
            names.append(name)
            scene_labels.append(label)
            rows.append(row)
    if not names:
        raise ValueError(f"{str(csv_path)!r} has a header but no rows: no images.")
    layout = _csv_layout(image_dir, names[0])
    paths = [layout(name) for name in names]
    missing_files = [
        f"{n!r} (row {r})" for n, r, p in zip(names, rows, paths, strict=True) if not p.is_file()
    ]
    if missing_files:
        raise FileNotFoundError(
            f"{len(missing_files)} of {len(names)} images listed in {str(csv_path)!r} are "
            f"missing from {str(image_dir)!r}: {_listing(missing_files, len(missing_files))}."
        )
    return _from_lists([str(p) for p in paths], scene_labels)


def _is_image_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES


def _visible(path: pathlib.Path) -> bool:
    return not path.name.startswith(".")


def _check_folder(root: pathlib.Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist.")


def from_scene_folders(root: str | os.PathLike) -> LabelledImages:
    """A labelled set from one sub-folder per scene: ``root/<scene>/<images>``.

    Scene names are the folder names, in sorted order; images are the files directly in
    each folder with an image suffix (case-insensitive), in sorted order. Hidden entries
    (starting with ``.``), files directly in ``root`` and empty folders are ignored.

    Raises:
      FileNotFoundError: ``root`` does not exist.
      ValueError: No scene folder holds an image.
    """
    root = pathlib.Path(root)
    _check_folder(root)
    paths: list[str] = []
    scene_of_image: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        for path in sorted(p for p in folder.iterdir() if _visible(p) and _is_image_file(p)):
            paths.append(str(path))
            scene_of_image.append(folder.name)
    if not paths:
        raise ValueError(
            f"no images found in the scene folders of {str(root)!r} (expected "
            f"root/<scene>/<image files with suffix {sorted(_IMAGE_SUFFIXES)}>)."
        )
    return _from_lists(paths, scene_of_image)


def from_unlabelled_folder(root: str | os.PathLike) -> LabelledImages:
    """Every image under ``root`` (recursively) as its own scene, with synthetic positives.

    Scene names are the images' paths relative to ``root`` (``/``-separated), in sorted
    order. Hidden files and folders are skipped.

    Raises:
      FileNotFoundError: ``root`` does not exist.
      ValueError: It holds no image.
    """
    root = pathlib.Path(root)
    _check_folder(root)
    found = []
    for directory, folders, files in os.walk(root):
        folders[:] = [d for d in folders if not d.startswith(".")]
        for file in files:
            path = pathlib.Path(directory, file)
            if _visible(path) and _is_image_file(path):
                found.append((path.relative_to(root).as_posix(), str(path)))
    if not found:
        raise ValueError(f"no image files found under {str(root)!r}.")
    found.sort()
    return _from_lists([p for _, p in found], [n for n, _ in found], synthetic_positives=True)


def from_revisitop(root: str | os.PathLike, *, name: str | None = None) -> LabelledImages:
    """The scenes of a revisitop ground truth as a labelled set.

    Each query and its ``easy`` + ``hard`` images form a scene; scenes that share an image
    (several queries of one landmark, or a query file that is also a database image, as
    in ROxford5k) are merged (union-find over files). ``junk`` images and images in no
    scene (distractors) are dropped; a query without positives is a scene of one image.
    A scene is named after its first query (``qimlist`` order); images are listed
    queries first, then the database, each file once. Query boxes are ignored (whole
    images).

    Args:
      root: A dataset folder in the revisitop layout (see
        :func:`jaxretrieval.data.datasets.load_dataset`).
      name: The ground truth to use when ``root`` holds several.

    Raises:
      As :func:`jaxretrieval.data.datasets.load_dataset` (missing images included).
    """
    dataset = datasets.load_dataset(root, name)
    all_paths = [str(p) for p in dataset.query_paths + dataset.database_paths]
    node_of_path: dict[str, int] = {}
    for path in all_paths:
        node_of_path.setdefault(path, len(node_of_path))
    node = [node_of_path[p] for p in all_paths]  # query q -> node[q], database j -> node[Q + j]
    parent = list(range(len(node_of_path)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    in_scene = np.zeros(len(node_of_path), bool)
    num_queries = dataset.num_queries
    for q, entry in enumerate(dataset.gnd):
        in_scene[node[q]] = True
        for j in np.concatenate([entry["easy"], entry["hard"]]).tolist():
            in_scene[node[num_queries + j]] = True
            root_q, root_j = find(node[q]), find(node[num_queries + j])
            if root_q != root_j:
                parent[max(root_q, root_j)] = min(root_q, root_j)
    scene_name: dict[int, str] = {}
    for q in range(num_queries):
        scene_name.setdefault(find(node[q]), dataset.qimlist[q])
    unique_paths = list(node_of_path)  # first-seen order: queries, then the database
    kept = [n for n in range(len(unique_paths)) if in_scene[n]]
    names_in_order = list(dict.fromkeys(scene_name[find(n)] for n in kept))
    scene_id = {name: i for i, name in enumerate(names_in_order)}
    return LabelledImages(
        paths=tuple(unique_paths[n] for n in kept),
        scenes=np.array([scene_id[scene_name[find(n)]] for n in kept], np.int32),
        scene_names=tuple(names_in_order),
    )


def split_scenes(
    labelled: LabelledImages, *, validation_fraction: float = 0.1, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """Holds out whole scenes for validation: ``(training, validation)``, scene-disjoint.

    ``round(validation_fraction * num_scenes)`` scenes (at least one if the fraction is
    positive) are drawn with the seed among the scenes with at least two images, which
    are the only ones that can be evaluated; there may be fewer if fewer scenes qualify.
    A set with synthetic positives (one image per scene) therefore gets an empty
    validation set. Both parts keep the original image order.

    Args:
      labelled: The labelled images.
      validation_fraction: Fraction of all scenes to hold out, in [0, 1).
      seed: Seed of the draw; the same seed and set always give the same split.

    Returns:
      ``(training, validation)``.

    Raises:
      ValueError: ``validation_fraction`` is outside [0, 1).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), found {validation_fraction}.")
    eligible = np.flatnonzero(labelled.scene_sizes >= 2)
    wanted = round(validation_fraction * labelled.num_scenes)
    if validation_fraction > 0:
        wanted = max(wanted, 1)
    num_validation = min(wanted, eligible.size)
    rng = np.random.default_rng(seed)
    held_out = np.zeros(labelled.num_scenes, bool)
    held_out[rng.choice(eligible, size=num_validation, replace=False)] = True
    validation_mask = held_out[labelled.scenes]  # (N,)
    return (
        labelled.subset(np.flatnonzero(~validation_mask)),
        labelled.subset(np.flatnonzero(validation_mask)),
    )


def to_retrieval_dataset(labelled: LabelledImages, *, name: str) -> datasets.RetrievalDataset:
    """An in-memory revisitop-style evaluation set made from a labelled set.

    For each scene with at least two images, its first image (sorted by path) is a query;
    every other image (scenes of one image included, as distractors) is in the database.
    A query's ``easy`` images are the other images of its scene; ``hard`` and ``junk``
    are empty; ``bbx`` is None (whole images). Queries are in scene order, the database
    in path order. Image names are paths relative to the images' common folder (which is
    ``image_dir``), with their extension (``extension`` is ``""``), so
    :meth:`~jaxretrieval.data.datasets.RetrievalDataset.path` finds the files.

    Args:
      labelled: The labelled images, e.g. the validation part of :func:`split_scenes`.
      name: The dataset's name (used in messages and reports).

    Returns:
      A :class:`~jaxretrieval.data.datasets.RetrievalDataset` whose ground truth has been
      validated by :func:`~jaxretrieval.data.datasets.validate_ground_truth`.

    Raises:
      ValueError: No scene has two images (there would be no query).
    """
    eligible = np.flatnonzero(labelled.scene_sizes >= 2)
    if eligible.size == 0:
        raise ValueError(
            f"{name}: no scene has two images, so there is no query to evaluate "
            f"({len(labelled)} images, {labelled.num_scenes} scenes)."
        )
    image_dir = pathlib.Path(os.path.commonpath([os.path.dirname(p) for p in labelled.paths]))
    names = [pathlib.Path(p).relative_to(image_dir).as_posix() for p in labelled.paths]
    queries = []
    for scene in eligible.tolist():
        members = labelled.images_of_scene(scene).tolist()
        queries.append(min(members, key=lambda i: labelled.paths[i]))
    is_query = np.zeros(len(labelled), bool)
    is_query[queries] = True
    database = sorted(np.flatnonzero(~is_query).tolist(), key=lambda i: labelled.paths[i])
    position = {image: j for j, image in enumerate(database)}
    gnd = []
    for q in queries:
        scene = int(labelled.scenes[q])
        easy = sorted(position[i] for i in labelled.images_of_scene(scene).tolist() if i != q)
        gnd.append({"easy": easy, "hard": [], "junk": [], "bbx": None})
    ground_truth = datasets.validate_ground_truth(
        {
            "imlist": [names[i] for i in database],
            "qimlist": [names[q] for q in queries],
            "gnd": gnd,
        },
        source=name,
    )
    return datasets.RetrievalDataset.from_ground_truth(
        ground_truth, name=name, root=image_dir, image_dir=image_dir, extension=""
    )


def matching_pairs(
    scenes: Int[np.ndarray, " N"],
) -> tuple[Int[np.ndarray, " P"], Int[np.ndarray, " P"]]:
    """Every ordered pair of distinct images of the same scene: ``(query_idx, positive_idx)``.

    Ordered, so each unordered pair appears twice, ``(i, j)`` and ``(j, i)``: a label says
    nothing about which image is the query, so every image is the query of every other
    image of its scene. A scene of ``n`` images gives ``n * (n - 1)`` pairs; scenes of one
    image give none. smvs_train (51 + 101 + 91 scenes of 2 images, 50 of 5) gives 1,486
    pairs (743 unordered). For learned whitening
    (:func:`jaxretrieval.whitening.learn_supervised_whitening`) the order does not change
    the pair covariance, and it makes the queries' mean weight each image by
    ``n - 1``, its number of partners, independently of the order of the files.

    Args:
      scenes: Scene id of each image, e.g. :attr:`LabelledImages.scenes`.

    Returns:
      ``(query_idx, positive_idx)``, ``int64`` image indices, sorted by query, then by
      positive.

    Raises:
      ValueError: ``scenes`` is not a flat array of integers.
    """
    scenes = np.asarray(scenes)
    if scenes.ndim != 1 or (scenes.size and scenes.dtype.kind not in "iu"):
        raise ValueError(
            f"scenes must be a flat array of integer ids, found shape {scenes.shape} and "
            f"dtype {scenes.dtype}."
        )
    # Work in scene-sorted order: scene g occupies positions start[g] .. start[g] + n[g].
    order = np.argsort(scenes, kind="stable")  # (N,)
    _, group, size = np.unique(scenes[order], return_inverse=True, return_counts=True)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])  # (num_scenes,)
    partners = size[group] - 1  # (N,) per sorted position
    query_pos = np.repeat(np.arange(len(order)), partners)  # (P,)
    # t = 0 .. n - 2 within each query's run; skip the query's own position.
    t = np.arange(len(query_pos)) - np.repeat(np.cumsum(partners) - partners, partners)  # (P,)
    own = query_pos - start[group[query_pos]]  # (P,) the query's place in its scene
    positive_pos = start[group[query_pos]] + t + (t >= own)  # (P,)
    query_idx, positive_idx = order[query_pos], order[positive_pos]
    by_query = np.lexsort((positive_idx, query_idx))
    return query_idx[by_query].astype(np.int64), positive_idx[by_query].astype(np.int64)


__all__ = [
    "LabelledImages",
    "from_csv",
    "from_revisitop",
    "from_scene_folders",
    "from_unlabelled_folder",
    "matching_pairs",
    "split_scenes",
    "to_retrieval_dataset",
]
