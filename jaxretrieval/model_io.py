"""Saved retrieval models: one directory layout for the CLIs, training and notebooks.

A model directory holds

* ``model.json``: ``{"format": "jaxretrieval-model", "version": 1, "kind": ...,
  "model": {...}}`` where ``kind`` says what the model is and ``model`` its config:
  ``"retrieval"`` (the default; files without a kind are retrieval models) for a
  :class:`~jaxretrieval.retrieval_model.ModelConfig` (backbone, feature map, pooling,
  whitening size, image size and scales), ``"delf"`` for a
  :class:`~jaxretrieval.local_features.DelfConfig` (DELF local features); plus
  free-form ``"metadata"`` (what made it: config, step, metrics);
* ``variables/``: the Flax variables, saved by orbax (``StandardCheckpointer``).

``save_model(..., base="pretrained")`` stores only the variables that differ from the
backbone's shipped ImageNet weights (a fine-tuned MobileNetV2 whose first blocks were
frozen keeps about half of its bytes in the weight package): ``model.json`` then says
``"base": "pretrained"`` and loading fills the rest from the package, checked against the
digest of the complete variables.

The variables are written first and ``model.json`` last, atomically (temporary file +
rename), so a directory with a ``model.json`` always has complete variables; an
interrupted save leaves no ``model.json`` and :func:`load_model` says so.

``python -m experiments.evaluate --checkpoint DIR`` (and extract/search/match) accept a
model directory or a training work directory holding one in ``model/``.
:func:`load_model` reads retrieval models and :func:`load_delf_model` DELF models; each
refuses the other kind with a message saying which loader to use.

:func:`variables_digest` hashes the variables actually used, so that descriptor caches
are keyed by the weights and never serve a fine-tuned model stale descriptors.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxretrieval.retrieval_model import ModelConfig

FORMAT = "jaxretrieval-model"
VERSION = 1
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
# A training work directory keeps its exported model here.
EXPORT_SUBDIR = "model"
# What a model directory can hold: model.json's "kind" (absent means "retrieval").
RETRIEVAL_KIND = "retrieval"
DELF_KIND = "delf"
KINDS = (RETRIEVAL_KIND, DELF_KIND)
_LOADERS = {RETRIEVAL_KIND: "load_model", DELF_KIND: "load_delf_model"}


class ModelDirectoryError(FileNotFoundError):
    """A path is not a usable model directory; the message says which file and why."""


def save_model(
    directory: str | os.PathLike,
    config: Any,
    variables: dict[str, Any],
    *,
    metadata: dict[str, Any] | None = None,
    base: str | None = None,
) -> pathlib.Path:
    """Writes a model directory (replacing one that is there).

    Args:
      directory: Target directory; created if missing.
      config: What the model is: a :class:`ModelConfig`, or a config with a
        ``model_kind`` class attribute (a DELF model's
        :class:`~jaxretrieval.local_features.DelfConfig` says ``"delf"``).
      variables: Its Flax variables (NumPy or JAX arrays).
      metadata: JSON-serialisable facts to keep with it (training config, step, mAP).
      base: ``"pretrained"`` stores only the variables that differ from the model's
        shipped ImageNet variables (retrieval models only; a backbone without shipped
        weights stores all); None stores all.

    Returns:
      The directory.
    """
    import orbax.checkpoint as ocp  # Lazy: only saving and loading models need orbax.

    kind = getattr(config, "model_kind", RETRIEVAL_KIND)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}.")
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    model_file = directory / MODEL_FILE
    model_file.unlink(missing_ok=True)  # the directory is incomplete until rewritten
    target = directory / VARIABLES_DIR
    if target.exists():
        shutil.rmtree(target)
    host_variables = jax.tree.map(np.asarray, variables)
    stored = host_variables
    if base is not None:
        if base != BASE_PRETRAINED or kind != RETRIEVAL_KIND:
            raise ValueError(f"base must be None or {BASE_PRETRAINED!r} for retrieval models.")
        try:
            stored = _changed_variables(host_variables, _pretrained_variables(config))
        except FileNotFoundError:  # no shipped weights for this backbone: store everything
            base = None
    # Host arrays, written by this process alone: in a multi-process run only one process
    # exports, so orbax must not wait for the others (its default is a collective save).
    this_process = jax.process_index()
    checkpointer = ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=this_process, active_processes={this_process}
        )
    )
    checkpointer.save(target, stored)
    checkpointer.wait_until_finished()
    document = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": config.to_json_dict(),
        "variables_digest": variables_digest(host_variables),
        "metadata": metadata or {},
    }
    if base is not None:
        document["base"] = base
    temporary = directory / (MODEL_FILE + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True))
    os.replace(temporary, model_file)
    return directory


def resolve_model_directory(path: str | os.PathLike) -> pathlib.Path:
    """The model directory at ``path``: itself, or the ``model/`` export of a work dir.

    Raises:
      ModelDirectoryError: Neither holds a ``model.json``; the message says what was found.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelDirectoryError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ModelDirectoryError(f"checkpoint {path} is a file; give the model directory")
    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    if (path / VARIABLES_DIR).exists():
        raise ModelDirectoryError(
            f"checkpoint {path} has variables but no {MODEL_FILE}: the save was interrupted"
        )
    raise ModelDirectoryError(
        f"checkpoint {path} holds no {MODEL_FILE} (nor {EXPORT_SUBDIR}/{MODEL_FILE}); "
        "is it a model directory written by save_model or by experiments.train?"
    )


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``model.json`` of a model directory (or work directory), checked.

    Raises:
      ModelDirectoryError: Missing, unreadable, or of another format or newer version.
    """
    directory = resolve_model_directory(path)
    model_file = directory / MODEL_FILE
    try:
        document = json.loads(model_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirectoryError(f"{model_file} is not readable JSON ({e})") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelDirectoryError(f"{model_file} is not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ModelDirectoryError(
            f"{model_file} has format version {document.get('version')!r}; this "
            f"jaxretrieval reads version {VERSION}"
        )
    return document


def model_kind(document: dict[str, Any]) -> str:
    """The ``kind`` of a parsed ``model.json`` (``"retrieval"`` when absent)."""
    return document.get("kind", RETRIEVAL_KIND)


def _load(path: str | os.PathLike, kind: str, parse) -> tuple[Any, dict[str, Any]]:
    """Reads a model directory of ``kind``; ``parse`` turns ``model`` into a config."""
    import orbax.checkpoint as ocp  # Lazy: only saving and loading models need orbax.

    directory = resolve_model_directory(path)
    document = read_model_file(directory)
    found = model_kind(document)
    if found != kind:
        loader = _LOADERS.get(found)
        advice = f"; load it with jaxretrieval.model_io.{loader}" if loader else ""
        raise ModelDirectoryError(
            f"{directory / MODEL_FILE} holds a {found!r} model, not a {kind!r} one{advice}"
        )
    try:
        config = parse(document["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirectoryError(f"{directory / MODEL_FILE}: bad model description ({e})") from e
    try:
        # orbax refuses relative paths; users pass checkpoints/<name> from the repo root.
        variables = ocp.StandardCheckpointer().restore((directory / VARIABLES_DIR).absolute())
    except Exception as e:  # orbax raises several types for missing or corrupt files
        raise ModelDirectoryError(
            f"cannot read the variables in {directory / VARIABLES_DIR} ({type(e).__name__}: {e})"
        ) from e
    variables = jax.tree.map(np.asarray, variables)
    if document.get("base") is not None:
        if document["base"] != BASE_PRETRAINED:
            raise ModelDirectoryError(
                f"{directory / MODEL_FILE}: unknown base {document['base']!r}"
            )
        try:
            pretrained = _pretrained_variables(config)
        except FileNotFoundError as e:
            raise ModelDirectoryError(
                f"{directory} stores only its changes to the shipped ImageNet weights, "
                f"which are missing: {e}"
            ) from e
        variables = _overlay(pretrained, variables)
    expected = document.get("variables_digest")
    if expected is not None and variables_digest(variables) != expected:
        raise ModelDirectoryError(
            f"{directory / VARIABLES_DIR} does not match the digest in {MODEL_FILE}: "
            "the variables were changed or partly written"
        )
    return config, variables


BASE_PRETRAINED = "pretrained"


def _pretrained_variables(config: ModelConfig) -> dict[str, Any]:
    from jaxretrieval import retrieval_model  # Lazy: model_io is imported by it indirectly.

    return retrieval_model.init_model_variables(dataclasses.replace(config, whitening_dim=None))


def _changed_variables(variables: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The leaves of ``variables`` that ``base`` lacks or holds with other values."""
    flat_base = traverse_util.flatten_dict(base)
    changed = {
        path: leaf
        for path, leaf in traverse_util.flatten_dict(variables).items()
        if path not in flat_base
        or np.shape(flat_base[path]) != np.shape(leaf)
        or not np.array_equal(flat_base[path], leaf)
    }
    return traverse_util.unflatten_dict(changed)


def _overlay(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(changes))
    return traverse_util.unflatten_dict(flat)


def load_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a retrieval model directory written by :func:`save_model`.

    Args:
      path: The model directory, or a training work directory holding ``model/``.

    Returns:
      ``(config, variables)`` with NumPy arrays.

    Raises:
      ModelDirectoryError: Not a model directory, incomplete, corrupt, or a model of
        another kind (the message names the file and why).
    """
    return _load(path, RETRIEVAL_KIND, ModelConfig.from_json_dict)


def load_delf_model(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """Reads a DELF model directory (``"kind": "delf"``) written by :func:`save_model`.

    Args:
      path: The model directory, or a training work directory holding ``model/``.

    Returns:
      ``(config, variables)``: a :class:`~jaxretrieval.local_features.DelfConfig` and
      NumPy arrays (with a ``pca`` collection once a PCA has been learned).

    Raises:
      ModelDirectoryError: As :func:`load_model`; a retrieval model is refused.
    """
    from jaxretrieval.local_features.model import DelfConfig  # Lazy: no import cycle.

    return _load(path, DELF_KIND, DelfConfig.from_json_dict)


def variables_digest(variables: Any) -> str:
    """SHA-256 of a variables pytree: every leaf's path, dtype, shape and bytes.

    Two pytrees get the same digest exactly when they hold the same arrays under the
    same names, so it keys caches of anything computed from the weights.
    """
    digest = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
