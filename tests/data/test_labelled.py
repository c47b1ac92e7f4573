import csv
import pathlib
import pickle

import cv2
import numpy as np
import pytest

from jaxretrieval import evaluation, search
from jaxretrieval.data import images, labelled, training_pipeline, tuple_mining


def write_image(path, value=0, size=(6, 8)):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((*size, 3), value, np.uint8)
    ok, buffer = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(buffer.tobytes())
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def scene_folders(tmp_path):
    """root/<scene>/...: a has 3 images, b 2, c 1; plus files that are not images."""
    root = tmp_path / "scenes"
    for scene, count in (("b", 2), ("a", 3), ("c", 1)):
        for k in range(count):
            write_image(root / scene / f"{k}.png", value=10 * k)
    (root / "a" / "notes.txt").write_text("not an image")
    write_image(root / "a" / ".hidden.png")
    write_image(root / "stray.png")  # directly in root: ignored
    (root / "empty").mkdir()
    return root


def make_labelled(scene_of_image, names=None, synthetic=False):
    scene_of_image = np.asarray(scene_of_image)
    num_scenes = int(scene_of_image.max()) + 1
    return labelled.LabelledImages(
        paths=tuple(f"/nowhere/img{i:03d}.png" for i in range(scene_of_image.size)),
        scenes=scene_of_image,
        scene_names=tuple(names or [f"s{s}" for s in range(num_scenes)]),
        synthetic_positives=synthetic,
    )


# ---------------------------------------------------------------------- LabelledImages


def test_labelled_images_fields_and_helpers():
    data = make_labelled([1, 0, 1, 2, 1])
    assert len(data) == 5 and data.num_scenes == 3
    assert data.scenes.dtype == np.int32 and not data.scenes.flags.writeable
    assert data.scene_sizes.tolist() == [1, 3, 1]
    assert data.images_of_scene(1).tolist() == [0, 2, 4]
    assert data.images_of_scene(2).tolist() == [3]
    with pytest.raises(IndexError, match="scene id 3"):
        data.images_of_scene(3)


def test_labelled_images_subset_renumbers_scenes():
    data = make_labelled([1, 0, 1, 2, 1], names=["x", "y", "z"])
    part = data.subset([4, 3, 0])
    assert part.paths == (data.paths[4], data.paths[3], data.paths[0])
    assert part.scene_names == ("y", "z")
    assert part.scenes.tolist() == [0, 1, 0]
    empty = data.subset([])
    assert len(empty) == 0 and empty.num_scenes == 0
    with pytest.raises(ValueError, match="repeat"):
        data.subset([0, 0])
    with pytest.raises(ValueError, match="index 5 is outside"):
        data.subset([5])


@pytest.mark.parametrize(
    ("scenes", "names", "paths", "match"),
    [
        ([0, 1], ["a"], None, "outside \\[0, 1\\)"),
        ([0, 0], ["a", "b"], None, "1 scenes have no image, e.g. 'b'"),
        ([0], ["a"], None, "shape \\(2,\\)"),
        ([0, 1], ["a", "a"], None, "scene name 'a' is listed more than once"),
        ([0, 1], ["a", "b"], ["p", "p"], "path 'p' is listed more than once"),
    ],
)
def test_labelled_images_raises(scenes, names, paths, match):
    with pytest.raises(ValueError, match=match):
        labelled.LabelledImages(
            paths=tuple(paths or ["p0", "p1"]), scenes=np.array(scenes), scene_names=tuple(names)
        )


def test_labelled_images_refuses_float_scenes():
    with pytest.raises(TypeError, match="integer"):
        labelled.LabelledImages(paths=("p",), scenes=np.array([0.0]), scene_names=("a",))


# ---------------------------------------------------------------------- sources


def test_from_scene_folders(scene_folders):
    data = labelled.from_scene_folders(scene_folders)
    assert data.scene_names == ("a", "b", "c")
    assert [pathlib.Path(p).relative_to(scene_folders).as_posix() for p in data.paths] == [
        "a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "c/0.png",
    ]  # fmt: skip
    assert data.scenes.tolist() == [0, 0, 0, 1, 1, 2]
    assert not data.synthetic_positives


def test_from_scene_folders_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        labelled.from_scene_folders(tmp_path / "missing")
    (tmp_path / "scene").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        labelled.from_scene_folders(tmp_path)


def test_from_unlabelled_folder(scene_folders):
    data = labelled.from_unlabelled_folder(scene_folders)
    assert data.synthetic_positives
    assert data.scene_names == ("a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "c/0.png",
                                "stray.png")  # fmt: skip
    assert data.scenes.tolist() == list(range(7))
    assert all(pathlib.Path(p).is_file() for p in data.paths)


def test_from_csv_default_image_dir(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.png"):
        write_image(tmp_path / "images" / name)
    csv_path = write_csv(
        tmp_path / "labels.csv",
        ["image", "scene", "width"],
        [["y.jpg", "s2", 8], ["x.jpg", "s1", 8], ["z.png", "s2", 8]],
    )
    data = labelled.from_csv(csv_path)
    assert data.paths == tuple(str(tmp_path / "images" / n) for n in ("y.jpg", "x.jpg", "z.png"))
    assert data.scene_names == ("s1", "s2")
    assert data.scenes.tolist() == [1, 0, 1]


def test_from_csv_next_to_the_csv_and_google_landmarks_layout(tmp_path):
    write_image(tmp_path / "a.jpg")
    data = labelled.from_csv(write_csv(tmp_path / "l.csv", ["image", "scene"], [["a.jpg", "0"]]))
    assert data.paths == (str(tmp_path / "a.jpg"),)
    # Google Landmarks v2: id without extension, files in a/b/c/<id>.jpg, landmark_id column.
    train = tmp_path / "train"
    for image_id in ("abc123", "f00d42"):
        write_image(train / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
    csv_path = write_csv(
        tmp_path / "train.csv", ["id", "url", "landmark_id"],
        [["abc123", "http://x", "7"], ["f00d42", "http://y", "3"]],
    )  # fmt: skip
    data = labelled.from_csv(
        csv_path, image_dir=train, image_column="id", scene_column="landmark_id"
    )
    assert data.paths[1] == str(train / "f" / "0" / "0" / "f00d42.jpg")
    assert data.scene_names == ("3", "7") and data.scenes.tolist() == [1, 0]


def test_from_csv_extension_added(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "b.png")
    data = labelled.from_csv(
        write_csv(tmp_path / "l.csv", ["image", "scene"], [["a", "0"], ["b", "0"]])
    )
    assert data.paths == (str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "b.png"))


def test_from_csv_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        labelled.from_csv(tmp_path / "none.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv' is empty"):
        labelled.from_csv(empty)
    header_only = write_csv(tmp_path / "header.csv", ["image", "scene"], [])
    with pytest.raises(ValueError, match="header.csv' has a header but no rows"):
        labelled.from_csv(header_only)
    wrong = write_csv(tmp_path / "wrong.csv", ["file", "landmark"], [["a.jpg", "1"]])
    with pytest.raises(ValueError, match=r"wrong.csv' has no column \['image', 'scene'\]; its "
                       r"columns: \['file', 'landmark'\]"):  # fmt: skip
        labelled.from_csv(wrong)
    blank = write_csv(tmp_path / "blank.csv", ["image", "scene"], [["a.jpg", "1"], ["b.jpg", ""]])
    with pytest.raises(ValueError, match="blank.csv' row 3: the 'scene' cell is empty"):
        labelled.from_csv(blank)
    twice = write_csv(tmp_path / "twice.csv", ["image", "scene"], [["a.jpg", "1"], ["a.jpg", "2"]])
    with pytest.raises(ValueError, match="row 3: image 'a.jpg' is already listed in row 2"):
        labelled.from_csv(twice)


def test_from_csv_missing_images_are_listed(tmp_path):
    write_image(tmp_path / "images" / "ok.jpg")
    rows = [["ok.jpg", "s"]] + [[f"gone{k}.jpg", "s"] for k in range(7)]
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "scene"], rows)
    with pytest.raises(FileNotFoundError) as error:
        labelled.from_csv(csv_path)
    message = str(error.value)
    assert "7 of 8 images listed in" in message and "labels.csv" in message
    assert "'gone0.jpg' (row 3)" in message and "'gone4.jpg' (row 7)" in message
    assert "gone5" not in message and "and 2 more" in message


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def test_from_revisitop_merges_scenes(tmp_path):
    # q0 -> a; q1 -> a (easy), b (hard): one scene. q2 -> c. d: distractor, e: junk only.
    # x is both a query and a database image (as in ROxford5k), positive of q2's scene too.
    gnd = {
        "imlist": ["a", "b", "c", "d", "e", "x"],
        "qimlist": ["q0", "q1", "q2", "x"],
        "gnd": [
            {"easy": [0], "hard": [], "junk": [4]},
            {"easy": [0], "hard": [1], "junk": []},
            {"easy": [2], "hard": [], "junk": []},
            {"easy": [], "hard": [2], "junk": [], "bbx": [0, 0, 2, 2]},
        ],
    }
    write_pickle(tmp_path / "gnd_tiny.pkl", gnd)
    for name in gnd["imlist"] + gnd["qimlist"]:
        write_image(tmp_path / "images" / f"{name}.jpg")
    data = labelled.from_revisitop(tmp_path)
    names = [pathlib.Path(p).stem for p in data.paths]
    assert names == ["q0", "q1", "q2", "x", "a", "b", "c"]
    assert data.scene_names == ("q0", "q2")
    assert data.scenes.tolist() == [0, 0, 1, 1, 0, 0, 1]


def test_split_scenes_disjoint_and_deterministic():
    # 30 scenes: 20 with 2-4 images, 10 with one image.
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(2, 5, size=20), np.ones(10, int)])
    data = make_labelled(np.repeat(np.arange(30), sizes))
    train, validation = labelled.split_scenes(data, validation_fraction=0.2, seed=3)
    assert validation.num_scenes == 6
    assert set(train.scene_names).isdisjoint(validation.scene_names)
    assert set(train.paths) | set(validation.paths) == set(data.paths)
    assert len(train) + len(validation) == len(data)
    assert validation.scene_sizes.min() >= 2
    again = labelled.split_scenes(data, validation_fraction=0.2, seed=3)[1]
    assert again.paths == validation.paths
    other = labelled.split_scenes(data, validation_fraction=0.2, seed=4)[1]
    assert other.scene_names != validation.scene_names
    # The image order is kept in both parts.
    assert list(train.paths) == sorted(train.paths)


def test_split_scenes_edge_cases():
    data = make_labelled([0, 0, 1, 2])
    train, validation = labelled.split_scenes(data, validation_fraction=0.0)
    assert len(validation) == 0 and train.paths == data.paths
    # A small positive fraction still holds out one scene; only scene 0 qualifies.
    _, validation = labelled.split_scenes(data, validation_fraction=0.01)
    assert validation.scene_names == ("s0",)
    synthetic = make_labelled([0, 1, 2], synthetic=True)
    train, validation = labelled.split_scenes(synthetic, validation_fraction=0.5)
    assert len(validation) == 0 and train.synthetic_positives
    with pytest.raises(ValueError, match="validation_fraction must be in \\[0, 1\\)"):
        labelled.split_scenes(data, validation_fraction=1.0)


def test_to_retrieval_dataset_known_values(scene_folders):
    data = labelled.from_scene_folders(scene_folders)  # a: 0,1,2  b: 0,1  c: 0
    dataset = labelled.to_retrieval_dataset(data, name="tiny")
    assert dataset.name == "tiny" and dataset.image_dir == scene_folders
    assert dataset.qimlist == ("a/0.png", "b/0.png")
    assert dataset.imlist == ("a/1.png", "a/2.png", "b/1.png", "c/0.png")
    assert [entry["easy"].tolist() for entry in dataset.gnd] == [[0, 1], [2]]
    assert all(entry["hard"].size == 0 and entry["junk"].size == 0 for entry in dataset.gnd)
    assert dataset.query_boxes == [None, None]
    assert all(p.is_file() for p in dataset.query_paths + dataset.database_paths)
    # A perfect ranking scores 1.
    ranks = np.array([[0, 1, 2, 3], [2, 0, 1, 3]])
    result = evaluation.revisited_evaluation(ranks, dataset.gnd)
    assert result["easy"]["map"] == pytest.approx(1.0)


def test_to_retrieval_dataset_raises():
    with pytest.raises(ValueError, match="single: no scene has two images"):
        labelled.to_retrieval_dataset(make_labelled([0, 1]), name="single")


# ---------------------------------------------------------------------- real data


def test_smvs_train_end_to_end(shared_data):
    """smvs_train: labels, a scene-disjoint split, an evaluable validation set, one tuple."""
    data = labelled.from_csv(shared_data / "smvs_train" / "labels.csv")
    assert (len(data), data.num_scenes) == (736, 293)
    assert 2 <= data.scene_sizes.min() and data.scene_sizes.max() == 5
    train, validation = labelled.split_scenes(data, validation_fraction=0.1, seed=0)
    assert validation.num_scenes == 29
    assert set(train.scene_names).isdisjoint(validation.scene_names)
    assert len(train) + len(validation) == 736

    dataset = labelled.to_retrieval_dataset(validation, name="smvs_validation")
    assert dataset.num_queries == 29
    assert dataset.num_database == len(validation) - 29

    def thumbnails(paths):  # 8x8 grey thumbnails as descriptors: cheap, better than chance
        rows = []
        for path in paths:
            image = images.load_scaled(path, max_side=64)[0].mean(axis=2).astype(np.float32)
            row = cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA).reshape(-1)
            row -= row.mean()
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)

    ranks = search.rank_database(
        thumbnails(dataset.query_paths), thumbnails(dataset.database_paths)
    )
    result = evaluation.revisited_evaluation(ranks, dataset.gnd)
    assert 0.0 < result["easy"]["map"] <= 1.0
    assert result["easy"]["num_queries"] == 29

    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(len(train), 8)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    tuples = tuple_mining.mine_tuples(
        train, descriptors, num_tuples=1, num_negatives=2, pool_size=50, seed=0
    )
    element = training_pipeline.tuple_dataset(
        train, tuples, augmentation=training_pipeline.Augmentation(image_size=64), seed=0, epoch=0
    )[0]
    assert element["images"].shape == (4, 64, 64, 3) and element["images"].dtype == np.float32
    longer_sides = element["image_sizes"].max(axis=1)
    assert longer_sides.min() >= round(0.7 * 64) and longer_sides.max() <= 64
    scenes = element["scenes"]
    assert scenes[0] == scenes[1] and len(set(scenes[1:].tolist())) == 3
