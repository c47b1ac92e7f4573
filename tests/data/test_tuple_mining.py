import numpy as np
import pytest

from jaxretrieval.data import labelled, tuple_mining


def make_labelled(scene_of_image, synthetic=False):
    scene_of_image = np.asarray(scene_of_image)
    return labelled.LabelledImages(
        paths=tuple(f"/nowhere/img{i:03d}.png" for i in range(scene_of_image.size)),
        scenes=scene_of_image,
        scene_names=tuple(f"s{s}" for s in range(int(scene_of_image.max()) + 1)),
        synthetic_positives=synthetic,
    )


def on_circle(degrees):
    angles = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)  # (N, 2)


# Four scenes of 2-D unit descriptors on a circle (angles in degrees):
# A = {0, 5, 40}, B = {20, 25}, C = {60, 65}, D = {120, 125}.
CIRCLE_ANGLES = [0, 5, 40, 20, 25, 60, 65, 120, 125]
CIRCLE_SCENES = [0, 0, 0, 1, 1, 2, 2, 3, 3]


def reference_negatives(data, descriptors, query, pool, num_negatives):
    """Slow reference: pool images by decreasing similarity, first of each other scene."""
    order = sorted(pool.tolist(), key=lambda i: -float(descriptors[i] @ descriptors[query]))
    chosen, seen = [], {int(data.scenes[query])}
    for i in order:
        if int(data.scenes[i]) not in seen:
            seen.add(int(data.scenes[i]))
            chosen.append(i)
    return chosen[:num_negatives]


def random_problem(num_scenes=12, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=num_scenes)
    sizes[0] = 3
    scenes = np.repeat(np.arange(num_scenes), sizes)
    descriptors = rng.normal(size=(scenes.size, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return make_labelled(scenes), descriptors


def check_constraints(data, tuples, *, num_tuples, num_negatives):
    indices = tuples.indices
    assert indices.shape == (num_tuples, 2 + num_negatives) and indices.dtype == np.int32
    scenes = data.scenes[indices]  # (num_tuples, T)
    queries, positives = indices[:, 0], indices[:, 1]
    assert (data.scene_sizes[scenes[:, 0]] >= 2).all()
    assert (scenes[:, 1] == scenes[:, 0]).all() and (positives != queries).all()
    assert (scenes[:, 2:] != scenes[:, :1]).all()  # never the query's scene
    for row in scenes[:, 2:]:
        assert len(set(row.tolist())) == num_negatives  # one per scene


def test_mine_tuples_known_values_on_a_circle():
    data = make_labelled(CIRCLE_SCENES)
    descriptors = on_circle(CIRCLE_ANGLES)
    tuples = tuple_mining.mine_tuples(
        data, descriptors, num_tuples=9, num_negatives=2, seed=0, positive="hardest"
    )
    by_query = {row[0]: row[1:] for row in tuples.indices.tolist()}
    assert sorted(by_query) == list(range(9))  # every image is a query once
    # Query 0 deg: hardest positive 40 deg (index 2); negatives B at 20 deg (3), C at 60 (5):
    # 25 deg is of B again, so it is skipped.
    assert by_query[0] == [2, 3, 5]
    # Query 40 deg: hardest positive 0 deg; nearest others: B 25 (4), C 60 (5).
    assert by_query[2] == [0, 4, 5]
    # Query 125 deg: positive 120; nearest others: C 65 (6), A 40 (2).
    assert by_query[8] == [7, 6, 2]
    assert tuples.num_random_negatives == 0


def test_mine_tuples_random_positive_on_a_circle():
    data = make_labelled(CIRCLE_SCENES)
    positives = set()
    for seed in range(30):
        tuples = tuple_mining.mine_tuples(
            data, on_circle(CIRCLE_ANGLES), num_tuples=9, num_negatives=1, seed=seed
        )
        positives |= {row[1] for row in tuples.indices.tolist() if row[0] == 0}
    assert positives == {1, 2}  # both other images of scene A, never the query


def test_mine_tuples_matches_reference():
    data, descriptors = random_problem()
    tuples = tuple_mining.mine_tuples(data, descriptors, num_tuples=15, num_negatives=4, seed=1)
    check_constraints(data, tuples, num_tuples=15, num_negatives=4)
    pool = np.arange(len(data))
    for row in tuples.indices.tolist():
        assert row[2:] == reference_negatives(data, descriptors, row[0], pool, 4)


def test_mine_tuples_deterministic_and_seeded():
    data, descriptors = random_problem()
    kwargs = dict(num_tuples=20, num_negatives=3, pool_size=20)
    first = tuple_mining.mine_tuples(data, descriptors, seed=5, **kwargs)
    second = tuple_mining.mine_tuples(data, descriptors, seed=5, **kwargs)
    np.testing.assert_array_equal(first.indices, second.indices)
    other = tuple_mining.mine_tuples(data, descriptors, seed=6, **kwargs)
    assert not np.array_equal(first.indices, other.indices)


def test_mine_tuples_queries_cover_eligible_images():
    data, descriptors = random_problem()
    eligible = np.flatnonzero(data.scene_sizes[data.scenes] >= 2)
    tuples = tuple_mining.mine_tuples(
        data, descriptors, num_tuples=eligible.size + 3, num_negatives=1, seed=0
    )
    queries = tuples.indices[:, 0]
    # A full permutation first, then a few more: every eligible image, none ineligible.
    assert sorted(queries[: eligible.size].tolist()) == eligible.tolist()
    assert set(queries.tolist()) <= set(eligible.tolist())


def test_mine_tuples_pool_restriction():
    data, descriptors = random_problem(num_scenes=20, seed=2)
    seed, pool_size = 3, 15
    tuples = tuple_mining.mine_tuples(
        data, descriptors, num_tuples=10, num_negatives=3, pool_size=pool_size, seed=seed
    )
    check_constraints(data, tuples, num_tuples=10, num_negatives=3)
    pool = tuple_mining._draw_pool(
        len(data), pool_size, tuple_mining._streams(seed)[tuple_mining._POOL]
    )
    assert pool.size == pool_size
    assert set(tuples.indices[:, 2:].reshape(-1).tolist()) <= set(pool.tolist())
    for row in tuples.indices.tolist():
        assert row[2:] == reference_negatives(data, descriptors, row[0], pool, 3)


def test_mine_tuples_reads_only_images_to_describe():
    data, descriptors = random_problem(num_scenes=20, seed=2)
    for positive in ("random", "hardest"):
        kwargs = dict(num_tuples=6, num_negatives=3, pool_size=12, seed=4, positive=positive)
        needed = tuple_mining.images_to_describe(data, **kwargs)
        assert needed.dtype == np.int64 and (np.diff(needed) > 0).all()
        masked = np.full_like(descriptors, np.nan)
        masked[needed] = descriptors[needed]
        np.testing.assert_array_equal(
            tuple_mining.mine_tuples(data, masked, **kwargs).indices,
            tuple_mining.mine_tuples(data, descriptors, **kwargs).indices,
        )


def test_mine_tuples_searches_deeper_when_one_scene_crowds_the_top():
    # Scene 1 has 10 images right next to the query; scenes 2 and 3 are further away.
    angles = [0, 90] + [1 + k for k in range(10)] + [30, 60]
    scenes = [0, 0] + [1] * 10 + [2, 3]
    data = make_labelled(scenes)
    tuples = tuple_mining.mine_tuples(
        data, on_circle(angles), num_tuples=12, num_negatives=3, seed=0
    )
    rows = {row[0]: row[2:] for row in tuples.indices.tolist()}
    assert rows[0] == [2, 12, 13]  # 1 deg, then 30, then 60
    assert tuples.num_random_negatives == 0


def test_mine_tuples_random_fallback_when_the_pool_is_short():
    data, descriptors = random_problem(num_scenes=12, seed=0)
    tuples = tuple_mining.mine_tuples(
        data, descriptors, num_tuples=10, num_negatives=5, pool_size=3, seed=0
    )
    # 3 pool images hold at most 3 other scenes: at least 2 random negatives per tuple.
    assert tuples.num_random_negatives >= 2 * 10
    check_constraints(data, tuples, num_tuples=10, num_negatives=5)


def test_mine_tuples_synthetic_positives():
    data = make_labelled(np.arange(6), synthetic=True)
    descriptors = on_circle([0, 10, 20, 30, 40, 50])
    tuples = tuple_mining.mine_tuples(
        data, descriptors, num_tuples=6, num_negatives=2, seed=0, positive="hardest"
    )
    indices = tuples.indices
    assert sorted(indices[:, 0].tolist()) == list(range(6))
    np.testing.assert_array_equal(indices[:, 1], indices[:, 0])  # the loader warps it
    for row in indices.tolist():
        expected = sorted((i for i in range(6) if i != row[0]), key=lambda i: abs(i - row[0]))
        assert abs(row[2] - row[0]) == 1 and row[2] in expected[:2]
        assert len({row[0], *row[2:]}) == 3


def test_mine_tuples_pairs_without_negatives():
    data, descriptors = random_problem()
    tuples = tuple_mining.mine_tuples(data, descriptors, num_tuples=4, num_negatives=0, seed=0)
    assert tuples.indices.shape == (4, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_tuples=0), ValueError, "num_tuples must be >= 1"),
        (dict(num_negatives=-1), ValueError, "num_negatives must be >= 0"),
        (dict(pool_size=0), ValueError, "pool_size must be >= 1"),
        (dict(positive="easiest"), ValueError, "positive must be one of"),
        (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
        (dict(num_negatives=4), ValueError, "num_negatives=4 needs at least 5 scenes"),
    ],
)
def test_mine_tuples_raises(kwargs, error, match):
    data = make_labelled(CIRCLE_SCENES)
    arguments = dict(num_tuples=2, num_negatives=1, seed=0) | kwargs
    with pytest.raises(error, match=match):
        tuple_mining.mine_tuples(data, on_circle(CIRCLE_ANGLES), **arguments)


def test_mine_tuples_raises_on_data(without_annotation_checks):
    data = make_labelled(CIRCLE_SCENES)
    descriptors = on_circle(CIRCLE_ANGLES)
    with pytest.raises(ValueError, match=r"N = 9 images, found \(8, 2\)"):
        tuple_mining.mine_tuples(data, descriptors[:8], num_tuples=2, num_negatives=1, seed=0)
    with pytest.raises(TypeError, match="floating"):
        tuple_mining.mine_tuples(
            data, descriptors.astype(np.int32), num_tuples=2, num_negatives=1, seed=0
        )
    with pytest.raises(ValueError, match="no image can be a query"):
        tuple_mining.mine_tuples(
            make_labelled([0, 1, 2]), on_circle([0, 1, 2]), num_tuples=1, num_negatives=1, seed=0
        )
    broken = descriptors.copy()
    broken[:] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tuple_mining.mine_tuples(data, broken, num_tuples=2, num_negatives=1, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        tuple_mining.mine_tuples(
            data, broken, num_tuples=2, num_negatives=0, seed=0, positive="hardest"
        )
