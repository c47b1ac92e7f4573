"""Inlier counts of same-landmark vs different-landmark pairs (the DSM poster's histogram).

  .venv/bin/python -m benchmarks.dsm_inlier_distribution [--out /tmp/dsm_inliers.png]
  .venv/bin/python -m benchmarks.dsm_inlier_distribution --quick    # max side 384

Every ordered pair (a, b), a != b, of landmarks_mini's 29 photos is verified with DSM
(the settings of benchmarks/dsm_reranking_table.py: MobileNetV2 last conv, max side 512,
scales 1, 1/sqrt(2), 1/2, 512 features, threshold 2 cells, 1024 correspondences). Positive
pairs show the same landmark (the scenes of ``datasets.leave_one_out``), negative pairs
different ones. Writes histograms of the inlier counts (and of the distinct-feature counts)
of both groups to a PNG and prints the AUC (probability that a positive pair has more
inliers than a negative one, ties 1/2) next to the AUC of the global GeM cosine similarity
(max side 224) of the same pairs.
"""

import argparse
import functools
import pathlib
import tempfile
import time

import jax
import matplotlib
import numpy as np

from benchmarks.common import DATA, auc
from jaxretrieval import extraction
from jaxretrieval.data import datasets
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    distinct_inliers,
    stack_local_features,
    verify_shortlist,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


@functools.cache
def _jitted_counts(max_correspondences: int, num_features: int):
    def counts(query, database, threshold):
        result, matches = verify_shortlist(
            query, database, max_correspondences=max_correspondences, error_threshold=threshold
        )
        distinct = jax.vmap(
            lambda r, m: distinct_inliers(
                r, m, num_features_a=num_features, num_features_b=num_features
            )
        )(result, matches)
        return result.num_inliers, distinct

    return jax.jit(counts)


def pair_counts(features, *, threshold: float, max_correspondences: int):
    """(N, N) inlier and distinct-inlier counts of every ordered pair (diagonal: self)."""
    stacked = stack_local_features(features)
    counts = _jitted_counts(max_correspondences, stacked.means.shape[1])
    inliers, distinct = [], []
    for i in range(len(features)):
        query = jax.tree.map(lambda x, i=i: x[i], stacked)
        n, d = counts(query, stacked, threshold)
        inliers.append(np.asarray(n))
        distinct.append(np.asarray(d))
    return np.stack(inliers), np.stack(distinct)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA / "landmarks_mini"))
    parser.add_argument(
        "--out", default=str(pathlib.Path(tempfile.gettempdir()) / "dsm_inliers.png")
    )
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--max-correspondences", type=int, default=1024)
    parser.add_argument("--threshold-cells", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="max side 384")
    args = parser.parse_args(argv)
    max_side = 384 if args.quick else args.max_side
    dataset = datasets.load_dataset(pathlib.Path(args.data))
    paths, gnd = datasets.leave_one_out(dataset)
    start = time.perf_counter()
    extractor = DSMFeatureExtractor.pretrained(pad_multiple=64)
    features = [extractor(extractor.load(p, max_side=max_side)) for p in paths]
    threshold = args.threshold_cells * extractor.feature_stride
    inliers, distinct = pair_counts(
        features, threshold=threshold, max_correspondences=args.max_correspondences
    )
    descriptors = extraction.Extractor.pretrained(ModelConfig(max_side=224))(
        paths, progress=False
    ).descriptors
    cosine = descriptors @ descriptors.T
    num = len(paths)
    positive = np.zeros((num, num), bool)
    for i, entry in enumerate(gnd):
        positive[i, entry["easy"]] = True
    negative = ~positive & ~np.eye(num, dtype=bool)
    print(
        f"landmarks_mini: {num} images, {positive.sum()} positive and {negative.sum()} negative "
        f"ordered pairs; DSM max side {max_side}, threshold {threshold:.0f} px; "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(f"{'score':18s} {'pos median':>10s} {'neg median':>10s} {'neg max':>8s} {'AUC':>6s}")
    for name, values in (
        ("inliers", inliers),
        ("distinct inliers", distinct),
        ("GeM cosine (224)", cosine),
    ):
        pos, neg = values[positive], values[negative]
        print(
            f"{name:18s} {np.median(pos):10.2f} {np.median(neg):10.2f} {neg.max():8.2f} "
            f"{auc(pos, neg):6.3f}"
        )
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, (name, values) in zip(
        axes, (("inliers", inliers), ("distinct inliers", distinct)), strict=True
    ):
        pos, neg = values[positive], values[negative]
        bins = np.linspace(0, max(pos.max(), neg.max()) + 1, 31)
        axis.hist(neg, bins=bins, density=True, alpha=0.6, label=f"different landmark ({len(neg)})")
        axis.hist(pos, bins=bins, density=True, alpha=0.6, label=f"same landmark ({len(pos)})")
        axis.set_xlabel(f"DSM {name}")
        axis.set_ylabel("fraction of pairs")
        axis.set_title(f"AUC {auc(pos, neg):.3f}")
        axis.legend()
    figure.suptitle(f"landmarks_mini, MobileNetV2 DSM at max side {max_side}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {pathlib.Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
