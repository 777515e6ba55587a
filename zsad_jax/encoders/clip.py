"""CLIP vision and text towers (OpenAI / open_clip layout) in Flax NNX.

Module and variable names follow the OpenAI PyTorch keys (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``blocks.{i}.attn.in_proj``, ``mlp.c_fc``, ``ln_post``,
``proj``, ``token_embedding``, ``ln_final``, ``text_projection``), so a conversion is a rename plus
transposes (``convert/clip.py``). Weights are float32; ``dtype`` selects the compute dtype of the
matrix products (float32 or bfloat16). The residual stream, LayerNorms and softmax stay float32
whatever ``dtype`` is: OpenAI CLIP's residual stream carries a few channels with very large values
that bfloat16 would distort.

Images are NHWC ``(B, H, W, 3)``, already normalised with CLIP's mean/std. Any ``H, W`` divisible by
the patch size works: the positional grid learnt at ``image_size`` is resized on every call (a small
constant-shaped computation under ``jit``; nothing mutable is cached) with ``pos_resize``:

* ``"bilinear"``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without
  antialiasing (OpenAI ``clip`` code as patched by AF-CLIP / AnomalyCLIP);
* ``"bicubic_antialias"``: open_clip's ``resize_pos_embed`` (``mode="bicubic", antialias=True,
  align_corners=False``; cubic coefficient a = -0.5, PIL-style support), used by ACD-CLIP.

Both are separable linear maps, so each is one pair of small interpolation matrices built in NumPy.

``act`` is ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, what OpenAI weights were trained with and
what AF-CLIP runs) or ``"gelu"`` (exact erf GELU, what ACD-CLIP and AVA-DINO end up running,
methods.md §0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax.encoders.attention import dot_product_attention
from zsad_jax.layers.resize import bilinear_matrix
from zsad_jax.nn import DTYPES, check_dtype

ACTIVATIONS = ("quick_gelu", "gelu")
POS_RESIZE_MODES = ("bilinear", "bicubic_antialias")
# Fields a loader may change without touching any weight shape (see ``ClipConfig.with_overrides``).
OVERRIDABLE = ("act", "pos_resize", "dtype")


# ----------------------------------------------------------------------------------------------
# Configs


def _check_choice(where: str, field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{where}.{field}={value!r} is not supported; use one of {list(choices)}")


def _from_dict(cls, where: str, d: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """The vision tower. ``image_size // patch_size`` is the trained positional grid side."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    output_dim: int = 768
    mlp_dim: int = 4096
    ln_eps: float = 1e-5
    act: str = "quick_gelu"
    pos_resize: str = "bilinear"
    dtype: str = "float32"

    def __post_init__(self):
        _check_choice("ClipVisionConfig", "act", self.act, ACTIVATIONS)
        _check_choice("ClipVisionConfig", "pos_resize", self.pos_resize, POS_RESIZE_MODES)
        check_dtype("ClipVisionConfig.dtype", self.dtype)
        if self.width % self.heads:
            raise ValueError(f"ClipVisionConfig.width={self.width} must be a multiple of heads")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ClipVisionConfig.image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipVisionConfig:
        return _from_dict(cls, "ClipVisionConfig", d)


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """The text tower (causal transformer over ``context_length`` BPE ids)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    output_dim: int = 768
    mlp_dim: int = 3072
    ln_eps: float = 1e-5
    act: str = "quick_gelu"
    dtype: str = "float32"

    def __post_init__(self):
        _check_choice("ClipTextConfig", "act", self.act, ACTIVATIONS)
        check_dtype("ClipTextConfig.dtype", self.dtype)
        if self.width % self.heads:
            raise ValueError(f"ClipTextConfig.width={self.width} must be a multiple of heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipTextConfig:
        return _from_dict(cls, "ClipTextConfig", d)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """Both towers; ``logit_scale`` says whether the model holds CLIP's learnt temperature."""

    vision: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
    logit_scale: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "logit_scale": self.logit_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipConfig:
        unknown = sorted(set(d) - {"vision", "text", "logit_scale"})
        if unknown:
            raise ValueError(
                f"ClipConfig: unknown field(s) {unknown}; known: ['logit_scale', 'text', 'vision']"
            )
        return cls(
            vision=ClipVisionConfig.from_dict(d.get("vision", {})),
            text=ClipTextConfig.from_dict(d.get("text", {})),
            logit_scale=bool(d.get("logit_scale", True)),
        )

    def with_overrides(self, **overrides: Any) -> ClipConfig:
        """Changes fields that no weight shape depends on: ``act`` and ``dtype`` (both towers) and
        ``pos_resize`` (vision). ``None`` values are ignored."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(
                f"CLIP overrides {unknown} are not supported at load time (they would change "
                f"weight shapes or are unknown); allowed: {list(OVERRIDABLE)}"
            )
        vision = {k: v for k, v in overrides.items() if k in ("act", "pos_resize", "dtype")}
        text = {k: v for k, v in overrides.items() if k in ("act", "dtype")}
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, **vision),
            text=dataclasses.replace(self.text, **text),
        )


# ----------------------------------------------------------------------------------------------
# Positional-grid resizing (exact torch F.interpolate equivalents as interpolation matrices)


# Bilinear weights come from ``zsad_jax.layers.resize`` (torch's grid, the one resize_bilinear
# applies). The bicubic ones below are computed in float32 the way ATen's CPU kernels compute them
# (same promotions, and fused multiply-adds where x86 builds of torch contract them), so they
# equal torch's weights bit for bit; the float64-exact weights differ by a few float32 ulps, which
# is up to ~1e-5 on the resized embeddings.
_F32 = np.float32


def _fma(a, b, c) -> np.float32:
    """float32 fused multiply-add (exact product and sum in float64, rounded once)."""
    return _F32(float(a) * float(b) + float(c))


def _keys_cubic(x: np.float32) -> np.float32:
    """Keys' cubic convolution kernel (a = -0.5 as PIL and torch's antialiased bicubic)."""
    a = _F32(-0.5)
    x = abs(x)
    if x < 1.0:
        return _fma(_fma(a + _F32(2.0), x, -(a + _F32(3.0))) * x, x, _F32(1.0))
    if x < 2.0:
        t = _fma(_fma(a, x, -(_F32(5.0) * a)), x, _F32(8.0) * a)
        return _fma(t, x, -(_F32(4.0) * a))
    return _F32(0.0)


def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's 1-D ``bicubic`` resize with ``antialias=True``,
    ``align_corners=False``: PIL's filter (Keys cubic, a = -0.5) whose support widens by the
    down-scaling factor, truncated to the input and renormalised to sum 1."""
    scale = _F32(in_size) / _F32(out_size)
    support = _F32(2.0) * scale if scale >= 1.0 else _F32(2.0)
    inv_scale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)
    weights = np.zeros((out_size, in_size), np.float32)
    for o in range(out_size):
        center = _F32(float(scale) * (o + 0.5))
        lo = max(int(float(center) - float(support) + 0.5), 0)
        hi = min(int(float(center) + float(support) + 0.5), in_size)
        taps = [
            _keys_cubic(_F32((float(_F32(j) - center) + 0.5) * float(inv_scale)))
            for j in range(lo, hi)
        ]
        total = _F32(0.0)
        for w in taps:
            total = _F32(total + w)
        weights[o, lo:hi] = [w / total if total != 0.0 else w for w in taps]
    return weights


@functools.lru_cache(maxsize=64)
def _resize_matrices(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str):
    _check_choice("ClipVisionConfig", "pos_resize", mode, POS_RESIZE_MODES)
    make = bilinear_matrix if mode == "bilinear" else bicubic_antialias_matrix
    return make(in_hw[0], out_hw[0]), make(in_hw[1], out_hw[1])


def resize_grid(grid: jax.Array, out_hw: tuple[int, int], mode: str) -> jax.Array:
    """Resizes a (h, w, D) grid of embeddings to (out_h, out_w, D) like torch ``F.interpolate``
    on the NCHW view of it (``mode`` in ``POS_RESIZE_MODES``)."""
    h, w, _ = grid.shape
    if (h, w) == tuple(out_hw):
        return grid
    rows, cols = _resize_matrices((h, w), tuple(out_hw), mode)
    return jnp.einsum(
        "oh,hwd,pw->opd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST
    ).astype(grid.dtype)


# ----------------------------------------------------------------------------------------------
# Transformer pieces shared by both towers


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    return functools.partial(jax.nn.gelu, approximate=False)


# Backward memory through frozen blocks. Autodiff of LayerNorm keeps three (B, T, D) arrays per
# call (x - mean, its square, the normalised x) and of exact GELU three (B, T, 4D) arrays (the
# product, erfc and exp terms): 2 x 3 x 11 + 3 x 45 MB per ViT-L block at 518 px, batch 2, ~half
# of ACD-CLIP's train-step temporaries. Each keeps only its input instead (as torch does) and runs
# its few elementwise ops again in the backward pass: the same operations, so the same values;
# without differentiation the custom VJP is inlined (inference runs the same program).


def _recomputed_in_backward(fn):
    """``fn(*args)`` whose backward pass keeps only ``args`` and recomputes ``fn`` for its VJP
    (``jax.checkpoint``'s rule; a custom VJP leaves ``checkpoint`` in a jaxpr to the methods'
    per-block ``model.remat``)."""
    run = jax.custom_vjp(fn)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        # The barrier stops XLA from merging the recomputation with the forward's ops (CSE),
        # which would keep the forward's intermediates alive again.
        args = jax.lax.optimization_barrier(args)
        return jax.vjp(fn, *args)[1](cotangent)

    run.defvjp(forward, backward)
    return run


def _keeping_input_only(module: nnx.Module, x: jax.Array) -> jax.Array:
    """``module(x)`` whose backward pass keeps ``x`` (and the module's arrays) only."""
    graphdef, state = nnx.split(module)  # pure arrays in: the caller may be inside jax.grad
    return _recomputed_in_backward(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 and a two-pass variance like torch: CLIP's residual stream has a few channels with
    # very large values, where E[x^2] - E[x]^2 loses digits.
    return nnx.LayerNorm(width, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def _linear(d_in: int, d_out: int, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=dtype, kernel_init=nnx.initializers.normal(std), rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fused q/k/v projection (torch ``nn.MultiheadAttention``'s
    ``in_proj_weight`` transposed: kernel (D, 3D), columns [q | k | v], heads contiguous)."""

    def __init__(self, width: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.in_proj = _linear(width, 3 * width, width**-0.5, dtype, rngs)
        self.out_proj = _linear(width, width, width**-0.5, dtype, rngs)

    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, return_attn: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> (B, T, D) [, probs (B, heads, T, T) float32]. ``mask``: bool, True =
        attend, broadcastable to (B, heads, T, T)."""
        b, t, d = x.shape
        qkv = self.in_proj(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, mask=mask, return_probs=return_attn)
        if return_attn:
            out, probs = out
            return self.out_proj(out.reshape(b, t, d)), probs
        return self.out_proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
    """``c_fc`` -> activation -> ``c_proj``."""

    def __init__(self, width: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = act
        self.c_fc = _linear(width, hidden, (2 * width) ** -0.5, dtype, rngs)
        self.c_proj = _linear(hidden, width, hidden**-0.5, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(_recomputed_in_backward(_activation(self.act))(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Works for any sequence length, so methods may append or replace tokens between blocks.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, *, dtype, rngs):
        self.ln_1 = _layer_norm(width, eps, rngs)
        self.attn = SelfAttention(width, heads, dtype=dtype, rngs=rngs)
        self.ln_2 = _layer_norm(width, eps, rngs)
        self.mlp = Mlp(width, mlp_dim, act, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, return_attn: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x (B, T, D) float32 -> (B, T, D) float32 [, attention probs (B, heads, T, T)]."""
        attn = self.attn(_keeping_input_only(self.ln_1, x), mask=mask, return_attn=return_attn)
        if return_attn:
            attn, probs = attn
        x = x + attn
        x = x + self.mlp(_keeping_input_only(self.ln_2, x))
        return (x, probs) if return_attn else x


def _check_layers(where: str, layers: Sequence[int], depth: int) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise ValueError(
            f"{where}: layers {bad} out of range; block outputs are numbered 1..{depth}"
        )
    return layers


def _blocks(config, rngs: nnx.Rngs) -> nnx.List:
    dtype = DTYPES[config.dtype]
    return nnx.List(
        [
            ResidualAttentionBlock(
                config.width,
                config.heads,
                config.mlp_dim,
                config.act,
                config.ln_eps,
                dtype=dtype,
                rngs=rngs,
            )
            for _ in range(config.layers)
        ]
    )


# ----------------------------------------------------------------------------------------------
# Vision tower


class ClipVision(nnx.Module):
    """CLIP ViT image tower.

    ``embed`` -> ``blocks[i]`` (residual stream) -> ``head``; ``__call__`` runs them all and can
    return requested block outputs and one block's attention map.
    """

    def __init__(self, config: ClipVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, p = config.width, config.patch_size
        dtype = DTYPES[config.dtype]
        scale = d**-0.5
        self.conv1 = nnx.Conv(
            3,
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            kernel_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (d,)))
        self.positional_embedding = nnx.Param(
            scale * jax.random.normal(rngs.params(), (config.grid**2 + 1, d))
        )
        self.ln_pre = _layer_norm(d, config.ln_eps, rngs)
        self.blocks = _blocks(config, rngs)
        self.ln_post = _layer_norm(d, config.ln_eps, rngs)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (d, config.output_dim)))

    def positional_grid(self, grid_hw: tuple[int, int]) -> jax.Array:
        """(1 + gh*gw, D): the CLS row and the trained grid resized to ``grid_hw``."""
        pos = self.positional_embedding[...]
        g = self.config.grid
        patches = resize_grid(pos[1:].reshape(g, g, -1), grid_hw, self.config.pos_resize)
        return jnp.concatenate([pos[:1], patches.reshape(-1, pos.shape[-1])], axis=0)

    def embed(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) -> tokens (B, 1 + (H/p)(W/p), D): patch embedding, CLS token,
        positional embedding (resized if H, W differ from ``image_size``), ``ln_pre``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"ClipVision.embed: images must be NHWC (B, H, W, 3), got shape {images.shape}"
            )
        p = self.config.patch_size
        b, h, w, _ = images.shape
        if h % p or w % p:
            raise ValueError(
                f"ClipVision.embed: image size {h}x{w} is not divisible by the patch size {p}; "
                "resize or crop the images to a multiple of it"
            )
        x = self.conv1(images.astype(DTYPES[self.config.dtype]))
        x = x.reshape(b, (h // p) * (w // p), -1).astype(jnp.float32)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_grid((h // p, w // p))
        return self.ln_pre(x)

    def head(self, tokens: jax.Array) -> jax.Array:
        """tokens (..., D) -> ``ln_post(tokens) @ proj`` (..., output_dim) float32."""
        return self.ln_post(tokens.astype(jnp.float32)) @ self.proj[...]

    def __call__(
        self,
        images: jax.Array,
        *,
        layers: Sequence[int] = (),
        attn_layer: int | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """images (B, H, W, 3) -> (image_embedding (B, output_dim) float32, aux).

        aux["layers"][i]: residual stream (B, 1+N, D) after block i (1-indexed, before ``ln_post``)
        for each i in ``layers``; aux["attn"]: softmax probabilities (B, heads, 1+N, 1+N) of block
        ``attn_layer`` (1-indexed), present only if requested.
        """
        depth = len(self.blocks)
        layers = _check_layers("ClipVision", layers, depth)
        if attn_layer is not None:
            _check_layers("ClipVision attn_layer", (attn_layer,), depth)
        x = self.embed(images)
        out_layers, aux = {}, {}
        for i, block in enumerate(self.blocks, start=1):
            if i == attn_layer:
                x, aux["attn"] = block(x, return_attn=True)
            else:
                x = block(x)
            if i in layers:
                out_layers[i] = x
        aux["layers"] = out_layers
        return self.head(x[:, 0]), aux


# ----------------------------------------------------------------------------------------------
# Text tower


def causal_mask(length: int) -> jax.Array:
    """(T, T) bool, True where attention is allowed (a token sees itself and earlier tokens)."""
    return jnp.tril(jnp.ones((length, length), bool))


def _per_batch(x: jax.Array, batch: int, where: str, width: int) -> jax.Array:
    """(n, D) or (B, n, D) -> (B, n, D)."""
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != width or x.shape[0] not in (1, batch):
        raise ValueError(
            f"ClipText: {where} must be (n, {width}) or ({batch}, n, {width}), got {x.shape}"
        )
    return jnp.broadcast_to(x, (batch, *x.shape[1:]))


class ClipText(nnx.Module):
    """CLIP causal text tower with EOT pooling (the EOT token has the largest id).

    Two ways to add learnt prompts:

    * ``context`` (AF-CLIP, methods.md §1.4): ``n_ctx`` vectors placed *before* SOS,
      ``concat([context, token_embedding(ids)])[:, :T]``; the pooled token moves to
      ``n_ctx + argmax(ids)``.
    * ``deep_prompts`` (AnomalyCLIP's "compound prompts", ``AnomalyCLIP_lib/AnomalyCLIP.py``
      ``ResidualAttentionBlock_learnable_token``): a sequence whose j-th entry (n, D) or (B, n, D)
      replaces the tokens at positions ``[1 : 1+n]`` just before block ``j + 2`` (1-indexed), i.e.
      blocks 2 .. len(deep_prompts)+1 each see fresh prompt vectors instead of what the previous
      block made of the old ones. AnomalyCLIP's depth 9 = 8 deep prompts. Its layer-0 prompts
      (learnt vectors at positions 1..n of the *input*) are an input-embedding edit: build
      ``token_embedding(ids)``, replace those rows, and call ``encode``.
    """

    def __init__(self, config: ClipTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.width
        self.token_embedding = nnx.Embed(
            config.vocab_size,
            d,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.positional_embedding = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (config.context_length, d))
        )
        self.blocks = _blocks(config, rngs)
        self.ln_final = _layer_norm(d, config.ln_eps, rngs)
        self.text_projection = nnx.Param(
            d**-0.5 * jax.random.normal(rngs.params(), (d, config.output_dim))
        )

    def _check_ids(self, ids: jax.Array) -> None:
        if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
            raise ValueError(
                f"ClipText: ids must be (B, T) with T <= {self.config.context_length}, got "
                f"{ids.shape}; tokenise with the CLIP tokenizer (context length "
                f"{self.config.context_length})"
            )

    def token_embeddings(
        self, ids: jax.Array, *, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """ids (B, T) int -> (token embeddings (B, T, D) without positions, eot_index (B,))."""
        self._check_ids(ids)
        x = self.token_embedding(ids)
        eot = jnp.argmax(ids, axis=-1)
        if context is not None:
            ctx = _per_batch(context.astype(x.dtype), ids.shape[0], "context", x.shape[-1])
            x = jnp.concatenate([ctx, x], axis=1)[:, : ids.shape[1]]
            eot = eot + ctx.shape[1]
        return x, eot

    def embed(
        self, ids: jax.Array, *, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """ids (B, T) -> (tokens (B, T, D) with positional embedding, eot_index (B,))."""
        x, eot = self.token_embeddings(ids, context=context)
        return self.add_positions(x), eot

    def add_positions(self, x: jax.Array) -> jax.Array:
        """(B, T, D) token embeddings -> + positional_embedding[:T]."""
        return x.astype(jnp.float32) + self.positional_embedding[: x.shape[1]]

    def pool_and_project(self, tokens: jax.Array, eot_index: jax.Array) -> jax.Array:
        """tokens (B, T, D) after the last block, eot_index (B,) -> ``ln_final(tokens[eot]) @
        text_projection`` (B, output_dim) float32, not normalised."""
        pooled = jnp.take_along_axis(tokens, eot_index[:, None, None], axis=1)[:, 0]
        return self.ln_final(pooled.astype(jnp.float32)) @ self.text_projection[...]

    def encode(
        self,
        token_embeddings: jax.Array,
        eot_index: jax.Array,
        *,
        deep_prompts: Sequence[jax.Array] | None = None,
        layers: Sequence[int] = (),
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Runs the tower from token embeddings (B, T, D) (positions are added here); same
        outputs as ``__call__``."""
        depth = len(self.blocks)
        layers = _check_layers("ClipText", layers, depth)
        deep_prompts = list(deep_prompts or ())
        if len(deep_prompts) > depth - 1:
            raise ValueError(
                f"ClipText: {len(deep_prompts)} deep prompts given, at most {depth - 1} (blocks "
                f"2..{depth})"
            )
        x = self.add_positions(token_embeddings)
        b, t, d = x.shape
        mask = causal_mask(t)
        out_layers = {}
        for i, block in enumerate(self.blocks, start=1):
            if 2 <= i <= len(deep_prompts) + 1:
                prompt = _per_batch(deep_prompts[i - 2].astype(x.dtype), b, "deep_prompts", d)
                x = jnp.concatenate([x[:, :1], prompt, x[:, 1 + prompt.shape[1] :]], axis=1)
            x = block(x, mask=mask)
            if i in layers:
                out_layers[i] = x
        return self.pool_and_project(x, eot_index), {"layers": out_layers}

    def __call__(
        self,
        ids: jax.Array,
        *,
        context: jax.Array | None = None,
        deep_prompts: Sequence[jax.Array] | None = None,
        layers: Sequence[int] = (),
    ) -> tuple[jax.Array, dict[str, Any]]:
        """ids (B, T) int -> (text_embedding (B, output_dim) float32, not normalised,
        aux {"layers": {i: tokens (B, T, D) after block i (1-indexed)}})."""
        x, eot = self.token_embeddings(ids, context=context)
        return self.encode(x, eot, deep_prompts=deep_prompts, layers=layers)


# ----------------------------------------------------------------------------------------------
# Both towers


class Clip(nnx.Module):
    """``vision`` and ``text`` towers plus (optionally) CLIP's log temperature ``logit_scale``."""

    def __init__(self, config: ClipConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = ClipVision(config.vision, rngs=rngs)
        self.text = ClipText(config.text, rngs=rngs)
        self.logit_scale = (
            nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32)) if config.logit_scale else None
        )


def build(config: Mapping[str, Any], rngs: nnx.Rngs, **overrides: Any) -> Clip:
    """The ``zsad_jax.encoders.checkpoint.BUILDERS`` entry: ``overrides`` may set ``act``,
    ``pos_resize``, ``dtype``."""
    return Clip(ClipConfig.from_dict(config).with_overrides(**overrides), rngs=rngs)
