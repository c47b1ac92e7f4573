"""DELF feature extraction: an image pyramid, keypoints by score, PCA, fixed-size output.

Host side (this module): decoding through :func:`jaxretrieval.data.images.load_scaled`
(shrunk to ``max_side``, never enlarged), the pyramid (one resize per scale), padding
to shape buckets, the merge of the scales and the PCA. Device side: one jitted kernel
per padded image shape that runs :class:`~jaxretrieval.local_features.DelfModel` and
returns the scale's ``max_features`` best cells with their receptive-field centres.

For each scale ``s`` (the authors' 0.25 ... 2, :data:`DELF_SCALES`):

1. the image is resized to ``s`` times its size and zero-padded (after
   normalisation, i.e. with the mean colour) on the bottom and right up to a multiple
   of ``size_multiple`` pixels, so a folder of photos compiles a few shapes per scale;
   a scale whose shorter side is under ``min_map_cells`` cells is skipped;
2. the model gives the local-descriptor map and a score per cell (the attention, or
   the feature norm for a model without a trained attention head); cells over the
   padding are invalid;
3. the ``max_features`` highest-scoring valid cells are kept, each with its
   receptive-field centre (:mod:`.receptive_field`) mapped back to the input image's
   pixels, ``x = (x_s + 0.5) W / W_s - 0.5`` (pixel centres at integers).

The scales' candidates are merged, the ``max_features`` best over all scales with a
score of at least ``score_threshold`` are the keypoints, and each descriptor becomes
``l2(PCA(l2(f)))`` (or ``l2(f)`` when the model has no PCA yet). The authors' config
also runs NMS on receptive-field boxes with IoU 1.0, which removes nothing, so there is
none here.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval import backbones
from jaxretrieval.data import images as image_io
from jaxretrieval.local_features import pca as pca_lib
from jaxretrieval.local_features.attention import feature_norms
from jaxretrieval.local_features.features import (
    DelfFeatures,
    empty_delf_features,
    stack_delf_features,
)
from jaxretrieval.local_features.model import (
    KEYPOINT_SCORES,
    DelfConfig,
    DelfModel,
    feature_channels,
    init_delf_variables,
    make_delf_model,
)
from jaxretrieval.local_features.receptive_field import ReceptiveField, feature_centers
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.whitening import Whitening

__all__ = ["DELF_SCALES", "DelfExtractor", "DelfSettings"]

# The authors' example config: 2 ** (k / 2) for k = -4 .. 2.
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


@dataclasses.dataclass(frozen=True)
class DelfSettings:
    """How to extract DELF features (what to extract is the model); hashable.

    Attributes:
      max_side: Longer side, in pixels, images are shrunk to before the pyramid (never
        enlarged); None uses the model's ``max_side``.
      scales: Pyramid scales relative to that image.
      max_features: M, keypoints per image (the authors' 1000).
      score_threshold: Smallest keypoint score kept. The authors' 100 is on the scale
        of their model's attention; scores here depend on the model, so the default
        keeps the ``max_features`` best whatever their score.
      keypoint_score: ``"attention"`` or ``"l2_norm"``; None uses the model's.
      size_multiple: Padding granularity of the shape buckets, in pixels.
      min_map_cells: Smallest shorter side of a scale's map, in cells.
    """

    max_side: int | None = None
    scales: tuple[float, ...] = DELF_SCALES
    max_features: int = 1000
    score_threshold: float = 0.0
    keypoint_score: str | None = None
    size_multiple: int = 64
    min_map_cells: int = 3

    def __post_init__(self):
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, found {self.max_side}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, found {self.scales}.")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.max_features < 1 or self.size_multiple < 1 or self.min_map_cells < 1:
            raise ValueError(
                f"max_features, size_multiple and min_map_cells must be positive in {self}."
            )
        if self.keypoint_score is not None and self.keypoint_score not in KEYPOINT_SCORES:
            raise ValueError(
                f"keypoint_score must be one of {KEYPOINT_SCORES} or None, found "
                f"{self.keypoint_score!r}."
            )


@functools.cache
def _scale_kernel(
    module: DelfModel, field: ReceptiveField, spec_name: str, keypoint_score: str, k_max: int
):
    """Jitted ``(variables, image, size) -> best cells of one scale`` (cached per setting)."""
    spec = backbones.BACKBONES[spec_name]

    @jax.jit
    def kernel(variables, image, size):
        normalized = backbones.normalize_images(image, spec)  # (1, H, W, 3)
        out = module.apply(variables, normalized, size)
        features, valid = out["features"][0], out["valid"][0]  # (h, w, C), (h, w)
        if keypoint_score == "attention":
            scores = out["scores"][0]  # (h, w)
        else:
            scores = feature_norms(features[None])[0]  # (h, w)
        height, width, channels = features.shape
        centers = feature_centers(field, (height, width)).reshape(height * width, 2)  # (h*w, 2)
        masked = jnp.where(valid, scores, -jnp.inf).reshape(height * width)  # (h*w,)
        k = min(k_max, height * width)
        top_scores, top = jax.lax.top_k(masked, k)  # (k,)
        descriptors = features.reshape(height * width, channels)[top]  # (k, C)
        return centers[top], descriptors.astype(jnp.float32), top_scores, jnp.isfinite(top_scores)

    return kernel


@functools.cache
def _pca_kernel(with_pca: bool):
    """Jitted ``(descriptors, mean, projection) -> l2(PCA(l2(f)))`` (or ``l2(f)``)."""

    @jax.jit
    def kernel(descriptors, mean, projection):
        if not with_pca:
            return l2_normalize(descriptors)
        return pca_lib.apply_descriptor_pca(Whitening(mean, projection), descriptors)

    return kernel


class DelfExtractor:
    """DELF features of images with one model and its variables.

    Args:
      config: The DELF model.
      variables: Its variables (a ``pca`` collection is applied when the config has a
        ``pca_dim``).
      settings: How to extract.

    Raises:
      ValueError: ``config.pca_dim`` set but no ``pca`` variables (or the reverse).

    Examples:
      ``DelfExtractor.pretrained()(image).descriptors`` (ImageNet MobileNetV2 stage3,
      feature-norm keypoints, no PCA).
    """

    def __init__(
        self,
        config: DelfConfig,
        variables: dict[str, Any],
        settings: DelfSettings = DelfSettings(),
    ):
        self.config = config
        self.settings = dataclasses.replace(
            settings,
            max_side=config.max_side if settings.max_side is None else settings.max_side,
            keypoint_score=settings.keypoint_score or config.keypoint_score,
        )
        pca = pca_lib.pca_from_variables(variables)
        if (pca is None) != (config.pca_dim is None):
            raise ValueError(
                f"the model says pca_dim={config.pca_dim} but its variables "
                f"{'have no' if pca is None else 'have a'} 'pca' collection."
            )
        self.pca = pca
        self.dim = feature_channels(config) if pca is None else int(np.shape(pca.projection)[0])
        self.field = config.receptive_field
        self.module = make_delf_model(config)
        self.variables = jax.device_put({k: v for k, v in variables.items() if k != "pca"})
        self._kernel = _scale_kernel(
            self.module,
            self.field,
            config.backbone,
            self.settings.keypoint_score,
            self.settings.max_features,
        )
        self._project = _pca_kernel(pca is not None)
        self._pad_value = tuple(255.0 * m for m in config.spec.input_mean)
        self.compiled_shapes: set[tuple[int, int]] = set()

    @classmethod
    def pretrained(
        cls,
        config: DelfConfig | None = None,
        settings: DelfSettings = DelfSettings(),
        *,
        weights_path: str | os.PathLike | None = None,
    ) -> "DelfExtractor":
        """An extractor on ImageNet weights (no fine-tuning; feature-norm keypoints)."""
        config = config or DelfConfig(keypoint_score="l2_norm")
        return cls(config, init_delf_variables(config, weights_path=weights_path), settings)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, settings: DelfSettings = DelfSettings()
    ) -> "DelfExtractor":
        """An extractor for a saved DELF model directory (or a training work directory).

        Raises:
          jaxretrieval.model_io.ModelDirectoryError: Not a DELF model directory.
        """
        from jaxretrieval import model_io  # model_io imports this package lazily too

        config, variables = model_io.load_delf_model(path)
        return cls(config, variables, settings)

    @property
    def feature_stride(self) -> int:
        """Input pixels between descriptor cells at scale 1."""
        return self.field.stride

    @property
    def min_image_side(self) -> int:
        """Smallest image side (pixels) that gives features at the largest scale."""
        return math.ceil(
            self.settings.min_map_cells * self.field.stride / max(self.settings.scales)
        )

    def load(self, path: str | os.PathLike, *, box=None) -> np.ndarray:
        """Reads an RGB image shrunk (never enlarged) to ``max_side``, cropped to ``box``.

        Raises:
          jaxretrieval.data.images.ImageDecodeError: Unreadable file.
        """
        (image,) = image_io.load_scaled(
            path, max_side=self.settings.max_side, box=box, upscale=False
        )
        return image

    def _padded(self, image: np.ndarray) -> np.ndarray:
        multiple = self.settings.size_multiple
        height, width = image.shape[:2]
        padded = cv2.copyMakeBorder(
            image.astype(np.float32),
            0,
            -height % multiple,
            0,
            -width % multiple,
            cv2.BORDER_CONSTANT,
            value=self._pad_value,
        )
        self.compiled_shapes.add(padded.shape[:2])
        return padded

    def _scale_candidates(self, image: np.ndarray, scale: float):
        """The best cells of one scale, locations in ``image``'s pixels; None if too small."""
        (scaled,) = image_io.scaled_images(image, max_side=None, scales=(scale,))
        min_side = self.settings.min_map_cells * self.field.stride
        if min(scaled.shape[:2]) < min_side:
            return None
        size = np.array([scaled.shape[:2]], np.int32)  # (1, 2) (height, width)
        locations, descriptors, scores, ok = jax.device_get(
            self._kernel(self.variables, self._padded(scaled)[None], size)
        )
        factor = np.array(
            [image.shape[1] / scaled.shape[1], image.shape[0] / scaled.shape[0]], np.float32
        )  # (2,) (x, y)
        locations = (locations + 0.5) * factor[None, :] - 0.5  # (k, 2) in image pixels
        return locations, descriptors, scores, ok

    def __call__(self, image: np.ndarray) -> DelfFeatures:
        """DELF features of one RGB ``uint8`` image, locations in its pixels (NumPy).

        An image too small for every scale gives features that are all padding.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}."
            )
        settings = self.settings
        parts = []
        for scale in settings.scales:
            found = self._scale_candidates(image, scale)
            if found is not None:
                parts.append((*found, np.full(found[2].shape, scale, np.float32)))
        if not parts:
            return empty_delf_features(settings.max_features, self.dim)
        locations, descriptors, scores, ok, scales = (
            np.concatenate(x) for x in zip(*parts, strict=True)
        )
        keep = ok & (scores >= settings.score_threshold)
        order = np.argsort(np.where(keep, -scores, np.inf), kind="stable")[: settings.max_features]
        count = min(int(keep.sum()), settings.max_features)
        order = order[:count]
        out = empty_delf_features(settings.max_features, self.dim)
        out.locations[:count] = locations[order]
        out.scores[:count] = scores[order]
        out.scales[:count] = scales[order]
        out.valid[:count] = True
        raw = np.zeros((settings.max_features, descriptors.shape[1]), np.float32)
        raw[:count] = descriptors[order]
        mean = projection = None
        if self.pca is not None:
            mean, projection = self.pca.mean, self.pca.projection
        projected = np.asarray(self._project(raw, mean, projection))
        out.descriptors[:count] = projected[:count]
        return out

    def extract_files(
        self,
        paths: Sequence[str | os.PathLike],
        boxes: Sequence[Any] | None = None,
    ) -> DelfFeatures:
        """Stacked features of image files (leading axis N), each shrunk to ``max_side``.

        Raises:
          jaxretrieval.data.images.ImageDecodeError: An unreadable file (named).
          ValueError: ``boxes`` of another length than ``paths``.
        """
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"got {len(boxes)} boxes for {len(paths)} images.")
        boxes = boxes or [None] * len(paths)
        return stack_delf_features(
            [self(self.load(p, box=b)) for p, b in zip(paths, boxes, strict=True)]
        )

    def score_map(self, image: np.ndarray) -> np.ndarray:
        """The keypoint score of every cell at scale 1, ``(h, w)`` (attention maps).

        Cells over the bucket padding are cropped off; cell ``(i, j)`` is centred at
        pixel ``offset + stride * (j, i)`` of ``image``.
        """
        kernel = _map_kernel(self.module, self.config.backbone, self.settings.keypoint_score)
        size = np.array([image.shape[:2]], np.int32)
        scores, valid = jax.device_get(kernel(self.variables, self._padded(image)[None], size))
        rows, cols = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
        return scores[:rows, :cols]


@functools.cache
def _map_kernel(module: DelfModel, spec_name: str, keypoint_score: str):
    spec = backbones.BACKBONES[spec_name]

    @jax.jit
    def kernel(variables, image, size):
        out = module.apply(variables, backbones.normalize_images(image, spec), size)
        if keypoint_score == "attention":
            scores = out["scores"][0]
        else:
            scores = feature_norms(out["features"])[0]
        return scores, out["valid"][0]

    return kernel
