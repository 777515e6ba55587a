"""The grain pipeline: seeded order, process shards, exact resume, eval padding, corrupt files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from zsad_jax.data import pipeline
from zsad_jax.data.decode import DataError, load_record
from zsad_jax.data.records import Record
from zsad_jax.data.transforms import make_transform

NUM_EXAMPLES = 23  # prime: every epoch has a remainder to drop
CATEGORIES = ("bottle", "grid", "wood")
IMAGE_SIZE = 8


def _in_memory_load(record: Record) -> dict:
    """Decoded example for ``img<i>``: pixels from a per-index RNG, no files (fast)."""
    index = int(record.path[3:])
    rng = np.random.default_rng(1000 + index)
    height, width = 10 + index % 3, 9 + index % 4  # sizes vary, as real images do
    mask = rng.random((height, width)) > 0.6 if record.gt_label else np.zeros((height, width), bool)
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "gt_mask": mask,
        "has_mask": record.has_mask,
        "gt_label": record.gt_label,
        "category": record.category,
        "path": record.path,
    }


def _records(n: int = NUM_EXAMPLES) -> list[Record]:
    labels = [int(i % 4 == 1) for i in range(n)]
    return [Record(f"img{i}", category=CATEGORIES[i % 3], gt_label=labels[i]) for i in range(n)]


@pytest.fixture(scope="module")
def source() -> pipeline.RecordSource:
    return pipeline.RecordSource(_records(), load=_in_memory_load)


# The real ACD-CLIP training augmentation: random, so equal pixels prove equal per-example RNGs.
AUGMENT = make_transform("acd_clip_train", IMAGE_SIZE, train=True)
EVAL = make_transform("clip", IMAGE_SIZE)


def _train(source, **kwargs):
    defaults = dict(global_batch=4, seed=0, transform=AUGMENT, process_index=0, process_count=1)
    return pipeline.train_iterator(source, **{**defaults, **kwargs})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_fields_dtypes_and_values(source):
    batch = next(_train(source))
    assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.float32 and batch["gt_mask"].dtype == np.float32
    assert batch["gt_mask"].shape == (4, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["gt_label"].dtype == np.int32 and batch["class_id"].dtype == np.int32
    assert batch["has_mask"].dtype == np.bool_ and batch["index"].dtype == np.int32
    for row, index in enumerate(batch["index"]):
        record = source.records[index]
        assert CATEGORIES[batch["class_id"][row]] == record.category
        assert batch["gt_label"][row] == record.gt_label
        # The pixels are the transform of that example with its documented RNG (epoch 0).
        expected = AUGMENT(_in_memory_load(record), pipeline.example_rng(0, 0, int(index)))
        np.testing.assert_array_equal(batch["image"][row], expected["image"])
        np.testing.assert_array_equal(batch["gt_mask"][row], expected["gt_mask"])


def test_same_seed_same_batches_different_seed_differs(source):
    first = _take(_train(source, seed=3), 8)
    _assert_batches_equal(first, _take(_train(source, seed=3, read_threads=0), 8))
    other = _take(_train(source, seed=4), 8)
    assert not np.array_equal(
        np.concatenate([b["index"] for b in first]), np.concatenate([b["index"] for b in other])
    )


def test_every_example_once_per_epoch_reshuffled_remainder_dropped(source):
    batch, epochs, seed = 4, 3, 7
    iterator = _train(source, global_batch=batch, seed=seed, num_epochs=epochs)
    steps = NUM_EXAMPLES // batch
    assert iterator.steps_per_epoch == steps == pipeline.steps_per_epoch(NUM_EXAMPLES, batch)
    batches = list(iterator)
    assert len(batches) == epochs * steps  # finite epochs end; the remainder of each is dropped
    orders = []
    for epoch in range(epochs):
        seen = np.concatenate([b["index"] for b in batches[epoch * steps : (epoch + 1) * steps]])
        assert len(set(seen.tolist())) == steps * batch  # no repeats within an epoch
        assert set(seen.tolist()) <= set(range(NUM_EXAMPLES))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # The same example is augmented differently in different epochs.
    common = int(np.intersect1d(orders[0], orders[1])[0])
    images = [
        b["image"][list(b["index"]).index(common)]
        for b in batches[: 2 * steps]
        if common in b["index"]
    ]
    assert len(images) == 2 and not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(source, process_count):
    global_batch, steps = 8, 6  # crosses an epoch boundary (2 steps per epoch)
    single = _take(_train(source, global_batch=global_batch, seed=11), steps)
    shards = [
        _take(
            _train(
                source,
                global_batch=global_batch,
                seed=11,
                process_index=p,
                process_count=process_count,
            ),
            steps,
        )
        for p in range(process_count)
    ]
    for step in range(steps):
        parts = [shards[p][step] for p in range(process_count)]
        assert all(len(part["index"]) == global_batch // process_count for part in parts)
        indices = np.concatenate([part["index"] for part in parts])
        assert len(set(indices.tolist())) == global_batch  # disjoint shards
        # Concatenated in process order they are the single-process batch, augmentation included.
        joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        _assert_batches_equal([joined], [single[step]])


def test_state_round_trip_resumes_at_the_next_batch(source):
    k, m = 3, 5  # 5 steps per epoch: the resumed part crosses into epoch 1
    iterator = _train(source, seed=5)
    _take(iterator, k)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = _take(iterator, m)
    fresh = _train(source, seed=5)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, m), expected)
    # And a fresh iterator without the state starts over, so the state is what made it resume.
    assert not np.array_equal(next(_train(source, seed=5))["index"], expected[0]["index"])


def test_process_index_defaults_to_jax(source):
    import jax

    assert jax.process_count() == 1
    auto = _take(pipeline.train_iterator(source, global_batch=4, seed=0, transform=AUGMENT), 2)
    _assert_batches_equal(auto, _take(_train(source), 2))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_padding_keeps_every_example_exactly_once_in_order(source, process_count):
    batch_size = 8
    shards = [
        pipeline.eval_batches(
            source,
            batch_size=batch_size,
            transform=EVAL,
            process_index=p,
            process_count=process_count,
        )
        for p in range(process_count)
    ]
    assert all(len(s) == -(-NUM_EXAMPLES // batch_size) for s in shards)  # same step count
    per_process = [list(s) for s in shards]
    gathered = []
    for step in range(len(shards[0])):
        parts = [per_process[p][step] for p in range(process_count)]
        gathered.append({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    index = np.concatenate([b["index"] for b in gathered])
    valid = np.concatenate([b["valid"] for b in gathered])
    padding = len(index) - NUM_EXAMPLES
    np.testing.assert_array_equal(index, list(range(NUM_EXAMPLES)) + [-1] * padding)
    np.testing.assert_array_equal(valid, [True] * NUM_EXAMPLES + [False] * padding)
    images = np.concatenate([b["image"] for b in gathered])
    for i in range(NUM_EXAMPLES):
        expected = EVAL(_in_memory_load(source.records[i]))
        np.testing.assert_array_equal(images[i], expected["image"])
    assert not images[NUM_EXAMPLES:].any()  # padding rows are blank


def test_bad_arguments_are_explained(source):
    with pytest.raises(ValueError, match="multiple of the process count"):
        _train(source, global_batch=6, process_count=4)
    with pytest.raises(ValueError, match="fewer than global_batch"):
        _train(source, global_batch=32)
    with pytest.raises(ValueError, match="process_index 2"):
        _train(source, process_index=2, process_count=2)
    narrow = pipeline.RecordSource(_records(), class_names=["bottle"], load=_in_memory_load)
    with pytest.raises(ValueError, match="not in class_names"):
        list(pipeline.eval_batches(narrow, batch_size=4, transform=EVAL, process_count=1,
                                   process_index=0))  # fmt: skip


# --- corrupt files, read from real files through decode.load_record ------------------------------


@pytest.fixture(scope="module")
def files_with_corrupt(tmp_path_factory):
    """Ten tiny PNG records on disk; two of them are garbage bytes."""
    root = tmp_path_factory.mktemp("corrupt")
    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        path = os.path.join(root, f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(path)
        records.append(Record(path=path, category="tile", gt_label=0))
    corrupt = [records[3].path, records[8].path]
    for path in corrupt:
        with open(path, "wb") as f:
            f.write(b"not a png at all")
    return records, corrupt


def test_corrupt_file_raises_by_default(files_with_corrupt):
    records, corrupt = files_with_corrupt
    source = pipeline.RecordSource(records)
    with pytest.raises(DataError, match="003.png"):
        list(pipeline.eval_batches(source, batch_size=4, transform=EVAL, process_index=0,
                                   process_count=1))  # fmt: skip


def test_corrupt_files_skipped_and_counted(files_with_corrupt):
    records, corrupt = files_with_corrupt
    source = pipeline.RecordSource(records)
    good = sorted(set(range(10)) - {3, 8})

    evaluation = pipeline.eval_batches(
        source, batch_size=4, transform=EVAL, process_index=0, process_count=1, skip_corrupt=True
    )
    batches = list(evaluation)
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert sorted(index[valid].tolist()) == good  # every readable file exactly once
    assert sorted(index[~valid].tolist()) == [-1, -1, 3, 8]  # 2 skipped + 2 padding rows
    assert evaluation.skipped == tuple(corrupt)
    for b in batches:
        for row in np.flatnonzero(b["valid"]):
            expected = EVAL(load_record(records[b["index"][row]]))
            np.testing.assert_array_equal(b["image"][row], expected["image"])

    # Training drops them, keeps batches full, and the count survives a resume from the state.
    train = pipeline.train_iterator(
        source, global_batch=2, seed=1, transform=EVAL, num_epochs=1, process_index=0,
        process_count=1, skip_corrupt=True,
    )  # fmt: skip
    seen = [next(train)["index"] for _ in range(2)]
    state = json.loads(json.dumps(train.get_state()))
    rest = list(train)
    resumed = pipeline.train_iterator(
        source, global_batch=2, seed=1, transform=EVAL, num_epochs=1, process_index=0,
        process_count=1, skip_corrupt=True,
    )  # fmt: skip
    resumed.set_state(state)
    _assert_batches_equal(list(resumed), rest)
    assert resumed.skipped == train.skipped
    epoch = np.concatenate(seen + [b["index"] for b in rest])
    assert all(len(b["index"]) == 2 for b in rest)
    assert 3 not in epoch and 8 not in epoch and len(set(epoch.tolist())) == len(epoch)
    assert sorted(train.skipped) == sorted(corrupt)  # one epoch of 10 visits both bad files
    assert len(epoch) == 8  # 10 - 2 dropped, no remainder left


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(source):
    reference = _take(_train(source, seed=2), 6)
    with_workers = _train(source, seed=2, num_workers=2)
    try:
        _assert_batches_equal(_take(with_workers, 3), reference[:3])
        state = json.loads(json.dumps(with_workers.get_state()))
    finally:
        with_workers.close()
    resumed = _train(source, seed=2, num_workers=2)
    try:
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 3), reference[3:])
    finally:
        resumed.close()
