"""The training loop (zsad_jax.train) on a toy method: it must work for any AnomalyModel.

The toy is a frozen per-pixel linear "backbone" (plain ``nnx.Param``), a ``Buffer``, and a trained
head (``Trainable``) with optional dropout (an RNG stream the checkpoint must carry). Proofs: the
loop equals a direct optax loop written here; 8 devices (and data x fsdp) equal 1 device; gradient
accumulation equals one big batch; a NaN batch is skipped and counted, too many stop the run; a run
stopped and resumed is bitwise equal to an uninterrupted one; checkpoints hold only trainable state;
``load_for_inference`` rebuilds the trained model; metrics.jsonl and TensorBoard files parse back
(with protobuf's own decoder). The toy lives in tests/toys.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from toys import ToyModel, loop_arrays, loop_config, loop_data, saved, train_toy

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import report, run_log
from zsad_jax import sharding as shard_lib
from zsad_jax import train as train_lib
from zsad_jax.nn import Trainable

# ----------------------------------------------------------------------------------------------
# Fixed batches.


class ListData:
    """Fixed batches in order (to place a bad batch exactly)."""

    def __init__(self, batches):
        self.batches = batches
        self.steps_per_epoch = len(batches)
        self.class_names = ["toy"]
        self.i = 0

    def __next__(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


# ----------------------------------------------------------------------------------------------
# Numerics.


def test_loop_equals_a_direct_optax_loop(tmp_path):
    """Split/merge, sharding and batch feeding change nothing: the same 4 Adam steps written
    directly on arrays (own loss, own data order) give the same losses and weights."""
    config = loop_config()
    config.mesh.data = 1
    history = []
    train_toy(config, tmp_path, history=history)

    init = ToyModel(config, rngs=nnx.Rngs(config.seed))
    wb, bb = np.asarray(init.backbone.kernel[...]), np.asarray(init.backbone.bias[...])
    params = {"k": init.head.kernel[...], "b": init.head.bias[...], "s": init.scale[...]}

    def loss_fn(p, x, mask, label):
        f = jnp.tanh((x @ wb + bb) * 1.5)
        logits = (f @ p["k"] + p["b"])[..., 0] * p["s"]
        bce = lambda z, t: jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))  # noqa: E731
        return bce(logits, mask).mean() + bce(logits.mean(axis=(1, 2)), label).mean()

    tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2)
    state = tx.init(params)
    grad_fn, update = jax.jit(jax.value_and_grad(loss_fn)), jax.jit(tx.update)
    arrays = loop_arrays()
    order = np.random.default_rng([config.seed, 0]).permutation(64)
    losses = []
    for step in range(4):
        rows = order[step * 16 : (step + 1) * 16]
        loss, grads = grad_fn(
            params, arrays["image"][rows], arrays["gt_mask"][rows], arrays["gt_label"][rows]
        )
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-6)
    trained = saved(tmp_path)
    np.testing.assert_allclose(trained["head.kernel"], params["k"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trained["head.bias"], params["b"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trained["scale"], params["s"], rtol=1e-5)
    assert abs(float(trained["scale"]) - 1.0) > 1e-3  # training moved the weights


def test_eight_devices_and_fsdp_equal_one_device(tmp_path, monkeypatch):
    assert jax.device_count() == 8
    # Split every array under fsdp, even the toy's small ones.
    monkeypatch.setattr(shard_lib, "FSDP_MIN_SIZE", 1)
    curves, weights = {}, {}
    for name, data, fsdp in (("one", 1, 1), ("eight", 8, 1), ("fsdp", 4, 2)):
        config = loop_config()
        config.mesh.data, config.mesh.fsdp = data, fsdp
        history = []
        train_toy(config, tmp_path / name, history=history)
        curves[name] = [h["loss"] for h in history]
        weights[name] = saved(tmp_path / name)
    for name in ("eight", "fsdp"):
        np.testing.assert_allclose(curves[name], curves["one"], rtol=1e-5, atol=1e-6)
        for k, v in weights["one"].items():
            np.testing.assert_allclose(weights[name][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_fsdp_rule_splits_largest_divisible_dimension(monkeypatch):
    mesh = shard_lib.make_mesh({"data": 4, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    big = shard_lib.state_sharding(mesh, (3, 4096, 64))
    assert big.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert shard_lib.state_sharding(mesh, (7, 4099)).spec == jax.sharding.PartitionSpec()
    assert shard_lib.state_sharding(mesh, (4,)).spec == jax.sharding.PartitionSpec()  # small
    replicated_mesh = shard_lib.make_mesh({"data": -1, "fsdp": 1})
    assert replicated_mesh.devices.size == 8
    assert (
        shard_lib.state_sharding(replicated_mesh, (4096, 64)).spec == jax.sharding.PartitionSpec()
    )
    with pytest.raises(ValueError, match="config.mesh.fsdp=3"):
        shard_lib.make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ValueError, match="config.data.batch_size=12"):
        shard_lib.batch_size_per_process(12, replicated_mesh)


def test_gradient_accumulation_equals_one_batch(tmp_path):
    curves, weights = {}, {}
    for k in (1, 2):
        config = loop_config()
        config.optim.grad_accum = k
        history = []
        train_toy(config, tmp_path / str(k), history=history)
        curves[k] = [h["loss"] for h in history]
        weights[k] = saved(tmp_path / str(k))
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-5)
    for name, v in weights[1].items():
        np.testing.assert_allclose(weights[2][name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    config = loop_config()
    config.optim.grad_accum = 3
    with pytest.raises(ValueError, match="grad_accum"):
        train_toy(config, tmp_path / "3")


def test_bfloat16_compute_keeps_float32_weights_and_loss(tmp_path):
    curves = {}
    for dtype in ("float32", "bfloat16"):
        config = loop_config()
        config.compute_dtype = dtype
        history = []
        train_toy(config, tmp_path / dtype, history=history)
        curves[dtype] = [h["loss"] for h in history]
    weights = saved(tmp_path / "bfloat16")
    assert all(v.dtype == np.float32 for v in weights.values())
    # bf16 matmuls (8 mantissa bits) follow the float32 run closely but not exactly.
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=2e-2)
    assert curves["bfloat16"] != curves["float32"]


# ----------------------------------------------------------------------------------------------
# Non-finite steps.


def _batches(n_steps, seed=0):
    a = loop_arrays(n=16 * n_steps, seed=seed)
    return [{k: v[i * 16 : (i + 1) * 16] for k, v in a.items()} for i in range(n_steps)]


def test_nan_batch_is_skipped_and_counted(tmp_path):
    clean = _batches(2)
    poisoned = {k: v.copy() for k, v in _batches(3)[2].items()}
    poisoned["image"][3, 1, 2, 0] = np.nan
    config = loop_config()
    config.optim.steps = 3
    history = []
    result = train_toy(config, tmp_path / "nan", data=ListData([*clean, poisoned]), history=history)
    assert [bool(h["finite"]) for h in history] == [True, True, False]
    assert result["bad_steps"] == 1 and result["steps"] == 3
    config.optim.steps = 2
    train_toy(config, tmp_path / "clean", data=ListData(clean))
    # The skipped step left every weight and optimiser moment exactly as it was.
    for item in ("params", "opt_state"):
        a, b = saved(tmp_path / "nan", item), saved(tmp_path / "clean", item)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert all(np.isfinite(v).all() for v in saved(tmp_path / "nan").values())


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path):
    bad = {k: v.copy() for k, v in _batches(1)[0].items()}
    bad["image"][:] = np.inf
    config = loop_config()
    config.max_bad_steps = 3
    config.optim.steps = 10
    history = []
    with pytest.raises(train_lib.TrainingDiverged, match=r"3 steps in a row.*max_bad_steps=3"):
        train_toy(config, tmp_path, data=ListData([bad]), history=history)
    assert len(history) == 3


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    config = loop_config()
    config.model.dropout = 0.3  # the model's RNG stream must be restored too
    config.optim.steps = 6
    config.log_every_steps = 4  # the stop at step 3 falls inside the first row's window
    full = []
    train_toy(config, tmp_path / "full", history=full)
    first, second = [], []
    stopped = train_toy(config, tmp_path / "resumed", stop_at_step=3, history=first)
    assert stopped["preempted"] and stopped["steps"] == 3
    assert ckpt_lib.resolve_step_dir(tmp_path / "resumed").name == "3"
    train_toy(config, tmp_path / "resumed", history=second)
    assert [h["step"] for h in second] == [4, 5, 6]
    assert [h["loss"] for h in first + second] == [h["loss"] for h in full]

    # metrics.jsonl too: the row at step 4 averages steps 1-4 (3 of them before the stop), not
    # only step 4. The wall time and the throughput are the values that depend on the clock.
    def rows(run):
        clock = ("time", "images_per_s")
        return [{k: v for k, v in r.items() if k not in clock} for r in run_log.read_metrics(run)]

    assert [r["step"] for r in rows(tmp_path / "full")] == [4, 6]
    assert rows(tmp_path / "resumed") == rows(tmp_path / "full")
    for item in ("params", "opt_state", "mutable"):
        jax.tree.map(
            np.testing.assert_array_equal,
            saved(tmp_path / "resumed", item),
            saved(tmp_path / "full", item),
        )
    # Dropout really drew different masks on each step (the RNG state matters here).
    assert saved(tmp_path / "full", "mutable")["dropout.rngs.count"] == 6


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_the_current_step_and_the_rerun_finishes_bitwise_equal(tmp_path, signum):
    """A real SIGTERM (or a first Ctrl-C, SIGINT) to this process during step 3 (the handlers the
    command installs)."""
    config = loop_config()
    config.model.dropout = 0.3
    config.optim.steps = 6
    full = []
    train_toy(config, tmp_path / "full", history=full)

    def terminate_at_step_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signum)

    previous = signal.getsignal(signum)
    stopped = train_toy(config, tmp_path / "killed", step_callback=terminate_at_step_3)
    assert signal.getsignal(signum) is previous  # handler removed after the run
    # Step 4 was already dispatched when step 3's metrics arrived: it is the one saved.
    assert stopped["preempted"] and stopped["steps"] == 4
    assert stopped.get("interrupted", False) == (signum == signal.SIGINT)
    assert ckpt_lib.resolve_step_dir(tmp_path / "killed").name == "4"
    rest = []
    train_toy(config, tmp_path / "killed", history=rest)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[4:]]
    for item in ("params", "opt_state", "mutable"):
        jax.tree.map(
            np.testing.assert_array_equal,
            saved(tmp_path / "killed", item),
            saved(tmp_path / "full", item),
        )


def test_checkpoint_holds_trainable_state_only_and_keeps_last_n(tmp_path):
    config = loop_config()
    config.model.dropout = 0.3  # as in the resume test: the compiled step is reused
    config.optim.steps = 5
    config.ckpt.every_steps = 1
    config.ckpt.keep = 2
    train_toy(config, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 5]
    assert set(saved(tmp_path)) == {"head.kernel", "head.bias", "scale"}
    assert set(saved(tmp_path, "mutable")) == {"dropout.rngs.count", "dropout.rngs.key"}
    opt_shapes = {np.shape(x) for x in jax.tree.leaves(saved(tmp_path, "opt_state"))}
    assert (3, 8) not in opt_shapes  # no moment of the frozen backbone kernel
    meta = ckpt_lib.read_meta(tmp_path)
    assert meta["final"] and meta["step"] == 5 and meta["threshold"] is None
    # Step 4 was saved asynchronously while step 5 ran on donated buffers: it still holds step 4.
    train_toy(config, tmp_path / "stopped", stop_at_step=4)
    for item in ("params", "opt_state", "mutable"):
        jax.tree.map(
            np.testing.assert_array_equal,
            saved(tmp_path, item, step=4),
            saved(tmp_path / "stopped", item, step=4),
        )
    assert json.loads(meta["config"])["model"]["width"] == 8
    assert meta["data_state"] == {"epoch": 1, "step": 1}  # 4 batches per epoch, 5 taken


def test_final_evaluation_threshold_and_load_for_inference(tmp_path, capsys):
    config = loop_config()
    config.optim.steps = 4
    config.eval.every_steps = 2
    calls = []

    def evaluator(model, step):
        assert isinstance(model, ToyModel)
        calls.append(step)
        return {"image_AUROC": 0.5 + step / 100, "threshold": 0.25, "per_category": {"a": 1}}

    result = train_toy(config, tmp_path, evaluator=evaluator)
    assert calls == [2, 4]
    assert result["image_AUROC"] == pytest.approx(0.54) and result["steps"] == 4
    assert result["per_category"] == {"a": 1}
    lines = run_log.read_metrics(tmp_path)
    assert [line["eval/image_AUROC"] for line in lines if "eval/image_AUROC" in line] == [
        pytest.approx(0.52),
        pytest.approx(0.54),
    ]

    model, loaded_config, threshold = ckpt_lib.load_for_inference(tmp_path, allow_custom_code=True)
    assert threshold == 0.25
    assert loaded_config.model.width == 8 and loaded_config.method == config.method
    trained = saved(tmp_path)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), trained["head.kernel"])
    fresh = ToyModel(config, rngs=nnx.Rngs(config.seed))
    np.testing.assert_array_equal(model.backbone.kernel[...], fresh.backbone.kernel[...])
    assert not np.array_equal(model.head.kernel[...], fresh.head.kernel[...])

    ckpt_lib.save_threshold(tmp_path, 0.75)
    assert ckpt_lib.load_for_inference(tmp_path / "checkpoints", allow_custom_code=True)[2] == 0.75
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ckpt_lib.load_for_inference(tmp_path / "nowhere")

    # Re-running a finished run does no work and reports the stored result.
    history = []
    capsys.readouterr()
    again = train_toy(config, tmp_path, evaluator=evaluator, history=history)
    assert history == [] and again["resumed_finished_run"] and again["steps"] == 4
    assert f"note: {tmp_path} finished at step 4 already: nothing to train" in (
        capsys.readouterr().err
    )
    # A larger step budget is another config: refused naming the key, unless asked for, and then
    # recorded in the checkpoint.
    config.optim.steps = 6
    with pytest.raises(train_lib.ConfigMismatch, match=r"config\.optim\.steps: 4 -> 6"):
        train_toy(config, tmp_path, evaluator=evaluator, history=history)
    assert history == []
    more = train_toy(
        config, tmp_path, evaluator=evaluator, history=history, allow_config_change=True
    )
    assert [h["step"] for h in history] == [5, 6] and more["steps"] == 6
    changes = ckpt_lib.read_meta(tmp_path)["config_changes"]
    assert changes == [{"step": 4, "changed": {"config.optim.steps": [4, 6]}}]


def test_missing_backbone_weights_fail_before_any_work(tmp_path):
    config = loop_config()
    config.model.backbone_checkpoint = str(tmp_path / "weights" / "clip-vit-l14-336")
    with pytest.raises(FileNotFoundError, match=r"clip-vit-l14-336.*convert"):
        train_lib.train(config, tmp_path / "run", train_data=loop_data(config), evaluator=None)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Logs.


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C straight from its definition (reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _protobuf_event_class():
    """tensorflow.Event / Summary / Summary.Value declared here and decoded by protobuf itself."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest")
    value = fdp.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = fdp.message_type.add(name="Summary")
    summary.field.add(
        name="value",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".tbtest.Value",
    )
    session_log = fdp.message_type.add(name="SessionLog")
    session_log.field.add(name="status", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(
        name="summary",
        number=5,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tbtest.Summary",
    )
    event.field.add(
        name="session_log",
        number=7,  # tensorflow/core/util/event.proto (6 is the deprecated log_message)
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tbtest.SessionLog",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def test_crc32c_matches_the_standard_check_value():
    assert run_log.crc32c(b"123456789") == 0xE3069283  # the published CRC-32C check value
    data = bytes(range(256)) * 3
    assert run_log.crc32c(data) == _crc32c_bitwise(data)


def test_metrics_jsonl_and_tensorboard_events(tmp_path):
    config = loop_config()
    config.log_every_steps = 2
    train_toy(config, tmp_path)
    lines = run_log.read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [2, 4]
    for key in ("loss", "loss/pixel", "loss/image", "grad_norm", "lr", "images_per_s", "bad_steps"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert lines[0]["lr"] == pytest.approx(1e-2)

    (event_file,) = Path(tmp_path).glob("events.out.tfevents.*")
    raw = event_file.read_bytes()
    Event = _protobuf_event_class()
    events, pos = [], 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos : pos + 8], "little")
        payload = raw[pos + 12 : pos + 12 + length]
        for data, crc_at in ((raw[pos : pos + 8], pos + 8), (payload, pos + 12 + length)):
            crc = _crc32c_bitwise(data)
            masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
            assert masked == int.from_bytes(raw[crc_at : crc_at + 4], "little")
        events.append(Event.FromString(payload))
        pos += 16 + length
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    assert [s for s, _ in scalars] == [2, 4]
    for (_, values), line in zip(scalars, lines, strict=True):
        for key, value in values.items():
            assert value == pytest.approx(line[key], rel=1e-6), key
    # Our own reader agrees with protobuf's.
    ours = run_log.read_events(event_file)
    assert [(e["step"], e["scalars"]) for e in ours[1:]] == scalars


def test_resume_after_a_lost_checkpoint_keeps_one_metrics_row_per_step(tmp_path):
    """A kill during the write of step 4's checkpoint: the rerun restarts from step 2 and steps 3
    and 4 are logged again, so their first rows are dropped (and TensorBoard told to drop its)."""
    config = loop_config()
    config.optim.steps = 6
    config.ckpt.every_steps = 2
    train_toy(config, tmp_path, stop_at_step=4)
    assert [r["step"] for r in run_log.read_metrics(tmp_path)] == [1, 2, 3, 4]
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if the kill came before the commit
    with open(tmp_path / run_log.METRICS_FILE, "a") as f:
        f.write('{"step": 5, "lo')  # and a row torn by the kill
    train_toy(config, tmp_path)
    assert [r["step"] for r in run_log.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    second = max(Path(tmp_path).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    Event = _protobuf_event_class()
    restart = Event.FromString(list(run_log.read_records(second))[1])
    assert restart.session_log.status == 1 and restart.step == 3  # SessionLog.START
    assert run_log.read_events(second)[1]["session_start"]


def test_workdir_of_another_model_is_refused_in_one_message_naming_the_keys(tmp_path):
    config = loop_config()
    config.optim.steps = 2
    train_toy(config, tmp_path)
    config.model.width = 16  # another architecture: trained weights of other shapes
    with pytest.raises(train_lib.ConfigMismatch, match=r"config\.model\.width: 8 -> 16"):
        train_toy(config, tmp_path)
    # Even a deliberate continuation cannot load weights of other shapes: said plainly, before
    # orbax is asked (whose advice would be partial_restore=True).
    with pytest.raises(train_lib.ConfigMismatch, match=r"checkpoint of a different model.*shape"):
        train_toy(config, tmp_path, allow_config_change=True)


def test_a_run_checkpointed_before_a_key_existed_resumes_as_the_same_run(tmp_path):
    """A newer zsad_jax adds config keys (``eval.map_dtype`` here); a run checkpointed before
    carries the value that keeps what it did, so it is neither refused nor recorded as changed."""
    config = loop_config()
    config.optim.steps = 2
    train_toy(config, tmp_path, stop_at_step=1)
    meta_file = ckpt_lib.resolve_step_dir(tmp_path) / "meta" / ckpt_lib.META_FILE
    meta = json.loads(meta_file.read_text())
    stored = json.loads(meta["config"])
    del stored["eval"]["map_dtype"]
    meta["config"] = json.dumps(stored, sort_keys=True)
    meta_file.write_text(json.dumps(meta))
    result = train_toy(config, tmp_path)
    assert result["steps"] == 2
    assert "config_changes" not in ckpt_lib.read_meta(tmp_path)
    config.eval.map_dtype = "float16"  # a real change is still one
    with pytest.raises(train_lib.ConfigMismatch, match=r'config\.eval\.map_dtype: "float32" -> '):
        train_toy(config, tmp_path)


def test_converted_heads_are_not_resumed_as_a_training_run(tmp_path):
    """A workdir written by ``python -m convert.heads`` has weights but no optimiser/data state."""
    config = loop_config()
    model = ToyModel(config, rngs=nnx.Rngs(config.seed))
    params = ckpt_lib.flat_arrays(nnx.state(model, Trainable))
    checkpointer = ckpt_lib.TrainCheckpointer(tmp_path / "checkpoints", async_save=False)
    meta = {"step": 0, "config": report.config_json(config), "threshold": None}
    checkpointer.save(0, params=params, opt_state={"none": np.zeros(())}, mutable={}, meta=meta)
    checkpointer.close()
    with pytest.raises(train_lib.ConfigMismatch, match=r"converted heads.*new --workdir"):
        train_toy(config, tmp_path)


def test_corrupt_file_mid_run_saves_the_step_and_the_rerun_resumes_there(tmp_path):
    from zsad_jax.data.decode import DataError

    config = loop_config()
    config.optim.steps = 4
    batches = _batches(4)

    class BreaksAtStep3(ListData):
        broken = True

        def __next__(self):
            if self.broken and self.i == 2:
                raise DataError("cannot decode image file bad.png (truncated)", "bad.png")
            return super().__next__()

    data = BreaksAtStep3(batches)
    with pytest.raises(DataError, match=r"bad\.png.*step 2 was saved.*skip_corrupt=True"):
        train_toy(config, tmp_path / "run", data=data)
    assert ckpt_lib.resolve_step_dir(tmp_path / "run").name == "2"
    assert ckpt_lib.read_meta(tmp_path / "run")["data_state"] == {"i": 2}
    data.broken = False  # the file was fixed
    resumed = []
    train_toy(config, tmp_path / "run", data=data, history=resumed)
    full = []
    train_toy(config, tmp_path / "full", data=ListData(batches), history=full)
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[2:]]


# ----------------------------------------------------------------------------------------------
# The real input pipeline.


def test_training_images_come_at_train_image_size_when_it_is_set(tmp_path):
    """data.train_image_size sizes the training batches (images and masks); 0 = image_size."""
    from zsad_jax.data import synthetic

    categories = synthetic.SYNTHETIC_TRAIN_CATEGORIES[:1]
    root = synthetic.generate(str(tmp_path / "synthetic"), image_size=32, n_train_good=0,
                              n_test_good=2, n_test_defect=2, categories=categories)  # fmt: skip
    config = loop_config()
    d = config.data
    d.train_set, d.train_root, d.train_split, d.categories = "synthetic", root, "test", categories
    d.image_size, d.train_transform, d.batch_size = 16, "plain", 2
    for train_size, side in ((0, 16), (24, 24)):
        d.train_image_size = train_size
        batch = next(iter(train_lib.make_train_data(config)))
        assert batch["image"].shape[1:] == (side, side, 3), train_size
        assert batch["gt_mask"].shape[1:] == (side, side), train_size


def test_exact_resume_through_the_grain_pipeline_on_synthetic_data(tmp_path):
    """config.data -> protocol reader -> grain pipeline: the iterator state in the checkpoint makes
    a stopped and resumed run (across an epoch boundary) bitwise equal to an uninterrupted one."""
    from zsad_jax.data import synthetic

    categories = synthetic.SYNTHETIC_TRAIN_CATEGORIES[:2]
    root = synthetic.generate(
        str(tmp_path / "synthetic"),
        image_size=32,
        n_train_good=0,
        n_test_good=3,
        n_test_defect=3,
        categories=categories,
    )
    config = loop_config()
    config.data.train_set, config.data.train_root, config.data.train_split = (
        "synthetic",
        root,
        "test",
    )
    config.data.categories = categories
    config.data.image_size, config.data.train_transform = 16, "plain"
    config.data.batch_size = 8  # 12 images: 1 step per epoch, so 3 steps cross two epochs
    config.optim.steps = 3

    def run_pipeline(workdir, **kw):
        model = ToyModel(config, rngs=nnx.Rngs(config.seed))
        history = []
        train_lib.train(
            config, workdir, model=model, evaluator=None, progress=False, history=history, **kw
        )
        return model, history

    model, full = run_pipeline(tmp_path / "full")
    assert model.class_names == tuple(categories)  # set_classes got the training categories
    run_pipeline(tmp_path / "resumed", stop_at_step=2)
    meta = ckpt_lib.read_meta(tmp_path / "resumed")
    assert meta["step"] == 2 and meta["data_state"]  # grain's iterator state, as JSON
    _, rest = run_pipeline(tmp_path / "resumed")
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]
    for item in ("params", "opt_state"):
        jax.tree.map(
            np.testing.assert_array_equal,
            saved(tmp_path / "resumed", item),
            saved(tmp_path / "full", item),
        )
