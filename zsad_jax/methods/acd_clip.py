"""ACD-CLIP on a frozen CLIP: grouped Conv-LoRA adapters, per-group heads, Dynamic Fusion Gateway
(methods.md §3; arXiv 2508.07819).

Official code: cockmake/ACD-CLIP @2026067 (``model/adapter.py`` ``ACDCLIP.forward``,
``encode_text``, ``vision_text_fusion_gate_seg``; ``model/adapter_modules.py``; ``train.py``;
``test.py``; ``utils.py``), read, not copied. Shapes below are for ViT-L/14 at 518 px (grid 37 x 37,
P = 1369 patches, vision width 1024, text width 768) and N = 4 groups; every size comes from the
config and the backbone.

Vision (``encode_image``)::

    image (B, 518, 518, 3) -> CLIP embed -> blocks 1..24, and after block 6 k (k = 1..N):
      patches t (B, P, 1024) (CLS untouched)
      a = ConvLoraAdapter_k(t); a <- a |t| / |a| per token (norm matching, no eps)
      t <- (1 - w_k) t + w_k a        (w_k per channel, init 0.2)           [trained]
      t is written back into the residual stream and kept as group k's tokens
    per group: seg_k = l2n(LN(MLP_seg,k(t)))  (B, P, 768)
               det_k = mean_P l2n(LN(MLP_det,k(t)))  (B, 768), not re-normalised

Text (``encode_classes``), per class (6 normal + 10 abnormal sentences of its descriptive name,
``zsad_jax.prompts.acd_clip_sentences``), then picked per image by ``class_id``::

    ids -> CLIP token + positional embedding -> blocks 1..12, and after block 3 k:
      x <- (1 - v_k) x + v_k norm_match(TextLoRA_k(x), x)   on all tokens, written back [trained]
      group k's sentence feature = LN_k(x)[EOT]               (no ln_final, no text_projection)
    per state: l2n each sentence, mean, l2n -> T_k (768, 2) per class (normal, abnormal)

Scoring::

    gate_k = softmax over groups of FusionGateway_k(mean_P seg_k) (B, N, 2)
    seg logits_k = 10 seg_k . sum_j gate_k[j] T_j     (B, P, 2)
    map logits = mean_k (test: Gaussian blur k 7 sigma 1, reflect) -> bilinear align_corners=True
                 to the input size -> softmax over (normal, abnormal)
    image logits = mean_k det_k . T_k (B, 2), no temperature
    pred_score = 0.9 softmax(image logits)[1] + 0.1 max(map)

Two exact rewrites of the official order save work (linear maps commute): the group mean is taken
before the (linear) blur and upsampling instead of after, and prompts are run only up to the
longest EOT of the class table (the causal mask keeps later positions out of every feature used).

How often the text tower runs (it goes through the trained text adapters, so it cannot be cached
once and for all like a frozen text):

* training (``train=True``): once per *distinct* class of the batch, with gradients, as the
  official ``train.py`` (``encode_class_text``: a fixed-size unique of ``class_id``, then
  ``distinct_class_text``, whose backward re-runs each distinct class once instead of storing its
  activations; gathered back per image, so the gradient of a class shared by several images is
  their sum, as before);
* inference: ``set_classes`` encodes every class once into ``class_text`` and stores the text
  adapters' weights (and the prompt table) it was computed from in ``class_text_key``. The forward
  compares that key with the live weights (a ~0.1 M-element equality, inside the jit) and reads
  the table when they match: no text work per batch, as the official ``test.py``. When they
  differ (weights loaded, trained or edited after ``set_classes``) it re-encodes all classes inside
  that call instead, so the text used is never stale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax import losses
from zsad_jax.encoders.clip import causal_mask
from zsad_jax.layers.resize import resize_bilinear
from zsad_jax.layers.smoothing import gaussian_blur2d
from zsad_jax.methods.acd_heads import (
    AdaptiveBlend,
    ConvLoraAdapter,
    DynamicFusionGateway,
    TextLoraAdapter,
    norm_match,
)
from zsad_jax.methods.backbone import TokenizerSource, build_backbone
from zsad_jax.methods.base import AnomalyModel, blended_image_score, checked_score_weight
from zsad_jax.nn import (
    Buffer,
    Trainable,
    l2_normalize,
    resolve_compute_dtype,
    torch_linear,
    trainable,
)
from zsad_jax.prompts import acd_clip_sentences

_HERE = "zsad_jax/methods/acd_clip.py"
_CONFIG = "configs/acd_clip.py"
# Keys added after checkpoints were written, with the value that does what they did then (the
# commands fill them into a stored config: zsad_jax.cli).
ADDED_MODEL_KEYS = {"remat": False}
_HIGHEST = jax.lax.Precision.HIGHEST
N_GROUPS_CHOICES = (2, 3, 4, 6)


def _unit(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / x.norm()`` without epsilon (the official text-feature normalisation)."""
    return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def group_levels(levels: Any, n_groups: int, depth: int, field: str) -> tuple[int, ...]:
    """The blocks (1-indexed) after which each group's adapter runs.

    ``levels`` None = the official rule ``depth / N * k``, k = 1..N (ViT-L: 6/12/18/24 for N = 4;
    text tower: 3/6/9/12); else N strictly increasing block numbers.
    """
    if levels is None:
        if depth % n_groups:
            raise ValueError(
                f"{_CONFIG}: model.n_groups={n_groups} does not divide the {depth} blocks of this "
                f"backbone, so the official levels depth/N*k do not exist; set {field} to "
                f"{n_groups} increasing blocks in 1..{depth}"
            )
        step = depth // n_groups
        return tuple(step * k for k in range(1, n_groups + 1))
    out = tuple(int(i) for i in levels)
    if (
        len(out) != n_groups
        or any(not 1 <= i <= depth for i in out)
        or any(a >= b for a, b in zip(out, out[1:], strict=False))
    ):
        raise ValueError(
            f"{_CONFIG}: {field}={out} must be {n_groups} (model.n_groups) strictly increasing "
            f"blocks in 1..{depth}"
        )
    return out


@functools.partial(jax.jit, static_argnums=0)
def _prepare_text(graphdef, state) -> tuple[jax.Array, jax.Array]:
    """``(encode_classes(), text_key())`` of a split model, jitted (one compilation per model
    structure and class table shape)."""
    model = nnx.merge(graphdef, state)
    return model.encode_classes(), model.text_key()


# The trained weights of the text path: the explicit inputs of ``distinct_class_text``'s VJP.
_TEXT_TRAINABLE = nnx.All(
    Trainable, nnx.Any(*(nnx.PathContains(n) for n in ("text_lora", "text_blend", "text_norm")))
)


def _slot_text(model: AcdClip, table: jax.Array, slot: jax.Array) -> jax.Array:
    """One class's (N, text width, 2) state embeddings; ``slot`` a traced class index."""
    return model.state_embeddings(jax.lax.dynamic_index_in_dim(table, slot, 0))[:, 0]


def _skip_empty(slot: jax.Array, run, zeros):
    # lax.cond executes one branch: an empty slot (-1) costs nothing.
    return jax.lax.cond(slot >= 0, run, lambda: zeros)


def distinct_class_text(model: AcdClip, table: jax.Array, slots: jax.Array) -> jax.Array:
    """(C, 16, T) prompt table, (K,) sorted distinct class ids padded with -1 -> (K, N, E, 2),
    rows of -1 zero; one text encode per distinct class in the forward pass and one per distinct
    class in the backward pass, which re-runs that class's forward and takes its VJP.

    Why a custom VJP instead of differentiating ``lax.map(lax.cond(...))``: JAX's linearisation
    of ``cond`` returns every residual of the taken branch, the frozen tower's weights included,
    as a cond output, and ``scan`` stacks those per slot: K copies of the text weights (measured,
    ViT-L/14 text tower, 6 images of 6 classes: 4.0 GB of temporaries for the text gradient, 2.0
    GB encoding per image, 0.3 GB with this VJP). Here the forward stores nothing per slot and
    the backward loops over the slots with the weights as loop constants; the price is one extra
    text forward per distinct class, the gain no stored text activations at all. The gradient is
    exact (the recomputed forward is the same computation). The frozen weights are closed over:
    differentiating with respect to them raises instead of returning zeros.
    """
    graphdef, params, rest = nnx.split(model, _TEXT_TRAINABLE, ...)
    width = model.backbone.text.config.width
    zeros = jnp.zeros((model.n_groups, width, 2), jnp.float32)

    def slot_text(p, slot):
        return _slot_text(nnx.merge(graphdef, p, rest), table, slot)

    def forward(p):
        return jax.lax.map(lambda slot: _skip_empty(slot, lambda: slot_text(p, slot), zeros), slots)

    def backward(p, cotangent):
        def add_slot(total, slot_and_cotangent):
            slot, g = slot_and_cotangent

            def vjp():
                return jax.vjp(lambda q: slot_text(q, slot), p)[1](g)[0]

            grad = _skip_empty(slot, vjp, jax.tree.map(jnp.zeros_like, p))
            return jax.tree.map(jnp.add, total, grad), None

        total, _ = jax.lax.scan(add_slot, jax.tree.map(jnp.zeros_like, p), (slots, cotangent))
        return (total,)

    run = jax.custom_vjp(forward)
    run.defvjp(lambda p: (forward(p), p), backward)
    return run(params)


class MlpProjection(nnx.Module):
    """``MLPAdapter``: Linear -> LeakyReLU(0.01) -> Linear (PyTorch default inits)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.fc1 = torch_linear(d_in, hidden, rngs=rngs)
        self.fc2 = torch_linear(hidden, d_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d_in) -> (..., d_out) float32."""
        return self.fc2(jax.nn.leaky_relu(self.fc1(x.astype(jnp.float32)), 0.01))


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch nn.LayerNorm defaults (eps 1e-5, weight 1, bias 0), two-pass variance like torch.
    return nnx.LayerNorm(width, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


def _check_config(config) -> None:
    """What can be refused before the backbone is built (or its weights read)."""
    n_groups = int(config.model.n_groups)
    if n_groups not in N_GROUPS_CHOICES:
        raise ValueError(
            f"{_CONFIG}: model.n_groups={n_groups}; the method is defined for "
            f"{list(N_GROUPS_CHOICES)}"
        )


def _check_image_options(config, patch_size: int) -> None:
    """The input size against the backbone's patch, and the image-score mixing weight."""
    image_size = int(config.data.image_size)
    if image_size % patch_size:
        raise ValueError(
            f"{_CONFIG}: data.image_size={image_size} is not a multiple of the backbone patch "
            f"size {patch_size}"
        )
    checked_score_weight(config.model.image_score_weight, _CONFIG, official=0.9)


def _per_group(n: int, make) -> nnx.List:
    """``n`` trainable modules from ``make()``, one per group (``name.k`` in the state)."""
    return trainable(nnx.List([make() for _ in range(n)]))


class AcdClip(AnomalyModel):
    """ACD-CLIP (see the module docstring and ``configs/acd_clip.py``).

    Trained (``Trainable``), per group k < N: ``image_lora.k``, ``image_blend.k``,
    ``seg_proj.k``, ``seg_norm.k``, ``det_proj.k``, ``det_norm.k``, ``fusion_gate.k`` (the
    official ``image_adapter``) and ``text_lora.k``, ``text_blend.k``, ``text_norm.k`` (the
    official ``text_adapter``); 13,283,360 weights at ViT-L/14 with N = 4. Frozen: ``backbone``,
    the tokenised class prompts ``class_prompt_ids``, and for inference their encoded text
    ``class_text`` with the adapter weights it was encoded with, ``class_text_key``.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        m = config.model
        dtype = resolve_compute_dtype(config.compute_dtype)
        _check_config(config)
        self.n_groups = int(m.n_groups)
        self.backbone = build_backbone(
            m.backbone,
            rngs=rngs,
            load_weights=load_weights,
            act=m.act,
            pos_resize=m.pos_resize,
            dtype=dtype,
        )
        vision, text = self.backbone.vision.config, self.backbone.text.config
        self.image_levels = group_levels(
            m.image_levels, self.n_groups, vision.layers, "model.image_levels"
        )
        self.text_levels = group_levels(
            m.text_levels, self.n_groups, text.layers, "model.text_levels"
        )
        self.patch_size = vision.patch_size
        _check_image_options(config, vision.patch_size)
        self.remat = bool(m.get("remat", ADDED_MODEL_KEYS["remat"]))
        self.logit_scale = float(m.seg_logit_scale)
        self.blur_kernel = int(m.blur_kernel)
        self.blur_sigma = float(m.blur_sigma)
        self.image_score_weight = float(m.image_score_weight)
        self._build_image_adapters(m, vision.width, text.width, rngs)
        self._build_text_adapters(m, text.width, rngs)
        self._init_class_prompts(m, text)

    def _build_image_adapters(self, m, width: int, text_width: int, rngs: nnx.Rngs) -> None:
        """The official ``image_adapter``: Conv-LoRA + blend, seg/det heads, fusion gates."""
        n, a, hidden = self.n_groups, m.adapter, int(m.head_hidden)
        self.image_lora = _per_group(
            n,
            lambda: ConvLoraAdapter(
                width,
                width,
                kernel_sizes=tuple(int(k) for k in a.kernel_sizes),
                rank=int(a.rank),
                alpha=float(a.alpha),
                conv_rank=int(a.conv_rank),
                conv_alpha=float(a.conv_alpha),
                rngs=rngs,
            ),
        )
        self.image_blend = _per_group(n, lambda: AdaptiveBlend(width, float(m.image_blend_init)))
        # Heads project into the text tower's width: the text features are LN(text tokens), not
        # text_projection outputs.
        self.seg_proj = _per_group(n, lambda: MlpProjection(width, hidden, text_width, rngs=rngs))
        self.seg_norm = _per_group(n, lambda: _layer_norm(text_width, rngs))
        self.det_proj = _per_group(n, lambda: MlpProjection(width, hidden, text_width, rngs=rngs))
        self.det_norm = _per_group(n, lambda: _layer_norm(text_width, rngs))
        self.fusion_gate = _per_group(
            n, lambda: DynamicFusionGateway(text_width, n, hidden=int(m.gate_hidden), rngs=rngs)
        )

    def _build_text_adapters(self, m, text_width: int, rngs: nnx.Rngs) -> None:
        """The official ``text_adapter``: LoRA + blend and a LayerNorm per group."""
        n, a = self.n_groups, m.adapter
        self.text_lora = _per_group(
            n,
            lambda: TextLoraAdapter(
                text_width, text_width, rank=int(a.rank), alpha=float(a.alpha), rngs=rngs
            ),
        )
        self.text_blend = _per_group(n, lambda: AdaptiveBlend(text_width, float(m.text_blend_init)))
        self.text_norm = _per_group(n, lambda: _layer_norm(text_width, rngs))

    def _init_class_prompts(self, m, text) -> None:
        """Empty class tables (``set_classes`` fills them) and what rebuilds the tokenizer."""
        # What set_classes rebuilds the tokenizer from (hashable: graph-static).
        self._tokenizer_source = TokenizerSource.of(m.backbone)
        self.context_length = text.context_length
        normal, abnormal = acd_clip_sentences("object")
        self.n_normal, self.n_abnormal = len(normal), len(abnormal)
        self.class_names: tuple[str, ...] = ()
        self.class_prompt_ids = Buffer(
            jnp.zeros((1, self.n_normal + self.n_abnormal, 2), jnp.int32)
        )
        # Per-class text at inference (N, C, text width, 2), and what it was computed from; NaN
        # never equals anything, so the table is unused until set_classes fills both.
        self.class_text = Buffer(jnp.zeros((self.n_groups, 1, text.width, 2), jnp.float32))
        self.class_text_key = Buffer(jnp.full((1,), jnp.nan, jnp.float32))

    # ------------------------------------------------------------------------------------------
    # Text side.

    def tokenize_classes(self, names: Sequence[str]) -> np.ndarray:
        """names -> (C, 16, T) int32 ids: per class its 6 normal then 10 abnormal sentences.

        T is the longest sentence (SOS and EOT included) rounded up to a multiple of 8, at most the
        context length: positions after EOT never reach an EOT feature through the causal mask.
        Random-weight text towers use the byte-level tokenizer (about one id per character), where
        long descriptive names are truncated to the context; with real weights a sentence longer
        than the context is an error, never truncated.
        """
        source = self._tokenizer_source
        tokenizer = source.build()
        rows = []
        for name in names:
            normal, abnormal = acd_clip_sentences(name)
            rows.append(
                tokenizer(normal + abnormal, self.context_length, truncate=source.random_init)
            )
        ids = np.stack(rows)
        longest = int(ids.argmax(axis=-1).max()) + 1
        length = min(self.context_length, -(-longest // 8) * 8)
        return ids[:, :, :length].astype(np.int32)

    def set_classes(self, names: Sequence[str]) -> None:
        """Tokenises each class's prompts (descriptive ``REAL_NAMES``; an unknown class uses its
        name with underscores replaced by spaces, where the official code would stop) into
        ``class_prompt_ids`` (C, 16, T), indexed by ``batch["class_id"]``, and encodes them with
        the current text adapters for inference (``prepare_text``)."""
        names = tuple(str(n) for n in names)
        if not names:
            raise ValueError(f"{_HERE}: set_classes needs at least one class name")
        self.class_prompt_ids = Buffer(jnp.asarray(self.tokenize_classes(names)))
        self.class_names = names
        self.prepare_text()

    def prepare_text(self) -> None:
        """Encodes every class with the current text adapters into ``class_text`` (N, C, E, 2) and
        records their weights in ``class_text_key``. ``set_classes`` calls it; calling it again
        after loading or training weights only saves the forward's one re-encode per call."""
        # Fixed-shape placeholders while encoding: the jitted encode does not read the old table,
        # and its shape would otherwise make each call after the first compile again.
        self.class_text = Buffer(jnp.zeros((self.n_groups, 1, self.class_text.shape[2], 2)))
        self.class_text_key = Buffer(jnp.full((1,), jnp.nan, jnp.float32))
        graphdef, state = nnx.split(self)
        table, key = _prepare_text(graphdef, state)
        self.class_text = Buffer(table)
        self.class_text_key = Buffer(key)

    def encode_text(self, ids: jax.Array) -> list[jax.Array]:
        """ids (S, T) -> per group the adapted EOT feature ``LN_k(x)[EOT]`` (S, text width) float32
        (``ACDCLIP.encode_text``)."""
        text = self.backbone.text
        x, eot = text.embed(ids)
        mask = causal_mask(ids.shape[1])
        group_of = {level: k for k, level in enumerate(self.text_levels)}
        out = []
        for i, block in enumerate(text.blocks, start=1):
            if i > self.text_levels[-1]:
                break  # later blocks feed no group feature
            x = self._run_block(block, x, mask)
            if i in group_of:
                k = group_of[i]
                adapted = norm_match(self.text_lora[k](x), x)
                x = self.text_blend[k](x, adapted)
                pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
                out.append(self.text_norm[k](pooled))  # LN is per token: LN then pick == pick
        return out

    def _check_classes(self) -> None:
        if not self.class_names:
            raise ValueError(
                f"{_HERE}: call model.set_classes(class_names) before running the model: the "
                "prompts depend on the categories that batch['class_id'] indexes"
            )

    def state_embeddings(self, ids: jax.Array) -> jax.Array:
        """ids (C, 16, T) -> per-group state embeddings (N, C, text width, 2) (normal, abnormal),
        each column unit-norm (``get_multiple_adapted_single_class_text_embedding``)."""
        c, s, t = ids.shape
        groups = []
        for feats in self.encode_text(ids.reshape(c * s, t)):
            feats = _unit(feats.reshape(c, s, -1))
            normal = _unit(jnp.mean(feats[:, : self.n_normal], axis=1))
            abnormal = _unit(jnp.mean(feats[:, self.n_normal :], axis=1))
            groups.append(jnp.stack([normal, abnormal], axis=-1))
        return jnp.stack(groups)

    def encode_classes(self) -> jax.Array:
        """Every class of ``set_classes`` with the current adapters: (N, C, text width, 2)."""
        self._check_classes()
        return self.state_embeddings(self.class_prompt_ids[...])

    def text_key(self) -> jax.Array:
        """What the text of ``encode_classes`` depends on besides the frozen tower, flat float32:
        the trained text adapters' weights and the prompt table (ids < 2^24 are exact)."""
        states = [nnx.state(m) for m in (self.text_lora, self.text_blend, self.text_norm)]
        parts = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(states)]
        parts.append(jnp.ravel(self.class_prompt_ids[...]).astype(jnp.float32))
        return jnp.concatenate(parts)

    def _class_ids(self, class_id: jax.Array) -> jax.Array:
        # Ids outside 0..C-1 are clipped (no data-dependent error under jit): give ids of the
        # categories passed to set_classes.
        return jnp.clip(class_id.astype(jnp.int32), 0, self.class_prompt_ids.shape[0] - 1)

    def encode_class_text(self, class_id: jax.Array) -> jax.Array:
        """class_id (B,) -> per-group state embeddings (N, B, text width, 2), with gradients,
        running the text tower once per distinct class of the batch (``distinct_class_text``).

        ``min(B, C)`` slots hold the sorted distinct ids (then -1, static shapes); the per-image
        rows are a gather of the slots, whose transpose sums the gradient of the images of one
        class: the same sum as encoding each image's class separately.
        """
        self._check_classes()
        table = self.class_prompt_ids[...]
        ids = self._class_ids(class_id)
        n_slots = min(ids.shape[0], table.shape[0])
        if n_slots == 1:  # one class or one image: nothing to deduplicate
            return jnp.take(self.state_embeddings(table[ids[:1]]), jnp.zeros_like(ids), axis=1)
        slots, inverse = jnp.unique(ids, size=n_slots, fill_value=-1, return_inverse=True)
        per_slot = distinct_class_text(self, table, slots)  # (slots, N, E, 2)
        return jnp.moveaxis(jnp.take(per_slot, inverse.reshape(-1), axis=0), 0, 1)

    def inference_table(self) -> jax.Array:
        """(N, C, text width, 2): ``class_text`` when ``class_text_key`` matches the live text
        adapters and prompts, else ``encode_classes()`` in this call (all C classes at once)."""
        key, stored = self.text_key(), self.class_text_key[...]
        table = self.class_text[...]
        if key.shape != stored.shape or table.shape[1] != self.class_prompt_ids.shape[0]:
            return self.encode_classes()  # other prompts or adapters: stale for sure
        fresh = jnp.array_equal(key, stored)
        if isinstance(fresh, jax.core.Tracer):
            return jax.lax.cond(fresh, lambda: table, self.encode_classes)
        return table if bool(fresh) else self.encode_classes()  # eager: no branch compiled

    def inference_class_text(self, class_id: jax.Array) -> jax.Array:
        """class_id (B,) -> (N, B, text width, 2) of ``inference_table``: no text encode per
        image, none at all per batch once ``set_classes`` ran on the current weights. No gradient
        flows into the text adapters (training uses ``encode_class_text``)."""
        self._check_classes()
        table = jax.lax.stop_gradient(self.inference_table())
        return jnp.take(table, self._class_ids(class_id), axis=1)

    # ------------------------------------------------------------------------------------------
    # Vision side.

    def _run_block(self, block: nnx.Module, x: jax.Array, mask: jax.Array | None = None):
        """One frozen block, rematerialised in the backward pass when ``config.model.remat`` (the
        gradient of every adapter but the last runs back through the frozen blocks after it).

        ``jax.checkpoint`` over the block's split state rather than ``nnx.remat``: the model is
        usually merged inside the caller's ``grad``, where an NNX transform may not touch it.
        """
        if not self.remat:
            return block(x, mask=mask)
        graphdef, state = nnx.split(block)

        @jax.checkpoint
        def run(state, x):
            return nnx.merge(graphdef, state)(x, mask=mask)

        return run(state, x)

    def encode_image(self, images: jax.Array) -> list[jax.Array]:
        """images (B, H, W, 3) -> per group the blended patch tokens (B, P, vision width) float32
        (``ACDCLIP.forward`` up to the heads)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{_HERE}: batch['image'] must be (B, H, W, 3) normalised NHWC, got {images.shape}"
            )
        vision = self.backbone.vision
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        x = vision.embed(images)
        group_of = {level: k for k, level in enumerate(self.image_levels)}
        out = []
        for i, block in enumerate(vision.blocks, start=1):
            if i > self.image_levels[-1]:
                break  # later blocks feed no group
            x = self._run_block(block, x)
            if i in group_of:
                k = group_of[i]
                patches = x[:, 1:]
                adapted = norm_match(self.image_lora[k](patches, grid), patches)
                mixed = self.image_blend[k](patches, adapted)
                out.append(mixed)
                x = jnp.concatenate([x[:, :1], mixed.astype(x.dtype)], axis=1)
        return out

    def heads(self, group_tokens: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Per-group tokens -> (seg tokens (N, B, P, E) unit-norm, det tokens (N, B, E))."""
        seg, det = [], []
        for k, tokens in enumerate(group_tokens):
            seg.append(l2_normalize(self.seg_norm[k](self.seg_proj[k](tokens))))
            det.append(jnp.mean(l2_normalize(self.det_norm[k](self.det_proj[k](tokens))), axis=1))
        return jnp.stack(seg), jnp.stack(det)

    # ------------------------------------------------------------------------------------------
    # Scoring.

    def segmentation_logits(self, seg: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """seg (N, B, P, E), text (N, B, E, 2) -> (per-group logits (N, B, P, 2), gates (N, B, N,
        2)); logits = ``seg_logit_scale`` * seg_k . fused text_k."""
        logits, gates = [], []
        for k in range(self.n_groups):
            fused, gate = self.fusion_gate[k](seg[k], text)
            logits.append(
                self.logit_scale * jnp.einsum("bpe,bec->bpc", seg[k], fused, precision=_HIGHEST)
            )
            gates.append(gate)
        return jnp.stack(logits), jnp.stack(gates)

    def image_logits(self, det: jax.Array, text: jax.Array) -> jax.Array:
        """det (N, B, E), text (N, B, E, 2) -> mean over groups of det_k . T_k, (B, 2)."""
        return jnp.mean(jnp.einsum("nbe,nbec->nbc", det, text, precision=_HIGHEST), axis=0)

    def map_probabilities(
        self, group_logits: jax.Array, grid: tuple[int, int], size: tuple[int, int], blur: bool
    ) -> jax.Array:
        """(N, B, P, 2) -> softmax of the group-mean logits, (optionally blurred,) upsampled with
        ``align_corners=True`` to ``size``: (B, H, W, 2)."""
        b = group_logits.shape[1]
        logits = jnp.mean(group_logits, axis=0).reshape(b, grid[0], grid[1], 2)
        if blur:
            logits = gaussian_blur2d(logits, self.blur_kernel, self.blur_sigma, "reflect")
        logits = resize_bilinear(logits, size, align_corners=True)
        return jax.nn.softmax(logits, axis=-1)

    # ------------------------------------------------------------------------------------------
    # The interface.

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
        """batch["image"] (B, H, W, 3), batch["class_id"] (B,) -> outputs.

        Returns:
          anomaly_map (B, H, W): P(abnormal) of the fused map (blurred when not ``train``);
          pred_score (B,): ``w * image_prob + (1 - w) * max(anomaly_map)``;
          image_logits (B, 2), image_prob (B,); map_probs (B, H, W, 2) (what the loss uses);
          group_logits (N, B, P, 2); gate_weights (N, B, N, 2).
        """
        images = batch["image"]
        if "class_id" not in batch:
            raise ValueError(f"{_HERE}: batch['class_id'] (B,) is needed to pick the prompts")
        _, height, width, _ = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        if train:
            text = self.encode_class_text(batch["class_id"])
        else:
            text = self.inference_class_text(batch["class_id"])
        seg, det = self.heads(self.encode_image(images))
        group_logits, gates = self.segmentation_logits(seg, text)
        image_logits = self.image_logits(det, text)
        probs = self.map_probabilities(group_logits, grid, (height, width), blur=not train)
        anomaly_map = probs[..., 1]
        image_prob = jax.nn.softmax(image_logits, axis=-1)[:, 1]
        score = blended_image_score(image_prob, anomaly_map, self.image_score_weight)
        return {
            "anomaly_map": anomaly_map,
            "pred_score": score,
            "image_logits": image_logits,
            "image_prob": image_prob,
            "map_probs": probs,
            "group_logits": group_logits,
            "gate_weights": gates,
        }

    def loss(
        self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``CE(image logits, y) + focal(map) + dice(p_n, 1 - M) + dice(p_a, M)`` (§3.7); images
        without a mask are left out of the three pixel terms."""
        probs = outputs["map_probs"]
        mask = losses.binary_target(batch["gt_mask"])
        valid = batch.get("has_mask")
        image = losses.cross_entropy(outputs["image_logits"], batch["gt_label"])
        focal = losses.focal_loss_two_class(probs, mask, gamma=2.0, valid=valid)
        dice_normal = losses.dice_loss(probs[..., 0], 1.0 - mask, valid=valid)
        dice_abnormal = losses.dice_loss(probs[..., 1], mask, valid=valid)
        total = image + focal + dice_normal + dice_abnormal
        return total, {
            "image_ce": image,
            "pixel_focal": focal,
            "dice_normal": dice_normal,
            "dice_abnormal": dice_abnormal,
        }
