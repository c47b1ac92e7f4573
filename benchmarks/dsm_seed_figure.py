"""One picture of the DSM seed table: what re-ranking does per set, and why.

  python -m benchmarks.dsm_seed_figure --json table.json \
      --out benchmarks/figures/dsm_seed_summary.png

Reads the JSON(s) `benchmarks.dsm_seed_table --json` writes (one per call, or one with
every set; later files win for a (model, set) pair) and draws two panels per model and
set: split Medium mAP of the rows that tell the story (V, QE, the seed's diffusion,
published DSM with and without the minimum of distinct inliers, DSM+D), and how well each
pair score separates same-scene from different-scene pairs (AUC over every leave-one-out
pair the published verifier saw): DSM inliers, distinct inliers, and the global cosine.
"""

import argparse
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from benchmarks import dsm_seed_table

# (legend, row label or prefix, the seed's ROxford row): the rows shown, in order.
MAP_ROWS = (
    ("V", "V", "V"),
    ("V+DBA+αQE", "V+DBA+αQE", None),
    ("V+D (seed)", "V+D (seed", "V+D"),
    ("V+DSM (published)", "V+DSM (published)", "V+DSM"),
    ("V+DSM (published, ≥ m distinct)", "V+DSM (fix: published, >=", None),
    ("V+DSM+D (published)", "V+DSM+D (published)", "V+DSM+D"),
)
# (legend, score) of the pairs the published verifier saw.
AUC_SCORES = (
    ("DSM inliers (published)", "inliers"),
    ("DSM distinct inliers (published)", "distinct"),
    ("global cosine", "cosine"),
)
SHORT_BACKBONE = {"vgg16": "VGG16", "mobilenet_v2": "MNv2"}


def _row(metrics: dict, label_or_prefix: str) -> dict | None:
    if label_or_prefix in metrics:
        return metrics[label_or_prefix]
    # A prefix names rows whose label carries a value (m, the seed's graph settings).
    return next((v for label, v in metrics.items() if label.startswith(label_or_prefix)), None)


def summary(outputs: Sequence[dict]) -> list[dict]:
    """One entry per (model, set): its name, split mAPs of MAP_ROWS and LOO AUCs.

    Sorted by model, then set; the seed's published ROxford Medium row comes last. Missing
    rows or protocols are NaN, so a partial table still draws.
    """
    merged: dict[tuple[str, str], dict] = {}
    for output in outputs:
        for backbone, model in output["models"].items():
            for name, result in model["sets"].items():
                merged[(backbone, name)] = result
    if not merged:
        raise ValueError("the JSON holds no (model, set) results")
    entries = []
    for (backbone, name), result in sorted(merged.items(), key=_order):
        metrics = result["protocols"].get("split", {})
        maps = []
        for _, label, _ in MAP_ROWS:
            row = _row(metrics, label)
            maps.append(np.nan if row is None else row["map"])
        evidence = result.get("evidence", {}).get("leave_one_out", {}).get("published")
        aucs = []
        for _, kind in AUC_SCORES:
            if evidence is None:
                aucs.append(np.nan)
            elif kind == "cosine":
                aucs.append(evidence["cosine_auc_same_pairs"])
            else:
                aucs.append(evidence[kind]["auc"])
        label = f"{SHORT_BACKBONE.get(backbone, backbone)}\n{name.replace('_', ' ')}"
        entries.append({"label": label, "map": maps, "auc": aucs})
    seed = outputs[-1].get("seed_roxford_medium", {})
    entries.append({
        "label": "seed, VGG16\nROxford M",
        "map": [seed[r] / 100 if r in seed else np.nan for _, _, r in MAP_ROWS],
        "auc": [np.nan] * len(AUC_SCORES),
    })  # fmt: skip
    return entries


def _order(item) -> tuple:
    (backbone, name), _ = item
    backbones, sets = tuple(SHORT_BACKBONE), dsm_seed_table.SETS
    return (
        backbones.index(backbone) if backbone in backbones else len(backbones),
        sets.index(name) if name in sets else len(sets),
        name,
    )


def plot_summary(path: str | os.PathLike, entries: Sequence[dict]) -> None:
    """Grouped bars: split mAP of MAP_ROWS (top) and LOO pair AUCs (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(entries))
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(10.0, 1.5 * len(entries) + 5), 7.5), sharex=True
    )
    for axis, key, names, title in (
        (top, "map", [n for n, _, _ in MAP_ROWS], "split Medium mAP"),
        (bottom, "auc", [n for n, _ in AUC_SCORES], "same- vs different-scene pair AUC (LOO)"),
    ):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [entry[key][i] for entry in entries]
            axis.bar(positions + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel(title)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    bottom.set_ylim(0.4, 1.02)
    for position, entry in zip(positions, entries, strict=True):
        if np.all(np.isnan(entry["auc"])):
            bottom.text(position, 0.7, "not\npublished", ha="center", fontsize=8, color="grey")
    bottom.set_xticks(positions, [entry["label"] for entry in entries], fontsize=8)
    top.set_title("DSM seed's setting (1024 px, 3 scales, GeM + Lw): re-ranking and its evidence")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", nargs="+", required=True, help="dsm_seed_table JSON files")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    outputs = []
    for name in args.json:
        try:
            outputs.append(json.loads(pathlib.Path(name).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--json {name}: {error}")
    try:
        entries = summary(outputs)
    except (KeyError, ValueError) as error:
        parser.error(f"--json: not a dsm_seed_table JSON ({error!r})")
    plot_summary(args.out, entries)
    print(f"wrote {args.out} ({len(entries)} model/set pairs)")
    return entries


if __name__ == "__main__":
    main()
