"""Training tests run optax, whose Adam computes ``decay ** count`` (a Python float to
an int32 power): strict dtype promotion refuses that, so these tests use JAX's standard
promotion. The library's own functions (losses, pooling) are tested strict elsewhere."""

import jax
import pytest


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield
