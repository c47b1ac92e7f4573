"""model.json's "kind": DELF models save, load, and are refused by the other loader."""

import json

import numpy as np
import pytest

from jaxretrieval import model_io
from jaxretrieval.local_features import DelfConfig
from jaxretrieval.retrieval_model import ModelConfig


def _variables():
    return {"params": {"head": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}


def test_delf_model_round_trip_and_wrong_kind(tmp_path):
    config = DelfConfig(num_classes=3, pca_dim=2)
    variables = {**_variables(), "pca": {"mean": np.zeros(3, np.float32)}}
    model_io.save_model(tmp_path / "delf", config, variables, metadata={"stage": "attention"})
    document = json.loads((tmp_path / "delf" / "model.json").read_text())
    assert document["kind"] == "delf" and document["model"]["num_classes"] == 3
    loaded, restored = model_io.load_delf_model(tmp_path / "delf")
    assert loaded == config
    np.testing.assert_array_equal(restored["pca"]["mean"], np.zeros(3))
    with pytest.raises(model_io.ModelDirectoryError, match="holds a 'delf' model.*load_delf_model"):
        model_io.load_model(tmp_path / "delf")


def test_retrieval_models_keep_loading(tmp_path):
    model_io.save_model(tmp_path / "global", ModelConfig(), _variables())
    document = json.loads((tmp_path / "global" / "model.json").read_text())
    assert document["kind"] == "retrieval"
    assert model_io.load_model(tmp_path / "global")[0] == ModelConfig()
    with pytest.raises(model_io.ModelDirectoryError, match="holds a 'retrieval' model.*load_model"):
        model_io.load_delf_model(tmp_path / "global")
    # Files written before "kind" existed are retrieval models.
    del document["kind"]
    (tmp_path / "global" / "model.json").write_text(json.dumps(document))
    assert model_io.load_model(tmp_path / "global")[0] == ModelConfig()
    document["kind"] = "hologram"
    (tmp_path / "global" / "model.json").write_text(json.dumps(document))
    with pytest.raises(model_io.ModelDirectoryError, match="holds a 'hologram' model"):
        model_io.load_model(tmp_path / "global")
