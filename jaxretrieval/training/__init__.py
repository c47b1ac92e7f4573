"""Training: state, optimizers, the sharded train step and resumable checkpoints.

* :mod:`~jaxretrieval.training.state`: :class:`TrainState`, trainable/frozen split.
* :mod:`~jaxretrieval.training.optimizers`: AdamW + schedule, GeM p apart, accumulation.
* :mod:`~jaxretrieval.training.step`: :func:`make_train_step` (jitted, donated, sharded
  over a ``data`` mesh axis) and the retrieval losses on tuple batches.
* :mod:`~jaxretrieval.training.checkpointing`: orbax checkpoints that resume.

The loop itself (data, mining, evaluation, logging, export) is
``experiments/train_lib.py``; ``python -m experiments.train`` is its CLI.
"""
