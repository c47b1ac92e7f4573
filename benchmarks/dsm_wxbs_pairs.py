"""DSM verification on the hardest pairs: WxBS (day/night, season, view) and EVD (extreme view).

  .venv/bin/python -m benchmarks.dsm_wxbs_pairs             # max side 512
  .venv/bin/python -m benchmarks.dsm_wxbs_pairs --quick     # EVD pairs only

For every labelled pair of ../shared/data/wxbs_evd_pairs (images 1-2 of each EVD scene
with its homography, images 01-02 of each WxBS pair with its hand-labelled correspondences),
image 1 is verified against image 2 with the DSM settings of
benchmarks/dsm_reranking_table.py (MobileNetV2 last conv, max side 512, scales 1, 1/sqrt(2),
1/2, threshold 2 cells = 64 px, 1024 correspondences). Printed per pair: inliers and
tentative correspondences; for EVD the median error of the inliers under the true
homography and the inlier precision (fraction within the threshold); for WxBS the median
error of the verified affine map on the ground-truth correspondences (a 3D scene is not an
affine plane, so only a gross check: below the threshold means the map is roughly right).
As a negative control, image 1 is also verified against every image of the other scenes:
"rank" is the position of the true partner among them by inlier count (1 = best), and the
AUC summarises all pairs. Pixels are those of the resized image 2. Nothing is tuned here.
"""

import argparse
import functools
import pathlib
import time

import jax
import numpy as np

from benchmarks import common
from experiments import match_lib
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    stack_local_features,
    verify_shortlist,
)


def labelled_pairs(root: pathlib.Path):
    """(name, image 1, image 2, kind, ground-truth file) for every labelled pair."""
    pairs = []
    for path in sorted((root / "homographies").glob("evd_*__H1to2.txt")):
        scene = path.name.split("__")[0]
        images = root / "images"
        pairs.append((scene, images / f"{scene}__1.png", images / f"{scene}__2.png", "H", path))
    for path in sorted((root / "correspondences").glob("wxbs_*-corrs.txt")):
        stem = path.name[: -len("-corrs.txt")]
        first, second = root / "images" / f"{stem}-01.png", root / "images" / f"{stem}-02.png"
        if first.is_file() and second.is_file():
            pairs.append((stem, first, second, "corrs", path))
    return pairs


@functools.cache
def _jitted_inliers(max_correspondences: int):
    return jax.jit(
        lambda q, db, t: (
            verify_shortlist(q, db, max_correspondences=max_correspondences, error_threshold=t)[
                0
            ].num_inliers
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(common.DATA / "wxbs_evd_pairs"))
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--max-correspondences", type=int, default=1024)
    parser.add_argument("--threshold-cells", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="EVD pairs only")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.data)
    pairs = labelled_pairs(root)
    if args.quick:
        pairs = [p for p in pairs if p[3] == "H"]
    start = time.perf_counter()
    extractor = DSMFeatureExtractor.pretrained(pad_multiple=64)
    threshold = args.threshold_cells * extractor.feature_stride
    all_images = sorted((root / "images").glob("*.png"))
    cache = {}

    def features(path):
        if path not in cache:
            image, scale = common.load_for_dsm(extractor, path, args.max_side)
            cache[path] = (extractor(image), scale)
        return cache[path]

    stacked = stack_local_features([features(p)[0] for p in all_images])
    scenes = np.array([p.name.split("__")[0] for p in all_images])
    count = _jitted_inliers(args.max_correspondences)
    print(
        f"DSM MobileNetV2, max side {args.max_side}, threshold {threshold:.0f} px; features of "
        f"{len(all_images)} images in {time.perf_counter() - start:.0f} s"
    )
    print(f"{'pair':34s} {'tent':>5s} {'inl':>4s} {'rank':>7s} {'med err':>8s} {'inl prec':>8s}")
    positives, negatives, ranks = [], [], []
    for name, first, second, kind, truth_path in pairs:
        features_a, scale_a = features(first)
        features_b, scale_b = features(second)
        match = match_lib.match_features(
            features_a,
            features_b,
            error_threshold=threshold,
            max_correspondences=args.max_correspondences,
        )
        others = scenes != name.split("__")[0]
        inliers_all = np.asarray(count(features_a, stacked, threshold))
        negative = inliers_all[others]
        positives.append(match["num_inliers"])
        negatives.extend(negative.tolist())
        rank = 1 + int(np.sum(negative > match["num_inliers"]))
        ranks.append(rank)
        if kind == "H":
            homography = common.load_homography(truth_path, scale_a=scale_a, scale_b=scale_b)
            errors = np.linalg.norm(
                common.map_homography(homography, match["points_a"]) - match["points_b"], axis=1
            )
            precision = f"{np.mean(errors < threshold):8.2f}" if len(errors) else f"{'-':>8s}"
        else:
            corrs = np.loadtxt(truth_path, ndmin=2)
            errors = np.linalg.norm(
                common.map_affine(match["transform"], corrs[:, :2] * scale_a)
                - corrs[:, 2:] * scale_b,
                axis=1,
            )
            precision = f"{'-':>8s}"
        median = float(np.median(errors)) if len(errors) else float("nan")
        print(
            f"{name:34s} {match['num_tentative']:5d} {match['num_inliers']:4d} "
            f"{rank:3d}/{int(others.sum()) + 1:<3d} {median:8.1f} {precision}"
        )
    positives, negatives = np.array(positives), np.array(negatives)
    print(
        f"{len(pairs)} pairs: median inliers {np.median(positives):.0f} (true pairs) vs "
        f"{np.median(negatives):.0f} (other scenes); AUC {common.auc(positives, negatives):.3f}; "
        f"true partner ranked first in {np.mean(np.array(ranks) == 1):.0%} of pairs; "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
