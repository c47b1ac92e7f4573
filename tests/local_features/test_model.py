import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.backbones import vgg
from jaxretrieval.local_features import (
    DelfConfig,
    DelfModel,
    apply_descriptor_pca,
    init_delf_variables,
    learn_descriptor_pca,
    make_delf_model,
    pca_from_variables,
    pca_variables,
)


def test_delf_config_defaults_and_json_round_trip():
    config = DelfConfig(num_classes=293)
    assert config.feature_stride == 16 and config.receptive_field.size == 267
    assert config.last_backbone_layer == "block13"
    assert DelfConfig.from_json_dict(config.to_json_dict()) == config
    assert DelfConfig(backbone="vgg16", feature_name="conv5_3").last_backbone_layer == "conv5_3"


def test_delf_config_raises():
    with pytest.raises(ValueError, match="no receptive-field geometry"):
        DelfConfig(backbone="efficientnet_lite0", feature_name="last_conv")
    with pytest.raises(ValueError, match="keypoint_score must be one of"):
        DelfConfig(keypoint_score="sift")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        DelfConfig(num_classes=0)
    with pytest.raises(ValueError, match=r"unknown DELF fields \['colour'\]"):
        DelfConfig.from_json_dict({**DelfConfig().to_json_dict(), "colour": 1})


def _tiny_model():
    # VGG16 at base width 2: conv3_3 has stride 4 and 8 channels.
    return DelfModel(
        backbone=vgg.VGG16(base_width=2),
        feature_name="conv3_3",
        feature_stride=4,
        num_classes=3,
        attention_hidden=4,
    )


def _variables(model, *args):
    """Random variables of the right shapes (Flax's init compiles slowly on loaded CPUs)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


def test_delf_model_outputs_and_masks():
    model = _tiny_model()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 24, 3)), jnp.float32)
    sizes = np.array([[16, 24], [8, 12]], np.int32)
    variables = _variables(model, images, sizes)
    assert set(variables["params"]) == {
        "backbone",
        "descriptor_classifier",
        "attention",
        "attention_classifier",
    }
    out = jax.jit(model.apply)(variables, images, sizes)
    assert out["features"].shape == (2, 4, 6, 8) and out["scores"].shape == (2, 4, 6)
    assert out["descriptor_logits"].shape == out["attention_logits"].shape == (2, 3)
    assert np.asarray(out["valid"]).sum(axis=(1, 2)).tolist() == [24, 6]
    assert bool(jnp.all(out["scores"] >= 0))
    assert jax.eval_shape(model.apply, variables, images)["valid"] is None


def test_delf_model_attention_loss_does_not_reach_the_backbone():
    model = _tiny_model()
    images = jnp.asarray(np.random.default_rng(1).normal(size=(1, 16, 16, 3)), jnp.float32)
    variables = _variables(model, images)

    @jax.jit
    def grads(v):
        def total(v, output):
            return jnp.sum(model.apply(v, images)[output])

        return [jax.grad(total)(v, o)["params"] for o in ("attention_logits", "descriptor_logits")]

    attention, descriptor = grads(variables)
    norm = lambda tree: sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(tree))  # noqa: E731
    assert norm(attention["backbone"]) == 0.0 and norm(attention["attention"]) > 0
    assert norm(descriptor["backbone"]) > 0 and norm(descriptor["attention"]) == 0.0


def test_descriptor_pca_round_trip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pca = learn_descriptor_pca(x, dim=12)
    projection, mean = np.asarray(pca.projection, np.float64), np.asarray(pca.mean, np.float64)
    np.testing.assert_allclose(projection @ projection.T, np.eye(12), atol=1e-5)  # orthonormal
    coordinates = (unit - mean) @ projection.T  # (N, 12)
    np.testing.assert_allclose(coordinates @ projection + mean, unit, atol=1e-5)  # round trip
    variances = np.var(coordinates, axis=0)
    assert np.all(np.diff(variances) <= 1e-9)  # most significant direction first
    # Whitening: unit variance along every kept direction.
    whitened = learn_descriptor_pca(x, dim=5, whitening=True)
    assert whitened.projection.shape == (5, 12)
    centred = (unit - np.asarray(whitened.mean)) @ np.asarray(whitened.projection, np.float64).T
    np.testing.assert_allclose(np.cov(centred.T, bias=True), np.eye(5), atol=1e-3)
    # Applying: l2(P (l2(f) - m)), unit rows; jit equals eager.
    out = apply_descriptor_pca(learn_descriptor_pca(x, dim=4), x[:7].astype(np.float32))
    assert out.shape == (7, 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    jitted = jax.jit(apply_descriptor_pca)(learn_descriptor_pca(x, dim=4), x[:7].astype(np.float32))
    np.testing.assert_allclose(jitted, out, rtol=1e-5, atol=1e-6)
    stored = pca_from_variables({"pca": pca_variables(pca)})
    np.testing.assert_array_equal(stored.projection, np.asarray(pca.projection))
    assert pca_from_variables({"params": {}}) is None


def test_descriptor_pca_raises():
    with pytest.raises(ValueError, match=r"dim must be in \[1, 3\]"):
        learn_descriptor_pca(np.ones((5, 3)), dim=4)
    with pytest.raises(ValueError, match="at least 2 descriptors"):
        learn_descriptor_pca(np.ones((1, 3)), dim=2)


def test_delf_config_replace_keeps_validation():
    with pytest.raises(ValueError, match="pca_dim must be positive"):
        dataclasses.replace(DelfConfig(), pca_dim=0)


def test_init_delf_variables_fit_the_model():
    config = DelfConfig(num_classes=5, attention_hidden=7)
    variables = init_delf_variables(config, seed=1)
    expected = jax.eval_shape(
        make_delf_model(config).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    )
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), variables)
    assert shapes == jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), expected)
    again = init_delf_variables(config, seed=1)["params"]["attention"]["hidden"]["kernel"]
    np.testing.assert_array_equal(again, variables["params"]["attention"]["hidden"]["kernel"])
