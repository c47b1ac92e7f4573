"""Re-ranking a global ranking: query expansion, diffusion and DSM spatial verification.

Used by ``python -m experiments.evaluate --rerank METHOD`` and the re-ranking benchmarks.
Every function takes query and database descriptors (L2-normalised rows) and returns a
full ``(Q, N)`` ranking, best first; DSM also takes each image's local features.

Every parameter is in :class:`RerankSettings`, which evaluation records in its JSON.
Defaults are for small sets like ../shared/data (tens of images, 1-12 per scene): QE
k = 2, alpha = 3; diffusion on a k = 5 mutual graph seeded by the query's nearest image
with alpha 0.9 (benchmarks/diffusion_small_set_sweep.py shows why the paper's k = 50, 10
seeds and alpha 0.99 fail there). For ROxford-sized sets use the paper's values.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from jaxretrieval import diffusion, query_expansion, similarity
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    LocalFeatures,
    Reranking,
    dsm_diffusion_seeds,
    rerank_shortlist,
    stack_local_features,
)

METHODS = ("none", "aqe", "alpha-qe", "dba+alpha-qe", "diffusion", "dsm", "dsm+diffusion")
MIN_INLIERS = 5


@dataclasses.dataclass(frozen=True)
class RerankSettings:
    """Every parameter of every re-ranking method (recorded in evaluation JSON).

    Attributes:
      qe_k: Neighbours averaged by query expansion (and DBA).
      qe_alpha: Exponent of alpha-QE / alpha-DBA weights.
      graph_k: Neighbours of the diffusion graph (capped at N - 1).
      num_seeds: Diffusion seeds: the query's nearest database images (or DSM-verified).
      diffusion_alpha: Diffusion's alpha (random-walk continuation).
      gamma: Affinity exponent of the graph and the seed weights.
      dsm_max_side: Longer image side for DSM features (never enlarged).
      dsm_threshold_cells: RANSAC inlier distance in cells of the full-scale feature map.
      dsm_min_inliers: Fewer inliers than this count as unverified.
      dsm_shortlist: Images verified per query; None verifies the whole database.
      dsm_max_correspondences: Tentative correspondences per pair.
      dsm_count_distinct: Count each feature at most once among the inliers.
    """

    qe_k: int = 2
    qe_alpha: float = 3.0
    graph_k: int = 5
    num_seeds: int = 1
    diffusion_alpha: float = 0.9
    gamma: float = 3.0
    dsm_max_side: int = 512
    dsm_threshold_cells: float = 2.0
    dsm_min_inliers: int = MIN_INLIERS
    dsm_shortlist: int | None = None
    dsm_max_correspondences: int = 1024
    dsm_count_distinct: bool = False


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """Best-first ranking of each row of a (Q, N) score matrix (stable: ties by index)."""
    return np.argsort(-scores, axis=1, kind="stable")


def query_expansion_ranks(
    method: str, queries: np.ndarray, database: np.ndarray, *, k: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """Ranks after AQE, alpha-QE or DBA + alpha-QE."""
    if method == "aqe":
        expanded = query_expansion.average_query_expansion(queries, database, k=k)
    elif method == "alpha-qe":
        expanded = query_expansion.alpha_query_expansion(queries, database, k=k, alpha=alpha)
    elif method == "dba+alpha-qe":
        database = query_expansion.database_side_augmentation(database, k=k, alpha=alpha)
        expanded = query_expansion.alpha_query_expansion(queries, database, k=k, alpha=alpha)
    else:
        raise ValueError(f"not a query-expansion method: {method!r}")
    return ranks_of(np.asarray(similarity.cosine_similarities(expanded, database)))


def diffusion_ranks(
    queries: np.ndarray,
    database: np.ndarray,
    *,
    graph_k: int = 5,
    num_seeds: int = 1,
    alpha: float = 0.9,
    gamma: float = 3.0,
    seeds: np.ndarray | None = None,
) -> np.ndarray:
    """Ranks by diffusion on the database's mutual kNN graph (Iscen et al. CVPR17).

    Seeds are the query's ``num_seeds`` nearest database images (weights s^gamma), or a
    caller-given (Q, N) seed matrix (DSM's verified images). Items the diffusion does not
    reach keep their cosine order behind the reached ones.
    """
    scores = np.asarray(similarity.cosine_similarities(queries, database))
    graph = diffusion.normalize_affinity(
        diffusion.knn_affinity(database, num_neighbors=min(graph_k, len(database) - 1), gamma=gamma)
    )
    if seeds is None:
        seeds = diffusion.query_seeds(
            queries, database, num_seeds=min(num_seeds, len(database)), gamma=gamma
        )
    diffused = np.asarray(diffusion.diffusion_scores(graph, seeds, alpha=alpha))
    return ranks_of(diffused + 1e-6 * scores)


@functools.cache
def _jitted_rerank(
    shortlist_size: int, count_distinct: bool, max_correspondences: int, min_inliers: int
):
    return jax.jit(
        functools.partial(
            rerank_shortlist,
            shortlist_size=shortlist_size,
            min_inliers=min_inliers,
            max_correspondences=max_correspondences,
            count_distinct=count_distinct,
        )
    )


def dsm_rerank(
    scores: np.ndarray,
    query_features: LocalFeatures,
    database_features: LocalFeatures,
    *,
    exclude: np.ndarray | None = None,
    count_distinct: bool = False,
    error_threshold: float = 64.0,
    max_correspondences: int = 1024,
    shortlist_size: int | None = None,
    min_inliers: int = MIN_INLIERS,
) -> tuple[Reranking, np.ndarray]:
    """Verifies each query's shortlist with DSM and re-orders it by inliers.

    One query per device call (the shortlist is vmapped inside), so memory stays bounded.

    Args:
      scores: (Q, N) global similarities.
      query_features: Stacked local features of the queries (leading axis Q).
      database_features: Stacked local features of the database (leading axis N).
      exclude: (Q,) database index of each query itself (leave-one-out) or None: that
        image is put last in the global ranking and left out of the shortlist.
      count_distinct: Count each feature at most once among the inliers.
      error_threshold: Inlier distance in image pixels (2 cells of the feature stride).
      max_correspondences: Tentative correspondences per pair.
      shortlist_size: Images verified per query (default: the whole database).
      min_inliers: Fewer inliers than this count as unverified.

    Returns:
      The :class:`Reranking` and the (Q, N) inlier count of every verified pair (database
      order; -1 where not verified).
    """
    scores = np.array(scores, np.float32)
    num_queries, num_database = scores.shape
    if exclude is not None:
        scores[np.arange(num_queries), exclude] = -np.inf
    global_ranks = ranks_of(scores).astype(np.int32)
    if shortlist_size is None:
        shortlist_size = num_database - (exclude is not None)
    shortlist_size = min(shortlist_size, num_database - (exclude is not None))
    rerank = _jitted_rerank(shortlist_size, count_distinct, max_correspondences, min_inliers)
    finite_scores = np.where(np.isfinite(scores), scores, -2.0)
    ranks, inliers_sorted = [], []
    for q in range(num_queries):
        one = jax.tree.map(lambda x, q=q: x[q : q + 1], query_features)
        result = rerank(
            global_ranks[q : q + 1],
            finite_scores[q : q + 1],
            one,
            database_features,
            error_threshold=error_threshold,
        )
        ranks.append(np.asarray(result.ranks))
        inliers_sorted.append(np.asarray(result.shortlist_inliers))
    reranking = Reranking(np.concatenate(ranks), np.concatenate(inliers_sorted))
    pair_inliers = np.full((num_queries, num_database), -1, np.int64)
    rows = np.arange(num_queries)[:, None]
    pair_inliers[rows, reranking.ranks[:, :shortlist_size]] = reranking.shortlist_inliers
    return reranking, pair_inliers


def local_features(
    paths: Sequence[str], extractor: DSMFeatureExtractor, *, max_side: int = 512
) -> LocalFeatures:
    """Stacked DSM local features of image files (host MSER per image)."""
    return stack_local_features(
        [extractor(extractor.load(path, max_side=max_side)) for path in paths]
    )


def rerank_split(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    *,
    settings: RerankSettings = RerankSettings(),
    query_paths: Sequence[str] = (),
    database_paths: Sequence[str] = (),
    dsm_extractor: DSMFeatureExtractor | None = None,
) -> np.ndarray:
    """(Q, N) ranks of one re-ranking method for queries that are not in the database.

    ``dsm`` and ``dsm+diffusion`` need the image paths and ``dsm_extractor`` (the model
    whose global descriptors are re-ranked, so that a fine-tuned network is verified with
    its own activations).
    """
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking {method!r}; choose from {', '.join(METHODS)}.")
    scores = np.asarray(similarity.cosine_similarities(queries, database))
    if method == "none":
        return ranks_of(scores)
    if method in ("aqe", "alpha-qe", "dba+alpha-qe"):
        return query_expansion_ranks(
            method, queries, database, k=settings.qe_k, alpha=settings.qe_alpha
        )
    diffusion_kwargs = dict(
        graph_k=settings.graph_k,
        num_seeds=settings.num_seeds,
        alpha=settings.diffusion_alpha,
        gamma=settings.gamma,
    )
    if method == "diffusion":
        return diffusion_ranks(queries, database, **diffusion_kwargs)
    if len(query_paths) != len(queries) or len(database_paths) != len(database):
        raise ValueError("DSM re-ranking needs the query and database image paths.")
    if dsm_extractor is None:
        raise ValueError("DSM re-ranking needs a DSMFeatureExtractor (dsm_extractor).")
    reranking, _ = dsm_rerank(
        scores,
        local_features(query_paths, dsm_extractor, max_side=settings.dsm_max_side),
        local_features(database_paths, dsm_extractor, max_side=settings.dsm_max_side),
        error_threshold=settings.dsm_threshold_cells * dsm_extractor.feature_stride,
        count_distinct=settings.dsm_count_distinct,
        max_correspondences=settings.dsm_max_correspondences,
        shortlist_size=settings.dsm_shortlist,
        min_inliers=settings.dsm_min_inliers,
    )
    if method == "dsm":
        return np.asarray(reranking.ranks)
    seeds = dsm_diffusion_seeds(
        reranking,
        num_database=len(database),
        num_seeds=settings.num_seeds,
        min_inliers=settings.dsm_min_inliers,
    )
    return diffusion_ranks(queries, database, seeds=np.asarray(seeds), **diffusion_kwargs)
