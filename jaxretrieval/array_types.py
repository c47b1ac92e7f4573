"""Array type aliases and the axis-letter glossary used in every signature.

| letter | meaning |
| --- | --- |
| ``B`` | images in a batch |
| ``H W`` | spatial height and width of a feature map |
| ``C`` | channels of a feature map |
| ``D`` | descriptor dimension, after pooling and whitening |
| ``N`` | database size |
| ``Q`` | number of queries |
| ``K`` | neighbours or top-k |
| ``T`` | tuple size (1 query + 1 positive + n negatives) |
| ``S`` | scales |
| ``R`` | regions (R-MAC) |
| ``M`` | local features per image (DSM) |
| ``P`` | tentative correspondences |
| ``Y`` | RANSAC hypotheses (affine maps scored against the P correspondences) |
| ``L`` | shortlist length: candidates re-ranked per query (truncated diffusion, DSM) |
| ``E`` | eigenpairs kept by spectral ranking (its rank) |
| ``X`` | database ids excluded per query from a search (padded with -1) |

One meaning per letter: a new kind of axis gets a new letter here, never a reused one.

Signatures use ``Float[AnyArray, "B H W C"]`` and friends: ``AnyArray`` accepts both
``jax.Array`` (including tracers) and ``numpy.ndarray`` so that host code can call
library functions without a conversion, while the annotated shapes are still checked at
test time (jaxtyping + beartype, see pyproject.toml).
"""

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Shaped

AnyArray = jax.Array | np.ndarray
Scalar = float | int | Float[AnyArray, ""]

__all__ = ["AnyArray", "Array", "Bool", "Float", "Int", "Scalar", "Shaped"]
