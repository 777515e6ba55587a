"""jax's persistent compilation cache for the commands (train, evaluate, predict).

A ViT-L train step takes tens of seconds to compile on CPU and on accelerators alike; the cache
stores compiled executables on disk, keyed by the program, the jax/XLA version and the device, so a
second run of the same command loads them instead of compiling again.

Where: ``~/.cache/zsad_jax/jax_cache`` by default; the environment variable ``ZSAD_JAX_CACHE_DIR``
sets another directory, and ``ZSAD_JAX_CACHE_DIR=""`` turns the cache off. A cache directory set
through jax's own ``JAX_COMPILATION_CACHE_DIR`` (or ``jax.config``) is left as it is.

Call ``enable_compilation_cache()`` once at start-up, before the first compilation.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "ZSAD_JAX_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "zsad_jax", "jax_cache")
# Programs that compile faster than this are not worth a disk entry (jax's default is 1 s).
MIN_COMPILE_SECONDS = 1.0


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
