"""Nearest-neighbour search on the host with faiss: one index type for every caller.

Descriptors are L2-normalised rows ``(N, D)``; similarity is the inner product. A
:class:`SearchIndex` is exact (``"flat"``, ``IndexFlatIP``) or approximate (``"ivf"``,
inverted lists of raw vectors; ``"ivfpq"``, inverted lists of product-quantised codes for
millions of images); it lives on the GPU when faiss reports one, searches queries in
bounded batches, refuses NaN/inf rows, and saves in faiss's own format (never pickle).
:func:`knn_search` is the one-shot form (build an index over a database, search it),
used for diffusion's kNN graph and diffusion seeds, and for mining. :func:`rank_database`
is the exact full ranking used by evaluation on small and medium sets.

Beyond one machine's memory: :func:`build_sharded_index` streams descriptor files
(:class:`DescriptorFiles`: ``.npy`` arrays or extraction's ``.npz`` files) into one or
more IVF-PQ parts trained once on a seeded sample, without ever holding all descriptors;
a :class:`ShardedSearchIndex` searches every part and merges the top-k
(:func:`merge_top_k`, which also merges results that other machines computed on their
own parts). Measured at 1M synthetic descriptors in ``benchmarks/search_scale.py``.

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

import itertools
import json
import math
import os
import pathlib
import zipfile
from collections.abc import Iterator, Sequence

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
        num_lists, sample_ids = _training_sample(
            num_items,
            index_type=self.index_type,
            num_lists=self.num_lists,
            bits_per_code=self.bits_per_code,
            seed=self.seed,
        )
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
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, num_lists, self.num_subquantizers, self.bits_per_code,
                faiss.METRIC_INNER_PRODUCT,
            )  # fmt: skip
            index.pq.cp.seed = self.seed
            index.pq.cp.min_points_per_centroid = 1
        index.cp.seed = self.seed
        # Fewer than 39 points per centroid only triggers a faiss warning; quiet it.
        index.cp.min_points_per_centroid = 1
        if len(sample_ids) < num_items:
            x = x[sample_ids]
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

    def set_num_probes(self, num_probes: int) -> None:
        """Changes the lists scanned per query (IVF types) without rebuilding.

        Capped at the number of lists; ignored by a flat index.

        Raises:
          ValueError: ``num_probes < 1``.
        """
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, found {num_probes}.")
        self.num_probes = num_probes
        if self.index_type == "flat" or self._index is None:
            return
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        space.set_index_parameter(self._index, "nprobe", min(num_probes, self.num_lists))

    def empty_copy(self) -> "SearchIndex":
        """A new, empty index with this one's training (inverted lists, PQ codebooks).

        How the parts of a :class:`ShardedSearchIndex` share one training: vectors added
        to any copy are quantised the same way, so their scores compare across parts.

        Raises:
          RuntimeError: If an IVF index has not been trained.
        """
        if not self.is_trained:
            raise RuntimeError(f"cannot copy an untrained {self.index_type} index.")
        copy = object.__new__(SearchIndex)
        copy.__dict__.update(self.__dict__)  # GPU resources shared: one scratch space per GPU
        index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        index = faiss.clone_index(index)
        index.reset()
        copy._index = copy._to_device(index)
        return copy

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
    exclude: Int[AnyArray, "Q X"] | None = None,
    batch_size: int = 65536,
    **index_options,
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
      exclude: Optional database ids to leave out of each query's result (-1 pads).
      batch_size: Queries per faiss call.
      **index_options: The keyword arguments of :class:`SearchIndex` (``index_type``,
        default ``"flat"``; ``num_lists``, default ``round(4 * sqrt(N))``, at most N;
        ``num_probes``; ``num_subquantizers``, which must divide D; ``bits_per_code``,
        with N at least ``2 ** bits_per_code``; ``seed``; ``use_gpu``; ``num_threads``),
        with its defaults.

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
    index = SearchIndex(dim, **index_options)
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


# --- descriptors sharded across files -------------------------------------------------

DESCRIPTOR_FILE_SUFFIXES = (".npy", ".npz")
"""File types :class:`DescriptorFiles` reads."""

MANIFEST_NAME = "index.json"
"""The file in a :class:`ShardedSearchIndex` directory that lists its parts."""

_MANIFEST_FORMAT = 1


class DescriptorFiles:
    """Descriptor rows stored in several files, read one file (or one block) at a time.

    A file is either an ``.npy`` array ``(n, D)``, read through a memory map so that a
    block costs only its own rows, or an ``.npz`` written by
    :func:`jaxretrieval.extraction.save_descriptors` (``descriptors`` and its ``valid``
    mask), whose arrays are read whole, one file at a time. Rows are numbered
    consecutively across the files in the given order (row ``i`` of the second file has
    the global id ``rows_of_the_first + i``), so a global id is an image's position in
    the concatenated image lists. Rows of unreadable images (``valid`` False, zero rows)
    keep their id but are never returned.

    Construction reads only the array headers. Nothing is pickled or unpickled.

    Args:
      paths: The files, in id order.

    Raises:
      FileNotFoundError: A file does not exist.
      ValueError: No files, an unknown suffix, a file whose descriptors are not a 2-D
        floating array, or files of different dimensions (the message names the file).
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [pathlib.Path(p) for p in paths]
        if not self.paths:
            raise ValueError("DescriptorFiles needs at least one file.")
        self.rows: list[int] = []
        self.dim: int | None = None
        for path in self.paths:
            if path.suffix not in DESCRIPTOR_FILE_SUFFIXES:
                raise ValueError(f"{path}: descriptor files are .npy or .npz, not {path.suffix!r}.")
            if not path.is_file():
                raise FileNotFoundError(f"no descriptor file at {path}")
            shape, dtype = _descriptor_header(path)
            if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
                raise ValueError(
                    f"{path}: descriptors must be a 2-D floating array (N, D), found shape "
                    f"{shape} and dtype {dtype}."
                )
            if self.dim is None:
                self.dim = int(shape[1])
            elif shape[1] != self.dim:
                raise ValueError(
                    f"{path}: descriptors have dimension {shape[1]}, but {self.paths[0]} has "
                    f"{self.dim}; every file must have the same D."
                )
            self.rows.append(int(shape[0]))
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def total_rows(self) -> int:
        """Rows in all files, unreadable images included (the id range)."""
        return int(self.offsets[-1])

    def _open(self, file_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(descriptors, valid or None)``: a memory map for .npy, arrays for .npz."""
        path = self.paths[file_index]
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        with np.load(path, allow_pickle=False) as data:
            valid = data["valid"] if "valid" in data.files else None
            return data["descriptors"], valid

    def blocks(
        self, block_rows: int = 65536
    ) -> Iterator[tuple[Int[np.ndarray, " B"], Float[np.ndarray, "B D"]]]:
        """``(global ids, float32 rows)`` of every valid row, at most ``block_rows`` at a time.

        Raises:
          ValueError: ``block_rows < 1``.
        """
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, found {block_rows}.")
        for file_index, offset in enumerate(self.offsets[:-1]):
            descriptors, valid = self._open(file_index)
            for start in range(0, self.rows[file_index], block_rows):
                stop = min(start + block_rows, self.rows[file_index])
                rows = np.arange(start, stop)
                if valid is not None:
                    rows = rows[valid[start:stop]]
                if rows.size:
                    block = np.ascontiguousarray(descriptors[rows], dtype=np.float32)
                    yield offset + rows, block
            del descriptors

    def gather(self, ids: Sequence[int] | Int[AnyArray, " S"]) -> Float[np.ndarray, "V D"]:
        """The valid rows among the global ``ids``, in the order given (one file open at a time).

        Used to draw a training sample without reading the files whole (``.npy``). Rows
        marked invalid in their file are left out; the others keep the order of ``ids``.
        """
        ids = np.asarray(ids, np.int64)
        order = np.argsort(ids, kind="stable")  # each file is read once, in id order
        ids = ids[order]
        parts, kept = [], []
        for file_index, (start, stop) in enumerate(itertools.pairwise(self.offsets)):
            in_file = np.flatnonzero((ids >= start) & (ids < stop))
            if in_file.size == 0:
                continue
            local = ids[in_file] - start
            descriptors, valid = self._open(file_index)
            if valid is not None:
                in_file, local = in_file[valid[local]], local[valid[local]]
            parts.append(np.asarray(descriptors[local], dtype=np.float32))
            kept.append(order[in_file])
            del descriptors
        if not parts:
            return np.zeros((0, self.dim), np.float32)
        rows, positions = np.concatenate(parts), np.concatenate(kept)
        return rows[np.argsort(positions, kind="stable")]  # back to the caller's order


def _descriptor_header(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, or of the ``descriptors`` array of an .npz."""
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return array.shape, array.dtype
    try:
        with zipfile.ZipFile(path) as archive, archive.open("descriptors.npy") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:  # never written for float arrays; read the member to learn its shape
                with np.load(path, allow_pickle=False) as data:
                    array = data["descriptors"]
                    return array.shape, array.dtype
    except KeyError:
        raise ValueError(f"{path} holds no 'descriptors' array.") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}).") from None
    return shape, dtype


class ShardedSearchIndex:
    """Several :class:`SearchIndex` parts searched as one; results merged by score.

    Each part indexes a subset of the database under global ids: a contiguous range
    starting at an offset, or an explicit id array where unreadable images were skipped.
    All parts share one training (:meth:`SearchIndex.empty_copy`), so their scores
    compare and the merged top-k equals what one index over all vectors would return.
    A part can live in another process or machine: load only some parts
    (``ShardedSearchIndex.load(directory, parts=[...])``), search them there, and merge
    the per-machine results with :func:`merge_top_k`. faiss's own ``IndexShards`` does
    the same merge in one process; this class keeps the parts as separate files so that
    each can be loaded, moved to a GPU or served on its own.

    Args:
      parts: The part indexes (same dimension; empty parts are allowed and skipped).
      ids: For each part, the global id of its first vector (an int: ids continue
        consecutively) or an int64 array of one global id per vector.

    Raises:
      ValueError: No parts, a different number of id entries, an id array whose length
        is not the part's size, or parts of different dimensions.
    """

    def __init__(self, parts: Sequence[SearchIndex], ids: Sequence[int | np.ndarray]):
        if not parts:
            raise ValueError("a ShardedSearchIndex needs at least one part.")
        if len(ids) != len(parts):
            raise ValueError(f"got {len(ids)} id entries for {len(parts)} parts.")
        dims = {part.dim for part in parts}
        if len(dims) != 1:
            raise ValueError(f"every part must have the same dimension, found {sorted(dims)}.")
        for number, (part, part_ids) in enumerate(zip(parts, ids, strict=True)):
            if not isinstance(part_ids, int | np.integer) and len(part_ids) != part.size:
                raise ValueError(
                    f"part {number} holds {part.size} vectors but {len(part_ids)} ids."
                )
        self.parts = list(parts)
        self.ids = [i if isinstance(i, int | np.integer) else np.asarray(i, np.int64) for i in ids]
        self.dim = parts[0].dim

    @property
    def size(self) -> int:
        """Vectors in all parts."""
        return sum(part.size for part in self.parts)

    def set_num_probes(self, num_probes: int) -> None:
        """:meth:`SearchIndex.set_num_probes` on every part."""
        for part in self.parts:
            part.set_num_probes(num_probes)

    def search(
        self, queries: Float[AnyArray, "Q D"], *, k: int, batch_size: int = 65536
    ) -> tuple[Float[np.ndarray, "Q K"], Int[np.ndarray, "Q K"]]:
        """Top-k over every part, best first, as :meth:`SearchIndex.search` (global ids).

        Each part returns its own top-k, then :func:`merge_top_k` keeps the best k of
        them; ``k`` is clipped to :attr:`size`, and slots an approximate part leaves
        empty hold ``-inf`` and ``-1``.

        Raises:
          ValueError: If every part is empty, ``k < 1``, or the queries have the wrong
            shape or NaN/inf rows.
          TypeError: If the queries are not floating.
        """
        x = _host_matrix("queries", queries, dim=self.dim)
        if self.size == 0:
            raise ValueError("cannot search an empty index; add descriptors first.")
        if k < 1:
            raise ValueError(f"k must be positive, found {k}.")
        k = min(k, self.size)
        found_similarities, found_ids = [], []
        for part, part_ids in zip(self.parts, self.ids, strict=True):
            if part.size == 0:
                continue
            similarities, local = part.search(x, k=k, batch_size=batch_size)
            found = local >= 0
            safe = np.where(found, local, 0)
            if isinstance(part_ids, np.ndarray):
                global_ids = part_ids[safe]
            else:
                global_ids = int(part_ids) + safe
            found_similarities.append(similarities)
            found_ids.append(np.where(found, global_ids, -1))
        return merge_top_k(found_similarities, found_ids, k=k)

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes each part (faiss format), its id array if any, then ``index.json``.

        The manifest is written last and atomically, so a directory with a manifest
        is complete. Nothing is pickled.

        Returns:
          The manifest's path.

        Raises:
          RuntimeError: If a part is an untrained IVF index.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for number, (part, part_ids) in enumerate(zip(self.parts, self.ids, strict=True)):
            name = f"part_{number:05d}"
            part.save(directory / f"{name}.faiss")
            entry = {"index": f"{name}.faiss", "size": part.size}
            if isinstance(part_ids, np.ndarray):
                np.save(directory / f"{name}.ids.npy", part_ids)
                entry["ids"] = f"{name}.ids.npy"
            else:
                entry["offset"] = int(part_ids)
            entries.append(entry)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "dim": self.dim,
            "index_type": self.parts[0].index_type,
            "parts": entries,
        }
        path = directory / MANIFEST_NAME
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2))
        os.replace(temporary, path)
        return path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        parts: Sequence[int] | None = None,
        use_gpu: bool | None = None,
    ) -> "ShardedSearchIndex":
        """Reads an index written by :meth:`save`, all parts or only ``parts``.

        Args:
          directory: The folder holding ``index.json``.
          parts: Part numbers to load (e.g. this machine's); None loads every part.
          use_gpu: As for :class:`SearchIndex`.

        Raises:
          FileNotFoundError: No ``index.json`` (or a part file) in ``directory``.
          ValueError: An unknown manifest format or a part number out of range.
        """
        directory = pathlib.Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no sharded index at {directory} (missing {MANIFEST_NAME})")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != _MANIFEST_FORMAT:
            raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r}.")
        entries = manifest["parts"]
        numbers = range(len(entries)) if parts is None else parts
        loaded, ids = [], []
        for number in numbers:
            if not 0 <= number < len(entries):
                raise ValueError(f"{path} has parts 0..{len(entries) - 1}, found {number}.")
            entry = entries[number]
            loaded.append(SearchIndex.load(directory / entry["index"], use_gpu=use_gpu))
            if "ids" in entry:
                ids.append(np.load(directory / entry["ids"], allow_pickle=False))
            else:
                ids.append(int(entry["offset"]))
        return cls(loaded, ids)


def merge_top_k(
    similarities: Sequence[Float[AnyArray, "Q _"]],
    indices: Sequence[Int[AnyArray, "Q _"]],
    *,
    k: int,
) -> tuple[Float[np.ndarray, "Q K"], Int[np.ndarray, "Q K"]]:
    """The best k of several top-k results for the same queries (e.g. one per part).

    Args:
      similarities: Per source, ``(Q, K_i)`` scores; empty slots ``-inf``.
      indices: Per source, ``(Q, K_i)`` global ids; empty slots ``-1``.
      k: Results kept (at most the total number of columns).

    Returns:
      ``(similarities, indices)``, float32 and int64, ``(Q, min(k, sum K_i))``, best
      first; ties keep the order of the sources.

    Raises:
      ValueError: No sources, ``k < 1``, or sources whose shapes disagree.

    Examples:
      >>> import numpy as np
      >>> scores, ids = merge_top_k(
      ...     [np.array([[0.9, 0.2]]), np.array([[0.5, -np.inf]])],
      ...     [np.array([[3, 1]]), np.array([[7, -1]])],
      ...     k=3,
      ... )
      >>> ids.tolist(), scores.dtype.name
      ([[3, 7, 1]], 'float32')
    """
    if not similarities or len(similarities) != len(indices):
        raise ValueError(
            f"merge_top_k needs as many id arrays as score arrays (at least one), found "
            f"{len(similarities)} and {len(indices)}."
        )
    if k < 1:
        raise ValueError(f"k must be positive, found {k}.")
    for s, i in zip(similarities, indices, strict=True):
        if np.shape(s) != np.shape(i) or np.ndim(s) != 2 or len(s) != len(similarities[0]):
            raise ValueError(
                "merge_top_k: every source needs (Q, K_i) scores and ids of one shape, found "
                f"{[np.shape(x) for x in similarities]} and {[np.shape(x) for x in indices]}."
            )
    scores = np.concatenate([np.asarray(s, np.float32) for s in similarities], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64) for i in indices], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, K)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def build_sharded_index(
    files: DescriptorFiles | Sequence[str | os.PathLike],
    *,
    index_type: str = "ivfpq",
    num_lists: int | None = None,
    num_probes: int = 16,
    num_subquantizers: int = 16,
    bits_per_code: int = 8,
    rows_per_part: int | None = None,
    block_rows: int = 65536,
    seed: int = 0,
    use_gpu: bool | None = None,
    num_threads: int | None = None,
) -> ShardedSearchIndex:
    """Streams descriptor files into an index, never holding more than one file.

    1. Training: a seeded sample of ``64 * num_lists`` rows (at least ``64 * 2 **
       bits_per_code`` for IVF-PQ, as :meth:`SearchIndex.train` uses) is gathered from
       the files and trains the inverted lists and PQ codebooks once.
    2. Adding: the valid rows are read ``block_rows`` at a time and added under their
       global ids (:class:`DescriptorFiles`); a new part starts every
       ``rows_per_part`` vectors (None: one part).

    Memory: one block of raw descriptors, one file for ``.npz`` files, the training
    sample, and the index itself. An IVF-PQ index costs ``num_subquantizers *
    bits_per_code / 8`` bytes of code plus 8 bytes of id per vector (24 bytes with the
    defaults, instead of 4 * D raw), plus ``num_lists * D * 4`` bytes of centroids.

    Args:
      files: Descriptor files (paths or a :class:`DescriptorFiles`).
      index_type: ``"ivfpq"`` (default), ``"ivf"`` or ``"flat"``.
      num_lists: Inverted lists; None chooses ``round(4 * sqrt(N))`` for the N rows.
      num_probes: Lists scanned per query (change later with ``set_num_probes``).
      num_subquantizers: PQ sub-vectors (bytes per vector at 8 bits); must divide D.
      bits_per_code: Bits per PQ sub-vector code.
      rows_per_part: Vectors per part (e.g. what one machine or GPU holds); None: one.
      block_rows: Rows read and added at a time.
      seed: Seed of the training sample and faiss's k-means.
      use_gpu: As for :class:`SearchIndex` (training runs on the CPU either way).
      num_threads: faiss's OpenMP threads (process-wide); None leaves it alone.

    Returns:
      The :class:`ShardedSearchIndex`; ``save`` it to a directory.

    Raises:
      ValueError: On bad files (see :class:`DescriptorFiles`), no valid rows,
        ``rows_per_part < 1`` or bad index parameters (see :class:`SearchIndex`).
    """
    if not isinstance(files, DescriptorFiles):
        files = DescriptorFiles(files)
    if rows_per_part is not None and rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1 or None, found {rows_per_part}.")
    total = files.total_rows
    template = SearchIndex(
        files.dim,
        index_type=index_type,
        num_lists=num_lists,
        num_probes=num_probes,
        num_subquantizers=num_subquantizers,
        bits_per_code=bits_per_code,
        seed=seed,
        use_gpu=use_gpu,
        num_threads=num_threads,
    )
    if index_type != "flat":
        num_lists, sample_ids = _training_sample(
            total,
            index_type=index_type,
            num_lists=num_lists,
            bits_per_code=bits_per_code,
            seed=seed,
        )
        template.num_lists = num_lists
        sample = files.gather(sample_ids)
        if sample.shape[0] < num_lists:
            raise ValueError(
                f"{sample.shape[0]} valid training rows for {num_lists} inverted lists; "
                "pass fewer num_lists."
            )
        template.train(sample)
        del sample
    parts: list[SearchIndex] = []
    part_ids: list[list[np.ndarray]] = []
    for ids, block in files.blocks(block_rows):
        while block.shape[0]:
            if not parts or (rows_per_part is not None and parts[-1].size >= rows_per_part):
                parts.append(template.empty_copy())
                part_ids.append([])
            room = block.shape[0] if rows_per_part is None else rows_per_part - parts[-1].size
            parts[-1].add(block[:room])
            part_ids[-1].append(ids[:room])
            ids, block = ids[room:], block[room:]
    if not parts:
        raise ValueError(f"no valid descriptors in {len(files.paths)} files.")
    ids = []
    for chunks in part_ids:
        concatenated = np.concatenate(chunks)
        consecutive = np.array_equal(
            concatenated, np.arange(concatenated[0], concatenated[0] + concatenated.size)
        )
        ids.append(int(concatenated[0]) if consecutive else concatenated)
    return ShardedSearchIndex(parts, ids)


def _training_sample(
    num_items: int, *, index_type: str, num_lists: int | None, bits_per_code: int, seed: int
) -> tuple[int, Int[np.ndarray, " S"]]:
    """The inverted lists of an IVF index over ``num_items`` rows and its training sample.

    ``num_lists`` None chooses ``round(4 * sqrt(num_items))``; it is capped at
    ``num_items`` (and at least 1). The sample holds 64 rows per list (and, for IVF-PQ, at
    least 64 per PQ centroid): a seeded draw without replacement, or every row if there
    are not more.

    Returns:
      ``(num_lists, sample_ids)``: the capped number of lists and the sorted row ids.
    """
    if num_lists is None:
        num_lists = int(round(4 * math.sqrt(num_items)))
    num_lists = max(1, min(num_lists, num_items))
    num_train = _POINTS_PER_CENTROID * num_lists
    if index_type == "ivfpq":
        num_train = max(num_train, _POINTS_PER_CENTROID * 2**bits_per_code)
    if num_train >= num_items:
        return num_lists, np.arange(num_items)
    rng = np.random.default_rng(seed)
    return num_lists, np.sort(rng.choice(num_items, size=num_train, replace=False))


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


__all__ = [
    "INDEX_TYPES",
    "DescriptorFiles",
    "SearchIndex",
    "ShardedSearchIndex",
    "build_sharded_index",
    "knn_search",
    "merge_top_k",
    "rank_database",
]
