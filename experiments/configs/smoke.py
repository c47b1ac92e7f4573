"""Two training steps on 8 scenes of smvs_train at 64 px: what the tests run.

  python -m experiments.train --config experiments/configs/smoke.py --workdir /tmp/smoke

Hardware: 2 CPU cores, well under a minute after compiling. Metric: none (it checks
that a run trains, checkpoints, evaluates, exports and resumes).
"""

import ml_collections

from experiments.configs import smvs_mobilenet_v2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = smvs_mobilenet_v2.get_config(arg)
    config.log_every_steps = 1
    config.data.max_scenes = 8
    config.data.validation_fraction = 0.25
    config.data.image_size = 64
    config.data.workers = 1
    config.mining.num_tuples = 8
    config.mining.num_negatives = 2
    config.optim.batch_size = 4
    config.optim.num_epochs = 1
    config.optim.warmup_steps = 0
    config.checkpoint.every_steps = 1
    config.eval.every_steps = 2
    return config
