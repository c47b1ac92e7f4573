import faiss
import numpy as np
import pytest

from jaxretrieval import normalization
from jaxretrieval.search import SearchIndex, knn_search, rank_database
from tests.reference.similarity_reference import top_k_reference


def _descriptors(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, num_clusters=20, spread=0.15):
    """Unit rows around ``num_clusters`` centres, and each row's cluster."""
    centres = _descriptors(rng, num_clusters, d)
    labels = rng.integers(0, num_clusters, size=n)
    x = np.asarray(
        normalization.l2_normalize(centres[labels] + spread * rng.normal(size=(n, d))),
        np.float32,
    )
    return x, labels


def _recall(found, exact):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=True)])


# ------------------------------------------------------------------------------ knn_search


def test_knn_search_flat_matches_brute_force():
    rng = np.random.default_rng(0)
    queries, database = _descriptors(rng, 5, 8), _descriptors(rng, 30, 8)
    similarities, indices = knn_search(queries, database, k=4, batch_size=2)
    assert similarities.shape == indices.shape == (5, 4)
    assert similarities.dtype == np.float32 and indices.dtype == np.int64
    brute = queries.astype(np.float64) @ database.T.astype(np.float64)  # (Q, N)
    np.testing.assert_array_equal(indices, np.argsort(-brute, axis=1)[:, :4])
    np.testing.assert_allclose(similarities, np.sort(brute, axis=1)[:, ::-1][:, :4], rtol=1e-5)


def test_knn_search_ivf_exact_when_probing_every_list():
    rng = np.random.default_rng(1)
    queries, database = _descriptors(rng, 6, 8), _descriptors(rng, 200, 8)
    exact = knn_search(queries, database, k=5)
    approx = knn_search(queries, database, k=5, index_type="ivf", num_lists=4, num_probes=4)
    np.testing.assert_array_equal(approx[1], exact[1])
    np.testing.assert_allclose(approx[0], exact[0], rtol=1e-5)


@pytest.mark.parametrize(
    "index_type,options,min_recall",
    [
        # Measured 0.97 (4 of 126 lists probed) and 0.77 (4 x 8-bit codes) on this set.
        ("ivf", {"num_probes": 4}, 0.9),
        ("ivfpq", {"num_subquantizers": 4}, 0.65),
    ],
)
def test_knn_search_approximate_recall_vs_exact(index_type, options, min_recall):
    descriptors, _ = _clustered(np.random.default_rng(2), 1050, 16)
    database, queries = descriptors[:1000], descriptors[1000:]
    _, exact = knn_search(queries, database, k=10)
    similarities, approx = knn_search(queries, database, k=10, index_type=index_type, **options)
    assert approx.shape == (50, 10) and similarities.dtype == np.float32
    assert _recall(approx, exact) >= min_recall


def test_knn_search_exclude_matches_masked_brute_force():
    rng = np.random.default_rng(4)
    database = _descriptors(rng, 40, 8)
    scenes = np.arange(40) % 8  # 8 scenes of 5 images
    queries = database[:6]
    # Each query leaves out its own scene (5 ids), padded to X = 6 with -1.
    exclude = np.stack([np.r_[np.flatnonzero(scenes == scenes[q]), -1] for q in range(6)])
    similarities, indices = knn_search(queries, database, k=7, exclude=exclude)
    scores = queries.astype(np.float64) @ database.T.astype(np.float64)  # (Q, N)
    scores[scenes[:6, None] == scenes[None, :]] = -np.inf
    np.testing.assert_array_equal(indices, np.argsort(-scores, axis=1)[:, :7])
    np.testing.assert_allclose(similarities, np.sort(scores, axis=1)[:, ::-1][:, :7], rtol=1e-5)
    assert not np.any(scenes[indices] == scenes[:6, None])


def test_knn_search_exclude_pads_when_too_few_remain():
    database = np.eye(3, dtype=np.float32)
    similarities, indices = knn_search(
        database, database, k=3, exclude=np.array([[0, 1], [2, -1], [0, 0]])
    )
    np.testing.assert_array_equal(indices, [[2, -1, -1], [1, 0, -1], [2, 1, -1]])
    assert np.all(np.isneginf(similarities[indices < 0]))


def test_knn_search_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    database, _ = _clustered(rng, 600, 16)
    for index_type in ("ivf", "ivfpq"):
        options = {"index_type": index_type, "num_probes": 2, "num_subquantizers": 4}
        first = knn_search(database[:20], database, k=8, seed=7, **options)
        second = knn_search(database[:20], database, k=8, seed=7, **options)
        np.testing.assert_array_equal(first[1], second[1])
        np.testing.assert_array_equal(first[0], second[0])


def test_knn_search_raises(without_annotation_checks):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"k must be in \[1, N\].*\(3, 4\).*k=4"):
        knn_search(x, x, k=4)
    with pytest.raises(ValueError, match="empty"):
        knn_search(x, np.zeros((0, 4), np.float32), k=1)
    with pytest.raises(ValueError, match="'flat', 'ivf' or 'ivfpq'"):
        knn_search(x, x, k=1, index_type="hnsw")
    with pytest.raises(TypeError, match="floating"):
        knn_search(x, np.ones((3, 4), np.int32), k=1)
    with pytest.raises(ValueError, match="same dimension D"):
        knn_search(x, np.ones((3, 5), np.float32), k=1)
    with pytest.raises(ValueError, match=r"exclude must have shape \(3, X\), found shape \(2, 1\)"):
        knn_search(x, x, k=1, exclude=np.zeros((2, 1), np.int64))
    with pytest.raises(TypeError, match="exclude must hold integer indices, got dtype float32"):
        knn_search(x, x, k=1, exclude=np.zeros((3, 1), np.float32))
    with pytest.raises(ValueError, match=r"needs at least 256 training descriptors, found 3"):
        knn_search(x, x, k=1, index_type="ivfpq", num_subquantizers=2)


def test_nan_and_inf_rows_are_named():
    database = _descriptors(np.random.default_rng(6), 6, 4)
    database[1, 0] = database[4, 2] = np.nan
    database[3, 1] = np.inf
    expected = (
        r"database: 3 of 6 rows contain NaN or inf: NaN at rows \[1, 4\] and inf at rows \[3\]\."
    )
    with pytest.raises(ValueError, match=expected):
        knn_search(database[:1], database, k=1)
    many = np.full((8, 4), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"NaN at rows \[0, 1, 2, 3, 4\] \(\+3 more\)\.$"):
        SearchIndex(4).add(many)
    index = SearchIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"queries: 1 of 1 rows contain NaN or inf: inf at"):
        index.search(np.full((1, 4), -np.inf, np.float32), k=1)


# ----------------------------------------------------------------------------- rank_database


def test_rank_database_is_full_stable_ranking():
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
    np.testing.assert_array_equal(rank_database(q, db), [[1, 2, 3, 0]])


def test_rank_database_starts_with_the_flat_search():
    rng = np.random.default_rng(7)
    queries, database = _descriptors(rng, 4, 8), _descriptors(rng, 25, 8)
    ranks = rank_database(queries, database)
    assert ranks.shape == (4, 25) and sorted(ranks[0]) == list(range(25))
    np.testing.assert_array_equal(ranks[:, :5], knn_search(queries, database, k=5)[1])


# ------------------------------------------------------------------------------ SearchIndex


def test_faiss_flat_matches_reference_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    queries, database = _descriptors(rng, 5, 16), _descriptors(rng, 50, 16)
    index = SearchIndex(16)
    index.add(database[:30])
    index.add(database[30:])  # row numbers continue across add() calls
    scores, indices = index.search(queries, k=7)
    expected_scores, expected_indices = top_k_reference(queries, database, 7)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    index.save(tmp_path / "index.faiss")
    loaded = SearchIndex.load(tmp_path / "index.faiss")
    assert loaded.size == 50 and not loaded.on_gpu
    np.testing.assert_array_equal(loaded.search(queries, k=7)[1], indices)


def test_faiss_ivfpq_finds_clustered_neighbours():
    rng = np.random.default_rng(4)
    centres = _descriptors(rng, 20, 16)
    labels = rng.integers(0, 20, size=2000)
    database = np.asarray(
        normalization.l2_normalize(centres[labels] + 0.05 * rng.normal(size=(2000, 16))),
        np.float32,
    )
    index = SearchIndex(16, index_type="ivfpq", num_lists=16, num_subquantizers=4)
    assert not index.is_trained
    with pytest.raises(RuntimeError, match="trained"):
        index.add(database)
    index.train(database)
    index.add(database)
    _, indices = index.search(database[:50], k=10)
    # Neighbours found by the compressed index belong to the query's cluster.
    assert np.mean(labels[indices] == labels[:50, None]) > 0.9


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq"])
def test_search_index_save_load_round_trip(tmp_path, index_type):
    rng = np.random.default_rng(8)
    database, _ = _clustered(rng, 400, 16)
    index = SearchIndex(16, index_type=index_type, num_lists=8, num_probes=3, num_subquantizers=4)
    index.train(database)
    index.add(database)
    before = index.search(database[:10], k=5)
    index.save(tmp_path / f"{index_type}.faiss")
    loaded = SearchIndex.load(tmp_path / f"{index_type}.faiss", use_gpu=False)
    assert (loaded.index_type, loaded.size, loaded.dim) == (index_type, 400, 16)
    assert loaded.is_trained
    if index_type != "flat":
        assert (loaded.num_lists, loaded.num_probes) == (8, 3)
    after = loaded.search(database[:10], k=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_search_index_is_deterministic_for_a_seed():
    rng = np.random.default_rng(9)
    database, _ = _clustered(rng, 500, 16)

    def build(seed):
        index = SearchIndex(16, index_type="ivf", num_lists=10, num_probes=1, seed=seed)
        index.train(database)
        index.add(database)
        return index.search(database[:30], k=10)

    first, second = build(seed=3), build(seed=3)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


def test_search_index_k_larger_than_index_is_clipped():
    index = SearchIndex(4)
    index.add(np.eye(4, dtype=np.float32)[:3])
    similarities, indices = index.search(np.eye(4, dtype=np.float32)[:2], k=10)
    assert similarities.shape == indices.shape == (2, 3)
    np.testing.assert_array_equal(indices[:, 0], [0, 1])


def test_search_index_pads_lists_an_ivf_search_misses():
    # 64 lists of about one point each, one probed: fewer than k neighbours are found.
    database = _descriptors(np.random.default_rng(10), 64, 8)
    index = SearchIndex(8, index_type="ivf", num_lists=64, num_probes=1)
    index.train(database)
    index.add(database)
    similarities, indices = index.search(database[:5], k=10)
    missing = indices < 0
    assert missing.any() and np.all(np.isneginf(similarities[missing]))
    assert np.all(np.isfinite(similarities[~missing]))
    # Found neighbours come first in each row.
    assert np.all(np.diff(missing.astype(int), axis=1) >= 0)


def test_empty_index():
    index = SearchIndex(4)
    assert index.size == 0 and index.is_trained
    with pytest.raises(ValueError, match="empty index"):
        index.search(np.ones((1, 4), np.float32), k=1)
    index.add(np.zeros((0, 4), np.float32))  # adding nothing is fine
    assert index.size == 0
    ivf = SearchIndex(4, index_type="ivf")
    assert ivf.size == 0 and not ivf.is_trained
    with pytest.raises(ValueError, match="empty index"):
        ivf.search(np.ones((1, 4), np.float32), k=1)
    with pytest.raises(ValueError, match="cannot train an ivf index on 0 descriptors"):
        ivf.train(np.zeros((0, 4), np.float32))
    with pytest.raises(RuntimeError, match="cannot save an untrained ivf index"):
        ivf.save("/nonexistent/index.faiss")


def test_faiss_errors():
    index = SearchIndex(4)
    with pytest.raises(ValueError, match="empty index"):
        index.search(np.ones((1, 4), np.float32), k=1)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        index.add(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="must divide"):
        SearchIndex(10, index_type="ivfpq", num_subquantizers=4)
    with pytest.raises(ValueError, match="index_type"):
        SearchIndex(4, index_type="hnsw")
    with pytest.raises(FileNotFoundError, match="no faiss index"):
        SearchIndex.load("/nonexistent/index.faiss")
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be positive, found 0"):
        index.search(np.ones((1, 4), np.float32), k=0)
    trained = SearchIndex(4, index_type="ivf")
    trained.train(np.eye(4, dtype=np.float32))
    with pytest.raises(RuntimeError, match="already trained"):
        trained.train(np.eye(4, dtype=np.float32))


def test_search_index_refuses_integer_queries(without_annotation_checks):
    index = SearchIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(TypeError, match="queries must be floating, got dtype int32"):
        index.search(np.ones((1, 4), np.int32), k=1)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss sees a GPU")
def test_use_gpu_without_a_gpu_raises():
    with pytest.raises(RuntimeError, match="use_gpu=True but faiss sees no GPU"):
        SearchIndex(4, use_gpu=True)
    assert not SearchIndex(4).on_gpu
