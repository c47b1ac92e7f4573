import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import cam_regions, extraction, pooling, retrieval_model
from jaxretrieval.normalization import l2_normalize
from tests.reference import cam_regions_reference as ref

# ----------------------------------------------------------------------------- boxes


def test_largest_component_box_known_values():
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:5] = True  # 9 cells
    mask[4, 5] = True  # touches the block diagonally: 8-connected, same component
    mask[0, 7] = mask[5, 0] = True  # isolated cells
    box, found = cam_regions.largest_component_box(mask)
    assert found and box.tolist() == [1, 2, 5, 6]
    # Equal areas: the component met first in raster order wins.
    tie = np.zeros((4, 6), bool)
    tie[2:4, 0:2] = tie[0:2, 4:6] = True
    assert cam_regions.largest_component_box(tie)[0].tolist() == [0, 4, 2, 6]
    box, found = cam_regions.largest_component_box(np.zeros((3, 3), bool))
    assert not found and box.tolist() == [0, 0, 0, 0]


def test_largest_component_box_matches_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 9)) < 0.35
        box, found = cam_regions.largest_component_box(mask)
        expected = ref.largest_component_box(mask)
        assert found == (expected is not None)
        if found:  # ties included: both take the component met first in raster order
            assert tuple(box.tolist()) == expected


def _synthetic_cams():
    """(1, 2, 6, 8) CAMs, real size 5x7 (row 5 and column 7 are padding)."""
    cams = np.zeros((1, 2, 6, 8), np.float32)
    cams[0, 0, 1:4, 1:5] = 0.4  # a wide blob...
    cams[0, 0, 2:3, 2:4] = 1.0  # ...with a peak
    cams[0, 0, 4, 6] = 0.5  # a separate small blob (one cell)
    cams[0, 0, 5, :] = 9.0  # padding: must not count, even as the maximum
    return cams


def test_cam_boxes_on_synthetic_cams():
    boxes, valid = cam_regions.cam_boxes(
        _synthetic_cams(), thresholds=(0.3, 0.45, 0.9), map_sizes=np.array([[5, 7]])
    )
    assert boxes.shape == (1, 7, 4) and valid.shape == (1, 7)
    assert boxes[0, 0].tolist() == [0, 0, 5, 7]  # region 0: the real image
    # Class 0: t=0.3 -> the wide blob (12 cells beats 1); t=0.45 -> the peak (2 cells)
    # beats the single 0.5 cell; t=0.9 -> the peak.
    assert boxes[0, 1:4].tolist() == [[1, 1, 4, 5], [2, 2, 3, 4], [2, 2, 3, 4]]
    # Class 1 is all zeros: no proposals.
    assert valid[0].tolist() == [True, True, True, True, False, False, False]
    np.testing.assert_array_equal(boxes[0, 4:], 0)
    # Without map sizes the padding row is the maximum and the largest blob.
    boxes, _ = cam_regions.cam_boxes(_synthetic_cams(), thresholds=(0.5,), include_image=False)
    assert boxes[0, 0].tolist() == [5, 0, 6, 8]


def test_cam_boxes_min_side_and_errors(without_annotation_checks):
    _, valid = cam_regions.cam_boxes(
        _synthetic_cams(), thresholds=(0.3, 0.9), map_sizes=np.array([[5, 7]]), min_side=2
    )
    assert valid[0].tolist() == [True, True, False, False, False]  # the peak is 1 row high
    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        cam_regions.cam_boxes(_synthetic_cams(), thresholds=(0.0,))
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        cam_regions.cam_boxes(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="exceed"):
        cam_regions.cam_boxes(_synthetic_cams(), map_sizes=np.array([[7, 7]]))


# ----------------------------------------------------------------------------- pooling


def _spoc(features, mask):
    return l2_normalize(pooling.spoc(features, valid=mask))


def test_regional_descriptors_pool_inside_each_box():
    rng = np.random.default_rng(1)
    features = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    boxes = np.array(
        [[[0, 0, 4, 5], [1, 1, 3, 4], [0, 0, 0, 0]], [[0, 0, 3, 4], [2, 0, 3, 1], [0, 3, 3, 4]]],
        np.int32,
    )
    box_valid = np.array([[True, True, False], [True, True, True]])
    valid = np.zeros((2, 4, 5), bool)
    valid[0], valid[1, :3, :4] = True, True  # image 1 is padded
    fn = jax.jit(functools.partial(cam_regions.regional_descriptors, pool=_spoc))
    out = np.asarray(fn(features, boxes, box_valid, valid=valid))
    assert out.shape == (2, 3, 3)
    for b in range(2):
        for r in range(3):
            if not box_valid[b, r]:
                np.testing.assert_array_equal(out[b, r], 0.0)
                continue
            top, left, bottom, right = boxes[b, r]
            mean = features[b, top:bottom, left:right].reshape(-1, 3).mean(axis=0)
            np.testing.assert_allclose(out[b, r], mean / np.linalg.norm(mean), rtol=1e-5)
    # The whole-image box is the image's own descriptor.
    np.testing.assert_allclose(out[:, 0], _spoc(features, valid), rtol=1e-6)


# ----------------------------------------------------------------------------- re-ranking


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _problem(seed, num_queries=3, num_database=12, num_regions=4, dim=6):
    rng = np.random.default_rng(seed)
    queries = _unit(rng.normal(size=(num_queries, dim)))
    database = _unit(rng.normal(size=(num_database, dim)))
    regions = _unit(rng.normal(size=(num_database, num_regions, dim)))
    valid = rng.random((num_database, num_regions)) < 0.7
    valid[3] = False  # an image without proposals: falls back on its global score
    return queries, database, regions * valid[..., None], valid


@pytest.mark.parametrize(("shortlist_size", "num_expansion"), [(5, 0), (5, 2), (12, 3)])
def test_region_rerank_matches_reference(shortlist_size, num_expansion):
    queries, database, regions, valid = _problem(2)
    fn = jax.jit(
        functools.partial(
            cam_regions.region_rerank,
            shortlist_size=shortlist_size,
            num_expansion=num_expansion,
        )
    )
    out = fn(queries, database, regions, valid)
    expected = ref.region_rerank(queries, database, regions, valid, shortlist_size, num_expansion)
    np.testing.assert_array_equal(out.ranks, expected)
    assert out.ranks.shape == (3, 12) and out.shortlist.shape == (3, shortlist_size)


def test_region_rerank_leave_one_out_matches_reference():
    queries, database, regions, valid = _problem(3, num_queries=12)
    queries = database  # every image queries the others
    exclude = np.arange(12)
    out = cam_regions.rerank_with_regions(
        queries,
        database,
        cam_regions.RegionDescriptors(regions, valid, None, None, None, [], []),
        shortlist_size=6,
        num_expansion=2,
        exclude=exclude,
    )
    expected = ref.region_rerank(queries, database, regions, valid, 6, 2, exclude=exclude)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[:, -1], exclude)  # the query itself is last


def test_region_rerank_known_values():
    """A database image whose global descriptor misses but one region matches moves up."""
    query = np.array([[1.0, 0.0, 0.0]], np.float32)
    database = _unit(np.array([[0.8, 0.6, 0.0], [0.6, 0.0, 0.8], [0.0, 1.0, 0.0]]))
    regions = np.zeros((3, 2, 3), np.float32)
    regions[0, 0] = database[0]
    regions[1] = [database[1], [1.0, 0.0, 0.0]]  # image 1 contains the query's object
    regions[2, 0] = database[2]
    valid = np.array([[True, False], [True, True], [True, False]])
    out = cam_regions.region_rerank(
        query, database, regions, valid, shortlist_size=2, num_expansion=0
    )
    assert out.ranks.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(out.shortlist_scores, [[1.0, 0.8]], rtol=1e-6)
    assert out.best_regions.tolist() == [[1, 0]]
    # QE with the top image's best region (the query's own direction) and the global
    # ranking of q' = l2(q + region) = q: image 0 (0.8) before 1 (0.6) again.
    out = cam_regions.region_rerank(
        query, database, regions, valid, shortlist_size=2, num_expansion=1
    )
    assert out.ranks.tolist() == [[0, 1, 2]]


def test_region_rerank_raises(without_annotation_checks):
    queries, database, regions, valid = _problem(4)
    with pytest.raises(ValueError, match=r"shortlist_size must be in \[1, 12\]"):
        cam_regions.region_rerank(queries, database, regions, valid, shortlist_size=13)
    with pytest.raises(ValueError, match=r"num_expansion must be in \[0, 5\]"):
        cam_regions.region_rerank(
            queries, database, regions, valid, shortlist_size=5, num_expansion=6
        )
    with pytest.raises(ValueError, match="must share N and D"):
        cam_regions.region_rerank(queries, database, regions[:, :, :4], valid)
    with pytest.raises(ValueError, match="same model"):
        cam_regions.rerank_with_regions(
            queries[:, :4],
            database[:, :4],
            cam_regions.RegionDescriptors(regions, valid, None, None, None, [], []),
        )


# ----------------------------------------------------------------------------- real images


def test_extractor_region_0_is_the_global_descriptor(shared_data, tmp_path):
    """One real-backbone check at 64 px: region 0 of every image equals the Extractor's."""
    paths = sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[:3]
    config = retrieval_model.ModelConfig(max_side=64)
    variables = retrieval_model.init_model_variables(config)
    extractor = cam_regions.CAMRegionExtractor(config, variables, batch_size=2)
    regions = extractor(paths, thresholds=(0.2, 0.5), num_box_classes=2)
    assert regions.descriptors.shape == (3, 5, 1280) and regions.valid[:, 0].all()
    expected = extraction.Extractor(config, variables, extraction.ExtractionSettings(batch_size=2))(
        paths, progress=False
    )
    np.testing.assert_allclose(regions.descriptors[:, 0], expected.descriptors, atol=2e-5)
    norms = np.linalg.norm(regions.descriptors, axis=-1)
    np.testing.assert_allclose(norms[regions.valid], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(norms[~regions.valid], 0.0)
    top, left, bottom, right = np.moveaxis(regions.boxes, -1, 0)
    assert np.all(
        bottom[regions.valid] <= regions.map_sizes[:, None, 0].repeat(5, 1)[regions.valid]
    )
    assert np.all((bottom > top)[regions.valid] & (right > left)[regions.valid])
    # map_images: any function of the same feature maps, unreadable files as zeros.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    mapped, failures = extractor.map_images(
        [*paths, broken], lambda x, valid: l2_normalize(pooling.gem(x, 3.0, valid=valid))
    )
    np.testing.assert_allclose(mapped[:3], expected.descriptors, atol=2e-5)
    np.testing.assert_array_equal(mapped[3], 0.0)
    assert [path for path, _ in failures] == [str(broken)]


def test_extractor_needs_a_classifier_and_a_maskable_pooling():
    config = retrieval_model.ModelConfig(max_side=64, pooling="rmac")
    variables = {"params": {"backbone": {"classifier": {}}}}
    with pytest.raises(ValueError, match="cannot pool inside a box"):
        cam_regions.CAMRegionExtractor(config, variables)
    with pytest.raises(ValueError, match="need a classifier"):
        cam_regions.CAMRegionExtractor(config, {"params": {"backbone": {}}})


def test_region_rerank_jit_matches_eager():
    queries, database, regions, valid = _problem(5)
    kwargs = dict(shortlist_size=4, num_expansion=2)
    eager = cam_regions.region_rerank(queries, database, regions, valid, **kwargs)
    jitted = jax.jit(functools.partial(cam_regions.region_rerank, **kwargs))(
        jnp.asarray(queries), database, regions, valid
    )
    np.testing.assert_array_equal(eager.ranks, jitted.ranks)
