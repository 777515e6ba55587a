"""Command start-up: how long ``--help`` and a one-line refusal take, against ``import jax``.

Run:
  .venv/bin/python bench/startup.py             # every command, 5 rounds
  .venv/bin/python bench/startup.py --small     # train only, 1 round (a few seconds)

Every command imports its libraries before it reads a flag, so ``--help`` and every refusal (a
typo in a config key, a missing path) cost the same start-up, and the test suite starts ~90
commands. The reference is the floor any JAX command pays, ``python -c "import jax"``; each row is
the median wall-clock and CPU seconds over the rounds (commands interleaved, so that a burst of load
on a shared machine falls on every row alike) and its ratio to that reference. Then the slowest
imports of ``import zsad_jax.train`` (``-X importtime``, cumulative), and ``ml_dtypes``'s own
import time: its 0.7 releases take ~0.5 s to register their dtypes (pyproject.toml bounds it).

Output: one JSON line per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ("import jax", ["-c", "import jax"])
COMMANDS = ("train", "evaluate", "predict", "reproduce")


def _rows_to_time(small: bool, workdir: str) -> list[tuple[str, list[str], int]]:
    """(label, python arguments, the exit status they must give)."""
    refusal = (
        "train: config key typo",
        ["-m", "zsad_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
         "--config.optim.stepz=3"],
        2,
    )  # fmt: skip
    commands = COMMANDS[:1] if small else COMMANDS
    helps = [(f"{c} --help", ["-m", f"zsad_jax.{c}", "--help"], 0) for c in commands]
    return [(*REFERENCE, 0), *helps, refusal]


def _time_once(args: list[str], expected: int) -> tuple[float, float]:
    """(wall, CPU) seconds of ``python <args>`` run from the repository root."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != expected:
        raise SystemExit(
            f"error: python {' '.join(args)} exited {proc.returncode}, not {expected}: "
            f"{(proc.stderr.strip().splitlines() or [''])[-1]}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def time_commands(small: bool, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="zsad_startup_") as workdir:
        rows = _rows_to_time(small, str(Path(workdir) / "run"))
        samples = {label: [] for label, _, _ in rows}
        for _ in range(rounds):
            for label, args, expected in rows:
                samples[label].append(_time_once(args, expected))
    reference_wall, reference_cpu = (
        statistics.median(s[i] for s in samples[REFERENCE[0]]) for i in (0, 1)
    )
    results = []
    for label, _, _ in rows:
        wall = statistics.median(s[0] for s in samples[label])
        cpu = statistics.median(s[1] for s in samples[label])
        results.append({
            "command": label, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "wall_vs_import_jax": round(wall / reference_wall, 2),
            "cpu_vs_import_jax": round(cpu / reference_cpu, 2), "rounds": rounds,
        })  # fmt: skip
    return results


def slowest_imports(module: str, top: int) -> list[dict]:
    """The ``top`` imports of ``python -X importtime -c 'import <module>'`` by cumulative time
    (each a top-level package or a module of this project, so that nested ones do not repeat)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    cumulative = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, micros, name = (part.strip() for part in line.split("|"))
        if "." not in name or name.startswith("zsad_jax"):
            cumulative[name] = max(cumulative.get(name, 0), int(micros))
    ranked = sorted(cumulative.items(), key=lambda item: -item[1])
    return [{"import": name, "cumulative_s": round(us / 1e6, 3)} for name, us in ranked[:top]]


def ml_dtypes_row() -> dict:
    code = (
        "import time, numpy; t = time.perf_counter(); import ml_dtypes; "
        "print(ml_dtypes.__version__, time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"import": f"ml_dtypes {out[0]} (after numpy)", "cumulative_s": round(float(out[1]), 3)}


def _table(commands: list[dict], imports: list[dict]) -> str:
    lines = [
        "| command | wall s | CPU s | wall / import jax | CPU / import jax |",
        "|---|---|---|---|---|",
        *(
            f"| {r['command']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['wall_vs_import_jax']:.2f} | {r['cpu_vs_import_jax']:.2f} |"
            for r in commands
        ),
        "",
        "| import (in `import zsad_jax.train`) | cumulative s |",
        "|---|---|",
        *(f"| {r['import']} | {r['cumulative_s']:.3f} |" for r in imports),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="train only, one round")
    parser.add_argument("--rounds", type=int, default=None, help="default: 5 (1 with --small)")
    parser.add_argument("--top", type=int, default=12, help="slowest imports to list")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.small else 5)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # --help never needs an accelerator
    commands = time_commands(args.small, rounds)
    imports = [*slowest_imports("zsad_jax.train", args.top), ml_dtypes_row()]
    for row in (*commands, *imports):
        print(json.dumps(row))
    print(_table(commands, imports))


if __name__ == "__main__":
    main()
