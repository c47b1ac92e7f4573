"""DSM settings: ours (the default) and the published ones, as one frozen dataclass each.

:class:`DSMSettings` bundles every choice of the DSM verifier: feature extraction (scales,
MSER, per-role feature selection), verification (scale pairs, RANSAC threshold and scale
limit), re-ranking (shortlist, verified threshold) and DSM-seeded diffusion.
``DSMSettings()`` is ours; ``DSMSettings.published()`` is the authors' released code.
Settings are frozen and hashable, so they can be passed as static arguments; library
functions still take plain keyword arguments, which :meth:`DSMSettings.verify_options`,
:meth:`DSMSettings.rerank_options` and :meth:`DSMSettings.seed_options` spell out.

Sources of the published values (osimeoni/DSM at bd13550, the code released with the
paper; ``CVPR19`` comments in the file mark the paper's values):

=================================  ======================  ================================
value                              where                   applied in
=================================  ======================  ================================
scales 1, 1/sqrt(2), 1/2           examples/test_dsm.m     dsm/features/fit_localfeatures.m
images at most 1024 px             test_dsm.m test_imdim   cmp_dsm_query_feats.m crop_qim
MSER MinDiversity 0.7              test_dsm.m              dsm/features/cmp_mser_regions.m
MSER MaxVariation 0.5              test_dsm.m              cmp_mser_regions.m
MSER delta: 0.6 quantile, <= 12    test_dsm.m varDelta     fit_localfeatures.m compute_delta
MSER MinArea 0.001 of the map      cmp_mser_regions.m      (vl_mser option)
MaxArea 0.75, both polarities      VLFeat vl_mser default  (not set by DSM)
channels with > 36 regions out     test_dsm.m nb_max       cmp_mser_regions.m
singular / thin / empty regions    cmp_mser_regions.m      (drop_degenerate)
NMS IoU 0.2, database, per scale   test_dsm.m nms_iou      fit_localfeatures.m get_features,
                                                           cmp_nms.m, utils/nms.m
<= 20 per channel+scale (query)    test_dsm.m q_cha_max    get_max_feats_ms.m
<= 10 per channel+scale (database) test_dsm.m db_cha_max   get_max_feats_ms.m
<= 512 per image (2048 ResNet)     test_dsm.m ms_tot_max   get_max_feats_ms.m
every query scale x database scale dsm/ransac/ransac_fit.m loops q_sc, db_sc
score = max inliers over the pairs dsm/matching_dsm.m      max(max(nb_db, [], 2), [], 3)
RANSAC error 2 cells, scale <= 3   test_dsm.m RANSAC       ransac_fit.m -> m2mransac
re-rank the top 100 by inliers     test_dsm.m nb_reranked  matching_dsm.m (stable sort)
DSM+D: 10 candidates, kq = 5       test_dsm.m DIFF         dsm/evaluate.m, run_diffusion.m
=================================  ======================  ================================

Where we cannot match the authors' code exactly, and why:

* MSER is OpenCV's, not VLFeat's. OpenCV's ``min_diversity`` is a different test: at
  0.7 it finds no region at all (measured with OpenCV 5.0 on a clean Gaussian blob and
  on real MobileNetV2 and VGG16 activations; it already loses most regions at 0.5). We
  run OpenCV with ``min_diversity=0`` (every maximally stable region) and apply VLFeat's
  duplicate rule with 0.7 ourselves (:func:`~jaxretrieval.spatial_verification.
  activation_regions.diverse_regions`). The set of maximally stable regions still comes
  from OpenCV's stability test, whose variation is measured over a grey-level step on one
  side where VLFeat's is ``(area(+delta) - area) / area``.
* DSM casts raw activations to ``uint8`` (MatConvNet networks with inputs in 0-255);
  our networks take ImageNet-normalised inputs and their activations span a few units
  (MobileNetV2: at most 6), so a cast would leave almost nothing. We scale each tensor
  by its maximum to 0-255 (:func:`~jaxretrieval.spatial_verification.activation_regions.
  quantize_activations`), which keeps weak channels weak as the cast does; the delta
  quantile is then taken on these values.
* A region's strength is the maximum activation over its own cells; DSM takes it inside
  the one-sigma ellipse (``poly2mask``), which for a blob is the same peak.
* ``m2mransac`` is a compiled binary (``dsm/ransac/m2mransac.mexa64``): its hypothesis
  generation, any local optimisation and the unit of ``error_thresh`` cannot be read. It
  receives each feature's coordinates in cells of its own scale's map plus the scale.
  We use our single-ellipse up-right hypotheses
  (:func:`~jaxretrieval.spatial_verification.ellipse_affine_hypotheses`), 3 rounds of
  least-squares refinement, and the threshold in cells of the full-scale map (2 cells =
  ``2 * feature_stride`` image pixels) for every scale pair.
* The authors keep every same-channel pair as a tentative correspondence; device shapes
  are static, so we keep the ``max_correspondences`` (512) strongest per scale pair.
* DSM+D: where the authors' code divides by a zero inlier maximum, ours falls back to
  the top-1 image (:func:`~jaxretrieval.spatial_verification.dsm_diffusion_seeds`).
* ResNet101 in the paper runs its last stage with dilation (``DSM.upscale``); that is our
  ``resnet101_dilated`` backbone. Images are resized with OpenCV, not MATLAB's
  ``imresize``.

References:
  Simeoni, Avrithis, Chum. Local features and visual words emerge in activations. CVPR 2019.
"""

import dataclasses
from collections.abc import Sequence

from jaxretrieval.spatial_verification.activation_regions import NMS_BOXES, MSERParams

DEFAULT_SCALES = (1.0, 2**-0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class FeatureSelection:
    """How the candidate regions of one image become its M features (per image role).

    The fields are the keyword arguments of
    :func:`~jaxretrieval.spatial_verification.activation_local_features` of the same names
    (``activation_local_features(maps, mser=..., **dataclasses.asdict(selection))``).

    Attributes:
      max_features: M, features per image over all scales.
      max_per_channel: Largest number of features per channel and scale; None: no limit.
      nms_iou: Box IoU above which the weaker of two features is suppressed; None: no
        non-maximum suppression.
      nms_per_scale: NMS within each scale (DSM) instead of across scales (ours).
      nms_boxes: ``"region"`` (ours) or ``"dsm"``; see ``activation_local_features``.
    """

    max_features: int = 512
    max_per_channel: int | None = None
    nms_iou: float | None = 0.7
    nms_per_scale: bool = False
    nms_boxes: str = "region"

    def __post_init__(self):
        if self.max_features < 1:
            raise ValueError(f"max_features must be >= 1, got {self.max_features}.")
        if self.max_per_channel is not None and self.max_per_channel < 1:
            raise ValueError(f"max_per_channel must be >= 1 or None, got {self.max_per_channel}.")
        if self.nms_boxes not in NMS_BOXES:
            raise ValueError(f"nms_boxes must be one of {NMS_BOXES}, got {self.nms_boxes!r}.")
        if self.nms_iou is not None and self.nms_boxes == "dsm" and not self.nms_per_scale:
            raise ValueError("nms_boxes='dsm' needs nms_per_scale=True.")


@dataclasses.dataclass(frozen=True)
class DSMSettings:
    """Every choice of DSM verification, re-ranking and DSM-seeded diffusion.

    ``DSMSettings()`` is ours; :meth:`published` is the authors' code (the module
    docstring gives the source of each published value and where we cannot match it).

    Attributes:
      scales: Image scales, each giving one activation map (both: 1, 1/sqrt(2), 1/2);
        stored as a tuple of floats.
      max_side: Longer image side in pixels before scaling (ours 512, the re-ranking
        CLIs' default; DSM 1024).
      mser: MSER settings (ours :class:`MSERParams()`; DSM: VLFeat's values, see
        :meth:`published`).
      query: Feature selection for query images (ours: NMS IoU 0.7 across scales, 512
        features; DSM: no NMS, 20 per channel and scale, 512).
      database: Feature selection for database images (ours: as queries; DSM: NMS IoU
        0.2 per scale on DSM's boxes, 10 per channel and scale, 512).
      separate_scales: Verify every (query scale, database scale) pair on its own and
        score an image by the best pair (DSM); False merges the scales into one feature
        set verified once (ours).
      threshold_cells: RANSAC inlier distance in cells of the full-scale map (both 2).
      max_scale_change: Largest scale change of a hypothesis (both 3).
      refinement_steps: Least-squares local-optimisation rounds (both 3; DSM's RANSAC
        is a binary whose steps cannot be read).
      max_correspondences: Tentative correspondences kept per verified pair (ours 1024),
        per scale pair when ``separate_scales`` (published 512; DSM keeps all). On a true
        VGG16 pair at 1024 px (Oxford bikes 1-2) the published features give 119-344
        same-channel pairs per scale pair, so 512 loses none there; verifying 9 scale
        pairs of 512 costs 9 x 512² error evaluations per image pair, about 3 times ours
        (``rerank_shortlist`` of one query against 100 images of 512 synthetic features on
        2 busy CPU cores: 4.1 s and 1.4 GB peak, ours 1.3 s; 9 x 1024² took 13.9 s and
        4.3 GB).
      shortlist_size: Images re-ranked per query (ours None: the whole database, as the
        re-ranking CLIs; DSM 100).
      min_inliers: Fewer inliers count as unverified: they keep their global order
        after the verified images (ours 5; DSM 0: the whole shortlist sorted by inliers).
      num_seeds: DSM-seeded diffusion: seeds kept per query (ours 5; DSM 4, from kq = 5).
      seed_candidates: Re-ranked images considered as seeds (ours None: ``num_seeds``;
        DSM 10, ``max_dsm_kq``).
      seeds_weighted_by_similarity: Multiply the seeds' inlier weights by the global
        similarity (ours False; DSM True).
    """

    scales: Sequence[float] = DEFAULT_SCALES
    max_side: int = 512
    mser: MSERParams = MSERParams()
    query: FeatureSelection = FeatureSelection()
    database: FeatureSelection = FeatureSelection()
    separate_scales: bool = False
    threshold_cells: float = 2.0
    max_scale_change: float = 3.0
    refinement_steps: int = 3
    max_correspondences: int = 1024
    shortlist_size: int | None = None
    min_inliers: int = 5
    num_seeds: int = 5
    seed_candidates: int | None = None
    seeds_weighted_by_similarity: bool = False

    def __post_init__(self):
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"scales must be positive and not empty, got {self.scales}.")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @classmethod
    def published(cls, backbone: str = "vgg16") -> "DSMSettings":
        """The settings of the authors' code (osimeoni/DSM ``examples/test_dsm.m``).

        Args:
          backbone: Name of the network; ResNets get 2048 features per image, every
            other network VGG's 512 (the paper has VGG16 and ResNet101 only).
        """
        max_features = 2048 if "resnet" in backbone else 512
        return cls(
            scales=DEFAULT_SCALES,
            max_side=1024,
            mser=MSERParams(
                delta_quantile=0.6,
                max_delta=12,
                min_area=1,
                min_area_fraction=0.001,
                max_area_fraction=0.75,
                max_variation=0.5,
                prune_nested=False,
                min_diversity=0.7,
                opencv_min_diversity=0.0,
                max_regions_per_channel=36,
                dark_on_bright=True,
                drop_degenerate=True,
            ),
            query=FeatureSelection(max_features=max_features, max_per_channel=20, nms_iou=None),
            database=FeatureSelection(
                max_features=max_features,
                max_per_channel=10,
                nms_iou=0.2,
                nms_per_scale=True,
                nms_boxes="dsm",
            ),
            separate_scales=True,
            threshold_cells=2.0,
            max_scale_change=3.0,
            refinement_steps=3,
            max_correspondences=512,
            shortlist_size=100,
            min_inliers=0,
            num_seeds=4,
            seed_candidates=10,
            seeds_weighted_by_similarity=True,
        )

    @property
    def num_scales(self) -> int | None:
        """``num_scales`` of :func:`~jaxretrieval.spatial_verification.verify_pair`."""
        return len(self.scales) if self.separate_scales else None

    def selection(self, *, as_query: bool) -> FeatureSelection:
        """The feature selection of a query (``as_query``) or a database image."""
        return self.query if as_query else self.database

    def verify_options(self, feature_stride: float | int) -> dict:
        """Keyword arguments of ``verify_pair`` / ``verify_shortlist`` for a network.

        Args:
          feature_stride: Image pixels per cell of the full-scale activation map.
        """
        return dict(
            max_correspondences=self.max_correspondences,
            error_threshold=self.threshold_cells * feature_stride,
            max_scale_change=self.max_scale_change,
            refinement_steps=self.refinement_steps,
            num_scales=self.num_scales,
        )

    def rerank_options(self, feature_stride: float | int, *, num_ranked: int) -> dict:
        """Keyword arguments of ``rerank_shortlist`` (``num_ranked``: images ranked)."""
        size = num_ranked if self.shortlist_size is None else self.shortlist_size
        return dict(
            self.verify_options(feature_stride),
            shortlist_size=min(size, num_ranked),
            min_inliers=self.min_inliers,
        )

    def seed_options(self) -> dict:
        """Keyword arguments of ``dsm_diffusion_seeds`` but its data arguments.

        The caller adds ``num_database``, and ``global_scores`` (the global similarities)
        when :attr:`seeds_weighted_by_similarity`.
        """
        return dict(
            num_seeds=self.num_seeds,
            min_inliers=self.min_inliers,
            num_candidates=self.seed_candidates,
        )


__all__ = ["DEFAULT_SCALES", "DSMSettings", "FeatureSelection"]
