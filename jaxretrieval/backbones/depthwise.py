"""Depthwise convolution as a sum of shifted, strided slices: XLA:CPU's grouped conv is slow.

A depthwise k x k convolution (``feature_group_count`` = channels) multiplies each
channel by its own k x k filter. XLA:CPU lowers it to a generic grouped convolution
that is about 10x slower than the same arithmetic written as k*k strided slices of the
padded input, each times one filter tap, summed (one fused elementwise loop), forward
and backward; ``python -m benchmarks.depthwise_speed`` measures both on MobileNetV2's
layer shapes. This is why MobileNetV2 trained and extracted at 0.13x PyTorch's
throughput on CPU (benchmarks/RESULTS.md). The parameters are those of ``nn.Conv``
with ``feature_group_count`` = channels (``kernel`` of shape (k, k, 1, C), LeCun-normal
initialisation), so weights and checkpoints are unchanged.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear
from jax import lax

from jaxretrieval.array_types import AnyArray, Array, Float

Padding = str | int | Sequence[int | tuple[int, int]]


def explicit_padding(
    padding: Padding, spatial: tuple[int, int], kernel_size: int, strides: int, dilation: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Any Flax padding of a 2-D convolution as ``((top, bottom), (left, right))``.

    ``"SAME"`` and ``"VALID"`` follow ``lax.conv_general_dilated`` (TensorFlow's rule);
    ``"CIRCULAR"`` and ``"CAUSAL"`` are refused.
    """
    padding = linear.canonicalize_padding(padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"depthwise_conv supports SAME, VALID or explicit padding, not {padding!r}."
            )
        extent = dilation * (kernel_size - 1) + 1
        pads = lax.padtype_to_pads(spatial, (extent, extent), (strides, strides), padding)
        return tuple((int(low), int(high)) for low, high in pads)  # type: ignore[return-value]
    return tuple((int(low), int(high)) for low, high in padding)  # type: ignore[return-value]


def depthwise_conv(
    x: Float[AnyArray, "B H W C"],
    kernel: Float[AnyArray, "k k 1 C"],
    *,
    strides: int = 1,
    padding: Padding = "SAME",
    dilation: int = 1,
) -> Float[Array, "B h w C"]:
    """``lax.conv_general_dilated(x, kernel, feature_group_count=C)``, NHWC / HWIO, by slices.

    Output cell (i, j) of channel c is ``sum_{u,v} kernel[u, v, 0, c] * x_padded[s*i + d*u,
    s*j + d*v, c]`` with stride s and dilation d: one strided slice of the padded input
    per tap.
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"depthwise_conv expects x (B, H, W, C) and kernel (k, k, 1, C), found "
            f"{x.shape} and {kernel.shape}."
        )
    size = kernel.shape[0]
    if kernel.shape != (size, size, 1, x.shape[-1]):
        raise ValueError(
            f"a depthwise kernel for {x.shape[-1]} channels has shape ({size}, {size}, 1, "
            f"{x.shape[-1]}), found {kernel.shape}."
        )
    if strides < 1 or dilation < 1:
        raise ValueError(f"strides and dilation must be positive, found {strides}, {dilation}.")
    batch, height, width, channels = x.shape
    (top, bottom), (left, right) = explicit_padding(
        padding, (height, width), size, strides, dilation
    )
    # lax.pad crops where a padding is negative, as lax.conv_general_dilated does.
    zero = jnp.zeros((), x.dtype)
    padded = lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    extent = dilation * (size - 1) + 1
    out_h = (padded.shape[1] - extent) // strides + 1
    out_w = (padded.shape[2] - extent) // strides + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input {height} x {width} is smaller than the {extent} x {extent} kernel after "
            f"padding {((top, bottom), (left, right))}."
        )
    taps = kernel.reshape(size, size, 1, 1, 1, channels)  # each (1, 1, 1, C), NHWC-ready
    out = None
    for u in range(size):
        for v in range(size):
            start = (0, dilation * u, dilation * v, 0)
            limit = (
                batch,
                dilation * u + (out_h - 1) * strides + 1,
                dilation * v + (out_w - 1) * strides + 1,
                channels,
            )
            tap = lax.slice(padded, start, limit, (1, strides, strides, 1)) * taps[u, v]
            out = tap if out is None else out + tap
    return out


class DepthwiseConv(nn.Module):
    """``nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)`` computed by slices.

    Same parameter (``kernel``, (k, k, 1, C)) and initialisation as that ``nn.Conv``.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: Any = "SAME"
    kernel_dilation: int = 1
    dtype: Any = None
    kernel_init: Any = linear.default_kernel_init  # nn.Conv's

    @nn.compact
    def __call__(self, x: Float[AnyArray, "B H W C"]) -> Float[Array, "B h w C"]:
        """Convolves each of the C channels with its own k x k filter."""
        if x.shape[-1] != self.features:
            raise ValueError(
                f"DepthwiseConv({self.features}) needs {self.features} input channels, "
                f"found {x.shape[-1]}."
            )
        kernel = self.param(
            "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, self.features)
        )
        x, kernel = flax_dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv(
            x, kernel, strides=self.strides, padding=self.padding, dilation=self.kernel_dilation
        )
