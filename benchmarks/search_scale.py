"""Search at scale: IVF-PQ over descriptors sharded across files vs exact search.

Synthetic, seeded, L2-normalised descriptors with retrieval-like structure are written
block by block as ``.npy`` shard files (never all in memory), then:

1. build: :func:`jaxretrieval.search.build_sharded_index` (IVF-PQ, trained once on a
   seeded sample, streamed from the files) with 1 and 4 parts and a second PQ size;
   build time and bytes per image (saved index size on disk / N);
2. exact top-100 of the query sample two ways: faiss ``IndexFlatIP`` over all rows (the
   library's ``SearchIndex("flat")``, which holds all 4 D bytes per image in memory) and
   a NumPy blocked matmul + ``argpartition`` streaming the files;
3. recall@100 of every IVF-PQ build against the exact top-100 at several ``num_probes``,
   and of IVF-PQ with exact re-ranking of its top-``--shortlist`` (raw rows read back
   from the files with :meth:`DescriptorFiles.gather`);
4. per-query latency: the whole query batch in one call (time / Q) and single queries
   one at a time (median), with ratios against the exact faiss search.

The data: ``N / 100`` "scenes" (about 100 images each, like views of one landmark),
grouped ten to a "topic" (similar-looking scenes), in a space whose variance decays as
``1 / sqrt(i)`` over a random rotation (CNN descriptors concentrate their variance in
few directions). An image is its scene's centre plus noise; queries are new images of
random scenes. Neighbour similarities are graded (same scene about 0.6, same topic
about 0.4, others about 0), so recall@100 measures something, unlike on uniform noise.

faiss runs with ``--threads`` OpenMP threads (default 1: on 2 cores shared with other
jobs, 2 threads made faiss slower, see tests/test_search_shards.py); single-query
latency always uses 1 thread (see :mod:`jaxretrieval.search`). NumPy's matmul gets one
OpenBLAS thread too (``OPENBLAS_NUM_THREADS=1`` unless set: on the loaded 2-core machine
two threads made a 1000 x 2500 x 256 matmul 2.3x slower, and a single query 25x).

``num_lists`` defaults to ``min(1024, 4 sqrt(N))`` (the library's default 4 sqrt(N) is
4000 at 1M; 1024 keeps the 2-core build short), 128 with ``--quick``.

Run from the repository root::

    .venv/bin/python -m benchmarks.search_scale --quick                 # 20k, < 1 minute
    nice -n 5 .venv/bin/python -m benchmarks.search_scale --json out.json   # 1M x 256
"""

import argparse
import functools
import math
import os
import pathlib
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

# One BLAS thread for NumPy's matmul, like faiss's --threads default; only takes effect
# when nothing imported NumPy before this module (the CLI), and never overrides the user.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from jaxretrieval.search import DescriptorFiles, SearchIndex, build_sharded_index  # noqa: E402

TOP = 100
IMAGES_PER_SCENE = 100
SCENES_PER_TOPIC = 10
SCENE_SPREAD = 0.7  # scene centre = topic centre + SCENE_SPREAD * noise
IMAGE_NOISE = 1.0  # image = scene centre + IMAGE_NOISE * noise
GENERATION_BLOCK = 65536


class SyntheticCollection:
    """Seeded scenes-within-topics descriptors; rows are generated on demand, by block.

    Only the scene centres are held (``N / 100`` rows). A block is fully determined by
    ``(seed, stream, block number)``, so the files are reproducible.
    """

    def __init__(self, num_images: int, dim: int, *, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        self.dim = dim
        self.seed = seed
        scales = (1.0 + np.arange(dim)) ** -0.5
        self.scales = (scales / np.sqrt(np.mean(scales**2))).astype(np.float32)  # (D,)
        gaussian = rng.standard_normal((dim, dim))
        self.rotation = np.linalg.qr(gaussian)[0].astype(np.float32)  # (D, D)
        num_scenes = max(1, num_images // IMAGES_PER_SCENE)
        num_topics = max(1, num_scenes // SCENES_PER_TOPIC)
        topics = rng.standard_normal((num_topics, dim), dtype=np.float32) * self.scales
        scene_topics = rng.integers(num_topics, size=num_scenes)
        spread = rng.standard_normal((num_scenes, dim), dtype=np.float32) * self.scales
        self.scenes = topics[scene_topics] + SCENE_SPREAD * spread  # (S, D)

    def images(self, num_rows: int, *, stream: int, block: int) -> np.ndarray:
        """``(num_rows, D)`` float32 L2-normalised images of random scenes."""
        rng = np.random.default_rng([self.seed, stream, block])
        scene = rng.integers(len(self.scenes), size=num_rows)
        noise = rng.standard_normal((num_rows, self.dim), dtype=np.float32) * self.scales
        x = (self.scenes[scene] + IMAGE_NOISE * noise) @ self.rotation  # (n, D)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def write_descriptor_files(
    collection: SyntheticCollection, num_images: int, num_files: int, folder: pathlib.Path
) -> list[pathlib.Path]:
    """``num_files`` ``.npy`` shards of the database, written one block at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, num_images, num_files + 1).astype(np.int64)
    paths = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = folder / f"descriptors_{number:03d}.npy"
        array = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float32, shape=(int(stop - start), collection.dim)
        )
        for offset in range(0, int(stop - start), GENERATION_BLOCK):
            rows = min(GENERATION_BLOCK, int(stop - start) - offset)
            block = (number << 20) + offset // GENERATION_BLOCK
            array[offset : offset + rows] = collection.images(rows, stream=1, block=block)
        array.flush()
        del array
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- searches


def numpy_exact_top_k(
    files: DescriptorFiles, queries: np.ndarray, *, k: int, block_rows: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by a blocked matmul over the files and a running ``argpartition``."""
    num_queries = queries.shape[0]
    best_scores = np.full((num_queries, k), -np.inf, np.float32)
    best_ids = np.full((num_queries, k), -1, np.int64)
    for ids, block in files.blocks(block_rows):
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)  # (Q, K + B)
        candidates = np.concatenate(
            [best_ids, np.broadcast_to(ids, (num_queries, ids.size))], axis=1
        )  # (Q, K + B)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, K)
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(candidates, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(
        best_ids, order, axis=1
    )


def reranked_search(
    index, files: DescriptorFiles, queries: np.ndarray, *, shortlist: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVF-PQ top-``shortlist``, re-scored exactly with raw rows gathered from the files.

    :meth:`DescriptorFiles.gather` returns rows in sorted-id order, so the shortlist's
    unique ids are sorted, gathered once per chunk of queries and looked up by position.
    """
    _, candidates = index.search(queries, k=shortlist)  # (Q, R)
    out_scores = np.full((queries.shape[0], k), -np.inf, np.float32)
    out_ids = np.full((queries.shape[0], k), -1, np.int64)
    chunk = 128
    for start in range(0, queries.shape[0], chunk):
        ids = candidates[start : start + chunk]  # (c, R)
        found = ids >= 0
        unique = np.unique(ids[found])
        rows = files.gather(unique)  # (U, D)
        if rows.shape[0] != unique.size:
            raise RuntimeError("re-ranking needs every shortlisted row to be valid")
        position = np.searchsorted(unique, np.where(found, ids, unique[0]))  # (c, R)
        scores = np.einsum("cd,crd->cr", queries[start : start + chunk], rows[position])
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (c, K)
        out_scores[start : start + chunk] = np.take_along_axis(scores, order, axis=1)
        out_ids[start : start + chunk] = np.take_along_axis(ids, order, axis=1)
    return out_scores, out_ids


def recall_at_k(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k contains."""
    hits = [
        np.intersect1d(found[found >= 0], exact).size / exact.size
        for found, exact in zip(found_ids, exact_ids, strict=True)
    ]
    return float(np.mean(hits))


def latency(
    search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    queries: np.ndarray,
    *,
    num_single: int,
    threads: int,
) -> dict[str, Any]:
    """Batch (all queries, ``threads`` faiss threads) and single-query (1 thread) times."""
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    _, ids = search(queries)
    batch_seconds = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    singles = []
    for query in queries[:num_single]:
        start = time.perf_counter()
        search(query[None])
        singles.append(time.perf_counter() - start)
    faiss.omp_set_num_threads(threads)
    return {
        "ids": ids,
        "batch_ms_per_query": 1e3 * batch_seconds / len(queries),
        "single_ms": 1e3 * statistics.median(singles),
        "num_single": len(singles),
    }


def folder_bytes(folder: pathlib.Path) -> int:
    """Total size of the files in a folder."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--files", type=int, default=8, help="descriptor shard files")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single-queries", type=int, default=100, help="timed one at a time")
    parser.add_argument("--num-lists", type=int, default=None, help="min(1024, 4 sqrt N)")
    parser.add_argument("--num-probes", type=_int_list, default=[8, 16, 64, 128])
    parser.add_argument(
        "--subquantizers", type=_int_list, default=[16, 32], help="PQ bytes per image"
    )
    parser.add_argument("--parts", type=_int_list, default=[1, 4], help="index part counts")
    parser.add_argument("--shortlist", type=int, default=1000, help="re-ranked per query")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep files here (default: temp)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="20k images, 200 queries, 128 lists")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = min(args.num_images, 20_000)
        args.queries = min(args.queries, 200)
        args.single_queries = min(args.single_queries, 20)
        args.num_lists = args.num_lists or 128
    return args


def run(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
    """The whole measurement in ``workdir``; returns the results (also printed)."""
    num_images, dim = args.num_images, args.dim
    num_lists = args.num_lists or min(1024, int(round(4 * math.sqrt(num_images))))
    num_single = min(args.single_queries, args.queries)
    faiss.omp_set_num_threads(args.threads)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("workdir", "json", "quick")},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        },
    }
    results["config"]["num_lists"] = num_lists

    start = time.perf_counter()
    collection = SyntheticCollection(num_images, dim, seed=args.seed)
    paths = write_descriptor_files(collection, num_images, args.files, workdir / "descriptors")
    queries = np.concatenate(
        [
            collection.images(min(GENERATION_BLOCK, args.queries - s), stream=2, block=b)
            for b, s in enumerate(range(0, args.queries, GENERATION_BLOCK))
        ]
    )
    files = DescriptorFiles(paths)
    results["data"] = {
        "generate_seconds": time.perf_counter() - start,
        "file_bytes": sum(p.stat().st_size for p in paths),
        "num_scenes": len(collection.scenes),
    }
    print(f"wrote {len(paths)} files, {results['data']['file_bytes'] / 2**30:.2f} GiB", flush=True)

    # Exact: faiss flat over all rows (in memory), and NumPy streaming the files.
    start = time.perf_counter()
    flat = SearchIndex(dim, index_type="flat", use_gpu=False)
    for _, block in files.blocks():
        flat.add(block)
    flat_build = time.perf_counter() - start
    exact = latency(
        functools.partial(flat.search, k=TOP),
        queries,
        num_single=num_single,
        threads=args.threads,
    )
    exact_ids = exact["ids"]
    rows = [
        {
            "method": "exact faiss IndexFlatIP",
            "build": "in-memory",
            "num_probes": None,
            "recall": 1.0,
            "build_seconds": flat_build,
            "bytes_per_image": 4 * dim,
            **exact,
        }
    ]
    del flat
    print(f"exact faiss: {exact['batch_ms_per_query']:.2f} ms/query (batch)", flush=True)
    exhaustive_single = min(num_single, max(3, num_single // 10))
    numpy_exact = latency(
        lambda q: numpy_exact_top_k(files, q, k=TOP),
        queries,
        num_single=exhaustive_single,
        threads=args.threads,
    )
    rows.append(
        {
            "method": "exact NumPy blocked matmul",
            "build": "files",
            "num_probes": None,
            "recall": recall_at_k(numpy_exact["ids"], exact_ids),
            "build_seconds": 0.0,
            "bytes_per_image": 4 * dim,
            **numpy_exact,
        }
    )
    print(f"exact NumPy: {numpy_exact['batch_ms_per_query']:.2f} ms/query (batch)", flush=True)

    # IVF-PQ builds: every part count at the first PQ size, then the other PQ sizes.
    builds = [(args.subquantizers[0], parts) for parts in args.parts]
    builds += [(m, args.parts[0]) for m in args.subquantizers[1:]]
    results["builds"] = []
    for number, (num_subquantizers, num_parts) in enumerate(builds):
        label = f"IVF{num_lists},PQ{num_subquantizers} x{num_parts}"
        start = time.perf_counter()
        index = build_sharded_index(
            files,
            num_lists=num_lists,
            num_subquantizers=num_subquantizers,
            rows_per_part=math.ceil(num_images / num_parts),
            seed=args.seed,
            use_gpu=False,
        )
        build_seconds = time.perf_counter() - start
        folder = workdir / f"index_{number}"
        shutil.rmtree(folder, ignore_errors=True)
        index.save(folder)
        index_bytes = folder_bytes(folder)
        build = {
            "label": label,
            "num_subquantizers": num_subquantizers,
            "parts": len(index.parts),
            "build_seconds": build_seconds,
            "index_bytes": index_bytes,
            "bytes_per_image": index_bytes / num_images,
        }
        results["builds"].append(build)
        print(f"{label}: built in {build_seconds:.1f} s, {index_bytes} bytes", flush=True)
        for num_probes in args.num_probes:
            first = len(rows)
            index.set_num_probes(num_probes)
            measured = latency(
                lambda q, index=index: index.search(q, k=TOP),
                queries,
                num_single=num_single,
                threads=args.threads,
            )
            rows.append(
                {
                    "method": "IVF-PQ",
                    "build": label,
                    "num_probes": min(num_probes, num_lists),
                    "recall": recall_at_k(measured["ids"], exact_ids),
                    "build_seconds": build_seconds,
                    "bytes_per_image": build["bytes_per_image"],
                    **measured,
                }
            )
            if num_parts == args.parts[0] and args.shortlist > TOP:
                shortlist = min(args.shortlist, num_images)
                measured = latency(
                    functools.partial(reranked_search, index, files, shortlist=shortlist, k=TOP),
                    queries,
                    num_single=num_single,
                    threads=args.threads,
                )
                rows.append(
                    {
                        "method": f"IVF-PQ + exact re-rank of top-{shortlist}",
                        "build": label,
                        "num_probes": min(num_probes, num_lists),
                        "recall": recall_at_k(measured["ids"], exact_ids),
                        "build_seconds": build_seconds,
                        "bytes_per_image": build["bytes_per_image"],
                        **measured,
                    }
                )
            recalls = " / re-ranked ".join(f"{r['recall']:.3f}" for r in rows[first:])
            print(f"  probes {num_probes}: recall {recalls}", flush=True)
        del index
    for row in rows:
        row.pop("ids")
        row["batch_speedup"] = rows[0]["batch_ms_per_query"] / row["batch_ms_per_query"]
        row["single_speedup"] = rows[0]["single_ms"] / row["single_ms"]
    results["rows"] = rows
    results["peak_rss_gib"] = peak_rss_gib()
    results["machine"]["load_average_at_end"] = os.getloadavg()
    return results


def format_results(results: dict[str, Any]) -> str:
    """The builds and the search rows as Markdown tables."""
    config = results["config"]
    lines = [
        f"N = {config['num_images']}, D = {config['dim']}, {config['files']} files, "
        f"{config['queries']} queries, top-{TOP}, {config['num_lists']} lists, "
        f"faiss threads {config['threads']}; data generated in "
        f"{results['data']['generate_seconds']:.1f} s; peak RSS "
        f"{results['peak_rss_gib']:.2f} GiB; load average (1 min) "
        f"{results['machine']['load_average_at_start'][0]:.1f} at start, "
        f"{results['machine']['load_average_at_end'][0]:.1f} at end",
        "",
        common.markdown_table(
            ["index", "parts", "build s", "index MiB", "bytes / image"],
            [
                [
                    b["label"],
                    b["parts"],
                    f"{b['build_seconds']:.1f}",
                    f"{b['index_bytes'] / 2**20:.1f}",
                    f"{b['bytes_per_image']:.1f}",
                ]
                for b in results["builds"]
            ],
        ),
        "",
        common.markdown_table(
            [
                "method",
                "index",
                "probes",
                "recall@100",
                "batch ms/q",
                "single ms/q",
                "batch speed-up",
                "single speed-up",
            ],
            [
                [
                    r["method"],
                    r["build"],
                    "-" if r["num_probes"] is None else r["num_probes"],
                    f"{r['recall']:.3f}",
                    f"{r['batch_ms_per_query']:.3f}",
                    f"{r['single_ms']:.3f}",
                    f"{r['batch_speedup']:.1f}x",
                    f"{r['single_speedup']:.1f}x",
                ]
                for r in results["rows"]
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the tables; returns the results."""
    args = parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="search_scale_") as folder:
            results = run(args, pathlib.Path(folder))
    else:
        results = run(args, pathlib.Path(args.workdir))
    print(format_results(results))
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
