"""benchmarks/dsm_seed_table.py: its shared verification equals rerank_lib's, its fixes, caches."""

import dataclasses

import jax
import numpy as np
import pytest

from benchmarks import common, dsm_seed_table
from experiments import rerank_lib, whitening_lib
from experiments.rerank_lib import RerankSettings
from jaxretrieval import retrieval_model
from jaxretrieval.data import images as image_io
from jaxretrieval.data import labelled
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    DSMSettings,
    LocalFeatures,
    stack_local_features,
)

NUM_FEATURES = 16


def _features(rng, *, num_channels=4, side=200.0) -> LocalFeatures:
    """Random features on three scales; few channels, so pairs share many of them."""
    sigma = rng.uniform(4.0, 12.0, NUM_FEATURES).astype(np.float32)
    covariances = np.zeros((NUM_FEATURES, 2, 2), np.float32)
    covariances[:, 0, 0] = covariances[:, 1, 1] = sigma**2
    return LocalFeatures(
        means=rng.uniform(0, side, (NUM_FEATURES, 2)).astype(np.float32),
        covariances=covariances,
        strengths=rng.uniform(0, 1, NUM_FEATURES).astype(np.float32),
        channels=rng.integers(0, num_channels, NUM_FEATURES).astype(np.int32),
        valid=rng.uniform(size=NUM_FEATURES) < 0.9,
        scale_ids=rng.integers(0, 3, NUM_FEATURES).astype(np.int32),
    )


def _related(base: LocalFeatures, rng, shift) -> LocalFeatures:
    """``base`` moved by ``shift`` with a little noise and a few features dropped."""
    noise = rng.normal(0, 1.0, base.means.shape).astype(np.float32)
    return base._replace(
        means=base.means + np.float32(shift) + noise,
        valid=base.valid & (rng.uniform(size=NUM_FEATURES) < 0.8),
    )


class FakeExtractor:
    """Synthetic features per image, through DSMFeatureExtractor's calls (as rerank_lib uses)."""

    feature_stride = 16
    scales = (1.0, 2**-0.5, 0.5)

    def __init__(self, features):
        self.features = features  # index -> (query, database)

    def load(self, path, *, max_side):
        return np.full((2, 2, 3), int(path.split("_")[-1]), np.uint8)

    def check_size(self, image, *, name="image"):
        pass

    def __call__(self, image, *, as_query=False):
        query, database = self.features[int(image[0, 0, 0])]
        return query if as_query else database

    def query_and_database_features(self, image):
        return self(image, as_query=True), self(image, as_query=False)


def _synthetic_set(num_images=12, seed=0):
    """Three scenes of 4 images (related features), their descriptors and paths."""
    rng = np.random.default_rng(seed)
    features, descriptors = {}, []
    bases = [_features(rng) for _ in range(3)]
    centres = rng.normal(size=(3, 8))
    for i in range(num_images):
        scene = i % 3
        query = _related(bases[scene], rng, rng.uniform(-20, 20, 2))
        database = query._replace(valid=query.valid & (rng.uniform(size=NUM_FEATURES) < 0.9))
        features[i] = (query, database)
        descriptors.append(centres[scene] + rng.normal(0, 1.0, 8))
    descriptors = np.array(descriptors, np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return FakeExtractor(features), descriptors, [f"/fake/image_{i}" for i in range(num_images)]


SETTINGS = {
    "published": dataclasses.replace(
        rerank_lib.dsm_published_settings(),
        dsm_shortlist=7,
        dsm_max_correspondences=32,
        graph_k=4,
        dsm_seed_candidates=5,
    ),
    "distinct": RerankSettings(
        dsm_count_distinct=True, dsm_max_correspondences=32, dsm_min_inliers=2, num_seeds=2
    ),
}


@pytest.mark.parametrize(
    "name",
    # 11-14 s each: the published variant is slow, "distinct" runs in CI.
    [pytest.param(n, marks=pytest.mark.slow) if n == "published" else n for n in SETTINGS],
)
def test_dsm_rankings_equal_rerank_lib(name):
    settings = SETTINGS[name]
    extractor, descriptors, paths = _synthetic_set()
    # What both protocols pass: to the table's verification, and to rerank_lib.
    verify_kwargs = dict(
        settings=settings,
        error_threshold=settings.dsm_threshold_cells * extractor.feature_stride,
        num_scales=len(extractor.scales),
    )
    rerank_kwargs = dict(settings=settings, dsm_extractor=extractor)
    # Split: the first 3 images query the other 9.
    queries, database = descriptors[:3], descriptors[3:]
    query_features = stack_local_features([extractor.features[i][0] for i in range(3)])
    database_features = stack_local_features([extractor.features[i][1] for i in range(3, 12)])
    verified = dsm_seed_table.verify(
        queries, database, query_features, database_features, **verify_kwargs
    )
    ours = dsm_seed_table.dsm_rankings(verified, queries, database, settings=settings)
    for method in ("dsm", "dsm+diffusion"):
        expected = rerank_lib.rerank_split(
            method,
            queries,
            database,
            query_paths=paths[:3],
            database_paths=paths[3:],
            **rerank_kwargs,
        )
        np.testing.assert_array_equal(ours[method], expected, err_msg=method)
    assert (verified.inliers > 0).any() and (verified.distinct <= verified.inliers).all()
    # Leave-one-out: every image queries all, itself excluded.
    verified = dsm_seed_table.verify(
        descriptors,
        descriptors,
        stack_local_features([extractor.features[i][0] for i in range(12)]),
        stack_local_features([extractor.features[i][1] for i in range(12)]),
        exclude=np.arange(12),
        **verify_kwargs,
    )
    assert not (
        verified.global_ranks[:, : verified.inliers.shape[1]] == np.arange(12)[:, None]
    ).any()
    ours = dsm_seed_table.dsm_rankings(
        verified, descriptors, descriptors, settings=settings, exclude=np.arange(12)
    )
    for method in ("dsm", "dsm+diffusion"):
        expected = rerank_lib.rerank_leave_one_out(
            method, descriptors, paths=paths, **rerank_kwargs
        )
        np.testing.assert_array_equal(ours[method], expected, err_msg=method)


def test_pair_matrix_puts_counts_at_database_indices():
    verified = dsm_seed_table.Verified(
        global_ranks=np.array([[2, 0, 1], [1, 2, 0]]),
        scores=np.zeros((2, 3), np.float32),
        inliers=np.array([[7, 5], [4, 3]]),
        distinct=np.array([[6, 5], [4, 2]]),
    )
    np.testing.assert_array_equal(verified.pair_matrix(verified.inliers), [[5, -1, 7], [-1, 4, 3]])


def test_relative_threshold_is_the_absolute_one_scaled_by_the_image():
    rng = np.random.default_rng(3)
    a, b = _features(rng), _features(rng)
    b = _related(a, rng, (30.0, -10.0))
    one = jax.tree.map(lambda x: x[None], b)
    # Both images have a longer side of 512: units of 512 / 1024 px, so a threshold of
    # 32 units is 16 px, and the verification is the same up to that uniform scale.
    scaled = dsm_seed_table.relative_features(stack_local_features([a, b]), np.array([512, 512]))
    np.testing.assert_allclose(scaled.means[0], a.means * 2)
    np.testing.assert_allclose(scaled.covariances[1], b.covariances * 4)
    query = jax.tree.map(lambda x: x[0], scaled)
    shortlist = jax.tree.map(lambda x: x[1:], scaled)
    relative = common.shortlist_counts(
        query, shortlist, error_threshold=dsm_seed_table.RELATIVE_THRESHOLD, max_correspondences=64
    )
    absolute = common.shortlist_counts(a, one, error_threshold=16.0, max_correspondences=64)
    np.testing.assert_array_equal(relative, absolute)
    assert absolute[0][0] > 0


def test_table_rows_and_variants():
    rows = dsm_seed_table.table_rows(1024, 9)
    labels = [row.label for row in rows]
    assert len(labels) == len(set(labels))
    assert {row.seed_row for row in rows} == {None, *dsm_seed_table.SEED_ROXFORD_MEDIUM}
    distinct = [row for row in rows if row.settings.dsm_count_distinct]
    assert [row.method for row in distinct] == ["dsm", "dsm+diffusion", "dsm+diffusion"]
    assert distinct[0].settings.dsm_min_inliers == 9 and distinct[0].features == "published"
    # The small-graph fix changes the seed's diffusion graph and nothing else.
    by_label = {row.label: row for row in rows}
    seed_d = by_label["V+D (seed: k=50, 5 seeds, α=0.99)"].settings
    small_d = by_label["V+D (fix: seed's 5 seeds, k=5, α=0.9)"].settings
    assert small_d == dataclasses.replace(seed_d, graph_k=5, diffusion_alpha=0.9)
    assert distinct[2].settings == dataclasses.replace(
        distinct[1].settings, graph_k=5, diffusion_alpha=0.9
    )
    assert all(row.settings.dsm_shortlist == 100 for row in rows if row.features)
    assert all(row.settings.dsm_max_side == 1024 for row in rows)
    assert "distinct" not in " ".join(r.label for r in dsm_seed_table.table_rows(1024, None))
    variants = dsm_seed_table.dsm_variants("vgg16", 1024)
    assert variants["published"] == dataclasses.replace(
        DSMSettings.published("vgg16"), max_side=1024
    )
    assert (
        variants["ours+budget"].query.max_per_channel,
        variants["ours+budget"].database.max_per_channel,
    ) == (20, 10)
    assert (
        dataclasses.replace(
            variants["ours+budget"],
            query=variants["ours"].query,
            database=variants["ours"].database,
        )
        == variants["ours"]
    )


class FakeView:
    """A DSMFeatureView stand-in for choose_min_distinct_inliers: features by image index."""

    feature_stride = 16
    scales = (1.0, 2**-0.5, 0.5)

    def __init__(self, paths, features):
        self.index = {p: i for i, p in enumerate(paths)}
        self.features = features

    def load(self, path, *, max_side):
        return np.full((2, 2, 3), self.index[path] % 256, np.uint8)

    def __call__(self, image, *, as_query=False):
        query, database = self.features[int(image[0, 0, 0])]
        return query if as_query else database


def test_choose_min_distinct_inliers_keeps_negatives_under_the_rate(shared_data, tmp_path):
    train = labelled.from_csv(shared_data / "smvs_train" / "labels.csv")
    _, held_out = labelled.split_scenes(
        train, validation_fraction=whitening_lib.HELD_OUT_FRACTION, seed=0
    )
    held_out = held_out.subset(np.flatnonzero(held_out.scenes < 4))
    rng = np.random.default_rng(0)
    bases = [_features(rng) for _ in range(held_out.num_scenes)]
    features = {}
    for i, scene in enumerate(held_out.scenes):
        f = _related(bases[scene], rng, rng.uniform(-20, 20, 2))
        features[i] = (f, f)
    view = FakeView(held_out.paths, features)
    choice = dsm_seed_table.choose_min_distinct_inliers(
        view,
        shared_data / "smvs_train" / "labels.csv",
        max_side=1024,
        settings=SETTINGS["published"],
        max_scenes=4,
        negatives_per_image=5,
        rate=0.2,
    )
    sizes = held_out.scene_sizes
    assert choice["num_images"] == len(held_out) and choice["num_scenes"] == 4
    assert choice["positive_pairs"] == int(np.sum(sizes * (sizes - 1)))
    assert choice["negative_pairs"] == sum(
        min(5, len(held_out) - sizes[s]) for s in held_out.scenes
    )
    assert choice["negative_rate"] <= 0.2 and choice["min_distinct_inliers"] >= 1
    assert choice["positive_rate"] > choice["negative_rate"]  # related features verify


@pytest.fixture(scope="module")
def small_model():
    config = ModelConfig(backbone="mobilenet_v2")
    return config, retrieval_model.init_model_variables(config)


def test_dsm_feature_cache_equals_the_extractor_and_resumes_from_disk(
    shared_data, small_model, tmp_path
):
    config, variables = small_model
    path = sorted((shared_data / "landmarks_mini" / "images").iterdir())[0]
    # One scale keeps the compiles (one per extractor and shape) few.
    variants = {
        name: dataclasses.replace(settings, scales=(1.0,))
        for name, settings in dsm_seed_table.dsm_variants("mobilenet_v2", 224).items()
    }
    cache = common.DSMFeatureCache(
        config, variables, variants, pad_multiple=64, cache_dir=tmp_path / "dsm"
    )
    image = cache.load(path, max_side=224)
    assert max(image.shape[:2]) == 224
    for name in ("published", "ours+budget"):
        extractor = DSMFeatureExtractor(config, variables, pad_multiple=64, settings=variants[name])
        for as_query in (True, False):
            got = cache.features(image, variant=name, as_query=as_query)
            want = extractor(image, as_query=as_query)
            for field, a, b in zip(LocalFeatures._fields, got, want, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {as_query} {field}")
    assert cache.backbone_passes == 1  # every variant and role from one pass
    assert len(list((tmp_path / "dsm").glob("dsm_*.npz"))) == 1
    # A new cache on the same folder reads the features back without the backbone.
    again = common.DSMFeatureCache(
        config, variables, variants, pad_multiple=64, cache_dir=tmp_path / "dsm"
    )
    view = again.view("published")
    (cropped,) = image_io.load_scaled(path, max_side=224, box=None, upscale=False)
    query, database = view.query_and_database_features(cropped)
    np.testing.assert_array_equal(
        query.means, cache.features(image, variant="published", as_query=True).means
    )
    assert again.backbone_passes == 0 and view.feature_stride == 32
    # rerank_lib takes the view as its DSM extractor.
    stacked = rerank_lib.local_features([str(path)], view, max_side=224, as_query=True)
    np.testing.assert_array_equal(stacked.means[0], query.means)
    # Other weights are another model: its files are named apart.
    other = jax.tree.map(lambda x: x * 1.0001, variables)
    third = common.DSMFeatureCache(config, other, variants, cache_dir=tmp_path / "dsm")
    assert third._model_key != again._model_key
    with pytest.raises(ValueError, match="same scales"):
        common.DSMFeatureCache(
            config,
            variables,
            {"a": DSMSettings(), "b": DSMSettings(scales=(1.0,))},
        )
