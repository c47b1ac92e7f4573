"""The training CLI end to end on the smoke config (8 real scenes of smvs_train, 64 px)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import cli, evaluate, train, train_lib
from jaxretrieval import model_io

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments" / "configs" / "smoke.py")

# optax's Adam computes ``decay ** count`` (float ** int32), refused by strict mode.
pytestmark = pytest.mark.usefixtures("standard_dtype_promotion")


def _config(**overrides):
    config = train.load_config(SMOKE)
    train.apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return config


def test_smoke_run_trains_checkpoints_evaluates_and_exports(shared_data, tmp_path):
    result = train.main(["--config", SMOKE, "--workdir", str(tmp_path)])
    assert result["step"] == 2 and np.isfinite(result["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and losses[0] != losses[1]
    assert any("validation_map" in r for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "contrastive"
    assert (tmp_path / "curves.png").stat().st_size > 5_000
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    # The exported model is what the CLIs run: evaluate it from the work directory.
    config, variables = model_io.load_model(tmp_path)
    assert config.max_side == 64 and config.backbone == "mobilenet_v2"
    metrics = evaluate.main(
        ["--data-root", str(shared_data / "landmarks_mini"), "--checkpoint", str(tmp_path)]
        + ["--quiet"]
    )
    assert metrics["model"]["max_side"] == 64 and 0.0 < metrics["split"]["medium"]["map"] <= 1
    # Trained variables differ from the ImageNet ones only where training reached.
    from jaxretrieval import retrieval_model

    initial = retrieval_model.init_model_variables(config)
    backbone, trained = initial["params"]["backbone"], variables["params"]["backbone"]
    np.testing.assert_array_equal(  # frozen: before block14
        trained["stem"]["conv"]["kernel"], backbone["stem"]["conv"]["kernel"]
    )
    assert not np.allclose(
        trained["last_conv"]["conv"]["kernel"], backbone["last_conv"]["conv"]["kernel"]
    )


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "ap", "nra"])
def test_every_loss_config_builds_a_finite_loss(loss):
    """Each loss's config reaches its library function (training itself: tests/training)."""
    from jaxretrieval.training import step
    from tests.training.helpers import tuple_batch

    config = train.load_config(f"{SMOKE}:{loss}")
    assert config.loss.name == loss
    loss_fn = step.retrieval_loss(config.loss.name, **config.loss.kwargs.to_dict())
    rng = np.random.default_rng(0)
    descriptors = np.abs(rng.normal(size=(4, 4, 8))).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=-1, keepdims=True)
    assert np.isfinite(float(loss_fn(descriptors, tuple_batch()["scenes"])))


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """SIGKILL mid-run, then re-run: same final parameters as an uninterrupted run."""
    # 16 tuples of batch 4: 4 steps, checkpoints at 2 and 4; killed after the first.
    overrides = {"mining.num_tuples": 16, "eval.every_steps": 100, "checkpoint.every_steps": 2}
    reference = tmp_path / "reference"
    train_lib.train_and_evaluate(_config(**overrides), reference)
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "experiments.train", "--config", SMOKE, "--workdir", str(killed)]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    process = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "2").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint 2 after 300 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()  # it really was cut off
    result = train_lib.train_and_evaluate(_config(**overrides), killed)
    assert result["step"] == 4
    _, expected = model_io.load_model(reference)
    _, resumed = model_io.load_model(killed)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, expected
    )


def test_config_overrides_are_type_checked(capsys):
    config = _config(**{"optim.learning_rate": "3e-4", "data.augment.flip": "true"})
    assert config.optim.learning_rate == 3e-4 and config.data.augment.flip is True
    config = _config(**{"model.whitening_dim": "64"})  # a placeholder takes its type
    assert config.model.whitening_dim == 64
    with pytest.raises(cli.CLIError, match="no such field"):
        _config(**{"optim.lr": "1"})
    with pytest.raises(cli.CLIError, match="optim.batch_size=four"):
        _config(**{"optim.batch_size": "four"})
    with pytest.raises(cli.CLIError, match="unknown loss 'hinge'"):
        train.load_config(f"{SMOKE}:hinge")
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, ["--config", "missing.py", "--workdir", "x"], prog="train")
    assert exit_info.value.code == 2
    assert "--config missing.py: no such file" in capsys.readouterr().err


def test_cpu_devices_split_the_step_over_one_host_device_per_core():
    flags = "--xla_cpu_use_fusion_emitters=false"
    count = "--xla_force_host_platform_device_count"
    # auto: the most devices up to the cores that divide the batch.
    assert train.cpu_device_flags(flags, "auto", 4, 2) == f"{flags} {count}=2"
    assert train.cpu_device_flags("", "auto", 6, 4) == f"{count}=3"
    assert train.cpu_device_flags(flags, "auto", 4, 1) == flags  # one core: unchanged
    assert train.cpu_device_flags(flags, "auto", 5, 4) == flags  # a prime batch: unchanged
    assert train.cpu_device_flags(f"{count}=4", "auto", 4, 2) == f"{count}=4"  # user's wins
    assert train.cpu_device_flags("", "3", 6, 2) == f"{count}=3"
    assert train.cpu_device_flags(f"{count}=2", "2", 4, 8) == f"{count}=2"
    with pytest.raises(cli.CLIError, match="does not divide optim.batch_size=4"):
        train.cpu_device_flags("", "3", 4, 2)
    with pytest.raises(cli.CLIError, match="contradicts XLA_FLAGS"):
        train.cpu_device_flags(f"{count}=4", "2", 4, 2)
    with pytest.raises(cli.CLIError, match="expected 'auto' or a positive integer"):
        train.cpu_device_flags("", "0", 4, 2)


def test_fine_tune_on_an_unlabelled_folder(shared_data, tmp_path):
    """A folder of one's own photos: positives are random warps of each photo."""
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[:8]:
        shutil.copy(path, folder / path.name)
    result = train.main(
        ["--config", SMOKE, "--workdir", str(tmp_path / "run")]
        + ["--config.data.source=unlabelled", f"--config.data.path={folder}"]
    )
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert "validation_map" not in result  # every photo is its own scene: nothing held out
    assert model_io.load_model(tmp_path / "run")[0].max_side == 64
