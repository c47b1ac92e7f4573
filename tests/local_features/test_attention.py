import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxretrieval import layers
from jaxretrieval.local_features import attention_pooling, feature_norms
from tests.local_features.reference import attention_pooling_reference


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=shape).astype(np.float32)
    scores = rng.uniform(0.0, 2.0, size=shape[:3]).astype(np.float32)
    valid = rng.uniform(size=shape[:3]) < 0.7
    return features, scores, valid


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 5, 4), (1, 4, 2, 8)])
def test_attention_pooling_shapes(shape):
    features, scores, valid = _inputs(shape)
    out = attention_pooling(features, scores, valid)
    assert out.shape == (shape[0], shape[3]) and out.dtype == jnp.float32


def test_attention_pooling_known_values():
    features = jnp.array([[[[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [5.0, 5.0]]]])  # (1, 2, 2, 2)
    scores = jnp.array([[[1.0, 2.0], [0.0, 4.0]]])
    valid = jnp.array([[[True, True], [True, False]]])
    # Normalised cells (0.6, 0.8), (0, 1), (1, 0): (0.6 + 0 + 0, 0.8 + 2) / 3 valid cells.
    np.testing.assert_allclose(
        attention_pooling(features, scores, valid), [[0.2, 2.8 / 3]], rtol=1e-6
    )
    raw = attention_pooling(features, scores, valid, normalize_features=False)
    np.testing.assert_allclose(raw, [[1.0, 8.0 / 3]], rtol=1e-6)  # (3 + 0 + 0, 4 + 4) / 3


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_pooling_matches_reference(normalize):
    features, scores, valid = _inputs((2, 3, 4, 5))
    for mask in (None, valid):
        np.testing.assert_allclose(
            attention_pooling(features, scores, mask, normalize_features=normalize),
            attention_pooling_reference(features, scores, mask, normalize),
            rtol=1e-5,
            atol=1e-6,
        )


def test_attention_pooling_jit_matches_eager():
    features, scores, valid = _inputs((2, 3, 4, 5))
    np.testing.assert_allclose(
        jax.jit(attention_pooling)(features, scores, valid),
        attention_pooling(features, scores, valid),
        rtol=1e-6,
    )


def test_attention_pooling_padding_is_ignored():
    """A padded map pools exactly as the map of its real cells alone."""
    features, scores, _ = _inputs((1, 2, 3, 4))
    padded_f = np.zeros((1, 4, 5, 4), np.float32)
    padded_f[:, :2, :3] = features
    padded_s = np.full((1, 4, 5), 7.0, np.float32)
    padded_s[:, :2, :3] = scores
    valid = np.zeros((1, 4, 5), bool)
    valid[:, :2, :3] = True
    np.testing.assert_allclose(
        attention_pooling(padded_f, padded_s, valid), attention_pooling(features, scores), rtol=1e-6
    )


def test_attention_pooling_grad():
    features, scores, valid = _inputs((1, 2, 2, 3))
    with jax.enable_x64():
        f64, s64 = jnp.asarray(features, jnp.float64), jnp.asarray(scores, jnp.float64)
        check_grads(
            lambda f, s: attention_pooling(f, s, valid), (f64, s64), order=1, modes=("rev",)
        )


def test_attention_pooling_raises(without_annotation_checks):
    with pytest.raises(ValueError, match=r"scores must have shape \(B, H, W\) = \(1, 2, 2\)"):
        attention_pooling(np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"features must have shape \(B, H, W, C\)"):
        attention_pooling(np.zeros((2, 2, 3), np.float32), np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="scores must be floating"):
        attention_pooling(np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2), np.int32))
    with pytest.raises(TypeError, match="valid must be boolean"):
        attention_pooling(
            np.zeros((1, 2, 2, 3), np.float32),
            np.zeros((1, 2, 2), np.float32),
            np.zeros((1, 2, 2), np.int32),
        )


def test_AttentionPooling_matches_functional():
    features, _, valid = _inputs((2, 3, 4, 6))
    module = layers.AttentionPooling(hidden=5)
    variables = module.init(jax.random.key(0), features, valid)
    assert set(variables["params"]) == {"hidden", "score"}
    assert variables["params"]["hidden"]["kernel"].shape == (6, 5)
    pooled, scores = module.apply(variables, features, valid)
    assert scores.shape == (2, 3, 4) and bool(jnp.all(scores >= 0))
    np.testing.assert_allclose(pooled, attention_pooling(features, scores, valid), rtol=1e-6)
    # The score is softplus(w2 . relu(W1 f + b1) + b2), cell by cell.
    p = jax.tree.map(np.asarray, variables["params"])
    hidden = np.maximum(features @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    logits = (hidden @ p["score"]["kernel"])[..., 0] + p["score"]["bias"][0]
    np.testing.assert_allclose(scores, np.log1p(np.exp(logits)), rtol=1e-5, atol=1e-6)


def test_feature_norms_known_values():
    features = jnp.array([[[[3.0, 4.0], [0.0, 0.0]]]])
    np.testing.assert_allclose(feature_norms(features), [[[5.0, 0.0]]])
