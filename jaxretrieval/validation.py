"""Input checks shared by the whole library, with one float policy.

Every public function checks its arrays here, at the top, from static shapes and dtypes
only (STYLE.md 3.3): a wrong shape raises ``ValueError`` naming the argument, the
expected axes and the shape found; a wrong dtype kind raises ``TypeError``. Values are
checked only on the host (:func:`check_finite`), never inside jitted code.

Float policy:

* Device (JAX) inputs compute in float32, except float64, which is kept: gradient checks
  and references run in float64 (under ``jax.enable_x64``), and bf16/fp16 activations
  are reduced in float32. Arrays combined in one computation are cast to a common dtype
  with :func:`common_float` (float64 if any of them is float64).
* Host (NumPy) inputs become contiguous float32 where faiss reads them, or float64 where
  the maths needs it (whitening's covariance and ``eigh``): the caller says which with
  ``dtype``.
* Integer or boolean arrays where floats are expected raise ``TypeError``: a silent cast
  of indices or masks to floats hides a swapped argument. Likewise floats or booleans
  where indices are expected, and anything but booleans where a mask is expected.
* Indices are int32 on the device (JAX's default integer) and int64 on the host (faiss
  ids, NumPy fancy indexing at any N).

The checked arguments are annotated ``Any``: these functions are the checks, so they must
see a wrong input rather than have the test-time annotation checker refuse it first.

Shapes are given as axis names, as in the signatures' jaxtyping strings: ``"N D"`` is a
matrix of rows, ``"P 2 2"`` a stack of 2 x 2 matrices (digits are exact sizes). Messages
print them as ``(N, D)``, followed by the shape found.
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxretrieval.array_types import Array

__all__ = [
    "as_float_array",
    "as_host_float_array",
    "as_int_array",
    "as_mask",
    "check_finite",
    "check_same_dim",
    "check_shape",
    "common_float",
    "index_array",
]


def check_shape(name: str, x: Any, axes: str) -> tuple[int, ...]:
    """Checks the rank (and any exact sizes) of ``x`` without converting it.

    Args:
      name: The argument's name, as the message should show it.
      x: Any array (or tracer); only its shape is read.
      axes: Space-separated axis names, e.g. ``"N D"``; a number is an exact size.

    Returns:
      The shape of ``x``.

    Raises:
      ValueError: ``"{name} must have shape (N, D), found shape (4,)."``

    Examples:
      >>> check_shape("means", np.zeros((3, 2)), "P 2")
      (3, 2)
    """
    shape = tuple(np.shape(x))
    names = axes.split()
    fits = len(shape) == len(names) and all(
        not axis.isdigit() or size == int(axis) for axis, size in zip(names, shape, strict=True)
    )
    if not fits:
        raise ValueError(f"{name} must have shape {_format_axes(names)}, found shape {shape}.")
    return shape


def as_float_array(name: str, x: Any, *, axes: str | None = None) -> Array:
    """A floating JAX array under the float policy: float32, or float64 if given float64.

    Args:
      name: The argument's name, for messages.
      x: NumPy or JAX array (or tracer).
      axes: Expected axes (see :func:`check_shape`); None checks no shape.

    Returns:
      ``x`` as a float32 (or float64) ``jax.Array``.

    Raises:
      ValueError: On a shape that does not match ``axes``.
      TypeError: ``"{name} must be floating, got dtype int32."``

    Examples:
      >>> as_float_array("x", np.ones((2, 3), np.float16), axes="N D").dtype
      dtype('float32')
    """
    x = jnp.asarray(x)
    if axes is not None:
        check_shape(name, x, axes)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating, got dtype {x.dtype}.")
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def common_float(*arrays: Array) -> tuple[Array, ...]:
    """Casts arrays computed together to one float dtype: float64 if any is, else float32.

    Args:
      *arrays: Floating JAX arrays that passed :func:`as_float_array`.

    Returns:
      The arrays, in order, with one dtype (strict promotion refuses mixing float32 and
      float64 in one operation).
    """
    dtype = jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32
    return tuple(a.astype(dtype) for a in arrays)


def as_int_array(name: str, x: Any, *, axes: str | None = None) -> Array:
    """Device indices: any integer dtype, returned as int32.

    Raises:
      ValueError: On a shape that does not match ``axes``.
      TypeError: ``"{name} must be integer, got dtype float32."`` (booleans included).
    """
    x = jnp.asarray(x)
    if axes is not None:
        check_shape(name, x, axes)
    if x.dtype == jnp.bool_ or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer, got dtype {x.dtype}.")
    return x.astype(jnp.int32)


def as_mask(
    name: str, x: Any, *, shape: Sequence[int] | None = None, axes: str | None = None
) -> Array:
    """A boolean JAX mask, optionally of an exact shape.

    Args:
      name: The argument's name, for messages.
      x: The mask.
      shape: The shape it must have (e.g. the leading axes of the array it masks).
      axes: Names of those axes for the message, e.g. ``"B H W"``.

    Raises:
      ValueError: ``"{name} must have shape (B, H, W) = (1, 2, 2), found (1, 2, 3)."``
      TypeError: ``"{name} must be boolean, got dtype int32."``
    """
    x = jnp.asarray(x)
    if shape is not None and x.shape != tuple(shape):
        named = "" if axes is None else f"{_format_axes(axes.split())} = "
        raise ValueError(f"{name} must have shape {named}{tuple(shape)}, found {x.shape}.")
    if x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean, got dtype {x.dtype}.")
    return x


def check_same_dim(first_name: str, first: Any, second_name: str, second: Any) -> None:
    """Requires two sets of rows to share their last (descriptor) axis D.

    Raises:
      ValueError: ``"queries and database must have the same dimension D, found queries
        (2, 4) and database (3, 5)."``
    """
    first_shape, second_shape = np.shape(first), np.shape(second)
    if first_shape[-1:] != second_shape[-1:]:
        raise ValueError(
            f"{first_name} and {second_name} must have the same dimension D, found "
            f"{first_name} {first_shape} and {second_name} {second_shape}."
        )


def as_host_float_array(
    name: str, x: Any, *, axes: str | None = None, dtype: type = np.float32
) -> np.ndarray:
    """A contiguous NumPy array of ``dtype`` (float32 for faiss, float64 for ``eigh``).

    Args:
      name: The argument's name, for messages.
      x: NumPy or (concrete) JAX array.
      axes: Expected axes (see :func:`check_shape`); None checks no shape.
      dtype: ``np.float32`` or ``np.float64``.

    Raises:
      ValueError: On a shape that does not match ``axes``.
      TypeError: If ``x`` is not floating.
    """
    x = np.asarray(x)
    if axes is not None:
        check_shape(name, x, axes)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating, got dtype {x.dtype}.")
    return np.ascontiguousarray(x, dtype=dtype)


def check_finite(name: str, x: Any) -> None:
    """Host-side check that no row (leading index) of ``x`` holds NaN or inf.

    For host paths (faiss, whitening, graph building), where one NaN row would silently
    poison every result; never call it on traced values.

    Raises:
      ValueError: ``"database: 3 of 6 rows contain NaN or inf: NaN at rows [1, 4] and inf
        at rows [3]."`` (at most 5 rows are listed, then ``(+N more)``).
    """
    x = np.asarray(x)
    rows = x.reshape(x.shape[0], int(np.prod(x.shape[1:]))) if x.ndim else x.reshape(1, 1)
    nan_rows = np.flatnonzero(np.isnan(rows).any(axis=1))
    inf_rows = np.flatnonzero(np.isinf(rows).any(axis=1))
    if nan_rows.size or inf_rows.size:
        count = np.union1d(nan_rows, inf_rows).size
        found = " and ".join(
            f"{what} at rows {_some(where)}"
            for what, where in (("NaN", nan_rows), ("inf", inf_rows))
            if where.size
        )
        raise ValueError(f"{name}: {count} of {rows.shape[0]} rows contain NaN or inf: {found}.")


def index_array(
    name: str,
    values: Any,
    *,
    axes: str = "N",
    dtype: type | None = np.int64,
    upper: int | None = None,
) -> np.ndarray:
    """Host indices (a list or array of integers), e.g. ground-truth lists or rankings.

    An empty list is an empty 1-D index array whatever its dtype (``np.asarray([])`` is
    float64).

    Args:
      name: The argument's name, for messages.
      values: A sequence or array of integers; booleans are refused.
      axes: Expected axes, ``"N"`` (a flat list) by default.
      dtype: Output dtype; int64 by default, None keeps the integer dtype given (no copy
        of a large ranking).
      upper: If given, every index must lie in ``[0, upper)``.

    Returns:
      The indices as a NumPy array.

    Raises:
      ValueError: On a shape that does not match ``axes``, or an index outside
        ``[0, upper)``.
      TypeError: ``"{name} must hold integer indices, got dtype float64."``

    Examples:
      >>> index_array("ok", [3, 1]).tolist(), index_array("junk", []).dtype
      ([3, 1], dtype('int64'))
    """
    array = np.asarray(values)
    if array.size == 0 and len(axes.split()) == 1:
        return np.zeros(0, np.int64 if dtype is None else dtype)
    check_shape(name, array, axes)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer indices, got dtype {array.dtype}.")
    if upper is not None and array.size:
        outside = (array < 0) | (array >= upper)
        if outside.any():
            bad = array.reshape(-1)[np.argmax(outside.reshape(-1))]
            raise ValueError(f"{name} holds index {bad}, outside [0, {upper}).")
    if dtype is None:
        return array if array.dtype.kind in "iu" else array.astype(np.int64)
    return array.astype(dtype)


def _format_axes(names: Sequence[str]) -> str:
    """``["N", "D"]`` -> ``"(N, D)"``; ``["P"]`` -> ``"(P,)"``, like a Python shape."""
    return f"({', '.join(names)}{',' if len(names) == 1 else ''})"


def _some(rows: np.ndarray, most: int = 5) -> str:
    """The first few row numbers, e.g. ``[3, 17]`` or ``[1, 2, 3, 4, 5] (+7 more)``."""
    more = f" (+{rows.size - most} more)" if rows.size > most else ""
    return f"{rows[:most].tolist()}{more}"
