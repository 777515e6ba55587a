"""The grain input pipeline: deterministic, per-process-sharded, resumable batches of examples.

Sources are random-access lists of examples (``RecordSource`` over reader records, or
``zsad_jax.data.tfds_builder.TfdsSource`` over an array_record TFDS build). The pipeline loads and
transforms examples in grain and emits NumPy batches with the fields of ``methods/base.py``::

    image     (B, S, S, 3) float32     from the transform
    gt_mask   (B, S, S) float32 {0, 1}
    gt_label  (B,) int32
    has_mask  (B,) bool
    class_id  (B,) int32               index of the example's category in ``source.class_names``
    index     (B,) int32               position of the example in the source
    valid     (B,) bool                ``eval_batches`` only: False for padding / skipped files

where B is the per-process batch (``global_batch // process_count``).

Training order. Epoch ``e`` visits the source in the permutation drawn from ``(seed, e)``;
global step ``s`` of that epoch takes permutation positions ``[s * G, (s + 1) * G)`` (G = global
batch; the last ``len % G`` positions of an epoch are dropped), and process ``p`` of ``P`` takes the
``p``-th of its P equal slices. Concatenating the processes' batches in process order therefore
gives exactly the batch a single process would see, which is what
``jax.make_array_from_process_local_data`` over a ``data`` mesh axis assembles. Augmentation draws
from ``example_rng(seed, epoch, index)``, so an example's pixels do not depend on the number of
processes, read threads or worker processes either.

Resuming. ``train_iterator`` returns a grain ``DatasetIterator``; ``get_state()`` is a small
JSON-able dict and ``set_state()`` on a freshly built iterator (same arguments) continues at exactly
the next batch. The state depends on ``num_workers`` (grain's multiprocess prefetch keeps one
position per worker): resume with the same worker count.

Corrupt files. By default a ``decode.DataError`` stops the run, naming the file. With
``skip_corrupt=True`` training drops such examples (the batch is filled from the following ones) and
evaluation marks them ``valid=False``; either way the iterator's ``skipped`` lists the files for the
run summary (it is part of the iterator state, so it survives a resume). In a multi-process run a
dropped example shifts only that process's stream (its batches then differ from a single-process
run's); use a step budget (``num_epochs=None``) there, because with a finite epoch count the
processes could run out of data one step apart.

Usage::

    records = protocol.read_dataset("mvtec_ad", root, "test")
    source = RecordSource(records)
    batches = train_iterator(source, global_batch=16, seed=0,
                             transform=make_transform("clip", 518, train=True))
    batch = next(batches); state = batches.get_state()     # checkpoint `state` as JSON
    resumed = train_iterator(...same arguments...); resumed.set_state(state)
    for batch in eval_batches(source, batch_size=32, transform=make_transform("clip", 518)): ...
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from zsad_jax.data.decode import DataError, load_record
from zsad_jax.data.records import Record

# f(sample from load_record, rng) -> sample with image float32 (S, S, 3), gt_mask float32 (S, S).
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]

# Domain tags keep the shuffle stream and the augmentation stream of one seed independent.
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2

# The per-example fields a batch carries (strings such as path/category stay in the source).
BATCH_FIELDS = ("image", "gt_mask", "gt_label", "has_mask", "class_id", "index")


# --- sources ------------------------------------------------------------------------------------


class ExampleSource(abc.ABC):
    """Random access to decoded examples (the dict of ``decode.load_record``).

    Attributes:
      class_names: category names; an example's ``class_id`` is its category's position here.
    """

    class_names: tuple[str, ...]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> dict[str, Any]:
        """Example ``index``: ``image`` uint8 (H, W, 3), ``gt_mask`` bool (H, W), ``has_mask``,
        ``gt_label``, ``category``, ``path``. Raises ``DataError`` for an unusable file."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """The file behind example ``index`` (for skip reports), without decoding it."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def class_id(self, category: str, index: int) -> int:
        try:
            return self._class_ids[category]
        except KeyError:
            raise ValueError(
                f"example {index} ({self.describe(index)}) has category {category!r}, which is not "
                f"in class_names {list(self.class_names)}; pass class_names that include it"
            ) from None

    @functools.cached_property
    def _class_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}


def _ordered_unique(names: Sequence[str]) -> tuple[str, ...]:
    # Order of first appearance, the same rule as ``protocol.category_names``.
    return tuple(dict.fromkeys(names))


class RecordSource(ExampleSource):
    """Examples read from image files listed by a reader (``protocol.read_dataset``).

    Args:
      records: the split's records, in the order that defines ``index``.
      class_names: category order for ``class_id``; default: the records' categories in order of
        first appearance.
      load: ``Record -> dict`` (default ``decode.load_record``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        class_names: Sequence[str] | None = None,
        *,
        load: Callable[[Record], dict[str, Any]] | None = None,
    ):
        if not records:
            raise ValueError("RecordSource needs at least one record (the reader returned none)")
        self.records = tuple(records)
        self.class_names = (
            _ordered_unique(r.category for r in self.records)
            if class_names is None
            else tuple(class_names)
        )
        self._load = load_record if load is None else load

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        return self._load(self.records[index])

    def describe(self, index: int) -> str:
        return self.records[index].path


# --- elements flowing through grain -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in for an example whose file raised ``DataError`` (skip_corrupt=True)."""

    index: int
    path: str


@dataclasses.dataclass(frozen=True)
class _Padding:
    """Fills the last evaluation batch beyond the end of the source."""


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation RNG of source example ``index`` in ``epoch``: independent of sharding."""
    return np.random.default_rng((_AUGMENT_STREAM, seed, epoch, index))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((_SHUFFLE_STREAM, seed, epoch)).permutation(num_examples)


def _to_example(sample: dict[str, Any], class_id: int, index: int) -> dict[str, np.ndarray]:
    return {
        "image": np.asarray(sample["image"], np.float32),
        "gt_mask": np.asarray(sample["gt_mask"], np.float32),
        "gt_label": np.int32(sample["gt_label"]),
        "has_mask": np.bool_(sample["has_mask"]),
        "class_id": np.int32(class_id),
        "index": np.int32(index),
    }


class _LoadExample:
    """grain map: ``(source index, epoch)`` -> transformed example, ``_Skipped`` or ``_Padding``."""

    def __init__(self, source: ExampleSource, transform: Transform, seed: int, skip_corrupt: bool):
        self._source = source
        self._transform = transform
        self._seed = seed
        self._skip_corrupt = skip_corrupt

    def __call__(self, item: tuple[int, int]):
        index, epoch = item
        if index < 0:
            return _Padding()
        try:
            sample = self._source.load(index)
        except DataError as e:
            if not self._skip_corrupt:
                raise
            return _Skipped(index, e.path or self._source.describe(index))
        class_id = self._source.class_id(sample["category"], index)
        sample = self._transform(sample, example_rng(self._seed, epoch, index))
        return _to_example(sample, class_id, index)


# --- index orders -------------------------------------------------------------------------------


class _TrainOrder(grain.MapDataset):
    """Element k of this process's stream -> ``(source index, epoch)`` (module docstring)."""

    def __init__(
        self,
        num_examples: int,
        global_batch: int,
        process_index: int,
        process_count: int,
        seed: int,
        num_epochs: int | None,
    ):
        super().__init__()
        self._num_examples = num_examples
        self._global_batch = global_batch
        self._local_batch = global_batch // process_count
        self._process_index = process_index
        self._seed = seed
        self._num_epochs = num_epochs
        self.steps_per_epoch = num_examples // global_batch

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize  # grain's convention for an endless MapDataset
        return self._num_epochs * self.steps_per_epoch * self._local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._local_batch)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        position = (
            step_in_epoch * self._global_batch + self._process_index * self._local_batch + row
        )
        permutation = _epoch_permutation(self._num_examples, self._seed, epoch)
        return int(permutation[position]), epoch

    def __str__(self) -> str:
        return f"_TrainOrder(n={self._num_examples}, seed={self._seed}, epochs={self._num_epochs})"


class _EvalOrder(grain.MapDataset):
    """Element k of this process's evaluation stream -> ``(source index or -1 for padding, 0)``."""

    def __init__(self, num_examples: int, batch_size: int, process_index: int, process_count: int):
        super().__init__()
        self._num_examples = num_examples
        self._batch_size = batch_size
        self._local_batch = batch_size // process_count
        self._process_index = process_index
        self.num_steps = math.ceil(num_examples / batch_size)

    def __len__(self) -> int:
        return self.num_steps * self._local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._local_batch)
        position = step * self._batch_size + self._process_index * self._local_batch + row
        return (position if position < self._num_examples else -1), 0

    def __str__(self) -> str:
        return f"_EvalOrder(n={self._num_examples}, batch={self._batch_size})"


# --- batching (in the main process, after any worker processes) ---------------------------------


class _ExampleBatches(grain.IterDataset):
    """Stacks examples into batches; drops (train) or masks out (eval) skipped files."""

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        *,
        padded: bool,
        blank_example: Callable[[], dict[str, np.ndarray]],
        steps_per_epoch: int | None = None,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._padded = padded
        self._blank_example = blank_example
        self._steps_per_epoch = steps_per_epoch

    def __iter__(self) -> _ExampleBatchIterator:
        return _ExampleBatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            padded=self._padded,
            blank_example=self._blank_example,
            steps_per_epoch=self._steps_per_epoch,
        )

    def __str__(self) -> str:
        return f"_ExampleBatches(batch_size={self._batch_size}, padded={self._padded})"


class _ExampleBatchIterator(grain.DatasetIterator):
    """Batch iterator; ``skipped`` lists the corrupt files met so far (kept in the state too)."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        *,
        padded: bool,
        blank_example: Callable[[], dict[str, np.ndarray]],
        steps_per_epoch: int | None,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._padded = padded
        self._blank_example = blank_example
        self._blank: dict[str, np.ndarray] | None = None
        self._skipped: list[str] = []
        self.steps_per_epoch = steps_per_epoch

    @property
    def skipped(self) -> tuple[str, ...]:
        """Files dropped (training) or masked out (evaluation) because they raised ``DataError``."""
        return tuple(self._skipped)

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[Any] = []
        while len(rows) < self._batch_size:
            element = next(self._parent)  # StopIteration mid-batch drops the remainder
            if isinstance(element, _Skipped):
                self._skipped.append(element.path)
                if not self._padded:
                    continue
            rows.append(element)
        return self._stack(rows) if self._padded else _stack_examples(rows)

    def _stack(self, rows: list[Any]) -> dict[str, np.ndarray]:
        """Padded mode: invalid rows become zeros of a real example's shapes, ``valid`` False."""
        real = [row for row in rows if isinstance(row, dict)]
        if self._blank is None:
            template = real[0] if real else self._blank_example()
            self._blank = {key: np.zeros_like(value) for key, value in template.items()}
        filled = []
        for row in rows:
            if isinstance(row, dict):
                filled.append({**row, "valid": np.bool_(True)})
            else:
                index = row.index if isinstance(row, _Skipped) else -1
                filled.append({**self._blank, "index": np.int32(index), "valid": np.bool_(False)})
        return _stack_examples(filled)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": list(self._skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = list(state["skipped"])

    def __str__(self) -> str:
        return f"_ExampleBatchIterator(batch_size={self._batch_size}, padded={self._padded})"


def _stack_examples(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _first_loadable_example(source: ExampleSource, transform: Transform) -> dict[str, np.ndarray]:
    """Shapes for padding when a process never sees a readable example (tiny eval shards)."""
    for index in range(len(source)):
        try:
            sample = source.load(index)
        except DataError:
            continue
        class_id = source.class_id(sample["category"], index)
        return _to_example(transform(sample, example_rng(0, 0, index)), class_id, index)
    raise DataError(f"none of the {len(source)} examples of the source can be read")


# --- public entry points ------------------------------------------------------------------------


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when asked to detect the layout; worker processes never import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _local_batch(batch_size: int, process_count: int, what: str) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"{what} {batch_size} must be a positive multiple of the process count "
            f"{process_count} (every process feeds {what} / process_count examples per step)"
        )
    return batch_size // process_count


def _grain_pipeline(
    order: grain.MapDataset,
    load: _LoadExample,
    *,
    local_batch: int,
    num_workers: int,
    read_threads: int,
) -> grain.IterDataset:
    # Read-ahead of two batches per process; threads overlap file decoding (Pillow drops the GIL).
    read_options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=2 * local_batch if read_threads else 0
    )
    dataset = order.map(load).to_iter_dataset(read_options)
    if num_workers > 0:
        from absl import flags

        # grain's worker launcher reads its absl flags; outside ``app.run`` (tests, notebooks) they
        # would be unparsed and raise, so use their defaults there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Training steps in one epoch (the remainder of each epoch is dropped)."""
    return num_examples // global_batch


def train_iterator(
    source: ExampleSource,
    *,
    global_batch: int,
    seed: int,
    transform: Transform,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    skip_corrupt: bool = False,
    num_workers: int = 0,
    read_threads: int = 2,
) -> _ExampleBatchIterator:
    """Shuffled training batches for this process (module docstring: order, resume, corrupt files).

    Args:
      source: examples (``RecordSource``, ``TfdsSource``).
      global_batch: examples per step summed over processes; a multiple of ``process_count``.
      seed: shuffling and augmentation seed (non-negative).
      transform: ``f(sample, rng) -> sample`` (``transforms.make_transform(..., train=True)``).
      num_epochs: epochs to iterate; ``None`` = endless (stop after the step budget).
      process_index, process_count: this process's place; default ``jax.process_index()/count()``.
      skip_corrupt: drop examples whose file raises ``DataError`` instead of stopping.
      num_workers: grain worker processes (0 = load in this process).
      read_threads: threads loading examples in each process.

    Returns:
      A grain ``DatasetIterator`` of dicts with the ``BATCH_FIELDS``, leading dim
      ``global_batch // process_count``; also ``steps_per_epoch`` and ``skipped``.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch = _local_batch(global_batch, process_count, "global_batch")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if len(source) < global_batch:
        raise ValueError(
            f"the training source has {len(source)} examples, fewer than global_batch "
            f"{global_batch}: lower the batch size or add data"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    order = _TrainOrder(len(source), global_batch, process_index, process_count, seed, num_epochs)
    load = _LoadExample(source, transform, seed, skip_corrupt)
    examples = _grain_pipeline(
        order, load, local_batch=local_batch, num_workers=num_workers, read_threads=read_threads
    )
    batches = _ExampleBatches(
        examples,
        local_batch,
        padded=False,
        blank_example=functools.partial(_first_loadable_example, source, transform),
        steps_per_epoch=order.steps_per_epoch,
    )
    return iter(batches)


class EvalBatches:
    """Every example of a source exactly once, in order, in padded batches with a ``valid`` mask.

    Global step ``s`` covers source positions ``[s * batch_size, (s + 1) * batch_size)``; process
    ``p`` gets the ``p``-th slice, so every process runs ``len(self)`` steps (collectives stay
    aligned) and gathering the global batches in order restores the source order. Iterating again
    restarts.
    """

    def __init__(self, dataset: _ExampleBatches, num_steps: int, num_examples: int):
        self._dataset = dataset
        self._last: _ExampleBatchIterator | None = None
        self.num_examples = num_examples
        self._num_steps = num_steps

    def __len__(self) -> int:
        return self._num_steps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self._last = iter(self._dataset)
        return self._last

    @property
    def skipped(self) -> tuple[str, ...]:
        """Files of this process's shard marked invalid by the latest pass (skip_corrupt=True)."""
        return () if self._last is None else self._last.skipped


def eval_batches(
    source: ExampleSource,
    *,
    batch_size: int,
    transform: Transform,
    process_index: int | None = None,
    process_count: int | None = None,
    skip_corrupt: bool = False,
    num_workers: int = 0,
    read_threads: int = 2,
) -> EvalBatches:
    """Evaluation batches: ``BATCH_FIELDS`` plus ``valid`` (B,) bool; B = batch_size // processes.

    Rows with ``valid`` False must be ignored: padding after the last example (``index`` -1) or,
    with ``skip_corrupt``, an unreadable file (``index`` = its position; listed in ``skipped``).
    ``transform`` receives ``example_rng(0, 0, index)`` (evaluation transforms ignore it).
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch = _local_batch(batch_size, process_count, "batch_size")
    order = _EvalOrder(len(source), batch_size, process_index, process_count)
    load = _LoadExample(source, transform, 0, skip_corrupt)
    examples = _grain_pipeline(
        order, load, local_batch=local_batch, num_workers=num_workers, read_threads=read_threads
    )
    batches = _ExampleBatches(
        examples,
        local_batch,
        padded=True,
        blank_example=functools.partial(_first_loadable_example, source, transform),
    )
    return EvalBatches(batches, order.num_steps, len(source))
