"""Prints a method's parameter table without weights or FLOPs (the model is built abstractly).

    python -m zsad_jax.summary --config=configs/af_clip.py[:variant,...] [--depth=2]
        [--config.KEY=VALUE ...]

The last line is JSON: ``{"total_params", "frozen_params", "trainable_params"}``. The config is
read, overridden and validated as the other commands do (``zsad_jax.cli``), and a mistake ends
with one line ``error: ...``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence

from absl import flags
from flax import nnx

from zsad_jax import cli, methods
from zsad_jax.nn import Trainable


def parameter_table(model: nnx.Module, depth: int = 2) -> list[tuple[str, int, int]]:
    """``[(path prefix, trainable count, frozen count)]`` over every ``nnx.Param`` of ``model``."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        prefix = ".".join(str(p) for p in path[:depth])
        rows[prefix][0 if isinstance(var, Trainable) else 1] += math.prod(var.shape)
    return [(k, t, f) for k, (t, f) in sorted(rows.items())]


def count_parameters(model: nnx.Module) -> dict[str, int]:
    rows = parameter_table(model, depth=0)
    trainable = sum(r[1] for r in rows)
    frozen = sum(r[2] for r in rows)
    return {
        "total_params": trainable + frozen,
        "frozen_params": frozen,
        "trainable_params": trainable,
    }


def abstract_model(config) -> nnx.Module:
    """The method with shapes only: no weights are read and nothing is computed."""
    return nnx.eval_shape(lambda: methods.build(config, rngs=nnx.Rngs(0), load_weights=False))


def _define_flags() -> None:
    flags.DEFINE_string(
        "config", None, "method config file[:variant,...]; change keys with --config.KEY=VALUE"
    )
    flags.DEFINE_integer("depth", 2, "aggregate parameters by this many leading path parts")
    flags.mark_flag_as_required("config")


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    config = cli.build_config(config_file=flags.FLAGS.config, overrides=overrides)
    model = abstract_model(config)
    rows = parameter_table(model, flags.FLAGS.depth)
    width = max([len("module")] + [len(r[0]) for r in rows])
    print(f"{config.method}: parameters by module")
    print(f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}")
    for name, t, f in rows:
        print(f"{name:<{width}}  {t:>12,}  {f:>12,}")
    counts = count_parameters(model)
    print(f"{'total':<{width}}  {counts['trainable_params']:>12,}  {counts['frozen_params']:>12,}")
    print(json.dumps(counts))


if __name__ == "__main__":
    cli.Command(_define_flags, main).run()
