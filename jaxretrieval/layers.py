"""Flax Linen wrappers for the parts of a retrieval head that have parameters.

Thin by design: each module owns its parameters and calls the functional twin in
:mod:`jaxretrieval.pooling`, :mod:`jaxretrieval.whitening` or :mod:`jaxretrieval.losses`
for all the maths, and each is tested equal to that twin.

Naming: the learnable projection layer is :class:`WhiteningLayer`, so that it does not
clash with the :class:`jaxretrieval.whitening.Whitening` NamedTuple it can be initialised
from.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval import losses, pooling
from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int
from jaxretrieval.normalization import l2_normalize
from jaxretrieval.whitening import Whitening


class GeM(nn.Module):
    """GeM pooling with a learnable exponent ``p`` (a scalar parameter named ``"p"``).

    Calls :func:`jaxretrieval.pooling.gem`; the exponent is a traced parameter, so
    training it never recompiles.

    Attributes:
      p_init: Initial exponent (3.0, as cirtorch).
      eps: Lower clamp of the activations before the power.
    """

    p_init: float = 3.0
    eps: float = 1e-6

    @nn.compact
    def __call__(
        self,
        features: Float[AnyArray, "B H W C"],
        valid: Bool[AnyArray, "B H W"] | None = None,
    ) -> Float[Array, "B C"]:
        """Pools NHWC ``features`` (optionally masked by ``valid``) into ``(B, C)``."""
        p = self.param("p", nn.initializers.constant(self.p_init), (), jnp.float32)
        return pooling.gem(features, p, self.eps, valid)


class WhiteningLayer(nn.Module):
    """A learnable whitening: ``l2_normalize(x @ kernel + bias)``.

    Initialised from a learned :class:`~jaxretrieval.whitening.Whitening` ``(m, P)``
    as ``kernel = P[:dim].T`` and ``bias = -P[:dim] m``, so that before any training it
    equals :func:`jaxretrieval.whitening.apply_whitening` (fine-tuning the whitening
    end-to-end starts from the closed-form fit). Without a ``whitening`` it is a plain
    dense layer of ``features`` outputs with Lecun-normal kernel and zero bias, like
    cirtorch's learnable whitening.

    Attributes:
      whitening: Optional learned whitening to initialise from.
      dim: Output size when initialised from ``whitening`` (a prefix of its rows);
        default all rows.
      features: Output size when there is no ``whitening``.
      normalize: L2-normalise the output (as ``apply_whitening`` does).
    """

    whitening: Whitening | None = None
    dim: int | None = None
    features: int | None = None
    normalize: bool = True

    @nn.compact
    def __call__(self, x: Float[AnyArray, "N D"]) -> Float[Array, "N D_out"]:
        """Projects descriptors ``(N, D)`` to ``(N, D_out)``."""
        x = jnp.asarray(x, jnp.float32)
        if self.whitening is not None:
            if self.features is not None:
                raise ValueError("WhiteningLayer: give either whitening (and dim) or features.")
            projection = jnp.asarray(self.whitening.projection, jnp.float32)
            mean = jnp.asarray(self.whitening.mean, jnp.float32)
            dim = projection.shape[0] if self.dim is None else self.dim
            if not 1 <= dim <= projection.shape[0]:
                raise ValueError(
                    f"WhiteningLayer: dim must be in [1, {projection.shape[0]}], found {dim}."
                )
            if x.shape[-1] != projection.shape[1]:
                raise ValueError(
                    f"WhiteningLayer: descriptors {x.shape} do not fit a whitening with "
                    f"projection {projection.shape}."
                )
            projection = projection[:dim]  # (D_out, D)
            kernel = self.param("kernel", lambda _: projection.T)  # (D, D_out)
            bias = self.param("bias", lambda _: -(projection @ mean))  # (D_out,)
        else:
            if self.features is None:
                raise ValueError("WhiteningLayer: give whitening or features.")
            kernel = self.param(
                "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features)
            )
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = x @ kernel + bias[None, :]  # (N, D_out)
        return l2_normalize(y) if self.normalize else y


class CosineMarginHead(nn.Module):
    """ArcFace-style classification head: learned class centres and cosine-margin logits.

    Holds a ``(K, D)`` parameter ``"class_centers"`` and calls
    :func:`jaxretrieval.losses.cosine_margin_logits`: the true class's logit gets the
    additive angular margin when ``labels`` are given (training); without labels
    (inference) the logits are the plain scaled cosines. Train with
    :func:`jaxretrieval.losses.classification_loss` on the logits (GLDv2-style class-label
    training of a global descriptor). The centres are normalised inside the function, so
    their initial scale does not matter.

    Attributes:
      num_classes: ``K``.
      scale: Inverse softmax temperature ``s``.
      margin: Additive angular margin ``m`` in radians.
      param_dtype: Dtype of the class centres.
    """

    num_classes: int
    scale: float = 30.0
    margin: float = 0.15
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        embeddings: Float[AnyArray, "B D"],
        labels: Int[AnyArray, " B"] | None = None,
    ) -> Float[Array, "B K"]:
        """Logits of L2-normalised ``embeddings`` against the ``K`` class centres."""
        class_centers = self.param(
            "class_centers",
            nn.initializers.normal(stddev=1.0),
            (self.num_classes, jnp.shape(embeddings)[-1]),
            self.param_dtype,
        )
        return losses.cosine_margin_logits(
            embeddings, class_centers, labels, scale=self.scale, margin=self.margin
        )


class AttentionPooling(nn.Module):
    """DELF's attention head: a non-negative score per location, and the pooled vector.

    Scores are ``softplus(conv_1x1(relu(conv_1x1(features))))`` (the paper's two-layer
    head; 1x1 convolutions are dense layers over channels). The pooling is
    :func:`jaxretrieval.local_features.attention_pooling` of the features weighted by
    the scores. The authors' code puts BatchNorm after the first convolution; it is left
    out here because the head trains on CPU batches of 8 images, where batch statistics
    are noisy, and frozen statistics would make it an identity anyway.

    Attributes:
      hidden: Channels of the first convolution (the paper: 512).
      param_dtype: Dtype of the kernels and biases.
    """

    hidden: int = 512
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: Float[AnyArray, "B H W C"],
        valid: Bool[AnyArray, "B H W"] | None = None,
    ) -> tuple[Float[Array, "B C"], Float[Array, "B H W"]]:
        """``(pooled, scores)`` of a feature map (``valid`` masks padding cells)."""
        # Imported here, not at the top: jaxretrieval.local_features imports this module.
        from jaxretrieval.local_features.attention import attention_pooling

        x = jnp.asarray(features, jnp.float32)
        x = nn.relu(nn.Dense(self.hidden, param_dtype=self.param_dtype, name="hidden")(x))
        logits = nn.Dense(1, param_dtype=self.param_dtype, name="score")(x)  # (B, H, W, 1)
        scores = nn.softplus(logits[..., 0])  # (B, H, W)
        return attention_pooling(features, scores, valid), scores


class DARAC(nn.Module):
    """DARAC: a learned weighting of regional max and average activations.

    Holds ``region_weights`` of shape ``(R, 2)`` (one weight per region of the fixed
    grid of :func:`jaxretrieval.pooling.darac_regions` and per part: max, then average),
    initialised to ones so that before training it is RAMAC's equal-weight sum, and calls
    :func:`jaxretrieval.pooling.darac_pooling`. The weights are traced: training them
    never recompiles.

    Attributes:
      levels: Scale levels of the region grid (3: 21 regions).
      eps: Added to each regional norm.
      param_dtype: Dtype of the weights.
    """

    levels: int = 3
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: Float[AnyArray, "B H W C"],
        valid: Bool[AnyArray, "B H W"] | None = None,
    ) -> Float[Array, "B C"]:
        """Pools NHWC ``features`` (optionally masked by ``valid``) into ``(B, C)``."""
        shape = (pooling.num_darac_regions(self.levels), 2)
        weights = self.param("region_weights", nn.initializers.ones, shape, self.param_dtype)
        return pooling.darac_pooling(
            features, weights, levels=self.levels, eps=self.eps, valid=valid
        )
