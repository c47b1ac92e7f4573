import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxretrieval import layers, losses


def _problem(rng, batch=4, classes=5, dim=8):
    embeddings = rng.normal(size=(batch, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    return embeddings, labels


def test_CosineMarginHead_params_and_shapes():
    embeddings, labels = _problem(np.random.default_rng(0))
    module = layers.CosineMarginHead(num_classes=5)
    params = module.init(jax.random.key(0), embeddings)
    assert jax.tree.map(jnp.shape, params) == {"params": {"class_centers": (5, 8)}}
    assert params["params"]["class_centers"].dtype == jnp.float32
    for out in (module.apply(params, embeddings), module.apply(params, embeddings, labels)):
        assert out.shape == (4, 5) and out.dtype == jnp.float32
    # B = 1, and bf16 parameters still give float32 logits.
    module = layers.CosineMarginHead(num_classes=3, param_dtype=jnp.bfloat16)
    params = module.init(jax.random.key(1), embeddings[:1])
    assert params["params"]["class_centers"].dtype == jnp.bfloat16
    assert module.apply(params, embeddings[:1], labels[:1] % 3).shape == (1, 3)


def test_CosineMarginHead_matches_functional():
    rng = np.random.default_rng(1)
    embeddings, labels = _problem(rng)
    centers = rng.normal(size=(5, 8)).astype(np.float32)  # any learned value
    module = layers.CosineMarginHead(num_classes=5, scale=16.0, margin=0.3)
    params = {"params": {"class_centers": jnp.asarray(centers)}}
    np.testing.assert_allclose(
        module.apply(params, embeddings, labels),
        losses.cosine_margin_logits(embeddings, centers, labels, scale=16.0, margin=0.3),
        rtol=1e-6,
        atol=1e-6,
    )
    # Inference (no labels): the plain scaled cosines to the normalised centres.
    unit_centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    np.testing.assert_allclose(
        module.apply(params, embeddings), 16.0 * embeddings @ unit_centers.T, rtol=1e-5, atol=1e-5
    )
    # With labels, only the true-class logits change, and they drop.
    with_margin = np.asarray(module.apply(params, embeddings, labels))
    plain = np.asarray(module.apply(params, embeddings))
    true = np.eye(5, dtype=bool)[labels]
    np.testing.assert_allclose(with_margin[~true], plain[~true], rtol=1e-6)
    assert np.all(with_margin[true] < plain[true])


def test_CosineMarginHead_trains():
    # A few SGD steps on the class centres lower the margin cross-entropy.
    rng = np.random.default_rng(2)
    embeddings, labels = _problem(rng, batch=8)
    module = layers.CosineMarginHead(num_classes=5)
    params = module.init(jax.random.key(2), embeddings)

    def loss(params):
        logits = module.apply(params, embeddings, labels)
        return losses.classification_loss(logits, labels)

    optimizer = optax.sgd(0.05)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, value, grads

    values = []
    for _ in range(5):
        params, state, value, grads = step(params, state)
        values.append(float(value))
        assert np.all(np.isfinite(grads["params"]["class_centers"]))
    assert values[-1] < values[0]


def test_CosineMarginHead_raises(without_annotation_checks):
    module = layers.CosineMarginHead(num_classes=3)
    params = {"params": {"class_centers": jnp.ones((3, 4))}}
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), found \(3,\)"):
        module.apply(params, np.zeros((2, 4), np.float32), np.zeros(3, np.int32))
    # Descriptors of another dimension than the centres: Flax refuses the parameter.
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"\(3, 5\).*\(3, 4\)"):
        module.apply(params, np.zeros((2, 5), np.float32))
