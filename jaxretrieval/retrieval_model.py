"""Backbone + pooling + optional whitening composed into one retrieval model.

:class:`RetrievalModel` is the Flax composition every extractor, CLI and training run
uses; poolings come from the registry :data:`jaxretrieval.pooling.POOLINGS`. Its
``__call__`` returns named outputs, big_vision style.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxretrieval import backbones, layers, pooling
from jaxretrieval.array_types import AnyArray, Bool, Float
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.whitening import Whitening


class RetrievalModel(nn.Module):
    """Backbone -> named feature map -> pooling -> L2 -> optional whitening -> L2.

    The GeM exponent is a learnable parameter (``params["gem"]["p"]``) when
    ``pooling == "gem"`` and ``learn_p``; other poolings have no parameters. The whitening
    layer (``params["whitening"]``) is initialised from a learned
    :class:`~jaxretrieval.whitening.Whitening` and can be fine-tuned.

    Attributes:
      backbone: A backbone module returning ``(logits, features)``.
      feature_name: Which feature map to pool.
      pooling: Key of :data:`jaxretrieval.pooling.POOLINGS`.
      p: GeM exponent (initial value when learnt).
      learn_p: Make ``p`` a parameter.
      whitening: Optional whitening applied after pooling.
      whitening_dim: Output dimension of the whitening (default: all its rows).
    """

    backbone: nn.Module
    feature_name: str = "last_conv"
    pooling: str = "gem"
    p: float = 3.0
    learn_p: bool = True
    whitening: Whitening | None = None
    whitening_dim: int | None = None

    @nn.compact
    def __call__(
        self,
        images: Float[AnyArray, "B H W 3"],
        valid: Bool[AnyArray, "B h w"] | None = None,
        *,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Returns ``{"logits", "features", "pooled", "descriptors"}``.

        Args:
          images: Normalised images, NHWC.
          valid: Optional real-position mask on the pooled feature map.
          train: Training mode of the backbone (BatchNorm, dropout).
        """
        logits, features = self.backbone(images, train=train)
        if self.feature_name not in features:
            raise ValueError(
                f"backbone has no feature map {self.feature_name!r}; it has {sorted(features)}."
            )
        feature_map = features[self.feature_name]  # (B, h, w, C)
        if self.pooling == "gem" and self.learn_p:
            pooled = l2_normalize(layers.GeM(p_init=self.p, name="gem")(feature_map, valid))
        else:
            classifier = None
            if self.pooling == "cam":
                classifier = self.backbone.variables["params"]["classifier"]
            pooled = pooling.global_descriptor(
                feature_map, valid, pooling_name=self.pooling, p=self.p, classifier=classifier
            )
        descriptors = pooled
        if self.whitening is not None:
            descriptors = layers.WhiteningLayer(
                whitening=self.whitening, dim=self.whitening_dim, name="whitening"
            )(pooled)
        return {
            "logits": logits,
            "features": feature_map,
            "pooled": pooled,
            "descriptors": descriptors,
        }


def build_retrieval_model(
    backbone_name: str,
    *,
    weights_path: str | None = None,
    pooling_name: str = "gem",
    whitening: Whitening | None = None,
    whitening_dim: int | None = None,
    **model_kwargs: Any,
) -> tuple[RetrievalModel, dict[str, Any], backbones.BackboneSpec]:
    """A :class:`RetrievalModel` with pretrained backbone variables, ready to ``apply``.

    Head parameters (GeM ``p``, whitening) are initialised and the backbone's pretrained
    variables placed under ``backbone``.

    Returns:
      ``(model, variables, spec)``; ``model.apply(variables, images)["descriptors"]``.
    """
    module, backbone_variables, spec = backbones.load_backbone(backbone_name, weights_path)
    model = RetrievalModel(
        backbone=module,
        feature_name=spec.feature_name,
        pooling=pooling_name,
        whitening=whitening,
        whitening_dim=whitening_dim,
        **model_kwargs,
    )
    initialised = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    variables = {collection: dict(tree) for collection, tree in initialised.items()}
    for collection, tree in backbone_variables.items():
        variables.setdefault(collection, {})["backbone"] = tree
    return model, variables, spec
