import json
import shutil

import numpy as np
import pytest

from jaxretrieval import extraction, model_io, retrieval_model, whitening
from jaxretrieval.retrieval_model import ModelConfig

SETTINGS = extraction.ExtractionSettings(max_side=64, batch_size=4)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    import cv2

    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "rocket"):
        path = folder / f"{name}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(getattr(skimage_data, name)(), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def _assert_same_tree(a, b):
    flat_a = dict(_flatten(a))
    flat_b = dict(_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
        assert np.asarray(flat_a[key]).dtype == np.asarray(flat_b[key]).dtype, key


def _flatten(tree, prefix=""):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_round_trip_of_the_shipped_networks(backbone, tmp_path, photo_files):
    config = ModelConfig(backbone=backbone, max_side=64, scales=(1.0, 0.5))
    variables = retrieval_model.init_model_variables(config)
    model_io.save_model(tmp_path / "m", config, variables, metadata={"note": "test"})
    loaded_config, loaded = model_io.load_model(tmp_path / "m")
    assert loaded_config == config
    _assert_same_tree(loaded, variables)
    # The saved model extracts what the original does, at the model's own image size.
    original = extraction.Extractor(config, variables, extraction.ExtractionSettings())
    restored = extraction.Extractor.from_checkpoint(tmp_path / "m")
    assert restored.settings.max_side == 64 and restored.settings.scales == (1.0, 0.5)
    assert restored.cache_key == original.cache_key
    np.testing.assert_allclose(
        restored(photo_files, progress=False).descriptors,
        original(photo_files, progress=False).descriptors,
        atol=1e-6,
    )
    document = json.loads((tmp_path / "m" / "model.json").read_text())
    assert document["metadata"] == {"note": "test"} and document["model"]["backbone"] == backbone


def test_whitened_model_round_trip_and_descriptors(tmp_path, photo_files):
    config = ModelConfig(max_side=64)
    variables = retrieval_model.init_model_variables(config)
    plain = extraction.Extractor(config, variables, SETTINGS)(photo_files, progress=False)
    rng = np.random.default_rng(0)
    learned = whitening.learn_pca_whitening(
        rng.normal(size=(2000, 1280)).astype(np.float32), dim=16
    )
    config, variables = retrieval_model.attach_whitening(config, variables, learned)
    assert config.whitening_dim == 16
    model_io.save_model(tmp_path, config, variables)
    restored = extraction.Extractor.from_checkpoint(tmp_path, SETTINGS)
    result = restored(photo_files, progress=False)
    assert result.descriptors.shape == (3, 16)
    expected = whitening.apply_whitening(learned, plain.descriptors)
    np.testing.assert_allclose(result.descriptors, expected, atol=1e-5)
    np.testing.assert_allclose(result.by_pooling["gem"], plain.descriptors, atol=1e-6)


def test_training_work_directory_resolves_to_its_export(tmp_path):
    config = ModelConfig()
    variables = retrieval_model.init_model_variables(config)
    model_io.save_model(tmp_path / "run" / "model", config, variables)
    assert model_io.resolve_model_directory(tmp_path / "run") == tmp_path / "run" / "model"
    loaded_config, _ = model_io.load_model(tmp_path / "run")
    assert loaded_config == config


def test_a_relative_path_loads(tmp_path, monkeypatch):
    """`--checkpoint checkpoints/<name>` from the repository root (orbax wants absolute)."""
    config = ModelConfig()
    variables = retrieval_model.init_model_variables(config)
    model_io.save_model(tmp_path / "checkpoints" / "mine", config, variables)
    monkeypatch.chdir(tmp_path)
    loaded_config, loaded = model_io.load_model("checkpoints/mine")
    assert loaded_config == config
    assert model_io.variables_digest(loaded) == model_io.variables_digest(variables)


def test_bad_model_directories_are_named(tmp_path):
    with pytest.raises(model_io.ModelDirectoryError, match="does not exist"):
        model_io.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_io.ModelDirectoryError, match="holds no model.json"):
        model_io.load_model(tmp_path / "empty")
    config = ModelConfig()
    variables = retrieval_model.init_model_variables(config)
    model_io.save_model(tmp_path / "m", config, variables)
    # An interrupted save: variables written, model.json not yet.
    shutil.copytree(tmp_path / "m" / "variables", tmp_path / "half" / "variables")
    with pytest.raises(model_io.ModelDirectoryError, match="save was interrupted"):
        model_io.load_model(tmp_path / "half")
    model_file = tmp_path / "m" / "model.json"
    good = model_file.read_text()
    model_file.write_text("{not json")
    with pytest.raises(model_io.ModelDirectoryError, match="not readable JSON"):
        model_io.load_model(tmp_path / "m")
    model_file.write_text(good.replace('"version": 1', '"version": 99'))
    with pytest.raises(model_io.ModelDirectoryError, match="version 99"):
        model_io.load_model(tmp_path / "m")
    model_file.write_text(good.replace('"pooling": "gem"', '"pooling": "avg"'))
    with pytest.raises(model_io.ModelDirectoryError, match="bad model description"):
        model_io.load_model(tmp_path / "m")
    # Variables of another model under this model.json: the digest refuses them.
    other = ModelConfig(backbone="efficientnet_lite0")
    model_io.save_model(tmp_path / "o", other, retrieval_model.init_model_variables(other))
    model_file.write_text(good)
    shutil.rmtree(tmp_path / "m" / "variables")
    shutil.copytree(tmp_path / "o" / "variables", tmp_path / "m" / "variables")
    with pytest.raises(model_io.ModelDirectoryError, match="does not match the digest"):
        model_io.load_model(tmp_path / "m")


def test_variables_digest_sees_every_value_and_name():
    tree = {"params": {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    digest = model_io.variables_digest(tree)
    assert (
        model_io.variables_digest(
            {"params": {"a": {"kernel": tree["params"]["a"]["kernel"].copy()}}}
        )
        == digest
    )
    changed = tree["params"]["a"]["kernel"].copy()
    changed[1, 2] += 1e-6
    assert model_io.variables_digest({"params": {"a": {"kernel": changed}}}) != digest
    renamed = {"params": {"b": {"kernel": tree["params"]["a"]["kernel"]}}}
    assert model_io.variables_digest(renamed) != digest
    reshaped = {"params": {"a": {"kernel": tree["params"]["a"]["kernel"].reshape(3, 2)}}}
    assert model_io.variables_digest(reshaped) != digest
    as_double = {"params": {"a": {"kernel": tree["params"]["a"]["kernel"].astype(np.float64)}}}
    assert model_io.variables_digest(as_double) != digest


def test_saving_only_the_changes_to_the_shipped_weights(tmp_path):
    """A model fine-tuned from the last blocks keeps only those in its directory."""
    config = ModelConfig()
    variables = retrieval_model.init_model_variables(config)
    tuned = variables["params"]["backbone"]["last_conv"]["conv"]["kernel"] * np.float32(1.01)
    variables["params"]["backbone"]["last_conv"]["conv"]["kernel"] = tuned
    variables["params"]["gem"]["p"] = np.array(3.5, np.float32)
    model_io.save_model(tmp_path / "full", config, variables)
    model_io.save_model(tmp_path / "delta", config, variables, base="pretrained")

    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    assert size(tmp_path / "delta") < size(tmp_path / "full") / 5
    assert json.loads((tmp_path / "delta" / "model.json").read_text())["base"] == "pretrained"
    _, loaded = model_io.load_model(tmp_path / "delta")
    _assert_same_tree(loaded, variables)
    # A base that no longer matches (other package weights) is caught by the digest.
    document = json.loads((tmp_path / "delta" / "model.json").read_text())
    document["variables_digest"] = "0" * 64
    (tmp_path / "delta" / "model.json").write_text(json.dumps(document))
    with pytest.raises(model_io.ModelDirectoryError, match="does not match the digest"):
        model_io.load_model(tmp_path / "delta")
