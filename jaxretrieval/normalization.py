"""Descriptor normalisation: L2 and signed power normalisation.

Descriptors are rows, ``(N, D)``; every function normalises along the last axis.
"""

import jax.numpy as jnp

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Array, Float


def l2_normalize(x: Float[AnyArray, "*batch D"], *, eps: float = 1e-6) -> Float[Array, "*batch D"]:
    """Scales each vector along the last axis to unit L2 norm.

    Vectors with norm below ``eps`` are divided by ``eps`` instead, so an all-zero
    descriptor stays zero rather than becoming NaN (as in cirtorch's ``l2n``), and its
    gradient is finite too (``jnp.linalg.norm``'s is NaN at the zero vector). This is the
    library's one row normaliser: use it rather than a local ``x / norm(x)``.

    Args:
      x: Vectors along the last axis.
      eps: Lower bound on the norm used as divisor.

    Returns:
      The normalised vectors, float32 (or float64 if given float64).

    Raises:
      TypeError: If ``x`` is not floating.

    Examples:
      >>> import jax.numpy as jnp
      >>> l2_normalize(jnp.array([[3.0, 4.0]])).tolist()
      [[0.6000000238418579, 0.800000011920929]]
    """
    x = validation.as_float_array("l2_normalize: x", x)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)  # (*batch, 1)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return x / jnp.maximum(norm, eps)


def power_normalize(x: Float[AnyArray, "*batch D"], power: float = 0.5) -> Float[Array, "*batch D"]:
    """Signed power normalisation ``sign(x) * |x| ** power`` (0.5 is signed square root).

    Args:
      x: Vectors along the last axis.
      power: Exponent; traced, so sweeping it does not recompile.

    Returns:
      The transformed vectors (not re-normalised: follow with :func:`l2_normalize`),
      float32 (or float64 if given float64).

    Raises:
      TypeError: If ``x`` is not floating.
    """
    x = validation.as_float_array("power_normalize: x", x)
    return jnp.sign(x) * jnp.abs(x) ** power
