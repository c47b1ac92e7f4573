"""XLA flags for the test processes and the subprocesses that tests start.

Imported by conftest.py before JAX, so it must not import JAX itself.
"""

import importlib.metadata


def _jaxlib_minor_version() -> tuple[int, int]:
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` with ``devices`` forced host devices and the suite's compile settings.

    The suite is compile-bound. On jaxlib 0.10 (the pinned ``make test`` stack) the CPU
    compiler's legacy emitters compile the suite's programs with about a third less CPU
    than the fusion emitters, and single-threaded code generation wastes nothing when every
    core already runs a test worker (benchmarks/RESULTS.md, "The test suite's wall time").
    Later jaxlib removed the legacy emitters (the flag would abort) and compiles faster.
    """
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if _jaxlib_minor_version() == (0, 10):
        flags += ["--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"]
    return " ".join(flags)
