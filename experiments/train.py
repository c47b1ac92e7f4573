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
"""

import importlib.util
import logging
import pathlib

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


def parse_args(argv=None):
    """Parses the command line (known flags; --config.* overrides are kept apart)."""
    parser = cli.make_parser("train", __doc__)
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return args


def main(argv=None) -> dict:
    """Loads the config, applies overrides and trains."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = load_config(args.config)
    apply_overrides(config, args.overrides)
    from experiments import train_lib  # Imported late: --help stays fast.

    result = train_lib.train_and_evaluate(config, args.workdir)
    print(f"finished at step {result['step']}; model exported to {args.workdir}/model")
    for key in ("loss", "validation_map"):
        if key in result:
            print(f"  {key} {result[key]:.4f}")
    return result


if __name__ == "__main__":
    cli.run(main, prog="train")
