import cv2
import numpy as np
import pytest

from benchmarks import common
from experiments import rerank_lib
from jaxretrieval import diffusion, query_expansion, search
from jaxretrieval.data import images as image_io
from jaxretrieval.spatial_verification import DSMFeatureExtractor, DSMSettings, LocalFeatures


def _clustered(rng, num, dim=16, clusters=4):
    centres = np.random.default_rng(123).normal(size=(clusters, dim))  # shared by all calls
    labels = np.arange(num) % clusters
    x = centres[labels] + 0.3 * rng.normal(size=(num, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_none_and_query_expansion_match_the_library():
    rng = np.random.default_rng(0)
    database, _ = _clustered(rng, 24)
    queries, _ = _clustered(rng, 4)
    np.testing.assert_array_equal(
        rerank_lib.rerank_split("none", queries, database),
        search.rank_database(queries, database),
    )
    expanded = query_expansion.alpha_query_expansion(queries, database, k=2, alpha=3.0)
    np.testing.assert_array_equal(
        rerank_lib.rerank_split("alpha-qe", queries, database),
        search.rank_database(np.asarray(expanded), database),
    )


@pytest.mark.parametrize("method", ["aqe", "dba+alpha-qe", "diffusion"])
def test_rerankings_are_permutations_that_keep_clusters_on_top(method):
    rng = np.random.default_rng(1)
    database, labels = _clustered(rng, 24)
    queries, query_labels = _clustered(rng, 4)
    ranks = rerank_lib.rerank_split(method, queries, database)
    assert ranks.shape == (4, 24)
    for q in range(4):
        assert sorted(ranks[q]) == list(range(24))
        # The 6 images of the query's cluster fill the top of the ranking.
        assert np.mean(labels[ranks[q, :6]] == query_labels[q]) >= 5 / 6


@pytest.fixture(scope="module")
def leuven_and_bikes(shared_data):
    """Query leuven 1; database: bikes 1, leuven 2, bikes 2, leuven 3 (true: 1 and 3)."""
    folder = shared_data / "oxford_affine_seq" / "images"
    query = [str(folder / "leuven__img1.png")]
    database = [str(folder / f"{name}.png") for name in (
        "bikes__img1", "leuven__img2", "bikes__img2", "leuven__img3"
    )]  # fmt: skip
    # Global descriptors that are wrong on purpose: the query looks like the bikes, while
    # the database itself clusters correctly (bikes with bikes, leuven with leuven).
    bikes, leuven = np.eye(2, dtype=np.float32)
    database_descriptors = np.stack([bikes, leuven, bikes * 0.99 + leuven * 0.14, leuven])
    database_descriptors /= np.linalg.norm(database_descriptors, axis=1, keepdims=True)
    query_descriptors = (0.9 * bikes + 0.44 * leuven)[None]
    query_descriptors /= np.linalg.norm(query_descriptors)
    # Each photo's features once for the module: the tests below run dsm and dsm+diffusion
    # over the same images (the features themselves are tested in spatial_verification).
    extractor = common.MemoizedDSMExtractor(DSMFeatureExtractor.pretrained(pad_multiple=64))
    return query, database, query_descriptors, database_descriptors, extractor


def test_dsm_and_dsm_diffusion_fix_a_wrong_global_ranking(leuven_and_bikes):
    """DSM verifies the true partners (identity geometry) and lifts them to the top.

    The global ranking puts the bikes first; plain diffusion, seeded by the query's nearest
    image (a bike), keeps them first; DSM and DSM-seeded diffusion must not.
    """
    query, database, queries, descriptors, extractor = leuven_and_bikes
    settings = rerank_lib.RerankSettings(dsm_max_side=320)
    kwargs = dict(
        settings=settings, query_paths=query, database_paths=database, dsm_extractor=extractor
    )
    global_ranks = rerank_lib.rerank_split("none", queries, descriptors, **kwargs)
    assert set(global_ranks[0, :2]) == {0, 2}  # both bikes first
    assert set(rerank_lib.rerank_split("diffusion", queries, descriptors, **kwargs)[0, :2]) == {
        0,
        2,
    }
    for method in ("dsm", "dsm+diffusion"):
        ranks = rerank_lib.rerank_split(method, queries, descriptors, **kwargs)
        assert set(ranks[0, :2]) == {1, 3}, (method, ranks)
        assert sorted(ranks[0]) == [0, 1, 2, 3]


def test_errors():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown re-ranking"):
        rerank_lib.rerank_split("magic", x, x)
    with pytest.raises(ValueError, match="needs the query and database image paths"):
        rerank_lib.rerank_split("dsm", x, x)
    with pytest.raises(ValueError, match="needs a DSMFeatureExtractor"):
        rerank_lib.rerank_split("dsm", x[:1], x[:2], query_paths=["a"], database_paths=["b", "c"])


# ------------------------------------------------------------------ leave-one-out (exclude)


def _split_without_row(method, x, i, **kwargs):
    """Row i's ranking by rerank_split against the database without row i, i appended."""
    others = np.delete(np.arange(len(x)), i)
    ranks = rerank_lib.rerank_split(method, x[i : i + 1], x[others], **kwargs)
    return np.r_[others[ranks[0]], i]


@pytest.mark.parametrize("method", ["none", "aqe", "alpha-qe"])
def test_leave_one_out_equals_split_without_the_query_row(method):
    """For QE the definition: each query is expanded against the others only."""
    x, _ = _clustered(np.random.default_rng(2), 12)
    ranks = rerank_lib.rerank_leave_one_out(method, x)
    for i in range(len(x)):
        np.testing.assert_array_equal(ranks[i], _split_without_row(method, x, i))


def test_leave_one_out_aqe_known_values():
    """Unit vectors at 0, 25, -30 and 50 degrees; AQE with k = 1.

    Image 0's nearest other image is 1 (25 deg), so its expanded query points at 12.5 deg:
    50 deg (37.5 away) now beats -30 deg (42.5 away). Were image 0 its own neighbour, the
    query would stay at 0 deg and keep the cosine order 1, 2, 3.
    """
    angles = np.deg2rad([0.0, 25.0, -30.0, 50.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    settings = rerank_lib.RerankSettings(qe_k=1)
    np.testing.assert_array_equal(
        rerank_lib.rerank_leave_one_out("none", x, settings=settings)[0], [1, 2, 3, 0]
    )
    np.testing.assert_array_equal(
        rerank_lib.rerank_leave_one_out("aqe", x, settings=settings)[0], [1, 3, 2, 0]
    )


def test_leave_one_out_dba_augments_every_row_but_expands_against_the_others():
    x, _ = _clustered(np.random.default_rng(3), 10)
    augmented = np.asarray(query_expansion.database_side_augmentation(x, k=2, alpha=3.0))
    ranks = rerank_lib.rerank_leave_one_out("dba+alpha-qe", x)
    for i in range(len(x)):
        others = np.delete(augmented, i, axis=0)
        expanded = query_expansion.alpha_query_expansion(x[i : i + 1], others, k=2, alpha=3.0)
        scores = np.asarray(expanded) @ augmented.T  # (1, N)
        scores[0, i] = -np.inf
        np.testing.assert_array_equal(ranks[i], np.argsort(-scores[0], kind="stable"))


@pytest.mark.parametrize("num_seeds", [1, 3])
def test_leave_one_out_diffusion_never_seeds_the_query(monkeypatch, num_seeds):
    """The seeds are the query's nearest *other* images; the graph keeps every image."""
    x, _ = _clustered(np.random.default_rng(4), 12)
    seen = []
    diffusion_scores = diffusion.diffusion_scores

    def spy(graph, seeds, **kwargs):
        seen.append((np.asarray(graph.neighbors).shape[0], seeds))
        return diffusion_scores(graph, seeds, **kwargs)

    monkeypatch.setattr(diffusion, "diffusion_scores", spy)
    settings = rerank_lib.RerankSettings(num_seeds=num_seeds)
    ranks = rerank_lib.rerank_leave_one_out("diffusion", x, settings=settings)
    ((num_nodes, seeds),) = seen
    assert num_nodes == len(x)
    dense = np.asarray(diffusion.seed_vectors(seeds, num_items=len(x)))  # (N, N)
    assert np.all(np.diag(dense) == 0)
    expected = np.argsort(-(x @ x.T - 3 * np.eye(len(x))), axis=1, kind="stable")
    for i in range(len(x)):
        seeded = set(np.flatnonzero(dense[i]).tolist())
        assert seeded and seeded <= set(expected[i, :num_seeds].tolist()), (i, seeded)
        assert ranks[i, -1] == i
        assert sorted(ranks[i]) == list(range(len(x)))


def test_exclude_is_validated():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"one database index per query, shape \(4,\)"):
        rerank_lib.query_expansion_ranks("aqe", x, x, exclude=np.arange(3))
    with pytest.raises(ValueError, match="must index the 4 database rows"):
        rerank_lib.diffusion_ranks(x, x, exclude=np.array([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="needs the query and database image paths"):
        rerank_lib.rerank_leave_one_out("dsm", x, paths=["a.jpg"])


def test_published_settings_take_their_dsm_values_from_dsm_settings():
    settings = rerank_lib.dsm_published_settings()
    dsm = DSMSettings.published()
    assert (settings.graph_k, settings.num_seeds, settings.diffusion_alpha) == (50, 5, 0.99)
    assert settings.dsm_max_side == dsm.max_side == 1024
    assert settings.dsm_shortlist == dsm.shortlist_size == 100
    assert settings.dsm_min_inliers == dsm.min_inliers == 0
    assert (settings.dsm_num_seeds, settings.dsm_seed_candidates) == (4, 10)
    assert settings.dsm_separate_scales and settings.dsm_seeds_weighted_by_similarity
    assert settings.dsm_max_correspondences == 512 and not settings.dsm_count_distinct
    ours = rerank_lib.RerankSettings().with_dsm(DSMSettings())
    assert ours.dsm_num_seeds == DSMSettings().num_seeds and ours.qe_k == 2


def test_global_shortlist_puts_the_excluded_image_last():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], np.float32)
    ranks, finite, size = rerank_lib.global_shortlist(scores, np.array([1, 0]), None)
    np.testing.assert_array_equal(ranks, [[2, 0, 1], [2, 1, 0]])
    assert ranks.dtype == np.int32 and finite.dtype == np.float32 and size == 2
    np.testing.assert_array_equal(finite, np.where([[0, 1, 0], [1, 0, 0]], -2.0, scores))
    assert rerank_lib.global_shortlist(scores, None, 5)[2] == 3
    counts = rerank_lib.pair_counts(ranks, np.array([[4, 6], [1, 2]]), 3)
    np.testing.assert_array_equal(counts, [[6, -1, 4], [-1, 2, 1]])


def test_dsm_leave_one_out_equals_split_without_the_query_row(leuven_and_bikes):
    """Leuven 1 among the others: its own (perfect) match must not be verified."""
    query, database, queries, descriptors, extractor = leuven_and_bikes
    paths = query + database
    x = np.concatenate([queries, descriptors])
    settings = rerank_lib.RerankSettings(dsm_max_side=320)
    kwargs = dict(settings=settings, dsm_extractor=extractor)
    for method in ("dsm", "dsm+diffusion"):
        ranks = rerank_lib.rerank_leave_one_out(method, x, paths=paths, **kwargs)
        assert set(ranks[0, :2]) == {2, 4}, (method, ranks)  # leuven 2 and 3
        assert list(ranks[:, -1]) == [0, 1, 2, 3, 4]
        if method == "dsm":
            split = rerank_lib.rerank_split(
                method, queries, descriptors, query_paths=query, database_paths=database, **kwargs
            )
            np.testing.assert_array_equal(ranks[0], np.r_[1 + split[0], 0])


class _ShapeRecorder:
    """A stand-in DSM extractor whose single feature holds the image's (width, height)."""

    feature_stride = 32

    def load(self, path, *, max_side):
        return image_io.load_scaled(path, max_side=max_side, upscale=False)[0]

    def check_size(self, image, *, name="image"):
        pass

    def __call__(self, image, *, as_query=False):
        height, width = image.shape[:2]
        return LocalFeatures(
            means=np.array([[width, height]], np.float32),
            covariances=np.eye(2, dtype=np.float32)[None],
            strengths=np.ones(1, np.float32),
            channels=np.zeros(1, np.int32),
            valid=np.ones(1, bool),
        )


def test_local_features_crop_to_the_query_boxes(tmp_path):
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, np.zeros((300, 400, 3), np.uint8))
    features = rerank_lib.local_features(
        [path, path], _ShapeRecorder(), max_side=200, boxes=[None, (100, 50, 300, 150)]
    )
    # Whole image 400 x 300 shrunk to 200 x 150; the 200 x 100 box is not enlarged.
    np.testing.assert_array_equal(features.means[:, 0], [[200, 150], [200, 100]])
    with pytest.raises(ValueError, match="got 1 boxes for 2 images"):
        rerank_lib.local_features([path, path], _ShapeRecorder(), boxes=[None])


@pytest.mark.slow  # 27 s; the default-settings twin runs in CI
def test_published_dsm_also_fixes_the_wrong_ranking(leuven_and_bikes):
    """The authors' settings (scale pairs verified apart, per-channel budgets, NMS on the
    database only) through the same re-ranking, at a small size."""
    import dataclasses

    from jaxretrieval.spatial_verification import DSMSettings

    query, database, queries, descriptors, _ = leuven_and_bikes
    extractor = DSMFeatureExtractor.pretrained(
        pad_multiple=64, settings=DSMSettings.published("mobilenet_v2")
    )
    settings = dataclasses.replace(rerank_lib.dsm_published_settings(), dsm_max_side=320)
    assert settings.dsm_separate_scales and settings.dsm_shortlist == 100
    for method in ("dsm", "dsm+diffusion"):
        ranks = rerank_lib.rerank_split(
            method,
            queries,
            descriptors,
            settings=settings,
            query_paths=query,
            database_paths=database,
            dsm_extractor=extractor,
        )
        assert set(ranks[0, :2]) == {1, 3}, (method, ranks)
