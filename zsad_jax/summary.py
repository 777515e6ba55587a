"""Prints a method's parameter table without weights or FLOPs (the model is built abstractly).

    python -m zsad_jax.summary --config=configs/af_clip.py [--depth=2]

The last line is JSON: ``{"total_params", "frozen_params", "trainable_params"}``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from zsad_jax import methods
from zsad_jax.nn import Trainable

_CONFIG = config_flags.DEFINE_config_file("config", None, "method config file", lock_config=True)
_DEPTH = flags.DEFINE_integer("depth", 2, "aggregate parameters by this many leading path parts")


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


def main(argv):
    del argv
    config = _CONFIG.value
    model = abstract_model(config)
    rows = parameter_table(model, _DEPTH.value)
    width = max([len("module")] + [len(r[0]) for r in rows])
    print(f"{config.method}: parameters by module")
    print(f"{'module':<{width}}  {'trainable':>12}  {'frozen':>12}")
    for name, t, f in rows:
        print(f"{name:<{width}}  {t:>12,}  {f:>12,}")
    counts = count_parameters(model)
    print(f"{'total':<{width}}  {counts['trainable_params']:>12,}  {counts['frozen_params']:>12,}")
    print(json.dumps(counts))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
