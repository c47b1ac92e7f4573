"""What every CLI shares: one-line errors with exit status 2, and the model flags.

A user's mistake (a missing file or folder, a backbone without weights, a bad flag
value, an unreadable checkpoint) is printed as one line, ``<prog>: error: <what and
why>``, and the process exits with status 2; no traceback. Set ``JAXRETRIEVAL_DEBUG=1``
to see the traceback anyway. Ctrl-C exits with status 130 after saying that finished
work was kept.

Model flags: ``--checkpoint DIR`` (a saved model or a training work directory) or
``--backbone`` + ``--weights`` + ``--pooling`` + ``--gem-p`` for an ImageNet model;
``--max-side`` and ``--multi-scale`` default to the model's own image size.
"""

import argparse
import os
import pathlib
import pickle
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from jaxretrieval import backbones, extraction, model_io, pooling, retrieval_model, safe_pickle
from jaxretrieval.backbones import weights
from jaxretrieval.data import images as image_io
from jaxretrieval.spatial_verification import ImageTooSmallError


class CLIError(Exception):
    """A user's mistake: printed as one line, exit status 2."""


# Library errors that are about the user's input, not about our code.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    OSError,  # FileNotFoundError, PermissionError, model_io.ModelDirectoryError...
    image_io.ImageDecodeError,
    ImageTooSmallError,
    safe_pickle.UnsafePickleError,
    pickle.UnpicklingError,  # a truncated or non-pickle ground truth (the message names it)
    weights.TorchFileError,
    extraction.NonFiniteDescriptorsError,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see --help)``), status 2."""

    def error(self, message: str) -> NoReturn:
        """Prints one line and exits with status 2 (argparse prints the usage too)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def make_parser(prog: str, doc: str | None) -> ArgumentParser:
    """The parser of ``python -m experiments.<prog>`` with its module docstring as help."""
    return ArgumentParser(
        prog=f"python -m experiments.{prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run(main: Callable[..., Any], argv: list[str] | None = None, *, prog: str) -> Any:
    """Calls ``main(argv)``; a user error becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        if os.environ.get("JAXRETRIEVAL_DEBUG") == "1":
            raise
        print(f"python -m experiments.{prog}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"python -m experiments.{prog}: interrupted; finished work was saved "
            "(caches and checkpoints resume where they stopped)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _weights_help() -> str:
    shipped = ", ".join(
        f"{name} from the pip package {w.package}=={w.version}"
        for name, w in weights.SHIPPED_WEIGHTS.items()
    )
    others = sorted(set(backbones.BACKBONES) - set(weights.SHIPPED_WEIGHTS))
    return (
        "torchvision-layout .pth file for --backbone (default: the ImageNet weights shipped "
        f"offline: {shipped}; {', '.join(others)} have none and need this flag)"
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Adds the model flags (see the module docstring) and the extraction flags."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        default=None,
        help="saved model directory (model.json + variables/) or a training work "
        "directory holding one in model/; replaces --backbone/--weights/--pooling/--gem-p",
    )
    group.add_argument(
        "--backbone",
        default=None,
        choices=sorted(backbones.BACKBONES),
        help="ImageNet backbone (default mobilenet_v2)",
    )
    group.add_argument("--weights", default=None, help=_weights_help())
    group.add_argument(
        "--pooling", default=None, choices=sorted(pooling.POOLINGS), help="(default gem)"
    )
    group.add_argument("--gem-p", type=float, default=None, help="GeM exponent (default 3)")
    group = parser.add_argument_group("extraction")
    group.add_argument(
        "--max-side",
        type=_positive_int,
        default=None,
        help="longer image side in pixels (default: the model's, 224 for ImageNet models)",
    )
    group.add_argument(
        "--multi-scale",
        action="store_true",
        default=None,
        help="scales 1, 1/sqrt(2), 1/2 (default: the model's scales)",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images per device call (8)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, found {value}")
    return value


def model_from_args(args: argparse.Namespace) -> tuple[retrieval_model.ModelConfig, dict]:
    """The model the flags name: ``(config, variables)``.

    Raises:
      CLIError: ``--checkpoint`` given together with flags that name another model.
      FileNotFoundError: Missing checkpoint or weights (the message says what to do).
    """
    named = {
        flag: value
        for flag, value in (
            ("--backbone", args.backbone),
            ("--weights", args.weights),
            ("--pooling", args.pooling),
            ("--gem-p", args.gem_p),
        )
        if value is not None
    }
    if args.checkpoint is not None:
        if named:
            raise CLIError(f"--checkpoint already names the model; drop {', '.join(sorted(named))}")
        return model_io.load_model(args.checkpoint)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise CLIError(f"--weights {args.weights}: no such file")
    config = retrieval_model.ModelConfig(
        backbone=args.backbone or "mobilenet_v2",
        pooling=args.pooling or "gem",
        gem_p=3.0 if args.gem_p is None else args.gem_p,
    )
    try:
        return config, retrieval_model.init_model_variables(config, weights_path=args.weights)
    except FileNotFoundError as e:
        if args.weights is not None:
            raise
        raise CLIError(f"--backbone {config.backbone}: {e}; give the file with --weights") from e
    except weights.TorchFileError:
        raise  # a damaged file: its own message says what is wrong
    except (KeyError, ValueError) as e:  # a readable file of another network
        if args.weights is None:
            raise
        reason = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CLIError(
            f"--weights {args.weights} does not fit --backbone {config.backbone}: {reason}"
        ) from e


def settings_from_args(args: argparse.Namespace) -> extraction.ExtractionSettings:
    """The ExtractionSettings the flags describe (None fields: the model's)."""
    return extraction.ExtractionSettings(
        max_side=args.max_side,
        scales=extraction.MULTI_SCALES if args.multi_scale else None,
        batch_size=args.batch_size,
    )


def extractor_from_args(args: argparse.Namespace) -> extraction.Extractor:
    """The global-descriptor extractor for the model and extraction flags."""
    config, variables = model_from_args(args)
    return extraction.Extractor(config, variables, settings_from_args(args))


def check_output_file(path: str | os.PathLike) -> None:
    """Raises :class:`CLIError` unless ``path`` can be written (checked before long work)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CLIError(f"{path} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"cannot write {path}: the folder {parent} is not writable")
