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

**eps, chosen on held-out training scenes** (``eps="auto"``, :func:`choose_eps`). The pair
differences of a training set span at most ``images in pairs - scenes`` directions
(smvs_train: 736 - 293 = 443 < 512 or 1280), so the pair covariance ``C_S`` is singular
and the ridge ``eps`` alone sets the gain, ``eps ** -1/2``, of every direction no training
pair varies along: 1e-6 gives them a gain of 1000, and any variation of new images along
them swamps the descriptor. ``eps`` is chosen like any other hyperparameter, on data the
evaluation never sees: whole scenes of the *training* set are held out
(:func:`jaxretrieval.data.labelled.split_scenes`, fixed seeds), Lw is learned on the rest
for each ``eps`` of a grid, the held-out scenes are ranked with it
(:func:`jaxretrieval.data.labelled.to_retrieval_dataset` +
:func:`experiments.evaluate_lib.evaluate`, leave-one-out: every held-out image queries the
others), and the ``eps`` with the best mean Medium mAP over the splits is then used to
learn on *all* training images. Descriptors are computed once; only the whitening is
refitted.

The grid is **relative to the mean eigenvalue of the pair covariance**,
``eps = ratio * trace(C_S) / D`` (``trace(C_S)`` is the mean squared distance of the
matching pairs), not absolute. An absolute ``eps`` means a different amount of
regularisation for every backbone, dimension and checkpoint: the mean eigenvalue is
``mean ||x_q - x_p||² / D``, about ``1 / D`` for L2-normalised off-the-shelf descriptors
and smaller after fine-tuning pulls pairs together. The ratio is unit-free, so the value
chosen on the held-out split carries over to the fit on all images (whose ``C_S`` differs
a little) and reads the same for every model: 1e-5 is nearly no ridge, 1 halves the
gain of an average direction by sqrt(2), 10 is close to no whitening (a PCA rotation about the
centre). A number given instead of ``"auto"`` stays an absolute ``eps``, as
:func:`jaxretrieval.whitening.learn_supervised_whitening` takes it.
"""

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments import evaluate_lib
from jaxretrieval import extraction, retrieval_model, whitening
from jaxretrieval.data import datasets
from jaxretrieval.data import labelled as labelled_lib
from jaxretrieval.retrieval_model import ModelConfig

_MAX_LISTED = 3
# eps / (mean eigenvalue of the pair covariance) tried by eps="auto": from almost no
# ridge to almost no whitening, a decade apart.
EPS_RATIOS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Scenes held out per split (at least 2, so a held-out query has negatives) and the seeds
# of the splits: three draws of a fifth of the scenes average out which scenes fall out.
HELD_OUT_FRACTION = 0.2
HELD_OUT_SEEDS = (0, 1, 2)
# The absolute eps used before eps="auto" existed; scored on the held-out splits too.
REFERENCE_EPS = 1e-6


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


def mean_pair_eigenvalue(
    descriptors: np.ndarray, query_idx: np.ndarray, positive_idx: np.ndarray
) -> float:
    """Mean eigenvalue of the pair covariance ``C_S`` (no ridge): ``trace(C_S) / D``.

    ``trace(C_S)`` is the mean squared distance of the matching pairs, so this needs no
    ``D x D`` matrix. ``eps="auto"`` scales its ridge by it (module docstring).
    """
    x = np.asarray(descriptors, np.float64)
    differences = x[query_idx] - x[positive_idx]  # (P, D)
    return float(np.mean(np.sum(differences**2, axis=1)) / x.shape[1])


class HeldOutSplit(NamedTuple):
    """Training scenes split into a part to learn from and held-out scenes to rank.

    Attributes:
      seed: Seed of :func:`jaxretrieval.data.labelled.split_scenes`.
      training_rows: Rows (of the whole set) of the images learned from, ascending.
      held_out_rows: Rows of the held-out images, ascending.
      training: The images learned from (scene ids for the pairs), ``training_rows``.
      held_out: The held-out images, ``held_out_rows``.
      dataset: The held-out images as an evaluation set (the first image of each scene a
        query, :func:`jaxretrieval.data.labelled.to_retrieval_dataset`).
    """

    seed: int
    training_rows: np.ndarray
    held_out_rows: np.ndarray
    training: labelled_lib.LabelledImages
    held_out: labelled_lib.LabelledImages
    dataset: datasets.RetrievalDataset


def held_out_splits(
    labelled: labelled_lib.LabelledImages,
    *,
    fraction: float = HELD_OUT_FRACTION,
    seeds: Sequence[int] = HELD_OUT_SEEDS,
) -> list[HeldOutSplit]:
    """Splits of a training set's scenes for choosing ``eps`` (one per seed).

    Each holds out ``max(2, round(fraction * num_scenes))`` scenes with at least two
    images (:func:`jaxretrieval.data.labelled.split_scenes`); two at least, so that a
    held-out query has negatives to be ranked against.

    Raises:
      LearnWhiteningError: Too few scenes with two images to hold two out and still
        learn from a pair (the message says how many there are).
    """
    eligible = int(np.count_nonzero(labelled.scene_sizes >= 2))
    wanted = max(2, round(fraction * labelled.num_scenes))
    if eligible < wanted + 1:
        raise LearnWhiteningError(
            f"eps 'auto' holds out {wanted} scenes with two images and learns from at least "
            f"one more, but the training set has {eligible} such scenes; give eps as a number"
        )
    index = {pathlib.Path(path): row for row, path in enumerate(labelled.paths)}
    splits = []
    for seed in seeds:
        training, held_out = labelled_lib.split_scenes(
            labelled, validation_fraction=wanted / labelled.num_scenes, seed=seed
        )
        splits.append(
            HeldOutSplit(
                seed=int(seed),
                training_rows=np.array([index[pathlib.Path(p)] for p in training.paths]),
                held_out_rows=np.array([index[pathlib.Path(p)] for p in held_out.paths]),
                training=training,
                held_out=held_out,
                dataset=labelled_lib.to_retrieval_dataset(
                    held_out, name=f"held-out training scenes (seed {seed})"
                ),
            )
        )
    return splits


def _lookup_extraction(descriptors: np.ndarray, paths: Sequence[str]) -> evaluate_lib.ExtractFn:
    """An extraction function that looks the rows of already computed descriptors up."""
    row_of = {pathlib.Path(path): row for row, path in enumerate(paths)}

    def extract(paths, boxes=None):
        rows = [row_of[pathlib.Path(p)] for p in paths]
        return extraction.ExtractionResult(
            descriptors=descriptors[rows],
            valid=np.ones(len(rows), bool),
            paths=[os.fspath(p) for p in paths],
            failures=[],
            compiled_shapes=[],
        )

    return extract


def held_out_map(split: HeldOutSplit, descriptors: np.ndarray) -> dict[str, float]:
    """Medium mAP of the held-out scenes ranked with ``descriptors`` (their rows only).

    Args:
      split: The split.
      descriptors: ``(len(split.held_out_rows), D)`` L2-normalised descriptors of the
        held-out images, in ``held_out_rows`` order.

    Returns:
      ``{"leave_one_out": mAP, "split": mAP}``: every held-out image querying the others,
      and the first image of each scene querying the rest.
    """
    results, _ = evaluate_lib.evaluate(
        split.dataset,
        _lookup_extraction(descriptors, split.held_out.paths),
        protocols=evaluate_lib.PROTOCOLS,
    )
    return {p: float(results[p]["medium"]["map"]) for p in ("leave_one_out", "split")}


class EpsChoice(NamedTuple):
    """What ``eps="auto"`` chose, and the record of every candidate.

    Attributes:
      ratio: The chosen ``eps / mean eigenvalue of C_S`` (module docstring).
      record: JSON-ready: the rule, the held-out splits, and for each ratio (and for the
        absolute :data:`REFERENCE_EPS` and no whitening, for comparison) the held-out
        Medium mAP of each split, leave-one-out and split protocol, and their means.
    """

    ratio: float
    record: dict[str, Any]


def _summary(maps: list[dict[str, float]]) -> dict[str, Any]:
    """Per-split held-out mAPs of one candidate and their means (JSON-ready)."""
    return {
        **{protocol: [m[protocol] for m in maps] for protocol in ("leave_one_out", "split")},
        "mean_leave_one_out": float(np.mean([m["leave_one_out"] for m in maps])),
        "mean_split": float(np.mean([m["split"] for m in maps])),
    }


def _whitened_held_out_map(
    x: np.ndarray, split: HeldOutSplit, *, eps: float, centering: str, dim: int | None
) -> dict[str, float]:
    """:func:`held_out_map` of Lw learned on the split's training part with ``eps``."""
    query_idx, positive_idx = labelled_lib.matching_pairs(split.training.scenes)
    learned = whitening.learn_supervised_whitening(
        x[split.training_rows], query_idx, positive_idx, centering=centering, eps=eps, dim=dim
    )
    return held_out_map(
        split, np.asarray(whitening.apply_whitening(learned, x[split.held_out_rows]))
    )


def choose_eps(
    descriptors: np.ndarray,
    splits: Sequence[HeldOutSplit],
    *,
    centering: str = "queries",
    dim: int | None = None,
    ratios: Sequence[float] = EPS_RATIOS,
) -> EpsChoice:
    """The eps ratio whose Lw ranks held-out training scenes best (module docstring).

    For each split, Lw is learned from the matching pairs of its training part with
    ``eps = ratio * mean_pair_eigenvalue(training part)`` for every ratio, and the
    held-out images are ranked with it (:func:`held_out_map`). The ratio with the best
    leave-one-out Medium mAP averaged over the splits wins (leave-one-out: every held-out
    image is a query, 2-3 times the split protocol's queries); ties go to the larger
    ratio, the more regularised whitening.

    Args:
      descriptors: ``(N, D)`` unwhitened descriptors of the whole training set, the rows
        of the splits.
      splits: From :func:`held_out_splits`.
      centering: As :func:`jaxretrieval.whitening.learn_supervised_whitening`.
      dim: Output dimension (None: all); the held-out scenes are ranked at this size.
      ratios: The candidates.

    Returns:
      The :class:`EpsChoice`.
    """
    x = np.asarray(descriptors, np.float32)
    by_ratio: dict[float, list[dict[str, float]]] = {float(r): [] for r in ratios}
    absolute: dict[float, list[float]] = {float(r): [] for r in ratios}
    reference, unwhitened = [], []
    for split in splits:
        query_idx, positive_idx = labelled_lib.matching_pairs(split.training.scenes)
        scale = mean_pair_eigenvalue(x[split.training_rows], query_idx, positive_idx)
        options = dict(centering=centering, dim=dim)
        for ratio in by_ratio:
            absolute[ratio].append(ratio * scale)
            by_ratio[ratio].append(_whitened_held_out_map(x, split, eps=ratio * scale, **options))
        reference.append(_whitened_held_out_map(x, split, eps=REFERENCE_EPS, **options))
        held_out = x[split.held_out_rows]
        norms = np.linalg.norm(held_out, axis=1, keepdims=True)
        unwhitened.append(held_out_map(split, held_out / np.maximum(norms, 1e-12)))
    best = None
    for ratio in sorted(by_ratio):  # ascending: a tie goes to the larger ratio
        mean = float(np.mean([m["leave_one_out"] for m in by_ratio[ratio]]))
        if best is None or mean >= best[1]:
            best = (ratio, mean)
    record = {
        "rule": "auto",
        "relative_to": "mean eigenvalue of the pair covariance, trace(C_S) / D",
        "criterion": "best mean leave-one-out Medium mAP of held-out training scenes",
        "held_out": {
            "seeds": [split.seed for split in splits],
            "num_scenes": [split.held_out.num_scenes for split in splits],
            "num_images": [len(split.held_out) for split in splits],
            "num_training_pairs": [
                int(labelled_lib.matching_pairs(split.training.scenes)[0].size) for split in splits
            ],
        },
        "grid": [
            {"ratio": ratio, "eps": absolute[ratio], **_summary(maps)}
            for ratio, maps in by_ratio.items()
        ],
        "chosen_ratio": best[0],
        "absolute_reference": {"eps": REFERENCE_EPS, **_summary(reference)},
        "unwhitened": _summary(unwhitened),
    }
    return EpsChoice(best[0], record)


def learn_whitening_model(
    config: ModelConfig,
    variables: dict[str, Any],
    labelled: labelled_lib.LabelledImages,
    *,
    settings: extraction.ExtractionSettings = extraction.ExtractionSettings(),
    centering: str = "queries",
    dim: int | None = None,
    eps: float | str = "auto",
    eps_ratios: Sequence[float] = EPS_RATIOS,
    held_out_fraction: float = HELD_OUT_FRACTION,
    held_out_seeds: Sequence[int] = HELD_OUT_SEEDS,
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
      eps: ``"auto"`` (chosen on held-out training scenes, :func:`choose_eps`) or the
        absolute ridge added to the pair covariance.
      eps_ratios: The candidates of ``"auto"``, relative to the mean eigenvalue of the
        pair covariance.
      held_out_fraction: Scenes held out by each split of ``"auto"`` (at least 2).
      held_out_seeds: One split per seed.
      cache_dir: Reuse the training descriptors from here (see :func:`training_descriptors`).
      progress: Show the extraction's progress bar.
      training_set: How to name the training set in the metadata (e.g. the CSV path).
      base_model: What the model was before (e.g. ``{"checkpoint": DIR}``), for metadata.

    Returns:
      The :class:`LearnedModel`.

    Raises:
      LearnWhiteningError: No scene has two images, ``dim`` exceeds the descriptors'
        dimension, an unknown ``centering``, a bad ``eps``, too few scenes to hold out
        for ``"auto"``, or unreadable images. Checked before the extraction where
        possible.
    """
    if centering not in whitening.CENTERINGS:
        raise LearnWhiteningError(
            f"centering must be one of {whitening.CENTERINGS}, found {centering!r}"
        )
    if isinstance(eps, str) and eps != "auto":
        raise LearnWhiteningError(f"eps must be 'auto' or a positive number, found {eps!r}")
    if not isinstance(eps, str) and not eps > 0:
        raise LearnWhiteningError(f"eps must be 'auto' or a positive number, found {eps}")
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
    splits = None
    if eps == "auto":
        splits = held_out_splits(labelled, fraction=held_out_fraction, seeds=held_out_seeds)
    x = training_descriptors(
        extractor, list(labelled.paths), cache_dir=cache_dir, progress=progress
    )
    scale = mean_pair_eigenvalue(x, query_idx, positive_idx)
    if splits is not None:
        choice = choose_eps(x, splits, centering=centering, dim=dim, ratios=eps_ratios)
        eps_value, selection = choice.ratio * scale, choice.record
    else:
        eps_value, selection = float(eps), {"rule": "given"}
    learned = whitening.learn_supervised_whitening(
        x, query_idx, positive_idx, centering=centering, eps=eps_value, dim=dim
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
            "eps": eps_value,
            # eps relative to the mean eigenvalue of the pair covariance (trace(C_S) / D).
            "eps_ratio": eps_value / scale if scale > 0 else None,
            "mean_pair_eigenvalue": scale,
            "eps_selection": selection,
            "descriptor_dim": num_dims,
            "dim": int(learned.projection.shape[0]),
            "max_side": resolved.max_side,
            "scales": list(resolved.scales),
            "base_model": base_model or {},
        }
    }
    return LearnedModel(new_config, new_variables, learned, metadata)
