"""Multi-process runs (jax.distributed on 127.0.0.1): the same results as one process.

Two worker processes with 2 CPU devices each (a 4-device global mesh) extract a list of
images (each its slice, gathered) and train one step of the smoke config (each loading
half of the global batch); a single process with 4 devices does the same. Collectives
run over gloo, JAX's CPU default.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxretrieval import model_io, sharding
from tests.xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def _start(images, workdir, out, env):
    command = [sys.executable, "-m", "tests.multihost_worker", "--images", str(images)]
    command += ["--workdir", str(workdir), "--out", str(out)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(processes):
    """Waits for every process; kills them all on a timeout or a failure."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT_SECONDS)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """Runs the two-process job and the one-process reference (concurrently)."""
    root = tmp_path_factory.mktemp("multihost")
    unreadable = root / "not_an_image.jpg"
    unreadable.write_text("text, not a JPEG")
    photos = sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[:6]
    images = root / "images.json"
    # 7 images: slices of 4 and 3, so the gather pads; one unreadable in the second.
    images.write_text(json.dumps([str(p) for p in photos[:5]] + [str(unreadable), str(photos[5])]))
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        _start(
            images,
            root / "two_processes",
            root / f"process_{rank}.json",
            _environment(
                2,
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
            ),
        )
        for rank in range(2)
    ]
    processes.append(_start(images, root / "one_process", root / "reference.json", _environment(4)))
    _wait(processes)
    read = lambda name: json.loads((root / name).read_text())  # noqa: E731
    return root, [read("process_0.json"), read("process_1.json")], read("reference.json")


def test_extraction_split_over_two_processes_equals_one_process(runs):
    _, (first, second), reference = runs
    assert (first["process_count"], first["devices"]) == (2, 4)
    assert (reference["process_count"], reference["devices"]) == (1, 4)
    # Every process returns the whole list's result.
    assert first["descriptors"] == second["descriptors"] and first["valid"] == second["valid"]
    np.testing.assert_allclose(first["descriptors"], reference["descriptors"], atol=1e-6)
    assert first["valid"] == reference["valid"] == [True] * 5 + [False, True]
    assert first["failures"] == reference["failures"] == second["failures"]
    assert first["failures"][0][0].endswith("not_an_image.jpg")


def test_one_training_step_over_two_processes_equals_one_process(runs):
    root, (first, second), reference = runs
    assert first["step"] == second["step"] == reference["step"] == 1
    assert first["loss"] == second["loss"]
    np.testing.assert_allclose(first["loss"], reference["loss"], rtol=1e-5)
    # Process 0 alone wrote the metrics and the exported model.
    records = (root / "two_processes" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1
    _, trained = model_io.load_model(root / "two_processes")
    _, expected = model_io.load_model(root / "one_process")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trained, expected
    )


def test_process_helpers_with_one_process():
    """With one process, every helper is the identity of the single-process path."""
    assert sharding.process_slice(7) == slice(0, 7)
    assert sharding.process_rows(4) == slice(0, 4)
    rows = np.arange(6).reshape(3, 2)
    assert sharding.gather_rows(rows, 3) is rows
    with pytest.raises(ValueError, match="must give 3 rows"):
        sharding.gather_rows(rows[:2], 3)
    assert sharding.initialize_distributed() is False  # no JAX_* variables: one process


def test_initialize_distributed_needs_all_three_settings(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="number of processes"):
        sharding.initialize_distributed()
