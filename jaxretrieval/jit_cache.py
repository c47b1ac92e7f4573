"""A bound on the compiled shapes a jitted function keeps alive.

Exact-size extraction (global descriptors with ``size_multiple=1``, DSM activation maps)
compiles one executable per image shape and scale, and ``jax.jit`` keeps every one.
XLA:CPU maps each executable's code into the process: a MobileNetV2 executable takes
~170 memory maps, so ~390 shapes reach Linux's default ``vm.max_map_count`` (65,530) and
LLVM fails with "Cannot allocate memory", then the process crashes. It did, at image 725
of smvs_train's 736 photos at 1024 px. Callers drop the compiled shapes once there are
:data:`MAX_LIVE_EXECUTABLES`; a shape seen again compiles again.
"""

MAX_LIVE_EXECUTABLES = 64


def live_executables(jitted) -> int:
    """How many shapes ``jitted`` (a ``jax.jit`` function) holds compiled; 0 if unknown."""
    cache_size = getattr(jitted, "_cache_size", None)
    return int(cache_size()) if callable(cache_size) else 0


def drop_compiled_if_full(jitted) -> bool:
    """Clears ``jitted``'s compiled shapes once there are MAX_LIVE_EXECUTABLES of them.

    Returns:
      Whether they were dropped.
    """
    if live_executables(jitted) < MAX_LIVE_EXECUTABLES:
        return False
    jitted.clear_cache()
    return True
