"""DelfExtractor on the real MobileNetV2 (stage3, stride 16) at 96 x 128 pixels."""

import dataclasses

import numpy as np
import pytest

from jaxretrieval.local_features import (
    DelfConfig,
    DelfExtractor,
    DelfSettings,
    init_delf_variables,
    learn_descriptor_pca,
    pca_variables,
)

SETTINGS = DelfSettings(scales=(0.5, 1.0, 2.0), max_features=40)


@pytest.fixture(scope="module")
def model():
    config = DelfConfig(max_side=128, keypoint_score="l2_norm")
    return config, init_delf_variables(config)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))  # (96, 128, 3), blocky texture


def test_delf_extractor_shapes_order_and_locations(model, image):
    extractor = DelfExtractor(*model, SETTINGS)
    features = extractor(image)
    assert features.locations.shape == (40, 2) and features.descriptors.shape == (40, 96)
    assert features.valid.all()  # 12 + 48 + 192 candidates
    assert np.all(np.diff(features.scores) <= 0)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    # Receptive-field centres of stride-16 cells, mapped back: x = (16 j + 0.5) / s - 0.5.
    for scale in (0.5, 1.0, 2.0):
        rows = features.scales == scale
        cells = ((features.locations[rows] + 0.5) * scale - 0.5) / 16
        np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)
    assert set(np.unique(features.scales)) <= {0.5, 1.0, 2.0}
    assert np.all(features.locations >= -0.5) and np.all(features.locations < [128, 96])
    assert extractor.compiled_shapes == {(64, 64), (128, 128), (192, 256)}
    again = extractor(image)
    np.testing.assert_array_equal(again.descriptors, features.descriptors)


def test_delf_extractor_applies_the_models_pca(model, image):
    config, variables = model
    raw = DelfExtractor(config, variables, SETTINGS)(image)
    pca = learn_descriptor_pca(raw.descriptors, dim=8)
    with_pca = dataclasses.replace(config, pca_dim=8)
    features = DelfExtractor(with_pca, {**variables, "pca": pca_variables(pca)}, SETTINGS)(image)
    assert features.descriptors.shape == (40, 8)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(features.locations, raw.locations)
    with pytest.raises(ValueError, match="pca_dim=8 but its variables have no 'pca'"):
        DelfExtractor(with_pca, variables, SETTINGS)


def test_delf_extractor_attention_scores_small_images_and_maps(model, image):
    config, variables = model
    extractor = DelfExtractor(
        config, variables, dataclasses.replace(SETTINGS, keypoint_score="attention")
    )
    features = extractor(image)
    assert features.valid.all() and np.all(features.scores > 0)  # softplus
    threshold = float(np.median(features.scores))
    strict = dataclasses.replace(SETTINGS, keypoint_score="attention", score_threshold=threshold)
    kept = DelfExtractor(config, variables, strict)(image)
    assert 0 < kept.valid.sum() < 40 and np.all(kept.scores[kept.valid] >= threshold)
    assert np.all(kept.descriptors[~kept.valid] == 0)
    tiny = extractor(image[:20, :20])  # 40 px at scale 2 < 3 cells of 16 px
    assert not tiny.valid.any() and tiny.descriptors.shape == (40, 96)
    assert extractor.score_map(image).shape == (6, 8)
