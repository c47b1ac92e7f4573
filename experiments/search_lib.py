"""Index a folder of one's own photos and search it with a query image."""

import json
import logging
import os
import pathlib
from collections.abc import Iterable

import numpy as np

from jaxretrieval import extraction, search

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    *(".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp"),
    ".gif",  # the first frame (OpenCV >= 4.11 decodes GIF; older ones skip it, saying so)
}
INDEX_DIR_NAME = ".jaxretrieval_index"


def list_images(
    folder: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()
) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files below ``folder`` (recursively, sorted) and the ones that cannot be read.

    Hidden folders (such as the index folder) are not entered, and ``exclude`` (files or
    folders, e.g. the output picture and the index) never become inputs. Symbolic links
    to files are followed; dangling or looping links are returned as skipped files with
    the reason, not silently dropped. Linked folders are not entered (no cycles).

    Returns:
      ``(paths, skipped)`` with ``skipped`` as ``(path, reason)`` pairs.

    Raises:
      FileNotFoundError: ``folder`` is not a folder.
      ValueError: It holds no image files.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    excluded = {pathlib.Path(p).resolve() for p in exclude}
    paths, skipped = [], []
    for root, dirs, files in os.walk(folder):
        root_path = pathlib.Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (root_path / d).resolve() not in excluded
        )
        for name in sorted(files):
            path = root_path / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                resolved = path.resolve(strict=True)
            except (OSError, RuntimeError) as e:  # dangling (FileNotFoundError) or looping
                reason = (
                    "broken symbolic link"
                    if isinstance(e, FileNotFoundError)
                    else (f"symbolic link cannot be resolved ({e})")
                )
                skipped.append((str(path), reason))
                continue
            if resolved in excluded or any(parent in excluded for parent in resolved.parents):
                continue
            paths.append(str(path))
    if not paths:
        raise ValueError(
            f"no images in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return paths, skipped


class FolderIndex:
    """Descriptors + faiss index of an image folder, cached in ``index_dir``.

    Re-indexing the same folder with the same model and settings reuses the saved
    descriptors (see :func:`jaxretrieval.extraction.extract_cached`); an interrupted
    indexing run resumes; unreadable images are skipped and listed in :attr:`failures`.
    """

    def __init__(self, extractor: extraction.Extractor, index_dir: str | os.PathLike):
        self.extractor = extractor
        self.index_dir = pathlib.Path(index_dir)
        self.paths: list[str] = []
        self.descriptors = np.zeros((0, 0), np.float32)
        self.index: search.SearchIndex | None = None
        self.failures: list[tuple[str, str]] = []
        self.reused = False

    def build(
        self,
        folder: str | os.PathLike,
        *,
        exclude: Iterable[str | os.PathLike] = (),
        progress: bool = True,
    ) -> "FolderIndex":
        """Extracts (or reloads) descriptors for every image in ``folder`` and indexes them.

        Raises:
          PermissionError: ``index_dir`` is not writable (checked before extraction).
        """
        extraction.check_writable(self.index_dir)
        paths, skipped = list_images(folder, exclude=[self.index_dir, *exclude])
        result = extraction.extract_cached(
            self.extractor,
            paths,
            cache_file=self.index_dir / "descriptors.npz",
            progress=progress,
        )
        self.reused = result.reused_from is not None
        self.failures = skipped + result.failures
        keep = np.flatnonzero(result.valid)
        if keep.size == 0:
            raise ValueError(f"none of the {len(paths)} images in {folder} could be read.")
        self.paths = [result.paths[i] for i in keep]
        self.descriptors = result.descriptors[keep]
        self.index = search.SearchIndex(self.descriptors.shape[1])
        self.index.add(self.descriptors)
        (self.index_dir / "images.json").write_text(json.dumps(self.paths, indent=1))
        return self

    def search(
        self, query_descriptors: np.ndarray, *, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores, indices into ``self.paths``) of the top-k of each query row."""
        if self.index is None:
            raise RuntimeError("build() the index first.")
        return self.index.search(query_descriptors, k=k)
