r"""Trains a method's heads on a frozen backbone: ``python -m zsad_jax.train``.

    python -m zsad_jax.train --config=configs/af_clip.py --workdir=runs/af_clip
    python -m zsad_jax.train --config=configs/af_clip.py:train_set=visa --workdir=runs/af_visa \
        --config.optim.lr=3e-4 --config.data.batch_size=16

Re-running the same command resumes from the latest checkpoint in ``WORKDIR/checkpoints`` and
continues exactly (bitwise on CPU: weights, optimiser state, RNG streams, step and data position
are restored); SIGTERM saves the current step and exits with status 143, a first Ctrl-C the same
with status 130 (a second one stops at once). Metrics go to a tqdm bar (redrawn every 30 s when
stderr is a log file, not a terminal), ``WORKDIR/metrics.jsonl`` and TensorBoard files; the last
printed line is JSON with the final metrics (held-out evaluation unless ``config.eval.enabled`` is
False).

One ``jax.jit`` step (``make_train_step``) over the trained weights, the RNG streams and the frozen
rest (``zsad_jax.state.split_for_training``), batches split over ``config.mesh``; a step with a
non-finite loss or gradient leaves the state unchanged and is counted (``config.max_bad_steps`` in
a row stop the run). Multi-host runs (``--distributed`` or ``--coordinator_address/--num_processes
/--process_id``): every process runs the same command on a shared ``--workdir``; see the README's
"Multi-host" section and ``tests/test_train.py`` / ``tests/test_pods.py`` for the evidence.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import cli, methods, report, run_log, transfer
from zsad_jax import evaluate as evaluate_lib
from zsad_jax import optim as optim_lib
from zsad_jax import sharding as shard_lib
from zsad_jax.data import pipeline, sources, transforms
from zsad_jax.data.decode import DataError
from zsad_jax.state import TrainSplit, mutable_arrays, split_for_training

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
INTERRUPTED_EXIT_CODE = cli.INTERRUPTED_EXIT_CODE  # Ctrl-C, after the save


class TrainingDiverged(RuntimeError):
    """Raised after ``config.max_bad_steps`` steps in a row with non-finite loss or gradients."""


# ----------------------------------------------------------------------------------------------
# Data.


class TrainData(Protocol):
    """What the loop needs from a training input pipeline.

    ``next()`` returns this process's rows of the next global batch (a dict of NumPy arrays, see
    ``zsad_jax.methods.base``); ``get_state()`` is JSON-serialisable (or bytes) and ``set_state``
    makes the next ``next()`` return the batch that followed when the state was taken.
    """

    steps_per_epoch: int
    class_names: Sequence[str]

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class InMemoryTrainData:
    """Shuffled batches of in-memory arrays (small experiments, tests); resumable.

    Args:
      arrays: fields of the whole training set, each with the same leading length N.
      global_batch: examples per step over all processes; the last ``N % global_batch`` examples of
        each epoch's permutation are dropped.
      seed: the shuffle of epoch e is ``np.random.default_rng([seed, e]).permutation(N)``.
      class_names: categories that ``class_id`` indexes (passed to ``model.set_classes``).
      process_index, process_count: this process takes rows ``[i*B/P, (i+1)*B/P)`` of each global
        batch (defaults: from jax).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        global_batch: int,
        seed: int = 0,
        class_names: Sequence[str] = (),
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {len(v) for v in self.arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"InMemoryTrainData: fields have different lengths {lengths}")
        self.n = lengths.pop()
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.class_names = list(class_names)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch % self.process_count:
            raise ValueError(
                f"global batch {global_batch} does not split over {self.process_count} processes"
            )
        self.steps_per_epoch = self.n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"InMemoryTrainData: {self.n} examples < one batch of {global_batch}")
        self._epoch = 0
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        order = np.random.default_rng([self.seed, self._epoch]).permutation(self.n)
        rows = order[self._step * self.global_batch : (self._step + 1) * self.global_batch]
        per = self.global_batch // self.process_count
        rows = rows[self.process_index * per : (self.process_index + 1) * per]
        self._step += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "step": self._step}

    def set_state(self, state: Mapping[str, int]) -> None:
        self._epoch, self._step = int(state["epoch"]), int(state["step"])


class PipelineTrainData:
    """Adapts ``zsad_jax.data.pipeline.train_iterator`` to ``TrainData``."""

    def __init__(self, iterator: Any, *, steps_per_epoch: int, class_names: Sequence[str]):
        self._it = iterator
        self.steps_per_epoch = steps_per_epoch
        self.class_names = list(class_names)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)

    @property
    def skipped(self) -> Any:
        return getattr(self._it, "skipped", None)


class DevicePrefetch:
    """A ``TrainData`` whose next batches are already on their way to the devices.

    ``next()`` returns global device arrays (``put`` of the host batch) and reads the ``ahead``
    batches after it, so their host work and transfers overlap the step about to run.
    ``get_state()`` is the state before the oldest batch not yet returned, so checkpoints and
    resumes are exactly those of the wrapped data; an error reading a batch ahead is raised when
    that batch is due (after the steps before it ran, with the state before it).
    """

    def __init__(self, data: TrainData, put: Callable[[dict], dict], ahead: int = 1):
        self._data, self._put, self._ahead = data, put, int(ahead)
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()
        self.steps_per_epoch = data.steps_per_epoch
        self.class_names = data.class_names

    def _fill(self, size: int) -> None:
        while len(self._queue) < size:
            if self._queue and isinstance(self._queue[-1][1], BaseException):
                return  # nothing is read past a failed batch
            state = self._data.get_state()
            try:
                item = self._put(next(self._data))
            except (DataError, StopIteration) as e:
                item = e
            self._queue.append((state, item))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._fill(1)
        batch = self._queue[0][1]
        if isinstance(batch, BaseException):
            raise batch  # stays due: get_state() is still the state before it
        self._queue.popleft()
        self._fill(self._ahead)  # on their way while this batch's step runs
        return batch

    def get_state(self) -> Any:
        return self._queue[0][0] if self._queue else self._data.get_state()

    def set_state(self, state: Any) -> None:
        self._queue.clear()
        self._data.set_state(state)

    @property
    def skipped(self) -> Any:
        return getattr(self._data, "skipped", None)


def _note_if_no_anomalies(records: Sequence[Any], data: Any) -> None:
    """The heads learn what a defect looks like from the training set's anomalous images (and
    their masks): a set of normal images only runs, but teaches them nothing of the kind."""
    if records and not any(r.gt_label for r in records) and jax.process_index() == 0:
        print(
            f"note: the training set ({data.train_set} at {data.train_root}) holds no anomalous "
            "images: these zero-shot methods learn from defects on other categories (the "
            "protocol trains on a labelled test split, e.g. MVTec-AD's), so expect a weak model",
            file=sys.stderr,
        )


def train_image_size(data: Any) -> int:
    """The side of the training images: ``data.train_image_size``, or ``data.image_size`` when
    that is 0 or absent (a config written before the key)."""
    return int(data.get("train_image_size", 0) or data.image_size)


def make_train_data(config: Any) -> TrainData:
    """The training split of ``config.data`` through the grain pipeline.

    ``config.data.train_set`` may also name a Python callable ``package.module:function`` taking the
    config and returning a ``TrainData`` (in-memory arrays, a custom pipeline).
    """
    d = config.data
    if ":" in str(d.train_set):
        return methods.import_object(d.train_set, "config.data.train_set")(config)

    source = sources.split_source(d, "train")
    _note_if_no_anomalies(source.records, d)
    iterator = pipeline.train_iterator(
        source,
        global_batch=int(d.batch_size),
        seed=int(config.seed),
        transform=transforms.make_transform(
            d.train_transform,
            train_image_size(d),
            train=True,
            mask_resize=transforms.mask_resize_for(
                str(d.get("train_mask_resize", "nearest")), d.train_set
            ),
        ),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        skip_corrupt=bool(d.get("skip_corrupt", False)),
        num_workers=int(d.get("num_workers", 0)),
    )
    return PipelineTrainData(
        iterator,
        steps_per_epoch=pipeline.steps_per_epoch(len(source), int(d.batch_size)),
        class_names=source.class_names,
    )


def _encode_state(state: Any) -> Any:
    if isinstance(state, bytes):
        return {"__bytes__": state.decode("latin-1")}
    return state


def _decode_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode("latin-1")
    return state


# ----------------------------------------------------------------------------------------------
# The jitted step.


def _split_microbatches(x: jax.Array, k: int, n_shards: int, mesh) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) where every micro-batch takes B/(k*n_shards) rows of each device's
    shard, so splitting moves no data between devices."""
    b = x.shape[0]
    per = b // (k * n_shards)
    x = x.reshape(n_shards, k, per, *x.shape[1:]).swapaxes(0, 1).reshape(k, b // k, *x.shape[1:])
    spec = P(None, shard_lib.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_train_step(
    split: TrainSplit, tx: optax.GradientTransformation, *, grad_accum: int = 1, mesh=None
) -> Callable:
    """``step(params, opt_state, mutable, frozen, batch) -> (params, opt_state, mutable, metrics)``.

    The loss is computed in float32 whatever the method's compute dtype. With ``grad_accum`` = k the
    batch is split into k micro-batches (a ``lax.scan``) whose gradients are averaged before one
    update: the same update as one big batch for losses that are means over examples, at 1/k of the
    activation memory. A non-finite loss or gradient skips the update (``lax.cond``): the returned
    state is the input state and ``metrics["finite"]`` is False.
    """

    def loss_fn(params, mutable, frozen, batch):
        model = split.merge(params, mutable, frozen)
        outputs = model(batch, train=True)
        loss, parts = model.loss(outputs, batch)
        parts = {k: jnp.asarray(v, jnp.float32) for k, v in parts.items()}
        return jnp.asarray(loss, jnp.float32), (parts, mutable_arrays(model))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, mutable, frozen, batch):
        if grad_accum == 1:
            (loss, (parts, new_mutable)), grads = grad_fn(params, mutable, frozen, batch)
        else:
            n_shards = mesh.devices.size
            micro = {
                k: _split_microbatches(v, grad_accum, n_shards, mesh) for k, v in batch.items()
            }

            def body(carry, mb):
                grad_sum, mut = carry
                (loss, (parts, mut)), grads = grad_fn(params, mut, frozen, mb)
                return (jax.tree.map(jnp.add, grad_sum, grads), mut), (loss, parts)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grad_sum, new_mutable), (losses, parts) = jax.lax.scan(body, (zeros, mutable), micro)
            grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
            loss = jnp.mean(losses)
            parts = jax.tree.map(jnp.mean, parts)
        grad_norm = optim_lib.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )

        def apply(_):
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state, new_mutable

        def skip(_):
            return params, opt_state, mutable

        params, opt_state, mutable = jax.lax.cond(finite, apply, skip, None)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        metrics.update({f"loss/{k}": v for k, v in parts.items()})
        return params, opt_state, mutable, metrics

    return step


# ----------------------------------------------------------------------------------------------
# Evaluation hook.


def default_evaluator(config: Any) -> Callable[[nnx.Module, int], dict] | None:
    """Held-out evaluation through ``zsad_jax.evaluate.evaluate`` (``config.eval.enabled``), with
    ``zsad_jax.transfer``'s report (further held-out sets, training-free baselines) under
    ``"transfer"`` when the config asks for one."""
    if not config.eval.get("enabled", True):
        return None

    def run(model: nnx.Module, step: int) -> dict:
        del step
        result = dict(evaluate_lib.evaluate(model, config))
        if transfer.wanted(config):
            result["transfer"] = transfer.transfer_report(model, config, main=result)
        return result

    return run


def _threshold_from(metrics: Mapping[str, Any]) -> float | None:
    for key in ("threshold", "image_threshold"):
        value = metrics.get(key)
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return None


# ----------------------------------------------------------------------------------------------
# Resuming a workdir.


class ConfigMismatch(ValueError):
    """The workdir's checkpoint belongs to another config."""


def _flat_config(config_json: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value

    walk("config", json.loads(config_json))
    return flat


def config_differences(old_json: str, new_json: str) -> dict[str, list[Any]]:
    """``{"config.key": [old, new]}`` for every leaf that differs between two config JSONs (a
    missing leaf is None)."""
    old, new = _flat_config(old_json), _flat_config(new_json)
    return {
        k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    }


def _describe(changed: Mapping[str, list[Any]], limit: int = 6) -> str:
    items = [f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changed.items()]
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_resumable(
    workdir: Path,
    step_dir: Path,
    config_json: str,
    params: Mapping[str, Any],
    allow_config_change: bool,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The meta of the checkpoint to resume from and how its config differs from this run's
    (``config_differences``), after checking it belongs to this run: the same config (unless
    ``allow_config_change``) and, in any case, trained weights of the same structure. Raises
    ``ConfigMismatch`` naming what differs."""
    meta = ckpt_lib.read_meta(step_dir)
    if "data_state" not in meta:
        raise ConfigMismatch(
            f"{workdir} holds converted heads (python -m convert.heads), not a training run: "
            "there is no optimiser or data state to resume; train into a new --workdir"
        )
    changed = config_differences(cli.stored_config_json(meta), config_json)
    if changed and not allow_config_change:
        raise ConfigMismatch(
            f"{workdir} holds a run of a different config ({_describe(changed)}); use a new "
            "--workdir, or pass --allow_config_change to continue this run under the new config "
            "(recorded in its checkpoints)"
        )
    differences = ckpt_lib.tree_differences(ckpt_lib.saved_params_metadata(step_dir), params)
    if differences:
        raise ConfigMismatch(
            f"{workdir} holds a checkpoint of a different model ({'; '.join(differences)}; "
            f"config {_describe(changed) or 'unchanged'}); use a new --workdir"
        )
    return meta, changed


# ----------------------------------------------------------------------------------------------
# Preemption.


class _Preemption:
    """SIGTERM, or a first Ctrl-C (SIGINT), -> save at the end of the current step and stop; a
    second Ctrl-C stops at once (KeyboardInterrupt, nothing saved). One process: Python signal
    handlers. Several processes: JAX's preemption sync service picks a step every host reaches
    (orbax), for SIGTERM only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: ckpt_lib.TrainCheckpointer):
        self.requested = False
        self.signal: int | None = None  # the signal that asked for the stop
        self._checkpointer = checkpointer
        self._old: dict[int, Any] = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # Ctrl-C again: the user does not want to wait for the save
        self.requested, self.signal = True, signum
        if signum == signal.SIGINT:
            print(
                "\nnote: Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                "(Ctrl-C again stops at once, without saving)",
                file=sys.stderr,
            )

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._checkpointer._manager.reached_preemption(step)
        return self.requested

    def close(self):
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}


# ----------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Counters:
    bad_in_a_row: int = 0
    bad_total: int = 0
    # Updates applied so far (= optimiser count, which drives the schedules).
    updates: int = 0


def _scalar(x: Any) -> float:
    return float(np.asarray(x))


class _StepMonitor:
    """Host side of each finished step: bad-step counting, log rows, progress bar, history."""

    def __init__(
        self,
        *,
        counters: _Counters,
        writer: run_log.MetricWriter,
        optimizer: optim_lib.Optimizer,
        bar: Any,
        global_batch: int,
        total_steps: int,
        log_every: int,
        max_bad: int,
        history: list | None,
        step_callback: Callable[[int, dict], None] | None,
        window: dict[str, list[float]],
    ):
        """``window``: the values since the last log row, by name; the run saves it with each
        checkpoint, so a resumed run's next row averages the same steps as an uninterrupted one."""
        self.counters, self.writer, self.optimizer, self.bar = counters, writer, optimizer, bar
        self.global_batch, self.total_steps = global_batch, total_steps
        self.log_every, self.max_bad = log_every, max_bad
        self.history, self.step_callback = history, step_callback
        self.last_loss = float("nan")
        self._last_time = time.time()
        self._step_seconds: float | None = None
        self._window = window

    def __call__(self, step: int, device_metrics: dict) -> None:
        metrics = {k: _scalar(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.time()
        # Smoothed: with the one-step lag, single intervals alternate between waits and no waits.
        dt, self._last_time = now - self._last_time, now
        previous = dt if self._step_seconds is None else self._step_seconds
        self._step_seconds = 0.8 * previous + 0.2 * dt
        images_per_s = self.global_batch / max(self._step_seconds, 1e-9)
        c = self.counters
        if metrics["finite"]:
            c.bad_in_a_row, c.updates, self.last_loss = 0, c.updates + 1, metrics["loss"]
            for k, v in metrics.items():
                if k != "finite":
                    self._window.setdefault(k, []).append(v)
        else:
            c.bad_in_a_row, c.bad_total = c.bad_in_a_row + 1, c.bad_total + 1
        self._window.setdefault("images_per_s", []).append(images_per_s)
        if self.history is not None:
            self.history.append({"step": step, **metrics})
        if self.step_callback is not None:
            self.step_callback(step, metrics)
        if c.bad_in_a_row >= self.max_bad:
            raise TrainingDiverged(
                f"training stopped at step {step}: {c.bad_in_a_row} steps in a row had a "
                f"non-finite loss or gradient (config.max_bad_steps={self.max_bad}); the "
                "parameters are those of the last finite step. Lower config.optim.lr, set "
                "config.optim.grad_clip, use compute_dtype='float32', or check the data."
            )
        if step % self.log_every == 0 or step == self.total_steps:
            self._write_row(step)
        self.bar.update(1)
        self.bar.set_postfix(
            {"loss": f"{self.last_loss:.4f}", "img/s": f"{images_per_s:.1f}", "bad": c.bad_total}
        )

    def _write_row(self, step: int) -> None:
        scalars = {k: float(np.mean(v)) for k, v in self._window.items() if v}
        for name, schedule in self.optimizer.learning_rates.items():
            key = "lr" if name == optim_lib.DEFAULT_GROUP else f"lr/{name}"
            scalars[key] = _scalar(schedule(self.counters.updates))
        scalars["bad_steps"] = self.counters.bad_total
        self.writer.write(step, scalars)
        self._window.clear()


def train(
    config: Any,
    workdir: str | Path,
    *,
    model: nnx.Module | None = None,
    train_data: TrainData | None = None,
    evaluator: Callable[[nnx.Module, int], dict] | None | str = "default",
    stop_at_step: int | None = None,
    progress: bool = True,
    history: list | None = None,
    step_callback: Callable[[int, dict], None] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes training of) ``config``'s method; returns the final metrics.

    Args:
      config: the ml_collections config (sections in ``configs/common.py``).
      workdir: checkpoints, ``metrics.jsonl`` and event files go here.
      model: an ``AnomalyModel`` to train instead of building ``config.method`` (tests).
      train_data: a ``TrainData`` instead of the ``config.data`` pipeline (tests, in-memory data).
      evaluator: ``(model, step) -> metrics`` run every ``config.eval.every_steps`` and at the end;
        "default" uses ``zsad_jax.evaluate`` unless ``config.eval.enabled`` is False; None
        disables evaluation.
      stop_at_step: save and return after this step as a preemption would (tests).
      progress: show the tqdm bar (process 0 only).
      history: if a list, every step's ``{"step", "loss", "finite", ...}`` is appended to it.
      step_callback: called with ``(step, metrics)`` after each step's metrics are on the host.
      allow_config_change: resume a workdir whose checkpoint was written under another config
        (a deliberate continuation, e.g. more steps); the changed keys are recorded in the
        checkpoints' ``config_changes``. Without it such a workdir is refused, naming the keys.

    Returns:
      ``{"steps", "seconds", "loss", "bad_steps", ..., evaluation metrics}``; ``"preempted": True``
      when stopped by SIGTERM or ``stop_at_step`` (a checkpoint of that step was saved).
    """
    start_time = time.time()
    workdir = Path(workdir)
    # The model first: a full-size config without converted weights fails here, before any data
    # is read or anything is compiled.
    if model is None:
        model = methods.build(config, load_weights=True)
    if jax.process_index() == 0:
        cli.ensure_writable(workdir, "--workdir")
    mesh = shard_lib.make_mesh(config.mesh)
    grad_accum = _checked_grad_accum(config, mesh)
    if train_data is None:
        train_data = make_train_data(config)
    if train_data.class_names:
        model.set_classes(
            methods.text_class_names(config, config.data.train_set, train_data.class_names)
        )
    if evaluator == "default":
        evaluator = default_evaluator(config)
    run = _TrainRun(config, workdir, model, train_data, mesh, start_time)
    del model  # the arrays now live in the run's state only
    finished = run.resume(allow_config_change)
    if finished is not None:
        return finished
    return run.loop(
        evaluator, grad_accum=grad_accum, stop_at_step=stop_at_step, progress=progress,
        history=history, step_callback=step_callback,
    )  # fmt: skip


def _checked_grad_accum(config: Any, mesh) -> int:
    """``config.optim.grad_accum`` after checking the batch splits over processes, devices and
    micro-batches."""
    global_batch = int(config.data.batch_size)
    shard_lib.batch_size_per_process(global_batch, mesh)
    grad_accum = int(config.optim.get("grad_accum", 1) or 1)
    if global_batch % (mesh.devices.size * grad_accum):
        raise ValueError(
            f"config.data.batch_size={global_batch} must be a multiple of devices "
            f"({mesh.devices.size}) x config.optim.grad_accum ({grad_accum})"
        )
    return grad_accum


class _TrainRun:
    """One ``train`` call: the state on the mesh (flat ``params``/``opt_state``/``mutable``, the
    frozen rest), its checkpointer and the position it saves and resumes (step, counters, data)."""

    def __init__(self, config, workdir: Path, model, train_data: TrainData, mesh, start_time):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.train_data = DevicePrefetch(
            train_data, lambda local: shard_lib.global_batch_from_local(local, mesh)
        )
        self.start_time = start_time
        self.split, params, mutable, frozen = split_for_training(model)
        steps_per_epoch = int(train_data.steps_per_epoch)
        self.total_steps = optim_lib.total_train_steps(config.optim, steps_per_epoch)
        self.optimizer = optim_lib.build_optimizer(
            config.optim, sorted(params), steps_per_epoch=steps_per_epoch,
            total_steps=self.total_steps,
        )  # fmt: skip
        opt_state = self.optimizer.tx.init(params)
        state = (params, opt_state, mutable, frozen)
        self.shardings = tuple(shard_lib.state_shardings(mesh, tree) for tree in state)
        self.params, self.opt_state, self.mutable, self.frozen = (
            shard_lib.put_state(tree, sh) for tree, sh in zip(state, self.shardings, strict=True)
        )
        del state, params, opt_state, mutable, frozen  # the host-side originals
        ckpt_cfg = config.ckpt
        self.checkpointer = ckpt_lib.TrainCheckpointer(
            workdir / ckpt_lib.CHECKPOINT_SUBDIR,
            keep=int(ckpt_cfg.get("keep", 3)),
            async_save=bool(ckpt_cfg.get("async", True)),
        )
        self.counters = _Counters()
        self.log_window: dict[str, list[float]] = {}  # the values of the next log row, so far
        self.step = 0
        self.config_json = report.config_json(config)
        self.config_types = ckpt_lib.none_field_types(config)
        self.encoders = ckpt_lib.encoder_digests(config)  # hashed once per run start
        self.config_changes: list[dict[str, Any]] = []

    def resume(self, allow_config_change: bool) -> dict[str, Any] | None:
        """Restores the latest checkpoint, if any; returns the stored result when that run had
        finished already (and closes the checkpointer then)."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            return None
        try:
            step_dir = self.checkpointer.directory / str(latest)
            meta, changed = _check_resumable(
                self.workdir, step_dir, self.config_json, self.params, allow_config_change,
            )  # fmt: skip
            ckpt_lib.check_encoders(meta, self.config, self.workdir)
            self.params, self.opt_state, self.mutable, _ = self.checkpointer.restore(
                latest, params=self.params, opt_state=self.opt_state, mutable=self.mutable
            )
        except BaseException:
            self.checkpointer.close()  # an open async manager would log tracebacks at exit
            raise
        self.config_changes = list(meta.get("config_changes", []))
        if changed:
            self.config_changes.append({"step": int(meta["step"]), "changed": changed})
        if meta.get("final") and int(meta["step"]) >= self.total_steps:
            # Finished already (a larger config.optim.steps/epochs, with allow_config_change,
            # continues from here).
            self.checkpointer.close()
            if jax.process_index() == 0:
                print(
                    f"note: {self.workdir} finished at step {meta['step']} already: nothing to "
                    "train; its final result follows (a new --workdir trains again)",
                    file=sys.stderr,
                )
            result = dict(meta.get("result", {}))
            result["resumed_finished_run"] = True
            return result
        self.train_data.set_state(_decode_state(meta["data_state"]))
        self.counters = _Counters(**meta.get("counters", {}))
        self.log_window = {k: list(v) for k, v in meta.get("log_window", {}).items()}
        self.step = int(meta["step"])
        if changed and jax.process_index() == 0:
            print(
                f"note: continuing {self.workdir} from step {self.step} under a changed config "
                f"({', '.join(changed)}); recorded in the checkpoint's config_changes",
                file=sys.stderr,
            )
        return None

    def meta_now(self, **extra) -> dict:
        return {
            "step": self.step,
            "data_state": _encode_state(self.train_data.get_state()),
            "counters": dataclasses.asdict(self.counters),
            "log_window": {k: list(v) for k, v in self.log_window.items()},
            "config": self.config_json,
            "config_types": self.config_types,
            "encoders": self.encoders,
            "threshold": None,
            "seconds": time.time() - self.start_time,
            **({"config_changes": self.config_changes} if self.config_changes else {}),
            **extra,
        }

    def save(self, **extra) -> None:
        self.checkpointer.save(
            self.step, params=self.params, opt_state=self.opt_state, mutable=self.mutable,
            meta=self.meta_now(**extra),
        )  # fmt: skip

    def current_model(self) -> nnx.Module:
        return self.split.merge(self.params, self.mutable, self.frozen)

    def loop(
        self,
        evaluator: Callable[[nnx.Module, int], dict] | None,
        *,
        grad_accum: int,
        stop_at_step: int | None,
        progress: bool,
        history: list | None,
        step_callback: Callable[[int, dict], None] | None,
    ) -> dict[str, Any]:
        """Trains to the end (final evaluation, final checkpoint) or to a stop or preemption."""
        config, primary = self.config, jax.process_index() == 0
        step_fn = jax.jit(
            make_train_step(self.split, self.optimizer.tx, grad_accum=grad_accum, mesh=self.mesh),
            out_shardings=(*self.shardings[:3], shard_lib.replicated(self.mesh)),
            donate_argnums=(0, 1, 2),
        )
        # Rows after the restored step were written by the part of a killed run that was lost.
        writer = run_log.MetricWriter(self.workdir, active=primary, resume_step=self.step)
        preemption = _Preemption(self.checkpointer)
        bar = report.progress_bar(
            self.total_steps, enabled=progress and primary, desc="train", unit="step",
            initial=self.step,
        )  # fmt: skip
        handle = _StepMonitor(
            counters=self.counters,
            writer=writer,
            optimizer=self.optimizer,
            bar=bar,
            global_batch=int(config.data.batch_size),
            total_steps=self.total_steps,
            log_every=max(1, int(config.get("log_every_steps", 10) or 10)),
            max_bad=int(config.get("max_bad_steps", 10) or 10),
            history=history,
            step_callback=step_callback,
            window=self.log_window,
        )
        try:
            with jax.set_mesh(self.mesh):
                preempted = self._steps(step_fn, handle, writer, preemption, evaluator,
                                        stop_at_step)  # fmt: skip
                writer.flush()
                bar.close()  # before the final evaluation's own output (bars, notes)
                if not preempted:
                    result = self._finish(evaluator, writer, handle.last_loss)
        finally:
            bar.close()
            preemption.close()
            self.checkpointer.wait()
            self.checkpointer.close()
            writer.close()
        if preempted:
            result = _result(self.step, self.start_time, handle.last_loss, self.counters, {})
            result["preempted"] = True
            if preemption.signal == signal.SIGINT:
                result["interrupted"] = True  # Ctrl-C rather than SIGTERM
        return _with_skipped(result, self.train_data)

    def _steps(self, step_fn, handle, writer, preemption, evaluator, stop_at_step) -> bool:
        """Steps until the end (False) or a stop or preemption (True; that step is saved), with
        the periodic evaluations and checkpoints."""
        eval_every = int(self.config.eval.get("every_steps", 0) or 0)
        save_every = int(self.config.ckpt.get("every_steps", 0) or 0)
        pending: tuple[int, dict] | None = None
        while self.step < self.total_steps:
            data_state = self.train_data.get_state()
            try:
                batch = next(self.train_data)
            except DataError as e:
                if pending is not None:
                    handle(*pending)
                self._save_before_bad_batch(data_state, e)
            self.params, self.opt_state, self.mutable, metrics = step_fn(
                self.params, self.opt_state, self.mutable, self.frozen, batch
            )
            self.step += 1
            step = self.step
            # The previous step's metrics are read while this one runs (one-step lag keeps the
            # devices busy); anything that needs this step's state reads them first.
            if pending is not None:
                handle(*pending)
            pending = (step, metrics)
            stop = stop_at_step is not None and step >= stop_at_step
            preempt = preemption.reached(step)
            evaluate_now = evaluator is not None and eval_every and step % eval_every == 0
            save_now = save_every and step % save_every == 0
            if step < self.total_steps and (stop or preempt or evaluate_now or save_now):
                handle(*pending)
                pending = None
                if evaluate_now:
                    metrics_now = dict(evaluator(self.current_model(), step))
                    writer.write(step, _numeric(metrics_now, prefix="eval/"))
                if save_now or stop or preempt:
                    self.save()
                if stop or preempt:
                    return True
        if pending is not None:
            handle(*pending)
        return False

    def _save_before_bad_batch(self, data_state: Any, error: DataError) -> None:
        """Keeps the work done so far: saves this step with the data position before the bad
        batch, so fixing the file and re-running resumes right here; then raises."""
        self.save(data_state=_encode_state(data_state))
        raise DataError(
            f"{error} [step {self.step} was saved in {self.checkpointer.directory}: fix or "
            "remove the file and re-run the same command to resume, or add "
            "--config.data.skip_corrupt=True]",
            error.path,
        ) from error

    def _finish(self, evaluator, writer, last_loss: float) -> dict[str, Any]:
        """The final evaluation and the final checkpoint (its result and threshold)."""
        eval_metrics: dict[str, Any] = {}
        if evaluator is not None:
            eval_metrics = dict(evaluator(self.current_model(), self.step))
            writer.write(self.step, _numeric(eval_metrics, prefix="eval/"))
        result = _with_skipped(
            _result(self.step, self.start_time, last_loss, self.counters, eval_metrics),
            self.train_data,
        )
        self.save(final=True, result=result, threshold=_threshold_from(eval_metrics))
        return result


def _numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, np.number)) or (np.ndim(v) == 0 and hasattr(v, "dtype")):
            out[prefix + k] = float(v)
    return out


def _with_skipped(result: dict, train_data: Any) -> dict:
    skipped = list(getattr(train_data, "skipped", None) or ())
    if skipped:
        # Corrupt files dropped under config.data.skip_corrupt, for the run summary.
        result["skipped_files"] = skipped
    return result


def _result(step, start_time, last_loss, counters, eval_metrics) -> dict[str, Any]:
    result = dict(eval_metrics)
    result.update(
        steps=int(step),
        seconds=round(time.time() - start_time, 3),
        loss=last_loss,
        bad_steps=counters.bad_total,
    )
    return report.json_ready(result)


# ----------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "config", None, "method config file[:variant,...]; change keys with --config.KEY=VALUE"
    )
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and event files go here")
    flags.DEFINE_bool("progress", True, "show a progress bar")
    flags.DEFINE_bool(
        "allow_config_change", False,
        "resume a workdir started under another config (recorded in its checkpoints)",
    )  # fmt: skip
    cli.define_multihost_flags()
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    from absl import flags

    f = flags.FLAGS
    config = cli.config_from_flags(overrides)
    result = train(
        config, f.workdir, progress=f.progress, allow_config_change=f.allow_config_change
    )
    if jax.process_index() == 0:
        if result.get("preempted"):
            print(
                f"{'interrupted' if result.get('interrupted') else 'preempted'} at step "
                f"{result['steps']}: checkpoint saved in "
                f"{Path(f.workdir) / ckpt_lib.CHECKPOINT_SUBDIR}; "
                "re-run the same command to resume",
                file=sys.stderr,
            )
        print(json.dumps(result), flush=True)
    if result.get("preempted"):
        sys.exit(INTERRUPTED_EXIT_CODE if result.get("interrupted") else PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    cli.Command(_define_flags, main, expected_errors=(TrainingDiverged,)).run()
