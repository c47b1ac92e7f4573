"""Diffusion on a kNN graph of the database: manifold ranking by CG and spectral ranking.

Descriptors are L2-normalised rows ``(N, D)``; similarity is the dot product. Following
Iscen et al. (CVPR 2017), the database is a graph whose edges join mutual k-nearest
neighbours with weights ``s ** gamma``; with ``S = D^-1/2 W D^-1/2`` the ranking of a query
is the solution ``f`` of ``(I - alpha S) f = y``, where the seed vector ``y`` holds the
query's similarities to its top database neighbours (or any caller-provided vector, e.g.
the spatially verified images of DSM).

The graph is stored with a fixed degree, never as a dense N x N matrix: ``neighbors``
(N, K) int32, ``weights`` (N, K) float32 and a ``valid`` mask, where padding entries point
at the row itself with weight 0. A matrix-vector product is then K gathers of contiguous
rows, and 1M images x 50 neighbours take 1M x 50 x (4 + 4 + 1) bytes = 450 MB.

Pieces and where they run:

* :func:`knn_affinity` (host, faiss): the mutual kNN graph; exact or IVF search.
* :func:`normalize_affinity` (device): symmetric degree normalisation.
* :func:`locality_order` / :func:`permute_affinity` (host): relabel nodes so neighbours
  sit at nearby ids, which keeps the batched CG gathers in cache on large graphs.
* :func:`query_seeds` / :func:`seeds_from_neighbors` (device): sparse seed vectors.
* :func:`diffusion_scores` (device): conjugate gradient for many queries at once, with a
  fixed iteration budget and per-query convergence masks.
* :func:`truncated_diffusion_scores` (device): the same, restricted per query to the
  subgraph of its top-L shortlist, for large databases.
* :func:`learn_spectral_index` (host, SciPy ``eigsh``) and :func:`spectral_scores`
  (device): the offline low-rank approximation of Iscen et al. (CVPR 2018), after which a
  query costs two small matrix products.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg
from jax import lax

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int, Scalar
from jaxretrieval.search import knn_search


class AffinityGraph(NamedTuple):
    """A symmetric graph with a fixed number of neighbour slots per node.

    Attributes:
      neighbors: ``(N, K)`` int32 node ids; padding slots hold the row's own id.
      weights: ``(N, K)`` float32 edge weights; exactly 0 in padding slots.
      valid: ``(N, K)`` boolean mask of real edges.
    """

    neighbors: Int[AnyArray, "N K"]
    weights: Float[AnyArray, "N K"]
    valid: Bool[AnyArray, "N K"]


class Seeds(NamedTuple):
    """Sparse seed vectors: a few weighted database items per query.

    Attributes:
      indices: ``(Q, K)`` database ids of each query's seeds.
      weights: ``(Q, K)`` seed weights (``s ** gamma``); 0 disables a slot.
    """

    indices: Int[AnyArray, "Q K"]
    weights: Float[AnyArray, "Q K"]


class SpectralIndex(NamedTuple):
    """Leading eigenpairs of the normalised affinity ``S`` (``S ~ U diag(lambda) U^T``).

    Attributes:
      eigenvectors: ``(N, E)`` orthonormal columns ``U``.
      eigenvalues: ``(E,)`` eigenvalues ``lambda``, descending.
    """

    eigenvectors: Float[AnyArray, "N E"]
    eigenvalues: Float[AnyArray, " E"]


# ----------------------------------------------------------------------------- graph (host)


def knn_affinity(
    database: Float[AnyArray, "N D"],
    *,
    num_neighbors: int = 50,
    gamma: float = 3.0,
    index_type: str = "flat",
    num_lists: int | None = None,
    num_probes: int = 16,
) -> AffinityGraph:
    """Mutual kNN affinity graph of the database, built on the host with faiss.

    Each item's ``num_neighbors`` nearest other items are found (its self-match dropped);
    an edge ``(i, j)`` is kept only if ``i`` and ``j`` are in each other's lists, so the
    graph is symmetric (Iscen et al.'s ``min(W, W^T)``), and weighs
    ``max(s_ij, 0) ** gamma``, with ``s_ij`` averaged over both directions so that ``W`` is
    exactly symmetric in float32. The diagonal is zero.

    Args:
      database: L2-normalised database descriptors (numpy or jax). Checked on the host for
        NaN/inf (by :func:`jaxretrieval.search.knn_search`), since one NaN row would
        silently poison the whole graph.
      num_neighbors: Neighbour slots per item, K (static); must be in [1, N - 1].
      gamma: Similarity exponent of the edge weights.
      index_type: ``"flat"`` (exact, O(N^2 D)), or ``"ivf"`` / ``"ivfpq"`` (approximate,
        for large N; see :class:`jaxretrieval.search.SearchIndex`).
      num_lists: IVF lists (see :func:`jaxretrieval.search.knn_search`).
      num_probes: IVF lists scanned per item.

    Returns:
      An :class:`AffinityGraph` of numpy arrays; ``jax.device_put`` it once before querying
      many times.

    Raises:
      ValueError: On bad shapes, an empty database, non-finite values or a bad K.
      TypeError: If the database is not floating.

    References:
      Iscen, Tolias, Avrithis, Furon, Chum. Efficient diffusion on region manifolds:
      recovering small objects with compact CNN representations. CVPR 2017.
    """
    database = validation.as_host_float_array("knn_affinity: database", database, axes="N D")
    num_items = database.shape[0]
    if num_items == 0:
        raise ValueError(f"knn_affinity: the database is empty, found shape {database.shape}.")
    if not 1 <= num_neighbors <= num_items - 1:
        raise ValueError(
            "knn_affinity: num_neighbors must be in [1, N - 1] (the self-match is excluded) for "
            f"a database of shape {database.shape}, found num_neighbors={num_neighbors}."
        )
    rows = np.arange(num_items, dtype=np.int64)[:, None]  # (N, 1)
    # The self-match is excluded by id wherever it appears (duplicates may push it off
    # the first slot); an approximate search may leave slots empty (id -1).
    similarities, indices = knn_search(
        database,
        database,
        k=num_neighbors,
        index_type=index_type,
        num_lists=num_lists,
        num_probes=num_probes,
        exclude=rows,
    )  # (N, K)
    present = indices >= 0

    # Mutual check: edge (i, j) is mutual if the key j * N + i exists among the keys i * N + j.
    keys = np.where(present, rows * num_items + indices, -1).ravel()  # (N * K,)
    key_order = np.argsort(keys, kind="stable")
    sorted_keys = keys[key_order]
    reverse_keys = np.where(present, indices * num_items + rows, -2).ravel()  # (N * K,)
    position = np.minimum(np.searchsorted(sorted_keys, reverse_keys), keys.size - 1)
    mutual = (sorted_keys[position] == reverse_keys).reshape(indices.shape) & present
    reverse_similarities = similarities.ravel()[key_order[position]].reshape(indices.shape)
    del keys, key_order, sorted_keys, reverse_keys, position
    similarity = 0.5 * (similarities + reverse_similarities)  # (N, K)
    weights = np.where(mutual, np.maximum(similarity, 0.0) ** np.float32(gamma), 0.0)
    neighbors = np.where(mutual, indices, rows).astype(np.int32)  # (N, K)
    return AffinityGraph(neighbors, weights.astype(np.float32), mutual)


def affinity_matrix(graph: AffinityGraph) -> scipy.sparse.csr_array:
    """The graph as a SciPy sparse ``(N, N)`` matrix (host), e.g. for SciPy solvers.

    Args:
      graph: Any :class:`AffinityGraph` (raw or normalised).

    Returns:
      ``W[i, neighbors[i, k]] = weights[i, k]`` over the valid slots, float32 CSR.
    """
    neighbors = np.asarray(graph.neighbors)
    weights = np.asarray(graph.weights, np.float32)
    valid = np.asarray(graph.valid)
    num_items = neighbors.shape[0]
    rows = np.broadcast_to(np.arange(num_items)[:, None], neighbors.shape)  # (N, K)
    return scipy.sparse.csr_array(
        (weights[valid], (rows[valid], neighbors[valid])), shape=(num_items, num_items)
    )


def locality_order(graph: AffinityGraph) -> Int[np.ndarray, " N"]:
    """A node order that puts graph neighbours at nearby ids (reverse Cuthill-McKee, host).

    A batched matrix-vector product gathers one (Q,) row per edge; with the rows of
    neighbours close together in memory those gathers hit the cache instead of DRAM, which
    is what makes batched CG fast on large graphs. Relabel with :func:`permute_affinity`.

    Args:
      graph: Any symmetric :class:`AffinityGraph`.

    Returns:
      ``order``: new node ``i`` is old node ``order[i]``.
    """
    matrix = affinity_matrix(graph)
    order = scipy.sparse.csgraph.reverse_cuthill_mckee(matrix.tocsr(), symmetric_mode=True)
    return np.asarray(order, dtype=np.int64)


def permute_affinity(graph: AffinityGraph, order: Int[AnyArray, " N"]) -> AffinityGraph:
    """Relabels the nodes of a graph: new node ``i`` is old node ``order[i]`` (host).

    Diffusion commutes with relabelling: with ``inverse = argsort(order)``, seeds on the new
    graph use ids ``inverse[old_id]`` and the old item ``n``'s score is ``scores[:, inverse[n]]``
    (equivalently ``new_scores[:, i]`` belongs to old item ``order[i]``).

    Args:
      graph: Any :class:`AffinityGraph`.
      order: A permutation of ``range(N)``.

    Returns:
      The relabelled graph (numpy arrays), neighbour slots in the same order.

    Raises:
      ValueError: If ``order`` is not a permutation of the N nodes.
    """
    neighbors = np.asarray(graph.neighbors)
    order = np.asarray(order, dtype=np.int64)
    num_items = neighbors.shape[0]
    if order.shape != (num_items,) or not np.array_equal(np.sort(order), np.arange(num_items)):
        raise ValueError(
            f"permute_affinity: order must be a permutation of the {num_items} nodes, found "
            f"an array of shape {order.shape}."
        )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(num_items)
    return AffinityGraph(
        inverse[neighbors[order]].astype(np.int32),
        np.asarray(graph.weights)[order],
        np.asarray(graph.valid)[order],
    )


# --------------------------------------------------------------------------- graph (device)


def normalize_affinity(graph: AffinityGraph) -> AffinityGraph:
    """Symmetric normalisation ``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)``.

    Isolated nodes (degree 0, e.g. items with no mutual neighbour) get ``D^-1/2 = 0``
    instead of inf, so their rows stay zero and nothing becomes NaN; such an item's
    diffusion score is just its own seed value.

    Args:
      graph: A symmetric affinity graph with non-negative weights.

    Returns:
      The graph with normalised weights (same neighbours and mask), as jax arrays.
    """
    neighbors, weights, valid = _graph_arrays("normalize_affinity", graph)
    degree = jnp.sum(weights, axis=1)  # (N,)
    positive = degree > 0
    inverse_sqrt = jnp.where(positive, lax.rsqrt(jnp.where(positive, degree, 1.0)), 0.0)  # (N,)
    normalized = weights * inverse_sqrt[:, None] * inverse_sqrt[neighbors]  # (N, K)
    return AffinityGraph(neighbors, normalized, valid)


def _graph_arrays(name: str, graph: AffinityGraph) -> tuple[Array, Array, Array]:
    """A graph's neighbours (int32), masked weights (float policy) and mask, checked."""
    shapes = tuple(jnp.shape(x) for x in graph)
    if len(shapes[0]) != 2 or len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: graph neighbors, weights and valid must share one (N, K) shape, found "
            f"{shapes[0]}, {shapes[1]} and {shapes[2]}."
        )
    neighbors = validation.as_int_array(f"{name}: graph.neighbors", graph.neighbors)
    weights = validation.as_float_array(f"{name}: graph.weights", graph.weights)
    valid = validation.as_mask(f"{name}: graph.valid", graph.valid)
    return neighbors, jnp.where(valid, weights, 0.0), valid


def _affinity_matvec(neighbors: Array, weights: Array, x: Array) -> Array:
    """``S @ x`` for a fixed-degree graph: ``(S x)[n] = sum_k w[n, k] x[nbr[n, k]]``.

    ``x`` is (N, Q) so that each gather reads one contiguous row of Q values. The sum runs
    over the K slots one at a time (unrolled), which XLA fuses into a single pass without
    materialising the (N, K, Q) gathered tensor (20 GB at 1M x 50 x 100).
    """
    result = weights[:, 0, None] * x[neighbors[:, 0]]  # (N, Q)
    for slot in range(1, neighbors.shape[1]):
        result = result + weights[:, slot, None] * x[neighbors[:, slot]]  # (N, Q)
    return result


def _conjugate_gradient(matvec, b: Array, *, num_iterations: int, tol: Array) -> Array:
    """Solves ``A x = b`` for SPD ``A`` and every column of ``b`` (N, Q) at once.

    Plain CG from ``x0 = 0``, as ``scipy.sparse.linalg.cg(A, b, rtol=tol, maxiter=...)``:
    a column stops (its updates are masked to zero) once ``||r|| < tol * ||b||``; the
    loop ends when every column has stopped or after ``num_iterations`` updates.
    """
    squared_norm = jnp.sum(b * b, axis=0)  # (Q,)
    threshold = tol * tol * squared_norm  # (Q,)
    active = (squared_norm >= threshold) & (squared_norm > 0)  # (Q,)

    def cond(state):
        iteration, _, _, _, _, active = state
        return (iteration < num_iterations) & jnp.any(active)

    def body(state):
        iteration, x, r, p, rs, active = state
        ap = matvec(p)  # (N, Q)
        curvature = jnp.sum(p * ap, axis=0)  # (Q,)
        step = jnp.where(active, rs / jnp.where(curvature > 0, curvature, 1.0), 0.0)  # (Q,)
        x = x + step[None, :] * p
        r = r - step[None, :] * ap
        rs_new = jnp.sum(r * r, axis=0)  # (Q,)
        beta = rs_new / jnp.where(rs > 0, rs, 1.0)  # (Q,)
        p = jnp.where(active[None, :], r + beta[None, :] * p, p)  # (N, Q)
        rs = jnp.where(active, rs_new, rs)
        active = active & (rs_new >= threshold)
        return iteration + 1, x, r, p, rs, active

    state = (jnp.asarray(0, jnp.int32), jnp.zeros_like(b), b, b, squared_norm, active)
    return lax.while_loop(cond, body, state)[1]


def _check_solver_args(name: str, num_iterations: int) -> None:
    if num_iterations < 0:
        raise ValueError(f"{name}: num_iterations must be >= 0, got {num_iterations}.")


# ------------------------------------------------------------------------------------ seeds


def seeds_from_neighbors(
    similarities: Float[AnyArray, "Q K"],
    indices: Int[AnyArray, "Q K"],
    *,
    gamma: Scalar = 3.0,
) -> Seeds:
    """Seeds from precomputed neighbours (e.g. :func:`jaxretrieval.search.knn_search`).

    Args:
      similarities: Each query's similarities to its top database items.
      indices: Their database ids; negative ids (faiss' "not found") get weight 0.
      gamma: Similarity exponent (traced).

    Returns:
      :class:`Seeds` with weights ``max(s, 0) ** gamma``.
    """
    similarities = validation.as_float_array(
        "seeds_from_neighbors: similarities", similarities, axes="Q K"
    )
    indices = validation.as_int_array("seeds_from_neighbors: indices", indices, axes="Q K")
    if similarities.shape != indices.shape:
        raise ValueError(
            "seeds_from_neighbors: similarities and indices must have the same shape, found "
            f"{similarities.shape} and {indices.shape}."
        )
    gamma = jnp.asarray(gamma, dtype=similarities.dtype)
    usable = (similarities > 0) & (indices >= 0)
    weights = jnp.where(usable, jnp.where(usable, similarities, 1.0) ** gamma, 0.0)  # (Q, K)
    return Seeds(jnp.maximum(indices, 0), weights)


def query_seeds(
    queries: Float[AnyArray, "Q D"],
    database: Float[AnyArray, "N D"],
    *,
    num_seeds: int = 10,
    gamma: Scalar = 3.0,
) -> Seeds:
    """Seeds of each query: its ``num_seeds`` most similar database items, weighted ``s^gamma``.

    Scores every database item on the device ((Q, N) similarities); for very large
    databases, search with :func:`jaxretrieval.search.knn_search` and call
    :func:`seeds_from_neighbors` instead.

    Args:
      queries: L2-normalised query descriptors.
      database: L2-normalised database descriptors.
      num_seeds: Seeds per query (static); 10 in Iscen et al.
      gamma: Similarity exponent (traced); 3 in Iscen et al.

    Returns:
      The queries' :class:`Seeds`.

    Raises:
      ValueError: If the dimensions differ, the database is empty or num_seeds > N.
    """
    queries = validation.as_float_array("query_seeds: queries", queries, axes="Q D")
    database = validation.as_float_array("query_seeds: database", database, axes="N D")
    validation.check_same_dim("queries", queries, "database", database)
    queries, database = validation.common_float(queries, database)
    if not 1 <= num_seeds <= database.shape[0]:
        raise ValueError(
            f"query_seeds: num_seeds must be in [1, N] for a database of shape "
            f"{database.shape}, found num_seeds={num_seeds}."
        )
    similarities = jnp.einsum("qd,nd->qn", queries, database)  # (Q, N)
    top_similarities, top_indices = lax.top_k(similarities, num_seeds)  # (Q, K)
    return seeds_from_neighbors(top_similarities, top_indices, gamma=gamma)


def _seed_arrays(name: str, seeds: Seeds) -> tuple[Array, Array]:
    """Seed ids (int32) and weights (float policy), both (Q, K)."""
    indices = validation.as_int_array(f"{name}: seeds.indices", seeds.indices, axes="Q K")
    weights = validation.as_float_array(f"{name}: seeds.weights", seeds.weights, axes="Q K")
    if weights.shape != indices.shape:
        raise ValueError(
            f"{name}: seeds.indices and seeds.weights must have the same shape, found "
            f"{indices.shape} and {weights.shape}."
        )
    return indices, weights


def seed_vectors(seeds: Seeds, *, num_items: int) -> Float[Array, "Q N"]:
    """Dense ``(Q, N)`` seed vectors from sparse :class:`Seeds` (repeated ids add up).

    Args:
      seeds: Sparse seeds.
      num_items: Database size N (static).

    Returns:
      ``y[q, n]`` = total seed weight of item n for query q.
    """
    indices, weights = _seed_arrays("seed_vectors", seeds)
    rows = jnp.broadcast_to(jnp.arange(indices.shape[0])[:, None], indices.shape)  # (Q, K)
    dense = jnp.zeros((indices.shape[0], num_items), weights.dtype)  # (Q, N)
    return dense.at[rows, indices].add(weights)


# -------------------------------------------------------------------------------- diffusion


def diffusion_scores(
    graph: AffinityGraph,
    seeds: Float[AnyArray, "Q N"] | Seeds,
    *,
    alpha: Scalar = 0.99,
    num_iterations: int = 20,
    tol: Scalar = 1e-6,
) -> Float[Array, "Q N"]:
    """Diffusion (manifold ranking) scores: solves ``(I - alpha S) f = y`` for every query.

    Conjugate gradient for all queries at once (the seeds are the right-hand sides), from
    ``f = 0``, with a fixed budget of ``num_iterations`` and per-query early exit once the
    relative residual drops below ``tol``, the stopping rule of ``scipy.sparse.linalg.cg``.
    ``I - alpha S`` is symmetric positive definite for ``0 <= alpha < 1`` since the
    eigenvalues of S lie in [-1, 1]. Memory is a few (N, Q) arrays: batch the queries for
    large N (e.g. 32 queries at 1M items is 128 MB per array).

    Args:
      graph: The *normalised* affinity (:func:`normalize_affinity`).
      seeds: Dense seed vectors ``y`` (any caller-provided vector, e.g. DSM-verified
        images), or sparse :class:`Seeds` from :func:`query_seeds`.
      alpha: Diffusion parameter in [0, 1) (traced); 0.99 in Iscen et al.
      num_iterations: Maximum CG iterations (static); 20 in Iscen et al.
      tol: Relative residual tolerance (traced).

    Returns:
      Scores ``f`` for every database item; rank by descending score.

    Raises:
      ValueError: If the seed length differs from the graph size.

    References:
      Zhou, Weston, Gretton, Bousquet, Schölkopf. Ranking on data manifolds. NIPS 2003.
      Iscen, Tolias, Avrithis, Furon, Chum. Efficient diffusion on region manifolds:
      recovering small objects with compact CNN representations. CVPR 2017.

    Examples:
      The path graph 0 - 1 - 2 (two slots per node; padding slots point at the node
      itself), seeded at node 0:

      >>> import numpy as np
      >>> valid = np.array([[True, False], [True, True], [True, False]])
      >>> path = AffinityGraph(np.array([[1, 0], [0, 2], [1, 2]]), valid * 1.0, valid)
      >>> scores = diffusion_scores(normalize_affinity(path), np.eye(3)[:1], alpha=0.5)
      >>> np.asarray(scores, np.float64).round(4).tolist()  # (7/6, sqrt(2)/3, 1/6)
      [[1.1667, 0.4714, 0.1667]]
    """
    neighbors, weights, _ = _graph_arrays("diffusion_scores", graph)
    _check_solver_args("diffusion_scores", num_iterations)
    num_items = neighbors.shape[0]
    if isinstance(seeds, Seeds):
        y = seed_vectors(seeds, num_items=num_items)
    else:
        y = validation.as_float_array("diffusion_scores: seeds", seeds)
        if y.ndim != 2 or y.shape[1] != num_items:
            raise ValueError(
                f"diffusion_scores: seeds must have shape (Q, N) with N = {num_items} "
                f"(graph {neighbors.shape}), found {y.shape}."
            )
    weights, y = validation.common_float(weights, y)
    alpha = jnp.asarray(alpha, dtype=y.dtype)
    tol = jnp.asarray(tol, dtype=y.dtype)

    def matvec(x):
        return x - alpha * _affinity_matvec(neighbors, weights, x)  # (N, Q)

    solution = _conjugate_gradient(matvec, y.T, num_iterations=num_iterations, tol=tol)
    return solution.T  # (Q, N)


def truncated_diffusion_scores(
    graph: AffinityGraph,
    seeds: Seeds,
    shortlist: Int[AnyArray, "Q L"],
    *,
    alpha: Scalar = 0.99,
    num_iterations: int = 20,
    tol: Scalar = 1e-6,
) -> Float[Array, "Q L"]:
    """Diffusion restricted to each query's shortlist (Iscen et al.'s truncation).

    For each query, the normalised affinity is restricted to the L shortlisted items (the
    rows and columns of ``S`` at ``shortlist``, not re-normalised, as in the papers'
    code), the seeds outside the shortlist are dropped, and the L x L system
    ``(I - alpha S_L) f = y_L`` is solved by CG. Cost per query is O(L K) per iteration
    instead of O(N K); the shortlist is usually the top-L (e.g. 1000) by similarity.

    Args:
      graph: The *normalised* affinity of the whole database.
      seeds: The queries' sparse seeds, with database ids.
      shortlist: Distinct database ids of each query's candidates.
      alpha: Diffusion parameter in [0, 1) (traced).
      num_iterations: Maximum CG iterations (static).
      tol: Relative residual tolerance (traced).

    Returns:
      ``scores[q, t]``: the diffusion score of database item ``shortlist[q, t]``.

    Raises:
      ValueError: If the seeds and shortlist disagree on Q.

    References:
      Iscen, Tolias, Avrithis, Furon, Chum. CVPR 2017 (Section "truncation").
    """
    neighbors, weights, _ = _graph_arrays("truncated_diffusion_scores", graph)
    _check_solver_args("truncated_diffusion_scores", num_iterations)
    shortlist = validation.as_int_array(
        "truncated_diffusion_scores: shortlist", shortlist, axes="Q L"
    )
    seed_indices, seed_weights = _seed_arrays("truncated_diffusion_scores", seeds)
    if seed_indices.shape[0] != shortlist.shape[0]:
        raise ValueError(
            "truncated_diffusion_scores: seeds (Q, K) and shortlist (Q, L) must share Q, "
            f"found seeds {seed_indices.shape} and shortlist {shortlist.shape}."
        )
    weights, seed_weights = validation.common_float(weights, seed_weights)
    num_items, num_candidates = neighbors.shape[0], shortlist.shape[1]
    alpha = jnp.asarray(alpha, dtype=weights.dtype)
    tol = jnp.asarray(tol, dtype=weights.dtype)

    def local_graph(candidates, indices, seed_weight):
        """One query's subgraph in local ids 0..L-1, and its seed vector."""
        # A length-N lookup table global id -> local id (-1 outside the shortlist): one
        # scatter and one gather, much faster on CPU than a binary search per edge, at
        # N x 4 bytes per query of the batch.
        local_id = jnp.full((num_items,), -1, jnp.int32)
        local_id = local_id.at[candidates].set(jnp.arange(num_candidates, dtype=jnp.int32))
        position = local_id[neighbors[candidates]]  # (L, K)
        inside = position >= 0  # (L, K)
        own = jnp.arange(num_candidates, dtype=jnp.int32)[:, None]  # (L, 1)
        local_neighbors = jnp.where(inside, position, own)  # (L, K)
        local_weights = jnp.where(inside, weights[candidates], 0.0)  # (L, K)
        matches = candidates[:, None] == indices[None, :]  # (L, K_seeds)
        y = jnp.sum(jnp.where(matches, seed_weight[None, :], 0.0), axis=1)  # (L,)
        return local_neighbors, local_weights, y

    local_neighbors, local_weights, y = jax.vmap(local_graph)(
        shortlist, seed_indices, seed_weights
    )  # (Q, L, K), (Q, L, K), (Q, L)
    num_queries, _, degree = local_neighbors.shape
    flat_neighbors = local_neighbors.reshape(num_queries, num_candidates * degree)  # (Q, L * K)

    def matvec(x):
        # Each query has its own subgraph: gather along its own row of x.T.
        gathered = jnp.take_along_axis(x.T, flat_neighbors, axis=1)  # (Q, L * K)
        gathered = gathered.reshape(num_queries, num_candidates, degree)  # (Q, L, K)
        return x - alpha * jnp.einsum("qlk,qlk->lq", local_weights, gathered)  # (L, Q)

    solution = _conjugate_gradient(matvec, y.T, num_iterations=num_iterations, tol=tol)
    return solution.T  # (Q, L)


# ---------------------------------------------------------------------- spectral ranking


def learn_spectral_index(
    graph: AffinityGraph, *, rank: int, tol: float = 0.0, seed: int = 0
) -> SpectralIndex:
    """Offline stage of fast spectral ranking: the top-``rank`` eigenpairs of ``S`` (host).

    Uses SciPy's Lanczos ``eigsh`` (largest algebraic eigenvalues, the ones that dominate
    ``1 / (1 - alpha lambda)``) on the sparse float32 matrix, with a seeded start vector
    so the result is deterministic. ``rank >= N - 1`` (tiny graphs, tests) uses a dense
    ``eigh`` of all N eigenpairs, with which :func:`spectral_scores` equals the exact
    solution of the diffusion system.

    Args:
      graph: The *normalised* affinity (:func:`normalize_affinity`).
      rank: Number of eigenpairs E (static); a few hundred for large databases.
      tol: Relative accuracy of the eigenvalues for ``eigsh`` (0: machine precision).
        Note that a graph with more than E connected components has eigenvalue 1 with
        multiplicity above E, which Lanczos resolves slowly and only approximately.
      seed: Seed of the Lanczos start vector.

    Returns:
      A :class:`SpectralIndex` of numpy float32 arrays, eigenvalues descending.
      Memory: N x E x 4 bytes (1.2 GB at 1M x 300).

    Raises:
      ValueError: If rank < 1.

    References:
      Iscen, Avrithis, Tolias, Furon, Chum. Fast spectral ranking for similarity search.
      CVPR 2018.
    """
    if rank < 1:
        raise ValueError(f"learn_spectral_index: rank must be >= 1, got {rank}.")
    matrix = affinity_matrix(graph)
    num_items = matrix.shape[0]
    if rank >= num_items - 1:
        eigenvalues, eigenvectors = np.linalg.eigh(matrix.toarray().astype(np.float64))
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    else:
        start = np.random.default_rng(seed).uniform(0.5, 1.0, num_items).astype(np.float32)
        eigenvalues, eigenvectors = scipy.sparse.linalg.eigsh(
            matrix, k=rank, which="LA", v0=start, tol=tol
        )
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    return SpectralIndex(
        np.ascontiguousarray(eigenvectors, dtype=np.float32), eigenvalues.astype(np.float32)
    )


def spectral_scores(
    index: SpectralIndex,
    seeds: Float[AnyArray, "Q N"] | Seeds,
    *,
    alpha: Scalar = 0.99,
) -> Float[Array, "Q N"]:
    """Online stage of fast spectral ranking: ``f ~ U diag(1 / (1 - alpha lambda)) U^T y``.

    With sparse seeds, ``U^T y`` is a gather of a few rows of ``U``; the cost per query is
    then one (E,) x (E, N) product. Equals :func:`diffusion_scores` (solved exactly) when
    the index holds all N eigenpairs, and approaches it as the rank grows.

    Args:
      index: From :func:`learn_spectral_index`.
      seeds: Dense seed vectors or sparse :class:`Seeds`.
      alpha: Diffusion parameter in [0, 1) (traced).

    Returns:
      Approximate diffusion scores of every database item.

    Raises:
      ValueError: If dense seeds do not have length N.

    References:
      Iscen, Avrithis, Tolias, Furon, Chum. Fast spectral ranking for similarity search.
      CVPR 2018.
    """
    eigenvectors = validation.as_float_array(
        "spectral_scores: index.eigenvectors", index.eigenvectors, axes="N E"
    )
    eigenvalues = validation.as_float_array(
        "spectral_scores: index.eigenvalues", index.eigenvalues, axes="E"
    )
    if isinstance(seeds, Seeds):
        indices, y = _seed_arrays("spectral_scores", seeds)
    else:
        y = validation.as_float_array("spectral_scores: seeds", seeds)
        if y.ndim != 2 or y.shape[1] != eigenvectors.shape[0]:
            raise ValueError(
                f"spectral_scores: seeds must have shape (Q, N) with N = "
                f"{eigenvectors.shape[0]}, found {y.shape}."
            )
    eigenvectors, eigenvalues, y = validation.common_float(eigenvectors, eigenvalues, y)
    alpha = jnp.asarray(alpha, dtype=y.dtype)
    if isinstance(seeds, Seeds):
        rows = eigenvectors[indices]  # (Q, K, E)
        projected = jnp.einsum("qk,qke->qe", y, rows)  # (Q, E)
    else:
        projected = jnp.einsum("qn,ne->qe", y, eigenvectors)  # (Q, E)
    filtered = projected / (1.0 - alpha * eigenvalues)[None, :]  # (Q, E)
    return jnp.einsum("qe,ne->qn", filtered, eigenvectors)  # (Q, N)


__all__ = [
    "AffinityGraph",
    "Seeds",
    "SpectralIndex",
    "affinity_matrix",
    "diffusion_scores",
    "knn_affinity",
    "learn_spectral_index",
    "locality_order",
    "normalize_affinity",
    "permute_affinity",
    "query_seeds",
    "seed_vectors",
    "seeds_from_neighbors",
    "spectral_scores",
    "truncated_diffusion_scores",
]
