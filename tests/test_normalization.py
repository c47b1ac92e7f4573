import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from hypothesis import given
from hypothesis.extra import numpy as hnp
from hypothesis.strategies import floats

from jaxretrieval.normalization import l2_normalize, power_normalize


def test_l2_normalize_known_values_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-6)


def test_l2_normalize_shapes_and_dtypes():
    assert l2_normalize(np.ones((2, 3, 4), np.float32)).shape == (2, 3, 4)
    assert l2_normalize(jnp.ones((3, 4), jnp.bfloat16)).dtype == jnp.float32
    with jax.enable_x64(True):
        assert l2_normalize(jnp.ones((3, 4), jnp.float64)).dtype == jnp.float64


def test_l2_normalize_grad_is_finite_at_zero():
    with jax.enable_x64(True):
        x = jnp.array([[0.0, 0.0], [1.0, 2.0]], jnp.float64)
        jax.test_util.check_grads(l2_normalize, (x[1:],), order=1, modes=("rev",))
        grad = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(x)
    assert np.all(np.isfinite(grad))


@given(hnp.arrays(np.float32, (3, 4), elements=floats(-10, 10, width=32)))
def test_l2_normalize_is_idempotent(x):
    once = np.asarray(l2_normalize(x))
    unit = np.linalg.norm(x, axis=1) > 1e-3  # rows shorter than eps are only scaled by 1/eps
    np.testing.assert_allclose(
        np.asarray(l2_normalize(once))[unit], once[unit], rtol=1e-5, atol=1e-6
    )


def test_power_normalize_known_values():
    np.testing.assert_allclose(power_normalize(np.array([[4.0, -9.0, 0.0]])), [[2.0, -3.0, 0.0]])


def test_normalizations_raise(without_annotation_checks):
    with pytest.raises(TypeError, match="l2_normalize: x must be floating, got dtype int32"):
        l2_normalize(np.ones((2, 3), np.int32))
    with pytest.raises(TypeError, match="power_normalize: x must be floating, got dtype int32"):
        power_normalize(np.ones((2, 3), np.int32))
