import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from jaxretrieval import query_expansion as qe
from tests.reference import query_expansion_reference as ref


def _descriptors(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("num_queries,num_items,dim", [(1, 5, 3), (4, 9, 16), (3, 7, 2)])
def test_query_expansions_shapes(num_queries, num_items, dim):
    rng = np.random.default_rng(0)
    queries, database = _descriptors(rng, num_queries, dim), _descriptors(rng, num_items, dim)
    for out in (
        qe.average_query_expansion(queries, database, k=2),
        qe.alpha_query_expansion(queries, database, k=2, alpha=3.0),
    ):
        assert out.shape == (num_queries, dim) and out.dtype == jnp.float32
    dba = qe.database_side_augmentation(database, k=2, alpha=3.0, chunk_size=4)
    assert dba.shape == (num_items, dim) and dba.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(dba, axis=1), 1.0, rtol=1e-6)


def test_average_query_expansion_known_values():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    query = np.array([[0.6, 0.8]], np.float32)
    # Top-2 are [0, 1] (0.8) then [1, 0] (0.6): sum = (1.6, 1.8), norm sqrt(5.8).
    out = qe.average_query_expansion(query, database, k=2)
    np.testing.assert_allclose(out, [[1.6 / np.sqrt(5.8), 1.8 / np.sqrt(5.8)]], rtol=1e-6)
    # k = 0 is the identity on normalised queries.
    np.testing.assert_allclose(qe.average_query_expansion(query, database, k=0), query)


def test_alpha_query_expansion_known_values():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    query = np.array([[0.6, 0.8]], np.float32)
    # alpha = 2: weights 0.64 for (0, 1) and 0.36 for (1, 0); sum = (0.96, 1.44).
    out = qe.alpha_query_expansion(query, database, k=2, alpha=2.0)
    norm = np.hypot(0.96, 1.44)
    np.testing.assert_allclose(out, [[0.96 / norm, 1.44 / norm]], rtol=1e-6)
    # The third neighbour has similarity -0.6: clipped to weight 0, even at alpha = 0.
    out3 = qe.alpha_query_expansion(query, database, k=3, alpha=0.0)
    norm = np.hypot(1.6, 1.8)
    np.testing.assert_allclose(out3, [[1.6 / norm, 1.8 / norm]], rtol=1e-6)


def test_database_side_augmentation_excludes_self():
    # Without the exclusion each vector's top-1 would be itself and nothing would change.
    database = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    out = qe.database_side_augmentation(database, k=1, alpha=1.0, chunk_size=2)
    # Row 0: nearest other is row 1 (0.8) -> (1 + 0.64, 0.48).
    expected0 = np.array([1.64, 0.48]) / np.hypot(1.64, 0.48)
    # Row 2: nearest other is row 1 (0.6) -> (0.48, 1 + 0.36).
    expected2 = np.array([0.48, 1.36]) / np.hypot(0.48, 1.36)
    np.testing.assert_allclose(out[0], expected0, rtol=1e-6)
    np.testing.assert_allclose(out[2], expected2, rtol=1e-6)
    # With duplicated rows the duplicate (not the row itself) is the neighbour.
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    out = qe.database_side_augmentation(dup, k=1, alpha=0.0)
    np.testing.assert_allclose(out[:2], [[1.0, 0.0], [1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(out[2], [0.0, 1.0], atol=1e-7)  # its neighbours have s = 0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_query_expansions_match_reference(k):
    rng = np.random.default_rng(1)
    queries, database = _descriptors(rng, 5, 6), _descriptors(rng, 8, 6)
    np.testing.assert_allclose(
        qe.average_query_expansion(queries, database, k=k),
        ref.average_query_expansion(queries, database, k),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        qe.alpha_query_expansion(queries, database, k=k, alpha=3.0),
        ref.alpha_query_expansion(queries, database, k, 3.0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 100])
def test_database_side_augmentation_matches_reference(chunk_size):
    rng = np.random.default_rng(2)
    database = _descriptors(rng, 8, 5)
    np.testing.assert_allclose(
        qe.database_side_augmentation(database, k=3, alpha=2.0, chunk_size=chunk_size),
        ref.database_side_augmentation(database, 3, 2.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_query_expansions_jit_matches_eager():
    rng = np.random.default_rng(3)
    queries, database = _descriptors(rng, 3, 4), _descriptors(rng, 7, 4)
    aqe = jax.jit(qe.average_query_expansion, static_argnames="k")
    aqe_out = aqe(queries, database, k=2)
    np.testing.assert_allclose(aqe_out, qe.average_query_expansion(queries, database, k=2))
    aqe_jit = jax.jit(functools.partial(qe.alpha_query_expansion, k=2))
    for alpha in (1.0, 3.0):  # alpha is traced: one compile serves both
        np.testing.assert_allclose(
            aqe_jit(queries, database, alpha=alpha),
            qe.alpha_query_expansion(queries, database, k=2, alpha=alpha),
            rtol=1e-6,
        )
    dba = jax.jit(qe.database_side_augmentation, static_argnames=("k", "chunk_size"))
    np.testing.assert_allclose(
        dba(database, k=2, alpha=3.0, chunk_size=3),
        qe.database_side_augmentation(database, k=2, alpha=3.0, chunk_size=3),
        rtol=1e-6,
    )


def test_alpha_query_expansion_batch_matches_loop():
    rng = np.random.default_rng(4)
    queries, database = _descriptors(rng, 4, 4), _descriptors(rng, 9, 4)
    batched = qe.alpha_query_expansion(queries, database, k=3, alpha=3.0)
    looped = [qe.alpha_query_expansion(q[None], database, k=3, alpha=3.0)[0] for q in queries]
    np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-6)


@given(st.permutations(list(range(6))), st.integers(0, 2**31 - 1))
def test_alpha_query_expansion_database_order_invariant(perm, seed):
    rng = np.random.default_rng(seed)
    queries, database = _descriptors(rng, 2, 4), _descriptors(rng, 6, 4)
    out = qe.alpha_query_expansion(queries, database, k=2, alpha=3.0)
    permuted = qe.alpha_query_expansion(queries, database[np.array(perm)], k=2, alpha=3.0)
    np.testing.assert_allclose(out, permuted, rtol=1e-5, atol=1e-6)


def test_query_expansions_raise(without_annotation_checks):
    rng = np.random.default_rng(5)
    queries, database = _descriptors(rng, 2, 4), _descriptors(rng, 3, 4)
    with pytest.raises(ValueError, match=r"k must be in \[0, N\].*\(3, 4\).*k=4"):
        qe.average_query_expansion(queries, database, k=4)
    with pytest.raises(ValueError, match=r"same dimension D.*\(2, 4\).*\(3, 5\)"):
        qe.alpha_query_expansion(queries, _descriptors(rng, 3, 5), k=1, alpha=3.0)
    with pytest.raises(ValueError, match="empty"):
        qe.alpha_query_expansion(queries, np.zeros((0, 4), np.float32), k=0, alpha=3.0)
    with pytest.raises(ValueError, match=r"\[0, N - 1\].*k=3"):
        qe.database_side_augmentation(database, k=3, alpha=3.0)
    with pytest.raises(ValueError, match="empty"):
        qe.database_side_augmentation(np.zeros((0, 4), np.float32), k=0)
    with pytest.raises(TypeError, match="database must be floating, got dtype int32"):
        qe.average_query_expansion(queries, np.ones((3, 4), np.int32), k=1)
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, D\), found shape \(4,\)"):
        qe.average_query_expansion(queries[0], database, k=1)
