"""AVA-DINO: dual normal/anomaly adapters on frozen DINOv3 with CLIP text routing (methods.md §2).

Official code: aqeeelmirza/AVA-DINO @a5474a1 (``tools/utils.py`` ``extract_dinov3_features`` and
``ava_dino_forward``, ``CLIP/adapter.py``, ``utils.py`` ``encode_text_with_prompt_ensemble``,
``tools/loss.py``, ``train.py``, ``test.py``). Shapes below are for DINOv3 ViT-L/16 at 512 px
(grid 32 x 32, N = 1024 patches, width D = 1024) and the CLIP ViT-L/14-336 text tower (E = 768);
every size comes from the config.

Forward (``__call__``), per tapped block i (``model.layers``, default 6/12/18/24)::

    image (B, 512, 512, 3) -> frozen DINOv3, residual stream after block i -> its final ``norm``
      cls_i = token 0 (B, D); p_i = tokens after CLS + registers (B, N, D), standardised per image
      and channel over the N tokens: (p - mean) / (std_unbiased + 1e-6)
    routing   w = softmax([cos(cls_i, P t_n), cos(cls_i, P t_a)] / tau)           (B, 2)
    adapters  cls' = norm(w_n A^cls_n,i(cls_i) + w_a A^cls_a,i(cls_i) + cls_i)    (B, D)
              p'   = norm(w_n A^p_n,i(p_i)   + w_a A^p_a,i(p_i)   + p_i)          (B, N, D)
    text      T = P [columns of (LeakyReLU(W_0 t_n), LeakyReLU(W_1 t_a))]          (B, 2, D)
    maps      cross-modal: softmax(upsample(100 p' T^T))                           (B, H, W, 2)
              AACM:        a = sigmoid(upsample(10 p' cls')), [1 - a, a]           (B, H, W, 2)
              global:      100 cls' T^T                                            (B, 2)

and the maps, the global logits and the routing weights are averaged over the tapped blocks.
Upsampling is bilinear with ``align_corners=True`` (torch semantics) to the input size. t_n, t_a
are the frozen CLIP prompt-ensemble embeddings of the image's class (cached by ``set_classes``),
P the shared trained ``text_projection`` (E -> D, no bias).

Text columns (``model.text_interleave_quirk``): the official code builds the (B, E, 2) text matrix
with ``torch.cat([adj0, adj1], dim=1).view(B, E, 2)``, which *interleaves*: column 0 is
``[adj0[0::2], adj1[0::2]]`` and column 1 is ``[adj0[1::2], adj1[1::2]]``. True (default)
reproduces that; False uses the paper's columns ``adj0`` (normal) and ``adj1`` (anomalous).

Test-time scores (``test.py``): pixel score = cross-modal map's anomalous channel at the input
resolution (no smoothing); image score = its maximum (the global head is unused at test time).
Not in the official code, both test-time only (training and its loss are unchanged):
``model.image_score_weight`` w (default 0.0 = the official maximum) blends in the CE-trained
global head, ``w * softmax(global_logits)[1] + (1 - w) * max(map)`` (ACD-CLIP's form of the rule);
``model.smoothing_sigma`` s (default 0.0 = none) smooths the pixel map with a Gaussian of s pixels
(scipy's ``gaussian_filter``) after the image score has taken the unsmoothed map's maximum.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax import losses, text_cache
from zsad_jax.layers import gaussian_filter, resize_bilinear
from zsad_jax.methods.backbone import TokenizerSource, build_backbone
from zsad_jax.methods.base import AnomalyModel, blended_image_score, checked_score_weight
from zsad_jax.nn import Buffer, l2_normalize, resolve_compute_dtype, torch_linear, trainable
from zsad_jax.prompts import ensemble_sentences

_HERE = "zsad_jax/methods/ava_dino.py"
_CONFIG = "configs/ava_dino.py"
# torch.nn.LeakyReLU's default negative slope.
LEAKY_SLOPE = 0.01
_HIGHEST = jax.lax.Precision.HIGHEST
# Names the pooling recipe of ``ensemble_embeddings`` in the text cache key: bump it when the recipe
# changes, so files written by the old one are not read.
ENSEMBLE_CACHE_TAG = "ava_dino.prompt_ensemble/1"


@functools.partial(jax.jit, static_argnums=0)
def _unit_text_embeddings(graphdef, state, ids: jax.Array) -> jax.Array:
    """ids (S, T) -> L2-normalised CLIP text embeddings (S, E); one compilation per (S, T) and
    text tower structure, shared by every model and ``set_classes`` call of the process."""
    return l2_normalize(nnx.merge(graphdef, state)(ids)[0])


def standardize_tokens(patches: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(B, N, D) -> per image and channel ``(x - mean_N) / (std_N + eps)``, std unbiased (torch
    ``Tensor.std`` default)."""
    x = patches.astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True)
    std = jnp.std(x, axis=1, keepdims=True, ddof=1)
    return (x - mean) / (std + eps)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return torch_linear(d_in, d_out, use_bias=False, precision=_HIGHEST, rngs=rngs)


class BottleneckAdapter(nnx.Module):
    """``CLIP/adapter.py:BottleneckAdapter``: ``h = LeakyReLU(fc1 x)``, ``y = LeakyReLU(fc2 h)``,
    both linear layers without bias; returns ``(h, y)``.

    ``with_output=False`` builds ``fc1`` only (then ``y`` is not available): the official prompt
    adapters use only ``h``, so their ``fc2`` never receives a gradient.
    """

    def __init__(self, width: int, bottleneck: int, *, with_output: bool = True, rngs: nnx.Rngs):
        self.fc1 = _linear(width, bottleneck, rngs)
        self.fc2 = _linear(bottleneck, width, rngs) if with_output else None

    def hidden(self, x: jax.Array) -> jax.Array:
        """(..., width) -> (..., bottleneck) float32."""
        return jax.nn.leaky_relu(self.fc1(x.astype(jnp.float32)), LEAKY_SLOPE)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(..., width) -> (h (..., bottleneck), y (..., width)) float32."""
        if self.fc2 is None:
            raise ValueError(f"{_HERE}: this BottleneckAdapter was built without fc2")
        h = self.hidden(x)
        return h, jax.nn.leaky_relu(self.fc2(h), LEAKY_SLOPE)


class DualAdapter(nnx.Module):
    """A normal and an anomalous bottleneck adapter mixed by routing weights, with residual:
    ``w_n * A_n(x)[1] + w_a * A_a(x)[1] + x``."""

    def __init__(self, width: int, bottleneck: int, *, rngs: nnx.Rngs):
        self.normal = BottleneckAdapter(width, bottleneck, rngs=rngs)
        self.anomaly = BottleneckAdapter(width, bottleneck, rngs=rngs)

    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """x (B, ..., width), weights (B, 2) -> (B, ..., width) float32 (not normalised)."""
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        w_n, w_a = weights[:, 0].reshape(shape), weights[:, 1].reshape(shape)
        return w_n * self.normal(x)[1] + w_a * self.anomaly(x)[1] + x.astype(jnp.float32)


def text_columns(adj_normal: jax.Array, adj_anomaly: jax.Array, interleave: bool) -> jax.Array:
    """(B, E) adapted normal / anomalous text -> (B, 2, E): row k is column k of the official
    (B, E, 2) text matrix. ``interleave`` reproduces ``torch.cat([a0, a1], 1).view(B, E, 2)``."""
    if not interleave:
        return jnp.stack([adj_normal, adj_anomaly], axis=1)
    b, e = adj_normal.shape
    joined = jnp.concatenate([adj_normal, adj_anomaly], axis=1)  # (B, 2E), row-major
    return jnp.swapaxes(joined.reshape(b, e, 2), 1, 2)


def _layers_field(value: Any, depth: int) -> tuple[int, ...]:
    layers = tuple(int(i) for i in value)
    if not layers or any(not 1 <= i <= depth for i in layers):
        raise ValueError(
            f"{_CONFIG}: model.layers={layers} must name blocks 1..{depth} of this DINOv3 "
            "((6, 12, 18, 24) for ViT-L/16, (1, 2) for the tiny preset); set --config.model.layers"
        )
    return layers


def _check_config(config) -> None:
    """What can be refused before either tower is built (or its weights read)."""
    m = config.model
    if m.backbone.kind != "dinov3" or m.text_encoder.kind != "clip":
        raise ValueError(
            f"{_CONFIG}: model.backbone.kind must be 'dinov3' and model.text_encoder.kind "
            f"'clip', got {m.backbone.kind!r} / {m.text_encoder.kind!r}"
        )


# Keys added after checkpoints were written: a stored config without one does what it did then
# (the commands fill them in, zsad_jax.cli, so that --config.model.KEY=VALUE works on it too).
ADDED_MODEL_KEYS = {
    "image_score_weight": 0.0,
    "smoothing_sigma": 0.0,
    "visa_class_name_quirk": False,  # the real names, as before the switch
}


def _image_score_weight(m) -> float:
    weight = m.get("image_score_weight", ADDED_MODEL_KEYS["image_score_weight"])
    return checked_score_weight(weight, _CONFIG, official=0.0)


def _check_image_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(
            f"{_CONFIG}: data.image_size={image_size} is not a multiple of the DINOv3 "
            f"patch size {patch_size} (AVA-DINO uses 512)"
        )


def _loss_weights(loss) -> tuple[tuple[str, float], ...]:
    """``config.model.loss``'s term weights; ``include_aacm=False`` zeroes the AACM term."""
    weights = {k: float(loss[k]) for k in ("aacm", "seg", "global", "routing")}
    if not bool(loss.include_aacm):
        weights["aacm"] = 0.0
    # (name, value) pairs, not a dict: module attributes go into the graphdef, which must be
    # hashable to be a static argument of jax.jit.
    return tuple(weights.items())


class AvaDino(AnomalyModel):
    """AVA-DINO (see the module docstring).

    Trained state (``Trainable``), at full size: ``cls_adapters`` / ``patch_adapters`` (4 layers x
    {normal, anomaly} x 1024-768-1024 bottleneck = 16 x 1,572,864), ``prompt_adapters`` (2 x
    768 x 768 = 1,179,648, ``fc1`` only unless ``model.prompt_adapter_fc2``) and
    ``text_projection`` (768 x 1024 = 786,432): 27,131,904, or 28,311,552 with the unused
    ``fc2``. Frozen: DINOv3 (``backbone``), the CLIP text tower (``text_encoder``, used only by
    ``set_classes``) and the cached class text embeddings (``class_text``, a ``Buffer``).
    """

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        m = config.model
        dtype = resolve_compute_dtype(config.compute_dtype)
        _check_config(config)
        self.backbone = build_backbone(
            m.backbone, rngs=rngs, load_weights=load_weights, dtype=dtype
        )
        # Text only (the CLIP vision tower is never built nor read). Float32: it runs once per
        # class in set_classes, not in the training step.
        self.text_encoder = build_backbone(
            m.text_encoder,
            rngs=rngs,
            load_weights=load_weights,
            part="text",
            where="config.model.text_encoder",
            act=m.text_act,
        )
        self._tokenizer_source = TokenizerSource.of(m.text_encoder, "config.model.text_encoder")
        dino = self.backbone.config
        self.layers = _layers_field(m.layers, dino.num_layers)
        self.temperature = float(m.routing_temperature)
        self.map_scale = float(m.map_scale)
        self.aacm_scale = float(m.aacm_scale)
        self.patch_std_eps = float(m.patch_std_eps)
        self.interleave = bool(m.text_interleave_quirk)
        self.image_score_weight = _image_score_weight(m)
        self.smoothing_sigma = float(m.get("smoothing_sigma", ADDED_MODEL_KEYS["smoothing_sigma"]))
        self.loss_weights = _loss_weights(m.loss)
        self.image_size = int(config.data.image_size)
        _check_image_size(self.image_size, dino.patch_size)
        text_dim = self.text_encoder.config.output_dim
        self._build_adapters(m, dino.hidden_size, text_dim, rngs)
        # (C, 2, E) unit (normal, anomalous) ensemble embeddings per class; set by set_classes.
        self.class_text = Buffer(jnp.zeros((0, 2, text_dim), jnp.float32))
        self.class_names: tuple[str, ...] = ()

    def _build_adapters(self, m, width: int, text_dim: int, rngs: nnx.Rngs) -> None:
        """The trained state: per-layer visual adapters, prompt adapters, text projection."""
        bottleneck, n = int(m.bottleneck), len(self.layers)
        self.cls_adapters = trainable(
            nnx.List([DualAdapter(width, bottleneck, rngs=rngs) for _ in range(n)])
        )
        self.patch_adapters = trainable(
            nnx.List([DualAdapter(width, bottleneck, rngs=rngs) for _ in range(n)])
        )
        # The official prompt adapters are BottleneckAdapter(768) with bottleneck 768: their hidden
        # width must equal the text width, because text_projection reads both raw and adapted text.
        fc2 = bool(m.prompt_adapter_fc2)
        self.prompt_adapters = trainable(
            nnx.List(
                [BottleneckAdapter(text_dim, text_dim, with_output=fc2, rngs=rngs) for _ in "na"]
            )
        )
        self.text_projection = trainable(_linear(text_dim, width, rngs))

    # ------------------------------------------------------------------------------------------
    # Text side (frozen, once per class).

    def tokenize(self, sentences: list[str]) -> np.ndarray:
        """sentences -> (S, context_length) int32 ids with the text tower's tokenizer."""
        source = self._tokenizer_source
        tokenizer = source.build()
        # Random-weight towers use the byte tokenizer (~1 id per character): the longest
        # ensemble sentences then exceed 77 ids. Real BPE ids never do; never truncate them.
        return tokenizer(
            sentences, self.text_encoder.config.context_length, truncate=source.random_init
        )

    def class_prompts(self, name: str) -> tuple[np.ndarray, int]:
        """A class's ensemble -> (ids (420, T) of its 245 normal then 175 anomalous sentences,
        245). T is the longest sentence (SOS and EOT included) rounded up to a multiple of 8:
        positions after EOT never reach the EOT feature through the causal mask, so the cut is
        exact and saves most of the 77-token context (CLIP BPE sentences are ~10-20 tokens)."""
        normal, abnormal = ensemble_sentences(name)
        ids = self.tokenize(normal + abnormal)
        longest = int(ids.argmax(axis=-1).max()) + 1  # EOT has the largest id
        return ids[:, : min(ids.shape[1], -(-longest // 8) * 8)], len(normal)

    def _text_cache_dir(self):
        source = self._tokenizer_source
        return text_cache.cache_dir(source.checkpoint, random_init=source.random_init)

    def ensemble_embeddings(self, names: Sequence[str]) -> jax.Array:
        """class names -> (C, 2, E) (normal, anomalous): every sentence embedding L2-normalised,
        averaged, re-normalised (``encode_text_with_prompt_ensemble``).

        Classes found in ``zsad_jax.text_cache`` (same text tower weights and architecture, same
        prompt ids) are read from it; the others are encoded in batches of
        ``text_cache.DEFAULT_BATCH`` prompts with a progress bar, and stored. Returns when every
        value is computed (no work is left running into the first forward)."""
        names = [str(n) for n in names]
        tokenized = {name: self.class_prompts(name) for name in dict.fromkeys(names)}
        # The split between the states is part of what a cached value depends on.
        prompts = {name: (ids, f"normal={n}") for name, (ids, n) in tokenized.items()}
        key = text_cache.CacheKey(self.text_encoder, ENSEMBLE_CACHE_TAG)
        shape = (2, self.text_encoder.config.output_dim)
        found = text_cache.cached_per_class(
            prompts,
            key,
            self._text_cache_dir(),
            lambda missing: self._encode_ensembles([tokenized[name] for name in missing]),
            shape,
        )
        return jnp.asarray(np.stack([found[name] for name in names]))

    def _encode_ensembles(self, prompts: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """[(ids (S, T), n_normal)] per class -> per class (2, E), in one batched pass over every
        sentence of every class."""
        graphdef, state = nnx.split(self.text_encoder)
        width = max(ids.shape[1] for ids, _ in prompts)
        # A common length: id 0 after EOT, which the EOT position never attends to (causal).
        rows = np.concatenate(
            [np.pad(ids, ((0, 0), (0, width - ids.shape[1]))) for ids, _ in prompts]
        )
        emb = text_cache.encode_in_batches(
            functools.partial(_unit_text_embeddings, graphdef, state),
            rows,
            desc=f"AVA-DINO class text ({len(prompts)} classes)",
        )
        out, start = [], 0
        for ids, n_normal in prompts:
            unit = jnp.asarray(emb[start : start + ids.shape[0]])
            start += ids.shape[0]
            means = [jnp.mean(unit[:n_normal], axis=0), jnp.mean(unit[n_normal:], axis=0)]
            out.append(np.asarray(l2_normalize(jnp.stack(means))))
        return out

    def set_classes(self, names: Sequence[str]) -> None:
        """Caches the frozen ensemble text of each class in ``class_text`` (C, 2, E); see
        ``ensemble_embeddings`` for the disk cache and the progress bar. ``names`` are the words
        the prompts use: raw folder names, underscores kept, or, as the official code has for
        VisA, "Data" for every class (``zsad_jax.methods.text_class_names``)."""
        names = tuple(str(n) for n in names)
        if not names:
            raise ValueError(f"{_HERE}: set_classes needs at least one class name")
        self.class_text = Buffer(self.ensemble_embeddings(names))
        self.class_names = names

    # ------------------------------------------------------------------------------------------
    # Vision side.

    def features(self, images: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """images (B, H, W, 3) -> per tapped block: CLS (B, D) and standardised patches (B, N, D),
        both after the final norm, float32, cut from the graph (the backbone is frozen)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{_HERE}: batch['image'] must be (B, H, W, 3) normalised NHWC, got {images.shape}"
            )
        _, aux = self.backbone(images, layers=self.layers)
        prefix = self.backbone.num_prefix_tokens
        cls, patches = [], []
        for i in self.layers:
            tokens = jax.lax.stop_gradient(self.backbone.norm(aux["layers"][i].astype(jnp.float32)))
            cls.append(tokens[:, 0])
            patches.append(standardize_tokens(tokens[:, prefix:], self.patch_std_eps))
        return cls, patches

    # ------------------------------------------------------------------------------------------
    # Heads.

    def routing_weights(self, cls: jax.Array, text: jax.Array) -> jax.Array:
        """cls (B, D), text (B, 2, E) raw ensemble -> softmax(cos(cls, P t) / tau) (B, 2)."""
        projected = l2_normalize(self.text_projection(text))
        cos = jnp.einsum("bd,bkd->bk", l2_normalize(cls), projected, precision=_HIGHEST)
        return jax.nn.softmax(cos / self.temperature, axis=-1)

    def adapted_text(self, text: jax.Array) -> jax.Array:
        """text (B, 2, E) -> projected adapted columns T (B, 2, D), not normalised."""
        adj_normal = self.prompt_adapters[0].hidden(text[:, 0])
        adj_anomaly = self.prompt_adapters[1].hidden(text[:, 1])
        return self.text_projection(text_columns(adj_normal, adj_anomaly, self.interleave))

    def _upsample(self, grid_logits: jax.Array, size: tuple[int, int]) -> jax.Array:
        return resize_bilinear(grid_logits, size, align_corners=True)

    def heads(
        self,
        cls_tokens: Sequence[jax.Array],
        patch_tokens: Sequence[jax.Array],
        text: jax.Array,
        grid: tuple[int, int],
        size: tuple[int, int],
    ) -> dict[str, jax.Array]:
        """Everything after the backbone (``ava_dino_forward`` from the text adapter on).

        Args:
          cls_tokens: per layer (B, D); patch_tokens: per layer (B, N, D) standardised;
          text: (B, 2, E) frozen ensemble text of each image's class; grid: (h, w) with
          h * w = N; size: output (H, W).

        Returns:
          cross_modal (B, H, W, 2), aacm (B, H, W, 2), global_logits (B, 2), routing_weights
          (B, 2) (all averaged over layers), routing_weights_per_layer (L, B, 2).
        """
        b = text.shape[0]
        columns = self.adapted_text(text)
        cross, aacm, global_logits, routing = [], [], [], []
        for i, (cls, patches) in enumerate(zip(cls_tokens, patch_tokens, strict=True)):
            w = self.routing_weights(cls, text)
            cls_a = l2_normalize(self.cls_adapters[i](cls, w))
            patch_a = l2_normalize(self.patch_adapters[i](patches, w))
            logits = self.map_scale * jnp.einsum(
                "bnd,bkd->bnk", patch_a, columns, precision=_HIGHEST
            )
            logits = self._upsample(logits.reshape(b, *grid, 2), size)
            cross.append(jax.nn.softmax(logits, axis=-1))
            sim = self.aacm_scale * jnp.einsum("bnd,bd->bn", patch_a, cls_a, precision=_HIGHEST)
            a = jax.nn.sigmoid(self._upsample(sim.reshape(b, *grid), size))
            aacm.append(jnp.stack([1.0 - a, a], axis=-1))
            global_logits.append(
                self.map_scale * jnp.einsum("bd,bkd->bk", cls_a, columns, precision=_HIGHEST)
            )
            routing.append(w)
        routing = jnp.stack(routing)
        return {
            "cross_modal": jnp.mean(jnp.stack(cross), axis=0),
            "aacm": jnp.mean(jnp.stack(aacm), axis=0),
            "global_logits": jnp.mean(jnp.stack(global_logits), axis=0),
            "routing_weights": jnp.mean(routing, axis=0),
            "routing_weights_per_layer": routing,
        }

    # ------------------------------------------------------------------------------------------
    # The interface.

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
        """batch["image"] (B, H, W, 3), batch["class_id"] (B,) -> outputs.

        Returns:
          anomaly_map (B, H, W): anomalous channel of the cross-modal map; pred_score (B,): its
          maximum (``test.py``), blended with the global head's anomalous probability when
          ``model.image_score_weight`` > 0; and the ``heads`` outputs the loss uses. ``train``
          only turns off ``model.smoothing_sigma`` (no test-time post-processing in the official
          code, whose defaults leave both off).
        """
        if self.class_text.shape[0] == 0:
            raise ValueError(f"{_HERE}: call set_classes(names) before the model")
        images = batch["image"]
        cls_tokens, patch_tokens = self.features(images)
        grid = self.backbone.patch_grid(images.shape[1], images.shape[2])
        text = self.class_text[...][batch["class_id"]]
        out = self.heads(cls_tokens, patch_tokens, text, grid, images.shape[1:3])
        anomaly_map = out["cross_modal"][..., 1]
        pred_score = self.image_score(out, anomaly_map)
        if not train and self.smoothing_sigma > 0:
            # After the image score: on the validation split the maximum of a smoothed map ranked
            # images worse, while smoothed maps localised better (issue 13).
            anomaly_map = gaussian_filter(anomaly_map, self.smoothing_sigma)
        out.update(anomaly_map=anomaly_map, pred_score=pred_score)
        return out

    def image_score(self, out: dict[str, jax.Array], anomaly_map: jax.Array) -> jax.Array:
        """``w * softmax(global_logits)[1] + (1 - w) * max(map)``; w = 0 is exactly the max."""
        global_prob = jax.nn.softmax(out["global_logits"], axis=-1)[:, 1]
        return blended_image_score(global_prob, anomaly_map, self.image_score_weight)

    def loss(
        self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``w_aacm [focal + dice](AACM) + w_seg [focal + dice](cross-modal) + w_global CE(global)
        + w_routing MSE routing`` (``train.py``; weights 0.25 / 0.5 / 0.25 / 0.1)."""
        w = dict(self.loss_weights)
        mask = losses.binary_target(batch["gt_mask"])
        valid = batch.get("has_mask")
        labels = batch["gt_label"]

        def pixel(maps):
            focal = losses.focal_loss_two_class(maps, mask, valid=valid)
            return focal + losses.dice_loss(maps[..., 1], mask, valid=valid)

        aware = pixel(outputs["aacm"])
        seg = pixel(outputs["cross_modal"])
        global_ce = losses.cross_entropy(outputs["global_logits"], labels)
        routing = losses.routing_loss(
            outputs["routing_weights"][:, 0], outputs["routing_weights"][:, 1], labels
        )
        total = (
            w["aacm"] * aware + w["seg"] * seg + w["global"] * global_ce + w["routing"] * routing
        )
        return total, {"aware": aware, "seg": seg, "global": global_ce, "routing": routing}
