import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.local_features import mutual_nearest_neighbors
from tests.local_features.reference import mutual_nearest_neighbors_reference


def _unit(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_mutual_nearest_neighbors_known_values():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], np.float32)
    b = np.array([[0.0, 1.0], [0.96, 0.28], [-1.0, 0.0]], np.float32)
    # a0 <-> b1 (d 0.28); a1 <-> b0 (d 0); a2's nearest is b1 too (d 0.36), but b1's
    # nearest is a0: not mutual. b2 is nobody's nearest.
    m = mutual_nearest_neighbors(a, b, max_distance=None)
    assert m.index_a.tolist() == [0, 1, 2]
    assert m.valid.tolist() == [True, True, False]
    assert m.index_b.tolist() == [1, 0, 0]
    # A distance bound of 0.1 keeps only the exact match.
    assert mutual_nearest_neighbors(a, b, max_distance=0.1).valid.tolist() == [False, True, False]


def test_mutual_nearest_neighbors_masks_and_ratio():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]], np.float32)
    # Without b2, a1's nearest is b0 (d 0.63) whose nearest is a1 too.
    m = mutual_nearest_neighbors(a, b, valid_b=np.array([True, True, False]), max_distance=None)
    assert m.valid.tolist() == [True, True] and m.index_b.tolist() == [1, 0]
    # Ratio test: a0's distances 0.63 (b1) and 0.89 (b0): 0.71 passes 0.8, fails 0.6.
    ratio = dict(valid_b=np.array([True, True, False]), max_distance=None)
    assert mutual_nearest_neighbors(a, b, **ratio, max_ratio=0.8).valid.tolist()[0]
    assert not mutual_nearest_neighbors(a, b, **ratio, max_ratio=0.6).valid.tolist()[0]
    # Padding rows of a never match; an empty b matches nothing.
    m = mutual_nearest_neighbors(a, b, valid_a=np.array([False, True]), max_distance=None)
    assert m.valid.tolist() == [False, True] and m.index_b.tolist() == [0, 2]
    empty = mutual_nearest_neighbors(a, b, valid_b=np.zeros(3, bool), max_distance=None)
    assert not np.any(empty.valid)


@pytest.mark.parametrize("max_distance, max_ratio", [(None, None), (1.0, None), (None, 0.9)])
def test_mutual_nearest_neighbors_matches_reference(max_distance, max_ratio):
    rng = np.random.default_rng(0)
    a, b = _unit(rng, (12, 4)), _unit(rng, (9, 4))
    valid_a, valid_b = rng.uniform(size=12) < 0.8, rng.uniform(size=9) < 0.8
    m = mutual_nearest_neighbors(
        a, b, valid_a, valid_b, max_distance=max_distance, max_ratio=max_ratio
    )
    expected = mutual_nearest_neighbors_reference(a, b, valid_a, valid_b, max_distance, max_ratio)
    assert m.valid.tolist() == [ok for _, ok in expected]
    assert m.index_b.tolist() == [j for j, _ in expected]


def test_mutual_nearest_neighbors_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = _unit(rng, (10, 6)), _unit(rng, (7, 6))
    ab = mutual_nearest_neighbors(a, b, max_distance=1.2)
    ba = mutual_nearest_neighbors(b, a, max_distance=1.2)
    pairs_ab = {
        (int(i), int(j)) for i, j, v in zip(ab.index_a, ab.index_b, ab.valid, strict=True) if v
    }
    pairs_ba = {
        (int(j), int(i)) for i, j, v in zip(ba.index_a, ba.index_b, ba.valid, strict=True) if v
    }
    assert pairs_ab == pairs_ba and pairs_ab


def test_mutual_nearest_neighbors_jit_and_vmap():
    rng = np.random.default_rng(2)
    a, b = _unit(rng, (3, 8, 4)), _unit(rng, (3, 6, 4))

    def match(x, y, limit):
        return mutual_nearest_neighbors(x, y, max_distance=limit)

    eager = [match(a[i], b[i], 1.0) for i in range(3)]
    jitted = jax.jit(match)(a[0], b[0], 1.0)
    batched = jax.jit(jax.vmap(match, in_axes=(0, 0, None)))(a, b, 1.0)
    for field in ("index_b", "valid"):
        np.testing.assert_array_equal(getattr(jitted, field), getattr(eager[0], field))
        np.testing.assert_array_equal(
            getattr(batched, field), np.stack([getattr(e, field) for e in eager])
        )


def test_mutual_nearest_neighbors_raises(without_annotation_checks):
    with pytest.raises(ValueError, match="same dimension D"):
        mutual_nearest_neighbors(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"valid_a must have shape \(Ma,\) = \(2,\)"):
        mutual_nearest_neighbors(
            np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.ones(3, bool)
        )
    with pytest.raises(TypeError, match="descriptors_b must be floating"):
        mutual_nearest_neighbors(np.zeros((2, 3), np.float32), jnp.zeros((2, 3), jnp.int32))
