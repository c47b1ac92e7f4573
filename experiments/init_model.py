r"""Save a model directory with ImageNet weights and a fresh head, for any pooling.

  python -m experiments.init_model --pooling darac --max-side 299 \
      --out checkpoints/darac_mobilenet_v2_init_299
  python -m experiments.evaluate --data-root ../shared/data/landmarks_mini \
      --checkpoint checkpoints/darac_mobilenet_v2_init_299
  python -m experiments.init_model --checkpoint checkpoints/darac_mobilenet_v2_nra \
      --max-side 1020 --scales 1 0.5294 0.2931 --out checkpoints/darac_mobilenet_v2_nra_multires

Such a directory can also start a training run (``model.init_checkpoint``). The
directory records the backbone, pooling, image size (--max-side, default 224) and scales
(--multi-scale, or any --scales) like any saved model, so every CLI reads it with
--checkpoint. With --checkpoint it re-saves a model (e.g. a trained one) at another image
size or scales: the third example makes a DARAC run describe images at 1020, 540 and
299 px, the poster's multi-resolution setting.
"""

import dataclasses
import logging
import pathlib

from experiments import cli
from jaxretrieval import extraction, model_io


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("init_model", __doc__)
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help="scales of --max-side whose descriptors are combined (e.g. 1 0.5294 0.2931)",
    )
    cli.add_model_args(parser)
    args = parser.parse_args(argv)
    if args.scales is not None and args.multi_scale:
        parser.error("give --multi-scale or --scales, not both")
    if args.scales is not None and any(s <= 0 for s in args.scales):
        parser.error(f"--scales must be positive, found {args.scales}")
    return args


def main(argv=None) -> pathlib.Path:
    """Builds the model the flags name and saves it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise cli.CLIError(f"--out {out} is a file; give a directory")
    extraction.check_writable(out)
    config, variables = cli.model_from_args(args)
    if args.max_side is not None:
        config = dataclasses.replace(config, max_side=args.max_side)
    if args.multi_scale:
        config = dataclasses.replace(config, scales=extraction.MULTI_SCALES)
    if args.scales is not None:
        config = dataclasses.replace(config, scales=tuple(args.scales))
    path = model_io.save_model(
        out, config, variables, metadata={"initialised_from": args.checkpoint or "ImageNet"}
    )
    sizes = ", ".join(str(round(config.max_side * s)) for s in config.scales)
    print(f"wrote {path}: {config.backbone} + {config.pooling} at {sizes} px")
    return path


if __name__ == "__main__":
    cli.run(main, prog="init_model")
