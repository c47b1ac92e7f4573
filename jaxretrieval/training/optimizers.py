"""Optimizers for fine-tuning: AdamW with a schedule, GeM p apart, frozen layers, accumulation.

:func:`make_optimizer` returns one ``optax.GradientTransformation`` over the *trainable*
parameters (frozen ones never reach the optimizer, see :mod:`jaxretrieval.training.state`):

* AdamW with a learning-rate schedule (warm-up, then cosine or exponential decay);
* GeM's exponent ``p`` with its own learning rate and no weight decay
  (``optax.multi_transform``; cirtorch trains ``p`` at 10x the learning rate, without
  weight decay);
* gradient accumulation over ``accumulation_steps`` batches (``optax.MultiSteps``), so a
  large effective batch fits in memory;
* optional global-norm gradient clipping.
"""

import optax
from flax import traverse_util

SCHEDULES = ("constant", "cosine", "exponential")


def learning_rate_schedule(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    decay_rate: float = 0.99,
) -> optax.Schedule:
    """Warm-up from 0, then constant, cosine to 0, or ``decay_rate`` per step.

    Args:
      learning_rate: Peak learning rate.
      total_steps: Optimizer steps of the whole run (cosine reaches 0 there).
      warmup_steps: Linear warm-up steps.
      schedule: ``"constant"``, ``"cosine"`` or ``"exponential"``.
      decay_rate: Multiplier per step for ``"exponential"`` (cirtorch: exp(-0.01) per epoch).

    Raises:
      ValueError: Unknown schedule or non-positive steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, found {schedule!r}.")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(
            f"need total_steps >= 1 and warmup_steps >= 0, found {total_steps}, {warmup_steps}."
        )
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps)
    else:
        after = optax.exponential_decay(learning_rate, transition_steps=1, decay_rate=decay_rate)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def parameter_groups(params) -> dict:
    """Labels each parameter ``"gem_p"`` (GeM's exponent) or ``"default"``."""
    flat = traverse_util.flatten_dict(params)
    labels = {path: "gem_p" if path[-2:] == ("gem", "p") else "default" for path in flat}
    return traverse_util.unflatten_dict(labels)


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    weight_decay: float = 1e-4,
    gem_p_learning_rate_multiplier: float = 10.0,
    accumulation_steps: int = 1,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW for the network, a separate Adam for GeM's p, optional accumulation.

    Args:
      learning_rate: A float or an optax schedule (of the optimizer step).
      weight_decay: Decoupled weight decay (not applied to GeM's p).
      gem_p_learning_rate_multiplier: GeM p's learning rate relative to the others.
      accumulation_steps: Average the gradients of this many batches per update.
      clip_norm: Clip gradients to this global norm (None: no clipping).

    Returns:
      A transformation for the trainable parameter tree.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, found {accumulation_steps}.")
    if callable(learning_rate):
        p_rate = lambda step: gem_p_learning_rate_multiplier * learning_rate(step)  # noqa: E731
    else:
        p_rate = gem_p_learning_rate_multiplier * learning_rate
    optimizer = optax.multi_transform(
        {
            "default": optax.adamw(learning_rate, weight_decay=weight_decay),
            "gem_p": optax.adam(p_rate),
        },
        parameter_groups,
    )
    if clip_norm is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    if accumulation_steps > 1:
        optimizer = optax.MultiSteps(
            optimizer, every_k_schedule=accumulation_steps
        ).gradient_transformation()
    return optimizer
