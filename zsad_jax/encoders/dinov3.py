"""DINOv3 ViT image encoder (Meta's DINOv3, as in transformers' ``DINOv3ViTModel``), Flax NNX.

Architecture (methods.md §6): a 16x16 patch-embedding convolution, a CLS token and R register
tokens in front of the patch tokens (no absolute position embedding), pre-norm blocks
``x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))`` with 2-D rotary position embedding (RoPE)
applied to the query and key of patch tokens only, and a final LayerNorm ``norm``.

Token order is ``[CLS, register_1..R, patch_(0,0), patch_(0,1), ...]`` (patches row-major).

Weights are float32 ``nnx.Param``; ``DinoV3Config.dtype`` sets the compute dtype of the matrix
products. The residual stream, the LayerNorms and RoPE stay in float32 because DINOv3's residual
stream carries a few very large activations that lower precision would distort.

Build from a converted checkpoint with ``zsad_jax.encoders.checkpoint.load(path)`` (see
``python -m convert.dinov3``), or with random weights:
``DinoV3(presets.dinov3_vitl16(), rngs=nnx.Rngs(0))`` (``zsad_jax.encoders.presets``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax.encoders.attention import dot_product_attention
from zsad_jax.nn import check_dtype

ACTIVATIONS = ("gelu", "silu")


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
    """Architecture of a DINOv3 ViT.

    Attributes:
      hidden_size: token width D.
      num_layers: number of transformer blocks.
      num_heads: attention heads; ``hidden_size / num_heads`` must be a multiple of 4 (RoPE splits
        each head into y and x halves, each a cos/sin pair).
      mlp_dim: hidden width of the MLP (per branch for the gated MLP).
      patch_size: side of the square patches (the input height and width must be multiples of it).
      num_channels: input image channels.
      num_register_tokens: register ("storage") tokens after CLS.
      layer_norm_eps: epsilon of every LayerNorm (1e-5 for all released DINOv3 ViTs).
      rope_theta: RoPE base period (100 for all released DINOv3 ViTs).
      use_gated_mlp: SwiGLU-style MLP ``down(act(gate(x)) * up(x))`` (the "plus" and 7B models).
      act: MLP activation, "gelu" (exact, erf) or "silu".
      dtype: compute dtype of the matrix products (a name of ``zsad_jax.nn.DTYPES``).
    """

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 16
    num_channels: int = 3
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    use_gated_mlp: bool = False
    act: str = "gelu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"DinoV3Config: hidden_size {self.hidden_size} / num_heads {self.num_heads} must "
                "be a whole head width divisible by 4 (RoPE needs y and x cos/sin pairs)"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"DinoV3Config.act: {self.act!r} is not one of {ACTIVATIONS}")
        check_dtype("DinoV3Config.dtype", self.dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DinoV3Config:
        """Inverse of ``to_dict``; unknown fields raise (a checkpoint from another encoder type)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"DinoV3Config: unknown field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**values)


def rope_tables(grid_h: int, grid_w: int, head_dim: int, theta: float) -> tuple[np.ndarray, ...]:
    """RoPE cosines and sines for a ``grid_h x grid_w`` patch grid.

    Patch centres are normalised separately per axis to [-1, 1]; the first half of each head's
    angle vector holds the ``head_dim / 4`` y frequencies then the ``head_dim / 4`` x
    frequencies, and the second half repeats the first (the rotate-half convention).
    Computed in float64 with NumPy at trace time (shapes are static), returned as float32.

    Returns:
      (cos, sin), each (grid_h * grid_w, head_dim) float32.
    """
    inv_freq = 1.0 / theta ** (np.arange(head_dim // 4, dtype=np.float64) * 4.0 / head_dim)
    centre_y = 2.0 * (np.arange(grid_h, dtype=np.float64) + 0.5) / grid_h - 1.0
    centre_x = 2.0 * (np.arange(grid_w, dtype=np.float64) + 0.5) / grid_w - 1.0
    coords = np.stack(np.meshgrid(centre_y, centre_x, indexing="ij"), axis=-1).reshape(-1, 2)
    angles = 2.0 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # (N, 2, hd/4)
    angles = np.tile(angles.reshape(len(coords), head_dim // 2), (1, 2))  # (N, hd)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the last ``N`` tokens of ``x`` (the patches); the prefix tokens pass unchanged.

    Args:
      x: (B, T, heads, head_dim) queries or keys, T = prefix + N.
      cos, sin: (N, head_dim) from :func:`rope_tables`.

    Returns:
      (B, T, heads, head_dim) in ``x.dtype``; the rotation itself runs in float32.
    """
    num_prefix = x.shape[1] - cos.shape[0]
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:].astype(jnp.float32)
    first, second = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    patches = patches * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE on patch tokens; no key bias (it is masked to zero in
    the original fused ``qkv`` and would not cancel under RoPE)."""

    def __init__(self, config: DinoV3Config, *, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, jnp.dtype(config.dtype)
        self.num_heads = config.num_heads
        self.q_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, use_bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        heads = (b, t, self.num_heads, d // self.num_heads)
        q = apply_rope(self.q_proj(x).reshape(heads), *rope)
        k = apply_rope(self.k_proj(x).reshape(heads), *rope)
        v = self.v_proj(x).reshape(heads)
        return self.o_proj(dot_product_attention(q, k, v).reshape(b, t, d))


class Mlp(nnx.Module):
    """``down(act(up(x)))``, or with ``use_gated_mlp`` ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: DinoV3Config, *, rngs: nnx.Rngs):
        d, h, dtype = config.hidden_size, config.mlp_dim, jnp.dtype(config.dtype)
        self.act = config.act
        self.gate_proj = nnx.Linear(d, h, dtype=dtype, rngs=rngs) if config.use_gated_mlp else None
        self.up_proj = nnx.Linear(d, h, dtype=dtype, rngs=rngs)
        self.down_proj = nnx.Linear(h, d, dtype=dtype, rngs=rngs)

    def _activation(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(x) if self.act == "silu" else jax.nn.gelu(x, approximate=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, D)."""
        if self.gate_proj is None:
            return self.down_proj(self._activation(self.up_proj(x)))
        return self.down_proj(self._activation(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale ``gamma`` (D,), trained from 1e-5."""

    def __init__(self, dim: int, *, init_value: float = 1e-5):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


def _layer_norm(config: DinoV3Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance: E[x^2] - E[x]^2 loses precision on DINOv3's high-norm tokens.
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class Block(nnx.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, config: DinoV3Config, *, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.layer_scale1 = LayerScale(config.hidden_size)
        self.norm2 = _layer_norm(config, rngs)
        self.mlp = Mlp(config, rngs=rngs)
        self.layer_scale2 = LayerScale(config.hidden_size)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """(B, T, D) float32 residual stream -> (B, T, D) float32."""
        x = x + self.layer_scale1(self.attn(self.norm1(x), rope)).astype(jnp.float32)
        return x + self.layer_scale2(self.mlp(self.norm2(x))).astype(jnp.float32)


class DinoV3(nnx.Module):
    """DINOv3 ViT encoder.

    Call: ``tokens, aux = model(images, layers=(6, 12, 18, 24))`` with ``images`` (B, H, W, C),
    H and W multiples of ``patch_size`` (any aspect ratio); ``tokens`` (B, 1 + R + N, D) float32
    after the final ``norm``; ``aux["layers"][i]`` (B, 1 + R + N, D) float32 the residual stream
    after 1-indexed block ``i``, *before* the final norm (apply ``model.norm`` yourself, as
    AVA-DINO does). ``N = (H / patch) * (W / patch)`` patches, row-major.
    """

    def __init__(self, config: DinoV3Config, *, rngs: nnx.Rngs):
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nnx.Conv(
            config.num_channels,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=jnp.dtype(config.dtype),
            rngs=rngs,
        )
        token_init = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, d), jnp.float32))
        self.register_tokens = (
            nnx.Param(token_init(rngs.params(), (1, config.num_register_tokens, d), jnp.float32))
            if config.num_register_tokens
            else None
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = _layer_norm(config, rngs)

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens in front of the patch tokens."""
        return 1 + self.config.num_register_tokens

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches for an input of ``height x width`` pixels."""
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(
                f"DinoV3: input {height}x{width} is not a multiple of the patch size {p}; "
                f"resize or crop images to multiples of {p} (e.g. 512x512 for AVA-DINO)"
            )
        return height // p, width // p

    def __call__(
        self, images: jax.Array, *, layers: Iterable[int] = ()
    ) -> tuple[jax.Array, dict[str, dict[int, jax.Array]]]:
        """Encodes images into tokens.

        Args:
          images: (B, H, W, C) NHWC, H and W multiples of ``patch_size``.
          layers: 1-indexed block numbers whose (un-normed) outputs to return.

        Returns:
          tokens (B, 1 + R + N, D) float32 after the final norm, and
          ``{"layers": {i: (B, 1 + R + N, D) float32}}``.
        """
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"DinoV3: images must be (B, H, W, {cfg.num_channels}) NHWC, got {images.shape}"
            )
        wanted = sorted(set(int(i) for i in layers))
        if wanted and not 1 <= wanted[0] <= wanted[-1] <= cfg.num_layers:
            raise ValueError(
                f"DinoV3: layers {wanted} must be 1-indexed block numbers in 1..{cfg.num_layers}"
            )
        b, height, width, _ = images.shape
        grid_h, grid_w = self.patch_grid(height, width)

        patches = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
        patches = patches.reshape(b, grid_h * grid_w, cfg.hidden_size).astype(jnp.float32)
        prefix = [self.cls_token[...]]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens[...])
        prefix = jnp.broadcast_to(
            jnp.concatenate(prefix, axis=1), (b, self.num_prefix_tokens, cfg.hidden_size)
        )
        x = jnp.concatenate([prefix, patches], axis=1)

        rope = tuple(
            jnp.asarray(t) for t in rope_tables(grid_h, grid_w, cfg.head_dim, cfg.rope_theta)
        )
        taps = {}
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, rope)
            if index in wanted:
                taps[index] = x
        return self.norm(x), {"layers": taps}


def build(config: dict[str, Any], rngs: nnx.Rngs, **overrides: Any) -> DinoV3:
    """Checkpoint builder: ``overrides`` may only set ``dtype`` (the compute dtype)."""
    unknown = sorted(set(overrides) - {"dtype"})
    if unknown:
        raise ValueError(
            f"dinov3 checkpoint: overrides {unknown} are not allowed; only 'dtype' changes no "
            "weight shape"
        )
    return DinoV3(DinoV3Config.from_dict({**config, **overrides}), rngs=rngs)
