import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import backbones, pooling, retrieval_model, whitening
from jaxretrieval.normalization import l2_normalize


class TinyBackbone(nn.Module):
    """One strided conv + ReLU and a 100-class classifier: the backbone contract, cheaply."""

    @nn.compact
    def __call__(self, images, *, train=False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv")(images))
        logits = nn.Dense(100, name="classifier")(jnp.mean(x, axis=(1, 2)))
        return logits, {"last_conv": x}


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(jax.random.key(0), (2, 12, 16, 3), jnp.float32)


def _tiny_model(images, **kwargs):
    model = retrieval_model.RetrievalModel(backbone=TinyBackbone(), **kwargs)
    return model, model.init(jax.random.key(1), images)


def test_real_backbone_model_matches_functional_pipeline():
    model, variables, spec = retrieval_model.build_retrieval_model("mobilenet_v2")
    images = jax.random.normal(jax.random.key(0), (2, 64, 96, 3), jnp.float32)
    out = jax.jit(model.apply)(variables, images)
    module, backbone_variables, _ = backbones.load_backbone("mobilenet_v2")
    _, features = jax.jit(module.apply)(backbone_variables, images)
    expected = l2_normalize(pooling.gem(features[spec.feature_name], 3.0))
    np.testing.assert_allclose(out["descriptors"], expected, rtol=1e-5, atol=1e-6)
    assert out["features"].shape == (2, 2, 3, 1280) and out["logits"].shape == (2, 1000)
    assert float(variables["params"]["gem"]["p"]) == 3.0


def test_gem_p_is_trainable(images):
    model, variables = _tiny_model(images)

    def loss(params):
        out = model.apply({**variables, "params": params}, images)
        return jnp.sum(out["descriptors"][0] * out["descriptors"][1])

    grads = jax.grad(loss)(variables["params"])
    assert float(jnp.abs(grads["gem"]["p"])) > 0.0


@pytest.mark.parametrize("name", sorted(pooling.POOLINGS))
def test_every_pooling_matches_pooled_descriptors(name, images):
    model, variables = _tiny_model(images, pooling=name, learn_p=False)
    out = jax.jit(model.apply)(variables, images)
    classifier = variables["params"]["backbone"]["classifier"]
    expected = pooling.global_descriptor(
        out["features"], None, pooling_name=name, classifier=classifier
    )
    np.testing.assert_allclose(out["descriptors"], expected, rtol=1e-5, atol=1e-6)
    assert out["descriptors"].shape == (2, 16 if name == "ramac" else 8)
    np.testing.assert_allclose(jnp.linalg.norm(out["descriptors"], axis=1), 1.0, rtol=1e-5)


def test_whitening_head_matches_apply_whitening(images):
    rng = np.random.default_rng(0)
    learned = whitening.learn_pca_whitening(rng.normal(size=(40, 8)).astype(np.float32), dim=4)
    model, variables = _tiny_model(images, whitening_dim=4)
    params = {**variables["params"], "whitening": retrieval_model.whitening_params(learned)}
    out = model.apply({**variables, "params": params}, images)
    np.testing.assert_allclose(
        out["descriptors"], whitening.apply_whitening(learned, out["pooled"]), atol=1e-5
    )
    assert out["descriptors"].shape == (2, 4)


def test_errors(without_annotation_checks, images):
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling.global_descriptor(jnp.ones((1, 2, 2, 3)), None, pooling_name="avg")
    with pytest.raises(ValueError, match="needs the backbone's classifier"):
        pooling.global_descriptor(jnp.ones((1, 2, 2, 3)), None, pooling_name="cam")
    with pytest.raises(ValueError, match="no feature map 'stage9'"):
        _tiny_model(images, feature_name="stage9")


def test_darac_weights_are_trainable_parameters(images):
    model, variables = _tiny_model(images, pooling="darac")
    assert variables["params"]["darac"]["region_weights"].shape == (21, 2)
    weights = np.random.default_rng(0).normal(size=(21, 2)).astype(np.float32)
    params = {**variables["params"], "darac": {"region_weights": jnp.asarray(weights)}}
    out = jax.jit(model.apply)({**variables, "params": params}, images)
    expected = l2_normalize(pooling.darac_pooling(out["features"], weights))
    np.testing.assert_allclose(out["descriptors"], expected, rtol=1e-5, atol=1e-6)

    def loss(params):
        out = model.apply({**variables, "params": params}, images)
        return jnp.sum(out["descriptors"][0] * out["descriptors"][1])

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["darac"]["region_weights"]).sum()) > 0.0


def test_darac_model_pools_a_padded_image_as_alone():
    """The training canvas and extraction buckets pad; DARAC places its grid on the real size."""
    model = retrieval_model.RetrievalModel(
        backbone=TinyBackbone(), pooling="darac", feature_stride=2
    )
    alone = jax.random.normal(jax.random.key(2), (1, 10, 14, 3), jnp.float32)
    padded = jnp.zeros((1, 16, 16, 3), jnp.float32).at[:, :10, :14].set(alone)
    variables = model.init(jax.random.key(1), alone)
    apply = jax.jit(model.apply)
    expected = apply(variables, alone)["descriptors"]
    out = apply(variables, padded, np.array([[10, 14]], np.int32))["descriptors"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_init_model_variables_for_darac():
    config = retrieval_model.ModelConfig(pooling="darac", whitening_dim=16)
    variables = retrieval_model.init_model_variables(config)
    np.testing.assert_array_equal(variables["params"]["darac"]["region_weights"], np.ones((21, 2)))
    assert variables["params"]["whitening"]["kernel"].shape == (1280, 16)


def test_whitening_layer_fits_the_pooled_map():
    """The fresh whitening layer's input is the pooled map's width, whichever map it is."""
    for feature_name, channels in (("stage4", 320), (None, 1280)):
        config = retrieval_model.ModelConfig(feature_name=feature_name, whitening_dim=8)
        variables = retrieval_model.init_model_variables(config)
        assert variables["params"]["whitening"]["kernel"].shape == (channels, 8)
