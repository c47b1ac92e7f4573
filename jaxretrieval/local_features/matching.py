"""Putative DELF matches: mutual nearest neighbours in descriptor space, fixed size.

:func:`mutual_nearest_neighbors` matches one image pair on the device and returns one
row per feature of image a (a :class:`Correspondences` with a ``valid`` mask), so that
``jax.vmap`` batches it over pairs. The authors' example matcher takes, for each
feature of image b, its nearest neighbour in image a within Euclidean distance 0.8
(a KD-tree query); the mutual check here also removes the many-to-one matches a
one-sided query keeps, and Lowe's ratio test is available beside the distance bound.
"""

import jax.numpy as jnp
from jax import lax

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Bool, Float, Scalar
from jaxretrieval.spatial_verification.correspondences import Correspondences

__all__ = ["DELF_MAX_DISTANCE", "Correspondences", "mutual_nearest_neighbors"]

DELF_MAX_DISTANCE = 0.8  # the authors' match_images.py _DISTANCE_THRESHOLD


def _squared_distances(a, b):
    """(Ma, Mb) squared Euclidean distances, clipped at 0 (float32 cancellation)."""
    cross = jnp.einsum("md,nd->mn", a, b, precision=lax.Precision.HIGHEST)  # (Ma, Mb)
    squared = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(squared, 0.0)


def mutual_nearest_neighbors(
    descriptors_a: Float[AnyArray, "Ma D"],
    descriptors_b: Float[AnyArray, "Mb D"],
    valid_a: Bool[AnyArray, " Ma"] | None = None,
    valid_b: Bool[AnyArray, " Mb"] | None = None,
    *,
    max_distance: Scalar | None = DELF_MAX_DISTANCE,
    max_ratio: Scalar | None = None,
) -> Correspondences:
    """Mutual nearest neighbours between two descriptor sets, one row per row of a.

    Row ``i`` pairs feature ``i`` of image a with its nearest valid neighbour ``j`` in
    image b; it is a match (``valid``) when ``i`` is in turn ``j``'s nearest valid
    neighbour in a, their Euclidean distance is below ``max_distance`` (if given) and,
    if ``max_ratio`` is given, ``d1 / d2 < max_ratio`` with ``d2`` the distance to
    ``i``'s second-nearest neighbour in b (Lowe's test; passed when b has only one
    valid feature). Ties go to the lowest index, so the result is deterministic.

    Args:
      descriptors_a: Descriptors of image a, rows (L2-normalised for DELF).
      descriptors_b: Descriptors of image b.
      valid_a: Which rows of a are features (None: all).
      valid_b: Which rows of b are features (None: all).
      max_distance: Largest Euclidean distance of a match (traced), or None (static).
      max_ratio: Largest ratio of the nearest to the second-nearest distance (traced),
        or None (static).

    Returns:
      :class:`Correspondences` with ``index_a = arange(Ma)``, ``index_b`` the matched
      feature of b (0 where ``valid`` is False) and ``valid`` the matches. Without
      ``max_ratio`` (one-sided), swapping a and b gives the same matches.

    Raises:
      ValueError: On mismatched descriptor dimensions or mask shapes.
      TypeError: For non-floating descriptors or non-boolean masks.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> b = jnp.array([[0.0, 1.0], [0.8, 0.6]])
      >>> m = mutual_nearest_neighbors(a, b, max_distance=None)
      >>> m.index_b.tolist(), m.valid.tolist()
      ([1, 0], [True, True])
    """
    name = "mutual_nearest_neighbors"
    a = validation.as_float_array(f"{name}: descriptors_a", descriptors_a, axes="Ma D")
    b = validation.as_float_array(f"{name}: descriptors_b", descriptors_b, axes="Mb D")
    validation.check_same_dim("descriptors_a", a, "descriptors_b", b)
    a, b = validation.common_float(a, b)
    num_a, num_b = a.shape[0], b.shape[0]
    valid_a = (
        jnp.ones((num_a,), bool)
        if valid_a is None
        else validation.as_mask(f"{name}: valid_a", valid_a, shape=(num_a,), axes="Ma")
    )
    valid_b = (
        jnp.ones((num_b,), bool)
        if valid_b is None
        else validation.as_mask(f"{name}: valid_b", valid_b, shape=(num_b,), axes="Mb")
    )
    squared = _squared_distances(a, b)  # (Ma, Mb)
    both = valid_a[:, None] & valid_b[None, :]  # (Ma, Mb)
    masked = jnp.where(both, squared, jnp.inf)  # (Ma, Mb)
    nearest_b = jnp.argmin(masked, axis=1)  # (Ma,) first index on ties
    nearest_a = jnp.argmin(masked, axis=0)  # (Mb,)
    rows = jnp.arange(num_a)
    best = masked[rows, nearest_b]  # (Ma,)
    matched = valid_a & jnp.isfinite(best) & (nearest_a[nearest_b] == rows)
    if max_distance is not None:
        limit = jnp.asarray(max_distance, best.dtype)
        matched = matched & (best < limit * limit)
    if max_ratio is not None:
        second = jnp.min(masked.at[rows, nearest_b].set(jnp.inf), axis=1)  # (Ma,)
        ratio = jnp.asarray(max_ratio, best.dtype)
        # d1 / d2 < r  <=>  d1^2 < r^2 d2^2 (an infinite d2, a lone feature, passes).
        matched = matched & ((best < ratio * ratio * second) | ~jnp.isfinite(second))
    return Correspondences(
        index_a=rows.astype(jnp.int32),
        index_b=jnp.where(matched, nearest_b, 0).astype(jnp.int32),
        valid=matched,
    )
