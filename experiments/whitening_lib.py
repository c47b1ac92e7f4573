"""Learned whitening (Lw) for a model: describe labelled images, learn from pairs, attach.

:func:`learn_whitening_model` is what ``python -m experiments.learn_whitening`` runs, and
what a notebook calls:

1. describe every training image with the model, *unwhitened* (its pooling, at the
   extraction settings' image size and scales; a whitening layer the model already has
   is ignored and replaced);
2. list the matching pairs from the scene labels
   (:func:`jaxretrieval.data.labelled.matching_pairs`: every ordered pair of images of
   the same scene);
3. learn Lw from them (:func:`jaxretrieval.whitening.learn_supervised_whitening`, with
   cirtorch's query centring by default);
4. attach it as the model's whitening layer
   (:func:`jaxretrieval.retrieval_model.attach_whitening`), with the image size and
   scales it was learned at, so the saved model describes images the same way.

The result's ``metadata`` says how it was made (training set, pairs, centring, dim, eps,
image size); save it with :func:`jaxretrieval.model_io.save_model`.
"""

import dataclasses
import os
from typing import Any, NamedTuple

import numpy as np

from experiments import evaluate_lib
from jaxretrieval import extraction, retrieval_model, whitening
from jaxretrieval.data import labelled as labelled_lib
from jaxretrieval.retrieval_model import ModelConfig

_MAX_LISTED = 3


class LearnWhiteningError(ValueError):
    """A training set or setting that cannot give a whitening; the message says why."""


class LearnedModel(NamedTuple):
    """A model with its learned whitening attached.

    Attributes:
      config: The model, with ``whitening_dim``, ``max_side`` and ``scales`` set.
      variables: Its variables; ``params["whitening"]`` holds the learned projection.
      whitening: The learned :class:`~jaxretrieval.whitening.Whitening` itself.
      metadata: JSON-ready facts about how it was learned (``{"whitening": {...}}``).
    """

    config: ModelConfig
    variables: dict[str, Any]
    whitening: whitening.Whitening
    metadata: dict[str, Any]


def without_whitening(
    config: ModelConfig, variables: dict[str, Any]
) -> tuple[ModelConfig, dict[str, Any]]:
    """The same model with no whitening layer: its descriptors are the pooled ones."""
    params = {k: v for k, v in variables.get("params", {}).items() if k != "whitening"}
    return dataclasses.replace(config, whitening_dim=None), {**variables, "params": params}


def descriptor_dim(extractor: extraction.Extractor) -> int:
    """Dimension of the extractor's unwhitened descriptors (asks it, with no images)."""
    empty = extractor([], progress=False)
    return int(empty.by_pooling[extractor.model.pooling].shape[1])


def training_descriptors(
    extractor: extraction.Extractor,
    paths: list[str],
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Unwhitened ``(N, D)`` float32 descriptors of ``paths``, one row per image.

    Args:
      extractor: The model and settings.
      paths: Image files.
      cache_dir: Reuse (or save) the descriptors here, keyed by model, weights, settings
        and files (as ``experiments.evaluate --cache-dir``).
      progress: Show the extraction's progress bar.

    Raises:
      LearnWhiteningError: Some images could not be read (the first few are named).
    """
    extract = evaluate_lib.cached_extraction(extractor, cache_dir=cache_dir, progress=progress)
    result = extract(paths, None)
    if result.failures:
        listed = "; ".join(f"{path}: {reason}" for path, reason in result.failures[:_MAX_LISTED])
        raise LearnWhiteningError(
            f"{len(result.failures)} of {len(paths)} training images could not be read "
            f"({listed}); fix or remove them from the training set"
        )
    return np.asarray(result.by_pooling[extractor.model.pooling], np.float32)


def learn_whitening_model(
    config: ModelConfig,
    variables: dict[str, Any],
    labelled: labelled_lib.LabelledImages,
    *,
    settings: extraction.ExtractionSettings = extraction.ExtractionSettings(),
    centering: str = "queries",
    dim: int | None = None,
    eps: float = 1e-6,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    training_set: str | None = None,
    base_model: dict[str, Any] | None = None,
) -> LearnedModel:
    """Learns Lw on a labelled set with a model and attaches it to the model.

    Args:
      config: The model (any whitening layer it has is replaced).
      variables: Its variables.
      labelled: Training images with scene labels; never an evaluation set.
      settings: Image size and scales (None fields: the model's); the saved model keeps
        the resolved ones, so it is evaluated the way it was learned.
      centering: ``"queries"`` (cirtorch) or ``"all"``; see
        :func:`jaxretrieval.whitening.learn_supervised_whitening`.
      dim: Output dimension (default: the descriptors' own).
      eps: Ridge added to the pair covariance.
      cache_dir: Reuse the training descriptors from here (see :func:`training_descriptors`).
      progress: Show the extraction's progress bar.
      training_set: How to name the training set in the metadata (e.g. the CSV path).
      base_model: What the model was before (e.g. ``{"checkpoint": DIR}``), for metadata.

    Returns:
      The :class:`LearnedModel`.

    Raises:
      LearnWhiteningError: No scene has two images, ``dim`` exceeds the descriptors'
        dimension, an unknown ``centering``, or unreadable images. Checked before the
        extraction where possible.
    """
    if centering not in whitening.CENTERINGS:
        raise LearnWhiteningError(
            f"centering must be one of {whitening.CENTERINGS}, found {centering!r}"
        )
    base_config, base_variables = without_whitening(config, variables)
    # The unwhitened model at the size it is learned at: the saved model's size, and one
    # descriptor-cache key however the size was given (flags or a checkpoint's own).
    resolved = settings.resolved(base_config)
    sized = dataclasses.replace(base_config, max_side=resolved.max_side, scales=resolved.scales)
    extractor = extraction.Extractor(sized, base_variables, resolved)
    num_dims = descriptor_dim(extractor)
    if dim is not None and not 1 <= dim <= num_dims:
        raise LearnWhiteningError(
            f"dim must be in [1, {num_dims}] ({config.backbone} {config.pooling} "
            f"descriptors have {num_dims} dimensions), found {dim}"
        )
    query_idx, positive_idx = labelled_lib.matching_pairs(labelled.scenes)
    if query_idx.size == 0:
        raise LearnWhiteningError(
            f"no scene of the training set has two images ({len(labelled)} images, "
            f"{labelled.num_scenes} scenes), so there is no matching pair to learn from"
        )
    x = training_descriptors(
        extractor, list(labelled.paths), cache_dir=cache_dir, progress=progress
    )
    learned = whitening.learn_supervised_whitening(
        x, query_idx, positive_idx, centering=centering, eps=eps, dim=dim
    )
    new_config, new_variables = retrieval_model.attach_whitening(sized, base_variables, learned)
    scenes_in_pairs = int(np.count_nonzero(labelled.scene_sizes >= 2))
    images_in_pairs = int(labelled.scene_sizes[labelled.scene_sizes >= 2].sum())
    metadata = {
        "whitening": {
            "method": "learned whitening (Lw) from matching pairs",
            "training_set": training_set,
            "num_images": len(labelled),
            "num_scenes": labelled.num_scenes,
            "num_pairs": int(query_idx.size),
            "pairs": "every ordered pair of images of the same scene",
            # Pair differences span at most this many directions; eps sets the others.
            "pair_difference_rank_bound": images_in_pairs - scenes_in_pairs,
            "centering": centering,
            "eps": eps,
            "descriptor_dim": num_dims,
            "dim": int(learned.projection.shape[0]),
            "max_side": resolved.max_side,
            "scales": list(resolved.scales),
            "base_model": base_model or {},
        }
    }
    return LearnedModel(new_config, new_variables, learned, metadata)
