"""Training losses for global descriptors, and the cosine-margin classification logits.

Descriptors are rows and assumed L2-normalised (similarity is the dot product). Two input
layouts:

* **Tuples** ``(B, T, D)``: ``B`` tuples of ``T`` descriptors each, row 0 the query, row 1
  its positive, rows 2.. its negatives (cirtorch packs the same tuples as columns
  ``q, p, n1, ...`` with labels ``-1, 1, 0, ...``). :func:`contrastive_loss` and
  :func:`triplet_loss` take this form; :func:`tuple_similarities` turns it into the
  second form.
* **Score lists** ``(Q, N)``: each query's similarities to ``N`` list items, a boolean or
  0/1 ``labels`` matrix marking its positives, and an optional boolean ``valid`` mask for
  padded lists (a padded item counts as neither positive nor negative).
  :func:`average_precision_loss` and :func:`nra_loss` take this form.

``reduction`` is ``"sum"`` (cirtorch's convention: the sum over the batch),
``"mean"`` (the average over the batch, independent of its size) or ``"none"`` (the
per-tuple / per-query / per-example losses). Inputs are computed in float32 (float64 if
given float64). Every loss is finite, and has finite gradients, at coinciding descriptors,
tied scores and queries without positives: square roots and logarithms only ever see
arguments bounded away from 0 (or are masked with the double-``where`` pattern). Nothing
here is jitted; ``margin``, ``temperature``, ``scale`` and ``label_smoothing`` are traced,
``num_bins`` and ``reduction`` are static.
"""

import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxretrieval.array_types import AnyArray, Array, Bool, Float, Int, Scalar

_REDUCTIONS = ("sum", "mean", "none")

_Labels = Bool[AnyArray, "Q N"] | Int[AnyArray, "Q N"]
_LossValue = Float[Array, ""] | Float[Array, " B"]


# --------------------------------------------------------------------------- helpers


def _as_float(name: str, argument: str, x: AnyArray) -> Array:
    """``x`` as float32 (float64 stays float64); TypeError for a non-floating dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} expects floating {argument}, got dtype {x.dtype}.")
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, found {reduction!r}.")


def _check_tuples(name: str, tuples: AnyArray, min_size: int) -> Array:
    tuples = _as_float(name, "tuples", tuples)
    if tuples.ndim != 3 or tuples.shape[1] < min_size:
        raise ValueError(
            f"{name} expects tuples (B, T, D) with T >= {min_size} (query, positive, "
            f"negatives), found shape {tuples.shape}."
        )
    return tuples


def _check_ranking(
    name: str, scores: AnyArray, labels: AnyArray, valid: AnyArray | None
) -> tuple[Array, Array, Array]:
    """Validates a ``(Q, N)`` score list; returns float scores, positive and negative masks."""
    scores = _as_float(name, "scores", scores)
    labels = jnp.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"{name} expects scores (Q, N) and labels of the same shape, found scores "
            f"{scores.shape} and labels {labels.shape}."
        )
    if not (labels.dtype == jnp.bool_ or jnp.issubdtype(labels.dtype, jnp.integer)):
        raise TypeError(f"{name} expects boolean or 0/1 integer labels, got dtype {labels.dtype}.")
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    else:
        valid = jnp.asarray(valid)
        if valid.shape != scores.shape:
            raise ValueError(
                f"{name}: valid must have the shape of scores {scores.shape}, found {valid.shape}."
            )
        if valid.dtype != jnp.bool_:
            raise TypeError(f"{name}: valid must be boolean, got dtype {valid.dtype}.")
    labels = labels if labels.dtype == jnp.bool_ else labels != 0
    positive = labels & valid  # (Q, N)
    negative = ~labels & valid  # (Q, N)
    return scores, positive, negative


def _reduce(losses: Array, reduction: str, counted: Array | None = None) -> Array:
    """Sums or averages per-item losses, over the ``counted`` items only when given."""
    if reduction == "none":
        return losses
    if counted is None:
        return jnp.sum(losses) if reduction == "sum" else jnp.mean(losses)
    weights = counted.astype(losses.dtype)
    total = jnp.sum(losses * weights)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def _safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf or NaN) where ``x <= 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _unit_rows(x: Array, eps: float = 1e-12) -> Array:
    """Rows scaled to unit norm, with a finite gradient even at an all-zero row."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)  # (N, 1)
    return x * lax.rsqrt(jnp.maximum(squared, eps))


def _log_mean_exp(x: Array, mask: Array) -> Array:
    """``log(mean(exp(x)))`` over the True entries of each row; finite for any row.

    A row without any True entry gets the value over all its entries (for the caller to
    discard); this keeps the forward and the gradient of the discarded rows finite.
    """
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)  # (Q, N)
    top = lax.stop_gradient(jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True))
    shifted = jnp.where(mask, x - top, 0.0)  # (Q, N); <= 0 where it counts
    total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1)  # (Q,), >= 1
    count = jnp.sum(mask, axis=-1).astype(x.dtype)  # (Q,)
    return jnp.log(total / count) + top[:, 0]


# --------------------------------------------------------------------------- tuple losses


def contrastive_loss(
    tuples: Float[AnyArray, "B T D"],
    *,
    margin: Scalar = 0.7,
    eps: Scalar = 1e-6,
    reduction: str = "sum",
) -> _LossValue:
    """Contrastive loss of query-positive-negatives tuples (cirtorch's definition).

    With ``d(q, x) = ||q - x + eps||`` (``eps`` added to every coordinate, as cirtorch
    does), each tuple's loss is ``1/2 d(q, p)^2 + sum_n 1/2 max(0, margin - d(q, n))^2``.
    The positive term is computed from the squared distance directly and the square root
    of the negative terms is guarded, so the loss and its gradient stay finite when a
    descriptor coincides with the query.

    Args:
      tuples: L2-normalised descriptors, row 0 the query, row 1 the positive, the rest
        negatives (``T >= 2``).
      margin: Distance beyond which negatives cost nothing (traced).
      eps: Added to every coordinate of the difference, as cirtorch.
      reduction: ``"sum"`` over tuples (cirtorch), ``"mean"`` over tuples, or ``"none"``
        for the ``(B,)`` per-tuple losses (static).

    Returns:
      The reduced loss, or per-tuple losses.

    Raises:
      ValueError: If ``tuples`` is not ``(B, T, D)`` with ``T >= 2``, or for an unknown
        reduction.
      TypeError: If ``tuples`` is not floating.

    References:
      Radenović, Tolias, Chum. Fine-tuning CNN image retrieval with no human annotation.
      TPAMI 2018. Hadsell, Chopra, LeCun. Dimensionality reduction by learning an
      invariant mapping. CVPR 2006.

    Examples:
      >>> import jax.numpy as jnp
      >>> tuples = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # q, p, n = q
      >>> round(float(contrastive_loss(tuples, eps=0.0)), 4)  # 1/2 * 2 + 1/2 * 0.7^2
      1.245
    """
    _check_reduction("contrastive_loss", reduction)
    tuples = _check_tuples("contrastive_loss", tuples, 2)
    margin = jnp.asarray(margin, tuples.dtype)
    eps = jnp.asarray(eps, tuples.dtype)
    difference = tuples[:, :1] - tuples[:, 1:] + eps  # (B, T-1, D)
    squared = jnp.sum(difference * difference, axis=-1)  # (B, T-1)
    positive = 0.5 * squared[:, 0]  # (B,)
    shortfall = jnp.maximum(margin - _safe_sqrt(squared[:, 1:]), 0.0)  # (B, T-2)
    negative = 0.5 * jnp.sum(shortfall * shortfall, axis=-1)  # (B,)
    return _reduce(positive + negative, reduction)


def triplet_loss(
    tuples: Float[AnyArray, "B T D"], *, margin: Scalar = 0.1, reduction: str = "sum"
) -> _LossValue:
    """Triplet (margin ranking) loss on squared distances, summed over each tuple's negatives.

    Each tuple's loss is ``sum_n max(0, ||q - p||^2 - ||q - n||^2 + margin)``: the
    query-positive pair is compared with every negative, as cirtorch's ``triplet_loss``.
    No square root is taken.

    Args:
      tuples: L2-normalised descriptors, row 0 the query, row 1 the positive, the rest
        negatives (``T >= 3``).
      margin: Required gap between the squared negative and positive distances (traced).
      reduction: ``"sum"`` over tuples (cirtorch), ``"mean"`` over tuples, or ``"none"``
        (static).

    Returns:
      The reduced loss, or per-tuple losses.

    Raises:
      ValueError: If ``tuples`` is not ``(B, T, D)`` with ``T >= 3``, or for an unknown
        reduction.
      TypeError: If ``tuples`` is not floating.

    References:
      Schroff, Kalenichenko, Philbin. FaceNet: a unified embedding for face recognition
      and clustering. CVPR 2015. Radenović, Tolias, Chum, TPAMI 2018 (cirtorch).
    """
    _check_reduction("triplet_loss", reduction)
    tuples = _check_tuples("triplet_loss", tuples, 3)
    margin = jnp.asarray(margin, tuples.dtype)
    difference = tuples[:, :1] - tuples[:, 1:]  # (B, T-1, D)
    squared = jnp.sum(difference * difference, axis=-1)  # (B, T-1)
    hinge = jnp.maximum(squared[:, :1] - squared[:, 1:] + margin, 0.0)  # (B, T-2)
    return _reduce(jnp.sum(hinge, axis=-1), reduction)


def tuple_similarities(
    tuples: Float[AnyArray, "B T D"],
) -> tuple[Float[Array, "B T-1"], Bool[Array, "B T-1"]]:
    """Turns tuples into score lists: each query's similarities to the rest of its tuple.

    Lets the listwise losses train on cirtorch-style tuple batches, e.g.
    ``nra_loss(*tuple_similarities(tuples))``.

    Args:
      tuples: L2-normalised descriptors, row 0 the query, row 1 the positive, the rest
        negatives (``T >= 2``).

    Returns:
      ``(similarities, positive_mask)``: dot products of the query with rows ``1..T-1``,
      and a mask that is True in column 0 (the positive) only.

    Raises:
      ValueError: If ``tuples`` is not ``(B, T, D)`` with ``T >= 2``.
      TypeError: If ``tuples`` is not floating.
    """
    tuples = _check_tuples("tuple_similarities", tuples, 2)
    similarities = jnp.einsum(
        "bd,btd->bt", tuples[:, 0], tuples[:, 1:], precision=lax.Precision.HIGHEST
    )  # (B, T-1)
    positive_mask = jnp.zeros(similarities.shape, bool).at[:, 0].set(True)  # (B, T-1)
    return similarities, positive_mask


# --------------------------------------------------------------------------- listwise


def _quantized_average_precision(
    scores: Array,
    positive: Array,
    negative: Array,
    num_bins: int,
    min_score: Scalar,
    max_score: Scalar,
) -> tuple[Array, Array]:
    """Per-query histogram AP and whether the query has a positive, both ``(Q,)``."""
    dtype = scores.dtype
    low = jnp.asarray(min_score, dtype)
    high = jnp.asarray(max_score, dtype)
    step = (high - low) / (num_bins - 1)
    centers = high - step * jnp.arange(num_bins, dtype=dtype)  # (M,), highest first
    clipped = jnp.clip(scores, low, high)  # (Q, N)
    # Triangular kernel: each item spreads unit mass over the two bins around its score.
    membership = jnp.maximum(
        1.0 - jnp.abs(clipped[:, None, :] - centers[None, :, None]) / step, 0.0
    )  # (Q, M, N)
    positive = positive.astype(dtype)[:, None, :]  # (Q, 1, N)
    listed = (positive + negative.astype(dtype)[:, None, :]) * membership  # (Q, M, N)
    counts = jnp.sum(listed, axis=-1)  # (Q, M)
    positive_counts = jnp.sum(positive * membership, axis=-1)  # (Q, M)
    seen = jnp.cumsum(counts, axis=-1)  # (Q, M)
    seen_positive = jnp.cumsum(positive_counts, axis=-1)  # (Q, M)
    nonempty = seen > 0
    precision = jnp.where(nonempty, seen_positive / jnp.where(nonempty, seen, 1.0), 0.0)
    num_positives = jnp.sum(positive[:, 0], axis=-1)  # (Q,)
    has_positive = num_positives > 0
    recall_step = positive_counts / jnp.where(has_positive, num_positives, 1.0)[:, None]  # (Q, M)
    average_precision = jnp.sum(precision * recall_step, axis=-1)  # (Q,)
    return jnp.where(has_positive, average_precision, 0.0), has_positive


def _check_bins(name: str, num_bins: int, min_score: Scalar, max_score: Scalar) -> None:
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"{name}: num_bins must be an integer >= 2, found {num_bins!r}.")
    if isinstance(min_score, int | float) and isinstance(max_score, int | float):
        if not max_score > min_score:
            raise ValueError(
                f"{name}: max_score must exceed min_score, found min_score={min_score} "
                f"and max_score={max_score}."
            )


def quantized_average_precision(
    scores: Float[AnyArray, "Q N"],
    labels: _Labels,
    *,
    num_bins: int = 25,
    min_score: Scalar = 0.0,
    max_score: Scalar = 1.0,
    valid: Bool[AnyArray, "Q N"] | None = None,
) -> Float[Array, " Q"]:
    """Differentiable average precision of each query, from soft score histograms.

    ``M = num_bins`` bin centres ``b_m`` evenly spaced from ``max_score`` down to
    ``min_score`` (step ``Δ``); an item with score ``s`` adds ``max(0, 1 - |s - b_m| / Δ)``
    to bin ``m`` (scores are first clamped to ``[min_score, max_score]``, which is what the
    authors' code does by saturating the two end bins). With ``c_m`` and ``c+_m`` the soft
    counts of all and of positive items in bin ``m``, precision at ``m`` is
    ``sum_{m'<=m} c+_{m'} / sum_{m'<=m} c_{m'}``, the recall step is ``c+_m / #positives``,
    and ``AP = sum_m precision_m * recall_step_m``. It equals the exact AP when every item
    sits alone on a bin centre. Otherwise it is an approximation that finer bins do not
    make exact: an item between two centres is split over both bins, and the split part
    in the upper bin sees a precision computed with only a fraction of itself.

    A query without any (valid) positive has no AP; it gets 0 here, and
    :func:`average_precision_loss` leaves such queries out of its reduction.

    Args:
      scores: Similarities of each query to its list items (e.g. cosine, in [-1, 1]).
      labels: True (or 1) for the positives of each query.
      num_bins: Number of histogram bins ``M`` (static; the paper uses 20-25).
      min_score: Centre of the lowest bin; lower scores count as this score.
      max_score: Centre of the highest bin; higher scores count as this score.
      valid: Optional mask of real (non-padding) list items; padding counts for nothing.

    Returns:
      Per-query quantised AP in [0, 1].

    Raises:
      ValueError: For mismatched shapes, ``num_bins < 2`` or ``max_score <= min_score``.
      TypeError: For non-floating scores, floating labels or a non-boolean ``valid``.

    References:
      Revaud, Almazán, Rezende, de Souza. Learning with average precision: training image
      retrieval with a listwise loss. ICCV 2019.

    Examples:
      >>> import jax.numpy as jnp
      >>> scores = jnp.array([[1.0, 0.5, 0.0]])  # each on its own bin centre
      >>> ap = quantized_average_precision(scores, jnp.array([[1, 0, 1]]), num_bins=3)
      >>> round(float(ap[0]), 4)  # (1/1 + 2/3) / 2
      0.8333
    """
    name = "quantized_average_precision"
    _check_bins(name, num_bins, min_score, max_score)
    scores, positive, negative = _check_ranking(name, scores, labels, valid)
    average_precision, _ = _quantized_average_precision(
        scores, positive, negative, num_bins, min_score, max_score
    )
    return average_precision


def average_precision_loss(
    scores: Float[AnyArray, "Q N"],
    labels: _Labels,
    *,
    num_bins: int = 25,
    min_score: Scalar = 0.0,
    max_score: Scalar = 1.0,
    valid: Bool[AnyArray, "Q N"] | None = None,
    reduction: str = "mean",
) -> Float[Array, ""] | Float[Array, " Q"]:
    """Listwise AP loss: ``1 - AP`` of the quantised (histogram) average precision.

    See :func:`quantized_average_precision` for the AP. Queries without any valid
    positive are masked out: they get loss 0 under ``"none"``, add nothing to ``"sum"``,
    and are left out of the count of ``"mean"`` (a batch without any positive gives 0).

    Args:
      scores: Similarities of each query to its list items.
      labels: True (or 1) for the positives of each query.
      num_bins: Number of histogram bins (static).
      min_score: Centre of the lowest bin.
      max_score: Centre of the highest bin.
      valid: Optional mask of real (non-padding) list items.
      reduction: ``"mean"`` (``1 - mAP``, the paper), ``"sum"`` or ``"none"`` (static).

    Returns:
      The reduced loss, or the ``(Q,)`` per-query losses.

    Raises:
      ValueError: For mismatched shapes, bad bins or an unknown reduction.
      TypeError: For non-floating scores, floating labels or a non-boolean ``valid``.

    References:
      Revaud, Almazán, Rezende, de Souza. Learning with average precision: training image
      retrieval with a listwise loss. ICCV 2019.
    """
    name = "average_precision_loss"
    _check_reduction(name, reduction)
    _check_bins(name, num_bins, min_score, max_score)
    scores, positive, negative = _check_ranking(name, scores, labels, valid)
    average_precision, has_positive = _quantized_average_precision(
        scores, positive, negative, num_bins, min_score, max_score
    )
    losses = jnp.where(has_positive, 1.0 - average_precision, 0.0)  # (Q,)
    return _reduce(losses, reduction, has_positive)


def nra_loss(
    scores: Float[AnyArray, "Q N"],
    labels: _Labels,
    *,
    temperature: Scalar = 0.05,
    eps: Scalar = 1e-6,
    valid: Bool[AnyArray, "Q N"] | None = None,
    reduction: str = "mean",
) -> Float[Array, ""] | Float[Array, " Q"]:
    """NRA loss of DARAC: log-loss on each query's hardest positive and hardest negative.

    The poster defines ``J = -1/m sum_i [log(s+_{i,max}) + log(1 - s-_{i,min})]`` over
    ``m`` queries, with smooth approximations of the hardest positive and hardest negative
    similarities mapped into (0, 1), and gives nothing more. Our reading: the subscripts
    name what the loss drives each term to (the hardest positive up, the hardest negative
    down), and for query ``i``

    * hardest positive ``h+ = -τ log(mean_p exp(-s_p / τ))``, a soft minimum over the
      positives; hardest negative ``h- = τ log(mean_n exp(s_n / τ))``, a soft maximum over
      the negatives. Using the mean (not the sum) inside the log keeps each value between
      the hard extreme and the plain mean, so within [-1, 1]; ``τ -> 0`` gives the hard
      min and max, ``τ -> inf`` the means;
    * ``s+ = (1 + h+) / 2`` and ``s- = (1 + h-) / 2``, clipped to ``[eps, 1 - eps]``;
    * ``J_i = -log(s+) - log(1 - s-)``.

    So the loss is about ``2 eps`` when every positive has similarity 1 and every negative
    -1, and ``-2 log(eps)`` when reversed. A query with no valid positive (or no valid
    negative) drops that term; a query with no valid item at all (a padded row) is left
    out of the reduction.

    Args:
      scores: Similarities (dot products of L2-normalised descriptors, in [-1, 1]) of each
        query to its list items. For cirtorch-style tuples use :func:`tuple_similarities`.
      labels: True (or 1) for the positives of each query; the other valid items are its
        negatives.
      temperature: ``τ`` of the soft minimum and maximum (traced; > 0).
      eps: Clipping of the mapped similarities away from 0 and 1.
      valid: Optional mask of real (non-padding) list items.
      reduction: ``"mean"`` over queries (the poster's ``1/m``), ``"sum"`` or ``"none"``
        (static).

    Returns:
      The reduced loss, or the ``(Q,)`` per-query losses.

    Raises:
      ValueError: For mismatched shapes, a non-positive Python ``temperature`` or an
        unknown reduction.
      TypeError: For non-floating scores, floating labels or a non-boolean ``valid``.

    References:
      Schall et al. The DARAC poster (the project's copy), which defines the NRA loss by
      the formula above only; the soft extremes and the mapping are our reading.
    """
    name = "nra_loss"
    _check_reduction(name, reduction)
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"{name}: temperature must be positive, found {temperature}.")
    scores, positive, negative = _check_ranking(name, scores, labels, valid)
    dtype = scores.dtype
    temperature = jnp.asarray(temperature, dtype)
    eps = jnp.asarray(eps, dtype)
    hardest_positive = -temperature * _log_mean_exp(-scores / temperature, positive)  # (Q,)
    hardest_negative = temperature * _log_mean_exp(scores / temperature, negative)  # (Q,)
    positive_probability = jnp.clip(0.5 * (1.0 + hardest_positive), eps, 1.0 - eps)
    negative_probability = jnp.clip(0.5 * (1.0 + hardest_negative), eps, 1.0 - eps)
    has_positive = jnp.any(positive, axis=-1)  # (Q,)
    has_negative = jnp.any(negative, axis=-1)  # (Q,)
    losses = -(
        jnp.where(has_positive, jnp.log(positive_probability), 0.0)
        + jnp.where(has_negative, jnp.log1p(-negative_probability), 0.0)
    )  # (Q,)
    return _reduce(losses, reduction, has_positive | has_negative)


# --------------------------------------------------------------------------- classification


def _check_class_labels(name: str, labels: AnyArray, batch: int) -> Array:
    labels = jnp.asarray(labels)
    if labels.shape != (batch,):
        raise ValueError(f"{name}: labels must have shape ({batch},), found {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name} expects integer class labels, got dtype {labels.dtype}.")
    return labels


def classification_loss(
    logits: Float[AnyArray, "B K"],
    labels: Int[AnyArray, " B"],
    *,
    label_smoothing: Scalar = 0.0,
    reduction: str = "mean",
) -> _LossValue:
    """Softmax cross-entropy with integer class labels and optional label smoothing.

    The targets are ``(1 - a) * one_hot(label) + a / K`` (:func:`optax.smooth_labels`),
    the loss :func:`optax.softmax_cross_entropy`. Labels outside ``[0, K)`` cannot be
    checked under jit; they give an all-zero one-hot row (loss ``a * mean(-log_softmax)``).

    Args:
      logits: Unnormalised class scores, e.g. from :func:`cosine_margin_logits`.
      labels: Class index of each example.
      label_smoothing: ``a`` in [0, 1] (traced).
      reduction: ``"mean"`` over the batch, ``"sum"`` or ``"none"`` (static).

    Returns:
      The reduced loss, or the ``(B,)`` per-example losses.

    Raises:
      ValueError: For mismatched shapes or an unknown reduction.
      TypeError: For non-floating logits or non-integer labels.

    References:
      Szegedy et al. Rethinking the Inception architecture for computer vision. CVPR 2016
      (label smoothing); Noh et al. Large-scale image retrieval with attentive deep local
      features. ICCV 2017 (classification fine-tuning of DELF).
    """
    name = "classification_loss"
    _check_reduction(name, reduction)
    logits = _as_float(name, "logits", logits)
    if logits.ndim != 2:
        raise ValueError(
            f"{name} expects logits (B, K), found shape {logits.shape} "
            f"(labels {jnp.shape(labels)})."
        )
    labels = _check_class_labels(name, labels, logits.shape[0])
    targets = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)  # (B, K)
    targets = optax.smooth_labels(targets, jnp.asarray(label_smoothing, logits.dtype))
    return _reduce(optax.softmax_cross_entropy(logits, targets), reduction)


def cosine_margin_logits(
    embeddings: Float[AnyArray, "B D"],
    class_centers: Float[AnyArray, "K D"],
    labels: Int[AnyArray, " B"] | None = None,
    *,
    scale: Scalar = 30.0,
    margin: Scalar = 0.15,
) -> Float[Array, "B K"]:
    """ArcFace logits: scaled cosines, with an additive angular margin on the true class.

    Both the embeddings and the class centres are L2-normalised here (a no-op for
    normalised embeddings), so ``cos θ_k`` is a true cosine. The logit of the true class
    is ``scale * cos(θ + margin)``, computed as ``cos θ cos m - sin θ sin m`` with a
    guarded ``sin θ = sqrt(1 - cos² θ)`` (no ``arccos``, finite gradients at ``cos θ = ±1``).
    Past ``θ = π - margin``, where ``cos(θ + m)`` would turn back up, it continues as
    ``cos θ - m sin m`` (the authors' code), so the logit keeps falling with ``θ``. The
    other logits are ``scale * cos θ_k``; with ``labels=None`` (inference) all are.
    Train with :func:`classification_loss` on the result.

    Args:
      embeddings: Descriptors, normally L2-normalised already.
      class_centers: One learned centre per class (any norm).
      labels: Class index of each embedding, or None for plain scaled cosines.
      scale: ``s``, the inverse temperature of the softmax (traced).
      margin: ``m``, the additive angular margin in radians (traced).

    Returns:
      Logits.

    Raises:
      ValueError: For mismatched shapes.
      TypeError: For non-floating embeddings or centres, or non-integer labels.

    References:
      Deng, Guo, Xue, Zafeiriou. ArcFace: additive angular margin loss for deep face
      recognition. CVPR 2019. Weyand et al. Google Landmarks Dataset v2. CVPR 2020.
    """
    name = "cosine_margin_logits"
    embeddings = _as_float(name, "embeddings", embeddings)
    class_centers = _as_float(name, "class_centers", class_centers)
    if (
        embeddings.ndim != 2
        or class_centers.ndim != 2
        or embeddings.shape[1] != class_centers.shape[1]
    ):
        raise ValueError(
            f"{name} expects embeddings (B, D) and class_centers (K, D), found "
            f"{embeddings.shape} and {class_centers.shape}."
        )
    both_double = embeddings.dtype == class_centers.dtype == jnp.float64
    dtype = jnp.float64 if both_double else jnp.float32
    embeddings = _unit_rows(embeddings.astype(dtype))  # (B, D)
    class_centers = _unit_rows(class_centers.astype(dtype))  # (K, D)
    cosines = jnp.einsum(
        "bd,kd->bk", embeddings, class_centers, precision=lax.Precision.HIGHEST
    )  # (B, K)
    cosines = jnp.clip(cosines, -1.0, 1.0)
    scale = jnp.asarray(scale, dtype)
    if labels is None:
        return scale * cosines
    labels = _check_class_labels(name, labels, embeddings.shape[0])
    margin = jnp.asarray(margin, dtype)
    sines = _safe_sqrt(1.0 - cosines * cosines)  # (B, K)
    shifted = cosines * jnp.cos(margin) - sines * jnp.sin(margin)  # cos(θ + m)
    fallback = cosines - margin * jnp.sin(margin)
    shifted = jnp.where(cosines > jnp.cos(math.pi - margin), shifted, fallback)  # (B, K)
    target = jax.nn.one_hot(labels, class_centers.shape[0], dtype=bool)  # (B, K)
    return scale * jnp.where(target, shifted, cosines)
