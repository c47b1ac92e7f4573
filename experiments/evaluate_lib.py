"""Evaluate global descriptors (and re-rankings) on a dataset in the revisitop layout.

:func:`evaluate` is the evaluator the CLI, the training loop, the benchmarks and the
notebook call: it takes any extraction function ``(paths, boxes) -> ExtractionResult``
(an :class:`~jaxretrieval.extraction.Extractor`, or :func:`cached_extraction` around
one) and returns a JSON-ready dict of metrics for each protocol and re-ranking.

Two protocols on the same folder:
  * ``split``: the dataset's own queries (cropped to their boxes) against its database,
    scored with the revisited Easy/Medium/Hard protocol;
  * ``leave_one_out``: every image queries all the others (itself ignored as junk), which
    uses all labels of a small set instead of one query per scene.
"""

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import rerank_lib
from jaxretrieval import cam_regions, evaluation, extraction, search
from jaxretrieval.data import datasets
from jaxretrieval.data import images as image_io
from jaxretrieval.spatial_verification import DSMFeatureExtractor

logger = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)
PROTOCOLS = ("split", "leave_one_out")
# (paths, boxes or None) -> descriptors of those images.
ExtractFn = Callable[[Sequence[str], Sequence[extraction.Box | None] | None], Any]


def cached_extraction(
    extractor: extraction.Extractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ExtractFn:
    """An :data:`ExtractFn` that reuses descriptors saved in ``cache_dir``.

    Each list of images gets its own file, named by the fingerprint of the model, its
    variables, the settings and the files (:func:`jaxretrieval.extraction.fingerprint`),
    so another model or changed images never read stale descriptors.
    """

    def extract(paths, boxes=None):
        paths = [os.fspath(p) for p in paths]
        cache_file = None
        if cache_dir is not None:
            key = extraction.fingerprint(paths, boxes, extractor.cache_key)
            cache_file = pathlib.Path(cache_dir) / f"descriptors_{key[:24]}.npz"
        return extraction.extract_cached(
            extractor, paths, boxes, cache_file=cache_file, progress=progress
        )

    return extract


@dataclasses.dataclass
class DatasetRanking:
    """Everything needed to score or show one protocol's retrieval results."""

    query_paths: list[str]
    database_paths: list[str]
    ranks: np.ndarray  # (Q, N) database indices, best first
    gnd: list[dict[str, Any]]
    failures: list[tuple[str, str]]
    query_descriptors: np.ndarray  # (Q, D), for re-ranking
    database_descriptors: np.ndarray  # (N, D)


def rank_split(dataset: datasets.RetrievalDataset, extract: ExtractFn) -> DatasetRanking:
    """Ranks the database for each query of the dataset's own split."""
    queries = extract([str(p) for p in dataset.query_paths], dataset.query_boxes)
    database = extract([str(p) for p in dataset.database_paths], None)
    return DatasetRanking(
        query_paths=[str(p) for p in dataset.query_paths],
        database_paths=[str(p) for p in dataset.database_paths],
        ranks=search.rank_database(queries.descriptors, database.descriptors),
        gnd=dataset.gnd,
        failures=queries.failures + database.failures,
        query_descriptors=queries.descriptors,
        database_descriptors=database.descriptors,
    )


def rank_leave_one_out(dataset: datasets.RetrievalDataset, extract: ExtractFn) -> DatasetRanking:
    """Ranks all images against all images; each query's own image is junk."""
    paths, gnd = datasets.leave_one_out(dataset)
    paths = [str(p) for p in paths]
    result = extract(paths, None)
    ranks = search.rank_database(result.descriptors, result.descriptors)
    return DatasetRanking(
        paths, paths, ranks, gnd, result.failures, result.descriptors, result.descriptors
    )


def rank_both_protocols(
    dataset: datasets.RetrievalDataset, extract: ExtractFn
) -> dict[str, DatasetRanking]:
    """Both protocols from one extraction of every image.

    Leave-one-out lists the queries first, then the database, so the split protocol reuses
    those rows; only queries whose box is smaller than their image are extracted again,
    cropped. Same result as :func:`rank_split` + :func:`rank_leave_one_out`, half the work.
    """
    loo = rank_leave_one_out(dataset, extract)
    num_queries = dataset.num_queries
    queries = loo.query_descriptors[:num_queries].copy()
    boxes = dataset.query_boxes
    to_crop = [
        i
        for i, box in enumerate(boxes)
        if box is not None and not _covers_image(box, dataset.query_paths[i])
    ]
    if to_crop:
        cropped = extract(
            [str(dataset.query_paths[i]) for i in to_crop], [boxes[i] for i in to_crop]
        )
        queries[to_crop] = cropped.descriptors
    database = loo.database_descriptors[num_queries:]
    split = DatasetRanking(
        query_paths=loo.query_paths[:num_queries],
        database_paths=loo.query_paths[num_queries:],
        ranks=search.rank_database(queries, database),
        gnd=dataset.gnd,
        failures=loo.failures,
        query_descriptors=queries,
        database_descriptors=database,
    )
    return {"split": split, "leave_one_out": loo}


def rank_protocols(
    dataset: datasets.RetrievalDataset,
    extract: ExtractFn,
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, DatasetRanking]:
    """Rankings for the requested protocols, sharing one extraction when both are asked."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"unknown protocols {sorted(unknown)}; use split and/or leave_one_out.")
    if set(protocols) == set(PROTOCOLS):
        both = rank_both_protocols(dataset, extract)
        return {protocol: both[protocol] for protocol in protocols}
    if "split" in protocols:
        return {"split": rank_split(dataset, extract)}
    return {"leave_one_out": rank_leave_one_out(dataset, extract)}


def _covers_image(box, path) -> bool:
    height, width = image_io.image_size(path)
    x1, y1, x2, y2 = box
    return x1 <= 0 and y1 <= 0 and x2 >= width and y2 >= height


def score(ranking: DatasetRanking) -> dict[str, Any]:
    """Revisited Easy/Medium/Hard metrics of a ranking, as plain floats."""
    return evaluation.revisited_evaluation(ranking.ranks, ranking.gnd, kappas=KAPPAS)


def evaluate(
    dataset: datasets.RetrievalDataset,
    extract: ExtractFn,
    *,
    protocols: Sequence[str] = ("split",),
    reranking: Sequence[str] = (),
    rerank_settings: rerank_lib.RerankSettings = rerank_lib.RerankSettings(),
    dsm_extractor: DSMFeatureExtractor | None = None,
    cam_extractor: cam_regions.CAMRegionExtractor | None = None,
    delf_extractor: Any = None,
    delf_settings: rerank_lib.DelfRerankSettings = rerank_lib.DelfRerankSettings(),
) -> tuple[dict[str, Any], dict[str, DatasetRanking]]:
    """Metrics of every protocol, and of every protocol re-ranked by each method.

    Args:
      dataset: A revisitop-layout dataset.
      extract: ``(paths, boxes) -> ExtractionResult`` (e.g. an Extractor, or
        :func:`cached_extraction`).
      protocols: ``"split"`` and/or ``"leave_one_out"``.
      reranking: Methods of :data:`experiments.rerank_lib.METHODS` applied to each
        protocol's ranking (``"none"`` is ignored); DSM crops the split's queries to
        their boxes as the global descriptors are; leave-one-out re-ranking keeps each
        query out of its own neighbours, seeds and shortlist
        (:func:`experiments.rerank_lib.rerank_leave_one_out`).
      rerank_settings: Their parameters (recorded in the output).
      dsm_extractor: Local features for ``dsm`` and ``dsm+diffusion``.
      cam_extractor: CAM regions for ``cam-regions`` (the same model as ``extract``).
      delf_extractor: A :class:`jaxretrieval.local_features.DelfExtractor` for ``delf``
        and ``delf+qe`` (:data:`experiments.rerank_lib.DELF_METHODS`).
      delf_settings: Their parameters (recorded in the output).

    Returns:
      ``(results, rankings)``: ``results`` maps ``"dataset"``, ``"rerank_settings"``,
      each protocol and each ``"<protocol>+<method>"`` to revisited metrics (JSON-ready);
      ``rankings`` maps the same keys to their :class:`DatasetRanking`.
    """
    methods = [m for m in reranking if m != "none"]
    known = (*rerank_lib.METHODS, *rerank_lib.DELF_METHODS)
    unknown = set(methods) - set(known)
    if unknown:
        raise ValueError(f"unknown re-ranking {sorted(unknown)}; choose from {', '.join(known)}.")
    rankings = dict(rank_protocols(dataset, extract, protocols))
    for method in methods:
        if method in rerank_lib.DELF_METHODS:
            if delf_extractor is None:
                raise ValueError(f"re-ranking {method!r} needs a DELF model (delf_extractor).")
            rerankers = (rerank_lib.delf_rerank_split, rerank_lib.delf_rerank_leave_one_out)
            kwargs = dict(settings=delf_settings, delf_extractor=delf_extractor)
        else:
            rerankers = (rerank_lib.rerank_split, rerank_lib.rerank_leave_one_out)
            kwargs = dict(
                settings=rerank_settings, dsm_extractor=dsm_extractor, cam_extractor=cam_extractor
            )
        rankings.update(_reranked_protocols(method, rankings, dataset, *rerankers, **kwargs))
    results: dict[str, Any] = {"dataset": dataset.name}
    if set(methods) - set(rerank_lib.DELF_METHODS):
        results["rerank_settings"] = dataclasses.asdict(rerank_settings)
    if set(methods) & set(rerank_lib.DELF_METHODS):
        results["delf_settings"] = dataclasses.asdict(delf_settings)
    for key, ranking in rankings.items():
        results[key] = score(ranking)
    return results, rankings


def _reranked_protocols(method, rankings, dataset, rerank_split, rerank_leave_one_out, **kwargs):
    """``<protocol>+<method>`` rankings: each protocol's ranking re-ranked by ``method``.

    ``rerank_split`` / ``rerank_leave_one_out`` are the global or the DELF pair of
    :mod:`experiments.rerank_lib`; ``kwargs`` (settings, extractors) go to both.
    """
    out = {}
    if "split" in rankings:
        split = rankings["split"]
        ranks = rerank_split(
            method,
            split.query_descriptors,
            split.database_descriptors,
            query_paths=split.query_paths,
            database_paths=split.database_paths,
            query_boxes=dataset.query_boxes,
            **kwargs,
        )
        out[f"split+{method}"] = dataclasses.replace(split, ranks=ranks)
    if "leave_one_out" in rankings:
        loo = rankings["leave_one_out"]
        ranks = rerank_leave_one_out(method, loo.query_descriptors, paths=loo.query_paths, **kwargs)
        out[f"leave_one_out+{method}"] = dataclasses.replace(loo, ranks=ranks)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of Medium mAP and mP@k; rows hold dataset, model, protocol metrics."""
    columns = ["dataset", "backbone", "pooling", "max side", "scales", "protocol"]
    columns += ["mAP", "mP@1", "mP@5", "mP@10"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        model = row["model"]
        for protocol in PROTOCOLS:
            if protocol not in row:
                continue
            medium = row[protocol]["medium"]
            mp = medium["mp@k"]
            lines.append(
                f"| {row['dataset']} | {model['backbone']} | {model['pooling']} "
                f"| {model['max_side']} | {len(model['scales'])} | {protocol} "
                f"| {medium['map']:.3f} | {mp[1]:.3f} | {mp[5]:.3f} | {mp[10]:.3f} |"
            )
    return "\n".join(lines)


def json_default(value: Any) -> Any:
    """JSON encoder hook for NumPy values in metric dicts."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
