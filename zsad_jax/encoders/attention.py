"""The attention core shared by the CLIP and DINOv3 encoders (one place to tune for speed).

On CPU, the textbook formulation (one (B, heads, T, T) logits tensor, softmax, then probs @ v) is
memory-bound for ViT-L at 518 px: 16 x 1370 x 1370 float32 logits are 120 MB per block, written
and re-read by several passes, far beyond the caches. On the CPU backend the core therefore runs
one head and one block of queries at a time (``jax.lax.map``), so each (queries, T) slab of logits
stays in cache while it is produced, normalised and multiplied by v; the FLOPs and the result are
unchanged (to float32 rounding). On GPU/TPU, XLA's fused softmax on the whole tensor is the fast
path and is kept. The measurements behind this are in ``bench/encoders.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Query rows per slab on CPU: ~256 keeps a (256, T) float32 slab around 1.4 MB at T = 1370.
CPU_QUERY_BLOCK = 256


def _dense_attention(q, k, v, mask, return_probs):
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return (out, probs) if return_probs else out


def _blocked_attention(q, k, v, query_block: int):
    """Same result as ``_dense_attention`` without a mask, one (head, query block) at a time."""
    b, t, h, d = q.shape
    n_blocks = math.ceil(t / query_block)
    rows = math.ceil(t / n_blocks)  # even blocks: at most n_blocks - 1 padded rows in total
    q = q * jnp.asarray(d**-0.5, q.dtype)
    # (heads, B, T, d): each head's operands contiguous for the per-head loop.
    qh, kh, vh = (x.transpose(2, 0, 1, 3) for x in (q, k, v))
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n_blocks * rows - t), (0, 0)))
    # (heads, n_blocks, B, rows, d)
    qh = qh.reshape(h, b, n_blocks, rows, d).transpose(0, 2, 1, 3, 4)

    def one_head(args):
        q_blocks, k_head, v_head = args

        def one_block(q_block):
            logits = jnp.einsum("bqd,bkd->bqk", q_block, k_head, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits, axis=-1)
            return jnp.einsum("bqk,bkd->bqd", probs.astype(v_head.dtype), v_head)

        return jax.lax.map(one_block, q_blocks)

    out = jax.lax.map(one_head, (qh, kh, vh))  # (heads, n_blocks, B, rows, d)
    out = out.transpose(2, 1, 3, 0, 4).reshape(b, n_blocks * rows, h, d)
    return out[:, :t]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    return_probs: bool = False,
    query_block: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention with scale 1/sqrt(head_dim).

    Args:
      q, k, v: (B, T, heads, head_dim).
      mask: optional boolean, broadcastable to (B, heads, T, T); True = attend.
      return_probs: also return the attention probabilities (B, heads, T, T), float32.
      query_block: query rows per slab on the CPU backend (no effect elsewhere); default
        ``CPU_QUERY_BLOCK``, read at trace time.

    Returns:
      (B, T, heads, head_dim) [, probs].
    """
    query_block = CPU_QUERY_BLOCK if query_block is None else query_block
    if mask is not None or return_probs or q.shape[1] <= query_block:
        return _dense_attention(q, k, v, mask, return_probs)
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        cpu=lambda q, k, v: _blocked_attention(q, k, v, query_block),
        default=lambda q, k, v: _dense_attention(q, k, v, None, False),
    )
