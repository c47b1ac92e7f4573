import numpy as np
import pytest

from experiments import rerank_lib
from jaxretrieval import query_expansion, search
from jaxretrieval.spatial_verification import DSMFeatureExtractor


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
    extractor = DSMFeatureExtractor.pretrained(pad_multiple=64)
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
