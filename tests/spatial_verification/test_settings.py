import dataclasses

import pytest

from jaxretrieval.spatial_verification import (
    DEFAULT_SCALES,
    DSMSettings,
    FeatureSelection,
    MSERParams,
)


def test_dsm_settings_ours_values():
    ours = DSMSettings()
    assert ours.scales == DEFAULT_SCALES == (1.0, 2**-0.5, 0.5)
    assert ours.max_side == 512
    assert ours.mser == MSERParams()
    assert ours.mser.prune_nested and ours.mser.min_diversity is None
    assert ours.query == ours.database == FeatureSelection()
    assert ours.database == FeatureSelection(
        max_features=512, max_per_channel=None, nms_iou=0.7, nms_per_scale=False
    )
    assert not ours.separate_scales and ours.num_scales is None
    assert (ours.threshold_cells, ours.max_scale_change, ours.refinement_steps) == (2.0, 3.0, 3)
    assert ours.max_correspondences == 1024
    assert ours.shortlist_size is None and ours.min_inliers == 5
    assert (ours.num_seeds, ours.seed_candidates, ours.seeds_weighted_by_similarity) == (
        5,
        None,
        False,
    )


def test_dsm_settings_published_values():
    # osimeoni/DSM examples/test_dsm.m (CVPR19 values) and VLFeat's vl_mser defaults.
    published = DSMSettings.published()
    assert published.scales == (1.0, 2**-0.5, 0.5)
    assert published.max_side == 1024
    mser = published.mser
    assert mser.min_diversity == 0.7 and mser.opencv_min_diversity == 0.0
    assert not mser.prune_nested
    assert mser.max_variation == 0.5
    assert (mser.delta, mser.delta_quantile, mser.max_delta) == (None, 0.6, 12)
    assert mser.min_area_fraction == 0.001 and mser.max_area_fraction == 0.75
    assert mser.max_regions_per_channel == 36
    assert mser.dark_on_bright and mser.drop_degenerate and not mser.per_channel_scaling
    assert published.query == FeatureSelection(
        max_features=512, max_per_channel=20, nms_iou=None, nms_per_scale=False
    )
    assert published.database == FeatureSelection(
        max_features=512, max_per_channel=10, nms_iou=0.2, nms_per_scale=True, nms_boxes="dsm"
    )
    assert published.separate_scales and published.num_scales == 3
    assert (published.threshold_cells, published.max_scale_change) == (2.0, 3.0)
    assert published.shortlist_size == 100 and published.min_inliers == 0
    # DSM+D: the top 10 re-ranked images, weighted by similarity, kq = 5 keeps 4.
    assert published.num_seeds == 4 and published.seed_candidates == 10
    assert published.seeds_weighted_by_similarity
    # ResNet101 gets 2048 features per image (test_dsm.m: "CPVR19 2048 if ResNet").
    for backbone in ("resnet101", "resnet101_dilated"):
        resnet = DSMSettings.published(backbone)
        assert resnet.query.max_features == resnet.database.max_features == 2048
    assert DSMSettings.published("mobilenet_v2").database.max_features == 512


def test_dsm_settings_options():
    published = DSMSettings.published()
    verify = published.verify_options(16)
    assert verify == dict(
        max_correspondences=512,
        error_threshold=32.0,
        max_scale_change=3.0,
        refinement_steps=3,
        num_scales=3,
    )
    assert DSMSettings().verify_options(32)["num_scales"] is None
    rerank = published.rerank_options(16, num_ranked=40)
    assert rerank["shortlist_size"] == 40 and rerank["min_inliers"] == 0
    assert DSMSettings().rerank_options(32, num_ranked=7)["shortlist_size"] == 7
    assert published.seed_options() == dict(num_seeds=4, min_inliers=0, num_candidates=10)
    assert published.selection(as_query=True) is published.query
    assert published.selection(as_query=False) is published.database


def test_dsm_settings_are_hashable_and_frozen():
    assert hash(DSMSettings.published()) == hash(DSMSettings.published())
    assert DSMSettings.published() != DSMSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        DSMSettings().min_inliers = 0  # type: ignore[misc]
    # Scales are stored as a tuple of floats whatever sequence was given.
    assert DSMSettings(scales=[1.0, 0.5]).scales == (1.0, 0.5)


def test_dsm_settings_raises():
    with pytest.raises(ValueError, match="scales must be positive and not empty"):
        DSMSettings(scales=())
    with pytest.raises(ValueError, match="max_per_channel must be >= 1 or None, got 0"):
        FeatureSelection(max_per_channel=0)
    with pytest.raises(ValueError, match="nms_boxes must be one of"):
        FeatureSelection(nms_boxes="circle")
    with pytest.raises(ValueError, match="nms_boxes='dsm' needs nms_per_scale=True"):
        FeatureSelection(nms_boxes="dsm")
