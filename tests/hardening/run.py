"""Runs every CLI that reads images, pickles or weights over the hardening corpus.

  python -m tests.hardening.run            # prints the tried/survived table (RESULTS.md)
  python -m tests.hardening.run --json hardening.json

A case *survives* when the CLI does what its docstring promises: no traceback (only
``SystemExit`` leaves :func:`experiments.cli.run`), no code from the input ran (the
sentinel file does not exist), and

* ``read``: the image is used (a descriptor, a ranking entry, a match);
* ``skip``: the run goes on and prints a line naming the file with a reason;
* ``fail``: exit status 2 with exactly one line on stderr,
  ``python -m experiments.<prog>: error: ...``, naming the file or what is wrong.

The CLIs run in this process (as ``python -m`` would run them, through ``cli.run``), at
small image sizes, so the whole corpus takes about a minute on 2 cores.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from experiments import cli, evaluate, extract, match, search
from tests.hardening import corpus as corpus_lib

MAX_SIDE = "64"  # global descriptors: few, small shapes to compile
MATCH_MAX_SIDE = "128"  # DSM needs 96 pixels per side; DELF its receptive field
# Readable images match also gets (besides every bad one); see run_corpus.
MATCH_SAMPLE = (
    "cmyk.jpg",
    "sixteen_bit.png",
    "exif_rotated.jpg",
    "ünïcödé 写真.jpg",
    "one_pixel.png",
)
TIMINGS: list[tuple[str, float]] = []  # (command, seconds) of every run, for profiling


@dataclasses.dataclass
class Run:
    """What one CLI invocation did."""

    prog: str
    code: int | str  # exit status, or the name of an exception that escaped
    stdout: str
    stderr: str
    value: Any = None
    seconds: float = 0.0


@dataclasses.dataclass
class Outcome:
    """One case through one CLI."""

    cli: str
    case: str
    expected: str  # "read" | "skip" | "fail"
    survived: bool
    detail: str = ""


def run_cli(module, prog: str, argv: Sequence[str]) -> Run:
    """Runs ``python -m experiments.<prog> argv`` in this process, capturing its output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    value, code = None, 0
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            value = cli.run(module.main, list(argv), prog=prog)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a traceback is what we are counting
            code = type(e).__name__
            stderr.write(f"Traceback: {type(e).__name__}: {e}\n")
    seconds = time.perf_counter() - start
    TIMINGS.append((f"{prog} {' '.join(argv)[:80]}", seconds))
    return Run(prog, code, stdout.getvalue(), stderr.getvalue(), value, seconds)


def _no_traceback(run: Run) -> str:
    if isinstance(run.code, str) or "Traceback" in run.stdout + run.stderr:
        return f"traceback: {run.stderr.strip()[-300:]}"
    return ""


def _failed_with_one_line(run: Run, mentions: str) -> str:
    """Why ``run`` is not a one-line exit-2 failure mentioning ``mentions`` ('' if it is)."""
    if problem := _no_traceback(run):
        return problem
    if run.code != 2:
        return f"exit status {run.code}, expected 2"
    lines = run.stderr.splitlines()
    prefix = f"python -m experiments.{run.prog}: error: "
    if len(lines) != 1 or not lines[0].startswith(prefix):
        return f"stderr is not one error line: {run.stderr!r}"
    if mentions not in lines[0]:
        return f"the message does not mention {mentions!r}: {lines[0]}"
    return ""


def _skip_line(text: str, name: str) -> str | None:
    """The output line listing ``name`` as skipped, with a reason after it, if any.

    Skip lines say "skipped" (search, evaluate, match) or sit under a header ending in
    "skipped:" (extract).
    """
    in_block = False
    for line in text.splitlines():
        if line.rstrip().endswith("skipped:"):
            in_block = True
            continue
        in_block = in_block and line.startswith(" ")
        if name in line and ("skipped" in line or in_block):
            reason = line.split(name, 1)[1].strip(" :'")
            if len(reason) > 3:
                return line
    return None


def _per_image(
    run: Run,
    cli_name: str,
    expected: dict[str, str],
    used: Callable[[str], bool],
) -> list[Outcome]:
    """Outcomes of a run over many images: each read image used, each bad one listed."""
    outcomes = []
    problem = _no_traceback(run) or ("" if run.code == 0 else f"exit status {run.code}")
    for name, want in expected.items():
        if problem:
            outcomes.append(Outcome(cli_name, name, want, False, problem))
            continue
        if want == "read":
            ok = used(name) and _skip_line(run.stdout, name) is None
            detail = "" if ok else "not used, or listed as skipped"
        else:
            line = _skip_line(run.stdout, name)
            ok = line is not None and not used(name)
            detail = line or "not listed with a reason"
        outcomes.append(Outcome(cli_name, name, want, ok, "" if ok else detail))
    return outcomes


def _single(run: Run, cli_name: str, case: str, mentions: str) -> Outcome:
    problem = _failed_with_one_line(run, mentions)
    return Outcome(cli_name, case, "fail", not problem, problem)


def _nan_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """A saved model whose first convolution is NaN: every descriptor comes out NaN."""
    from jaxretrieval import model_io, retrieval_model

    config = retrieval_model.ModelConfig(max_side=int(MAX_SIDE))
    variables = retrieval_model.init_model_variables(config)
    leaves, treedef = jax.tree.flatten(variables)
    leaves = [np.asarray(x) for x in leaves]
    first_kernel = next(i for i, x in enumerate(leaves) if x.ndim == 4)
    leaves[first_kernel] = np.full_like(leaves[first_kernel], np.nan)
    nan_variables = jax.tree.unflatten(treedef, leaves)
    return model_io.save_model(folder / "nan_model", config, nan_variables)


def run_corpus(workdir: str | pathlib.Path) -> list[Outcome]:
    """Builds the corpus in ``workdir`` and runs every CLI over it."""
    workdir = pathlib.Path(workdir)
    corpus = corpus_lib.build_corpus(workdir / "corpus")
    out = workdir / "out"
    out.mkdir()
    images = corpus.images
    expected = corpus.expected
    in_dataset = {n: e for n, e in expected.items() if n != "dangling_link.jpg"}
    bad = [n for n, e in expected.items() if e == "skip"]
    small = ["--max-side", MAX_SIDE, "--quiet"]
    outcomes: list[Outcome] = []

    # extract --images: every image of a folder.
    run = run_cli(
        extract, "extract", ["--images", str(images), "--out", str(out / "i.npz"), *small]
    )
    valid = {} if run.value is None else dict(zip(run.value.paths, run.value.valid, strict=True))
    outcomes += _per_image(
        run, "extract --images", expected, lambda n: bool(valid.get(str(images / n)))
    )

    # extract --data-root: the same images as a revisitop set.
    run = run_cli(
        extract,
        "extract",
        ["--data-root", str(corpus.dataset), "--out", str(out / "d.npz"), *small],
    )
    jpg = corpus.dataset / "jpg"
    valid = {} if run.value is None else dict(zip(run.value.paths, run.value.valid, strict=True))
    outcomes += _per_image(
        run, "extract --data-root", in_dataset, lambda n: bool(valid.get(str(jpg / n)))
    )

    # search: index the folder with a good query; then each bad image as the query.
    search_args = ["--images", str(images), "--out", str(out / "s.png"), "--top-k", "50"]
    search_args += ["--index-dir", str(out / "index"), *small]
    run = run_cli(search, "search", [*search_args, "--query", str(images / corpus_lib.GOOD)])
    ranked = set(run.value[0]) if run.value else set()
    outcomes += _per_image(run, "search (index)", expected, lambda n: str(images / n) in ranked)
    for name in bad:
        run = run_cli(search, "search", [*search_args, "--query", str(images / name)])
        outcomes.append(_single(run, "search (query)", name, name))

    # evaluate --data-root: the set evaluates, its bad images are listed.
    run = run_cli(evaluate, "evaluate", ["--data-root", str(corpus.dataset), *small])
    listed = run.stdout
    outcomes += _per_image(
        run, "evaluate --data-root", in_dataset, lambda n: _skip_line(listed, n) is None
    )

    # Hostile or broken ground truth: evaluate and extract refuse it in one line.
    for case in corpus.gnd_cases:
        mentions = "gone" if case == "names_a_missing_image" else "gnd_hardening.pkl"
        for module, prog in ((evaluate, "evaluate"), (extract, "extract")):
            argv = ["--data-root", str(corpus.bad_gnd(case)), *small]
            argv += ["--out", str(out / "g.npz")] if prog == "extract" else []
            outcomes.append(
                _single(run_cli(module, prog, argv), f"{prog} (bad gnd)", case, mentions)
            )

    # Hostile or broken .pth files for --weights.
    for case in corpus.weight_cases:
        weights = str(corpus.weights(case))
        argv = ["--data-root", str(corpus.dataset), "--weights", weights, *small]
        run = run_cli(evaluate, "evaluate", argv)
        outcomes.append(_single(run, "evaluate --weights", case, f"{case}.pth"))
        argv = ["--images", str(images), "--out", str(out / "w.npz"), "--weights", weights, *small]
        run = run_cli(extract, "extract", argv)
        outcomes.append(_single(run, "extract --weights", case, f"{case}.pth"))

    # Broken --checkpoint directories and a model whose descriptors are NaN.
    checkpoints = workdir / "checkpoints"
    for case, files in {
        "garbage_model_json": {"model.json": "{not json"},
        "model_json_without_variables": {"model.json": json.dumps({"model": {}})},
        "empty_directory": {},
    }.items():
        folder = checkpoints / case
        folder.mkdir(parents=True)
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
        argv = ["--images", str(images), "--out", str(out / "c.npz"), "--checkpoint", str(folder)]
        run = run_cli(extract, "extract", [*argv, "--quiet"])
        outcomes.append(_single(run, "extract --checkpoint", case, case))
    nan_model = str(_nan_checkpoint(checkpoints))
    argv = ["--images", str(images), "--out", str(out / "nan.npz"), "--checkpoint", nan_model]
    run = run_cli(extract, "extract", [*argv, "--quiet"])
    outcomes.append(_single(run, "extract --checkpoint", "nan_descriptors", "NaN or infinite"))
    if (out / "nan.npz").exists() or (out / "nan.npz.partial.npz").exists():
        outcomes[-1] = Outcome("extract --checkpoint", "nan_descriptors", "fail", False, "saved")
    argv = [*search_args[:-3], "--index-dir", str(out / "nan_index"), "--quiet"]
    argv += ["--query", str(images / corpus_lib.GOOD), "--checkpoint", nan_model]
    run = run_cli(search, "search", argv)
    outcomes.append(_single(run, "search --checkpoint", "nan_descriptors", "NaN or infinite"))

    # match: every image against the good one (DSM and DELF), and each bad one as query.
    # Both methods get every bad image and a sample of the odd readable ones (DSM's MSER
    # costs ~2 s per image; DELF compiles its pyramid for every new shape bucket, 20 s for
    # them all). Both decode through the global CLIs' path, which gets all.
    want = {
        n: ("skip" if n == "one_pixel.png" else e)
        for n, e in expected.items()
        if n != corpus_lib.GOOD and (e == "skip" or n in MATCH_SAMPLE)
    }
    others = [str(images / n) for n in want]
    for method in ("dsm", "delf"):
        argv = [str(images / corpus_lib.GOOD), *others, "--out", str(out / "m.png")]
        argv += ["--method", method, "--max-side", MATCH_MAX_SIDE]
        run = run_cli(match, "match", argv)
        matched = frozenset(pathlib.Path(p).name for _, p in run.value or [])
        outcomes += _per_image(
            run, f"match --method {method}", want, lambda n, matched=matched: n in matched
        )
    for name in bad:
        argv = [str(images / name), str(images / corpus_lib.GOOD), "--out", str(out / "m.png")]
        run = run_cli(match, "match", [*argv, "--max-side", MATCH_MAX_SIDE])
        outcomes.append(_single(run, "match (query)", name, name))

    if corpus.sentinel.exists():  # code from an input ran: nothing survived
        outcomes = [dataclasses.replace(o, survived=False, detail="code ran") for o in outcomes]
    return outcomes


def summarize(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """``{cli: {"tried": n, "survived": m}}`` plus a ``"total"`` row."""
    table: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        row = table.setdefault(outcome.cli, {"tried": 0, "survived": 0})
        row["tried"] += 1
        row["survived"] += int(outcome.survived)
    table["total"] = {
        "tried": len(outcomes),
        "survived": sum(o.survived for o in outcomes),
    }
    return table


def format_table(table: dict[str, dict[str, int]]) -> str:
    """A Markdown table of :func:`summarize`."""
    lines = ["| CLI | tried | survived |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {row['tried']} | {row['survived']} |" for name, row in table.items()]
    return "\n".join(lines)


def main(argv=None) -> dict[str, dict[str, int]]:
    """Builds the corpus in a temporary folder, runs it, prints the table."""
    parser = argparse.ArgumentParser(prog="python -m tests.hardening.run", description=__doc__)
    parser.add_argument("--json", default=None, help="also write the counts and failures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        outcomes = run_corpus(workdir)
    table = summarize(outcomes)
    print(format_table(table))
    for outcome in outcomes:
        if not outcome.survived:
            print(f"FAILED {outcome.cli} {outcome.case}: {outcome.detail}", file=sys.stderr)
    if args.json:
        document = {"counts": table, "outcomes": [dataclasses.asdict(o) for o in outcomes]}
        pathlib.Path(args.json).write_text(json.dumps(document, indent=1))
    return table


if __name__ == "__main__":
    main()
