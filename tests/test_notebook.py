"""experiments/notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom.

The notebook runs in a fresh IPython kernel (ipykernel, driven by its jupyter_client) in
small mode on 2 CPU devices, cell by cell as Jupyter or Colab would; a failing cell fails
the test with its traceback. Kernel output is kept for the failure message.
"""

import json
import os
import pathlib
import re
import sys

import pytest

from tests.xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "experiments" / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_SECONDS = 300


def _cells(kind: str) -> list[dict]:
    notebook = json.loads(NOTEBOOK.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == kind]


def test_committed_notebook_has_no_outputs():
    """Outputs stay out of git: no outputs, execution counts or widget state."""
    notebook = json.loads(NOTEBOOK.read_text())
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {number} has outputs; clear them"
            assert cell["execution_count"] is None, f"cell {number} has an execution count"
    assert "widgets" not in notebook["metadata"]


def test_notebook_imports_train_lib_not_the_cli():
    """experiments.train defines the CLI; notebooks use train_lib (STYLE.md 3.6)."""
    code = "\n".join("".join(cell["source"]) for cell in _cells("code"))
    assert "train_lib.train_and_evaluate" in code
    assert not re.search(r"(from experiments import .*\btrain\b|import experiments\.train\b)", code)


def _kernel_spec(directory: pathlib.Path) -> str:
    """A kernel spec for this interpreter (never whatever 'python3' the PATH finds)."""
    spec = directory / "kernels" / "jaxretrieval-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "jaxretrieval test", "language": "python"})
    )
    return spec.name


def test_notebook_runs_top_to_bottom_in_small_mode(shared_data, tmp_path):
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    name = _kernel_spec(tmp_path / "jupyter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        JAXRETRIEVAL_NOTEBOOK_SMALL="1",
        JAXRETRIEVAL_NOTEBOOK_OUT=str(tmp_path / "out"),
        JAXRETRIEVAL_SHARED_DATA=str(shared_data),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(2),
        MPLBACKEND="Agg",
    )
    manager = KernelManager(
        kernel_name=name,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "jupyter" / "kernels")]),
    )
    manager.start_kernel(cwd=str(NOTEBOOK.parent), env=env)
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        for number, cell in enumerate(_cells("code")):
            output: list[str] = []

            def keep(message, output=output):
                content = message["content"]
                if message["msg_type"] == "stream":
                    output.append(content["text"])
                elif message["msg_type"] == "error":
                    output.append("\n".join(content["traceback"]))

            reply = client.execute_interactive(
                "".join(cell["source"]), timeout=CELL_TIMEOUT_SECONDS, output_hook=keep
            )
            if reply["content"]["status"] != "ok":
                shown = re.sub(r"\x1b\[[0-9;]*m", "", "".join(output))[-6000:]
                pytest.fail(f"code cell {number} failed:\n{shown}")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    out = tmp_path / "out"
    assert (out / "landmarks_mini_split.png").stat().st_size > 10_000
    assert (out / "dsm_match.png").stat().st_size > 10_000
    records = (out / "smoke_run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2]  # trained, then resumed
    assert (out / "smoke_run" / "model" / "model.json").is_file()
