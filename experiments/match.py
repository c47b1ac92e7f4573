"""Spatially verify a query image against other images with DSM and draw the inliers.

  python -m experiments.match query.jpg other1.jpg other2.jpg --out matches.png
  python -m experiments.match query.jpg others/*.jpg --checkpoint checkpoints/NAME

Local features are MSER regions on the model's activation channels (DSM, Simeoni et
al. CVPR 2019); every tentative same-channel correspondence is a RANSAC hypothesis. Prints
the inlier count of each pair, best first, and writes the query next to its best match
with the inliers drawn (--out). Unreadable images and images too small for the network
are skipped with a message.
"""

import cv2

from experiments import cli, match_lib
from jaxretrieval.data import images as image_io
from jaxretrieval.spatial_verification import DSMFeatureExtractor, ImageTooSmallError


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("match", __doc__)
    parser.add_argument("query", help="query image file")
    parser.add_argument("others", nargs="+", help="images to verify against the query")
    parser.add_argument("--out", default="matches.png", help="picture of the best match (PNG)")
    parser.add_argument(
        "--threshold-cells",
        type=float,
        default=2.0,
        help="inlier distance in activation cells of the full-scale map (DSM: 2)",
    )
    parser.add_argument("--max-features", type=cli._positive_int, default=512)
    cli.add_model_args(parser)
    parser.set_defaults(max_side=1024)
    return parser.parse_args(argv)


def main(argv=None) -> list[tuple[int, str]]:
    """Extracts, verifies, prints the inlier counts and writes the picture."""
    args = parse_args(argv)
    cli.check_output_file(args.out)
    config, variables = cli.model_from_args(args)
    extractor = DSMFeatureExtractor(
        config, variables, max_features=args.max_features, pad_multiple=64
    )
    threshold = args.threshold_cells * extractor.feature_stride
    query = extractor.load(args.query, max_side=args.max_side)  # a bad query stops here
    query_features = extractor(query)
    results, skipped = [], []
    for path in args.others:
        try:
            image = extractor.load(path, max_side=args.max_side)
        except (image_io.ImageDecodeError, ImageTooSmallError) as e:
            skipped.append(str(e))
            continue
        match = match_lib.match_features(
            query_features, extractor(image), error_threshold=threshold
        )
        results.append((match["num_inliers"], path, image, match))
    for reason in skipped:
        print(f"skipped: {reason}")
    if not results:
        raise cli.CLIError("none of the other images could be matched (see the skipped list)")
    results.sort(key=lambda r: -r[0])
    for inliers, path, _, match in results:
        print(f"{inliers:5d} inliers / {match['num_tentative']:5d} tentative  {path}")
    _, _, image, match = results[0]
    picture = match_lib.draw_matches(query, image, match["points_a"], match["points_b"])
    cv2.imwrite(args.out, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}")
    return [(inliers, path) for inliers, path, _, _ in results]


if __name__ == "__main__":
    cli.run(main, prog="match")
