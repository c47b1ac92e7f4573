"""DSM verification on real images against ground-truth homographies (Oxford affine sets).

For each sequence (graf from oxford_affine_graf; bikes, boat, leuven, wall from
oxford_affine_seq), img1 is verified against img2..img6: MobileNetV2 activations
(``last_conv``, stride 32, ImageNet weights, no fine-tuning) at scales 1, 1/sqrt(2), 1/2
become DSM local features (per-channel MSER, NMS), then ``verify_pair``. Each inlier's
centre in img1 is mapped by the true homography and compared with its partner's centre in
imgk: the median of these errors (pixels of the resized imgk) says whether the inliers are
true matches. As a negative control, img1 of each sequence is also verified against
img2..img6 of every other sequence (different scenes). The summary line gives the median
inliers of true and different-scene pairs, the inlier precision (fraction of inliers within
the threshold of the true position), the median error, and the AUC: the probability that a
true pair has more inliers than a different-scene pair, which is what re-ranking needs
(AUC-d: the same with distinct inliers, each feature counted once).

    .venv/bin/python -m benchmarks.dsm_homography_check                  # max side 512
    .venv/bin/python -m benchmarks.dsm_homography_check --max-side 1024
    .venv/bin/python -m benchmarks.dsm_homography_check --quick          # graf + wall, 384
    .venv/bin/python -m benchmarks.dsm_homography_check --sweep          # settings grid

Numbers only: nothing here is tuned to these images.
"""

import argparse
import dataclasses
import time

import numpy as np

from benchmarks import common
from experiments import match_lib
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    MSERParams,
    activation_local_features,
)

SEQUENCES = ("graf", "bikes", "boat", "leuven", "wall")


def sequence_files(name, data=common.DATA):
    """Image paths img1..img6 and homography paths H1to2..H1to6 of one sequence."""
    if name == "graf":
        root = data / "oxford_affine_graf"
        images = [root / f"img{k}.ppm" for k in range(1, 7)]
        homographies = [root / f"H1to{k}p" for k in range(2, 7)]
    else:
        root = data / "oxford_affine_seq"
        images = [root / "images" / f"{name}__img{k}.png" for k in range(1, 7)]
        homographies = [root / "homographies" / f"{name}__H1to{k}p.txt" for k in range(2, 7)]
    return images, homographies


def load_sequences(sequences, max_side, extractor):
    """Activation maps of img1..img6 and the homographies between the resized images."""
    data = {}
    for name in sequences:
        images, homographies = sequence_files(name)
        loaded = [common.load_for_dsm(extractor, path, max_side) for path in images]
        maps = [extractor.activation_maps(image) for image, _ in loaded]
        resized = [
            common.load_homography(path, scale_a=loaded[0][1], scale_b=loaded[k][1])
            for k, path in enumerate(homographies, start=1)
        ]
        data[name] = (maps, resized)
    return data


def evaluate(data, setting, *, max_features, max_correspondences, stride, verbose):
    """Verifies true pairs (img1 vs img2..6) and different-scene pairs for one setting."""
    mser, nms_iou, threshold_cells = setting
    threshold = threshold_cells * stride
    features = {
        name: [
            activation_local_features(m, max_features=max_features, mser=mser, nms_iou=nms_iou)
            for m in maps
        ]
        for name, (maps, _) in data.items()
    }

    def verify(a, b):
        return match_lib.match_features(
            a, b, error_threshold=threshold, max_correspondences=max_correspondences
        )

    positives, negatives, within_all, medians = [], [], [], []
    positives_distinct, negatives_distinct = [], []
    for name, (_, homographies) in data.items():
        features_a = features[name][0]
        for k in range(2, 7):
            features_b = features[name][k - 1]
            match = verify(features_a, features_b)
            positives.append(match["num_inliers"])
            positives_distinct.append(match["num_distinct_inliers"])
            truth = common.map_homography(homographies[k - 2], match["points_a"])
            errors = np.linalg.norm(truth - match["points_b"], axis=1)
            within_all.extend(errors < threshold)
            median = float(np.median(errors)) if len(errors) else float("nan")
            medians.append(median)
            if verbose:
                within = float(np.mean(errors < threshold)) if len(errors) else float("nan")
                print(
                    f"{name:8s} {'1-' + str(k):>5s} "
                    f"{int(features_a.valid.sum()):4d}/{int(features_b.valid.sum()):<4d} "
                    f"{match['num_tentative']:9d} {match['num_inliers']:7d} "
                    f"{median:13.1f} {within:7.2f}"
                )
        for other in data:
            if other != name:
                for k in range(2, 7):
                    match = verify(features_a, features[other][k - 1])
                    negatives.append(match["num_inliers"])
                    negatives_distinct.append(match["num_distinct_inliers"])
    positives, negatives = np.array(positives), np.array(negatives)
    return {
        "pos_median": float(np.median(positives)),
        "neg_median": float(np.median(negatives)),
        "neg_max": int(negatives.max()),
        "inlier_precision": float(np.mean(within_all)) if within_all else float("nan"),
        "median_error": float(np.nanmedian(medians)),
        "auc": common.auc(positives, negatives),
        "auc_distinct": common.auc(np.array(positives_distinct), np.array(negatives_distinct)),
    }


def sweep_settings(threshold_cells, nms_iou):
    """The small grid of --sweep: one change at a time from the default."""
    base = MSERParams()
    return [
        ("default", (base, nms_iou, threshold_cells)),
        ("threshold 1 cell", (base, nms_iou, 1.0)),
        ("threshold 3 cells", (base, nms_iou, 3.0)),
        ("no NMS", (base, 1.0, threshold_cells)),
        ("NMS IoU 0.3", (base, 0.3, threshold_cells)),
        (
            "no nested pruning",
            (dataclasses.replace(base, prune_nested=False), nms_iou, threshold_cells),
        ),
        (
            "per-channel scaling",
            (dataclasses.replace(base, per_channel_scaling=True), nms_iou, threshold_cells),
        ),
        ("delta 2", (dataclasses.replace(base, delta=2), nms_iou, threshold_cells)),
        (
            "max variation 0.25",
            (dataclasses.replace(base, max_variation=0.25), nms_iou, threshold_cells),
        ),
        (
            "max variation 1.0",
            (dataclasses.replace(base, max_variation=1.0), nms_iou, threshold_cells),
        ),
        (
            "OpenCV min_diversity 0.2",
            (dataclasses.replace(base, opencv_min_diversity=0.2), nms_iou, threshold_cells),
        ),
    ]


def combination_settings(threshold_cells):
    """--sweep-combinations: the best single changes of --sweep, combined."""
    base = MSERParams()
    no_prune = dataclasses.replace(base, prune_nested=False)
    return [
        ("no NMS", (base, 1.0, threshold_cells)),
        ("no NMS, no pruning", (no_prune, 1.0, threshold_cells)),
        ("no NMS, delta 2", (dataclasses.replace(base, delta=2), 1.0, threshold_cells)),
        (
            "no NMS, per-channel",
            (dataclasses.replace(base, per_channel_scaling=True), 1.0, threshold_cells),
        ),
        ("NMS 0.7, no pruning", (no_prune, 0.7, threshold_cells)),
        ("no NMS, no pruning, 1 cell", (no_prune, 1.0, 1.0)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="graf and wall at max side 384")
    parser.add_argument("--sweep", action="store_true", help="summary of a small settings grid")
    parser.add_argument("--sweep-combinations", action="store_true", help="combined changes")
    parser.add_argument("--max-features", type=int, default=512)
    parser.add_argument("--max-correspondences", type=int, default=1024)
    parser.add_argument(
        "--threshold-cells",
        type=float,
        default=2.0,
        help="inlier threshold in activation cells of the full-scale map (DSM: 2)",
    )
    parser.add_argument("--nms-iou", type=float, default=0.7)
    args = parser.parse_args(argv)
    max_side = 384 if args.quick else args.max_side
    sequences = ("graf", "wall") if args.quick else SEQUENCES
    scales = (1.0, 2**-0.5, 0.5)
    extractor = DSMFeatureExtractor.pretrained(scales=scales, max_features=args.max_features)
    start = time.perf_counter()
    data = load_sequences(sequences, max_side, extractor)
    print(
        f"DSM on MobileNetV2 last_conv, scales {', '.join(f'{s:.3f}' for s in scales)}, "
        f"max side {max_side}; activations of {6 * len(sequences)} images in "
        f"{time.perf_counter() - start:.1f} s"
    )
    common = {
        "max_features": args.max_features,
        "max_correspondences": args.max_correspondences,
        "stride": extractor.feature_stride,
    }
    if not (args.sweep or args.sweep_combinations):
        print(f"threshold {args.threshold_cells} cells, NMS IoU {args.nms_iou}")
        print(
            f"{'sequence':8s} {'pair':>5s} {'features':>9s} {'tentative':>9s} {'inliers':>7s} "
            f"{'median err px':>13s} {'inl<thr':>7s}"
        )
        summary = evaluate(
            data, (MSERParams(), args.nms_iou, args.threshold_cells), verbose=True, **common
        )
        print(summary_line("default", summary, header=True))
        return
    if args.sweep_combinations:
        settings = combination_settings(args.threshold_cells)
    else:
        settings = sweep_settings(args.threshold_cells, args.nms_iou)
    for i, (name, setting) in enumerate(settings):
        start = time.perf_counter()
        summary = evaluate(data, setting, verbose=False, **common)
        print(summary_line(name, summary, header=i == 0) + f" {time.perf_counter() - start:6.1f}s")


def summary_line(name, summary, header=False):
    line = (
        f"{name:26s} {summary['pos_median']:8.0f} {summary['neg_median']:8.0f} "
        f"{summary['neg_max']:7d} {summary['inlier_precision']:9.2f} "
        f"{summary['median_error']:9.1f} {summary['auc']:6.3f} {summary['auc_distinct']:6.3f}"
    )
    if header:
        top = (
            f"{'setting':26s} {'pos med':>8s} {'neg med':>8s} {'neg max':>7s} {'inl prec':>9s} "
            f"{'med err':>9s} {'AUC':>6s} {'AUC-d':>6s}"
        )
        return top + "\n" + line
    return line


if __name__ == "__main__":
    main()
