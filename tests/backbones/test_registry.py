import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import backbones
from jaxretrieval.backbones import BACKBONES, BackboneSpec, load_backbone, normalize_images


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_spec_fields_are_consistent(name):
    spec = BACKBONES[name]
    assert isinstance(spec, BackboneSpec) and spec.name == name
    assert len(spec.input_mean) == 3 and len(spec.input_std) == 3
    assert all(0.0 < s <= 1.0 for s in spec.input_std)
    module = spec.module(freeze_batch_stats=True, dtype=jnp.float32)
    size = 2 * spec.feature_stride
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    _, features = jax.eval_shape(module.apply, variables, x)
    assert features[spec.feature_name].shape == (1, 2, 2, spec.feature_channels)


def test_load_backbone_mobilenet_v2():
    module, variables, spec = load_backbone("mobilenet_v2", freeze_batch_stats=True)
    assert spec is BACKBONES["mobilenet_v2"]
    assert module.freeze_batch_stats
    assert variables["params"]["classifier"]["kernel"].shape == (1280, 1000)


def test_load_backbone_unknown_name():
    with pytest.raises(KeyError, match="unknown backbone 'alexnet'.*mobilenet_v2"):
        load_backbone("alexnet")


def test_normalize_images_known_values():
    spec = BACKBONES["mobilenet_v2"]
    images = np.zeros((2, 1, 3, 3), np.float32)
    images[1] = 255.0
    out = normalize_images(images, spec)
    assert out.shape == (2, 1, 3, 3) and out.dtype == jnp.float32
    mean, std = np.array(spec.input_mean), np.array(spec.input_std)
    np.testing.assert_allclose(out[0, 0, 0], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 2], (1 - mean) / std, rtol=1e-6)


def test_imagenet_constants():
    assert backbones.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert backbones.IMAGENET_STD == (0.229, 0.224, 0.225)


# vgg16's shipped weights are tested in test_vgg.py.
@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet101_dilated"])
def test_load_backbone_without_offline_weights_says_what_to_do(name):
    with pytest.raises(FileNotFoundError, match="no ImageNet weights.*torchvision"):
        load_backbone(name)


def test_resnet101_dilated_preset():
    assert BACKBONES["resnet101_dilated"].module().last_stage_dilation
    assert not BACKBONES["resnet101"].module().last_stage_dilation
