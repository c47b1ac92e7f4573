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
    assert ar.local_features_nbytes(features) == 5 * (2 * 4 + 4 * 4 + 4 + 4 + 1)


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
