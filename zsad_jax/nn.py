"""Variable types, compute dtypes, PyTorch's default initialisers and small helpers shared by every
module.

Backbone weights are plain ``nnx.Param``; every weight a method trains is a ``Trainable`` (a
subclass of ``nnx.Param``), so ``nnx.split(model, Trainable, ...)`` separates the few megabytes that
the optimiser and the checkpoint see from the frozen backbone, which is held once and never
differentiated.

``config.compute_dtype`` is resolved here and only here (``resolve_compute_dtype``), when a model
is built: the stored config keeps ``"auto"``, so a checkpoint trained on TPU evaluates in float32
on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

# The dtypes the encoders' and heads' matrix products can run in (weights are always float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# What ``config.compute_dtype`` may say: a dtype, or "auto" = bfloat16 on an accelerator (where its
# matrix units are several times faster), float32 on CPU (where bfloat16 is emulated and slower).
COMPUTE_DTYPES = (*DTYPES, "auto")
# ``jax.default_backend()`` names of the platforms "auto" runs in bfloat16.
BFLOAT16_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")

# torch's default Conv2d / Linear weight init, kaiming_uniform_(a=sqrt(5)) on an (out, in) weight:
# U(+-1 / sqrt(fan_in)). The JAX kernel (in, out) or (k, k, in, out) has the same fan_in.
TORCH_DEFAULT_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Trainable(nnx.Param):
    """A weight that the optimiser updates (adapters, prompts, heads)."""


class Buffer(nnx.Variable):
    """A non-trained array in the model state (cached text embeddings, memory banks)."""


def trainable(module: M) -> M:
    """Returns ``module`` with every ``nnx.Param`` retyped as ``Trainable``.

    Use it on freshly built heads: ``self.adaptor = trainable(Adaptor(..., rngs=rngs))``.
    """
    return nnx.map(lambda _, v: Trainable(v[...]) if type(v) is nnx.Param else v, module)


# ----------------------------------------------------------------------------------------------
# Compute dtypes


def dtype_error(field: str, value: Any, choices: Sequence[str]) -> ValueError:
    """The one message for a bad dtype field (the same words as ``zsad_jax.config_check``)."""
    return ValueError(f"{field}={value!r}: must be one of {', '.join(choices)}")


def check_dtype(field: str, value: Any) -> None:
    """Refuses an encoder config's ``dtype`` that is not a name of ``DTYPES`` ("auto" is resolved
    before an encoder is built, by ``resolve_compute_dtype``)."""
    if not isinstance(value, str) or value not in DTYPES:
        raise dtype_error(field, value, tuple(DTYPES))


def resolve_compute_dtype(
    value: Any, platform: str | None = None, *, field: str = "config.compute_dtype"
) -> str:
    """``config.compute_dtype`` -> "float32" or "bfloat16".

    "auto" is bfloat16 on GPU and TPU, float32 elsewhere; ``platform`` defaults to
    ``jax.default_backend()`` (pass it to decide for another machine). Anything not in
    ``COMPUTE_DTYPES`` raises the one dtype message, naming ``field`` and the choices.
    """
    if not isinstance(value, str) or value not in COMPUTE_DTYPES:
        raise dtype_error(field, value, COMPUTE_DTYPES)
    if value != "auto":
        return value
    platform = jax.default_backend() if platform is None else platform
    return "bfloat16" if platform in BFLOAT16_PLATFORMS else "float32"


# ----------------------------------------------------------------------------------------------
# PyTorch's default initialisers


def uniform_init(bound: float):
    """An initializer drawing U(-bound, bound), as torch's ``nn.init.uniform_(-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(
    d_in: int,
    d_out: int,
    *,
    use_bias: bool = True,
    dtype: Any = None,
    precision: Any = None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nn.Linear(d_in, d_out, bias=use_bias)`` with PyTorch's default init: weight and bias
    U(+-1/sqrt(d_in)); ``dtype`` / ``precision`` are ``nnx.Linear``'s (computation only).

    The bias bound ``d_in**-0.5`` can differ from ``1 / math.sqrt(d_in)`` in the last float64 bit,
    but never after the rounding to float32 that ``jax.random.uniform`` applies to its bounds (every
    d_in < 2**21 checked), so either spelling draws the same bits.
    """
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=dtype,
        precision=precision,
        kernel_init=TORCH_DEFAULT_KERNEL_INIT,
        bias_init=uniform_init(d_in**-0.5),
        rngs=rngs,
    )


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``torch.nn.functional.normalize`` (eps 1e-12 on the norm), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
