r"""Reproduces a method's reported tables: ``python -m zsad_jax.reproduce``.

    python -m zsad_jax.reproduce --config=configs/af_clip.py --mvtec_ad=data/mvtec_ad \
        --visa=data/visa --btad=data/btad --few_shot=1,2,4 --seeds=5 --workdir=runs/repro_af_clip
    python -m zsad_jax.reproduce --config=configs/ava_dino.py --mvtec_ad=data/mvtec_ad \
        --visa=data/visa --mpdd=data/mpdd --select_on_test --workdir=runs/repro_ava_dino

The cross-dataset zero-shot protocol (methods.md §5), both directions: a model is trained on the
*test* split of MVTec-AD (all categories) and evaluated zero-shot on VisA's test split, and another
is trained on VisA's test split and evaluated on MVTec-AD's. The MVTec-AD model is also evaluated
on the further test sets whose roots are given (``--btad``, ``--mpdd``; the papers report those for
a model trained on MVTec-AD). ``--few_shot=K,...`` adds few-shot evaluations (AF-CLIP+) of each
direction's test set, ``--seeds`` draws of the K reference images each, reported as their mean.
``--directions=mvtec_ad`` runs only the model trained on MVTec-AD. ``--config.KEY=VALUE`` changes
both directions' configs (not the dataset fields, which the protocol sets).

Outputs in ``--workdir``:

- ``train_<train set>/``: each direction's training run (checkpoints, ``metrics.jsonl``; the
  ``python -m zsad_jax.train`` layout) and ``training.json`` (its result, written when it ends);
- ``eval/<train set>_to_<test set>[_<K>shot_seed<S>]/``: each evaluation's ``metrics.json``,
  ``.csv``, ``.md`` (per category), ``vis/`` (zero-shot) and ``result.json``;
- ``table.md`` / ``table.csv``: per direction, test set and metric, our number, the reported one
  (the config file's ``REPORTED`` records), their difference (ours - reported, in points); and,
  with ``--select_on_test``, the best-epoch column described below. ``protocol.json`` records the
  command's settings.

Resuming: re-running the same command continues where a killed run stopped. A training run is
resumed by ``zsad_jax.train`` from its latest checkpoint in its sub-workdir (a finished one returns
its stored result at once); each evaluation's ``result.json`` is written atomically when the
evaluation ends and is reused when its key matches (the evaluated step, a hash of the evaluation's
config, the few-shot draw and the AUPRO variant); a missing or non-matching one is evaluated again.
A changed config is refused by ``zsad_jax.train`` (use another ``--workdir``).

``--select_on_test``: AVA-DINO's and ACD-CLIP's official code evaluate every epoch's checkpoint on
the test set and report the best one. That choice is offered only as an extra, labelled column
("selected on the test set, as the official code does"), next to the honest last-epoch number that
is always the "ours" column. How it is computed: each training run's ``config.eval.every_steps`` is
set to the steps of one epoch (always, so that a run trained without the flag has the same config);
with the flag, the training loop's evaluation hook evaluates the model after every epoch on each
zero-shot test set of that direction and writes ``eval/<name>/epochs/step_<N>.json``; the column
shows the epoch whose mean of the config's ``SELECT_ON_TEST`` metrics is highest (the earliest on
ties), with all its metrics. It needs every epoch's evaluation: a training run that ran (or
started) without the flag has none, and the column says "n/a" (use a new ``--workdir``). A config
without ``SELECT_ON_TEST`` (its official code reports the last epoch) refuses the flag.

AUPRO: ``--aupro_method=reported`` (default) computes it with the variant the reported numbers were
computed with (a record's ``aupro_method``, e.g. AF-CLIP's ``compute_pro``), else the exact
definition; or name one of ``zsad_jax.metrics.AUPRO_METHODS``. (The per-epoch evaluations use the
same variant.)

The ``REPORTED`` records of a config file (``REPORTED_FIELDS``), one dict per reported evaluation:

- ``train_set``, ``test_set``: dataset names (the paper table's test set, trained on the other);
- ``metrics``: ``{anomalib metric name: % as printed}``; ``source``: where it is printed;
- optional ``shots``: few-shot K (default 0 = zero-shot; few-shot numbers are means over seeds),
  ``std``: ``{metric: % std over seeds}``, ``aupro_method``: the official AUPRO variant, and
  ``when``: ``{dotted config key: value}`` the reported run used (e.g. ``{"model.n_groups": 2}``);
  a record applies to a config where all of them hold (none: every variant of the file).

A config file with the paper's ablation rows instead (``configs/dlvp_clip.py``: ``ABLATIONS``,
``TOP_K``) has them read as records whose ``when`` are the row's switches.

One process (all its local devices); for multi-host runs use ``zsad_jax.train`` and
``zsad_jax.evaluate`` directly. The last line printed is JSON: the paths of the tables.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from zsad_jax import cli, config_check, inference, methods, report
from zsad_jax import evaluate as evaluate_lib
from zsad_jax import metrics as metrics_lib
from zsad_jax import optim as optim_lib
from zsad_jax import train as train_lib
from zsad_jax.data import pipeline, sources
from zsad_jax.train import PREEMPTED_EXIT_CODE

# Training sets of the two directions and the test set each model is evaluated on (methods.md §5).
ZERO_SHOT_PAIRS = {"mvtec_ad": "visa", "visa": "mvtec_ad"}
# Further test sets, evaluated with the model trained on MVTec-AD (zsad_jax.data.protocol).
EXTRA_TEST_SETS = ("btad", "mpdd")
EXTRA_TRAIN_SET = "mvtec_ad"
DATASET_FLAGS = (*ZERO_SHOT_PAIRS, *EXTRA_TEST_SETS)
DATASET_TITLES = {"mvtec_ad": "MVTec-AD", "visa": "VisA", "btad": "BTAD", "mpdd": "MPDD"}
# zsad_jax.evaluate.METRIC_NAMES (not imported here: that module pulls in jax).
METRIC_NAMES = (
    "image_AUROC", "image_AP", "image_F1max", "pixel_AUROC", "pixel_AP", "pixel_F1max",
    "pixel_AUPRO",
)  # fmt: skip
REPORTED_FIELDS = {
    "train_set": "dataset the reported model was trained on (its test split)",
    "test_set": "dataset it was tested on",
    "metrics": "{metric name: % as printed}",
    "source": "where the numbers are printed",
    "shots": "few-shot K (0 = zero-shot, the default); the numbers are means over seeds",
    "std": "{metric name: % std over seeds}",
    "when": "{dotted config key: value} the reported run used (default: any)",
    "aupro_method": "the AUPRO variant of the official evaluation (zsad_jax.metrics.AUPRO_METHODS)",
}
_REQUIRED_FIELDS = ("train_set", "test_set", "metrics", "source")
# Data fields the protocol sets for each direction; overriding them is refused.
PROTOCOL_KEYS = frozenset(
    {"data.train_set", "data.train_root", "data.train_split", "data.categories", "data.test_set",
     "data.test_root", "data.test_split", "data.test_categories", "data.tfds_dir"}
    | {f"data.{side}_{option}" for side in ("train", "test")
       for option in ("mask_dir", "normal_dir", "require_masks", "csv_path", "meta_path")}
)  # fmt: skip
SELECTED_LABEL = "selected on the test set, as the official code does"
TRAINING_FILE = "training.json"
RESULT_FILE = "result.json"


# ----------------------------------------------------------------------------------------------
# What runs.


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of the protocol: the model trained on ``train_set`` tested on ``test_set``
    (few-shot with ``shots`` > 0 reference images drawn with ``seed``)."""

    train_set: str
    test_set: str
    shots: int = 0
    seed: int = 0

    @property
    def name(self) -> str:
        base = f"{self.train_set}_to_{self.test_set}"
        return f"{base}_{self.shots}shot_seed{self.seed}" if self.shots else base

    @property
    def group(self) -> tuple[str, str, int]:
        """The table row group: few-shot seeds are averaged."""
        return self.train_set, self.test_set, self.shots


def plan(
    directions: Sequence[str],
    roots: Mapping[str, Any],
    *,
    few_shot: Sequence[int] = (),
    seeds: int = 5,
) -> dict[str, list[Evaluation]]:
    """``{train set: [Evaluation, ...]}`` in the order they run (module docstring)."""
    out: dict[str, list[Evaluation]] = {}
    for train_set in directions:
        if train_set not in ZERO_SHOT_PAIRS:
            raise ValueError(
                f"--directions: {train_set!r} is not a training set of the protocol; use "
                f"{' and/or '.join(ZERO_SHOT_PAIRS)}"
            )
        test_set = ZERO_SHOT_PAIRS[train_set]
        evaluations = [Evaluation(train_set, test_set)]
        if train_set == EXTRA_TRAIN_SET:
            evaluations += [Evaluation(train_set, s) for s in EXTRA_TEST_SETS if roots.get(s)]
        for shots in few_shot:
            if int(shots) < 1:
                raise ValueError(f"--few_shot: shots must be >= 1, got {shots}")
            evaluations += [Evaluation(train_set, test_set, int(shots), s) for s in range(seeds)]
        out[train_set] = evaluations
    return out


# ----------------------------------------------------------------------------------------------
# Config files: the configs of each direction, the reported records.


def _split_spec(spec: str) -> tuple[str, list[str]]:
    path, _, arg = spec.partition(":")
    return path, [item.strip() for item in arg.split(",") if item.strip()]


def config_module(spec: str) -> Any:
    """The module of a ``--config`` file (``REPORTED``, ``SELECT_ON_TEST``)."""
    path, _ = _split_spec(spec)
    # Loads it as the commands do first (a missing file is refused; the folder holding configs/
    # becomes importable, for the files' ``from configs.common import ...``).
    cli.load_config_file(path)
    name = "zsad_reproduce_" + "".join(
        c if c.isalnum() else "_" for c in str(Path(path).absolute())
    )
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def refuse_protocol_overrides(overrides: Sequence[tuple[str, str]]) -> None:
    for key, _ in overrides:
        if key in PROTOCOL_KEYS:
            raise cli.CommandLineError(
                f"--config.{key}: the protocol sets the datasets of each direction; give the "
                f"dataset roots as --{'/--'.join(DATASET_FLAGS)} instead"
            )


def direction_config(
    spec: str,
    overrides: Sequence[tuple[str, str]],
    train_set: str,
    test_set: str,
    roots: Mapping[str, Any],
):
    """The config of ``spec`` (``path[:variants]``) for the model trained on ``train_set``'s test
    split and tested on ``test_set``'s: the file's ``train_set=``/``test_set=`` variants (which
    derive each side's settings, e.g. AVA-DINO's mask thresholds), the overrides, then the
    protocol's data fields (every category, the given roots), validated."""
    path, items = _split_spec(spec)
    items = [i for i in items if i.partition("=")[0].strip() not in ("train_set", "test_set")]
    arg = ",".join([*items, f"train_set={train_set}", f"test_set={test_set}"])
    config = cli.load_config_file(f"{path}:{arg}")
    refuse_protocol_overrides(overrides)
    cli.apply_overrides(config, overrides)
    d = config.data
    for side, name in (("train", train_set), ("test", test_set)):
        d[f"{side}_set"] = name
        d[f"{side}_root"] = os.path.abspath(str(roots[name]))
        d[f"{side}_split"] = "test"
        d["categories" if side == "train" else "test_categories"] = ()
    config_check.check(config)
    return config


def _lookup(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if not hasattr(value, "keys") or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def check_records(records: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """``records`` as dicts with every field (defaults filled in); refuses a malformed one."""
    out = []
    for i, record in enumerate(records):
        label = f"{where}[{i}]"
        if not isinstance(record, Mapping):
            raise ValueError(f"{label}: a record is a dict, got {type(record).__name__}")
        unknown = sorted(set(record) - set(REPORTED_FIELDS))
        missing = [k for k in _REQUIRED_FIELDS if k not in record]
        if unknown or missing:
            raise ValueError(
                f"{label}: unknown fields {unknown}, missing fields {missing}; a record has "
                f"{', '.join(REPORTED_FIELDS)}"
            )
        for field in ("metrics", "std"):
            for metric, value in dict(record.get(field, {})).items():
                if metric not in METRIC_NAMES:
                    raise ValueError(f"{label}: {field} {metric!r} is not one of {METRIC_NAMES}")
                if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 100.0:
                    raise ValueError(f"{label}: {field}[{metric!r}] = {value!r} is not a % value")
        shots = record.get("shots", 0)
        if not isinstance(shots, int) or shots < 0:
            raise ValueError(f"{label}: shots must be an integer >= 0, got {shots!r}")
        aupro = record.get("aupro_method")
        if aupro is not None and aupro not in metrics_lib.AUPRO_METHODS:
            raise ValueError(f"{label}: aupro_method {aupro!r} is not one of "
                             f"{metrics_lib.AUPRO_METHODS}")  # fmt: skip
        out.append(
            {
                "train_set": str(record["train_set"]),
                "test_set": str(record["test_set"]),
                "shots": shots,
                "metrics": {k: float(v) for k, v in dict(record["metrics"]).items()},
                "std": {k: float(v) for k, v in dict(record.get("std", {})).items()},
                "when": dict(record.get("when", {})),
                "aupro_method": aupro,
                "source": str(record["source"]),
            }
        )
    return out


def _ablation_records(module: Any) -> list[dict[str, Any]]:
    """A config with the paper's ablation rows as data (``configs/dlvp_clip.py``)."""
    rows = [*getattr(module, "ABLATIONS", {}).values(), *getattr(module, "TOP_K", {}).values()]
    records, seen = [], set()
    for row in rows:
        when = {"model.use_slfs": row.use_slfs, "model.use_mlop": row.use_mlop,
                "model.use_hfd": row.use_hfd, "model.hfd_kind": row.hfd_kind,
                "model.top_k": row.top_k}  # fmt: skip
        for test_set, (image, pixel) in (("mvtec_ad", row.mvtec_ad), ("visa", row.visa)):
            values = {"image_AUROC": image, "pixel_AUROC": pixel}
            values = {k: v for k, v in values.items() if v is not None}
            identity = (test_set, tuple(sorted(when.items())))
            if not values or identity in seen:
                continue
            seen.add(identity)
            records.append(
                {"train_set": ZERO_SHOT_PAIRS[test_set], "test_set": test_set, "when": when,
                 "metrics": values, "source": f"paper: {row.row}"}
            )  # fmt: skip
    return records


def reported_records(module: Any, config: Any = None) -> list[dict[str, Any]]:
    """The reported records of a config module (checked), those applying to ``config`` if given
    (every ``when`` key has that value in it)."""
    where = f"{getattr(module, '__file__', module)}: REPORTED"
    if hasattr(module, "REPORTED"):
        records = check_records(module.REPORTED, where)
    else:
        records = check_records(_ablation_records(module), where)
    if config is None:
        return records

    def applies(record: Mapping[str, Any]) -> bool:
        for key, value in record["when"].items():
            try:
                if _plain(_lookup(config, key)) != _plain(value):
                    return False
            except KeyError:
                return False
        return True

    kept = [r for r in records if applies(r)]
    groups = [(r["train_set"], r["test_set"], r["shots"]) for r in kept]
    duplicated = sorted({g for g in groups if groups.count(g) > 1})
    if duplicated:
        raise ValueError(f"{where}: several records apply to {duplicated}; set their 'when'")
    return kept


def select_metrics_of(module: Any, spec: str) -> tuple[str, ...]:
    metrics = getattr(module, "SELECT_ON_TEST", None)
    if not metrics:
        raise ValueError(
            f"--select_on_test: {_split_spec(spec)[0]} has no SELECT_ON_TEST (its official code "
            "reports the last epoch, which is the 'ours' column already); the flag is for configs "
            "whose official code picks the best epoch on the test set (configs/ava_dino.py, "
            "configs/acd_clip.py)"
        )
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"{spec}: SELECT_ON_TEST names unknown metrics {unknown}")
    return tuple(metrics)


# ----------------------------------------------------------------------------------------------
# Files.


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    """``doc`` as JSON in ``path``, whole or not at all."""
    report.write_atomic(path, json.dumps(report.json_ready(doc), indent=1, allow_nan=False))


def read_json(path: str | os.PathLike) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def config_hash(config: Any) -> str:
    text = config.to_json_best_effort(sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


# ----------------------------------------------------------------------------------------------
# The protocol.


class _Reproduction:
    """One ``run``: the configs, the evaluations, what was done."""

    def __init__(self, spec, roots, workdir, overrides, aupro_method, select_metrics, progress):
        self.spec, self.roots, self.workdir = spec, dict(roots), Path(workdir)
        self.overrides = list(overrides)
        self.aupro_flag, self.select_metrics, self.progress = aupro_method, select_metrics, progress
        self.module = config_module(spec)
        self.actions: list[str] = []
        self.train_info: dict[str, dict[str, Any]] = {}

    def log(self, action: str) -> None:
        self.actions.append(action)
        print(f"reproduce: {action}", file=sys.stderr, flush=True)

    def config(self, train_set: str, test_set: str):
        return direction_config(self.spec, self.overrides, train_set, test_set, self.roots)

    def records(self, config) -> list[dict[str, Any]]:
        return reported_records(self.module, config)

    def aupro_method(self, ev: Evaluation, records: Sequence[Mapping[str, Any]]) -> str:
        """The flag's variant; for "reported", that of the records of this (train, test) pair,
        else the one every record of the file that names one names (the official evaluation's),
        else the exact definition."""
        if self.aupro_flag != "reported":
            return self.aupro_flag
        same = [r for r in records if (r["train_set"], r["test_set"]) == ev.group[:2]]
        for r in sorted(same, key=lambda r: r["shots"] != ev.shots):
            if r["aupro_method"]:
                return r["aupro_method"]
        named = {r["aupro_method"] for r in reported_records(self.module) if r["aupro_method"]}
        return named.pop() if len(named) == 1 else "exact"

    def eval_dir(self, ev: Evaluation) -> Path:
        return self.workdir / "eval" / ev.name

    def key(self, ev: Evaluation, config, step: int, aupro: str) -> dict[str, Any]:
        return {"evaluation": dataclasses.asdict(ev), "step": int(step), "aupro_method": aupro,
                "config_sha256": config_hash(config)}  # fmt: skip

    def stored(self, path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
        doc = read_json(path)
        return doc if isinstance(doc, dict) and doc.get("key") == dict(key) else None

    def evaluate(self, model, ev, config, key, *, vis: bool) -> tuple[dict, dict]:
        """``(summary doc for result.json, the full evaluate() result)``."""
        result = evaluate_lib.evaluate(
            model,
            config,
            aupro_method=key["aupro_method"],
            vis_dir=self.eval_dir(ev) / "vis" if vis else None,
            progress=self.progress,
            few_shot=ev.shots,
            few_shot_seed=ev.seed,
        )
        result["aupro_method"] = key["aupro_method"]
        doc = {
            "key": key,
            "mean": {m: result[m] for m in METRIC_NAMES},
            "threshold": result.get("threshold"),
            "excluded": result.get("excluded", {}),
            "num_images": result.get("num_images"),
            "per_category": result.get("per_category", {}),
            "seconds": result.get("seconds"),
        }
        return doc, result

    def store_result(self, ev: Evaluation, doc: Mapping[str, Any], result: Mapping) -> None:
        """``metrics.json/.csv/.md`` of the evaluation, then (atomically, last) ``result.json``."""
        evaluate_lib.write_results(result, self.eval_dir(ev))
        write_json_atomic(self.eval_dir(ev) / RESULT_FILE, doc)

    def epoch_path(self, ev: Evaluation, step: int) -> Path:
        return self.eval_dir(ev) / "epochs" / f"step_{int(step):07d}.json"

    # -- training -------------------------------------------------------------------------------

    def prepare(self, train_set: str) -> dict[str, Any]:
        """The training config of a direction and its epoch length (before training)."""
        config = self.config(train_set, ZERO_SHOT_PAIRS[train_set])
        steps_per_epoch = pipeline.steps_per_epoch(
            len(sources.split_source(config.data, "train")), int(config.data.batch_size)
        )
        # Always, so that runs trained with and without --select_on_test have one config; the
        # evaluations only happen where an evaluator is passed.
        config.eval.every_steps = max(1, steps_per_epoch)
        info = {
            "config": config,
            "dir": self.workdir / f"train_{train_set}",
            "steps_per_epoch": steps_per_epoch,
            "total_steps": optim_lib.total_train_steps(config.optim, steps_per_epoch),
        }
        self.train_info[train_set] = info
        return info

    def eval_config(self, ev: Evaluation):
        """The config an evaluation runs with: the training config with ``ev``'s test side."""
        config = self.config(ev.train_set, ev.test_set)
        config.eval.every_steps = self.train_info[ev.train_set]["config"].eval.every_steps
        return config

    def train(self, train_set: str, evaluations: Sequence[Evaluation]) -> dict[str, Any]:
        info = self.prepare(train_set)
        config, train_dir = info["config"], info["dir"]
        evaluator = None
        if self.select_metrics:
            evaluator = self._epoch_evaluator(evaluations, info["total_steps"])
        self.log(f"train_{train_set}: training on the test split of {self.roots[train_set]}")
        try:
            result = train_lib.train(config, train_dir, evaluator=evaluator, progress=self.progress)
        except train_lib.ConfigMismatch as e:
            raise ValueError(
                f"{e}. reproduce keeps one training run per direction in "
                f"{self.workdir}/train_<set>: run a changed config in a new --workdir"
            ) from None
        if result.get("preempted"):
            raise _Preempted(train_dir)
        finished_before = bool(result.get("resumed_finished_run"))
        self.log(f"train_{train_set}: {'finished earlier' if finished_before else 'trained'} "
                 f"({result.get('steps')} steps)")  # fmt: skip
        info["step"] = int(result["steps"])
        doc = {
            "result": {k: v for k, v in result.items() if k != "per_category"},
            "steps_per_epoch": info["steps_per_epoch"],
            "total_steps": info["total_steps"],
            "config_sha256": config_hash(config),
            "select_on_test": bool(self.select_metrics),
        }
        write_json_atomic(train_dir / TRAINING_FILE, doc)  # fmt: skip
        return info

    def _epoch_evaluator(
        self, evaluations: Sequence[Evaluation], total_steps: int
    ) -> Callable[[Any, int], dict]:
        """The training loop's hook: every zero-shot test set of the direction after each epoch
        (and at the end, which is also the honest last-epoch result)."""
        zero_shot = [ev for ev in evaluations if not ev.shots]

        def evaluator(model, step: int) -> dict:
            paired = None
            for ev in zero_shot:
                config = self.eval_config(ev)
                aupro = self.aupro_method(ev, self.records(config))
                key = self.key(ev, config, step, aupro)
                path = self.epoch_path(ev, step)
                doc = self.stored(path, key)
                if doc is None:
                    last = step == total_steps
                    doc, result = self.evaluate(model, ev, config, key, vis=last)
                    write_json_atomic(path, doc)
                    if last:  # the honest last-epoch result, as run_evaluations would store it
                        self.store_result(ev, doc, result)
                    self.log(f"{ev.name}: evaluated after step {step}")
                if ev.test_set == ZERO_SHOT_PAIRS[ev.train_set]:
                    paired = doc
            return {**paired["mean"], "threshold": paired["threshold"]}

        return evaluator

    # -- evaluation -----------------------------------------------------------------------------

    def run_evaluations(self, train_set: str, evaluations: Sequence[Evaluation]) -> None:
        info = self.train_info[train_set]
        model = None
        for ev in evaluations:
            config = self.eval_config(ev)
            aupro = self.aupro_method(ev, self.records(config))
            key = self.key(ev, config, info["step"], aupro)
            if self.stored(self.eval_dir(ev) / RESULT_FILE, key) is not None:
                self.log(f"{ev.name}: result present")
                continue
            if model is None:
                model, _, _, loaded = inference.load_model(str(info["dir"]), info["config"])
                if loaded["step"] != info["step"]:
                    raise ValueError(
                        f"{info['dir']}: latest checkpoint is step {loaded['step']}, the finished "
                        f"run's is {info['step']}"
                    )
            self.log(f"{ev.name}: evaluating")
            doc, result = self.evaluate(model, ev, config, key, vis=not ev.shots)
            self.store_result(ev, doc, result)

    # -- the table ------------------------------------------------------------------------------

    def rows(self, planned: Mapping[str, Sequence[Evaluation]]) -> tuple[list[dict], list[dict]]:
        """(table rows, reported records not run)."""
        rows: list[dict[str, Any]] = []
        covered: set[tuple[str, str, int]] = set()
        all_records: dict[tuple[str, str, int], dict] = {}
        for train_set, evaluations in planned.items():
            info = self.train_info[train_set]
            groups: dict[tuple[str, str, int], list[Evaluation]] = {}
            for ev in evaluations:
                groups.setdefault(ev.group, []).append(ev)
            for group, members in groups.items():
                config = self.eval_config(members[0])
                records = self.records(config)
                all_records.update({(r["train_set"], r["test_set"], r["shots"]): r
                                    for r in records})  # fmt: skip
                record = next(
                    (r for r in records if (r["train_set"], r["test_set"], r["shots"]) == group),
                    None,
                )
                covered.add(group)
                docs = []
                for ev in members:
                    doc = read_json(self.eval_dir(ev) / RESULT_FILE)
                    if doc is None:
                        raise ValueError(f"{self.eval_dir(ev) / RESULT_FILE} is missing")
                    docs.append(doc)
                selected = None
                if self.select_metrics and not group[2]:
                    selected = self.selected(members[0], config, info)
                rows += self._group_rows(group, docs, record, selected, members)
        not_run = [r for g, r in all_records.items() if g not in covered]
        return rows, not_run

    def selected(self, ev: Evaluation, config, info) -> dict[str, Any]:
        """The best epoch by the mean of ``select_metrics`` (module docstring)."""
        spe, total = max(1, info["steps_per_epoch"]), info["total_steps"]
        steps = [*range(spe, total, spe), total]
        aupro = self.aupro_method(ev, self.records(config))
        docs, missing = {}, []
        for step in steps:
            doc = self.stored(self.epoch_path(ev, step), self.key(ev, config, step, aupro))
            if doc is None:
                missing.append(step)
            else:
                docs[step] = doc
        if missing:
            return {"missing": missing}

        def score(step: int) -> float:
            values = [_number(docs[step]["mean"][m]) for m in self.select_metrics]
            value = float(np.mean(values))
            return -math.inf if math.isnan(value) else value

        best = max(steps, key=lambda s: (score(s), -s))  # the earliest on ties
        return {
            "step": best,
            "epoch": best // spe if best % spe == 0 else None,
            "mean": {m: _number(docs[best]["mean"][m]) for m in METRIC_NAMES},
            "criterion": "mean of " + ", ".join(self.select_metrics),
            "epochs_evaluated": len(steps),
        }

    def _group_rows(self, group, docs, record, selected, members) -> list[dict[str, Any]]:
        train_set, test_set, shots = group
        rows = []
        for metric in METRIC_NAMES:
            values = np.array([_number(d["mean"][metric]) for d in docs]) * 100.0
            ours = float(np.mean(values)) if values.size else math.nan
            reported = record["metrics"].get(metric) if record else None
            row = {
                "trained_on": train_set,
                "tested_on": test_set,
                "shots": shots,
                "seeds": len(members) if shots else 0,
                "metric": metric,
                "ours": ours,
                "ours_std": float(np.std(values)) if shots else None,
                "reported": reported,
                "reported_std": (record["std"].get(metric) if record else None),
                "difference": None if reported is None else ours - reported,
                "aupro_method": docs[0]["key"]["aupro_method"] if docs else None,
                "source": record["source"] if record else None,
                "selected_on_test": None,
                "selected_epoch": None,
                "selected_step": None,
                "selection": None,
            }
            if selected is not None:
                if "missing" in selected:
                    row["selection"] = f"n/a: no evaluation after steps {selected['missing']}"
                else:
                    row["selected_on_test"] = selected["mean"][metric] * 100.0
                    row["selected_epoch"] = selected["epoch"]
                    row["selected_step"] = selected["step"]
                    row["selection"] = (
                        f"{selected['criterion']}, best of {selected['epochs_evaluated']} epochs"
                    )
            rows.append(row)
        return rows


class _Preempted(Exception):
    def __init__(self, train_dir: Path):
        super().__init__(f"preempted: checkpoint saved in {train_dir}; re-run the same command")
        self.train_dir = train_dir


CSV_FIELDS = (
    "trained_on", "tested_on", "shots", "seeds", "metric", "ours", "ours_std", "reported",
    "reported_std", "difference", "aupro_method", "selected_on_test", "selected_epoch",
    "selected_step", "selection", "source",
)  # fmt: skip


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        writer.writerow([_csv_value(row[k]) for k in CSV_FIELDS])
    return out.getvalue()


def _pct(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    value = float(value)
    if math.isnan(value):
        return "NaN"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _title(name: str) -> str:
    return DATASET_TITLES.get(name, name)


def table_markdown(
    rows: Sequence[Mapping[str, Any]],
    *,
    spec: str,
    not_run: Sequence[Mapping[str, Any]] = (),
    select: bool = False,
) -> str:
    """The human-readable table: one section per (direction, test set, shots)."""
    lines = _markdown_preamble(spec, select)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["trained_on"], row["tested_on"], row["shots"]), []).append(row)
    for group, members in groups.items():
        lines += _markdown_section(group, members, select)
    if not_run:
        lines += _markdown_not_run(not_run, trained={row["trained_on"] for row in rows})
    return "\n".join(lines) + "\n"


def _markdown_preamble(spec: str, select: bool) -> list[str]:
    """The title and what the columns mean (with the selected column's caveat if it is shown)."""
    lines = [
        f"# Reproduction of `{spec}`",
        "",
        "Protocol (methods.md §5): each model is trained on the test split of one dataset (all "
        "categories) and tested zero-shot on the test split of another; further test sets use "
        "the model trained on MVTec-AD. Values in %, means over the test categories; difference "
        "= ours − reported, in points; – = not reported. **ours** is the last epoch: nothing is "
        "chosen on test data.",
    ]
    if select:
        lines += [
            "",
            f"**{SELECTED_LABEL}**: the epoch whose mean of the config's SELECT_ON_TEST metrics "
            "on this test set is highest (every epoch evaluated on the test set, as the official "
            "code does); an optimistic number, not a held-out one.",
        ]
    return lines


def _markdown_section(
    group: tuple[str, str, int], members: Sequence[Mapping[str, Any]], select: bool
) -> list[str]:
    """One (direction, test set, shots) section: heading, table, notes."""
    train_set, test_set, shots = group
    # Epochs are selected on zero-shot evaluations only (few-shot ones run after training).
    selected_column = select and not shots
    mode = (
        "zero-shot" if not shots else f"{shots}-shot, mean ± std over {members[0]['seeds']} seeds"
    )
    header = ["metric", "ours", "reported", "difference"]
    if selected_column:
        header.append(SELECTED_LABEL)
    lines = [
        "",
        f"## Trained on {_title(train_set)}, tested on {_title(test_set)} ({mode})",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for row in members:
        cells = _markdown_cells(row, shots)
        if selected_column:
            cells.append(_selected_cell(row))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", _markdown_notes(members[0], selected_column)]


def _markdown_cells(row: Mapping[str, Any], shots: int) -> list[str]:
    """metric, ours, reported, difference (few-shot values with their std over seeds)."""
    ours = _pct(row["ours"])
    reported = _pct(row["reported"])
    if shots:
        ours += f" ± {_pct(row['ours_std'])}"
        if row["reported_std"] is not None:
            reported += f" ± {_pct(row['reported_std'])}"
    return [row["metric"], ours, reported, _pct(row["difference"], signed=True)]


def _selected_cell(row: Mapping[str, Any]) -> str:
    """The best epoch's value and where it is, or why there is none."""
    if row["selected_on_test"] is None:
        return row["selection"] or "n/a"
    where = (f"epoch {row['selected_epoch']}" if row["selected_epoch"] is not None
             else f"step {row['selected_step']}")  # fmt: skip
    return f"{_pct(row['selected_on_test'])} ({where})"


def _markdown_notes(first: Mapping[str, Any], selected_column: bool) -> str:
    """The line under a section's table (the section's rows share these fields)."""
    notes = [f"AUPRO: `{first['aupro_method']}` variant"]
    if first["source"]:
        notes.insert(0, f"reported: {first['source']}")
    if selected_column and first["selection"]:
        notes.append(f"selection: {first['selection']}")
    return "; ".join(notes) + "."


def _markdown_not_run(not_run: Sequence[Mapping[str, Any]], trained: set[str]) -> list[str]:
    """The reported records without a row, each with what to add to run it."""
    lines = ["", "## Reported but not run here", ""]
    for r in not_run:
        shots = f" ({r['shots']}-shot)" if r["shots"] else ""
        values = ", ".join(f"{m} {v:.1f}" for m, v in r["metrics"].items())
        lines.append(
            f"- trained on {_title(r['train_set'])}, tested on {_title(r['test_set'])}{shots}: "
            f"{values} ({r['source']}; {_not_run_reason(r, trained)})"
        )
    return lines


def _not_run_reason(record: Mapping[str, Any], trained: set[str]) -> str:
    if record["train_set"] in ZERO_SHOT_PAIRS and record["train_set"] not in trained:
        return f"the model trained on {_title(record['train_set'])} was not run (--directions)"
    if record["shots"]:
        return f"add --few_shot={record['shots']}"
    if record["test_set"] in EXTRA_TEST_SETS and record["train_set"] == EXTRA_TRAIN_SET:
        return f"add --{record['test_set']}=DIR"
    return "not a test set of this protocol (no reader here)"


def run(
    config: str,
    roots: Mapping[str, Any],
    workdir: str | os.PathLike,
    *,
    overrides: Sequence[tuple[str, str]] = (),
    directions: Sequence[str] = tuple(ZERO_SHOT_PAIRS),
    few_shot: Sequence[int] = (),
    seeds: int = 5,
    select_on_test: bool = False,
    select_metrics: Sequence[str] | None = None,
    aupro_method: str = "reported",
    progress: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) the protocol and writes the tables (module docstring).

    Args:
      config: ``path.py[:variants]`` of a method config.
      roots: ``{dataset name: root}``; ``mvtec_ad`` and ``visa`` are needed, ``btad``/``mpdd``
        add those test sets.
      workdir: everything goes here (module docstring).
      overrides: ``[(key, value)]`` as ``--config.KEY=VALUE``, applied to every direction.
      directions: the training sets to run (default both).
      few_shot: shot counts K for few-shot evaluations; ``seeds`` draws each.
      select_on_test: add the best-epoch column; its criterion is the config's ``SELECT_ON_TEST``
        unless ``select_metrics`` names one.
      aupro_method: "reported" or one of ``zsad_jax.metrics.AUPRO_METHODS``.
      progress: progress bars.

    Returns:
      ``{"rows", "not_run", "actions", "table_md", "table_csv"}``: the table rows (% values), the
      reported records not run, what was done (trained / reused, evaluated / reused) and the paths.
    """
    _refuse_several_processes()
    start = time.time()
    _check_aupro_method(aupro_method)
    roots = _checked_roots(roots)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    refuse_protocol_overrides(overrides)
    planned = plan(directions, roots, few_shot=few_shot, seeds=seeds)
    r = _Reproduction(config, roots, workdir, overrides, aupro_method, None, progress)
    if select_on_test:
        r.select_metrics = tuple(select_metrics or select_metrics_of(r.module, config))
    elif select_metrics:
        raise ValueError("select_metrics without select_on_test")
    # Fail on a bad config, variant, override or few-shot request before any training.
    first = r.config(directions[0], ZERO_SHOT_PAIRS[directions[0]])
    if few_shot:
        _require_few_shot_mode(first.method)
    cli.ensure_writable(r.workdir, "--workdir")
    write_json_atomic(
        r.workdir / "protocol.json",
        {"config": config, "overrides": [list(o) for o in overrides],
         "roots": {k: os.path.abspath(str(v)) for k, v in roots.items()},
         "directions": list(directions), "few_shot": [int(k) for k in few_shot], "seeds": seeds,
         "select_on_test": bool(select_on_test), "select_metrics": r.select_metrics,
         "aupro_method": aupro_method,
         "evaluations": [ev.name for evs in planned.values() for ev in evs]},
    )  # fmt: skip
    for train_set, evaluations in planned.items():
        r.train(train_set, evaluations)
        r.run_evaluations(train_set, evaluations)
    rows, not_run = r.rows(planned)
    paths = _write_tables(r, rows, not_run)
    r.log(f"tables in {paths['table_md']} and table.csv ({time.time() - start:.0f} s)")
    return {"rows": rows, "not_run": not_run, "actions": r.actions, **paths}


def _refuse_several_processes() -> None:
    # Each direction trains once and evaluates in this process; the commands it wraps do the
    # multi-host part themselves.
    if jax.process_count() > 1:
        raise ValueError(
            "zsad_jax.reproduce runs in one process; for multi-host runs use zsad_jax.train and "
            "zsad_jax.evaluate"
        )


def _check_aupro_method(aupro_method: str) -> None:
    if aupro_method != "reported" and aupro_method not in metrics_lib.AUPRO_METHODS:
        raise ValueError(f"--aupro_method must be 'reported' or one of "
                         f"{metrics_lib.AUPRO_METHODS}, got {aupro_method!r}")  # fmt: skip


def _checked_roots(roots: Mapping[str, Any]) -> dict[str, Any]:
    """The given dataset roots (unset ones dropped); refuses unknown, missing or absent ones."""
    roots = {k: v for k, v in dict(roots).items() if v}
    unknown = sorted(set(roots) - set(DATASET_FLAGS))
    if unknown:
        raise ValueError(f"unknown dataset roots {unknown}; the protocol reads {DATASET_FLAGS}")
    for name in ZERO_SHOT_PAIRS:
        if name not in roots:
            raise cli.CommandLineError(
                f"give --{name}=DIR: the {_title(name)} root (both directions need "
                f"--{' and --'.join(ZERO_SHOT_PAIRS)})"
            )
    seen: dict[Path, str] = {}
    for name, root in roots.items():
        if not Path(root).is_dir():
            raise FileNotFoundError(f"--{name}={root}: no such directory")
        # One folder given for two datasets is a typo; it would be read as both.
        other = seen.setdefault(Path(root).resolve(), name)
        if other != name:
            raise cli.CommandLineError(
                f"--{name}={root} is the folder given as --{other}; give each dataset its own root"
            )
    return roots


def _require_few_shot_mode(method: str) -> None:
    if not callable(getattr(methods.method_class(method), "build_memory", None)):
        raise ValueError(
            f"--few_shot: method {method!r} has no few-shot mode (model.build_memory); "
            "only AF-CLIP (AF-CLIP+) has one"
        )


def _write_tables(r: _Reproduction, rows: list[dict], not_run: list[dict]) -> dict[str, str]:
    """``table.csv`` then ``table.md`` in the workdir; their paths."""
    md = table_markdown(rows, spec=r.spec, not_run=not_run, select=bool(r.select_metrics))
    paths = {"table_md": str(r.workdir / "table.md"), "table_csv": str(r.workdir / "table.csv")}
    report.write_atomic(Path(paths["table_csv"]), table_csv(rows))
    report.write_atomic(Path(paths["table_md"]), md)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    flags.DEFINE_string(
        "config", None, "method config file[:variant,...]; change keys with --config.KEY=VALUE"
    )
    flags.DEFINE_string("workdir", None, "training runs, evaluations and the tables go here")
    for name in DATASET_FLAGS:
        needed = "required" if name in ZERO_SHOT_PAIRS else "optional: adds this test set"
        flags.DEFINE_string(name, None, f"{_title(name)} root ({needed})")
    flags.DEFINE_list(
        "directions", list(ZERO_SHOT_PAIRS), "training sets to run (mvtec_ad, visa or both)"
    )
    flags.DEFINE_list("few_shot", [], "few-shot shot counts K, e.g. 1,2,4 (AF-CLIP+)")
    flags.DEFINE_integer("seeds", 5, "few-shot reference draws per K (seeds 0..N-1)", lower_bound=1)
    flags.DEFINE_bool(
        "select_on_test", False,
        f"add the column '{SELECTED_LABEL}' (every epoch evaluated on the test set)",
    )  # fmt: skip
    flags.DEFINE_enum(
        "aupro_method", "reported", ["reported", *metrics_lib.AUPRO_METHODS],
        "AUPRO variant; 'reported' = the one of the reported numbers",
    )  # fmt: skip
    flags.DEFINE_bool("progress", True, "show progress bars")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    f = flags.FLAGS
    try:
        few_shot = [int(k) for k in f.few_shot]
    except ValueError:
        raise cli.CommandLineError(f"--few_shot={','.join(f.few_shot)}: give integers") from None
    try:
        result = run(
            f.config,
            {name: getattr(f, name) for name in DATASET_FLAGS},
            f.workdir,
            overrides=overrides,
            directions=f.directions,
            few_shot=few_shot,
            seeds=f.seeds,
            select_on_test=f.select_on_test,
            aupro_method=f.aupro_method,
            progress=f.progress,
        )
    except _Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    print(Path(result["table_md"]).read_text(), flush=True)
    print(
        json.dumps({"table_md": result["table_md"], "table_csv": result["table_csv"]}), flush=True
    )


if __name__ == "__main__":
    cli.Command(_define_flags, main).run()
