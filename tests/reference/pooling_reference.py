"""Slow, obvious float64 references for the global poolings, written from the papers.

Every function takes one NHWC map ``(H, W, C)`` (a single image: the batch loop is the
caller's) plus an optional boolean ``(H, W)`` mask, and loops over pixels and channels.
"""

import math
from fractions import Fraction

import numpy as np


def _pixels(x, valid):
    """The list of (C,) activation vectors of the valid pixels, row-major."""
    x = np.asarray(x, np.float64)
    height, width, _ = x.shape
    out = []
    for i in range(height):
        for j in range(width):
            if valid is None or valid[i, j]:
                out.append(x[i, j])
    return out


def spoc(x, valid=None):
    pixels = _pixels(x, valid)
    total = np.zeros(np.asarray(x).shape[-1])
    for v in pixels:
        total = total + v
    return total / len(pixels)


def mac(x, valid=None):
    pixels = _pixels(x, valid)
    best = np.full(np.asarray(x).shape[-1], -np.inf)
    for v in pixels:
        best = np.maximum(best, v)
    return best


def gem(x, p=3.0, eps=1e-6, valid=None):
    pixels = _pixels(x, valid)
    channels = np.asarray(x).shape[-1]
    out = np.zeros(channels)
    for c in range(channels):
        total = 0.0
        for v in pixels:
            total += max(v[c], eps) ** p
        out[c] = (total / len(pixels)) ** (1.0 / p)
    return out


def rmac_regions(height, width, levels=3):
    """R-MAC square regions (top, left, size) for an ``height x width`` map.

    From Tolias et al. ICLR 2016, section 3: at level ``l`` squares of side
    ``floor(2 * min(H, W) / (l + 1))``; ``l`` squares along the short side and ``l + m``
    along the long side, where ``m`` in 1..6 is chosen so that consecutive squares at level
    1 overlap by as close to 40% as possible; positions are spread uniformly and rounded
    down. The whole map is region 0. Exact fractions, so no float rounding decides a tie
    (ties go to the smaller m) or a floor.
    """
    short = min(height, width)
    long_ = max(height, width)
    extra = 0
    if height != width:
        best = None
        for steps in range(2, 8):  # 2..7 squares along the long side at level 1
            stride = Fraction(long_ - short, steps - 1)
            overlap = (short * short - short * stride) / (short * short)
            error = abs(overlap - Fraction(2, 5))
            if best is None or error < best:  # first minimum wins
                best = error
                extra = steps - 1
    boxes = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        size = math.floor(Fraction(2 * short, level + 1))
        if size == 0:
            continue
        half = math.floor(Fraction(size, 2) - 1)
        count_w = level + (extra if width > height else 0)
        count_h = level + (extra if height > width else 0)

        def starts(count, extent, size=size, half=half):
            step = Fraction(0) if count == 1 else Fraction(extent - size, count - 1)
            return [math.floor(half + k * step) - half for k in range(count)]

        for top in starts(count_h, height):
            for left in starts(count_w, width):
                boxes.append((top, left, size, size))
    return boxes


def rmac(x, levels=3, eps=1e-6):
    """Sum of the L2-normalised MACs of the R-MAC regions (no final normalisation)."""
    x = np.asarray(x, np.float64)
    height, width, channels = x.shape
    total = np.zeros(channels)
    for top, left, box_h, box_w in rmac_regions(height, width, levels):
        v = mac(x[top : top + box_h, left : left + box_w])
        total = total + v / (np.linalg.norm(v) + eps)
    return total


def ramac(x, levels=3, eps=1e-6):
    """Per region: [MAC / (|MAC| + eps), mean / (|mean| + eps)], rows in grid order."""
    x = np.asarray(x, np.float64)
    rows = []
    for top, left, box_h, box_w in rmac_regions(x.shape[0], x.shape[1], levels):
        region = x[top : top + box_h, left : left + box_w]
        maximum = mac(region)
        average = spoc(region)
        rows.append(
            np.concatenate(
                [
                    maximum / (np.linalg.norm(maximum) + eps),
                    average / (np.linalg.norm(average) + eps),
                ]
            )
        )
    return np.stack(rows)


def crow(x, a=2.0, b=2.0, valid=None):
    """CroW from Kalantidis et al.: spatial weights from the channel sum, channel weights
    log(sum of non-zero fractions / own fraction), 0 for a channel that never fires."""
    x = np.asarray(x, np.float64)
    height, width, channels = x.shape
    if valid is None:
        valid = np.ones((height, width), bool)
    summed = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            if valid[i, j]:
                summed[i, j] = sum(x[i, j, k] for k in range(channels))
    norm = sum(summed[i, j] ** a for i in range(height) for j in range(width)) ** (1.0 / a)
    spatial = np.zeros((height, width))
    if norm > 0:
        spatial = (summed / norm) ** (1.0 / b)
    count = valid.sum()
    fractions = np.array(
        [
            sum(1 for i, j in zip(*np.nonzero(valid), strict=True) if x[i, j, k] != 0) / count
            for k in range(channels)
        ]
    )
    out = np.zeros(channels)
    for k in range(channels):
        weight = np.log(fractions.sum() / fractions[k]) if fractions[k] > 0 else 0.0
        total = 0.0
        for i in range(height):
            for j in range(width):
                total += spatial[i, j] * x[i, j, k]
        out[k] = weight * total
    return out


def cam_weighted(
    x, weights, num_classes, bias=None, normalization="minmax", channel_weighting=True, valid=None
):
    """Jimenez et al. BMVC 2017 for one image: CAMs of the top classes of the GAP
    prediction, normalised, each weighting a sum pooling; CroW channel weights."""
    x = np.asarray(x, np.float64)
    weights = np.asarray(weights, np.float64)
    height, width, channels = x.shape
    if valid is None:
        valid = np.ones((height, width), bool)
    average = spoc(x, valid)
    logits = average @ weights + (0.0 if bias is None else np.asarray(bias, np.float64))
    classes = sorted(range(len(logits)), key=lambda k: (-logits[k], k))[:num_classes]
    fractions = np.array(
        [np.count_nonzero(x[..., k][valid]) / valid.sum() for k in range(channels)]
    )
    channel_weights = np.array([np.log(fractions.sum() / f) if f > 0 else 0.0 for f in fractions])
    out = []
    for k in classes:
        cam = np.zeros((height, width))
        for i in range(height):
            for j in range(width):
                cam[i, j] = sum(weights[c, k] * x[i, j, c] for c in range(channels))
        inside = cam[valid]
        if normalization == "minmax":
            spread = inside.max() - inside.min()
            cam = (cam - inside.min()) / spread if spread > 1e-6 else np.ones_like(cam)
        else:
            cam = np.maximum(cam, 0) / inside.max() if inside.max() > 0 else np.zeros_like(cam)
        cam[~valid] = 0.0
        vector = np.zeros(channels)
        for i in range(height):
            for j in range(width):
                vector += cam[i, j] * x[i, j]
        out.append(vector * channel_weights if channel_weighting else vector)
    return np.stack(out), classes


def darac_regions(height, width, levels=3):
    """DARAC grid as (top, left, bottom, right): R-MAC squares with one extra along the long
    side at every level, whatever the aspect ratio; the transposed grid for portrait maps."""
    short, long_ = min(height, width), max(height, width)
    portrait = height > width
    boxes = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        side = max(1, (2 * short) // (level + 1))
        for i in range(level):  # along the short side
            for j in range(level + 1):  # along the long side
                along_short = 0 if level == 1 else i * (short - side) // (level - 1)
                along_long = j * (long_ - side) // level
                top, left = (along_long, along_short) if portrait else (along_short, along_long)
                boxes.append((top, left, top + side, left + side))
    return boxes


def darac_regional(x, levels=3, eps=1e-6):
    """[MAC / (|MAC| + eps), mean / (|mean| + eps)] of each DARAC region of one real map."""
    x = np.asarray(x, np.float64)
    rows = []
    for top, left, bottom, right in darac_regions(x.shape[0], x.shape[1], levels):
        region = x[top:bottom, left:right]
        maximum, average = mac(region), spoc(region)
        rows.append(
            np.concatenate(
                [
                    maximum / (np.linalg.norm(maximum) + eps),
                    average / (np.linalg.norm(average) + eps),
                ]
            )
        )
    return np.stack(rows)


def darac(regional, weights):
    """sum_r w[r, 0] * max_r + w[r, 1] * avg_r, one region at a time."""
    regional = np.asarray(regional, np.float64)
    channels = regional.shape[-1] // 2
    total = np.zeros(channels)
    for r in range(regional.shape[0]):
        total = total + weights[r][0] * regional[r, :channels]
        total = total + weights[r][1] * regional[r, channels:]
    return total
