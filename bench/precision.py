"""bfloat16 against float32 compute: how far the maps, scores and metrics move.

``compute_dtype="auto"`` runs the matrix products in bfloat16 on GPU/TPU (README, "Precision");
this measures what that costs in accuracy, on CPU, where both dtypes run the same XLA programs
except for the matmul precision. Per method config (random weights, untrained heads: these are
the tiny/small test and demo sizes, not trained models), one model is built with
``nnx.Rngs(config.seed)`` and evaluated twice by ``zsad_jax.evaluate.evaluate`` on the synthetic
benchmark's held-out test set (``data.test_categories``), with ``compute_dtype`` float32 then
bfloat16 (the same weights: the compute dtype changes no initial value). It prints one JSON line
per figure and config:

* ``map_max_abs`` / ``map_mean_abs``: max and mean |map_bf16 - map_fp32| over every pixel of
  every test image (maps are in [0, 1]);
* ``score_max_abs``: max |score_bf16 - score_fp32| over the test images;
* ``image_AUROC`` / ``pixel_AUROC``: the float32 value, the bfloat16 value and their difference
  (fractions in [0, 1]; with untrained heads the AUROCs themselves are near chance and mean
  little, the difference is what is measured).

Run:
  .venv/bin/python bench/precision.py                    # every tiny and small config
  .venv/bin/python bench/precision.py --configs=af_clip:tiny --per-label=2   # 2+2 per category

Not a test (tests/test_precision.py runs its smallest size and bounds the tiny maps).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from zsad_jax import evaluate as evaluate_lib  # noqa: E402
from zsad_jax import methods  # noqa: E402
from zsad_jax.data import readers, synthetic  # noqa: E402

# The configs with a random-weight size small enough for CPU (ACD-CLIP and DLVP-CLIP have no
# ``small`` variant).
CONFIGS = (
    "af_clip:tiny",
    "af_clip:small",
    "ava_dino:tiny",
    "ava_dino:small",
    "acd_clip:tiny",
    "dlvp_clip:tiny",
)
DTYPES = ("float32", "bfloat16")
METRICS = ("image_AUROC", "pixel_AUROC")


def test_records(root: str, per_label: int | None) -> list:
    """The held-out test records; ``per_label`` keeps that many normal and anomalous images of each
    category (the first ones read)."""
    records = readers.read_mvtec_layout(
        root, "test", synthetic.SYNTHETIC_HELDOUT_CATEGORIES, dataset="synthetic"
    )
    if per_label is None:
        return records
    kept: dict[tuple[str, int], int] = {}
    out = []
    for r in records:
        key = (r.category, r.gt_label)
        if kept.get(key, 0) < per_label:
            kept[key] = kept.get(key, 0) + 1
            out.append(r)
    return out


def _evaluate(spec: str, records: list, dtype: str) -> tuple[dict, dict]:
    """(metrics, outputs and weights) of ``spec`` built from its seed and run in ``dtype``."""
    name, _, variant = spec.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    config.eval.num_vis = 0
    config.compute_dtype = dtype
    model = methods.build(config, rngs=nnx.Rngs(int(config.seed)))
    result = evaluate_lib.evaluate(model, config, records=records, keep_outputs=True)
    weights = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    return result, {"outputs": result.pop("outputs"), "weights": weights}


def compare(spec: str, records: list) -> list[dict]:
    """The figures of one config (one dict per printed line)."""
    start = time.time()
    (fp32, kept32), (bf16, kept16) = (_evaluate(spec, records, d) for d in DTYPES)
    pairs = zip(kept32["weights"], kept16["weights"], strict=True)
    if not all(a.tobytes() == b.tobytes() for a, b in pairs):
        raise AssertionError(f"{spec}: the two dtypes drew different initial weights")
    out32, out16 = kept32["outputs"], kept16["outputs"]
    map_diff = np.abs(out16["anomaly_map"].astype(np.float64) - out32["anomaly_map"])
    score_diff = np.abs(out16["pred_score"].astype(np.float64) - out32["pred_score"])
    base = {"config": spec, "images": int(out32["pred_score"].shape[0])}
    rows = [
        {**base, "figure": "map_max_abs", "value": float(map_diff.max())},
        {**base, "figure": "map_mean_abs", "value": float(map_diff.mean())},
        {**base, "figure": "score_max_abs", "value": float(score_diff.max())},
    ]
    for metric in METRICS:
        a, b = float(fp32[metric]), float(bf16[metric])
        rows.append({**base, "figure": metric, "float32": a, "bfloat16": b, "difference": b - a})
    rows.append({**base, "figure": "seconds", "value": round(time.time() - start, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="method:variant, ...")
    parser.add_argument("--data-root", default=None, help="synthetic benchmark (default: cache)")
    parser.add_argument("--per-label", type=int, default=None, help="images per category and label")
    args = parser.parse_args(argv)
    records = test_records(synthetic.ensure(args.data_root), args.per_label)
    for spec in args.configs.split(","):
        for row in compare(spec, records):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
