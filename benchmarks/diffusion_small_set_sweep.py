"""Sweep of diffusion graph k, seeds and alpha on the small real sets (split protocol).

  .venv/bin/python -m benchmarks.diffusion_small_set_sweep [--quick]

Evidence for the README: with 1-12 images per scene, the paper's 10 seeds are mostly
wrong scenes, and alpha 0.99 on a small connected graph ranks by node degree. MobileNetV2 +
GeM at max side 224; each cell is the revisited Medium mAP of ``evaluate --rerank
diffusion`` with that graph k, number of seeds and alpha (gamma 3). --quick: landmarks_mini,
graph k = 5 only.
"""

import itertools
import pathlib

from benchmarks import common
from experiments.rerank_lib import RerankSettings
from jaxretrieval.data import datasets

SETS = ("landmarks_mini", "multiview_jpg_mini")
GRAPH_KS = (3, 5, 10)
NUM_SEEDS = (1, 3)
ALPHAS = (0.5, 0.8, 0.9, 0.99)


def main(argv=None):
    parser = common.table_parser(__doc__, quick="landmarks_mini, graph k = 5")
    args = parser.parse_args(argv)
    extract = common.pretrained_extraction(args.max_side)
    sets = SETS[:1] if args.quick else SETS
    graph_ks = (5,) if args.quick else GRAPH_KS
    table = []
    for name in sets:
        dataset = datasets.load_dataset(pathlib.Path(args.data) / name)
        for graph_k, num_seeds in itertools.product(graph_ks, NUM_SEEDS):
            rows = [
                common.RerankRow(
                    f"α={alpha}",
                    "diffusion",
                    RerankSettings(
                        graph_k=graph_k, num_seeds=num_seeds, diffusion_alpha=alpha, gamma=3.0
                    ),
                )
                for alpha in ALPHAS
            ]
            rankings = common.rerank_rows(dataset, extract, rows, leave_one_out=False)
            cells = [
                common.medium_map(rankings[row.label]["split"].ranks, dataset.gnd) for row in rows
            ]
            table.append([name, graph_k, num_seeds, *cells])
            print(f"{name} k={graph_k} seeds={num_seeds}", *(f"{c:.3f}" for c in cells), flush=True)
    header = ["dataset", "graph k", "seeds", *(f"α={alpha}" for alpha in ALPHAS)]
    print()
    print(common.markdown_table(header, table))


if __name__ == "__main__":
    main()
