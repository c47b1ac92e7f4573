"""DSM matching of feature sets: verification and drawing of the inliers.

The logic behind ``python -m experiments.match`` and benchmarks/dsm_homography_check.py,
importable from notebooks: :func:`match_features` verifies two feature sets (from
:class:`jaxretrieval.spatial_verification.DSMFeatureExtractor`) with one jitted
``verify_pair`` per setting; :func:`draw_matches` draws the inliers.
"""

import functools
from typing import Any

import cv2
import jax
import numpy as np

from jaxretrieval.spatial_verification import LocalFeatures, distinct_inliers, verify_pair


@functools.cache
def _jitted_verify(max_correspondences: int, refinement_steps: int):
    return jax.jit(
        lambda a, b, threshold, max_scale: verify_pair(
            a,
            b,
            max_correspondences=max_correspondences,
            error_threshold=threshold,
            max_scale_change=max_scale,
            refinement_steps=refinement_steps,
        )
    )


def match_features(
    features_a: LocalFeatures,
    features_b: LocalFeatures,
    *,
    error_threshold: float,
    max_correspondences: int = 1024,
    max_scale_change: float = 3.0,
    refinement_steps: int = 3,
) -> dict[str, Any]:
    """Verifies two feature sets; returns plain NumPy results.

    Returns:
      A dict with ``num_inliers``, ``num_distinct_inliers`` (each feature counted once,
      see :func:`~jaxretrieval.spatial_verification.distinct_inliers`),
      ``num_tentative``, ``transform`` (2, 3), and
      ``points_a`` / ``points_b`` (the inlier centres, (n, 2) each).
    """
    verify = _jitted_verify(max_correspondences, refinement_steps)
    result, matches = verify(features_a, features_b, error_threshold, max_scale_change)
    mask = np.asarray(result.inlier_mask)
    index_a = np.asarray(matches.index_a)[mask]
    index_b = np.asarray(matches.index_b)[mask]
    distinct = distinct_inliers(
        result,
        matches,
        num_features_a=features_a.means.shape[0],
        num_features_b=features_b.means.shape[0],
    )
    return {
        "num_inliers": int(result.num_inliers),
        "num_distinct_inliers": int(distinct),
        "num_tentative": int(np.asarray(matches.valid).sum()),
        "transform": np.asarray(result.transform),
        "points_a": np.asarray(features_a.means)[index_a],
        "points_b": np.asarray(features_b.means)[index_b],
    }


def draw_matches(
    image_a: np.ndarray, image_b: np.ndarray, points_a: np.ndarray, points_b: np.ndarray
) -> np.ndarray:
    """Side-by-side RGB picture with a line per inlier (centres in each image's pixels)."""
    height = max(image_a.shape[0], image_b.shape[0])
    canvas = np.zeros((height, image_a.shape[1] + image_b.shape[1], 3), np.uint8)
    canvas[: image_a.shape[0], : image_a.shape[1]] = image_a
    canvas[: image_b.shape[0], image_a.shape[1] :] = image_b
    offset = np.array([image_a.shape[1], 0.0])
    for pa, pb in zip(points_a, points_b, strict=True):
        start = tuple(int(round(v)) for v in pa)
        end = tuple(int(round(v)) for v in pb + offset)
        cv2.line(canvas, start, end, (0, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, start, 3, (255, 0, 0), -1)
        cv2.circle(canvas, end, 3, (255, 0, 0), -1)
    return canvas
