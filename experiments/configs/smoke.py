"""Two training steps on 8 scenes of smvs_train at 64 px: what the tests run.

  python -m experiments.train --config experiments/configs/smoke.py --workdir /tmp/smoke

Hardware: 2 CPU cores, well under a minute after compiling. Metric: none (it checks
that a run trains, checkpoints, evaluates, exports and resumes).
"""

import ml_collections

from experiments.configs import base, smvs_mobilenet_v2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = smvs_mobilenet_v2.get_config(arg)
    shrink(config)
    return config


def shrink(config: ml_collections.ConfigDict) -> None:
    """Shrinks a retrieval training config in place (:func:`base.shrink_to_smoke`).

    8 tuples of 1 + 1 + 2 images a mining, and 2 of the 8 scenes held out.
    """
    base.shrink_to_smoke(config)
    config.data.validation_fraction = 0.25
    config.mining.num_tuples = 8
    config.mining.num_negatives = 2
