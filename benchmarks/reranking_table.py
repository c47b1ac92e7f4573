"""Query expansion and diffusion on the real photo sets (MobileNetV2 + GeM).

  .venv/bin/python -m benchmarks.reranking_table [--max-side 224] [--quick]

Rows: V (cosine ranking), V+AQE, V+alpha-QE, V+DBA+alpha-QE (QE k = 2, alpha = 3), and
V+D (diffusion, Iscen et al. CVPR17) with the paper's defaults capped by the database size
(graph k = min(50, N-1), 10 seeds, alpha 0.99, gamma 3) and with small-set settings (graph
k = 5, 3 seeds; and k = 5, 1 seed, alpha 0.9 -- the best of a sweep on these same sets, so
optimistic). Revisited Medium mAP for each set's own query split and for leave-one-out.

Every row is computed by experiments' libraries, as ``python -m experiments.evaluate
--rerank`` computes it: the split protocol by :func:`experiments.evaluate_lib.evaluate`
(queries cropped to their boxes), leave-one-out by
:func:`experiments.rerank_lib.rerank_leave_one_out`. In leave-one-out the query is a
database image: DBA and the diffusion graph include it, but it is never one of its own QE
neighbours or diffusion seeds (see experiments/rerank_lib.py). --quick: landmarks_mini only.
"""

import pathlib

from benchmarks import common
from experiments.rerank_lib import RerankSettings
from jaxretrieval.data import datasets

SETS = ("landmarks_mini", "multiview_jpg_mini")
QE = RerankSettings(qe_k=2, qe_alpha=3.0)
ROWS = (
    common.RerankRow("V", "none", QE),
    common.RerankRow("V+AQE", "aqe", QE),
    common.RerankRow("V+αQE", "alpha-qe", QE),
    common.RerankRow("V+DBA+αQE", "dba+alpha-qe", QE),
    common.RerankRow(
        "V+D (paper defaults)",
        "diffusion",
        RerankSettings(graph_k=50, num_seeds=10, diffusion_alpha=0.99, gamma=3.0),
    ),
    common.RerankRow(
        "V+D (k=5, 3 seeds)",
        "diffusion",
        RerankSettings(graph_k=5, num_seeds=3, diffusion_alpha=0.99, gamma=3.0),
    ),
    common.RerankRow(
        "V+D (k=5, 1 seed, α=0.9)",
        "diffusion",
        RerankSettings(graph_k=5, num_seeds=1, diffusion_alpha=0.9, gamma=3.0),
    ),
)


def main(argv=None):
    args = common.table_parser(__doc__, quick="landmarks_mini only").parse_args(argv)
    extract = common.pretrained_extraction(args.max_side)
    sets = SETS[:1] if args.quick else SETS
    table = {row.label: [] for row in ROWS}
    for name in sets:
        dataset = datasets.load_dataset(pathlib.Path(args.data) / name)
        rankings = common.rerank_rows(dataset, extract, ROWS)
        for label, by_protocol in rankings.items():
            table[label] += [
                common.medium_map(by_protocol[protocol].ranks, by_protocol[protocol].gnd)
                for protocol in ("split", "leave_one_out")
            ]
    header = ["method"] + [f"{s} {protocol}" for s in sets for protocol in ("split", "LOO")]
    print(common.markdown_table(header, [[label, *cells] for label, cells in table.items()]))


if __name__ == "__main__":
    main()
