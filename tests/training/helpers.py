"""A tiny retrieval model and tuple batches: the training contracts, cheaply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval import retrieval_model


class TinyBackbone(nn.Module):
    """Two convs (the first 'frozen' in tests) + a classifier, returning named maps."""

    @nn.compact
    def __call__(self, images, *, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv1")(images))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))
        logits = nn.Dense(10, name="classifier")(jnp.mean(x, axis=(1, 2)))
        return logits, {"last_conv": x}


def tiny_model(**kwargs):
    model = retrieval_model.RetrievalModel(backbone=TinyBackbone(), feature_stride=4, **kwargs)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return model, jax.tree.map(np.asarray, variables)


def tuple_batch(seed: int = 0, *, batch: int = 4, size: int = 4, image: int = 16):
    """Random images; tuple b is scene b for query and positive, negatives other scenes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, size, image, image, 3)).astype(np.float32)
    scenes = np.tile(np.arange(batch)[:, None], (1, size))
    scenes[:, 2:] = (np.arange(batch)[:, None] + 1 + np.arange(size - 2)[None]) % batch + 100
    return {
        "images": images,
        "image_sizes": np.full((batch, size, 2), image, np.int32),
        "scenes": scenes.astype(np.int32),
    }
