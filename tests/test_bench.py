"""bench/accelerator.py and bench/pipeline.py run at reduced size and print their table; the
persistent compilation cache follows ZSAD_JAX_CACHE_DIR."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from xla_env import xla_flags

from zsad_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=900, **env):
    environment = {
        # Not the session's cache (tests/conftest.py): these commands find theirs through ours.
        **{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(),  # one CPU device, not the tests' 8 fake ones
        "ZSAD_JAX_CACHE_DIR": str(tmp_path / "jax_cache"),
        "ZSAD_TEXT_CACHE": str(tmp_path / "text_cache"),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.stdout, rows


def test_pipeline_small_prints_rates_and_table(tmp_path):
    out, rows = _run(["bench/pipeline.py", "--small"], tmp_path)
    assert "| files | size | transform | img/s per core" in out
    per_core = [r for r in rows if "images_per_s_per_core" in r]
    assert {(r["files"], r["image_size"]) for r in per_core} == {
        (kind, size) for kind in ("mvtec_png", "visa_jpeg") for size in (518, 512, 336)
    }
    assert all(r["images_per_s_per_core"] > 0 and r["cores_for_target"] >= 1 for r in per_core)
    assert sum("threads" in r for r in rows) == 2


@pytest.mark.slow
def test_accelerator_small_runs_every_section(tmp_path):
    out, rows = _run(["bench/accelerator.py", "--small", "--methods=af_clip"], tmp_path)
    assert "| figure | what | result | MFU % |" in out
    figures = [r["figure"] for r in rows]
    assert "error" not in figures, rows
    assert all(r["what"] == "torch" for r in rows if r["figure"] == "skipped")  # torch optional
    for figure in ("device", "matmul_peak", "attention_parity", "encoder_forward", "train_step"):
        assert figure in figures
    assert "evaluate" in figures
    encoders = [r for r in rows if r["figure"] == "encoder_forward"]
    assert len(encoders) == 8 and all(r["images_per_s"] > 0 and r["mfu"] for r in encoders)
    assert all(r["attention"] == "blocked" for r in encoders)  # CPU's path
    train = next(r for r in rows if r["figure"] == "train_step")
    assert train["method"] == "af_clip" and train["mfu"] and train["peak_device_mib"] > 0
    parity = {r["dtype"]: r for r in rows if r["figure"] == "attention_parity"}
    assert parity["float32"]["out_diff_vs_fp32"] < 1e-5
    assert parity["bfloat16"]["out_diff_vs_fp32"] < 2e-2


def test_cache_dir_default_override_and_off(monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.cache_dir() == os.path.expanduser("~/.cache/zsad_jax/jax_cache")
    monkeypatch.setenv(compile_cache.ENV_VAR, "/tmp/somewhere")
    assert compile_cache.cache_dir() == "/tmp/somewhere"
    monkeypatch.setenv(compile_cache.ENV_VAR, "")
    assert compile_cache.cache_dir() is None
    session_cache = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert compile_cache.enable_compilation_cache() is None  # off: jax's config untouched
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", session_cache)


def test_enable_compilation_cache_stores_compiled_programs(tmp_path):
    """In a fresh process (jax's cache is process-wide state): entries appear in the directory."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from zsad_jax.compile_cache import enable_compilation_cache\n"
        "print(enable_compilation_cache(min_compile_seconds=0))\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
    )
    out, _ = _run(["-c", code], tmp_path)
    cache = tmp_path / "jax_cache"
    assert out.strip() == str(cache)
    assert any(cache.iterdir())


def test_release_compiler_memory_trims_once_after_each_compilation(tmp_path):
    """In a fresh process (the listener is process-wide): installed twice, it trims once per
    compiled program."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from zsad_jax import compile_cache\n"
        "calls = []\n"
        "compile_cache._malloc_trim = lambda: calls.append\n"
        "x = jnp.ones((64, 64))\n"
        "print(compile_cache.release_compiler_memory(min_compile_seconds=0),\n"
        "      compile_cache.release_compiler_memory(min_compile_seconds=0))\n"
        "f = jax.jit(lambda x: jnp.sin(x) @ x.T)\n"
        "f(x).block_until_ready()\n"
        "f(x).block_until_ready()  # compiled already\n"
        "print(calls)\n"
    )
    out, _ = _run(["-c", code], tmp_path)
    assert out.split("\n")[:2] == ["True True", "[0]"]
