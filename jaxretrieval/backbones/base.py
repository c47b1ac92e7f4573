"""What every backbone shares: the BatchNorm and dtype fields, and the call contract.

Every registered backbone is a :class:`Backbone`, called as
``module.apply(variables, images, train=False)`` on normalised RGB images ``(B, H, W, 3)``
and returning ``(logits_or_pooled, features)``, where ``features`` is a dict of named
feature maps (big_vision's ``out`` dict). Subclasses declare their architecture fields
and implement :meth:`Backbone.network`; the fields and the call are declared once, here.
Blocks (``ConvBN``, ``InvertedResidual``, ``Bottleneck``) take the same two fields from
:class:`BatchNormOptions`. The fields are keyword-only, so that a subclass's own fields
keep their positional order.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxretrieval.array_types import AnyArray, Array, Float


class BatchNormOptions(nn.Module):
    """The fields every backbone module and block takes (keyword-only).

    Attributes:
      freeze_batch_stats: Keep BatchNorm on its running statistics also when training (the
        usual choice when fine-tuning for retrieval with small batches). Accepted, without
        effect, by networks without BatchNorm (VGG16), so that every registered backbone
        takes the same fields.
      dtype: Computation dtype, e.g. ``jnp.bfloat16`` on accelerators (parameters stay
        float32).
    """

    freeze_batch_stats: bool = dataclasses.field(default=False, kw_only=True)
    dtype: Any = dataclasses.field(default=jnp.float32, kw_only=True)


class Backbone(BatchNormOptions):
    """A registered backbone: normalised RGB images -> ``(logits_or_pooled, features)``."""

    @nn.compact
    def __call__(
        self, images: Float[AnyArray, "B H W 3"], *, train: bool = False
    ) -> tuple[Float[Array, "B _"], dict[str, Array]]:
        """Runs the network on normalised RGB images.

        Args:
          images: RGB, normalised as the backbone's
            :class:`~jaxretrieval.backbones.BackboneSpec` says
            (:func:`~jaxretrieval.backbones.normalize_images`).
          train: Update BatchNorm statistics (unless frozen) and apply dropout.

        Returns:
          ``(logits or pooled, features)``: float32 logits when the network has a
          classifier, else the spatial mean of its last map; ``features`` maps the names
          the subclass's docstring lists to feature maps.
        """
        return self.network(jnp.asarray(images, self.dtype), train=train)

    def network(
        self, x: Float[Array, "B H W 3"], *, train: bool
    ) -> tuple[Float[Array, "B _"], dict[str, Array]]:
        """The layers, on images already cast to ``dtype`` (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement network()")
