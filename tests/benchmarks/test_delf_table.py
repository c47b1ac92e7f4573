"""benchmarks/delf_table.py: the ablation table runs end to end (slow: a benchmark)."""

import json

import pytest

from benchmarks import delf_table


@pytest.mark.slow  # ~1 min on 2 cores: global, DSM and DELF features of landmarks_mini
def test_quick_table_writes_every_row(shared_data, tmp_path, capsys):
    out = tmp_path / "delf.json"
    delf_table.main(["--quick", "--skip-checks", "--data", str(shared_data), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| V+DELF (ImageNet, feature norm) |" in printed and "| DSM (192 px" in printed
    rows = json.loads(out.read_text())["sets"]["landmarks_mini"]
    for label in ("V", "V+DSM", "V+DELF (ImageNet, feature norm)"):
        assert 0.0 < rows[label]["split"]["medium"]["map"] <= 1.0


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        delf_table.parse_args(["--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
