"""DSM spatial verification: MSER local features on CNN activations, batched RANSAC on device.

Host side (NumPy + OpenCV): :class:`DSMFeatureExtractor` runs a model's backbone on an
image at several scales and :func:`activation_local_features` turns the activation maps
into fixed-size :class:`LocalFeatures`. Device side (pure JAX, jit + vmap):
:func:`tentative_correspondences`, :func:`ransac_affine`, :func:`verify_pair`,
:func:`verify_shortlist`, :func:`rerank_shortlist` and :func:`dsm_diffusion_seeds`.
:class:`DSMSettings` holds every choice: ``DSMSettings()`` is ours,
``DSMSettings.published()`` the authors' code (its module docstring lists the sources).

References:
  Simeoni, Avrithis, Chum. Local features and visual words emerge in activations. CVPR 2019.
"""

from jaxretrieval.spatial_verification.activation_regions import (
    LocalFeatures,
    MSERParams,
    activation_local_features,
    local_features_nbytes,
    stack_local_features,
)
from jaxretrieval.spatial_verification.correspondences import (
    Correspondences,
    tentative_correspondences,
)
from jaxretrieval.spatial_verification.dsm import (
    Reranking,
    distinct_inliers,
    dsm_diffusion_seeds,
    reorder_by_inliers,
    rerank_by_inliers,
    rerank_shortlist,
    verify_pair,
    verify_shortlist,
)
from jaxretrieval.spatial_verification.feature_extraction import (
    DSMFeatureExtractor,
    ImageTooSmallError,
)
from jaxretrieval.spatial_verification.ransac import (
    VerificationResult,
    best_affine_hypothesis,
    ellipse_affine_hypotheses,
    ransac_affine,
    transfer_errors,
)
from jaxretrieval.spatial_verification.settings import (
    DEFAULT_SCALES,
    DSMSettings,
    FeatureSelection,
)

__all__ = [
    "DEFAULT_SCALES",
    "Correspondences",
    "DSMFeatureExtractor",
    "DSMSettings",
    "FeatureSelection",
    "ImageTooSmallError",
    "LocalFeatures",
    "MSERParams",
    "Reranking",
    "VerificationResult",
    "activation_local_features",
    "best_affine_hypothesis",
    "distinct_inliers",
    "dsm_diffusion_seeds",
    "ellipse_affine_hypotheses",
    "local_features_nbytes",
    "ransac_affine",
    "reorder_by_inliers",
    "rerank_by_inliers",
    "rerank_shortlist",
    "stack_local_features",
    "tentative_correspondences",
    "transfer_errors",
    "verify_pair",
    "verify_shortlist",
]
