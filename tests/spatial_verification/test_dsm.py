import functools

import jax
import numpy as np
import pytest

from jaxretrieval.spatial_verification import (
    LocalFeatures,
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


def test_reorder_by_inliers_keeps_unverified_in_global_order():
    ranks = np.array([[4, 2, 0, 1, 3]])
    scores = np.array([[0.1, 0.2, 0.8, 0.0, 0.9]], np.float32)
    reranking = dsm.reorder_by_inliers(ranks, scores, np.array([[3, 9, 3, 1]]), min_inliers=2)
    # 2 (9 inliers) first; 4 and 0 tie at 3: global score 0.9 before 0.1; 1 unverified.
    np.testing.assert_array_equal(reranking.ranks, [[2, 4, 0, 1, 3]])
    np.testing.assert_array_equal(reranking.shortlist_inliers, [[9, 3, 3, 1]])


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


# --------------------------------------------------------- scale pairs verified separately


def _multiscale_pair(rng, *, per_scale=10, matching=(1, 2), num_inliers=8):
    """Features of images a and b at 3 scales; only (a scale 1, b scale 2) truly match.

    Every scale of both images has `per_scale` features over 4 channels, so every scale
    pair has same-channel tentative correspondences, but only the matching pair has an
    affine relation among them.
    """
    parts_a, parts_b = [], []
    for scale in range(3):
        inliers_a = num_inliers if scale == matching[0] else 0
        a, b, _ = synthetic_pair(rng, num_features=per_scale, num_inliers=inliers_a, num_channels=4)
        parts_a.append(a)
        parts_b.append(b)
    # Move the partners of image a's matching scale to image b's matching scale.
    first, second = matching
    parts_b[first], parts_b[second] = parts_b[second], parts_b[first]

    def merge(parts):
        fields = [np.concatenate(field) for field in zip(*(p[:5] for p in parts), strict=True)]
        ids = np.repeat(np.arange(3, dtype=np.int32), per_scale)
        return LocalFeatures(*fields, scale_ids=ids)

    return merge(parts_a), merge(parts_b)


def _loop_over_scale_pairs(a, b, num_scales, **options):
    """Reference: the existing verify_pair on each scale pair's features, best pair kept."""
    best = None
    for i in range(num_scales):
        for j in range(num_scales):
            a_i = a._replace(valid=a.valid & (a.scale_ids == i))
            b_j = b._replace(valid=b.valid & (b.scale_ids == j))
            result, matches = _verify_pair(a_i, b_j, **options)
            if best is None or int(result.num_inliers) > int(best[0].num_inliers):
                best = (result, matches)
    return best


_verify_scales = jax.jit(
    dsm.verify_pair, static_argnames=("max_correspondences", "refinement_steps", "num_scales")
)


def test_verify_pair_scale_pairs_match_loop():
    rng = np.random.default_rng(8)
    a, b = _multiscale_pair(rng)
    options = dict(max_correspondences=32, error_threshold=4.0)
    result, matches = _verify_scales(a, b, num_scales=3, **options)
    expected, expected_matches = _loop_over_scale_pairs(a, b, 3, **options)
    assert int(result.num_inliers) == int(expected.num_inliers) >= 8
    np.testing.assert_array_equal(result.inlier_mask, expected.inlier_mask)
    np.testing.assert_allclose(result.transform, expected.transform, rtol=1e-5, atol=1e-4)
    for got, want in zip(matches, expected_matches, strict=True):
        np.testing.assert_array_equal(got, want)
    # The inliers are the features of a's scale 1 and b's scale 2.
    inlier_a = np.asarray(matches.index_a)[np.asarray(result.inlier_mask)]
    inlier_b = np.asarray(matches.index_b)[np.asarray(result.inlier_mask)]
    assert set(a.scale_ids[inlier_a]) == {1} and set(b.scale_ids[inlier_b]) == {2}


def test_verify_pair_one_scale_equals_merged():
    rng = np.random.default_rng(9)
    a, b, _ = synthetic_pair(rng, num_features=16, num_inliers=8, num_channels=4)
    a = a._replace(scale_ids=np.zeros(16, np.int32))
    b = b._replace(scale_ids=np.zeros(16, np.int32))
    options = dict(max_correspondences=64, error_threshold=4.0)
    merged, merged_matches = _verify_pair(a, b, **options)
    one, one_matches = _verify_scales(a, b, num_scales=1, **options)
    assert int(one.num_inliers) == int(merged.num_inliers) >= 8
    np.testing.assert_array_equal(one.inlier_mask, merged.inlier_mask)
    np.testing.assert_array_equal(one.transform, merged.transform)
    for got, want in zip(one_matches, merged_matches, strict=True):
        np.testing.assert_array_equal(got, want)


def test_verify_pair_scale_pairs_deterministic_and_jit_matches_eager():
    rng = np.random.default_rng(10)
    a, b = _multiscale_pair(rng, per_scale=6, num_inliers=4)
    options = dict(max_correspondences=16, error_threshold=4.0, num_scales=3)
    first, _ = _verify_scales(a, b, **options)
    second, _ = _verify_scales(a, b, **options)
    eager, _ = dsm.verify_pair(a, b, **options)
    for other in (second, eager):
        assert int(other.num_inliers) == int(first.num_inliers)
        np.testing.assert_array_equal(other.inlier_mask, first.inlier_mask)
    np.testing.assert_array_equal(second.transform, first.transform)
    np.testing.assert_allclose(eager.transform, first.transform, rtol=1e-4, atol=1e-2)


def test_rerank_shortlist_scale_pairs_match_loop():
    rng = np.random.default_rng(11)
    query, match = _multiscale_pair(rng, per_scale=8, matching=(0, 1), num_inliers=6)
    noise = [_multiscale_pair(rng, per_scale=8, num_inliers=0)[1] for _ in range(2)]
    database = stack_local_features([noise[0], match, noise[1]])
    options = dict(max_correspondences=32, error_threshold=4.0)
    result = jax.jit(
        functools.partial(
            dsm.rerank_shortlist, shortlist_size=3, min_inliers=0, num_scales=3, **options
        )
    )(
        np.array([[0, 1, 2]], np.int32),
        np.array([[0.9, 0.5, 0.1]], np.float32),
        stack_local_features([query]),
        database,
    )
    expected = [
        int(_loop_over_scale_pairs(query, image, 3, **options)[0].num_inliers)
        for image in (noise[0], match, noise[1])
    ]
    # Sorted by inliers, ties in the global order (DSM's matching_dsm.m).
    order = sorted(range(3), key=lambda i: -expected[i])
    np.testing.assert_array_equal(result.ranks, [order])
    np.testing.assert_array_equal(result.shortlist_inliers, [[expected[i] for i in order]])
    assert order[0] == 1


def test_verify_pair_scale_pairs_raises(without_annotation_checks):
    rng = np.random.default_rng(12)
    a, b, _ = synthetic_pair(rng, num_features=4, num_inliers=2, num_channels=2)
    with pytest.raises(ValueError, match=r"num_scales=3 pairs features by their scale"):
        dsm.verify_pair(a, b, num_scales=3)
    with pytest.raises(ValueError, match="num_scales must be >= 1 or None, got 0"):
        dsm.verify_pair(a, b, num_scales=0)
    bad = a._replace(scale_ids=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"features_a.scale_ids must have shape \(4,\)"):
        dsm.verify_pair(bad, b, num_scales=1)


def test_dsm_diffusion_seeds_published_weighting():
    # Three queries with the same re-ranked shortlist (database ids 2, 4, 0, 1).
    ranks = np.tile(np.array([[2, 4, 0, 1, 3]], np.int32), (3, 1))
    inliers = np.array([[10, 8, 4, 0], [10, 8, 4, 0], [0, 0, 0, 0]], np.int32)
    global_scores = np.array(
        [[0.5, 0.9, 0.2, 0.0, 0.8], [0.0] * 5, [0.5, 0.9, 0.2, 0.0, 0.8]], np.float32
    )
    seeds = dsm.dsm_diffusion_seeds(
        Reranking(ranks, inliers),
        num_database=5,
        num_seeds=2,
        min_inliers=0,
        num_candidates=3,
        global_scores=global_scores,
    )
    expected = np.zeros((3, 5))
    # Query 0: candidates 2, 4, 0 weigh 10 * 0.2, 8 * 0.8, 4 * 0.5 = 2, 6.4, 2; the two
    # largest are 6.4 (image 4) and the first of the tie (image 2).
    expected[0, [4, 2]] = [6.4 / 8.4, 2.0 / 8.4]
    # Query 1: every similarity is 0, so the inlier weights alone (run_diffusion.m: y = y1).
    expected[1, [2, 4]] = [10 / 18, 8 / 18]
    # Query 2: no candidate has an inlier: the top-1 image.
    expected[2, 2] = 1.0
    np.testing.assert_allclose(seeds, expected, atol=1e-6)
    # Without similarities the two most inliers win.
    plain = dsm.dsm_diffusion_seeds(
        Reranking(ranks, inliers), num_database=5, num_seeds=2, min_inliers=0, num_candidates=3
    )
    np.testing.assert_allclose(plain[0], [0, 0, 10 / 18, 0, 8 / 18], atol=1e-6)
    with pytest.raises(ValueError, match="num_candidates must be >= num_seeds = 2, got 1"):
        dsm.dsm_diffusion_seeds(
            Reranking(ranks, inliers), num_database=5, num_seeds=2, num_candidates=1
        )
    with pytest.raises(ValueError, match=r"global_scores must be \(Q, N\) = \(3, 5\)"):
        dsm.dsm_diffusion_seeds(
            Reranking(ranks, inliers), num_database=5, global_scores=global_scores[:, :4]
        )
