"""Slow, obvious float64 references for the losses, written from the papers.

Tuple losses take ONE tuple ``(T, D)`` (row 0 the query, row 1 the positive, the rest
negatives) and return its loss; ranking losses take ONE query's score and label lists.
The batch loops are the caller's. Everything is plain Python loops over float64 values.
"""

import math

import numpy as np


def _distance(a, b, eps=0.0):
    """Euclidean distance ||a - b + eps|| (cirtorch adds eps to every coordinate)."""
    return math.sqrt(sum((float(a[k]) - float(b[k]) + eps) ** 2 for k in range(len(a))))


def contrastive(tuple_, margin=0.7, eps=1e-6):
    """Radenović et al.: 1/2 d(q, p)^2 + sum over negatives of 1/2 max(0, margin - d(q, n))^2."""
    x = np.asarray(tuple_, np.float64)
    query = x[0]
    loss = 0.5 * _distance(query, x[1], eps) ** 2
    for negative in x[2:]:
        loss += 0.5 * max(0.0, margin - _distance(query, negative, eps)) ** 2
    return loss


def triplet(tuple_, margin=0.1):
    """Sum over negatives of max(0, d(q, p)^2 - d(q, n)^2 + margin), squared distances."""
    x = np.asarray(tuple_, np.float64)
    query = x[0]
    positive = _distance(query, x[1]) ** 2
    loss = 0.0
    for negative in x[2:]:
        loss += max(0.0, positive - _distance(query, negative) ** 2 + margin)
    return loss


def quantized_average_precision(scores, labels, num_bins=25, min_score=0.0, max_score=1.0):
    """Revaud et al. ICCV 2019, eq. 5-8, for one query.

    Bin centres b_m = max - (m - 1) * step, step = (max - min) / (M - 1), highest first;
    each score (clamped to [min, max], as the authors' code does by saturating the two end
    bins) belongs to bin m with weight max(0, 1 - |s - b_m| / step). Soft counts per bin,
    precision at bin m = positives in bins 1..m / items in bins 1..m, recall increment at
    m = positives in bin m / all positives; AP = sum_m precision_m * increment_m.
    Returns 0 for a query without positives. Items with label None are skipped (padding).
    """
    step = (max_score - min_score) / (num_bins - 1)
    centers = [max_score - m * step for m in range(num_bins)]
    counts = [0.0] * num_bins
    positive_counts = [0.0] * num_bins
    num_positives = 0
    for score, label in zip(scores, labels, strict=True):
        if label is None:
            continue
        s = min(max(float(score), min_score), max_score)
        num_positives += int(label)
        for m, center in enumerate(centers):
            weight = max(0.0, 1.0 - abs(s - center) / step)
            counts[m] += weight
            positive_counts[m] += weight * int(label)
    if num_positives == 0:
        return 0.0
    ap = 0.0
    seen, seen_positive = 0.0, 0.0
    for m in range(num_bins):
        seen += counts[m]
        seen_positive += positive_counts[m]
        precision = seen_positive / seen if seen > 0 else 0.0
        ap += precision * positive_counts[m] / num_positives
    return ap


def exact_average_precision(scores, labels):
    """Non-interpolated AP of one ranking with distinct scores: mean precision at each hit."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            total += hits / rank
    return total / hits


def nra(scores, labels, valid=None, temperature=0.05, eps=1e-6):
    """DARAC's NRA term for one query, in the reading documented in losses.nra_loss.

    Hardest positive: -tau * log(mean_p exp(-s_p / tau)); hardest negative:
    tau * log(mean_n exp(s_n / tau)); each mapped to (0, 1) by (1 + s) / 2 and clipped to
    [eps, 1 - eps]; loss -log(p) - log(1 - n), a missing side contributing 0.
    """
    positives, negatives = [], []
    for j, (score, label) in enumerate(zip(scores, labels, strict=True)):
        if valid is not None and not valid[j]:
            continue
        (positives if label else negatives).append(float(score))
    loss = 0.0
    if positives:
        mean = sum(math.exp(-s / temperature) for s in positives) / len(positives)
        hardest = -temperature * math.log(mean)
        loss -= math.log(min(max((1.0 + hardest) / 2.0, eps), 1.0 - eps))
    if negatives:
        mean = sum(math.exp(s / temperature) for s in negatives) / len(negatives)
        hardest = temperature * math.log(mean)
        loss -= math.log(1.0 - min(max((1.0 + hardest) / 2.0, eps), 1.0 - eps))
    return loss


def cross_entropy(logits, label, label_smoothing=0.0):
    """-sum_k t_k log softmax(logits)_k with t = (1 - a) one_hot + a / K."""
    logits = [float(v) for v in logits]
    num_classes = len(logits)
    top = max(logits)
    log_normaliser = top + math.log(sum(math.exp(v - top) for v in logits))
    loss = 0.0
    for k, value in enumerate(logits):
        target = (1.0 - label_smoothing) * (k == label) + label_smoothing / num_classes
        loss -= target * (value - log_normaliser)
    return loss


def cosine_margin_logits(embedding, class_centers, label=None, scale=30.0, margin=0.15):
    """ArcFace (Deng et al. CVPR 2019) logits of one embedding.

    cos(theta_k) between the normalised embedding and each normalised centre; the true
    class gets cos(theta + m), or cos(theta) - m sin(m) once theta + m would pass pi (the
    authors' code keeps the logit decreasing in theta that way); all times the scale.
    """
    e = np.asarray(embedding, np.float64)
    e = e / math.sqrt(sum(v * v for v in e))
    out = []
    for k, center in enumerate(np.asarray(class_centers, np.float64)):
        c = center / math.sqrt(sum(v * v for v in center))
        cosine = min(max(sum(float(e[d]) * float(c[d]) for d in range(len(e))), -1.0), 1.0)
        if label is not None and k == label:
            theta = math.acos(cosine)
            if theta + margin <= math.pi:
                cosine = math.cos(theta + margin)
            else:
                cosine = cosine - margin * math.sin(margin)
        out.append(scale * cosine)
    return np.array(out)
