"""Nearest-neighbour search on the host with faiss: one index type for every caller.

Descriptors are L2-normalised rows ``(N, D)``; similarity is the inner product. A
:class:`SearchIndex` is exact (``"flat"``, ``IndexFlatIP``) or approximate (``"ivf"``,
inverted lists of raw vectors; ``"ivfpq"``, inverted lists of product-quantised codes for
millions of images); it lives on the GPU when faiss reports one, searches queries in
bounded batches, refuses NaN/inf rows, and saves in faiss's own format (never pickle).
:func:`knn_search` is the one-shot form (build an index over a database, search it),
used for diffusion's kNN graph and diffusion seeds, and for mining. :func:`rank_database`
is the exact full ranking used by evaluation on small and medium sets.

Everything here runs on the host and returns NumPy arrays: float32 similarities and int64
database ids, best first. For shortlists computed on the device, see
:func:`jaxretrieval.similarity.chunked_top_k`.

Measured on this project's 2-core machine (DESIGN.md):

* faiss threads: with its default 2 OpenMP threads a single-query search sometimes takes
  4-16 ms where 1 thread needs 0.25 ms. Batch the queries, or pass ``num_threads=1`` for
  single-query latency. Exact 1M x 128 search: about 1.3 ms per query in batches of 1000.
* IVF: a 1M x 128 self-kNN graph (diffusion) takes about 30 minutes with the exact index
  and about 1 minute with ``"ivf"``, at the cost of missing some neighbours.
"""

import math
import os

import faiss
import numpy as np

from jaxretrieval import validation
from jaxretrieval.array_types import AnyArray, Float, Int
from jaxretrieval.similarity import cosine_similarities

INDEX_TYPES = ("flat", "ivf", "ivfpq")
"""The index types of :class:`SearchIndex`."""

# The IVF k-means trains on at most this many sampled points per inverted list (and, for
# IVF-PQ, per PQ centroid): enough for stable centroids, and it bounds the training time.
_POINTS_PER_CENTROID = 64


class SearchIndex:
    """A faiss inner-product index: exact, IVF-Flat or IVF-PQ, on the GPU when present.

    ``"flat"`` can be searched as soon as descriptors are added. ``"ivf"`` and ``"ivfpq"``
    need :meth:`train` first, on the database itself or a representative sample: it
    clusters a seeded sample of at most 64 points per inverted list (and 64 per PQ
    centroid) into ``num_lists`` lists, so the same seed and data give the same index.
    Training runs on the CPU even in a GPU build (the sample keeps it cheap), then the
    index moves to the GPU; a query scans its ``num_probes`` nearest lists.

    faiss is imported the same way for CPU and GPU builds (``pip install -e .[gpu]``
    replaces faiss-cpu by faiss-gpu). The NaN/inf check runs on everything added or
    searched: one NaN row would otherwise come back as a plausible-looking neighbour.

    Args:
      dim: Descriptor dimension D.
      index_type: ``"flat"`` (exact), ``"ivf"`` (approximate, raw vectors) or ``"ivfpq"``
        (approximate, compressed codes of ``num_subquantizers * bits_per_code`` bits).
      num_lists: Inverted lists (IVF types); None chooses ``round(4 * sqrt(n))`` for ``n``
        training descriptors. Always capped at ``n``.
      num_probes: Lists scanned per query (IVF types); capped at ``num_lists``.
      num_subquantizers: PQ sub-vectors; must divide ``dim`` (``"ivfpq"`` only).
      bits_per_code: Bits per PQ sub-vector code (``"ivfpq"`` only); training needs at
        least ``2 ** bits_per_code`` descriptors.
      seed: Seed of the training sample and of faiss's k-means.
      use_gpu: True (raise if faiss sees no GPU), False, or None for "if available".
      num_threads: faiss's OpenMP threads, process-wide; 1 gives the lowest single-query
        latency (see the module docstring). None leaves faiss's setting alone.

    Raises:
      ValueError: On an unknown index type, ``dim < 1``, a PQ that does not divide ``dim``,
        or non-positive ``num_lists`` / ``num_probes``.
      RuntimeError: If ``use_gpu=True`` and faiss sees no GPU.
    """

    def __init__(
        self,
        dim: int,
        *,
        index_type: str = "flat",
        num_lists: int | None = None,
        num_probes: int = 16,
        num_subquantizers: int = 16,
        bits_per_code: int = 8,
        seed: int = 0,
        use_gpu: bool | None = None,
        num_threads: int | None = None,
    ):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be 'flat', 'ivf' or 'ivfpq', found {index_type!r}.")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, found {dim}.")
        if index_type == "ivfpq" and dim % num_subquantizers:
            raise ValueError(
                f"num_subquantizers={num_subquantizers} must divide the dimension {dim}."
            )
        if num_lists is not None and num_lists < 1:
            raise ValueError(f"num_lists must be >= 1 or None, found {num_lists}.")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, found {num_probes}.")
        num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu and num_gpus == 0:
            raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-gpu installed?).")
        if num_threads is not None:
            faiss.omp_set_num_threads(num_threads)
        self.dim = dim
        self.index_type = index_type
        self.num_lists = num_lists
        self.num_probes = num_probes
        self.num_subquantizers = num_subquantizers
        self.bits_per_code = bits_per_code
        self.seed = seed
        self.on_gpu = bool(num_gpus) and use_gpu is not False
        self._resources = None
        # IVF indexes are created by train(), once the number of lists is known.
        self._index = self._to_device(faiss.IndexFlatIP(dim)) if index_type == "flat" else None

    @property
    def size(self) -> int:
        """Number of indexed vectors."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index accepts vectors (IVF types need :meth:`train` first)."""
        return self._index is not None and bool(self._index.is_trained)

    def train(self, descriptors: Float[AnyArray, "N D"]) -> None:
        """Learns the inverted lists (and PQ codebooks) on a seeded sample; no-op for flat.

        Args:
          descriptors: Representative descriptors, usually the database itself.

        Raises:
          ValueError: On bad shapes or NaN/inf rows, no descriptors, or fewer than
            ``2 ** bits_per_code`` descriptors for ``"ivfpq"``.
          RuntimeError: If an IVF index is trained twice.
        """
        x = _host_matrix("descriptors", descriptors, dim=self.dim)
        if self.index_type == "flat":
            return
        if self._index is not None:
            raise RuntimeError(f"this {self.index_type} index is already trained.")
        num_items = x.shape[0]
        if num_items == 0:
            raise ValueError(f"cannot train an {self.index_type} index on 0 descriptors.")
        num_lists = self.num_lists
        if num_lists is None:
            num_lists = int(round(4 * math.sqrt(num_items)))
        num_lists = max(1, min(num_lists, num_items))
        num_train = _POINTS_PER_CENTROID * num_lists
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, self.dim, num_lists, faiss.METRIC_INNER_PRODUCT)
        else:
            num_codes = 2**self.bits_per_code
            if num_items < num_codes:
                raise ValueError(
                    f"an ivfpq index with bits_per_code={self.bits_per_code} needs at least "
                    f"{num_codes} training descriptors, found {num_items}."
                )
            num_train = max(num_train, _POINTS_PER_CENTROID * num_codes)
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, num_lists, self.num_subquantizers, self.bits_per_code,
                faiss.METRIC_INNER_PRODUCT,
            )  # fmt: skip
            index.pq.cp.seed = self.seed
            index.pq.cp.min_points_per_centroid = 1
        index.cp.seed = self.seed
        # Fewer than 39 points per centroid only triggers a faiss warning; quiet it.
        index.cp.min_points_per_centroid = 1
        rng = np.random.default_rng(self.seed)
        if num_train < num_items:
            x = x[np.sort(rng.choice(num_items, size=num_train, replace=False))]
        index.train(x)
        index.nprobe = min(self.num_probes, num_lists)
        self.num_lists = num_lists
        self._index = self._to_device(index)

    def add(self, descriptors: Float[AnyArray, "N D"]) -> None:
        """Adds database descriptors; their ids continue from :attr:`size`.

        Raises:
          ValueError: On bad shapes, a non-floating dtype or NaN/inf rows.
          RuntimeError: If an IVF index has not been trained.
        """
        x = _host_matrix("descriptors", descriptors, dim=self.dim)
        if not self.is_trained:
            raise RuntimeError(
                f"an {self.index_type} index must be trained before adding (call train())."
            )
        self._index.add(x)

    def search(
        self,
        queries: Float[AnyArray, "Q D"],
        *,
        k: int,
        exclude: Int[AnyArray, "Q X"] | None = None,
        batch_size: int = 65536,
    ) -> tuple[Float[np.ndarray, "Q K"], Int[np.ndarray, "Q K"]]:
        """Top-k inner-product search, best first.

        ``k`` larger than :attr:`size` is clipped to it (the result has ``min(k, size)``
        columns). Slots that an approximate index (or the exclusion) leaves empty hold
        similarity ``-inf`` and index ``-1``, so shapes stay fixed; mask with ``indices >= 0``.

        Excluding items: ``exclude[q]`` lists database ids that query q must not return
        (its own id in a self-search, or every image of its scene when mining hard
        negatives), padded with -1. The search then asks faiss for ``k + X`` neighbours
        and drops the excluded ones, so the result is exact for the flat index; a row
        with fewer than k other items is padded as above.

        Args:
          queries: L2-normalised query rows.
          k: Neighbours per query.
          exclude: Optional database ids to leave out of each query's result (-1 pads).
          batch_size: Queries per faiss call; bounds faiss's result buffers.

        Returns:
          ``(similarities, indices)``: float32 and int64, ``(Q, min(k, size))``.

        Raises:
          ValueError: If the index is empty, ``k < 1`` or ``batch_size < 1``, the queries
            have the wrong shape or NaN/inf rows, or ``exclude`` has the wrong shape.
          TypeError: If the queries are not floating or ``exclude`` is not integer.
        """
        x = _host_matrix("queries", queries, dim=self.dim)
        if self.size == 0:
            raise ValueError("cannot search an empty index; add descriptors first.")
        if k < 1:
            raise ValueError(f"k must be positive, found {k}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, found {batch_size}.")
        if exclude is not None:
            exclude = validation.index_array("exclude", exclude, axes=f"{x.shape[0]} X")
        k = min(k, self.size)
        num_searched = k if exclude is None else min(k + exclude.shape[1], self.size)
        num_queries = x.shape[0]
        similarities = np.empty((num_queries, k), np.float32)
        ids = np.empty((num_queries, k), np.int64)
        for start in range(0, num_queries, batch_size):
            stop = min(start + batch_size, num_queries)
            found_similarities, found_ids = self._index.search(x[start:stop], num_searched)
            found_ids = found_ids.astype(np.int64)
            keep = found_ids >= 0  # (batch, k + X)
            if exclude is not None:
                keep &= ~_is_listed(found_ids, exclude[start:stop], self.size)
            # Kept neighbours first, in rank order; then the empty slots.
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # (batch, K)
            kept = np.take_along_axis(keep, order, axis=1)
            similarities[start:stop] = np.where(
                kept, np.take_along_axis(found_similarities, order, axis=1), -np.inf
            )
            ids[start:stop] = np.where(kept, np.take_along_axis(found_ids, order, axis=1), -1)
        return similarities, ids

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index (copied to the CPU) in faiss's own format, no pickle.

        Raises:
          RuntimeError: If an IVF index has not been trained yet.
        """
        if self._index is None:
            raise RuntimeError(f"cannot save an untrained {self.index_type} index.")
        index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        faiss.write_index(index, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_gpu: bool | None = None) -> "SearchIndex":
        """Reads an index written by :meth:`save` (type, lists and probes included).

        Args:
          path: The file.
          use_gpu: As for the constructor.

        Raises:
          FileNotFoundError: If there is no file at ``path``.
          ValueError: If the file holds a faiss index type that :meth:`save` never writes.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no faiss index at {path}")
        index = faiss.read_index(path)
        if isinstance(index, faiss.IndexFlatIP):
            wrapper = cls(index.d, use_gpu=use_gpu)
        elif isinstance(index, faiss.IndexIVFFlat | faiss.IndexIVFPQ):
            is_pq = isinstance(index, faiss.IndexIVFPQ)
            wrapper = cls(
                index.d,
                index_type="ivfpq" if is_pq else "ivf",
                num_lists=index.nlist,
                num_probes=index.nprobe,
                num_subquantizers=index.pq.M if is_pq else 16,
                bits_per_code=index.pq.nbits if is_pq else 8,
                use_gpu=use_gpu,
            )
        else:
            raise ValueError(
                f"{path} holds a faiss {type(index).__name__}, not an index SearchIndex writes."
            )
        wrapper._index = wrapper._to_device(index)
        return wrapper

    def _to_device(self, index):
        if not self.on_gpu:
            return index
        if self._resources is None:
            self._resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._resources, 0, index)


def knn_search(
    queries: Float[AnyArray, "Q D"],
    database: Float[AnyArray, "N D"],
    *,
    k: int,
    index_type: str = "flat",
    num_lists: int | None = None,
    num_probes: int = 16,
    num_subquantizers: int = 16,
    bits_per_code: int = 8,
    exclude: Int[AnyArray, "Q X"] | None = None,
    batch_size: int = 65536,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> tuple[Float[np.ndarray, "Q K"], Int[np.ndarray, "Q K"]]:
    """Top-k database rows per query by inner product: a :class:`SearchIndex` built and searched.

    ``index_type="flat"`` is exact. ``"ivf"`` (or ``"ivfpq"``) is trained on the database
    itself; see :class:`SearchIndex` for the trade-off (1 minute instead of 30 for a 1M x
    128 self-kNN graph). Unlike :meth:`SearchIndex.search`, k is not clipped: a caller
    building fixed-shape arrays (a kNN graph, mining tables) gets an error instead of
    fewer columns.

    To leave items out, e.g. each query's own scene when mining hard negatives, pass
    their ids as ``exclude`` (``(Q, X)``, -1 pads): the search asks for ``k + X``
    neighbours and drops them, so every returned id is a valid negative.

    Args:
      queries: L2-normalised query rows.
      database: L2-normalised database rows.
      k: Neighbours per query; must be in [1, N].
      index_type: ``"flat"``, ``"ivf"`` or ``"ivfpq"``.
      num_lists: IVF lists; default ``round(4 * sqrt(N))``, at most N.
      num_probes: IVF lists scanned per query.
      num_subquantizers: PQ sub-vectors (``"ivfpq"``); must divide D.
      bits_per_code: Bits per PQ code (``"ivfpq"``); N must be at least ``2 ** bits``.
      exclude: Optional database ids to leave out of each query's result (-1 pads).
      batch_size: Queries per faiss call.
      seed: Seed of the IVF training sample and k-means.
      use_gpu: True, False, or None for "if faiss sees a GPU".

    Returns:
      ``(similarities, indices)``: float32 and int64, ``(Q, k)``, best first. Slots an
      approximate search (or the exclusion) leaves empty hold ``-inf`` and ``-1``.

    Raises:
      ValueError: On bad shapes, NaN/inf rows, an empty database, k outside [1, N] or an
        unknown index type.
      TypeError: If an input is not floating.

    Examples:
      >>> import numpy as np
      >>> database = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
      >>> similarities, indices = knn_search(database[:1], database, k=2)
      >>> indices.tolist(), np.round(similarities.astype(float), 2).tolist()
      ([[0, 2]], [[1.0, 0.6]])
      >>> knn_search(database[:1], database, k=2, exclude=np.array([[0]]))[1].tolist()
      [[2, 1]]
    """
    queries = _host_matrix("queries", queries)
    database = _host_matrix("database", database)
    num_items, dim = database.shape
    if num_items == 0:
        raise ValueError(f"knn_search: the database is empty, found shape {database.shape}.")
    if queries.shape[1] != dim:
        raise ValueError(
            "knn_search: queries and database must have the same dimension D, found "
            f"queries {queries.shape} and database {database.shape}."
        )
    if not 1 <= k <= num_items:
        raise ValueError(
            f"knn_search: k must be in [1, N] for a database of shape {database.shape}, "
            f"found k={k}."
        )
    index = SearchIndex(
        dim,
        index_type=index_type,
        num_lists=num_lists,
        num_probes=num_probes,
        num_subquantizers=num_subquantizers,
        bits_per_code=bits_per_code,
        seed=seed,
        use_gpu=use_gpu,
    )
    index.train(database)
    index.add(database)
    return index.search(queries, k=k, exclude=exclude, batch_size=batch_size)


def rank_database(
    queries: Float[AnyArray, "Q D"], database: Float[AnyArray, "N D"]
) -> Int[np.ndarray, "Q N"]:
    """Full ranking of the database for each query (host NumPy), best first.

    Exact: scores every pair (:func:`jaxretrieval.similarity.cosine_similarities`) and
    sorts each row, for evaluation of small and medium sets where the (Q, N) score matrix
    fits in memory; for large databases use :func:`knn_search` with a shortlist size.
    Ties are broken by database index (stable sort), so rankings are reproducible.

    Examples:
      >>> import numpy as np
      >>> database = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
      >>> rank_database(np.array([[1.0, 0.0]], np.float32), database).tolist()
      [[1, 2, 0]]
    """
    scores = np.asarray(cosine_similarities(queries, database))  # (Q, N)
    return np.argsort(-scores, axis=1, kind="stable")


def _is_listed(ids: np.ndarray, listed: np.ndarray, num_items: int) -> np.ndarray:
    """``ids[q, j] in listed[q]`` for every entry, by sorted keys ``q * num_items + id``.

    Memory is O(size of the inputs), not the (Q, K, X) of a broadcast comparison.
    """
    rows = np.arange(ids.shape[0], dtype=np.int64)[:, None]  # (Q, 1)
    listed_keys = np.sort((rows * num_items + listed)[listed >= 0])  # (#listed,)
    if listed_keys.size == 0:
        return np.zeros(ids.shape, bool)
    keys = rows * num_items + ids  # (Q, K)
    position = np.minimum(np.searchsorted(listed_keys, keys), listed_keys.size - 1)
    return (listed_keys[position] == keys) & (ids >= 0)


def _host_matrix(name: str, x: AnyArray, *, dim: int | None = None) -> np.ndarray:
    """Contiguous float32 rows for faiss, shape-, dtype- and NaN/inf-checked."""
    x = validation.as_host_float_array(name, x, axes="N D" if dim is None else f"N {dim}")
    validation.check_finite(name, x)
    return x


__all__ = ["INDEX_TYPES", "SearchIndex", "knn_search", "rank_database"]
