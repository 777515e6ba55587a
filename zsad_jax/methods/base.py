"""The one interface every method implements; training, evaluation and prediction use only this.

Batches are dicts of arrays with anomalib's field names::

    image     (B, H, W, 3) float32, already resized and normalised for the method
    gt_label  (B,) int32     0 normal / 1 anomalous
    gt_mask   (B, H, W) float32 in {0, 1}
    has_mask  (B,) bool      False for images with image-level labels only (pixel losses skip them)
    class_id  (B,) int32     index into the class names given to ``set_classes``

A method returns::

    anomaly_map  (B, H, W) float32 in [0, 1] at the input resolution
    pred_score   (B,) float32 in [0, 1]
    ...          auxiliary outputs its loss needs (logits, per-layer maps, routing weights)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class AnomalyModel(nnx.Module):
    """A frozen encoder plus trainable heads (``zsad_jax.nn.Trainable`` variables only)."""

    def set_classes(self, names: Sequence[str]) -> None:
        """Prepares per-class text (tokenised prompts, cached embeddings) for ``class_id`` lookups.

        Called outside ``jit`` before training or evaluation with the categories of that split
        (evaluation calls it after the trained weights are loaded). Methods without
        class-dependent text may ignore it. Contract:

        * it returns with the text computed (block on it): its cost belongs to the set-up, not to
          the first forward;
        * text through frozen weights only is computed once per class and may be kept on disk
          (``zsad_jax.text_cache``, e.g. AVA-DINO's prompt ensemble);
        * text through trained weights (ACD-CLIP's text adapters) may be cached for inference only
          if the forward detects weights changed after this call and never uses stale text.
        """

    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss(
        self, outputs: dict[str, jax.Array], batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the scalar training loss (float32) and its named parts for logging."""
        raise NotImplementedError


# The image-score rule ACD-CLIP's official code uses and AVA-DINO offers as a switch.


def checked_score_weight(value, config_file: str, official: float) -> float:
    """``model.image_score_weight`` as a float in [0, 1], or a one-line error naming the file."""
    weight = float(value)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(
            f"{config_file}: model.image_score_weight={weight} must be in [0, 1] "
            f"(pred_score = w * p_image + (1 - w) * max(map); official: {official:g})"
        )
    return weight


def blended_image_score(image_prob: jax.Array, anomaly_map: jax.Array, weight: float) -> jax.Array:
    """``w * image_prob + (1 - w) * max(anomaly_map)`` per image; w = 0 is exactly the maximum."""
    map_max = jnp.max(anomaly_map, axis=(1, 2))
    if weight == 0.0:
        return map_max
    return weight * image_prob + (1.0 - weight) * map_max
