import numpy as np
import pytest

from experiments import rerank_lib
from jaxretrieval import query_expansion, search


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


def test_dsm_reranking_of_real_photos(shared_data):
    images = sorted((shared_data / "landmarks_mini" / "images").glob("sacre_coeur__hloc_*"))
    others = sorted((shared_data / "landmarks_mini" / "images").glob("united_states_capitol*"))
    query_paths = [str(images[0])]
    database_paths = [str(p) for p in (images[1], others[0], images[2], others[1])]
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(1, 8)).astype(np.float32)
    database = rng.normal(size=(4, 8)).astype(np.float32)
    ranks = rerank_lib.rerank_split(
        "dsm", queries, database, query_paths=query_paths, database_paths=database_paths,
        dsm_max_side=320,
    )  # fmt: skip
    assert sorted(ranks[0]) == [0, 1, 2, 3]


def test_errors():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="unknown re-ranking"):
        rerank_lib.rerank_split("magic", x, x)
    with pytest.raises(ValueError, match="needs the query and database image paths"):
        rerank_lib.rerank_split("dsm", x, x)
