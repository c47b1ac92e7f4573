"""Speed of evaluation.compute_map / revisited_evaluation against a per-query NumPy loop.

The baseline evaluates the way revisitop's ``compute_map`` does: a Python loop over queries,
``np.isin`` over the whole ranking to find the positions of positives and junk, a loop that
shifts each positive up by the junk above it, then the trapezoid AP and precision at k. Both
get the same synthetic data: random permutations of the database, per query ~50 positives
(split into easy and hard) and ~100 junk. Outputs are compared (max abs difference) before
any time is reported.

    .venv/bin/python -m benchmarks.compute_map_speed            # 70 x 4,993 and 70 x 1,000,000
    .venv/bin/python -m benchmarks.compute_map_speed --quick    # 70 x 4,993 only

Times are the best of --repeats runs. Peak extra memory is measured with tracemalloc (which
sees NumPy's allocations) in a separate run, relative to the ranks array itself.
"""

import argparse
import os
import platform
import tracemalloc
from functools import partial

import numpy as np

from benchmarks.common import best_time
from jaxretrieval.evaluation import compute_map, revisited_evaluation

KAPPAS = (1, 5, 10)
NUM_QUERIES = 70  # ROxford5k / RParis6k


def baseline_compute_map(ranks, gnd, kappas):
    """Per-query loop with np.isin position lookup (revisitop's algorithm, rows not columns)."""
    num_queries, length = ranks.shape
    aps = np.zeros(num_queries)
    prs = np.zeros((num_queries, len(kappas)))
    num_empty = 0
    for q in range(num_queries):
        ok = np.asarray(gnd[q]["ok"])
        if ok.size == 0:
            aps[q] = np.nan
            prs[q] = np.nan
            num_empty += 1
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        positions = np.arange(length)
        pos = positions[np.isin(ranks[q], ok)]
        junk_pos = positions[np.isin(ranks[q], junk)]
        shift, ij = 0, 0
        for ip in range(len(pos)):
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                shift += 1
                ij += 1
            pos[ip] -= shift
        ap = 0.0
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else j / rank
            precision_1 = (j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) / 2.0 / len(ok)
        aps[q] = ap
        pos = pos + 1
        for i, k in enumerate(kappas):
            cutoff = min(pos.max(), k)
            prs[q, i] = np.count_nonzero(pos <= cutoff) / cutoff
    valid = num_queries - num_empty
    return float(np.nansum(aps) / valid), aps, np.nansum(prs, axis=0) / valid, prs


def baseline_revisited(ranks, gnd, kappas):
    relabel = {
        "easy": lambda g: {"ok": g["easy"], "junk": g["junk"] + g["hard"]},
        "medium": lambda g: {"ok": g["easy"] + g["hard"], "junk": g["junk"]},
        "hard": lambda g: {"ok": g["hard"], "junk": g["junk"] + g["easy"]},
    }
    return {s: baseline_compute_map(ranks, [f(g) for g in gnd], kappas) for s, f in relabel.items()}


def synthetic(num_database, seed=0):
    """Random rankings and revisited ground truth of ~50 positives and ~100 junk per query."""
    rng = np.random.default_rng(seed)
    ranks = np.empty((NUM_QUERIES, num_database), np.int64)  # (Q, N)
    for q in range(NUM_QUERIES):
        ranks[q] = rng.permutation(num_database)
    gnd = []
    for _ in range(NUM_QUERIES):
        n_pos, n_junk = int(rng.integers(25, 76)), int(rng.integers(50, 151))
        labelled = rng.choice(num_database, n_pos + n_junk, replace=False).tolist()
        n_easy = int(rng.integers(0, n_pos + 1))
        gnd.append(
            {
                "easy": labelled[:n_easy],
                "hard": labelled[n_easy:n_pos],
                "junk": labelled[n_pos:],
            }
        )
    medium = [{"ok": g["easy"] + g["hard"], "junk": g["junk"]} for g in gnd]
    return ranks, gnd, medium


def max_abs_diff(a, b):
    """Over map, aps, mP@k, P@k; NaNs must coincide (else inf)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        finite = ~np.isnan(x)
        if finite.any():
            worst = max(worst, float(np.max(np.abs(x[finite] - y[finite]))))
    return worst


def peak_extra_memory(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 70 x 4,993 size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(
        f"cpus: {os.cpu_count()} (usable {affinity}), numpy {np.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    sizes = [4993] if args.quick else [4993, 1_000_000]
    header = (
        f"{'Q x N':>14} {'what':>22} {'baseline s':>11} {'ours s':>9} {'speed-up':>9} "
        f"{'max |diff|':>11} {'peak extra MB':>14} {'ranks MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for num_database in sizes:
        ranks, gnd, medium = synthetic(num_database)
        rows = [
            (
                "compute_map (Medium)",
                partial(baseline_compute_map, ranks, medium, KAPPAS),
                partial(compute_map, ranks, medium, KAPPAS),
            ),
            (
                "revisited (E/M/H)",
                partial(baseline_revisited, ranks, gnd, KAPPAS),
                partial(revisited_evaluation, ranks, gnd, KAPPAS),
            ),
        ]
        for name, baseline_fn, ours_fn in rows:
            t_base, expected = best_time(baseline_fn, args.repeats)
            t_ours, actual = best_time(ours_fn, args.repeats)
            if isinstance(actual, dict):
                diff = max(
                    max_abs_diff(
                        (
                            actual[s]["map"],
                            actual[s]["aps"],
                            list(actual[s]["mp@k"].values()),
                            actual[s]["prs"],
                        ),
                        expected[s],
                    )
                    for s in actual
                )
            else:
                diff = max_abs_diff(actual, expected)
            if diff > 1e-6:
                raise SystemExit(f"{name}: outputs differ from the baseline by {diff}")
            extra = peak_extra_memory(ours_fn)
            print(
                f"{f'{NUM_QUERIES} x {num_database:,}':>14} {name:>22} {t_base:>11.4f} "
                f"{t_ours:>9.4f} {t_base / t_ours:>8.1f}x {diff:>11.2e} "
                f"{extra / 2**20:>14.1f} {ranks.nbytes / 2**20:>9.1f}"
            )


if __name__ == "__main__":
    main()
