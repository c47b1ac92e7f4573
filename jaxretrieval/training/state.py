"""The training state pytree and the split of parameters into trainable and frozen.

Fine-tuning on a CPU is several times cheaper when the first backbone stages are frozen:
gradients are taken only with respect to the trainable parameters, so no backward pass
runs through the frozen stages at all (their outputs do not depend on anything being
differentiated), and the optimizer holds state for the trainable ones only. Frozen
parameters still change nothing by weight decay, because they never reach the optimizer.

BatchNorm statistics are frozen too (``batch_stats`` is not trained; the backbone runs
with its running averages), the usual choice when fine-tuning retrieval networks with
small tuple batches (cirtorch does the same).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import optax
from flax import traverse_util

Path = tuple[str, ...]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree (checkpointed whole).

    Attributes:
      step: Optimizer steps taken.
      trainable: Trainable parameters (a sub-tree of ``variables["params"]``).
      frozen: The other variables: frozen parameters and ``batch_stats``.
      opt_state: The optimizer's state for ``trainable``.
    """

    # Typed Any: orbax rebuilds the tree with placeholder leaves while restoring.
    step: Any
    trainable: Any
    frozen: Any
    opt_state: Any

    def variables(self) -> dict[str, Any]:
        """The model's full variables (trainable and frozen merged)."""
        return merge_variables(self.trainable, self.frozen)


def freeze_before(
    layer_names: Sequence[str], first_trainable: str | None
) -> Callable[[Path], bool]:
    """A predicate ``path -> trainable`` freezing backbone layers before ``first_trainable``.

    Args:
      layer_names: The backbone's top-level parameter names in forward order (see
        :func:`backbone_layer_names`).
      first_trainable: The first backbone layer to train; None trains the whole backbone,
        ``"head"`` none of it. Head parameters (GeM p, whitening, a learned aggregation)
        are always trainable; the backbone's classifier never is (retrieval losses do not
        reach it).

    Raises:
      ValueError: ``first_trainable`` is not one of ``layer_names``.
    """
    names = list(layer_names)
    if first_trainable == "head":
        frozen = set(names)
    elif first_trainable is not None and first_trainable not in names:
        raise ValueError(f"unknown layer {first_trainable!r}; the backbone has {names}.")
    else:
        frozen = set(names[: names.index(first_trainable)]) if first_trainable else set()
    frozen.add("classifier")

    def trainable(path: Path) -> bool:
        if path[0] != "backbone":
            return True
        return path[1] not in frozen

    return trainable


def backbone_layer_names(backbone_module, image_size: int = 64) -> list[str]:
    """Top-level parameter names of a backbone module, in forward-pass order.

    Parameter dicts are sorted by name, so the order is recorded with a method
    interceptor while tracing ``init``.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    called: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = context.module.path
        if len(path) == 1 and path[0] not in called:
            called.append(path[0])
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return backbone_module.init(
                jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.float32)
            )

    params = jax.eval_shape(init)["params"]
    return [name for name in called if name in params]


def split_variables(
    variables: dict[str, Any], trainable: Callable[[Path], bool]
) -> tuple[dict, dict]:
    """``(trainable params, everything else)``; :func:`merge_variables` is the inverse."""
    flat = traverse_util.flatten_dict(variables)
    chosen = {
        path[1:]: leaf for path, leaf in flat.items() if path[0] == "params" and trainable(path[1:])
    }
    rest = {
        path: leaf
        for path, leaf in flat.items()
        if not (path[0] == "params" and trainable(path[1:]))
    }
    if not chosen:
        raise ValueError("no trainable parameters: check the freezing settings.")
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge_variables(trainable: dict, frozen: dict) -> dict[str, Any]:
    """Inverse of :func:`split_variables`."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(
        {("params", *path): leaf for path, leaf in traverse_util.flatten_dict(trainable).items()}
    )
    return traverse_util.unflatten_dict(flat)


def init_train_state(
    variables: dict[str, Any],
    optimizer: optax.GradientTransformation,
    trainable: Callable[[Path], bool],
) -> TrainState:
    """A step-0 state for ``variables`` (host arrays are fine; place it afterwards)."""
    trainable_params, frozen = split_variables(variables, trainable)
    trainable_params = jax.tree.map(jax.device_put, trainable_params)  # no per-shape compile
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        trainable=trainable_params,
        frozen=frozen,
        opt_state=optimizer.init(trainable_params),
    )
