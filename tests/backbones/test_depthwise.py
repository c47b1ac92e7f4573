"""jaxretrieval.backbones.depthwise: slices-and-sums equal the grouped convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax import lax

from jaxretrieval.backbones.depthwise import DepthwiseConv, depthwise_conv, explicit_padding
from tests.reference import backbones_reference as ref


def _grouped(x, kernel, strides, padding, dilation):
    return lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _inputs(shape, size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(size, size, 1, shape[-1])).astype(np.float32)
    return x, kernel


def test_hand_worked_single_channel():
    # 3x3 input 1..9, kernel picking the centre (weight 2) and the right neighbour (1),
    # zero padding 1: out[i, j] = 2 x[i, j] + x[i, j + 1] (0 beyond the edge).
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 1, 0, 0], kernel[1, 2, 0, 0] = 2.0, 1.0
    out = depthwise_conv(x, kernel, padding=((1, 1), (1, 1)))
    expected = np.array([[4, 7, 6], [13, 16, 12], [22, 25, 18]], np.float32)
    np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], expected)


@pytest.mark.parametrize(
    "height,width,size,strides,padding,dilation",
    [
        (9, 8, 3, 1, ((1, 1), (1, 1)), 1),
        (9, 8, 3, 2, ((1, 1), (1, 1)), 1),  # even width, stride 2: torch's symmetric pad
        (10, 7, 5, 2, ((2, 2), (2, 2)), 1),  # EfficientNet-Lite's 5x5
        (9, 9, 3, 1, ((2, 2), (2, 2)), 2),  # dilated
        (6, 7, 3, 2, ((0, 1), (0, 1)), 1),  # asymmetric (TF SAME on even sizes)
    ],
)
def test_equals_numpy_reference(height, width, size, strides, padding, dilation):
    x, kernel = _inputs((2, height, width, 3), size)
    expected = ref.conv2d(x, kernel, stride=strides, padding=padding, groups=3, dilation=dilation)
    out = depthwise_conv(x, kernel, strides=strides, padding=padding, dilation=dilation)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID", 1, ((0, 2), (1, 0))])
@pytest.mark.parametrize("strides", [1, 2])
def test_equals_grouped_conv_for_every_padding(padding, strides):
    x, kernel = _inputs((2, 8, 11, 5), 3, seed=1)
    pads = explicit_padding(padding, (8, 11), 3, strides, 1)
    expected = _grouped(x, kernel, strides, pads, 1)
    if isinstance(padding, str):  # lax's own rule for the strings
        np.testing.assert_allclose(_grouped(x, kernel, strides, padding, 1), expected)
    out = depthwise_conv(x, kernel, strides=strides, padding=padding)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_negative_padding_crops_like_lax():
    x, kernel = _inputs((1, 9, 9, 2), 3, seed=2)
    pads = ((-1, 0), (0, -2))
    np.testing.assert_allclose(
        depthwise_conv(x, kernel, padding=pads),
        _grouped(x, kernel, 1, pads, 1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gradients_equal_grouped_conv():
    x, kernel = _inputs((2, 10, 10, 4), 3, seed=3)
    pads = ((1, 1), (1, 1))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) ** 2)

    ours = jax.grad(loss(lambda x, k: depthwise_conv(x, k, strides=2, padding=pads)), (0, 1))
    theirs = jax.grad(loss(lambda x, k: _grouped(x, k, 2, pads, 1)), (0, 1))
    for a, b in zip(ours(x, kernel), theirs(x, kernel), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_jit_equals_eager_and_vmap_equals_loop():
    x, kernel = _inputs((3, 7, 7, 2), 3, seed=4)
    conv = lambda x: depthwise_conv(x, kernel, strides=2, padding="SAME")  # noqa: E731
    np.testing.assert_allclose(jax.jit(conv)(x), conv(x), rtol=1e-6, atol=1e-6)
    batched = jax.vmap(lambda image: conv(image[None])[0])(x)
    looped = np.stack([conv(x[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


def test_module_has_nn_conv_parameters_and_initialisation():
    x = jnp.ones((1, 8, 8, 6))
    key = jax.random.key(0)
    ours = DepthwiseConv(6, 3, strides=2, padding=((1, 1), (1, 1))).init(key, x)
    conv = nn.Conv(
        6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6, use_bias=False
    )
    theirs = conv.init(key, x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
    np.testing.assert_allclose(
        DepthwiseConv(6, 3, strides=2, padding=((1, 1), (1, 1))).apply(ours, x),
        conv.apply(theirs, x),
        rtol=1e-5,
        atol=1e-6,
    )
    half = DepthwiseConv(6, 3, dtype=jnp.bfloat16).apply(ours, x)
    assert half.dtype == jnp.bfloat16


def test_bad_shapes_are_refused_by_the_annotations():
    x, kernel = _inputs((1, 5, 5, 3), 3)
    with pytest.raises(jaxtyping.TypeCheckError):
        depthwise_conv(x, kernel[..., :2])


def test_bad_shapes_and_settings_are_refused(without_annotation_checks):
    x, kernel = _inputs((1, 5, 5, 3), 3)
    with pytest.raises(ValueError, match=r"kernel for 3 channels has shape \(3, 3, 1, 3\)"):
        depthwise_conv(x, kernel[..., :2])
    with pytest.raises(ValueError, match=r"expects x \(B, H, W, C\)"):
        depthwise_conv(x[0], kernel)
    with pytest.raises(ValueError, match="strides and dilation must be positive"):
        depthwise_conv(x, kernel, strides=0)
    with pytest.raises(ValueError, match="not 'CIRCULAR'"):
        depthwise_conv(x, kernel, padding="CIRCULAR")
    with pytest.raises(ValueError, match="smaller than the 3 x 3 kernel"):
        depthwise_conv(x[:, :2], kernel, padding="VALID")
    with pytest.raises(ValueError, match="needs 4 input channels, found 3"):
        DepthwiseConv(4, 3).init(jax.random.key(0), x)
