"""Geometric verification of DELF matches: RANSAC on point triples, batched on the device.

DSM's RANSAC (:mod:`jaxretrieval.spatial_verification.ransac`) draws one hypothesis
per correspondence, since an ellipse pair fixes an affine map. A DELF keypoint is a
point, so an affine map needs a minimal sample of three correspondences: here ``Y``
triples are drawn at random with an explicit ``key`` (:func:`sample_point_triples`),
each solved in closed form (:func:`affine_from_point_triples`), and then everything
else is DSM's: the ``(Y, P)`` inlier count of all hypotheses at once and the
least-squares local optimisation of the best one, in the one function both use
(:func:`~jaxretrieval.spatial_verification.ransac.best_affine_hypothesis`). The score
of a pair is its inlier count.

Determinism: the result is a pure function of the inputs and the key (same key, same
result; jit equals eager). Batched verifiers derive each pair's key with
``jax.random.fold_in`` from the database index of the pair, so a pair's result does not
depend on what else is in the batch, and ``vmap`` equals a loop.

Coordinates are image pixels ``(x, y)``; transforms are ``(2, 3)`` matrices ``[A | t]``
mapping a point ``p`` of image a to ``A p + t`` in image b, as in ``ransac.py``.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int, Scalar
from jaxretrieval.local_features.features import DelfFeatures, check_delf_features
from jaxretrieval.local_features.matching import (
    DELF_MAX_DISTANCE,
    Correspondences,
    mutual_nearest_neighbors,
)
from jaxretrieval.spatial_verification.dsm import Reranking, rerank_by_inliers
from jaxretrieval.spatial_verification.ransac import VerificationResult, best_affine_hypothesis

__all__ = [
    "DELF_ERROR_THRESHOLD",
    "DELF_NUM_HYPOTHESES",
    "Reranking",
    "VerificationResult",
    "VerificationSettings",
    "affine_from_point_triples",
    "ransac_affine_points",
    "rerank_shortlist",
    "sample_point_triples",
    "verify_pair",
    "verify_shortlist",
]

DELF_ERROR_THRESHOLD = 20.0  # the authors' match_images.py residual_threshold (pixels)
DELF_NUM_HYPOTHESES = 1000  # ... and its max_trials


@dataclasses.dataclass(frozen=True)
class VerificationSettings:
    """Putative matching and RANSAC of a pair (the authors' values by default); hashable.

    Attributes:
      max_distance: Largest descriptor distance of a mutual nearest neighbour, or None.
      max_ratio: Lowe's ratio bound, or None.
      error_threshold: RANSAC inlier distance in image pixels.
      num_hypotheses: RANSAC triples per pair.
      refinement_steps: Least-squares local-optimisation rounds.
      max_scale_change: Largest accepted scale change of a hypothesis, or None.
    """

    max_distance: float | None = DELF_MAX_DISTANCE
    max_ratio: float | None = None
    error_threshold: float = DELF_ERROR_THRESHOLD
    num_hypotheses: int = DELF_NUM_HYPOTHESES
    refinement_steps: int = 3
    max_scale_change: float | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`verify_pair` (and of the batched verifiers)."""
        return dataclasses.asdict(self)


def sample_point_triples(
    key: jax.Array, valid: Bool[AnyArray, " P"], *, num_hypotheses: int
) -> tuple[Int[Array, "Y 3"], Bool[Array, " Y"]]:
    """``Y`` uniform random triples of distinct valid correspondences.

    Sampling without replacement in O(Y): the valid rows are moved to the front
    (stable), then for each triple the ranks ``r0 ~ U{0..n-1}``, ``r1 ~ U{0..n-2}`` and
    ``r2 ~ U{0..n-3}`` are shifted past the ranks already drawn, which makes every
    triple of distinct valid rows equally likely.

    Args:
      key: PRNG key (required: the samples are random).
      valid: Which correspondences may be drawn.
      num_hypotheses: Y, triples drawn (static).

    Returns:
      ``(indices, ok)``: correspondence indices, and whether the triple is real
      (False for all when fewer than 3 correspondences are valid).

    Raises:
      ValueError: ``num_hypotheses < 1``.
    """
    if num_hypotheses < 1:
        raise ValueError(f"num_hypotheses must be >= 1, got {num_hypotheses}.")
    valid = validation.as_mask("sample_point_triples: valid", valid)
    order = jnp.argsort(~valid, stable=True)  # valid rows first, in index order
    count = jnp.sum(valid, dtype=jnp.int32)
    uniform = jax.random.uniform(key, (num_hypotheses, 3))  # (Y, 3)

    def draw(u, size):
        scaled = u * jnp.maximum(size, 1).astype(u.dtype)
        return jnp.minimum(jnp.floor(scaled).astype(jnp.int32), size - 1)

    r0 = draw(uniform[:, 0], count)  # (Y,)
    r1 = draw(uniform[:, 1], count - 1)
    r1 = r1 + (r1 >= r0).astype(jnp.int32)
    r2 = draw(uniform[:, 2], count - 2)
    low, high = jnp.minimum(r0, r1), jnp.maximum(r0, r1)
    r2 = r2 + (r2 >= low).astype(jnp.int32)
    r2 = r2 + (r2 >= high).astype(jnp.int32)
    ranks = jnp.clip(jnp.stack([r0, r1, r2], axis=1), 0, valid.shape[0] - 1)  # (Y, 3)
    ok = jnp.broadcast_to(count >= 3, (num_hypotheses,))
    return order[ranks], ok


def affine_from_point_triples(
    points_a: Float[AnyArray, "Y 3 2"], points_b: Float[AnyArray, "Y 3 2"]
) -> tuple[Float[Array, "Y 2 3"], Bool[Array, " Y"]]:
    """The affine map taking each triple of points of image a onto its triple in b.

    With ``u_k = a_k - a_0`` and ``v_k = b_k - b_0`` (k = 1, 2), ``A [u_1 u_2] =
    [v_1 v_2]`` gives ``A = V U^{-1}`` (2 x 2 inverse in closed form) and
    ``t = b_0 - A a_0``. Centring on the first point keeps float32 accurate at pixel
    coordinates in the thousands.

    Args:
      points_a: Triples in image a, ``(x, y)`` pixels.
      points_b: The corresponding triples in image b.

    Returns:
      ``(transforms, ok)``: ``[A | t]`` per triple, and False where the triple of a is
      (nearly) collinear, ``|det U| <= 1e-6 (|u_1|^2 + |u_2|^2)``, or the map is not
      finite; such transforms are zeros.
    """
    points_a = validation.as_float_array("points_a", points_a, axes="Y 3 2")
    points_b = validation.as_float_array("points_b", points_b, axes="Y 3 2")
    if points_b.shape != points_a.shape:
        raise ValueError(
            f"points_b must have the shape of points_a {points_a.shape}, found {points_b.shape}."
        )
    points_a, points_b = validation.common_float(points_a, points_b)
    u = points_a[:, 1:] - points_a[:, :1]  # (Y, 2, 2): rows u_1, u_2
    v = points_b[:, 1:] - points_b[:, :1]  # (Y, 2, 2): rows v_1, v_2
    det = u[:, 0, 0] * u[:, 1, 1] - u[:, 0, 1] * u[:, 1, 0]  # (Y,)
    scale = jnp.sum(u * u, axis=(1, 2))  # (Y,)
    ok = jnp.abs(det) > 1e-6 * jnp.maximum(scale, 1e-12)
    safe = jnp.where(ok, det, 1.0)
    # A = V^T (U^T)^{-1}: columns of U^T, V^T are the difference vectors.
    inverse_ut = (
        jnp.stack(
            [
                jnp.stack([u[:, 1, 1], -u[:, 1, 0]], axis=-1),
                jnp.stack([-u[:, 0, 1], u[:, 0, 0]], axis=-1),
            ],
            axis=-2,
        )
        / safe[:, None, None]
    )  # (Y, 2, 2) = (U^T)^{-1}
    linear = jnp.einsum("yji,yjk->yik", v, inverse_ut)  # (Y, 2, 2) = V^T (U^T)^{-1}
    translation = points_b[:, 0] - jnp.einsum("yij,yj->yi", linear, points_a[:, 0])  # (Y, 2)
    transforms = jnp.concatenate([linear, translation[:, :, None]], axis=2)  # (Y, 2, 3)
    ok = ok & jnp.all(jnp.isfinite(transforms), axis=(1, 2))
    return jnp.where(ok[:, None, None], transforms, 0.0), ok


def _scale_change(transform: Array) -> Array:
    """Isotropic scale change ``sqrt(|det A|)`` of (..., 2, 3) transforms."""
    det = transform[..., 0, 0] * transform[..., 1, 1] - transform[..., 0, 1] * transform[..., 1, 0]
    return jnp.sqrt(jnp.abs(det))


def ransac_affine_points(
    points_a: Float[AnyArray, "P 2"],
    points_b: Float[AnyArray, "P 2"],
    valid: Bool[AnyArray, " P"],
    *,
    key: jax.Array,
    error_threshold: Scalar = DELF_ERROR_THRESHOLD,
    num_hypotheses: int = DELF_NUM_HYPOTHESES,
    refinement_steps: int = 3,
    max_scale_change: Scalar | None = None,
) -> VerificationResult:
    """Best affine map of point correspondences: RANSAC on random triples, then LO.

    1. ``num_hypotheses`` triples of valid correspondences (:func:`sample_point_triples`)
       give affine hypotheses (:func:`affine_from_point_triples`); collinear triples and,
       with ``max_scale_change``, maps whose scale change ``sqrt|det A|`` lies outside
       ``[1 / max_scale_change, max_scale_change]`` are discarded.
    2. Correspondence p is an inlier of hypothesis h if
       ``||A_h a_p + t_h - b_p|| < error_threshold``; all ``(Y, P)`` errors at once, with
       DSM's scoring. The best has most inliers (ties: the first drawn).
    3. Local optimisation (``refinement_steps`` rounds, DSM's): least-squares refit on
       the inliers, kept if well-posed and not worse.

    Args:
      points_a: Keypoint locations in image a of each correspondence.
      points_b: The matched locations in image b.
      valid: Which correspondences are real (the rest is padding).
      key: PRNG key of the triples (keyword-only and required).
      error_threshold: Inlier distance in image-b pixels (traced); the authors' 20.
      num_hypotheses: Y, triples tried (static); the authors' 1000.
      refinement_steps: Local-optimisation rounds (static; 0 disables).
      max_scale_change: Largest accepted scale change (traced), or None for none (the
        authors' skimage RANSAC has no such test).

    Returns:
      A :class:`~jaxretrieval.spatial_verification.ransac.VerificationResult`; with no
      valid hypothesis (fewer than 3 correspondences, or all collinear) ``num_inliers``
      is 0, the transform zeros and the mask all False.

    Raises:
      ValueError: On inconsistent shapes or ``refinement_steps < 0``.
      TypeError: If ``valid`` is not boolean.

    References:
      Fischler, Bolles. Random sample consensus. CACM 1981.
      Chum, Matas, Kittler. Locally optimized RANSAC. DAGM 2003.
      Noh, Araujo, Sim, Weyand, Han. Large-scale image retrieval with attentive deep
      local features. ICCV 2017.
    """
    points_a = validation.as_float_array("points_a", points_a, axes="P 2")
    points_b = validation.as_float_array("points_b", points_b, axes="P 2")
    if points_b.shape != points_a.shape:
        raise ValueError(
            f"points_b must have the shape of points_a {points_a.shape}, found {points_b.shape}."
        )
    valid = validation.as_mask("valid", valid, shape=points_a.shape[:1], axes="P")
    indices, sampled = sample_point_triples(key, valid, num_hypotheses=num_hypotheses)
    transforms, solved = affine_from_point_triples(points_a[indices], points_b[indices])
    hypothesis_ok = sampled & solved  # (Y,)
    if max_scale_change is not None:
        limit = jnp.asarray(max_scale_change, transforms.dtype)
        scale = _scale_change(transforms)  # (Y,)
        hypothesis_ok = hypothesis_ok & (scale <= limit) & (scale * limit >= 1.0)
    return best_affine_hypothesis(
        transforms,
        hypothesis_ok,
        points_a,
        points_b,
        valid,
        error_threshold=error_threshold,
        max_scale_change=max_scale_change,
        refinement_steps=refinement_steps,
    )


def verify_pair(
    features_a: DelfFeatures,
    features_b: DelfFeatures,
    *,
    key: jax.Array,
    max_distance: Scalar | None = DELF_MAX_DISTANCE,
    max_ratio: Scalar | None = None,
    error_threshold: Scalar = DELF_ERROR_THRESHOLD,
    num_hypotheses: int = DELF_NUM_HYPOTHESES,
    refinement_steps: int = 3,
    max_scale_change: Scalar | None = None,
) -> tuple[VerificationResult, Correspondences]:
    """Verifies one image pair: mutual nearest neighbours, then RANSAC on triples.

    Args:
      features_a: DELF features of image a (leading axis M).
      features_b: DELF features of image b.
      key: PRNG key of the RANSAC triples.
      max_distance: See :func:`~jaxretrieval.local_features.mutual_nearest_neighbors`.
      max_ratio: See :func:`~jaxretrieval.local_features.mutual_nearest_neighbors`.
      error_threshold: See :func:`ransac_affine_points`.
      num_hypotheses: See :func:`ransac_affine_points`.
      refinement_steps: See :func:`ransac_affine_points`.
      max_scale_change: See :func:`ransac_affine_points`.

    Returns:
      ``(result, correspondences)``: the :class:`VerificationResult` (its
      ``inlier_mask`` indexes the correspondences, one row per feature of a) and the
      putative matches.

    Raises:
      ValueError, TypeError: On malformed features.
    """
    features_a = check_delf_features("features_a", features_a)
    features_b = check_delf_features("features_b", features_b)
    matches = mutual_nearest_neighbors(
        features_a.descriptors,
        features_b.descriptors,
        features_a.valid,
        features_b.valid,
        max_distance=max_distance,
        max_ratio=max_ratio,
    )
    result = ransac_affine_points(
        features_a.locations[matches.index_a],
        features_b.locations[matches.index_b],
        matches.valid,
        key=key,
        error_threshold=error_threshold,
        num_hypotheses=num_hypotheses,
        refinement_steps=refinement_steps,
        max_scale_change=max_scale_change,
    )
    return result, matches


def verify_shortlist(
    query_features: DelfFeatures,
    shortlist_features: DelfFeatures,
    shortlist_ids: Int[AnyArray, " L"],
    *,
    key: jax.Array,
    **kwargs,
) -> tuple[VerificationResult, Correspondences]:
    """:func:`verify_pair` of one query against L images at once (``jax.vmap``).

    Pair ``l`` uses the key ``fold_in(key, shortlist_ids[l])``, so an image's result
    depends on its id, not on its position or on the rest of the shortlist.

    Args:
      query_features: One image's features, leading axis M.
      shortlist_features: Features with a leading L axis (``locations`` (L, M, 2)).
      shortlist_ids: Database id of each shortlisted image.
      key: The query's PRNG key.
      **kwargs: The keyword arguments of :func:`verify_pair` (matching and RANSAC).

    Returns:
      :func:`verify_pair`'s outputs with a leading L axis.

    Raises:
      ValueError: If ``shortlist_features`` has no leading axis or the ids do not match.
    """
    num = validation.check_shape(
        "shortlist_features.locations", shortlist_features.locations, "L M 2"
    )[0]
    ids = validation.as_int_array("shortlist_ids", shortlist_ids, axes="L")
    if ids.shape[0] != num:
        raise ValueError(f"shortlist_ids has {ids.shape[0]} ids for {num} shortlisted images.")

    def one(features_b, image_id):
        return verify_pair(
            query_features, features_b, key=jax.random.fold_in(key, image_id), **kwargs
        )

    return jax.vmap(one)(shortlist_features, ids)


def rerank_shortlist(
    global_ranks: Int[AnyArray, "Q N"],
    global_scores: Float[AnyArray, "Q N"],
    query_features: DelfFeatures,
    database_features: DelfFeatures,
    *,
    key: jax.Array,
    shortlist_size: int = 100,
    min_inliers: int = 5,
    **kwargs,
) -> Reranking:
    """Re-orders each query's global top-L by DELF inlier counts.

    The rule is DSM's, applied by the same function
    (:func:`jaxretrieval.spatial_verification.dsm.rerank_by_inliers`): within the top
    ``shortlist_size``, images with at least ``min_inliers`` inliers come first by
    decreasing inliers, ties by decreasing global similarity; the others follow in global
    order; the rest of the ranking is unchanged. Query ``q`` of this call
    verifies with the key ``fold_in(key, q)`` (then per image, see
    :func:`verify_shortlist`); a caller running one query per call passes
    ``fold_in(key, q)`` itself to get the same result.

    Args:
      global_ranks: Database indices of each query, best first.
      global_scores: ``global_scores[q, n]``: global similarity, indexed by database id.
      query_features: Features with a leading Q axis (``locations`` (Q, M, 2)).
      database_features: Features with a leading N axis.
      key: PRNG key of the whole call.
      shortlist_size: L (static), clipped to the number of ranked images.
      min_inliers: Smallest inlier count that counts as verified.
      **kwargs: The keyword arguments of :func:`verify_pair`.

    Returns:
      A :class:`~jaxretrieval.spatial_verification.Reranking`.

    Raises:
      ValueError: On inconsistent shapes or ``shortlist_size < 1``.

    References:
      Noh, Araujo, Sim, Weyand, Han. Large-scale image retrieval with attentive deep
      local features. ICCV 2017.
    """

    def count_inliers(query, shortlist_features, shortlist_ids, query_index):
        result, _ = verify_shortlist(
            query,
            shortlist_features,
            shortlist_ids,
            key=jax.random.fold_in(key, query_index),
            **kwargs,
        )
        return result.num_inliers

    return rerank_by_inliers(
        global_ranks,
        global_scores,
        query_features,
        database_features,
        count_inliers,
        shortlist_size=shortlist_size,
        min_inliers=min_inliers,
        points="locations",
    )
