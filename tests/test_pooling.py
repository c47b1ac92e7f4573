from functools import partial

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jax.test_util import check_grads

from jaxretrieval import pooling, regions, whitening
from tests.reference import pooling_reference as ref

SHAPES = [(1, 3, 3, 2), (2, 5, 7, 4), (3, 8, 6, 16)]
GLOBAL_POOLINGS = {
    "spoc": (pooling.spoc, ref.spoc),
    "mac": (pooling.mac, ref.mac),
    "gem": (pooling.gem, ref.gem),
}


def _features(rng, shape, dtype=np.float32):
    """Post-ReLU-like activations: non-negative with some exact zeros."""
    return np.maximum(rng.normal(size=shape), 0.0).astype(dtype)


def _cirtorch_map():
    """The map whose cirtorch (float64) poolings are pinned below, as NHWC (2, 6, 9, 3)."""
    x = np.maximum(np.sin(0.37 * np.arange(324.0)), 0.0).reshape(2, 3, 6, 9)  # NCHW
    return x.transpose(0, 2, 3, 1).astype(np.float32)


def _reference_batch(fn, x, valid=None, **kwargs):
    return np.stack(
        [fn(x[b], valid=None if valid is None else valid[b], **kwargs) for b in range(len(x))]
    )


def _padded(rng, x):
    """Embeds each image of ``x`` top-left in a larger map full of garbage, plus the mask."""
    batch, height, width, channels = x.shape
    padded = rng.uniform(50.0, 100.0, size=(batch, height + 2, width + 3, channels))
    padded = padded.astype(x.dtype)
    padded[:, :height, :width] = x
    valid = np.zeros(padded.shape[:3], bool)
    valid[:, :height, :width] = True
    return padded, valid


# --------------------------------------------------------------------------- spoc, mac, gem


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
@pytest.mark.parametrize("shape", SHAPES)
def test_global_poolings_shapes(name, shape):
    fn, _ = GLOBAL_POOLINGS[name]
    x = _features(np.random.default_rng(0), shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        out = fn(jnp.asarray(x, dtype))
        assert out.shape == (shape[0], shape[3])
        assert out.dtype == jnp.float32  # float32 reductions even for bf16 input


def test_global_poolings_known_values():
    x = np.arange(6.0, dtype=np.float32).reshape(1, 2, 3, 1)  # values 0..5
    np.testing.assert_allclose(pooling.spoc(x), [[2.5]])
    np.testing.assert_allclose(pooling.mac(x), [[5.0]])
    # GeM p=2: sqrt(mean(0, 1, 4, 9, 16, 25)) = sqrt(55 / 6); the clamp of 0 to 1e-6 is
    # invisible at this tolerance.
    np.testing.assert_allclose(pooling.gem(x, 2.0), [[np.sqrt(55.0 / 6.0)]], rtol=1e-6)
    # Two channels pool independently.
    x2 = np.stack([x[..., 0], 5.0 - x[..., 0]], axis=-1)  # (1, 2, 3, 2)
    np.testing.assert_allclose(pooling.mac(x2), [[5.0, 5.0]])
    np.testing.assert_allclose(pooling.spoc(x2), [[2.5, 2.5]])


def test_global_poolings_cirtorch_golden_values():
    # cirtorch's functional mac and gem (p=3) on the same map, computed in float64.
    x = _cirtorch_map()
    np.testing.assert_allclose(
        pooling.gem(x, 3.0),
        [[0.591822, 0.629241, 0.595247], [0.584998, 0.584997, 0.585037]],
        atol=2e-6,
    )
    np.testing.assert_allclose(
        pooling.mac(x),
        [[0.997024, 0.998755, 0.999566], [0.999959, 0.999998, 0.999834]],
        atol=2e-6,
    )


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_global_poolings_match_reference(name, shape):
    fn, reference = GLOBAL_POOLINGS[name]
    rng = np.random.default_rng(1)
    x = _features(rng, shape)
    np.testing.assert_allclose(fn(x), _reference_batch(reference, x), rtol=1e-5, atol=1e-6)
    valid = rng.random(shape[:3]) < 0.6
    valid[:, 0, 0] = True  # at least one valid pixel per image
    np.testing.assert_allclose(
        fn(x, valid=valid), _reference_batch(reference, x, valid), rtol=1e-5, atol=1e-6
    )


def test_gem_matches_reference_for_several_p():
    x = _features(np.random.default_rng(2), (2, 4, 5, 3))
    for p in (0.5, 1.0, 2.5, 7.0):
        np.testing.assert_allclose(
            pooling.gem(x, p), _reference_batch(ref.gem, x, p=p), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
def test_global_poolings_jit_matches_eager(name):
    fn, _ = GLOBAL_POOLINGS[name]
    rng = np.random.default_rng(3)
    x = _features(rng, (2, 5, 4, 3))
    valid = rng.random((2, 5, 4)) < 0.7
    valid[:, 0, 0] = True
    np.testing.assert_allclose(jax.jit(fn)(x, valid=valid), fn(x, valid=valid), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
def test_global_poolings_vmap_matches_loop(name):
    fn, _ = GLOBAL_POOLINGS[name]
    x = _features(np.random.default_rng(4), (3, 2, 4, 5, 3))  # (K, B, H, W, C)
    batched = jax.vmap(fn)(x)
    looped = np.stack([fn(x[k]) for k in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6)


def test_gem_p_is_traced_no_recompile():
    traces = []

    def pool(x, p):
        traces.append(None)  # runs once per trace, not per call
        return pooling.gem(x, p)

    jitted = jax.jit(pool)
    x = _features(np.random.default_rng(5), (2, 3, 4, 2))
    outputs = [jitted(x, p) for p in (1.0, 2.0, 3.0, 4.5, 8.0)]
    assert len(traces) == 1
    assert jitted._cache_size() == 1
    # The swept p really changed the result (it was not baked in as a constant).
    assert not np.allclose(outputs[0], outputs[-1])
    np.testing.assert_allclose(outputs[2], pooling.gem(x, 3.0), rtol=1e-6)


def test_global_poolings_grad():
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        # Positive, distinct values: the clamp and the max are differentiable there.
        x = jnp.asarray(rng.uniform(0.2, 2.0, size=(2, 3, 4, 2)), jnp.float64)
        p = jnp.asarray(3.0, jnp.float64)
        valid = jnp.asarray(rng.random((2, 3, 4)) < 0.6).at[:, 0, 0].set(True)
        gem = jax.jit(pooling.gem)
        check_grads(lambda x, p: gem(x, p), (x, p), order=1, modes=("rev",))
        check_grads(lambda x, p: gem(x, p, valid=valid), (x, p), order=1, modes=("rev",))
        check_grads(jax.jit(pooling.spoc), (x,), order=1, modes=("rev",))
        check_grads(jax.jit(pooling.mac), (x,), order=1, modes=("rev",))


def test_gem_grad_ignores_padding():
    rng = np.random.default_rng(7)
    x, valid = _padded(rng, _features(rng, (2, 3, 4, 2)))
    grad = jax.grad(lambda x: jnp.sum(pooling.gem(x, 3.0, valid=valid)))(x)
    assert np.all(np.asarray(grad)[~valid] == 0.0)


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
def test_global_poolings_padding_mask_invariance(name):
    fn, _ = GLOBAL_POOLINGS[name]
    rng = np.random.default_rng(8)
    x = _features(rng, (2, 4, 5, 3))
    padded, valid = _padded(rng, x)
    np.testing.assert_allclose(fn(padded, valid=valid), fn(x), rtol=1e-6)
    # An all-true mask is the same as no mask.
    np.testing.assert_allclose(fn(x, valid=np.ones(x.shape[:3], bool)), fn(x), rtol=1e-6)


def test_poolings_of_an_image_without_valid_pixels_are_zero():
    # Blank images that fill up the last batch are fully masked: zeros, never -inf or NaN.
    rng = np.random.default_rng(9)
    x = _features(rng, (2, 3, 4, 3)) + 0.5
    valid = np.ones((2, 3, 4), bool)
    valid[1] = False
    weights = rng.normal(size=(3, 4)).astype(np.float32)
    outputs = {
        "spoc": pooling.spoc(x, valid=valid),
        "mac": pooling.mac(x, valid=valid),
        "gem": pooling.gem(x, 3.0, valid=valid),
        "crow": _crow(x, valid=valid),
        "cam": _cam_weighted(x, weights, num_classes=2, valid=valid),
    }
    for name, out in outputs.items():
        out = np.asarray(out)
        np.testing.assert_array_equal(out[1], 0.0, err_msg=name)
        assert np.all(np.isfinite(out)) and np.any(out[0] != 0), name


_SMALL_SHAPES = st.sampled_from([(1, 2, 3, 2), (2, 4, 4, 3)])


@st.composite
def _nonnegative_maps(draw, low=0.0, high=10.0):
    shape = draw(_SMALL_SHAPES)
    elements = st.floats(low, high, width=32, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float32, shape, elements=elements))


@given(_nonnegative_maps())
def test_gem_p1_equals_spoc_property(x):
    # Equal up to the clamp: each clamped value moves by at most eps = 1e-6.
    np.testing.assert_allclose(pooling.gem(x, 1.0), pooling.spoc(x), rtol=1e-5, atol=2e-6)


@given(_nonnegative_maps(low=0.5, high=2.0))
def test_gem_tends_to_mac_property(x):
    # mac * n^(-1/p) <= gem_p <= mac for n pixels: the gap closes as p grows.
    n = x.shape[1] * x.shape[2]
    maximum = np.asarray(pooling.mac(x))
    previous_gap = None
    for p in (3.0, 10.0, 40.0):
        pooled = np.asarray(pooling.gem(x, p))
        assert np.all(pooled <= maximum * (1 + 1e-5))
        assert np.all(pooled >= maximum * n ** (-1.0 / p) * (1 - 1e-5))
        gap = np.max(maximum - pooled)
        if previous_gap is not None:
            assert gap <= previous_gap + 1e-5
        previous_gap = gap
    assert previous_gap <= np.max(maximum) * (1 - n ** (-1.0 / 40.0)) + 1e-5


@given(_nonnegative_maps(), st.integers(0, 2**32 - 1))
def test_global_poolings_permutation_invariance_property(x, seed):
    rng = np.random.default_rng(seed)
    batch, height, width, channels = x.shape
    valid = rng.random((batch, height, width)) < 0.7
    valid[:, 0, 0] = True
    order = rng.permutation(height * width)
    permuted = x.reshape(batch, height * width, channels)[:, order].reshape(x.shape)
    permuted_valid = valid.reshape(batch, height * width)[:, order].reshape(valid.shape)
    for fn in (
        pooling.spoc,
        pooling.mac,
        lambda x, valid: pooling.gem(x, 3.0, valid=valid),
        lambda x, valid: _crow(x, valid=valid),
    ):
        np.testing.assert_allclose(
            fn(permuted, valid=permuted_valid), fn(x, valid=valid), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", sorted(GLOBAL_POOLINGS))
def test_global_poolings_raise(name, without_annotation_checks):
    fn, _ = GLOBAL_POOLINGS[name]
    with pytest.raises(
        ValueError, match=r"features must have shape \(B, H, W, C\), found shape \(3, 4, 5\)"
    ):
        fn(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="features must be floating, got dtype int32"):
        fn(np.zeros((1, 2, 2, 3), np.int32))
    with pytest.raises(ValueError, match=r"\(B, H, W\) = \(1, 2, 2\), found \(1, 2, 3\)"):
        fn(np.zeros((1, 2, 2, 3), np.float32), valid=np.ones((1, 2, 3), bool))
    with pytest.raises(TypeError, match="valid mask must be boolean, got dtype float32"):
        fn(np.zeros((1, 2, 2, 3), np.float32), valid=np.ones((1, 2, 2), np.float32))


# --------------------------------------------------------------------------- rmac, ramac

# Jitted twins for the value tests: eager dispatch compiles every static slice and small op
# separately, which dominates the runtime; jit == eager is tested explicitly below.
_rmac = jax.jit(pooling.rmac, static_argnames="levels")
_ramac = jax.jit(pooling.ramac, static_argnames="levels")
_crow = jax.jit(pooling.crow)
_class_activation_maps = jax.jit(
    pooling.class_activation_maps, static_argnames=("num_classes", "normalization")
)
_cam_weighted = jax.jit(
    pooling.cam_weighted, static_argnames=("num_classes", "normalization", "channel_weighting")
)


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (2, 5, 7, 4)])
def test_regional_poolings_shapes(shape):
    x = _features(np.random.default_rng(10), shape)
    num_regions = regions.num_rmac_regions(shape[1], shape[2])
    dtypes = (jnp.float32, jnp.bfloat16) if shape[0] == 1 else (jnp.float32,)
    for dtype in dtypes:
        out = _rmac(jnp.asarray(x, dtype))
        assert out.shape == (shape[0], shape[3]) and out.dtype == jnp.float32
        regional = _ramac(jnp.asarray(x, dtype))
        assert regional.shape == (shape[0], num_regions, 2 * shape[3])
        assert regional.dtype == jnp.float32
        aggregated = pooling.ramac_aggregate(regional)
        assert aggregated.shape == (shape[0], 2 * shape[3]) and aggregated.dtype == jnp.float32


def test_rmac_cirtorch_golden_values():
    # cirtorch's functional rmac (L=3) on the 6x9 map: 21 regions; before the final L2.
    np.testing.assert_allclose(
        _rmac(_cirtorch_map()),
        [[12.080093, 11.854898, 12.044109], [11.880996, 11.93203, 12.014452]],
        rtol=1e-6,
    )


def test_rmac_known_values():
    x = np.arange(1.0, 7.0, dtype=np.float32).reshape(1, 2, 3, 1)
    # One positive channel: every region's MAC normalises to exactly 1, so R-MAC counts
    # the regions of a 2x3 map: the whole map, 2 level-1 squares of side 2 (1 + extra 1
    # along the width), 2x3 squares of side floor(4/3) = 1 and 3x4 of side 1: 21.
    np.testing.assert_allclose(_rmac(x, eps=0.0), [[21.0]], rtol=1e-6)
    # levels=0: only the whole map, i.e. the L2-normalised MAC.
    x2 = np.stack([x[..., 0], 2.0 * x[..., 0]], axis=-1)  # (1, 2, 3, 2), MAC (5, 10)
    np.testing.assert_allclose(
        _rmac(x2, levels=0, eps=0.0), [[1 / np.sqrt(5), 2 / np.sqrt(5)]], rtol=1e-6
    )


@pytest.mark.parametrize("shape", [(2, 6, 9, 3), (1, 7, 5, 4), (2, 8, 8, 2)])
def test_regional_poolings_match_reference(shape):
    x = _features(np.random.default_rng(11), shape)
    np.testing.assert_allclose(_rmac(x), _reference_batch_plain(ref.rmac, x), rtol=1e-5)
    np.testing.assert_allclose(
        _ramac(x), _reference_batch_plain(ref.ramac, x), rtol=1e-5, atol=1e-6
    )


def _reference_batch_plain(fn, x, **kwargs):
    return np.stack([fn(x[b], **kwargs) for b in range(len(x))])


def test_ramac_max_half_aggregates_to_rmac():
    x = _features(np.random.default_rng(12), (2, 6, 9, 3))
    regional = _ramac(x)
    np.testing.assert_allclose(pooling.ramac_aggregate(regional[..., :3]), _rmac(x), rtol=1e-5)
    # Each half of each region is unit-norm.
    np.testing.assert_allclose(np.linalg.norm(regional[..., :3], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(regional[..., 3:], axis=-1), 1.0, rtol=1e-5)


def test_ramac_aggregate_weights():
    rng = np.random.default_rng(13)
    regional = rng.normal(size=(2, 5, 3)).astype(np.float32)
    unit = regional / np.linalg.norm(regional, axis=-1, keepdims=True)
    # One-hot weights pick one normalised region; shared (R,) weights equal tiled (B, R).
    one_hot = np.eye(5, dtype=np.float32)[2]
    np.testing.assert_allclose(pooling.ramac_aggregate(regional, one_hot), unit[:, 2], rtol=1e-5)
    weights = rng.uniform(size=5).astype(np.float32)
    np.testing.assert_allclose(
        pooling.ramac_aggregate(regional, weights),
        pooling.ramac_aggregate(regional, np.tile(weights, (2, 1))),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        pooling.ramac_aggregate(regional, weights), np.einsum("r,brd->bd", weights, unit), rtol=1e-5
    )
    np.testing.assert_allclose(pooling.ramac_aggregate(regional), unit.sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("name", ["rmac", "ramac", "crow"])
def test_more_poolings_jit_matches_eager(name):
    fn = getattr(pooling, name)
    x = _features(np.random.default_rng(14), (2, 6, 7, 3))
    np.testing.assert_allclose(jax.jit(fn)(x), fn(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["rmac", "ramac", "crow"])
def test_more_poolings_vmap_matches_loop(name):
    fn = jax.jit(getattr(pooling, name))  # jitted on both sides: eager dispatch is slow
    x = _features(np.random.default_rng(15), (3, 2, 5, 6, 3))  # (K, B, H, W, C)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(fn))(x), np.stack([fn(x[k]) for k in range(3)]), rtol=1e-6, atol=1e-7
    )


def test_regional_poolings_grad():
    rng = np.random.default_rng(16)
    with jax.enable_x64(True):
        # Jitted, with few levels: compiling the backward pass of many static slices is
        # the slow part on a loaded CPU; the slicing code is the same at every level.
        x = jnp.asarray(rng.uniform(0.2, 2.0, size=(1, 4, 5, 2)), jnp.float64)
        check_grads(jax.jit(partial(pooling.rmac, levels=1)), (x,), order=1, modes=("rev",))
        check_grads(jax.jit(partial(pooling.ramac, levels=1)), (x,), order=1, modes=("rev",))
        regional = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float64)
        weights = jnp.asarray(rng.uniform(size=4), jnp.float64)
        check_grads(jax.jit(pooling.ramac_aggregate), (regional, weights), order=1, modes=("rev",))
    # An all-zero map: finite (zero) gradient, not NaN, through the regional norms.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pooling.rmac(x))))(np.zeros((1, 3, 3, 2), np.float32))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", ["rmac", "ramac"])
def test_regional_poolings_reject_padding_mask(name):
    x = np.ones((1, 4, 4, 2), np.float32)
    with pytest.raises(NotImplementedError, match="Bucket images by exact feature-map size"):
        getattr(pooling, name)(x, valid=np.ones((1, 4, 4), bool))


def test_regional_poolings_raise(without_annotation_checks):
    with pytest.raises(ValueError, match=r"rmac: features must have shape \(B, H, W, C\)"):
        pooling.rmac(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(B, R, D\), found shape \(4, 2\)"):
        pooling.ramac_aggregate(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(R,\) or \(B, R\) .* found \(3,\)"):
        pooling.ramac_aggregate(np.zeros((2, 4, 2), np.float32), np.ones(3, np.float32))


# --------------------------------------------------------------------------- crow


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (2, 5, 7, 4)])
def test_crow_and_cam_shapes(shape):
    rng = np.random.default_rng(21)
    x = _features(rng, shape)
    weights = rng.normal(size=(shape[3], 5)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        out = _crow(jnp.asarray(x, dtype))
        assert out.shape == (shape[0], shape[3]) and out.dtype == jnp.float32
        vectors = _cam_weighted(jnp.asarray(x, dtype), weights, num_classes=2)
        assert vectors.shape == (shape[0], 2, shape[3]) and vectors.dtype == jnp.float32
    cams, classes = _class_activation_maps(x, weights, num_classes=3)
    assert cams.shape == (shape[0], 3) + shape[1:3] and classes.shape == (shape[0], 3)
    assert classes.dtype == jnp.int32
    assert np.all((np.asarray(cams) >= 0) & (np.asarray(cams) <= 1))


def test_crow_known_values():
    # Two pixels, three channels: p0 = (1, 2, 0), p1 = (3, 0, 0).
    x = np.array([[[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]]], np.float32)  # (1, 1, 2, 3)
    # Channel sums S = (3, 3), |S|_2 = 3 sqrt(2): spatial weights 2^(-1/4) each.
    # Non-zero fractions Q = (1, 1/2, 0): weights log(1.5), log(3), and 0 (never fires).
    spatial = 2.0**-0.25
    expected = spatial * np.array([4.0 * np.log(1.5), 2.0 * np.log(3.0), 0.0])
    np.testing.assert_allclose(_crow(x), [expected], rtol=1e-6)
    # b = 1 keeps the normalised channel sum itself as spatial weight.
    expected_b1 = expected / spatial * (3.0 / (3.0 * np.sqrt(2.0)))
    np.testing.assert_allclose(_crow(x, b=1.0), [expected_b1], rtol=1e-6)


def test_crow_matches_reference():
    rng = np.random.default_rng(17)
    x = _features(rng, (2, 5, 6, 4))
    x[..., 3] = 0.0  # a dead channel
    valid = rng.random((2, 5, 6)) < 0.7
    valid[:, 0, 0] = True
    for kwargs in ({}, {"a": 1.0, "b": 3.0}):
        np.testing.assert_allclose(
            _crow(x, **kwargs), _reference_batch(ref.crow, x, **kwargs), rtol=2e-5
        )
        np.testing.assert_allclose(
            _crow(x, valid=valid, **kwargs),
            _reference_batch(ref.crow, x, valid, **kwargs),
            rtol=2e-5,
        )


def test_crow_edge_cases_are_finite():
    # An all-zero image pools to zeros (not NaN); a dead channel gets weight 0.
    x = np.zeros((2, 3, 3, 2), np.float32)
    x[1, 1, 1, 0] = 2.0
    out = np.asarray(_crow(x))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, 1], 0.0)


def test_crow_padding_mask_invariance_and_traced_params():
    rng = np.random.default_rng(18)
    x = _features(rng, (2, 4, 5, 3))
    padded, valid = _padded(rng, x)
    np.testing.assert_allclose(_crow(padded, valid=valid), _crow(x), rtol=1e-5)
    jitted = jax.jit(lambda x, a, b: pooling.crow(x, a=a, b=b))
    for a, b in ((2.0, 2.0), (1.0, 3.0), (3.0, 0.5)):
        np.testing.assert_allclose(jitted(x, a, b), pooling.crow(x, a=a, b=b), rtol=1e-5)
    assert jitted._cache_size() == 1


# --------------------------------------------------------------------------- CAM-weighted


def _tiny_cam_problem():
    # Three pixels in a row, two channels: p0 = (1, 0), p1 = (0, 1), p2 = (1, 1).
    x = np.array([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]], np.float32)  # (1, 1, 3, 2)
    # Classes: 0 reads channel 0, 1 reads channel 1 twice as strongly, 2 is negative.
    weights = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, -1.0]], np.float32)  # (C, K)
    return x, weights


def test_class_activation_maps_known_values():
    x, weights = _tiny_cam_problem()
    # GAP = (2/3, 2/3): logits (2/3, 4/3, -4/3), so the top-2 classes are 1 then 0.
    cams, classes = _class_activation_maps(x, weights, num_classes=2)
    np.testing.assert_array_equal(classes, [[1, 0]])
    # Raw CAM of class 1 = 2 * channel 1 = (0, 2, 2) -> min-max (0, 1, 1);
    # class 0 = channel 0 = (1, 0, 1), already in [0, 1].
    np.testing.assert_allclose(cams, [[[[0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0]]]], atol=1e-7)
    # A bias promotes class 2: raw CAM (-1, -1, -2) -> min-max (1, 1, 0); "max" (the
    # authors' code) has no positive pixel and gives zeros.
    bias = np.array([0.0, 0.0, 10.0], np.float32)
    cams, classes = _class_activation_maps(x, weights, num_classes=1, classifier_bias=bias)
    np.testing.assert_array_equal(classes, [[2]])
    np.testing.assert_allclose(cams, [[[[1.0, 1.0, 0.0]]]], atol=1e-7)
    cams, _ = _class_activation_maps(
        x, weights, num_classes=1, classifier_bias=bias, normalization="max"
    )
    np.testing.assert_allclose(cams, np.zeros((1, 1, 1, 3)), atol=1e-7)


def test_cam_weighted_known_values():
    x, weights = _tiny_cam_problem()
    # Class 1 weights p1 and p2: (1, 2); class 0 weights p0 and p2: (2, 1).
    out = _cam_weighted(x, weights, num_classes=2, channel_weighting=False)
    np.testing.assert_allclose(out, [[[1.0, 2.0], [2.0, 1.0]]], rtol=1e-6)
    # CroW channel weights: both channels fire at 2 of 3 pixels -> log(2) each.
    out = _cam_weighted(x, weights, num_classes=2)
    np.testing.assert_allclose(out, np.log(2.0) * np.array([[[1.0, 2.0], [2.0, 1.0]]]), rtol=1e-6)


def test_cam_aggregate_known_values():
    vectors = np.array([[[1.0, 2.0], [2.0, 1.0]]], np.float32)
    # Each normalises to length 1, their sum is (3, 3) / sqrt(5), normalised (1, 1)/sqrt(2).
    np.testing.assert_allclose(pooling.cam_aggregate(vectors), [[0.5**0.5, 0.5**0.5]], rtol=1e-6)
    # An identity whitening changes nothing; a 1-d one keeps only the first coordinate.
    identity = whitening.Whitening(mean=jnp.zeros(2), projection=jnp.eye(2))
    np.testing.assert_allclose(
        pooling.cam_aggregate(vectors, whitening=identity), [[0.5**0.5, 0.5**0.5]], rtol=1e-6
    )
    np.testing.assert_allclose(
        pooling.cam_aggregate(vectors, whitening=identity, dim=1), [[1.0]], rtol=1e-6
    )


@pytest.mark.parametrize("normalization", ["minmax", "max"])
@pytest.mark.parametrize("channel_weighting", [True, False])
def test_cam_weighted_matches_reference(normalization, channel_weighting):
    rng = np.random.default_rng(19)
    x = _features(rng, (2, 4, 5, 6))
    weights = rng.normal(size=(6, 10)).astype(np.float32)
    bias = rng.normal(size=10).astype(np.float32)
    valid = rng.random((2, 4, 5)) < 0.8
    valid[:, 0, 0] = True
    for mask in (None, valid):
        out = _cam_weighted(
            x,
            weights,
            num_classes=3,
            classifier_bias=bias,
            normalization=normalization,
            channel_weighting=channel_weighting,
            valid=mask,
        )
        _, classes = _class_activation_maps(
            x, weights, num_classes=3, classifier_bias=bias, valid=mask
        )
        for b in range(2):
            expected, expected_classes = ref.cam_weighted(
                x[b],
                weights,
                3,
                bias,
                normalization,
                channel_weighting,
                None if mask is None else mask[b],
            )
            np.testing.assert_array_equal(classes[b], expected_classes)
            np.testing.assert_allclose(out[b], expected, rtol=2e-5, atol=1e-6)


def test_cam_weighted_padding_jit_and_vmap():
    rng = np.random.default_rng(20)
    x = _features(rng, (2, 4, 5, 3))
    weights = rng.normal(size=(3, 7)).astype(np.float32)
    padded, valid = _padded(rng, x)
    np.testing.assert_allclose(
        _cam_weighted(padded, weights, num_classes=4, valid=valid),
        _cam_weighted(x, weights, num_classes=4),
        rtol=1e-5,
    )
    eager = pooling.cam_weighted(x, weights, num_classes=4)
    jitted = lambda x: _cam_weighted(x, weights, num_classes=4)
    np.testing.assert_allclose(jitted(x), eager, rtol=1e-6)
    stacked = np.stack([x, x[::-1]])  # (K, B, H, W, C)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jitted))(stacked),
        np.stack([jitted(stacked[0]), jitted(stacked[1])]),
        rtol=1e-6,
    )
    aggregated = pooling.cam_aggregate(eager)
    assert aggregated.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(aggregated, axis=1), 1.0, rtol=1e-6)


def test_cam_raise(without_annotation_checks):
    x, weights = _tiny_cam_problem()
    with pytest.raises(ValueError, match=r"\(C, K\) with C = 2 .* found \(3, 3\)"):
        pooling.cam_weighted(x, np.zeros((3, 3), np.float32), num_classes=1)
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 3\], found 4"):
        pooling.cam_weighted(x, weights, num_classes=4)
    with pytest.raises(ValueError, match="normalization must be"):
        pooling.cam_weighted(x, weights, num_classes=1, normalization="softmax")
    with pytest.raises(ValueError, match=r"classifier_bias must have shape \(3,\)"):
        pooling.cam_weighted(x, weights, num_classes=1, classifier_bias=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"\(B, N, C\), found shape \(2, 2\)"):
        pooling.cam_aggregate(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="pass whitening"):
        pooling.cam_aggregate(np.zeros((1, 2, 2), np.float32), dim=1)


# --------------------------------------------------------------------------- multi-device


def test_poolings_on_a_batch_sharded_over_devices():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 (host) devices")
    rng = np.random.default_rng(22)
    x = _features(rng, (4, 6, 9, 3))
    valid = np.ones((4, 6, 9), bool)
    valid[:, :, 7:] = False  # each image padded on the right
    weights = rng.normal(size=(3, 5)).astype(np.float32)
    mesh = jax.make_mesh((4,), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    valid_sharded = jax.device_put(valid, NamedSharding(mesh, P("data")))
    checks = {
        # One per code pattern: masked reductions, the CAM class selection, static slices.
        "gem": lambda x, v: pooling.gem(x, 3.0, valid=v),
        "cam": lambda x, v: pooling.cam_weighted(x, weights, num_classes=2, valid=v),
        "rmac": lambda x, v: pooling.rmac(x, levels=1),
    }
    for name, fn in checks.items():
        expected = jax.jit(fn)(x, valid)
        with jax.set_mesh(mesh):  # make_mesh gives Explicit axes: the mesh must be set
            out = jax.jit(fn)(x_sharded, valid_sharded)
        assert out.sharding.spec[0] == "data", name  # stays sharded over the batch
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7, err_msg=name)


# --------------------------------------------------------------------------- DARAC

_darac_regional = jax.jit(pooling.darac_regional, static_argnames="levels")
_darac_pooling = jax.jit(pooling.darac_pooling, static_argnames="levels")


@pytest.mark.parametrize("size", [(6, 9), (5, 8), (9, 6), (7, 7), (2, 2), (1, 3), (12, 44)])
def test_darac_regions_fixed_count_and_rmac_grid(size):
    height, width = size
    boxes = np.asarray(pooling.darac_regions(np.array([size])))[0]
    assert boxes.shape == (pooling.num_darac_regions(), 4) == (21, 4)
    assert boxes[0].tolist() == [0, 0, height, width]
    top, left, bottom, right = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (bottom <= height) & (right <= width))
    assert np.all((bottom > top) & (right > left))
    np.testing.assert_array_equal(boxes, ref.darac_regions(height, width))
    rmac = regions.rmac_regions(height, width)
    if size in [(6, 9), (5, 8)]:  # R-MAC puts one extra square along the width here
        np.testing.assert_array_equal(boxes, rmac)
    if size == (9, 6):  # portrait: the same squares, transposed order
        assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, rmac.tolist()))
        landscape = np.asarray(pooling.darac_regions(np.array([[6, 9]])))[0]
        np.testing.assert_array_equal(boxes, landscape[:, [1, 0, 3, 2]])


def test_darac_regions_of_traced_sizes_match_each_image():
    sizes = np.array([[6, 9], [9, 6], [3, 3], [1, 5]], np.int32)
    batched = jax.jit(pooling.darac_regions, static_argnames="levels")(sizes, levels=2)
    assert batched.shape == (4, pooling.num_darac_regions(2), 4) == (4, 9, 4)
    for b, (height, width) in enumerate(sizes.tolist()):
        np.testing.assert_array_equal(batched[b], ref.darac_regions(height, width, levels=2))


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (2, 5, 7, 4)])
def test_darac_shapes(shape):
    x = _features(np.random.default_rng(30), shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        regional = _darac_regional(jnp.asarray(x, dtype))
        assert regional.shape == (shape[0], 21, 2 * shape[3]) and regional.dtype == jnp.float32
        out = _darac_pooling(jnp.asarray(x, dtype))
        assert out.shape == (shape[0], shape[3]) and out.dtype == jnp.float32


def test_darac_known_values():
    # A 1x2 map, 2 channels, one level: regions = whole map, left cell, right cell.
    x = np.array([[[[1.0, 0.0], [0.0, 2.0]]]], np.float32)  # (1, 1, 2, 2)
    regional = _darac_regional(x, levels=1, eps=0.0)
    unit = np.array([1.0, 2.0]) / np.sqrt(5.0)  # whole map: max (1, 2), mean (0.5, 1)
    np.testing.assert_allclose(
        regional[0], [[*unit, *unit], [1, 0, 1, 0], [0, 1, 0, 1]], rtol=1e-6, atol=1e-7
    )
    weights = np.array([[1.0, 0.5], [2.0, 0.0], [0.0, -1.0]], np.float32)
    expected = 1.5 * unit + np.array([2.0, -1.0])  # worked out by hand
    np.testing.assert_allclose(pooling.darac(regional, weights)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(
        _darac_pooling(x, weights, levels=1, eps=0.0)[0], expected, rtol=1e-6
    )
    # Equal weights: RAMAC's sum of both halves over the regions.
    np.testing.assert_allclose(
        _darac_pooling(x, levels=1, eps=0.0)[0], 2 * unit + [2.0, 2.0], rtol=1e-6
    )


@pytest.mark.parametrize("shape", [(2, 6, 9, 3), (1, 7, 5, 4), (1, 2, 2, 2)])
def test_darac_matches_reference(shape):
    rng = np.random.default_rng(31)
    x = _features(rng, shape)
    regional = _darac_regional(x)
    np.testing.assert_allclose(
        regional, _reference_batch_plain(ref.darac_regional, x), rtol=1e-5, atol=1e-6
    )
    weights = rng.normal(size=(21, 2)).astype(np.float32)
    np.testing.assert_allclose(
        _darac_pooling(x, weights),
        np.stack([ref.darac(ref.darac_regional(x[b]), weights) for b in range(len(x))]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_darac_regional_equals_ramac_on_its_21_region_maps():
    x = _features(np.random.default_rng(32), (2, 6, 9, 3))
    np.testing.assert_allclose(_darac_regional(x), _ramac(x), rtol=1e-6, atol=1e-7)


def test_darac_padded_batch_equals_each_image_alone():
    rng = np.random.default_rng(33)
    small, tall = _features(rng, (1, 3, 5, 3)), _features(rng, (1, 6, 4, 3))
    x = rng.uniform(50.0, 100.0, size=(2, 7, 6, 3)).astype(np.float32)  # garbage padding
    valid = np.zeros((2, 7, 6), bool)
    x[0, :3, :5], valid[0, :3, :5] = small[0], True
    x[1, :6, :4], valid[1, :6, :4] = tall[0], True
    padded = _darac_regional(x, valid=valid)
    np.testing.assert_allclose(padded[0], _darac_regional(small)[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(padded[1], _darac_regional(tall)[0], rtol=1e-6, atol=1e-7)


def test_darac_jit_matches_eager():
    x = _features(np.random.default_rng(34), (2, 4, 5, 3))
    weights = np.random.default_rng(35).normal(size=(3, 2)).astype(np.float32)
    np.testing.assert_allclose(
        _darac_pooling(x, weights, levels=1),
        pooling.darac_pooling(x, weights, levels=1),
        rtol=1e-6,
        atol=1e-7,
    )


def test_darac_grad():
    rng = np.random.default_rng(36)
    with jax.enable_x64(True):
        # Distinct positive values: no ties in the regional maxima.
        x = jnp.asarray(rng.permutation(40).reshape(1, 4, 5, 2) / 10.0 + 0.1, jnp.float64)
        weights = jnp.asarray(rng.normal(size=(3, 2)), jnp.float64)
        fn = jax.jit(partial(pooling.darac_pooling, levels=1))
        check_grads(fn, (x, weights), order=1, modes=("rev",))
        valid = jnp.asarray(np.arange(5)[None, None, :] < np.array([5, 5, 3, 3])[None, :, None])
        check_grads(lambda x: fn(x, weights, valid=valid), (x,), order=1, modes=("rev",))


def test_darac_in_the_registry_is_equal_weights():
    x = _features(np.random.default_rng(37), (2, 5, 7, 3))
    expected = np.asarray(_darac_pooling(x))
    np.testing.assert_allclose(
        jax.jit(partial(pooling.global_descriptor, pooling_name="darac"))(x, None),
        expected / np.linalg.norm(expected, axis=1, keepdims=True),
        rtol=1e-5,
    )


def test_darac_raises(without_annotation_checks):
    with pytest.raises(ValueError, match=r"darac_regional: features must have shape"):
        pooling.darac_regional(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match=r"\[max, avg\] halves, found 3"):
        pooling.darac(np.zeros((1, 21, 3), np.float32), np.ones((21, 2), np.float32))
    with pytest.raises(ValueError, match=r"\(R, 2\) = \(21, 2\) .* found \(21,\)"):
        pooling.darac(np.zeros((1, 21, 4), np.float32), np.ones(21, np.float32))
    with pytest.raises(ValueError, match=r"map_sizes must have shape \(B, 2\)"):
        pooling.darac_regions(np.array([6, 9]))
