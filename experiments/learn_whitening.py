r"""Learn whitening (Lw) from the matching pairs of a labelled training set; save the model.

  python -m experiments.learn_whitening --train-csv ../shared/data/smvs_train/labels.csv \
      --out checkpoints/lw_mobilenet_v2
  python -m experiments.learn_whitening --train-csv ../shared/data/smvs_train/labels.csv \
      --backbone vgg16 --max-side 512 --multi-scale --dim 256 --out checkpoints/lw_vgg16
  python -m experiments.learn_whitening --train-csv labels.csv --checkpoint checkpoints/NAME \
      --out checkpoints/NAME_lw
  python -m experiments.evaluate --data-root ../shared/data/smvs_eval \
      --checkpoint checkpoints/lw_mobilenet_v2

Describes every training image with the model (unwhitened: its pooling at --max-side and
the model's or --multi-scale scales; a whitening the model has is replaced), pairs every
two images of the same scene (both orders), learns Lw from those pairs (Radenović et
al., cirtorch's whitenlearn: centred on the queries' mean unless --centering all), and
saves a model directory for --checkpoint: the model with the whitening as its layer, at
the image size and scales it was learned at. model.json's metadata records the training
set, the number of pairs, the centring, eps, the dimension and the image size.

The CSV has one row per image with columns image and scene (as smvs_train/labels.csv);
image names are relative to --image-dir (default: <csv folder>/images, else the CSV's
folder) or absolute. Learn only on training images, never on an evaluation set.
"""

import argparse
import logging
import os
import pathlib

from experiments import cli, whitening_lib
from jaxretrieval import extraction, model_io, whitening
from jaxretrieval.data import labelled as labelled_lib


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, found {text}")
    return value


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("learn_whitening", __doc__)
    parser.add_argument(
        "--train-csv", required=True, help="labelled training images: CSV with image, scene"
    )
    parser.add_argument("--image-dir", default=None, help="folder the CSV's image names are in")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument(
        "--centering",
        default="queries",
        choices=whitening.CENTERINGS,
        help="centre on the mean of the pairs' queries (cirtorch, default) or of all images",
    )
    parser.add_argument(
        "--dim",
        type=cli._positive_int,
        default=None,
        help="output dimension (default: the descriptors' own, e.g. 1280 for mobilenet_v2)",
    )
    parser.add_argument(
        "--eps",
        type=_positive_float,
        default=1e-6,
        help="ridge added to the pair covariance's diagonal (1e-6)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="reuse/save the training descriptors here"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def load_training_set(csv_path: str, image_dir: str | None) -> labelled_lib.LabelledImages:
    """The labelled images of the CSV, with a user's mistake as a :class:`cli.CLIError`."""
    if not pathlib.Path(csv_path).is_file():
        raise cli.CLIError(f"--train-csv {csv_path}: no such file")
    if image_dir is not None and not pathlib.Path(image_dir).is_dir():
        raise cli.CLIError(f"--image-dir {image_dir}: no such folder")
    try:
        return labelled_lib.from_csv(csv_path, image_dir=image_dir)
    except (ValueError, TypeError) as e:
        raise cli.CLIError(f"--train-csv {csv_path}: {e}") from e


def check_output_dir(path: str) -> None:
    """Raises :class:`cli.CLIError` unless ``path`` can be a model directory (before work)."""
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise cli.CLIError(f"--out {out} is a file; give a directory")
    extraction.check_writable(out)


def main(argv=None) -> whitening_lib.LearnedModel:
    """Describes the training images, learns Lw, attaches it and saves the model."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    check_output_dir(args.out)
    labelled = load_training_set(args.train_csv, args.image_dir)
    config, variables = cli.model_from_args(args)
    if config.whitening_dim is not None:
        print(f"replacing the model's {config.whitening_dim}-d whitening layer")
    if args.checkpoint is not None:
        base_model = {"checkpoint": os.path.abspath(args.checkpoint)}
    else:
        base_model = {"backbone": config.backbone, "weights": args.weights or "ImageNet"}
    try:
        learned = whitening_lib.learn_whitening_model(
            config,
            variables,
            labelled,
            settings=cli.settings_from_args(args),
            centering=args.centering,
            dim=args.dim,
            eps=args.eps,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            training_set=os.path.abspath(args.train_csv),
            base_model=base_model,
        )
    except whitening_lib.LearnWhiteningError as e:
        raise cli.CLIError(str(e)) from e
    facts = learned.metadata["whitening"]
    print(
        f"{facts['num_images']} images, {facts['num_scenes']} scenes, {facts['num_pairs']} "
        f"ordered matching pairs; {config.backbone} {config.pooling} descriptors of dimension "
        f"{facts['descriptor_dim']} at max side {facts['max_side']}, scales "
        f"{', '.join(f'{s:.3g}' for s in facts['scales'])}"
    )
    if facts["pair_difference_rank_bound"] < facts["descriptor_dim"]:
        print(
            f"note: the pair differences span at most {facts['pair_difference_rank_bound']} of "
            f"{facts['descriptor_dim']} dimensions; eps={facts['eps']:g} sets the gain of "
            "the others"
        )
    print(f"learned Lw: centring {facts['centering']}, dimension {facts['dim']}")
    model_io.save_model(args.out, learned.config, learned.variables, metadata=learned.metadata)
    print(f"wrote {args.out} (use it with --checkpoint {args.out})")
    return learned


if __name__ == "__main__":
    cli.run(main, prog="learn_whitening")
