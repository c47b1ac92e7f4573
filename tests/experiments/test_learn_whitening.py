"""Pairs from labels, and ``python -m experiments.learn_whitening`` end to end (64 px)."""

import csv
import json

import numpy as np
import pytest

from experiments import cli, learn_whitening, whitening_lib
from jaxretrieval import extraction, model_io, retrieval_model, whitening
from jaxretrieval.data import labelled

# Two DVD covers of 5 photos and two books of 2: unequal scene sizes, so the queries'
# mean (each image weighted by its number of partners) differs from the mean of all.
TRAIN_SCENES = ("smvs_dvd_001", "smvs_dvd_002", "smvs_book_001", "smvs_book_002")
HELD_OUT_SCENE = "smvs_painting_001"  # smvs_train images the whitening never sees


# --------------------------------------------------------------------------- matching_pairs


def test_matching_pairs_known_values():
    query_idx, positive_idx = labelled.matching_pairs(np.array([2, 0, 2, 2, 5], np.int32))
    assert query_idx.dtype == np.int64 and positive_idx.dtype == np.int64
    # Scene 2 = images {0, 2, 3}: 3 * 2 ordered pairs; scenes 0 and 5 have one image each.
    assert list(zip(query_idx.tolist(), positive_idx.tolist(), strict=True)) == [
        (0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2),
    ]  # fmt: skip
    query_idx, positive_idx = labelled.matching_pairs(np.array([1, 1, 0, 0, 1]))
    assert list(zip(query_idx.tolist(), positive_idx.tolist(), strict=True)) == [
        (0, 1), (0, 4), (1, 0), (1, 4), (2, 3), (3, 2), (4, 0), (4, 1),
    ]  # fmt: skip
    for no_pairs in (np.array([0, 1, 2]), np.zeros(0, np.int32)):
        query_idx, positive_idx = labelled.matching_pairs(no_pairs)
        assert query_idx.shape == positive_idx.shape == (0,)


def test_matching_pairs_match_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scenes = rng.integers(0, 5, size=rng.integers(1, 16))
        expected = [
            (i, j)
            for i in range(len(scenes))
            for j in range(len(scenes))
            if i != j and scenes[i] == scenes[j]
        ]
        query_idx, positive_idx = labelled.matching_pairs(scenes)
        assert list(zip(query_idx.tolist(), positive_idx.tolist(), strict=True)) == expected


def test_matching_pairs_raises(without_annotation_checks):
    with pytest.raises(ValueError, match=r"flat array of integer ids, found shape \(2, 2\)"):
        labelled.matching_pairs(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="dtype float64"):
        labelled.matching_pairs(np.array([0.0, 1.0]))


def test_matching_pairs_of_smvs_train(shared_data):
    train = labelled.from_csv(shared_data / "smvs_train" / "labels.csv")
    query_idx, positive_idx = labelled.matching_pairs(train.scenes)
    # 243 scenes of 2 images (2 ordered pairs each) and 50 DVD covers of 5 (20 each).
    assert (len(train), train.num_scenes) == (736, 293)
    assert query_idx.size == 243 * 2 + 50 * 20 == 1486
    assert np.all(train.scenes[query_idx] == train.scenes[positive_idx])
    assert np.all(query_idx != positive_idx)


# --------------------------------------------------------------------------- eps "auto"


def _synthetic_training_set(num_scenes=30, dim=16, seed=0):
    """Pairs of images whose right eps is obvious, and the one held-out split (seed 0).

    Every image is its scene's centre (spread 0.3 in every direction) plus a strong shared
    nuisance along axis 1 (std 1, which Lw must suppress) and weak noise (std 0.05) on
    axes 1..15. Only the held-out scenes also vary along axis 0 (std 0.3): no training
    pair does, so C_S's eigenvalue there is exactly 0 and its gain is eps^-1/2. A tiny
    eps blows that variation up over everything else; eps far above the nuisance
    variance (ratio 10) no longer whitens the nuisance away; ratios 0.01-1 of the mean
    eigenvalue (the noise variance 0.005 is about 0.04 of it) rank the held-out scenes
    perfectly.
    """
    rng = np.random.default_rng(seed)
    scenes = np.repeat(np.arange(num_scenes), 2)
    train = labelled.LabelledImages(
        paths=tuple(f"/synthetic/{i:03d}.jpg" for i in range(len(scenes))),
        scenes=scenes,
        scene_names=tuple(f"scene{s}" for s in range(num_scenes)),
    )
    (split,) = whitening_lib.held_out_splits(train, seeds=(0,))
    x = rng.normal(size=(num_scenes, dim))[scenes] * 0.3
    x[:, 1] += rng.normal(size=len(scenes))
    x[:, 1:] += 0.05 * rng.normal(size=(len(scenes), dim - 1))
    x[split.held_out_rows, 0] += 0.3 * rng.normal(size=split.held_out_rows.size)
    return x.astype(np.float32), train, split


def test_choose_eps_picks_the_obvious_ratio():
    x, train, split = _synthetic_training_set()
    # 30 scenes: 6 held out (12 images), 24 learned from (48 ordered pairs).
    assert (split.held_out.num_scenes, len(split.held_out), split.training.num_scenes) == (
        6,
        12,
        24,
    )
    assert set(split.held_out_rows) | set(split.training_rows) == set(range(60))
    choice = whitening_lib.choose_eps(x, [split])
    maps = {e["ratio"]: e["mean_leave_one_out"] for e in choice.record["grid"]}
    assert list(maps) == list(whitening_lib.EPS_RATIOS)
    assert maps[1e-5] < 0.5 and maps[10.0] < 0.9  # blown up / not whitened
    assert maps[0.01] == maps[0.1] == maps[1.0] == 1.0
    assert choice.ratio == 1.0  # ties go to the larger, more regularised ratio
    assert choice.record["chosen_ratio"] == 1.0
    assert choice.record["absolute_reference"]["mean_leave_one_out"] < 0.5  # eps 1e-6
    assert choice.record["held_out"] == {
        "seeds": [0], "num_scenes": [6], "num_images": [12], "num_training_pairs": [48]
    }  # fmt: skip
    # The grid's absolute eps is the ratio times the training part's mean eigenvalue.
    query_idx, positive_idx = labelled.matching_pairs(split.training.scenes)
    scale = whitening_lib.mean_pair_eigenvalue(x[split.training_rows], query_idx, positive_idx)
    for entry in choice.record["grid"]:
        np.testing.assert_allclose(entry["eps"], [entry["ratio"] * scale], rtol=1e-12)
    json.dumps(choice.record)  # JSON-ready


def test_mean_pair_eigenvalue_is_the_trace_of_the_pair_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 5))
    query_idx, positive_idx = labelled.matching_pairs(np.array([0, 0, 1, 1, 1, 2, 3, 3, 3]))
    differences = x[query_idx] - x[positive_idx]
    covariance = differences.T @ differences / len(query_idx)
    assert whitening_lib.mean_pair_eigenvalue(x, query_idx, positive_idx) == pytest.approx(
        np.linalg.eigvalsh(covariance).mean(), rel=1e-12
    )


def test_held_out_map_ranks_the_held_out_scenes_with_the_given_descriptors():
    x, _, split = _synthetic_training_set()
    held_out = split.held_out
    # One-hot scene descriptors rank perfectly; the same descriptors shuffled do not.
    perfect = np.eye(held_out.num_scenes, dtype=np.float32)[held_out.scenes]
    assert whitening_lib.held_out_map(split, perfect) == {"leave_one_out": 1.0, "split": 1.0}
    shuffled = perfect[np.roll(np.arange(len(perfect)), 1)]
    assert whitening_lib.held_out_map(split, shuffled)["leave_one_out"] < 0.7


def test_held_out_splits_hold_out_two_scenes_at_least():
    scenes = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    train = labelled.LabelledImages(
        paths=tuple(f"/s/{i}.jpg" for i in range(9)), scenes=scenes, scene_names=tuple("abcde")
    )
    splits = whitening_lib.held_out_splits(train, seeds=(0, 1))
    for split in splits:
        assert split.held_out.num_scenes == 2 and split.training.num_scenes == 3
        assert not set(split.held_out.paths) & set(split.training.paths)
    again = whitening_lib.held_out_splits(train, seeds=(0,))[0]
    assert again.held_out.paths == splits[0].held_out.paths  # the seed fixes the split
    too_few = train.subset(np.arange(6))  # three scenes with pairs: 2 held out + 1 learned
    assert len(whitening_lib.held_out_splits(too_few)) == 3
    with pytest.raises(whitening_lib.LearnWhiteningError, match="has 2 such scenes"):
        whitening_lib.held_out_splits(train.subset(np.arange(4)))


# --------------------------------------------------------------------------- the CLI


def _rows_of(shared_data, scenes):
    with open(shared_data / "smvs_train" / "labels.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["scene"] in scenes]
    image_dir = shared_data / "smvs_train" / "images"
    return [(str((image_dir / row["image"]).resolve()), row["scene"]) for row in rows]


def _tiny_csv(shared_data, tmp_path, scenes=TRAIN_SCENES, name="labels.csv"):
    """A labels CSV in tmp_path naming a few smvs_train images by absolute path."""
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "scene"])
        writer.writerows(_rows_of(shared_data, scenes))
    return path


def test_learn_whitening_cli_saves_a_model_that_applies_the_learned_whitening(
    shared_data, tmp_path, capsys
):
    csv_path = _tiny_csv(shared_data, tmp_path)
    train = labelled.from_csv(csv_path)
    assert len(train) == 14
    # VGG16 (512-d descriptors) keeps the test's D x D eigen-decompositions cheap; the
    # 1280-d MobileNetV2 ones take 20 s on a busy 2-core machine.
    cache = tmp_path / "cache"
    first = tmp_path / "lw_queries"
    learn_whitening.main(
        ["--train-csv", str(csv_path), "--backbone", "vgg16", "--max-side", "64"]
        + ["--dim", "16", "--quiet", "--cache-dir", str(cache), "--out", str(first)]
    )
    out = capsys.readouterr().out
    assert "14 images, 4 scenes, 44 ordered matching pairs" in out
    assert "span at most 10 of 512 dimensions" in out
    # eps "auto" (the default): 3 splits holding out 2 of the 4 scenes each.
    assert "eps chosen on held-out training scenes (3 splits of 2/2/2 scenes" in out
    assert out.count("<- chosen") == 1 and "no whitening" in out
    facts = model_io.read_model_file(first)["metadata"]["whitening"]
    assert facts["training_set"] == str(csv_path.resolve())
    assert facts["num_pairs"] == 2 * 20 + 2 * 2
    assert (facts["centering"], facts["dim"], facts["descriptor_dim"]) == ("queries", 16, 512)
    assert (facts["max_side"], facts["scales"]) == (64, [1.0])
    selection = facts["eps_selection"]
    assert selection["rule"] == "auto" and len(selection["held_out"]["seeds"]) == 3
    assert [e["ratio"] for e in selection["grid"]] == list(whitening_lib.EPS_RATIOS)
    best = max(e["mean_leave_one_out"] for e in selection["grid"])
    chosen = next(e for e in selection["grid"] if e["ratio"] == selection["chosen_ratio"])
    assert chosen["mean_leave_one_out"] == best
    # The chosen ratio, applied to the pair covariance of all training images.
    assert facts["eps_ratio"] == pytest.approx(selection["chosen_ratio"], rel=1e-9)
    assert facts["eps"] == pytest.approx(facts["eps_ratio"] * facts["mean_pair_eigenvalue"])
    assert facts["base_model"] == {"backbone": "vgg16", "weights": "ImageNet"}
    # Stored over the shipped ImageNet weights: the whitening only, no backbone layer.
    assert model_io.read_model_file(first)["base"] == model_io.BASE_PRETRAINED
    assert sum(f.stat().st_size for f in first.rglob("*") if f.is_file()) < 200_000

    # The second run starts from the first model: its whitening is dropped and replaced,
    # its image size (64) is kept, and the unwhitened training descriptors are reused.
    second = tmp_path / "lw_all"
    learn_whitening.main(
        ["--train-csv", str(csv_path), "--checkpoint", str(first), "--centering", "all"]
        + ["--eps", "1e-6", "--quiet", "--cache-dir", str(cache), "--out", str(second)]
    )
    out = capsys.readouterr().out
    assert "replacing the model's 16-d whitening layer" in out
    assert "held-out" not in out
    assert len(list(cache.glob("descriptors_*.npz"))) == 1  # one unwhitened model
    facts = model_io.read_model_file(second)["metadata"]["whitening"]
    assert (facts["centering"], facts["dim"], facts["max_side"]) == ("all", 512, 64)
    assert (facts["eps"], facts["eps_selection"]) == (1e-6, {"rule": "given"})
    assert facts["base_model"] == {"checkpoint": str(first)}

    # Descriptors of the saved model, on the training images and on held-out ones, are
    # the Lw learned here from its own unwhitened (pooled) descriptors of the training set.
    paths = list(train.paths) + [p for p, _ in _rows_of(shared_data, {HELD_OUT_SCENE})]
    config, _ = model_io.load_model(first)
    assert (config.max_side, config.scales, config.whitening_dim) == (64, (1.0,), 16)
    result = extraction.Extractor.from_checkpoint(first)(paths, progress=False)
    unwhitened = result.by_pooling["gem"]
    query_idx, positive_idx = labelled.matching_pairs(train.scenes)
    x = unwhitened[: len(train)]
    eps = model_io.read_model_file(first)["metadata"]["whitening"]["eps"]
    assert whitening_lib.mean_pair_eigenvalue(x, query_idx, positive_idx) == pytest.approx(
        model_io.read_model_file(first)["metadata"]["whitening"]["mean_pair_eigenvalue"]
    )
    learned = whitening.learn_supervised_whitening(x, query_idx, positive_idx, dim=16, eps=eps)
    expected = np.asarray(whitening.apply_whitening(learned, unwhitened))
    np.testing.assert_allclose(result.descriptors, expected, atol=1e-5)
    # The second model's layer is the all-centred Lw of the same descriptors, full size.
    config, variables = model_io.load_model(second)
    assert (config.max_side, config.scales, config.whitening_dim) == (64, (1.0,), 512)
    assert config.backbone == "vgg16"
    everything = whitening.learn_supervised_whitening(x, query_idx, positive_idx, centering="all")
    layer = retrieval_model.whitening_params(everything)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            variables["params"]["whitening"][name], layer[name], rtol=1e-5, atol=1e-5
        )
    # The centrings (and eps) give different models here (unequal scene sizes).
    other = np.asarray(whitening.apply_whitening(everything, unwhitened, dim=16))
    assert np.abs(expected @ expected.T - other @ other.T).max() > 0.05


def _user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(learn_whitening.main, argv, prog="learn_whitening")
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_learn_whitening_users_mistakes_get_one_line(shared_data, tmp_path, capsys):
    csv_path = str(_tiny_csv(shared_data, tmp_path))
    out = str(tmp_path / "out")
    message = _user_error(["--train-csv", str(tmp_path / "no.csv"), "--out", out], capsys)
    assert "--train-csv" in message and "no such file" in message
    message = _user_error(["--train-csv", csv_path, "--out", out, "--dim", "5000"], capsys)
    assert "dim must be in [1, 1280]" in message and "found 5000" in message
    message = _user_error(["--train-csv", csv_path, "--out", out, "--dim", "0"], capsys)
    assert "--dim" in message and "must be positive" in message
    message = _user_error(["--train-csv", csv_path, "--out", csv_path], capsys)
    assert "is a file; give a directory" in message
    message = _user_error(["--train-csv", csv_path, "--out", out, "--eps", "small"], capsys)
    assert "--eps" in message and "'small' is neither 'auto' nor a number" in message
    message = _user_error(["--train-csv", csv_path, "--out", out, "--eps", "0"], capsys)
    assert "must be 'auto' or positive, found 0" in message
    two_scenes = {"smvs_dvd_001", "smvs_book_001"}
    two_scenes = str(_tiny_csv(shared_data, tmp_path, scenes=two_scenes, name="two.csv"))
    message = _user_error(["--train-csv", two_scenes, "--out", out], capsys)
    assert "eps 'auto' holds out 2 scenes" in message and "has 2 such scenes" in message
    singletons = tmp_path / "singletons.csv"
    rows = _rows_of(shared_data, {"smvs_book_001", "smvs_book_002"})
    singletons.write_text("image,scene\n" + "".join(f"{p},s{i}\n" for i, (p, _) in enumerate(rows)))
    message = _user_error(["--train-csv", str(singletons), "--out", out], capsys)
    assert "no scene of the training set has two images (4 images, 4 scenes)" in message
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.jpg,a\n")
    message = _user_error(["--train-csv", str(bad), "--out", out], capsys)
    assert "has no column" in message
    assert not (tmp_path / "out" / "model.json").exists()
    json.dumps(message)  # plain text
