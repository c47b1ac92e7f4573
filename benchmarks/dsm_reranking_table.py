"""DSM spatial re-ranking and DSM-seeded diffusion on the real photo sets.

  .venv/bin/python -m benchmarks.dsm_reranking_table               # 3 sets, split + LOO
  .venv/bin/python -m benchmarks.dsm_reranking_table --quick       # landmarks_mini, split only
  .venv/bin/python -m benchmarks.dsm_reranking_table --sets landmarks_mini   # split + LOO
  .venv/bin/python -m benchmarks.dsm_reranking_table --backbone efficientnet_lite0
  .venv/bin/python -m benchmarks.dsm_reranking_table --checkpoint checkpoints/<name>

``--checkpoint``: a saved or fine-tuned model (experiments.train's export) gives both the
global descriptors (its GeM p and whitening, at ``--max-side``) and the DSM activations
(its backbone variables): the DSM seed's setting of a retrieval-tuned network.

Rows (revisited Medium mAP):

- V: global descriptors, MobileNetV2 (or ``--backbone``) last conv map + GeM p=3 at max side
  224 through :mod:`jaxretrieval.extraction`, cosine ranking, **no whitening** (on sets of
  29-72 images learned whitening lowers mAP: benchmarks/descriptor_table.py).
- V+DSM: the whole database is the shortlist (S = N, it is tiny) and is re-ordered by DSM
  inlier counts (:func:`~jaxretrieval.spatial_verification.rerank_shortlist`, min 5 inliers):
  local features from :class:`jaxretrieval.spatial_verification.DSMFeatureExtractor` on the
  same backbone's last conv map at max side ``--dsm-max-side`` (512: the activation maps are
  16x16 cells at scale 1, the smallest size at which an object part spans several cells),
  scales 1, 1/sqrt(2), 1/2, 512 features, NMS IoU 0.7, inlier threshold 2 cells (64 px),
  1024 tentative correspondences, images padded to 64 px buckets (few compiles) -- the
  settings measured on the Oxford affine sequences (benchmarks/dsm_homography_check.py),
  nothing tuned here. "(distinct)" counts each feature once
  (:func:`~jaxretrieval.spatial_verification.distinct_inliers`).
- V+D: diffusion (Iscen et al. CVPR17) on the mutual kNN graph of the global descriptors,
  seeded by the query's nearest database images. The small-set settings of
  benchmarks/reranking_table.py (graph k = 5, gamma 3; "3 seeds, alpha 0.99" and "1 seed,
  alpha 0.9", the latter the best of benchmarks/diffusion_small_set_sweep.py on these same
  sets, so optimistic): the paper's k = 50 and 10 seeds are most of the database here.
- V+DSM+D: the same graph and alpha, seeded by the verified images
  (:func:`~jaxretrieval.spatial_verification.dsm_diffusion_seeds`, as many seeds as V+D,
  weights proportional to the inlier counts), as in the DSM paper.

Every row is computed by experiments' libraries with one
:class:`experiments.rerank_lib.RerankSettings` each, as ``python -m experiments.evaluate
--rerank dsm dsm+diffusion`` computes it. Split protocol: each set's own queries against its
database, through :func:`experiments.evaluate_lib.evaluate` (queries cropped to their boxes
for the global descriptors). Leave-one-out (LOO): every image queries all others, through
:func:`experiments.rerank_lib.rerank_leave_one_out`: the query is excluded from its own
shortlist and seeds but stays a node of the diffusion graph (the same V+D as
benchmarks/reranking_table.py).

The "inliers" lines give the evidence for the table: median inlier count of positive
(same scene) and negative query-database pairs of the split protocol, and the AUC of inlier
counts (probability that a positive pair has more inliers than a negative one, ties 1/2)
next to the AUC of the global cosine similarities (over all pairs, and the mean of each
query's own AUC, which is what its ranking sees), the share of the image area within the
inlier threshold (the chance that a random correspondence is an inlier), and the queries
whose AP moves by more than 0.1 from V to V+DSM.
"""

import dataclasses
import pathlib
import time

import numpy as np

from benchmarks import common
from experiments import evaluate_lib, rerank_lib
from experiments.rerank_lib import MIN_INLIERS, RerankSettings
from jaxretrieval import extraction, model_io
from jaxretrieval.data import datasets
from jaxretrieval.spatial_verification import DSMFeatureExtractor

SETS = ("landmarks_mini", "multiview_jpg_mini", "oxford_affine_seq")
DIFFUSION_SETTINGS = (("3 seeds, α=0.99", 3, 0.99), ("1 seed, α=0.9", 1, 0.9))
GRAPH_K, GAMMA = 5, 3.0


def table_rows(dsm: RerankSettings) -> list[common.RerankRow]:
    """The table's rows; ``dsm`` holds the DSM settings shared by all of them."""
    rows = [
        common.RerankRow("V", "none", dsm),
        common.RerankRow("V+DSM", "dsm", dsm),
        common.RerankRow(
            "V+DSM (distinct)", "dsm", dataclasses.replace(dsm, dsm_count_distinct=True)
        ),
    ]
    for label, num_seeds, alpha in DIFFUSION_SETTINGS:
        settings = dataclasses.replace(dsm, num_seeds=num_seeds, diffusion_alpha=alpha)
        rows += [
            common.RerankRow(f"V+D ({label})", "diffusion", settings),
            common.RerankRow(f"V+DSM+D ({label})", "dsm+diffusion", settings),
        ]
    return rows


def changed_queries(before, after, names, *, min_change: float = 0.1) -> str:
    """Queries whose AP moves by more than ``min_change`` from ``before`` to ``after``."""
    moved = [
        f"{names[q]} {before[q]:.2f}->{after[q]:.2f}"
        for q in range(len(names))
        if abs(after[q] - before[q]) > min_change
    ]
    return ", ".join(moved) if moved else "none"


def evidence(scores, pair_inliers, gnd) -> str:
    """Median inliers of positive / negative split pairs and the AUCs."""
    positive = np.zeros(scores.shape, bool)
    ignored = np.zeros(scores.shape, bool)
    for q, entry in enumerate(gnd):
        positive[q, np.concatenate([entry["easy"], entry["hard"]]).astype(int)] = True
        ignored[q, np.asarray(entry["junk"], int)] = True
    negative = ~positive & ~ignored
    pos, neg = pair_inliers[positive], pair_inliers[negative]
    per_query = [
        common.auc(pair_inliers[q][positive[q]], pair_inliers[q][negative[q]])
        for q in range(len(gnd))
    ]
    per_query_cosine = [
        common.auc(scores[q][positive[q]], scores[q][negative[q]]) for q in range(len(gnd))
    ]
    return (
        f"inliers positives median {np.median(pos):.0f} (n={len(pos)}), "
        f"negatives median {np.median(neg):.0f} max {neg.max()} (n={len(neg)}), "
        f"{np.mean(neg >= MIN_INLIERS):.0%} of negatives 'verified' (>= {MIN_INLIERS}); "
        f"AUC inliers {common.auc(pos, neg):.3f} (mean per query {np.nanmean(per_query):.3f}), "
        f"AUC cosine {common.auc(scores[positive], scores[negative]):.3f} "
        f"(mean per query {np.nanmean(per_query_cosine):.3f})"
    )


def split_evidence(split: evaluate_lib.DatasetRanking, dsm_extractor, settings) -> str:
    """:func:`evidence` for the split protocol (plain DSM inliers of every pair)."""
    scores = split.query_descriptors @ split.database_descriptors.T  # (Q, N)
    _, pair_inliers = rerank_lib.dsm_rerank(
        scores,
        rerank_lib.local_features(split.query_paths, dsm_extractor, max_side=settings.dsm_max_side),
        rerank_lib.local_features(
            split.database_paths, dsm_extractor, max_side=settings.dsm_max_side
        ),
        error_threshold=settings.dsm_threshold_cells * dsm_extractor.feature_stride,
        max_correspondences=settings.dsm_max_correspondences,
        min_inliers=settings.dsm_min_inliers,
    )
    return evidence(scores, pair_inliers, split.gnd)


def main(argv=None):
    parser = common.table_parser(__doc__.split("\n")[0], quick="landmarks_mini, split only")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--checkpoint", help="a saved/fine-tuned model directory instead of --backbone's weights"
    )
    parser.add_argument("--dsm-max-side", type=int, default=512, help="DSM local features")
    parser.add_argument("--max-correspondences", type=int, default=1024)
    parser.add_argument("--threshold-cells", type=float, default=2.0)
    parser.add_argument("--no-loo", action="store_true", help="split protocol only")
    args = parser.parse_args(argv)
    sets = SETS[:1] if args.quick else args.sets
    loo = not (args.quick or args.no_loo)
    if args.checkpoint:
        model, variables = model_io.load_model(args.checkpoint)
        global_extractor = extraction.Extractor(
            model, variables, extraction.ExtractionSettings(max_side=args.max_side)
        )
        extract = common.extractor_extraction(global_extractor)
        dsm_features = DSMFeatureExtractor(model, variables, pad_multiple=64)
        args.backbone = f"{model.backbone} from {args.checkpoint}"
    else:
        extract = common.pretrained_extraction(args.max_side, args.backbone)
        dsm_features = DSMFeatureExtractor.pretrained(args.backbone, pad_multiple=64)
    local_extractor = common.MemoizedDSMExtractor(dsm_features)
    dsm = RerankSettings(
        graph_k=GRAPH_K,
        gamma=GAMMA,
        dsm_max_side=args.dsm_max_side,
        dsm_threshold_cells=args.threshold_cells,
        dsm_min_inliers=MIN_INLIERS,
        dsm_shortlist=None,
        dsm_max_correspondences=args.max_correspondences,
    )
    threshold = args.threshold_cells * local_extractor.feature_stride
    rows = table_rows(dsm)
    table: dict[str, list[float]] = {row.label: [] for row in rows}
    columns = []
    for name in sets:
        dataset = datasets.load_dataset(pathlib.Path(args.data) / name)
        paths, _ = datasets.leave_one_out(dataset)
        start = time.perf_counter()
        extract(paths, None)  # what every evaluate call in rerank_rows starts with
        areas = []
        for path in paths:
            image = local_extractor.load(path, max_side=args.dsm_max_side)
            local_extractor(image)  # kept for every re-ranking below
            areas.append(image.shape[0] * image.shape[1])
        # A random correspondence falls within the threshold of a hypothesis' prediction
        # with about this probability, so negatives get this fraction of their tentative
        # correspondences as inliers by chance (more after the best of P hypotheses + LO).
        chance = np.median(np.pi * threshold**2 / np.array(areas))
        extracted = time.perf_counter() - start
        start = time.perf_counter()
        rankings = common.rerank_rows(
            dataset, extract, rows, leave_one_out=loo, dsm_extractor=local_extractor
        )
        protocols = ("split", "leave_one_out") if loo else ("split",)
        columns += [f"{name} {'LOO' if p == 'leave_one_out' else p}" for p in protocols]
        for label, by_protocol in rankings.items():
            table[label] += [
                common.medium_map(by_protocol[p].ranks, by_protocol[p].gnd) for p in protocols
            ]
        reranked = time.perf_counter() - start
        split = rankings["V"]["split"]
        per_query = {
            label: common.per_query_ap(rankings[label]["split"].ranks, split.gnd)
            for label in ("V", "V+DSM")
        }
        print(
            f"{name}: {len(paths)} images, features in {extracted:.0f} s, verification + "
            f"diffusion in {reranked:.0f} s; "
            + split_evidence(split, local_extractor, dsm)
            + f"; the threshold disk covers {chance:.1%} of an image (median)"
            + "\n  split AP V->V+DSM changed by > 0.1: "
            + changed_queries(
                per_query["V"], per_query["V+DSM"], [p.stem for p in dataset.query_paths]
            ),
            flush=True,
        )
    print(
        f"\n{args.backbone}: V = GeM at max side {args.max_side}, no whitening; DSM at max "
        f"side {args.dsm_max_side}, threshold {threshold:.0f} px, min {MIN_INLIERS} inliers, "
        f"shortlist = whole database; diffusion graph k={GRAPH_K}. Revisited Medium mAP.\n"
    )
    print(common.markdown_table(["method", *columns], [[k, *v] for k, v in table.items()]))


if __name__ == "__main__":
    main()
