import functools

import jax
import numpy as np
import pytest

from jaxretrieval.spatial_verification import (
    Reranking,
    dsm,
    stack_local_features,
)
from tests.spatial_verification.helpers import synthetic_pair

_verify_pair = jax.jit(dsm.verify_pair, static_argnames=("max_correspondences", "refinement_steps"))


def test_verify_pair_recovers_transform_and_inliers():
    rng = np.random.default_rng(0)
    a, b, transform = synthetic_pair(rng, num_features=48, num_inliers=20, num_channels=8)
    # 48 features over 8 channels give about 8 * 6 * 6 = 288 same-channel pairs: keep all.
    result, matches = _verify_pair(a, b, max_correspondences=512, error_threshold=4.0)
    inlier_pairs = {
        (int(i), int(j))
        for i, j, m in zip(matches.index_a, matches.index_b, result.inlier_mask, strict=True)
        if m
    }
    truth = {(i, i) for i in range(20)}
    recall = len(inlier_pairs & truth) / len(truth)
    precision = len(inlier_pairs & truth) / max(len(inlier_pairs), 1)
    assert recall == 1.0 and precision >= 0.9, (recall, precision)
    np.testing.assert_allclose(result.transform, transform, atol=0.05 * np.abs(transform).max())
    # Only same-channel pairs are ever proposed.
    valid = np.asarray(matches.valid)
    np.testing.assert_array_equal(
        np.asarray(a.channels)[matches.index_a][valid],
        np.asarray(b.channels)[matches.index_b][valid],
    )


def test_verify_pair_unrelated_images_have_few_inliers():
    rng = np.random.default_rng(1)
    a, _, _ = synthetic_pair(rng, num_features=48, num_inliers=0, num_channels=8)
    _, b, _ = synthetic_pair(rng, num_features=48, num_inliers=0, num_channels=8)
    result, _ = _verify_pair(a, b, max_correspondences=128, error_threshold=4.0)
    assert int(result.num_inliers) <= 3


def test_verify_pair_jit_matches_eager():
    rng = np.random.default_rng(2)
    a, b, _ = synthetic_pair(rng, num_features=12, num_inliers=6, num_channels=4)
    eager, _ = dsm.verify_pair(a, b, max_correspondences=16, error_threshold=4.0)
    jitted, _ = _verify_pair(a, b, max_correspondences=16, error_threshold=4.0)
    assert int(eager.num_inliers) == int(jitted.num_inliers)
    np.testing.assert_array_equal(eager.inlier_mask, jitted.inlier_mask)
    np.testing.assert_allclose(eager.transform, jitted.transform, rtol=1e-4, atol=1e-2)


def test_verify_shortlist_vmap_matches_loop():
    rng = np.random.default_rng(3)
    query, first, _ = synthetic_pair(rng, num_features=16, num_inliers=8, num_channels=4)
    others = [
        synthetic_pair(rng, num_features=16, num_inliers=0, num_channels=4)[1] for _ in range(2)
    ]
    shortlist = stack_local_features([first, *others])
    batched, _ = jax.jit(
        functools.partial(dsm.verify_shortlist, max_correspondences=64, error_threshold=4.0)
    )(query, shortlist)
    assert batched.num_inliers.shape == (3,) and batched.transform.shape == (3, 2, 3)
    for k, b in enumerate([first, *others]):
        single, _ = _verify_pair(query, b, max_correspondences=64, error_threshold=4.0)
        assert int(batched.num_inliers[k]) == int(single.num_inliers)
        np.testing.assert_array_equal(batched.inlier_mask[k], single.inlier_mask)
    assert int(batched.num_inliers[0]) >= 8 > int(batched.num_inliers[1])


def test_rerank_shortlist_known_order():
    # Database of 5; the query is synthetic_pair's "a" and database image 3 is its "b"
    # (10 inliers); the other images are unrelated.
    rng = np.random.default_rng(4)
    query, image3, _ = synthetic_pair(rng, num_features=16, num_inliers=10, num_channels=4)
    noise = [
        synthetic_pair(rng, num_features=16, num_inliers=0, num_channels=4)[1] for _ in range(4)
    ]
    database = stack_local_features([noise[0], noise[1], noise[2], image3, noise[3]])
    queries = stack_local_features([query])
    global_ranks = np.array([[0, 1, 2, 3, 4]], np.int32)
    global_scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    rerank = jax.jit(
        functools.partial(
            dsm.rerank_shortlist,
            shortlist_size=4,
            min_inliers=5,
            max_correspondences=256,
            error_threshold=4.0,
        )
    )
    result = rerank(global_ranks, global_scores, queries, database)
    assert isinstance(result, Reranking)
    # Image 3 is verified and jumps to the front; the rest of the shortlist keeps its global
    # order, and position 4 (outside the shortlist) does not move.
    np.testing.assert_array_equal(result.ranks, [[3, 0, 1, 2, 4]])
    assert int(result.shortlist_inliers[0, 0]) >= 10
    assert np.all(np.asarray(result.shortlist_inliers[0, 1:]) < 5)


def test_rerank_shortlist_ties_broken_by_global_score():
    rng = np.random.default_rng(5)
    query, match, _ = synthetic_pair(rng, num_features=16, num_inliers=10, num_channels=4)
    database = stack_local_features([match, match, match])
    queries = stack_local_features([query, query])
    # Same inliers for every image: the order follows global_scores (by database id), not
    # the order of global_ranks, when they disagree.
    global_ranks = np.array([[0, 1, 2], [2, 1, 0]], np.int32)
    global_scores = np.array([[0.1, 0.5, 0.3], [0.1, 0.5, 0.3]], np.float32)
    result = jax.jit(
        dsm.rerank_shortlist, static_argnames=("shortlist_size", "max_correspondences")
    )(
        global_ranks,
        global_scores,
        queries,
        database,
        shortlist_size=3,
        max_correspondences=256,
        error_threshold=4.0,
    )
    np.testing.assert_array_equal(result.ranks, [[1, 2, 0], [1, 2, 0]])


def test_distinct_inliers_known_values():
    from jaxretrieval.spatial_verification import Correspondences, VerificationResult

    matches = Correspondences(
        index_a=np.array([0, 0, 1, 2], np.int32),
        index_b=np.array([0, 1, 1, 1], np.int32),
        valid=np.ones(4, bool),
    )

    def count(mask):
        result = VerificationResult(
            np.int32(sum(mask)), np.zeros((2, 3), np.float32), np.array(mask)
        )
        return int(dsm.distinct_inliers(result, matches, num_features_a=3, num_features_b=2))

    assert count([True, True, True, False]) == 2  # a {0, 1}, b {0, 1}
    assert count([True, True, False, False]) == 1  # a {0}, b {0, 1}
    assert count([False, False, False, False]) == 0


def test_rerank_shortlist_count_distinct():
    rng = np.random.default_rng(7)
    query, match, _ = synthetic_pair(rng, num_features=16, num_inliers=10, num_channels=4)
    noise = synthetic_pair(rng, num_features=16, num_inliers=0, num_channels=4)[1]
    result = jax.jit(
        dsm.rerank_shortlist,
        static_argnames=("shortlist_size", "max_correspondences", "count_distinct"),
    )(
        np.array([[0, 1]], np.int32),
        np.array([[0.9, 0.1]], np.float32),
        stack_local_features([query]),
        stack_local_features([noise, match]),
        shortlist_size=2,
        max_correspondences=256,
        error_threshold=4.0,
        count_distinct=True,
    )
    np.testing.assert_array_equal(result.ranks, [[1, 0]])
    assert int(result.shortlist_inliers[0, 0]) == 10  # the 10 true (i, i) pairs


def test_dsm_diffusion_seeds_known_values():
    reranking = Reranking(
        ranks=np.array([[3, 0, 1, 2, 4], [1, 0, 2, 3, 4]], np.int32),
        shortlist_inliers=np.array([[12, 4, 0], [2, 1, 0]], np.int32),
    )
    seeds = dsm.dsm_diffusion_seeds(reranking, num_database=5, num_seeds=2, min_inliers=4)
    # Query 0: images 3 and 0 have 12 and 4 inliers -> weights 0.75, 0.25.
    # Query 1: nothing verified -> its top-1 image (1) with weight 1.
    np.testing.assert_allclose(seeds, [[0.25, 0, 0, 0.75, 0], [0, 1, 0, 0, 0]], atol=1e-6)


def test_dsm_raises(without_annotation_checks):
    rng = np.random.default_rng(6)
    a, b, _ = synthetic_pair(rng, num_features=4, num_inliers=2, num_channels=2)
    with pytest.raises(
        ValueError,
        match=r"shortlist_features.means must have shape \(L, M, 2\), found shape \(4, 2\)",
    ):
        dsm.verify_shortlist(a, b)
    queries = stack_local_features([a])
    database = stack_local_features([a, b])
    with pytest.raises(ValueError, match=r"global_scores must be \(Q, N\) = \(1, 2\)"):
        dsm.rerank_shortlist(
            np.zeros((1, 2), np.int32), np.zeros((1, 3), np.float32), queries, database
        )
    with pytest.raises(ValueError, match="query_features has 1 queries but global_ranks has 2"):
        dsm.rerank_shortlist(
            np.zeros((2, 2), np.int32), np.zeros((2, 2), np.float32), queries, database
        )
    with pytest.raises(TypeError, match="global_ranks must be integer, got dtype float32"):
        dsm.rerank_shortlist(
            np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), queries, database
        )
    reranking = Reranking(np.zeros((1, 2), np.int32), np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match="num_seeds must be >= 1"):
        dsm.dsm_diffusion_seeds(reranking, num_database=2, num_seeds=0)
    with pytest.raises(ValueError, match="reranking.ranks has 2 columns but num_database is 3"):
        dsm.dsm_diffusion_seeds(reranking, num_database=3)
