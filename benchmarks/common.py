"""What several benchmark scripts share: data location, metrics, geometry, tables, caching.

The real data sets live in ``$JAXRETRIEVAL_SHARED_DATA`` (default ``<repo>/../shared/data``,
as in tests/conftest.py). Re-ranking tables go through experiments' libraries
(:func:`rerank_rows`), so a benchmark measures the code the CLIs run.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from experiments import evaluate_lib, rerank_lib
from jaxretrieval import evaluation, extraction, model_io
from jaxretrieval.data import datasets
from jaxretrieval.data import images as image_io
from jaxretrieval.retrieval_model import ModelConfig
from jaxretrieval.spatial_verification import (
    DSMFeatureExtractor,
    DSMSettings,
    LocalFeatures,
    activation_local_features,
    distinct_inliers,
    verify_shortlist,
)

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


def write_json(path: str | None, results: dict[str, Any]) -> None:
    """``results`` as JSON at ``path`` (a table's ``--json``), and a line saying so."""
    if path:
        pathlib.Path(path).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {path}")


# ------------------------------------------------------------------- shared computation


def pretrained_extraction(max_side: int, backbone: str = "mobilenet_v2") -> evaluate_lib.ExtractFn:
    """GeM descriptors of the backbone's ImageNet weights, each list extracted once."""
    extractor = extraction.Extractor.pretrained(ModelConfig(backbone=backbone, max_side=max_side))
    return extractor_extraction(extractor)


def extractor_extraction(extractor: extraction.Extractor) -> evaluate_lib.ExtractFn:
    """``extractor``'s descriptors (any model, e.g. a checkpoint's), each list extracted once."""
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
        self._features: dict[tuple[tuple[int, ...], bytes, bool], LocalFeatures] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.extractor, name)  # load, check_size, feature_stride, ...

    @staticmethod
    def _key(image: np.ndarray, as_query: bool) -> tuple[tuple[int, ...], bytes, bool]:
        # The role is part of the key: the published settings select query and database
        # features differently (DSMFeatureExtractor.__call__).
        return image.shape, hashlib.blake2b(image.tobytes(), digest_size=16).digest(), as_query

    def __call__(self, image: np.ndarray, *, as_query: bool = False) -> LocalFeatures:
        key = self._key(image, as_query)
        if key not in self._features:
            self._features[key] = self.extractor(image, as_query=as_query)
        return self._features[key]

    def query_and_database_features(self, image: np.ndarray) -> tuple[LocalFeatures, LocalFeatures]:
        """Both roles (leave-one-out), one pass when either is missing; shares the split's."""
        keys = self._key(image, True), self._key(image, False)
        if any(key not in self._features for key in keys):
            roles = self.extractor.query_and_database_features(image)
            self._features.update(zip(keys, roles, strict=True))
        return self._features[keys[0]], self._features[keys[1]]


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


# --------------------------------------------------- DSM features of several settings


def digest(*parts: Any) -> str:
    """A short hex digest of the parts' text (cache file names)."""
    return hashlib.blake2b(
        "\n".join(str(part) for part in parts).encode(), digest_size=16
    ).hexdigest()


class DSMFeatureCache:
    """DSM features of images under several :class:`DSMSettings`, one backbone pass each.

    The backbone's activation maps of an image (its scales: the same for every variant)
    are computed once and every variant's features, query and database role, are
    selected from them (:func:`~jaxretrieval.spatial_verification.activation_local_features`,
    what :class:`DSMFeatureExtractor` runs). With ``cache_dir``, each image's features go
    to one ``.npz`` file there, named by the model (weights, layer, padding, scales) and
    the decoded pixels (so a cropped query is another image), and hold an entry per
    variant (named by its settings) and role; an interrupted table resumes, and a new
    variant adds its entries to the existing files after one more pass.

    :meth:`view` gives one variant as a :class:`DSMFeatureExtractor` stand-in that
    :mod:`experiments.rerank_lib` accepts (``load``, ``check_size``, ``feature_stride``,
    ``scales``, ``settings``, ``__call__``, ``query_and_database_features``).

    Args:
      model: The model whose backbone gives the activations.
      variables: Its variables.
      variants: Settings by name; all with the same scales.
      pad_multiple: As :class:`DSMFeatureExtractor` (None: every image at its own size).
      cache_dir: Folder of the per-image files; None keeps them in memory only.
    """

    def __init__(
        self,
        model: ModelConfig,
        variables: dict[str, Any],
        variants: dict[str, DSMSettings],
        *,
        pad_multiple: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not variants:
            raise ValueError("DSMFeatureCache needs at least one variant.")
        scales = {settings.scales for settings in variants.values()}
        if len(scales) != 1:
            raise ValueError(f"every variant must use the same scales, found {sorted(scales)}.")
        first = next(iter(variants.values()))
        self.extractor = DSMFeatureExtractor(
            model, variables, pad_multiple=pad_multiple, settings=first
        )
        self.variants = dict(variants)
        self.cache_dir = None if cache_dir is None else pathlib.Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        backbone = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
        self._model_key = digest(
            model.backbone,
            self.extractor.layer,
            pad_multiple,
            first.scales,
            model_io.variables_digest(backbone),
        )
        self._variant_keys = {name: digest(repr(s))[:12] for name, s in variants.items()}
        self._features: dict[str, dict[str, np.ndarray]] = {}
        self.backbone_passes = 0  # images whose activations were computed (not cached)

    @property
    def feature_stride(self) -> int:
        """Image pixels per cell of the scale-1 map."""
        return self.extractor.feature_stride

    def load(self, path: str | os.PathLike, *, max_side: int | None) -> np.ndarray:
        """The image shrunk (never enlarged) to ``max_side``, as DSM reads it."""
        return self.extractor.load(path, max_side=max_side)

    def _entries(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Every variant's features of one image (computed, or read from the cache)."""
        key = digest(self._model_key, image.shape, hashlib.blake2b(image.tobytes()).hexdigest())
        entries = self._features.get(key)
        file = None if self.cache_dir is None else self.cache_dir / f"dsm_{key[:24]}.npz"
        if entries is None and file is not None and file.exists():
            with np.load(file) as stored:
                entries = {name: stored[name] for name in stored.files}
        entries = entries or {}
        wanted = {f"{v}/{role}" for v in self._variant_keys.values() for role in ("q", "db")}
        if not all(f"{w}/valid" in entries for w in wanted):
            self.extractor.check_size(image)
            maps = self.extractor.activation_maps(image)
            self.backbone_passes += 1
            for name, settings in self.variants.items():
                for role, as_query in (("q", True), ("db", False)):
                    selection = settings.selection(as_query=as_query)
                    features = activation_local_features(
                        maps, mser=settings.mser, **dataclasses.asdict(selection)
                    )
                    prefix = f"{self._variant_keys[name]}/{role}"
                    for field, value in zip(LocalFeatures._fields, features, strict=True):
                        if value is not None:
                            entries[f"{prefix}/{field}"] = np.asarray(value)
            if file is not None:
                partial = file.with_suffix(".partial.npz")
                np.savez(partial, **entries)
                os.replace(partial, file)
        self._features[key] = entries
        return entries

    def features(self, image: np.ndarray, *, variant: str, as_query: bool) -> LocalFeatures:
        """One image's features of one variant, as a query or as a database image."""
        prefix = f"{self._variant_keys[variant]}/{'q' if as_query else 'db'}"
        entries = self._entries(image)
        return LocalFeatures(*(entries.get(f"{prefix}/{field}") for field in LocalFeatures._fields))

    def view(self, variant: str) -> "DSMFeatureView":
        """One variant as a :class:`DSMFeatureExtractor` stand-in (for rerank_lib)."""
        if variant not in self.variants:
            raise KeyError(f"unknown DSM variant {variant!r}; known: {sorted(self.variants)}")
        return DSMFeatureView(self, variant)


@dataclasses.dataclass(frozen=True)
class DSMFeatureView:
    """One variant of a :class:`DSMFeatureCache`, with :class:`DSMFeatureExtractor`'s calls."""

    cache: DSMFeatureCache
    variant: str

    @property
    def settings(self) -> DSMSettings:
        """The variant's settings."""
        return self.cache.variants[self.variant]

    @property
    def scales(self) -> tuple[float, ...]:
        """Image scales of the activation maps."""
        return self.settings.scales

    @property
    def feature_stride(self) -> int:
        """Image pixels per cell of the scale-1 map."""
        return self.cache.feature_stride

    def load(self, path: str | os.PathLike, *, max_side: int | None) -> np.ndarray:
        """As :meth:`DSMFeatureExtractor.load`."""
        return self.cache.load(path, max_side=max_side)

    def check_size(self, image: np.ndarray, *, name: str = "image") -> None:
        """As :meth:`DSMFeatureExtractor.check_size`."""
        self.cache.extractor.check_size(image, name=name)

    def __call__(self, image: np.ndarray, *, as_query: bool = False) -> LocalFeatures:
        """As :meth:`DSMFeatureExtractor.__call__`."""
        return self.cache.features(image, variant=self.variant, as_query=as_query)

    def query_and_database_features(self, image: np.ndarray) -> tuple[LocalFeatures, LocalFeatures]:
        """As :meth:`DSMFeatureExtractor.query_and_database_features`."""
        return self(image, as_query=True), self(image, as_query=False)


@functools.cache
def _jitted_shortlist_counts(max_correspondences: int, num_scales: int | None):
    def counts(query, shortlist, threshold):
        result, matches = verify_shortlist(
            query,
            shortlist,
            max_correspondences=max_correspondences,
            error_threshold=threshold,
            num_scales=num_scales,
        )
        num_a, num_b = query.means.shape[0], shortlist.means.shape[1]
        distinct = jax.vmap(
            lambda r, m: distinct_inliers(r, m, num_features_a=num_a, num_features_b=num_b)
        )(result, matches)
        return result.num_inliers, distinct

    return jax.jit(counts)


def shortlist_counts(
    query: LocalFeatures,
    shortlist: LocalFeatures,
    *,
    error_threshold: float,
    max_correspondences: int,
    num_scales: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inliers, distinct inliers)``, each ``(L,)``, of one query against L images.

    One verification (:func:`~jaxretrieval.spatial_verification.verify_shortlist`, the
    defaults of :func:`experiments.rerank_lib.dsm_rerank` for everything not given) gives
    both counts, so re-rankings by either share it.
    """
    counts = _jitted_shortlist_counts(max_correspondences, num_scales)
    inliers, distinct = counts(query, shortlist, np.float32(error_threshold))
    return np.asarray(inliers), np.asarray(distinct)


# ------------------------------------------------------------------------------ figures


def plot_pair_histograms(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    title: str,
    positive_label: str = "same scene",
    negative_label: str = "different scene",
) -> None:
    """Histograms of a pair score (e.g. DSM inliers) for positive vs negative pairs.

    The DSM poster's figure; one panel per ``(score name, positives, negatives)``, each
    titled with the AUC (:func:`auc`). Writes a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (name, positives, negatives) in zip(axes[0], panels, strict=True):
        positives, negatives = np.asarray(positives), np.asarray(negatives)
        both = np.concatenate([positives, negatives])
        if np.issubdtype(both.dtype, np.integer):  # counts: whole bins from 0
            bins = np.linspace(0, both.max(initial=0) + 1, 31)
        else:
            bins = np.linspace(both.min(initial=0), both.max(initial=1), 31)
        axis.hist(
            negatives,
            bins=bins,
            density=True,
            alpha=0.6,
            label=f"{negative_label} ({len(negatives)})",
        )
        axis.hist(
            positives,
            bins=bins,
            density=True,
            alpha=0.6,
            label=f"{positive_label} ({len(positives)})",
        )
        axis.set_xlabel(name)
        axis.set_ylabel("fraction of pairs")
        axis.set_title(f"AUC {auc(positives, negatives):.3f}")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
