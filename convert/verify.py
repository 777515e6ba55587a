"""Compares a converted checkpoint with the PyTorch reference model on the same random inputs.

    python -m convert.verify --src SRC --converted OUT [--tolerance 1e-4]

Prints one line per compared output with its max abs difference; the last line is JSON
``{"max_abs_diff": <float>, "outputs_compared": <int>}``. Exit status 1 above the tolerance, and
for a refusal (a missing file, a source of another kind than the converted folder), which is one
line ``error: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from zsad_jax.encoders import checkpoint
from zsad_jax.errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.verify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--src", required=True, help="the PyTorch checkpoint that was converted")
    parser.add_argument("--converted", required=True, help="the zsad_jax checkpoint directory")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest max abs difference that passes (exit 0; above it exit 1) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random inputs both models get (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    kind = checkpoint.read_meta(args.converted)["type"]
    if kind == "clip":
        from convert.clip import compare
    elif kind == "dinov3":
        from convert.dinov3 import compare
    else:
        raise ValueError(f"{args.converted}: no verifier for encoder type {kind!r}")

    diffs = compare(args.src, args.converted, seed=args.seed)  # [(name, max_abs_diff), ...]
    width = max(len(name) for name, _ in diffs)
    for name, diff in diffs:
        print(f"{name:<{width}}  {diff:.3e}")
    worst = max(d for _, d in diffs)
    print(json.dumps({"max_abs_diff": worst, "outputs_compared": len(diffs)}))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(run_command(main))
