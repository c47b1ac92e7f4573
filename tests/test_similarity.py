import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from jaxretrieval import similarity
from tests.reference.similarity_reference import top_k_reference


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cosine_similarities_known_values():
    q = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    db = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    np.testing.assert_allclose(
        similarity.cosine_similarities(q, db), [[0.0, 1.0, 0.6], [0.8, 0.6, 1.0]], atol=1e-6
    )


@pytest.mark.parametrize(
    "num_database,chunk_size,k", [(10, 4, 3), (7, 7, 7), (33, 8, 5), (5, 64, 2)]
)
def test_chunked_top_k_matches_reference(num_database, chunk_size, k):
    rng = np.random.default_rng(0)
    queries, database = _unit_rows(rng, 4, 8), _unit_rows(rng, num_database, 8)
    result = similarity.chunked_top_k(queries, database, k=k, chunk_size=chunk_size)
    expected_scores, expected_indices = top_k_reference(queries, database, k)
    np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.indices, expected_indices)
    assert result.scores.shape == (4, k) and result.indices.dtype == jnp.int32


def test_chunked_top_k_ties_keep_lower_index_across_chunks():
    database = jnp.array([[1.0, 0.0]] * 6)  # all equal scores, spread over 3 chunks
    result = similarity.chunked_top_k(jnp.array([[1.0, 0.0]]), database, k=4, chunk_size=2)
    np.testing.assert_array_equal(result.indices, [[0, 1, 2, 3]])


def test_chunked_top_k_jit_matches_eager():
    rng = np.random.default_rng(1)
    queries, database = _unit_rows(rng, 3, 8), _unit_rows(rng, 21, 8)
    eager = similarity.chunked_top_k(queries, database, k=5, chunk_size=8)
    jitted = jax.jit(similarity.chunked_top_k, static_argnames=("k", "chunk_size"))(
        queries, database, k=5, chunk_size=8
    )
    np.testing.assert_allclose(eager.scores, jitted.scores, rtol=1e-6)
    np.testing.assert_array_equal(eager.indices, jitted.indices)


def test_chunked_top_k_vmap_over_query_sets_matches_loop():
    rng = np.random.default_rng(2)
    query_sets = np.stack([_unit_rows(rng, 3, 8) for _ in range(2)])  # (2, 3, 8)
    database = _unit_rows(rng, 11, 8)
    batched = jax.vmap(lambda q: similarity.chunked_top_k(q, database, k=4, chunk_size=4))(
        query_sets
    )
    for i, queries in enumerate(query_sets):
        single = similarity.chunked_top_k(queries, database, k=4, chunk_size=4)
        np.testing.assert_array_equal(batched.indices[i], single.indices)


def test_chunked_top_k_raises(without_annotation_checks):
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"k must be in \[1, N=2\]"):
        similarity.chunked_top_k(x, x, k=3)
    with pytest.raises(ValueError, match=r"same dimension D.*\(2, 4\).*\(3, 5\)"):
        similarity.chunked_top_k(x, jnp.ones((3, 5)), k=1)
    with pytest.raises(
        ValueError, match=r"query_descriptors must have shape \(Q, D\), found shape \(4,\)"
    ):
        similarity.cosine_similarities(jnp.ones(4), x)
    with pytest.raises(TypeError, match="query_descriptors must be floating, got dtype int32"):
        similarity.cosine_similarities(jnp.ones((2, 4), jnp.int32), x)


def test_annotations_refuse_bad_shapes_under_test():
    with pytest.raises(jaxtyping.TypeCheckError):
        similarity.cosine_similarities(jnp.ones((2, 4)), jnp.ones((3, 5)))
