"""DARAC + NRA through train_lib on the smoke config (8 real scenes of smvs_train, 64 px)."""

import pathlib

import jax
import numpy as np
import pytest

from experiments import cli, init_model, train, train_lib
from jaxretrieval import model_io, retrieval_model

REPO = pathlib.Path(__file__).resolve().parents[2]
DARAC = str(REPO / "experiments" / "configs" / "darac_mobilenet_v2.py")

# optax's Adam computes ``decay ** count`` (float ** int32), refused by strict mode.
pytestmark = pytest.mark.usefixtures("standard_dtype_promotion")


def test_darac_nra_smoke_run_trains_only_the_region_weights(shared_data, tmp_path):
    config = train.load_config(f"{DARAC}:smoke")
    assert config.loss.name == "nra" and config.model.first_trainable == "head"
    result = train_lib.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 2 and np.isfinite(result["loss"]) and "validation_map" in result
    model, variables = model_io.load_model(tmp_path / "run")
    assert model.pooling == "darac" and model.max_side == 64
    initial = retrieval_model.init_model_variables(model)
    weights = variables["params"]["darac"]["region_weights"]
    assert weights.shape == (21, 2) and not np.allclose(weights, 1.0)  # the head trained
    jax.tree.map(  # the backbone did not
        np.testing.assert_array_equal,
        variables["params"]["backbone"],
        initial["params"]["backbone"],
    )


def test_darac_config_arguments():
    assert train.load_config(f"{DARAC}:triplet").loss.name == "triplet"
    config = train.load_config(f"{DARAC}:triplet,smoke")
    assert config.loss.name == "triplet" and config.data.image_size == 64
    assert config.model.pooling == "darac"
    full = train.load_config(DARAC)
    assert full.loss.name == "nra" and full.data.image_size == 299
    with pytest.raises(cli.CLIError, match="unknown loss"):
        train.load_config(f"{DARAC}:contrastive")


def test_init_model_writes_a_loadable_model(tmp_path):
    path = init_model.main(["--pooling", "darac", "--max-side", "96", "--out", str(tmp_path)])
    config, variables = model_io.load_model(path)
    assert config == retrieval_model.ModelConfig(pooling="darac", max_side=96)
    np.testing.assert_array_equal(variables["params"]["darac"]["region_weights"], 1.0)
    # Re-saved at the poster's three resolutions: 1020, 540 and 299 px.
    again = init_model.main(
        ["--checkpoint", str(path), "--max-side", "1020", "--scales", "1", "0.5294", "0.2931"]
        + ["--out", str(tmp_path / "multires")]
    )
    config, resaved = model_io.load_model(again)
    assert [round(1020 * s) for s in config.scales] == [1020, 540, 299]
    assert model_io.variables_digest(resaved) == model_io.variables_digest(variables)
