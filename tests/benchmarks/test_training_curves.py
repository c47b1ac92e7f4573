"""benchmarks/training_curves.py: one PNG from several runs' metrics.jsonl."""

import json

import cv2
import pytest

from benchmarks import training_curves


def _run(folder, losses, maps):
    folder.mkdir()
    records = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    records += [{"step": 10 * (i + 1), "validation_map": m} for i, m in enumerate(maps)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def test_plots_every_run_into_one_png(tmp_path):
    a = _run(tmp_path / "a", [2.0, 1.5, 1.0, 0.8], [0.7, 0.8])
    b = _run(tmp_path / "b", [0.3, 0.2], [0.6])  # shorter than the smoothing window
    out = tmp_path / "figures" / "curves.png"
    training_curves.main([f"contrastive={a}", f"triplet={b}", "--out", str(out)])
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 300


def test_missing_metrics_and_bad_argument_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        training_curves.main([f"x={tmp_path}"])
    with pytest.raises(SystemExit, match="NAME=WORKDIR"):
        training_curves.main([str(tmp_path)])
