"""ResNet50/101 (torchvision layout, v1.5) in Flax Linen, NHWC; weights from a user's ``.pth``.

Bottleneck blocks put the stride on the 3x3 convolution (torchvision's "v1.5"), every
convolution is bias-free and followed by BatchNorm (eps 1e-5). With
``last_stage_dilation=True`` the last stage keeps stride 1 and dilates its 3x3
convolutions by 2 (torchvision's ``replace_stride_with_dilation=[False, False, True]``),
so ``"stage4"`` has stride 16 instead of 32, as DSM uses. No ImageNet ResNet weights ship
offline: :func:`load_resnet` reads the user's torchvision state dict.

References:
  He, Zhang, Ren, Sun. Deep residual learning for image recognition. CVPR 2016.
"""

import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.array_types import AnyArray, Array, Float
from jaxretrieval.backbones import weights
from jaxretrieval.backbones.base import Backbone, BatchNormOptions
from jaxretrieval.backbones.mobilenet_v2 import ConvBN

BOTTLENECK_EXPANSION = 4


class Bottleneck(BatchNormOptions):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand, plus a (projected) shortcut.

    Attributes:
      width: Channels of the 1x1/3x3 convolutions; the output has ``4 * width``.
      strides: Stride of the 3x3 convolution and of the projection shortcut.
      dilation: Dilation of the 3x3 convolution.
    """

    width: int
    strides: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(
        self, x: Float[AnyArray, "B H W C"], *, train: bool = False
    ) -> Float[Array, "B h w c"]:
        """Applies the block; ``train`` updates BatchNorm statistics."""
        x = jnp.asarray(x, self.dtype)
        common = {
            "activation": nn.relu,
            "freeze_batch_stats": self.freeze_batch_stats,
            "dtype": self.dtype,
        }
        out_channels = self.width * BOTTLENECK_EXPANSION
        y = ConvBN(self.width, kernel_size=1, name="conv1", **common)(x, train=train)
        y = ConvBN(
            self.width,
            kernel_size=3,
            strides=self.strides,
            kernel_dilation=self.dilation,
            name="conv2",
            **common,
        )(y, train=train)
        y = ConvBN(out_channels, kernel_size=1, name="conv3", **(common | {"activation": None}))(
            y, train=train
        )
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_channels:
            shortcut = ConvBN(
                out_channels,
                kernel_size=1,
                strides=self.strides,
                name="downsample",
                **(common | {"activation": None}),
            )(x, train=train)
        return nn.relu(y + shortcut)


class ResNet(Backbone):
    """torchvision's bottleneck ResNet.

    ``features`` maps ``"stem"`` (after the max-pool, stride 4) and ``"stage1"``..
    ``"stage4"`` (strides 4, 8, 16, 32, or 16 for the last with ``last_stage_dilation``;
    channels ``4 * base_width * (1, 2, 4, 8)``). Inputs are normalised with the ImageNet
    mean and std.

    Attributes:
      stage_sizes: Blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet50.
      num_classes: ``None`` (default) omits the ``fc`` layer and returns the spatial mean of
        ``stage4`` as first output; an int adds ``fc`` and returns logits.
      last_stage_dilation: Stride 1 and dilation 2 in the last stage (output stride 16).
      base_width: Width of the first stage (64; smaller only for tests).
    """

    stage_sizes: Sequence[int]
    num_classes: int | None = None
    last_stage_dilation: bool = False
    base_width: int = 64

    def network(
        self, x: Float[Array, "B H W 3"], *, train: bool
    ) -> tuple[Float[Array, "B _"], dict[str, Array]]:
        """Logits (or the pooled ``stage4``) and the named feature maps of the images."""
        common = {"freeze_batch_stats": self.freeze_batch_stats, "dtype": self.dtype}
        x = ConvBN(
            self.base_width, kernel_size=7, strides=2, activation=nn.relu, name="stem", **common
        )(x, train=train)
        # torch pads the max-pool with -inf (Flax's reduce_window init value), 1 per side.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features: dict[str, Array] = {"stem": x}
        for stage, num_blocks in enumerate(self.stage_sizes):
            dilate = self.last_stage_dilation and stage == len(self.stage_sizes) - 1
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 and not dilate else 1
                # torchvision: the first block of a dilated stage keeps the previous
                # dilation (1); the following blocks use 2.
                dilation = 2 if dilate and block > 0 else 1
                x = Bottleneck(
                    self.base_width * 2**stage,
                    strides=stride,
                    dilation=dilation,
                    name=f"layer{stage + 1}_{block}",
                    **common,
                )(x, train=train)
            features[f"stage{stage + 1}"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, C)
        if self.num_classes is None:
            return pooled, features
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled)
        return logits.astype(jnp.float32), features


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))


def convert_resnet(
    state_dict: dict,
    *,
    stage_sizes: Sequence[int],
    include_classifier: bool = False,
    source: str = "<state dict>",
) -> dict:
    """Maps a torchvision ResNet state dict to Flax variables of :class:`ResNet`.

    Args:
      state_dict: From :func:`~jaxretrieval.backbones.weights.load_torch_state_dict`.
      stage_sizes: Blocks per stage of the file's network.
      include_classifier: Convert ``fc`` too (for ``num_classes=...``); otherwise skip it.
      source: Name for error messages.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (numpy leaves).

    Raises:
      KeyError: A key the model needs is missing (e.g. a ResNet50 file read as ResNet101).
      ValueError: A key is left over (e.g. a ResNet101 file read as ResNet50).
    """
    consumer = weights.StateDictConsumer(state_dict, source=source)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    conv_bn = functools.partial(consumer.conv_bn, variables)
    conv_bn(("stem",), "conv1", "bn1")
    for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
            prefix, name = f"layer{stage + 1}.{block}", f"layer{stage + 1}_{block}"
            for i in (1, 2, 3):
                conv_bn((name, f"conv{i}"), f"{prefix}.conv{i}", f"{prefix}.bn{i}")
            if block == 0:
                conv_bn((name, "downsample"), f"{prefix}.downsample.0", f"{prefix}.downsample.1")
    if include_classifier:
        variables["params"]["fc"] = consumer.linear("fc")
    else:
        consumer.skip("fc.")
    consumer.finish()
    return variables


def load_resnet(
    path: str | os.PathLike | None,
    *,
    stage_sizes: Sequence[int],
    include_classifier: bool = False,
) -> dict:
    """Loads ResNet variables from a torchvision ``.pth`` (e.g. ``resnet101-63fe2227.pth``).

    Dilation does not change the weights: the same file serves ``last_stage_dilation``.

    Args:
      path: The user's torchvision ResNet state dict. Required: no ResNet weights ship
        offline.
      stage_sizes: ``(3, 4, 6, 3)`` for ResNet50, ``(3, 4, 23, 3)`` for ResNet101.
      include_classifier: Also load ``fc`` (for ``num_classes=1000``).

    Returns:
      Flax variables ``{"params", "batch_stats"}`` for :class:`ResNet`.

    Raises:
      FileNotFoundError: ``path`` is ``None`` or does not exist.
      KeyError, ValueError: The file does not match the architecture.
    """
    if path is None:
        raise FileNotFoundError(
            "no ImageNet weights for ResNet are available offline; pass the path of a "
            "torchvision ResNet state dict (e.g. resnet101-63fe2227.pth, saved with "
            "torch.save(model.state_dict(), path))"
        )
    return weights.load_torch_variables(
        path, convert_resnet, stage_sizes=stage_sizes, include_classifier=include_classifier
    )


load_resnet50 = functools.partial(load_resnet, stage_sizes=(3, 4, 6, 3))
load_resnet101 = functools.partial(load_resnet, stage_sizes=(3, 4, 23, 3))
