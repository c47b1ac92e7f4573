import collections
import csv
import pickle
import sys

import cv2
import numpy as np
import pytest

from jaxretrieval import safe_pickle
from jaxretrieval.data import datasets


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def tiny_gnd(**overrides):
    """3 database images (a, b, c), 2 queries: q0 -> a (easy), b (junk); q1 -> c (hard)."""
    gnd = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"easy": [0], "hard": [], "junk": [1], "bbx": [1.0, 2.0, 5.0, 6.0]},
            {"easy": [], "hard": [2], "junk": []},
        ],
    }
    gnd.update(overrides)
    return gnd


def make_dataset(tmp_path, gnd, *, folder="images", ext=".png", names=None, size=(6, 8)):
    """Writes gnd_tiny.pkl and one small image per name; image k is filled with value 10 * k."""
    write_pickle(tmp_path / "gnd_tiny.pkl", gnd)
    (tmp_path / folder).mkdir()
    names = gnd["imlist"] + gnd["qimlist"] if names is None else names
    for k, name in enumerate(names):
        image = np.full((*size, 3), 10 * k, np.uint8)
        image[0, 0] = (255, 0, 0)  # RGB red marks the top-left corner
        ok, buffer = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        (tmp_path / folder / f"{name}{ext}").write_bytes(buffer.tobytes())
    return tmp_path


def read_labels(folder):
    with open(folder / "labels.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- real ground truths


@pytest.mark.parametrize(
    ("name", "num_queries", "num_database"), [("roxford5k", 70, 4993), ("rparis6k", 70, 6322)]
)
def test_load_dataset_revisitop_ground_truth(shared_data, name, num_queries, num_database):
    dataset = datasets.load_dataset(shared_data / "revisitop_gnd", name, check_images=False)
    assert dataset.name == name
    assert (dataset.num_queries, dataset.num_database) == (num_queries, num_database)
    assert len(dataset.gnd) == len(dataset.query_boxes) == len(dataset.query_paths) == 70
    assert len(dataset.database_paths) == num_database
    assert dataset.image_dir == shared_data / "revisitop_gnd" / "jpg"
    for entry in dataset.gnd:
        for key in ("easy", "hard", "junk"):
            assert entry[key].dtype == np.int64 and entry[key].ndim == 1
            assert not entry[key].flags.writeable
        assert entry["easy"].size + entry["hard"].size > 0
        assert len(entry["bbx"]) == 4


def test_load_dataset_roxford_first_query(shared_data):
    dataset = datasets.load_dataset(shared_data / "revisitop_gnd", "roxford5k", check_images=False)
    assert dataset.qimlist[0] == "all_souls_000013"
    assert dataset.query_boxes[0] == (136.5, 34.1, 648.5, 955.7)
    assert dataset.query_paths[0].name == "all_souls_000013.jpg"


def test_load_dataset_revisitop_without_name_lists_choices(shared_data):
    with pytest.raises(ValueError, match=r"2 ground-truth .*roxford5k.*rparis6k.*name="):
        datasets.load_dataset(shared_data / "revisitop_gnd", check_images=False)


def test_load_dataset_revisitop_checks_images_by_default(shared_data):
    with pytest.raises(FileNotFoundError, match=r"5063 of 5063 images .*all_souls_000013.jpg"):
        datasets.load_dataset(shared_data / "revisitop_gnd", "roxford5k")


def test_load_dataset_landmarks_mini(shared_data):
    folder = shared_data / "landmarks_mini"
    dataset = datasets.load_dataset(folder)
    assert dataset.name == "landmarks_mini"
    assert (dataset.num_queries, dataset.num_database) == (7, 22)
    assert dataset.extension == ".jpg" and dataset.image_dir == folder / "images"
    paths = dataset.query_paths + dataset.database_paths
    assert len(paths) == 29 and all(p.is_file() for p in paths)
    sizes = {row["image"]: (int(row["height"]), int(row["width"])) for row in read_labels(folder)}
    assert sorted(p.name for p in paths) == sorted(sizes)
    query = datasets.load_query_image(dataset, 0)  # bbx is the whole image here
    assert query.shape == (*sizes[dataset.query_paths[0].name], 3) and query.dtype == np.uint8
    database = datasets.load_database_image(dataset, 21, max_side=64)
    height, width = sizes[dataset.database_paths[21].name]
    assert max(database.shape[:2]) == 64 and database.shape[2] == 3
    assert abs(database.shape[0] / database.shape[1] - height / width) < 0.05


def test_load_dataset_multiview_jpg_mini(shared_data):
    dataset = datasets.load_dataset(shared_data / "multiview_jpg_mini")
    assert (dataset.num_queries, dataset.num_database) == (22, 50)
    # Every database image is the positive of exactly one query (SOURCE.md).
    counts = collections.Counter(np.concatenate([g["easy"] for g in dataset.gnd]).tolist())
    assert sorted(counts) == list(range(50)) and set(counts.values()) == {1}


def test_load_dataset_finds_png_extension(shared_data):
    dataset = datasets.load_dataset(shared_data / "oxford_affine_seq")
    assert dataset.extension == ".png"
    assert all(p.is_file() for p in dataset.database_paths)


# ---------------------------------------------------------------------- leave_one_out


def test_leave_one_out_landmarks_mini_scenes_match_labels(shared_data):
    folder = shared_data / "landmarks_mini"
    dataset = datasets.load_dataset(folder)
    paths, gnd = datasets.leave_one_out(dataset)
    assert len(paths) == len(gnd) == 29
    assert paths[:7] == dataset.query_paths and paths[7:] == dataset.database_paths
    landmark = {row["image"]: row["landmark"] for row in read_labels(folder)}
    scene_size = collections.Counter(landmark.values())
    for i, (path, entry) in enumerate(zip(paths, gnd, strict=True)):
        assert len(entry["easy"]) + 1 == scene_size[landmark[path.name]], path.name
        assert all(landmark[paths[j].name] == landmark[path.name] for j in entry["easy"])
        assert i not in entry["easy"]
        np.testing.assert_array_equal(entry["junk"], [i])
        assert entry["hard"].size == 0 and entry["bbx"] is None
        assert entry["easy"].dtype == np.int64


def test_leave_one_out_multiview_jpg_mini_is_symmetric(shared_data):
    folder = shared_data / "multiview_jpg_mini"
    paths, gnd = datasets.leave_one_out(datasets.load_dataset(folder))
    assert len(paths) == 72
    scene = {row["image"]: row["scene"] for row in read_labels(folder)}
    scene_size = collections.Counter(scene.values())
    for i, entry in enumerate(gnd):
        assert len(entry["easy"]) + 1 == scene_size[scene[paths[i].name]]
        for j in entry["easy"].tolist():  # "same scene" is symmetric
            assert i in gnd[j]["easy"]


def test_leave_one_out_known_values(tmp_path):
    # Q = 2 queries then N = 3 database images: q0=0, q1=1, a=2, b=3, c=4.
    dataset = datasets.load_dataset(make_dataset(tmp_path, tiny_gnd()))
    paths, gnd = datasets.leave_one_out(dataset)
    assert [p.stem for p in paths] == ["q0", "q1", "a", "b", "c"]
    expected = {  # scene {q0, a} with junk b; scene {q1, c}; b is in no scene
        0: ([2], [0, 3]),
        1: ([4], [1]),
        2: ([0], [2, 3]),
        3: ([], [3]),
        4: ([1], [4]),
    }
    for i, (easy, junk) in expected.items():
        np.testing.assert_array_equal(gnd[i]["easy"], easy)
        np.testing.assert_array_equal(gnd[i]["junk"], junk)
        assert gnd[i]["hard"].size == 0


def test_leave_one_out_merges_queries_with_the_same_positives(tmp_path):
    gnd = tiny_gnd(gnd=[{"easy": [0, 1], "hard": [], "junk": []}, {"easy": [1], "hard": [0]}])
    paths, loo = datasets.leave_one_out(datasets.load_dataset(make_dataset(tmp_path, gnd)))
    # One scene {q0, q1, a, b}; c alone.
    np.testing.assert_array_equal(loo[0]["easy"], [1, 2, 3])
    np.testing.assert_array_equal(loo[3]["easy"], [0, 1, 2])
    np.testing.assert_array_equal(loo[4]["easy"], [])


def test_leave_one_out_raises_for_overlapping_scenes(tmp_path):
    gnd = tiny_gnd(gnd=[{"easy": [0, 1]}, {"easy": [1, 2]}])
    dataset = datasets.load_dataset(make_dataset(tmp_path, gnd))
    with pytest.raises(ValueError, match=r"'b'.*two scenes.*\[0\].*\[1\]"):
        datasets.leave_one_out(dataset)


def test_leave_one_out_raises_for_roxford(shared_data):
    # Oxford's queries of one landmark share most, not all, positives: no disjoint scenes.
    dataset = datasets.load_dataset(shared_data / "revisitop_gnd", "roxford5k", check_images=False)
    with pytest.raises(ValueError, match="two scenes"):
        datasets.leave_one_out(dataset)


# ---------------------------------------------------------------------- loading images


def test_load_query_image_crops_then_resizes(tmp_path):
    dataset = datasets.load_dataset(make_dataset(tmp_path, tiny_gnd(), size=(6, 8)))
    # bbx (1, 2, 5, 6): rows 2..5, columns 1..4 of query q0 (value 10 * 3 = 30).
    crop = datasets.load_query_image(dataset, 0)
    np.testing.assert_array_equal(crop, np.full((4, 4, 3), 30, np.uint8))
    assert datasets.load_query_image(dataset, 0, max_side=2).shape == (2, 2, 3)
    assert datasets.load_query_image(dataset, 0, max_side=8, upscale=False).shape == (4, 4, 3)
    whole = datasets.load_query_image(dataset, 1)  # no bbx: the whole image
    assert whole.shape == (6, 8, 3)
    np.testing.assert_array_equal(whole[0, 0], [255, 0, 0])


def test_load_database_image(tmp_path):
    dataset = datasets.load_dataset(make_dataset(tmp_path, tiny_gnd(), size=(6, 8)))
    image = datasets.load_database_image(dataset, 2)
    assert image.shape == (6, 8, 3)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[3, 3], [20, 20, 20])
    assert datasets.load_database_image(dataset, 2, max_side=4).shape == (3, 4, 3)
    with pytest.raises(IndexError, match="database index 3"):
        datasets.load_database_image(dataset, 3)
    with pytest.raises(IndexError, match="query index -1"):
        datasets.load_query_image(dataset, -1)


# ---------------------------------------------------------------------- folder layout


def test_load_dataset_revisitop_jpg_folder(tmp_path):
    dataset = datasets.load_dataset(make_dataset(tmp_path, tiny_gnd(), folder="jpg", ext=".jpg"))
    assert dataset.image_dir == tmp_path / "jpg" and dataset.extension == ".jpg"


def test_load_dataset_names_with_extension(tmp_path):
    gnd = tiny_gnd(imlist=["a.png", "b.png", "c.png"], qimlist=["q0.png", "q1.png"])
    make_dataset(tmp_path, gnd, names=["a", "b", "c", "q0", "q1"])
    dataset = datasets.load_dataset(tmp_path)
    assert dataset.extension == "" and dataset.database_paths[0].name == "a.png"


def test_load_dataset_lists_missing_images(tmp_path):
    make_dataset(tmp_path, tiny_gnd(), names=["a", "q1"])
    with pytest.raises(FileNotFoundError, match=r"3 of 5 images .*'q0.png', 'b.png', 'c.png'"):
        datasets.load_dataset(tmp_path)
    assert datasets.load_dataset(tmp_path, check_images=False).num_database == 3


def test_load_dataset_missing_images_list_is_capped(tmp_path):
    gnd = tiny_gnd(imlist=[f"x{k}" for k in range(9)])
    make_dataset(tmp_path, gnd, names=[])
    with pytest.raises(FileNotFoundError, match=r"11 of 11 .*'q0.jpg', .*'x2.jpg' and 6 more"):
        datasets.load_dataset(tmp_path)


def test_load_dataset_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"0 ground-truth files \[\]"):
        datasets.load_dataset(tmp_path)
    write_pickle(tmp_path / "gnd_one.pkl", tiny_gnd())
    with pytest.raises(FileNotFoundError, match=r"gnd_two.pkl.*\['gnd_one.pkl'\]"):
        datasets.load_dataset(tmp_path, "two")


# ---------------------------------------------------------------------- ground-truth validation


def test_load_ground_truth_refuses_malicious_pickle(tmp_path, malicious_payload):
    payload, marker = malicious_payload
    gnd = tiny_gnd()
    gnd["gnd"][0]["easy"] = payload
    path = write_pickle(tmp_path / "gnd_evil.pkl", gnd)
    with pytest.raises(safe_pickle.UnsafePickleError, match="os.system|posix.system"):
        datasets.load_ground_truth(path)
    with pytest.raises(safe_pickle.UnsafePickleError):
        datasets.load_dataset(tmp_path, check_images=False)
    assert not marker.exists()
    if sys.platform != "win32":  # control: the payload really does create the file
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_load_ground_truth_accepts_numpy_arrays(tmp_path):
    gnd = tiny_gnd()
    gnd["gnd"][0]["easy"] = np.array([0], np.int32)
    gnd["gnd"][0]["bbx"] = np.array([1.0, 2.0, 5.0, 6.0])
    loaded = datasets.load_ground_truth(write_pickle(tmp_path / "gnd_np.pkl", gnd))
    np.testing.assert_array_equal(loaded["gnd"][0]["easy"], [0])
    assert loaded["gnd"][0]["easy"].dtype == np.int64
    assert loaded["gnd"][0]["bbx"] == (1.0, 2.0, 5.0, 6.0)
    assert loaded["gnd"][1]["bbx"] is None


def test_load_ground_truth_classic_ok_layout(tmp_path):
    gnd = tiny_gnd(gnd=[{"ok": [0, 2], "junk": [1]}, {"ok": []}])
    loaded = datasets.load_ground_truth(write_pickle(tmp_path / "gnd_classic.pkl", gnd))
    np.testing.assert_array_equal(loaded["gnd"][0]["easy"], [0, 2])
    np.testing.assert_array_equal(loaded["gnd"][0]["junk"], [1])
    assert loaded["gnd"][0]["hard"].size == 0 and loaded["gnd"][1]["junk"].size == 0


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            lambda g: g["gnd"][1].update(hard=[3]),
            ValueError,
            r"gnd\[1\] \(query 'q1'\) 'hard' holds index 3, outside the database \[0, 3\)",
        ),
        (
            lambda g: g["gnd"][0].update(junk=[-1]),
            ValueError,
            r"gnd\[0\] \(query 'q0'\) 'junk' holds index -1",
        ),
        (
            lambda g: g["gnd"][0].update(junk=[0]),
            ValueError,
            r"gnd\[0\].*image 0 \('a'\) in both 'easy' and 'junk'",
        ),
        (lambda g: g["gnd"][1].update(hard=[2, 2]), ValueError, r"gnd\[1\].*twice in 'hard'"),
        (
            lambda g: g["gnd"][1].update(easy=[0.0]),
            TypeError,
            r"gnd\[1\].*'easy' must hold integer",
        ),
        (
            lambda g: g["gnd"][1].update(bbx=[1, 2, 3]),
            ValueError,
            r"gnd\[1\].*'bbx' must be 4 finite",
        ),
        (lambda g: g["gnd"][1].update(bbx=[5, 2, 3, 4]), ValueError, r"gnd\[1\].*x1 <= x2"),
        (lambda g: g["gnd"][1].pop("easy"), ValueError, r"gnd\[1\].*neither 'easy' nor 'ok'"),
        (lambda g: g["gnd"][0].update(ok=[0]), ValueError, r"gnd\[0\].*both 'easy' and 'ok'"),
        (lambda g: g["gnd"].pop(), ValueError, "'gnd' has 1 entries but 'qimlist' has 2"),
        (lambda g: g.pop("qimlist"), ValueError, r"missing keys \['qimlist'\]"),
        (lambda g: g["imlist"].append("a"), ValueError, "'imlist' lists 'a' more than once"),
        (lambda g: g["qimlist"].__setitem__(0, 7), TypeError, r"qimlist\[0\] must be a string"),
    ],
)
def test_load_ground_truth_errors_name_file_and_query(tmp_path, change, error, message):
    gnd = tiny_gnd()
    change(gnd)
    path = write_pickle(tmp_path / "gnd_bad.pkl", gnd)
    with pytest.raises(error, match=message) as info:
        datasets.load_ground_truth(path)
    assert str(path) in str(info.value)


def test_load_ground_truth_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="expected a dict, got list"):
        datasets.load_ground_truth(write_pickle(tmp_path / "gnd_list.pkl", [1, 2]))
