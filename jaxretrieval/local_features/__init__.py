"""DELF: attentive deep local features, matched and verified on the device.

Functional core (pure JAX, no Flax): :mod:`.receptive_field` (cell centres from the
layer geometry), :mod:`.attention` (attention-weighted pooling), :mod:`.pca`,
:mod:`.matching` (mutual nearest neighbours, fixed size) and :mod:`.verification`
(RANSAC on random point triples sharing DSM's batched scoring and refit, vmapped over
pairs). The model (:mod:`.model`, a Flax composition like
:mod:`jaxretrieval.retrieval_model`; the attention head's parameters live in
:class:`jaxretrieval.layers.AttentionPooling`) and the host-side pyramid extractor
(:mod:`.extraction`) complete it. Feature maps are NHWC; descriptors are rows.

References:
  Noh, Araujo, Sim, Weyand, Han. Large-scale image retrieval with attentive deep local
  features. ICCV 2017.
"""

from jaxretrieval.local_features.attention import attention_pooling, feature_norms
from jaxretrieval.local_features.extraction import DELF_SCALES, DelfExtractor, DelfSettings
from jaxretrieval.local_features.features import (
    DelfFeatures,
    check_delf_features,
    delf_features_nbytes,
    empty_delf_features,
    stack_delf_features,
)
from jaxretrieval.local_features.matching import (
    DELF_MAX_DISTANCE,
    Correspondences,
    mutual_nearest_neighbors,
)
from jaxretrieval.local_features.model import (
    KEYPOINT_SCORES,
    DelfConfig,
    DelfModel,
    feature_channels,
    init_delf_variables,
    make_delf_model,
)
from jaxretrieval.local_features.pca import (
    DELF_PCA_DIM,
    apply_descriptor_pca,
    learn_descriptor_pca,
    pca_from_variables,
    pca_variables,
)
from jaxretrieval.local_features.receptive_field import (
    SUPPORTED_BACKBONES,
    LayerGeometry,
    ReceptiveField,
    backbone_receptive_field,
    feature_centers,
    layer_stack,
    receptive_field,
)
from jaxretrieval.local_features.verification import (
    DELF_ERROR_THRESHOLD,
    DELF_NUM_HYPOTHESES,
    Reranking,
    VerificationResult,
    VerificationSettings,
    affine_from_point_triples,
    ransac_affine_points,
    rerank_shortlist,
    sample_point_triples,
    verify_pair,
    verify_shortlist,
)

__all__ = [
    "DELF_ERROR_THRESHOLD",
    "DELF_MAX_DISTANCE",
    "DELF_NUM_HYPOTHESES",
    "DELF_PCA_DIM",
    "DELF_SCALES",
    "KEYPOINT_SCORES",
    "SUPPORTED_BACKBONES",
    "Correspondences",
    "DelfConfig",
    "DelfExtractor",
    "DelfFeatures",
    "DelfModel",
    "DelfSettings",
    "LayerGeometry",
    "ReceptiveField",
    "Reranking",
    "VerificationResult",
    "VerificationSettings",
    "affine_from_point_triples",
    "apply_descriptor_pca",
    "attention_pooling",
    "backbone_receptive_field",
    "check_delf_features",
    "delf_features_nbytes",
    "empty_delf_features",
    "feature_centers",
    "feature_channels",
    "feature_norms",
    "init_delf_variables",
    "layer_stack",
    "learn_descriptor_pca",
    "make_delf_model",
    "mutual_nearest_neighbors",
    "pca_from_variables",
    "pca_variables",
    "ransac_affine_points",
    "receptive_field",
    "rerank_shortlist",
    "sample_point_triples",
    "stack_delf_features",
    "verify_pair",
    "verify_shortlist",
]
