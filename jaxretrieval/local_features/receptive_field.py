"""Receptive fields of backbone feature maps, computed from their layer stacks.

A DELF descriptor is one cell of an intermediate feature map; its location in the image
is the centre of the cell's receptive field. That centre follows from the geometry of
every layer below the map (kernel, stride, padding, dilation) and nothing else, so it is
computed here from an explicit list of :class:`LayerGeometry` per backbone and feature
map (:func:`layer_stack`), never guessed from the stride alone.

Coordinates are image pixels with pixel ``(x, y)`` centred at the integer point
``(x, y)`` (the array-index convention): cell ``(i, j)`` of a map has its receptive
field centred at ``(offset + stride * j, offset + stride * i)`` (:func:`feature_centers`).
A layer with kernel ``k``, dilation ``d`` (effective kernel ``e = d (k - 1) + 1``),
stride ``s`` and ``p`` pixels of padding before the first row maps the field
``(size r, jump j, offset o)`` of its input to

    r' = r + (e - 1) j,    j' = j s,    o' = o + ((e - 1) / 2 - p) j,

because output cell 0 reads input cells ``-p .. e - 1 - p``, whose centre is input cell
``(e - 1) / 2 - p``. Symmetrically padded odd kernels (``p = (e - 1) / 2``, torch's
convolutions) leave the offset unchanged; an unpadded 2 x 2 max-pool (VGG) shifts it by
half an input cell. Residual shortcuts (1 x 1, same stride) never widen the field, so a
ResNet block counts as its 3 x 3 convolution. Sizes are the theoretical receptive field
(the box the DELF code calls ``rf``), not the smaller effective one.

References:
  Araujo, Norris, Sim. Computing receptive fields of convolutional neural networks.
  Distill 2019.
  Noh, Araujo, Sim, Weyand, Han. Large-scale image retrieval with attentive deep local
  features. ICCV 2017 (receptive-field centres as keypoint locations).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp

from jaxretrieval.array_types import Array, Float
from jaxretrieval.backbones import mobilenet_v2, vgg

__all__ = [
    "SUPPORTED_BACKBONES",
    "LayerGeometry",
    "ReceptiveField",
    "backbone_receptive_field",
    "feature_centers",
    "layer_stack",
    "receptive_field",
]


class LayerGeometry(NamedTuple):
    """What one layer does to positions.

    Attributes:
      kernel: Kernel size (square).
      stride: Stride.
      padding: Pixels (of the layer's input) padded before the first row and column.
      dilation: Kernel dilation.
      module: Top-level parameter name of the backbone layer it belongs to (``"block13"``,
        ``"conv5_3"``; empty for layers without parameters), so that training can freeze
        whatever lies after the feature map.
    """

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    module: str = ""


class ReceptiveField(NamedTuple):
    """Receptive field of the cells of one feature map.

    Attributes:
      size: Side of the (square) receptive field in input pixels.
      stride: Input pixels between the centres of neighbouring cells.
      offset: Centre of cell ``(0, 0)`` in input pixels (both axes).
    """

    size: int
    stride: int
    offset: float


def receptive_field(layers: Sequence[LayerGeometry]) -> ReceptiveField:
    """The receptive field of a stack of layers, applied first to last.

    Args:
      layers: The layers between the image and the feature map.

    Returns:
      Size, stride and offset (see the module docstring for the recurrence).

    Raises:
      ValueError: A kernel, stride or dilation below 1, or negative padding.

    Examples:
      >>> receptive_field([LayerGeometry(3, 2, 1), LayerGeometry(3, 1, 1)])
      ReceptiveField(size=7, stride=2, offset=0.0)
      >>> receptive_field([LayerGeometry(2, 2, 0)])  # a VGG max-pool
      ReceptiveField(size=2, stride=2, offset=0.5)
    """
    size, jump, offset = 1, 1, 0.0
    for layer in layers:
        if min(layer.kernel, layer.stride, layer.dilation) < 1 or layer.padding < 0:
            raise ValueError(f"invalid layer geometry {layer}.")
        effective = layer.dilation * (layer.kernel - 1) + 1
        size += (effective - 1) * jump
        offset += ((effective - 1) / 2 - layer.padding) * jump
        jump *= layer.stride
    return ReceptiveField(size=size, stride=jump, offset=offset)


def _mobilenet_v2(feature_name: str) -> list[LayerGeometry]:
    """Stem and depthwise 3x3 convolutions (1x1 expand/project leave the field alone)."""
    layers = [LayerGeometry(3, 2, 1, module="stem")]
    names = {f"block{index}": name for index, name in mobilenet_v2.STAGE_OUTPUTS.items()}
    index = 1
    for _, _, repeats, stride in mobilenet_v2.INVERTED_RESIDUAL_SETTINGS:
        for i in range(repeats):
            module = f"block{index}"
            layers.append(LayerGeometry(3, stride if i == 0 else 1, 1, module=module))
            if names.get(module) == feature_name:
                return layers
            index += 1
    if feature_name == "last_conv":
        return [*layers, LayerGeometry(1, module="last_conv")]
    raise KeyError(feature_name)


def _vgg16(feature_name: str) -> list[LayerGeometry]:
    layers = []
    for block, (num_convs, _) in enumerate(vgg.VGG16_BLOCKS, start=1):
        for i in range(1, num_convs + 1):
            layers.append(LayerGeometry(3, 1, 1, module=f"conv{block}_{i}"))
        if feature_name == f"conv{block}_{num_convs}":
            return layers
        layers.append(LayerGeometry(2, 2, 0))  # max-pool, 'VALID' (floors odd sizes)
    if feature_name == "pool5":
        return layers
    raise KeyError(feature_name)


def _resnet(stage_sizes: Sequence[int], dilated: bool, feature_name: str) -> list[LayerGeometry]:
    """ResNet (torchvision): 7x7/2 stem, 3x3/2 max-pool, the 3x3 of every bottleneck."""
    layers = [LayerGeometry(7, 2, 3, module="stem"), LayerGeometry(3, 2, 1)]
    if feature_name == "stem":
        return layers
    for stage, num_blocks in enumerate(stage_sizes):
        dilate = dilated and stage == len(stage_sizes) - 1
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 and not dilate else 1
            dilation = 2 if dilate and block > 0 else 1
            module = f"layer{stage + 1}_{block}"
            layers.append(LayerGeometry(3, stride, dilation, dilation, module=module))
        if feature_name == f"stage{stage + 1}":
            return layers
    raise KeyError(feature_name)


_STACKS = {
    "mobilenet_v2": _mobilenet_v2,
    "vgg16": _vgg16,
    "resnet50": lambda name: _resnet((3, 4, 6, 3), False, name),
    "resnet101": lambda name: _resnet((3, 4, 23, 3), False, name),
    "resnet101_dilated": lambda name: _resnet((3, 4, 23, 3), True, name),
}
# EfficientNet-Lite0 pads TensorFlow-style ('SAME'), which depends on each input size's
# parity: its cell centres are not one affine function of the cell index.
SUPPORTED_BACKBONES = tuple(_STACKS)


def layer_stack(backbone: str, feature_name: str) -> list[LayerGeometry]:
    """The layers between the image and a named feature map of a registered backbone.

    Args:
      backbone: Key of :data:`jaxretrieval.backbones.BACKBONES`, one of
        :data:`SUPPORTED_BACKBONES`.
      feature_name: A feature map the backbone returns (``"stage3"``, ``"conv5_3"``...).

    Raises:
      ValueError: An unsupported backbone or a map it does not have.
    """
    if backbone not in _STACKS:
        raise ValueError(
            f"no receptive-field geometry for backbone {backbone!r}; supported: "
            f"{', '.join(SUPPORTED_BACKBONES)}."
        )
    try:
        return _STACKS[backbone](feature_name)
    except KeyError:
        raise ValueError(
            f"{backbone} has no feature map {feature_name!r} with a known geometry."
        ) from None


def backbone_receptive_field(backbone: str, feature_name: str) -> ReceptiveField:
    """:func:`receptive_field` of :func:`layer_stack`.

    Examples:
      >>> backbone_receptive_field("mobilenet_v2", "stage3")
      ReceptiveField(size=267, stride=16, offset=0.0)
    """
    return receptive_field(layer_stack(backbone, feature_name))


def feature_centers(field: ReceptiveField, map_shape: tuple[int, int]) -> Float[Array, "H W 2"]:
    """Receptive-field centre ``(x, y)`` of every cell of a feature map, in input pixels.

    Args:
      field: The map's receptive field.
      map_shape: ``(H, W)`` of the map (static).

    Returns:
      ``centers[i, j] = (offset + stride * j, offset + stride * i)``, float32.
    """
    height, width = map_shape
    xs = field.offset + field.stride * jnp.arange(width, dtype=jnp.float32)  # (W,)
    ys = field.offset + field.stride * jnp.arange(height, dtype=jnp.float32)  # (H,)
    grid_x = jnp.broadcast_to(xs[None, :], (height, width))  # (H, W)
    grid_y = jnp.broadcast_to(ys[:, None], (height, width))  # (H, W)
    return jnp.stack([grid_x, grid_y], axis=-1)  # (H, W, 2)
