"""Training tuples with hard negatives mined from the current model's descriptors.

A tuple is ``[query, positive, negative_1, ..., negative_n]``, indices into a
:class:`~jaxretrieval.data.labelled.LabelledImages`. This is cirtorch's
``TuplesDataset.create_epoch_tuples`` adapted to scene labels instead of SfM pairs:

1. ``num_tuples`` queries are drawn among the images whose scene has at least two images
   (any image when the set has synthetic positives);
2. the positive is another image of the query's scene: a random one, or the least
   similar one (``positive="hardest"``); with synthetic positives it is the query itself,
   which the loader warps (:mod:`jaxretrieval.data.training_pipeline`);
3. a random pool of ``pool_size`` images is drawn; the negatives are the pool images most
   similar to the query that are not of its scene, at most one per scene (the most
   similar image of each scene), as cirtorch keeps one image per 3D model so that the
   negatives are diverse.

All randomness comes from ``seed``, through independent streams for the queries, the
pool, the positives and the fallback, so the draws do not depend on the descriptors and
:func:`images_to_describe` can tell beforehand which descriptor rows mining reads.
Redraw the tuples every epoch with a new seed (e.g. ``seed=base_seed * 1000 + epoch``)
and the model's current descriptors, as cirtorch does.

Search: :func:`jaxretrieval.search.knn_search` (exact, faiss) of the queries against the
pool, asking for ``k = 2 * num_negatives + m`` neighbours, where ``m`` is the largest
number of pool images of any query's own scene (they are removed). Removing repeated
scenes may still leave a query short; its search is then repeated with ``k`` doubled
until the whole pool has been searched. A query for which even the whole pool holds
fewer than ``num_negatives`` other scenes gets the missing negatives at random (one
random image of each of some random other scenes, from the whole set, not only the
pool); :attr:`Tuples.num_random_negatives` counts them, so a run can log it. Use a pool
with many more scenes than ``num_negatives`` to keep them hard.
"""

from typing import NamedTuple

import numpy as np
from jaxtyping import Float

from jaxretrieval import search
from jaxretrieval.array_types import AnyArray
from jaxretrieval.data.labelled import LabelledImages

POSITIVE_CHOICES = ("random", "hardest")
"""How :func:`mine_tuples` picks the positive of a query."""

# Independent random streams spawned from the seed, one per kind of draw.
_QUERIES, _POOL, _POSITIVES, _FALLBACK = range(4)


class Tuples(NamedTuple):
    """Training tuples for one epoch.

    Attributes:
      indices: ``(num_tuples, T)`` ``int32`` indices into the labelled images:
        ``[query, positive, negatives...]``, ``T = 2 + num_negatives``.
      num_random_negatives: How many negatives were drawn at random because the pool
        could not supply enough hard ones (see the module docstring).
    """

    indices: np.ndarray
    num_random_negatives: int = 0


def _streams(seed: int) -> list[np.random.Generator]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, found {seed!r}.")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]


def _check_arguments(
    labelled: LabelledImages,
    *,
    num_tuples: int,
    num_negatives: int,
    pool_size: int | None,
    positive: str,
) -> np.ndarray:
    """Validates the arguments; returns the images that can be queries."""
    if num_tuples < 1:
        raise ValueError(f"num_tuples must be >= 1, found {num_tuples}.")
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, found {num_negatives}.")
    if pool_size is not None and pool_size < 1:
        raise ValueError(f"pool_size must be >= 1 or None, found {pool_size}.")
    if positive not in POSITIVE_CHOICES:
        raise ValueError(f"positive must be one of {POSITIVE_CHOICES}, found {positive!r}.")
    if labelled.synthetic_positives:
        eligible = np.arange(len(labelled))
    else:
        eligible = np.flatnonzero(labelled.scene_sizes[labelled.scenes] >= 2)
    if eligible.size == 0:
        raise ValueError(
            f"no image can be a query: no scene of the {len(labelled)} images has two images "
            "(use synthetic positives for an unlabelled set)."
        )
    if labelled.num_scenes - 1 < num_negatives:
        raise ValueError(
            f"num_negatives={num_negatives} needs at least {num_negatives + 1} scenes (one "
            f"per negative, plus the query's), found {labelled.num_scenes}."
        )
    return eligible


def _draw_queries(eligible: np.ndarray, num_tuples: int, rng: np.random.Generator) -> np.ndarray:
    """``num_tuples`` queries: whole random permutations of ``eligible``, concatenated."""
    repeats = -(-num_tuples // eligible.size)  # ceil
    return np.concatenate([rng.permutation(eligible) for _ in range(repeats)])[:num_tuples]


def _epoch_queries(
    labelled: LabelledImages,
    num_tuples: int,
    num_negatives: int,
    pool_size: int | None,
    seed: int,
    positive: str,
) -> tuple[np.ndarray, list[np.random.Generator]]:
    """Validates the arguments; returns the epoch's queries and the streams of the other draws.

    :func:`mine_tuples` and :func:`images_to_describe` start here, so for the same
    arguments they draw the same queries (and, from the same streams, the same pool).
    """
    eligible = _check_arguments(
        labelled,
        num_tuples=num_tuples,
        num_negatives=num_negatives,
        pool_size=pool_size,
        positive=positive,
    )
    streams = _streams(seed)
    return _draw_queries(eligible, num_tuples, streams[_QUERIES]), streams


def _draw_pool(num_images: int, pool_size: int | None, rng: np.random.Generator) -> np.ndarray:
    if pool_size is None or pool_size >= num_images:
        return np.arange(num_images)
    return np.sort(rng.choice(num_images, size=pool_size, replace=False))


def images_to_describe(
    labelled: LabelledImages,
    *,
    num_tuples: int,
    num_negatives: int,
    pool_size: int | None = None,
    seed: int,
    positive: str = "random",
) -> np.ndarray:
    """The images whose descriptors :func:`mine_tuples` reads, for the same arguments.

    Mining reads the rows of the queries, of the pool and, for ``positive="hardest"``,
    of every image of the queries' scenes. With a pool much smaller than the set, a
    caller can describe only these images and pass any finite values (e.g. zeros) in
    the other rows.

    Returns:
      Sorted unique ``int64`` image indices.

    Raises:
      ValueError: As :func:`mine_tuples`.
    """
    queries, streams = _epoch_queries(
        labelled, num_tuples, num_negatives, pool_size, seed, positive
    )
    needed = [queries]
    if num_negatives:
        needed.append(_draw_pool(len(labelled), pool_size, streams[_POOL]))
    if positive == "hardest" and not labelled.synthetic_positives:
        needed.extend(labelled.images_of_scene(s) for s in np.unique(labelled.scenes[queries]))
    return np.unique(np.concatenate(needed)).astype(np.int64)


def _random_positives(
    labelled: LabelledImages, queries: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A uniformly random other image of each query's scene."""
    order, starts = labelled._scene_order  # images grouped by scene
    scenes = labelled.scenes[queries]
    sizes = labelled.scene_sizes[scenes]
    # Position among the scene's first size - 1 members; the query's own slot is replaced
    # by the last member, so every other member is equally likely.
    offsets = np.floor(rng.random(queries.size) * (sizes - 1)).astype(np.int64)
    candidates = order[starts[scenes] + offsets]
    last = order[starts[scenes] + sizes - 1]
    return np.where(candidates == queries, last, candidates)


def _hardest_positives(
    labelled: LabelledImages, descriptors: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """The least similar other image of each query's scene (first one on ties)."""
    positives = np.empty_like(queries)
    for t, q in enumerate(queries.tolist()):
        members = labelled.images_of_scene(int(labelled.scenes[q]))
        members = members[members != q]
        if not np.isfinite(descriptors[members]).all() or not np.isfinite(descriptors[q]).all():
            raise ValueError(
                f"descriptors: a row read for the hardest positive of image {q} (its scene's "
                "images) contains NaN or inf."
            )
        similarities = descriptors[members] @ descriptors[q]  # (members,)
        positives[t] = members[np.argmin(similarities)]
    return positives


def _hard_negatives(
    labelled: LabelledImages,
    descriptors: np.ndarray,
    queries: np.ndarray,
    pool: np.ndarray,
    num_negatives: int,
) -> np.ndarray:
    """Most similar pool image of each of the most similar other scenes; -1 where short."""
    pool_scenes = labelled.scenes[pool]  # (P,)
    query_scenes = labelled.scenes[queries]  # (num_tuples,)
    own_in_pool = np.bincount(pool_scenes, minlength=labelled.num_scenes)[query_scenes]
    pool_descriptors = descriptors[pool]  # (P, D)
    negatives = np.full((queries.size, num_negatives), -1, np.int64)
    remaining = np.arange(queries.size)
    k = min(pool.size, 2 * num_negatives + int(own_in_pool.max()))
    while remaining.size:
        _, neighbours = search.knn_search(descriptors[queries[remaining]], pool_descriptors, k=k)
        short = []
        for row, t in zip(neighbours, remaining.tolist(), strict=True):
            row = row[row >= 0]
            scenes = pool_scenes[row]
            keep = scenes != query_scenes[t]
            row, scenes = row[keep], scenes[keep]
            first = np.sort(np.unique(scenes, return_index=True)[1])[:num_negatives]
            negatives[t] = -1
            negatives[t, : first.size] = pool[row[first]]
            if first.size < num_negatives:
                short.append(t)
        if k == pool.size:
            break
        remaining = np.array(short, np.int64)
        k = min(pool.size, 2 * k)
    return negatives


def _fill_random_negatives(
    labelled: LabelledImages, queries: np.ndarray, negatives: np.ndarray, rng: np.random.Generator
) -> int:
    """Fills the -1 slots with random images of distinct unused scenes; returns how many."""
    filled = 0
    for t in np.flatnonzero((negatives < 0).any(axis=1)).tolist():
        chosen = negatives[t][negatives[t] >= 0]
        used = np.zeros(labelled.num_scenes, bool)
        used[labelled.scenes[queries[t]]] = True
        used[labelled.scenes[chosen]] = True
        missing = int((negatives[t] < 0).sum())
        scenes = rng.permutation(np.flatnonzero(~used))[:missing]
        extra = [labelled.images_of_scene(int(s)) for s in scenes.tolist()]
        extra = [members[rng.integers(members.size)] for members in extra]
        negatives[t, chosen.size :] = extra
        filled += missing
    return filled


def mine_tuples(
    labelled: LabelledImages,
    descriptors: Float[AnyArray, "N D"],
    *,
    num_tuples: int,
    num_negatives: int,
    pool_size: int | None = None,
    seed: int,
    positive: str = "random",
) -> Tuples:
    """Tuples ``[query, positive, hard negatives...]`` for one epoch (see the module docstring).

    Args:
      labelled: The training images.
      descriptors: L2-normalised descriptor rows of all the images of ``labelled``, from
        the current model. Only the rows of :func:`images_to_describe` are read; the
        others may hold anything.
      num_tuples: Tuples to make (cirtorch's ``qsize``). Queries are drawn without
        repetition while there are enough of them.
      num_negatives: Negatives per tuple (cirtorch's ``nnum``); 0 gives pairs.
      pool_size: Size of the random pool negatives are mined from (cirtorch's
        ``poolsize``); None uses every image.
      seed: Seed of every draw; the same seed, set and descriptors give the same tuples.
      positive: ``"random"`` (any other image of the scene) or ``"hardest"`` (the least
        similar one). Ignored with synthetic positives.

    Returns:
      The tuples.

    Raises:
      ValueError: On a non-positive size, an unknown ``positive``, descriptors with a
        number of rows other than ``len(labelled)``, no image that can be a query, fewer
        than ``num_negatives + 1`` scenes, or NaN/inf in a row that is read.
      TypeError: If the descriptors are not floating.

    Examples:
      >>> import numpy as np
      >>> # Scenes 0, 0, 1, 2 with 1-D-like descriptors (angles 0, 10, 20 and 90 degrees).
      >>> angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
      >>> descriptors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
      >>> images = LabelledImages(paths=("a", "b", "c", "d"), scenes=np.array([0, 0, 1, 2]),
      ...                         scene_names=("s0", "s1", "s2"))
      >>> mine_tuples(images, descriptors, num_tuples=2, num_negatives=2, seed=0).indices
      array([[1, 0, 2, 3],
             [0, 1, 2, 3]], dtype=int32)
    """
    queries, streams = _epoch_queries(
        labelled, num_tuples, num_negatives, pool_size, seed, positive
    )
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2 or descriptors.shape[0] != len(labelled):
        raise ValueError(
            f"descriptors must have shape (N, D) with N = {len(labelled)} images, found "
            f"{descriptors.shape}."
        )
    if not np.issubdtype(descriptors.dtype, np.floating):
        raise TypeError(f"descriptors must be floating, got dtype {descriptors.dtype}.")
    if labelled.synthetic_positives:
        positives = queries
    elif positive == "random":
        positives = _random_positives(labelled, queries, streams[_POSITIVES])
    else:
        positives = _hardest_positives(labelled, descriptors.astype(np.float32), queries)
    negatives = np.zeros((num_tuples, 0), np.int64)
    num_random = 0
    if num_negatives:
        pool = _draw_pool(len(labelled), pool_size, streams[_POOL])
        negatives = _hard_negatives(labelled, descriptors, queries, pool, num_negatives)
        num_random = _fill_random_negatives(labelled, queries, negatives, streams[_FALLBACK])
    indices = np.concatenate([queries[:, None], positives[:, None], negatives], axis=1)
    return Tuples(indices=indices.astype(np.int32), num_random_negatives=num_random)


__all__ = ["POSITIVE_CHOICES", "Tuples", "images_to_describe", "mine_tuples"]
