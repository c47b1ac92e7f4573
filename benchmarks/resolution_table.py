"""mAP of MobileNetV2 + GeM at max side 224, 512 and 1024 on the real sets.

  .venv/bin/python -m benchmarks.resolution_table [--sizes 224 512 1024] [--quick]

Prints a Markdown table (revisited Medium protocol; these sets have no hard positives,
so Easy = Medium) for each set's own query split and for leave-one-out, plus the
extraction time per image. --quick runs landmarks_mini at 224 only.
"""

import argparse
import pathlib
import time

from benchmarks.common import DATA
from experiments import evaluate_lib
from jaxretrieval import extraction
from jaxretrieval.data import datasets
from jaxretrieval.retrieval_model import ModelConfig

SETS = ("landmarks_mini", "multiview_jpg_mini", "oxford_affine_seq")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.sets = [224], ["landmarks_mini"]
    lines = [
        "| dataset | max side | split mAP | split mP@1 | split mP@5 | LOO mAP | LOO mP@1 "
        "| LOO mP@5 | s/image |",
        "|" + " --- |" * 9,
    ]
    for size in args.sizes:
        extractor = extraction.Extractor.pretrained(
            ModelConfig(backbone=args.backbone, max_side=size)
        )
        extract = evaluate_lib.cached_extraction(extractor, progress=False)
        for name in args.sets:
            dataset = datasets.load_dataset(pathlib.Path(args.data) / name)
            start = time.perf_counter()
            rankings = evaluate_lib.rank_protocols(dataset, extract)
            seconds = (time.perf_counter() - start) / len(rankings["leave_one_out"].query_paths)
            split = evaluate_lib.score(rankings["split"])["medium"]
            loo = evaluate_lib.score(rankings["leave_one_out"])["medium"]
            lines.append(
                f"| {name} | {size} | {split['map']:.3f} | {split['mp@k'][1]:.3f} "
                f"| {split['mp@k'][5]:.3f} | {loo['map']:.3f} | {loo['mp@k'][1]:.3f} "
                f"| {loo['mp@k'][5]:.3f} | {seconds:.2f} |"
            )
            print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
