"""The toy methods, configs and data the tests share (tests/ is on the path: ``import toys``).

``ToyDetector`` is the placeholder that evaluation, prediction and pods run on, with an independent
NumPy forward (``toy_numpy_forward``); ``ToyModel`` is the training loop's toy (a frozen backbone,
a Buffer, a trained head with dropout). Configs name them as ``toys:ToyDetector``, so a command
started by a test needs tests/ on its PYTHONPATH, and a checkpoint of them needs
``--allow_custom_code``.

This file is also a config file for those commands (``get_config``):
``--config=tests/toys.py`` is the loop toy, ``tests/toys.py:train:BENCH`` the placeholder trained
2 steps then evaluated on BENCH, ``tests/toys.py:slow:BENCH`` the slow placeholder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from configs.common import base_config
from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import train as train_lib
from zsad_jax.data import synthetic
from zsad_jax.encoders.checkpoint import read_meta
from zsad_jax.methods.base import AnomalyModel
from zsad_jax.nn import Buffer, Trainable, resolve_compute_dtype, trainable

IMAGE_SIZE = 16
CATEGORIES = ("wood", "pill")
REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` typed in ``cwd`` (the repository importable, on the CPU), as
    a user runs a command; its exit code and output."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The placeholder detector (evaluate, predict, pods).


class ToyDetector(AnomalyModel):
    """Per-pixel ``sigmoid(x . weight + bias)`` on the normalised image; score = map mean + max.

    ``weight`` and ``bias`` are Trainable (what a checkpoint restores); ``offset`` is frozen.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        del load_weights
        self.weight = Trainable(jnp.asarray(config.model.weight, jnp.float32))
        self.bias = Trainable(jnp.zeros((), jnp.float32))
        self.offset = nnx.Param(jnp.asarray(config.model.offset, jnp.float32))
        self.noise = Trainable(0.01 * jax.random.normal(rngs.params(), (3,)))
        self.class_names: tuple[str, ...] = ()  # a tuple: the graphdef stays hashable

    def set_classes(self, names):
        self.class_names = tuple(names)

    def build_memory(self, images):
        """Few-shot stand-in: the mean colour (3,) of k reference images."""
        return jnp.mean(images, axis=(0, 1, 2))

    def __call__(self, batch, *, train=False, memory=None):
        x = batch["image"]
        logits = x @ (self.weight[...] + self.noise[...]) + self.bias[...] + self.offset[...]
        if memory is not None:
            logits = logits - jnp.sum(memory)
        amap = jax.nn.sigmoid(logits)
        score = 0.5 * (amap.mean(axis=(1, 2)) + amap.max(axis=(1, 2)))
        return {"anomaly_map": amap, "pred_score": score, "logits": logits}

    def loss(self, outputs, batch):
        pixel = jnp.mean((outputs["anomaly_map"] - batch["gt_mask"]) ** 2)
        return pixel, {"pixel": pixel}


class SlowToyDetector(ToyDetector):
    """The placeholder, ``config.model.sleep_s`` slower per forward pass (on the host, so that a
    process can be killed while evaluation is under way); its outputs are ToyDetector's."""

    def __init__(self, config, *, rngs, load_weights: bool = True):
        super().__init__(config, rngs=rngs, load_weights=load_weights)
        self.sleep_s = float(config.model.sleep_s)

    def __call__(self, batch, *, train=False, memory=None):
        if self.sleep_s:
            jax.debug.callback(lambda: time.sleep(self.sleep_s))
        return super().__call__(batch, train=train, memory=memory)


def toy_bench(folder: str) -> str:
    """The placeholder's test data: ``CATEGORIES`` of the synthetic benchmark at 48 px, 9 test
    images each (4 normal, 5 with masks) and 2 normal train images, written into ``folder``."""
    return synthetic.generate(
        folder, image_size=48, n_train_good=2, n_test_good=4, n_test_defect=5,
        categories=CATEGORIES,
    )  # fmt: skip


def toy_numpy_forward(
    model: ToyDetector, image: np.ndarray, references: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """The placeholder's map and score in NumPy float64 (the independent forward)."""
    w = np.asarray(model.weight[...], np.float64) + np.asarray(model.noise[...], np.float64)
    logits = image.astype(np.float64) @ w + float(model.bias[...]) + float(model.offset[...])
    if references is not None:
        logits -= references.astype(np.float64).mean(axis=(0, 1, 2)).sum()
    amap = 1.0 / (1.0 + np.exp(-logits))
    return amap, 0.5 * (amap.mean() + amap.max())


def toy_config(root: str | None = None) -> ml_collections.ConfigDict:
    c = base_config("toys:ToyDetector")
    # Weights that make dark pixels anomalous: the synthetic defects include holes and stains.
    c.model.weight = (-2.0, -1.5, -1.0)
    c.model.offset = -0.5
    c.model.random_init = True
    c.data.test_set = "mvtec_ad"  # the synthetic benchmark is written in the MVTec-AD layout
    c.data.test_root = root or ""
    c.data.test_categories = CATEGORIES
    c.data.transform = "plain"
    c.data.image_size = IMAGE_SIZE
    c.eval.batch_size = 8
    c.eval.num_vis = 2
    return c


def toy_train_data(config):
    """``config.data.train_set`` for training the placeholder (``toys:toy_train_data``)."""
    r = np.random.default_rng(0)
    n, s = 16, int(config.data.image_size)
    mask = (r.random((n, s, s)) > 0.8).astype(np.float32)
    image = (r.normal(size=(n, s, s, 3)) - mask[..., None]).astype(np.float32)
    return train_lib.InMemoryTrainData(
        {
            "image": image,
            "gt_mask": mask,
            "gt_label": (mask.max(axis=(1, 2)) > 0).astype(np.int32),
            "has_mask": np.ones(n, bool),
            "class_id": np.zeros(n, np.int32),
        },
        global_batch=int(config.data.batch_size),
        seed=int(config.seed),
        class_names=["toy"],
    )


def trained_toy_config(root: str | None = None) -> ml_collections.ConfigDict:
    """The placeholder trained for 2 steps (lr 0.1, batch 8) on ``toy_train_data``."""
    config = toy_config(root)
    config.model.random_init = False
    config.data.train_set = "toys:toy_train_data"
    config.data.batch_size = 8
    config.optim.steps = 2
    config.optim.lr = 0.1
    config.ckpt.every_steps = 0
    return config


def detector_command_config(kind: str, bench: str) -> ml_collections.ConfigDict:
    """``train``: the placeholder trained 2 steps, then evaluated on ``bench`` (final held-out
    evaluation); ``slow``: the random-init slow placeholder for evaluation."""
    if kind == "train":
        return trained_toy_config(bench)
    if kind != "slow":
        raise ValueError(f"get_config: unknown kind {kind!r} (loop, train, slow)")
    config = toy_config(bench)
    config.method = "toys:SlowToyDetector"
    config.model.sleep_s = 0.0
    return config


# ----------------------------------------------------------------------------------------------
# The training loop's toy, its config and data.


class ToyModel(AnomalyModel):
    """Per-pixel logits ``scale * head(dropout(tanh(backbone(x) * gain)))``, x (B, H, W, 3)."""

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        m = config.model
        if load_weights and m.get("backbone_checkpoint"):
            # Stands in for a method's converted-weight loader: a missing path fails here.
            read_meta(m.backbone_checkpoint)
        # Weights stay float32, matmuls run in the resolved compute dtype.
        dtype = jnp.dtype(resolve_compute_dtype(config.compute_dtype))
        self.backbone = nnx.Linear(3, m.width, dtype=dtype, rngs=rngs)
        self.gain = Buffer(jnp.full((m.width,), 1.5))
        self.head = trainable(nnx.Linear(m.width, 1, dtype=dtype, rngs=rngs))
        self.scale = Trainable(jnp.ones(()))
        # An RngBitGenerator stream (compiles much faster than threefry on CPU); its key type
        # must survive the checkpoint as well.
        dropout_key = jax.random.key(int(config.seed), impl="unsafe_rbg")
        self.dropout = nnx.Dropout(m.dropout, rngs=nnx.Rngs(dropout=dropout_key))
        self.class_names: tuple[str, ...] = ()  # a tuple: the graphdef stays hashable

    def set_classes(self, names):
        self.class_names = tuple(names)

    def __call__(self, batch, *, train=False):
        f = jnp.tanh(self.backbone(batch["image"]) * self.gain[...])
        f = self.dropout(f, deterministic=not train)
        logits = self.head(f)[..., 0].astype(jnp.float32) * self.scale[...]
        amap = jax.nn.sigmoid(logits)
        return {"anomaly_map": amap, "pred_score": amap.max(axis=(1, 2)), "logits": logits}

    def loss(self, outputs, batch):
        pixel = optax.sigmoid_binary_cross_entropy(outputs["logits"], batch["gt_mask"]).mean()
        label = batch["gt_label"].astype(jnp.float32)
        image = optax.sigmoid_binary_cross_entropy(
            outputs["logits"].mean(axis=(1, 2)), label
        ).mean()
        return pixel + image, {"pixel": pixel, "image": image}


def loop_config() -> ml_collections.ConfigDict:
    """The loop toy (method and data are importable callables)."""
    c = base_config("toys:ToyModel")
    c.model.width = 8
    c.model.dropout = 0.0
    c.model.backbone_checkpoint = ""
    c.data.train_set = "toys:loop_train_data"
    c.data.toy_sleep_s = 0.0  # host-side delay per batch, so a test can signal a run mid-way
    c.data.batch_size = 16
    c.optim.lr = 1e-2
    c.optim.steps = 4
    c.ckpt.every_steps = 0
    c.ckpt.keep = 3
    c.log_every_steps = 1
    c.eval.enabled = False  # the toy has no held-out dataset
    return c


def loop_arrays(n: int = 64, seed: int = 0, size: int = 4) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    mask = (r.random((n, size, size)) > 0.7).astype(np.float32)
    image = (r.normal(size=(n, size, size, 3)) + 1.5 * mask[..., None]).astype(np.float32)
    return {
        "image": image,
        "gt_mask": mask,
        "gt_label": (mask.max(axis=(1, 2)) > 0).astype(np.int32),
        "has_mask": np.ones(n, bool),
        "class_id": np.zeros(n, np.int32),
    }


def loop_data(config, seed: int = 0, **kw) -> train_lib.InMemoryTrainData:
    return train_lib.InMemoryTrainData(
        loop_arrays(seed=seed),
        global_batch=config.data.batch_size,
        seed=config.seed,
        class_names=["toy"],
        **kw,
    )


class _SlowData(train_lib.InMemoryTrainData):
    def __init__(self, *args, sleep_s: float, **kw):
        super().__init__(*args, **kw)
        self.sleep_s = sleep_s

    def __next__(self):
        time.sleep(self.sleep_s)
        return super().__next__()


def loop_train_data(config) -> train_lib.InMemoryTrainData:
    """``config.data.train_set`` of the loop config: this process's rows of the toy arrays."""
    return _SlowData(
        loop_arrays(),
        global_batch=config.data.batch_size,
        seed=config.seed,
        class_names=["toy"],
        sleep_s=float(config.data.toy_sleep_s),
    )


def train_toy(config, workdir, data=None, **kw):
    """``train.train`` on the loop toy (no evaluator, no bar unless given)."""
    model = ToyModel(config, rngs=nnx.Rngs(config.seed))
    kw.setdefault("evaluator", None)
    kw.setdefault("progress", False)
    return train_lib.train(config, workdir, model=model, train_data=data or loop_data(config), **kw)


def saved(workdir, item="params", step=None) -> dict:
    """One item of a saved step as NumPy arrays (whatever devices or processes wrote it)."""
    path = ckpt_lib.resolve_step_dir(workdir, step) / item
    with ocp.StandardCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        return c.restore(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


# ----------------------------------------------------------------------------------------------
# This file as a config file.


def get_config(arg: str = "loop") -> ml_collections.ConfigDict:
    """``loop`` (the default), ``train:BENCH`` or ``slow:BENCH`` (module docstring)."""
    kind, _, bench = arg.partition(":")
    if kind == "loop":
        return loop_config()
    return detector_command_config(kind, bench)


# ----------------------------------------------------------------------------------------------
# A built method split once, its forward and training loss jitted (the method tests' setups).


def jitted_method(model):
    """``(graphdef, params, rest, forward, loss_and_grad)`` of a built method: its Trainable state
    and the rest (``nnx.split`` once); ``forward(params, rest, batch, **kw)`` is ``model(batch,
    **kw)``, ``loss_and_grad(params, rest, batch)`` gives ``((loss, (parts, outputs)), grads)`` of
    the training forward; both jitted with the graphdef static."""
    graphdef, params, rest = nnx.split(model, Trainable, ...)

    @jax.jit
    def forward(params, rest, batch, **kwargs):
        return nnx.merge(graphdef, params, rest)(batch, **kwargs)

    @jax.jit
    def loss_and_grad(params, rest, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            out = m(batch, train=True)
            loss, parts = m.loss(out, batch)
            return loss, (parts, out)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return graphdef, params, rest, forward, loss_and_grad


def cell_batch(rng, n: int, size: int, *, cell: int, normal: int, class_id) -> dict:
    """``n`` normal-distributed images whose anomalous regions are whole ``cell`` x ``cell`` patch
    cells (~30 % of them; none in the first ``normal`` images), so patch-level targets have no
    0.5 ties; ``class_id`` per image."""
    images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    cells = rng.random((n, size // cell, size // cell)) < 0.3
    cells[:normal] = False
    masks = np.kron(cells, np.ones((cell, cell))).astype(np.float32)
    return {
        "image": jnp.asarray(images),
        "gt_mask": jnp.asarray(masks),
        "gt_label": jnp.asarray(cells.reshape(n, -1).any(-1).astype(np.int32)),
        "has_mask": jnp.ones((n,), bool),
        "class_id": jnp.asarray(class_id, jnp.int32),
    }
