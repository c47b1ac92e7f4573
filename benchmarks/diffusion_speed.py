"""Diffusion at scale: graph build, batched device CG vs SciPy CG, spectral and truncated ranking.

Synthetic clustered descriptors (L2-normalised, D = 128 and 512) at 10k / 100k (/ 1M)
database images and 100 queries (noisy copies of database items). For each size:

* graph: mutual kNN affinity (k=50, gamma=3) via faiss, exact up to 20k items and IVF
  above; build time, peak RSS (``resource.getrusage``) and bytes per image;
* CG: ``diffusion_scores`` jitted, all queries of a batch at once (alpha=0.99, 20
  iterations, tol 1e-6, 10 seeds), against ``scipy.sparse.linalg.cg`` one query at a time on
  the same matrix; per-query latency, ratio and top-100 overlap;
* spectral: ``learn_spectral_index`` (offline eigsh, rank R) and ``spectral_scores`` latency,
  top-100 overlap with CG;
* truncated: ``truncated_diffusion_scores`` on each query's top-1000 shortlist, latency and
  top-100 overlap with CG. fyang93/diffusion (offline truncated diffusion of every database
  item) needs about 75 s offline and 2.4 ms per query at 100k on this machine (measured
  before this project, not re-run here).

The graph's nodes are relabelled by reverse Cuthill-McKee (``locality_order``) so that the
batched gathers stay in cache; ``--no-reorder`` switches that off (SciPy runs on the same
matrix either way).

Run from the repository root::

    .venv/bin/python -m benchmarks.diffusion_speed --quick          # 10k, D=128 and 512
    .venv/bin/python -m benchmarks.diffusion_speed                  # 10k and 100k
    .venv/bin/python -m benchmarks.diffusion_speed --sizes 1000000 --dims 128 --rank 100
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg

from jaxretrieval import diffusion as dif
from jaxretrieval.search import knn_search

ALPHA = 0.99
NUM_ITERATIONS = 20
TOL = 1e-6
NUM_SEEDS = 10
GAMMA = 3.0
TOP = 100


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def clustered_descriptors(rng, num_items, dim, num_queries, cluster_size=100):
    """Clusters of ~cluster_size items around random centres; queries are noisy items."""
    num_clusters = max(num_items // cluster_size, 1)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    database = centres[rng.integers(num_clusters, size=num_items)]
    database += 0.35 * rng.standard_normal((num_items, dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries = database[rng.choice(num_items, size=num_queries, replace=False)]
    queries = queries + 0.2 * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return database, queries


def top_overlap(a, b, top=TOP):
    """Mean |top(a) & top(b)| / top over rows."""
    overlaps = []
    for row_a, row_b in zip(a, b, strict=True):
        set_a = set(np.argpartition(-row_a, top)[:top].tolist())
        set_b = set(np.argpartition(-row_b, top)[:top].tolist())
        overlaps.append(len(set_a & set_b) / top)
    return float(np.mean(overlaps))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    out = jax.block_until_ready(out)
    return out, time.perf_counter() - start


def run_batches(fn, seeds, batch_size):
    """Runs fn over query batches (first batch also compiles); returns scores, compile, run."""
    num_queries = seeds.indices.shape[0]
    first = dif.Seeds(seeds.indices[:batch_size], seeds.weights[:batch_size])
    _, compile_time = timed(fn, first)
    outputs, total = [], 0.0
    for start in range(0, num_queries, batch_size):
        batch = dif.Seeds(
            seeds.indices[start : start + batch_size], seeds.weights[start : start + batch_size]
        )
        if batch.indices.shape[0] < batch_size:  # pad to the compiled shape
            pad = batch_size - batch.indices.shape[0]
            batch = dif.Seeds(
                np.pad(batch.indices, ((0, pad), (0, 0))), np.pad(batch.weights, ((0, pad), (0, 0)))
            )
        out, elapsed = timed(fn, batch)
        total += elapsed
        outputs.append(np.asarray(out)[: min(batch_size, num_queries - start)])
    return np.concatenate(outputs), compile_time, total


def log_stage(row, stage, keys):
    """Prints a finished stage at once, so a long run (1M) shows partial results."""
    values = ", ".join(
        f"{key}={row[key]:.4g}" if isinstance(row[key], float) else f"{key}={row[key]}"
        for key in keys
    )
    print(f"  [N={row['N']} D={row['D']}] {stage}: {values}", flush=True)


def benchmark(num_items, dim, args, rng):
    row = {"N": num_items, "D": dim}
    database, queries = clustered_descriptors(
        rng, num_items, dim, args.num_queries, args.cluster_size
    )
    index_type = "flat" if num_items <= 20000 else "ivf"
    row["index"] = index_type

    start = time.perf_counter()
    graph = dif.knn_affinity(
        database, num_neighbors=args.num_neighbors, gamma=GAMMA, index_type=index_type
    )
    row["graph_s"] = time.perf_counter() - start
    graph_bytes = sum(np.asarray(a).nbytes for a in graph)
    row["graph_B/img"] = graph_bytes / num_items
    row["mutual_deg"] = float(np.asarray(graph.valid).sum(axis=1).mean())
    row["components"] = scipy.sparse.csgraph.connected_components(dif.affinity_matrix(graph))[0]

    # Seeds from an exact faiss search of the queries (10 seeds, s^3).
    similarities, indices = knn_search(queries, database, k=NUM_SEEDS)
    inverse = np.arange(num_items)
    if not args.no_reorder:
        start = time.perf_counter()
        order = dif.locality_order(graph)
        graph = dif.permute_affinity(graph, order)
        inverse = np.argsort(order)
        row["reorder_s"] = time.perf_counter() - start
    seeds = dif.seeds_from_neighbors(similarities, inverse[indices], gamma=GAMMA)
    seeds = dif.Seeds(np.asarray(seeds.indices), np.asarray(seeds.weights))
    normalized = jax.device_put(dif.normalize_affinity(graph))
    del graph
    row["rss_graph_GiB"] = peak_rss_gib()
    log_stage(
        row,
        "graph",
        ["index", "graph_s", "graph_B/img", "mutual_deg", "components", "rss_graph_GiB"],
    )

    # Batched CG on the device.
    diffuse = jax.jit(
        lambda s: dif.diffusion_scores(
            normalized, s, alpha=ALPHA, num_iterations=NUM_ITERATIONS, tol=TOL
        )
    )
    batch_size = min(args.batch_size, args.num_queries)
    cg_scores, cg_compile, cg_total = run_batches(diffuse, seeds, batch_size)
    row["jax_cg_ms/q"] = 1000 * cg_total / args.num_queries
    row["compile_s"] = cg_compile
    row["rss_cg_GiB"] = peak_rss_gib()
    log_stage(row, "batched CG", ["jax_cg_ms/q", "compile_s", "rss_cg_GiB"])

    # SciPy CG, one query at a time, on the same (normalised, relabelled) matrix.
    matrix = dif.affinity_matrix(normalized)
    system = scipy.sparse.identity(num_items, dtype=np.float32, format="csr") - ALPHA * matrix
    system = system.tocsr()
    dense_seeds = np.asarray(dif.seed_vectors(dif.Seeds(*seeds), num_items=num_items))
    num_scipy = min(args.scipy_queries, args.num_queries)
    scipy_scores = []
    start = time.perf_counter()
    for q in range(num_scipy):
        solution, _ = scipy.sparse.linalg.cg(
            system, dense_seeds[q], rtol=TOL, maxiter=NUM_ITERATIONS
        )
        scipy_scores.append(solution)
    row["scipy_cg_ms/q"] = 1000 * (time.perf_counter() - start) / num_scipy
    row["speedup"] = row["scipy_cg_ms/q"] / row["jax_cg_ms/q"]
    row["top100_vs_scipy"] = top_overlap(cg_scores[:num_scipy], np.stack(scipy_scores))
    del system, scipy_scores
    log_stage(row, "SciPy CG", ["scipy_cg_ms/q", "speedup", "top100_vs_scipy"])

    # Truncated diffusion on each query's top-T shortlist.
    _, shortlist = knn_search(queries, database, k=min(args.shortlist, num_items))
    shortlist = inverse[shortlist].astype(np.int32)
    truncate = jax.jit(
        lambda s, t: dif.truncated_diffusion_scores(
            normalized, s, t, alpha=ALPHA, num_iterations=NUM_ITERATIONS, tol=TOL
        )
    )
    _, _ = timed(
        truncate,
        dif.Seeds(seeds.indices[:batch_size], seeds.weights[:batch_size]),
        shortlist[:batch_size],
    )
    truncated_total, truncated_full = 0.0, np.full_like(cg_scores, -np.inf)
    for start in range(0, args.num_queries - batch_size + 1, batch_size):
        part = slice(start, start + batch_size)
        out, elapsed = timed(
            truncate, dif.Seeds(seeds.indices[part], seeds.weights[part]), shortlist[part]
        )
        truncated_total += elapsed
        np.put_along_axis(truncated_full[part], shortlist[part], np.asarray(out), axis=1)
    evaluated = (args.num_queries // batch_size) * batch_size
    row["trunc_ms/q"] = 1000 * truncated_total / max(evaluated, 1)
    row["top100_trunc"] = top_overlap(truncated_full[:evaluated], cg_scores[:evaluated])
    log_stage(row, "truncated", ["trunc_ms/q", "top100_trunc"])

    # Fast spectral ranking: offline eigsh, then two small products per query.
    if args.rank == 0:
        row["rss_peak_GiB"] = peak_rss_gib()
        return row
    start = time.perf_counter()
    spectral_index = dif.learn_spectral_index(normalized, rank=args.rank)
    row["spectral_offline_s"] = time.perf_counter() - start
    row["spectral_B/img"] = spectral_index.eigenvectors.nbytes / num_items
    spectral_index = jax.device_put(spectral_index)
    spectral = jax.jit(lambda s: dif.spectral_scores(spectral_index, s, alpha=ALPHA))
    spectral_scores, _, spectral_total = run_batches(spectral, seeds, batch_size)
    row["spectral_ms/q"] = 1000 * spectral_total / args.num_queries
    row["top100_spectral"] = top_overlap(spectral_scores, cg_scores)
    log_stage(
        row,
        "spectral",
        ["spectral_offline_s", "spectral_B/img", "spectral_ms/q", "top100_spectral"],
    )
    row["rss_peak_GiB"] = peak_rss_gib()
    return row


def print_table(rows):
    keys = list(dict.fromkeys(key for row in rows for key in row))
    formatted = [
        [
            f"{row.get(key, ''):.3g}" if isinstance(row.get(key), float) else str(row.get(key, ""))
            for key in keys
        ]
        for row in rows
    ]
    widths = [max(len(key), *(len(f[i]) for f in formatted)) for i, key in enumerate(keys)]
    print("  ".join(key.rjust(w) for key, w in zip(keys, widths, strict=True)))
    for f in formatted:
        print("  ".join(v.rjust(w) for v, w in zip(f, widths, strict=True)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k images only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--scipy-queries", type=int, default=20)
    parser.add_argument("--num-neighbors", type=int, default=50)
    parser.add_argument("--shortlist", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=100, help="spectral rank; 0 skips it")
    parser.add_argument("--cluster-size", type=int, default=100)
    parser.add_argument("--no-reorder", action="store_true")
    args = parser.parse_args()
    sizes = [10_000] if args.quick else args.sizes
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; alpha={ALPHA}, "
        f"{NUM_ITERATIONS} CG iterations, k={args.num_neighbors}, {NUM_SEEDS} seeds, "
        f"rank={args.rank}, shortlist={args.shortlist}, reorder={not args.no_reorder}, "
        f"cluster size {args.cluster_size}"
    )
    rows = []
    for num_items in sizes:
        for dim in args.dims:
            rows.append(benchmark(num_items, dim, args, np.random.default_rng(0)))
            print_table(rows[-1:])
    print("\nsummary (ms/q = per query; speedup = SciPy CG / batched JAX CG):")
    print_table(rows)
    print("fyang93/diffusion at 100k (reference, not re-run): ~75 s offline, 2.4 ms/query.")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
