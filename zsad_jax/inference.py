"""Batched, sharded inference of a method, and loading a trained model to run it.

``evaluate``, ``predict``, training's periodic evaluations and the benchmarks all score images
through ``BatchedInference``: Flax's ``nnx.split`` / ``nnx.merge`` pattern under one ``jax.jit``,
the graph definition a static argument (hashable, ``tests/test_graphdefs.py``), so models of one
structure share one compiled forward through jax's own cache.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import methods
from zsad_jax import sharding as shard_lib

# Fields of a batch the forward pass receives (labels and masks stay on the host).
MODEL_INPUTS = ("image", "class_id")


def _place(x: Any, sharding) -> Any:
    """An array on ``sharding``; arrays already there (the training loop's state) are not copied."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
        return jax.device_put(x, sharding)  # within one process, or a global array resharded
    # A value every process holds (e.g. weights each read from the checkpoint onto its own first
    # device): each device takes its part of the host copy; device_put would be a cross-host
    # transfer there.
    return shard_lib.put_state(x, sharding)


@functools.partial(jax.jit, static_argnames=("out_sharding",))
def _forward(graphdef, state, kwargs, batch, *, out_sharding):
    outputs = nnx.merge(graphdef, state)(batch, train=False, **kwargs)
    outputs = {
        "anomaly_map": outputs["anomaly_map"].astype(np.float32),
        "pred_score": outputs["pred_score"].astype(np.float32),
    }
    # Rows stay split over the devices as the batch came in (``local_rows`` reads them so).
    return jax.lax.with_sharding_constraint(outputs, out_sharding)


class BatchedInference:
    """``model(batch, train=False)`` jitted over its state, batches split over the mesh.

    Args:
      model: an ``AnomalyModel`` (its arrays are used in place; the model stays usable).
      mesh: the device mesh (default: ``config.mesh``-style mesh over all devices).
      model_kwargs: extra keyword arrays for the call (e.g. AF-CLIP+'s ``memory``), replicated.

    Calling it with a host batch (dict of NumPy arrays whose leading size is a multiple of the
    device count) returns host NumPy ``anomaly_map`` (B, H, W) and ``pred_score`` (B,) float32.
    """

    def __init__(
        self,
        model: nnx.Module,
        mesh=None,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        self.mesh = shard_lib.make_mesh() if mesh is None else mesh
        self._graphdef, state = nnx.split(model)
        self._state = self._placed(state)
        self._kwargs = self._placed(dict(model_kwargs or {}))
        self._batch_sharding = shard_lib.batch_sharding(self.mesh)

    def _placed(self, tree: Any) -> Any:
        return jax.tree.map(
            lambda x: _place(x, shard_lib.state_sharding(self.mesh, np.shape(x))), tree
        )

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def __call__(
        self,
        batch: Mapping[str, np.ndarray],
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        local: bool = False,
    ) -> dict[str, np.ndarray]:
        """Host batch (this process's rows) -> host outputs of the global batch on every process,
        or with ``local`` only this process's rows (no collective: prediction writes each image's
        outputs where it was read). ``model_kwargs`` replace the constructor's for this call."""
        return self.fetch(self.dispatch(batch, model_kwargs), local=local)

    def dispatch(
        self, batch: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, jax.Array]:
        """Sends a host batch and starts its forward; returns the device outputs at once."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        device_batch = shard_lib.global_batch_from_local(inputs, self.mesh)
        kwargs = self._kwargs if model_kwargs is None else self._placed(dict(model_kwargs))
        with jax.set_mesh(self.mesh):
            return _forward(
                self._graphdef, self._state, kwargs, device_batch,
                out_sharding=self._batch_sharding,
            )  # fmt: skip

    @staticmethod
    def fetch(outputs: Mapping[str, jax.Array], *, local: bool = False) -> dict[str, np.ndarray]:
        """Device outputs of ``dispatch`` -> host arrays (waits for them)."""
        return shard_lib.local_rows(outputs) if local else _to_host(outputs)

    def stream(
        self,
        batches: Iterable[Mapping[str, np.ndarray]],
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        local: bool = False,
        ahead: int = 1,
    ) -> Iterator[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]]:
        """``(batch, outputs)`` for each host batch, in order, with the next ``ahead`` batches read,
        sent and started before a batch's outputs are waited for: the host's decoding and the
        transfers overlap the devices' work. Fields other than ``MODEL_INPUTS`` stay on the host
        and come back with their batch; an error reading a batch comes after the outputs of
        every batch before it."""
        pending: collections.deque = collections.deque()

        def oldest():
            done, outputs = pending.popleft()
            return done, self.fetch(outputs, local=local)

        iterator = iter(batches)
        while True:
            # Only the read is guarded: an exception thrown in at a yield is not a read error.
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except BaseException:
                while pending:
                    yield oldest()
                raise
            pending.append((batch, self.dispatch(batch, model_kwargs)))
            if len(pending) > ahead:
                yield oldest()
        while pending:
            yield oldest()


def _to_host(tree: Any) -> Any:
    """Global arrays -> full NumPy copies on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """The evaluation batch rounded up to a multiple of the device count (padding is masked)."""
    return max(num_devices, -(-int(batch_size) // num_devices) * num_devices)


# ----------------------------------------------------------------------------------------------
# The model to run.


def has_random_init(config: Any) -> bool:
    """Whether ``config`` builds without trained or converted weights (tests, smoke runs)."""
    model = config.get("model") or {}
    backbone = model.get("backbone") if hasattr(model, "get") else None
    if backbone is not None and bool(backbone.get("random_init", False)):
        return True
    return bool(model.get("random_init", False)) if hasattr(model, "get") else False


def load_model(
    checkpoint: str | None,
    config: Any = None,
    *,
    step: int | None = None,
    allow_custom_code: bool = False,
) -> tuple[nnx.Module, Any, float | None, dict[str, Any]]:
    """``(model, config, threshold, info)`` from a checkpoint, or a random-init config.

    ``config`` replaces the checkpoint's stored one (the command line passes the stored one with
    its ``--config.KEY=VALUE`` overrides); a config naming code to import is refused unless
    ``allow_custom_code`` (``zsad_jax.checkpoint.load_for_inference``). ``info`` has
    ``checkpoint`` (absolute step folder or None) and ``step``.
    """
    if checkpoint:
        step_dir = ckpt_lib.resolve_step_dir(checkpoint, step)
        model, config, threshold = ckpt_lib.load_for_inference(
            step_dir, config=config, allow_custom_code=allow_custom_code
        )
        return model, config, threshold, {"checkpoint": str(step_dir), "step": int(step_dir.name)}
    if config is None:
        raise ValueError("pass --checkpoint=DIR (a training workdir or checkpoint folder)")
    if not has_random_init(config):
        raise ValueError(
            "--checkpoint is required: the config's backbone is not random_init, so the trained "
            "heads must come from a training run (--checkpoint=WORKDIR of python -m "
            "zsad_jax.train)"
        )
    info = {"checkpoint": None, "step": None}
    return methods.build(config, load_weights=True), config, None, info
