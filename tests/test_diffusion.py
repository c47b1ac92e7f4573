import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
from hypothesis import given, settings

from jaxretrieval import diffusion as dif
from jaxretrieval.search import knn_search
from tests.reference import diffusion_reference as ref

# Jitted once per module: eager calls would re-trace the CG while_loop every time.
_diffuse = jax.jit(dif.diffusion_scores, static_argnames="num_iterations")
_truncated = jax.jit(dif.truncated_diffusion_scores, static_argnames="num_iterations")


def _clustered(rng, num_items, dim, num_clusters=4, spread=0.3):
    centers = rng.normal(size=(num_clusters, dim))
    x = centers[rng.integers(num_clusters, size=num_items)] + spread * rng.normal(
        size=(num_items, dim)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _path_graph():
    # 0 - 1 - 2 with unit weights; K = 2 slots, padding points at the row itself.
    neighbors = np.array([[1, 0], [0, 2], [1, 2]], np.int32)
    valid = np.array([[True, False], [True, True], [True, False]])
    return dif.AffinityGraph(neighbors, valid.astype(np.float32), valid)


def _dense(graph):
    return dif.affinity_matrix(graph).toarray().astype(np.float64)


def test_diffusion_scores_path_graph_known_values():
    graph = dif.normalize_affinity(_path_graph())
    # S = [[0, 1/r2, 0], [1/r2, 0, 1/r2], [0, 1/r2, 0]]; with alpha = 1/2 and y = e0,
    # a = 1/(2 r2): f0 - a f1 = 1, f1 = a (f0 + f2), f2 = a f1  =>  f = (7/6, r2/3, 1/6).
    np.testing.assert_allclose(_dense(graph)[0, 1], 1 / np.sqrt(2), rtol=1e-6)
    y = np.array([[1.0, 0.0, 0.0]], np.float32)
    scores = dif.diffusion_scores(graph, y, alpha=0.5, num_iterations=3, tol=0.0)
    np.testing.assert_allclose(scores, [[7 / 6, np.sqrt(2) / 3, 1 / 6]], rtol=1e-6)


def test_knn_affinity_known_values():
    angles = np.deg2rad([0.0, 20.0, 60.0, 150.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    # k = 1: only 0 <-> 1 is mutual (2's nearest is 1, whose nearest is 0).
    graph = dif.knn_affinity(x, num_neighbors=1, gamma=3.0)
    assert graph.neighbors.shape == (4, 1) and graph.neighbors.dtype == np.int32
    np.testing.assert_array_equal(graph.valid[:, 0], [True, True, False, False])
    np.testing.assert_array_equal(graph.neighbors[:, 0], [1, 0, 2, 3])  # padding -> self
    np.testing.assert_allclose(
        graph.weights[:, 0], [np.cos(np.deg2rad(20)) ** 3] * 2 + [0, 0], rtol=1e-5
    )
    # k = 2: the triangle 0-1-2; 3 (nearest 2 and 1) is in nobody's list, so isolated.
    w = _dense(dif.knn_affinity(x, num_neighbors=2, gamma=1.0))
    expected = np.zeros((4, 4))
    for i, j, degrees in [(0, 1, 20), (0, 2, 60), (1, 2, 40)]:
        expected[i, j] = expected[j, i] = np.cos(np.deg2rad(degrees))
    np.testing.assert_allclose(w, expected, atol=1e-6)


@pytest.mark.parametrize("num_neighbors,gamma", [(3, 3.0), (6, 1.0)])
def test_knn_affinity_matches_reference(num_neighbors, gamma):
    x = _clustered(np.random.default_rng(0), 30, 8)
    w = _dense(dif.knn_affinity(x, num_neighbors=num_neighbors, gamma=gamma))
    expected = ref.mutual_knn_affinity(x, num_neighbors, gamma)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.diag(w), 0.0)
    np.testing.assert_array_equal(w, w.T)  # exactly symmetric


def test_knn_affinity_ivf_finds_most_edges():
    x = _clustered(np.random.default_rng(1), 400, 8)
    exact = _dense(dif.knn_affinity(x, num_neighbors=5)) > 0
    approx = (
        _dense(dif.knn_affinity(x, num_neighbors=5, index_type="ivf", num_lists=8, num_probes=4))
        > 0
    )
    assert (exact & approx).sum() >= 0.9 * exact.sum()


def test_normalize_affinity_matches_reference_and_handles_isolated_nodes():
    angles = np.deg2rad([0.0, 20.0, 60.0, 150.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    graph = dif.knn_affinity(x, num_neighbors=2, gamma=3.0)  # node 3 has degree 0
    normalized = dif.normalize_affinity(graph)
    assert np.all(np.isfinite(normalized.weights))
    np.testing.assert_allclose(
        _dense(normalized), ref.normalize(ref.mutual_knn_affinity(x, 2, 3.0)), rtol=1e-5
    )
    # The isolated item keeps exactly its own seed value.
    y = np.eye(4, dtype=np.float32)[3:]
    np.testing.assert_allclose(dif.diffusion_scores(normalized, y), y)


def _problem(seed=0, num_items=40, dim=8, num_queries=3):
    rng = np.random.default_rng(seed)
    database = _clustered(rng, num_items, dim)
    queries = _clustered(rng, num_queries, dim)
    graph = dif.normalize_affinity(dif.knn_affinity(database, num_neighbors=5))
    return database, queries, graph


@pytest.mark.parametrize("alpha,num_iterations", [(0.99, 20), (0.9, 5), (0.5, 50)])
def test_diffusion_scores_match_scipy_cg(alpha, num_iterations):
    database, queries, graph = _problem()
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    y = np.asarray(dif.seed_vectors(seeds, num_items=len(database)), np.float64)
    scores = _diffuse(graph, seeds, alpha=alpha, num_iterations=num_iterations)
    a = scipy.sparse.identity(len(database)) - alpha * dif.affinity_matrix(graph).astype(np.float64)
    for q in range(len(queries)):
        expected, _ = scipy.sparse.linalg.cg(a, y[q], rtol=1e-6, maxiter=num_iterations)
        atol = 1e-5 * np.abs(expected).max()
        np.testing.assert_allclose(scores[q], expected, rtol=1e-5, atol=atol)


def test_diffusion_scores_match_reference():
    database, queries, _ = _problem(seed=1, num_items=25)
    w = ref.mutual_knn_affinity(database, 5, 3.0)
    y = ref.query_seed_vectors(queries, database, 4, 3.0)
    expected = ref.diffusion_solve(ref.normalize(w), y, 0.8)
    graph = dif.normalize_affinity(dif.knn_affinity(database, num_neighbors=5, gamma=3.0))
    seeds = dif.query_seeds(queries, database, num_seeds=4, gamma=3.0)
    np.testing.assert_allclose(dif.seed_vectors(seeds, num_items=25), y, rtol=1e-5, atol=1e-7)
    scores = _diffuse(graph, seeds, alpha=0.8, num_iterations=100, tol=1e-7)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_diffusion_scores_dense_seed_hook_matches_sparse_seeds():
    database, queries, graph = _problem()
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    dense = dif.seed_vectors(seeds, num_items=len(database))
    np.testing.assert_allclose(_diffuse(graph, dense), _diffuse(graph, seeds), rtol=1e-6)


def test_diffusion_scores_batch_matches_loop_and_jit_matches_eager():
    database, queries, graph = _problem(num_queries=4)
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    batched = _diffuse(graph, seeds)
    looped = [
        _diffuse(graph, dif.Seeds(seeds.indices[q : q + 1], seeds.weights[q : q + 1]))[0]
        for q in range(4)
    ]
    np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-5, atol=1e-6)
    eager = dif.diffusion_scores(graph, seeds, alpha=0.99)
    np.testing.assert_allclose(eager, batched, rtol=1e-5, atol=1e-6)
    # Early exit per query: with a loose tolerance the scores differ from the full budget only
    # for queries that stopped early, and never contain NaN.
    loose = _diffuse(graph, seeds, tol=1e-1)
    assert np.all(np.isfinite(loose))


@settings(max_examples=8)
@given(st.permutations(list(range(16))))
def test_diffusion_scores_permutation_invariant(perm):
    perm = np.array(perm)
    database, queries, _ = _problem(seed=2, num_items=16)
    scores = []
    for x in (database, database[perm]):
        graph = dif.normalize_affinity(dif.knn_affinity(x, num_neighbors=4))
        seeds = dif.query_seeds(queries, x, num_seeds=3)
        scores.append(np.asarray(_diffuse(graph, seeds, alpha=0.9)))
    np.testing.assert_allclose(scores[1], scores[0][:, perm], rtol=1e-5, atol=1e-6)


def test_permute_affinity_with_locality_order_relabels_scores():
    database, queries, graph = _problem()
    order = dif.locality_order(graph)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(database)))
    inverse = np.argsort(order)
    permuted = dif.permute_affinity(graph, order)
    np.testing.assert_array_equal(
        dif.affinity_matrix(permuted).toarray(),
        dif.affinity_matrix(graph).toarray()[np.ix_(order, order)],
    )
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    moved = dif.Seeds(inverse[np.asarray(seeds.indices)], seeds.weights)
    np.testing.assert_allclose(
        np.asarray(_diffuse(permuted, moved))[:, inverse],
        _diffuse(graph, seeds),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="permutation of the 40 nodes"):
        dif.permute_affinity(graph, np.zeros(40, np.int64))


def test_truncated_diffusion_scores_full_shortlist_equals_full_diffusion():
    database, queries, graph = _problem()
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    rng = np.random.default_rng(3)
    shortlist = np.stack([rng.permutation(len(database)) for _ in queries]).astype(np.int32)
    truncated = _truncated(graph, seeds, shortlist, alpha=0.9)
    full = np.asarray(_diffuse(graph, seeds, alpha=0.9))
    np.testing.assert_allclose(
        truncated, np.take_along_axis(full, shortlist, axis=1), rtol=1e-5, atol=1e-6
    )


def test_truncated_diffusion_scores_match_restricted_reference():
    database, queries, graph = _problem(num_queries=2)
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    _, shortlist = knn_search(queries, database, k=15)
    s = _dense(graph)
    y = np.asarray(dif.seed_vectors(seeds, num_items=len(database)))
    scores = _truncated(graph, seeds, shortlist, alpha=0.9, num_iterations=100, tol=1e-7)
    for q in range(2):
        ids = shortlist[q]
        expected = ref.diffusion_solve(s[np.ix_(ids, ids)], y[q : q + 1, ids], 0.9)[0]
        np.testing.assert_allclose(scores[q], expected, rtol=1e-4, atol=1e-6)


def test_spectral_scores_converge_to_cg_solution():
    database, queries, graph = _problem(num_items=30)
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    exact = _diffuse(graph, seeds, alpha=0.9, num_iterations=200, tol=1e-7)
    errors = []
    for rank in (3, 8, 15, 25, 30):
        index = dif.learn_spectral_index(graph, rank=rank)
        assert index.eigenvectors.shape == (30, rank) and index.eigenvalues.shape == (rank,)
        approx = dif.spectral_scores(index, seeds, alpha=0.9)
        errors.append(float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-4, errors
    # Dense seeds give the same result as sparse ones.
    dense = dif.seed_vectors(seeds, num_items=30)
    np.testing.assert_allclose(
        dif.spectral_scores(index, dense, alpha=0.9), approx, rtol=1e-4, atol=1e-6
    )


def test_query_seeds_known_values():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    seeds = dif.query_seeds(np.array([[0.8, 0.6]], np.float32), database, num_seeds=2, gamma=2.0)
    np.testing.assert_array_equal(seeds.indices, [[2, 0]])  # sims 0.96, 0.8, 0.6
    np.testing.assert_allclose(seeds.weights, [[0.96**2, 0.8**2]], rtol=1e-6)
    np.testing.assert_allclose(
        dif.seed_vectors(seeds, num_items=3), [[0.64, 0.0, 0.96**2]], rtol=1e-6
    )


def test_diffusion_raises(without_annotation_checks):
    x = _clustered(np.random.default_rng(0), 5, 4)
    with pytest.raises(ValueError, match=r"num_neighbors must be in \[1, N - 1\].*\(5, 4\)"):
        dif.knn_affinity(x, num_neighbors=5)
    with pytest.raises(ValueError, match="empty"):
        dif.knn_affinity(np.zeros((0, 4), np.float32), num_neighbors=1)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf.*\[2\]"):
        dif.knn_affinity(bad, num_neighbors=2)
    graph = dif.normalize_affinity(dif.knn_affinity(x, num_neighbors=2))
    with pytest.raises(ValueError, match=r"seeds must have shape \(Q, N\) with N = 5.*\(1, 4\)"):
        dif.diffusion_scores(graph, np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"num_seeds must be in \[1, N\]"):
        dif.query_seeds(x[:1], x, num_seeds=6)
    with pytest.raises(ValueError, match="same dimension D"):
        knn_search(x, np.ones((3, 5), np.float32), k=1)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        dif.learn_spectral_index(graph, rank=0)
    with pytest.raises(TypeError, match="knn_affinity: database must be floating, got dtype int32"):
        dif.knn_affinity(np.ones((5, 4), np.int32), num_neighbors=2)
    with pytest.raises(
        ValueError, match=r"neighbors, weights and valid must share one \(N, K\) shape.*\(5, 1\)"
    ):
        dif.normalize_affinity(graph._replace(valid=np.ones((5, 1), bool)))
    with pytest.raises(TypeError, match=r"diffusion_scores: graph.valid must be boolean"):
        dif.diffusion_scores(graph._replace(valid=np.ones((5, 2), np.float32)), np.ones((1, 5)))
    with pytest.raises(TypeError, match=r"seeds_from_neighbors: indices must be integer"):
        dif.seeds_from_neighbors(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))


def test_seeds_from_neighbors_ignores_missing_and_negative():
    similarities = np.array([[0.9, -0.2, -np.inf]], np.float32)
    indices = np.array([[4, 1, -1]], np.int64)  # -1: faiss found nothing
    seeds = dif.seeds_from_neighbors(similarities, indices, gamma=2.0)
    np.testing.assert_allclose(seeds.weights, [[0.81, 0.0, 0.0]], rtol=1e-6)
    assert np.all(np.asarray(seeds.indices) >= 0)  # safe to gather or scatter with
    np.testing.assert_allclose(
        dif.seed_vectors(seeds, num_items=5), [[0.0, 0.0, 0.0, 0.0, 0.81]], rtol=1e-6
    )


def test_diffusion_scores_alpha_sweep_compiles_once():
    database, queries, graph = _problem()
    seeds = dif.query_seeds(queries, database, num_seeds=4)
    traces = []

    def counted(graph, seeds, alpha):
        traces.append(1)
        return dif.diffusion_scores(graph, seeds, alpha=alpha)

    jitted = jax.jit(counted)
    for alpha in (0.5, 0.9, 0.99):
        jitted(graph, seeds, alpha)
    assert len(traces) == 1


def test_diffusion_scores_queries_sharded_over_devices():
    # The graph is replicated and the queries split over a ("data",) mesh: each device
    # solves its own columns, with no communication but the final result layout.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    database, queries, graph = _problem(num_queries=8)
    dense = dif.seed_vectors(dif.query_seeds(queries, database, num_seeds=4), num_items=40)
    mesh = jax.make_mesh((4,), ("data",))
    sharded_seeds = jax.device_put(dense, NamedSharding(mesh, P("data", None)))
    replicated_graph = jax.device_put(graph, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        scores = jax.jit(dif.diffusion_scores)(replicated_graph, sharded_seeds)
    assert scores.sharding.spec == P("data", None)
    # float32 CG: sharding changes the summation order (jax 0.12 differs by 3e-6 relative
    # from the unsharded run), so the jit-vs-eager tolerance of this file, not tighter.
    np.testing.assert_allclose(scores, _diffuse(graph, dense), rtol=1e-5, atol=1e-6)
