import functools
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxretrieval import losses
from tests.reference import losses_reference as ref

REDUCTIONS = ("none", "sum", "mean")

# Jitted twins for the value tests. Each computes the three reductions at once and takes
# every traced hyperparameter (and the mask) as a positional array, so that one input
# shape is one compile: eager dispatch compiles every small op separately, and each new
# shape, static argument or keyword structure is a new compile, which dominates the
# runtime of this file on a slow CPU. jit == eager is tested explicitly per function.


def _all(fn, *args, **kwargs):
    return {reduction: fn(*args, reduction=reduction, **kwargs) for reduction in REDUCTIONS}


@jax.jit
def _contrastive_jit(tuples, margin, eps):
    return _all(losses.contrastive_loss, tuples, margin=margin, eps=eps)


@jax.jit
def _triplet_jit(tuples, margin):
    return _all(losses.triplet_loss, tuples, margin=margin)


@jax.jit
def _nra_jit(scores, labels, valid, temperature, eps):
    return _all(losses.nra_loss, scores, labels, valid=valid, temperature=temperature, eps=eps)


@jax.jit
def _classification_jit(logits, labels, label_smoothing):
    return _all(losses.classification_loss, logits, labels, label_smoothing=label_smoothing)


@functools.partial(jax.jit, static_argnames="num_bins")
def _ap_jit(scores, labels, valid, min_score, *, num_bins):
    kwargs = {"num_bins": num_bins, "min_score": min_score, "valid": valid}
    out = _all(losses.average_precision_loss, scores, labels, **kwargs)
    out["ap"] = losses.quantized_average_precision(scores, labels, **kwargs)
    return out


def _contrastive(tuples, margin=0.7, eps=1e-6):
    return _contrastive_jit(tuples, margin, eps)


def _triplet(tuples, margin=0.1):
    return _triplet_jit(tuples, margin)


def _nra(scores, labels, valid=None, temperature=0.05, eps=1e-6):
    valid = np.ones(np.shape(scores), bool) if valid is None else valid
    return _nra_jit(scores, labels, valid, temperature, eps)


def _classification(logits, labels, label_smoothing=0.0):
    return _classification_jit(logits, labels, label_smoothing)


def _ap(scores, labels, valid=None, *, num_bins=25, min_score=0.0):
    """The three reductions of the AP loss and the per-query AP ("ap")."""
    valid = np.ones(np.shape(scores), bool) if valid is None else valid
    return _ap_jit(scores, labels, valid, min_score, num_bins=num_bins)


_tuple_similarities = jax.jit(losses.tuple_similarities)
_cosine_margin_jit = jax.jit(losses.cosine_margin_logits)


def _cosine_margin(embeddings, centers, labels=None, scale=30.0, margin=0.15):
    return _cosine_margin_jit(embeddings, centers, labels, scale=scale, margin=margin)


TUPLE_LOSSES = {
    "contrastive": (_contrastive, losses.contrastive_loss, ref.contrastive),
    "triplet": (_triplet, losses.triplet_loss, ref.triplet),
}
TUPLE_SHAPES = [(1, 3, 4), (2, 5, 8), (3, 4, 16)]

# The ranking of the pinned AP golden values (float32, 25 bins in [0, 1]).
GOLDEN_SCORES = np.array(
    [[0.9, 0.8, 0.75, 0.3, 0.2, 0.1], [0.1, 0.95, 0.5, 0.55, 0.4, 0.05]], np.float32
)
GOLDEN_LABELS = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 0]], np.int32)


def _golden_tuples():
    """D=4, T=7: X[i, j] = (7i + 3j) mod 11, columns L2-normalised, as one (1, 7, 4) tuple."""
    x = np.array([[(7 * i + 3 * j) % 11 for j in range(7)] for i in range(4)], np.float64)
    x /= np.linalg.norm(x, axis=0, keepdims=True)
    return x.T[None].astype(np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_tuples(rng, shape, dtype=np.float32):
    return _unit(rng.normal(size=shape)).astype(dtype)


def _random_ranking(rng, num_queries, num_items, low=0.0, high=1.0):
    """Scores in [low, high], labels with 1-3 positives per query."""
    scores = rng.uniform(low, high, size=(num_queries, num_items)).astype(np.float32)
    labels = np.zeros((num_queries, num_items), bool)
    for q in range(num_queries):
        labels[q, rng.choice(num_items, size=rng.integers(1, 4), replace=False)] = True
    return scores, labels


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- tuple losses


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
@pytest.mark.parametrize("shape", TUPLE_SHAPES)
def test_tuple_losses_shapes(name, shape):
    fn, _, _ = TUPLE_LOSSES[name]
    x = _random_tuples(np.random.default_rng(0), shape)
    out = fn(x)
    assert out["none"].shape == (shape[0],) and out["none"].dtype == jnp.float32
    assert out["sum"].shape == out["mean"].shape == ()
    assert out["sum"].dtype == out["mean"].dtype == jnp.float32
    if shape[0] == 1:  # bf16 descriptors are computed in float32
        assert fn(jnp.asarray(x, jnp.bfloat16))["sum"].dtype == jnp.float32


def test_contrastive_loss_cirtorch_golden_value():
    # cirtorch's contrastive_loss(x, label=[-1, 1, 0, 0, 0, 0, 0], margin=0.7, eps=1e-6).
    # Without the 1/2 factors it would be 0.5922; with unsquared terms 0.3848.
    out = _contrastive(_golden_tuples())
    np.testing.assert_allclose(out["sum"], 0.29611428, rtol=0, atol=1e-6)


def test_triplet_loss_cirtorch_golden_value():
    # cirtorch's triplet_loss(x, label, margin=0.1); unsquared distances would give 0.1324.
    np.testing.assert_allclose(_triplet(_golden_tuples())["sum"], 0.12800056, rtol=0, atol=1e-6)


def test_contrastive_loss_known_values():
    # q = (1, 0), p = (0, 1): 1/2 * |q - p|^2 = 1. Negatives: n = q is at distance 0 and
    # costs 1/2 * 0.7^2 = 0.245; n = -q at distance 2 > margin costs nothing.
    tuples = np.array([[[1, 0], [0, 1], [1, 0], [-1, 0]]], np.float32)
    np.testing.assert_allclose(_contrastive(tuples, eps=0.0)["sum"], 1.245, rtol=1e-6)
    np.testing.assert_allclose(_contrastive(tuples, margin=1.0, eps=0.0)["sum"], 1.5, rtol=1e-6)
    # A pair (T = 2) has only the positive term; eps shifts every coordinate of q - p.
    pair = tuples[:, :2]
    np.testing.assert_allclose(_contrastive(pair, eps=0.0)["sum"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        _contrastive(pair, eps=0.5)["sum"], 0.5 * (1.5**2 + 0.5**2), rtol=1e-6
    )


def test_triplet_loss_known_values():
    q, p = [1.0, 0.0], [0.6, 0.8]  # |q - p|^2 = 0.8
    far, equal, near = [0.0, 1.0], [0.6, -0.8], [1.0, 0.0]  # |q - n|^2 = 2, 0.8, 0
    tuples = np.array([[q, p, far, equal, near]], np.float32)
    # max(0, 0.8 - 2 + 0.1) + max(0, 0.1) + max(0, 0.8 + 0.1) = 1.0
    np.testing.assert_allclose(_triplet(tuples)["sum"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(_triplet(tuples, margin=0.0)["sum"], 0.8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_match_reference(name):
    fn, _, reference = TUPLE_LOSSES[name]
    x = _random_tuples(np.random.default_rng(1), (2, 5, 8))
    for margin in (0.1, 0.7, 1.5):
        expected = np.array([reference(x[b], margin=margin) for b in range(2)])
        if margin > 0.5:
            assert np.all(expected > 0)  # the hinges are active
        np.testing.assert_allclose(fn(x, margin=margin)["none"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_reduction(name):
    fn, _, _ = TUPLE_LOSSES[name]
    x = _random_tuples(np.random.default_rng(2), (3, 4, 16))
    out = fn(x, margin=1.2)
    per_tuple = np.asarray(out["none"])
    assert np.all(per_tuple > 0) and np.ptp(per_tuple) > 0
    np.testing.assert_allclose(out["sum"], per_tuple.sum(), rtol=1e-6)
    np.testing.assert_allclose(out["mean"], per_tuple.mean(), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_jit_matches_eager(name):
    jitted, eager, _ = TUPLE_LOSSES[name]
    x = _random_tuples(np.random.default_rng(3), (2, 5, 8))
    np.testing.assert_allclose(
        jitted(x, margin=1.2)["none"], eager(x, margin=1.2, reduction="none"), rtol=1e-6
    )
    # The default reduction is cirtorch's sum.
    np.testing.assert_allclose(eager(x, margin=1.2), jitted(x, margin=1.2)["sum"], rtol=1e-6)


def test_tuple_losses_margin_is_traced():
    x = _random_tuples(np.random.default_rng(4), (2, 5, 8))
    _contrastive(x, margin=1.0)  # compiled for this shape (if not already)
    before = _contrastive_jit._cache_size()
    values = [float(_contrastive(x, margin=m)["sum"]) for m in (1.5, 1.8, 2.0)]
    assert _contrastive_jit._cache_size() == before  # sweeping the margin does not recompile
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_grad(name):
    jitted, _, _ = TUPLE_LOSSES[name]
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(_random_tuples(rng, (2, 5, 8), np.float64))
        check_grads(lambda x: jitted(x, margin=1.2)["sum"], (x,), order=1, modes=("rev",))


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_finite_at_coinciding_descriptors(name):
    fn, _, reference = TUPLE_LOSSES[name]
    x = _random_tuples(np.random.default_rng(6), (2, 5, 8))
    x[:, 1] = x[:, 0]  # positive == query
    x[:, 3] = x[:, 0]  # a negative == query (distance 0)
    # eps = 0 for the contrastive loss: the distance of the coinciding negative is exactly 0.
    for kwargs in ({"eps": 0.0}, {"eps": 1e-6}) if name == "contrastive" else ({},):
        value, grad = jax.value_and_grad(
            lambda x, kwargs=kwargs: fn(x, margin=0.7, **kwargs)["sum"]
        )(x)
        assert _finite((value, grad))
        # The guards change no value: the unguarded float64 reference agrees.
        expected = sum(reference(x[b], margin=0.7, **kwargs) for b in range(2))
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TUPLE_LOSSES))
def test_tuple_losses_raise(name, without_annotation_checks):
    _, fn, _ = TUPLE_LOSSES[name]
    with pytest.raises(ValueError, match=r"\(B, T, D\) with T >= \d .*found shape \(3, 4\)"):
        fn(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"T >= \d .*found shape \(2, 1, 4\)"):
        fn(np.zeros((2, 1, 4), np.float32))
    with pytest.raises(TypeError, match="floating tuples, got dtype int32"):
        fn(np.zeros((1, 3, 4), np.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(np.zeros((1, 3, 4), np.float32), reduction="max")


def test_triplet_loss_needs_a_negative(without_annotation_checks):
    # A pair is enough for the contrastive loss but not for the triplet loss.
    pair = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"T >= 3 .*found shape \(1, 2, 4\)"):
        losses.triplet_loss(pair)


def test_tuple_losses_annotations_refuse_bad_shapes_under_test():
    with pytest.raises(jaxtyping.TypeCheckError):
        losses.contrastive_loss(np.zeros((3, 4), np.float32))


# --------------------------------------------------------------------------- tuple_similarities


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 5, 8)])
def test_tuple_similarities_shapes_and_values(shape):
    x = _random_tuples(np.random.default_rng(8), shape)
    similarities, positive_mask = _tuple_similarities(x)
    assert similarities.shape == (shape[0], shape[1] - 1) and similarities.dtype == jnp.float32
    assert positive_mask.shape == similarities.shape and positive_mask.dtype == jnp.bool_
    expected = [
        [
            sum(float(x[b, 0, d]) * float(x[b, t, d]) for d in range(shape[2]))
            for t in range(1, shape[1])
        ]
        for b in range(shape[0])
    ]
    np.testing.assert_allclose(similarities, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(positive_mask[:, 0], True)
    np.testing.assert_array_equal(positive_mask[:, 1:], False)
    eager = losses.tuple_similarities(x)
    np.testing.assert_allclose(eager[0], similarities, rtol=1e-6)
    np.testing.assert_array_equal(eager[1], positive_mask)


def test_tuple_similarities_raise(without_annotation_checks):
    with pytest.raises(ValueError, match=r"found shape \(2, 1, 4\)"):
        losses.tuple_similarities(np.zeros((2, 1, 4), np.float32))
    with pytest.raises(TypeError, match="floating"):
        losses.tuple_similarities(np.zeros((2, 3, 4), np.int32))


# --------------------------------------------------------------------------- AP loss

RANKING_SHAPES = [(1, 4), (2, 6), (3, 8)]


@pytest.mark.parametrize("shape", RANKING_SHAPES)
def test_average_precision_loss_shapes(shape):
    scores, labels = _random_ranking(np.random.default_rng(9), *shape)
    out = _ap(scores, labels)
    for key in ("ap", "none"):
        assert out[key].shape == (shape[0],) and out[key].dtype == jnp.float32
    assert out["sum"].shape == out["mean"].shape == ()
    assert np.all((np.asarray(out["ap"]) >= 0) & (np.asarray(out["ap"]) <= 1 + 1e-6))


def test_average_precision_loss_golden_values():
    # naver/deep-image-retrieval APLoss(nq=25, min=0, max=1) on this ranking.
    out = _ap(GOLDEN_SCORES, GOLDEN_LABELS)
    np.testing.assert_allclose(out["mean"], 0.14259261, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["ap"], [0.7148148, 1.0], rtol=0, atol=1e-6)
    # Boolean labels are the same. The exact AP of query 0 is 0.7222: this is quantised.
    out = _ap(GOLDEN_SCORES, GOLDEN_LABELS.astype(bool))
    np.testing.assert_allclose(out["ap"], [0.7148148, 1.0], rtol=0, atol=1e-6)


def test_quantized_average_precision_known_values():
    # Every item alone on a bin centre: the quantised AP is the exact AP.
    scores = np.array([[1.0, 0.75, 0.5, 0.25, 0.0]], np.float32)
    labels = np.array([[0, 1, 0, 1, 1]], bool)
    exact = (1 / 2 + 2 / 4 + 3 / 5) / 3
    assert ref.exact_average_precision(scores[0], labels[0]) == pytest.approx(exact)
    np.testing.assert_allclose(_ap(scores, labels, num_bins=5)["ap"], [exact], rtol=1e-6)
    # Another ranking (AP (1 + 1 + 3/4) / 3) and a perfect one.
    np.testing.assert_allclose(_ap(scores, labels[:, ::-1], num_bins=5)["ap"], [11 / 12], rtol=1e-6)
    perfect = np.array([[1, 1, 0, 0, 0]], bool)
    np.testing.assert_allclose(_ap(scores, perfect, num_bins=5)["ap"], [1.0], rtol=1e-6)
    # Scores beyond [min_score, max_score] count as the end bins.
    clipped = np.array([[1.7, 0.75, 0.5, 0.25, -3.0]], np.float32)
    np.testing.assert_allclose(_ap(clipped, labels, num_bins=5)["ap"], [exact], rtol=1e-6)
    # The cosine range: bins over [-1, 1].
    np.testing.assert_allclose(
        _ap(2 * scores - 1, labels, num_bins=5, min_score=-1.0)["ap"], [exact], rtol=1e-6
    )


def test_quantized_average_precision_separated_ranking_is_perfect():
    # Positives more than a bin width above every negative never share a bin with one.
    rng = np.random.default_rng(10)
    labels = np.zeros((3, 8), bool)
    labels[:, :3] = True
    scores = np.concatenate(
        [rng.uniform(0.6, 1.0, (3, 3)), rng.uniform(0.0, 0.5, (3, 5))], axis=1
    ).astype(np.float32)
    np.testing.assert_allclose(_ap(scores, labels)["ap"], np.ones(3), rtol=1e-6)
    # Within one bin of each other they do, and the quantised AP drops below 1.
    assert np.all(np.asarray(_ap(scores, labels, num_bins=3)["ap"]) < 1)


def test_average_precision_loss_matches_reference():
    rng = np.random.default_rng(11)
    scores, labels = _random_ranking(rng, 3, 8, low=-0.2, high=1.2)  # some out of range
    valid = rng.random((3, 8)) < 0.75
    labels[:, 0] = valid[:, 0] = True  # at least one valid positive per query
    for num_bins in (5, 25):
        for mask in (None, valid):
            expected = [
                ref.quantized_average_precision(
                    scores[q],
                    [labels[q, j] if mask is None or mask[q, j] else None for j in range(8)],
                    num_bins,
                )
                for q in range(3)
            ]
            out = _ap(scores, labels, mask, num_bins=num_bins)
            np.testing.assert_allclose(out["ap"], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["mean"], 1 - np.mean(expected), rtol=1e-5, atol=1e-6)


def test_average_precision_loss_reduction_and_queries_without_positives():
    scores, labels = _random_ranking(np.random.default_rng(12), 3, 8)
    labels[1] = False  # query 1 has no positive: AP 0, left out of the reduction
    out = _ap(scores, labels)
    ap = np.asarray(out["ap"])
    assert ap[1] == 0.0 and np.all(ap[[0, 2]] > 0) and np.all(ap[[0, 2]] < 1)
    np.testing.assert_allclose(out["none"], np.where([1, 0, 1], 1 - ap, 0.0), rtol=1e-6)
    np.testing.assert_allclose(out["sum"], 2 - ap[0] - ap[2], rtol=1e-6)
    np.testing.assert_allclose(out["mean"], (2 - ap[0] - ap[2]) / 2, rtol=1e-6)
    # A batch without any positive: zero loss and zero (finite) gradients.
    none = np.zeros_like(labels)
    value, grad = jax.value_and_grad(lambda s: _ap(s, none)["mean"])(scores)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_average_precision_loss_padding_invariance():
    rng = np.random.default_rng(13)
    scores, labels = _random_ranking(rng, 3, 6)
    padded_scores = np.concatenate([scores, rng.uniform(0, 1, (3, 2))], axis=1).astype(np.float32)
    padded_labels = np.concatenate([labels, np.ones((3, 2), bool)], axis=1)  # garbage labels
    valid = np.concatenate([np.ones((3, 6), bool), np.zeros((3, 2), bool)], axis=1)
    padded = _ap(padded_scores, padded_labels, valid)
    np.testing.assert_allclose(padded["ap"], _ap(scores, labels)["ap"], rtol=1e-6)
    grad = jax.grad(lambda s: _ap(s, padded_labels, valid)["mean"])(padded_scores)
    assert np.all(np.asarray(grad)[:, 6:] == 0.0) and np.any(np.asarray(grad)[:, :6] != 0.0)


def test_average_precision_loss_all_equal_scores():
    # Every item in the same bins: precision there is #positives / #items, and so is AP.
    scores = np.full((3, 8), 0.63, np.float32)
    labels = np.zeros((3, 8), bool)
    labels[0, [0, 3]] = labels[1, 6] = labels[2, :6] = True
    np.testing.assert_allclose(_ap(scores, labels)["ap"], [2 / 8, 1 / 8, 6 / 8], rtol=1e-5)
    value, grad = jax.value_and_grad(lambda s: _ap(s, labels)["mean"])(scores)
    assert _finite((value, grad))
    # Raising a positive above the tie helps, raising a negative hurts.
    assert np.asarray(grad)[0, 0] < 0 and np.asarray(grad)[0, 1] > 0


def test_average_precision_loss_rows_are_independent():
    # Each query alone gives its row of the batched result (also under vmap).
    scores, labels = _random_ranking(np.random.default_rng(14), 3, 8)
    batched = np.asarray(_ap(scores, labels)["ap"])
    vmapped = jax.vmap(lambda s, y: _ap(s[None], y[None])["ap"][0])(scores, labels)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-6)
    np.testing.assert_allclose(_ap(scores[1:2], labels[1:2])["ap"], batched[1:2], rtol=1e-6)


def test_average_precision_loss_jit_matches_eager():
    scores, labels = _random_ranking(np.random.default_rng(15), 3, 8)
    valid = np.ones((3, 8), bool)
    valid[1, -1] = False
    np.testing.assert_allclose(
        losses.average_precision_loss(scores, labels, valid=valid, reduction="none"),
        _ap(scores, labels, valid)["none"],
        rtol=1e-5,
    )
    # Without a mask (the twin passes an all-True one).
    np.testing.assert_allclose(
        losses.quantized_average_precision(scores, labels), _ap(scores, labels)["ap"], rtol=1e-5
    )


def test_average_precision_loss_grad():
    rng = np.random.default_rng(16)
    num_bins = 10
    step = 1.0 / (num_bins - 1)
    labels = np.zeros((3, 8), bool)
    labels[0, [1, 4]] = labels[1, [0, 5, 6]] = labels[2, 7] = True
    with jax.enable_x64(True):
        # Scores between bin centres (the triangular kernel has kinks at the centres).
        bins = rng.integers(0, num_bins - 1, size=(3, 8))
        scores = jnp.asarray((bins + rng.uniform(0.2, 0.8, size=(3, 8))) * step)
        fn = lambda s: _ap(s, labels, num_bins=num_bins)["mean"]
        check_grads(fn, (scores,), order=1, modes=("rev",))
        assert np.any(np.asarray(jax.grad(fn)(scores)) != 0)


def test_average_precision_loss_raises(without_annotation_checks):
    scores = np.zeros((2, 5), np.float32)
    labels = np.zeros((2, 5), bool)
    with pytest.raises(ValueError, match=r"scores \(2, 5\) and labels \(2, 4\)"):
        losses.average_precision_loss(scores, labels[:, :4])
    with pytest.raises(ValueError, match=r"scores \(5,\) and labels \(5,\)"):
        losses.quantized_average_precision(scores[0], labels[0])
    with pytest.raises(TypeError, match="floating scores, got dtype int32"):
        losses.average_precision_loss(scores.astype(np.int32), labels)
    with pytest.raises(TypeError, match="boolean or 0/1 integer labels, got dtype float32"):
        losses.average_precision_loss(scores, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"valid must have the shape of scores \(2, 5\), found"):
        losses.average_precision_loss(scores, labels, valid=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="valid must be boolean"):
        losses.average_precision_loss(scores, labels, valid=np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2, found 1"):
        losses.average_precision_loss(scores, labels, num_bins=1)
    with pytest.raises(ValueError, match="max_score must exceed min_score"):
        losses.quantized_average_precision(scores, labels, min_score=1.0, max_score=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.average_precision_loss(scores, labels, reduction="avg")


def test_ranking_annotations_under_test():
    scores = np.zeros((2, 5), np.float32)
    with pytest.raises(jaxtyping.TypeCheckError):
        losses.average_precision_loss(scores, np.zeros((2, 4), bool))
    with pytest.raises(jaxtyping.TypeCheckError):  # float labels are not labels
        losses.nra_loss(scores, np.zeros((2, 5), np.float32))


# --------------------------------------------------------------------------- NRA loss


@pytest.mark.parametrize("shape", RANKING_SHAPES)
def test_nra_loss_shapes(shape):
    scores, labels = _random_ranking(np.random.default_rng(17), *shape, low=-1.0)
    labels[:, -1] = False  # at least one negative
    out = _nra(scores, labels)
    assert out["none"].shape == (shape[0],) and out["none"].dtype == jnp.float32
    assert out["sum"].shape == out["mean"].shape == ()
    assert np.all(np.asarray(out["none"]) > 0)


def test_nra_loss_known_values_and_limits():
    # One positive and one negative, both at similarity 0: each maps to 1/2 and costs
    # log 2, whatever the temperature (a soft extreme of one value is that value).
    pair = np.array([[1, 0]], bool)
    for temperature in (0.05, 2.0):
        out = _nra(np.zeros((1, 2), np.float32), pair, temperature=temperature)
        np.testing.assert_allclose(out["mean"], 2 * math.log(2), rtol=1e-6)
    # Positives at 1 and negatives at -1: the loss vanishes (only eps remains) ...
    labels = np.array([[1, 1, 0, 0, 0]], bool)
    perfect = np.array([[1.0, 1.0, -1.0, -1.0, -1.0]], np.float32)
    assert float(_nra(perfect, labels)["mean"]) < 1e-5
    # ... and reversed it is -2 log(eps).
    np.testing.assert_allclose(_nra(-perfect, labels)["mean"], -2 * math.log(1e-6), rtol=1e-3)
    np.testing.assert_allclose(
        _nra(-perfect, labels, eps=1e-3)["mean"], -2 * math.log(1e-3), rtol=1e-4
    )


def test_nra_loss_temperature_limits():
    scores = np.array([[0.9, 0.2, 0.5, -0.4, 0.3]], np.float32)
    labels = np.array([[1, 1, 0, 0, 0]], bool)

    def expected(positive, negative):
        return -math.log((1 + positive) / 2) - math.log(1 - (1 + negative) / 2)

    # Small temperature: the hardest positive (0.2) and the hardest negative (0.5).
    np.testing.assert_allclose(
        _nra(scores, labels, temperature=1e-4)["mean"], expected(0.2, 0.5), rtol=1e-3
    )
    # Large temperature: the means (0.55 and 2/15).
    np.testing.assert_allclose(
        _nra(scores, labels, temperature=1e3)["mean"], expected(0.55, 0.4 / 3), rtol=1e-3
    )


def test_nra_loss_is_monotone():
    scores, labels = _random_ranking(np.random.default_rng(18), 3, 8, low=-0.9, high=0.9)
    labels[:, -1] = False
    grad = np.asarray(jax.grad(lambda s: _nra(s, labels)["mean"])(scores))
    # Raising a positive's similarity lowers the loss; raising a negative's raises it.
    assert np.all(grad[labels] < 0) and np.all(grad[~labels] > 0)
    sweep = np.linspace(-0.9, 0.9, 7, dtype=np.float32)
    pair = np.array([[1, 0]], bool)
    rising_positive = [float(_nra(np.array([[s, 0.0]]), pair)["mean"]) for s in sweep]
    rising_negative = [float(_nra(np.array([[0.0, s]]), pair)["mean"]) for s in sweep]
    assert np.all(np.diff(rising_positive) < 0) and np.all(np.diff(rising_negative) > 0)


def test_nra_loss_matches_reference():
    rng = np.random.default_rng(19)
    scores, labels = _random_ranking(rng, 3, 8, low=-1.0)
    valid = rng.random((3, 8)) < 0.75
    labels[1] = False  # no positive: only the negative term
    labels[2] = True  # no negative: only the positive term
    valid[:, 0] = True
    for temperature in (0.05, 0.5):
        for mask in (None, valid):
            expected = [
                ref.nra(scores[q], labels[q], None if mask is None else mask[q], temperature)
                for q in range(3)
            ]
            out = _nra(scores, labels, temperature=temperature, valid=mask)
            np.testing.assert_allclose(out["none"], expected, rtol=1e-5, atol=1e-6)


def test_nra_loss_reduction_and_padded_queries():
    scores, labels = _random_ranking(np.random.default_rng(20), 3, 8, low=-1.0)
    valid = np.ones((3, 8), bool)
    valid[1] = False  # a padded query: no valid item at all
    out = _nra(scores, labels, valid=valid)
    per_query = np.asarray(out["none"])
    assert per_query[1] == 0.0 and np.all(per_query[[0, 2]] > 0)
    np.testing.assert_allclose(out["sum"], per_query.sum(), rtol=1e-6)
    np.testing.assert_allclose(out["mean"], per_query.sum() / 2, rtol=1e-6)
    # The padded query changes nothing: the same as the batch without it.
    unpadded = _nra(scores[[0, 2]], labels[[0, 2]])
    np.testing.assert_allclose(out["mean"], unpadded["mean"], rtol=1e-6)


def test_nra_loss_jit_matches_eager():
    scores, labels = _random_ranking(np.random.default_rng(21), 3, 8, low=-1.0)
    out = _nra(scores, labels)
    np.testing.assert_allclose(
        losses.nra_loss(scores, labels, reduction="none"), out["none"], rtol=1e-6
    )
    np.testing.assert_allclose(losses.nra_loss(scores, labels), out["mean"], rtol=1e-6)


def test_nra_loss_grad():
    rng = np.random.default_rng(22)
    scores, labels = _random_ranking(rng, 3, 8, low=-0.9, high=0.9)
    labels[:, -1] = False
    valid = np.ones((3, 8), bool)
    valid[2, 1:3] = False
    with jax.enable_x64(True):
        x = jnp.asarray(scores, jnp.float64)
        for temperature in (0.05, 0.5):
            fn = lambda s, t=temperature: _nra(s, labels, temperature=t, valid=valid)["mean"]
            check_grads(fn, (x,), order=1, modes=("rev",))


def test_nra_loss_finite_at_ties_limits_and_empty_rows():
    labels = np.zeros((3, 8), bool)
    labels[0, 0] = labels[2, :4] = True  # row 1: no positive
    valid = np.ones((3, 8), bool)
    valid[2] = False  # row 2: padded
    for scores in (
        np.full((3, 8), 0.3, np.float32),  # ties
        np.where(labels, 1.0, -1.0).astype(np.float32),  # the clipped optimum
        np.where(labels, -1.0, 1.0).astype(np.float32),  # the clipped worst case
    ):
        value, grad = jax.value_and_grad(lambda s: _nra(s, labels, valid=valid)["mean"])(scores)
        assert _finite((value, grad))
        assert np.all(np.asarray(grad)[2] == 0.0)  # the padded row has no influence


def test_nra_loss_on_tuples():
    x = _random_tuples(np.random.default_rng(23), (2, 5, 8))
    x[0, 1] = x[0, 0]  # query == positive: similarity 1
    scores, positive_mask = _tuple_similarities(x)

    def loss(x):
        return _nra(*losses.tuple_similarities(x))["mean"]

    value, grad = jax.value_and_grad(loss)(x)
    expected = [ref.nra(np.asarray(scores[b]), [True, False, False, False]) for b in range(2)]
    np.testing.assert_allclose(value, np.mean(expected), rtol=1e-5)
    assert _finite(grad) and np.any(np.asarray(grad) != 0)


def test_nra_loss_raises(without_annotation_checks):
    scores = np.zeros((2, 5), np.float32)
    labels = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"scores \(2, 5\) and labels \(5,\)"):
        losses.nra_loss(scores, labels[0])
    with pytest.raises(TypeError, match="floating scores"):
        losses.nra_loss(labels, labels)
    with pytest.raises(TypeError, match="labels, got dtype float32"):
        losses.nra_loss(scores, scores)
    with pytest.raises(ValueError, match="temperature must be positive, found 0.0"):
        losses.nra_loss(scores, labels, temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.nra_loss(scores, labels, reduction="total")


# --------------------------------------------------------------------------- classification

CLASSIFICATION_SHAPES = [(1, 3), (2, 5), (4, 16)]


@pytest.mark.parametrize("shape", CLASSIFICATION_SHAPES)
def test_classification_loss_shapes(shape):
    rng = np.random.default_rng(24)
    logits = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, shape[1], size=shape[0]).astype(np.int32)
    out = _classification(logits, labels)
    assert out["none"].shape == (shape[0],) and out["none"].dtype == jnp.float32
    assert out["sum"].shape == out["mean"].shape == ()


def test_classification_loss_known_values():
    logits = np.array([[2.0, 0.0, 0.0]], np.float32)
    log_normaliser = math.log(math.exp(2.0) + 2.0)
    for label, expected in ((0, log_normaliser - 2.0), (1, log_normaliser)):
        out = _classification(logits, np.array([label], np.int32))
        np.testing.assert_allclose(out["mean"], expected, rtol=1e-6)
    # Smoothing 0.3 over K = 3 classes: targets (0.8, 0.1, 0.1).
    np.testing.assert_allclose(
        _classification(logits, np.array([0], np.int32), label_smoothing=0.3)["mean"],
        0.8 * (log_normaliser - 2.0) + 0.2 * log_normaliser,
        rtol=1e-6,
    )
    # Uniform logits cost log K whatever the target.
    out = _classification(np.zeros((2, 5), np.float32), np.array([0, 3], np.int32))
    np.testing.assert_allclose(out["none"], [math.log(5)] * 2, rtol=1e-6)


def test_classification_loss_matches_reference():
    rng = np.random.default_rng(25)
    logits = (3 * rng.normal(size=(4, 16))).astype(np.float32)
    labels = rng.integers(0, 16, size=4).astype(np.int32)
    for label_smoothing in (0.0, 0.1):
        expected = [ref.cross_entropy(logits[b], labels[b], label_smoothing) for b in range(4)]
        out = _classification(logits, labels, label_smoothing=label_smoothing)
        np.testing.assert_allclose(out["none"], expected, rtol=1e-5)
        np.testing.assert_allclose(out["sum"], sum(expected), rtol=1e-5)
        np.testing.assert_allclose(out["mean"], np.mean(expected), rtol=1e-5)


def test_classification_loss_jit_matches_eager_and_grad():
    rng = np.random.default_rng(26)
    logits = rng.normal(size=(2, 5)).astype(np.float32)
    labels = np.array([0, 4], np.int32)
    np.testing.assert_allclose(
        losses.classification_loss(logits, labels, label_smoothing=0.1),
        _classification(logits, labels, label_smoothing=0.1)["mean"],
        rtol=1e-6,
    )
    with jax.enable_x64(True):
        x = jnp.asarray(logits, jnp.float64)
        fn = lambda x: _classification(x, labels, label_smoothing=0.1)["mean"]
        check_grads(fn, (x,), order=1, modes=("rev",))


def test_classification_loss_raises(without_annotation_checks):
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), found \(3,\)"):
        losses.classification_loss(logits, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"logits \(B, K\), found shape \(3,\) \(labels \(3,\)\)"):
        losses.classification_loss(logits[0], np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="integer class labels, got dtype float32"):
        losses.classification_loss(logits, np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="floating logits"):
        losses.classification_loss(logits.astype(np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.classification_loss(logits, np.zeros(2, np.int32), reduction="batch")


# --------------------------------------------------------------------------- cosine margin

COSINE_SHAPES = [(1, 3, 4), (2, 5, 8), (4, 7, 16)]


def _cosine_problem(rng, batch, classes, dim):
    embeddings = _random_tuples(rng, (batch, dim))
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    return embeddings, centers, labels


@pytest.mark.parametrize("batch,classes,dim", COSINE_SHAPES)
def test_cosine_margin_logits_shapes(batch, classes, dim):
    embeddings, centers, labels = _cosine_problem(np.random.default_rng(27), batch, classes, dim)
    for out in (_cosine_margin(embeddings, centers, labels), _cosine_margin(embeddings, centers)):
        assert out.shape == (batch, classes) and out.dtype == jnp.float32


def test_cosine_margin_logits_known_values():
    embeddings = np.array([[1.0, 0.0]] * 3, np.float32)
    centers = np.array([[2.0, 0.0], [0.0, 0.5], [-1.0, 0.0]], np.float32)  # any norm
    plain = np.array([30.0, 0.0, -30.0])
    np.testing.assert_allclose(_cosine_margin(embeddings, centers), [plain] * 3, atol=1e-5)
    out = np.asarray(_cosine_margin(embeddings, centers, np.array([0, 1, 2], np.int32)))
    m = 0.15
    expected_true = [
        30 * math.cos(m),  # theta = 0
        30 * math.cos(math.pi / 2 + m),  # theta = pi / 2
        30 * (-1 - m * math.sin(m)),  # theta = pi: past pi - m, the fallback
    ]
    np.testing.assert_allclose(np.diag(out), expected_true, rtol=1e-5, atol=1e-5)
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(out[off_diagonal], np.tile(plain, (3, 1))[off_diagonal], atol=1e-5)
    out = _cosine_margin(embeddings, centers, np.array([0, 1, 2], np.int32), scale=1.0, margin=0.0)
    np.testing.assert_allclose(out, [plain / 30] * 3, atol=1e-6)


def test_cosine_margin_logits_matches_reference():
    rng = np.random.default_rng(28)
    embeddings, centers, labels = _cosine_problem(rng, 4, 7, 16)
    centers[3] = -2 * embeddings[3]  # theta = pi: the fallback branch
    labels[3] = 3
    for label_list in (labels, None):
        expected = [
            ref.cosine_margin_logits(
                embeddings[b], centers, None if label_list is None else labels[b], 20.0, 0.3
            )
            for b in range(4)
        ]
        np.testing.assert_allclose(
            _cosine_margin(embeddings, centers, label_list, scale=20.0, margin=0.3),
            expected,
            rtol=1e-5,
            atol=2e-5,
        )


def test_cosine_margin_logits_jit_matches_eager():
    embeddings, centers, labels = _cosine_problem(np.random.default_rng(29), 2, 5, 8)
    np.testing.assert_allclose(
        losses.cosine_margin_logits(embeddings, centers, labels),
        _cosine_margin(embeddings, centers, labels),
        rtol=1e-6,
        atol=1e-5,
    )


def test_cosine_margin_logits_margin_raises_the_loss():
    # The margin lowers only the true logit, so the cross-entropy grows with it.
    embeddings, centers, labels = _cosine_problem(np.random.default_rng(30), 4, 7, 16)
    plain = np.asarray(_cosine_margin(embeddings, centers))
    values = []
    for margin in (0.0, 0.15, 0.3):
        logits = np.asarray(_cosine_margin(embeddings, centers, labels, margin=margin))
        true = np.eye(7, dtype=bool)[labels]
        np.testing.assert_allclose(logits[~true], plain[~true], rtol=1e-6)
        values.append(float(_classification(logits, labels)["mean"]))
    assert values[0] < values[1] < values[2]
    np.testing.assert_allclose(values[0], float(_classification(plain, labels)["mean"]), rtol=1e-6)


def test_cosine_margin_logits_grad():
    rng = np.random.default_rng(31)
    labels = np.array([0, 2], np.int32)
    with jax.enable_x64(True):
        embeddings = jnp.asarray(_random_tuples(rng, (2, 8), np.float64))
        centers = jnp.asarray(rng.normal(size=(5, 8)))

        def loss(embeddings, centers):
            logits = _cosine_margin(embeddings, centers, labels, scale=10.0, margin=0.3)
            return _classification(logits, labels)["mean"]

        check_grads(loss, (embeddings, centers), order=1, modes=("rev",))


def test_cosine_margin_logits_finite_at_cosine_plus_minus_one():
    embeddings = _random_tuples(np.random.default_rng(32), (2, 8))
    centers = np.stack(
        [embeddings[0], -embeddings[1], embeddings[1], -embeddings[0], embeddings[0] + 1]
    )
    labels = np.array([0, 1], np.int32)  # cos = 1 and cos = -1 for the true classes

    def loss(embeddings, centers):
        return _classification(_cosine_margin(embeddings, centers, labels), labels)["mean"]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(embeddings, centers)
    assert _finite((value, grads))
    assert np.any(np.asarray(grads[0]) != 0)


def test_cosine_margin_logits_raises(without_annotation_checks):
    embeddings = np.zeros((2, 4), np.float32)
    centers = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"found \(2, 4\) and \(3, 5\)"):
        losses.cosine_margin_logits(embeddings, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"found \(4,\) and \(3, 4\)"):
        losses.cosine_margin_logits(embeddings[0], centers)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\), found \(2, 1\)"):
        losses.cosine_margin_logits(embeddings, centers, np.zeros((2, 1), np.int32))
    with pytest.raises(TypeError, match="integer class labels"):
        losses.cosine_margin_logits(embeddings, centers, np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="floating class_centers"):
        losses.cosine_margin_logits(embeddings, centers.astype(np.int32))


def test_log_mean_exp_is_finite_for_an_empty_row():
    # The soft extremes of a row without positives (or negatives) are discarded by nra_loss
    # with a jnp.where; the helper keeps them finite anyway, so that no NaN exists even in
    # intermediates (a jax_debug_nans run would trip on one).
    x = np.array([[0.5, -20.0, 3.0], [1.0, 2.0, 40.0]], np.float32)
    mask = np.array([[True, False, True], [False, False, False]])
    out = np.asarray(jax.jit(losses._log_mean_exp)(x, mask))
    np.testing.assert_allclose(out[0], np.log((np.exp(0.5) + np.exp(3.0)) / 2), rtol=1e-6)
    assert np.all(np.isfinite(out))
