"""DELF through the experiments: both training stages (smoke configs), PCA, match CLI."""

import json
import pathlib

import jax
import numpy as np
import pytest

from experiments import cli, delf_lib, delf_pca, match, rerank_lib, train, train_lib
from jaxretrieval import model_io
from jaxretrieval.data import labelled
from jaxretrieval.local_features import (
    DelfConfig,
    DelfExtractor,
    DelfFeatures,
    DelfSettings,
    init_delf_variables,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = str(REPO / "experiments" / "configs" / "delf_descriptor.py")
ATTENTION = str(REPO / "experiments" / "configs" / "delf_attention.py")


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
    """optax's Adam computes ``decay ** count`` (float ** int32), refused by strict mode."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def stages(tmp_path_factory, shared_data):
    """Stage 1 then stage 2 of the smoke configs; their work directories and results."""
    root = tmp_path_factory.mktemp("delf")
    with jax.numpy_dtype_promotion("standard"):
        first = train_lib.train_and_evaluate(
            train.load_config(f"{DESCRIPTOR}:smoke"), root / "descriptor"
        )
        config = train.load_config(f"{ATTENTION}:smoke")
        train.apply_overrides(config, [f"--config.model.init_checkpoint={root / 'descriptor'}"])
        second = train_lib.train_and_evaluate(config, root / "attention")
    return root, first, second


def _params(workdir):
    return model_io.load_delf_model(workdir)


def test_descriptor_stage_trains_validates_and_exports(stages):
    root, result, _ = stages
    assert result["step"] == 2 and np.isfinite(result["loss"])
    records = [
        json.loads(x) for x in (root / "descriptor" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len([r for r in records if "loss" in r]) == 2
    assert 0.0 <= result["validation_accuracy"] <= 1.0 and result["validation_loss"] > 0
    config, variables = _params(root / "descriptor")
    assert config.num_classes == 8 and config.keypoint_score == "l2_norm"
    assert config.feature_name == "stage3" and config.pca_dim is None
    initial = init_delf_variables(config)["params"]["backbone"]
    trained = variables["params"]["backbone"]
    frozen = [
        ("stem", "conv"),  # before first_trainable (block12 in the smoke config)
        ("block11", "project", "conv"),
        ("block14", "project", "conv"),  # after the stage3 map (block13)
        ("last_conv", "conv"),
    ]
    for path in frozen:
        a, b = trained, initial
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a["kernel"], b["kernel"])
    a = trained["block13"]["project"]["conv"]["kernel"]
    assert not np.allclose(a, initial["block13"]["project"]["conv"]["kernel"])
    assert model_io.read_model_file(root / "descriptor")["metadata"]["stage"] == "descriptor"


def test_attention_stage_trains_only_the_head(stages):
    root, _, result = stages
    assert result["step"] == 2 and "validation_accuracy" in result
    first_config, first = _params(root / "descriptor")
    config, second = _params(root / "attention")
    assert config.keypoint_score == "attention" and config.num_classes == first_config.num_classes
    same = jax.tree.map(np.array_equal, first["params"]["backbone"], second["params"]["backbone"])
    assert all(jax.tree.leaves(same))
    np.testing.assert_array_equal(
        first["params"]["descriptor_classifier"]["kernel"],
        second["params"]["descriptor_classifier"]["kernel"],
    )
    assert not np.allclose(
        first["params"]["attention"]["hidden"]["kernel"],
        second["params"]["attention"]["hidden"]["kernel"],
    )


def test_attention_stage_needs_a_stage_one_model_or_imagenet(tmp_path):
    config = train.load_config(f"{ATTENTION}:smoke")
    with pytest.raises(ValueError, match="init_checkpoint=<stage-1 work directory>"):
        delf_lib.DelfTask(config, tmp_path)
    train.apply_overrides(config, ["--config.delf.attention_on_imagenet=true"])
    task = delf_lib.DelfTask(config, tmp_path)  # the ablation: attention, no fine-tuning
    assert task.delf_config.keypoint_score == "attention" and task.delf_config.num_classes == 8
    assert task.trainable(("attention", "hidden")) and not task.trainable(("backbone", "block13"))


def test_delf_pca_cli_and_match_cli(stages, shared_data, tmp_path, capsys):
    root, _, _ = stages
    out = tmp_path / "delf_pca"
    facts = delf_pca.main(
        ["--checkpoint", str(root / "attention"), "--out", str(out), "--dim", "8"]
        + ["--train-csv", str(shared_data / "smvs_train" / "labels.csv")]
        + ["--max-images", "3", "--max-side", "128", "--max-features", "100"]
    )
    assert facts["pca_images"] == 3 and 0 < facts["pca_explained_variance"] <= 1
    config, variables = model_io.load_delf_model(out)
    assert config.pca_dim == 8 and variables["pca"]["projection"].shape == (8, 96)
    folder = shared_data / "opencv_box_pair"
    picture = tmp_path / "m.png"
    results = match.main(
        ["--method", "delf", "--checkpoint", str(out), "--out", str(picture)]
        + [str(folder / "box.png"), str(folder / "box_in_scene.png")]
        + ["--max-side", "128", "--max-features", "100"]
    )
    assert picture.is_file() and len(results) == 1 and results[0][0] >= 0
    assert "inliers" in capsys.readouterr().out
    # The geometric checks, with the same model and sizes (the same compiled kernels).
    extractor = DelfExtractor.from_checkpoint(out, DelfSettings(max_side=128, max_features=100))
    box = delf_lib.box_pair_check(extractor, folder)
    assert box["sift_inliers"] > 20 and box["corner_errors"].shape == (4,)
    pairs = delf_lib.homography_pairs(shared_data)
    assert len(pairs) == 25 + 4 and pairs[0][0] == "graf 1-2"
    check = delf_lib.homography_check(extractor, *pairs[0][1:])
    assert check["num_tentative"] >= check["num_inliers"] >= 0 and 0 <= check["precision"] <= 1
    # The other kind of model is refused in one line.
    with pytest.raises(SystemExit):
        cli.run(
            match.main,
            [str(folder / "box.png"), str(folder / "box.png"), "--checkpoint", str(out)],
            prog="match",
        )
    assert "holds a 'delf' model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.run(
            match.main,
            [
                "--method",
                "delf",
                "--pooling",
                "mac",
                str(folder / "box.png"),
                str(folder / "box.png"),
            ],
            prog="match",
        )
    assert "--pooling has no meaning with --method delf" in capsys.readouterr().err


def test_held_out_images_and_trainable_layers(shared_data):
    images = labelled.from_csv(shared_data / "smvs_train" / "labels.csv")
    training, validation = delf_lib.held_out_images(images, min_scene_size=3, seed=0)
    assert len(validation) == 50 and len(training) == 686
    assert set(images.scenes[training]) == set(range(293))  # every class still trains
    assert len(set(images.scenes[validation])) == 50
    trainable = delf_lib.descriptor_trainable(DelfConfig(num_classes=2), "block7")
    assert trainable(("backbone", "block7", "x")) and trainable(("backbone", "block13", "x"))
    assert not trainable(("backbone", "block6", "x")) and not trainable(
        ("backbone", "block14", "x")
    )
    assert trainable(("descriptor_classifier", "kernel")) and not trainable(("attention", "x"))
    with pytest.raises(ValueError, match="before stage3"):
        delf_lib.descriptor_trainable(DelfConfig(num_classes=2), "block15")


def _features(locations, descriptors):
    num = len(locations)
    return DelfFeatures(
        locations=np.asarray(locations, np.float32),
        descriptors=np.asarray(descriptors, np.float32),
        scores=np.ones(num, np.float32),
        scales=np.ones(num, np.float32),
        valid=np.ones(num, bool),
    )


def test_delf_rerank_and_verified_query_expansion():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 200, (24, 2))
    words = rng.normal(size=(24, 8))
    words /= np.linalg.norm(words, axis=1, keepdims=True)
    query = _features(points, words)
    copy = _features(points * 1.1 + 5, words)  # the query's scene, moved
    others = [_features(rng.uniform(0, 200, (24, 2)), rng.normal(size=(24, 8))) for _ in range(3)]
    database = jax.tree.map(lambda *x: np.stack(x), others[0], copy, others[1], others[2])
    queries = jax.tree.map(lambda x: x[None], query)
    scores = np.array([[0.9, 0.2, 0.8, 0.7]], np.float32)  # global search misses the copy
    settings = rerank_lib.DelfRerankSettings(num_hypotheses=32, error_threshold=4.0, qe_k=1)
    reranking, pair_inliers = rerank_lib.delf_rerank(scores, queries, database, settings=settings)
    assert np.asarray(reranking.ranks).tolist() == [[1, 0, 2, 3]]
    assert pair_inliers[0, 1] == 24 and np.all(pair_inliers[0] >= 0)
    globals_q = np.array([[1.0, 0.0, 0.0]], np.float32)
    globals_db = np.array(
        [[0.6, 0.8, 0], [0.0, 0.0, 1.0], [0.8, 0.6, 0], [0.0, 1.0, 0]], np.float32
    )
    ranks = rerank_lib.delf_query_expansion_ranks(
        globals_q, globals_db, reranking, settings=settings
    )
    # The verified copy first; then the rest by the query expanded with the copy.
    assert ranks.tolist() == [[1, 2, 0, 3]]
    # Leave-one-out: the query's own row is excluded from the shortlist and ranked last.
    _, loo_inliers = rerank_lib.delf_rerank(
        scores, queries, database, settings=settings, exclude=np.array([0])
    )
    assert loo_inliers[0, 0] == -1
    # rerank_lib's per-method entry points, with a stand-in for the DELF extractor.
    by_path = {"q": query, "a": others[0], "b": copy, "c": others[1], "d": others[2]}

    class Extractor:
        def extract_files(self, paths, boxes=None):
            return jax.tree.map(lambda *x: np.stack(x), *[by_path[p] for p in paths])

    split = rerank_lib.delf_rerank_split(
        "delf", globals_q, globals_db, delf_extractor=Extractor(), query_paths=["q"],
        database_paths=["a", "b", "c", "d"], settings=settings,
    )  # fmt: skip
    assert split.tolist() == [[1, 2, 0, 3]]  # the copy, then the global order c, a, d
    everything = np.concatenate([globals_q, globals_db])
    loo = rerank_lib.delf_rerank_leave_one_out(
        "delf+qe", everything, delf_extractor=Extractor(), paths=list("qabcd"), settings=settings
    )
    assert loo[:, -1].tolist() == [0, 1, 2, 3, 4]  # each image last in its own ranking
    assert loo[0, 0] == 2 and loo[2, 0] == 0  # the query and its copy verify each other
    with pytest.raises(ValueError, match="unknown DELF re-ranking 'dsm'"):
        rerank_lib.delf_ranks("dsm", globals_q, globals_db, None, None)


@pytest.mark.slow  # 16 s; benchmark-level table, the re-ranking itself is tested in CI
def test_run_table_on_a_small_set(shared_data, tmp_path):
    out = tmp_path / "table.json"
    results = delf_lib.run_table(
        shared_data / "landmarks_mini",
        out=out,
        protocols=("split",),
        global_max_side=64,
        delf_settings=DelfSettings(max_side=96, scales=(1.0,), max_features=32),
        settings=rerank_lib.DelfRerankSettings(num_hypotheses=16),
    )
    for key in ("split", "split+delf", "split+delf+qe"):
        assert 0.0 < results[key]["medium"]["map"] <= 1.0
    assert results["split+delf_inliers"].shape == (7, 22)
    facts = results["delf_features"]
    assert facts["images"] == 29 and facts["bytes_per_image"] > 0  # 22 + 7 cropped queries
    saved = json.loads(out.read_text())
    assert (
        saved["delf_model"]["keypoint_score"] == "l2_norm"
        and saved["global_model"]["max_side"] == 64
    )
    delf = DelfExtractor.pretrained(settings=DelfSettings(max_side=96, scales=(1.0,)))
    query = str(sorted((shared_data / "landmarks_mini" / "images").iterdir())[0])
    picture = delf_lib.save_attention_maps(delf, [query], tmp_path / "a.png")
    assert picture.stat().st_size > 1000


def test_delf_pca_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        delf_pca.parse_args(["--help"])
    assert exit_info.value.code == 0 and "python -m experiments.delf_pca" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            delf_pca.main,
            ["--checkpoint", str(tmp_path), "--train-csv", "x.csv", "--out", str(tmp_path / "o")],
            prog="delf_pca",
        )
    assert exit_info.value.code == 2 and "holds no model.json" in capsys.readouterr().err
