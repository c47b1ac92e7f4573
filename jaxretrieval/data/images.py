"""Image decoding and host-side preprocessing (NumPy + OpenCV).

Every image that enters the library goes through :func:`load_image`, which returns
``uint8`` RGB ``(H, W, 3)`` or raises :class:`ImageDecodeError` naming the file and the
reason. Decisions, each checked by a test in ``tests/data/test_images.py``:

* **Decoder flags.** OpenCV decodes with ``IMREAD_COLOR | IMREAD_ANYDEPTH``. Any flag set
  other than ``IMREAD_UNCHANGED`` makes OpenCV apply the EXIF orientation, expand
  grayscale to three channels and convert CMYK/YCCK JPEGs to BGR, while ``ANYDEPTH`` keeps
  16-bit samples so that we scale them ourselves. The bytes are read in Python and passed
  to ``cv2.imdecode``, so non-ASCII paths work on every platform.
* **Alpha is dropped**, not composited: the colour channels are kept as stored. This is
  what PIL's ``convert("RGB")`` does in cirtorch's loader, so descriptors match the
  reference pipeline. (Compositing would need ``IMREAD_UNCHANGED``, which skips the EXIF
  orientation.)
* **16-bit samples are scaled** to 8 bits, ``round(x * 255 / 65535)``, so 65535 -> 255
  (not truncated, not clipped). Floating-point images (TIFF/HDR) are taken as [0, 1],
  clipped and scaled.
* **Truncated files are errors.** OpenCV 4 decodes a truncated JPEG partly (grey bottom
  rows) and only prints a warning; OpenCV 5.0 (measured here) returns nothing even when
  only the final ``FFD9`` is missing. So that the behaviour and the message do not depend
  on the OpenCV build, the bytes are checked first: a JPEG must contain the end-of-image
  marker ``FFD9`` after its first scan starts, and a PNG must reach its ``IEND`` chunk
  (chunk lengths are followed, CRCs are left to libpng). Bytes after the end marker (e.g.
  a video appended to a "motion photo") are allowed. Other formats rely on OpenCV.
* **Output channel order is RGB** (OpenCV decodes BGR).
* **Decompression bombs are refused.** An image above ``max_pixels`` (default
  :data:`DEFAULT_MAX_PIXELS`, PIL's limit) is refused from its header before decoding:
  a 1.2 MB 20000 x 20000 PNG would otherwise cost 2.4 GB of memory. Formats whose header
  we do not parse are checked after decoding (OpenCV's own limit is 2^30 pixels).

:func:`load_scaled` is the one decode -> crop -> resize path: global extraction, DSM
features and training all start from it.
"""

import math
import numbers
import os
from collections.abc import Sequence

import cv2
import numpy as np
from jaxtyping import Float32, Shaped, UInt8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8), 0xD8, 0xD9])
# Start-of-frame markers (all SOFn except DHT C4, JPG C8 and DAC CC).
_SOF_MARKERS = frozenset(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC})
_EXIF_ORIENTATION_TAG = 0x0112
# PIL's Image.MAX_IMAGE_PIXELS * 2, its hard "decompression bomb" error.
DEFAULT_MAX_PIXELS = 178_956_970


class ImageDecodeError(ValueError):
    """An image file could not be read or decoded; the message names the file and why.

    Attributes:
      path: The file, as a string.
      reason: Why it failed.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        # Both arguments go to ``args`` so that the error pickles (multiprocess loaders).
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {self.path!r}: {self.reason}"


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not a file") from None
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read the file ({e.strerror or e})") from e


def _jpeg_segments(data: bytes):
    """Yields ``(marker, payload_start, payload_end)`` for the header segments of a JPEG.

    Stops after the first start-of-scan (SOS, ``FFDA``) segment, or raises ``ValueError``
    when the header runs past the end of the data.
    """
    pos, n = 2, len(data)
    while True:
        if pos >= n:
            raise ValueError("truncated JPEG: the file ends inside the header")
        if data[pos] != 0xFF:
            # libjpeg skips stray bytes before a marker (with a warning); do the same.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                raise ValueError("truncated JPEG: the file ends inside the header")
            continue
        if pos + 1 >= n:
            raise ValueError("truncated JPEG: the file ends inside the header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            if marker == 0xD9:
                raise ValueError("corrupt JPEG: end-of-image marker before any image data")
            pos += 2
            continue
        if pos + 4 > n:
            raise ValueError("truncated JPEG: the file ends inside the header")
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > n:
            raise ValueError("truncated JPEG: the file ends inside a header segment")
        yield marker, pos + 4, end
        if marker == 0xDA:
            return
        pos = end


def _png_chunks(data: bytes):
    """Yields ``(type, payload_start, payload_end)`` for each PNG chunk up to ``IEND``.

    Raises ``ValueError`` when a chunk runs past the end or ``IEND`` is missing.
    """
    pos, n = len(_PNG_MAGIC), len(data)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length + 4  # payload, then the CRC
        if end > n:
            raise ValueError(f"truncated PNG: the file ends inside a {kind!r} chunk")
        yield kind, pos + 8, pos + 8 + length
        if kind == b"IEND":
            return
        pos = end
    raise ValueError("truncated PNG: no IEND chunk")


def _check_complete(data: bytes) -> str | None:
    """Returns why the encoded bytes are truncated, or None if they look complete."""
    try:
        if data.startswith(_JPEG_MAGIC):
            scan_start = None
            for marker, _, end in _jpeg_segments(data):
                if marker == 0xDA:
                    scan_start = end
            # Inside entropy-coded data 0xFF is always followed by 0x00 or RSTn, so the
            # first FFD9 after the scan starts is the real end-of-image marker.
            if data.find(b"\xff\xd9", scan_start) < 0:
                return "truncated JPEG: no end-of-image marker (FFD9) after the image data"
        elif data.startswith(_PNG_MAGIC):
            for _ in _png_chunks(data):
                pass
    except ValueError as e:
        return str(e)
    return None


def _read_complete(path: str | os.PathLike) -> bytes:
    """The file's bytes; :class:`ImageDecodeError` if it is unreadable, empty or truncated."""
    data = _read_bytes(path)
    if not data:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    reason = _check_complete(data)
    if reason is not None:
        raise ImageDecodeError(path, reason)
    return data


def _to_uint8(image: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # round(x * 255 / 65535) in integers: 65535 -> 255, 257 -> 1, 128 -> 0.
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.dtype.kind == "f":
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageDecodeError(path, f"unsupported sample type {image.dtype} (expected 8/16-bit)")


def _check_pixels(path: str | os.PathLike, size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(
            path,
            f"{size[1]} x {size[0]} pixels is more than the limit of {max_pixels:,} "
            "(a decompression bomb, or pass a larger max_pixels)",
        )


def load_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> UInt8[np.ndarray, "H W 3"]:
    """Reads an image file as ``uint8`` RGB.

    The EXIF orientation is applied, grayscale is expanded to three channels, alpha is
    dropped, CMYK is converted, 16-bit samples are scaled to 8 bits (see the module
    docstring for why each choice was made).

    Args:
      path: Image file (JPEG, PNG, WebP, TIFF, BMP... whatever OpenCV reads).
      max_pixels: Refuse images with more pixels (None: no limit).

    Returns:
      The image, ``(H, W, 3)`` ``uint8``, RGB, in display orientation.

    Raises:
      ImageDecodeError: The file is missing, unreadable, empty, truncated, not an image,
        or too large; the message names the file and the reason.
    """
    data = _read_complete(path)
    header_size = _header_size(data)
    if header_size is not None:
        _check_pixels(path, header_size, max_pixels)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as e:
        raise ImageDecodeError(path, f"OpenCV failed to decode it ({e.err})") from e
    if image is None or image.size == 0:
        raise ImageDecodeError(
            path, f"not an image format OpenCV can decode (file starts with {data[:8]!r})"
        )
    if image.ndim != 3 or image.shape[2] != 3:  # IMREAD_COLOR promises 3 channels
        raise ImageDecodeError(path, f"decoded to unexpected shape {image.shape}")
    _check_pixels(path, image.shape[:2], max_pixels)
    return cv2.cvtColor(_to_uint8(image, path), cv2.COLOR_BGR2RGB)


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (1-8) of IFD0 in EXIF TIFF data; 1 if absent or malformed."""
    if tiff[:4] == b"II*\x00":
        order = "little"
    elif tiff[:4] == b"MM\x00*":
        order = "big"
    else:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return 1
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION_TAG:
            if int.from_bytes(tiff[entry + 2 : entry + 4], order) != 3:  # SHORT
                return 1
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) in display orientation from a JPEG/PNG header; None if unsure."""
    try:
        if data.startswith(_JPEG_MAGIC):
            size, orientation = None, 1
            for marker, start, end in _jpeg_segments(data):
                if marker == 0xE1 and data[start : start + 6] == b"Exif\x00\x00":
                    orientation = _exif_orientation(data[start + 6 : end])
                elif marker in _SOF_MARKERS and size is None and end - start >= 5:
                    size = (
                        int.from_bytes(data[start + 1 : start + 3], "big"),
                        int.from_bytes(data[start + 3 : start + 5], "big"),
                    )
            if size is None or 0 in size:
                return None
            # Orientations 5-8 involve a transpose.
            return (size[1], size[0]) if orientation >= 5 else size
        if data.startswith(_PNG_MAGIC):
            size = None
            for kind, start, _ in _png_chunks(data):
                if kind == b"IHDR":
                    size = (
                        int.from_bytes(data[start + 4 : start + 8], "big"),
                        int.from_bytes(data[start : start + 4], "big"),
                    )
                elif kind == b"eXIf":  # may carry an orientation: let OpenCV decide
                    return None
                elif kind == b"IDAT":
                    return size
    except ValueError:
        return None
    return None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """The ``(height, width)`` that :func:`load_image` would return, cheaply if possible.

    JPEG and PNG sizes are read from the header (JPEG: the frame header and the EXIF
    orientation, which swaps height and width for orientations 5-8); other formats, and
    headers this parser is unsure about, are decoded.

    Args:
      path: Image file.

    Returns:
      ``(height, width)`` in pixels, in display orientation.

    Raises:
      ImageDecodeError: As :func:`load_image`.
    """
    data = _read_complete(path)
    size = _header_size(data)
    if size is not None:
        return size
    height, width = load_image(path).shape[:2]
    return height, width


def resize_max_side(
    image: Shaped[np.ndarray, "H W *C"], max_side: int | None, *, upscale: bool = True
) -> Shaped[np.ndarray, "h w *C"]:
    """Resizes so that the longer side equals ``max_side``, keeping the aspect ratio.

    The shorter side is ``round(side * max_side / longer_side)`` (at least 1).
    ``cv2.INTER_AREA`` is used when shrinking (it averages, so no aliasing) and
    ``cv2.INTER_LINEAR`` when enlarging.

    By default images smaller than ``max_side`` are **enlarged**, so every output has the
    same longer side (few distinct shapes to compile). Note that cirtorch's ``imresize``
    (PIL ``thumbnail``) only ever shrinks; pass ``upscale=False`` to reproduce it, e.g.
    for small query crops in the revisited Oxford/Paris protocol.

    Args:
      image: ``(H, W)`` or ``(H, W, C)`` array of a dtype OpenCV resizes (uint8, float32...).
      max_side: Target length of the longer side; None returns the image unchanged.
      upscale: Enlarge images whose longer side is below ``max_side``.

    Returns:
      The resized image (the input itself if no resize is needed), same dtype and channels.

    Raises:
      ValueError: ``max_side`` is not a positive integer, or the image is empty.

    Example:
      >>> resize_max_side(np.zeros((480, 640, 3), np.uint8), 224).shape
      (168, 224, 3)
      >>> resize_max_side(np.zeros((100, 50, 3), np.uint8), 224, upscale=False).shape
      (100, 50, 3)
    """
    if max_side is None:
        return image
    if isinstance(max_side, bool) or not isinstance(max_side, int | np.integer) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}.")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"cannot resize an empty image of shape {image.shape}.")
    scale = max_side / max(height, width)
    if scale == 1.0 or (scale > 1.0 and not upscale):
        return image
    new_height = max(1, math.floor(height * scale + 0.5))
    new_width = max(1, math.floor(width * scale + 0.5))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    if image.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel axis
        resized = resized[:, :, None]  # (h, w, 1)
    return resized


def normalize_image(
    image: UInt8[np.ndarray, "H W 3"],
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Float32[np.ndarray, "H W 3"]:
    """Scales to [0, 1] and standardises each channel: ``(x / 255 - mean) / std``.

    Args:
      image: ``uint8`` RGB image.
      mean: Per-channel mean, in [0, 1] units, RGB order.
      std: Per-channel standard deviation, in [0, 1] units.

    Returns:
      ``float32`` ``(H, W, 3)``.

    Raises:
      TypeError: The image is not ``uint8``.
      ValueError: ``mean`` or ``std`` does not have 3 entries, or ``std`` has a zero.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"normalize_image expects a uint8 image, got dtype {image.dtype}.")
    mean_array = np.asarray(mean, np.float32)
    std_array = np.asarray(std, np.float32)
    if mean_array.shape != (3,) or std_array.shape != (3,):
        raise ValueError(
            f"mean and std need 3 entries, got shapes {mean_array.shape} and {std_array.shape}."
        )
    if np.any(std_array == 0):
        raise ValueError(f"std must be non-zero, got {tuple(std)}.")
    scaled = image.astype(np.float32) / np.float32(255.0)
    return (scaled - mean_array) / std_array  # (H, W, 3)


def crop_to_box(
    image: Shaped[np.ndarray, "H W *C"], bbx: Sequence[numbers.Real] | np.ndarray
) -> Shaped[np.ndarray, "h w *C"]:
    """Crops to a box ``(x1, y1, x2, y2)`` in pixels, as revisitop/cirtorch do.

    Coordinates are rounded as PIL's ``Image.crop`` rounds them (Python ``round``), then
    ``x2, y2`` are exclusive. The box is clipped to the image and keeps at least one pixel
    in each direction, so a box touching or leaving the border still gives an image.

    Args:
      image: ``(H, W)`` or ``(H, W, C)``.
      bbx: ``(x1, y1, x2, y2)``; floats allowed.

    Returns:
      A view of the cropped region.

    Raises:
      ValueError: ``bbx`` does not have 4 finite numbers, or ``x2 < x1`` or ``y2 < y1``.

    Example:
      >>> image = np.arange(12).reshape(3, 4)
      >>> crop_to_box(image, (0.6, 0.4, 3.2, 2.0))  # rounds to (1, 0, 3, 2)
      array([[1, 2],
             [5, 6]])
    """
    values = [float(v) for v in bbx]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"bbx must be 4 finite numbers (x1, y1, x2, y2), got {bbx!r}.")
    x1, y1, x2, y2 = (round(v) for v in values)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"bbx must have x1 <= x2 and y1 <= y2, got {bbx!r}.")
    height, width = image.shape[:2]
    x1 = min(max(x1, 0), width - 1)
    y1 = min(max(y1, 0), height - 1)
    x2 = min(max(x2, x1 + 1), width)
    y2 = min(max(y2, y1 + 1), height)
    return image[y1:y2, x1:x2]


def scaled_images(
    image: UInt8[np.ndarray, "H W 3"],
    *,
    max_side: int | None,
    scales: Sequence[float] = (1.0,),
    upscale: bool = True,
) -> list[UInt8[np.ndarray, "h w 3"]]:
    """The image resized to ``max_side * s`` for each scale ``s`` (longer side).

    Args:
      image: RGB image.
      max_side: Longer side at scale 1; None keeps the image's own size at scale 1.
      scales: Relative scales, e.g. 1, 1/sqrt(2), 1/2 (cirtorch's multi-scale).
      upscale: Enlarge images smaller than ``max_side`` (global extraction does, for few
        distinct shapes); without it scale 1 is the image's own size when smaller, as
        cirtorch's ``imresize`` and DSM do.

    Returns:
      One image per scale, in order.
    """
    longer = max(image.shape[:2])
    base = longer if max_side is None or (not upscale and longer < max_side) else max_side
    return [resize_max_side(image, max(1, round(base * scale))) for scale in scales]


def load_scaled(
    path: str | os.PathLike,
    *,
    max_side: int | None,
    scales: Sequence[float] = (1.0,),
    box: Sequence[numbers.Real] | None = None,
    upscale: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[UInt8[np.ndarray, "h w 3"]]:
    """Decodes, crops to ``box`` (if any) and resizes for each scale: the one input path.

    Global extraction, DSM's activation features and the training pipeline all read
    images through this function, so they see the same pixels.

    Raises:
      ImageDecodeError: As :func:`load_image`.
    """
    image = load_image(path, max_pixels=max_pixels)
    if box is not None:
        image = crop_to_box(image, box)
    return scaled_images(image, max_side=max_side, scales=scales, upscale=upscale)
