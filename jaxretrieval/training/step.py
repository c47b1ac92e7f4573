"""The jitted training step, data parallel over every device.

:func:`make_train_step` returns ``step(state, batch) -> (state, metrics)``, jitted once
with the state replicated and the batch split over the ``data`` mesh axis
(:mod:`jaxretrieval.sharding`); the state is donated, so its buffers are reused. Shapes
never change between steps (fixed batch size and canvas size), so it compiles once.

A batch is a dict of tuple arrays from :mod:`jaxretrieval.data.training_pipeline`:
``images`` (B, T, S, S, 3), ``image_sizes`` (B, T, 2) and ``scenes`` (B, T); tuple
index 0 is the query, 1 the positive, the rest negatives. :func:`retrieval_loss` maps
loss names to functions of the tuple descriptors (B, T, D) and scenes (B, T).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxretrieval import losses, sharding
from jaxretrieval.array_types import AnyArray, Bool, Float, Int
from jaxretrieval.training.state import TrainState, merge_variables

LOSSES = ("contrastive", "triplet", "ap", "nra")


def batch_scores(
    descriptors: Float[AnyArray, "B T D"], scenes: Int[AnyArray, "B T"]
) -> tuple[Float[jax.Array, "B N"], Bool[jax.Array, "B N"], Bool[jax.Array, "B N"]]:
    """Each tuple's query against every image of the batch, for the listwise losses.

    Args:
      descriptors: Tuple descriptors, L2-normalised rows.
      scenes: Scene id of each image.

    Returns:
      ``(scores, labels, valid)`` over the ``N = B * T`` images of the batch: labels mark
      images of the query's scene; the query itself is not valid.
    """
    descriptors, scenes = jnp.asarray(descriptors), jnp.asarray(scenes)
    batch, size, dim = descriptors.shape
    items = descriptors.reshape(batch * size, dim)  # (B*T, D)
    scores = jnp.einsum("bd,nd->bn", descriptors[:, 0], items)  # (B, B*T)
    labels = scenes[:, :1] == scenes.reshape(1, batch * size)  # (B, B*T)
    own = jnp.arange(batch)[:, None] * size == jnp.arange(batch * size)[None, :]  # (B, B*T)
    return scores, labels, ~own


def retrieval_loss(name: str, **kwargs: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(descriptors (B, T, D), scenes (B, T)) -> scalar`` for a loss name.

    ``contrastive`` and ``triplet`` score each tuple (cirtorch); ``ap`` and ``nra`` rank
    the whole batch for each query (more negatives for free). ``kwargs`` go to the loss
    (``margin``, ``num_bins``, ``min_score``, ``temperature``, ``reduction``...).

    Raises:
      ValueError: Unknown loss name.
    """
    if name == "contrastive":
        return lambda d, scenes: losses.contrastive_loss(d, **kwargs)
    if name == "triplet":
        return lambda d, scenes: losses.triplet_loss(d, **kwargs)
    if name == "ap":
        return lambda d, scenes: _listwise(losses.average_precision_loss, d, scenes, kwargs)
    if name == "nra":
        return lambda d, scenes: _listwise(losses.nra_loss, d, scenes, kwargs)
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}.")


def _listwise(loss, descriptors, scenes, kwargs):
    scores, labels, valid = batch_scores(descriptors, scenes)
    return loss(scores, labels, valid=valid, **kwargs)


def tuple_batch_loss(
    model, loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
) -> Callable[[dict[str, Any], dict[str, Any]], jax.Array]:
    """``(variables, tuple batch) -> loss`` for a retrieval model and a tuple loss.

    Args:
      model: A :class:`~jaxretrieval.retrieval_model.RetrievalModel` (its backbone with
        frozen BatchNorm statistics).
      loss_fn: ``(descriptors (B, T, D), scenes (B, T)) -> scalar``, e.g.
        :func:`retrieval_loss`.
    """

    def batch_loss(variables, batch):
        batch_size, tuple_size = batch["scenes"].shape
        images = batch["images"].reshape(batch_size * tuple_size, *batch["images"].shape[2:])
        sizes = batch["image_sizes"].reshape(batch_size * tuple_size, 2)
        out = model.apply(variables, images, sizes)  # frozen BN: no mutable collections
        descriptors = out["descriptors"].reshape(batch_size, tuple_size, -1)  # (B, T, D)
        return loss_fn(descriptors, batch["scenes"])

    return batch_loss


def make_train_step(
    batch_loss: Callable[[dict[str, Any], dict[str, Any]], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` (state donated).

    Args:
      batch_loss: ``(variables, batch) -> scalar``, e.g. :func:`tuple_batch_loss`, or a
        classification loss of single images (DELF).
      optimizer: Transformation of the trainable parameters.
      mesh: Devices to shard the batch over (default: every device).

    Returns:
      The step. Gradients are taken with respect to the trainable parameters only.
      ``metrics`` holds ``loss`` and ``grad_norm``; with several devices the batch's
      leading axis must divide evenly over them.
    """
    mesh = sharding.data_mesh() if mesh is None else mesh

    def loss_of(trainable, frozen, batch):
        return batch_loss(merge_variables(trainable, frozen), batch)

    def step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(loss_of)(state.trainable, state.frozen, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(
        step,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=0,
    )
