"""DLVP-CLIP (CVPR 2026): dynamic local visual prompts + wavelet high/low frequency decomposition.

No official code exists. This implements the paper (methods.md §4, papers/DLVP-CLIP.txt); the paper
follows AnomalyCLIP's training *protocol*, not its method (it argues against AnomalyCLIP's static
prompts), so AnomalyCLIP (zqhang/AnomalyCLIP) only fills gaps the paper leaves, each as a field of
``config.model`` documented in ``configs/dlvp_clip.py`` (its mechanisms the paper never mentions,
such as DPAM, are off there by default).

Forward for images (B, H, W, 3) on a frozen CLIP ViT with an (h, w) patch grid, N = h*w:

1. **Prompt source** (no parameters), on a plain CLIP pass. SLFS (``use_slfs``): block
   ``slfs_attn_layer``'s attention, its CLS row over the patches (heads averaged) picks the top-K
   patches T; ``P = V[T]`` (B, K, D) with V the patch tokens after block ``slfs_feature_layer``
   (through the frozen ``ln_post`` when ``slfs_ln_post``). Without SLFS but with MLoP the source
   is the pass's global token (last block, same ``ln_post`` rule) in each of the M prompt slots
   (the paper's "Global token" comparison): no attention, no top-K. Neither: no plain pass.
2. **Prompts**: ``P' = visual_prompt_proj(P)`` (B, M, D), M = ``local_prompts``; with K != M a
   learnt ``Linear(K, M)`` over the token axis maps P to M tokens first. P' is appended to the
   token sequence of the prompted CLIP pass. Blocks 1 .. J+1 get P' afresh at their input (the
   outputs of blocks 1..J at those positions are discarded); from block J+2 on the prompt tokens
   evolve with the sequence. With MLoP the text deep prompts of blocks 2 .. depth are
   ``F_theta(P') + E_j`` (per image), else the static ``E_j``, in AnomalyCLIP's object-agnostic
   prompts ("X x n_ctx object." / "X x n_ctx damaged object."), replacing positions 1..M (the
   paper's "appended": after the sentence they would be hidden from EOT by the causal mask).
   The prompted pass runs AnomalyCLIP's DPAM (V-V attention, dual path) on its last
   ``dpam_layers - 1`` blocks only when asked (``dpam_layers > 1``).
3. **HFD** on each tapped layer's patch grid: ``F~ = F_v(F)``; Haar DWT; ``low`` on LL, ``high`` on
   each of LH, HL, HH; inverse DWT; ``F + F^D``. ``hfd_kind="sobel"``: ``F^D = low(F~) +
   high(|Sobel(F~)|)``. ``hfd_init="zero"`` starts ``low`` and ``high`` at zero (``F^D = 0``).
4. Maps: per layer l, ``softmax(<f_l, t_s> / T)`` over s in (normal, abnormal), bilinearly
   upsampled; ``M = mean_l (M^a_l + 1 - M^n_l) / 2`` (Gaussian-smoothed at test time). Image
   score: ``X = X_p + X_c`` (``X_p`` = linear compression of the per-layer GAP of the patch
   features, ``X_c`` the global feature), ``S_p = softmax(<X~, t~> / T)``.

Loss (paper §Loss): ``cls_weight * BCE(S_p, y) + seg_weight * sum_l [Dice(M^a_l, S) +
Dice(M^n_l, 1 - S) + Focal(M_l, S)]`` (AnomalyCLIP's two-class focal loss and Dice; the paper's
weights are 1 and 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax import losses
from zsad_jax.encoders.attention import dot_product_attention
from zsad_jax.layers.frequency import sobel_magnitude
from zsad_jax.layers.haar import haar_dwt2, haar_idwt2
from zsad_jax.layers.resize import resize_bilinear
from zsad_jax.layers.smoothing import gaussian_filter
from zsad_jax.methods.backbone import TokenizerSource, build_backbone
from zsad_jax.methods.base import AnomalyModel
from zsad_jax.nn import Buffer, Trainable, resolve_compute_dtype, torch_linear, trainable
from zsad_jax.prompts import OBJECT_AGNOSTIC_PLACEHOLDER, object_agnostic_prompts

_HERE = "zsad_jax/methods/dlvp_clip.py"
# Keys added after checkpoints were written, with the value that does what they did then (the
# commands fill them into a stored config: zsad_jax.cli).
ADDED_MODEL_KEYS = {"remat": False, "hfd_init": "torch"}
HFD_KINDS = ("haar", "sobel")
HFD_SPACES = ("projected", "residual")
# "torch": every HFD linear as a fresh nn.Linear; "zero": ``low`` and ``high`` start at zero, so
# F^D = 0 and HFD starts as the identity (the paper gives no init).
HFD_INITS = ("torch", "zero")


# ----------------------------------------------------------------------------------------------
# Heads


def _head(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A trained ``nn.Linear`` with PyTorch's default init: the authors' heads would be plain
    ``nn.Linear`` layers."""
    return trainable(torch_linear(d_in, d_out, rngs=rngs))


def _zero(linear: nnx.Linear) -> None:
    linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
    linear.bias[...] = jnp.zeros_like(linear.bias[...])


class HighLowFrequencyDecomposition(nnx.Module):
    """HFD: ``F + IDWT(low(LL), high(LH), high(HL), high(HH))`` of ``F~ = spatial(F)``.

    ``kind="sobel"`` is the paper's comparison: ``F + low(F~) + high(sqrt(gx^2 + gy^2))``.
    ``init="zero"`` zeroes ``low`` and ``high`` (identity at the start; ``HFD_INITS``).
    """

    def __init__(self, width: int, *, kind: str = "haar", init: str = "torch", rngs: nnx.Rngs):
        if kind not in HFD_KINDS:
            raise ValueError(f"config.model.hfd_kind={kind!r}: use one of {list(HFD_KINDS)}")
        if init not in HFD_INITS:
            raise ValueError(f"config.model.hfd_init={init!r}: use one of {list(HFD_INITS)}")
        self.kind = kind
        self.spatial = _head(width, width, rngs)  # F_v
        self.low = _head(width, width, rngs)
        self.high = _head(width, width, rngs)  # shared by the three detail bands
        if init == "zero":
            _zero(self.low)
            _zero(self.high)

    def __call__(self, grid: jax.Array) -> jax.Array:
        """grid (B, h, w, C) float32 -> (B, h, w, C); odd h, w are handled by ``haar_dwt2``'s
        edge repeat and cropped back by ``haar_idwt2(size=...)``."""
        f = self.spatial(grid)
        if self.kind == "haar":
            ll, (lh, hl, hh) = haar_dwt2(f)
            detail = haar_idwt2(
                self.low(ll), (self.high(lh), self.high(hl), self.high(hh)), size=grid.shape[1:3]
            )
        else:
            detail = self.low(f) + self.high(sobel_magnitude(f))
        return grid + detail


# ----------------------------------------------------------------------------------------------
# Backbone passes


def _dual_attention(block, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """AnomalyCLIP's DPAM attention of a frozen CLIP block on ``x = ln_1(tokens)`` (B, T, D):
    (V-V attention output, original q-k attention output), both through ``out_proj``."""
    attn = block.attn
    b, t, d = x.shape
    qkv = attn.in_proj(x).reshape(b, t, 3, attn.heads, d // attn.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    original = dot_product_attention(q, k, v).reshape(b, t, d)
    value_value = dot_product_attention(v, v, v).reshape(b, t, d)
    return attn.out_proj(value_value), attn.out_proj(original)


def _plain_block(block, x: jax.Array) -> jax.Array:
    return block(x)


def _dpam_block(block, x: jax.Array, original: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One DPAM block (AnomalyCLIP, ``ffn=False``): the original path is a normal CLIP block
    whose attention input also feeds the V-V path; the V-V path adds only the attention output
    (no MLP). Returns (V-V path, original path), each (B, T, D)."""
    value_value, qk = _dual_attention(block, block.ln_1(original))
    original = original + qk
    original = original + block.mlp(block.ln_2(original))
    return x + value_value, original


def _check_layer(field: str, value: int, depth: int) -> None:
    value = int(value)
    if not 1 <= value <= depth:
        raise ValueError(
            f"config.model.{field}={value} is not a block of this {depth}-block CLIP (1..{depth}); "
            "the tiny preset has 3 blocks"
        )


def _check_range(field: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise ValueError(f"config.model.{field}={value} must be in {low}..{high}{why}")


def _local_prompts(m) -> int:
    """M; configs written before M was its own field had M = K."""
    return int(m.get("local_prompts", m.top_k))


def _check_config(m, depth: int, text_depth: int) -> None:
    """Refuses a ``config.model`` this CLIP (``depth`` vision, ``text_depth`` text blocks) cannot
    run, naming the field; checked before any head is built."""
    for i in m.layers:
        _check_layer("layers", i, depth)
    top_k, local_prompts = int(m.top_k), _local_prompts(m)
    if top_k < 1 or local_prompts < 1:
        raise ValueError(
            f"config.model.top_k={top_k} and config.model.local_prompts={local_prompts} must both "
            "be >= 1"
        )
    _check_layer("slfs_attn_layer", m.slfs_attn_layer, depth)
    _check_layer("slfs_feature_layer", m.slfs_feature_layer, depth)
    _check_range("visual_fixed_depth", int(m.visual_fixed_depth), 0, depth)
    dpam_note = " (AnomalyCLIP's DPAM_layer: 1 = no DPAM, 20 = blocks 6..24 of 24)"
    _check_range("dpam_layers", int(m.dpam_layers), 1, depth + 1, dpam_note)
    n_ctx, text_prompt_len = int(m.n_ctx), int(m.text_prompt_len)
    _check_range("prompt_depth", int(m.prompt_depth), 1, text_depth)
    if not 0 < text_prompt_len <= n_ctx:
        raise ValueError(
            f"config.model.text_prompt_len={text_prompt_len} must be in 1..n_ctx ({n_ctx}): deep "
            "prompts replace the first context tokens"
        )
    if bool(m.use_mlop) and text_prompt_len != local_prompts:
        raise ValueError(
            f"config.model.text_prompt_len={text_prompt_len} must equal local_prompts="
            f"{local_prompts} with use_mlop: the text prompts are F_theta(P') + E_j"
        )
    if str(m.hfd_space) not in HFD_SPACES:
        raise ValueError(
            f"config.model.hfd_space={str(m.hfd_space)!r}: use one of {list(HFD_SPACES)}"
        )


# ----------------------------------------------------------------------------------------------
# The method


class DlvpClip(AnomalyModel):
    """DLVP-CLIP on a frozen CLIP (see the module docstring and ``configs/dlvp_clip.py``)."""

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        m = config.model
        self.clip = build_backbone(
            m.backbone,
            rngs=rngs,
            load_weights=load_weights,
            act=m.act,
            pos_resize=m.pos_resize,
            dtype=resolve_compute_dtype(config.compute_dtype),
        )
        vcfg, tcfg = self.clip.vision.config, self.clip.text.config
        _check_config(m, vcfg.layers, tcfg.layers)
        self._set_options(m, vcfg.layers)
        self.cls_weight = float(config.loss.cls_weight)
        self.seg_weight = float(config.loss.seg_weight)
        self._build_prompts(tcfg.width, rngs)
        self._build_heads(m, vcfg.width, tcfg.width, vcfg.output_dim, rngs)
        # What set_classes rebuilds the tokenizer from (hashable: graph-static).
        self._tokenizer_source = TokenizerSource.of(m.backbone)
        self.prompt_ids = Buffer(jnp.zeros((2, tcfg.context_length), jnp.int32))
        if load_weights:
            self.set_classes(())

    def _set_options(self, m, depth: int) -> None:
        """The checked ``config.model`` values the forward reads (graph-static attributes)."""
        self.layers = tuple(int(i) for i in m.layers)
        self.remat = bool(m.get("remat", ADDED_MODEL_KEYS["remat"]))
        self.use_slfs = bool(m.use_slfs)
        self.use_mlop = bool(m.use_mlop)
        self.use_hfd = bool(m.use_hfd)
        self.top_k = int(m.top_k)
        self.local_prompts = _local_prompts(m)
        self.slfs_attn_layer = int(m.slfs_attn_layer)
        self.slfs_feature_layer = int(m.slfs_feature_layer)
        self.slfs_ln_post = bool(m.slfs_ln_post)
        self.visual_fixed_depth = int(m.visual_fixed_depth)
        self.dpam_layers = int(m.dpam_layers)
        self.dpam_start = depth - self.dpam_layers + 2  # first DPAM block, 1-indexed
        self.n_ctx = int(m.n_ctx)
        self.text_prompt_len = int(m.text_prompt_len)
        self.prompt_depth = int(m.prompt_depth)
        self.temperature = float(m.temperature)
        self.sigma = float(m.sigma)
        self.global_ln_post = bool(m.global_ln_post)
        self.local_image_branch = bool(m.local_image_branch)
        self.hfd_space = str(m.hfd_space)

    def _build_prompts(self, text_width: int, rngs: nnx.Rngs) -> None:
        """AnomalyCLIP_PromptLearner's ctx vectors and compound prompts E_j, ~ N(0, 0.02)."""
        normal = nnx.initializers.normal(0.02)
        self.ctx_normal = Trainable(normal(rngs.params(), (self.n_ctx, text_width)))
        self.ctx_abnormal = Trainable(normal(rngs.params(), (self.n_ctx, text_width)))
        self.text_deep_prompts = Trainable(  # E_j, j = 2..prompt_depth
            normal(rngs.params(), (self.prompt_depth - 1, self.text_prompt_len, text_width))
        )

    def _build_heads(self, m, width: int, text_width: int, embed: int, rngs: nnx.Rngs) -> None:
        """The trained heads; one a variant does not use is ``None`` (no parameters)."""
        self.visual_prompt_proj = _head(width, width, rngs) if self.visual_prompts_on else None
        # K selected patches -> M prompt tokens, only where they differ (the Top-K ablation).
        self.prompt_token_proj = (
            _head(self.top_k, self.local_prompts, rngs)
            if self.use_slfs and self.top_k != self.local_prompts
            else None
        )
        self.text_prompt_proj = (  # F_theta
            _head(width, text_width, rngs) if self.use_mlop else None
        )
        self.hfd = self._build_hfd(m, embed if self.hfd_space == "projected" else width, rngs)
        self.local_compress = (
            _head(len(self.layers) * embed, embed, rngs) if self.local_image_branch else None
        )

    def _build_hfd(self, m, width: int, rngs: nnx.Rngs) -> nnx.List | None:
        """One HFD per tapped layer (``use_hfd``)."""
        if not self.use_hfd:
            return None
        init = str(m.get("hfd_init", ADDED_MODEL_KEYS["hfd_init"]))
        return nnx.List(
            [
                HighLowFrequencyDecomposition(width, kind=m.hfd_kind, init=init, rngs=rngs)
                for _ in self.layers
            ]
        )

    @property
    def visual_prompts_on(self) -> bool:
        """Prompts reach the vision tower in every variant that has SLFS or MLoP (SLFS alone: the
        vision tower only; MLoP without SLFS: the global token as the source)."""
        return self.use_slfs or self.use_mlop

    # -- text ----------------------------------------------------------------------------------

    def set_classes(self, names: Sequence[str]) -> None:
        """Tokenises the two object-agnostic prompts; class names are not used (AnomalyCLIP's
        prompts say "object" for every category)."""
        del names
        tokenizer = self._tokenizer_source.build()
        texts = object_agnostic_prompts(self.n_ctx)
        ids = tokenizer(list(texts), self.clip.text.config.context_length)
        placeholder = tokenizer.encode(OBJECT_AGNOSTIC_PLACEHOLDER)
        if len(placeholder) != 1 or not np.all(ids[:, 1 : 1 + self.n_ctx] == placeholder[0]):
            raise ValueError(
                f"{_HERE}: the tokenizer does not map each {OBJECT_AGNOSTIC_PLACEHOLDER!r} of "
                f"{texts[0]!r} to one token, so the learnt context would not replace positions "
                f"1..{self.n_ctx}; use the CLIP BPE tokenizer of the checkpoint"
            )
        self.prompt_ids[...] = jnp.asarray(ids, jnp.int32)

    def encode_text(self, prompts: jax.Array | None) -> jax.Array:
        """Visual prompts P' (B, M, D_vision) or None -> L2-normalised text features (B or 1, 2,
        E) in (normal, abnormal) order."""
        text = self.clip.text
        ids = self.prompt_ids[...]
        emb, eot = text.token_embeddings(ids)  # (2, T, Dt)
        ctx = jnp.stack([self.ctx_normal[...], self.ctx_abnormal[...]])
        # AnomalyCLIP: SOS, then the learnt context in place of the n_ctx "X" tokens.
        emb = jnp.concatenate([emb[:, :1], ctx.astype(emb.dtype), emb[:, 1 + self.n_ctx :]], 1)
        static = self.text_deep_prompts[...]  # (depth - 1, t, Dt)
        if prompts is None or not self.use_mlop:
            feats, _ = text.encode(emb, eot, deep_prompts=list(static))
            feats = feats[None]  # (1, 2, E)
        else:
            b = prompts.shape[0]
            shared = self.text_prompt_proj(prompts)  # F_theta(P') (B, M, Dt)
            # Sequence b * 2 + s is image b's state s.
            deep = [jnp.repeat(shared + e, 2, axis=0) for e in static]
            emb = jnp.tile(emb, (b, 1, 1))
            eot = jnp.tile(eot, b)
            feats, _ = text.encode(emb, eot, deep_prompts=deep)
            feats = feats.reshape(b, 2, -1)
        feats = feats.astype(jnp.float32)
        return feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)

    # -- vision --------------------------------------------------------------------------------

    def _plain_pass(
        self, images: jax.Array, feature_layer: int, attn_layer: int | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """The original CLIP encoder up to block max(feature_layer, attn_layer): (tokens after
        ``feature_layer`` (B, 1+N, D), attention probabilities of ``attn_layer`` (B, heads, 1+N,
        1+N) or None when no attention is asked for)."""
        vision = self.clip.vision
        x = vision.embed(images)
        attn = features = None
        last = max(feature_layer, attn_layer or 0)
        for i, block in enumerate(vision.blocks, start=1):
            if i == attn_layer:
                x, attn = block(x, return_attn=True)
            else:
                x = block(x)
            if i == feature_layer:
                features = x
            if i >= last:
                break
        return features, attn

    def _source_tokens(self, tokens: jax.Array) -> jax.Array:
        """(B, T, D) plain-pass tokens -> float32, through ``ln_post`` when ``slfs_ln_post``,
        without gradient (the source is the frozen encoder's)."""
        tokens = tokens.astype(jnp.float32)
        if self.slfs_ln_post:
            tokens = self.clip.vision.ln_post(tokens)
        return jax.lax.stop_gradient(tokens)

    def select_local_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """SLFS on a plain CLIP pass: images (B, H, W, 3) -> (P (B, K, D), indices (B, K) of the
        top-K patches by heads-averaged CLS attention, descending)."""
        features, attn = self._plain_pass(
            images, self.slfs_feature_layer, attn_layer=self.slfs_attn_layer
        )
        scores = attn.astype(jnp.float32).mean(axis=1)[:, 0, 1:]  # (B, N)
        _, indices = jax.lax.top_k(scores, self.top_k)
        local = jnp.take_along_axis(features[:, 1:], indices[..., None], axis=1)
        return self._source_tokens(local), indices

    def global_token_source(self, images: jax.Array) -> jax.Array:
        """The "Global token" source (MLoP without SLFS): the plain pass's CLS token after the
        last block, in each of the M prompt slots -> (B, M, D). No attention, no top-K."""
        features, _ = self._plain_pass(images, len(self.clip.vision.blocks))
        cls = self._source_tokens(features[:, :1])
        return jnp.repeat(cls, self.local_prompts, axis=1)

    def visual_prompts(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """P' (B, M, D) for the prompted pass and the SLFS indices (B, K) (None without SLFS)."""
        if self.use_slfs:
            source, indices = self.select_local_features(images)  # (B, K, D)
            if self.prompt_token_proj is not None:  # K tokens -> M tokens
                source = jnp.swapaxes(self.prompt_token_proj(jnp.swapaxes(source, 1, 2)), 1, 2)
        else:
            source, indices = self.global_token_source(images), None
        return self.visual_prompt_proj(source), indices

    def encode_image(
        self, images: jax.Array, prompts: jax.Array | None
    ) -> tuple[dict[int, jax.Array], jax.Array]:
        """The prompted pass: -> ({layer: tokens (B, 1+N, D) without the prompt tokens}, global
        token (B, D) of the original path)."""
        vision = self.clip.vision
        x = vision.embed(images)
        n_tokens = x.shape[1]
        if prompts is not None:
            x = jnp.concatenate([x, prompts.astype(x.dtype)], axis=1)
        original = None  # DPAM's original path, once it has split off
        taps = {}
        for i, block in enumerate(vision.blocks, start=1):
            if prompts is not None and i <= self.visual_fixed_depth + 1:
                x = jnp.concatenate([x[:, :n_tokens], prompts.astype(x.dtype)], axis=1)
                if original is not None:
                    original = jnp.concatenate(
                        [original[:, :n_tokens], prompts.astype(x.dtype)], axis=1
                    )
            if i < self.dpam_start:
                x = self._maybe_remat(_plain_block)(block, x)
            else:
                if original is None:
                    original = x
                x, original = self._maybe_remat(_dpam_block)(block, x, original)
            if i in self.layers:
                taps[i] = x[:, :n_tokens]
        final = x if original is None else original
        return taps, final[:, 0]

    def patch_features(self, taps: dict[int, jax.Array], grid_hw: tuple[int, int]) -> jax.Array:
        """Tapped tokens -> HFD-enhanced projected patch features (L, B, N, E) float32."""
        vision = self.clip.vision
        h, w = grid_hw
        out = []
        for n, layer in enumerate(self.layers):
            tokens = taps[layer][:, 1:].astype(jnp.float32)
            b = tokens.shape[0]
            if self.hfd_space == "residual" and self.hfd is not None:
                tokens = self.hfd[n](tokens.reshape(b, h, w, -1)).reshape(b, h * w, -1)
            feats = vision.head(tokens)
            if self.hfd_space == "projected" and self.hfd is not None:
                feats = self.hfd[n](feats.reshape(b, h, w, -1)).reshape(b, h * w, -1)
            out.append(feats)
        return jnp.stack(out)

    def _maybe_remat(self, fn):
        """``fn`` rematerialised in the backward pass when ``config.model.remat`` (the prompted
        pass is differentiated through every block: the visual prompts are trained)."""
        return nnx.remat(fn) if self.remat else fn

    # -- the interface -------------------------------------------------------------------------

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, Any]:
        """batch["image"] (B, H, W, 3) -> anomaly_map (B, H, W), pred_score (B,), image_logits
        (B, 2), layer_probs (L, B, H, W, 2) softmax (normal, abnormal), local_indices (B, K)."""
        images = batch["image"]
        b, height, width, _ = images.shape
        vision = self.clip.vision
        p = vision.config.patch_size
        grid_hw = (height // p, width // p)
        n_patches = grid_hw[0] * grid_hw[1]
        if self.use_slfs and self.top_k > n_patches:
            raise ValueError(
                f"config.model.top_k={self.top_k} exceeds the {n_patches} patches of "
                f"{height}x{width} images"
            )
        prompts = indices = None
        if self.visual_prompts_on:
            prompts, indices = self.visual_prompts(images)  # P' (B, M, D)
        taps, global_token = self.encode_image(images, prompts)
        text = self.encode_text(prompts)  # (B or 1, 2, E)

        feats = self.patch_features(taps, grid_hw)  # (L, B, N, E)
        unit = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
        text = jnp.broadcast_to(text, (b, *text.shape[1:]))  # (B, 2, E)
        logits = jnp.einsum("lbne,bse->lbns", unit, text)
        probs = jax.nn.softmax(logits / self.temperature, axis=-1)
        n_layers = probs.shape[0]
        probs = probs.reshape(n_layers * b, *grid_hw, 2)
        probs = resize_bilinear(probs, (height, width)).reshape(n_layers, b, height, width, 2)
        anomaly_map = jnp.mean((probs[..., 1] + 1.0 - probs[..., 0]) / 2.0, axis=0)
        if not train and self.sigma > 0:
            anomaly_map = gaussian_filter(anomaly_map, self.sigma)

        global_token = global_token.astype(jnp.float32)
        if self.global_ln_post:
            image_feat = vision.head(global_token)
        else:  # AnomalyCLIP's quirk: x_ori[0] @ proj, without ln_post
            image_feat = global_token @ vision.proj[...]
        if self.local_compress is not None:
            pooled = jnp.concatenate(list(feats.mean(axis=2)), axis=-1)  # (B, L * E)
            image_feat = image_feat + self.local_compress(pooled)
        image_feat = image_feat / jnp.linalg.norm(image_feat, axis=-1, keepdims=True)
        image_logits = jnp.einsum("be,bse->bs", image_feat, text)
        image_logits = image_logits / self.temperature
        out = {
            "anomaly_map": anomaly_map,
            "pred_score": jax.nn.softmax(image_logits, axis=-1)[:, 1],
            "image_logits": image_logits,
            "layer_probs": probs,
        }
        if indices is not None:
            out["local_indices"] = indices
        return out

    def loss(
        self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``cls_weight * BCE + seg_weight * sum_l (focal + dice_a + dice_n)`` (float32)."""
        gt = losses.binary_target(batch["gt_mask"])
        valid = batch.get("has_mask")
        focal = dice_a = dice_n = jnp.zeros((), jnp.float32)
        for layer_probs in outputs["layer_probs"]:
            focal = focal + losses.focal_loss_two_class(layer_probs, gt, valid=valid)
            dice_a = dice_a + losses.dice_loss(layer_probs[..., 1], gt, valid=valid)
            dice_n = dice_n + losses.dice_loss(layer_probs[..., 0], 1.0 - gt, valid=valid)
        # Two-class softmax cross-entropy on the logits == BCE on S_p[:, 1].
        cls = losses.cross_entropy(outputs["image_logits"], batch["gt_label"])
        seg = focal + dice_a + dice_n
        total = self.cls_weight * cls + self.seg_weight * seg
        return total, {"cls": cls, "focal": focal, "dice_abnormal": dice_a, "dice_normal": dice_n}
