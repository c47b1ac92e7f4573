"""Depthwise convolution on XLA:CPU: slices-and-sums (ours) vs the grouped convolution.

  .venv/bin/python -m benchmarks.depthwise_speed [--batch 8] [--repeats 5]

Every depthwise layer shape of MobileNetV2 at 224 px (3x3, stride 1 or 2), forward and
gradient (with respect to input and kernel), jitted, best of ``--repeats`` after a
compile: :func:`jaxretrieval.backbones.depthwise.depthwise_conv` against
``lax.conv_general_dilated(..., feature_group_count=C)``, the obvious way (what
``flax.linen.Conv(feature_group_count=C)`` calls). Prints milliseconds and ratios.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from jaxretrieval.backbones.depthwise import depthwise_conv

# (input side, channels, stride) of MobileNetV2's depthwise layers at 224 px.
LAYERS = (
    (112, 32, 1), (112, 96, 2), (56, 144, 1), (56, 144, 2), (28, 192, 1), (28, 192, 2),
    (14, 384, 1), (14, 576, 1), (14, 576, 2), (7, 960, 1),
)  # fmt: skip
PADS = ((1, 1), (1, 1))


def grouped(x, kernel, strides):
    return lax.conv_general_dilated(
        x, kernel, (strides, strides), PADS,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
    )  # fmt: skip


def slices(x, kernel, strides):
    return depthwise_conv(x, kernel, strides=strides, padding=PADS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows, totals = [], np.zeros(4)
    for side, channels, strides in LAYERS:
        x = jnp.asarray(rng.normal(size=(args.batch, side, side, channels)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 1, channels)), jnp.float32)
        times = []
        for conv in (grouped, slices):
            forward = jax.jit(lambda x, k, conv=conv, s=strides: conv(x, k, s))
            loss = lambda x, k, conv=conv, s=strides: jnp.sum(conv(x, k, s) ** 2)  # noqa: E731
            gradient = jax.jit(jax.grad(loss, argnums=(0, 1)))
            for fn in (forward, gradient):
                jax.block_until_ready(fn(x, kernel))  # compile
                times.append(
                    common.best_time(
                        lambda fn=fn, x=x, k=kernel: jax.block_until_ready(fn(x, k)), args.repeats
                    )[0]
                )
        np.testing.assert_allclose(
            slices(x, kernel, strides), grouped(x, kernel, strides), rtol=1e-3, atol=1e-3
        )
        totals += times
        grouped_fwd, grouped_grad, ours_fwd, ours_grad = (1e3 * t for t in times)
        rows.append([
            f"{side}x{side}x{channels} s{strides}", f"{grouped_fwd:.1f}", f"{ours_fwd:.1f}",
            f"{grouped_fwd / ours_fwd:.1f}x", f"{grouped_grad:.1f}", f"{ours_grad:.1f}",
            f"{grouped_grad / ours_grad:.1f}x",
        ])  # fmt: skip
    g_fwd, g_grad, o_fwd, o_grad = 1e3 * totals
    rows.append([
        "all layers", f"{g_fwd:.1f}", f"{o_fwd:.1f}", f"{g_fwd / o_fwd:.1f}x",
        f"{g_grad:.1f}", f"{o_grad:.1f}", f"{g_grad / o_grad:.1f}x",
    ])  # fmt: skip
    print(f"batch {args.batch}, jax {jax.__version__}, {jax.devices()[0].platform}")
    header = ["layer (H x W x C, stride)", "grouped fwd ms", "ours fwd ms", "speed-up",
              "grouped grad ms", "ours grad ms", "speed-up"]  # fmt: skip
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
