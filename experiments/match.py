r"""Spatially verify a query image against other images and draw the inliers.

  python -m experiments.match query.jpg other1.jpg other2.jpg --out matches.png
  python -m experiments.match query.jpg others/*.jpg --checkpoint checkpoints/NAME
  python -m experiments.match --method delf --checkpoint checkpoints/delf_mobilenet_v2 \
      query.jpg others/*.jpg

--method dsm (default): local features are MSER regions on the model's activation
channels (DSM, Simeoni et al. CVPR 2019); every tentative same-channel correspondence is
a RANSAC hypothesis. --method delf: DELF keypoints (Noh et al. ICCV 2017) of a DELF
model directory (--checkpoint; without it, ImageNet MobileNetV2 stage3 with keypoints by
feature norm), mutual nearest neighbours, RANSAC on random point triples. Prints the
inlier count of each pair, best first, and writes the query next to its best match with
the inliers drawn (--out). Unreadable images and images too small for the network are
skipped with a message.
"""

import cv2

from experiments import cli, match_lib
from jaxretrieval.data import images as image_io
from jaxretrieval.spatial_verification import DSMFeatureExtractor, ImageTooSmallError

METHODS = ("dsm", "delf")


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("match", __doc__)
    parser.add_argument("query", help="query image file")
    parser.add_argument("others", nargs="+", help="images to verify against the query")
    parser.add_argument("--out", default="matches.png", help="picture of the best match (PNG)")
    parser.add_argument(
        "--method", default="dsm", choices=METHODS, help="local features and verifier (dsm)"
    )
    parser.add_argument(
        "--threshold-cells",
        type=float,
        default=2.0,
        help="dsm: inlier distance in activation cells of the full-scale map (DSM: 2)",
    )
    parser.add_argument(
        "--threshold-pixels",
        type=float,
        default=20.0,
        help="delf: RANSAC inlier distance in image pixels (the authors': 20)",
    )
    parser.add_argument(
        "--max-features", type=cli._positive_int, help="features per image (dsm: 512, delf: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="delf: seed of the RANSAC samples")
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> list[tuple[int, str]]:
    """Extracts, verifies, prints the inlier counts and writes the picture."""
    args = parse_args(argv)
    cli.check_output_file(args.out)
    if args.method == "delf":
        load, extract, match = _delf(args)
    else:
        load, extract, match = _dsm(args)
    query = load(args.query)  # a bad query stops here
    query_features = extract(query)
    results, skipped = [], []
    for path in args.others:
        try:
            image = load(path)
        except (image_io.ImageDecodeError, ImageTooSmallError) as e:
            skipped.append(str(e))
            continue
        result = match(query_features, extract(image))
        results.append((result["num_inliers"], path, image, result))
    for reason in skipped:
        print(f"skipped: {reason}")
    if not results:
        raise cli.CLIError("none of the other images could be matched (see the skipped list)")
    results.sort(key=lambda r: -r[0])
    for inliers, path, _, result in results:
        print(f"{inliers:5d} inliers / {result['num_tentative']:5d} tentative  {path}")
    _, _, image, result = results[0]
    picture = match_lib.draw_matches(query, image, result["points_a"], result["points_b"])
    cv2.imwrite(args.out, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}")
    return [(inliers, path) for inliers, path, _, _ in results]


def _dsm(args):
    """``(load, extract, match)`` of DSM."""
    config, variables = cli.model_from_args(args)
    extractor = DSMFeatureExtractor(
        config, variables, max_features=args.max_features or 512, pad_multiple=64
    )
    threshold = args.threshold_cells * extractor.feature_stride
    max_side = args.max_side or 1024

    def match(a, b):
        return match_lib.match_features(a, b, error_threshold=threshold)

    return (lambda path: extractor.load(path, max_side=max_side)), extractor, match


def _delf(args):
    """``(load, extract, match)`` of DELF."""
    import dataclasses

    from experiments import delf_lib
    from jaxretrieval.local_features import (
        DelfConfig,
        DelfExtractor,
        DelfSettings,
        VerificationSettings,
    )

    meaningless = [
        flag
        for flag, value in (
            ("--pooling", args.pooling),
            ("--gem-p", args.gem_p),
            ("--multi-scale", args.multi_scale),
        )
        if value is not None
    ]
    if meaningless:
        raise cli.CLIError(f"{', '.join(meaningless)} has no meaning with --method delf")
    settings = DelfSettings(max_side=args.max_side, max_features=args.max_features or 1000)
    if args.checkpoint is not None:
        if args.backbone is not None or args.weights is not None:
            raise cli.CLIError("--checkpoint already names the model; drop --backbone/--weights")
        extractor = DelfExtractor.from_checkpoint(args.checkpoint, settings)
    else:
        if args.weights is not None and args.backbone is None:
            raise cli.CLIError("--weights needs --backbone with --method delf")
        config = DelfConfig(keypoint_score="l2_norm")
        if args.backbone is not None:
            feature = {"vgg16": "conv5_3"}.get(args.backbone, "stage3")
            try:
                config = dataclasses.replace(config, backbone=args.backbone, feature_name=feature)
            except ValueError as e:
                raise cli.CLIError(f"--backbone {args.backbone}: {e}") from e
        extractor = DelfExtractor.pretrained(config, settings, weights_path=args.weights)
    verification = VerificationSettings(error_threshold=args.threshold_pixels)

    def load(path):
        image = extractor.load(path)
        if min(image.shape[:2]) < extractor.min_image_side:
            raise ImageTooSmallError(
                f"{path} is {image.shape[1]} x {image.shape[0]} pixels; DELF features need "
                f"at least {extractor.min_image_side} pixels per side"
            )
        return image

    return load, extractor, lambda a, b: delf_lib.match_pair(a, b, verification, seed=args.seed)


if __name__ == "__main__":
    cli.run(main, prog="match")
