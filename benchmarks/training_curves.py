"""Training curves of several runs in one picture: relative loss and validation mAP.

  .venv/bin/python -m benchmarks.training_curves --out benchmarks/figures/training_curves.png \
      contrastive=checkpoints/smvs_contrastive triplet=checkpoints/smvs_triplet ...

Each run is an ``experiments.train`` work directory (its ``metrics.jsonl``). The losses
have different scales (a contrastive hinge, a triplet margin, 1 - AP, NRA's log terms),
so the left panel shows each loss divided by the mean of its first logged values; the
right panel shows the validation mAP on the held-out training scenes.
"""

import argparse
import json
import pathlib

import numpy as np

SMOOTHING = 3  # logged points per running mean (each point is already 10 steps)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (is {workdir} a training work directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(runs: dict[str, list[dict]], out: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, records in runs.items():
        train = [r for r in records if "loss" in r and "final" not in r]
        if train:
            steps = np.array([r["step"] for r in train])
            loss = np.array([r["loss"] for r in train])
            loss = loss / max(loss[:SMOOTHING].mean(), 1e-12)
            window = min(SMOOTHING, len(loss))
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1 :], smooth, label=name)
        evals = [r for r in records if "validation_map" in r and "final" not in r]
        if evals:
            ax_map.plot([r["step"] for r in evals], [r["validation_map"] for r in evals], "o-")
    ax_loss.set(xlabel="step", title="loss / its starting value (running mean)")
    ax_loss.legend()
    ax_map.set(xlabel="step", title="validation mAP (held-out smvs_train scenes)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("training_curves.png"))
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, workdir = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected NAME=WORKDIR, got {item!r}")
        runs[name] = read_metrics(pathlib.Path(workdir))
    print(plot(runs, args.out))


if __name__ == "__main__":
    main()
