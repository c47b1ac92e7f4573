"""Slow, obvious NumPy references for the DELF functions (loops, float64)."""

import numpy as np


def attention_pooling_reference(features, scores, valid=None, normalize_features=True):
    """Mean over valid cells of score * (normalised) feature, one loop per cell."""
    features = np.asarray(features, np.float64)
    scores = np.asarray(scores, np.float64)
    batch, height, width, channels = features.shape
    valid = np.ones((batch, height, width), bool) if valid is None else np.asarray(valid)
    out = np.zeros((batch, channels))
    for b in range(batch):
        total, count = np.zeros(channels), 0
        for i in range(height):
            for j in range(width):
                if not valid[b, i, j]:
                    continue
                f = features[b, i, j]
                if normalize_features:
                    f = f / max(np.linalg.norm(f), 1e-6)
                total += scores[b, i, j] * f
                count += 1
        out[b] = total / max(count, 1)
    return out


def mutual_nearest_neighbors_reference(a, b, valid_a, valid_b, max_distance=None, max_ratio=None):
    """For each row of a: (index in b, matched) by brute-force distances."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    result = []
    for i in range(len(a)):
        if not valid_a[i] or not np.any(valid_b):
            result.append((0, False))
            continue
        dists = [np.linalg.norm(a[i] - b[j]) if valid_b[j] else np.inf for j in range(len(b))]
        j = int(np.argmin(dists))
        back = [np.linalg.norm(a[k] - b[j]) if valid_a[k] else np.inf for k in range(len(a))]
        ok = int(np.argmin(back)) == i
        if max_distance is not None:
            ok = ok and dists[j] < max_distance
        if max_ratio is not None:
            others = sorted(dists)[1] if len(dists) > 1 else np.inf
            ok = ok and (not np.isfinite(others) or dists[j] < max_ratio * others)
        result.append((j if ok else 0, ok))
    return result


def affine_from_points_reference(points_a, points_b):
    """Solves [x y 1] M = [x' y'] for three points with numpy.linalg.solve."""
    design = np.concatenate([np.asarray(points_a, np.float64), np.ones((3, 1))], axis=1)
    solution = np.linalg.solve(design, np.asarray(points_b, np.float64))  # (3, 2)
    return solution.T  # (2, 3)
