"""Similarity on the device: cosine scores and chunked top-k.

Descriptors are L2-normalised rows, so cosine similarity is the dot product. For
shortlists that fit in memory, :func:`chunked_top_k` streams the database through fixed
chunk shapes (one compile whatever N is) and keeps a running top-k with ``lax.top_k``.
Host-side search with faiss (exact, IVF, IVF-PQ, on the GPU when present) and the full
ranking used by evaluation live in :mod:`jaxretrieval.search`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float, Int


def cosine_similarities(
    query_descriptors: Float[AnyArray, "Q D"], database_descriptors: Float[AnyArray, "N D"]
) -> Float[Array, "Q N"]:
    """Dot-product similarities of L2-normalised rows.

    Args:
      query_descriptors: L2-normalised query rows.
      database_descriptors: L2-normalised database rows.

    Returns:
      ``similarities[q, n] = <query q, database n>``, float32 (float64 if either input
      is float64; see :mod:`jaxretrieval.validation`).

    Raises:
      ValueError: If an input is not a matrix or the dimensions differ.
      TypeError: If an input is not floating.

    Examples:
      >>> import jax.numpy as jnp
      >>> cosine_similarities(jnp.eye(2), jnp.array([[0.0, 1.0]])).tolist()
      [[0.0], [1.0]]
    """
    queries, database = _descriptor_pair(query_descriptors, database_descriptors)
    return jnp.einsum("qd,nd->qn", queries, database)


class TopK(NamedTuple):
    """Best-first scores and database indices of each query's top-k."""

    scores: Float[Array, "Q K"]
    indices: Int[Array, "Q K"]


def chunked_top_k(
    query_descriptors: Float[AnyArray, "Q D"],
    database_descriptors: Float[AnyArray, "N D"],
    *,
    k: int,
    chunk_size: int = 4096,
) -> TopK:
    """Top-k database items per query by dot product, streaming the database in chunks.

    The database is padded to a multiple of ``chunk_size`` and scanned with ``lax.scan``:
    each step scores one (Q, chunk_size) block and merges it with the running (Q, k) best
    by ``lax.top_k``, so memory is O(Q * (k + chunk_size)) and the compiled shapes do not
    depend on N beyond the number of chunks. Padding rows score ``-inf`` and never win.

    Args:
      query_descriptors: L2-normalised query rows.
      database_descriptors: L2-normalised database rows.
      k: Number of neighbours to return (static); must not exceed N.
      chunk_size: Database rows scored per step (static).

    Returns:
      A :class:`TopK` with scores sorted best first; ties keep the lower index first.

    Raises:
      ValueError: If k is not in [1, N], chunk_size < 1, or the dimensions differ.
      TypeError: If an input is not floating.
    """
    queries, database = _descriptor_pair(query_descriptors, database_descriptors)
    num_database = database.shape[0]
    if not 1 <= k <= num_database:
        raise ValueError(f"k must be in [1, N={num_database}], found k={k}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, found {chunk_size}.")
    chunk_size = min(chunk_size, max(num_database, k))
    num_chunks = -(-num_database // chunk_size)
    padded = jnp.pad(database, ((0, num_chunks * chunk_size - num_database), (0, 0)))
    chunks = padded.reshape(num_chunks, chunk_size, database.shape[1])  # (chunks, chunk, D)
    num_queries = queries.shape[0]

    def step(best: TopK, chunk_and_index):
        chunk, chunk_index = chunk_and_index
        offset = chunk_index * chunk_size
        scores = jnp.einsum("qd,nd->qn", queries, chunk)  # (Q, chunk)
        indices = offset + jnp.arange(chunk_size, dtype=jnp.int32)  # (chunk,)
        scores = jnp.where(indices[None, :] < num_database, scores, -jnp.inf)
        indices = jnp.broadcast_to(indices[None, :], scores.shape)  # (Q, chunk)
        # Running best first, so equal scores keep the earlier (lower) database index.
        all_scores = jnp.concatenate([best.scores, scores], axis=1)  # (Q, K + chunk)
        all_indices = jnp.concatenate([best.indices, indices], axis=1)
        top_scores, position = jax.lax.top_k(all_scores, k)
        return TopK(top_scores, jnp.take_along_axis(all_indices, position, axis=1)), None

    init = TopK(
        jnp.full((num_queries, k), -jnp.inf, queries.dtype),
        jnp.full((num_queries, k), -1, jnp.int32),
    )
    best, _ = jax.lax.scan(step, init, (chunks, jnp.arange(num_chunks, dtype=jnp.int32)))
    return best


def _descriptor_pair(queries: AnyArray, database: AnyArray) -> tuple[Array, Array]:
    """Query and database rows checked and cast to one float dtype (float policy)."""
    queries = validation.as_float_array("query_descriptors", queries, axes="Q D")
    database = validation.as_float_array("database_descriptors", database, axes="N D")
    validation.check_same_dim("query_descriptors", queries, "database_descriptors", database)
    return validation.common_float(queries, database)
