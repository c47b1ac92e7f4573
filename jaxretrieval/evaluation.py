"""Retrieval evaluation: mAP and mP@k of the revisited Oxford/Paris protocol.

Host-side NumPy by design: evaluation reads integer rankings and ground-truth index lists of
varying length, which is bookkeeping rather than device compute.

The semantics are those of revisitop's ``compute_map`` (Radenović et al., CVPR 2018), with
one layout difference: ``ranks`` holds one query per **row**, shape ``(Q, K)``, where
revisitop takes columns, ``(N, Q)``. Pass ``revisitop_ranks.T`` to evaluate revisitop-style
arrays.

How it is computed. Only the positions of the few labelled images (positives and junk) in
each ranking matter, so each query's ranking is scattered into an inverse table (database
index -> position; one O(K) pass, which also detects repeated indices) and the labelled
images are looked up there. Everything after that (junk removal, AP, precision at k) works
on those O(#labelled) positions, vectorised across all queries at once. Small problems use
one (Q, N) int32 table; large ones reuse a single (N,) table for every query, so the extra
memory stays O(N) whatever Q is (70 x 1M int64 ranks: ~15 MB on top of the 560 MB input).

Truncated rankings (a top-K shortlist, ``K < N``) are evaluated as revisitop evaluates them:
a positive that is not in the shortlist is never retrieved. It still counts in the number of
positives (the AP's recall step), so it lowers AP, and it is ignored by precision at k.
revisitop raises on a query whose shortlist contains none of its positives (``max`` of an
empty array); here such a query gets AP 0 and precision 0 and counts in the mean.

Malformed input that revisitop would score silently raises here instead: a ranking row that
repeats an index, a positive listed twice (revisitop counts it twice in the number of
positives, so a perfect ranking scores below 1) and an image that is both positive and junk.
For well-formed input the results equal revisitop's to floating-point rounding (~1e-16).
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Float, Shaped

__all__ = ["compute_map", "revisited_evaluation", "PROTOCOLS"]

PROTOCOLS: tuple[str, ...] = ("easy", "medium", "hard")
"""Difficulty setups of the revisited protocol, in the paper's order."""

# The inverse table uses int32 entries; a generation offset (query counter * K) tells the
# current query's entries from stale ones, and the table is refilled when it would overflow.
_INT32_MAX = np.iinfo(np.int32).max
# Up to this many (query, database image) pairs, one (Q, N) int32 inverse table (<= 16 MiB)
# serves all queries and is read in one vectorised gather; above it, one (N,) table is
# reused query by query.
_SMALL_TABLE_SIZE = 1 << 22


def _check_ranks(
    ranks: Any, gnd: Sequence[Any], num_database: int | None
) -> tuple[np.ndarray, int]:
    """Validates the ranking array (one row per gnd entry); returns it and the database size."""
    # dtype=None: a large ranking keeps its integer dtype (no int64 copy).
    ranks = validation.index_array("ranks", ranks, axes="Q K", dtype=None)
    num_queries, length = ranks.shape
    if num_queries == 0 or length == 0:
        raise ValueError(f"ranks is empty (shape {ranks.shape}); need Q >= 1 and K >= 1.")
    if len(gnd) != num_queries:
        raise ValueError(
            f"gnd has {len(gnd)} entries but ranks has {num_queries} rows (queries); "
            f"ranks must be (Q, K) with one row per query (revisitop's (N, Q) needs .T)."
        )
    if num_database is None:
        num_database = length
    elif int(num_database) != num_database or num_database < length:
        raise ValueError(
            f"num_database must be an integer >= ranks.shape[1] = {length}, got {num_database}."
        )
    num_database = int(num_database)
    if num_database > _INT32_MAX:
        raise ValueError(f"num_database {num_database} exceeds the int32 range.")
    low, high = int(ranks.min()), int(ranks.max())
    if low < 0 or high >= num_database:
        bad = low if low < 0 else high
        hint = (
            " For a truncated shortlist (K < N) pass num_database=N."
            if num_database == length
            else ""
        )
        raise ValueError(
            f"ranks holds database index {bad}, outside [0, {num_database}) for a database of "
            f"{num_database} images.{hint}"
        )
    return ranks, num_database


def _check_kappas(kappas: Sequence[int]) -> np.ndarray:
    """Validates the cut-offs k of precision at k."""
    kappas_array = np.asarray(kappas)
    if kappas_array.ndim != 1:
        raise ValueError(f"kappas must be a flat sequence of integers, got {kappas!r}.")
    if kappas_array.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(kappas_array.dtype, np.integer) or np.any(kappas_array < 1):
        raise ValueError(f"kappas must be positive integers, got {kappas!r}.")
    return kappas_array.astype(np.int64)


def _is_integer(dtype: np.dtype) -> bool:
    return dtype != np.bool_ and np.issubdtype(dtype, np.integer)


def _index_lists(
    gnd: Sequence[Mapping[str, Any]], key: str, num_database: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flattens ``gnd[q][key]`` over queries into (indices, query ids), both int64."""
    lists = []
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise TypeError(f"gnd[{q}] must be a dict, got {type(entry).__name__}.")
        if key not in entry:
            raise ValueError(f"gnd[{q}] has no '{key}' list (keys: {sorted(entry)}).")
        lists.append(entry[key])
    # Fast path: one conversion of all lists at once; any doubt -> per-query checks below.
    try:
        counts = np.array([len(values) for values in lists], np.int64)
        indices = np.asarray(list(itertools.chain.from_iterable(lists)))
        fast = (
            indices.ndim == 1
            and indices.size == counts.sum()
            and (indices.size == 0 or _is_integer(indices.dtype))
        )
    except (TypeError, ValueError):
        fast = False
    if fast:
        indices = indices.astype(np.int64)
    else:
        arrays = [
            validation.index_array(f"gnd[{q}]['{key}']", values) for q, values in enumerate(lists)
        ]
        counts = np.array([a.size for a in arrays], np.int64)
        indices = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    query_ids = np.repeat(np.arange(len(lists), dtype=np.int64), counts)
    out_of_range = (indices < 0) | (indices >= num_database)
    if np.any(out_of_range):
        i = int(np.argmax(out_of_range))
        raise ValueError(
            f"gnd[{query_ids[i]}]['{key}'] holds index {indices[i]}, outside [0, {num_database}) "
            f"for a database of {num_database} images."
        )
    return indices, query_ids


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hash path is slower on these small int arrays)."""
    values = np.sort(values)
    if values.size == 0:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def _check_unique(
    lists: Mapping[str, tuple[np.ndarray, np.ndarray]], num_database: int, allow_repeats: str
) -> None:
    """Requires the named index lists to be disjoint per query, each without repeats.

    A repeated positive would be counted twice in the number of positives (revisitop uses
    ``len(ok)``) and make a perfect ranking score below 1; an image that is both positive
    and junk has no meaningful protocol. Repeats inside the list named ``allow_repeats``
    (junk) are harmless and allowed.
    """
    keys, names = [], []
    for name, (indices, query_ids) in lists.items():
        key = query_ids * num_database + indices
        if name == allow_repeats:
            key = _sorted_unique(key)
        keys.append(key)
        names.append(np.full(key.size, len(names)))
    key = np.concatenate(keys)
    name_ids = np.concatenate(names)
    order = np.argsort(key, kind="stable")
    repeated = np.flatnonzero(np.diff(key[order]) == 0)
    if repeated.size:
        first, second = order[repeated[0]], order[repeated[0] + 1]
        query, index = divmod(int(key[first]), num_database)
        listed = list(lists)
        where = {listed[name_ids[first]], listed[name_ids[second]]}
        what = (
            f"appears twice in '{listed[name_ids[first]]}'"
            if len(where) == 1
            else f"appears in both '{listed[name_ids[first]]}' and '{listed[name_ids[second]]}'"
        )
        raise ValueError(f"gnd[{query}]: database index {index} {what}.")


def _retrieved_positions(
    ranks: np.ndarray, indices: np.ndarray, query_ids: np.ndarray, num_database: int
) -> np.ndarray:
    """Position of each (query, database index) pair in that query's ranking, -1 if absent.

    ``query_ids`` must be sorted (as ``_index_lists`` makes them). Also raises if a row of
    ``ranks`` repeats a database index.

    One 1-D scatter per query: NumPy's 1-D fancy assignment measured 2-3x faster than
    ``np.put_along_axis`` (or one flat scatter) over all rows at once, at 70 x 5k and at
    70 x 1M; two threads over blocks of queries were no faster on this 2-core machine.
    """
    num_queries, length = ranks.shape
    if num_queries * num_database <= _SMALL_TABLE_SIZE:
        # Small problems: a (Q, N) inverse table, so that only the scatter runs per query.
        inverse = np.full((num_queries, num_database), -1, np.int32)  # (Q, N)
        arange = np.arange(length, dtype=np.int32)
        for q in range(num_queries):
            inverse[q, ranks[q]] = arange
        filled = np.count_nonzero(inverse >= 0, axis=1)  # (Q,) < K iff the row repeats
        if np.any(filled != length):
            _raise_repeated(ranks, int(np.argmax(filled != length)))
        return inverse[query_ids, indices].astype(np.int64)

    positions = np.full(indices.shape, -1, np.int64)
    starts = np.searchsorted(query_ids, np.arange(num_queries + 1))
    inverse = np.full(num_database, -1, np.int32)  # database index -> stamped position
    arange = np.arange(length, dtype=np.int32)
    stamp = np.empty(length, np.int32)
    base = 0
    # Large problems: one (N,) table reused by every query, so memory stays O(N).
    for q in range(num_queries):
        if base > _INT32_MAX - length:  # the stamps would overflow: start a new generation
            inverse.fill(-1)
            base = 0
        np.add(arange, base, out=stamp)
        inverse[ranks[q]] = stamp
        if np.count_nonzero(inverse >= base) != length:
            _raise_repeated(ranks, q)
        found = inverse[indices[starts[q] : starts[q + 1]]].astype(np.int64) - base
        found[found < 0] = -1  # stale stamps of earlier queries and never-stamped entries
        positions[starts[q] : starts[q + 1]] = found
        base += length
    return positions


def _raise_repeated(ranks: np.ndarray, q: int) -> None:
    values, counts = np.unique(ranks[q], return_counts=True)
    raise ValueError(
        f"ranks row {q} repeats database indices {values[counts > 1][:5].tolist()}; each row "
        "must list distinct indices (a permutation of the database or a subset of it)."
    )


def _map_from_positions(
    positive_ids: np.ndarray,
    positive_positions: np.ndarray,
    junk_ids: np.ndarray,
    junk_positions: np.ndarray,
    *,
    num_queries: int,
    length: int,
    kappas: np.ndarray,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """AP and precision at k from the ranking positions of positives and junk, all queries.

    Positions are 0-based, -1 for "not in the ranking". Query ids need not be sorted.
    """
    num_positives = np.bincount(positive_ids, minlength=num_queries)  # (Q,) AP recall step
    has_positives = num_positives > 0

    # Sorting flat keys query * K + position groups positives by query, in ranking order.
    found = positive_positions >= 0
    keys = np.sort(positive_ids[found] * length + positive_positions[found])
    junk_found = junk_positions >= 0
    junk_keys = _sorted_unique(junk_ids[junk_found] * length + junk_positions[junk_found])
    query, position = np.divmod(keys, length)
    row_start = query * length
    # Junk removal: a positive moves up by the number of junk images ranked above it.
    junk_above = np.searchsorted(junk_keys, keys) - np.searchsorted(junk_keys, row_start)
    rank = position - junk_above  # 0-based position in the ranking without junk
    j = np.arange(keys.size) - np.searchsorted(query, query)  # 0-based index among positives

    # Trapezoid rule of revisitop's compute_ap: between recall j/n and (j+1)/n precision goes
    # from j/rank (taken as 1 at rank 0) to (j+1)/(rank+1).
    precision_before = np.where(rank == 0, 1.0, j / np.maximum(rank, 1))
    precision_after = (j + 1) / (rank + 1)
    area = np.bincount(query, weights=precision_before + precision_after, minlength=num_queries)
    aps = np.full(num_queries, np.nan)
    aps[has_positives] = area[has_positives] / (2.0 * num_positives[has_positives])

    # Precision at k with revisitop's cut-off min(last positive's 1-based rank, k).
    num_found = np.bincount(query, minlength=num_queries)
    last_index = np.searchsorted(query, np.arange(num_queries), side="right") - 1
    last_rank = np.zeros(num_queries, np.int64)  # (Q,) 0 where nothing was retrieved
    last_rank[num_found > 0] = rank[last_index[num_found > 0]] + 1
    cutoff = np.minimum(last_rank[:, None], kappas[None, :])  # (Q, num_kappas)
    hits = np.zeros((num_queries, kappas.size))  # (Q, num_kappas)
    for i in range(kappas.size):
        hits[:, i] = np.bincount(query, weights=rank + 1 <= cutoff[query, i], minlength=num_queries)
    prs = np.full((num_queries, kappas.size), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(cutoff > 0, hits / cutoff, 0.0)
    prs[has_positives] = ratio[has_positives]

    num_valid = int(np.count_nonzero(has_positives))
    if num_valid == 0:
        return float("nan"), aps, np.full(kappas.size, np.nan), prs
    mean_ap = float(np.sum(aps[has_positives]) / num_valid)
    mean_prs = np.sum(prs[has_positives], axis=0) / num_valid
    return mean_ap, aps, mean_prs, prs


def compute_map(
    ranks: Shaped[AnyArray, "..."],
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    num_database: int | None = None,
) -> tuple[float, Float[np.ndarray, " Q"], Float[np.ndarray, " k"], Float[np.ndarray, "Q k"]]:
    """Mean average precision and mean precision at k, as revisitop's ``compute_map``.

    For each query, junk images are removed from its ranking; AP is the area under the
    precision-recall curve by the trapezoid rule (revisitop's ``compute_ap``); precision at
    k is ``#{positives ranked <= k'} / k'`` with ``k' = min(rank of the last positive, k)``
    (1-based ranks, junk removed), the published mP@k definition. A query without any
    positive gets AP and precisions NaN and is left out of the means.

    Args:
      ranks: ``(Q, K)`` integer database indices; row q is query q's ranking, best first.
        ``K = N`` for a full ranking, ``K < N`` for a shortlist (then pass ``num_database``).
        revisitop's arrays are ``(N, Q)``: pass their transpose.
      gnd: Q dicts with ``'ok'`` (positive database indices) and optionally ``'junk'``
        (indices ignored, e.g. the query image itself). Lists or 1-D integer arrays.
      kappas: Cut-offs k for precision at k (positive integers, may be empty).
      num_database: Database size N; defaults to ``K`` (full rankings).

    Returns:
      ``(map, aps, mean_precisions, precisions)``: mAP over the queries with positives (a
      float in [0, 1], NaN if no query has one), per-query AP ``(Q,)``, mP@k
      ``(len(kappas),)`` and per-query precision at k ``(Q, len(kappas))``, float64.

    Raises:
      ValueError: ranks not 2-D or empty; ``len(gnd) != Q``; an index outside ``[0, N)``
        in ranks or gnd; a row of ranks repeating an index; a positive listed twice or also
        listed as junk; bad kappas.
      TypeError: non-integer ranks or gnd lists; a gnd entry that is not a dict.

    References:
      Radenović, Iscen, Tolias, Avrithis, Chum. Revisiting Oxford and Paris: Large-Scale
      Image Retrieval Benchmarking. CVPR 2018 (filipradenovic/revisitop, ``evaluate.py``).

    Examples:
      >>> import numpy as np
      >>> ranks = np.array([[3, 1, 4, 0, 2, 5], [0, 2, 1, 4, 3, 5]])
      >>> gnd = [{"ok": [1, 2], "junk": [4]}, {"ok": [3, 5], "junk": []}]
      >>> mean_ap, aps, mpk, _ = compute_map(ranks, gnd, kappas=[1, 2, 5])
      >>> round(mean_ap, 6), np.round(aps, 6).tolist(), np.round(mpk, 6).tolist()
      (0.258333, [0.333333, 0.183333], [0.0, 0.25, 0.35])
    """
    ranks, num_database = _check_ranks(ranks, gnd, num_database)
    kappas_array = _check_kappas(kappas)
    num_queries, length = ranks.shape
    ok = _index_lists(gnd, "ok", num_database)
    gnd_with_junk = [entry if "junk" in entry else {**entry, "junk": []} for entry in gnd]
    junk = _index_lists(gnd_with_junk, "junk", num_database)
    _check_unique({"ok": ok, "junk": junk}, num_database, allow_repeats="junk")

    indices = np.concatenate([ok[0], junk[0]])
    query_ids = np.concatenate([ok[1], junk[1]])
    order = np.argsort(query_ids, kind="stable")
    positions = np.empty(indices.size, np.int64)
    positions[order] = _retrieved_positions(ranks, indices[order], query_ids[order], num_database)
    return _map_from_positions(
        ok[1],
        positions[: ok[0].size],
        junk[1],
        positions[ok[0].size :],
        num_queries=num_queries,
        length=length,
        kappas=kappas_array,
    )


def revisited_evaluation(
    ranks: Shaped[AnyArray, "..."],
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    num_database: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Easy / Medium / Hard mAP and mP@k of the revisited Oxford and Paris protocol.

    The three setups relabel each query's ``easy``, ``hard`` and ``junk`` images:

    | setup | positives | ignored (junk) |
    | --- | --- | --- |
    | easy | easy | junk + hard |
    | medium | easy + hard | junk |
    | hard | hard | junk + easy |

    and are each scored as :func:`compute_map`. Positions in the rankings are looked up once
    for all three. A setup in which no query has positives (e.g. a data set whose ``hard``
    lists are all empty) reports NaN, not an error.

    Args:
      ranks: ``(Q, K)`` integer database indices, one query's ranking per row, best first.
      gnd: Q dicts with ``'easy'``, ``'hard'`` and ``'junk'`` index lists (the revisitop
        ``gnd_<name>.pkl`` entries; other keys such as ``'bbx'`` are ignored).
      kappas: Cut-offs k for mP@k.
      num_database: Database size N; defaults to ``K`` (full rankings).

    Returns:
      ``{setup: metrics}`` for setup in ``("easy", "medium", "hard")``, where ``metrics`` is
      a dict with ``"map"`` (float in [0, 1] or NaN), ``"mp@k"`` (``{k: float}`` for each
      kappa), ``"aps"`` (``(Q,)`` per-query AP, NaN for queries without positives),
      ``"prs"`` (``(Q, len(kappas))`` per-query precision at k) and ``"num_queries"`` (how
      many queries have positives, i.e. enter the means).

    Raises:
      ValueError: as :func:`compute_map`; also when a gnd entry lacks one of the three lists
        or an image appears in two of them.

    References:
      Radenović, Iscen, Tolias, Avrithis, Chum. Revisiting Oxford and Paris: Large-Scale
      Image Retrieval Benchmarking. CVPR 2018.

    Examples:
      >>> import numpy as np
      >>> gnd = [{"easy": [0], "hard": [], "junk": [2]}, {"easy": [2], "hard": [], "junk": []}]
      >>> result = revisited_evaluation(np.array([[2, 1, 0], [2, 0, 1]]), gnd, kappas=[1])
      >>> result["easy"]["aps"].tolist(), result["easy"]["mp@k"], result["hard"]["num_queries"]
      ([0.25, 1.0], {1: 0.5}, 0)

      Query 0's positive is second once junk image 2 is removed: the trapezoid from
      precision 0 (recall 0) to 1/2 (recall 1) has area 1/4.
    """
    ranks, num_database = _check_ranks(ranks, gnd, num_database)
    kappas_array = _check_kappas(kappas)
    num_queries, length = ranks.shape
    lists = {name: _index_lists(gnd, name, num_database) for name in ("easy", "hard", "junk")}
    _check_unique(lists, num_database, allow_repeats="junk")

    indices = np.concatenate([lists[name][0] for name in lists])
    query_ids = np.concatenate([lists[name][1] for name in lists])
    order = np.argsort(query_ids, kind="stable")
    positions = np.empty(indices.size, np.int64)
    positions[order] = _retrieved_positions(ranks, indices[order], query_ids[order], num_database)
    splits = np.cumsum([lists[name][0].size for name in lists])[:-1]
    found = dict(zip(lists, np.split(positions, splits), strict=True))

    def labelled(*names: str) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.concatenate([lists[name][1] for name in names]),
            np.concatenate([found[name] for name in names]),
        )

    setups = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    results = {}
    for setup, (positive_names, junk_names) in setups.items():
        mean_ap, aps, mean_prs, prs = _map_from_positions(
            *labelled(*positive_names),
            *labelled(*junk_names),
            num_queries=num_queries,
            length=length,
            kappas=kappas_array,
        )
        results[setup] = {
            "map": mean_ap,
            "mp@k": {int(k): float(p) for k, p in zip(kappas_array, mean_prs, strict=True)},
            "aps": aps,
            "prs": prs,
            "num_queries": int(np.count_nonzero(~np.isnan(aps))),
        }
    return results
