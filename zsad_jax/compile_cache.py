"""jax's persistent compilation cache for the commands (train, evaluate, predict).

A ViT-L train step takes tens of seconds to compile on CPU and on accelerators alike; the cache
stores compiled executables on disk, keyed by the program, the jax/XLA version and the device, so a
second run of the same command loads them instead of compiling again.

Where: ``~/.cache/zsad_jax/jax_cache`` by default; the environment variable ``ZSAD_JAX_CACHE_DIR``
sets another directory, and ``ZSAD_JAX_CACHE_DIR=""`` turns the cache off. A cache directory set
through jax's own ``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config``) is left as it is.

Call ``enable_compilation_cache()`` once at start-up, before the first compilation.

``release_compiler_memory()`` (also for start-up) hands the memory XLA's compiler freed back to
the OS after each long compilation: glibc keeps freed blocks in its arenas, so without it a
ViT-L train step's compile (~650 MB, ACD-CLIP full size on CPU) stays in the process's RSS
underneath the step's own buffers, which XLA:CPU then allocates on top (``bench/official.py``).

``schedule_for_memory()`` (start-up, before the first computation) turns off XLA:CPU's
concurrency-optimised scheduler, which orders a program so that independent ops may run at once and
so keeps more buffers alive at the same time.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "ZSAD_JAX_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "zsad_jax", "jax_cache")
# Programs that compile faster than this are not worth a disk entry (jax's default is 1 s).
MIN_COMPILE_SECONDS = 1.0
# jax's monitoring event after each XLA compilation (or persistent-cache load) of a program.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def cache_dir() -> str | None:
    """The directory the cache should use, or None when ``ZSAD_JAX_CACHE_DIR`` is set empty."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        value = DEFAULT_DIR
    value = value.strip()
    return os.path.abspath(os.path.expanduser(value)) if value else None


def enable_compilation_cache(
    path: str | None = None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS
) -> str | None:
    """Turns jax's persistent compilation cache on; returns the directory in use, or None.

    Args:
      path: the directory; default ``cache_dir()`` (``ZSAD_JAX_CACHE_DIR`` or the default).
      min_compile_seconds: only programs that took at least this long to compile are stored.

    A directory that cannot be created leaves the cache off with a warning on stderr: a read-only
    home must not stop a run.
    """
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:  # the user chose one through jax itself
        return configured
    directory = cache_dir() if path is None else path
    if not directory:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache off, cannot create {directory}: {e}", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return directory


def _malloc_trim():
    """glibc's ``malloc_trim`` or None (another C library, or none found)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# XLA reads XLA_FLAGS once, when the first backend starts; jaxlib 0.10 schedules CPU programs for
# concurrency by default. Turned off, ACD-CLIP's full-size train step holds 3,003 instead of
# 4,025 MB of temporaries and peaks at 5,916 instead of 6,997 MB RSS (the official code: 6,637),
# its steps as fast (20.7 vs 20.8 s) and inference too (2-core CPU, bench/official.py). The same
# operations in another order: the same values, bit for bit.
CPU_SCHEDULER_OPTION = "xla_cpu_enable_concurrency_optimized_scheduler"
MEMORY_SCHEDULE_FLAG = f"--{CPU_SCHEDULER_OPTION}=false"

_release_installed = False


def release_compiler_memory(min_compile_seconds: float = MIN_COMPILE_SECONDS) -> bool:
    """After every compilation that took at least ``min_compile_seconds``, returns the memory
    the compiler freed to the OS (``malloc_trim(0)``), before the program first runs. Returns
    whether that is in place (False without glibc). Installing it twice installs it once."""
    global _release_installed
    trim = _malloc_trim()
    if trim is None:
        return False
    if not _release_installed:
        import jax

        def after_compile(event: str, seconds: float, **_) -> None:
            if event == BACKEND_COMPILE_EVENT and seconds >= min_compile_seconds:
                trim(0)

        jax.monitoring.register_event_duration_secs_listener(after_compile)
        _release_installed = True
    return True


def schedule_for_memory() -> bool:
    """Adds ``MEMORY_SCHEDULE_FLAG`` to ``XLA_FLAGS`` unless the user's ``XLA_FLAGS`` already
    chooses the CPU scheduler; returns whether it was added. It takes effect only if no jax
    backend has started in this process (no array made, nothing compiled yet)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_OPTION in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULE_FLAG}".strip()
    return True
