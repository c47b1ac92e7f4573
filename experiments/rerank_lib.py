"""Re-ranking a global ranking: query expansion, diffusion and DSM spatial verification.

Used by ``python -m experiments.evaluate --rerank METHOD`` and the re-ranking benchmarks.
Every function takes query and database descriptors (L2-normalised rows) and returns a
full ``(Q, N)`` ranking, best first; DSM also takes each image's local features.

Two protocols:
  * :func:`rerank_split`: the queries are not in the database (the dataset's own queries).
  * :func:`rerank_leave_one_out`: every image queries all the others, so each query is
    itself a database image. The query is a database image like any other for what is
    built offline over the whole database -- DBA's augmented rows and the diffusion graph
    include it, as they would when a user queries with an indexed image -- and is kept out
    of everything built for that query: its own row is never one of its QE neighbours, a
    diffusion seed or on its DSM shortlist, and is ranked last (``exclude`` in the
    functions below). So ``none``, ``aqe``, ``alpha-qe`` and ``dsm`` rank the others
    exactly as :func:`rerank_split` ranks a query against the database without its row;
    ``dba+alpha-qe``, ``diffusion`` and ``dsm+diffusion`` differ from that by the query's
    row in DBA and the graph (slightly optimistic for a new query: its true matches may
    have been augmented with, or linked through, the query itself).

Every parameter is in :class:`RerankSettings`, which evaluation records in its JSON.
Defaults are for small sets like ../shared/data (tens of images, 1-12 per scene): QE
k = 2, alpha = 3; diffusion on a k = 5 mutual graph seeded by the query's nearest image
with alpha 0.9 (benchmarks/diffusion_small_set_sweep.py shows why the paper's k = 50, 10
seeds and alpha 0.99 fail there). For ROxford-sized sets use the paper's values.
``cam-regions`` (:mod:`jaxretrieval.cam_regions`, Jimenez et al. BMVC17) re-scores the
top ``cam_shortlist`` images by their best CAM region and expands the query with the best
regions of the top ``cam_expansion``; its defaults are the paper's R = 100, QE = 10. It
needs the images and a :class:`~jaxretrieval.cam_regions.CAMRegionExtractor` of the model
whose global descriptors are re-ranked (regions live in their space).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxretrieval import cam_regions, diffusion, query_expansion, similarity
from jaxretrieval.data import images as image_io
from jaxretrieval.extraction import Box
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    DSMSettings,
    LocalFeatures,
    Reranking,
    dsm_diffusion_seeds,
    rerank_shortlist,
    stack_local_features,
)

METHODS = (
    "none", "aqe", "alpha-qe", "dba+alpha-qe", "diffusion", "dsm", "dsm+diffusion", "cam-regions"
)  # fmt: skip
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
      dsm_separate_scales: Verify every query scale against every database scale and
        keep the best pair (the authors' code) instead of one merged feature set.
      dsm_num_seeds: Seeds of DSM-seeded diffusion (None: ``num_seeds``).
      dsm_seed_candidates: Seeds are chosen among this many re-ranked images (None: the
        verified shortlist).
      dsm_seeds_weighted_by_similarity: Seed weights are inliers/max times the global
        similarity (the authors' ``y = y1 .* sim``) instead of inliers alone.
      cam_shortlist: Images re-scored by their best CAM region per query (the paper's R).
      cam_expansion: Best regions of the top re-ranked images added to the query (QE);
        0 keeps the region order.
      cam_thresholds: CAM binarisation thresholds, fractions of each map's maximum.
      cam_box_classes: Top classes whose CAMs propose boxes.
      cam_max_side: Longer image side for the regions; None uses the model's.
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
    dsm_separate_scales: bool = False
    dsm_num_seeds: int | None = None
    dsm_seed_candidates: int | None = None
    dsm_seeds_weighted_by_similarity: bool = False
    cam_shortlist: int = 100
    cam_expansion: int = 10
    cam_thresholds: tuple[float, ...] = cam_regions.DEFAULT_THRESHOLDS
    cam_box_classes: int = 3
    cam_max_side: int | None = None

    def diffusion_options(self) -> dict:
        """Keyword arguments of :func:`diffusion_ranks` but its data and ``exclude``."""
        return dict(
            graph_k=self.graph_k,
            num_seeds=self.num_seeds,
            alpha=self.diffusion_alpha,
            gamma=self.gamma,
        )

    def with_dsm(self, dsm: DSMSettings) -> "RerankSettings":
        """These settings with the ``dsm_*`` re-ranking choices of ``dsm``.

        The choices of its features (scales, MSER, per-role selection) belong to the
        :class:`~jaxretrieval.spatial_verification.DSMFeatureExtractor`; its RANSAC scale
        limit and refinement rounds are ``rerank_shortlist``'s defaults.
        """
        return dataclasses.replace(
            self,
            dsm_max_side=dsm.max_side,
            dsm_threshold_cells=dsm.threshold_cells,
            dsm_min_inliers=dsm.min_inliers,
            dsm_shortlist=dsm.shortlist_size,
            dsm_max_correspondences=dsm.max_correspondences,
            dsm_separate_scales=dsm.separate_scales,
            dsm_num_seeds=dsm.num_seeds,
            dsm_seed_candidates=dsm.seed_candidates,
            dsm_seeds_weighted_by_similarity=dsm.seeds_weighted_by_similarity,
        )


def dsm_published_settings() -> RerankSettings:
    """The re-ranking parameters of the DSM authors' code (osimeoni/DSM, test_dsm.m).

    DSM and DSM+D are :meth:`DSMSettings.published
    <jaxretrieval.spatial_verification.DSMSettings.published>` (1024 px, threshold 2
    cells, top 100 verified and stably sorted by inliers with no minimum, at most 512
    correspondences per scale pair, scale pairs verified apart; seeds among the top 10
    re-ranked images, weighted by inliers/max times the global similarity, the first 4
    kept). Diffusion (run_diffusion.m): graph k = 50, 5 seeds for plain diffusion, alpha
    0.99, gamma 3.
    """
    diffusion = RerankSettings(graph_k=50, num_seeds=5, diffusion_alpha=0.99, gamma=3.0)
    return diffusion.with_dsm(DSMSettings.published())


def ranks_of(scores: np.ndarray) -> np.ndarray:
    """Best-first ranking of each row of a (Q, N) score matrix (stable: ties by index)."""
    return np.argsort(-scores, axis=1, kind="stable")


def _check_exclude(
    exclude: np.ndarray | None, num_queries: int, num_database: int
) -> np.ndarray | None:
    """``exclude`` as a (Q,) int array of valid database indices, or None."""
    if exclude is None:
        return None
    exclude = np.asarray(exclude)
    if exclude.shape != (num_queries,) or not np.issubdtype(exclude.dtype, np.integer):
        raise ValueError(
            f"exclude must hold one database index per query, shape ({num_queries},), "
            f"found {exclude.dtype} {exclude.shape}."
        )
    if num_database < 2:
        raise ValueError(f"exclude needs a database of at least 2 images, found {num_database}.")
    if exclude.size and (exclude.min() < 0 or exclude.max() >= num_database):
        raise ValueError(f"exclude must index the {num_database} database rows, found {exclude}.")
    return exclude


def _without_excluded(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """(Q, N) float32 scores with each query's excluded row at -inf (ranked last)."""
    scores = np.array(scores, np.float32)
    if exclude is not None:
        scores[np.arange(len(scores)), exclude] = -np.inf
    return scores


def global_shortlist(
    scores: np.ndarray, exclude: np.ndarray | None, shortlist_size: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """What a shortlist re-ranking starts from: the global order and the shortlist size.

    Args:
      scores: (Q, N) global similarities.
      exclude: (Q,) database index of each query itself (leave-one-out), or None.
      shortlist_size: Images verified per query; None: every image but the excluded one.

    Returns:
      ``(global_ranks, finite_scores, size)``: the (Q, N) int32 ranking with each excluded
      image last, the (Q, N) float32 similarities with the excluded ones at -2 (finite,
      for ordering), and the shortlist size clipped to the images that can be on it.
    """
    num_queries, num_database = np.shape(scores)
    exclude = _check_exclude(exclude, num_queries, num_database)
    scores = _without_excluded(scores, exclude)
    global_ranks = ranks_of(scores).astype(np.int32)
    candidates = num_database - (exclude is not None)
    size = candidates if shortlist_size is None else min(shortlist_size, candidates)
    return global_ranks, np.where(np.isfinite(scores), scores, -2.0), size


def pair_counts(ranks: np.ndarray, counts: np.ndarray, num_database: int) -> np.ndarray:
    """(Q, N) counts in database order from counts of ``ranks[:, :L]``; -1 where not verified."""
    out = np.full((len(ranks), num_database), -1, np.int64)
    rows = np.arange(len(ranks))[:, None]
    out[rows, ranks[:, : counts.shape[1]]] = counts
    return out


def _stacked(results: Sequence[Reranking], num_database: int) -> tuple[Reranking, np.ndarray]:
    """One-query re-rankings as one :class:`Reranking`, and their (Q, N) pair inliers."""
    reranking = Reranking(
        np.concatenate([np.asarray(r.ranks) for r in results]),
        np.concatenate([np.asarray(r.shortlist_inliers) for r in results]),
    )
    return reranking, pair_counts(reranking.ranks, reranking.shortlist_inliers, num_database)


@functools.cache
def _jitted_expansion(average: bool, k: int):
    """AQE (``average``) or alpha-QE as ``(queries, database, alpha) -> expanded``."""
    if average:
        return jax.jit(
            lambda queries, database, alpha: query_expansion.average_query_expansion(
                queries, database, k=k
            )
        )
    return jax.jit(
        lambda queries, database, alpha: query_expansion.alpha_query_expansion(
            queries, database, k=k, alpha=alpha
        )
    )


def query_expansion_ranks(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    *,
    k: int = 2,
    alpha: float = 3.0,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Ranks after AQE, alpha-QE or DBA + alpha-QE.

    Args:
      method: ``"aqe"``, ``"alpha-qe"`` or ``"dba+alpha-qe"``.
      queries: (Q, D) query descriptors.
      database: (N, D) database descriptors.
      k: Neighbours averaged by QE (and DBA).
      alpha: Exponent of the alpha-QE / alpha-DBA weights.
      exclude: (Q,) database index of each query's own row (leave-one-out), or None. That
        row is never one of the query's QE neighbours and is ranked last; DBA still runs
        over the whole database (see the module docstring). Each query is then expanded
        on its own, against the database without its row.

    Returns:
      (Q, N) database indices, best first.
    """
    if method not in ("aqe", "alpha-qe", "dba+alpha-qe"):
        raise ValueError(f"not a query-expansion method: {method!r}")
    exclude = _check_exclude(exclude, len(queries), len(database))
    if method == "dba+alpha-qe":
        database = np.asarray(
            query_expansion.database_side_augmentation(database, k=k, alpha=alpha)
        )
    expand = _jitted_expansion(method == "aqe", k)
    if exclude is None:
        expanded = np.asarray(expand(queries, database, alpha))
    else:
        expanded = np.concatenate(
            [
                np.asarray(
                    expand(queries[q : q + 1], np.delete(database, exclude[q], axis=0), alpha)
                )
                for q in range(len(queries))
            ]
        )  # (Q, D)
    scores = np.asarray(similarity.cosine_similarities(expanded, database))
    return ranks_of(_without_excluded(scores, exclude))


def diffusion_ranks(
    queries: np.ndarray,
    database: np.ndarray,
    *,
    graph_k: int = 5,
    num_seeds: int = 1,
    alpha: float = 0.9,
    gamma: float = 3.0,
    seeds: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Ranks by diffusion on the database's mutual kNN graph (Iscen et al. CVPR17).

    Seeds are the query's ``num_seeds`` nearest database images (weights s^gamma), or a
    caller-given (Q, N) seed matrix (DSM's verified images). Items the diffusion does not
    reach keep their cosine order behind the reached ones.

    Args:
      queries: (Q, D) query descriptors.
      database: (N, D) database descriptors; the graph is built over all of them.
      graph_k: Neighbours of the graph (capped at N - 1).
      num_seeds: Seeds per query when ``seeds`` is None (capped at the candidates).
      alpha: Diffusion's alpha.
      gamma: Affinity exponent of the graph and the seed weights.
      seeds: Optional (Q, N) seed weights (must be zero at excluded rows).
      exclude: (Q,) database index of each query's own row (leave-one-out), or None: it
        is never a seed and is ranked last, but stays a node of the graph.

    Returns:
      (Q, N) database indices, best first.
    """
    exclude = _check_exclude(exclude, len(queries), len(database))
    scores = _without_excluded(similarity.cosine_similarities(queries, database), exclude)
    graph = diffusion.normalize_affinity(
        diffusion.knn_affinity(database, num_neighbors=min(graph_k, len(database) - 1), gamma=gamma)
    )
    if seeds is None and exclude is None:
        seeds = diffusion.query_seeds(
            queries, database, num_seeds=min(num_seeds, len(database)), gamma=gamma
        )
    elif seeds is None:
        nearest = ranks_of(scores)[:, : min(num_seeds, len(database) - 1)]  # (Q, K)
        seeds = diffusion.seeds_from_neighbors(
            np.take_along_axis(scores, nearest, axis=1), nearest, gamma=gamma
        )
    diffused = np.asarray(diffusion.diffusion_scores(graph, seeds, alpha=alpha))
    return ranks_of(diffused + 1e-6 * scores)  # the excluded row: -inf, last


@functools.cache
def _jitted_rerank(
    shortlist_size: int,
    count_distinct: bool,
    max_correspondences: int,
    min_inliers: int,
    num_scales: int | None,
):
    return jax.jit(
        functools.partial(
            rerank_shortlist,
            shortlist_size=shortlist_size,
            min_inliers=min_inliers,
            max_correspondences=max_correspondences,
            count_distinct=count_distinct,
            num_scales=num_scales,
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
    num_scales: int | None = None,
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
      num_scales: Verify each pair of scales separately and keep the best (the features'
        ``scale_ids``); None verifies the merged scales once.

    Returns:
      The :class:`Reranking` and the (Q, N) inlier count of every verified pair (database
      order; -1 where not verified).
    """
    global_ranks, finite_scores, size = global_shortlist(scores, exclude, shortlist_size)
    rerank = _jitted_rerank(size, count_distinct, max_correspondences, min_inliers, num_scales)
    results = [
        rerank(
            global_ranks[q : q + 1],
            finite_scores[q : q + 1],
            jax.tree.map(lambda x, q=q: x[q : q + 1], query_features),
            database_features,
            error_threshold=error_threshold,
        )
        for q in range(len(global_ranks))
    ]
    return _stacked(results, global_ranks.shape[1])


def dsm_seeds(
    reranking: Reranking, queries: np.ndarray, database: np.ndarray, settings: RerankSettings
) -> np.ndarray:
    """(Q, N) seeds of DSM-seeded diffusion from a DSM re-ranking, with the settings' values.

    Its ``dsm_num_seeds`` (or ``num_seeds``) best verified images, chosen among the first
    ``dsm_seed_candidates``, weighted by inliers (times the global similarity when
    ``dsm_seeds_weighted_by_similarity``); see
    :func:`~jaxretrieval.spatial_verification.dsm_diffusion_seeds`.
    """
    seeds = dsm_diffusion_seeds(
        reranking,
        num_database=len(database),
        num_seeds=settings.dsm_num_seeds or settings.num_seeds,
        min_inliers=settings.dsm_min_inliers,
        num_candidates=settings.dsm_seed_candidates,
        global_scores=(
            np.asarray(similarity.cosine_similarities(queries, database))
            if settings.dsm_seeds_weighted_by_similarity
            else None
        ),
    )
    return np.asarray(seeds)


def local_features(
    paths: Sequence[str],
    extractor: DSMFeatureExtractor,
    *,
    max_side: int = 512,
    boxes: Sequence[Box | None] | None = None,
    as_query: bool = False,
) -> LocalFeatures:
    """Stacked DSM local features of image files (host MSER per image).

    Args:
      paths: Image files.
      extractor: The DSM feature extractor.
      max_side: Longer side (pixels) the images are shrunk to (never enlarged).
      boxes: Optional crop (x1, y1, x2, y2) per image, applied before resizing, as for
        the global descriptors of cropped queries (revisitop); None entries are whole
        images.
      as_query: Select features as for query images (the published setting selects
        queries and database images differently; ours alike).
    """
    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
    images = []
    for path, box in zip(paths, boxes or [None] * len(paths), strict=True):
        if box is None:
            images.append(extractor.load(path, max_side=max_side))
        else:
            (image,) = image_io.load_scaled(path, max_side=max_side, box=box, upscale=False)
            extractor.check_size(image, name=f"{path} cropped to {tuple(box)}")
            images.append(image)
    return stack_local_features([extractor(image, as_query=as_query) for image in images])


def cam_region_descriptors(
    paths: Sequence[str],
    extractor: cam_regions.CAMRegionExtractor,
    settings: RerankSettings = RerankSettings(),
) -> cam_regions.RegionDescriptors:
    """CAM region proposals and descriptors of image files with the settings' parameters."""
    return extractor(
        paths,
        max_side=settings.cam_max_side,
        thresholds=settings.cam_thresholds,
        num_box_classes=settings.cam_box_classes,
    )


def _check_method(method: str, *, has_paths: bool, dsm_extractor, cam_extractor=None) -> None:
    """Unknown methods, and DSM without its images or extractor, fail before any work."""
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking {method!r}; choose from {', '.join(METHODS)}.")
    if method == "cam-regions" and not has_paths:
        raise ValueError("CAM region re-ranking needs the database image paths.")
    if method == "cam-regions" and cam_extractor is None:
        raise ValueError("CAM region re-ranking needs a CAMRegionExtractor (cam_extractor).")
    if method not in ("dsm", "dsm+diffusion"):
        return
    if not has_paths:
        raise ValueError("DSM re-ranking needs the query and database image paths.")
    if dsm_extractor is None:
        raise ValueError("DSM re-ranking needs a DSMFeatureExtractor (dsm_extractor).")


def _rerank(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    *,
    settings: RerankSettings,
    exclude: np.ndarray | None,
    features: Callable[[], tuple[LocalFeatures, LocalFeatures]],
    feature_stride: int | None,
    regions: Callable[[], cam_regions.RegionDescriptors] | None = None,
    num_scales: int | None = None,
) -> np.ndarray:
    """One method for one protocol.

    ``features()`` gives the (query, database) DSM features, ``regions()`` the database's
    CAM regions.
    """
    if method == "cam-regions":
        return cam_regions.rerank_with_regions(
            queries,
            database,
            regions(),
            shortlist_size=settings.cam_shortlist,
            num_expansion=settings.cam_expansion,
            exclude=exclude,
        )
    if method == "none":
        scores = similarity.cosine_similarities(queries, database)
        return ranks_of(_without_excluded(scores, exclude))
    if method in ("aqe", "alpha-qe", "dba+alpha-qe"):
        return query_expansion_ranks(
            method, queries, database, k=settings.qe_k, alpha=settings.qe_alpha, exclude=exclude
        )
    diffusion_kwargs = dict(settings.diffusion_options(), exclude=exclude)
    if method == "diffusion":
        return diffusion_ranks(queries, database, **diffusion_kwargs)
    query_features, database_features = features()
    reranking, _ = dsm_rerank(
        np.asarray(similarity.cosine_similarities(queries, database)),
        query_features,
        database_features,
        exclude=exclude,
        error_threshold=settings.dsm_threshold_cells * feature_stride,
        count_distinct=settings.dsm_count_distinct,
        max_correspondences=settings.dsm_max_correspondences,
        shortlist_size=settings.dsm_shortlist,
        min_inliers=settings.dsm_min_inliers,
        num_scales=num_scales if settings.dsm_separate_scales else None,
    )
    if method == "dsm":
        return np.asarray(reranking.ranks)
    seeds = dsm_seeds(reranking, queries, database, settings)
    return diffusion_ranks(queries, database, seeds=seeds, **diffusion_kwargs)


def rerank_split(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    *,
    settings: RerankSettings = RerankSettings(),
    query_paths: Sequence[str] = (),
    database_paths: Sequence[str] = (),
    query_boxes: Sequence[Box | None] | None = None,
    dsm_extractor: DSMFeatureExtractor | None = None,
    cam_extractor: cam_regions.CAMRegionExtractor | None = None,
) -> np.ndarray:
    """(Q, N) ranks of one re-ranking method for queries that are not in the database.

    ``dsm`` and ``dsm+diffusion`` need the image paths and ``dsm_extractor`` (the model
    whose global descriptors are re-ranked, so that a fine-tuned network is verified with
    its own activations). ``query_boxes`` crops the queries' DSM features as their global
    descriptors are cropped (revisitop queries); None uses the whole images.
    ``cam-regions`` needs the database paths and ``cam_extractor`` (of the same model).
    """
    has_paths = (len(query_paths), len(database_paths)) == (len(queries), len(database))
    if method == "cam-regions":
        has_paths = len(database_paths) == len(database)
    _check_method(
        method, has_paths=has_paths, dsm_extractor=dsm_extractor, cam_extractor=cam_extractor
    )

    def features():
        max_side = settings.dsm_max_side
        queries_features = local_features(
            query_paths, dsm_extractor, max_side=max_side, boxes=query_boxes, as_query=True
        )
        return queries_features, local_features(database_paths, dsm_extractor, max_side=max_side)

    return _rerank(
        method,
        queries,
        database,
        settings=settings,
        exclude=None,
        features=features,
        feature_stride=getattr(dsm_extractor, "feature_stride", None),
        regions=lambda: cam_region_descriptors(database_paths, cam_extractor, settings),
        num_scales=len(dsm_extractor.scales) if dsm_extractor is not None else None,
    )


def rerank_leave_one_out(
    method: str,
    descriptors: np.ndarray,
    *,
    settings: RerankSettings = RerankSettings(),
    paths: Sequence[str] = (),
    dsm_extractor: DSMFeatureExtractor | None = None,
    cam_extractor: cam_regions.CAMRegionExtractor | None = None,
) -> np.ndarray:
    """(N, N) ranks of one re-ranking method when every image queries all the others.

    Row i ranks all N images for image i, its own index last (score it with i as junk,
    as :func:`jaxretrieval.data.datasets.leave_one_out` does). The query is a database
    image: DBA and the diffusion graph are built over all N images, and the query's own
    row is excluded from its QE neighbours, its diffusion seeds and its DSM shortlist
    (the module docstring says what that means for each method). DSM features are
    extracted once per image and serve as both query and database features.

    Args:
      method: One of :data:`METHODS`.
      descriptors: (N, D) L2-normalised descriptors of every image.
      settings: Every parameter of the methods.
      paths: The N image files (``dsm`` and ``dsm+diffusion`` only).
      dsm_extractor: Local features for ``dsm`` and ``dsm+diffusion``.
      cam_extractor: CAM regions for ``cam-regions`` (the query is never in its own
        shortlist or expansion).

    Returns:
      (N, N) indices into ``descriptors``, best first.
    """
    _check_method(
        method,
        has_paths=len(paths) == len(descriptors),
        dsm_extractor=dsm_extractor,
        cam_extractor=cam_extractor,
    )

    def features():
        roles = [
            dsm_extractor.query_and_database_features(
                dsm_extractor.load(path, max_side=settings.dsm_max_side)
            )
            for path in paths
        ]
        return (
            stack_local_features([query for query, _ in roles]),
            stack_local_features([database for _, database in roles]),
        )

    return _rerank(
        method,
        descriptors,
        descriptors,
        settings=settings,
        exclude=np.arange(len(descriptors)),
        features=features,
        feature_stride=getattr(dsm_extractor, "feature_stride", None),
        regions=lambda: cam_region_descriptors(paths, cam_extractor, settings),
        num_scales=len(dsm_extractor.scales) if dsm_extractor is not None else None,
    )


# ----------------------------------------------------------------------- DELF (issue 12)
# DELF re-ranking (Noh et al. ICCV 2017): each query's global shortlist verified with
# DELF keypoints, mutual nearest neighbours and RANSAC on random point triples
# (jaxretrieval.local_features), and the seed's global + DELF + QE row. Separate from
# METHODS because its local features come from a DELF model, not from the global one:
# pass a jaxretrieval.local_features.DelfExtractor.

DELF_METHODS = ("delf", "delf+qe")


@dataclasses.dataclass(frozen=True)
class DelfRerankSettings:
    """Every parameter of DELF re-ranking (recorded with the results).

    Attributes:
      max_distance: Largest descriptor distance of a putative match (the authors' 0.8).
      max_ratio: Lowe's ratio bound on putative matches, or None.
      error_threshold: RANSAC inlier distance in image pixels (the authors' 20).
      num_hypotheses: RANSAC triples per pair (the authors' 1000 trials).
      refinement_steps: Least-squares local-optimisation rounds.
      seed: Seed of the RANSAC key (query q uses ``fold_in(key(seed), q)``).
      shortlist: Images verified per query; None verifies the whole database.
      min_inliers: Fewer inliers than this count as unverified.
      qe_k: Verified images averaged into the query by ``delf+qe``.
      qe_alpha: Their alpha-QE exponent.
    """

    max_distance: float | None = 0.8
    max_ratio: float | None = None
    error_threshold: float = 20.0
    num_hypotheses: int = 1000
    refinement_steps: int = 3
    seed: int = 0
    shortlist: int | None = 100
    min_inliers: int = MIN_INLIERS
    qe_k: int = 2
    qe_alpha: float = 3.0

    def verification(self):
        """The :class:`jaxretrieval.local_features.VerificationSettings` of each pair."""
        from jaxretrieval.local_features import VerificationSettings

        return VerificationSettings(
            max_distance=self.max_distance,
            max_ratio=self.max_ratio,
            error_threshold=self.error_threshold,
            num_hypotheses=self.num_hypotheses,
            refinement_steps=self.refinement_steps,
        )


@functools.cache
def _jitted_delf_rerank(shortlist_size: int, min_inliers: int, verification):
    from jaxretrieval import local_features

    kwargs = verification.as_kwargs()
    return jax.jit(
        lambda ranks, scores, q, d, key: local_features.rerank_shortlist(
            ranks, scores, q, d, key=key, shortlist_size=shortlist_size,
            min_inliers=min_inliers, **kwargs,
        )
    )  # fmt: skip


def delf_rerank(
    scores: np.ndarray,
    query_features,
    database_features,
    *,
    settings: DelfRerankSettings = DelfRerankSettings(),
    exclude: np.ndarray | None = None,
) -> tuple[Reranking, np.ndarray]:
    """Re-orders each query's global shortlist by DELF inliers (one query per call).

    Args:
      scores: (Q, N) global similarities.
      query_features: Stacked :class:`~jaxretrieval.local_features.DelfFeatures` of the
        queries (leading axis Q).
      database_features: Stacked DELF features of the database (leading axis N).
      settings: Matching, RANSAC, shortlist and verification threshold.
      exclude: (Q,) database index of each query itself (leave-one-out): ranked last and
        kept off its shortlist; or None.

    Returns:
      The :class:`Reranking` and the (Q, N) inlier count of every verified pair
      (database order; -1 where not verified).
    """
    global_ranks, finite_scores, size = global_shortlist(scores, exclude, settings.shortlist)
    rerank = _jitted_delf_rerank(size, settings.min_inliers, settings.verification())
    key = jax.random.key(settings.seed)
    results = [
        rerank(
            global_ranks[q : q + 1],
            finite_scores[q : q + 1],
            jax.tree.map(lambda x, q=q: np.asarray(x)[q : q + 1], query_features),
            database_features,
            jax.random.fold_in(key, q),
        )
        for q in range(len(global_ranks))
    ]
    return _stacked(results, global_ranks.shape[1])


def delf_query_expansion_ranks(
    queries: np.ndarray,
    database: np.ndarray,
    reranking: Reranking,
    *,
    settings: DelfRerankSettings = DelfRerankSettings(),
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Global + DELF + QE: the verified images first, the rest by a verified-QE query.

    The query's global descriptor is expanded (alpha-QE) with its ``qe_k`` best
    DELF-verified images (at least ``min_inliers`` inliers) only, so QE never averages in
    a false positive of the global search; a query without a verified image keeps its
    descriptor. The ranking lists the verified images by decreasing inliers (their DELF
    order), then every other image by similarity to the expanded query.

    Returns:
      (Q, N) database indices, best first (an excluded image last).
    """
    queries = np.asarray(queries, np.float32)
    database = np.asarray(database, np.float32)
    ranks = np.asarray(reranking.ranks)
    inliers = np.asarray(reranking.shortlist_inliers)
    size = inliers.shape[1]
    verified = inliers >= settings.min_inliers  # (Q, L); the verified ones come first
    expanded = queries.copy()
    for q in range(len(queries)):
        neighbours = ranks[q, :size][verified[q]][: settings.qe_k]
        if len(neighbours):
            expanded[q] = np.asarray(
                query_expansion.alpha_query_expansion(
                    queries[q : q + 1], database[neighbours], k=len(neighbours),
                    alpha=settings.qe_alpha,
                )
            )[0]  # fmt: skip
    scores = _without_excluded(similarity.cosine_similarities(expanded, database), exclude)
    out = np.empty_like(ranks)
    for q in range(len(queries)):
        top = ranks[q, :size][verified[q]]
        rest = ranks_of(scores[q : q + 1])[0]
        out[q] = np.concatenate([top, rest[~np.isin(rest, top)]])
    return out


def delf_ranks(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    query_features,
    database_features,
    *,
    settings: DelfRerankSettings = DelfRerankSettings(),
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """(Q, N) ranks of ``"delf"`` or ``"delf+qe"`` from features already extracted.

    Raises:
      ValueError: Another method.
    """
    if method not in DELF_METHODS:
        raise ValueError(f"unknown DELF re-ranking {method!r}; choose from {DELF_METHODS}.")
    scores = np.asarray(similarity.cosine_similarities(queries, database))
    reranking, _ = delf_rerank(
        scores, query_features, database_features, settings=settings, exclude=exclude
    )
    if method == "delf":
        return np.asarray(reranking.ranks)
    return delf_query_expansion_ranks(
        queries, database, reranking, settings=settings, exclude=exclude
    )


def delf_rerank_split(
    method: str,
    queries: np.ndarray,
    database: np.ndarray,
    *,
    delf_extractor,
    query_paths: Sequence[str],
    database_paths: Sequence[str],
    query_boxes: Sequence[Box | None] | None = None,
    settings: DelfRerankSettings = DelfRerankSettings(),
) -> np.ndarray:
    """:func:`rerank_split` for ``"delf"`` / ``"delf+qe"``: features of a DELF model.

    ``query_boxes`` crops the queries' DELF features as their global descriptors are
    cropped (revisitop queries).
    """
    query_features = delf_extractor.extract_files(query_paths, query_boxes)
    database_features = delf_extractor.extract_files(database_paths)
    return delf_ranks(
        method, queries, database, query_features, database_features, settings=settings
    )


def delf_rerank_leave_one_out(
    method: str,
    descriptors: np.ndarray,
    *,
    delf_extractor,
    paths: Sequence[str],
    settings: DelfRerankSettings = DelfRerankSettings(),
) -> np.ndarray:
    """:func:`rerank_leave_one_out` for ``"delf"`` / ``"delf+qe"``.

    Each image's DELF features are extracted once and serve as query and database
    features; the query is kept off its own shortlist and QE neighbours, and ranked last.
    """
    features = delf_extractor.extract_files(paths)
    return delf_ranks(
        method,
        descriptors,
        descriptors,
        features,
        features,
        settings=settings,
        exclude=np.arange(len(descriptors)),
    )
