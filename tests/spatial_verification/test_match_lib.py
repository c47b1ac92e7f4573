"""Smoke test of the DSM matching pipeline on a real image pair (small, one scale)."""

import numpy as np
import pytest

from experiments import match_lib
from jaxretrieval.spatial_verification import DSMFeatureExtractor, ImageTooSmallError


def test_match_lib_box_pair(shared_data):
    folder = shared_data / "opencv_box_pair"
    extractor = DSMFeatureExtractor.pretrained(scales=(1.0,), max_features=64)
    box = extractor.load(folder / "box.png", max_side=256)
    scene = extractor.load(folder / "box_in_scene.png", max_side=256)
    features_box, features_scene = extractor(box), extractor(scene)
    assert features_box.means.shape == (64, 2) and features_box.valid.any()
    same = match_lib.match_features(features_box, features_box, error_threshold=4.0)
    # An image against itself: every tentative same-channel pair of a feature with itself
    # is an inlier of the identity. (A tight threshold: with a loose one, pairs of distinct
    # nearby features of one channel join the inliers, and a least-squares refit on pairs
    # noisy on both sides is biased towards a shrink.)
    assert same["num_inliers"] >= int(features_box.valid.sum())
    np.testing.assert_allclose(same["transform"], [[1, 0, 0], [0, 1, 0]], atol=0.02)
    pair = match_lib.match_features(features_box, features_scene, error_threshold=64.0)
    assert pair["points_a"].shape == (pair["num_inliers"], 2)
    picture = match_lib.draw_matches(box, scene, pair["points_a"], pair["points_b"])
    assert picture.shape == (max(box.shape[0], scene.shape[0]), box.shape[1] + scene.shape[1], 3)


def test_small_images_keep_their_larger_scales_and_tiny_ones_are_refused():
    extractor = DSMFeatureExtractor.pretrained(max_features=16)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    maps = extractor.activation_maps(image)
    # 150 px high: scale 1 (5 cells) and 1/sqrt(2) (106 px, 4 cells) are kept; 1/2 (75 px,
    # less than 3 cells of 32 px) is left out.
    assert [m.shape[0] for m, _ in maps] == [5, 4]
    with pytest.raises(ImageTooSmallError, match="1 x 1 pixels"):
        extractor(np.zeros((1, 1, 3), np.uint8))
