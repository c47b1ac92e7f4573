"""Fine-tune MobileNetV2 + GeM for retrieval on smvs_train (293 scenes, 736 photos).

  python -m experiments.train --config experiments/configs/smvs_mobilenet_v2.py:contrastive \
      --workdir checkpoints/smvs_mobilenet_v2_contrastive

The argument after ``:`` picks the loss: contrastive (default), triplet, ap or nra.
Hardware: 2 CPU cores (no accelerator). Blocks 1-13 of the backbone are frozen (training
blocks 14-17 and the last conv is several times cheaper on a CPU than the whole
network), BatchNorm statistics frozen, 224 px canvas. Expected time and metric: see the
README's training table (measured runs are listed in benchmarks/RESULTS.md).

Validation: 10% of smvs_train's scenes are held out for the curves (never smvs_eval or
any other evaluation set); every setting here was chosen on that split or taken from
cirtorch.
"""

import ml_collections

from experiments.configs import base

LOSS_DEFAULTS = {
    # cirtorch: contrastive margin 0.7 for VGG/ResNet GeM; triplet margin 0.1.
    "contrastive": {"margin": 0.7},
    "triplet": {"margin": 0.1},
    # Cosine similarities of non-negative GeM descriptors lie in [0, 1].
    "ap": {"num_bins": 25, "min_score": 0.0, "max_score": 1.0},
    "nra": {"temperature": 0.05},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    loss = arg or "contrastive"
    if loss not in LOSS_DEFAULTS:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSS_DEFAULTS)}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.log_every_steps = 10

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "mobilenet_v2"
    config.model.pooling = "gem"
    config.model.gem_p = 3.0
    config.model.whitening_dim = ml_collections.config_dict.placeholder(int)
    config.model.first_trainable = "block14"
    config.model.init_checkpoint = ml_collections.config_dict.placeholder(str)

    config.data = base.smvs_train_data(homography_jitter=0.15)
    config.data.validation_fraction = 0.1

    config.mining = ml_collections.ConfigDict()
    config.mining.num_tuples = 400
    config.mining.num_negatives = 5
    config.mining.pool_size = ml_collections.config_dict.placeholder(int)
    config.mining.positive = "random"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = loss
    config.loss.kwargs = ml_collections.ConfigDict(LOSS_DEFAULTS[loss])

    config.optim = base.optimizer(
        batch_size=4,
        num_epochs=6,
        learning_rate=1e-4,
        warmup_steps=20,
        gem_p_learning_rate_multiplier=10.0,
    )
    config.checkpoint = base.checkpointing(every_steps=50)

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 100
    return config
