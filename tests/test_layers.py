import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxretrieval import layers, pooling, whitening


def _features(rng, shape):
    return np.maximum(rng.normal(size=shape), 0.0).astype(np.float32)


def test_GeM_params_and_shapes():
    x = _features(np.random.default_rng(0), (2, 5, 4, 3))
    module = layers.GeM()
    params = module.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"p": ()}}
    np.testing.assert_allclose(params["params"]["p"], 3.0)
    out = module.apply(params, x)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    assert layers.GeM(p_init=2.0).init(jax.random.key(0), x)["params"]["p"] == 2.0


def test_GeM_matches_functional():
    rng = np.random.default_rng(1)
    x = _features(rng, (2, 5, 4, 3))
    valid = rng.random((2, 5, 4)) < 0.7
    valid[:, 0, 0] = True
    module = layers.GeM(eps=1e-5)
    params = module.init(jax.random.key(0), x)
    params = {"params": {"p": jnp.asarray(4.5)}}  # any learned value
    np.testing.assert_allclose(module.apply(params, x), pooling.gem(x, 4.5, 1e-5), rtol=1e-6)
    np.testing.assert_allclose(
        module.apply(params, x, valid), pooling.gem(x, 4.5, 1e-5, valid), rtol=1e-6
    )


def test_GeM_grad_through_p():
    rng = np.random.default_rng(2)
    x = _features(rng, (2, 4, 4, 3)) + 0.1
    module = layers.GeM()
    params = module.init(jax.random.key(0), x)

    def loss(params):
        return jnp.sum(module.apply(params, x) ** 2)

    grad = jax.jit(jax.grad(loss))(params)["params"]["p"]
    expected = jax.grad(lambda p: jnp.sum(pooling.gem(x, p) ** 2))(jnp.asarray(3.0))
    assert np.isfinite(grad) and abs(float(grad)) > 1e-6
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        apply = jax.jit(lambda p: module.apply({"params": {"p": p}}, x64))
        check_grads(apply, (jnp.asarray(3.0, jnp.float64),), order=1, modes=("rev",))


def test_WhiteningLayer_matches_functional():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(30, 6)) * np.linspace(2.0, 0.5, 6) + 1.0
    learned = whitening.learn_pca_whitening(train)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    for dim in (None, 3):
        module = layers.WhiteningLayer(whitening=learned, dim=dim)
        params = module.init(jax.random.key(0), x)
        out_dim = 6 if dim is None else dim
        assert params["params"]["kernel"].shape == (6, out_dim)
        assert params["params"]["bias"].shape == (out_dim,)
        np.testing.assert_allclose(
            module.apply(params, x), whitening.apply_whitening(learned, x, dim=dim), atol=1e-5
        )
    # Unnormalised: exactly the affine map P (x - m).
    module = layers.WhiteningLayer(whitening=learned, normalize=False)
    params = module.init(jax.random.key(0), x)
    expected = (x - np.asarray(learned.mean)) @ np.asarray(learned.projection).T
    np.testing.assert_allclose(module.apply(params, x), expected, rtol=1e-4, atol=1e-5)


def test_WhiteningLayer_without_whitening_is_trainable_dense():
    x = np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32)
    module = layers.WhiteningLayer(features=4)
    params = module.init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (5, 4)
    np.testing.assert_array_equal(params["params"]["bias"], np.zeros(4))
    out = module.apply(params, x)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(module.apply(p, x)[:, 0]))(params)
    assert np.all(np.isfinite(grads["params"]["kernel"]))
    assert np.any(grads["params"]["kernel"] != 0)


def test_WhiteningLayer_raises(without_annotation_checks):
    learned = whitening.Whitening(mean=jnp.zeros(3), projection=jnp.eye(3))
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="either whitening"):
        layers.WhiteningLayer(whitening=learned, features=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="give whitening or features"):
        layers.WhiteningLayer().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 3\], found 4"):
        layers.WhiteningLayer(whitening=learned, dim=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"descriptors \(2, 4\) do not fit"):
        layers.WhiteningLayer(whitening=learned).init(jax.random.key(0), np.zeros((2, 4)))


def test_DARAC_params_and_shapes():
    x = _features(np.random.default_rng(5), (2, 4, 6, 3))
    module = layers.DARAC(levels=1)
    params = module.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"region_weights": (3, 2)}}
    np.testing.assert_array_equal(params["params"]["region_weights"], np.ones((3, 2)))
    out = jax.jit(module.apply)(params, x)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    default = layers.DARAC().init(jax.random.key(0), x)
    assert default["params"]["region_weights"].shape == (21, 2)


def test_DARAC_matches_functional():
    rng = np.random.default_rng(6)
    x = _features(rng, (2, 5, 6, 3))
    valid = np.zeros((2, 5, 6), bool)
    valid[0, :4, :6], valid[1, :5, :3] = True, True
    weights = rng.normal(size=(3, 2)).astype(np.float32)  # any learned value
    module = layers.DARAC(levels=1, eps=1e-5)
    apply = jax.jit(module.apply)
    params = {"params": {"region_weights": jnp.asarray(weights)}}
    for mask in (None, valid):
        np.testing.assert_allclose(
            apply(params, x, mask),
            pooling.darac_pooling(x, weights, levels=1, eps=1e-5, valid=mask),
            rtol=1e-6,
            atol=1e-7,
        )


def test_DARAC_grad_through_weights():
    rng = np.random.default_rng(7)
    x = _features(rng, (2, 4, 4, 3)) + 0.1
    module = layers.DARAC(levels=1)
    params = module.init(jax.random.key(0), x)

    def loss(params):
        out = module.apply(params, x)
        out = out / jnp.linalg.norm(out, axis=1, keepdims=True)
        return jnp.sum(out[0] * out[1])

    grad = jax.jit(jax.grad(loss))(params)["params"]["region_weights"]
    assert grad.shape == (3, 2) and np.all(np.isfinite(grad)) and np.any(np.abs(grad) > 1e-6)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        apply = jax.jit(lambda w: module.apply({"params": {"region_weights": w}}, x64))
        check_grads(apply, (jnp.asarray(rng.normal(size=(3, 2)), jnp.float64),), 1, ("rev",))
