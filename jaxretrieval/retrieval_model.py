"""Backbone + pooling + optional whitening composed into one retrieval model.

:class:`ModelConfig` names a model (backbone, feature map, pooling, whitening size and
the image size it was made for); it is the JSON saved beside a model's variables (see
:mod:`jaxretrieval.model_io`). :func:`build_model` turns it into a
:class:`RetrievalModel`, the Flax composition that every extractor, CLI and training run
uses, with pretrained or given variables. Poolings come from the registry
:data:`jaxretrieval.pooling.POOLINGS`. ``RetrievalModel.__call__`` returns named outputs,
big_vision style.
"""

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval import backbones, layers, pooling
from jaxretrieval.array_types import AnyArray, Float, Int
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.whitening import Whitening


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a retrieval model is; hashable, and saved as JSON beside its variables.

    Attributes:
      backbone: Key of :data:`jaxretrieval.backbones.BACKBONES`.
      feature_name: Feature map to pool; None means the backbone's default (last conv).
      pooling: Key of :data:`jaxretrieval.pooling.POOLINGS`.
      gem_p: GeM exponent. For ``"gem"`` it is the initial value of the learnable
        ``params["gem"]["p"]``: a trained model's exponent is in its variables.
      whitening_dim: Output size of a whitening layer after pooling
        (``params["whitening"]``), or None for no whitening.
      max_side: Longer image side, in pixels, the model was made (or trained) for.
      scales: Scales of ``max_side`` whose descriptors are combined (multi-scale).
    """

    backbone: str = "mobilenet_v2"
    feature_name: str | None = None
    pooling: str = "gem"
    gem_p: float = 3.0
    whitening_dim: int | None = None
    max_side: int = 224
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.backbone not in backbones.BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; available: {sorted(backbones.BACKBONES)}."
            )
        if self.pooling not in pooling.POOLINGS:
            raise ValueError(
                f"pooling must be one of {sorted(pooling.POOLINGS)}, found {self.pooling!r}."
            )
        if self.whitening_dim is not None and self.whitening_dim < 1:
            raise ValueError(f"whitening_dim must be positive, found {self.whitening_dim}.")
        if self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, found {self.max_side}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, found {self.scales}.")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def spec(self) -> backbones.BackboneSpec:
        """The backbone's spec: input normalisation, default feature map, its stride."""
        return backbones.BACKBONES[self.backbone]

    @property
    def resolved_feature_name(self) -> str:
        """``feature_name``, or the backbone's default feature map."""
        return self.feature_name or self.spec.feature_name

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types (``scales`` as a list)."""
        return {**dataclasses.asdict(self), "scales": list(self.scales)}

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_json_dict`; unknown keys are an error (a newer format)."""
        check_config_keys(cls, raw, kind="model")
        return cls(**{**raw, "scales": tuple(raw.get("scales", (1.0,)))})


def check_config_keys(config_type: type, raw: dict[str, Any], *, kind: str) -> None:
    """Raises ``ValueError`` if ``raw`` has keys that are not fields of the dataclass.

    A saved config with unknown keys was written by a newer format; both
    :meth:`ModelConfig.from_json_dict` and
    :meth:`~jaxretrieval.local_features.model.DelfConfig.from_json_dict` refuse it.

    Args:
      config_type: The config dataclass.
      raw: The JSON dict read.
      kind: What the config describes (``"model"``, ``"DELF"``), for the message.
    """
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = set(raw) - fields
    if unknown:
        raise ValueError(f"unknown {kind} fields {sorted(unknown)}; known: {sorted(fields)}.")


class RetrievalModel(nn.Module):
    """Backbone -> named feature map -> pooling -> L2 -> optional whitening -> L2.

    The GeM exponent is a learnable parameter (``params["gem"]["p"]``) when
    ``pooling == "gem"`` and ``learn_p``; DARAC's region weights are
    ``params["darac"]["region_weights"]`` (:class:`~jaxretrieval.layers.DARAC`); other
    poolings have no parameters. The whitening layer (``params["whitening"]``, a
    :class:`~jaxretrieval.layers.WhiteningLayer`) is set from a learned
    :class:`~jaxretrieval.whitening.Whitening` by :func:`attach_whitening` and can be
    fine-tuned.

    Attributes:
      backbone: A backbone module returning ``(logits, features)``.
      feature_name: Which feature map to pool.
      feature_stride: Input pixels per cell of that map (places the padding mask).
      pooling: Key of :data:`jaxretrieval.pooling.POOLINGS`.
      p: GeM exponent (initial value when learnt).
      learn_p: Make ``p`` a parameter.
      whitening_dim: Output size of the whitening layer; None for no whitening.
    """

    backbone: nn.Module
    feature_name: str = "last_conv"
    feature_stride: int = 32
    pooling: str = "gem"
    p: float = 3.0
    learn_p: bool = True
    whitening_dim: int | None = None

    @nn.compact
    def __call__(
        self,
        images: Float[AnyArray, "B H W 3"],
        image_sizes: Int[AnyArray, "B 2"] | None = None,
        *,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Returns ``{"logits", "features", "valid", "pooled", "descriptors"}``.

        Args:
          images: Normalised images, NHWC, possibly zero-padded on the bottom and right.
          image_sizes: Real ``(height, width)`` of each padded image, or None when the
            images fill the batch. The pooling then ignores feature cells beyond
            ``ceil(size / feature_stride)`` (what stride-2 convolutions with symmetric or
            'SAME' padding produce), so a padded image pools only its own pixels.
          train: Training mode of the backbone (BatchNorm, dropout).

        Returns:
          ``features`` is the pooled map, ``valid`` its mask (None without sizes),
          ``pooled`` the L2-normalised pooling and ``descriptors`` the final output
          (``pooled`` whitened and re-normalised, or ``pooled`` itself).
        """
        logits, feature_map, valid = backbone_feature_map(self, images, image_sizes, train=train)
        if self.pooling == "gem" and self.learn_p:
            pooled = l2_normalize(layers.GeM(p_init=self.p, name="gem")(feature_map, valid))
        elif self.pooling == "darac":
            pooled = l2_normalize(layers.DARAC(name="darac")(feature_map, valid))
        else:
            classifier = None
            if self.pooling == "cam":
                classifier = self.backbone.variables["params"]["classifier"]
            pooled = pooling.global_descriptor(
                feature_map, valid, pooling_name=self.pooling, p=self.p, classifier=classifier
            )
        descriptors = pooled
        if self.whitening_dim is not None:
            descriptors = layers.WhiteningLayer(features=self.whitening_dim, name="whitening")(
                pooled
            )
        return {
            "logits": logits,
            "features": feature_map,
            "valid": valid,
            "pooled": pooled,
            "descriptors": descriptors,
        }


def backbone_feature_map(
    model: nn.Module,
    images: Float[AnyArray, "B H W 3"],
    image_sizes: Int[AnyArray, "B 2"] | None,
    *,
    train: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Runs a model's backbone and returns ``(logits, feature map, valid)`` of its map.

    What :class:`RetrievalModel` and
    :class:`~jaxretrieval.local_features.model.DelfModel` both do first, from their
    ``__call__``.

    Args:
      model: A module with the fields ``backbone`` (a backbone module returning
        ``(logits, features)``), ``feature_name`` (the map to return) and
        ``feature_stride`` (input pixels per cell of that map), as both models have.
      images: Normalised images, NHWC, possibly zero-padded on the bottom and right.
      image_sizes: Real ``(height, width)`` of each image, or None when they fill the
        batch.
      train: Training mode of the backbone.

    Returns:
      The backbone's first output, the map ``(B, h, w, C)``, and its :func:`feature_mask`
      (None without ``image_sizes``).

    Raises:
      ValueError: The backbone has no map ``feature_name`` (the message lists its maps).
    """
    logits, features = model.backbone(images, train=train)
    if model.feature_name not in features:
        raise ValueError(
            f"backbone has no feature map {model.feature_name!r}; it has {sorted(features)}."
        )
    feature_map = features[model.feature_name]  # (B, h, w, C)
    valid = None
    if image_sizes is not None:
        shape = feature_map.shape[1:3]
        valid = feature_mask(image_sizes, shape, feature_stride=model.feature_stride)
    return logits, feature_map, valid


def feature_mask(
    image_sizes: Int[AnyArray, "B 2"], map_shape: tuple[int, int], *, feature_stride: int
) -> jax.Array:
    """``(B, h, w)`` mask of the feature cells that cover each image's real pixels.

    Args:
      image_sizes: Real ``(height, width)`` of each (padded) image, in pixels.
      map_shape: ``(h, w)`` of the feature map (static).
      feature_stride: Input pixels per feature cell (static).
    """
    real = -(-jnp.asarray(image_sizes) // feature_stride)  # (B, 2) ceil division
    rows = jnp.arange(map_shape[0])[None, :, None] < real[:, 0, None, None]  # (B, h, 1)
    cols = jnp.arange(map_shape[1])[None, None, :] < real[:, 1, None, None]  # (B, 1, w)
    return rows & cols  # (B, h, w)


def make_model(config: ModelConfig, **backbone_kwargs: Any) -> RetrievalModel:
    """The (parameter-free) :class:`RetrievalModel` a config describes.

    Args:
      config: The model.
      **backbone_kwargs: Backbone module fields, e.g. ``freeze_batch_stats=True``.
    """
    spec = config.spec
    return RetrievalModel(
        backbone=spec.module(**backbone_kwargs),
        feature_name=config.resolved_feature_name,
        feature_stride=_feature_stride(config),
        pooling=config.pooling,
        p=config.gem_p,
        whitening_dim=config.whitening_dim,
    )


def _feature_stride(config: ModelConfig) -> int:
    """Stride of the pooled map: the spec's for the default map, else measured once."""
    spec = config.spec
    name = config.resolved_feature_name
    if name == spec.feature_name:
        return spec.feature_stride
    size = 256  # a multiple of every backbone's total stride: the ratio is exact
    features = feature_map_shapes(config.backbone, size)
    if name not in features:
        raise ValueError(
            f"{config.backbone} has no feature map {name!r}; it has {sorted(features)}."
        )
    return size // features[name][1]


@functools.cache  # tracing a whole backbone's init costs ~1 s; models and extractors ask often
def feature_map_shapes(backbone: str, size: int = 256) -> Mapping[str, tuple[int, ...]]:
    """Shape ``(1, h, w, C)`` of each feature map of ``backbone`` on one size x size image.

    From shapes only (``jax.eval_shape``), nothing computed.
    """
    module = backbones.BACKBONES[backbone].module()
    (_, features), _ = jax.eval_shape(
        lambda: module.init_with_output(
            jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)
        )
    )
    # Read-only: the cache hands the same mapping to every caller.
    return types.MappingProxyType({name: tuple(x.shape) for name, x in features.items()})


def init_model_variables(config: ModelConfig, *, weights_path: str | None = None) -> dict[str, Any]:
    """Variables of a fresh model: pretrained backbone, initialised head.

    The backbone's weights are its shipped ImageNet weights or ``weights_path``; GeM's
    ``p`` starts at ``config.gem_p``; DARAC's region weights at ones; a whitening layer
    (if ``whitening_dim``) starts as a random projection, to be set by
    :func:`attach_whitening`.

    Raises:
      FileNotFoundError: No weights available offline for this backbone.
    """
    variables: dict[str, Any] = {
        collection: {"backbone": tree}
        for collection, tree in config.spec.load_pretrained(weights_path).items()
    }
    params = variables.setdefault("params", {})
    if config.pooling == "gem":
        params["gem"] = {"p": np.array(config.gem_p, np.float32)}  # 0-d array, not a scalar
    if config.pooling == "darac":  # equal weights: RAMAC's fixed aggregation
        params["darac"] = {"region_weights": np.ones((pooling.num_darac_regions(), 2), np.float32)}
    if config.whitening_dim is not None:
        channels = _pooled_dim(config, variables)
        rng = np.random.default_rng(0)
        kernel = rng.normal(size=(channels, config.whitening_dim)) / np.sqrt(channels)
        params["whitening"] = {
            "kernel": kernel.astype(np.float32),
            "bias": np.zeros(config.whitening_dim, np.float32),
        }
    return variables


def whitening_params(learned: Whitening, *, dim: int | None = None) -> dict[str, np.ndarray]:
    """Whitening-layer parameters equal to a learned whitening's first ``dim`` rows.

    The layer computes ``l2(x @ kernel + bias)`` with ``kernel = P[:dim].T`` and
    ``bias = -P[:dim] m``, which is :func:`jaxretrieval.whitening.apply_whitening`.
    """
    projection = np.asarray(learned.projection, np.float32)
    mean = np.asarray(learned.mean, np.float32)
    dim = projection.shape[0] if dim is None else dim
    if not 1 <= dim <= projection.shape[0]:
        raise ValueError(f"dim must be in [1, {projection.shape[0]}], found {dim}.")
    return {
        "kernel": np.ascontiguousarray(projection[:dim].T),  # (D, dim)
        "bias": -(projection[:dim] @ mean),  # (dim,)
    }


def _pooled_dim(config: ModelConfig, variables: dict[str, Any]) -> int:
    """Dimension of the model's pooled descriptor (traced, not run)."""
    unwhitened = dataclasses.replace(config, whitening_dim=None)
    size = 2 * _feature_stride(config)
    out = jax.eval_shape(
        lambda v, x: make_model(unwhitened).apply(v, x)["pooled"],
        {c: dict(t) for c, t in variables.items()},
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )
    return out.shape[-1]


def attach_whitening(
    config: ModelConfig,
    variables: dict[str, Any],
    learned: Whitening,
    *,
    dim: int | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Adds a learned whitening to a model as its (fine-tunable) whitening layer.

    Returns:
      The config with ``whitening_dim`` set, and new variables (the input is not changed).
    """
    layer = whitening_params(learned, dim=dim)
    params = {**variables["params"], "whitening": layer}
    config = dataclasses.replace(config, whitening_dim=layer["bias"].shape[0])
    return config, {**variables, "params": params}


def gem_exponent(config: ModelConfig, variables: dict[str, Any]) -> float:
    """The model's GeM exponent (the learnt one if any), else 1 (the plain mean)."""
    if config.pooling != "gem":
        return 1.0
    gem = variables.get("params", {}).get("gem")
    return float(np.asarray(gem["p"])) if gem is not None else config.gem_p


def build_retrieval_model(
    backbone_name: str,
    *,
    weights_path: str | None = None,
    pooling_name: str = "gem",
    whitening: Whitening | None = None,
    whitening_dim: int | None = None,
    **config_kwargs: Any,
) -> tuple[RetrievalModel, dict[str, Any], backbones.BackboneSpec]:
    """A pretrained :class:`RetrievalModel`, optionally with a learned whitening.

    Returns:
      ``(model, variables, spec)``; ``model.apply(variables, images)["descriptors"]``.
    """
    config = ModelConfig(backbone=backbone_name, pooling=pooling_name, **config_kwargs)
    variables = init_model_variables(config, weights_path=weights_path)
    if whitening is not None:
        config, variables = attach_whitening(config, variables, whitening, dim=whitening_dim)
    return make_model(config), variables, config.spec
