r"""Learn the PCA of a trained DELF model's descriptors on training images.

  python -m experiments.delf_pca --checkpoint checkpoints/delf_attention_mobilenet_v2 \
      --train-csv ../shared/data/smvs_train/labels.csv --out checkpoints/delf_mobilenet_v2
  python -m experiments.delf_pca --train-csv ../shared/data/smvs_train/labels.csv \
      --out checkpoints/delf_imagenet_pca    # ImageNet weights: the no-fine-tuning model

Extracts every keypoint (the model's pyramid, keypoint score and --max-features) of the
training images listed in --train-csv (never an evaluation set), learns the PCA of the
L2-normalised descriptors to --dim dimensions (the paper's 40; --whitening also divides
by the standard deviations, off in the authors' config) and writes a new DELF model
directory to --out, whose descriptors are then l2(PCA(l2(f))). The model it reads is
left unchanged.
"""

import json
import pathlib

import numpy as np

from experiments import cli


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("delf_pca", __doc__)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="DELF model or training work dir (default: the ImageNet backbone, keypoints by "
        "feature norm: the 'no fine-tuning' model)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        choices=("mobilenet_v2", "vgg16"),
        help="ImageNet backbone without --checkpoint (mobilenet_v2: stage3; vgg16: conv5_3)",
    )
    parser.add_argument("--train-csv", required=True, help="labels.csv of the training images")
    parser.add_argument("--out", required=True, help="new model directory (PCA included)")
    parser.add_argument("--dim", type=cli._positive_int, default=40, help="PCA dimension (40)")
    parser.add_argument("--whitening", action="store_true", help="whiten as well")
    parser.add_argument(
        "--max-images", type=cli._positive_int, default=None, help="use a random subset"
    )
    parser.add_argument(
        "--max-side", type=cli._positive_int, default=None, help="default: the model's"
    )
    parser.add_argument(
        "--max-features", type=cli._positive_int, default=1000, help="keypoints per image"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-images")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Learns the PCA and saves the model; returns the facts recorded in its metadata."""
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from experiments import delf_lib
    from jaxretrieval import model_io
    from jaxretrieval.data import labelled
    from jaxretrieval.local_features import DelfConfig, DelfSettings, init_delf_variables

    out = pathlib.Path(args.out)
    if args.checkpoint is not None:
        if args.backbone is not None:
            raise cli.CLIError("--checkpoint already names the model; drop --backbone")
        source = model_io.resolve_model_directory(args.checkpoint)
        if out.resolve() == source.resolve():
            raise cli.CLIError(f"--out {out} is the model being read; write a new directory")
        config, variables = model_io.load_delf_model(source)
        previous = model_io.read_model_file(source)["metadata"]
    else:
        backbone = args.backbone or "mobilenet_v2"
        feature = "conv5_3" if backbone == "vgg16" else "stage3"
        config = DelfConfig(backbone=backbone, feature_name=feature, keypoint_score="l2_norm")
        variables = init_delf_variables(config)
        previous = {"source": f"ImageNet {backbone} {feature}, no fine-tuning"}
    if (out / model_io.MODEL_FILE).exists():
        print(f"replacing the model in {out}")
    images = labelled.from_csv(args.train_csv)
    paths = list(images.paths)
    if args.max_images is not None and args.max_images < len(paths):
        chosen = np.random.default_rng(args.seed).choice(len(paths), args.max_images, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    settings = DelfSettings(max_side=args.max_side, max_features=args.max_features)
    try:
        new_config, new_variables, facts = delf_lib.learn_model_pca(
            config,
            variables,
            paths,
            dim=args.dim,
            whitening=args.whitening,
            settings=settings,
            progress=lambda p: tqdm(p, desc="descriptors", unit="img"),
        )
    except ValueError as e:
        raise cli.CLIError(str(e)) from e
    facts = {**facts, "pca_train_csv": str(args.train_csv), "pca_whitening": args.whitening}
    metadata = {**previous, "pca": facts}
    model_io.save_model(out, new_config, new_variables, metadata=metadata)
    print(json.dumps(facts, indent=2))
    print(f"wrote {out}")
    return facts


if __name__ == "__main__":
    cli.run(main, prog="delf_pca")
