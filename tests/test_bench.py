"""bench/accelerator.py, bench/pipeline.py and bench/startup.py run at reduced size and print
their table; the persistent compilation cache follows ZSAD_JAX_CACHE_DIR."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from xla_env import xla_flags

from zsad_jax import compile_cache

ROOT = Path(__file__).resolve().parents[1]
# For the commands that run torch. Its OpenMP threads wait for each other at the end of every op:
# on a busy 2-core machine (the suite's two workers) one of them is often off its core, and a toy
# model's op then waits for it (a toy CLIP forward ~0.2 s instead of ~2 ms, 2 threads against 1).
# One thread: the same rows and fields, without that wait. XLA:CPU's threads do not read it.
ONE_TORCH_THREAD = {"OMP_NUM_THREADS": "1"}


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
    # One timed batch for the threaded rows: their count and fields are checked, not their rate.
    out, rows = _run(["bench/pipeline.py", "--small", "--thread-batches=1"], tmp_path)
    assert "| files | size | transform | img/s per core" in out
    per_core = [r for r in rows if "images_per_s_per_core" in r]
    assert {(r["files"], r["image_size"]) for r in per_core} == {
        (kind, size) for kind in ("mvtec_png", "visa_jpeg") for size in (518, 512, 336)
    }
    assert all(r["images_per_s_per_core"] > 0 and r["cores_for_target"] >= 1 for r in per_core)
    assert sum("threads" in r for r in rows) == 2


@pytest.mark.slow
def test_accelerator_small_runs_every_section(tmp_path):
    # Every program in the cache: the eval section loads the weight-init programs the train
    # worker compiled for the same method instead of compiling them again.
    args = ["--small", "--methods=af_clip", "--cache-min-compile-s=0"]
    out, rows = _run(["bench/accelerator.py", *args], tmp_path, **ONE_TORCH_THREAD)
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


def test_startup_times_each_command_against_import_jax_and_lists_the_slowest_imports(tmp_path):
    # The bench itself checks each command's exit status (--help 0, the typo 2) and stops if not.
    out, rows = _run(["bench/startup.py", "--small"], tmp_path)
    commands = [r for r in rows if "command" in r]
    assert [r["command"] for r in commands] == [
        "import jax", "train --help", "train: config key typo",
    ]  # fmt: skip
    assert commands[0]["wall_vs_import_jax"] == commands[0]["cpu_vs_import_jax"] == 1.0
    assert all(r["wall_s"] > 0 and r["cpu_vs_import_jax"] > 0 for r in commands)
    imports = [r["import"] for r in rows if "import" in r]
    assert imports[0] == "zsad_jax.train" and "jax" in imports
    assert imports[-1].startswith("ml_dtypes 0.")
    assert "| command | wall s | CPU s | wall / import jax |" in out


@pytest.mark.parametrize("small", [False, True])
def test_accelerator_first_line_names_the_platform_and_the_size(tmp_path, small):
    """The README's command on a CPU would start the full-size run: the first lines say so before
    anything slow starts (no sections here, so only the device query runs)."""
    args = ["bench/accelerator.py", "--sections=", *(["--small"] if small else [])]
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    environment["ZSAD_JAX_CACHE_DIR"] = ""  # nothing is compiled
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("bench/accelerator.py on cpu (1 x cpu): ")
    assert ("toy sizes (--small)" if small else "full size") in lines[0]
    note = "this is the full-size run"
    if small:
        assert note not in proc.stderr
    else:
        assert lines[1].startswith("note: no accelerator found: ") and note in lines[1]
        assert "--small runs the toy sizes" in lines[1]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["figure"] for r in rows] == ["device", "total"]


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


def test_schedule_for_memory_adds_its_flag_once_and_keeps_the_users_choice(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert compile_cache.schedule_for_memory()
    assert not compile_cache.schedule_for_memory()  # already there: not twice
    assert os.environ["XLA_FLAGS"] == (
        "--xla_backend_optimization_level=0 --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
    chosen = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    monkeypatch.setenv("XLA_FLAGS", chosen)
    assert not compile_cache.schedule_for_memory()
    assert os.environ["XLA_FLAGS"] == chosen
    monkeypatch.delenv("XLA_FLAGS")
    assert compile_cache.schedule_for_memory()
    assert os.environ["XLA_FLAGS"] == compile_cache.MEMORY_SCHEDULE_FLAG


# The gradient of a 12-layer GELU MLP: XLA:CPU's concurrency-optimised schedule keeps more of its
# buffers alive at once (140 vs 136 MiB of temporaries, jaxlib 0.10.2).
_TEMP_BYTES_OF_A_GRADIENT = """
import sys
import jax, jax.numpy as jnp
from zsad_jax import compile_cache
if sys.argv[1] == "memory":
    compile_cache.schedule_for_memory()
def loss(ws, x):
    for w in ws:
        x = jax.nn.gelu(x @ w)
    return (x**2).sum()
ws, x = [jnp.full((512, 512), 0.01) for _ in range(12)], jnp.ones((2048, 512))
print(jax.jit(jax.grad(loss)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes)
"""


def test_schedule_for_memory_takes_effect_at_start_up(tmp_path):
    """Called after ``import jax`` (as ``zsad_jax.cli`` does), before the first array: the same
    program is compiled with fewer bytes of temporaries than with XLA:CPU's default schedule."""
    flags = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    temp = {
        mode: int(_run(["-c", _TEMP_BYTES_OF_A_GRADIENT, mode], tmp_path, **flags)[0].split()[-1])
        for mode in ("default", "memory")
    }
    assert temp["memory"] < temp["default"], temp


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


@pytest.mark.torch
def test_official_af_clip_train_step_runs_at_tiny_size_without_jax(tmp_path):
    """bench/official.py's AF-CLIP official step (``--step=train_official_af_clip``) at the tiny
    config's sizes: a finite loss over two steps, the adaptor + context as the trained parameters,
    and no JAX in its process."""
    _, rows = _run(
        ["bench/official.py", "--step=train_official_af_clip", "--variant=tiny", "--train-steps=2"],
        tmp_path,
        **ONE_TORCH_THREAD,
    )
    (row,) = rows
    assert row["sizes"] == {"image": 32, "batch": 2, "layers": [1, 2, 3], "windows": [1, 3, 5]}
    width, inner, context = 48, 2 * 8, 4 * 32  # configs/af_clip.py tiny: adaptor 2 x 8, 4 x 32
    assert (
        row["params"]["trained"] == context + 2 * width + 3 * width * inner + inner * width + width
    )
    assert math.isfinite(row["loss"]) and len(row["later_steps_s"]) == 1
    assert row["peak_rss_mib"] >= row["rss_built_mib"] and not row["jax_imported"]


@pytest.mark.torch
def test_official_acd_clip_inference_agrees_and_prints_its_roofline(tmp_path):
    """bench/official.py's inference comparison at the tiny sizes: both sides give the same
    scores and maps, and the roofline figures are the FLOP count over each side's median time.
    The GEMM ceiling at 1024 (the default 4096's six GEMMs take seconds here): its figure is named
    by the size used."""
    args = ["--variant=tiny", "--no-train", "--repeats=1", "--sgemm-size=1024"]
    _, rows = _run(["bench/official.py", *args], tmp_path, **ONE_TORCH_THREAD)
    assert [r["step"] for r in rows[:-1]] == ["export", "infer"]  # the export its own row
    assert rows[-1]["summary"]["export"]["bytes"] > 0
    infer = rows[-1]["summary"]["infer"]
    assert infer["score_max_abs_diff"] < 1e-5 and infer["map_max_abs_diff"] < 1e-5
    assert infer["map_std"] > 0
    flop = infer["forward_gflop"]
    assert flop > 0 and infer["torch_sgemm_1024_gflops"] > 0
    rates = infer["ours_gflops"] / infer["official_gflops"]
    assert rates == pytest.approx(1 / infer["ours_over_official_median_wall"], rel=0.05)
    gemms = infer["block_gemm_gflops"]
    assert set(gemms) == {"qkv", "out", "mlp_in", "mlp_out"}
    assert all(rate["xla"] > 0 and rate["torch"] > 0 for rate in gemms.values())
    assert infer["target_0.85x_gflops"] == pytest.approx(
        infer["official_gflops"] / 0.85, rel=0.05, abs=0.2
    )
