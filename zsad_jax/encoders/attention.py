"""The attention core shared by the CLIP and DINOv3 encoders (one place to tune for speed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    return_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention with scale 1/sqrt(head_dim).

    Args:
      q, k, v: (B, T, heads, head_dim).
      mask: optional boolean (T, T) or (B, heads, T, T); True = attend.
      return_probs: also return the attention probabilities (B, heads, T, T), float32.

    Returns:
      (B, T, heads, head_dim) [, probs].
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return (out, probs) if return_probs else out
