"""tensorflow-datasets without TensorFlow: build array_record files, read with tfds.data_source
and grain (jaxretrieval.data.tfds_builder), on the shipped landmarks_mini set."""

import importlib.util
import socket
import sys

import cv2
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the 'tfds' extra is not installed")

from jaxretrieval.data import images, labelled, tfds_builder, training_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """TFDS must not reach GCS or GitHub: any connection fails the test."""

    def refuse(address, *args, **kwargs):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def landmarks_mini(shared_data):
    return shared_data / "landmarks_mini"


def test_tensorflow_is_not_installed_nor_imported():
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def test_a_revisitop_folder_round_trips_losslessly(landmarks_mini, tmp_path):
    source = tfds_builder.labelled_source(landmarks_mini)
    report = tfds_builder.build_tfds_dataset(
        source, name="landmarks_mini", data_dir=tmp_path, encoding="png"
    )
    assert report.num_examples == len(source) == 29 and report.skipped == []
    assert sorted(p.name for p in report.dataset_dir.glob("*.array_record*"))
    assert "tensorflow" not in sys.modules
    data_source = tfds_builder.load_data_source("landmarks_mini", tmp_path)
    assert data_source is not None and len(data_source) == 29
    # tfds.data_source itself, as a user would call it.
    same = tfds.data_source("landmarks_mini", data_dir=str(tmp_path), split="train")
    assert len(same) == 29
    names = tfds.builder_from_directory(str(report.dataset_dir)).info.features["label"].names
    assert tuple(names) == source.scene_names
    for i in (0, 13, 28):
        record = data_source[i]
        path = source.paths[i]
        assert record["name"].decode() == path.rsplit("/", 1)[1]  # relative to images/
        assert record["label"] == source.scenes[i]
        np.testing.assert_array_equal(record["image"], images.load_image(path))  # lossless
    assert "tensorflow" not in sys.modules


def test_a_labelled_csv_feeds_grain_batches(landmarks_mini, tmp_path):
    source = tfds_builder.labelled_source(landmarks_mini / "labels.csv", scene_column="landmark")
    report = tfds_builder.build_tfds_dataset(
        source, name="landmarks_csv", data_dir=tmp_path, max_side=96, jpeg_quality=90
    )
    assert report.num_examples == 29
    data_source = tfds_builder.load_data_source("landmarks_csv", tmp_path)
    record = data_source[0]
    assert record["image"].dtype == np.uint8 and max(record["image"].shape[:2]) == 96
    original = images.resize_max_side(images.load_image(source.paths[0]), 96, upscale=False)
    assert record["image"].shape == original.shape
    assert np.abs(record["image"].astype(int) - original).mean() < 8  # JPEG quality 90
    dataset = tfds_builder.grain_dataset(data_source, image_size=64)
    iterator = iter(training_pipeline.batches(dataset, batch_size=8, num_threads=2))
    batch = next(iterator)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image_size"].shape == (8, 2) and batch["image_size"].max() == 64
    np.testing.assert_array_equal(batch["label"], source.scenes[:8])
    # Same element format as the path-based loader.
    reference = training_pipeline.single_image_dataset(
        source, [0], augmentation=training_pipeline.Augmentation.none(64), seed=0, epoch=0
    )[0]
    assert set(reference) == set(batch) and reference["image"].shape == batch["image"][0].shape
    assert len(list(iterator)) == 2  # 29 images: 3 full batches of 8


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    good = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "a.jpg"), good)
    cv2.imwrite(str(folder / "b.png"), good[:, :, 0])  # grayscale: stored as RGB
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "labels.csv").write_text("image,scene\na.jpg,x\nb.png,x\nempty.jpg,y\ntext.jpg,y\n")
    source = tfds_builder.labelled_source(folder / "labels.csv")
    report = tfds_builder.build_tfds_dataset(source, name="bad_inputs", data_dir=tmp_path / "t")
    assert report.num_examples == 2
    assert [(p.rsplit("/", 1)[1], r) for p, r in report.skipped] == [
        ("empty.jpg", "file is empty (0 bytes)"),
        ("text.jpg", "not an image format OpenCV can decode (file starts with b'not an i')"),
    ]
    data_source = tfds_builder.load_data_source("bad_inputs", tmp_path / "t")
    assert data_source[1]["image"].shape == (20, 30, 3)
    again = tfds_builder.build_tfds_dataset(source, name="bad_inputs", data_dir=tmp_path / "t")
    assert again.reused and again.num_examples == 2


def test_bad_arguments_are_refused(tmp_path):
    images_set = labelled.LabelledImages(
        paths=("a.jpg",), scenes=np.zeros(1, np.int32), scene_names=("x",)
    )
    with pytest.raises(ValueError, match="lower-case snake case"):
        tfds_builder.build_tfds_dataset(images_set, name="gldv2-index", data_dir=tmp_path)
    with pytest.raises(ValueError, match="encoding must be one of"):
        tfds_builder.build_tfds_dataset(images_set, name="x", data_dir=tmp_path, encoding="gif")
    with pytest.raises(ValueError, match="holds no gnd_"):
        tfds_builder.labelled_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfds_builder.labelled_source(tmp_path / "nothing.csv")
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        tfds_builder.build_tfds_dataset(images_set, name="x", data_dir=tmp_path)
    assert [p.name for p in tmp_path.rglob("*")] == ["x"]  # nothing half-written left behind
