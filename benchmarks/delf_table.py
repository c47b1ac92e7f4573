r"""DELF (Noh et al., ICCV17) on the real photo sets: the seed's ablation, checks and costs.

  .venv/bin/python -m benchmarks.delf_table --delf checkpoints/delf_mobilenet_v2 \
      --delf-imagenet checkpoints/delf_imagenet --json delf.json \
      --figure benchmarks/figures/delf_attention.png
  .venv/bin/python -m benchmarks.delf_table --quick       # landmarks_mini, tiny images

Four DELF models, the seed's 2x2 ablation (attention x fine-tuning), all on MobileNetV2's
stage3 map (stride 16, 96 channels, DELF's PCA to 40 dimensions when the model has one):

* ImageNet, feature norm: the ImageNet backbone, keypoints by descriptor L2 norm, no PCA;
* ImageNet + attention: the attention head trained on the frozen ImageNet backbone
  (experiments/configs/delf_attention.py with ``delf.attention_on_imagenet``), ``--delf-imagenet``;
* fine-tuned, feature norm: stage 1 (experiments/configs/delf_descriptor.py) with
  keypoints by feature norm (``--delf`` read with ``keypoint_score="l2_norm"``);
* fine-tuned + attention: stages 1 and 2, ``--delf``.

Rows per set (revisited Medium mAP of each set's query split; ``--protocols split
leave_one_out`` adds leave-one-out, 4x the verification time): V, the
global ranking (ImageNet MobileNetV2 + GeM at ``--max-side``, no whitening); V+DSM, its
top ``--shortlist`` re-ordered by DSM inliers (the library's default DSM settings, 512 px);
and for each DELF model V+DELF (the same shortlist re-ordered by DELF inliers, RANSAC on
point triples, :func:`experiments.delf_lib.evaluate_delf`) and V+DELF+QE (the seed's best
row: alpha-QE over the verified images). The training scenes (smvs_train) are disjoint
from every set; every DELF setting is the library's default (chosen on the Oxford affine
pairs and the authors' values), nothing is tuned on these sets.

Also: DELF matching of every pair with a true homography (graf, the Oxford affine
sequences, EVD) for the fine-tuned + attention model and the ImageNet one, the OpenCV box
pair against SIFT + RANSAC, bytes and seconds per image of DELF features against DSM
features, and (``--figure``) the keypoint-score maps of both attention models and of the
feature norm over real photos.
"""

import dataclasses
import pathlib
import time

import numpy as np

from benchmarks import common
from experiments import delf_lib, evaluate_lib, rerank_lib
from jaxretrieval import extraction
from jaxretrieval.data import datasets
from jaxretrieval.local_features import DelfExtractor, DelfSettings
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import DSMFeatureExtractor, local_features_nbytes

SETS = ("smvs_eval", "poznan_buildings", "landmarks_mini", "multiview_jpg_mini")
# Photos of the attention figure: a building and a DVD cover of smvs_eval, a Poznan
# building among people and sky, a landmarks_mini facade.
FIGURE_IMAGES = (
    "smvs_eval/images/lm051_query.jpg",
    "smvs_eval/images/dvd051_droid.jpg",
    "poznan_buildings/images/baltyk__13285770_poznan--baltyk.jpg",
    "landmarks_mini/images/london_bridge_19481797_2295892421.jpg",
)


def parse_args(argv=None):
    parser = common.table_parser(__doc__, quick="landmarks_mini, tiny images, few hypotheses")
    parser.add_argument("--delf", default=None, help="DELF model of both stages (+ PCA)")
    parser.add_argument("--delf-imagenet", default=None, help="attention on the ImageNet backbone")
    parser.add_argument("--sets", nargs="+", default=None, help=f"default: {' '.join(SETS)}")
    parser.add_argument("--shortlist", type=int, default=100, help="images re-ranked per query")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--figure", default=None, help="PNG of the keypoint-score maps")
    parser.add_argument("--skip-checks", action="store_true", help="only the retrieval table")
    parser.add_argument(
        "--protocols",
        nargs="+",
        default=["split"],
        choices=["split", "leave_one_out"],
        help="leave-one-out verifies every image's shortlist (4 s per query on 2 cores)",
    )
    return parser.parse_args(argv)


def delf_models(args, settings: DelfSettings) -> dict[str, DelfExtractor]:
    """The ablation's DELF extractors that the given checkpoints allow, by row label."""
    models = {"ImageNet, feature norm": DelfExtractor.pretrained(settings=settings)}
    if args.delf_imagenet:
        models["ImageNet + attention"] = DelfExtractor.from_checkpoint(args.delf_imagenet, settings)
    if args.delf:
        norm = dataclasses.replace(settings, keypoint_score="l2_norm")
        models["fine-tuned, feature norm"] = DelfExtractor.from_checkpoint(args.delf, norm)
        models["fine-tuned + attention"] = DelfExtractor.from_checkpoint(args.delf, settings)
    return models


def dsm_bytes_and_seconds(dsm_extractor, paths, max_side: int) -> tuple[float, float]:
    """Mean bytes and host+device seconds per image of DSM features (as a database image)."""
    sizes, tick = [], time.perf_counter()
    for path in paths:
        sizes.append(
            local_features_nbytes(dsm_extractor(dsm_extractor.load(path, max_side=max_side)))
        )
    return float(np.mean(sizes)), (time.perf_counter() - tick) / len(paths)


def retrieval_table(args, models, delf_settings, rerank) -> tuple[str, dict]:
    data = pathlib.Path(args.data)
    sets = args.sets or (["landmarks_mini"] if args.quick else list(SETS))
    protocols = ("split",) if args.quick else tuple(args.protocols)
    global_extractor = extraction.Extractor.pretrained(ModelConfig(max_side=args.max_side))
    dsm_settings = rerank_lib.RerankSettings(
        dsm_shortlist=args.shortlist, dsm_max_side=192 if args.quick else 512
    )
    dsm_extractor = common.MemoizedDSMExtractor(DSMFeatureExtractor.pretrained(pad_multiple=64))
    results: dict = {"sets": {}, "delf_settings": dataclasses.asdict(delf_settings)}
    labels = (
        ["V", "V+DSM"] + [f"V+DELF ({m})" for m in models] + [f"V+DELF+QE ({m})" for m in models]
    )
    columns = {label: [] for label in labels}
    header = ["method"]
    for name in sets:
        dataset = datasets.load_dataset(data / name)
        extract = common.extractor_extraction(global_extractor)
        rows = [common.RerankRow("V", "none"), common.RerankRow("V+DSM", "dsm", dsm_settings)]
        rankings = common.rerank_rows(
            dataset,
            extract,
            rows,
            leave_one_out="leave_one_out" in protocols,
            dsm_extractor=dsm_extractor,
        )
        per_set = {"V": {}, "V+DSM": {}}
        for label in ("V", "V+DSM"):
            for protocol in protocols:
                per_set[label][protocol] = evaluate_lib.score(rankings[label][protocol])
        for model_name, delf in models.items():
            tick = time.perf_counter()
            out = delf_lib.evaluate_delf(
                dataset, extract, delf, protocols=protocols, settings=rerank
            )
            per_set[model_name] = {k: v for k, v in out.items() if not k.endswith("_inliers")}
            for method, label in (("delf", "V+DELF"), ("delf+qe", "V+DELF+QE")):
                per_set[f"{label} ({model_name})"] = {
                    protocol: out[f"{protocol}+{method}"] for protocol in protocols
                }
            seconds = time.perf_counter() - tick
            print(f"{name} {model_name} ({seconds:.0f} s): {out['delf_features']}", flush=True)
        results["sets"][name] = per_set
        for protocol in protocols:
            header.append(f"{name} {'split' if protocol == 'split' else 'LOO'}")
            for label in labels:
                columns[label].append(per_set[label][protocol]["medium"]["map"])
        print(f"{name} done", flush=True)
    table = common.markdown_table(header, [[label, *columns[label]] for label in labels])
    costs = ["| features | keypoints per image | bytes per image | seconds per image |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    last = results["sets"][sets[0]]
    for model_name in models:
        facts = last[model_name]["delf_features"]
        costs.append(
            f"| DELF ({model_name}) | {facts['keypoints_per_image']:.0f} | "
            f"{facts['bytes_per_image']:.0f} | {facts['seconds_per_image']:.2f} |"
        )
    sample = datasets.load_dataset(data / sets[0]).database_paths[:20]
    dsm_bytes, dsm_seconds = dsm_bytes_and_seconds(  # unmemoized: the memo would time nothing
        DSMFeatureExtractor.pretrained(pad_multiple=64), sample, dsm_settings.dsm_max_side
    )
    costs.append(
        f"| DSM ({dsm_settings.dsm_max_side} px, 3 scales) | - | "
        f"{dsm_bytes:.0f} | {dsm_seconds:.2f} |"
    )
    results["dsm_features"] = {"bytes_per_image": dsm_bytes, "seconds_per_image": dsm_seconds}
    return table + "\n\n" + "\n".join(costs), results


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        delf_settings = DelfSettings(max_side=96, scales=(1.0,), max_features=64)
        rerank = rerank_lib.DelfRerankSettings(num_hypotheses=32, shortlist=args.shortlist)
    else:
        delf_settings = DelfSettings()
        rerank = rerank_lib.DelfRerankSettings(shortlist=args.shortlist)
    models = delf_models(args, delf_settings)
    table, results = retrieval_table(args, models, delf_settings, rerank)
    print(table)
    if not args.skip_checks:
        data = pathlib.Path(args.data)
        checked = {
            k: m
            for k, m in models.items()
            if k in ("ImageNet, feature norm", "fine-tuned + attention")
        }
        results["homographies"] = {}
        for name, delf in checked.items():
            print(f"\nDELF matching against the true homographies, {name}:")
            print(delf_lib.homography_table(delf, data))
            box = delf_lib.box_pair_check(delf, data / "opencv_box_pair")
            print(
                f"box pair ({name}): {box['num_inliers']} DELF inliers of "
                f"{box['num_tentative']}, SIFT {box['sift_inliers']}; corners "
                f"{np.round(box['corner_errors'], 1).tolist()} px from SIFT's (mean "
                f"{box['corner_errors'].mean():.1f})"
            )
            results["homographies"][name] = {"box_pair": box}
    if args.figure:
        paths = [str(pathlib.Path(args.data) / p) for p in FIGURE_IMAGES]
        for name, delf in models.items():
            out = pathlib.Path(args.figure)
            slug = name.replace(" + ", "_").replace(", ", "_").replace(" ", "_").replace("-", "")
            print(
                "wrote",
                delf_lib.save_attention_maps(delf, paths, out.with_stem(f"{out.stem}_{slug}")),
            )
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
