"""The bad-input corpus, generated at test time (nothing binary is shipped).

:func:`build_corpus` writes into a folder:

* ``images/``: one file per :data:`IMAGE_CASES` entry, good and bad, with the outcome
  every image-reading CLI must give it: ``"read"`` (decoded, possibly converted) or
  ``"skip"`` (listed with its reason, the run goes on); as a query, a ``"skip"`` image
  makes the CLI fail with one line naming it (exit status 2);
* ``dataset/``: a revisitop-layout set over the same images (``gnd_hardening.pkl``);
* ``bad_gnd/<case>/``: the same set with a hostile or broken ground truth each
  (:data:`GND_CASES`): the CLIs must fail with one line, exit 2, and run no code;
* ``weights/<case>.pth``: hostile or broken torchvision files (:data:`WEIGHT_CASES`) for
  ``--weights``; same rule.

Malicious payloads ``touch`` a sentinel file (:attr:`Corpus.sentinel`): if it ever
exists, code from an input ran.
"""

import collections
import dataclasses
import io
import os
import pathlib
import pickle
import struct
import zlib

import cv2
import numpy as np

from tests.backbones import torch_files
from tests.backbones.torch_files import Payload, Storage, Tensor

GOOD = "good_photo.jpg"


def _photo(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A smooth random RGB picture (compresses and resizes like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _encode(rgb: np.ndarray, ext: str, params=()) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, data = cv2.imencode(ext, bgr, list(params))
    assert ok, ext
    return data.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload).to_bytes(4, "big")
    return len(payload).to_bytes(4, "big") + kind + payload + crc


def _huge_png(side: int = 20000) -> bytes:
    """A complete PNG whose header says side x side (one IDAT row of data: tiny file)."""
    header = struct.pack(">II", side, side) + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * side)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _huge_jpeg(side: int = 20000) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim side x side."""
    data = bytearray(_encode(_photo(1, 16, 16), ".jpg"))
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _pil_bytes(save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    save(Image, buffer)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    def save(image_module, buffer):
        frames = [image_module.fromarray(_photo(seed)) for seed in (2, 3, 4)]
        frames[0].save(
            buffer, format=fmt, save_all=True, append_images=frames[1:], duration=80, loop=0
        )

    return _pil_bytes(save)


def _cmyk_jpeg() -> bytes:
    return _pil_bytes(
        lambda image_module, buffer: (
            image_module.fromarray(_photo(5))
            .convert("CMYK")
            .save(buffer, format="JPEG", quality=95)
        )
    )


def _image_cases() -> dict[str, tuple[str, bytes | None]]:
    """name -> (expected outcome, file bytes); None bytes: a dangling symbolic link."""
    photo = _photo(0)
    jpeg = _encode(photo, ".jpg")
    png = _encode(photo, ".png")
    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    bgra = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    return {
        GOOD: ("read", jpeg),
        "zero_byte.jpg": ("skip", b""),
        "truncated.jpg": ("skip", jpeg[: len(jpeg) // 2]),
        "truncated.png": ("skip", png[: len(png) // 2]),
        "jpeg_named_png.png": ("read", _encode(_photo(6), ".jpg")),
        "png_named_jpg.jpg": ("read", _encode(_photo(7), ".png")),
        "text_as_image.jpg": ("skip", b"This is a text file, not a photo.\n" * 3),
        "html_as_image.png": ("skip", b"<!DOCTYPE html><html><body>404</body></html>\n"),
        "random_bytes.jpg": ("skip", np.random.default_rng(8).bytes(4096)),
        "huge_dimension.png": ("skip", _huge_png()),
        "huge_dimension.jpg": ("skip", _huge_jpeg()),
        "sixteen_bit.png": ("read", _encode((photo.astype(np.uint16) * 257), ".png")),
        "sixteen_bit_gray.png": ("read", _encode(photo[:, :, 0].astype(np.uint16) * 257, ".png")),
        "cmyk.jpg": ("read", _cmyk_jpeg()),
        "rgba.png": ("read", cv2.imencode(".png", bgra)[1].tobytes()),
        "animated.gif": ("read", _animated("GIF")),  # first frame (OpenCV >= 4.11 reads GIF)
        "animated.webp": ("read", _animated("WEBP")),
        "grayscale.jpg": ("read", _encode(photo[:, :, 1], ".jpg")),
        "exif_rotated.jpg": (
            "read",
            _with_exif_orientation(_encode(_photo(9, 120, 160), ".jpg"), 6),
        ),
        "ünïcödé 写真.jpg": ("read", _encode(_photo(10), ".jpg")),
        "name with spaces.png": ("read", _encode(_photo(11), ".png")),
        "one_pixel.png": ("read", _encode(_photo(12)[:1, :1], ".png")),
        "dangling_link.jpg": ("skip", None),
    }


IMAGE_CASES = tuple(_image_cases())


def _gnd_dict(names: list[str]) -> dict:
    """Query: the good photo; database: every other image; positives: the readable ones."""
    database = [n for n in names if n != GOOD]
    readable = [i for i, n in enumerate(database) if _image_cases()[n][0] == "read"]
    return {
        "imlist": database,
        "qimlist": [GOOD],
        "gnd": [{"easy": readable[:3], "hard": readable[3:5], "junk": [], "bbx": None}],
    }


class _Global:
    """Pickles as the global ``module.name`` without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as reduce functions
        raise RuntimeError("a stand-in for a global; never called")


class _Call:
    def __init__(self, module: str, name: str, *args):
        self.func, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.func, self.args


class _GlobalPickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global


def _hostile_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _GlobalPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _gnd_cases(names: list[str], sentinel: pathlib.Path) -> dict[str, bytes]:
    """case -> gnd_hardening.pkl bytes; every one must be refused with one line."""
    good = _gnd_dict(names)
    touch = f"touch {sentinel}"
    valid = pickle.dumps(good, protocol=4)
    out_of_range = dict(good, gnd=[dict(good["gnd"][0], easy=[len(good["imlist"]) + 5])])
    return {
        "os_system": _hostile_pickle({**good, "imlist": _Call("os", "system", touch)}),
        "posix_system": _hostile_pickle(_Call("posix", "system", touch)),
        "builtins_exec": _hostile_pickle(
            _Call("builtins", "exec", f"open({str(sentinel)!r}, 'w')")
        ),
        "subprocess": _hostile_pickle(
            _Call("subprocess", "check_output", ["touch", str(sentinel)])
        ),
        "numpy_outside_allow_list": _hostile_pickle(_Call("numpy", "load", str(sentinel))),
        "truncated": valid[: len(valid) // 2],
        "zero_byte": b"",
        "text": b"imlist: a, b, c\n",
        "not_a_dict": pickle.dumps([1, 2, 3]),
        "index_out_of_range": pickle.dumps(out_of_range),
        "names_a_missing_image": pickle.dumps(dict(good, imlist=[*good["imlist"][:-1], "gone"])),
    }


def _weight_cases(sentinel: pathlib.Path) -> dict[str, bytes]:
    """case -> .pth bytes for ``--weights``; every one must be refused with one line."""
    touch = f"touch {sentinel}"
    tensors = torch_files.as_tensors({"features.0.0.weight": np.ones((2, 3, 3, 3), np.float32)})
    with_payload = collections.OrderedDict(tensors)
    with_payload["evil"] = Payload("os", "system", touch)
    foreign = collections.OrderedDict(tensors)
    foreign["counter"] = Payload("collections", "Counter", "abc")  # outside the allow list
    storage = Storage("s", np.arange(10, dtype=np.float32))
    out_of_bounds = {"features.0.0.weight": Tensor(storage, 0, (4, 4), (4, 1))}
    huge = Storage("h", np.zeros(4, np.float32))
    huge.declared_numel = 1 << 40
    valid_zip = torch_files.zip_bytes(tensors)
    return {
        "os_system_zip": torch_files.zip_bytes(with_payload),
        "os_system_legacy": torch_files.legacy_bytes(with_payload),
        "global_outside_allow_list": torch_files.zip_bytes(foreign),
        "out_of_bounds_view": torch_files.zip_bytes(torch_files.as_tensors(out_of_bounds)),
        "huge_declared_storage": torch_files.legacy_bytes(
            torch_files.as_tensors({"w": Tensor(huge, 0, (4,), (1,))})
        ),
        "truncated": valid_zip[: len(valid_zip) // 2],
        "zero_byte": b"",
        "text": b"not a checkpoint\n",
        "wrong_network": valid_zip,  # a valid file holding one tensor of another model
    }


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Paths of a built corpus and the expected outcome of each case."""

    root: pathlib.Path
    sentinel: pathlib.Path
    expected: dict[str, str]  # image name -> "read" | "skip"
    gnd_cases: tuple[str, ...]
    weight_cases: tuple[str, ...]

    @property
    def images(self) -> pathlib.Path:
        return self.root / "images"

    @property
    def dataset(self) -> pathlib.Path:
        return self.root / "dataset"

    def bad_gnd(self, case: str) -> pathlib.Path:
        return self.root / "bad_gnd" / case

    def weights(self, case: str) -> pathlib.Path:
        return self.root / "weights" / f"{case}.pth"


def build_corpus(root: str | os.PathLike) -> Corpus:
    """Writes the corpus under ``root`` (see the module docstring)."""
    root = pathlib.Path(root)
    sentinel = root / "SENTINEL_code_ran"
    cases = _image_cases()
    images = root / "images"
    images.mkdir(parents=True)
    for name, (_, data) in cases.items():
        if data is None:
            os.symlink(root / "nowhere" / name, images / name)
        else:
            (images / name).write_bytes(data)
    # The revisitop set: names with their extension, in jpg/ (no dangling link: the
    # loader checks that every listed file exists, and says which do not).
    names = [n for n, (_, data) in cases.items() if data is not None]
    dataset = root / "dataset"
    (dataset / "jpg").mkdir(parents=True)
    for name in names:
        (dataset / "jpg" / name).write_bytes((images / name).read_bytes())
    (dataset / "gnd_hardening.pkl").write_bytes(pickle.dumps(_gnd_dict(names), protocol=4))
    gnd_cases = _gnd_cases(names, sentinel)
    for case, data in gnd_cases.items():
        folder = root / "bad_gnd" / case
        folder.mkdir(parents=True)
        (folder / "jpg").symlink_to(dataset / "jpg")
        (folder / "gnd_hardening.pkl").write_bytes(data)
    weight_cases = _weight_cases(sentinel)
    (root / "weights").mkdir()
    for case, data in weight_cases.items():
        (root / "weights" / f"{case}.pth").write_bytes(data)
    return Corpus(
        root=root,
        sentinel=sentinel,
        expected={name: outcome for name, (outcome, _) in cases.items()},
        gnd_cases=tuple(gnd_cases),
        weight_cases=tuple(weight_cases),
    )
