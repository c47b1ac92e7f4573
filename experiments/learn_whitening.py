r"""Learn whitening (Lw) from the matching pairs of a labelled training set; save the model.

  python -m experiments.learn_whitening --train-csv ../shared/data/smvs_train/labels.csv \
      --out checkpoints/lw_mobilenet_v2
  python -m experiments.learn_whitening --train-csv ../shared/data/smvs_train/labels.csv \
      --backbone vgg16 --max-side 512 --multi-scale --dim 256 --out checkpoints/lw_vgg16
  python -m experiments.learn_whitening --train-csv labels.csv --checkpoint checkpoints/NAME \
      --out checkpoints/NAME_lw
  python -m experiments.learn_whitening --train-csv ../shared/data/smvs_train/labels.csv \
      --backbone vgg16 --max-side 1024 --multi-scale --exact-sizes --out checkpoints/lw_vgg16_1024
  python -m experiments.evaluate --data-root ../shared/data/smvs_eval \
      --checkpoint checkpoints/lw_mobilenet_v2

Describes every training image with the model (unwhitened: its pooling at --max-side and
the model's or --multi-scale scales; a whitening the model has is replaced), pairs every
two images of the same scene (both orders), learns Lw from those pairs (Radenović et
al., cirtorch's whitenlearn: centred on the queries' mean unless --centering all), and
saves a model directory for --checkpoint: the model with the whitening as its layer, at
the image size and scales it was learned at. model.json's metadata records the training
set, the number of pairs, the centring, eps, the dimension and the image size.

--eps auto (the default) chooses the ridge on the training set itself: three times, a
fifth of its scenes is held out, Lw is learned on the rest with eps = r x the mean
eigenvalue of the pair covariance for r in 1e-5 ... 10, and the held-out images are
ranked (each queries the others); the r with the best mean Medium mAP is used to learn
on all images. The grid is printed and kept in the metadata (eps_selection). The
descriptors are computed once. A number, e.g. --eps 1e-6, is an absolute eps.

The CSV has one row per image with columns image and scene (as smvs_train/labels.csv);
image names are relative to --image-dir (default: <csv folder>/images, else the CSV's
folder) or absolute. Learn only on training images, never on an evaluation set.
"""

import argparse
import dataclasses
import logging
import os
import pathlib

from experiments import cli, whitening_lib
from jaxretrieval import extraction, model_io, whitening
from jaxretrieval.data import labelled as labelled_lib


def _eps(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or positive, found {text}")
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
        type=_eps,
        default="auto",
        help="ridge added to the pair covariance's diagonal: 'auto' (default) chooses it "
        "on held-out scenes of the training set, relative to the covariance's mean "
        "eigenvalue; a number is an absolute eps (the earlier default was 1e-6)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="reuse/save the training descriptors here"
    )
    parser.add_argument(
        "--exact-sizes",
        action="store_true",
        help="extract every image at its own size, one at a time (no 32-px shape buckets: "
        "their padding shifts descriptors at large sizes; as benchmarks/dsm_seed_table.py)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def format_eps_grid(selection: dict) -> str:
    """The held-out grid of ``eps="auto"`` as lines of text (metadata ``eps_selection``)."""
    held_out = selection["held_out"]
    lines = [
        f"eps chosen on held-out training scenes ({len(held_out['seeds'])} splits of "
        f"{'/'.join(map(str, held_out['num_scenes']))} scenes, "
        f"{'/'.join(map(str, held_out['num_images']))} images): Medium mAP, mean over the "
        "splits",
        f"  {'eps / mean eigenvalue':>22s} {'leave-one-out':>14s} {'split':>7s}",
    ]
    for entry in selection["grid"]:
        mark = "  <- chosen" if entry["ratio"] == selection["chosen_ratio"] else ""
        lines.append(
            f"  {entry['ratio']:>22g} {entry['mean_leave_one_out']:14.3f} "
            f"{entry['mean_split']:7.3f}{mark}"
        )
    for name, entry in (
        (
            f"absolute eps {selection['absolute_reference']['eps']:g}",
            selection["absolute_reference"],
        ),
        ("no whitening", selection["unwhitened"]),
    ):
        lines.append(
            f"  {name:>22s} {entry['mean_leave_one_out']:14.3f} {entry['mean_split']:7.3f}"
        )
    return "\n".join(lines)


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


def extraction_settings(args: argparse.Namespace) -> extraction.ExtractionSettings:
    """The model flags' settings; ``--exact-sizes``: no padding, one image per call."""
    settings = cli.settings_from_args(args)
    if args.exact_sizes:
        settings = dataclasses.replace(settings, size_multiple=1, batch_size=1)
    return settings


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
            settings=extraction_settings(args),
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
    selection = facts["eps_selection"]
    if selection["rule"] == "auto":
        print(format_eps_grid(selection))
    print(
        f"learned Lw on all {facts['num_images']} images: centring {facts['centering']}, "
        f"dimension {facts['dim']}, eps {facts['eps']:.3g} "
        f"({facts['eps_ratio']:.3g} x the pair covariance's mean eigenvalue)"
    )
    # Only what differs from the shipped ImageNet weights is written (the whitening, and a
    # fine-tuned checkpoint's own layers): a VGG16 + Lw directory is 1 MB instead of 59.
    model_io.save_model(
        args.out,
        learned.config,
        learned.variables,
        metadata=learned.metadata,
        base=model_io.BASE_PRETRAINED,
    )
    print(f"wrote {args.out} (use it with --checkpoint {args.out})")
    return learned


if __name__ == "__main__":
    cli.run(main, prog="learn_whitening")
