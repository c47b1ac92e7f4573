"""DSM local features of images: backbone activations at several scales -> MSER regions.

The host half of DSM for real images: :class:`DSMFeatureExtractor` runs a model's
backbone (pretrained, saved, or being trained: the same variables the global extractor
uses) on one image at several scales and turns the activation maps into fixed-size
:class:`~jaxretrieval.spatial_verification.LocalFeatures` with
:func:`~jaxretrieval.spatial_verification.activation_local_features`. Images are read
through :func:`jaxretrieval.data.images.load_scaled` (never enlarged, as DSM and
cirtorch's ``imresize``). A :class:`~jaxretrieval.spatial_verification.DSMSettings` chooses
ours or the published setting; in the published one, query and database images are
selected differently (``extractor(image, as_query=True)``).
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import numpy as np

from jaxretrieval import backbones, jit_cache, retrieval_model
from jaxretrieval.data import images as image_io
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification.activation_regions import (
    LocalFeatures,
    MSERParams,
    activation_local_features,
)
from jaxretrieval.spatial_verification.settings import DEFAULT_SCALES, DSMSettings

__all__ = ["DEFAULT_SCALES", "DSMFeatureExtractor", "ImageTooSmallError", "MIN_MAP_CELLS"]

# An activation map needs a few cells per side for MSER regions (OpenCV fails on 1x1).
MIN_MAP_CELLS = 3


class ImageTooSmallError(ValueError):
    """An image too small for the network's activation maps; the message says the size."""


class DSMFeatureExtractor:
    """Backbone activation maps at several scales -> DSM local features of one image.

    Either ``settings`` or the single options below choose the features; the single
    options (the constructor's older interface) change ours, for both image roles.

    Args:
      model: The model whose backbone gives the activations.
      variables: Its variables (the backbone's are under ``"backbone"``).
      layer: Feature map to use (default: the model's pooled map).
      scales: Image scales (default :data:`DEFAULT_SCALES`); each gives one activation
        map.
      max_features: Fixed number of features per image (M, default 512).
      mser: MSER settings (default :class:`MSERParams()`).
      nms_iou: NMS overlap threshold (default 0.7).
      pad_multiple: Pad each scaled image on the right and bottom to a multiple of this
        many pixels (with the backbone's input mean, i.e. zeros after normalisation, as the
        network's own zero padding) and crop the activation map back to the cells that
        cover the image. Folders of photos have dozens of sizes and every distinct input
        shape costs a compile; buckets of 64 px keep a few. None runs each image at its
        own size.
      settings: All feature settings at once, e.g.
        :meth:`DSMSettings.published() <jaxretrieval.spatial_verification.DSMSettings.
        published>`; None means ``DSMSettings()`` changed by the single options.

    Raises:
      ValueError: If ``settings`` is given together with ``scales``, ``max_features``,
        ``mser`` or ``nms_iou``.
    """

    def __init__(
        self,
        model: ModelConfig,
        variables: dict[str, Any],
        *,
        layer: str | None = None,
        scales: Sequence[float] | None = None,
        max_features: int | None = None,
        mser: MSERParams | None = None,
        nms_iou: float | None = None,
        pad_multiple: int | None = None,
        settings: DSMSettings | None = None,
    ):
        single = dict(scales=scales, max_features=max_features, mser=mser, nms_iou=nms_iou)
        given = sorted(name for name, value in single.items() if value is not None)
        if settings is not None and given:
            raise ValueError(
                f"pass either settings or {', '.join(given)}; to change a setting, use "
                "dataclasses.replace on the DSMSettings."
            )
        if settings is None:
            settings = _settings_from_options(**single)
        self.settings = settings
        self.spec = model.spec
        self.layer = layer or model.resolved_feature_name
        self.feature_stride = retrieval_model.make_model(
            ModelConfig(backbone=model.backbone, feature_name=self.layer)
        ).feature_stride
        self.pad_multiple = pad_multiple
        self._pad_value = tuple(255.0 * m for m in self.spec.input_mean)
        backbone_variables = {
            collection: tree["backbone"]
            for collection, tree in variables.items()
            if "backbone" in tree
        }
        module, spec, layer_name = self.spec.module(), self.spec, self.layer

        @jax.jit
        def forward(backbone_variables, images):
            normalized = backbones.normalize_images(images, spec)
            _, features = module.apply(backbone_variables, normalized, train=False)
            return features[layer_name]

        self._backbone_variables = backbone_variables
        self._forward = forward

    @classmethod
    def pretrained(
        cls,
        backbone: str = "mobilenet_v2",
        *,
        weights_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "DSMFeatureExtractor":
        """An extractor on the backbone's ImageNet weights (shipped, or ``weights_path``)."""
        model = ModelConfig(backbone=backbone)
        variables = retrieval_model.init_model_variables(model, weights_path=weights_path)
        return cls(model, variables, **kwargs)

    @property
    def scales(self) -> tuple[float, ...]:
        """Image scales of the activation maps."""
        return self.settings.scales

    @property
    def max_features(self) -> int:
        """Features per database image (M; a query's when ``as_query``, usually the same)."""
        return self.settings.database.max_features

    @property
    def mser(self) -> MSERParams:
        """MSER settings."""
        return self.settings.mser

    @property
    def nms_iou(self) -> float | None:
        """NMS threshold of database images."""
        return self.settings.database.nms_iou

    @property
    def min_image_side(self) -> int:
        """Smallest image side (pixels) whose scale-1 map has ``MIN_MAP_CELLS`` cells."""
        return MIN_MAP_CELLS * self.feature_stride

    def load(self, path: str | os.PathLike, *, max_side: int | None) -> np.ndarray:
        """Reads an RGB image, shrunk (never enlarged) to ``max_side``.

        Raises:
          jaxretrieval.data.images.ImageDecodeError: Unreadable file.
          ImageTooSmallError: The image is too small for the network.
        """
        (image,) = image_io.load_scaled(path, max_side=max_side, upscale=False)
        self.check_size(image, name=os.fspath(path))
        return image

    def check_size(self, image: np.ndarray, *, name: str = "image") -> None:
        """Raises :class:`ImageTooSmallError` if ``image`` is too small for the network."""
        height, width = image.shape[:2]
        needed = int(np.ceil(self.min_image_side / max(self.scales)))
        if min(height, width) < needed:
            raise ImageTooSmallError(
                f"{name} is {width} x {height} pixels; DSM features with {self.spec.name} "
                f"need at least {needed} pixels per side"
            )

    def activation_maps(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """``(activations (H', W', C), stride)`` per scale, strides in pixels of ``image``.

        Scales at which the image would be smaller than :attr:`min_image_side` are left
        out (a small image keeps its larger scales).
        """
        maps = []
        for scaled in image_io.scaled_images(image, max_side=None, scales=self.scales):
            if min(scaled.shape[:2]) < self.min_image_side:
                continue
            activations = self._activations(scaled)
            maps.append((activations, image.shape[1] / activations.shape[1]))
        return maps

    def _activations(self, image: np.ndarray) -> np.ndarray:
        """Activation map of one image, padded to a shape bucket and cropped back."""
        height, width = image.shape[:2]
        padded = image.astype(np.float32)
        if self.pad_multiple:
            pad_h = -height % self.pad_multiple
            pad_w = -width % self.pad_multiple
            padded = cv2.copyMakeBorder(
                padded, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self._pad_value
            )
        # Without pad_multiple every image size is a new compiled shape (see jit_cache).
        jit_cache.drop_compiled_if_full(self._forward)
        activations = np.asarray(self._forward(self._backbone_variables, padded[None])[0])
        if self.pad_multiple:
            stride = self.feature_stride
            activations = activations[: -(-height // stride), : -(-width // stride)]
        return activations  # (H', W', C)

    def __call__(self, image: np.ndarray, *, as_query: bool = False) -> LocalFeatures:
        """Features of one RGB ``uint8`` image, coordinates in its pixels.

        Args:
          image: The image.
          as_query: Select features as for a query image (the settings' ``query``)
            instead of a database image (``database``). Ours treats both alike; the
            published setting runs NMS on database images only and budgets 20 features
            per channel and scale for a query, 10 for a database image.

        Raises:
          ImageTooSmallError: The image is too small for the network.
        """
        self.check_size(image)
        return self._select(self.activation_maps(image), as_query=as_query)

    def query_and_database_features(self, image: np.ndarray) -> tuple[LocalFeatures, LocalFeatures]:
        """Features of one image as a query and as a database image, one forward pass.

        For leave-one-out protocols, where every image is both. The two are the same
        object when the settings select both roles alike (ours).

        Raises:
          ImageTooSmallError: The image is too small for the network.
        """
        self.check_size(image)
        maps = self.activation_maps(image)
        query = self._select(maps, as_query=True)
        if self.settings.query == self.settings.database:
            return query, query
        return query, self._select(maps, as_query=False)

    def _select(self, maps: list[tuple[np.ndarray, float]], *, as_query: bool) -> LocalFeatures:
        selection = self.settings.selection(as_query=as_query)
        return activation_local_features(
            maps, mser=self.settings.mser, **dataclasses.asdict(selection)
        )


def _settings_from_options(
    *,
    scales: Sequence[float] | None,
    max_features: int | None,
    mser: MSERParams | None,
    nms_iou: float | None,
) -> DSMSettings:
    """``DSMSettings()`` with the constructor's single options applied to both roles."""
    settings = DSMSettings()
    selection = settings.database
    if max_features is not None:
        selection = dataclasses.replace(selection, max_features=max_features)
    if nms_iou is not None:
        selection = dataclasses.replace(selection, nms_iou=nms_iou)
    return dataclasses.replace(
        settings,
        scales=settings.scales if scales is None else tuple(scales),
        mser=settings.mser if mser is None else mser,
        query=selection,
        database=selection,
    )
