"""Two training-free baselines as ``AnomalyModel``s, scored by ``zsad_jax.evaluate.evaluate``
exactly as a trained model is (same transform, resolution, metrics, per-category means), so their
numbers sit beside a model's on the same images:

``colour_median``        distance of each pixel's colour (the normalised input) to the image's
                         per-channel median colour; image score = the map's maximum.
``random_token_median``  distance of each token of a *random* frozen DINOv3 (the ``small`` preset,
                         weights from ``config.seed``, the config's tapped ``model.layers`` through
                         the final norm) to the image's per-channel median token, averaged over
                         the layers and upsampled bilinearly (align_corners) to the input;
                         image score = the map's maximum.

``backbone_token_median`` is the second with the config's own backbone (e.g. a pretrained one):
what the frozen features give before any head is trained (not training-free when the backbone
was pretrained; reported for reference). ``zsad_jax.transfer`` reports them beside a model.

Built from a config (``build_baseline``), they get its test-time ``model.smoothing_sigma`` too
(the map smoothed after the image score took its maximum, as AVA-DINO does): a model's smoothed
maps are compared with smoothed baselines, not with raw ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from zsad_jax.layers import gaussian_filter, resize_bilinear
from zsad_jax.methods.backbone import build_backbone
from zsad_jax.methods.base import AnomalyModel

BASELINES = ("colour_median", "random_token_median", "backbone_token_median")
TRAINING_FREE = ("colour_median", "random_token_median")


def _bounded(d: jax.Array) -> jax.Array:
    """A non-negative distance -> [0, 1), order kept (maps are [0, 1] by the interface)."""
    return d / (1.0 + d)


def _outputs(anomaly_map: jax.Array, smoothing_sigma: float) -> dict[str, jax.Array]:
    """Image score = the map's maximum; then the map smoothed with ``smoothing_sigma`` (0: none)."""
    score = jnp.max(anomaly_map, axis=(1, 2))
    if smoothing_sigma > 0:
        anomaly_map = gaussian_filter(anomaly_map, smoothing_sigma)
    return {"anomaly_map": anomaly_map, "pred_score": score}


class ColourMedianDistance(AnomalyModel):
    """Per-pixel distance to the image's median colour (no weights)."""

    def __init__(self, smoothing_sigma: float = 0.0):
        self.smoothing_sigma = float(smoothing_sigma)

    def __call__(self, batch, *, train: bool = False):
        del train
        x = batch["image"].astype(jnp.float32)
        median = jnp.median(x, axis=(1, 2), keepdims=True)
        return _outputs(_bounded(jnp.linalg.norm(x - median, axis=-1)), self.smoothing_sigma)


class TokenMedianDistance(AnomalyModel):
    """Distance of each patch token to the image's median token, over tapped DINOv3 blocks."""

    def __init__(self, backbone: nnx.Module, layers: Sequence[int], smoothing_sigma: float = 0.0):
        self.backbone = backbone
        self.layers = tuple(int(i) for i in layers)
        self.smoothing_sigma = float(smoothing_sigma)

    def __call__(self, batch, *, train: bool = False):
        del train
        images = batch["image"]
        _, aux = self.backbone(images, layers=self.layers)
        grid = self.backbone.patch_grid(images.shape[1], images.shape[2])
        prefix = self.backbone.num_prefix_tokens
        maps = []
        for i in self.layers:
            tokens = self.backbone.norm(aux["layers"][i].astype(jnp.float32))[:, prefix:]
            median = jnp.median(tokens, axis=1, keepdims=True)
            d = jnp.linalg.norm(tokens - median, axis=-1)
            d = d.reshape(images.shape[0], *grid, 1)
            maps.append(resize_bilinear(d, images.shape[1:3], align_corners=True)[..., 0])
        return _outputs(_bounded(jnp.mean(jnp.stack(maps), axis=0)), self.smoothing_sigma)


def random_backbone_config(config: Any) -> ml_collections.ConfigDict:
    """The demo's random frozen encoder: DINOv3 ``small`` preset with random weights."""
    return ml_collections.ConfigDict(
        {"kind": "dinov3", "checkpoint": None, "preset": "small", "random_init": True}
    )


def build_baseline(name: str, config: Any) -> AnomalyModel:
    """One of ``BASELINES`` for ``config`` (its layers, seed, test-time smoothing and, for
    ``backbone_token_median``, its backbone)."""
    sigma = float(config.model.get("smoothing_sigma", 0.0))
    if name == "colour_median":
        return ColourMedianDistance(sigma)
    if name == "random_token_median":
        rngs = nnx.Rngs(int(config.seed))
        encoder = build_backbone(random_backbone_config(config), rngs=rngs)
        depth = encoder.config.num_layers
        layers = [i for i in config.model.layers if 1 <= int(i) <= depth] or [depth]
        return TokenMedianDistance(encoder, layers, sigma)
    if name == "backbone_token_median":
        encoder = build_backbone(config.model.backbone, rngs=nnx.Rngs(int(config.seed)))
        return TokenMedianDistance(encoder, config.model.layers, sigma)
    raise ValueError(f"unknown baseline {name!r}; known: {list(BASELINES)}")
