"""Zero-shot transfer beside the training-free baselines, on every held-out set of a config.

``transfer_report(model, config)`` evaluates the model and ``zsad_jax.methods.baselines`` on
``config.data.test_set`` and on each of ``config.eval.extra_test_sets`` (comma-separated dataset
names, each read from its default root with all its categories). The demo's training run reports
it at its end (``zsad_jax.train.default_evaluator``); ``tools/demo_transfer.py`` does so for a
trained workdir.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from zsad_jax import evaluate as evaluate_lib
from zsad_jax.data import protocol
from zsad_jax.methods.base import AnomalyModel
from zsad_jax.methods.baselines import TRAINING_FREE, build_baseline

REPORTED = ("image_AUROC", "pixel_AUROC", "pixel_AP", "pixel_AUPRO")


def names_in(text: Any) -> list[str]:
    """A comma-separated config field -> its non-empty names."""
    return [n.strip() for n in str(text or "").split(",") if n.strip()]


def wanted(config: Any) -> bool:
    """Whether the config asks for a transfer report (further held-out sets or baselines)."""
    return bool(
        names_in(config.eval.get("extra_test_sets")) or names_in(config.eval.get("baselines"))
    )


def heldout_configs(config: Any) -> dict[str, Any]:
    """{name: config} for ``config.data.test_set`` and each of ``config.eval.extra_test_sets``."""
    out = {str(config.data.test_set): config}
    for name in names_in(config.eval.get("extra_test_sets")):
        c = copy.deepcopy(config)
        c.data.test_set = name
        c.data.test_root = protocol.default_root(name)
        c.data.test_categories = ()
        out[name] = c
    return out


def _means(result: dict) -> dict[str, float]:
    return {k: float(result[k]) for k in REPORTED if k in result}


def transfer_report(
    model: AnomalyModel | None,
    config: Any,
    *,
    baselines: Sequence[str] | None = None,
    main: dict | None = None,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{set name: {"model": means, baseline: means, ...}}`` over the config's held-out sets.

    ``baselines`` default: ``config.eval.baselines`` or ``TRAINING_FREE``. ``model`` None reports
    the baselines only. ``main``: the model's ``evaluate`` result on ``config.data.test_set`` when
    the caller has it already (not evaluated again).
    """
    if baselines is None:
        baselines = names_in(config.eval.get("baselines")) or list(TRAINING_FREE)
    built = {name: build_baseline(name, config) for name in baselines}
    report: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, c in heldout_configs(config).items():
        row: dict[str, dict[str, float]] = {}
        if main is not None and c is config:
            row["model"] = _means(main)
        elif model is not None:
            row["model"] = _means(evaluate_lib.evaluate(model, c, num_vis=0, progress=progress))
        for name, baseline in built.items():
            row[name] = _means(evaluate_lib.evaluate(baseline, c, num_vis=0, progress=progress))
        report[set_name] = row
    return report
