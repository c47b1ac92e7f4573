"""Search over descriptors sharded across files: streaming build, parts, merge, save/load."""

import json

import faiss
import numpy as np
import pytest

from jaxretrieval import extraction
from jaxretrieval.search import (
    DescriptorFiles,
    SearchIndex,
    ShardedSearchIndex,
    build_sharded_index,
    knn_search,
    merge_top_k,
)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """1 OpenMP thread: on 2 busy cores, faiss's 2 threads made PQ training 10x slower."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, num_clusters=30, spread=0.3):
    centres = _unit_rows(rng, num_clusters, d)
    x = centres[rng.integers(0, num_clusters, size=n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_npz(path, descriptors, valid):
    """An .npz as extraction writes it (save_descriptors), unreadable rows zeroed."""
    result = extraction.ExtractionResult(
        descriptors=descriptors * valid[:, None],
        valid=valid,
        paths=[f"image_{i}.jpg" for i in range(len(valid))],
        failures=[(f"image_{i}.jpg", "unreadable") for i in np.flatnonzero(~valid)],
        compiled_shapes=[],
    )
    extraction.save_descriptors(path, result, key="test")


@pytest.fixture
def shards(tmp_path):
    """Three files (.npy, extraction .npz with 2 unreadable images, .npy) of 8-d rows.

    Returns the paths, every row in id order, and the valid mask.
    """
    rng = np.random.default_rng(0)
    rows = _unit_rows(rng, 120, 8)
    valid = np.ones(120, bool)
    valid[[55, 60]] = False
    np.save(tmp_path / "a.npy", rows[:40])
    _write_npz(tmp_path / "b.npz", rows[40:90], valid[40:90])
    np.save(tmp_path / "c.npy", rows[90:])
    paths = [tmp_path / "a.npy", tmp_path / "b.npz", tmp_path / "c.npy"]
    return paths, rows, valid


def _exact(queries, rows, valid, k):
    """Flat search over the valid rows, answered in global ids."""
    kept = np.flatnonzero(valid)
    similarities, local = knn_search(queries, rows[kept], k=k)
    return similarities, kept[local]


def test_descriptor_files_reads_headers_blocks_and_samples(shards):
    paths, rows, valid = shards
    files = DescriptorFiles(paths)
    assert files.dim == 8 and files.rows == [40, 50, 30] and files.total_rows == 120
    blocks = list(files.blocks(block_rows=16))
    ids = np.concatenate([b[0] for b in blocks])
    np.testing.assert_array_equal(ids, np.flatnonzero(valid))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), rows[valid])
    assert max(len(b[0]) for b in blocks) <= 16
    # Gathering a sample skips the unreadable rows (55 and 60).
    np.testing.assert_array_equal(files.gather([3, 55, 50, 60, 100]), rows[[3, 50, 100]])
    # Unsorted ids across files come back in the caller's order, not file order.
    np.testing.assert_array_equal(files.gather([100, 55, 3, 95, 50]), rows[[100, 3, 95, 50]])


@pytest.mark.parametrize("rows_per_part", [None, 25])
def test_flat_parts_equal_one_flat_index(shards, rows_per_part):
    paths, rows, valid = shards
    queries = _unit_rows(np.random.default_rng(1), 7, 8)
    index = build_sharded_index(paths, index_type="flat", rows_per_part=rows_per_part)
    assert index.size == 118
    assert len(index.parts) == (1 if rows_per_part is None else 5)
    similarities, ids = index.search(queries, k=10)
    expected_similarities, expected_ids = _exact(queries, rows, valid, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(similarities, expected_similarities, rtol=1e-6)


def test_ivf_without_pq_probing_every_list_is_exact(shards):
    """IVF-Flat parts trained once and probing all lists return the flat top-k."""
    paths, rows, valid = shards
    queries = _unit_rows(np.random.default_rng(2), 6, 8)
    index = build_sharded_index(
        paths, index_type="ivf", num_lists=4, num_probes=4, rows_per_part=50, block_rows=7
    )
    assert [part.size for part in index.parts] == [50, 50, 18]
    similarities, ids = index.search(queries, k=12)
    expected_similarities, expected_ids = _exact(queries, rows, valid, 12)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(similarities, expected_similarities, rtol=1e-5)


def test_ivfpq_parts_recall_and_match_one_ivfpq_index(tmp_path):
    """Sharding changes nothing: the parts share one training, so they score alike."""
    rng = np.random.default_rng(3)
    database, queries = _clustered(rng, 2000, 16), _clustered(rng, 20, 16)
    for number in range(4):
        np.save(tmp_path / f"shard_{number}.npy", database[number * 500 : (number + 1) * 500])
    paths = sorted(tmp_path.glob("shard_*.npy"))
    options = dict(index_type="ivfpq", num_lists=16, num_probes=16, num_subquantizers=8)
    one = build_sharded_index(paths, **options)
    four = build_sharded_index(paths, rows_per_part=500, **options)
    assert len(one.parts) == 1 and len(four.parts) == 4
    one_similarities, one_ids = one.search(queries, k=10)
    four_similarities, four_ids = four.search(queries, k=10)
    np.testing.assert_array_equal(four_ids, one_ids)
    np.testing.assert_allclose(four_similarities, one_similarities, rtol=1e-5)
    exact = knn_search(queries, database, k=10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(four_ids, exact, strict=True)])
    assert recall >= 0.7, recall  # 8 bytes per 16-d vector; measured 0.86


def test_save_load_and_merging_parts_loaded_apart(shards, tmp_path):
    paths, rows, valid = shards
    queries = _unit_rows(np.random.default_rng(4), 5, 8)
    index = build_sharded_index(
        paths, index_type="ivf", num_lists=4, num_probes=4, rows_per_part=50
    )
    manifest = index.save(tmp_path / "index")
    entries = json.loads(manifest.read_text())["parts"]
    # Part 1 skipped the unreadable rows, so it keeps an id array; the others an offset.
    assert [("ids" in e, e.get("offset")) for e in entries] == [
        (False, 0),
        (True, None),
        (False, 102),
    ]
    loaded = ShardedSearchIndex.load(tmp_path / "index")
    expected = index.search(queries, k=8)
    found = loaded.search(queries, k=8)
    np.testing.assert_array_equal(found[1], expected[1])
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-6)
    # Two machines, each with its own parts, then one merge.
    first = ShardedSearchIndex.load(tmp_path / "index", parts=[0]).search(queries, k=8)
    rest = ShardedSearchIndex.load(tmp_path / "index", parts=[1, 2]).search(queries, k=8)
    merged = merge_top_k([first[0], rest[0]], [first[1], rest[1]], k=8)
    np.testing.assert_array_equal(merged[1], expected[1])


def test_set_num_probes_changes_an_ivf_search():
    rng = np.random.default_rng(5)
    database, queries = _clustered(rng, 600, 8), _clustered(rng, 10, 8)
    index = SearchIndex(8, index_type="ivf", num_lists=20, num_probes=1)
    index.train(database)
    index.add(database)
    narrow = index.search(queries, k=20)[1]
    index.set_num_probes(20)
    np.testing.assert_array_equal(
        index.search(queries, k=20)[1], knn_search(queries, database, k=20)[1]
    )
    assert not np.array_equal(narrow, index.search(queries, k=20)[1])
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        index.set_num_probes(0)


def test_merge_top_k_pads_and_keeps_source_order_on_ties():
    scores, ids = merge_top_k(
        [np.array([[0.5, -np.inf]], np.float32), np.array([[0.5, 0.1]], np.float32)],
        [np.array([[4, -1]]), np.array([[9, 2]])],
        k=4,
    )
    assert ids.tolist() == [[4, 9, 2, -1]]
    assert scores[0, -1] == -np.inf
    with pytest.raises(ValueError, match="one shape"):
        merge_top_k([np.zeros((2, 3))], [np.zeros((2, 2), np.int64)], k=1)


def test_descriptor_files_errors_name_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 8), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((3, 8), np.int32))
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(ValueError, match=r"b\.npy: descriptors have dimension 4"):
        DescriptorFiles([tmp_path / "a.npy", tmp_path / "b.npy"])
    with pytest.raises(ValueError, match=r"ints\.npy: descriptors must be a 2-D floating"):
        DescriptorFiles([tmp_path / "ints.npy"])
    with pytest.raises(ValueError, match=r"\.npy or \.npz"):
        DescriptorFiles([tmp_path / "x.txt"])
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        DescriptorFiles([tmp_path / "missing.npy"])
    with pytest.raises(ValueError, match="at least one file"):
        DescriptorFiles([])
    with pytest.raises(FileNotFoundError, match="missing index.json"):
        ShardedSearchIndex.load(tmp_path)
    np.save(tmp_path / "nan.npy", np.full((3, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_sharded_index([tmp_path / "nan.npy"], index_type="flat")
