"""Evaluate global descriptors on a dataset folder in the revisitop layout.

  python -m experiments.evaluate --data-root ../shared/data/landmarks_mini
  python -m experiments.evaluate --data-root ~/data/roxford5k --max-side 1024 --json roxford.json
  python -m experiments.evaluate --data-root ../shared/data/smvs_eval --checkpoint checkpoints/NAME
  python -m experiments.evaluate --data-root ../shared/data/landmarks_mini --rerank alpha-qe dsm
  python -m experiments.evaluate --data-root ../shared/data/landmarks_mini --pooling cam \
      --max-side 512 --rerank cam-regions

A dataset folder holds gnd_<name>.pkl (imlist, qimlist, gnd with easy/hard/junk/bbx) and
its images in images/ or jpg/. Prints mAP and mP@1/5/10 for the Easy, Medium and Hard
protocols of Radenović et al. (CVPR 2018), for the dataset's own queries ("split") and,
with --leave-one-out, for every image querying all the others. --rerank adds each
protocol re-ranked by query expansion, diffusion, DSM spatial verification or CAM region
proposals (both use the same model's activations; cam-regions needs a backbone with a
classifier). The JSON (--json) records the model, the extraction
settings and every re-ranking parameter.
"""

import dataclasses
import json
import logging
import math
import pathlib

from experiments import cli, evaluate_lib, plotting, rerank_lib
from jaxretrieval.cam_regions import CAMRegionExtractor
from jaxretrieval.data import datasets
from jaxretrieval.spatial_verification import DSMFeatureExtractor, DSMSettings


def parse_args(argv=None):
    """Parses the command line."""
    parser = cli.make_parser("evaluate", __doc__)
    parser.add_argument("--data-root", required=True, help="dataset folder (revisitop layout)")
    parser.add_argument("--leave-one-out", action="store_true", help="also every-image queries")
    parser.add_argument("--cache-dir", default=None, help="reuse/save descriptors here")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    parser.add_argument("--grid", default=None, help="write a result-grid PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--rerank",
        nargs="+",
        default=["none"],
        choices=(*rerank_lib.METHODS, *rerank_lib.DELF_METHODS),
        help="re-rank each protocol's ranking: query expansion (aqe, alpha-qe, "
        "dba+alpha-qe), diffusion, DSM spatial verification (dsm), DSM-seeded diffusion, or "
        "CAM region re-ranking + QE (cam-regions: the top 100 by best CAM region, then QE "
        "with the top 10), or DELF local features (delf, delf+qe: see --delf-checkpoint); "
        "several may be given and each is scored",
    )
    parser.add_argument(
        "--delf-checkpoint",
        default=None,
        help="DELF model directory for --rerank delf / delf+qe (default: ImageNet "
        "MobileNetV2 stage3 features, keypoints by feature norm, no PCA)",
    )
    parser.add_argument(
        "--dsm-published",
        action="store_true",
        help="DSM with the authors' settings (DSMSettings.published: per-scale-pair "
        "verification, NMS 0.2 on database images, per-channel budgets, top 100)",
    )
    cli.add_model_args(parser)
    return parser.parse_args(argv)


def load_dataset(root: str) -> datasets.RetrievalDataset:
    """The dataset at ``root``, with a user's mistake turned into a :class:`cli.CLIError`."""
    if not pathlib.Path(root).is_dir():
        raise cli.CLIError(f"--data-root {root}: no such folder")
    try:
        return datasets.load_dataset(root)
    except (ValueError, TypeError, KeyError) as e:
        raise cli.CLIError(f"--data-root {root}: {e}") from e


def main(argv=None) -> dict:
    """Runs the evaluation and prints (and optionally saves) the metrics."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    dataset = load_dataset(args.data_root)
    if args.json:
        cli.check_output_file(args.json)
    extractor = cli.extractor_from_args(args)
    dsm_extractor = None
    rerank_settings = rerank_lib.RerankSettings()
    if {"dsm", "dsm+diffusion"} & set(args.rerank):
        dsm_settings = None
        if args.dsm_published:
            dsm_settings = DSMSettings.published(extractor.model.backbone)
            rerank_settings = rerank_lib.dsm_published_settings()
        dsm_extractor = DSMFeatureExtractor(
            extractor.model, extractor.variables, pad_multiple=64, settings=dsm_settings
        )
    delf_extractor = None
    if set(rerank_lib.DELF_METHODS) & set(args.rerank):
        from jaxretrieval.local_features import DelfExtractor

        if args.delf_checkpoint:
            delf_extractor = DelfExtractor.from_checkpoint(args.delf_checkpoint)
        else:
            delf_extractor = DelfExtractor.pretrained()
    cam_extractor = None
    if "cam-regions" in args.rerank:
        try:
            cam_extractor = CAMRegionExtractor(extractor.model, extractor.variables)
        except ValueError as e:
            raise cli.CLIError(f"--rerank cam-regions: {e}") from e
    protocols = ["split"] + (["leave_one_out"] if args.leave_one_out else [])
    results, rankings = evaluate_lib.evaluate(
        dataset,
        evaluate_lib.cached_extraction(
            extractor, cache_dir=args.cache_dir, progress=not args.quiet
        ),
        protocols=protocols,
        reranking=args.rerank,
        rerank_settings=rerank_settings,
        dsm_extractor=dsm_extractor,
        cam_extractor=cam_extractor,
        delf_extractor=delf_extractor,
    )
    results = {
        **results,
        "model": extractor.model.to_json_dict(),
        "extraction": dataclasses.asdict(extractor.settings),
        "checkpoint": args.checkpoint,
        "weights": args.weights,
    }
    failures = rankings["split"].failures
    for key, ranking in rankings.items():
        metrics = results[key]
        label = key.replace("+", ", re-ranked: ")
        print(f"\n{dataset.name} [{label}] {len(ranking.query_paths)} queries")
        for level in ("easy", "medium", "hard"):
            m = metrics[level]
            if math.isnan(m["map"]):
                print(f"  {level:6s}  (no queries with {level} positives)")
                continue
            mp = "  ".join(f"mP@{k} {m['mp@k'][k]:.3f}" for k in evaluate_lib.KAPPAS)
            print(f"  {level:6s}  mAP {m['map']:.3f}  {mp}")
    for path, reason in failures:
        print(f"skipped {path}: {reason}")
    if args.grid:
        split = rankings["split"]
        plotting.save_result_grid(
            split.query_paths, split.database_paths, split.ranks, args.grid, gnd=split.gnd
        )
        print(f"wrote {args.grid}")
    if args.json:
        path = pathlib.Path(args.json)
        path.write_text(json.dumps(results, indent=2, default=evaluate_lib.json_default))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    cli.run(main, prog="evaluate")
