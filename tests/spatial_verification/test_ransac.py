import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.spatial_verification import ransac
from tests.reference.dsm_reference import (
    hypothesis_inlier_counts_reference,
    up_right_affine_reference,
)
from tests.spatial_verification.helpers import random_covariances, up_right_affine

# Eager JAX dispatches (and compiles) every primitive separately; one jitted call per shape is
# much faster on these cores. Eager execution is covered by the jit == eager test.
_ransac_affine = jax.jit(
    ransac.ransac_affine, static_argnames=("refinement_steps", "max_hypotheses")
)


def test_ellipse_affine_hypotheses_known_values():
    # Unit circle at the origin -> ellipse with axes 2 (x) and 3 (y) centred at (10, 20):
    # L_a = I, L_b = diag(2, 3), so A = diag(2, 3) and t = (10, 20).
    transforms, scales = ransac.ellipse_affine_hypotheses(
        np.zeros((1, 2), np.float32),
        np.eye(2, dtype=np.float32)[None],
        np.array([[10.0, 20.0]], np.float32),
        np.diag([4.0, 9.0]).astype(np.float32)[None],
    )
    np.testing.assert_allclose(transforms[0], [[2, 0, 10], [0, 3, 20]], atol=1e-4)
    np.testing.assert_allclose(scales, [np.sqrt(6.0)], rtol=1e-5)


def test_ellipse_affine_hypotheses_recovers_up_right_map():
    rng = np.random.default_rng(0)
    transform = up_right_affine(rng)
    covs_a = random_covariances(rng, 5)
    means_a = rng.uniform(0, 100, (5, 2))
    covs_b = np.einsum("ij,njk,lk->nil", transform[:, :2], covs_a, transform[:, :2])
    means_b = means_a @ transform[:, :2].T + transform[:, 2]
    got, _ = ransac.ellipse_affine_hypotheses(
        *(x.astype(np.float32) for x in (means_a, covs_a, means_b, covs_b))
    )
    np.testing.assert_allclose(got, np.broadcast_to(transform, (5, 2, 3)), rtol=1e-3, atol=2e-2)
    for p in range(5):
        expected = up_right_affine_reference(means_a[p], covs_a[p], means_b[p], covs_b[p])
        np.testing.assert_allclose(got[p], expected, rtol=1e-3, atol=2e-2)
    # The vertical direction stays vertical: A[0, 1] == 0.
    np.testing.assert_allclose(got[:, 0, 1], 0.0, atol=1e-6)


def test_transfer_errors_known_values():
    transforms = np.array([[[1, 0, 1], [0, 1, 0]], [[2, 0, 0], [0, 2, 0]]], np.float32)
    errors = ransac.transfer_errors(
        transforms, np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [2.0, 2.0]])
    )
    np.testing.assert_allclose(errors, [[0.0, 1.0], [1.0, 0.0]], atol=1e-6)


def _random_correspondences(rng, num, num_inliers, transform, noise=1.0):
    means_a = rng.uniform(0, 512, (num, 2))
    covs_a = random_covariances(rng, num)
    means_b = rng.uniform(0, 512, (num, 2))
    covs_b = random_covariances(rng, num)
    linear = transform[:, :2]
    means_b[:num_inliers] = (
        means_a[:num_inliers] @ linear.T + transform[:, 2] + rng.normal(0, noise, (num_inliers, 2))
    )
    covs_b[:num_inliers] = np.einsum("ij,njk,lk->nil", linear, covs_a[:num_inliers], linear)
    return [x.astype(np.float32) for x in (means_a, covs_a, means_b, covs_b)]


def test_ransac_affine_recovers_transform_and_inliers():
    rng = np.random.default_rng(1)
    transform = up_right_affine(rng)
    arrays = _random_correspondences(rng, 40, 15, transform)
    valid = np.ones(40, bool)
    valid[-3:] = False  # padding rows never count
    result = _ransac_affine(*arrays, valid, error_threshold=8.0, refinement_steps=2)
    expected = np.zeros(40, bool)
    expected[:15] = True
    found = np.asarray(result.inlier_mask)
    recall = (found & expected).sum() / expected.sum()
    precision = (found & expected).sum() / max(found.sum(), 1)
    assert recall == 1.0 and precision >= 0.9, (recall, precision)
    assert int(result.num_inliers) == found.sum()
    np.testing.assert_allclose(result.transform[:, :2], transform[:, :2], atol=0.02)
    np.testing.assert_allclose(result.transform[:, 2], transform[:, 2], atol=2.0)


@pytest.mark.parametrize("threshold,max_scale", [(8.0, 3.0), (30.0, 1.5), (100.0, 3.0)])
def test_ransac_affine_matches_reference(threshold, max_scale):
    rng = np.random.default_rng(2)
    arrays = _random_correspondences(rng, 24, 8, up_right_affine(rng, scale=1.4))
    valid = rng.uniform(size=24) < 0.9
    counts, masks = hypothesis_inlier_counts_reference(
        *[a.astype(np.float64) for a in arrays], valid, threshold, max_scale
    )
    result = _ransac_affine(
        *arrays, valid, error_threshold=threshold, max_scale_change=max_scale, refinement_steps=0
    )
    best = int(np.argmax(counts))
    assert int(result.num_inliers) == counts[best]
    np.testing.assert_array_equal(result.inlier_mask, masks[best])


@pytest.mark.parametrize("max_hypotheses", [5, 24, 100])
def test_ransac_affine_hypothesis_budget_matches_reference(max_hypotheses):
    rng = np.random.default_rng(5)
    arrays = _random_correspondences(rng, 24, 8, up_right_affine(rng, scale=1.4))
    valid = np.ones(24, bool)
    counts, masks = hypothesis_inlier_counts_reference(
        *[a.astype(np.float64) for a in arrays], valid, 30.0, 3.0
    )
    result = _ransac_affine(
        *arrays, valid, error_threshold=30.0, refinement_steps=0, max_hypotheses=max_hypotheses
    )
    # Only the first H correspondences are hypotheses; all 24 are scored.
    best = int(np.argmax(counts[:max_hypotheses]))
    assert int(result.num_inliers) == counts[best]
    np.testing.assert_array_equal(result.inlier_mask, masks[best])


def test_ransac_affine_rejects_large_scale_change():
    # One correspondence, scale change 4 (ellipse axes x4): rejected at 3, accepted at 5.
    arrays = [
        np.zeros((1, 2), np.float32),
        np.eye(2, dtype=np.float32)[None],
        np.ones((1, 2), np.float32),
        (16 * np.eye(2, dtype=np.float32))[None],
    ]
    valid = np.ones(1, bool)
    rejected = _ransac_affine(*arrays, valid, error_threshold=1.0, max_scale_change=3.0)
    accepted = _ransac_affine(*arrays, valid, error_threshold=1.0, max_scale_change=5.0)
    assert int(rejected.num_inliers) == 0 and not np.any(rejected.inlier_mask)
    np.testing.assert_array_equal(rejected.transform, np.zeros((2, 3)))
    assert int(accepted.num_inliers) == 1
    # Shrinking by 4 is rejected as well (the limit is symmetric).
    shrink = [arrays[2], arrays[3], arrays[0], arrays[1]]
    assert int(_ransac_affine(*shrink, valid, error_threshold=1.0).num_inliers) == 0


def test_ransac_affine_all_invalid_gives_zero():
    rng = np.random.default_rng(3)
    arrays = _random_correspondences(rng, 6, 6, up_right_affine(rng))
    result = _ransac_affine(*arrays, np.zeros(6, bool), error_threshold=10.0)
    assert int(result.num_inliers) == 0 and not np.any(result.inlier_mask)


def test_ransac_affine_jit_matches_eager_and_threshold_is_traced():
    rng = np.random.default_rng(4)
    arrays = _random_correspondences(rng, 16, 6, up_right_affine(rng))
    valid = np.ones(16, bool)
    eager = ransac.ransac_affine(*arrays, valid, error_threshold=8.0)
    traces = []

    @jax.jit
    def run(a, b, c, d, v, threshold):
        traces.append(1)
        return ransac.ransac_affine(a, b, c, d, v, error_threshold=threshold)

    jitted = run(*arrays, valid, 8.0)
    run(*arrays, valid, 9.0)
    assert len(traces) == 1
    assert int(jitted.num_inliers) == int(eager.num_inliers)
    np.testing.assert_array_equal(jitted.inlier_mask, eager.inlier_mask)
    np.testing.assert_allclose(jitted.transform, eager.transform, rtol=1e-4, atol=1e-3)


def test_ransac_affine_raises(without_annotation_checks):
    arrays = [np.zeros((3, 2), np.float32), np.tile(np.eye(2, dtype=np.float32), (3, 1, 1))] * 2
    with pytest.raises(ValueError, match=r"valid must have shape \(3,\), found \(4,\)"):
        ransac.ransac_affine(*arrays, np.ones(4, bool), error_threshold=1.0)
    with pytest.raises(TypeError, match="valid must be boolean"):
        ransac.ransac_affine(*arrays, np.ones(3, np.int32), error_threshold=1.0)
    with pytest.raises(
        ValueError, match=r"covariances_a must have shape \(P, 2, 2\), found shape \(3, 2\)"
    ):
        ransac.ransac_affine(
            arrays[0],
            np.zeros((3, 2), np.float32),
            *arrays[2:],
            np.ones(3, bool),
            error_threshold=1.0,
        )
    with pytest.raises(ValueError, match="means_b has 2 rows but means_a has 3"):
        ransac.ransac_affine(
            arrays[0],
            arrays[1],
            np.zeros((2, 2), np.float32),
            arrays[3],
            np.ones(3, bool),
            error_threshold=1.0,
        )
    with pytest.raises(TypeError, match="means_a must be floating, got dtype int32"):
        ransac.ransac_affine(
            jnp.zeros((3, 2), jnp.int32), *arrays[1:], np.ones(3, bool), error_threshold=1.0
        )
    with pytest.raises(ValueError, match="max_hypotheses must be >= 1 or None"):
        ransac.ransac_affine(*arrays, np.ones(3, bool), error_threshold=1.0, max_hypotheses=0)
    with pytest.raises(ValueError, match="refinement_steps must be >= 0"):
        ransac.ransac_affine(*arrays, np.ones(3, bool), error_threshold=1.0, refinement_steps=-1)
