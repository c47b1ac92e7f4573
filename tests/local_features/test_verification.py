import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.local_features import (
    DelfFeatures,
    affine_from_point_triples,
    ransac_affine_points,
    rerank_shortlist,
    sample_point_triples,
    verify_pair,
    verify_shortlist,
)
from tests.local_features.reference import affine_from_points_reference

TRANSFORM = np.array([[1.2, 0.1, 30.0], [-0.2, 0.9, -12.0]], np.float32)
# One setting and one shape (60 keypoints, D = 8) for every test: few compiles.
KWARGS = dict(max_distance=0.5, error_threshold=5.0, num_hypotheses=64)
_ransac = jax.jit(
    lambda a, b, valid, key: ransac_affine_points(
        a, b, valid, key=key, error_threshold=5.0, num_hypotheses=300
    )
)
_verify = jax.jit(lambda a, b, key: verify_pair(a, b, key=key, **KWARGS))


def _points(rng, num=60, num_inliers=30, noise=1.0):
    points_a = rng.uniform(0, 500, (num, 2)).astype(np.float32)
    points_b = rng.uniform(0, 500, (num, 2)).astype(np.float32)
    mapped = points_a @ TRANSFORM[:, :2].T + TRANSFORM[:, 2]
    points_b[:num_inliers] = mapped[:num_inliers] + rng.normal(0, noise, (num_inliers, 2))
    return points_a, points_b


def _features(rng, locations, descriptors, num_valid=None):
    num = len(locations)
    valid = np.zeros(num, bool)
    valid[: num if num_valid is None else num_valid] = True
    return DelfFeatures(
        locations=locations.astype(np.float32),
        descriptors=descriptors.astype(np.float32),
        scores=np.linspace(2, 1, num).astype(np.float32),
        scales=np.ones(num, np.float32),
        valid=valid,
    )


def _pair(rng, num=60, num_inliers=30, dim=8):
    """Image b holds a's first num_inliers keypoints (same descriptors) moved by TRANSFORM."""
    points_a, points_b = _points(rng, num, num_inliers)
    desc_a = rng.normal(size=(num, dim))
    desc_b = rng.normal(size=(num, dim))
    desc_b[:num_inliers] = desc_a[:num_inliers] + rng.normal(0, 0.01, (num_inliers, dim))
    desc_a /= np.linalg.norm(desc_a, axis=1, keepdims=True)
    desc_b /= np.linalg.norm(desc_b, axis=1, keepdims=True)
    return _features(rng, points_a, desc_a), _features(rng, points_b, desc_b)


def test_affine_from_point_triples_matches_reference():
    rng = np.random.default_rng(0)
    points_a = rng.uniform(0, 1000, (5, 3, 2)).astype(np.float32)
    points_b = rng.uniform(0, 1000, (5, 3, 2)).astype(np.float32)
    transforms, ok = affine_from_point_triples(points_a, points_b)
    assert transforms.shape == (5, 2, 3) and bool(jnp.all(ok))
    for y in range(5):
        np.testing.assert_allclose(
            transforms[y],
            affine_from_points_reference(points_a[y], points_b[y]),
            rtol=2e-3,
            atol=2e-2,
        )
    # Known value: the triple under TRANSFORM gives TRANSFORM back.
    triple = np.array([[[0.0, 0.0], [100.0, 0.0], [0.0, 50.0]]], np.float32)
    image = triple @ TRANSFORM[:, :2].T + TRANSFORM[:, 2]
    np.testing.assert_allclose(affine_from_point_triples(triple, image)[0][0], TRANSFORM, atol=1e-4)


def test_affine_from_point_triples_rejects_collinear():
    collinear = np.array([[[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]], np.float32)
    transforms, ok = affine_from_point_triples(collinear, collinear)
    assert not bool(ok[0]) and np.all(np.asarray(transforms) == 0)


def test_sample_point_triples_draws_distinct_valid_rows():
    valid = np.array([True, False, True, True, False, True, True])
    indices, ok = sample_point_triples(jax.random.key(0), valid, num_hypotheses=200)
    indices = np.asarray(indices)
    assert indices.shape == (200, 3) and bool(jnp.all(ok))
    assert np.all(valid[indices])
    assert all(len(set(row)) == 3 for row in indices.tolist())
    assert set(indices.ravel().tolist()) == {0, 2, 3, 5, 6}  # every valid row gets drawn
    # Fewer than 3 valid rows: no triple is ok.
    _, ok = sample_point_triples(jax.random.key(0), valid & (np.arange(7) < 3), num_hypotheses=4)
    assert not bool(jnp.any(ok))


def test_ransac_affine_points_recovers_the_transform():
    rng = np.random.default_rng(1)
    points_a, points_b = _points(rng)
    result = _ransac(points_a, points_b, np.ones(60, bool), jax.random.key(0))
    mask = np.asarray(result.inlier_mask)
    assert mask[:30].all() and mask[30:].sum() <= 2
    assert int(result.num_inliers) == mask.sum()
    np.testing.assert_allclose(result.transform, TRANSFORM, rtol=0.02, atol=2.0)


def test_ransac_affine_points_without_hypotheses():
    points = np.zeros((60, 2), np.float32)
    result = _ransac(points, points, np.arange(60) < 2, jax.random.key(0))
    assert int(result.num_inliers) == 0 and not np.any(result.inlier_mask)
    np.testing.assert_array_equal(result.transform, np.zeros((2, 3)))


def test_verify_pair_is_deterministic_and_jit_matches_eager():
    rng = np.random.default_rng(2)
    a, b = _pair(rng)
    kwargs = dict(max_distance=0.5, error_threshold=5.0, num_hypotheses=100)
    first, matches = verify_pair(a, b, key=jax.random.key(3), **kwargs)
    again, _ = verify_pair(a, b, key=jax.random.key(3), **kwargs)
    jitted, _ = jax.jit(lambda x, y, k: verify_pair(x, y, key=k, **kwargs))(a, b, jax.random.key(3))
    assert np.asarray(matches.valid)[:30].all()
    assert int(first.num_inliers) >= 30
    for result in (again, jitted):
        assert int(result.num_inliers) == int(first.num_inliers)
        np.testing.assert_array_equal(result.inlier_mask, first.inlier_mask)
        np.testing.assert_allclose(result.transform, first.transform, rtol=1e-5, atol=1e-3)


def test_verify_shortlist_vmap_matches_loop():
    rng = np.random.default_rng(4)
    query, _ = _pair(rng)
    others = [_pair(rng, num_inliers=n)[1] for n in (30, 0, 10)]
    # Image b of a fresh pair shares nothing with this query: give two of them its points.
    others[0] = _pair(rng)[1]
    matched = _features(
        rng,
        query.locations @ TRANSFORM[:, :2].T + TRANSFORM[:, 2],
        query.descriptors,
    )
    others[2] = matched
    stacked = jax.tree.map(lambda *x: np.stack(x), *others)
    ids = np.array([7, 3, 11])
    key = jax.random.key(5)
    batched, _ = jax.jit(lambda q, s, i, k: verify_shortlist(q, s, i, key=k, **KWARGS))(
        query, stacked, ids, key
    )
    for position, (image_id, features) in enumerate(zip(ids, others, strict=True)):
        single, _ = _verify(query, features, jax.random.fold_in(key, image_id))
        assert int(batched.num_inliers[position]) == int(single.num_inliers)
        np.testing.assert_array_equal(batched.inlier_mask[position], single.inlier_mask)
    assert int(batched.num_inliers[2]) == 60


def test_rerank_shortlist_puts_verified_images_first():
    rng = np.random.default_rng(6)
    query, _ = _pair(rng)
    copy = _features(rng, query.locations @ TRANSFORM[:, :2].T + TRANSFORM[:, 2], query.descriptors)
    unrelated = [_pair(rng, num_inliers=0)[1] for _ in range(3)]
    database = jax.tree.map(lambda *x: np.stack(x), unrelated[0], unrelated[1], copy, unrelated[2])
    queries = jax.tree.map(lambda x: np.asarray(x)[None], query)
    global_ranks = np.array([[0, 1, 2, 3]])
    global_scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    rerank = jax.jit(
        lambda ranks, scores, q, d, key: rerank_shortlist(
            ranks, scores, q, d, key=key, shortlist_size=3, **KWARGS
        )
    )
    result = rerank(global_ranks, global_scores, queries, database, jax.random.key(0))
    assert np.asarray(result.ranks).tolist() == [[2, 0, 1, 3]]
    assert int(result.shortlist_inliers[0, 0]) == 60


def test_ransac_affine_points_raises(without_annotation_checks):
    points = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="points_b must have the shape of points_a"):
        ransac_affine_points(points, points[:3], np.ones(4, bool), key=jax.random.key(0))
    with pytest.raises(TypeError, match="valid must be boolean"):
        ransac_affine_points(points, points, np.ones(4, np.int32), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_hypotheses must be >= 1"):
        sample_point_triples(jax.random.key(0), np.ones(4, bool), num_hypotheses=0)


def test_best_affine_hypothesis_is_shared_with_dsm():
    """The scoring both RANSACs use: most inliers wins, ties to the first, LO refits."""
    from jaxretrieval.spatial_verification import best_affine_hypothesis

    rng = np.random.default_rng(7)
    points_a, points_b = _points(rng, noise=0.0)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    transforms = np.stack([identity, TRANSFORM, TRANSFORM]).astype(np.float32)
    score = jax.jit(
        lambda t, ok: best_affine_hypothesis(
            t, ok, points_a, points_b, np.ones(60, bool), error_threshold=2.0
        )
    )
    result = score(transforms, np.array([True, True, True]))
    assert int(result.num_inliers) == 30 and np.asarray(result.inlier_mask)[:30].all()
    np.testing.assert_allclose(result.transform, TRANSFORM, atol=1e-3)
    none = score(transforms, np.zeros(3, bool))
    assert int(none.num_inliers) == 0 and not np.any(none.inlier_mask)
