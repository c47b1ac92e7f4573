import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from jaxretrieval import whitening
from tests.reference import whitening_reference as ref


def _anisotropic(rng, n, d, scales=None):
    """Correlated Gaussian rows with clearly distinct variances along random axes."""
    scales = np.linspace(3.0, 0.3, d) if scales is None else np.asarray(scales)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * scales) @ rotation.T + rng.normal(size=d)


def _projected(w, x, dim=None):
    """Centred and projected (un-normalised) descriptors, float64, for Gram comparisons."""
    projection = np.asarray(w.projection, np.float64)
    dim = projection.shape[0] if dim is None else dim
    return (np.asarray(x, np.float64) - np.asarray(w.mean, np.float64)) @ projection[:dim].T


def _gram(y):
    """Eigenvector signs are arbitrary; the Gram matrix of the projected data is not."""
    return y @ y.T


def _classes(rng, num_classes=12, per_class=4, d=8):
    """Class centres plus noise that is huge along half of the axes: raw NN is poor."""
    centres = rng.normal(size=(num_classes, d))
    noise_scale = np.where(np.arange(d) < d // 2, 3.0, 0.05)
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + rng.normal(size=(len(labels), d)) * noise_scale
    pairs = [(i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j]
    pairs = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    query_idx, positive_idx = (np.array(v) for v in zip(*pairs, strict=True))
    return x, labels, query_idx, positive_idx


# --------------------------------------------------------------------------- PCA whitening


def test_learn_pca_whitening_shapes():
    x = _anisotropic(np.random.default_rng(0), 30, 6).astype(np.float32)
    w = whitening.learn_pca_whitening(x)
    assert isinstance(w, whitening.Whitening)
    assert w.mean.shape == (6,) and w.projection.shape == (6, 6)
    assert w.mean.dtype == jnp.float32 and w.projection.dtype == jnp.float32
    assert whitening.learn_pca_whitening(x, dim=3).projection.shape == (3, 6)


def test_learn_pca_whitening_known_values():
    # Centred 2-d data with covariance diag(0.5, 2): the first direction is the y axis.
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    for shrinkage, expected in [
        (1.0, [[0.0, 2**-0.5], [2**0.5, 0.0]]),  # lambda^-1/2
        (0.5, [[0.0, 2**-0.25], [2**0.25, 0.0]]),  # lambda^-1/4: square-root shrinkage
        (0.0, [[0.0, 1.0], [1.0, 0.0]]),  # plain PCA rotation
    ]:
        w = whitening.learn_pca_whitening(x, shrinkage=shrinkage, eps=0.0)
        np.testing.assert_allclose(w.mean, [0.0, 0.0], atol=1e-7)
        # Axis-aligned eigenvectors: only their signs are arbitrary.
        np.testing.assert_allclose(np.abs(w.projection), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shrinkage", [1.0, 0.5])
@pytest.mark.parametrize("dim", [None, 3])
def test_learn_pca_whitening_matches_reference(shrinkage, dim):
    rng = np.random.default_rng(1)
    x = _anisotropic(rng, 40, 6)
    w = whitening.learn_pca_whitening(x, shrinkage=shrinkage, dim=dim)
    mean, projection = ref.pca_whitening(x, shrinkage=shrinkage)
    np.testing.assert_allclose(w.mean, mean, rtol=1e-6, atol=1e-6)
    held_out = _anisotropic(rng, 10, 6)
    k = 6 if dim is None else dim
    expected = (held_out - mean) @ projection[:k].T
    np.testing.assert_allclose(
        _gram(_projected(w, held_out)), _gram(expected), rtol=1e-4, atol=1e-4
    )
    normalised = np.asarray(whitening.apply_whitening(w, held_out.astype(np.float32)))
    np.testing.assert_allclose(
        _gram(normalised), _gram(ref.apply(mean, projection, held_out, dim)), atol=1e-5
    )


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([(24, 3), (40, 6)]),
    st.sampled_from([1.0, 0.5, 0.0]),
)
def test_pca_whitened_covariance_property(seed, shape, shrinkage):
    rng = np.random.default_rng(seed)
    n, d = shape
    scales = rng.uniform(0.2, 5.0, size=d)
    x = _anisotropic(rng, n, d, scales)
    centred = x - x.mean(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(centred.T @ centred / n))[::-1]
    assume(eigenvalues[-1] > 1e-2)
    w = whitening.learn_pca_whitening(x, shrinkage=shrinkage, eps=0.0)
    y = _projected(w, x)
    covariance = y.T @ y / n
    # Shrinkage 1 gives the identity; in general diag(lambda ** (1 - shrinkage)).
    expected = np.diag(eigenvalues ** (1.0 - shrinkage))
    np.testing.assert_allclose(covariance, expected, atol=2e-4 * max(1.0, expected.max()))
    # The whitened training data is centred.
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)


def test_learn_pca_whitening_eps_keeps_rank_deficient_fit_finite():
    # 3 points in 5-d: only 2 directions carry variance; eps keeps the rest finite.
    x = np.random.default_rng(2).normal(size=(3, 5))
    w = whitening.learn_pca_whitening(x, eps=1e-6)
    assert np.all(np.isfinite(w.projection))
    y = _projected(w, x, dim=2)
    np.testing.assert_allclose(y.T @ y / 3, np.eye(2), atol=1e-3)


# --------------------------------------------------------------------------- Lw


def _asymmetric_pairs(rng, n=40, d=6, num_pairs=60):
    """Well-conditioned rows; queries only among the first rows (some repeated), positives
    among the rest, rows shifted apart: the queries' mean is far from the mean of all."""
    x = _anisotropic(rng, n, d)
    x[: n // 3] += 2.0  # the query rows sit apart from the others
    query_idx = rng.integers(0, n // 3, size=num_pairs)
    positive_idx = rng.integers(n // 3, n, size=num_pairs)
    return x, query_idx, positive_idx


def _align_rows(actual, expected):
    """Row signs of ``actual`` flipped to match ``expected`` (eigenvectors have no sign)."""
    signs = np.sign(np.sum(actual * expected, axis=1))
    assert np.all(signs != 0)
    return actual * signs[:, None], signs


def test_learn_supervised_whitening_matches_cirtorch_whitenlearn():
    """Default (queries) centring == cirtorch's whitenlearn + whitenapply, up to row signs."""
    rng = np.random.default_rng(10)
    x, query_idx, positive_idx = _asymmetric_pairs(rng)
    w = whitening.learn_supervised_whitening(x, query_idx, positive_idx)  # default eps
    m, expected = ref.whitenlearn_columns(x.T, query_idx, positive_idx)  # columns (D, N)
    np.testing.assert_allclose(w.mean, m[:, 0], rtol=1e-6, atol=1e-6)
    # On this well-conditioned input cirtorch's Cholesky needs no ridge; our 1e-6 * I moves
    # the projection by far less than the tolerance.
    projection, signs = _align_rows(np.asarray(w.projection, np.float64), expected)
    np.testing.assert_allclose(projection, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    held_out = _anisotropic(rng, 10, 6).astype(np.float32)
    for dim in (None, 3):
        k = 6 if dim is None else dim
        ours = np.asarray(whitening.apply_whitening(w, held_out, dim=dim)) * signs[:k]
        theirs = ref.whitenapply_columns(held_out.T, m, expected, dim).T  # back to rows
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_learn_supervised_whitening_centerings_differ_on_asymmetric_pairs():
    rng = np.random.default_rng(11)
    x, query_idx, positive_idx = _asymmetric_pairs(rng)
    queries = whitening.learn_supervised_whitening(x, query_idx, positive_idx)
    everything = whitening.learn_supervised_whitening(x, query_idx, positive_idx, centering="all")
    np.testing.assert_allclose(queries.mean, x[query_idx].mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(everything.mean, x.mean(axis=0), rtol=1e-6, atol=1e-6)
    # "all" is the other reference (mean of all rows, covariance PCA) ...
    mean, projection = ref.supervised_whitening(x, query_idx, positive_idx)
    np.testing.assert_allclose(
        _gram(_projected(everything, x)), _gram((x - mean) @ projection.T), rtol=1e-4, atol=1e-4
    )
    # ... and not cirtorch's: the centre changes the PCA rotation, not just the offset.
    _, cirtorch = ref.whitenlearn_columns(x.T, query_idx, positive_idx)
    aligned, _ = _align_rows(np.asarray(everything.projection, np.float64), cirtorch)
    assert np.abs(aligned - cirtorch).max() > 0.1 * np.abs(cirtorch).max()
    held_out = _anisotropic(rng, 10, 6).astype(np.float32)
    a = np.asarray(whitening.apply_whitening(queries, held_out))
    b = np.asarray(whitening.apply_whitening(everything, held_out))
    assert np.abs(_gram(a) - _gram(b)).max() > 0.1  # cosine similarities differ


def test_learn_supervised_whitening_centerings_agree_on_balanced_pairs():
    # Every image is a query equally often (all ordered pairs, equal class sizes).
    rng = np.random.default_rng(12)
    x, _, query_idx, positive_idx = _classes(rng)
    queries = whitening.learn_supervised_whitening(x, query_idx, positive_idx)
    everything = whitening.learn_supervised_whitening(x, query_idx, positive_idx, centering="all")
    np.testing.assert_allclose(queries.mean, everything.mean, atol=1e-6)
    np.testing.assert_allclose(
        _gram(_projected(queries, x)), _gram(_projected(everything, x)), rtol=1e-4, atol=1e-4
    )


def test_learn_supervised_whitening_matches_reference():
    rng = np.random.default_rng(3)
    x, _, query_idx, positive_idx = _classes(rng)
    w = whitening.learn_supervised_whitening(x, query_idx, positive_idx, centering="all")
    mean, projection = ref.supervised_whitening(x, query_idx, positive_idx)
    np.testing.assert_allclose(w.mean, mean, rtol=1e-5, atol=1e-6)
    assert w.projection.shape == (8, 8)
    for dim in (None, 4):
        k = 8 if dim is None else dim
        np.testing.assert_allclose(
            _gram(_projected(w, x, dim)) / len(x),
            _gram((x - mean) @ projection[:k].T) / len(x),
            rtol=1e-4,
            atol=1e-4,
        )


def test_learn_supervised_whitening_whitens_pairs_and_decorrelates():
    rng = np.random.default_rng(4)
    x, _, query_idx, positive_idx = _classes(rng)
    w = whitening.learn_supervised_whitening(x, query_idx, positive_idx, eps=0.0)
    projection = np.asarray(w.projection, np.float64)
    differences = (x[query_idx] - x[positive_idx]) @ projection.T
    # Matching-pair differences have identity covariance after the projection ...
    np.testing.assert_allclose(differences.T @ differences / len(differences), np.eye(8), atol=1e-4)
    # ... and the projected data is decorrelated (diagonal, decreasing variances).
    y = _projected(w, x)
    covariance = y.T @ y / len(y)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0.0, atol=1e-3)
    assert np.all(np.diff(np.diag(covariance)) <= 1e-6)


def test_learn_supervised_whitening_brings_matching_pairs_closer():
    rng = np.random.default_rng(5)
    x, labels, query_idx, positive_idx = _classes(rng)
    w = whitening.learn_supervised_whitening(x, query_idx, positive_idx)

    def nearest_neighbour_accuracy(descriptors):
        scores = descriptors @ descriptors.T
        np.fill_diagonal(scores, -np.inf)
        return np.mean(labels[np.argmax(scores, axis=1)] == labels)

    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    whitened = np.asarray(whitening.apply_whitening(w, x.astype(np.float32)))
    # Similarity of matching pairs vs random pairs, before and after.
    matching = np.mean(np.sum(whitened[query_idx] * whitened[positive_idx], axis=1))
    random_pairs = rng.integers(0, len(x), size=(500, 2))
    random_pairs = random_pairs[labels[random_pairs[:, 0]] != labels[random_pairs[:, 1]]]
    random = np.mean(np.sum(whitened[random_pairs[:, 0]] * whitened[random_pairs[:, 1]], axis=1))
    assert matching > random + 0.3
    assert nearest_neighbour_accuracy(whitened) > nearest_neighbour_accuracy(raw) + 0.2
    assert nearest_neighbour_accuracy(whitened) >= 0.9


# --------------------------------------------------------------------------- apply


def test_apply_whitening_shapes_and_norms():
    rng = np.random.default_rng(6)
    x = _anisotropic(rng, 20, 5).astype(np.float32)
    w = whitening.learn_pca_whitening(x)
    for dim, expected in ((None, 5), (2, 2), (5, 5)):
        out = whitening.apply_whitening(w, x[:7], dim=dim)
        assert out.shape == (7, expected) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_apply_whitening_known_values():
    w = whitening.Whitening(
        mean=jnp.array([1.0, 1.0]), projection=jnp.array([[2.0, 0.0], [0.0, -1.0]])
    )
    # (x - m) = (3, 4) -> (6, -4) -> / sqrt(52); dim=1 keeps (6,) -> 1.
    out = whitening.apply_whitening(w, np.array([[4.0, 5.0]], np.float32))
    np.testing.assert_allclose(out, [[6 / np.sqrt(52), -4 / np.sqrt(52)]], rtol=1e-6)
    np.testing.assert_allclose(whitening.apply_whitening(w, np.array([[4.0, 5.0]]), dim=1), [[1.0]])
    # The mean itself maps to the zero vector, not NaN.
    np.testing.assert_array_equal(
        whitening.apply_whitening(w, np.array([[1.0, 1.0]])), [[0.0, 0.0]]
    )


def test_apply_whitening_jit_matches_eager_and_reference():
    rng = np.random.default_rng(7)
    x = _anisotropic(rng, 25, 6)
    w = whitening.learn_pca_whitening(x)
    queries = x[:5].astype(np.float32)
    jitted = jax.jit(whitening.apply_whitening, static_argnames="dim")
    np.testing.assert_allclose(
        jitted(w, queries, dim=4), whitening.apply_whitening(w, queries, dim=4), rtol=1e-6
    )
    np.testing.assert_allclose(
        whitening.apply_whitening(w, queries, dim=4),
        ref.apply(np.asarray(w.mean, np.float64), np.asarray(w.projection, np.float64), queries, 4),
        rtol=1e-5,
        atol=1e-6,
    )
    # A Whitening is a pytree: it passes through jit as an argument and vmaps.
    batched = jax.vmap(lambda q: whitening.apply_whitening(w, q[None])[0])(queries)
    np.testing.assert_allclose(batched, whitening.apply_whitening(w, queries), rtol=1e-6)


def test_whitening_raises(without_annotation_checks):
    x = np.random.default_rng(8).normal(size=(6, 3))
    with pytest.raises(
        ValueError, match=r"descriptors must have shape \(N, D\), found shape \(6,\)"
    ):
        whitening.learn_pca_whitening(x[:, 0])
    with pytest.raises(ValueError, match="at least 2 descriptors"):
        whitening.learn_pca_whitening(x[:1])
    with pytest.raises(TypeError, match="descriptors must be floating, got dtype int32"):
        whitening.learn_pca_whitening(np.ones((4, 3), np.int32))
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 of 6 rows contain NaN or inf: NaN at rows \[4\]"):
        whitening.learn_pca_whitening(bad)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 3\], found 4"):
        whitening.learn_pca_whitening(x, dim=4)
    with pytest.raises(ValueError, match=r"positive_idx holds index 6, outside \[0, 6\)"):
        whitening.learn_supervised_whitening(x, np.array([0, 1]), np.array([2, 6]))
    with pytest.raises(ValueError, match="equal length"):
        whitening.learn_supervised_whitening(x, np.array([0, 1]), np.array([2]))
    with pytest.raises(TypeError, match="query_idx must hold integer indices, got dtype float64"):
        whitening.learn_supervised_whitening(x, np.array([0.0]), np.array([1]))
    with pytest.raises(ValueError, match=r"query_idx must have shape \(N,\), found shape \(1, 2\)"):
        whitening.learn_supervised_whitening(x, np.array([[0, 1]]), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"centering must be one of \(.queries., .all.\)"):
        whitening.learn_supervised_whitening(x, np.array([0]), np.array([1]), centering="mean")
    w = whitening.learn_pca_whitening(x)
    with pytest.raises(ValueError, match=r"descriptors \(2, 4\) do not fit"):
        whitening.apply_whitening(w, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"dim must be in \[1, 3\], found 0"):
        whitening.apply_whitening(w, np.zeros((2, 3), np.float32), dim=0)
    with pytest.raises(TypeError, match="descriptors must be floating, got dtype int32"):
        whitening.apply_whitening(w, np.zeros((2, 3), np.int32))


def test_apply_whitening_on_rows_sharded_over_devices():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 (host) devices")
    rng = np.random.default_rng(9)
    x = _anisotropic(rng, 24, 5).astype(np.float32)
    w = whitening.learn_pca_whitening(x)
    mesh = jax.make_mesh((4,), ("data",))
    apply = jax.jit(whitening.apply_whitening, static_argnames="dim")
    expected = apply(w, x[:8], dim=3)
    with jax.set_mesh(mesh):
        out = apply(w, jax.device_put(x[:8], NamedSharding(mesh, P("data"))), dim=3)
    assert out.sharding.spec[0] == "data"
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
