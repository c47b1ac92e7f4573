"""benchmarks/dsm_seed_figure.py: which numbers it draws, in which order, and its errors."""

import json

import numpy as np
import pytest

from benchmarks import dsm_seed_figure


def _set_result(offset: float, *, m: int = 15, with_loo: bool = True) -> dict:
    labels = [
        "V",
        "V+αQE",
        "V+DBA+αQE",
        "V+D (seed: k=50, 5 seeds, α=0.99)",
        "V+D (ours: k=5, 1 seed, α=0.9)",
        "V+DSM (published)",
        "V+DSM+D (published)",
        f"V+DSM (fix: published, >= {m} distinct)",
    ]
    split = {label: {"map": offset + i / 100, "mp@10": 0.0} for i, label in enumerate(labels)}
    result = {"protocols": {"split": split}, "evidence": {}}
    if with_loo:
        result["evidence"]["leave_one_out"] = {
            "published": {
                "inliers": {"auc": 0.7},
                "distinct": {"auc": 0.6},
                "cosine_auc_same_pairs": 0.9,
            },
            "ours": {"inliers": {"auc": 0.1}, "distinct": {"auc": 0.1}},
        }
    return result


def _output(sets_by_model: dict) -> dict:
    return {
        "seed_roxford_medium": {"V": 44.8, "V+DSM": 51.1, "V+D": 48.4, "V+DSM+D": 61.6},
        "models": {model: {"sets": sets} for model, sets in sets_by_model.items()},
    }


def test_summary_picks_the_rows_and_orders_models_then_sets():
    first = _output({"mobilenet_v2": {"smvs_eval": _set_result(0.5, m=9, with_loo=False)}})
    second = _output({
        "mobilenet_v2": {"landmarks_mini": _set_result(0.2, m=9)},
        "vgg16": {"poznan_buildings": _set_result(0.3), "smvs_eval": _set_result(0.4)},
    })  # fmt: skip
    entries = dsm_seed_figure.summary([first, second])
    assert [e["label"] for e in entries] == [
        "VGG16\nsmvs eval",  # the table's order of the sets: smvs_eval first
        "VGG16\npoznan buildings",
        "MNv2\nsmvs eval",
        "MNv2\nlandmarks mini",
        "seed, VGG16\nROxford M",
    ]
    # V, V+DBA+αQE, V+D (seed), V+DSM (published), >= m distinct, V+DSM+D: label indices
    # 0, 2, 3, 5, 7, 6 of _set_result's list.
    np.testing.assert_allclose(entries[0]["map"], [0.40, 0.42, 0.43, 0.45, 0.47, 0.46])
    np.testing.assert_allclose(entries[3]["map"], [0.20, 0.22, 0.23, 0.25, 0.27, 0.26])
    assert entries[0]["auc"] == [0.7, 0.6, 0.9]  # the published verifier's, not ours
    assert np.all(np.isnan(entries[2]["auc"]))  # split only: nothing to draw, no error
    np.testing.assert_allclose(entries[-1]["map"], [0.448, np.nan, 0.484, 0.511, np.nan, 0.616])


def test_later_files_win_and_a_missing_row_is_nan():
    old = _output({"vgg16": {"smvs_eval": _set_result(0.1)}})
    new_result = _set_result(0.6)
    del new_result["protocols"]["split"]["V+DBA+αQE"]
    new = _output({"vgg16": {"smvs_eval": new_result}})
    (entry, _) = dsm_seed_figure.summary([old, new])
    assert entry["map"][0] == pytest.approx(0.6)
    assert np.isnan(entry["map"][1])


def test_cli_writes_the_png_and_names_a_bad_file(tmp_path, capsys):
    good = tmp_path / "table.json"
    good.write_text(json.dumps(_output({"vgg16": {"smvs_eval": _set_result(0.5)}})))
    out = tmp_path / "summary.png"
    dsm_seed_figure.main(["--json", str(good), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "cut.json"
    bad.write_text('{"models": ')
    with pytest.raises(SystemExit):
        dsm_seed_figure.main(["--json", str(good), str(bad), "--out", str(out)])
    assert "cut.json" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(_output({})))
    with pytest.raises(SystemExit):
        dsm_seed_figure.main(["--json", str(empty), "--out", str(out)])
    assert "no (model, set) results" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no \\(model, set\\) results"):
        dsm_seed_figure.summary([_output({})])
