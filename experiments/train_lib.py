"""The training loop behind ``python -m experiments.train`` (and notebooks).

:func:`train_and_evaluate` fine-tunes a retrieval model (backbone -> GeM -> optional
whitening) with a tuple or listwise loss on labelled photos:

1. every epoch, hard negatives are mined with the current variables through the one
   extractor (:mod:`jaxretrieval.data.tuple_mining`); the epoch's tuples are saved in
   ``<workdir>/mining/`` before training on them, so a resumed run trains on the same;
2. a grain pipeline decodes and augments the tuples
   (:mod:`jaxretrieval.data.training_pipeline`), each element's randomness fixed by
   (seed, epoch, index), so batch ``b`` is the same in every run;
3. the jitted train step runs data-parallel over every device;
4. orbax checkpoints every ``checkpoint.every_steps`` and at the end; a work directory
   that holds a checkpoint resumes from its latest step;
5. every ``eval.every_steps``, revisited mAP on the held-out validation scenes through
   the evaluator the CLIs use (:func:`experiments.evaluate_lib.evaluate`);
6. the model is exported to ``<workdir>/model`` (:func:`jaxretrieval.model_io.save_model`),
   which ``python -m experiments.evaluate --checkpoint <workdir>`` reads.

Several processes (hosts): with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` set (:func:`jaxretrieval.sharding.initialize_distributed`), every
process runs this same loop on one global mesh: each loads only its rows of every
global batch (:func:`jaxretrieval.sharding.process_rows`) and the step runs on the
assembled global batch (:func:`jaxretrieval.sharding.global_batch`); mining splits its
extraction over the processes (:func:`jaxretrieval.extraction.extract_across_processes`);
orbax saves collectively; process 0 alone writes the config, metrics, mined tuples,
curves and the exported model. The work directory must be on storage every process
sees. With one process nothing of this changes the run.

The run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged
step or evaluation), ``curves.png`` (loss and validation mAP), ``checkpoints/``,
``mining/`` and ``model/``. The validation scenes are held out of the training CSV
(``data.validation_fraction``), never an evaluation set.
"""

import json
import logging
import os
import pathlib
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from experiments import evaluate_lib
from jaxretrieval import extraction, model_io, retrieval_model, sharding
from jaxretrieval.data import labelled as labelled_lib
from jaxretrieval.data import training_pipeline, tuple_mining
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.training import checkpointing, optimizers, state, step

logger = logging.getLogger(__name__)

DATA_SOURCES = ("csv", "scene_folders", "revisitop", "unlabelled")


def load_training_images(data: ml_collections.ConfigDict) -> labelled_lib.LabelledImages:
    """The labelled training images a ``config.data`` names (``source`` + ``path``).

    ``max_scenes`` (if set) keeps the first scenes only (smoke runs).
    """
    loaders = {
        "csv": labelled_lib.from_csv,
        "scene_folders": labelled_lib.from_scene_folders,
        "revisitop": labelled_lib.from_revisitop,
        "unlabelled": labelled_lib.from_unlabelled_folder,
    }
    if data.source not in loaders:
        raise ValueError(f"data.source must be one of {DATA_SOURCES}, found {data.source!r}.")
    images = loaders[data.source](data.path)
    if data.get("max_scenes"):
        keep = np.flatnonzero(images.scenes < data.max_scenes)
        images = images.subset(keep)
    return images


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The :class:`ModelConfig` of a training config (image size = the training canvas)."""
    return ModelConfig(
        backbone=config.model.backbone,
        pooling=config.model.get("pooling", "gem"),
        gem_p=config.model.gem_p,
        whitening_dim=config.model.get("whitening_dim"),
        max_side=config.data.image_size,
    )


def _augmentation(data: ml_collections.ConfigDict) -> training_pipeline.Augmentation:
    return training_pipeline.Augmentation(
        image_size=data.image_size,
        min_scale=data.augment.min_scale,
        crop_fraction=data.augment.crop_fraction,
        flip=data.augment.flip,
        color_jitter=data.augment.color_jitter,
        homography_jitter=data.augment.homography_jitter,
    )


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` (flushed each time: nothing lost on a kill)."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=evaluate_lib.json_default) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records so far (a torn last line from a kill is skipped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def _write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    path = workdir / "config.json"
    document = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists() and path.read_text() != document:
        logger.warning("%s holds another config; resuming with the new one (saved beside)", path)
        path = workdir / f"config.{int(time.time())}.json"
    path.write_text(document)


def _epoch_tuples(
    workdir: pathlib.Path,
    epoch: int,
    images: labelled_lib.LabelledImages,
    extractor: extraction.Extractor,
    config: ml_collections.ConfigDict,
) -> tuple_mining.Tuples:
    """The epoch's tuples: read from ``mining/`` or mined now and saved (atomically)."""
    path = workdir / "mining" / f"epoch_{epoch:04d}.npz"
    if path.exists():
        with np.load(path) as saved:
            return tuple_mining.Tuples(saved["indices"], int(saved["num_random_negatives"]))
    mining = config.mining
    seed = config.seed * 1000 + epoch
    kwargs = dict(
        num_tuples=mining.num_tuples,
        num_negatives=mining.num_negatives,
        pool_size=mining.get("pool_size"),
        seed=seed,
        positive=mining.positive,
    )
    rows = tuple_mining.images_to_describe(images, **kwargs)
    described = extraction.extract_across_processes(  # one process: extractor(paths, ...)
        extractor, [images.paths[i] for i in rows], progress=False, strict=True
    )
    descriptors = np.zeros((len(images), described.descriptors.shape[1]), np.float32)
    descriptors[rows] = described.descriptors
    tuples = tuple_mining.mine_tuples(images, descriptors, **kwargs)
    if jax.process_index() != 0:  # every process mined the same tuples; one writes them
        return tuples
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, indices=tuples.indices, num_random_negatives=tuples.num_random_negatives)
    os.replace(temporary, path)
    return tuples


def _validate(extractor: extraction.Extractor, variables, dataset) -> dict[str, float]:
    extract = evaluate_lib.cached_extraction(extractor.with_variables(variables), progress=False)
    results, _ = evaluate_lib.evaluate(dataset, extract)
    medium = results["split"]["medium"]
    return {"validation_map": medium["map"], "validation_mp@1": medium["mp@k"][1]}


def plot_curves(records: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    """Loss (and its running mean) and validation mAP against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "validation_map" in r]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        ax_loss.plot(steps, loss, color="#bbbbbb", linewidth=0.8, label="loss")
        window = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1 :], smooth, color="#2166ac", label=f"mean of {window}")
        ax_loss.legend()
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    if evals:
        ax_map.plot(
            [r["step"] for r in evals], [r["validation_map"] for r in evals], "o-", color="#1a9850"
        )
    ax_map.set_xlabel("step")
    ax_map.set_title("validation mAP (held-out training scenes)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class RetrievalTask:
    """Metric learning of a global-descriptor model: mined tuples, tuple/listwise losses.

    The training loop (:func:`train_and_evaluate`) asks a task for its variables, which
    of them train, the loss of a batch, each epoch's dataset, validation metrics and the
    exported model; other tasks (DELF's classification stages) answer the same questions.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.config = config
        self.workdir = workdir
        all_images = load_training_images(config.data)
        self.train_images, validation_images = labelled_lib.split_scenes(
            all_images, validation_fraction=config.data.validation_fraction, seed=config.seed
        )
        check_training_images(self.train_images)
        self.validation = None
        if len(validation_images):
            self.validation = labelled_lib.to_retrieval_dataset(
                validation_images, name="validation"
            )
        self.model_config = model_config(config)
        if config.model.get("init_checkpoint"):
            self.model_config, self.initial_variables = model_io.load_model(
                config.model.init_checkpoint
            )
        else:
            self.initial_variables = retrieval_model.init_model_variables(self.model_config)
        self.model = retrieval_model.make_model(self.model_config, freeze_batch_stats=True)
        self.trainable = state.freeze_before(
            state.backbone_layer_names(self.model_config.spec.module()),
            config.model.first_trainable,
        )
        loss_fn = step.retrieval_loss(config.loss.name, **config.loss.kwargs.to_dict())
        self.batch_loss = step.tuple_batch_loss(self.model, loss_fn)
        self.steps_per_epoch = config.mining.num_tuples // config.optim.batch_size
        self.images_per_batch = config.optim.batch_size * (2 + config.mining.num_negatives)
        self.extractor = extraction.Extractor(
            self.model_config,
            self.initial_variables,
            extraction.ExtractionSettings(max_side=config.data.image_size, batch_size=8),
        )
        self.random_negatives = 0

    def epoch_dataset(self, epoch: int, variables) -> Any:
        """The epoch's tuples (mined with ``variables``, or replayed from ``mining/``)."""
        tuples = _epoch_tuples(
            self.workdir,
            epoch,
            self.train_images,
            self.extractor.with_variables(variables),
            self.config,
        )
        self.random_negatives = tuples.num_random_negatives
        spec = self.model_config.spec
        return training_pipeline.tuple_dataset(
            self.train_images,
            tuples,
            augmentation=_augmentation(self.config.data),
            mean=spec.input_mean,
            std=spec.input_std,
            seed=self.config.seed,
            epoch=epoch,
        )

    def log_extras(self) -> dict[str, Any]:
        """Per-epoch facts logged with every training record."""
        return {"random_negatives": self.random_negatives}

    def validate(self, variables) -> dict[str, float]:
        """Revisited mAP on the held-out training scenes ({} without any)."""
        if self.validation is None:
            return {}
        return _validate(self.extractor, variables, self.validation)

    def export(self, directory: pathlib.Path, variables, metadata: dict[str, Any]) -> None:
        """The model directory every CLI reads with ``--checkpoint``.

        Only what training changed is stored; the frozen layers come from the weight
        package at load time (``base="pretrained"``, checked by the variables' digest).
        """
        model_io.save_model(
            directory, self.model_config, variables, metadata=metadata, base="pretrained"
        )


def check_training_images(images: labelled_lib.LabelledImages) -> None:
    """Refuses training data with unreadable images up front, naming them."""
    bad = training_pipeline.check_images(images, num_threads=2)
    if bad:
        listed = "; ".join(f"{p}: {r}" for p, r in bad[:5])
        raise ValueError(f"{len(bad)} training images cannot be read ({listed})")


def process_dataset(dataset: grain.MapDataset, batch_size: int) -> grain.MapDataset:
    """This process's elements of every global batch, in order (the dataset itself alone).

    Element ``b * L + j`` of the result is element ``b * batch_size + r + j`` of
    ``dataset``, for the rows ``r..r + L`` of :func:`jaxretrieval.sharding.process_rows`;
    batching it by ``L`` gives this process's part of global batch ``b``.
    """
    rows = sharding.process_rows(batch_size)
    if jax.process_count() == 1:
        return dataset
    local = rows.stop - rows.start
    num_batches = len(dataset) // batch_size
    return grain.MapDataset.range(num_batches * local).map(
        lambda i: dataset[(i // local) * batch_size + rows.start + i % local]
    )


def _make_task(config: ml_collections.ConfigDict, workdir: pathlib.Path):
    task = config.get("task", "retrieval")
    if task == "retrieval":
        return RetrievalTask(config, workdir)
    if task == "delf":
        from experiments import delf_lib  # Imported here: delf_lib imports this module.

        return delf_lib.DelfTask(config, workdir)
    raise ValueError(f"unknown task {task!r}; known: retrieval, delf")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns the final metrics.

    Raises:
      ValueError: A bad config value (the message names it).
      FileNotFoundError: Missing training data.
    """
    sharding.initialize_distributed()  # a multi-process run if the JAX_* variables say so
    is_chief = jax.process_index() == 0
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_chief:
        _write_config(config, workdir)
    metrics = MetricsWriter(workdir / "metrics.jsonl")
    task = _make_task(config, workdir)

    mesh = sharding.data_mesh()
    batch_size = config.optim.batch_size
    if batch_size % mesh.devices.size:
        raise ValueError(
            f"optim.batch_size={batch_size} must be a multiple of the {mesh.devices.size} devices"
        )
    steps_per_epoch = task.steps_per_epoch
    if steps_per_epoch < 1:
        raise ValueError("an epoch holds fewer examples than optim.batch_size.")
    total_steps = config.optim.num_epochs * steps_per_epoch
    schedule = optimizers.learning_rate_schedule(
        learning_rate=config.optim.learning_rate,
        total_steps=max(1, total_steps // config.optim.accumulation_steps),
        warmup_steps=config.optim.warmup_steps,
        schedule=config.optim.schedule,
    )
    optimizer = optimizers.make_optimizer(
        learning_rate=schedule,
        weight_decay=config.optim.weight_decay,
        gem_p_learning_rate_multiplier=config.optim.gem_p_learning_rate_multiplier,
        accumulation_steps=config.optim.accumulation_steps,
        clip_norm=config.optim.get("clip_norm"),
    )
    train_state = state.init_train_state(task.initial_variables, optimizer, task.trainable)
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints",
        save_interval_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.keep,
    )
    train_state = sharding.replicate(train_state, mesh)
    if checkpointer.latest_step is not None:  # restored in place, replicated on the mesh
        train_state = checkpointer.restore(train_state)
        logger.info("resuming from step %d in %s", int(train_state.step), workdir)
    train_step = step.make_train_step(task.batch_loss, optimizer, mesh=mesh)

    start_step = int(train_state.step)
    devices = mesh.devices.size
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"training ({devices} {mesh.devices.flat[0].platform} device{'s' * (devices > 1)})",
        unit="step",
        disable=not is_chief,
    )
    last: dict[str, Any] = {}
    for epoch in range(start_step // steps_per_epoch, config.optim.num_epochs):
        dataset = task.epoch_dataset(epoch, jax.device_get(train_state.variables()))
        first_batch = int(train_state.step) - epoch * steps_per_epoch
        rows = sharding.process_rows(batch_size)  # one process: the whole batch
        batches = iter(
            training_pipeline.batches(
                process_dataset(dataset, batch_size),
                batch_size=rows.stop - rows.start,
                start_batch=first_batch,
                num_threads=config.data.workers,
            )
        )
        tick = time.perf_counter()
        for batch_index, batch in zip(range(first_batch, steps_per_epoch), batches, strict=False):
            train_state, step_metrics = train_step(train_state, sharding.global_batch(batch, mesh))
            current_step = int(train_state.step)
            if current_step % config.log_every_steps == 0 or batch_index == steps_per_epoch - 1:
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                logged_steps = current_step - last.get("step", start_step) or 1
                record = {
                    "step": current_step,
                    "epoch": epoch,
                    **{k: float(v) for k, v in jax.device_get(step_metrics).items()},
                    "learning_rate": float(schedule(current_step)),
                    "images_per_second": task.images_per_batch * logged_steps / elapsed,
                    **task.log_extras(),
                }
                gem = train_state.trainable.get("gem")
                if gem is not None:
                    record["gem_p"] = float(jax.device_get(gem["p"]))
                if is_chief:
                    metrics.write(record)
                last.update(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_second']:.1f}"
                )
            bar.update(1)
            checkpointer.save(current_step, train_state)
            if current_step % config.eval.every_steps == 0:
                scores = task.validate(jax.device_get(train_state.variables()))
                if scores and is_chief:
                    metrics.write({"step": current_step, "epoch": epoch, **scores})
                    last.update(scores)
        batches.close()
    bar.close()
    final_step = int(train_state.step)
    checkpointer.save(final_step, train_state, force=True)
    checkpointer.close()
    final_variables = jax.device_get(train_state.variables())
    final = {"step": final_step}
    if final_step % config.eval.every_steps == 0 and last.get("step") == final_step:
        final.update({k: v for k, v in last.items() if k.startswith("validation")})
    else:
        final.update(task.validate(final_variables))
    if is_chief:
        if len(final) > 1:
            metrics.write({**final, "final": True})
        task.export(
            workdir / model_io.EXPORT_SUBDIR,
            final_variables,
            {"config": json.loads(config.to_json_best_effort()), "metrics": final},
        )
        plot_curves(metrics.read(), workdir / "curves.png")
    return {**last, **final}
