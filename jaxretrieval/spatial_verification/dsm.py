"""DSM spatial verification of a shortlist and re-ranking by inlier counts, on the device.

:func:`verify_pair` verifies one image pair (tentative same-channel correspondences, then
:func:`~jaxretrieval.spatial_verification.ransac.ransac_affine`); :func:`verify_shortlist`
vmaps it over a shortlist; :func:`rerank_shortlist` verifies each query's global top-L and
re-orders it by inliers (by :func:`rerank_by_inliers`, which DELF re-ranking shares);
:func:`dsm_diffusion_seeds` turns the verified images into diffusion seeds. Nothing is
jitted inside: callers jit, with the shape arguments static.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float, Int, Scalar
from jaxretrieval.spatial_verification.activation_regions import LocalFeatures
from jaxretrieval.spatial_verification.correspondences import (
    Correspondences,
    check_local_features,
    tentative_correspondences,
)
from jaxretrieval.spatial_verification.ransac import VerificationResult, ransac_affine


def _verify_merged(
    features_a: LocalFeatures,
    features_b: LocalFeatures,
    *,
    max_correspondences: int,
    error_threshold: Scalar,
    max_scale_change: Scalar,
    refinement_steps: int,
    max_hypotheses: int | None,
) -> tuple[VerificationResult, Correspondences]:
    """Checked features of one pair, verified as one set each."""
    matches = tentative_correspondences(
        features_a, features_b, max_correspondences=max_correspondences
    )
    result = ransac_affine(
        features_a.means[matches.index_a],
        features_a.covariances[matches.index_a],
        features_b.means[matches.index_b],
        features_b.covariances[matches.index_b],
        matches.valid,
        error_threshold=error_threshold,
        max_scale_change=max_scale_change,
        refinement_steps=refinement_steps,
        max_hypotheses=max_hypotheses,
    )
    return result, matches


def _scale_ids(name: str, features: LocalFeatures, num_scales: int) -> Array:
    if features.scale_ids is not None:
        return features.scale_ids
    if num_scales > 1:
        raise ValueError(
            f"num_scales={num_scales} pairs features by their scale, but {name}.scale_ids "
            "is None; extract them with activation_local_features or pass num_scales=None."
        )
    return jnp.zeros(features.valid.shape, jnp.int32)


def verify_pair(
    features_a: LocalFeatures,
    features_b: LocalFeatures,
    *,
    max_correspondences: int = 512,
    error_threshold: Scalar = 64.0,
    max_scale_change: Scalar = 3.0,
    refinement_steps: int = 3,
    max_hypotheses: int | None = None,
    num_scales: int | None = None,
) -> tuple[VerificationResult, Correspondences]:
    """Verifies one image pair: same-channel correspondences, then single-ellipse RANSAC.

    With ``num_scales = S``, each of the S x S pairs (scale i of image a, scale j of
    image b) is verified on its own, with the features whose ``scale_ids`` are i and j,
    and the pair with most inliers is returned (ties: the lowest ``i * S + j``). This is
    DSM's ``ransac_fit.m`` + ``matching_dsm.m``: the image's score is the largest inlier
    count over scale pairs. The scale pairs are one ``jax.vmap`` (cost S² times one
    verification), so there is no Python loop on the device. Features with a scale id
    outside ``[0, S)`` take part in no pair.

    Args:
      features_a: Local features of image a (one image, leading axis M).
      features_b: Local features of image b.
      max_correspondences: P, tentative correspondences kept (static), per scale pair
        when ``num_scales`` is set; see
        :func:`~jaxretrieval.spatial_verification.correspondences.tentative_correspondences`.
      error_threshold: Inlier distance in image-b pixels (traced). DSM's 2 activation cells
        at stride 32 is 64 px, the default.
      max_scale_change: Largest accepted scale change of a hypothesis (DSM: 3).
      refinement_steps: Least-squares local-optimisation rounds (static).
      max_hypotheses: Hypotheses tried, from the strongest correspondences (static); None
        tries every correspondence (DSM).
      num_scales: S (static): verify scale pairs separately (DSM); None verifies all
        features of each image as one set, whatever their scale (ours). ``num_scales=1``
        equals None.

    Returns:
      ``(result, correspondences)``: the :class:`VerificationResult` (its ``inlier_mask``
      indexes the correspondences) and the (P,) correspondences themselves (indices into
      the full feature arrays), of the best scale pair when ``num_scales`` is set.

    Raises:
      ValueError: On malformed features, ``num_scales < 1``, or ``num_scales > 1`` with
        features that have no ``scale_ids``.

    References:
      Simeoni, Avrithis, Chum. Local features and visual words emerge in activations.
      CVPR 2019.
    """
    features_a = check_local_features("features_a", features_a)
    features_b = check_local_features("features_b", features_b)
    options = dict(
        max_correspondences=max_correspondences,
        error_threshold=error_threshold,
        max_scale_change=max_scale_change,
        refinement_steps=refinement_steps,
        max_hypotheses=max_hypotheses,
    )
    if num_scales is None:
        return _verify_merged(features_a, features_b, **options)
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1 or None, got {num_scales}.")
    ids_a = _scale_ids("features_a", features_a, num_scales)
    ids_b = _scale_ids("features_b", features_b, num_scales)

    def one_scale_pair(scale_a, scale_b):
        a = features_a._replace(valid=features_a.valid & (ids_a == scale_a))
        b = features_b._replace(valid=features_b.valid & (ids_b == scale_b))
        return _verify_merged(a, b, **options)

    pairs = jnp.arange(num_scales * num_scales, dtype=jnp.int32)  # (S * S,)
    results, matches = jax.vmap(one_scale_pair)(pairs // num_scales, pairs % num_scales)
    best = jnp.argmax(results.num_inliers)  # the first scale pair on ties
    return jax.tree.map(lambda x: x[best], (results, matches))


def distinct_inliers(
    result: VerificationResult,
    correspondences: Correspondences,
    *,
    num_features_a: int,
    num_features_b: int,
) -> Int[Array, "*batch"]:
    """Inlier count with each feature counted once: ``min(#distinct a, #distinct b)``.

    Same-channel correspondences are many-to-many, so one feature can take part in several
    inliers (e.g. two nearby features of one channel in image b). Counting the distinct
    features on each side, and taking the smaller, approximates a one-to-one count.

    Args:
      result: One pair's :class:`VerificationResult` (vmap for batches).
      correspondences: The correspondences it was computed from.
      num_features_a: M_a (static).
      num_features_b: M_b (static).

    Returns:
      The distinct-inlier count, int32.
    """
    mask = jnp.asarray(result.inlier_mask)
    used_a = jnp.zeros((num_features_a,), bool).at[correspondences.index_a].max(mask)
    used_b = jnp.zeros((num_features_b,), bool).at[correspondences.index_b].max(mask)
    return jnp.minimum(jnp.sum(used_a, dtype=jnp.int32), jnp.sum(used_b, dtype=jnp.int32))


def verify_shortlist(
    query_features: LocalFeatures, shortlist_features: LocalFeatures, **options
) -> tuple[VerificationResult, Correspondences]:
    """:func:`verify_pair` of one query against L images at once (``jax.vmap``).

    Args:
      query_features: One image's features, leading axis M.
      shortlist_features: Features with a leading L axis: ``means`` is (L, M, 2).
      **options: The keyword arguments of :func:`verify_pair` (correspondences, RANSAC,
        ``num_scales``), with its defaults.

    Returns:
      :func:`verify_pair`'s outputs with a leading L axis.

    Raises:
      ValueError: If ``shortlist_features`` has no leading axis.
    """
    validation.check_shape("shortlist_features.means", shortlist_features.means, "L M 2")

    def one(features_b):
        return verify_pair(query_features, features_b, **options)

    return jax.vmap(one)(shortlist_features)


class Reranking(NamedTuple):
    """Shortlist re-ranked by spatial verification.

    Attributes:
      ranks: ``(Q, N)`` database indices, best first: the re-ordered shortlist, then the
        rest of the global ranking unchanged.
      shortlist_inliers: ``(Q, L)`` inlier count of each re-ranked shortlist image
        (``shortlist_inliers[q, s]`` belongs to ``ranks[q, s]``).
    """

    ranks: Int[Array, "Q N"]
    shortlist_inliers: Int[Array, "Q L"]


def rerank_shortlist(
    global_ranks: Int[AnyArray, "Q N"],
    global_scores: Float[AnyArray, "Q N"],
    query_features: LocalFeatures,
    database_features: LocalFeatures,
    *,
    shortlist_size: int = 100,
    min_inliers: int = 5,
    count_distinct: bool = False,
    **options,
) -> Reranking:
    """Re-orders each query's global top-L by DSM inlier counts.

    The rule: within the top ``shortlist_size`` of the global ranking, images with at least
    ``min_inliers`` inliers ("verified") come first, by decreasing inlier count, ties broken
    by decreasing global similarity (then by global rank). Unverified images follow in
    their global order, and positions after the shortlist are unchanged. With
    ``min_inliers=0`` and ``num_scales`` set this is DSM's ``matching_dsm.m`` (sort the
    top 100 by their largest inlier count over scale pairs, stable in the global order).

    Args:
      global_ranks: Database indices of each query, best first (e.g. from
        :func:`jaxretrieval.similarity.chunked_top_k` or a full argsort).
      global_scores: ``global_scores[q, n]``: global similarity of query q and database
        image n, indexed by database id (not by rank).
      query_features: Features with a leading Q axis (``means`` (Q, M, 2)).
      database_features: Features with a leading N axis (``means`` (N, M, 2)).
      shortlist_size: L (static), clipped to the number of ranked images.
      min_inliers: Smallest inlier count that counts as verified (static or traced).
      count_distinct: Rank by :func:`distinct_inliers` (each feature counted once) instead
        of the number of inlier correspondences (static).
      **options: The keyword arguments of :func:`verify_pair` (correspondences, RANSAC,
        ``num_scales``), with its defaults.

    Returns:
      A :class:`Reranking`.

    Raises:
      ValueError: On inconsistent shapes or ``shortlist_size < 1``.

    References:
      Simeoni, Avrithis, Chum. Local features and visual words emerge in activations.
      CVPR 2019.
    """

    def count_inliers(query, shortlist_features, shortlist_ids, query_index):
        result, matches = verify_shortlist(query, shortlist_features, **options)
        if not count_distinct:
            return result.num_inliers
        num_a, num_b = jnp.shape(query.means)[0], jnp.shape(shortlist_features.means)[1]
        return jax.vmap(
            lambda r, m: distinct_inliers(r, m, num_features_a=num_a, num_features_b=num_b)
        )(result, matches)

    return rerank_by_inliers(
        global_ranks,
        global_scores,
        query_features,
        database_features,
        count_inliers,
        shortlist_size=shortlist_size,
        min_inliers=min_inliers,
    )


def rerank_by_inliers(
    global_ranks: Int[AnyArray, "Q N"],
    global_scores: Float[AnyArray, "Q N"],
    query_features: Any,
    database_features: Any,
    count_inliers: Callable[[Any, Any, Int[Array, " L"], Int[Array, ""]], Int[Array, " L"]],
    *,
    shortlist_size: int,
    min_inliers: int,
    points: str = "means",
) -> Reranking:
    """Verifies each query's global top-L with ``count_inliers`` and re-orders it by inliers.

    The re-ranking rule of every spatial verifier here, whatever its features (DSM's
    :func:`rerank_shortlist` and DELF's
    :func:`jaxretrieval.local_features.rerank_shortlist`): within the top
    ``shortlist_size`` of the global ranking, images with at least ``min_inliers``
    inliers come first by decreasing inliers, ties by decreasing global similarity (then
    by global rank); the others follow in global order; the rest of the ranking is
    unchanged.

    Args:
      global_ranks: Database indices of each query, best first.
      global_scores: ``global_scores[q, n]``: global similarity, indexed by database id.
      query_features: A features NamedTuple with a leading Q axis.
      database_features: The same kind of features with a leading N axis.
      count_inliers: ``count_inliers(query, shortlist, shortlist_ids, query_index)``: the
        (L,) inlier counts of one query's features against its L shortlisted images'
        (leading L axis), given their database ids and the query's index in this call;
        vmapped over the queries.
      shortlist_size: L (static), clipped to the number of ranked images.
      min_inliers: Smallest inlier count that counts as verified (static or traced).
      points: The features' field of (M, 2) point coordinates, used to check the shapes.

    Returns:
      A :class:`Reranking`.

    Raises:
      ValueError: On inconsistent shapes or ``shortlist_size < 1``.
    """
    global_ranks = validation.as_int_array("global_ranks", global_ranks, axes="Q N")
    global_scores = validation.as_float_array("global_scores", global_scores, axes="Q N")
    num_queries, num_ranked = global_ranks.shape
    if shortlist_size < 1:
        raise ValueError(f"shortlist_size must be >= 1, got {shortlist_size}.")
    num_database = validation.check_shape(
        f"database_features.{points}", getattr(database_features, points), "N M 2"
    )[0]
    num_query_features = validation.check_shape(
        f"query_features.{points}", getattr(query_features, points), "Q M 2"
    )[0]
    if num_query_features != num_queries:
        raise ValueError(
            f"query_features has {num_query_features} queries but global_ranks has {num_queries}."
        )
    if global_scores.shape != (num_queries, num_database):
        raise ValueError(
            f"global_scores must be (Q, N) = {(num_queries, num_database)}, "
            f"found {global_scores.shape}."
        )
    size = min(shortlist_size, num_ranked)
    shortlist = global_ranks[:, :size]  # (Q, L)
    candidates = jax.tree.map(lambda x: jnp.asarray(x)[shortlist], database_features)  # (Q, L, ...)
    inliers = jax.vmap(count_inliers)(
        query_features, candidates, shortlist, jnp.arange(num_queries)
    )  # (Q, L)
    return reorder_by_inliers(global_ranks, global_scores, inliers, min_inliers=min_inliers)


def reorder_by_inliers(
    global_ranks: Int[AnyArray, "Q N"],
    global_scores: Float[AnyArray, "Q N"],
    inliers: Int[AnyArray, "Q L"],
    *,
    min_inliers: int,
) -> Reranking:
    """The re-ranking rule of :func:`rerank_by_inliers`, given the shortlist's inliers.

    Args:
      global_ranks: Database indices of each query, best first.
      global_scores: ``global_scores[q, n]``: global similarity, indexed by database id.
      inliers: Inlier count of each image of the shortlist ``global_ranks[:, :L]``.
      min_inliers: Smallest inlier count that counts as verified (static or traced).

    Returns:
      A :class:`Reranking`.
    """
    size = jnp.shape(inliers)[1]
    shortlist = global_ranks[:, :size]  # (Q, L)
    verified = jnp.where(inliers >= min_inliers, inliers, 0)  # (Q, L)
    scores = jnp.take_along_axis(global_scores, shortlist, axis=1)  # (Q, L)
    # lexsort: the last key is primary. Stable, so full ties keep the global order.
    order = jax.vmap(lambda v, s: jnp.lexsort((-s, -v)))(verified, scores)  # (Q, L)
    reordered = jnp.take_along_axis(shortlist, order, axis=1)  # (Q, L)
    ranks = jnp.concatenate([reordered, global_ranks[:, size:]], axis=1)
    return Reranking(ranks=ranks, shortlist_inliers=jnp.take_along_axis(inliers, order, axis=1))


def dsm_diffusion_seeds(
    reranking: Reranking,
    *,
    num_database: int,
    num_seeds: int = 5,
    min_inliers: int = 5,
    num_candidates: int | None = None,
    global_scores: Float[AnyArray, "Q N"] | None = None,
) -> Float[Array, "Q N"]:
    """Diffusion seeds from the verified images: a plain (Q, N) weight vector per query.

    DSM starts diffusion from the spatially verified images instead of the raw query. The
    candidates of a query are the first ``num_candidates`` images of its re-ranked
    shortlist (the verified ones come first, by decreasing inliers), each weighted by its
    inlier count if it has at least ``min_inliers`` (else 0). With ``global_scores``, each
    weight is multiplied by the image's global similarity to the query (clipped at 0); if
    that leaves every weight 0, the inlier weights are used alone. The ``num_seeds``
    largest weights are kept (ties: the earlier candidate), and each row is normalised to
    sum 1. A query with no verified candidate falls back to its top-1 image (weight 1), so
    every row is a valid seed vector. The output is independent of the diffusion
    implementation (any ``diffusion_scores(graph, seeds)`` taking a (Q, N) seed matrix
    consumes it); diffusion is linear in the seeds, so the normalisation does not change
    a ranking.

    DSM+D as published (``evaluate.m`` and ``run_diffusion.m``): ``num_candidates=10``
    (``max_dsm_kq``), ``global_scores`` = the global similarities (``y = y1 .* sim``),
    ``num_seeds=4`` (``y(id(kq:end)) = 0`` with ``kq = 5`` keeps the 4 largest) and
    ``min_inliers=0``. Where the authors' code divides by a zero inlier maximum (no
    candidate with an inlier), this falls back to the top-1 image; the authors' code
    would keep negative similarities as negative seeds, this clips them to 0.

    Args:
      reranking: Output of :func:`rerank_shortlist`.
      num_database: N (static), the database size.
      num_seeds: Largest number of seeds per query (static).
      min_inliers: Smallest inlier count of a seed.
      num_candidates: Re-ranked images considered as seeds (static); None means
        ``num_seeds``.
      global_scores: Optional ``(Q, N)`` global similarities, indexed by database id,
        that multiply the inlier weights.

    Returns:
      ``(Q, N)`` non-negative seed weights, each row summing to 1.

    Raises:
      ValueError: If ``num_seeds < 1``, ``num_candidates < num_seeds``, or
        ``num_database`` or ``global_scores`` does not match the ranks.
    """
    ranks = jnp.asarray(reranking.ranks)
    inliers = jnp.asarray(reranking.shortlist_inliers)
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds}.")
    num_candidates = num_seeds if num_candidates is None else num_candidates
    if num_candidates < num_seeds:
        raise ValueError(
            f"num_candidates must be >= num_seeds = {num_seeds}, got {num_candidates}."
        )
    if ranks.shape[1] != num_database:
        raise ValueError(
            f"reranking.ranks has {ranks.shape[1]} columns but num_database is {num_database}."
        )
    num_queries, size = inliers.shape
    k = min(num_candidates, size)
    # The re-ranked shortlist starts with the verified images by decreasing inliers.
    seed_ids = ranks[:, :k]  # (Q, k)
    top_inliers = inliers[:, :k]  # (Q, k)
    weights = jnp.where(top_inliers >= min_inliers, top_inliers, 0).astype(jnp.float32)  # (Q, k)
    if global_scores is not None:
        global_scores = validation.as_float_array("global_scores", global_scores, axes="Q N")
        if global_scores.shape != (num_queries, num_database):
            raise ValueError(
                f"global_scores must be (Q, N) = {(num_queries, num_database)}, "
                f"found {global_scores.shape}."
            )
        similarity = jnp.take_along_axis(global_scores, seed_ids, axis=1)  # (Q, k)
        weighted = weights * jnp.maximum(similarity, 0.0).astype(jnp.float32)  # (Q, k)
        unweighted = jnp.sum(weighted, axis=1, keepdims=True) == 0  # (Q, 1)
        weights = jnp.where(unweighted, weights, weighted)
    if min(num_seeds, k) < k:
        _, best = jax.lax.top_k(weights, min(num_seeds, k))  # (Q, num_seeds), ties: lower
        best_rows = jnp.broadcast_to(jnp.arange(num_queries)[:, None], best.shape)
        keep = jnp.zeros(weights.shape, bool).at[best_rows, best].set(True)  # (Q, k)
        weights = jnp.where(keep, weights, 0.0)
    none = jnp.sum(weights, axis=1, keepdims=True) == 0  # (Q, 1)
    fallback = jnp.zeros_like(weights).at[:, 0].set(1.0)  # (Q, k): the top-1 image
    weights = jnp.where(none, fallback, weights)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    rows = jnp.broadcast_to(jnp.arange(num_queries)[:, None], seed_ids.shape)  # (Q, k)
    return jnp.zeros((num_queries, num_database), jnp.float32).at[rows, seed_ids].add(weights)
