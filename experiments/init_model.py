r"""Save a model directory with ImageNet weights and a fresh head, for any pooling.

  python -m experiments.init_model --pooling darac --max-side 299 \
      --out checkpoints/darac_mobilenet_v2_init_299
  python -m experiments.evaluate --data-root ../shared/data/landmarks_mini \
      --checkpoint checkpoints/darac_mobilenet_v2_init_299

The training loop builds GeM models itself; a model with another head (DARAC's learned
region weights, ``params["darac"]``) starts from such a directory, named by the training
config's ``model.init_checkpoint`` (experiments/configs/darac_mobilenet_v2.py). The
directory records the backbone, pooling, image size (--max-side, default 224) and scales
(--multi-scale) like any saved model, so every CLI reads it with --checkpoint.
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
    cli.add_model_args(parser)
    return parser.parse_args(argv)


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
    path = model_io.save_model(
        out, config, variables, metadata={"initialised_from": args.checkpoint or "ImageNet"}
    )
    print(f"wrote {path}: {config.backbone} + {config.pooling} at max side {config.max_side}")
    return path


if __name__ == "__main__":
    cli.run(main, prog="init_model")
