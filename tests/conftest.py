"""Test-wide setup, set before jax is imported: 8 fake CPU devices and quick compilation
(tests/xla_env.py), float32 matmuls, one persistent compilation cache for the whole session, and
the ``torch`` marker's skip.

The cache is a directory in the environment (``JAX_COMPILATION_CACHE_DIR``, every program stored),
so this process, the pytest-xdist workers and every command a test starts share it: a program that
another test (or command) already compiled is loaded, not compiled again. The commands respect a
cache directory set through jax (zsad_jax/compile_cache.py). Set ``JAX_COMPILATION_CACHE_DIR``
yourself to keep the cache between runs; otherwise it is a temporary directory, removed at the end.
"""

import os
import shutil
import tempfile

import pytest
from extras import CONVERT_EXTRA, convert_extra_installed
from xla_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_SESSION_CACHE = None  # the directory this process made (and removes), if it made one
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    _SESSION_CACHE = tempfile.mkdtemp(prefix="zsad_jax_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    # Every program, however quick to compile: the tests compile the same small ones many times.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
from jax._src import core as jax_core  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def _tracer_has_no_sharding(tracer):
    raise AttributeError(f"The 'sharding' attribute is not available on {tracer._error_repr()}.")


# Speed only, the tests' process: jax 0.10's Tracer.sharding builds its AttributeError's message
# by walking every equation traced so far, and flax NNX probes ``getattr(value, "sharding", None)``
# on each Variable write, so building a model under jit or eval_shape is quadratic (a ViT-L
# AF-CLIP 5 s instead of 1 s). The same error without that walk (as proposed in jax-ml/jax#40041).
jax_core.Tracer.sharding = property(_tracer_has_no_sharding)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``torch`` skip, with the reason, where the convert extra is not installed."""
    if convert_extra_installed():
        return
    skip = pytest.mark.skip(reason=CONVERT_EXTRA)
    for item in items:
        if item.get_closest_marker("torch"):
            item.add_marker(skip)


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
