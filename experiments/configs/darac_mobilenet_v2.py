r"""DARAC on a frozen MobileNetV2: learn the 21x2 region weights on smvs_train (NRA or triplet).

  python -m experiments.train --config experiments/configs/darac_mobilenet_v2.py:nra \
      --workdir checkpoints/darac_mobilenet_v2_nra
  python -m experiments.train --config experiments/configs/darac_mobilenet_v2.py:triplet \
      --workdir checkpoints/darac_mobilenet_v2_triplet

The argument after ``:`` picks the loss, ``nra`` (the poster's, default) or ``triplet``
(the comparison), and ``smoke`` shrinks the run to what the tests run (``nra,smoke``,
``triplet,smoke``; ``smoke`` alone is NRA).

The model is the ImageNet MobileNetV2 with DARAC's head (``model.pooling = "darac"``) at
its initialisation (equal weights). The whole backbone is frozen
(``first_trainable = "head"``), so only DARAC's 42 weights train: one per region of the
fixed 21-region grid and per part (max, average), initialised to 1 (RAMAC's sum).
Because 42 scalars starting at 1 would barely move at the backbone's learning rate, the
learning rate is 1e-2.

Hardware: 2 CPU cores. Training at 299 px (the poster's smallest test resolution; the
training canvas, so most images are smaller) costs about 28 forward passes per step
(4 tuples of 1 + 1 + 5 images), no backward pass through the backbone. 3 epochs (300
steps, 3 minings of ~660 images, 3 validations), not the backbone runs' 6. Measured
(2026-12-02): triplet 7 minutes at 1.3-2 s per step (after the depthwise-convolution
fix, sharing the cores with another run); NRA took 2 h 40 min at 5-10 s per step on the
code before that fix. Validation mAP on the held-out smvs_train scenes (``metrics.jsonl``):
triplet 0.751 / 0.762 / 0.763 after epochs 1-3; NRA 0.693 / 0.552 / 0.583. The test-set
numbers are benchmarks/darac_table.py's (README).

Validation: 10% of smvs_train's scenes are held out (never an evaluation set).
"""

import ml_collections

from experiments.configs import smoke, smvs_mobilenet_v2

LOSSES = ("nra", "triplet")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [part for part in (arg or "nra").split(",") if part]
    losses = [part for part in parts if part != "smoke"] or ["nra"]
    if len(losses) != 1 or losses[0] not in LOSSES:
        raise ValueError(f"unknown loss in {arg!r}; choose from {', '.join(LOSSES)} (+ ',smoke')")
    config = smvs_mobilenet_v2.get_config(losses[0])

    config.model.pooling = "darac"
    config.model.first_trainable = "head"  # frozen backbone: only DARAC's weights train
    config.data.image_size = 299
    config.optim.learning_rate = 1e-2
    config.optim.weight_decay = 0.0  # the weights' scale is free (the descriptor is L2-normalised)
    config.optim.warmup_steps = 20
    config.optim.num_epochs = 3  # CPU budget, see above

    if "smoke" in parts:  # what tests/experiments/test_darac_training.py runs
        smoke.shrink(config)
    return config
