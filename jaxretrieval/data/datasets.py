"""Retrieval datasets in the revisitop layout.

A dataset folder holds ``gnd_<name>.pkl`` and the images, either in ``images/`` (our
sets) or ``jpg/`` (revisitop's ROxford5k/RParis6k download). The pickle is a dict:

* ``imlist``: database image names, without extension;
* ``qimlist``: query image names, without extension;
* ``gnd``: one dict per query with ``easy``, ``hard``, ``junk`` (indices into ``imlist``)
  and ``bbx`` (the query box ``(x1, y1, x2, y2)`` in pixels).

It is read through :func:`jaxretrieval.safe_pickle.load_data_pickle`, so a pickle that
names any global other than numpy's array rebuilders is refused before anything runs.

Accepted variants (documented here because they widen the format):

* the classic Oxford/Paris layout, whose entries have ``ok`` instead of ``easy``: ``ok``
  is taken as ``easy`` and ``hard`` as empty;
* a missing ``hard`` or ``junk`` list is taken as empty (e.g. Holidays-style sets have
  only positives);
* a missing ``bbx`` (or ``None``) means the whole image is the query.

After validation every ``easy``/``hard``/``junk`` is a read-only 1-D ``int64`` array, and
``bbx`` is a tuple of 4 floats or None.
"""

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import UInt8

from jaxretrieval import safe_pickle, validation
from jaxretrieval.data import images

IMAGE_DIRS = ("images", "jpg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".tif", ".tiff")
_MAX_LISTED = 5


def _index_array(values: Any, where: str) -> np.ndarray:
    array = validation.index_array(where, values)  # 1-D int64, a fresh copy
    array.flags.writeable = False
    return array


def _box(values: Any, where: str) -> tuple[float, float, float, float] | None:
    if values is None:
        return None
    box = np.asarray(values, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"{where} must be 4 finite numbers (x1, y1, x2, y2), got {values!r}.")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where} must have x1 <= x2 and y1 <= y2, got {values!r}.")
    return (x1, y1, x2, y2)


def _names(values: Any, key: str, source: str) -> list[str]:
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise TypeError(f"{source}: '{key}' must be a list of names, got {type(values).__name__}.")
    names = list(values)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{source}: {key}[{i}] must be a string, got {name!r}.")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"{source}: '{key}' lists {duplicate!r} more than once.")
    return names


def validate_ground_truth(raw: Any, *, source: str = "<ground truth>") -> dict[str, Any]:
    """Checks a revisitop ground-truth dict and returns it in canonical form.

    Args:
      raw: The unpickled object.
      source: Name used in error messages (usually the file path).

    Returns:
      ``{"imlist": [str], "qimlist": [str], "gnd": [{"easy", "hard", "junk": int64
      arrays, "bbx": (x1, y1, x2, y2) or None}]}``.

    Raises:
      ValueError: A key is missing, the lengths disagree, an index is out of range or
        repeated, a query lists an image in two of easy/hard/junk, or a box is invalid.
        The message names the source and the query index.
      TypeError: A field has the wrong type.
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"{source}: expected a dict, got {type(raw).__name__}.")
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in raw]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}; found {sorted(map(str, raw))}.")
    imlist = _names(raw["imlist"], "imlist", source)
    qimlist = _names(raw["qimlist"], "qimlist", source)
    entries = raw["gnd"]
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes):
        raise TypeError(f"{source}: 'gnd' must be a list, got {type(entries).__name__}.")
    if len(entries) != len(qimlist):
        raise ValueError(
            f"{source}: 'gnd' has {len(entries)} entries but 'qimlist' has {len(qimlist)}."
        )
    num_database = len(imlist)
    gnd = []
    for q, entry in enumerate(entries):
        where = f"{source}: gnd[{q}] (query {qimlist[q]!r})"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(entry).__name__}.")
        if "easy" in entry and "ok" in entry:
            raise ValueError(f"{where} has both 'easy' and 'ok'; expected one of them.")
        if "easy" not in entry and "ok" not in entry:
            raise ValueError(f"{where} has neither 'easy' nor 'ok'; keys: {sorted(entry)}.")
        lists = {
            "easy": entry["easy"] if "easy" in entry else entry["ok"],
            "hard": entry.get("hard", []),
            "junk": entry.get("junk", []),
        }
        parsed = {key: _index_array(value, f"{where} '{key}'") for key, value in lists.items()}
        seen: dict[int, str] = {}
        for key, indices in parsed.items():
            bad = indices[(indices < 0) | (indices >= num_database)]
            if bad.size:
                raise ValueError(
                    f"{where} '{key}' holds index {int(bad[0])}, outside the database "
                    f"[0, {num_database})."
                )
            for index in indices.tolist():
                if index in seen:
                    raise ValueError(
                        f"{where} lists database image {index} ({imlist[index]!r}) in both "
                        f"'{seen[index]}' and '{key}'."
                        if seen[index] != key
                        else f"{where} lists database image {index} twice in '{key}'."
                    )
                seen[index] = key
        parsed["bbx"] = _box(entry.get("bbx"), f"{where} 'bbx'")
        gnd.append(parsed)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def load_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Loads and validates a revisitop ``gnd_<name>.pkl`` without running pickled code.

    Args:
      path: The pickle.

    Returns:
      The canonical dict of :func:`validate_ground_truth`.

    Raises:
      FileNotFoundError: The file does not exist.
      jaxretrieval.safe_pickle.UnsafePickleError: The pickle names a forbidden global.
      pickle.UnpicklingError: Not a valid pickle.
      ValueError, TypeError: As :func:`validate_ground_truth`, naming the file.
    """
    return validate_ground_truth(safe_pickle.load_data_pickle(path), source=os.fspath(path))


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalDataset:
    """A query/database split with revisitop ground truth.

    Equality is identity (``eq=False``): the ground truth holds numpy arrays, whose ``==``
    does not give a bool.

    Attributes:
      name: Dataset name (the ``<name>`` of ``gnd_<name>.pkl``).
      root: The folder holding the pickle.
      image_dir: Folder of the image files (``root/images`` or ``root/jpg``).
      imlist: Database image names, without extension.
      qimlist: Query image names, without extension.
      gnd: One dict per query: ``easy``/``hard``/``junk`` int64 arrays of database
        indices, ``bbx`` a ``(x1, y1, x2, y2)`` tuple or None.
      extension: File name suffix added to every name (e.g. ``".jpg"``).
    """

    name: str
    root: pathlib.Path
    image_dir: pathlib.Path
    imlist: tuple[str, ...]
    qimlist: tuple[str, ...]
    gnd: tuple[dict[str, Any], ...]
    extension: str = ".jpg"

    @classmethod
    def from_ground_truth(
        cls,
        ground_truth: dict[str, Any],
        *,
        name: str,
        root: pathlib.Path,
        image_dir: pathlib.Path,
        extension: str,
    ) -> "RetrievalDataset":
        """The dataset of a ground truth that :func:`validate_ground_truth` returned."""
        return cls(
            name=name,
            root=root,
            image_dir=image_dir,
            imlist=tuple(ground_truth["imlist"]),
            qimlist=tuple(ground_truth["qimlist"]),
            gnd=tuple(ground_truth["gnd"]),
            extension=extension,
        )

    def path(self, image_name: str) -> pathlib.Path:
        """The file of an image name from ``imlist`` or ``qimlist``."""
        return self.image_dir / f"{image_name}{self.extension}"

    @property
    def database_paths(self) -> list[pathlib.Path]:
        """Files of the database images, in ``imlist`` order."""
        return [self.path(n) for n in self.imlist]

    @property
    def query_paths(self) -> list[pathlib.Path]:
        """Files of the query images, in ``qimlist`` order."""
        return [self.path(n) for n in self.qimlist]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float] | None]:
        """Query boxes ``(x1, y1, x2, y2)`` (None = whole image), in ``qimlist`` order."""
        return [entry["bbx"] for entry in self.gnd]

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return len(self.qimlist)

    @property
    def num_database(self) -> int:
        """Number of database images."""
        return len(self.imlist)


def _find_ground_truth(root: pathlib.Path, name: str | None) -> tuple[str, pathlib.Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist.")
    available = sorted(p.name for p in root.glob("gnd_*.pkl"))
    if name is not None:
        path = root / f"gnd_{name}.pkl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist; ground truths in {str(root)!r}: {available}."
            )
        return name, path
    if len(available) != 1:
        raise ValueError(
            f"{str(root)!r} holds {len(available)} ground-truth files {available}; pass "
            "name= to choose one (gnd_<name>.pkl)."
        )
    return available[0][len("gnd_") : -len(".pkl")], root / available[0]


def _find_extension(image_dir: pathlib.Path, first_name: str) -> str:
    """The suffix under which ``first_name`` exists (``""`` if the name has one already)."""
    for extension in ("", *IMAGE_EXTENSIONS):
        if (image_dir / f"{first_name}{extension}").is_file():
            return extension
    return ".jpg"


def load_dataset(
    root: str | os.PathLike, name: str | None = None, *, check_images: bool = True
) -> RetrievalDataset:
    """Loads a dataset folder in the revisitop layout.

    The image folder is ``root/images`` if it exists, else ``root/jpg`` (revisitop's
    layout, also used when neither exists). The file extension is found from the first
    image (database, else query): ``.jpg`` if that file is missing.

    Args:
      root: Folder holding ``gnd_<name>.pkl``.
      name: Dataset name; None uses the only ``gnd_*.pkl`` in ``root``.
      check_images: Check that every image file exists (set False for a ground truth
        without images, e.g. ``revisitop_gnd``).

    Returns:
      The dataset.

    Raises:
      FileNotFoundError: ``root`` or the pickle does not exist, or (with ``check_images``)
        image files are missing; the message lists the first few and the count.
      ValueError: ``name`` is None and ``root`` holds zero or several ground truths (the
        message lists them), or the ground truth is invalid.
    """
    root = pathlib.Path(root)
    name, gnd_path = _find_ground_truth(root, name)
    ground_truth = load_ground_truth(gnd_path)
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), root / "jpg")
    names = ground_truth["imlist"] + ground_truth["qimlist"]
    extension = _find_extension(image_dir, names[0]) if names else ".jpg"
    dataset = RetrievalDataset.from_ground_truth(
        ground_truth, name=name, root=root, image_dir=image_dir, extension=extension
    )
    if check_images:
        missing = [p for p in dataset.query_paths + dataset.database_paths if not p.is_file()]
        if missing:
            listed = ", ".join(repr(p.name) for p in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise FileNotFoundError(
                f"{len(missing)} of {len(names)} images of {name!r} are missing from "
                f"{str(image_dir)!r}: {listed}{more}. Pass check_images=False to load the "
                "ground truth alone."
            )
    return dataset


def leave_one_out(dataset: RetrievalDataset) -> tuple[list[pathlib.Path], list[dict[str, Any]]]:
    """Every image queries all the others: image paths and ground truth for that protocol.

    Images are numbered queries first, then the database: index ``i < Q`` is
    ``qimlist[i]``, index ``Q + j`` is ``imlist[j]``. Scenes come from the ground truth:
    query ``q`` and its ``easy`` + ``hard`` images form one scene; queries with the same
    positives (e.g. several queries of one landmark) share it. For image ``i`` of a scene,
    ``easy`` is the other images of the scene, ``hard`` is empty and ``junk`` is ``[i]``
    itself (so a ranking of all images, which contains the query, ignores it), plus the
    original ``junk`` images of the scene's queries. An image in no scene (a distractor)
    gets empty ``easy``, which revisitop's evaluation skips.

    Args:
      dataset: The dataset.

    Returns:
      ``(paths, gnd)``: ``Q + N`` image files, and one gnd dict per image (int64 arrays of
      indices into ``paths``, ``bbx`` None: whole images are used).

    Raises:
      ValueError: The scenes are inconsistent: an image belongs to two scenes.
    """
    num_queries = dataset.num_queries
    # Scenes as (queries, positives, junk); queries with the same non-empty positives share one.
    scenes: list[tuple[set[int], frozenset[int], set[int]]] = []
    scene_by_positives: dict[frozenset[int], int] = {}
    for q, entry in enumerate(dataset.gnd):
        positives = frozenset(
            (num_queries + np.concatenate([entry["easy"], entry["hard"]])).tolist()
        )
        junk = (num_queries + entry["junk"]).tolist()
        if positives and positives in scene_by_positives:
            queries, _, scene_junk = scenes[scene_by_positives[positives]]
            queries.add(q)
            scene_junk.update(junk)
            continue
        scene_by_positives[positives] = len(scenes)
        scenes.append(({q}, positives, set(junk)))
    scene_of: dict[int, int] = {}
    for s, (queries, positives, _) in enumerate(scenes):
        for image in sorted(queries | positives):
            if image in scene_of:
                raise ValueError(
                    f"{dataset.name}: image {_describe(dataset, image)} belongs to two scenes "
                    f"(those of queries {sorted(scenes[scene_of[image]][0])} and "
                    f"{sorted(queries)}); leave-one-out needs disjoint scenes."
                )
            scene_of[image] = s
    paths = dataset.query_paths + dataset.database_paths
    gnd = []
    for i in range(len(paths)):
        if i in scene_of:
            queries, positives, scene_junk = scenes[scene_of[i]]
            members = queries | positives
            junk = (scene_junk - members) | {i}
        else:
            members, junk = {i}, {i}
        gnd.append(
            {
                "easy": _sorted_array(members - {i}),
                "hard": _sorted_array(()),
                "junk": _sorted_array(junk),
                "bbx": None,
            }
        )
    return paths, gnd


def _sorted_array(values) -> np.ndarray:
    array = np.array(sorted(values), dtype=np.int64)
    array.flags.writeable = False
    return array


def _describe(dataset: RetrievalDataset, image: int) -> str:
    if image < dataset.num_queries:
        return f"{image} (query {dataset.qimlist[image]!r})"
    return f"{image} (database {dataset.imlist[image - dataset.num_queries]!r})"


def load_query_image(
    dataset: RetrievalDataset, i: int, *, max_side: int | None = None, upscale: bool = True
) -> UInt8[np.ndarray, "H W 3"]:
    """Query ``i`` decoded, cropped to its box (if any), then resized.

    The crop comes first, as in revisitop/cirtorch, so the box is in original pixels.

    Args:
      dataset: The dataset.
      i: Query index.
      max_side: Longer side after resizing; None keeps the crop's size.
      upscale: Enlarge crops smaller than ``max_side`` (see
        :func:`jaxretrieval.data.images.resize_max_side`).

    Returns:
      ``uint8`` RGB.

    Raises:
      IndexError: ``i`` is out of range.
      jaxretrieval.data.images.ImageDecodeError: The file cannot be decoded.
    """
    image = _load_listed(dataset, "query", dataset.qimlist, i)
    box = dataset.gnd[i]["bbx"]
    if box is not None:
        image = images.crop_to_box(image, box)
    return images.resize_max_side(image, max_side, upscale=upscale)


def load_database_image(
    dataset: RetrievalDataset, i: int, *, max_side: int | None = None, upscale: bool = True
) -> UInt8[np.ndarray, "H W 3"]:
    """Database image ``i`` decoded and resized (see :func:`load_query_image`).

    Raises:
      IndexError: ``i`` is out of range.
      jaxretrieval.data.images.ImageDecodeError: The file cannot be decoded.
    """
    image = _load_listed(dataset, "database", dataset.imlist, i)
    return images.resize_max_side(image, max_side, upscale=upscale)


def _load_listed(
    dataset: RetrievalDataset, kind: str, names: tuple[str, ...], i: int
) -> UInt8[np.ndarray, "H W 3"]:
    """Image ``names[i]`` (the queries' or the database's) decoded, at its own size."""
    if not 0 <= i < len(names):
        raise IndexError(f"{kind} index {i} out of range [0, {len(names)}).")
    return images.load_image(dataset.path(names[i]))
