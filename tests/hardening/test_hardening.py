"""The hardening corpus through every CLI, and extraction killed half-way.

The counts printed here (``pytest -s``, or ``python -m tests.hardening.run``) are the
ones RESULTS.md quotes.
"""

import logging
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from jaxretrieval import extraction
from jaxretrieval.retrieval_model import ModelConfig
from tests.hardening import run

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run.run_corpus(tmp_path_factory.mktemp("hardening"))


def test_every_cli_survives_every_case(outcomes):
    table = run.summarize(outcomes)
    print("\n" + run.format_table(table))
    failed = [f"{o.cli} / {o.case}: {o.detail}" for o in outcomes if not o.survived]
    assert not failed, "\n".join(failed)
    assert table["total"]["tried"] >= 180
    clis = {o.cli.split()[0] for o in outcomes}
    assert clis == {"extract", "search", "evaluate", "match"}
    expected = {o.expected for o in outcomes}
    assert expected == {"read", "skip", "fail"}


# --- an extraction interrupted by SIGINT, then SIGKILL, then finished ----------------


class _Driver:
    """``python -m tests.hardening.extraction_driver`` with its stdout read line by line."""

    def __init__(self, images: pathlib.Path, out: pathlib.Path, hold_at: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.hardening.extraction_driver"]
            + ["--images", str(images), "--out", str(out), "--hold-at", str(hold_at)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # end of output

    def wait_for_saves(self, count: int) -> int:
        """Waits until ``count`` images are saved; returns how many were saved then."""
        while True:
            line = self.lines.get(timeout=300)
            assert line, f"the driver ended early: {self.seen} {self.process.stderr.read()}"
            self.seen.append(line)
            if line.startswith("saved ") and int(line.split()[1]) >= count:
                return int(line.split()[1])

    def finish(self, timeout: float = 300) -> tuple[int, list[str], str]:
        code = self.process.wait(timeout=timeout)
        while (line := self.lines.get(timeout=60)) != "":
            self.seen.append(line)
        stderr = self.process.stderr.read()
        self.process.stdout.close()
        self.process.stderr.close()
        return code, self.seen, stderr


def test_an_interrupted_extraction_resumes_without_recomputing(tmp_path, monkeypatch, caplog):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"{i:02d}.jpg"), cv2.resize(small, (40, 30)))
    out = tmp_path / "descriptors.npz"
    partial = out.with_name(out.name + ".partial.npz")

    first = _Driver(images, out, hold_at=8)
    first.wait_for_saves(8)
    first.process.send_signal(signal.SIGINT)
    code, _, stderr = first.finish()
    assert code == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "python -m experiments.extract: interrupted; finished work was saved (caches and "
        "checkpoints resume where they stopped)"
    )
    saved = extraction.load_descriptors(partial)
    assert saved is not None and 8 <= len(saved.paths) < 24
    assert not out.exists()

    second = _Driver(images, out, hold_at=len(saved.paths) + 4)
    second.wait_for_saves(len(saved.paths) + 4)
    second.process.kill()  # SIGKILL: no handler, no cleanup
    code, _, _ = second.finish()
    assert code == -signal.SIGKILL
    saved = extraction.load_descriptors(partial)  # still a readable cache, not corrupt
    assert saved is not None and len(saved.paths) < 24
    done_before = len(saved.paths)

    # The third run finishes in this process (one interpreter start less), counting what
    # it computes.
    computed = []
    extract_chunk = extraction.Extractor._extract_chunk

    def counting(self, paths, *rest):
        computed.append(len(paths))
        return extract_chunk(self, paths, *rest)

    monkeypatch.setattr(extraction.Extractor, "_extract_chunk", counting)
    extractor = extraction.Extractor.pretrained(ModelConfig(max_side=32))
    paths = sorted(str(p) for p in images.iterdir())
    with caplog.at_level(logging.INFO, logger="jaxretrieval.extraction"):
        result = extraction.extract_cached(
            extractor, paths, cache_file=out, chunk_images=4, progress=False
        )
    assert f"resuming after {done_before} images" in caplog.text
    assert sum(computed) == 24 - done_before  # finished images were not recomputed
    assert len(result.paths) == 24 and result.valid.all()
    assert extraction.load_descriptors(out) is not None and not partial.exists()
    reference = extractor(paths, progress=False)
    np.testing.assert_allclose(result.descriptors, reference.descriptors, atol=1e-5)
