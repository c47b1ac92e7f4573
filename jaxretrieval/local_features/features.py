"""DELF local features of one image (or a stack of images) as fixed-size arrays.

A :class:`DelfFeatures` is a NamedTuple, hence a pytree: it passes through ``jit`` and
``vmap``, and :func:`stack_delf_features` stacks the features of several images along a
new leading axis (N images, or a query's shortlist of L) for the batched matcher.
Variable numbers of keypoints are padded to M rows marked invalid.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import Array, Bool, Float

__all__ = [
    "DelfFeatures",
    "check_delf_features",
    "delf_features_nbytes",
    "empty_delf_features",
    "stack_delf_features",
]


class DelfFeatures(NamedTuple):
    """Keypoints of one image (leading axes ``*batch`` for stacks), best first.

    Attributes:
      locations: ``(M, 2)`` receptive-field centres ``(x, y)`` in the image's pixels
        (pixel centres at integers), whatever pyramid scale a keypoint came from.
      descriptors: ``(M, D)`` L2-normalised descriptors (after PCA when the model has
        one); zero rows for padding.
      scores: ``(M,)`` keypoint score (attention, or feature norm), descending over the
        valid rows; 0 for padding.
      scales: ``(M,)`` the pyramid scale (image size relative to the input image) each
        keypoint was found at; the authors' feature scale is its inverse.
      valid: ``(M,)`` which rows are keypoints (the rest is padding).
    """

    locations: Float[Array, "*batch M 2"]
    descriptors: Float[Array, "*batch M D"]
    scores: Float[Array, "*batch M"]
    scales: Float[Array, "*batch M"]
    valid: Bool[Array, "*batch M"]


def check_delf_features(name: str, features: DelfFeatures) -> DelfFeatures:
    """Validates one image's features (static shapes only) and casts dtypes.

    Raises:
      TypeError: Not a :class:`DelfFeatures`, float fields not floating, or ``valid``
        not boolean.
      ValueError: Fields whose shapes disagree.
    """
    if not isinstance(features, DelfFeatures):
        raise TypeError(f"{name} must be DelfFeatures, got {type(features).__name__}.")
    locations = validation.as_float_array(f"{name}.locations", features.locations, axes="M 2")
    num = locations.shape[0]
    descriptors = validation.as_float_array(f"{name}.descriptors", features.descriptors, axes="M D")
    scores = validation.as_float_array(f"{name}.scores", features.scores, axes="M")
    scales = validation.as_float_array(f"{name}.scales", features.scales, axes="M")
    for field, array in (("descriptors", descriptors), ("scores", scores), ("scales", scales)):
        if array.shape[0] != num:
            raise ValueError(
                f"{name}.{field} has {array.shape[0]} rows but {name}.locations has {num}."
            )
    valid = validation.as_mask(f"{name}.valid", features.valid, shape=(num,), axes="M")
    return DelfFeatures(locations, descriptors, scores, scales, valid)


def stack_delf_features(features: Sequence[DelfFeatures]) -> DelfFeatures:
    """Stacks images' features (same M and D) along a new leading axis, as NumPy.

    Raises:
      ValueError: An empty list, or features of different sizes.
    """
    if not features:
        raise ValueError("stack_delf_features needs at least one image's features.")
    shapes = {(np.shape(f.descriptors)) for f in features}
    if len(shapes) != 1:
        raise ValueError(
            f"every image needs the same (M, D) to stack, found {sorted(shapes)}; extract "
            "them with one max_features and one PCA."
        )
    return DelfFeatures(
        *(np.stack([np.asarray(x) for x in field]) for field in zip(*features, strict=True))
    )


def delf_features_nbytes(features: DelfFeatures, *, descriptor_bytes: int = 4) -> int:
    """Bytes to store the valid keypoints of one image (or a stack), without padding.

    Each keypoint costs its descriptor (``D * descriptor_bytes``: 4 for float32, 1 for
    8-bit quantisation) plus 16 bytes of location, score and scale (float32).
    """
    count = int(np.sum(np.asarray(features.valid)))
    dim = int(np.shape(features.descriptors)[-1])
    return count * (dim * descriptor_bytes + 16)


def empty_delf_features(max_features: int, dim: int) -> DelfFeatures:
    """All-padding features, as NumPy (an image too small to give any keypoint)."""
    return DelfFeatures(
        locations=np.zeros((max_features, 2), np.float32),
        descriptors=np.zeros((max_features, dim), np.float32),
        scores=np.zeros((max_features,), np.float32),
        scales=np.zeros((max_features,), np.float32),
        valid=np.zeros((max_features,), bool),
    )
