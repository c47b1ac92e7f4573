import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval import similarity, validation

# ------------------------------------------------------------------------------ check_shape


def test_check_shape_accepts_names_and_exact_sizes():
    assert validation.check_shape("x", np.zeros((3, 2)), "P 2") == (3, 2)
    assert validation.check_shape("x", jnp.zeros((0, 4, 4, 1)), "B H W C") == (0, 4, 4, 1)
    assert validation.check_shape("x", np.zeros(5), "N") == (5,)


@pytest.mark.parametrize(
    "shape,axes,message",
    [
        ((4,), "N D", r"x must have shape \(N, D\), found shape \(4,\)\."),
        ((3, 3), "P 2", r"x must have shape \(P, 2\), found shape \(3, 3\)\."),
        ((2, 3), "N", r"x must have shape \(N,\), found shape \(2, 3\)\."),
    ],
)
def test_check_shape_raises(shape, axes, message):
    with pytest.raises(ValueError, match=message):
        validation.check_shape("x", np.zeros(shape), axes)


def test_check_shape_reads_tracers_without_converting():
    jax.jit(lambda x: validation.check_shape("x", x, "N D") and x)(jnp.zeros((2, 3)))


# --------------------------------------------------------------------------- as_float_array


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32, np.float64], ids=str)
def test_as_float_array_computes_in_float32(dtype):
    x = validation.as_float_array("x", np.ones((2, 3), dtype), axes="N D")
    assert isinstance(x, jax.Array) and x.dtype == jnp.float32  # float64 is float32 without x64


def test_as_float_array_keeps_float64():
    with jax.enable_x64(True):
        x = validation.as_float_array("x", np.ones((2, 3), np.float64))
        assert x.dtype == jnp.float64


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_], ids=str)
def test_as_float_array_refuses_integers_and_booleans(dtype):
    with pytest.raises(TypeError, match=f"features must be floating, got dtype {np.dtype(dtype)}"):
        validation.as_float_array("features", np.ones((2, 3), dtype))


def test_as_float_array_checks_the_shape_first():
    with pytest.raises(ValueError, match=r"features must have shape \(B, H, W, C\)"):
        validation.as_float_array("features", np.ones((2, 3), np.int32), axes="B H W C")


def test_as_float_array_under_jit():
    out = jax.jit(lambda x: validation.as_float_array("x", x, axes="N D") * 2)(jnp.ones((2, 2)))
    np.testing.assert_array_equal(out, 2 * np.ones((2, 2)))


# ----------------------------------------------------------------------------- common_float


def test_common_float_is_float32_unless_one_is_float64():
    a, b = validation.common_float(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float32))
    assert a.dtype == b.dtype == jnp.float32
    with jax.enable_x64(True):
        a, b = validation.common_float(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float64))
        assert a.dtype == b.dtype == jnp.float64
        # Strict promotion would refuse the mixed pair; the library casts first.
        scores = similarity.cosine_similarities(
            np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float64)
        )
        assert scores.dtype == jnp.float64


# ----------------------------------------------------------------------------- as_int_array


def test_as_int_array_casts_to_int32():
    x = validation.as_int_array("ids", np.array([[1, 2]], np.int64), axes="Q K")
    assert x.dtype == jnp.int32 and x.tolist() == [[1, 2]]
    assert validation.as_int_array("ids", np.array([3], np.uint8)).dtype == jnp.int32


@pytest.mark.parametrize("dtype", [np.float32, np.bool_], ids=str)
def test_as_int_array_raises(dtype):
    with pytest.raises(TypeError, match=f"ids must be integer, got dtype {np.dtype(dtype)}"):
        validation.as_int_array("ids", np.ones(2, dtype))
    with pytest.raises(ValueError, match=r"ids must have shape \(Q, K\), found shape \(2,\)"):
        validation.as_int_array("ids", np.ones(2, np.int32), axes="Q K")


# ---------------------------------------------------------------------------------- as_mask


def test_as_mask_accepts_booleans_of_the_shape():
    mask = validation.as_mask("valid", np.ones((1, 2), bool), shape=(1, 2))
    assert mask.dtype == jnp.bool_ and mask.shape == (1, 2)


def test_as_mask_raises():
    with pytest.raises(ValueError, match=r"valid must have shape \(B, H, W\) = \(1, 2, 2\), found"):
        validation.as_mask("valid", np.ones((1, 2, 3), bool), shape=(1, 2, 2), axes="B H W")
    with pytest.raises(ValueError, match=r"valid must have shape \(3,\), found \(4,\)\."):
        validation.as_mask("valid", np.ones(4, bool), shape=(3,))
    with pytest.raises(TypeError, match="valid must be boolean, got dtype float32"):
        validation.as_mask("valid", np.ones(3, np.float32))


# --------------------------------------------------------------------------- check_same_dim


def test_check_same_dim():
    validation.check_same_dim("queries", np.zeros((2, 4)), "database", jnp.zeros((5, 4)))
    message = (
        r"queries and database must have the same dimension D, found queries \(2, 4\) and "
        r"database \(3, 5\)\."
    )
    with pytest.raises(ValueError, match=message):
        validation.check_same_dim("queries", np.zeros((2, 4)), "database", np.zeros((3, 5)))


# ---------------------------------------------------------------------- as_host_float_array


def test_as_host_float_array_is_contiguous_of_the_dtype():
    x = np.ones((3, 4), np.float64)[:, ::2]  # not contiguous
    host = validation.as_host_float_array("database", x, axes="N D")
    assert host.dtype == np.float32 and host.flags.c_contiguous and host.shape == (3, 2)
    wide = validation.as_host_float_array("descriptors", jnp.ones((2, 2)), dtype=np.float64)
    assert isinstance(wide, np.ndarray) and wide.dtype == np.float64


def test_as_host_float_array_raises():
    with pytest.raises(
        ValueError, match=r"database must have shape \(N, 4\), found shape \(2, 3\)"
    ):
        validation.as_host_float_array("database", np.ones((2, 3), np.float32), axes="N 4")
    with pytest.raises(TypeError, match="database must be floating, got dtype int64"):
        validation.as_host_float_array("database", np.ones((2, 3), np.int64))


# ----------------------------------------------------------------------------- check_finite


def test_check_finite_accepts_finite_and_empty():
    validation.check_finite("x", np.ones((3, 2)))
    validation.check_finite("x", np.zeros((0, 2)))
    validation.check_finite("x", np.float32(1.0))


def test_check_finite_names_the_rows():
    x = np.zeros((6, 2, 2), np.float32)  # rows may be matrices: everything after axis 0
    x[1, 0, 1] = x[4, 1, 1] = np.nan
    x[3, 1, 0] = -np.inf
    with pytest.raises(
        ValueError,
        match=r"^x: 3 of 6 rows contain NaN or inf: NaN at rows \[1, 4\] and inf at rows \[3\]\.$",
    ):
        validation.check_finite("x", x)
    with pytest.raises(ValueError, match=r"inf at rows \[0, 1, 2, 3, 4\] \(\+2 more\)\.$"):
        validation.check_finite("x", np.full((7, 1), np.inf))


# ------------------------------------------------------------------------------ index_array


def test_index_array_policy():
    ids = validation.index_array("ok", [3, 1])
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1]
    assert validation.index_array("junk", []).dtype == np.int64  # np.asarray([]) is float64
    assert validation.index_array("junk", [[]]).shape == (0,)
    ranks = np.zeros((2, 3), np.int32)
    assert validation.index_array("ranks", ranks, axes="Q K", dtype=None).dtype == np.int32
    assert validation.index_array("ranks", np.zeros((2, 0)), axes="Q K").shape == (2, 0)
    assert validation.index_array("ids", np.array([0, 4]), upper=5).tolist() == [0, 4]


def test_index_array_returns_a_copy():
    values = np.array([1, 2], np.int64)
    ids = validation.index_array("ids", values)
    ids[0] = 7
    assert values[0] == 1


def test_index_array_raises():
    with pytest.raises(ValueError, match=r"ok must have shape \(N,\), found shape \(1, 1\)"):
        validation.index_array("ok", np.array([[1]]))
    with pytest.raises(TypeError, match="ok must hold integer indices, got dtype float64"):
        validation.index_array("ok", [0.5])
    with pytest.raises(TypeError, match="ok must hold integer indices, got dtype bool"):
        validation.index_array("ok", [True])
    with pytest.raises(ValueError, match=r"ids holds index 5, outside \[0, 5\)\."):
        validation.index_array("ids", [0, 5], upper=5)
    with pytest.raises(ValueError, match=r"ids holds index -1, outside \[0, 5\)\."):
        validation.index_array("ids", [-1], upper=5)
