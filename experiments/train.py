r"""Fine-tune a retrieval model: tuples with mined hard negatives, orbax checkpoints.

  python -m experiments.train --config experiments/configs/smvs_mobilenet_v2.py:contrastive \
      --workdir checkpoints/smvs_mobilenet_v2_contrastive
  python -m experiments.train --config experiments/configs/smoke.py --workdir /tmp/smoke \
      --config.optim.learning_rate=3e-4

--config is a Python file with get_config(arg) (the text after ':' is its argument);
--config.<field>=<value> overrides one field (type-checked: unknown fields are errors).
A work directory that holds a checkpoint resumes from it; Ctrl-C or a kill loses at most
one checkpoint interval. The exported model in <workdir>/model is what
`python -m experiments.evaluate --checkpoint <workdir>` evaluates.

On a machine without an accelerator, each step is split over one XLA host device per core
(--cpu-devices, default auto): one XLA:CPU device leaves a core idle through much of the
backward pass, and two host devices on two cores train MobileNetV2 1.4-1.6x faster
(benchmarks/RESULTS.md, "Train step and extraction"). The result is the same data-parallel
step (tested equal to one device); an XLA_FLAGS that already forces a device count wins.
"""

import importlib.util
import logging
import os
import pathlib
import re

import ml_collections

from experiments import cli


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` -> ``get_config(arg)``, locked (unknown fields are errors)."""
    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise cli.CLIError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("_training_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise cli.CLIError(f"--config {path} has no get_config()")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:
        raise cli.CLIError(f"--config {spec}: {e}") from e
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies ``--config.a.b=value`` overrides (values parsed as the field's type)."""
    for override in overrides:
        if not override.startswith("--config.") or "=" not in override:
            raise cli.CLIError(f"unrecognized argument {override!r} (see --help)")
        key, _, text = override.removeprefix("--config.").partition("=")
        parent = config
        *parents, leaf = key.split(".")
        try:
            for name in parents:
                parent = parent[name]
            current = parent[leaf]
        except (KeyError, AttributeError):
            raise cli.CLIError(f"--config.{key}: no such field") from None
        try:
            parent[leaf] = _parse_like(current, parent, leaf, text)
        except (TypeError, ValueError) as e:
            raise cli.CLIError(f"--config.{key}={text}: {e}") from None


def _parse_like(current, parent, leaf, text):
    if text.lower() in ("none", "null"):
        return None
    field_type = type(current)
    if current is None:  # a placeholder: its declared type
        field_type = parent.get_ref(leaf).get_type() or str
    if field_type is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1")
    return field_type(text)


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_device_flags(xla_flags: str, requested: str, batch_size: int, cores: int) -> str:
    """``XLA_FLAGS`` with the host device count ``--cpu-devices`` asks for.

    The flag only sets how many devices the CPU platform has; with a GPU or TPU, JAX's
    default devices (what the training mesh uses) are the accelerators, so it changes
    nothing there.

    Args:
      xla_flags: The current ``XLA_FLAGS``.
      requested: ``"auto"`` (the largest count up to ``cores`` that divides the batch,
        unless ``xla_flags`` already sets one) or a positive integer as text.
      batch_size: Tuples per step (the data-parallel axis must divide it).
      cores: CPU cores this process may use.

    Returns:
      The flags to put in ``XLA_FLAGS`` before JAX starts its backend.

    Raises:
      cli.CLIError: A count that is not a positive integer, does not divide the batch,
        or contradicts the count ``xla_flags`` already sets.
    """
    present = re.search(rf"{HOST_DEVICES_FLAG}=(\d+)", xla_flags)
    if requested == "auto":
        if present:
            return xla_flags
        devices = max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)
        if devices == 1:
            return xla_flags
    else:
        if not requested.isdigit() or int(requested) < 1:
            raise cli.CLIError(f"--cpu-devices {requested}: expected 'auto' or a positive integer")
        devices = int(requested)
        if batch_size % devices:
            raise cli.CLIError(
                f"--cpu-devices {devices} does not divide optim.batch_size={batch_size}"
            )
        if present:
            if int(present.group(1)) != devices:
                raise cli.CLIError(
                    f"--cpu-devices {devices} contradicts XLA_FLAGS {present.group(0)}"
                )
            return xla_flags
    return f"{xla_flags} {HOST_DEVICES_FLAG}={devices}".strip()


def parse_args(argv=None):
    """Parses the command line (known flags; --config.* overrides are kept apart)."""
    parser = cli.make_parser("train", __doc__)
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    parser.add_argument(
        "--cpu-devices",
        default="auto",
        help="without an accelerator, split each step over this many XLA host devices "
        "(auto: one per core, as the batch allows; 1: a single device)",
    )
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return args


def main(argv=None) -> dict:
    """Loads the config, applies overrides and trains."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = load_config(args.config)
    apply_overrides(config, args.overrides)
    os.environ["XLA_FLAGS"] = cpu_device_flags(
        os.environ.get("XLA_FLAGS", ""), args.cpu_devices, config.optim.batch_size, usable_cores()
    )
    from experiments import train_lib  # Imported late: --help stays fast.

    result = train_lib.train_and_evaluate(config, args.workdir)
    print(f"finished at step {result['step']}; model exported to {args.workdir}/model")
    for key in ("loss", "validation_map"):
        if key in result:
            print(f"  {key} {result[key]:.4f}")
    return result


if __name__ == "__main__":
    cli.run(main, prog="train")
