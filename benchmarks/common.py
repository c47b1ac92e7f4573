"""What several benchmark scripts share: data location, metrics, geometry, tables, caching.

The real data sets live in ``$JAXRETRIEVAL_SHARED_DATA`` (default ``<repo>/../shared/data``,
as in tests/conftest.py). Re-ranking tables go through experiments' libraries
(:func:`rerank_rows`), so a benchmark measures the code the CLIs run.
"""

import argparse
import dataclasses
import hashlib
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import evaluate_lib, rerank_lib
from jaxretrieval import evaluation, extraction
from jaxretrieval.data import datasets
from jaxretrieval.data import images as image_io
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import DSMFeatureExtractor, LocalFeatures

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(
    os.environ.get("JAXRETRIEVAL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)


# ----------------------------------------------------------------------------- metrics


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) over all pairs, ties counted 1/2 (NaN if a side is empty)."""
    positives, negatives = np.asarray(positives), np.asarray(negatives)
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(greater + 0.5 * ties)


def medium_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]]) -> float:
    """Revisited Medium mAP of (Q, N) ranks."""
    return float(evaluation.revisited_evaluation(ranks, gnd)["medium"]["map"])


def per_query_ap(ranks: np.ndarray, gnd: Sequence[dict[str, Any]]) -> np.ndarray:
    """Medium AP of each query (NaN where a query has no positive)."""
    return np.asarray(evaluation.revisited_evaluation(ranks, gnd)["medium"]["aps"])


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last output."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


# ---------------------------------------------------------------------------- geometry


def map_homography(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(P, 2) points (x, y) mapped by a 3x3 homography."""
    points = np.asarray(points, np.float64)
    mapped = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ homography.T
    return mapped[:, :2] / mapped[:, 2:]


def map_affine(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(P, 2) points (x, y) mapped by a 2x3 affine map."""
    transform = np.asarray(transform, np.float64)
    return np.asarray(points, np.float64) @ transform[:, :2].T + transform[:, 2]


def load_homography(
    path: str | os.PathLike, *, scale_a: float = 1.0, scale_b: float = 1.0
) -> np.ndarray:
    """A ground-truth ``H1to*p`` file, as the map between the images resized by the scales.

    The file maps pixels of the original image a to the original image b; resizing a by
    ``scale_a`` and b by ``scale_b`` makes it ``S_b H S_a^-1``.
    """
    homography = np.loadtxt(path)
    return np.diag([scale_b, scale_b, 1.0]) @ homography @ np.diag([1 / scale_a, 1 / scale_a, 1])


def load_for_dsm(
    extractor: DSMFeatureExtractor, path: str | os.PathLike, max_side: int
) -> tuple[np.ndarray, float]:
    """``extractor.load`` (shrunk, never enlarged) and the scale from the original pixels."""
    image = extractor.load(path, max_side=max_side)
    return image, max(image.shape[:2]) / max(image_io.image_size(path))


# ------------------------------------------------------------------------------ tables


def table_parser(description: str, *, quick: str) -> argparse.ArgumentParser:
    """The arguments every retrieval table takes: --data, --max-side and --quick."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", default=str(DATA), help="folder of the data sets")
    parser.add_argument("--max-side", type=int, default=224, help="global descriptors")
    parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; float cells are printed with 3 decimals."""

    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------- shared computation


def pretrained_extraction(max_side: int, backbone: str = "mobilenet_v2") -> evaluate_lib.ExtractFn:
    """GeM descriptors of the backbone's ImageNet weights, each list extracted once."""
    extractor = extraction.Extractor.pretrained(ModelConfig(backbone=backbone, max_side=max_side))
    return memoized_extraction(evaluate_lib.cached_extraction(extractor, progress=False))


def memoized_extraction(extract: evaluate_lib.ExtractFn) -> evaluate_lib.ExtractFn:
    """An extraction function that extracts each (paths, boxes) list once per run."""
    results = {}

    def memoized(paths, boxes=None):
        key = (
            tuple(os.fspath(p) for p in paths),
            None if boxes is None else tuple(None if b is None else tuple(b) for b in boxes),
        )
        if key not in results:
            results[key] = extract(paths, boxes)
        return results[key]

    return memoized


class MemoizedDSMExtractor:
    """A :class:`DSMFeatureExtractor` that computes the features of each image once.

    Several re-rankings of one set (each ``evaluate``/``rerank_*`` call extracts its own
    features) then share them. Keyed on the decoded pixels, so the same image loaded for
    the split and for leave-one-out is a hit, and a cropped query is not.
    """

    def __init__(self, extractor: DSMFeatureExtractor):
        self.extractor = extractor
        self._features: dict[tuple[tuple[int, ...], bytes], LocalFeatures] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.extractor, name)  # load, check_size, feature_stride, ...

    def __call__(self, image: np.ndarray) -> LocalFeatures:
        key = (image.shape, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        if key not in self._features:
            self._features[key] = self.extractor(image)
        return self._features[key]


@dataclasses.dataclass(frozen=True)
class RerankRow:
    """One table row: a label, a re-ranking method and its settings."""

    label: str
    method: str
    settings: rerank_lib.RerankSettings = rerank_lib.RerankSettings()


def rerank_rows(
    dataset: datasets.RetrievalDataset,
    extract: evaluate_lib.ExtractFn,
    rows: Sequence[RerankRow],
    *,
    leave_one_out: bool = True,
    dsm_extractor: DSMFeatureExtractor | None = None,
) -> dict[str, dict[str, evaluate_lib.DatasetRanking]]:
    """Every row's ranking of the split protocol and (optionally) of leave-one-out.

    The split protocol goes through :func:`experiments.evaluate_lib.evaluate` (queries
    cropped to their boxes), one call per distinct settings; leave-one-out through
    :func:`experiments.rerank_lib.rerank_leave_one_out`. Wrap ``extract`` with
    :func:`memoized_extraction` and ``dsm_extractor`` with :class:`MemoizedDSMExtractor`
    to extract each image once: every call extracts ``extract(all images, None)`` (the
    leave-one-out list of :func:`jaxretrieval.data.datasets.leave_one_out`) and the
    queries whose box is smaller than the image.

    Returns:
      ``{row.label: {"split": ranking, "leave_one_out": ranking}}``.
    """
    out: dict[str, dict[str, evaluate_lib.DatasetRanking]] = {row.label: {} for row in rows}
    for settings in dict.fromkeys(row.settings for row in rows):
        group = [row for row in rows if row.settings == settings]
        _, rankings = evaluate_lib.evaluate(
            dataset,
            extract,
            protocols=evaluate_lib.PROTOCOLS,  # one extraction of every image serves both
            reranking=[row.method for row in group],
            rerank_settings=settings,
            dsm_extractor=dsm_extractor,
        )
        for row in group:
            key = "split" if row.method == "none" else f"split+{row.method}"
            out[row.label]["split"] = rankings[key]
            if leave_one_out:
                loo = rankings["leave_one_out"]
                ranks = rerank_lib.rerank_leave_one_out(
                    row.method,
                    loo.database_descriptors,
                    settings=settings,
                    paths=loo.database_paths,
                    dsm_extractor=dsm_extractor,
                )
                out[row.label]["leave_one_out"] = dataclasses.replace(loo, ranks=ranks)
    return out
