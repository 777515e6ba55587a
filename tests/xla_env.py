"""The tests' XLA options in one place: tests/conftest.py sets them for the test processes, and
the commands that tests start get the same through ``xla_flags``, so every process compiles alike.
"""

from __future__ import annotations

from zsad_jax.compile_cache import MEMORY_SCHEDULE_FLAG

# Speed only. These tests are dominated by compiling many small programs, and LLVM at -O0 halves
# that (tests/test_acd_clip.py + test_dlvp_clip.py + test_af_clip.py: 214 -> 137 CPU s on 2 cores,
# 2026-12-01). Results differ from the default -O2 by float rounding only (neither level allows
# fast-math), but they do differ: a test that compares two processes' results bit for bit needs
# both to compile with the same options, hence one helper for every command a test starts.
# XLA:CPU's older loop emitters instead of its new fusion emitters compile the same programs in
# about two thirds of the CPU time (the same three files: 210 -> 136 CPU s, 2026-12-02), again with
# results that differ by float rounding only.
# The commands' own CPU scheduling (zsad_jax.compile_cache.schedule_for_memory) for the test
# processes too, so that in-process programs and the commands' are compiled alike.
CPU_COMPILE_OPTIONS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    MEMORY_SCHEDULE_FLAG,
)


def xla_flags(devices: int = 1) -> str:
    """``XLA_FLAGS`` for a process of the tests: ``devices`` fake CPU devices, the options above."""
    fake = [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []
    return " ".join([*fake, *CPU_COMPILE_OPTIONS])
