"""What the training configs share: their data, optimizer and checkpoint sections, and smoke.

Not a config itself (it has no ``get_config``); each config in this folder builds its
sections here and sets what is its own; their ``smoke`` variants start from
:func:`shrink_to_smoke`.
"""

import os
import pathlib

import ml_collections

SHARED_DATA = pathlib.Path(
    os.environ.get(
        "JAXRETRIEVAL_SHARED_DATA",
        pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data",
    )
)


def smvs_train_data(*, homography_jitter: float) -> ml_collections.ConfigDict:
    """smvs_train's labels.csv (all scenes) at a 224 px canvas, and its augmentation.

    Args:
      homography_jitter: How far the corners of a training image move (0: not warped).
    """
    data = ml_collections.ConfigDict()
    data.source = "csv"
    data.path = str(SHARED_DATA / "smvs_train" / "labels.csv")
    data.max_scenes = ml_collections.config_dict.placeholder(int)
    data.image_size = 224
    data.workers = 2
    data.augment = ml_collections.ConfigDict()
    data.augment.min_scale = 0.7
    data.augment.crop_fraction = 0.8
    data.augment.flip = False
    data.augment.color_jitter = 0.1
    data.augment.homography_jitter = homography_jitter
    return data


def optimizer(
    *,
    batch_size: int,
    num_epochs: int,
    learning_rate: float,
    warmup_steps: int,
    gem_p_learning_rate_multiplier: float = 1.0,
) -> ml_collections.ConfigDict:
    """A cosine schedule after ``warmup_steps``, weight decay 1e-4, no accumulation or clipping."""
    optim = ml_collections.ConfigDict()
    optim.batch_size = batch_size
    optim.num_epochs = num_epochs
    optim.learning_rate = learning_rate
    optim.weight_decay = 1e-4
    optim.gem_p_learning_rate_multiplier = gem_p_learning_rate_multiplier
    optim.schedule = "cosine"
    optim.warmup_steps = warmup_steps
    optim.accumulation_steps = 1
    optim.clip_norm = ml_collections.config_dict.placeholder(float)
    return optim


def checkpointing(*, every_steps: int) -> ml_collections.ConfigDict:
    """A checkpoint every ``every_steps`` steps, the last 2 kept."""
    checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = every_steps
    checkpoint.keep = 2
    return checkpoint


def shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
    """Shrinks any training config in place: 2 steps on 8 scenes at 64 px, 1 worker.

    A checkpoint after every step and an evaluation after the second; each config's smoke
    variant adds what only it has (mining, DELF's head).
    """
    config.log_every_steps = 1
    config.data.max_scenes = 8
    config.data.image_size = 64
    config.data.workers = 1
    config.optim.batch_size = 4
    config.optim.num_epochs = 1
    config.optim.warmup_steps = 0
    config.checkpoint.every_steps = 1
    config.eval.every_steps = 2
