import pathlib

import cv2
import numpy as np
import pytest

from jaxretrieval.data import images, labelled, training_pipeline, tuple_mining
from jaxretrieval.data.training_pipeline import Augmentation

MEAN = (0.5, 0.25, 0.75)
STD = (0.2, 0.3, 0.4)
SIZE = 32


def write_image(path, image):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(path.suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buffer.tobytes())
    return path


def textured(rng, height, width):
    """Smooth random texture (blurred noise), so that warps keep it recognisable."""
    noise = rng.uniform(0, 255, size=(height // 10 + 2, width // 10 + 2, 3)).astype(np.float32)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0, 255).astype(np.uint8)


def horizontal_ramp(height, width):
    """Red channel = column position, 0 at the left to 255 at the right; others constant."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.round(np.linspace(0, 255, width))[None, :]
    image[..., 1] = 128
    return image


@pytest.fixture
def tiny_set(tmp_path):
    """5 scenes of 1-3 PNG images of various shapes, at most 60 pixels a side."""
    rng = np.random.default_rng(0)
    shapes = [(100, 50), (40, 60), (48, 48), (30, 20), (60, 45), (20, 60), (50, 50), (36, 44)]
    scenes = [0, 0, 1, 1, 1, 2, 3, 4]
    paths = []
    for k, (shape, scene) in enumerate(zip(shapes, scenes, strict=True)):
        paths.append(str(write_image(tmp_path / f"s{scene}" / f"{k}.png", textured(rng, *shape))))
    return labelled.LabelledImages(
        paths=tuple(paths), scenes=np.array(scenes), scene_names=("a", "b", "c", "d", "e")
    )


def some_tuples(data, num_tuples=6, num_negatives=2, seed=0):
    descriptors = np.random.default_rng(seed).normal(size=(len(data), 4)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return tuple_mining.mine_tuples(
        data, descriptors, num_tuples=num_tuples, num_negatives=num_negatives, seed=seed
    )


def augmented_tuples(data, *, num_tuples, num_negatives):
    """:func:`some_tuples` of ``data`` and their dataset: SIZE px, MEAN and STD, seed 0, epoch 0."""
    tuples = some_tuples(data, num_tuples=num_tuples, num_negatives=num_negatives)
    dataset = training_pipeline.tuple_dataset(
        data,
        tuples,
        augmentation=Augmentation(image_size=SIZE),
        mean=MEAN,
        std=STD,
        seed=0,
        epoch=0,
    )
    return tuples, dataset


def assert_elements_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# ---------------------------------------------------------------------- Augmentation


def test_augmentation_none_known_values(tiny_set):
    # Image 0 is 100 x 50 (height x width): at S=64 it becomes 64 x 32.
    dataset = training_pipeline.single_image_dataset(
        tiny_set, [0, 1], augmentation=Augmentation.none(64), mean=MEAN, std=STD, seed=0, epoch=0
    )
    element = dataset[0]
    assert element["image_size"].tolist() == [64, 32] and element["image_size"].dtype == np.int32
    expected = images.normalize_image(
        images.load_scaled(tiny_set.paths[0], max_side=64)[0], mean=MEAN, std=STD
    )
    np.testing.assert_array_equal(element["image"][:64, :32], expected)
    assert not element["image"][:, 32:].any()
    # Image 1 is 40 x 60: enlarged to 43 x 64 (40 * 64 / 60 = 42.7).
    assert dataset[1]["image_size"].tolist() == [43, 64]
    assert element["label"].dtype == np.int32 and element["label"].shape == ()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("image_size", 0, "image_size must be >= 1"),
        ("min_scale", 0.0, "min_scale must be in \\(0, 1\\]"),
        ("crop_fraction", 1.5, "crop_fraction must be in \\(0, 1\\]"),
        ("color_jitter", 1.0, "color_jitter must be in \\[0, 1\\)"),
        ("homography_jitter", 0.5, "homography_jitter must be in \\[0, 0.5\\)"),
    ],
)
def test_augmentation_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        Augmentation(**{field: value})


def ramp_set(tmp_path, height=40, width=40):
    path = write_image(tmp_path / "ramp" / "ramp.png", horizontal_ramp(height, width))
    return labelled.LabelledImages(paths=(str(path),), scenes=np.array([0]), scene_names=("r",))


def red_channel(element):
    """The red channel of the image in [0, 255] units, cut to its real size."""
    height, width = element["image_size"].tolist()
    return (element["image"][:height, :width, 0] * STD[0] + MEAN[0]) * 255


def test_crop_keeps_at_least_the_fraction_and_scale_stays_in_range(tmp_path):
    data = ramp_set(tmp_path)
    augmentation = Augmentation(image_size=SIZE, min_scale=0.5, crop_fraction=0.6, color_jitter=0.0)
    dataset = training_pipeline.single_image_dataset(
        data, np.zeros(24, int), augmentation=augmentation, mean=MEAN, std=STD, seed=1, epoch=0
    )
    lefts, spans, longer = [], [], []
    for i in range(len(dataset)):
        element = dataset[i]
        red = red_channel(element)
        lefts.append(red[:, 0].mean())
        spans.append(red[:, -1].mean() - red[:, 0].mean())
        longer.append(element["image_size"].max())
    spans, lefts = np.array(spans), np.array(lefts)
    # The crop keeps >= 60% of the width (255 * 0.6 = 153; resampling blurs the ends a bit).
    assert spans.min() > 0.6 * 255 * 0.9 and spans.max() < 255.5
    assert spans.min() < 0.9 * 255  # and it does crop
    assert lefts.max() > 10  # crops do not all start at the left edge
    assert min(longer) >= round(0.5 * SIZE) and max(longer) <= SIZE
    assert len(set(longer)) > 3


def test_flip(tmp_path):
    data = ramp_set(tmp_path)
    for flip in (False, True):
        augmentation = Augmentation(
            image_size=SIZE, min_scale=1.0, crop_fraction=1.0, flip=flip, color_jitter=0.0
        )
        dataset = training_pipeline.single_image_dataset(
            data, np.zeros(16, int), augmentation=augmentation, mean=MEAN, std=STD, seed=0, epoch=0
        )
        flipped = []
        for i in range(len(dataset)):
            red = red_channel(dataset[i])
            flipped.append(bool(red[:, 0].mean() > red[:, -1].mean()))
        assert any(flipped) == flip and all(flipped) is False


def test_color_jitter_changes_brightness_within_bounds(tmp_path):
    data = ramp_set(tmp_path)
    augmentation = Augmentation(image_size=SIZE, min_scale=1.0, crop_fraction=1.0, color_jitter=0.2)
    dataset = training_pipeline.single_image_dataset(
        data, np.zeros(12, int), augmentation=augmentation, mean=MEAN, std=STD, seed=0, epoch=0
    )
    reference = red_channel(
        training_pipeline.single_image_dataset(
            data, [0], augmentation=Augmentation.none(SIZE), mean=MEAN, std=STD, seed=0, epoch=0
        )[0]
    ).mean()
    means = np.array([red_channel(dataset[i]).mean() for i in range(len(dataset))])
    # b * mean(x) with b in [0.8, 1.2]: the mean moves, and stays within the factor.
    assert np.ptp(means) > 5
    assert ((means > 0.8 * reference - 1) & (means < 1.2 * reference + 1)).all()


# ---------------------------------------------------------------------- tuple_dataset


def test_tuple_dataset_shapes_dtypes_and_padding(tiny_set):
    tuples, dataset = augmented_tuples(tiny_set, num_tuples=6, num_negatives=2)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        element = dataset[i]
        assert element["images"].shape == (4, SIZE, SIZE, 3)
        assert element["images"].dtype == np.float32
        assert element["image_sizes"].shape == (4, 2) and element["image_sizes"].dtype == np.int32
        assert element["scenes"].dtype == np.int32
        np.testing.assert_array_equal(element["scenes"], tiny_set.scenes[tuples.indices[i]])
        for image, (height, width) in zip(element["images"], element["image_sizes"], strict=True):
            assert 1 <= height <= SIZE and 1 <= width <= SIZE
            assert max(height, width) >= round(0.7 * SIZE)
            assert not image[height:].any() and not image[:, width:].any()
            assert np.abs(image[:height, :width]).sum(axis=-1).min() > 0  # real pixels


def test_tuple_dataset_deterministic_and_resumable(tiny_set):
    tuples = some_tuples(tiny_set, num_tuples=6)
    kwargs = dict(augmentation=Augmentation(image_size=SIZE), mean=MEAN, std=STD, seed=3)
    dataset = training_pipeline.tuple_dataset(tiny_set, tuples, epoch=1, **kwargs)
    rebuilt = training_pipeline.tuple_dataset(tiny_set, tuples, epoch=1, **kwargs)
    assert_elements_equal(dataset[4], dataset[4])
    assert_elements_equal(dataset[4], rebuilt[4])
    tail = dataset[2:]
    assert len(tail) == 4
    for j in range(len(tail)):
        assert_elements_equal(tail[j], dataset[2 + j])
    other_epoch = training_pipeline.tuple_dataset(tiny_set, tuples, epoch=2, **kwargs)
    assert not np.array_equal(other_epoch[4]["images"], dataset[4]["images"])


def test_batches_match_elements_and_resume(tiny_set):
    tuples, dataset = augmented_tuples(tiny_set, num_tuples=7, num_negatives=1)
    threaded = list(training_pipeline.batches(dataset, batch_size=2, num_threads=2))
    assert len(threaded) == 3  # 7 // 2: the last partial batch is dropped
    first = threaded[0]
    assert first["images"].shape == (2, 3, SIZE, SIZE, 3)
    assert first["image_sizes"].shape == (2, 3, 2) and first["scenes"].shape == (2, 3)
    for b, batch in enumerate(threaded):
        for k in range(2):
            assert_elements_equal(
                {key: value[k] for key, value in batch.items()}, dataset[2 * b + k]
            )
    resumed = list(training_pipeline.batches(dataset, batch_size=2, start_batch=1, num_threads=0))
    assert len(resumed) == 2
    for batch, expected in zip(resumed, threaded[1:], strict=True):
        assert_elements_equal(batch, expected)
    assert list(training_pipeline.batches(dataset, batch_size=2, start_batch=3)) == []
    with pytest.raises(ValueError, match="start_batch must be in \\[0, 3\\]"):
        training_pipeline.batches(dataset, batch_size=2, start_batch=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        training_pipeline.batches(dataset, batch_size=0)


def test_synthetic_positive_is_a_similar_warp(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(4):
        write_image(tmp_path / "photos" / f"{k}.png", textured(rng, 48, 48))
    data = labelled.from_unlabelled_folder(tmp_path / "photos")
    tuples = tuple_mining.mine_tuples(
        data, np.eye(4, dtype=np.float32), num_tuples=4, num_negatives=1, seed=0
    )
    warp_only = Augmentation(
        image_size=48, min_scale=1.0, crop_fraction=1.0, color_jitter=0.0, homography_jitter=0.15
    )
    dataset = training_pipeline.tuple_dataset(
        data, tuples, augmentation=warp_only, mean=MEAN, std=STD, seed=0, epoch=0
    )
    for i in range(len(dataset)):
        query, positive, negative = dataset[i]["images"]
        assert not np.allclose(query, positive)
        similar = np.corrcoef(query.reshape(-1), positive.reshape(-1))[0, 1]
        unrelated = np.corrcoef(query.reshape(-1), negative.reshape(-1))[0, 1]
        assert similar > 0.5 and similar > unrelated + 0.2
    # Without augmentation the synthetic positive is the query itself.
    plain = training_pipeline.tuple_dataset(
        data, tuples, augmentation=Augmentation.none(48), mean=MEAN, std=STD, seed=0, epoch=0
    )[0]["images"]
    np.testing.assert_array_equal(plain[0], plain[1])


def test_single_image_dataset(tiny_set):
    indices = np.array([7, 2, 5])
    dataset = training_pipeline.single_image_dataset(
        tiny_set, indices, augmentation=Augmentation(image_size=SIZE), seed=0, epoch=0
    )
    assert len(dataset) == 3
    element = dataset[1]
    assert element["image"].shape == (SIZE, SIZE, 3) and element["image"].dtype == np.float32
    assert element["image_size"].shape == (2,) and int(element["label"]) == 1
    assert_elements_equal(dataset[1:][0], element)
    batch = next(iter(training_pipeline.batches(dataset, batch_size=3, num_threads=1)))
    assert batch["image"].shape == (3, SIZE, SIZE, 3) and batch["label"].tolist() == [4, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(epoch=-2), "epoch must be a non-negative integer"),
        (dict(mean=(0.5, 0.5)), "mean and std need 3 entries"),
        (dict(std=(1.0, 0.0, 1.0)), "std must be non-zero"),
    ],
)
def test_tuple_dataset_raises(tiny_set, kwargs, match):
    arguments = dict(augmentation=Augmentation(image_size=SIZE), seed=0, epoch=0) | kwargs
    with pytest.raises(ValueError, match=match):
        training_pipeline.tuple_dataset(tiny_set, some_tuples(tiny_set), **arguments)


def test_tuple_dataset_raises_on_bad_indices(tiny_set):
    bad = tuple_mining.Tuples(indices=np.array([[0, 1, 8]], np.int32))
    with pytest.raises(ValueError, match="holds index 8, outside \\[0, 8\\)"):
        training_pipeline.tuple_dataset(
            tiny_set, bad, augmentation=Augmentation(image_size=SIZE), seed=0, epoch=0
        )
    with pytest.raises(ValueError, match="must be a 2-D integer array"):
        training_pipeline.tuple_dataset(
            tiny_set, tuple_mining.Tuples(indices=np.array([0, 1])),
            augmentation=Augmentation(image_size=SIZE), seed=0, epoch=0,
        )  # fmt: skip


# ---------------------------------------------------------------------- bad images


def test_unreadable_image_names_the_file(tiny_set):
    bad_path = pathlib.Path(tiny_set.paths[3])
    bad_path.write_bytes(bad_path.read_bytes()[:-20])  # truncated PNG
    tuples = tuple_mining.Tuples(indices=np.array([[2, 3, 0], [0, 1, 2]], np.int32))
    dataset = training_pipeline.tuple_dataset(
        tiny_set, tuples, augmentation=Augmentation(image_size=SIZE), seed=0, epoch=0
    )
    with pytest.raises(images.ImageDecodeError, match="3.png") as error:
        dataset[0]
    assert error.value.path == str(bad_path)
    iterator = iter(training_pipeline.batches(dataset, batch_size=1, num_threads=2))
    with pytest.raises(images.ImageDecodeError, match="3.png"):
        next(iterator)
    iterator.close()


def test_check_images(tiny_set):
    assert training_pipeline.check_images(tiny_set) == []
    truncated = pathlib.Path(tiny_set.paths[1])
    truncated.write_bytes(truncated.read_bytes()[:-20])
    not_an_image = pathlib.Path(tiny_set.paths[4])
    not_an_image.write_bytes(b"hello, not an image")
    missing = pathlib.Path(tiny_set.paths[6])
    missing.unlink()
    for num_threads in (1, 3):
        problems = training_pipeline.check_images(tiny_set, num_threads=num_threads)
        assert [path for path, _ in problems] == [str(truncated), str(not_an_image), str(missing)]
        reasons = [reason for _, reason in problems]
        assert "truncated PNG" in reasons[0] and "does not exist" in reasons[2]
