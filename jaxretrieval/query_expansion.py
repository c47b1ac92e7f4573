"""Query expansion and database-side augmentation (AQE, alpha-QE, DBA).

Descriptors are L2-normalised rows, ``(N, D)``; similarity is the dot product. Each method
replaces a vector by a weighted mean of itself and its nearest database vectors, then
L2-normalises the result:

* AQE (Chum et al. 2007): the query and its top-k database vectors, equal weights.
* alpha-QE (Radenović et al. 2018): the query with weight 1, each neighbour with weight
  ``max(s, 0) ** alpha`` where ``s`` is its similarity to the query. ``alpha = 0`` with
  positive similarities is AQE.
* DBA: alpha-QE applied to every database vector against the rest of the database (its
  self-match excluded), streamed over fixed-size row chunks so no N x N matrix is built.

All functions are batched, have fixed shapes and run on the device; ``k`` and
``chunk_size`` are static, ``alpha`` is traced (sweeping it does not recompile).
"""

import jax.numpy as jnp
from jax import lax

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float, Scalar
from jaxretrieval.normalization import l2_normalize


def _query_pair(fn: str, queries: AnyArray, database: AnyArray, k: int) -> tuple[Array, Array]:
    """The query-side expansions' inputs, checked and cast to one float dtype."""
    queries = validation.as_float_array("queries", queries, axes="Q D")
    database = validation.as_float_array("database", database, axes="N D")
    if database.shape[0] == 0:
        raise ValueError(f"{fn}: the database is empty, found shape {database.shape}.")
    validation.check_same_dim("queries", queries, "database", database)
    if not 0 <= k <= database.shape[0]:
        raise ValueError(
            f"{fn}: k must be in [0, N] for a database of shape {database.shape}, found k={k}."
        )
    return validation.common_float(queries, database)


def _neighbor_weights(similarities: Array, alpha: Array) -> Array:
    """``max(s, 0) ** alpha``, exactly 0 for non-positive similarities (also at alpha=0)."""
    positive = similarities > 0
    safe = jnp.where(positive, similarities, 1.0)  # keeps the power finite where masked
    return jnp.where(positive, safe**alpha, 0.0)


def _expand(
    queries: Array,
    database: Array,
    similarities: Array,
    alpha: Array | None,
    k: int,
) -> Array:
    """Weighted mean of each query and its top-k rows of ``database`` under ``similarities``."""
    if k == 0:
        return l2_normalize(queries)
    top_similarities, top_indices = lax.top_k(similarities, k)  # (Q, K)
    neighbors = database[top_indices]  # (Q, K, D)
    if alpha is None:
        weights = jnp.ones_like(top_similarities)  # (Q, K)
    else:
        weights = _neighbor_weights(top_similarities, alpha)  # (Q, K)
    expanded = queries + jnp.einsum("qk,qkd->qd", weights, neighbors)  # (Q, D)
    # The mean's denominator (1 + sum of weights) is a positive per-row constant that the
    # L2 normalisation removes, so it is not computed.
    return l2_normalize(expanded)


def average_query_expansion(
    queries: Float[AnyArray, "Q D"], database: Float[AnyArray, "N D"], *, k: int
) -> Float[Array, "Q D"]:
    """Average query expansion (AQE): mean of the query and its top-k database vectors.

    Args:
      queries: L2-normalised query descriptors.
      database: L2-normalised database descriptors.
      k: Number of database neighbours averaged in (static); ``k = 0`` returns the queries.

    Returns:
      The expanded, L2-normalised queries.

    Raises:
      ValueError: If the database is empty, the dimensions differ, or k is not in [0, N].
      TypeError: If an input is not floating.

    References:
      Chum, Philbin, Sivic, Isard, Zisserman. Total recall: automatic query expansion with
      a generative feature model for object retrieval. ICCV 2007.

    Examples:
      >>> import numpy as np
      >>> db = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
      >>> out = average_query_expansion(np.array([[0.6, 0.8]], np.float32), db, k=1)
      >>> np.asarray(out, np.float64).round(4).tolist()
      [[0.3162, 0.9487]]
    """
    queries, database = _query_pair("average_query_expansion", queries, database, k)
    similarities = jnp.einsum("qd,nd->qn", queries, database)  # (Q, N)
    return _expand(queries, database, similarities, None, k)


def alpha_query_expansion(
    queries: Float[AnyArray, "Q D"],
    database: Float[AnyArray, "N D"],
    *,
    k: int,
    alpha: Scalar = 3.0,
) -> Float[Array, "Q D"]:
    """Alpha query expansion (alpha-QE): neighbours weighted by similarity ** alpha.

    The query keeps weight 1; each of its top-k database neighbours gets weight
    ``max(s, 0) ** alpha``, so negative similarities contribute nothing.

    Args:
      queries: L2-normalised query descriptors.
      database: L2-normalised database descriptors.
      k: Number of database neighbours (static); ``k = 0`` returns the queries.
      alpha: Weighting exponent (traced); 3 in the paper.

    Returns:
      The expanded, L2-normalised queries.

    Raises:
      ValueError, TypeError: As :func:`average_query_expansion` (the same input checks).

    References:
      Radenović, Tolias, Chum. Fine-tuning CNN image retrieval with no human annotation.
      TPAMI 2018.
    """
    queries, database = _query_pair("alpha_query_expansion", queries, database, k)
    alpha = jnp.asarray(alpha, dtype=queries.dtype)
    similarities = jnp.einsum("qd,nd->qn", queries, database)  # (Q, N)
    return _expand(queries, database, similarities, alpha, k)


def database_side_augmentation(
    database: Float[AnyArray, "N D"],
    *,
    k: int,
    alpha: Scalar = 3.0,
    chunk_size: int = 1024,
) -> Float[Array, "N D"]:
    """Database-side augmentation (alpha-DBA): alpha-QE of every database vector.

    Each database vector is replaced by the L2-normalised weighted sum of itself (weight 1)
    and its k nearest *other* database vectors (weights ``max(s, 0) ** alpha``; ``alpha = 0``
    gives plain DBA for positive similarities). The rows are processed in chunks of
    ``chunk_size`` with ``lax.map``, so memory is O(chunk_size * N) rather than O(N^2) and
    the compiled shapes do not depend on where a chunk falls; the last chunk is padded.

    Args:
      database: L2-normalised database descriptors.
      k: Number of neighbours per vector, excluding itself (static); ``k = 0`` is a no-op
        apart from re-normalisation.
      alpha: Weighting exponent (traced).
      chunk_size: Rows scored against the whole database per step (static).

    Returns:
      The augmented, L2-normalised database.

    Raises:
      ValueError: If the database is empty, k is not in [0, N - 1], or chunk_size < 1.
      TypeError: If the database is not floating.

    References:
      Arandjelović, Zisserman. Three things everyone should know to improve object
      retrieval. CVPR 2012 (DBA). Radenović, Tolias, Chum. TPAMI 2018 (alpha weighting).
    """
    database = validation.as_float_array("database", database, axes="N D")
    num_items, dim = database.shape
    if num_items == 0:
        raise ValueError(
            f"database_side_augmentation: the database is empty, found shape {database.shape}."
        )
    if not 0 <= k <= num_items - 1:
        raise ValueError(
            "database_side_augmentation: k must be in [0, N - 1] (the self-match is excluded) "
            f"for a database of shape {database.shape}, found k={k}."
        )
    if chunk_size < 1:
        raise ValueError(f"database_side_augmentation: chunk_size must be >= 1, got {chunk_size}.")
    if k == 0:
        return l2_normalize(database)
    alpha = jnp.asarray(alpha, dtype=database.dtype)
    chunk_size = min(chunk_size, num_items)
    num_chunks = -(-num_items // chunk_size)
    padded_rows = num_chunks * chunk_size
    padded = jnp.pad(database, ((0, padded_rows - num_items), (0, 0)))  # (C * chunk, D)
    chunks = padded.reshape(num_chunks, chunk_size, dim)  # (C, chunk, D)
    row_ids = jnp.arange(padded_rows, dtype=jnp.int32).reshape(num_chunks, chunk_size)

    def augment_chunk(args: tuple[Array, Array]) -> Array:
        rows, ids = args  # (chunk, D), (chunk,)
        similarities = jnp.einsum("cd,nd->cn", rows, database)  # (chunk, N)
        is_self = ids[:, None] == jnp.arange(num_items, dtype=jnp.int32)[None, :]  # (chunk, N)
        similarities = jnp.where(is_self, -jnp.inf, similarities)
        return _expand(rows, database, similarities, alpha, k)

    augmented = lax.map(augment_chunk, (chunks, row_ids))  # (C, chunk, D)
    return augmented.reshape(padded_rows, dim)[:num_items]  # (N, D)


__all__ = [
    "alpha_query_expansion",
    "average_query_expansion",
    "database_side_augmentation",
]
