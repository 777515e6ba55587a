"""A model as flat ``{dotted path: array}`` dicts, and the PRNG keys inside them as plain data.

``SplitModel`` splits a method into what a jitted function takes as arguments: ``params`` (the
``Trainable`` weights), ``mutable`` (RNG streams, batch statistics) and ``frozen`` (the rest: the
backbone, cached text), each a flat dict keyed by the variables' dotted paths (the names
checkpoints and learning-rate groups use), plus the structure to merge them back. Training,
inference and export all go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from zsad_jax.nn import Trainable

# Variables a training step updates besides the trained weights: dropout/noise RNG streams and
# running statistics. Everything else (backbone weights, Buffers such as cached text embeddings) is
# constant during training.
MUTABLE = (nnx.RngState, nnx.BatchStat)


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_arrays(state: nnx.State) -> dict[str, Any]:
    """``{dotted path: array}`` of an ``nnx.State``."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array."""
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def keys_to_data(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Typed PRNG keys -> uint32 key data (orbax and ``np.savez`` store plain arrays) and their
    impl names."""
    impls = {k: str(jax.random.key_impl(v)) for k, v in tree.items() if is_key(v)}
    return {k: jax.random.key_data(v) if k in impls else v for k, v in tree.items()}, impls


def data_to_keys(tree: Mapping[str, Any], impls: Mapping[str, str]) -> dict[str, Any]:
    """The inverse of ``keys_to_data``."""
    return {
        k: jax.random.wrap_key_data(v, impl=impls[k]) if k in impls else v for k, v in tree.items()
    }


class SplitModel:
    """A model as three flat ``{dotted path: array}`` dicts: ``params`` (``Trainable``),
    ``mutable`` (RNG streams, batch statistics) and ``frozen`` (the rest), plus the structure to
    merge them back.

    Only abstract shapes are kept here, so the arrays live once: in the dicts the loop passes.
    """

    def __init__(self, model: nnx.Module):
        self.graphdef, *states = nnx.split(model, Trainable, MUTABLE, ...)
        self._templates = [
            [
                (p, v.replace(jax.ShapeDtypeStruct(np.shape(v.get_value()), v.get_value().dtype)))
                for p, v in nnx.to_flat_state(s)
            ]
            for s in states
        ]
        self._initial = [flat_arrays(s) for s in states]

    def take_arrays(self) -> tuple[dict, dict, dict]:
        """``(params, mutable, frozen)`` of the model it was built from (handed over once)."""
        arrays, self._initial = self._initial, None
        if arrays is None:
            raise RuntimeError("SplitModel.take_arrays() was already called")
        return tuple(arrays)

    @staticmethod
    def _state(template, arrays):
        return nnx.from_flat_state([(p, v.replace(arrays[path_str(p)])) for p, v in template])

    def merge(self, params: Mapping, mutable: Mapping, frozen: Mapping) -> nnx.Module:
        return nnx.merge(
            self.graphdef,
            *(
                self._state(t, a)
                for t, a in zip(self._templates, (params, mutable, frozen), strict=True)
            ),
        )

    @staticmethod
    def mutable_of(model: nnx.Module) -> dict[str, Any]:
        return flat_arrays(nnx.state(model, MUTABLE))
