"""The DELF model: a backbone stage as dense local descriptors, two classification heads.

:class:`DelfConfig` names a DELF model (backbone, feature map, number of classes, head
size, image size, PCA) and is the JSON saved beside its variables with ``"kind":
"delf"`` (:func:`jaxretrieval.model_io.load_delf_model`). :func:`make_delf_model` turns
it into a :class:`DelfModel`, the Flax composition that training and extraction both
apply. This module is to DELF what :mod:`jaxretrieval.retrieval_model` is to global
descriptors; the maths stays in the functional modules (:mod:`.attention`,
:mod:`.receptive_field`, :mod:`jaxretrieval.pooling`) and the attention head's
parameters in :class:`jaxretrieval.layers.AttentionPooling`.

Variables: ``params`` holds ``backbone``, ``descriptor_classifier`` (stage 1),
``attention`` and ``attention_classifier`` (stage 2); ``batch_stats`` the backbone's
(frozen); after :mod:`experiments.delf_pca`, a ``pca`` collection holds the learned
projection of the descriptors (``mean``, ``projection``), never trained.

Why MobileNetV2 ``stage3``: the paper takes ResNet50's conv4 (the block3 output of its
code, receptive field 291 px). MobileNetV2's stage3 (block 13, stride 16, 96 channels)
has a 267 px receptive field, which is also exactly that of torchvision's ResNet50
``layer3`` (conv4 at stride 16); its ``stage4`` (491 px, stride 32) matches conv5
instead. VGG16's ``conv5_3`` (196 px, stride 16, 512 channels) is the nearest VGG map.
See :mod:`.receptive_field` for the computation.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from jaxretrieval import backbones, layers, pooling, retrieval_model
from jaxretrieval.array_types import AnyArray, Float, Int
from jaxretrieval.local_features import receptive_field as rf

__all__ = [
    "KEYPOINT_SCORES",
    "DelfConfig",
    "DelfModel",
    "feature_channels",
    "init_delf_variables",
    "make_delf_model",
]

# "attention": the trained attention head; "l2_norm": the feature norm (no attention).
KEYPOINT_SCORES = ("attention", "l2_norm")


@dataclasses.dataclass(frozen=True)
class DelfConfig:
    """What a DELF model is; hashable, and saved as JSON beside its variables.

    Attributes:
      backbone: Key of :data:`jaxretrieval.backbones.BACKBONES` with a known layer
        geometry (:data:`~jaxretrieval.local_features.receptive_field.SUPPORTED_BACKBONES`).
      feature_name: The feature map whose cells are the local descriptors.
      num_classes: Classes of both classifiers (the training scenes).
      attention_hidden: Channels of the attention head's first 1x1 convolution.
      max_side: Default longer image side, in pixels, at pyramid scale 1 of the
        extraction (training uses its own canvas size).
      keypoint_score: How extraction ranks locations by default: ``"attention"`` (a
        model whose attention stage is trained) or ``"l2_norm"`` (before it).
      pca_dim: Size of the descriptors after the learned PCA (``variables["pca"]``);
        None means no PCA has been learned (descriptors keep the map's channels).
      pca_whitening: The PCA also whitens (divides by the square roots of the
        variances), the authors' ``use_whitening`` option.
    """

    model_kind: ClassVar[str] = "delf"

    backbone: str = "mobilenet_v2"
    feature_name: str = "stage3"
    num_classes: int = 1
    attention_hidden: int = 512
    max_side: int = 512
    keypoint_score: str = "attention"
    pca_dim: int | None = None
    pca_whitening: bool = False

    def __post_init__(self):
        rf.layer_stack(self.backbone, self.feature_name)  # raises for unknown geometry
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, found {self.num_classes}.")
        if self.attention_hidden < 1:
            raise ValueError(f"attention_hidden must be positive, found {self.attention_hidden}.")
        if self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 pixels, found {self.max_side}.")
        if self.keypoint_score not in KEYPOINT_SCORES:
            raise ValueError(
                f"keypoint_score must be one of {KEYPOINT_SCORES}, found {self.keypoint_score!r}."
            )
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim must be positive or None, found {self.pca_dim}.")

    @property
    def spec(self) -> backbones.BackboneSpec:
        """The backbone's spec (input normalisation, module, weights)."""
        return backbones.BACKBONES[self.backbone]

    @property
    def receptive_field(self) -> rf.ReceptiveField:
        """Receptive field of the local-descriptor map."""
        return rf.backbone_receptive_field(self.backbone, self.feature_name)

    @property
    def feature_stride(self) -> int:
        """Input pixels between neighbouring descriptor cells."""
        return self.receptive_field.stride

    @property
    def last_backbone_layer(self) -> str:
        """The last backbone layer the descriptors depend on (later ones never train)."""
        return [g.module for g in rf.layer_stack(self.backbone, self.feature_name) if g.module][-1]

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> "DelfConfig":
        """Inverse of :meth:`to_json_dict`; unknown keys are an error (a newer format)."""
        retrieval_model.check_config_keys(cls, raw, kind="DELF")
        return cls(**raw)


class DelfModel(nn.Module):
    """Backbone map -> local descriptors, global-pooling classifier, attention classifier.

    Stage 1 (descriptor fine-tuning) trains the backbone through ``descriptor_logits``:
    the masked spatial mean of the map, then a dense layer. Stage 2 trains only the
    attention head through ``attention_logits``: the attention-weighted mean of the
    L2-normalised map (``y = W sum_n a(f_n) f_n / n``), then a dense layer. The head
    reads the map through ``stop_gradient``, as the authors' code does, so the
    attention loss never reaches the backbone. Under ``jit`` the unused branch and the
    backbone layers after ``feature_name`` are dropped by XLA.

    Attributes:
      backbone: A backbone module returning ``(logits, features)``.
      feature_name: The local-descriptor map.
      feature_stride: Input pixels per cell of that map (places the padding mask).
      num_classes: Classifier outputs.
      attention_hidden: See :class:`~jaxretrieval.layers.AttentionPooling`.
    """

    backbone: nn.Module
    feature_name: str = "stage3"
    feature_stride: int = 16
    num_classes: int = 1
    attention_hidden: int = 512

    @nn.compact
    def __call__(
        self,
        images: Float[AnyArray, "B H W 3"],
        image_sizes: Int[AnyArray, "B 2"] | None = None,
        *,
        train: bool = False,
    ) -> dict[str, jax.Array | None]:
        """Returns ``{"features", "valid", "scores", "descriptor_logits", "attention_logits"}``.

        Args:
          images: Normalised images, NHWC, possibly zero-padded on the bottom and right.
          image_sizes: Real ``(height, width)`` of each image, or None when they fill
            the canvas; cells beyond ``ceil(size / feature_stride)`` are then invalid.
          train: Training mode of the backbone.

        Returns:
          ``features`` the local-descriptor map (not normalised), ``valid`` its mask
          (None without sizes), ``scores`` the attention score of each cell, and the two
          classifiers' logits.
        """
        _, features, valid = retrieval_model.backbone_feature_map(
            self, images, image_sizes, train=train
        )
        mean = pooling.spoc(features, valid)  # (B, C)
        descriptor_logits = nn.Dense(self.num_classes, name="descriptor_classifier")(mean)
        attended, scores = layers.AttentionPooling(self.attention_hidden, name="attention")(
            jax.lax.stop_gradient(features), valid
        )
        attention_logits = nn.Dense(self.num_classes, name="attention_classifier")(attended)
        return {
            "features": features,
            "valid": valid,
            "scores": scores,
            "descriptor_logits": descriptor_logits,
            "attention_logits": attention_logits,
        }


def make_delf_model(config: DelfConfig, **backbone_kwargs: Any) -> DelfModel:
    """The (parameter-free) :class:`DelfModel` a config describes.

    Args:
      config: The model.
      **backbone_kwargs: Backbone module fields, e.g. ``freeze_batch_stats=True``.
    """
    return DelfModel(
        backbone=config.spec.module(**backbone_kwargs),
        feature_name=config.feature_name,
        feature_stride=config.feature_stride,
        num_classes=config.num_classes,
        attention_hidden=config.attention_hidden,
    )


def feature_channels(config: DelfConfig) -> int:
    """Channels C of the local-descriptor map (from shapes only, nothing computed)."""
    return retrieval_model.feature_map_shapes(config.backbone)[config.feature_name][-1]


def init_delf_variables(
    config: DelfConfig, *, weights_path: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Variables of a fresh DELF model: pretrained backbone, initialised heads.

    Args:
      config: The model.
      weights_path: Backbone weights (default: the shipped ImageNet weights).
      seed: Seed of the heads' initialisation.

    Raises:
      FileNotFoundError: No weights available offline for this backbone.
    """
    variables: dict[str, Any] = {
        collection: {"backbone": tree}
        for collection, tree in config.spec.load_pretrained(weights_path).items()
    }
    channels, hidden, classes = (
        feature_channels(config),
        config.attention_hidden,
        config.num_classes,
    )
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int) -> dict[str, np.ndarray]:
        # LeCun normal (Flax's default kernel init, untruncated), zero bias; drawn with
        # NumPy: no PRNG kernels to compile for a one-off initialisation.
        kernel = rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_in, fan_out))
        return {"kernel": kernel.astype(np.float32), "bias": np.zeros(fan_out, np.float32)}

    variables.setdefault("params", {}).update(
        {
            "descriptor_classifier": dense(channels, classes),
            "attention": {"hidden": dense(channels, hidden), "score": dense(hidden, 1)},
            "attention_classifier": dense(channels, classes),
        }
    )
    return variables
