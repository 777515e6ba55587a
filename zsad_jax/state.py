"""A model's variables as flat ``{dotted path: array}`` dicts, and PRNG keys as plain data.

Jitted code takes a model as Flax's ``nnx.split``/``nnx.merge`` pair (``zsad_jax.inference``);
dotted paths are the names only two boundaries use: training checkpoints and the optimiser's
learning-rate and clipping groups (``zsad_jax.optim``). ``TrainSplit`` is the train step's adapter
to them: the trained weights and mutable variables as flat dicts, the frozen rest as a State.
"""

from __future__ import annotations

import dataclasses
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


class FlatKeys:
    """One ``nnx.State`` as a flat ``{dotted path: array}`` dict (``flat_arrays``) and back.

    Only abstract shapes are kept, so the arrays live once: in the dicts the loop passes.
    """

    def __init__(self, state: nnx.State):
        self._template = [
            (p, v.replace(jax.ShapeDtypeStruct(np.shape(v.get_value()), v.get_value().dtype)))
            for p, v in nnx.to_flat_state(state)
        ]

    def state(self, arrays: Mapping[str, Any]) -> nnx.State:
        return nnx.from_flat_state([(p, v.replace(arrays[path_str(p)])) for p, v in self._template])


@dataclasses.dataclass(frozen=True)
class TrainSplit:
    """How the train step merges a method back: its graph definition and the flat-dict views of
    its ``Trainable`` weights (``params``) and ``MUTABLE`` variables (``mutable``)."""

    graphdef: nnx.GraphDef
    params: FlatKeys
    mutable: FlatKeys

    def merge(self, params: Mapping, mutable: Mapping, frozen: nnx.State) -> nnx.Module:
        return nnx.merge(
            self.graphdef, self.params.state(params), self.mutable.state(mutable), frozen
        )


def split_for_training(model: nnx.Module) -> tuple[TrainSplit, dict, dict, nnx.State]:
    """``(split, params, mutable, frozen)``: the flat dicts checkpoints and the optimiser key by
    path, and the frozen rest (backbone, cached text) as an ``nnx.State``."""
    graphdef, params, mutable, frozen = nnx.split(model, Trainable, MUTABLE, ...)
    split = TrainSplit(graphdef, FlatKeys(params), FlatKeys(mutable))
    return split, flat_arrays(params), flat_arrays(mutable), frozen


def mutable_arrays(model: nnx.Module) -> dict[str, Any]:
    """The model's ``MUTABLE`` variables as a flat dict (what the train step carries)."""
    return flat_arrays(nnx.state(model, MUTABLE))
