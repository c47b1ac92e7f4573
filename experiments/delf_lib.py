"""DELF in the experiments: its two training stages, its PCA, matching and re-ranking.

Training runs through the one training loop (:func:`experiments.train_lib.train_and_evaluate`)
with ``config.task = "delf"``: :class:`DelfTask` answers the loop's questions for either
stage (``config.delf.stage``):

* ``"descriptor"`` (stage 1, descriptor fine-tuning): the backbone layers from
  ``model.first_trainable`` up to the local-descriptor map, and the global-pooling
  classifier, train with :func:`jaxretrieval.losses.classification_loss` (optional label
  smoothing) over the training scenes as classes;
* ``"attention"`` (stage 2): starting from a stage-1 model (``model.init_checkpoint``),
  only the attention head and its classifier train; the backbone is frozen. With
  ``delf.attention_on_imagenet`` and no checkpoint, it starts from the ImageNet
  backbone instead (the ablation: attention without fine-tuning).

Validation is the classification accuracy (and loss) of the stage's classifier on
held-out images of the training scenes: one image of each scene with at least
``delf.validation_min_scene_size`` images (smvs_train: 50 scenes of 5 photos) never
trains, so the curves measure generalisation to new photos of known scenes, cheaply.
Retrieval quality is measured afterwards on the evaluation sets
(:func:`evaluate_delf`). The export is a DELF model directory (``"kind": "delf"``).

The rest serves the CLIs and benchmarks: :func:`learn_model_pca` (for
``python -m experiments.delf_pca``), :func:`match_pair` (``python -m experiments.match
--method delf``), :func:`evaluate_delf` (a dataset's global ranking re-ranked by DELF
inliers, and the seed's global + DELF + QE row, with
:mod:`experiments.rerank_lib`'s DELF methods) and :func:`save_attention_maps`.
"""

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import evaluate_lib, rerank_lib, train_lib
from jaxretrieval import losses, model_io, similarity
from jaxretrieval.data import labelled as labelled_lib
from jaxretrieval.data import training_pipeline
from jaxretrieval.local_features import (
    DelfConfig,
    DelfExtractor,
    DelfFeatures,
    DelfSettings,
    VerificationSettings,
    delf_features_nbytes,
    init_delf_variables,
    learn_descriptor_pca,
    make_delf_model,
    pca_variables,
    stack_delf_features,
    verify_pair,
)
from jaxretrieval.training import state

STAGES = ("descriptor", "attention")


def held_out_images(
    images: labelled_lib.LabelledImages, *, min_scene_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(training, validation)`` image indices: one held-out image per large scene.

    Every scene with at least ``min_scene_size`` images gives one image (drawn with the
    seed) to validation; all scenes keep at least ``min_scene_size - 1`` training
    images, so every class is trained.

    Raises:
      ValueError: ``min_scene_size < 2`` (a scene would lose its only image).
    """
    if min_scene_size < 2:
        raise ValueError(f"validation_min_scene_size must be >= 2, found {min_scene_size}.")
    rng = np.random.default_rng(seed)
    held_out = [
        int(rng.choice(images.images_of_scene(scene)))
        for scene in range(images.num_scenes)
        if images.scene_sizes[scene] >= min_scene_size
    ]
    validation = np.sort(np.asarray(held_out, np.int64))
    training = np.setdiff1d(np.arange(len(images)), validation)
    return training, validation


def descriptor_trainable(
    config: DelfConfig, first_trainable: str | None
) -> Callable[[tuple[str, ...]], bool]:
    """Stage 1's trainable parameters: the classifier and the backbone up to the map.

    Backbone layers from ``first_trainable`` to the descriptor map's last layer train;
    later layers never influence the descriptors and would only be shrunk by weight
    decay, so they stay frozen.

    Raises:
      ValueError: ``first_trainable`` is not a backbone layer before the map.
    """
    names = state.backbone_layer_names(config.spec.module())
    last = names.index(config.last_backbone_layer)
    usable = names[: last + 1]
    if first_trainable is not None and first_trainable not in usable:
        raise ValueError(
            f"model.first_trainable={first_trainable!r} must be one of the backbone layers "
            f"before {config.feature_name}: {usable}."
        )
    start = 0 if first_trainable is None else usable.index(first_trainable)
    trained = set(usable[start:])

    def trainable(path: tuple[str, ...]) -> bool:
        if path[0] == "descriptor_classifier":
            return True
        return path[0] == "backbone" and path[1] in trained

    return trainable


def attention_trainable(path: tuple[str, ...]) -> bool:
    """Stage 2: the attention head and its classifier only."""
    return path[0] in ("attention", "attention_classifier")


def classification_batch_loss(model, logits_key: str, label_smoothing: float):
    """``(variables, batch) -> loss`` for single labelled images (``image``, ``label``)."""

    def batch_loss(variables, batch):
        out = model.apply(variables, batch["image"], batch["image_size"])
        return losses.classification_loss(
            out[logits_key], batch["label"], label_smoothing=label_smoothing
        )

    return batch_loss


class DelfTask:
    """One DELF training stage for :func:`experiments.train_lib.train_and_evaluate`.

    Raises:
      ValueError: An unknown stage, an attention stage without ``model.init_checkpoint``,
        or a stage-1 model trained on another number of scenes.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.config = config
        self.workdir = workdir
        delf = config.delf
        if delf.stage not in STAGES:
            raise ValueError(f"delf.stage must be one of {STAGES}, found {delf.stage!r}.")
        self.stage = delf.stage
        self.images = train_lib.load_training_images(config.data)
        train_lib.check_training_images(self.images)
        self.train_indices, self.validation_indices = held_out_images(
            self.images, min_scene_size=delf.validation_min_scene_size, seed=config.seed
        )
        num_classes = self.images.num_scenes
        init_checkpoint = config.model.get("init_checkpoint")
        imagenet = DelfConfig(
            backbone=config.model.backbone,
            feature_name=delf.feature_name,
            num_classes=num_classes,
            attention_hidden=delf.attention_hidden,
            max_side=delf.max_side,
            keypoint_score="l2_norm",  # no trained attention yet
        )
        if self.stage == "descriptor":
            if init_checkpoint:
                raise ValueError(
                    "the descriptor stage starts from ImageNet weights; model.init_checkpoint "
                    "is for the attention stage."
                )
            self.delf_config = imagenet
            self.initial_variables = init_delf_variables(imagenet, seed=config.seed)
            self.trainable = descriptor_trainable(imagenet, config.model.first_trainable)
            self.logits_key = "descriptor_logits"
        else:
            if init_checkpoint:
                loaded, self.initial_variables = model_io.load_delf_model(init_checkpoint)
            elif delf.get("attention_on_imagenet"):
                loaded = imagenet  # the ablation: attention without fine-tuning
                self.initial_variables = init_delf_variables(imagenet, seed=config.seed)
            else:
                raise ValueError(
                    "the attention stage starts from a descriptor-stage model: set "
                    "--config.model.init_checkpoint=<stage-1 work directory> (or "
                    "--config.delf.attention_on_imagenet=true for attention without "
                    "fine-tuning)."
                )
            if loaded.num_classes != num_classes:
                raise ValueError(
                    f"{init_checkpoint} was trained on {loaded.num_classes} scenes but the "
                    f"training data has {num_classes}; train both stages on the same data."
                )
            self.delf_config = dataclasses.replace(loaded, keypoint_score="attention")
            self.trainable = attention_trainable
            self.logits_key = "attention_logits"
        self.model = make_delf_model(self.delf_config, freeze_batch_stats=True)
        self.batch_loss = classification_batch_loss(
            self.model, self.logits_key, delf.label_smoothing
        )
        self.steps_per_epoch = len(self.train_indices) // config.optim.batch_size
        self.images_per_batch = config.optim.batch_size
        self._logits = jax.jit(
            lambda variables, images, sizes: self.model.apply(variables, images, sizes)[
                self.logits_key
            ]
        )

    def _dataset(self, indices: np.ndarray, epoch: int, augmentation):
        spec = self.delf_config.spec
        return training_pipeline.single_image_dataset(
            self.images,
            indices,
            augmentation=augmentation,
            mean=spec.input_mean,
            std=spec.input_std,
            seed=self.config.seed,
            epoch=epoch,
        )

    def epoch_dataset(self, epoch: int, variables) -> Any:
        """The training images in a seeded order of their own per epoch, augmented."""
        del variables  # classification needs no mining
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_indices)
        return self._dataset(order, epoch, train_lib._augmentation(self.config.data))

    def log_extras(self) -> dict[str, Any]:
        """Nothing per epoch."""
        return {}

    def validate(self, variables) -> dict[str, float]:
        """Accuracy and loss of the stage's classifier on the held-out images ({} if none)."""
        if not len(self.validation_indices):
            return {}
        size = self.config.data.image_size
        dataset = self._dataset(
            self.validation_indices, 0, training_pipeline.Augmentation.none(size)
        )
        batch = self.config.optim.batch_size
        correct, total_loss = 0, 0.0
        for start in range(0, len(dataset), batch):
            items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            count = len(items)
            items += [items[-1]] * (batch - count)  # a fixed batch shape: one compile
            images = np.stack([item["image"] for item in items])
            sizes = np.stack([item["image_size"] for item in items])
            labels = np.array([int(item["label"]) for item in items[:count]])
            logits = np.asarray(self._logits(variables, images, sizes), np.float64)[:count]
            correct += int(np.sum(np.argmax(logits, axis=1) == labels))
            log_probs = logits - logits.max(axis=1, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
            total_loss += float(-log_probs[np.arange(count), labels].sum())
        num = len(self.validation_indices)
        return {"validation_accuracy": correct / num, "validation_loss": total_loss / num}

    def export(self, directory: pathlib.Path, variables, metadata: dict[str, Any]) -> None:
        """A DELF model directory (``load_delf_model``, ``--method delf --checkpoint``)."""
        model_io.save_model(
            directory, self.delf_config, variables, metadata={**metadata, "stage": self.stage}
        )


# --------------------------------------------------------------------------------- PCA


def learn_model_pca(
    config: DelfConfig,
    variables: dict[str, Any],
    paths: Sequence[str],
    *,
    dim: int = 40,
    whitening: bool = False,
    settings=None,
    progress: Callable[[Sequence[str]], Sequence[str]] | None = None,
) -> tuple[DelfConfig, dict[str, Any], dict[str, Any]]:
    """A DELF model with a PCA learned on the raw descriptors of ``paths``.

    Every keypoint the model extracts from the images (without PCA) is a sample; the
    PCA is :func:`jaxretrieval.local_features.learn_descriptor_pca`.

    Args:
      config: The trained DELF model (its PCA, if any, is replaced).
      variables: Its variables.
      paths: Training images (never evaluation images).
      dim: Output dimension (the paper's 40).
      whitening: Whiten too (the authors' ``use_whitening``).
      settings: :class:`~jaxretrieval.local_features.DelfSettings` of the extraction.
      progress: Optional wrapper of the path list (e.g. ``tqdm``).

    Returns:
      ``(config, variables, facts)``: the model with ``pca_dim``/``pca_whitening`` set
      and a ``pca`` collection, and facts for its metadata (images, samples, explained
      variance).
    """
    raw_config = dataclasses.replace(config, pca_dim=None, pca_whitening=False)
    raw_variables = {k: v for k, v in variables.items() if k != "pca"}
    kwargs = {} if settings is None else {"settings": settings}
    extractor = DelfExtractor(raw_config, raw_variables, **kwargs)
    samples = []
    for path in progress(paths) if progress else paths:
        features = extractor(extractor.load(path))
        samples.append(features.descriptors[features.valid])
    descriptors = np.concatenate(samples)
    pca = learn_descriptor_pca(descriptors, dim=dim, whitening=whitening)
    unit = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-6)
    centred = unit - unit.mean(axis=0)
    total = float(np.sum(centred * centred))
    kept = np.asarray(pca.projection, np.float64)
    if whitening:  # measure the variance the kept directions carry, not the whitened one
        kept = kept / np.linalg.norm(kept, axis=1, keepdims=True)
    explained = float(np.sum((centred @ kept.T) ** 2)) / max(total, 1e-12)
    facts = {
        "pca_images": len(paths),
        "pca_samples": int(descriptors.shape[0]),
        "pca_explained_variance": explained,
    }
    new_config = dataclasses.replace(config, pca_dim=dim, pca_whitening=whitening)
    return new_config, {**raw_variables, "pca": pca_variables(pca)}, facts


# ---------------------------------------------------------------------------- matching


@functools.cache
def _jitted_verify(settings: VerificationSettings):
    kwargs = settings.as_kwargs()
    return jax.jit(lambda a, b, key: verify_pair(a, b, key=key, **kwargs))


def match_pair(
    features_a: DelfFeatures,
    features_b: DelfFeatures,
    settings: VerificationSettings | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Verifies two images' DELF features; plain NumPy results (as ``match_lib``'s).

    ``settings`` default to the authors' (:class:`VerificationSettings()`); ``seed``
    makes the RANSAC key.

    Returns:
      ``num_inliers``, ``num_tentative`` (mutual matches), ``transform`` (2, 3) from a
      to b, and ``points_a`` / ``points_b``, the inliers' locations ((n, 2) each).
    """
    verify = _jitted_verify(settings or VerificationSettings())
    result, matches = verify(features_a, features_b, jax.random.key(seed))
    mask = np.asarray(result.inlier_mask)
    index_a = np.asarray(matches.index_a)[mask]
    index_b = np.asarray(matches.index_b)[mask]
    return {
        "num_inliers": int(result.num_inliers),
        "num_tentative": int(np.asarray(matches.valid).sum()),
        "transform": np.asarray(result.transform),
        "points_a": np.asarray(features_a.locations)[index_a],
        "points_b": np.asarray(features_b.locations)[index_b],
    }


# -------------------------------------------------------------------------- evaluation


def evaluate_delf(
    dataset,
    extract: evaluate_lib.ExtractFn,
    delf_extractor: DelfExtractor,
    *,
    protocols: Sequence[str] = ("split",),
    methods: Sequence[str] = rerank_lib.DELF_METHODS,
    settings: rerank_lib.DelfRerankSettings | None = None,
) -> dict[str, Any]:
    """Revisited metrics of the global ranking and of its DELF re-rankings.

    Each image's DELF features are extracted once (an uncropped query of ``split`` is
    also its ``leave_one_out`` row), and one verification serves both methods
    (:func:`experiments.rerank_lib.delf_rerank`).

    Args:
      dataset: A revisitop-layout dataset.
      extract: Global descriptors (see :func:`experiments.evaluate_lib.evaluate`).
      delf_extractor: DELF features (queries cropped to their boxes in ``split``).
      protocols: ``"split"`` and/or ``"leave_one_out"``.
      methods: ``"delf"`` (re-rank by inliers) and/or ``"delf+qe"``.
      settings: Their parameters (default ``DelfRerankSettings()``).

    Returns:
      ``{"dataset", "rerank_settings", "<protocol>", "<protocol>+<method>"...}`` with
      revisited metrics, ``"<protocol>+delf_inliers"`` the (Q, N) inlier counts, and
      ``"delf_features"``: images extracted, mean keypoints, bytes and seconds per image
      (float32 descriptors, location, score and scale; wall time including compiles).
    """
    unknown = set(methods) - set(rerank_lib.DELF_METHODS)
    if unknown:
        raise ValueError(
            f"unknown DELF methods {sorted(unknown)}; choose from {rerank_lib.DELF_METHODS}."
        )
    settings = settings or rerank_lib.DelfRerankSettings()
    rankings = evaluate_lib.rank_protocols(dataset, extract, protocols)
    results: dict[str, Any] = {
        "dataset": dataset.name,
        "rerank_settings": dataclasses.asdict(settings),
    }
    cache: dict[tuple[str, Any], DelfFeatures] = {}
    seconds = 0.0

    def features(paths, boxes=None):
        nonlocal seconds
        boxes = boxes or [None] * len(paths)
        for path, box in zip(paths, boxes, strict=True):
            key = (str(path), None if box is None else tuple(float(v) for v in box))
            if key not in cache:
                tick = time.perf_counter()
                cache[key] = delf_extractor(delf_extractor.load(path, box=box))
                seconds += time.perf_counter() - tick
        keys = [
            (str(p), None if b is None else tuple(float(v) for v in b))
            for p, b in zip(paths, boxes, strict=True)
        ]
        return stack_delf_features([cache[k] for k in keys])

    for protocol, ranking in rankings.items():
        results[protocol] = evaluate_lib.score(ranking)
        if protocol == "split":
            database = features(ranking.database_paths)
            queries = features(ranking.query_paths, dataset.query_boxes)
            exclude = None
        else:
            database = queries = features(ranking.query_paths)
            exclude = np.arange(len(ranking.query_paths))
        scores = np.asarray(
            similarity.cosine_similarities(ranking.query_descriptors, ranking.database_descriptors)
        )
        reranking, pair_inliers = rerank_lib.delf_rerank(
            scores, queries, database, settings=settings, exclude=exclude
        )
        results[f"{protocol}+delf_inliers"] = pair_inliers
        if "delf" in methods:
            ranked = dataclasses.replace(ranking, ranks=np.asarray(reranking.ranks))
            results[f"{protocol}+delf"] = evaluate_lib.score(ranked)
        if "delf+qe" in methods:
            ranks = rerank_lib.delf_query_expansion_ranks(
                ranking.query_descriptors,
                ranking.database_descriptors,
                reranking,
                settings=settings,
                exclude=exclude,
            )
            results[f"{protocol}+delf+qe"] = evaluate_lib.score(
                dataclasses.replace(ranking, ranks=ranks)
            )
    extracted = list(cache.values())
    results["delf_features"] = {
        "images": len(extracted),
        "keypoints_per_image": float(np.mean([f.valid.sum() for f in extracted])),
        "bytes_per_image": float(np.mean([delf_features_nbytes(f) for f in extracted])),
        "seconds_per_image": seconds / max(len(extracted), 1),
    }
    return results


def run_table(
    data_root: str | pathlib.Path,
    *,
    delf_checkpoint: str | None = None,
    global_checkpoint: str | None = None,
    out: str | pathlib.Path | None = None,
    protocols: Sequence[str] = ("split", "leave_one_out"),
    global_max_side: int | None = None,
    delf_settings: DelfSettings | None = None,
    settings: rerank_lib.DelfRerankSettings | None = None,
    cache_dir: str | pathlib.Path | None = None,
) -> dict[str, Any]:
    """One dataset's rows of the DELF table: global, + DELF, + DELF + QE (JSON to ``out``).

    Args:
      data_root: A revisitop-layout folder (e.g. ``../shared/data/smvs_eval``).
      delf_checkpoint: DELF model directory; None is ImageNet MobileNetV2 stage3 with
        keypoints by feature norm and no PCA.
      global_checkpoint: Retrieval model of the global shortlist; None is ImageNet
        MobileNetV2 + GeM.
      out: JSON file to write, or None.
      protocols: ``"split"`` and/or ``"leave_one_out"``.
      global_max_side: Image size of the global descriptors (default: the model's).
      delf_settings: DELF extraction (default: ``DelfSettings()``, the model's size).
      settings: Re-ranking settings (default ``DelfRerankSettings()``).
      cache_dir: Folder caching the global descriptors, or None.
    """
    from jaxretrieval import extraction
    from jaxretrieval.data import datasets
    from jaxretrieval.retrieval_model import ModelConfig

    dataset = datasets.load_dataset(data_root)
    global_settings = extraction.ExtractionSettings(max_side=global_max_side)
    if global_checkpoint is None:
        extractor = extraction.Extractor.pretrained(ModelConfig(), global_settings)
    else:
        extractor = extraction.Extractor.from_checkpoint(global_checkpoint, global_settings)
    delf_settings = delf_settings or DelfSettings()
    if delf_checkpoint is None:
        delf = DelfExtractor.pretrained(settings=delf_settings)
    else:
        delf = DelfExtractor.from_checkpoint(delf_checkpoint, delf_settings)
    extract = evaluate_lib.cached_extraction(extractor, cache_dir=cache_dir, progress=False)
    results = evaluate_delf(dataset, extract, delf, protocols=protocols, settings=settings)
    results["global_model"] = {
        "checkpoint": global_checkpoint,
        **extractor.model.to_json_dict(),
        "max_side": extractor.settings.max_side,
    }
    results["delf_model"] = {
        "checkpoint": delf_checkpoint,
        **delf.config.to_json_dict(),
        "settings": dataclasses.asdict(delf.settings),
    }
    if out is not None:
        pathlib.Path(out).write_text(
            json.dumps(results, indent=1, default=evaluate_lib.json_default)
        )
    return results


# ------------------------------------------------------------------ geometric checks


def homography_pairs(shared_data: str | pathlib.Path) -> list[tuple[str, str, str, str]]:
    """``(name, image a, image b, homography a -> b)`` of every pair with a true homography.

    graf (oxford_affine_graf) and bikes, boat, leuven, wall (oxford_affine_seq): img1
    against img2..img6; the EVD pairs of wxbs_evd_pairs: image 1 against image 2.
    """
    root = pathlib.Path(shared_data)
    pairs = []
    graf = root / "oxford_affine_graf"
    for k in range(2, 7):
        pairs.append((f"graf 1-{k}", graf / "img1.ppm", graf / f"img{k}.ppm", graf / f"H1to{k}p"))
    seq = root / "oxford_affine_seq"
    for name in ("bikes", "boat", "leuven", "wall"):
        for k in range(2, 7):
            pairs.append(
                (
                    f"{name} 1-{k}",
                    seq / "images" / f"{name}__img1.png",
                    seq / "images" / f"{name}__img{k}.png",
                    seq / "homographies" / f"{name}__H1to{k}p.txt",
                )
            )
    evd = root / "wxbs_evd_pairs"
    for path in sorted((evd / "homographies").glob("*__H1to2.txt")):
        name = path.name.split("__")[0]
        pairs.append(
            (name, evd / "images" / f"{name}__1.png", evd / "images" / f"{name}__2.png", path)
        )
    return [(n, str(a), str(b), str(h)) for n, a, b, h in pairs]


def _apply_homography(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    mapped = np.c_[points, np.ones(len(points))] @ homography.T  # (n, 3)
    return mapped[:, :2] / mapped[:, 2:3]


def homography_check(
    extractor: DelfExtractor,
    path_a: str,
    path_b: str,
    homography_path: str,
    *,
    settings: VerificationSettings | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """DELF matching of one pair against its true homography.

    Each inlier's location in image a is mapped by the true homography (between the
    original images, rescaled to the loaded sizes) and compared with its partner's
    location in image b.

    Returns:
      ``num_inliers``, ``num_tentative``, ``median_error`` (pixels of the loaded image b;
      NaN without inliers) and ``precision`` (inliers within the RANSAC threshold of
      their true position).
    """
    from jaxretrieval.data import images as image_io

    settings = settings or VerificationSettings()
    image_a, image_b = extractor.load(path_a), extractor.load(path_b)
    scale_a = image_a.shape[1] / image_io.image_size(path_a)[1]
    scale_b = image_b.shape[1] / image_io.image_size(path_b)[1]
    result = match_pair(extractor(image_a), extractor(image_b), settings, seed=seed)
    homography = np.loadtxt(homography_path).reshape(3, 3)
    truth = _apply_homography(homography, result["points_a"] / scale_a) * scale_b
    errors = np.linalg.norm(truth - result["points_b"], axis=1)
    return {
        "num_inliers": result["num_inliers"],
        "num_tentative": result["num_tentative"],
        "median_error": float(np.median(errors)) if len(errors) else float("nan"),
        "precision": float(np.mean(errors < settings.error_threshold)) if len(errors) else 0.0,
    }


def homography_table(
    extractor: DelfExtractor,
    shared_data: str | pathlib.Path,
    *,
    settings: VerificationSettings | None = None,
) -> str:
    """A Markdown table of :func:`homography_check` over :func:`homography_pairs`."""
    lines = [
        "| pair | inliers | tentative | median error px | precision |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, path_a, path_b, homography in homography_pairs(shared_data):
        r = homography_check(extractor, path_a, path_b, homography, settings=settings)
        lines.append(
            f"| {name} | {r['num_inliers']} | {r['num_tentative']} | "
            f"{r['median_error']:.1f} | {r['precision']:.2f} |"
        )
    return "\n".join(lines)


def box_pair_check(
    extractor: DelfExtractor,
    folder: str | pathlib.Path,
    *,
    settings: VerificationSettings | None = None,
) -> dict[str, Any]:
    """DELF's affine map of the box into the scene against OpenCV SIFT + RANSAC.

    There is no ground truth for ``opencv_box_pair``: the reference is SIFT, Lowe's
    ratio test (0.75) and a RANSAC homography (``cv2.findHomography``, 5 px), as in
    benchmarks/dsm_box_pair.py. Returns the inlier counts and the distance between the
    box corners mapped by DELF's affine map and by the SIFT homography (scene pixels of
    the original image).
    """
    import cv2

    from jaxretrieval.data import images as image_io

    folder = pathlib.Path(folder)
    box, scene = (
        image_io.load_image(folder / "box.png"),
        image_io.load_image(folder / "box_in_scene.png"),
    )
    sift = cv2.SIFT_create()
    keys_a, desc_a = sift.detectAndCompute(cv2.cvtColor(box, cv2.COLOR_RGB2GRAY), None)
    keys_b, desc_b = sift.detectAndCompute(cv2.cvtColor(scene, cv2.COLOR_RGB2GRAY), None)
    good = [
        m
        for m, n in cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a, desc_b, k=2)
        if m.distance < 0.75 * n.distance
    ]
    homography, mask = cv2.findHomography(
        np.float32([keys_a[m.queryIdx].pt for m in good]),
        np.float32([keys_b[m.trainIdx].pt for m in good]),
        cv2.RANSAC,
        5.0,
    )
    image_a, image_b = (
        extractor.load(folder / "box.png"),
        extractor.load(folder / "box_in_scene.png"),
    )
    scale_a, scale_b = image_a.shape[1] / box.shape[1], image_b.shape[1] / scene.shape[1]
    result = match_pair(extractor(image_a), extractor(image_b), settings)
    height, width = box.shape[:2]
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    transform = np.asarray(result["transform"], np.float64)
    delf_corners = (corners * scale_a @ transform[:, :2].T + transform[:, 2]) / scale_b
    sift_corners = _apply_homography(homography, corners)
    return {
        "num_inliers": result["num_inliers"],
        "num_tentative": result["num_tentative"],
        "sift_inliers": int(mask.sum()),
        "delf_corners": delf_corners,
        "sift_corners": sift_corners,
        "corner_errors": np.linalg.norm(delf_corners - sift_corners, axis=1),
    }


# ------------------------------------------------------------------------- attention maps


def save_attention_maps(
    extractor: DelfExtractor, paths: Sequence[str], out: str | pathlib.Path
) -> pathlib.Path:
    """A PNG with each image beside its keypoint-score map (scale 1), one row per image.

    Shows where the model's attention (or feature norm) sits: on the building or cover,
    or on sky, street and people.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(paths), 2, figsize=(7, 3 * len(paths)), squeeze=False)
    for row, path in zip(axes, paths, strict=True):
        image = extractor.load(path)
        scores = extractor.score_map(image)
        row[0].imshow(image)
        row[0].set_title(pathlib.Path(path).name, fontsize=8)
        row[1].imshow(image)
        height, width = image.shape[:2]
        field = extractor.field  # cell (i, j) is centred at offset + stride * (j, i)
        low = field.offset - field.stride / 2
        extent = (
            low,
            low + field.stride * scores.shape[1],
            low + field.stride * scores.shape[0],
            low,
        )
        row[1].imshow(scores, cmap="magma", alpha=0.6, extent=extent, interpolation="bilinear")
        row[1].set_xlim(0, width)
        row[1].set_ylim(height, 0)
        kind = extractor.settings.keypoint_score
        row[1].set_title(f"{kind} (max {scores.max():.2f})", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    out = pathlib.Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
