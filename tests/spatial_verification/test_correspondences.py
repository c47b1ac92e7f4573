import jax
import numpy as np
import pytest

from jaxretrieval.spatial_verification import LocalFeatures, correspondences
from tests.reference.dsm_reference import same_channel_pairs_reference


def _features(channels, strengths, valid=None):
    num = len(channels)
    return LocalFeatures(
        means=np.zeros((num, 2), np.float32),
        covariances=np.tile(np.eye(2, dtype=np.float32), (num, 1, 1)),
        strengths=np.asarray(strengths, np.float32),
        channels=np.asarray(channels, np.int32),
        valid=np.ones(num, bool) if valid is None else np.asarray(valid),
    )


def _pairs(result):
    return [
        (int(i), int(j))
        for i, j, v in zip(result.index_a, result.index_b, result.valid, strict=True)
        if v
    ]


def test_tentative_correspondences_known_values():
    a = _features([3, 1, 3, 7], [1.0, 2.0, 0.5, 9.0], valid=[True, True, True, False])
    b = _features([3, 1, 5], [2.0, 1.0, 8.0])
    result = correspondences.tentative_correspondences(a, b, max_correspondences=5)
    # Same channel only (channel 7 of a is invalid, channel 5 of b has no partner):
    # (0,0) 1*2=2, (1,1) 2*1=2, (2,0) 0.5*2=1; ties by lower index of a first.
    assert _pairs(result) == [(0, 0), (1, 1), (2, 0)]
    np.testing.assert_array_equal(result.valid, [True, True, True, False, False])
    np.testing.assert_array_equal(result.index_a[3:], [0, 0])
    assert result.index_a.dtype == np.int32 and result.valid.shape == (5,)


def test_tentative_correspondences_keeps_strongest_when_truncated():
    a = _features([0, 0, 0], [1.0, 3.0, 2.0])
    b = _features([0, 0], [1.0, 2.0])
    result = correspondences.tentative_correspondences(a, b, max_correspondences=2)
    assert _pairs(result) == [(1, 1), (2, 1)]


def test_tentative_correspondences_output_larger_than_all_pairs_is_padded():
    a = _features([0], [1.0])
    b = _features([0, 1], [1.0, 1.0])
    result = correspondences.tentative_correspondences(a, b, max_correspondences=4)
    assert result.valid.shape == (4,) and _pairs(result) == [(0, 0)]


def test_tentative_correspondences_matches_reference():
    rng = np.random.default_rng(0)
    a = _features(rng.integers(0, 4, 12), rng.uniform(size=12), rng.uniform(size=12) < 0.8)
    b = _features(rng.integers(0, 4, 9), rng.uniform(size=9), rng.uniform(size=9) < 0.8)
    expected = same_channel_pairs_reference(
        a.channels, a.valid, a.strengths, b.channels, b.valid, b.strengths
    )
    result = jax.jit(
        correspondences.tentative_correspondences, static_argnames="max_correspondences"
    )(a, b, max_correspondences=16)
    assert _pairs(result) == expected[:16]


def test_tentative_correspondences_raises(without_annotation_checks):
    good = _features([0, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="max_correspondences must be >= 1"):
        correspondences.tentative_correspondences(good, good, max_correspondences=0)
    bad = good._replace(strengths=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"features_b.strengths must have shape \(2,\)"):
        correspondences.tentative_correspondences(good, bad, max_correspondences=2)
    with pytest.raises(TypeError, match="features_a.channels must be integer, got dtype float32"):
        correspondences.tentative_correspondences(
            good._replace(channels=np.zeros(2, np.float32)), good, max_correspondences=2
        )
    with pytest.raises(TypeError, match="features_a must be LocalFeatures"):
        correspondences.tentative_correspondences(tuple(good), good, max_correspondences=2)
