"""ACD-CLIP's trainable heads: low-rank adapters, their blend into the frozen residual stream
(methods.md §3.3-3.5) and the Dynamic Fusion Gateway (§3.6).

Official code: cockmake/ACD-CLIP @2026067 ``model/adapter_modules.py`` (``ConvLoraBlock``,
``ConvLoraAdapter``, ``TextLoraAdapter``) and ``model/adapter.py`` (``AddWeight``, the norm matching
in ``ACDCLIP.forward`` / ``encode_text``, ``ACDCLIP.vision_text_fusion_gate_seg``). Written from the
description there, channels-last.

* ``ConvLoraAdapter`` (vision): per kernel size k (3 and 5), tokens (B, h*w, C) -> ``@ A`` (C, r)
  -> grid (B, h, w, r) -> k x k conv r -> conv_r -> k x k conv conv_r -> r, times
  ``conv_alpha / conv_r`` -> tokens -> ``@ B`` (r, C_out), times ``alpha / sqrt(r)``; the branches
  are concatenated on channels and fused by a 1 x 1 conv without bias. No activation anywhere.
* ``TextLoraAdapter``: ``x @ A @ B * alpha / sqrt(r)`` on every token.
* ``norm_match(adapted, tokens)``: rescales each adapted token to the norm of its input token
  (no epsilon, as the official code).
* ``AdaptiveBlend`` (``AddWeight``): ``(1 - w) * tokens + w * adapted`` with a learnt
  per-channel ``w`` (init 0.2 in training).

Initialisation follows PyTorch exactly, including one quirk: the LoRA ``A`` matrices are raw
``(c_in, r)`` Parameters passed to ``nn.init.kaiming_uniform_``, which takes ``fan_in = size(1) =
r``, so ``A ~ U(+-sqrt(6 / r))`` (not ``sqrt(6 / c_in)``). ``B ~ N(0, 0.02)`` (not zero), the k x k
convs ``kaiming_uniform_(a=0)`` (``U(+-sqrt(6 / (in * k * k)))``), the 1 x 1 fusion conv torch's
default ``U(+-1 / sqrt(in))``.

``DynamicFusionGateway``: for vision group g, the mean over patches of its (normalised)
segmentation tokens goes through ``Linear(E -> hidden) -> GELU (exact) -> Linear(hidden -> 2 N)``;
the 2 N outputs are read as (N, 2) (output ``2 j + c`` = group j, state c) and softmax-ed over the
N groups, separately for the normal (c = 0) and abnormal (c = 1) columns. The fused text of group
g is then ``sum_j gate[j, c] * T_j[:, c]`` (not re-normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zsad_jax.nn import TORCH_DEFAULT_KERNEL_INIT, torch_linear, uniform_init

_HERE = "zsad_jax/methods/acd_heads.py"


def lora_a_init(rank: int):
    """torch ``kaiming_uniform_`` on a raw (c_in, rank) tensor: fan_in = rank, U(+-sqrt(6/rank))."""
    return uniform_init((6.0 / rank) ** 0.5)


# kaiming_uniform_(a=0) on a conv weight: bound sqrt(6 / fan_in), fan_in = in * k * k (the JAX
# kernel (k, k, in, out) gives the same fan_in).
KAIMING_UNIFORM = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")


def norm_match(adapted: jax.Array, tokens: jax.Array) -> jax.Array:
    """``adapted * |tokens| / |adapted|`` per token (last axis), float32, no epsilon."""
    adapted = adapted.astype(jnp.float32)
    tokens = tokens.astype(jnp.float32)
    return (
        adapted
        * jnp.linalg.norm(tokens, axis=-1, keepdims=True)
        / jnp.linalg.norm(adapted, axis=-1, keepdims=True)
    )


class AdaptiveBlend(nnx.Module):
    """``AddWeight``: ``(1 - weight) * tokens + weight * adapted``, ``weight`` (width,) learnt."""

    def __init__(self, width: int, init: float):
        self.weight = nnx.Param(jnp.full((width,), init, jnp.float32))

    def __call__(self, tokens: jax.Array, adapted: jax.Array) -> jax.Array:
        """tokens, adapted (..., width) -> (..., width) float32."""
        w = self.weight[...]
        return (1.0 - w) * tokens.astype(jnp.float32) + w * adapted.astype(jnp.float32)


class TextLoraAdapter(nnx.Module):
    """``x @ lora_a @ lora_b * alpha / sqrt(rank)`` on every token (no activation)."""

    def __init__(self, c_in: int, c_out: int, *, rank: int = 16, alpha: float = 2.0, rngs):
        self.scale = alpha / rank**0.5
        self.lora_a = nnx.Param(lora_a_init(rank)(rngs.params(), (c_in, rank)))
        self.lora_b = nnx.Param(0.02 * jax.random.normal(rngs.params(), (rank, c_out)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., c_in) -> (..., c_out) float32."""
        x = x.astype(jnp.float32)
        return (x @ self.lora_a[...]) @ self.lora_b[...] * self.scale


class ConvLoraBlock(nnx.Module):
    """One kernel-size branch: LoRA down, k x k conv down, k x k conv up, LoRA up."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        kernel_size: int,
        rank: int = 16,
        alpha: float = 2.0,
        conv_rank: int = 8,
        conv_alpha: float = 2.0,
        rngs: nnx.Rngs,
    ):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"{_HERE}: conv kernel sizes must be positive odd ints (official 3 and 5), got "
                f"{kernel_size}"
            )
        self.lora_scale = alpha / rank**0.5
        self.conv_scale = conv_alpha / conv_rank
        self.lora_a = nnx.Param(lora_a_init(rank)(rngs.params(), (c_in, rank)))

        def conv(d_in, d_out):
            # padding k // 2 with stride 1 keeps the grid size, as torch's padding=k//2.
            pad = kernel_size // 2
            return nnx.Conv(
                d_in,
                d_out,
                (kernel_size, kernel_size),
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                kernel_init=KAIMING_UNIFORM,
                rngs=rngs,
            )

        self.conv_a = conv(rank, conv_rank)
        self.conv_b = conv(conv_rank, rank)
        self.lora_b = nnx.Param(0.02 * jax.random.normal(rngs.params(), (rank, c_out)))

    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """tokens (B, h*w, c_in), row-major patches -> (B, h*w, c_out) float32."""
        b, n, _ = tokens.shape
        down = tokens.astype(jnp.float32) @ self.lora_a[...]
        down = down.reshape(b, grid[0], grid[1], -1)
        up = self.conv_b(self.conv_a(down)) * self.conv_scale
        return up.reshape(b, n, -1) @ self.lora_b[...] * self.lora_scale


class ConvLoraAdapter(nnx.Module):
    """Parallel ``ConvLoraBlock`` per kernel size, concatenated and fused by a 1 x 1 conv."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        kernel_sizes: Sequence[int] = (3, 5),
        rank: int = 16,
        alpha: float = 2.0,
        conv_rank: int = 8,
        conv_alpha: float = 2.0,
        rngs: nnx.Rngs,
    ):
        self.blocks = nnx.List(
            [
                ConvLoraBlock(
                    c_in,
                    c_out,
                    kernel_size=int(k),
                    rank=rank,
                    alpha=alpha,
                    conv_rank=conv_rank,
                    conv_alpha=conv_alpha,
                    rngs=rngs,
                )
                for k in kernel_sizes
            ]
        )
        self.fusion_conv = nnx.Linear(  # a 1 x 1 conv is a per-token linear map
            len(kernel_sizes) * c_out,
            c_out,
            use_bias=False,
            kernel_init=TORCH_DEFAULT_KERNEL_INIT,
            rngs=rngs,
        )

    def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """tokens (B, h*w, c_in) -> (B, h*w, c_out) float32; ``grid`` = (h, w)."""
        if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"{_HERE}: ConvLoraAdapter needs patch tokens (B, h*w, C) with h*w = "
                f"{grid[0]}*{grid[1]}, got {tuple(tokens.shape)}"
            )
        branches = [block(tokens, grid) for block in self.blocks]
        return self.fusion_conv(jnp.concatenate(branches, axis=-1))


class DynamicFusionGateway(nnx.Module):
    """Per-image weights over the N text groups, for one vision group."""

    def __init__(self, width: int, n_groups: int, *, hidden: int = 256, rngs: nnx.Rngs):
        self.n_groups = n_groups
        self.fc1 = torch_linear(width, hidden, rngs=rngs)
        self.fc2 = torch_linear(hidden, 2 * n_groups, rngs=rngs)

    def weights(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, P, E) -> gate (B, N, 2) float32, each column summing to 1 over N."""
        pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
        logits = self.fc2(jax.nn.gelu(self.fc1(pooled), approximate=False))
        logits = logits.reshape(logits.shape[0], self.n_groups, 2)
        return jax.nn.softmax(logits, axis=1)

    def __call__(self, tokens: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens (B, P, E), text (N, B, E, 2) per-group state embeddings -> (fused text (B, E, 2),
        gate (B, N, 2))."""
        gate = self.weights(tokens)
        fused = jnp.einsum("nbec,bnc->bec", text.astype(jnp.float32), gate)
        return fused, gate
