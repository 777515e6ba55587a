"""Zero-shot transfer beside the training-free baselines, on every held-out set of a config.

``transfer_report(model, config)`` evaluates the model and ``zsad_jax.methods.baselines`` on
``config.data.test_set`` and on each of ``config.eval.extra_test_sets`` (comma-separated dataset
names, each read from its default root with all its categories). The demo's training run reports
it at its end (``zsad_jax.train.default_evaluator``); ``tools/demo_transfer.py`` does so for a
trained workdir. ``kind_report`` breaks each held-out set down by defect kind (each kind scored
with all the set's normal images), as the README's per-kind figures are.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from zsad_jax import evaluate as evaluate_lib
from zsad_jax.data import protocol, sources
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


def _baselines(config: Any, names: Sequence[str] | None) -> dict[str, AnomalyModel]:
    """The named training-free baselines, built (default: ``config.eval.baselines``, else all)."""
    if names is None:
        names = names_in(config.eval.get("baselines")) or list(TRAINING_FREE)
    return {name: build_baseline(name, config) for name in names}


def _row(
    model: AnomalyModel | None,
    built: dict[str, AnomalyModel],
    config: Any,
    *,
    records: Sequence[Any] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """{"model" | baseline: means} on ``config``'s test side (or on ``records``)."""
    who = ({"model": model} if model is not None else {}) | built
    return {
        name: _means(
            evaluate_lib.evaluate(m, config, records=records, num_vis=0, progress=progress)
        )
        for name, m in who.items()
    }


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
    built = _baselines(config, baselines)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, c in heldout_configs(config).items():
        if main is not None and c is config:
            report[set_name] = {"model": _means(main)} | _row(None, built, c, progress=progress)
        else:
            report[set_name] = _row(model, built, c, progress=progress)
    return report


def kind_report(
    model: AnomalyModel | None,
    config: Any,
    *,
    baselines: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{set name: {defect kind: {"model" | baseline: means}}}``: each held-out set's images of
    one defect kind together with all of its normal images, so that each kind's image AUROC
    ranks that kind against the same normals (the means are over categories, as everywhere)."""
    built = _baselines(config, baselines)
    report: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for set_name, c in heldout_configs(config).items():
        records = sources.read_records(c.data, "test")
        kinds = sorted({r.defect_type for r in records if r.gt_label})
        report[set_name] = {
            kind: _row(
                model,
                built,
                c,
                records=[r for r in records if not r.gt_label or r.defect_type == kind],
                progress=progress,
            )
            for kind in kinds
        }
    return report
