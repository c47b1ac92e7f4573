"""Test configuration: strict JAX promotion, 4 host devices, hypothesis profile, data paths.

The JAX flags are set before any test module runs JAX compute: strict dtype promotion and
raised rank promotion catch silent upcasts and accidental broadcasting (equinox's setup).
"""

import os
import pathlib

from tests.xla_flags import xla_flags

# Four CPU devices for the sharding tests (DESIGN.md decision 4), and the compile settings
# of tests/xla_flags.py. Must precede jax import.
os.environ.setdefault("XLA_FLAGS", xla_flags(4))

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(
    os.environ.get("JAXRETRIEVAL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real data sets of ../shared/data; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set JAXRETRIEVAL_SHARED_DATA)")
    return SHARED_DATA


class _SystemCall:
    """What a malicious pickle holds: ``os.system(command)``, run when it is unpickled."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def malicious_payload(tmp_path) -> tuple[object, pathlib.Path]:
    """``(payload, marker)``: an object that pickles to ``os.system("touch <marker>")``.

    A test pickles it into a file and checks that the loader refuses the file and that
    ``marker`` does not exist; an ordinary unpickler creates it (the control).
    """
    marker = tmp_path / "pwned"
    return _SystemCall(f"touch {marker}"), marker


@pytest.fixture
def standard_dtype_promotion():
    """JAX's standard dtype promotion for one test, instead of the strict one.

    For tests that run optax's Adam, which computes ``decay ** count`` (a Python float to
    an int32 power): strict promotion refuses it.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture
def without_annotation_checks():
    """Turns off jaxtyping's runtime shape checks for one test.

    Annotated shapes are checked in every test (pyproject addopts), which means a bad shape
    is refused by jaxtyping before the function's own validation runs. Tests of the
    library's own ValueError/TypeError messages (what a user without jaxtyping sees) use
    this fixture.
    """
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def pytest_collection_modifyitems(config, items):
    """Skips accelerator tests on CPU and slow tests unless JAXRETRIEVAL_SLOW=1."""
    on_cpu = jax.default_backend() == "cpu"
    run_slow = os.environ.get("JAXRETRIEVAL_SLOW") == "1"
    for item in items:
        if on_cpu and "accelerator" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a GPU or TPU"))
        if not run_slow and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow; set JAXRETRIEVAL_SLOW=1"))
