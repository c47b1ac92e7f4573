"""jit_cache: the bound on compiled shapes, with a real jax.jit function."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval import jit_cache


def test_compiled_shapes_are_dropped_at_the_bound(monkeypatch):
    monkeypatch.setattr(jit_cache, "MAX_LIVE_EXECUTABLES", 3)
    double = jax.jit(lambda x: 2 * jnp.sum(x))
    dropped = []
    for n in range(1, 8):  # a new shape every call
        dropped.append(jit_cache.drop_compiled_if_full(double))
        assert float(double(np.ones(n, np.float32))) == 2 * n
        assert 1 <= jit_cache.live_executables(double) <= 3
    # Full after 3 shapes: dropped before the 4th and the 7th.
    assert dropped == [False, False, False, True, False, False, True]


def test_unknown_functions_count_as_empty():
    assert jit_cache.live_executables(lambda x: x) == 0
    assert not jit_cache.drop_compiled_if_full(lambda x: x)
