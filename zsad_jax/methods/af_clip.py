"""AF-CLIP (zero-shot) and AF-CLIP+ (few-shot memory banks) on a frozen CLIP (methods.md §1).

Official code: Faustinaqq/AF-CLIP @bb7edec (``clip/model.py`` ``CLIP.insert``,
``encode_state_prompt``, ``aggerate_neighbor(s)``, ``detect_encode_image``, ``detect_forward_seg``,
``store_memory``, ``detect_forward_memorybank``, ``detect_forward``; ``clip/adaptor.py``;
``main.py``; ``util/utils.py``). Shapes below are for ViT-L/14 at 518 px (grid 37 x 37,
T = 1 + 1369 tokens, width 1024, joint space 768); every size comes from the config.

Forward (``__call__``)::

    image (B, 518, 518, 3)
      -> frozen CLIP vision tower, residual stream after blocks ``feature_layers`` (6, 12, 18, 24)
      -> per layer, Gaussian neighbour aggregation with windows ``aggregation_sizes`` (1, 3, 5)
         -> S = 12 token sets (S, B, T, 1024)
      -> shared ``AttentionAdaptor`` (LN -> 8 x 64 self-attention, no residual)   [trained]
      -> frozen ``ln_post`` and ``proj`` -> (S, B, T, 768)
      -> cosine logits against the two state prompts / 0.07, summed over the S sets, softmax
      -> image score = P(abnormal) of CLS, patch map = P(abnormal) of the patches (B, 37, 37)
      -> (test) bilinear upsampling to the input size, scipy-style Gaussian smoothing (sigma 4)

Text side: "without defect." / "with defect." with ``prompt_length`` learnt vectors put *before*
SOS (``state_prompt_embedding``, trained), through the frozen text tower; encoded once per call
(two sequences) because it does not depend on the image.

Few-shot (AF-CLIP+): ``build_memory(images)`` stores the aggregated *raw* CLIP patch tokens of k
normal images (no adaptor), L2-normalised, as S banks; ``model(batch, memory=bank)`` scores each
query patch by ``min over the bank of (1 - cos) / 2`` averaged over the banks, image score = max
over patches, and combines with the zero-shot outputs at grid resolution:
``map = map_mem + alpha * map_zs``, ``score = score_mem + alpha * score_zs``.
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
from zsad_jax.layers import aggregate_neighbours, gaussian_filter, resize_bilinear
from zsad_jax.methods.backbone import build_backbone, build_tokenizer
from zsad_jax.methods.base import AnomalyModel
from zsad_jax.nn import (
    DTYPES,
    Buffer,
    Trainable,
    l2_normalize,
    resolve_compute_dtype,
    torch_linear,
    trainable,
)
from zsad_jax.prompts import AF_CLIP_STATES

_HERE = "zsad_jax/methods/af_clip.py"


class AttentionAdaptor(nnx.Module):
    """AF-CLIP's adaptor (``clip/adaptor.py``: ``BasicTransformerBlock``): ``LayerNorm`` then
    multi-head self-attention over all tokens; the output *replaces* the tokens (no residual).

    ``to_q/to_k/to_v``: width -> heads*head_dim without bias; ``to_out``: back to width with bias
    (dropout 0). PyTorch default initialisation (LN 1/0, Linear U(+-1/sqrt(fan_in))).
    """

    def __init__(
        self,
        width: int,
        *,
        heads: int = 8,
        head_dim: int = 64,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nnx.LayerNorm(
            width, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, rngs=rngs
        )
        self.to_q, self.to_k, self.to_v = (
            torch_linear(width, inner, use_bias=False, dtype=dtype, rngs=rngs) for _ in "qkv"
        )
        self.to_out = torch_linear(inner, width, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (N, T, width) -> (N, T, width) float32."""
        n, t, _ = tokens.shape
        x = self.norm(tokens.astype(jnp.float32))
        q, k, v = (
            f(x).reshape(n, t, self.heads, self.head_dim) for f in (self.to_q, self.to_k, self.to_v)
        )
        out = dot_product_attention(q, k, v).reshape(n, t, self.heads * self.head_dim)
        return self.to_out(out).astype(jnp.float32)


def _layers_field(value: Any, field: str, depth: int) -> tuple[int, ...]:
    layers = tuple(int(i) for i in value)
    if not layers or any(not 1 <= i <= depth for i in layers):
        raise ValueError(
            f"configs/af_clip.py: {field}={layers} must name blocks 1..{depth} of this "
            f"backbone ((6, 12, 18, 24) for ViT-L/14, (1, 2, 3) for the tiny preset); set "
            f"--config.{field}=..."
        )
    return layers


def _aggregation_sizes(value: Any) -> tuple[int, ...]:
    sizes = tuple(int(r) for r in value)
    if not sizes or any(r < 1 or r % 2 == 0 for r in sizes):
        raise ValueError(
            f"configs/af_clip.py: model.aggregation_sizes={sizes} must be positive odd window "
            "sizes, e.g. (1, 3, 5)"
        )
    return sizes


def _check_image_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(
            f"configs/af_clip.py: data.image_size={image_size} is not a multiple of the backbone "
            f"patch size {patch_size}"
        )


class AfClip(AnomalyModel):
    """AF-CLIP with its few-shot extension AF-CLIP+ (see the module docstring).

    Trained state (``Trainable``): ``adaptor`` (2,100,224 weights at ViT-L/14) and
    ``state_prompt_embedding`` (1, prompt_length, text width) = 9,216; total 2,109,440.
    Frozen: the whole CLIP (``backbone``), the tokenised state prompts (``state_prompt_ids``).
    """

    def __init__(self, config, *, rngs: nnx.Rngs, load_weights: bool = True):
        m = config.model
        dtype = resolve_compute_dtype(config.compute_dtype)
        self.compute_dtype = DTYPES[dtype]
        self.backbone = build_backbone(
            m.backbone,
            rngs=rngs,
            load_weights=load_weights,
            act=m.act,
            pos_resize=m.pos_resize,
            dtype=dtype,
        )
        vision, text = self.backbone.vision.config, self.backbone.text.config
        depth = vision.layers
        self.feature_layers = _layers_field(m.feature_layers, "model.feature_layers", depth)
        self.memory_layers = _layers_field(m.memory_layers, "model.memory_layers", depth)
        self.aggregation_sizes = _aggregation_sizes(m.aggregation_sizes)
        self.aggregation_sigma = float(m.aggregation_sigma)
        self.temperature = float(m.temperature)
        self.smoothing_sigma = float(m.smoothing_sigma)
        self.alpha = float(m.few_shot.alpha)
        self.rescale_few_shot = bool(m.few_shot.rescale)
        # (name, value) pairs, not a dict: module attributes go into the graphdef, which must be
        # hashable to be a static argument of jax.jit.
        self.loss_config = tuple((k, float(v)) for k, v in m.loss.items())
        self.patch_size = vision.patch_size
        _check_image_size(int(config.data.image_size), vision.patch_size)

        self.adaptor = trainable(
            AttentionAdaptor(
                vision.width,
                heads=int(m.adaptor.heads),
                head_dim=int(m.adaptor.head_dim),
                dtype=self.compute_dtype,
                rngs=rngs,
            )
        )
        n_ctx = int(m.prompt_length)
        self.prompt_length = n_ctx
        self.state_prompt_embedding = Trainable(
            0.01 * jax.random.normal(rngs.params(), (1, n_ctx, text.width), jnp.float32)
        )
        ids = self._tokenize_states(m.backbone, text.context_length, load_weights)
        self.state_prompt_ids = Buffer(jnp.asarray(ids))

    # ------------------------------------------------------------------------------------------
    # Text side.

    def _tokenize_states(self, backbone_cfg, context_length: int, load_weights: bool) -> np.ndarray:
        """(2, context_length) int32 ids of (normal, abnormal) state sentences."""
        try:
            tokenizer = build_tokenizer(backbone_cfg)
        except FileNotFoundError:
            if load_weights:
                raise
            # Shapes only (``load_weights=False`` without converted files): never run.
            return np.zeros((2, context_length), np.int32)
        ids = tokenizer(list(AF_CLIP_STATES), context_length)
        last = self.prompt_length + int(ids.argmax(axis=-1).max())
        if last >= context_length:
            raise ValueError(
                f"configs/af_clip.py: model.prompt_length={self.prompt_length} leaves no room for "
                f"the state sentences' EOT in a {context_length}-token context; shorten it"
            )
        return ids

    def set_classes(self, names: Sequence[str]) -> None:
        """AF-CLIP's prompts carry no class name: nothing depends on the categories."""
        del names

    def encode_states(self) -> jax.Array:
        """(2, joint dim) L2-normalised embeddings of (normal, abnormal) with the learnt context
        (``CLIP.encode_state_prompt``)."""
        ids = self.state_prompt_ids[...]
        embedding, _ = self.backbone.text(ids, context=self.state_prompt_embedding[...])
        return l2_normalize(embedding)

    # ------------------------------------------------------------------------------------------
    # Vision side.

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{_HERE}: batch['image'] must be (B, H, W, 3) normalised NHWC, got {images.shape}"
            )
        return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

    def _layer_tokens(self, images: jax.Array, layers: Sequence[int]) -> dict[int, jax.Array]:
        """Residual streams (B, T, D) float32 after each block in ``layers`` (frozen: no grads)."""
        _, aux = self.backbone.vision(images, layers=tuple(sorted(set(layers))))
        return {i: jax.lax.stop_gradient(x.astype(jnp.float32)) for i, x in aux["layers"].items()}

    def aggregate(self, layer_tokens: Sequence[jax.Array], grid: tuple[int, int]) -> jax.Array:
        """Per layer (official order: layer-major), every aggregation window -> (S, B, T, D)."""
        sets = []
        for tokens in layer_tokens:
            sets += aggregate_neighbours(
                tokens, grid, self.aggregation_sizes, sigma=self.aggregation_sigma
            )
        return jnp.stack(sets)

    def project(self, token_sets: jax.Array) -> jax.Array:
        """(S, B, T, D) -> shared adaptor -> frozen ``ln_post`` and ``proj`` -> (S, B, T, E)."""
        s, b, t, d = token_sets.shape
        adapted = self.adaptor(token_sets.reshape(s * b, t, d))
        return self.backbone.vision.head(adapted).reshape(s, b, t, -1)

    def state_probabilities(self, projected: jax.Array, text: jax.Array) -> jax.Array:
        """(S, B, T, E) tokens, (2, E) unit text -> softmax of the logits summed over the S sets,
        (B, T, 2) float32 (``detect_forward_seg``)."""
        logits = jnp.einsum(
            "sbte,ke->sbtk", l2_normalize(projected), text, precision=jax.lax.Precision.HIGHEST
        )
        return jax.nn.softmax(jnp.sum(logits / self.temperature, axis=0), axis=-1)

    # ------------------------------------------------------------------------------------------
    # Few-shot memory (AF-CLIP+).

    def build_memory(self, images: jax.Array) -> jax.Array:
        """k normal images (k, H, W, 3) -> memory banks (S, k*h*w, D) float32 (``store_memory``).

        Raw CLIP tokens after ``memory_layers`` (no adaptor, no projection), aggregated like the
        zero-shot path, patches only, L2-normalised. Use images of the query's size and category.
        """
        grid = self._grid(images)
        taps = self._layer_tokens(images, self.memory_layers)
        sets = self.aggregate([taps[i] for i in self.memory_layers], grid)
        s, k, t, d = sets.shape
        return l2_normalize(sets[:, :, 1:]).reshape(s, k * (t - 1), d)

    def memory_scores(
        self, layer_tokens: dict[int, jax.Array], memory: jax.Array, grid: tuple[int, int]
    ) -> tuple[jax.Array, jax.Array]:
        """Nearest-neighbour distances to the banks -> (map (B, h, w), image score (B,)), each in
        [0, 1] (``detect_forward_memorybank``)."""
        sets = self.aggregate([layer_tokens[i] for i in self.memory_layers], grid)
        if memory.ndim != 3 or memory.shape[0] != sets.shape[0] or memory.shape[2] != sets.shape[3]:
            raise ValueError(
                f"{_HERE}: memory must be ({sets.shape[0]}, M, {sets.shape[3]}) from "
                f"AfClip.build_memory with this config, got {tuple(memory.shape)}"
            )
        queries = l2_normalize(sets[:, :, 1:])

        def one_bank(args):  # one bank at a time: (B, N, M) similarities, not (S, B, N, M)
            q, bank = args
            sim = jnp.einsum("bnd,md->bnm", q, bank, precision=jax.lax.Precision.HIGHEST)
            return jnp.min(1.0 - sim, axis=-1) / 2.0

        distances = jax.lax.map(one_bank, (queries, memory.astype(jnp.float32)))  # (S, B, N)
        patch = jnp.mean(distances, axis=0)
        return patch.reshape(patch.shape[0], *grid), jnp.max(patch, axis=-1)

    # ------------------------------------------------------------------------------------------
    # The interface.

    def __call__(
        self,
        batch: dict[str, jax.Array],
        *,
        train: bool = False,
        memory: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """batch["image"] (B, H, W, 3) -> outputs.

        Returns:
          anomaly_map (B, H, W): bilinear upsampling of the grid map (plus, when not ``train``,
            Gaussian smoothing with ``model.smoothing_sigma``);
          pred_score (B,); patch_map (B, h, w) and image_prob (B,): the zero-shot AF-CLIP outputs
          the loss uses; projected_patches (S, B, h*w, E): the adapted patch token sets (patch
          alignment loss). With ``memory`` (from ``build_memory``) the map and score are AF-CLIP+'s
          combination (in [0, 1 + alpha], or [0, 1] with ``model.few_shot.rescale``), and
          memory_map / memory_score hold the memory part alone.
        """
        images = batch["image"]
        grid = self._grid(images)
        layers = self.feature_layers + (self.memory_layers if memory is not None else ())
        taps = self._layer_tokens(images, layers)
        projected = self.project(self.aggregate([taps[i] for i in self.feature_layers], grid))
        probs = self.state_probabilities(projected, self.encode_states())
        image_prob = probs[:, 0, 1]
        patch_map = probs[:, 1:, 1].reshape(images.shape[0], *grid)
        outputs = {
            "image_prob": image_prob,
            "patch_map": patch_map,
            "projected_patches": projected[:, :, 1:],
        }
        score, grid_map = image_prob, patch_map
        if memory is not None:
            memory_map, memory_score = self.memory_scores(taps, memory, grid)
            grid_map = memory_map + self.alpha * patch_map
            score = memory_score + self.alpha * image_prob
            if self.rescale_few_shot:  # a positive scale: every ranking metric is unchanged
                grid_map, score = grid_map / (1 + self.alpha), score / (1 + self.alpha)
            outputs.update(memory_map=memory_map, memory_score=memory_score)
        anomaly_map = resize_bilinear(grid_map, images.shape[1:3])
        if not train and self.smoothing_sigma > 0:
            anomaly_map = gaussian_filter(anomaly_map, self.smoothing_sigma)
        outputs.update(anomaly_map=anomaly_map, pred_score=score)
        return outputs

    def patch_targets(self, gt_mask: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """(B, H, W) mask -> bilinear (align_corners=False, no antialias) to the grid -> >= 0.5,
        (B, h, w) float32 in {0, 1} (``main.py``: ``F.interpolate`` then threshold 0.5)."""
        resized = resize_bilinear(gt_mask.astype(jnp.float32), grid)
        return losses.binary_target(resized)

    def loss(
        self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``focal(img) + lambda1 (focal(map) + L1(map)) + lambda2 * patch alignment`` (§1.6)."""
        c = dict(self.loss_config)
        grid = outputs["patch_map"].shape[1:]
        targets = self.patch_targets(batch["gt_mask"], grid)
        valid = batch.get("has_mask")
        image = losses.binary_focal_loss(outputs["image_prob"], batch["gt_label"], gamma=c["gamma"])
        pixel_focal = losses.binary_focal_loss(
            outputs["patch_map"],
            targets,
            gamma=c["gamma"],
            normal_target=c["normal_target"],
            valid=valid,
        )
        pixel_l1 = losses.l1_loss(outputs["patch_map"], targets, valid=valid)
        alignment = losses.patch_alignment_loss(
            outputs["projected_patches"], targets.reshape(targets.shape[0], -1), valid=valid
        )
        total = image + c["lambda1"] * (pixel_focal + pixel_l1) + c["lambda2"] * alignment
        return total, {
            "image_focal": image,
            "pixel_focal": pixel_focal,
            "pixel_l1": pixel_l1,
            "patch_alignment": alignment,
        }
