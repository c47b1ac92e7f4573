"""Download the public retrieval benchmarks into the layouts our loaders read.

Each dataset is a list of files at the publishers' own addresses (:data:`DATASETS`), the
ones their authors' scripts use:

* ``roxford5k``, ``rparis6k``: the face-blurred Oxford/Paris images from the Oxford VGG
  pages (revisitop's ``python/download.py``), flattened into ``jpg/``, and the revisited
  ground truth ``gnd_<name>.pkl`` from revisitop's server. Result: the revisitop layout
  :func:`jaxretrieval.data.datasets.load_dataset` reads.
* ``revisitop1m``: the 1M distractors, 100 ``.tar.gz`` parts extracted into ``jpg/``, and
  ``revisitop1m.txt``; a ``gnd_revisitop1m.pkl`` with the image list and no queries is
  written so the same loader reads it (a database without queries).
* ``sfm120k``: cirtorch's retrieval-SfM-120k training images (``ims/``) and its database
  pickle, turned into ``labels.csv`` (image, scene, split) for
  :func:`jaxretrieval.data.labelled.from_csv`.
* ``gldv2-index``, ``gldv2-test``: Google Landmarks v2 from the CVDF bucket, 100 and 20
  ``.tar`` parts in GLDv2's ``a/b/c/<id>.jpg`` layout under ``images/``, each checked
  against the md5 file the publishers give for it, plus their CSV files.

Robustness: every file is first written to ``<file>.part``; a broken connection is
retried and a re-run resumes with an HTTP Range request, so a 1 GB part is not fetched
twice. A file only gets its final name once it is complete (its size is the one the
server announced) and, where the publisher gives one, its checksum matches. Only
``.tar.gz`` parts carry a checksum of their own (gzip's CRC, checked when extracting);
the Oxford, Paris, revisitop and cirtorch servers publish no checksums. Archives are
extracted with Python's ``tarfile`` ``data`` filter (no absolute paths, no ``..``, no
links leaving the folder, no device files), then deleted unless ``keep_archives``; a
marker ``downloads/<archive>.extracted`` makes a re-run skip them. Downloaded pickles are
only ever read through :mod:`jaxretrieval.safe_pickle`. Every failure is a
:class:`DownloadError` whose one-line message names the file and what to do.

For tests and mirrors, ``base_url`` (or ``$JAXRETRIEVAL_DOWNLOAD_BASE_URL``) replaces
``scheme://`` of every address: ``https://host/path`` is fetched from
``<base_url>/host/path``.
"""

import csv
import dataclasses
import errno
import gzip
import hashlib
import http.client
import os
import pathlib
import pickle
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from jaxretrieval import safe_pickle
from jaxretrieval.data import datasets, labelled

BASE_URL_ENV = "JAXRETRIEVAL_DOWNLOAD_BASE_URL"
ROOT_ENV = "JAXRETRIEVAL_DATA_ROOT"
DEFAULT_ROOT = "~/data"
CHUNK_BYTES = 1 << 20
_MAX_LISTED = 5
_USER_AGENT = "jaxretrieval-download/1"


class DownloadError(Exception):
    """A download or extraction failed; the message names the file and what to do."""


class _TransientError(Exception):
    """A failure worth retrying (connection broken, timeout, 5xx)."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset at its publisher's address.

    Attributes:
      url: The official address.
      extract_to: For an archive, the folder (relative to the dataset folder) it is
        extracted into; None for a plain file, saved under its own name in the dataset
        folder.
      flatten: Extract the archive's files without their folders (Oxford/Paris, as
        revisitop's script does).
      md5_url: The publisher's md5 file for it (first word: the hex digest).
    """

    url: str
    extract_to: str | None = None
    flatten: bool = False
    md5_url: str | None = None

    @property
    def filename(self) -> str:
        """The last path component of the address."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its files and how to check (and index) the result.

    Attributes:
      name: The folder name under the root, and the command-line name.
      description: One line for ``--list``.
      files: What to download, in order.
      finish: Checks the downloaded folder (and writes its index files); returns a
        one-line summary. Raises :class:`DownloadError` naming what is missing or corrupt.
      source: Where the addresses come from (the authors' script or page).
    """

    name: str
    description: str
    files: tuple[RemoteFile, ...]
    finish: Callable[[pathlib.Path], str]
    source: str


# --- finishing: check the result, write index files -------------------------------


def _listing(items: Sequence[str], total: int) -> str:
    more = f" and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _invalid_download(path: pathlib.Path, reason: str) -> DownloadError:
    """Deletes a downloaded file that cannot be used, so a re-run fetches it again."""
    path.unlink(missing_ok=True)
    return DownloadError(
        f"{path} is corrupt or not what was expected ({reason}); it was deleted, run the "
        "same command again to download it again"
    )


def _load_revisitop(folder: pathlib.Path, name: str) -> datasets.RetrievalDataset:
    gnd_path = folder / f"gnd_{name}.pkl"
    try:
        datasets.load_ground_truth(gnd_path)  # restricted unpickler: never runs code
    except FileNotFoundError:
        raise DownloadError(f"{gnd_path} is missing; run the same command again") from None
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise _invalid_download(gnd_path, " ".join(str(e).split())) from e
    try:
        return datasets.load_dataset(folder, name)
    except FileNotFoundError as e:
        raise DownloadError(
            f"{e} The archives did not contain them: delete {folder / 'downloads'} and run "
            "the same command again, or check the publisher's page."
        ) from e


def _finish_revisitop(name: str) -> Callable[[pathlib.Path], str]:
    def finish(folder: pathlib.Path) -> str:
        dataset = _load_revisitop(folder, name)
        return (
            f"{name}: {dataset.num_queries} queries, {dataset.num_database} database images "
            f"in {folder} (python -m experiments.evaluate --data-root {folder})"
        )

    return finish


def _write_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _finish_revisitop1m(folder: pathlib.Path) -> str:
    list_path = folder / "revisitop1m.txt"
    try:
        names = [n for n in list_path.read_text(encoding="utf-8").splitlines() if n.strip()]
    except FileNotFoundError:
        raise DownloadError(f"{list_path} is missing; run the same command again") from None
    except UnicodeDecodeError as e:
        raise _invalid_download(list_path, f"not UTF-8 text: {e}") from e
    if not names:
        raise _invalid_download(list_path, "empty image list")
    ground_truth = {"imlist": names, "qimlist": [], "gnd": []}  # plain data only

    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(ground_truth, f, protocol=4)

    _write_atomically(folder / "gnd_revisitop1m.pkl", write)
    dataset = _load_revisitop(folder, "revisitop1m")
    return f"revisitop1m: {dataset.num_database} distractor images in {folder}"


def _sfm_split(db: dict, split: str, source: str) -> tuple[list[str], list[str]]:
    entry = db.get(split)
    if not isinstance(entry, dict) or "cids" not in entry or "cluster" not in entry:
        raise ValueError(f"{source}: '{split}' must be a dict with 'cids' and 'cluster'")
    cids, clusters = list(entry["cids"]), [int(c) for c in entry["cluster"]]
    if len(cids) != len(clusters) or not all(isinstance(c, str) and len(c) >= 6 for c in cids):
        raise ValueError(f"{source}: '{split}' needs one cluster per cid and string cids")
    return cids, [f"{split}_{c}" for c in clusters]


def sfm_image_name(cid: str) -> str:
    """The image file of an SfM-120k cid, relative to the dataset folder (``cid2filename``)."""
    return f"ims/{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def _finish_sfm120k(folder: pathlib.Path) -> str:
    db_path = folder / "retrieval-SfM-120k.pkl"
    try:
        db = safe_pickle.load_data_pickle(db_path)
        if not isinstance(db, dict):
            raise TypeError(f"expected a dict, found {type(db).__name__}")
        rows = []
        for split in ("train", "val"):
            cids, scenes = _sfm_split(db, split, str(db_path))
            rows += [(sfm_image_name(c), s, split) for c, s in zip(cids, scenes, strict=True)]
    except FileNotFoundError:
        raise DownloadError(f"{db_path} is missing; run the same command again") from None
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
        raise _invalid_download(db_path, " ".join(str(e).split())) from e

    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "scene", "split"])
            writer.writerows(rows)

    csv_path = folder / "labels.csv"
    _write_atomically(csv_path, write)
    try:
        images = labelled.from_csv(csv_path, image_dir=folder)
    except FileNotFoundError as e:
        raise DownloadError(f"{e} Delete {folder / 'downloads'} and run again.") from e
    return (
        f"sfm120k: {len(images)} images of {images.num_scenes} scenes in {folder} "
        f"(labels.csv: image, scene, split)"
    )


def _check_gldv2(folder: pathlib.Path, split: str) -> int:
    list_path = folder / f"{split}.csv"
    try:
        with open(list_path, newline="", encoding="utf-8") as f:
            ids = [row["id"] for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise DownloadError(f"{list_path} is missing; run the same command again") from None
    except (KeyError, UnicodeDecodeError, csv.Error) as e:
        raise _invalid_download(list_path, f"no 'id' column ({e})") from e
    images = folder / "images"
    missing = [i for i in ids if not (images / i[0] / i[1] / i[2] / f"{i}.jpg").is_file()]
    if missing:
        raise DownloadError(
            f"{len(missing)} of {len(ids)} images listed in {list_path} are missing from "
            f"{images}: {_listing(missing, len(missing))}"
        )
    return len(ids)


# --- the registry ----------------------------------------------------------------

_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data"
_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_REVISITOP1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train"
_GLDV2 = "https://s3.amazonaws.com/google-landmark"
_REVISITOP_SCRIPT = "filipradenovic/revisitop python/download.py"


def _revisitop(name: str, description: str, *, archives: Sequence[str]) -> DatasetSpec:
    """Revisited Oxford or Paris: the Oxford VGG image archives and revisitop's ground truth."""
    return DatasetSpec(
        name=name,
        description=description,
        files=(
            *(RemoteFile(f"{_OXFORD}/{a}", extract_to="jpg", flatten=True) for a in archives),
            RemoteFile(f"{_REVISITOP}/{name}/gnd_{name}.pkl"),
        ),
        finish=_finish_revisitop(name),
        source=_REVISITOP_SCRIPT,
    )


def _gldv2(
    split: str, num_parts: int, *, description: str, answers: str, answers_note: str
) -> DatasetSpec:
    """A Google Landmarks v2 split: md5-checked image tars, ``<split>.csv`` and ``answers``.

    ``answers`` (labels or ground truth) is a path under the bucket; ``answers_note`` ends
    the message of a finished download.
    """

    def finish(folder: pathlib.Path) -> str:
        count = _check_gldv2(folder, split)
        return f"gldv2-{split}: {count} images in {folder}/images; {answers_note}"

    parts = (
        RemoteFile(
            f"{_GLDV2}/{split}/images_{i:03d}.tar",
            extract_to="images",
            md5_url=f"{_GLDV2}/md5sum/{split}/md5.images_{i:03d}.txt",
        )
        for i in range(num_parts)
    )
    return DatasetSpec(
        name=f"gldv2-{split}",
        description=description,
        files=(
            *parts,
            RemoteFile(f"{_GLDV2}/metadata/{split}.csv"),
            RemoteFile(f"{_GLDV2}/{answers}"),
        ),
        finish=finish,
        source="cvdfoundation/google-landmark README.md, download-dataset.sh",
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _revisitop(
            "roxford5k",
            "Revisited Oxford: 70 queries, 4,993 images (face-blurred v1 images)",
            archives=("oxbuildings/oxbuild_images-v1.tgz",),
        ),
        _revisitop(
            "rparis6k",
            "Revisited Paris: 70 queries, 6,322 images (face-blurred v1 images)",
            archives=("parisbuildings/paris_1-v1.tgz", "parisbuildings/paris_2-v1.tgz"),
        ),
        DatasetSpec(
            name="revisitop1m",
            description="R1M: 1,001,001 distractor images in 100 .tar.gz parts (no queries)",
            files=(
                *(
                    RemoteFile(f"{_REVISITOP1M}/jpg/revisitop1m.{i}.tar.gz", extract_to="jpg")
                    for i in range(1, 101)
                ),
                RemoteFile(f"{_REVISITOP1M}/revisitop1m.txt"),
            ),
            finish=_finish_revisitop1m,
            source=_REVISITOP_SCRIPT,
        ),
        DatasetSpec(
            name="sfm120k",
            description="retrieval-SfM-120k: cirtorch's training images and scenes (labels.csv)",
            files=(
                RemoteFile(f"{_CIRTORCH}/ims/ims.tar.gz", extract_to="ims"),
                RemoteFile(f"{_CIRTORCH}/dbs/retrieval-SfM-120k.pkl"),
            ),
            finish=_finish_sfm120k,
            source="filipradenovic/cnnimageretrieval-pytorch cirtorch/utils/download.py",
        ),
        _gldv2(
            "index",
            100,
            description="Google Landmarks v2 index: 761,757 images, 100 x ~850 MB, md5-checked",
            answers="metadata/index_image_to_landmark.csv",
            answers_note="labels: index_image_to_landmark.csv (id, landmark_id)",
        ),
        _gldv2(
            "test",
            20,
            description="Google Landmarks v2 test: 117,577 images, 20 x ~500 MB, md5-checked",
            answers="ground_truth/retrieval_solution_v2.1.csv",
            answers_note="ground truth: retrieval_solution_v2.1.csv",
        ),
    )
}


# --- fetching ----------------------------------------------------------------------


def resolve_url(url: str, base_url: str | None) -> str:
    """The address to fetch: ``url`` itself, or ``<base_url>/<host>/<path>`` (a mirror).

    Examples:
      >>> resolve_url("https://a.org/x/y.tgz", "http://127.0.0.1:8000/m")
      'http://127.0.0.1:8000/m/a.org/x/y.tgz'
    """
    if not base_url:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base_url.rstrip('/')}/{parts.netloc}{parts.path}"


def _content_range_total(header: str | None) -> int | None:
    """The total size of ``Content-Range: bytes a-b/total`` (or ``bytes */total``)."""
    if not header or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _check_free_space(folder: pathlib.Path, needed: int, part: pathlib.Path) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(
            f"not enough disk space for {part.name.removesuffix('.part')}: "
            f"{needed / 1e9:.2f} GB more needed, {free / 1e9:.2f} GB free in {folder}"
        )


def _fetch_once(url: str, part: pathlib.Path, *, timeout: float, progress: bool) -> None:
    """Appends the rest of ``url`` to ``part`` (Range request); raises if incomplete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:  # nothing left to send: complete, or a bad part
                if _content_range_total(e.headers.get("Content-Range")) == offset:
                    return
                part.unlink()
                raise _TransientError("the server refused to resume; starting again") from e
            if e.code >= 500 or e.code == 429:
                raise _TransientError(f"HTTP {e.code} {e.reason}") from e
            raise DownloadError(
                f"{url}: HTTP {e.code} {e.reason} (the publisher may have moved the file; "
                "see README 'Datasets')"
            ) from e
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _TransientError(f"cannot connect ({reason})") from e
    with response:
        if response.status == 206:
            start = response.headers.get("Content-Range", "").split(" ")[-1].split("-")[0]
            if start != str(offset):
                part.unlink()
                raise _TransientError(f"the server resumed at byte {start}, not {offset}")
            total = _content_range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # 200: the server ignores Range, start again
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        if total is not None:
            _check_free_space(part.parent, total - offset, part)
        bar = tqdm(
            total=total,
            initial=offset,
            desc=part.name.removesuffix(".part"),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=not progress,
            leave=False,
        )
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # broken connection, disk full
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DownloadError(f"disk full while writing {part}") from e
            raise _TransientError(f"connection broken ({type(e).__name__}: {e})") from e
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise _TransientError(f"connection closed after {size:,} of {total:,} bytes")


def _md5_of(path: pathlib.Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _read_small(url: str, *, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(1 << 16).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from e


def fetch(
    url: str,
    dest: pathlib.Path,
    *,
    md5_url: str | None = None,
    retries: int = 2,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> None:
    """Downloads ``url`` to ``dest`` through ``dest.part``, resuming what is there.

    Args:
      url: Address to fetch (already resolved, see :func:`resolve_url`).
      dest: Final file; only created once complete and checked.
      md5_url: Address of the publisher's md5 file; the download must match it.
      retries: Further attempts after a broken connection, each resuming.
      retry_wait: Seconds before the first retry (doubled each time).
      timeout: Socket timeout in seconds.
      progress: Show a tqdm progress bar.

    Raises:
      DownloadError: The server refuses the file, the connection keeps failing (the
        partial file is kept for the next run), or the checksum does not match (the file
        is deleted).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
            break
        except _TransientError as e:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                then = (
                    f"{kept:,} bytes are kept in {part}, run the same command again to resume"
                    if kept
                    else "nothing was downloaded; run the same command again"
                )
                raise DownloadError(f"{url}: {e}; {then}") from e
            time.sleep(retry_wait * 2**attempt)
    if md5_url is not None:
        expected = _read_small(md5_url, timeout=timeout).split()
        if not expected or len(expected[0]) != 32:
            raise DownloadError(f"{md5_url}: not an md5 file (starts with {expected[:1]!r})")
        actual = _md5_of(part)
        if actual != expected[0].lower():
            part.unlink()
            raise DownloadError(
                f"checksum mismatch for {dest.name}: md5 {actual}, but {md5_url} says "
                f"{expected[0]}; the file was deleted, run the same command again to "
                "download it again"
            )
    os.replace(part, dest)


# --- extracting ----------------------------------------------------------------------


_CORRUPT_ARCHIVE = (
    tarfile.ReadError,
    tarfile.CompressionError,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
)


def extract_archive(archive: pathlib.Path, dest: pathlib.Path, *, flatten: bool = False) -> int:
    """Extracts the regular files of a tar archive safely; returns how many.

    Every member is checked before it is written: an absolute name or a ``..`` component
    is refused, and ``tarfile.data_filter`` refuses links pointing outside ``dest`` and
    device files.
    Directories and links are not extracted (the datasets hold only image files).

    Args:
      archive: ``.tar``, ``.tar.gz`` or ``.tgz``.
      dest: Folder to extract into (created).
      flatten: Drop the members' folders (keep the file names only).

    Raises:
      DownloadError: The archive is corrupt or truncated (it is deleted, so a re-run
        downloads it again), or it holds an unsafe member (nothing outside ``dest`` is
        written; the archive is kept for inspection).
    """
    if not hasattr(tarfile, "data_filter"):  # Python 3.11.0-3.11.3
        raise DownloadError("safe extraction needs Python 3.11.4 or newer (tarfile filters)")
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                try:
                    name = pathlib.PurePosixPath(member.name)
                    if name.is_absolute() or ".." in name.parts:  # data_filter strips "/"
                        raise tarfile.AbsolutePathError(member)
                    safe = tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as e:
                    raise DownloadError(
                        f"{archive} holds an unsafe member {member.name!r} ({e}); refused, "
                        f"nothing was written outside {dest}"
                    ) from e
                if safe is None or not safe.isfile():
                    continue
                if flatten:
                    safe = safe.replace(name=pathlib.PurePosixPath(safe.name).name, deep=False)
                tar.extract(safe, dest, filter="data")
                count += 1
            # Read to the end so gzip checks its CRC and length even when the damage is in
            # the padding after the last member.
            while tar.fileobj.read(CHUNK_BYTES):
                pass
    except _CORRUPT_ARCHIVE as e:
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive} is corrupt or truncated ({type(e).__name__}: {e}); it was deleted, "
            "run the same command again to download it again"
        ) from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while extracting {archive} into {dest}") from e
        raise
    if count == 0:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive} holds no files; it was deleted, run again")
    return count


# --- one dataset ------------------------------------------------------------------------


def default_root() -> pathlib.Path:
    """``$JAXRETRIEVAL_DATA_ROOT``, else ``~/data``."""
    return pathlib.Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


def download_dataset(
    spec: DatasetSpec,
    root: str | os.PathLike,
    *,
    base_url: str | None = None,
    keep_archives: bool = False,
    retries: int = 2,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> str:
    """Downloads, checks and extracts one dataset into ``root/<name>``; returns a summary.

    Finished files and extracted archives are skipped, so running again after an
    interruption or an error only does what is left.

    Raises:
      DownloadError: As :func:`fetch`, :func:`extract_archive` and the dataset's check.
    """
    folder = pathlib.Path(root).expanduser() / spec.name
    downloads = folder / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    options = dict(retries=retries, retry_wait=retry_wait, timeout=timeout, progress=progress)
    for number, remote in enumerate(spec.files, 1):
        url = resolve_url(remote.url, base_url)
        md5_url = resolve_url(remote.md5_url, base_url) if remote.md5_url else None
        where = f"{spec.name} [{number}/{len(spec.files)}] {remote.filename}"
        if remote.extract_to is None:
            dest = folder / remote.filename
            if dest.exists():
                continue
            log(f"{where}: downloading {url}")
            fetch(url, dest, md5_url=md5_url, **options)
            continue
        marker = downloads / f"{remote.filename}.extracted"
        if marker.exists():
            continue
        archive = downloads / remote.filename
        if not archive.exists():
            log(f"{where}: downloading {url}")
            fetch(url, archive, md5_url=md5_url, **options)
        count = extract_archive(archive, folder / remote.extract_to, flatten=remote.flatten)
        log(f"{where}: extracted {count} files into {folder / remote.extract_to}")
        marker.write_text(f"{count}\n")
        if not keep_archives:
            archive.unlink()
    return spec.finish(folder)
