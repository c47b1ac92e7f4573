import dataclasses

import numpy as np
import pytest

from jaxretrieval.spatial_verification import activation_regions as ar

_SIZE = 32  # MSER needs blobs of a few cells; 32x32x3 maps keep these tests fast.
_BLOBS = [  # (centre (x, y), covariance in cells², amplitude)
    ((8, 8), np.array([[9.0, 0.0], [0.0, 4.0]]), 1.0),
    ((22, 10), np.array([[6.0, 3.0], [3.0, 6.0]]), 0.8),
    ((14, 24), np.array([[4.0, 0.0], [0.0, 4.0]]), 0.6),
]


def _blob(centre, cov, amplitude, size=_SIZE):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.stack([x - centre[0], y - centre[1]], -1)  # (H, W, 2)
    mahalanobis = np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(cov), d)
    # ReLU of a Gaussian bump: zero background, like post-ReLU activations.
    return np.maximum(amplitude * np.exp(-0.5 * mahalanobis) - 0.2, 0.0)


def _blob_map(blobs=_BLOBS):
    return np.stack([_blob(*b) for b in blobs], axis=-1).astype(np.float32)  # (H, W, C)


def _valid(features):
    keep = np.asarray(features.valid)
    return {name: np.asarray(value)[keep] for name, value in features._asdict().items()}


@pytest.mark.parametrize("stride", [1.0, 16.0])
def test_activation_local_features_finds_blobs(stride):
    features = ar.activation_local_features([(_blob_map(), stride)], max_features=8)
    got = _valid(features)
    # One feature per blob, strongest first, in the blob's channel.
    np.testing.assert_array_equal(got["channels"], [0, 1, 2])
    np.testing.assert_allclose(got["strengths"], [0.8, 0.6, 0.4], atol=1e-6)
    for k, (centre, cov, amplitude) in enumerate(_BLOBS):
        # Cell centre (x + 0.5) * stride - 0.5 in image pixels.
        np.testing.assert_allclose(
            got["means"][k], (np.array(centre) + 0.5) * stride - 0.5, atol=0.3
        )
        found = got["covariances"][k] / stride**2
        # The region is a level set of the Gaussian: an ellipse with the blob's shape.
        shape = found / np.sqrt(np.linalg.det(found))
        np.testing.assert_allclose(shape, cov / np.sqrt(np.linalg.det(cov)), rtol=0.15, atol=0.05)
        # Its size is at most the blob's support (r² / 4 * cov for the uniform ellipse).
        support = 2 * np.log(amplitude / 0.2) / 4 * cov
        ratio = np.sqrt(np.linalg.det(found) / np.linalg.det(support))
        assert 0.5 < ratio < 1.1, ratio


def test_activation_local_features_padding_and_truncation():
    features = ar.activation_local_features([(_blob_map(), 1.0)], max_features=5)
    assert features.means.shape == (5, 2) and features.covariances.shape == (5, 2, 2)
    assert features.channels.dtype == np.int32 and features.means.dtype == np.float32
    np.testing.assert_array_equal(features.valid, [True, True, True, False, False])
    np.testing.assert_array_equal(features.means[3:], 0.0)
    np.testing.assert_array_equal(features.strengths[3:], 0.0)
    top2 = ar.activation_local_features([(_blob_map(), 1.0)], max_features=2)
    np.testing.assert_array_equal(top2.channels, [0, 1])
    assert top2.valid.all()
    # means, covariances, strengths, channels, valid, scale_ids
    assert ar.local_features_nbytes(features) == 5 * (2 * 4 + 4 * 4 + 4 + 4 + 1 + 4)
    np.testing.assert_array_equal(features.scale_ids, 0)


def test_activation_local_features_empty_map():
    features = ar.activation_local_features(
        [(np.zeros((8, 8, 4), np.float32), 1.0)], max_features=3
    )
    assert not features.valid.any()


def test_activation_local_features_nms_across_channels():
    # The same blob in two channels: NMS keeps the stronger channel only.
    same = np.stack([_blob(*_BLOBS[0]), 0.5 * _blob(*_BLOBS[0])], axis=-1).astype(np.float32)
    kept = _valid(ar.activation_local_features([(same, 1.0)], max_features=4))
    np.testing.assert_array_equal(kept["channels"], [0])
    both = _valid(ar.activation_local_features([(same, 1.0)], max_features=4, nms_iou=1.0))
    np.testing.assert_array_equal(both["channels"], [0, 1])


def test_activation_local_features_merges_scales():
    blob_map = _blob_map()
    half = blob_map[::2, ::2]  # the map of the image at scale 1/2: stride 2 in image pixels
    merged = _valid(
        ar.activation_local_features([(blob_map, 1.0), (half, 2.0)], max_features=8, nms_iou=0.5)
    )
    single = _valid(ar.activation_local_features([(blob_map, 1.0)], max_features=8))
    # The half-scale features of each blob land on the full-scale ones (box IoU > 0.5) and are
    # suppressed
    # (equal strength; the full-scale features come first).
    np.testing.assert_allclose(merged["means"], single["means"])
    no_nms = _valid(
        ar.activation_local_features([(blob_map, 1.0), (half, 2.0)], max_features=8, nms_iou=1.0)
    )
    assert len(no_nms["channels"]) == 6
    np.testing.assert_allclose(
        np.sort(no_nms["means"][:, 0]), np.sort(np.repeat(single["means"][:, 0], 2)), atol=1.0
    )


def test_prune_nested_regions_known_values():
    def square(x0, y0, side):
        ys, xs = np.mgrid[y0 : y0 + side, x0 : x0 + side]
        return np.stack([xs.ravel(), ys.ravel()], -1)

    outer = square(0, 0, 4)  # contains `middle` and `spot`
    middle = square(0, 0, 2)  # contains `inner` only
    inner = square(0, 0, 1)
    spot = square(3, 3, 1)
    # inner is the only child of middle: dropped. middle and spot are both children of
    # outer, so outer is a merge and every chain's outermost region survives.
    kept = ar.prune_nested_regions([inner, middle, outer, spot], (6, 6))
    np.testing.assert_array_equal(kept, [1, 2, 3])
    # A pure chain keeps its outermost region only.
    np.testing.assert_array_equal(ar.prune_nested_regions([inner, middle], (6, 6)), [1])


def test_quantize_activations_and_automatic_delta():
    x = np.array([[[0.0, 1.0], [2.0, -1.0]]], np.float32)  # (1, 2, 2)
    np.testing.assert_array_equal(ar.quantize_activations(x), [[[0, 128], [255, 0]]])
    np.testing.assert_array_equal(
        ar.quantize_activations(x, per_channel=True), [[[0, 255], [255, 0]]]
    )
    values = np.arange(0, 11, dtype=np.uint8)  # non-zero values 1..10: 0.6 quantile = 6.4
    assert ar.automatic_delta(values, ar.MSERParams()) == 6
    assert ar.automatic_delta(values * 20, ar.MSERParams()) == 12  # capped
    assert ar.automatic_delta(values, ar.MSERParams(delta=3)) == 3
    assert ar.automatic_delta(np.zeros(4, np.uint8), ar.MSERParams()) == 1


def test_ellipse_boxes_and_box_iou_known_values():
    boxes = ar.ellipse_boxes(np.array([[10.0, 20.0]]), np.array([[[4.0, 1.0], [1.0, 9.0]]]))
    np.testing.assert_allclose(boxes, [[6.0, 14.0, 14.0, 26.0]])  # half-extents 2*2, 2*3
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    np.testing.assert_allclose(ar.box_iou(a, b), [[2.0 / 6.0, 0.0]])


def test_non_maximum_suppression_known_values():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 2, 2.1], [5, 5, 6, 6], [0.1, 0, 2, 2]], np.float64)
    strengths = np.array([1.0, 3.0, 2.0, 3.0])
    kept = ar.non_maximum_suppression(boxes, strengths, iou_threshold=0.5, max_keep=10)
    # 1 (strongest, lower index of the tie) suppresses 3 and 0; then 2.
    np.testing.assert_array_equal(kept, [1, 2])
    capped = ar.non_maximum_suppression(boxes, strengths, iou_threshold=0.5, max_keep=1)
    np.testing.assert_array_equal(capped, [1])


def test_activation_local_features_raises():
    good = np.zeros((8, 8, 2), np.float32)
    with pytest.raises(ValueError, match="activation_maps is empty"):
        ar.activation_local_features([])
    with pytest.raises(
        ValueError, match=r"activation_maps\[0\] must have shape \(H, W, C\), found shape \(8, 8\)"
    ):
        ar.activation_local_features([(good[..., 0], 1.0)])
    with pytest.raises(ValueError, match="stride must be positive, got 0"):
        ar.activation_local_features([(good, 0)])
    with pytest.raises(TypeError, match=r"activation_maps\[0\] must be floating, got dtype"):
        ar.activation_local_features([(good.astype(np.uint8), 1.0)])
    with pytest.raises(ValueError, match="max_features must be >= 1"):
        ar.activation_local_features([(good, 1.0)], max_features=0)
    with pytest.raises(ValueError, match="needs at least one"):
        ar.stack_local_features([])


# ----------------------------------------------------------- published DSM feature selection

_GRID = 8  # cells between blob centres
_GRID_SIZE = 7 * _GRID  # a 7 x 7 grid of blob slots on a 56 x 56 map


def _grid_channel(count, amplitudes):
    """One channel with `count` well-separated blobs of the given amplitudes."""
    y, x = np.mgrid[0:_GRID_SIZE, 0:_GRID_SIZE].astype(np.float64)
    channel = np.zeros((_GRID_SIZE, _GRID_SIZE))
    for k in range(count):
        cx, cy = _GRID // 2 + _GRID * (k % 7), _GRID // 2 + _GRID * (k // 7)
        bump = amplitudes[k] * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5**2))
        channel += np.maximum(bump - 0.2, 0.0)  # peak amplitude - 0.2 at the blob centre
    return channel


def _budget_map():
    """Channels with 25, 40, 3 and 36 blobs; amplitudes all distinct, peaks on cells."""
    counts = (25, 40, 3, 36)
    rng = np.random.default_rng(0)
    amplitudes = [rng.permutation(np.linspace(0.6, 1.0, n)) for n in counts]
    channels = [_grid_channel(n, a) for n, a in zip(counts, amplitudes, strict=True)]
    return np.stack(channels, axis=-1).astype(np.float32), amplitudes


def _kept_per_channel(features, num_channels=4):
    got = _valid(features)
    return [np.sort(got["strengths"][got["channels"] == c])[::-1] for c in range(num_channels)]


def test_activation_local_features_finds_every_grid_blob():
    activations, amplitudes = _budget_map()
    kept = _kept_per_channel(
        ar.activation_local_features([(activations, 1.0)], max_features=128, nms_iou=None)
    )
    for c, amplitude in enumerate(amplitudes):
        np.testing.assert_allclose(kept[c], np.sort(amplitude)[::-1] - 0.2, atol=1e-5)


@pytest.mark.parametrize("budget", [20, 10])  # DSM's query and database budgets
def test_activation_local_features_per_channel_budget_and_channel_drop(budget):
    activations, amplitudes = _budget_map()
    features = ar.activation_local_features(
        [(activations, 1.0)],
        max_features=128,
        mser=ar.MSERParams(max_regions_per_channel=36),
        nms_iou=None,
        max_per_channel=budget,
    )
    kept = _kept_per_channel(features)
    # 25 blobs: the `budget` strongest. 40 > 36 regions: the channel is dropped. 3: all.
    # 36 regions is not more than 36: kept, then budgeted.
    assert [len(k) for k in kept] == [budget, 0, 3, budget]
    for c in (0, 2, 3):
        strongest = np.sort(amplitudes[c])[::-1][: len(kept[c])] - 0.2
        np.testing.assert_allclose(kept[c], strongest, atol=1e-5)


def test_activation_local_features_budget_is_per_scale():
    activations, _ = _budget_map()
    features = ar.activation_local_features(
        [(activations, 1.0), (activations, 1.0)], max_features=256, nms_iou=None, max_per_channel=2
    )
    got = _valid(features)
    counts = np.zeros((2, 4), int)
    np.add.at(counts, (got["scale_ids"], got["channels"]), 1)
    np.testing.assert_array_equal(counts, [[2, 2, 2, 2], [2, 2, 2, 2]])


def test_strongest_per_channel_known_values():
    channels = np.array([3, 1, 3, 3, 1, 0])
    strengths = np.array([0.5, 0.9, 0.7, 0.5, 0.2, 0.1])
    # Channel 3: 0.7 (index 2), then the tie 0.5: the lower index (0) first.
    np.testing.assert_array_equal(
        ar.strongest_per_channel(channels, strengths, max_per_channel=2), [0, 1, 2, 4, 5]
    )
    np.testing.assert_array_equal(
        ar.strongest_per_channel(channels, strengths, max_per_channel=1), [1, 2, 5]
    )
    assert ar.strongest_per_channel(channels[:0], strengths[:0], max_per_channel=1).size == 0


def test_published_nms_only_on_database_images():
    from jaxretrieval.spatial_verification import DSMSettings

    # The same blob in two channels (as in test_activation_local_features_nms_across_channels).
    same = np.stack([_blob(*_BLOBS[0]), 0.5 * _blob(*_BLOBS[0])], axis=-1).astype(np.float32)
    published = DSMSettings.published()
    mser = ar.MSERParams()  # one region per blob, so that the counts are known

    def channels(selection):
        features = ar.activation_local_features(
            [(same, 1.0)], mser=mser, **dataclasses.asdict(selection)
        )
        return _valid(features)["channels"]

    np.testing.assert_array_equal(channels(published.query), [0, 1])  # no NMS on a query
    np.testing.assert_array_equal(channels(published.database), [0])  # NMS IoU 0.2
    ours = DSMSettings()
    np.testing.assert_array_equal(channels(ours.query), [0])
    np.testing.assert_array_equal(channels(ours.database), [0])


def test_activation_local_features_nms_per_scale():
    blob_map = _blob_map()
    half = blob_map[::2, ::2]  # the same blobs at scale 1/2 (stride 2)
    maps = [(blob_map, 1.0), (half, 2.0)]
    across = _valid(ar.activation_local_features(maps, max_features=8, nms_iou=0.5))
    per_scale = _valid(
        ar.activation_local_features(maps, max_features=8, nms_iou=0.5, nms_per_scale=True)
    )
    # Across scales a blob's half-scale feature is suppressed by its full-scale one; per
    # scale nothing overlaps (three separate blobs per map) and both are kept.
    np.testing.assert_array_equal(np.sort(across["scale_ids"]), [0, 0, 0])
    np.testing.assert_array_equal(np.sort(per_scale["scale_ids"]), [0, 0, 0, 1, 1, 1])
    dsm_boxes = _valid(
        ar.activation_local_features(
            maps, max_features=8, nms_iou=0.2, nms_per_scale=True, nms_boxes="dsm"
        )
    )
    np.testing.assert_array_equal(np.sort(dsm_boxes["scale_ids"]), [0, 0, 0, 1, 1, 1])


def test_diverse_regions_known_values():
    def square(x0, y0, side):
        ys, xs = np.mgrid[y0 : y0 + side, x0 : x0 + side]
        return np.stack([xs.ravel(), ys.ravel()], -1)

    inner, middle, outer, spot = square(0, 0, 1), square(0, 0, 2), square(0, 0, 4), square(3, 3, 1)
    regions = [inner, middle, outer, spot]  # areas 1, 4, 16, 1
    # 0.7: middle vs outer (16 - 4) / 16 = 0.75 and inner vs middle 0.75: all kept.
    np.testing.assert_array_equal(
        ar.diverse_regions(regions, (6, 6), min_diversity=0.7), [0, 1, 2, 3]
    )
    # 0.8: middle is dropped; inner is then compared with the nearest kept region, outer
    # (15 / 16 = 0.94), and kept.
    np.testing.assert_array_equal(ar.diverse_regions(regions, (6, 6), min_diversity=0.8), [0, 2, 3])
    # A chain of near-equal areas keeps its outermost region only.
    chain = [square(0, 0, 3), square(0, 0, 3)[:8], square(0, 0, 3)[:7]]  # areas 9, 8, 7
    np.testing.assert_array_equal(ar.diverse_regions(chain, (6, 6), min_diversity=0.7), [0])


def _degenerate_map(size=24):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    line = np.zeros((size, size))
    line[10, 5:11] = 1.0  # one row: a singular second-moment matrix
    thin = np.zeros((size, size))
    thin[3:12, 5] = 1.0  # a column and one more cell: its one-sigma box is one cell wide
    thin[7, 6] = 1.0
    blob = np.maximum(np.exp(-((x - 17) ** 2 + (y - 17) ** 2) / (2 * 2.0**2)) - 0.2, 0.0)
    radius = np.hypot(x - 6, y - 17)
    ring = np.where((radius >= 2) & (radius <= 4), 1.0, 0.0)
    ring[radius < 2] = 0.3  # a dark-on-bright hole that still holds activation
    empty_ring = np.where((radius >= 2) & (radius <= 4), 1.0, 0.0)  # its hole holds none
    return np.stack([line, thin, blob, ring, empty_ring], axis=-1).astype(np.float32)


@pytest.mark.parametrize(
    "options, channels",
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"drop_degenerate": True}, [2, 3, 4]),
        ({"dark_on_bright": True}, [0, 1, 2, 3, 3, 4, 4]),
        ({"dark_on_bright": True, "drop_degenerate": True}, [2, 3, 3, 4]),
    ],
)
def test_activation_local_features_polarity_and_degenerate_regions(options, channels):
    features = ar.activation_local_features(
        [(_degenerate_map(), 1.0)], max_features=16, mser=ar.MSERParams(**options), nms_iou=None
    )
    np.testing.assert_array_equal(np.sort(_valid(features)["channels"]), channels)


def test_activation_local_features_min_area_fraction():
    # 32 x 32 cells and 0.01: regions of fewer than 10.24 cells go; the blobs are bigger.
    blob_map = _blob_map()
    small = ar.MSERParams(min_area_fraction=0.01)
    kept = _valid(ar.activation_local_features([(blob_map, 1.0)], max_features=8, mser=small))
    np.testing.assert_array_equal(kept["channels"], [0, 1, 2])
    large = ar.MSERParams(min_area_fraction=0.2)  # 205 cells: larger than every blob
    assert not ar.activation_local_features([(blob_map, 1.0)], mser=large).valid.any()


def test_stack_local_features_scale_ids():
    features = ar.activation_local_features([(_blob_map(), 1.0)], max_features=4)
    stacked = ar.stack_local_features([features, features])
    assert stacked.scale_ids.shape == (2, 4)
    without = features._replace(scale_ids=None)
    assert ar.stack_local_features([without, without]).scale_ids is None
    with pytest.raises(ValueError, match="scale_ids is None for 1 of 2 images"):
        ar.stack_local_features([features, without])


def test_activation_local_features_selection_raises():
    good = np.zeros((8, 8, 2), np.float32)
    with pytest.raises(ValueError, match="max_per_channel must be >= 1 or None, got 0"):
        ar.activation_local_features([(good, 1.0)], max_per_channel=0)
    with pytest.raises(ValueError, match="nms_boxes must be one of"):
        ar.activation_local_features([(good, 1.0)], nms_boxes="circle")
    with pytest.raises(ValueError, match="it needs nms_per_scale=True"):
        ar.activation_local_features([(good, 1.0)], nms_boxes="dsm")
