"""DSMFeatureExtractor with settings: query and database roles, the older options."""

import dataclasses

import numpy as np
import pytest

from jaxretrieval import retrieval_model
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    DSMSettings,
    FeatureSelection,
    MSERParams,
)


@pytest.fixture(scope="module")
def mobilenet():
    model = ModelConfig(backbone="mobilenet_v2")
    return model, retrieval_model.init_model_variables(model)


def _per_channel_scale(features):
    valid = np.asarray(features.valid)
    pairs = np.stack([features.channels[valid], features.scale_ids[valid]], axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    return counts


@pytest.mark.slow  # 12 s on real photos
def test_published_extractor_selects_queries_and_database_images_differently(
    mobilenet, shared_data
):
    model, variables = mobilenet
    published = dataclasses.replace(DSMSettings.published(), scales=(1.0, 0.5))
    extractor = DSMFeatureExtractor(model, variables, settings=published)
    image = extractor.load(shared_data / "opencv_box_pair" / "box_in_scene.png", max_side=320)
    query = extractor(image, as_query=True)
    database = extractor(image)
    assert query.means.shape == database.means.shape == (512, 2)
    assert set(np.unique(query.scale_ids[query.valid])) == {0, 1}
    # Budgets: 20 per channel and scale for a query, 10 for a database image (which also
    # goes through NMS), so the database image keeps fewer features.
    assert _per_channel_scale(query).max() <= 20
    assert _per_channel_scale(database).max() <= 10
    assert 0 < database.valid.sum() < query.valid.sum()
    # Both roles from one forward pass, as for leave-one-out.
    both = extractor.query_and_database_features(image)
    for got, want in zip((*both[0], *both[1]), (*query, *database), strict=True):
        np.testing.assert_array_equal(got, want)
    # Ours selects both roles alike.
    ours = DSMFeatureExtractor(model, variables, scales=(1.0, 0.5))
    for got, want in zip(ours(image, as_query=True), ours(image), strict=True):
        np.testing.assert_array_equal(got, want)
    query, database = ours.query_and_database_features(image)
    assert query is database


def test_extractor_options_and_settings(mobilenet):
    model, variables = mobilenet
    mser = MSERParams(max_regions_per_channel=8)
    extractor = DSMFeatureExtractor(
        model, variables, scales=(1.0,), max_features=64, mser=mser, nms_iou=0.5
    )
    selection = FeatureSelection(max_features=64, nms_iou=0.5)
    assert extractor.settings == dataclasses.replace(
        DSMSettings(), scales=(1.0,), mser=mser, query=selection, database=selection
    )
    assert (extractor.scales, extractor.max_features, extractor.nms_iou) == ((1.0,), 64, 0.5)
    assert extractor.mser is mser
    assert DSMFeatureExtractor(model, variables).settings == DSMSettings()
    published = DSMSettings.published()
    assert DSMFeatureExtractor(model, variables, settings=published).settings is published
    with pytest.raises(ValueError, match="pass either settings or max_features, scales"):
        DSMFeatureExtractor(model, variables, settings=published, scales=(1.0,), max_features=8)


def test_activation_maps_keep_few_compiled_shapes_alive(mobilenet, monkeypatch):
    """Every image size compiles a shape (no pad_multiple); old ones are dropped."""
    from jaxretrieval import jit_cache

    model, variables = mobilenet
    extractor = DSMFeatureExtractor(model, variables, scales=(1.0,))
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (160, 160 + 32 * i, 3)).astype(np.uint8) for i in range(3)]
    expected = [extractor.activation_maps(image)[0][0] for image in images]
    assert jit_cache.live_executables(extractor._forward) == 3
    monkeypatch.setattr(jit_cache, "MAX_LIVE_EXECUTABLES", 2)
    extractor._forward.clear_cache()
    for image, activations in zip(images, expected, strict=True):
        np.testing.assert_array_equal(extractor.activation_maps(image)[0][0], activations)
        assert jit_cache.live_executables(extractor._forward) <= 2
