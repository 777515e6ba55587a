"""Variable types and small helpers shared by every module.

Backbone weights are plain ``nnx.Param``; every weight a method trains is a ``Trainable`` (a
subclass of ``nnx.Param``), so ``nnx.split(model, Trainable, ...)`` separates the few megabytes that
the optimiser and the checkpoint see from the frozen backbone, which is held once and never
differentiated.
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

M = TypeVar("M", bound=nnx.Module)


class Trainable(nnx.Param):
    """A weight that the optimiser updates (adapters, prompts, heads)."""


class Buffer(nnx.Variable):
    """A non-trained array in the model state (cached text embeddings, memory banks)."""


def trainable(module: M) -> M:
    """Returns ``module`` with every ``nnx.Param`` retyped as ``Trainable``.

    Use it on freshly built heads: ``self.adaptor = trainable(Adaptor(..., rngs=rngs))``.
    """
    return nnx.map(lambda _, v: Trainable(v[...]) if type(v) is nnx.Param else v, module)
