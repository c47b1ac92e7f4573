"""python -m experiments.download against a local HTTP server on 127.0.0.1.

The server serves small archives built here in tmp_path, under ``<host>/<path>`` of the
official addresses (``--base-url`` maps ``https://host/path`` there). It honours Range
requests and can cut a response short, so resuming is tested for real. A guard refuses
any connection that is not to the loopback address.
"""

import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import pickle
import re
import socket
import tarfile
import threading
import urllib.parse

import cv2
import numpy as np
import pytest

from experiments import cli, download, download_lib
from jaxretrieval.data import datasets, labelled


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = server.root / relative
        byte_range = self.headers.get("Range")
        server.requests.append((relative, byte_range))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        if byte_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut_after.pop(relative, None)
        sent = body if cut is None else body[:cut]
        self.wfile.write(sent)
        server.bytes_sent[relative] = server.bytes_sent.get(relative, 0) + len(sent)

    def log_message(self, *args):
        pass


class MirrorServer:
    """A loopback HTTP server over a folder, recording every request."""

    def __init__(self, root: pathlib.Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.root = root
        self.httpd.requests = []
        self.httpd.cut_after = {}
        self.httpd.bytes_sent = {}
        self.root = root
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.httpd.requests

    def put(self, official_url: str, data: bytes) -> str:
        """Serves ``data`` where ``--base-url`` maps ``official_url``; returns its key."""
        parts = urllib.parse.urlsplit(official_url)
        relative = parts.netloc + urllib.parse.unquote(parts.path)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return relative.lstrip("/")

    def cut(self, key: str, after: int) -> None:
        """The next response for ``key`` stops after ``after`` body bytes."""
        self.httpd.cut_after[key] = after

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection beyond 127.0.0.1 fails the test."""
    original = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost"), f"network access to {address}"
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    monkeypatch.delenv(download_lib.BASE_URL_ENV, raising=False)


@pytest.fixture
def server(tmp_path):
    mirror = MirrorServer(tmp_path / "server")
    yield mirror
    mirror.close()


def _jpeg(seed: int, size=(24, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def _tar(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)


OXFORD_TGZ = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz"
OXFORD_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl"
OXFORD_NAMES = ["all_souls_000000", "ashmolean_000001", "balliol_000002", "bodleian_000003"]


def _ground_truth(imlist, qimlist):
    return {
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": [{"easy": [0], "hard": [1], "junk": [], "bbx": [1.0, 2.0, 20.0, 16.0]}],
    }


def _serve_oxford(server, *, names=OXFORD_NAMES, ground_truth=None) -> tuple[str, bytes]:
    # Members in a subfolder, as in the real archive: extraction flattens them into jpg/.
    archive = _tar({f"oxbuild_images/{n}.jpg": _jpeg(i) for i, n in enumerate(names)})
    key = server.put(OXFORD_TGZ, archive)
    gnd = ground_truth or _ground_truth(OXFORD_NAMES[1:], OXFORD_NAMES[:1])
    server.put(OXFORD_GND, _pickle(gnd))
    return key, archive


def _run(argv):
    return cli.run(download.main, argv, prog="download")


def _download(server, root, *names, extra=()):
    return _run([*names, "--root", str(root), "--base-url", server.url, "--quiet", *extra])


def _fails(server, root, capsys, *names, extra=()) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _download(server, root, *names, extra=extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m experiments.download: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err


def test_roxford5k_lands_in_the_revisitop_layout(server, tmp_path, capsys):
    archive_key, _ = _serve_oxford(server)
    (summary,) = _download(server, tmp_path / "data", "roxford5k")
    folder = tmp_path / "data" / "roxford5k"
    dataset = datasets.load_dataset(folder)
    assert dataset.name == "roxford5k" and dataset.image_dir == folder / "jpg"
    assert sorted(p.name for p in (folder / "jpg").iterdir()) == [f"{n}.jpg" for n in OXFORD_NAMES]
    assert dataset.query_boxes == [(1.0, 2.0, 20.0, 16.0)]
    assert "1 queries, 3 database images" in summary
    assert not (folder / "downloads" / "oxbuild_images-v1.tgz").exists()  # deleted after use
    assert (folder / "downloads" / "oxbuild_images-v1.tgz.extracted").exists()
    # A second run downloads nothing.
    before = len(server.requests)
    _download(server, tmp_path / "data", "roxford5k")
    assert len(server.requests) == before
    assert archive_key in {key for key, _ in server.requests}


def test_a_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    archive_key, archive = _serve_oxford(server)
    downloads = tmp_path / "roxford5k" / "downloads"
    downloads.mkdir(parents=True)
    half = len(archive) // 2
    (downloads / "oxbuild_images-v1.tgz.part").write_bytes(archive[:half])
    _download(server, tmp_path, "roxford5k", extra=["--keep-archives"])
    assert (archive_key, f"bytes={half}-") in server.requests
    assert server.httpd.bytes_sent[archive_key] == len(archive) - half  # only the rest
    assert (downloads / "oxbuild_images-v1.tgz").read_bytes() == archive
    assert datasets.load_dataset(tmp_path / "roxford5k").num_database == 3


def test_a_broken_connection_is_kept_and_resumed_by_the_next_run(server, tmp_path, capsys):
    archive_key, archive = _serve_oxford(server)
    server.cut(archive_key, after=100)
    err = _fails(server, tmp_path, capsys, "roxford5k", extra=["--retries", "0"])
    part = tmp_path / "roxford5k" / "downloads" / "oxbuild_images-v1.tgz.part"
    assert f"100 bytes are kept in {part}, run the same command again to resume" in err
    assert part.stat().st_size == 100
    _download(server, tmp_path, "roxford5k")
    assert (archive_key, "bytes=100-") in server.requests
    assert datasets.load_dataset(tmp_path / "roxford5k").num_queries == 1


def test_fetch_retries_a_broken_connection_by_itself(server, tmp_path):
    key = server.put("https://example.org/data/file.bin", b"0123456789" * 1000)
    server.cut(key, after=2500)
    dest = tmp_path / "file.bin"
    download_lib.fetch(
        f"{server.url}/{key}", dest, retries=1, retry_wait=0.0, progress=False, timeout=10
    )
    assert dest.read_bytes() == b"0123456789" * 1000
    assert server.requests == [(key, None), (key, "bytes=2500-")]


def test_a_complete_part_is_finished_without_downloading_again(server, tmp_path):
    key = server.put("https://example.org/data/file.bin", b"abc" * 100)
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"abc" * 100)  # interrupted before renaming
    download_lib.fetch(f"{server.url}/{key}", dest, progress=False, timeout=10)
    assert dest.read_bytes() == b"abc" * 100
    assert server.httpd.bytes_sent.get(key, 0) == 0


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda a: a[: len(a) // 2],  # truncated in the middle of a member
        lambda a: a[: len(a) - 8],  # only gzip's CRC and length are missing
        lambda a: _flip_byte(a, len(a) // 2),  # one byte changed
        lambda a: _flip_byte(a, len(a) - 6),  # the CRC itself changed
    ],
    ids=["truncated", "no-trailer", "bit-flip", "bad-crc"],
)
def test_a_corrupt_archive_is_named_deleted_and_fetched_again(server, tmp_path, capsys, damage):
    archive_key, archive = _serve_oxford(server)
    server.put(OXFORD_TGZ, damage(archive))  # the server's copy is damaged
    err = _fails(server, tmp_path, capsys, "roxford5k")
    archive_path = tmp_path / "roxford5k" / "downloads" / "oxbuild_images-v1.tgz"
    assert f"{archive_path} is corrupt or truncated" in err
    assert "run the same command again to download it again" in err
    assert not archive_path.exists()
    server.put(OXFORD_TGZ, archive)  # fixed upstream: the next run succeeds
    _download(server, tmp_path, "roxford5k")
    assert datasets.load_dataset(tmp_path / "roxford5k").num_database == 3


def test_missing_images_are_named(server, tmp_path, capsys):
    _serve_oxford(server, names=OXFORD_NAMES[:3])  # bodleian_000003 is not in the archive
    err = _fails(server, tmp_path, capsys, "roxford5k")
    assert "1 of 4 images of 'roxford5k' are missing" in err and "'bodleian_000003.jpg'" in err


def test_a_malicious_ground_truth_is_refused_and_never_run(server, tmp_path, capsys):
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    _serve_oxford(server)
    server.put(OXFORD_GND, pickle.dumps({"imlist": Exploit()}, protocol=4))
    err = _fails(server, tmp_path, capsys, "roxford5k")
    assert "refusing to load global" in err and "system" in err and "Nothing was executed" in err
    assert not sentinel.exists()
    assert not (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").exists()  # deleted


def _member(name: str, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "member",
    [
        ("../escaped.txt", tarfile.REGTYPE, ""),
        ("/tmp/jaxretrieval_absolute.txt", tarfile.REGTYPE, ""),
        ("evil_link", tarfile.SYMTYPE, "/etc/passwd"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
    ids=["dotdot", "absolute", "symlink-out", "device"],
)
def test_unsafe_archive_members_are_refused(tmp_path, member):
    name, kind, link = member
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(*_member("fine.jpg", b"jpeg"))
        tar.addfile(*_member(name, b"payload", kind, link))
    archive = tmp_path / "evil.tar"
    archive.write_bytes(buffer.getvalue())
    dest = tmp_path / "out" / "jpg"
    with pytest.raises(download_lib.DownloadError, match="unsafe member"):
        download_lib.extract_archive(archive, dest)
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not pathlib.Path("/tmp/jaxretrieval_absolute.txt").exists()
    assert not (dest / "evil_link").exists() and not (dest / "dev").exists()


def _gldv2_spec(parts: int) -> download_lib.DatasetSpec:
    spec = download_lib.DATASETS["gldv2-index"]
    archives = [f for f in spec.files if f.extract_to][:parts]
    return dataclasses.replace(
        spec, files=(*archives, *[f for f in spec.files if not f.extract_to])
    )


def _serve_gldv2(server, ids_per_part, *, wrong_md5_part=None):
    base = "https://s3.amazonaws.com/google-landmark"
    all_ids = []
    for part, ids in enumerate(ids_per_part):
        tar = _tar({f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg": _jpeg(n) for n, i in enumerate(ids)}, "w")
        md5 = hashlib.md5(tar).hexdigest()
        if part == wrong_md5_part:
            md5 = "0" * 32
        server.put(f"{base}/index/images_{part:03d}.tar", tar)
        server.put(f"{base}/md5sum/index/md5.images_{part:03d}.txt", f"{md5}  x.tar\n".encode())
        all_ids += ids
    server.put(f"{base}/metadata/index.csv", ("id\n" + "\n".join(all_ids) + "\n").encode())
    rows = "".join(f"{i},{n % 2}\n" for n, i in enumerate(all_ids))
    server.put(f"{base}/metadata/index_image_to_landmark.csv", f"id,landmark_id\n{rows}".encode())


def test_gldv2_parts_are_md5_checked(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(download_lib.DATASETS, "gldv2-index", _gldv2_spec(2))
    ids = [["0123456789abcdef", "0abcdefabcdef012"], ["fedcba9876543210"]]
    _serve_gldv2(server, ids, wrong_md5_part=1)
    err = _fails(server, tmp_path, capsys, "gldv2-index")
    assert "checksum mismatch for images_001.tar: md5 " in err and "0" * 32 in err
    downloads = tmp_path / "gldv2-index" / "downloads"
    assert not (downloads / "images_001.tar").exists()
    assert not (downloads / "images_001.tar.part").exists()
    assert (downloads / "images_000.tar.extracted").exists()  # the good part is kept
    _serve_gldv2(server, ids)  # the publisher fixes it
    requested_before = [key for key, _ in server.requests]
    (summary,) = _download(server, tmp_path, "gldv2-index")
    assert "gldv2-index: 3 images" in summary
    again = [key for key, _ in server.requests[len(requested_before) :]]
    assert "s3.amazonaws.com/google-landmark/index/images_000.tar" not in again
    images = labelled.from_csv(
        tmp_path / "gldv2-index" / "index_image_to_landmark.csv",
        image_column="id",
        scene_column="landmark_id",
    )
    assert len(images) == 3 and images.num_scenes == 2


def test_sfm120k_becomes_a_labelled_csv(server, tmp_path):
    cids = {"train": ["aaaaaa11bbbb22", "cccccc33dddd44", "eeeeee55ffff66"], "val": ["99887766"]}
    files = {
        download_lib.sfm_image_name(cid).removeprefix("ims/"): _jpeg(n)
        for n, cid in enumerate(cids["train"] + cids["val"])
    }
    base = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train"
    server.put(f"{base}/ims/ims.tar.gz", _tar(files))
    db = {
        "train": {"cids": cids["train"], "cluster": [0, 0, 1], "qidxs": [0], "pidxs": [1]},
        "val": {"cids": cids["val"], "cluster": [0], "qidxs": [], "pidxs": []},
    }
    server.put(f"{base}/dbs/retrieval-SfM-120k.pkl", _pickle(db))
    (summary,) = _download(server, tmp_path, "sfm120k")
    assert "4 images of 3 scenes" in summary
    images = labelled.from_csv(tmp_path / "sfm120k" / "labels.csv")
    assert images.scene_names == ("train_0", "train_1", "val_0")
    assert images.paths[0] == str(tmp_path / "sfm120k" / "ims/22/bb/bb/aaaaaa11bbbb22")


def test_revisitop1m_is_a_database_without_queries(server, tmp_path, monkeypatch):
    spec = download_lib.DATASETS["revisitop1m"]
    two_parts = (*[f for f in spec.files if f.extract_to][:2], spec.files[-1])
    monkeypatch.setitem(
        download_lib.DATASETS, "revisitop1m", dataclasses.replace(spec, files=two_parts)
    )
    base = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
    server.put(f"{base}/jpg/revisitop1m.1.tar.gz", _tar({"a/1.jpg": _jpeg(1), "a/2.jpg": _jpeg(2)}))
    server.put(f"{base}/jpg/revisitop1m.2.tar.gz", _tar({"b/3.jpg": _jpeg(3)}))
    server.put(f"{base}/revisitop1m.txt", b"a/1.jpg\na/2.jpg\nb/3.jpg\n")
    _download(server, tmp_path, "revisitop1m")
    dataset = datasets.load_dataset(tmp_path / "revisitop1m")
    assert dataset.num_queries == 0 and dataset.num_database == 3
    assert dataset.database_paths[2] == tmp_path / "revisitop1m" / "jpg" / "b" / "3.jpg"


def test_a_missing_file_on_the_server_names_the_address(server, tmp_path, capsys):
    err = _fails(server, tmp_path, capsys, "rparis6k")
    assert "paris_1-v1.tgz: HTTP 404" in err and "see README 'Datasets'" in err


def test_not_enough_disk_space_is_said_before_writing(server, tmp_path, capsys, monkeypatch):
    _serve_oxford(server)
    usage = download_lib.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download_lib.shutil, "disk_usage", lambda path: usage._replace(free=10))
    err = _fails(server, tmp_path, capsys, "roxford5k")
    assert "not enough disk space for oxbuild_images-v1.tgz: " in err


def test_unknown_names_and_the_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(["roxford"])
    assert exit_info.value.code == 2
    assert "unknown dataset 'roxford'; choose from roxford5k, rparis6k" in capsys.readouterr().err
    assert _run(["--list"]) == []
    out = capsys.readouterr().out
    assert "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz" in out
    assert "md5: https://s3.amazonaws.com/google-landmark/md5sum/index/md5.images_099.txt" in out


def test_the_registry_holds_the_publishers_addresses():
    urls = {name: [f.url for f in spec.files] for name, spec in download_lib.DATASETS.items()}
    assert urls["rparis6k"][:2] == [
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
    ]
    assert len(urls["revisitop1m"]) == 101 and urls["revisitop1m"][99].endswith(".100.tar.gz")
    assert len(urls["gldv2-index"]) == 102 and urls["gldv2-test"][19].endswith("images_019.tar")
    assert urls["sfm120k"] == [
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz",
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/retrieval-SfM-120k.pkl",
    ]
