"""The host/device overlap of training, evaluation and prediction.

Proofs: ``train.DevicePrefetch`` returns the wrapped data's batches in order with its states
(so checkpoints and resumes are those of the unwrapped data), reads ahead while a step runs, and
raises a bad batch's error only when that batch is due, with the state before it;
``BatchedInference.stream`` gives the outputs of one call per batch, in order, starts the next
batch before waiting for a batch's outputs, and yields every finished batch before an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import toys
from flax import nnx

from zsad_jax import inference
from zsad_jax import train as train_lib
from zsad_jax.data.decode import DataError


def _data(n=24, batch=4):
    arrays = {"x": np.arange(n, dtype=np.float32)[:, None]}
    return train_lib.InMemoryTrainData(arrays, global_batch=batch, seed=3)


class _Failing:
    """In-memory data whose batch ``bad`` (0-based) cannot be read."""

    def __init__(self, bad):
        self.inner, self.bad, self.reads = _data(), bad, 0
        self.steps_per_epoch, self.class_names = self.inner.steps_per_epoch, ()

    def __next__(self):
        if self.inner.get_state()["step"] == self.bad:
            raise DataError("cannot read bad.png", "bad.png")
        self.reads += 1
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_prefetch_keeps_the_order_and_states_of_the_wrapped_data():
    plain, wrapped = _data(), train_lib.DevicePrefetch(_data(), put=dict)
    for _ in range(9):  # across an epoch boundary
        assert wrapped.get_state() == plain.get_state()
        np.testing.assert_array_equal(next(wrapped)["x"], next(plain)["x"])
    state = wrapped.get_state()
    expected = next(plain)["x"]
    fresh = train_lib.DevicePrefetch(_data(), put=dict)
    fresh.set_state(state)  # a resume
    np.testing.assert_array_equal(next(fresh)["x"], expected)
    wrapped.set_state(state)  # read-ahead batches are dropped, not skipped
    np.testing.assert_array_equal(next(wrapped)["x"], expected)


def test_prefetch_reads_ahead_and_raises_a_bad_batch_when_it_is_due():
    data = _Failing(bad=3)
    wrapped = train_lib.DevicePrefetch(data, put=dict, ahead=1)
    next(wrapped)
    assert data.reads == 2  # batch 1 is on its way while batch 0's step runs
    next(wrapped), next(wrapped)
    assert wrapped.get_state()["step"] == 3  # the state before the bad batch
    for _ in range(2):  # it stays due
        with pytest.raises(DataError, match="bad.png"):
            next(wrapped)
    assert wrapped.get_state()["step"] == 3


@pytest.fixture(scope="module")
def infer():
    config = toys.toy_config()
    return inference.BatchedInference(toys.ToyDetector(config, rngs=nnx.Rngs(0)))


def _batches(n, size=8):
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(size=(size, toys.IMAGE_SIZE, toys.IMAGE_SIZE, 3)).astype(np.float32)
        yield {"image": image, "class_id": np.zeros(size, np.int32), "index": i}


def test_stream_equals_one_call_per_batch_in_order(infer):
    streamed = list(infer.stream(_batches(4)))
    assert [batch["index"] for batch, _ in streamed] == [0, 1, 2, 3]
    for (_, out), expected in zip(streamed, _batches(4), strict=True):
        direct = infer(expected)
        for key in ("anomaly_map", "pred_score"):
            np.testing.assert_array_equal(out[key], direct[key])


def test_stream_starts_the_next_batch_before_waiting_and_keeps_results_before_an_error(
    infer, monkeypatch
):
    events = []
    fetch = inference.BatchedInference.fetch
    monkeypatch.setattr(
        inference.BatchedInference, "fetch",
        staticmethod(lambda out, local=False: (events.append("fetch"), fetch(out, local=local))[1]),
    )  # fmt: skip

    def failing():
        for batch in _batches(2):
            events.append(f"read {batch['index']}")
            yield batch
        raise DataError("cannot read bad.png", "bad.png")

    done = []
    with pytest.raises(DataError, match="bad.png"):
        for batch, _ in infer.stream(failing()):
            done.append(batch["index"])
    assert events == ["read 0", "read 1", "fetch", "fetch"]
    assert done == [0, 1]  # both finished batches came out before the error
