import math
import pickle
import struct

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxretrieval.data import images

# Distinct colours, RGB, for a 2x3 image: every pixel identifiable after a rotation.
COLOURS_2X3 = np.array(
    [
        [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
        [[255, 255, 255], [0, 0, 0], [128, 128, 128]],
    ],
    np.uint8,
)

# What a viewer shows for each EXIF orientation, from the stored pixels (EXIF 2.3, tag 274).
ORIENTATIONS = {
    1: lambda x: x,
    2: lambda x: x[:, ::-1],  # mirrored horizontally
    3: lambda x: x[::-1, ::-1],  # rotated 180
    4: lambda x: x[::-1, :],  # mirrored vertically
    5: lambda x: x.transpose(1, 0, 2),  # mirrored horizontally, then rotated 270 CW
    6: lambda x: np.rot90(x, k=-1),  # rotated 90 CW
    7: lambda x: x[::-1, ::-1].transpose(1, 0, 2),  # mirrored horizontally, rotated 90 CW
    8: lambda x: np.rot90(x, k=1),  # rotated 270 CW
}


def encode(rgb: np.ndarray, ext: str, params=()) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buffer = cv2.imencode(ext, bgr, list(params))
    assert ok
    return buffer.tobytes()


def lossless_jpeg_params():
    return [
        cv2.IMWRITE_JPEG_QUALITY,
        100,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]


def with_exif_orientation(jpeg: bytes, orientation: int, *, big_endian: bool = True) -> bytes:
    """Inserts an APP1 EXIF segment holding only IFD0 with the orientation tag (0x0112)."""
    order = ">" if big_endian else "<"
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", 8)
    tiff += struct.pack(order + "H", 1)  # one IFD entry
    tiff += struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)  # SHORT, count 1
    tiff += struct.pack(order + "I", 0)  # no next IFD
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def assert_close(actual, expected, atol):
    np.testing.assert_allclose(actual.astype(int), np.asarray(expected).astype(int), atol=atol)


# ---------------------------------------------------------------------- load_image: colours


def test_load_image_png_keeps_rgb_order(tmp_path):
    path = write(tmp_path / "colours.png", encode(COLOURS_2X3, ".png"))
    image = images.load_image(path)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, COLOURS_2X3)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])  # red stays red


def test_load_image_pure_red_jpeg_stays_red(tmp_path):
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    image = images.load_image(write(tmp_path / "red.jpg", encode(red, ".jpg")))
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert_close(image[4, 4], [255, 0, 0], atol=3)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_load_image_grayscale_becomes_three_equal_channels(tmp_path, ext):
    gray = np.array([[0, 60, 120], [180, 240, 255]], np.uint8)
    params = lossless_jpeg_params() if ext == ".jpg" else ()
    image = images.load_image(write(tmp_path / f"gray{ext}", encode(gray, ext, params)))
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert_close(image[..., 0], gray, atol=0 if ext == ".png" else 3)


def test_load_image_drops_alpha(tmp_path):
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[..., :3] = (30, 20, 10)  # BGR of RGB (10, 20, 30)
    bgra[0, 0, 3] = 0  # fully transparent: its colour is kept, not replaced by white
    bgra[0, 1, 3] = 128
    bgra[0, 2, 3] = 255
    ok, buffer = cv2.imencode(".png", bgra)
    assert ok
    image = images.load_image(write(tmp_path / "rgba.png", buffer.tobytes()))
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.broadcast_to([10, 20, 30], (2, 3, 3)))


def test_load_image_scales_16_bit(tmp_path):
    # round(x * 255 / 65535): 65535 -> 255, 1000 -> 4 (x >> 8 would give 3, x % 256 232).
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[0, 0] = (65535, 1000, 0)
    rgb16[1, 2] = (32768, 257, 128)
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    image = images.load_image(write(tmp_path / "deep.png", buffer.tobytes()))
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], [255, 4, 0])
    np.testing.assert_array_equal(image[1, 2], [128, 1, 0])
    np.testing.assert_array_equal(image[0, 1], [0, 0, 0])


def test_load_image_scales_16_bit_grayscale(tmp_path):
    gray16 = np.array([[0, 65535, 1000]], np.uint16)
    ok, buffer = cv2.imencode(".png", gray16)
    assert ok
    image = images.load_image(write(tmp_path / "gray16.png", buffer.tobytes()))
    np.testing.assert_array_equal(image, np.repeat([[[0], [255], [4]]], 3, axis=2))


def test_load_image_cmyk_jpeg(tmp_path):
    pil_image = pytest.importorskip("PIL.Image")
    path = tmp_path / "cmyk.jpg"
    # Pure red in CMYK: no cyan, full magenta and yellow, no black. PIL writes Adobe CMYK.
    pil_image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(path, quality=100)
    with pil_image.open(path) as written:
        assert written.mode == "CMYK"
    image = images.load_image(path)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert_close(image, np.broadcast_to([255, 0, 0], (2, 3, 3)), atol=3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_applies_exif_orientation(tmp_path, orientation):
    jpeg = encode(COLOURS_2X3, ".jpg", lossless_jpeg_params())
    data = with_exif_orientation(jpeg, orientation, big_endian=orientation % 2 == 0)
    path = write(tmp_path / f"exif{orientation}.jpg", data)
    image = images.load_image(path)
    expected = ORIENTATIONS[orientation](COLOURS_2X3)
    assert image.shape == expected.shape  # 6: the 2x3 image comes back 3x2
    assert_close(image, expected, atol=3)
    assert images.image_size(path) == expected.shape[:2]


def test_load_image_orientation_6_by_hand(tmp_path):
    data = with_exif_orientation(encode(COLOURS_2X3, ".jpg", lossless_jpeg_params()), 6)
    image = images.load_image(write(tmp_path / "rot.jpg", data))
    # Rotated 90 degrees clockwise: the stored bottom-left pixel (white) is now top-left.
    expected = [
        [[255, 255, 255], [255, 0, 0]],
        [[0, 0, 0], [0, 255, 0]],
        [[128, 128, 128], [0, 0, 255]],
    ]
    assert_close(image, expected, atol=3)


def test_load_image_non_ascii_path(tmp_path):
    path = write(tmp_path / "café_图像.png", encode(COLOURS_2X3, ".png"))
    np.testing.assert_array_equal(images.load_image(path), COLOURS_2X3)
    np.testing.assert_array_equal(images.load_image(str(path)), COLOURS_2X3)


def test_load_image_accepts_bytes_after_jpeg_end(tmp_path):
    data = encode(COLOURS_2X3, ".jpg", lossless_jpeg_params()) + b"\x00" * 16 + b"trailer"
    image = images.load_image(write(tmp_path / "trailer.jpg", data))
    assert_close(image, COLOURS_2X3, atol=3)


def test_load_image_jpeg_thumbnail_end_marker_does_not_hide_truncation(tmp_path):
    # An EXIF thumbnail is a whole JPEG (with its own FFD9) inside APP1, before the main scan.
    thumbnail = encode(COLOURS_2X3, ".jpg")
    payload = b"Exif\x00\x00" + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    main = encode(np.full((16, 16, 3), 90, np.uint8), ".jpg")
    data = main[:2] + app1 + main[2:]
    assert images.load_image(write(tmp_path / "whole.jpg", data)).shape == (16, 16, 3)
    with pytest.raises(images.ImageDecodeError, match="truncated JPEG"):
        images.load_image(write(tmp_path / "cut.jpg", data[:-2]))


# ---------------------------------------------------------------------- load_image: errors


def _real_jpeg(shared_data) -> bytes:
    return (shared_data / "landmarks_mini/images/eiffel_tower__pixabay_1175022.jpg").read_bytes()


def _noise(shape=(8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_FILES = {
    "zero_byte.jpg": (lambda: b"", "empty"),
    "truncated_jpeg.jpg": (lambda: _first_half(encode(_noise(), ".jpg")), "truncated JPEG"),
    "no_eoi.jpg": (lambda: encode(_noise(), ".jpg")[:-2], "truncated JPEG"),
    "header_only.jpg": (lambda: encode(_noise(), ".jpg")[:40], "truncated JPEG"),
    "truncated_png.png": (lambda: _first_half(encode(_noise(), ".png")), "truncated PNG"),
    "no_iend.png": (lambda: encode(_noise(), ".png")[:-12], "truncated PNG"),
    "text.jpg": (lambda: b"this is a text file, not a JPEG\n", "not an image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_image_bad_file_raises_naming_it(tmp_path, name):
    make, reason = BAD_FILES[name]
    path = write(tmp_path / name, make())
    with pytest.raises(images.ImageDecodeError, match=reason) as info:
        images.load_image(path)
    assert name in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, ValueError)
    with pytest.raises(images.ImageDecodeError, match=reason):
        images.image_size(path)


def test_load_image_real_photo_cut_in_half(tmp_path, shared_data):
    data = _real_jpeg(shared_data)
    path = write(tmp_path / "half_eiffel.jpg", data[: len(data) // 2])
    with pytest.raises(images.ImageDecodeError, match="half_eiffel.jpg.*truncated JPEG"):
        images.load_image(path)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(images.ImageDecodeError, match="nowhere.jpg.*does not exist"):
        images.load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(images.ImageDecodeError, match="nowhere.jpg"):
        images.image_size(tmp_path / "nowhere.jpg")


def test_load_image_directory(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(images.ImageDecodeError, match="folder.jpg.*directory"):
        images.load_image(tmp_path / "folder.jpg")


def test_image_decode_error_pickles():
    error = images.ImageDecodeError("/a/b.jpg", "file is empty (0 bytes)")
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error)
    assert (restored.path, restored.reason) == ("/a/b.jpg", "file is empty (0 bytes)")


# ---------------------------------------------------------------------- image_size


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
def test_image_size_matches_decode(tmp_path, ext):
    path = write(tmp_path / f"odd{ext}", encode(_noise((5, 7, 3)), ext))
    assert images.image_size(path) == (5, 7) == images.load_image(path).shape[:2]


def test_image_size_real_photos_match_labels(shared_data):
    import csv

    folder = shared_data / "landmarks_mini"
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        size = images.image_size(folder / "images" / row["image"])
        assert size == (int(row["height"]), int(row["width"])), row["image"]


# ---------------------------------------------------------------------- resize_max_side


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((4, 6, 3), 3, (2, 3, 3)),  # shrink, landscape
        ((6, 4, 3), 3, (3, 2, 3)),  # shrink, portrait
        ((5, 7, 3), 3, (2, 3, 3)),  # odd: 5 * 3 / 7 = 2.14 -> 2
        ((2, 3, 3), 6, (4, 6, 3)),  # enlarge
        ((1, 8, 3), 4, (1, 4, 3)),  # the short side never reaches 0
        ((4, 6), 3, (2, 3)),  # grayscale without a channel axis
        ((4, 6, 1), 3, (2, 3, 1)),  # a single channel axis is kept
    ],
)
def test_resize_max_side_shapes(shape, max_side, expected):
    image = _noise(shape)
    resized = images.resize_max_side(image, max_side)
    assert resized.shape == expected and resized.dtype == np.uint8


def test_resize_max_side_none_and_same_size_return_input():
    image = _noise((4, 6, 3))
    assert images.resize_max_side(image, None) is image
    assert images.resize_max_side(image, 6) is image


def test_resize_max_side_without_upscale_keeps_small_images():
    image = _noise((2, 3, 3))
    assert images.resize_max_side(image, 6, upscale=False) is image
    assert images.resize_max_side(_noise((4, 6, 3)), 3, upscale=False).shape == (2, 3, 3)


def test_resize_max_side_known_values_area_when_shrinking():
    # INTER_AREA at an integer factor averages blocks: 4x4 -> 2x2 is the mean of each 2x2.
    image = np.array(
        [[0, 4, 8, 8], [4, 8, 8, 8], [100, 100, 20, 20], [100, 100, 20, 24]], np.float32
    )
    resized = images.resize_max_side(image, 2)
    np.testing.assert_allclose(resized, [[4, 8], [100, 21]])


def test_resize_max_side_known_values_linear_when_enlarging():
    # Linear interpolation (half-pixel centres): [0, 8] -> [0, 2, 6, 8].
    image = np.array([[0, 8]], np.float32)
    resized = images.resize_max_side(image, 4)
    assert resized.shape == (2, 4)
    np.testing.assert_allclose(resized, [[0, 2, 6, 8], [0, 2, 6, 8]])


@given(
    shape=st.sampled_from([(3, 5), (5, 3), (7, 7), (2, 8), (8, 1)]),
    max_side=st.integers(1, 12),
)
def test_resize_max_side_keeps_aspect_and_max_side(shape, max_side):
    image = np.zeros((*shape, 3), np.uint8)
    height, width = images.resize_max_side(image, max_side).shape[:2]
    assert max(height, width) == max_side
    assert min(height, width) >= 1
    scale = max_side / max(shape)
    assert abs(height - shape[0] * scale) <= 0.5 + 1e-9 or height == 1
    assert abs(width - shape[1] * scale) <= 0.5 + 1e-9 or width == 1


@pytest.mark.parametrize("max_side", [0, -3, 2.5, True])
def test_resize_max_side_raises(max_side, without_annotation_checks):
    with pytest.raises(ValueError, match="max_side must be a positive integer"):
        images.resize_max_side(_noise((4, 6, 3)), max_side)


# ---------------------------------------------------------------------- normalize_image


def test_normalize_image_known_values():
    image = np.array([[[0, 0, 0], [255, 255, 255], [51, 102, 204]]], np.uint8)
    out = images.normalize_image(image)
    assert out.shape == (1, 3, 3) and out.dtype == np.float32
    expected = [
        [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
        [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
        [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225],
    ]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-6)


def test_normalize_image_custom_constants():
    # EfficientNet-Lite: (x - 127) / 128 is mean 127/255, std 128/255.
    image = np.array([[[0, 127, 255]]], np.uint8)
    out = images.normalize_image(image, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    np.testing.assert_allclose(out[0, 0], [-127 / 128, 0, 1], atol=1e-6)


def test_normalize_image_raises(without_annotation_checks):
    with pytest.raises(TypeError, match="uint8"):
        images.normalize_image(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="3 entries"):
        images.normalize_image(np.zeros((2, 2, 3), np.uint8), mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="non-zero"):
        images.normalize_image(np.zeros((2, 2, 3), np.uint8), std=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------------- crop_to_box


def test_crop_to_box_known_values():
    image = np.arange(5 * 6).reshape(5, 6)
    # round(): x1 1.4 -> 1, y1 0.6 -> 1, x2 4.5 -> 4 (half to even, like PIL), y2 3.2 -> 3.
    np.testing.assert_array_equal(images.crop_to_box(image, (1.4, 0.6, 4.5, 3.2)), image[1:3, 1:4])
    np.testing.assert_array_equal(images.crop_to_box(image, [0, 0, 6, 5]), image)


def test_crop_to_box_matches_pil_crop():
    pil_image = pytest.importorskip("PIL.Image")
    image = _noise((7, 9, 3))
    for box in [(1.4, 0.6, 4.5, 3.2), (2.5, 1.5, 7.5, 6.5), (0.0, 0.0, 9.0, 7.0)]:
        expected = np.asarray(pil_image.fromarray(image).crop(box))
        np.testing.assert_array_equal(images.crop_to_box(image, box), expected)


def test_crop_to_box_clips_and_keeps_one_pixel():
    image = np.arange(5 * 6).reshape(5, 6)
    np.testing.assert_array_equal(images.crop_to_box(image, (-3, -2, 100, 100)), image)
    np.testing.assert_array_equal(images.crop_to_box(image, (2, 2, 2, 2)), image[2:3, 2:3])
    np.testing.assert_array_equal(images.crop_to_box(image, (10, 10, 20, 20)), image[4:5, 5:6])
    assert images.crop_to_box(np.zeros((5, 6, 3)), (1, 1, 3, 4)).shape == (3, 2, 3)


@pytest.mark.parametrize("box", [(3, 1, 2, 4), (1, 4, 3, 2), (0, 0, 1), (0, 0, math.nan, 1)])
def test_crop_to_box_raises(box):
    with pytest.raises(ValueError, match="bbx"):
        images.crop_to_box(np.zeros((5, 6)), box)


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    """A 20000 x 20000 PNG of one colour is ~1 MB on disk but 1.2 GB decoded."""
    import zlib

    path = tmp_path / "bomb.png"
    width = height = 20000
    row = b"\x00" + b"\x00" * (3 * width)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload).to_bytes(4, "big")
        return len(payload).to_bytes(4, "big") + kind + payload + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    assert path.stat().st_size < 2_000_000
    with pytest.raises(images.ImageDecodeError, match="20000 x 20000 pixels is more than"):
        images.load_image(path)
    with pytest.raises(images.ImageDecodeError, match="bomb.png"):
        images.load_scaled(path, max_side=64)


def test_pixel_limit_is_configurable_and_checked_after_decoding_too(tmp_path):
    path = tmp_path / "small.bmp"  # BMP: no header parsed here, checked after decoding
    cv2.imwrite(str(path), np.zeros((30, 40, 3), np.uint8))
    assert images.load_image(path, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(images.ImageDecodeError, match="40 x 30 pixels"):
        images.load_image(path, max_pixels=1199)
    assert images.load_image(path, max_pixels=None).shape == (30, 40, 3)


def test_scaled_images_known_sizes():
    image = np.zeros((300, 400, 3), np.uint8)
    sizes = [x.shape[:2] for x in images.scaled_images(image, max_side=200, scales=(1.0, 0.5))]
    assert sizes == [(150, 200), (75, 100)]
    # Without upscaling a smaller image keeps its own size at scale 1.
    sizes = [
        x.shape[:2]
        for x in images.scaled_images(image, max_side=800, scales=(1.0, 0.5), upscale=False)
    ]
    assert sizes == [(300, 400), (150, 200)]
    sizes = [x.shape[:2] for x in images.scaled_images(image, max_side=800, scales=(1.0,))]
    assert sizes == [(600, 800)]
    assert images.scaled_images(image, max_side=None)[0] is image


def test_load_scaled_crops_before_resizing(tmp_path):
    path = tmp_path / "a.png"
    picture = np.zeros((100, 200, 3), np.uint8)
    picture[:, 100:] = 255
    cv2.imwrite(str(path), picture)
    (right,) = images.load_scaled(path, max_side=50, box=(100, 0, 200, 100))
    assert right.shape == (50, 50, 3) and right.min() == 255
