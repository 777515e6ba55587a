"""ACD-CLIP's Dynamic Fusion Gateway (methods.md §3.6; ``ACDCLIP.vision_text_fusion_gate_seg`` of
cockmake/ACD-CLIP @2026067 ``model/adapter.py``, re-written here).

For vision group g, the mean over patches of its (normalised) segmentation tokens goes through
``Linear(E -> hidden) -> GELU (exact) -> Linear(hidden -> 2 N)``; the 2 N outputs are read as
(N, 2) (output ``2 j + c`` = group j, state c) and softmax-ed over the N groups, separately for the
normal (c = 0) and abnormal (c = 1) columns. The fused text of group g is then
``sum_j gate[j, c] * T_j[:, c]`` (not re-normalised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zsad_jax.layers.conv_lora import torch_linear


class DynamicFusionGateway(nnx.Module):
    """Per-image weights over the N text groups, for one vision group."""

    def __init__(self, width: int, n_groups: int, *, hidden: int = 256, rngs: nnx.Rngs):
        self.n_groups = n_groups
        self.fc1 = torch_linear(width, hidden, rngs=rngs)
        self.fc2 = torch_linear(hidden, 2 * n_groups, rngs=rngs)

    def weights(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, P, E) -> gate (B, N, 2) float32, each column summing to 1 over N."""
        pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
        logits = self.fc2(jax.nn.gelu(self.fc1(pooled), approximate=False))
        logits = logits.reshape(logits.shape[0], self.n_groups, 2)
        return jax.nn.softmax(logits, axis=1)

    def __call__(self, tokens: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
        """tokens (B, P, E), text (N, B, E, 2) per-group state embeddings -> (fused text (B, E, 2),
        gate (B, N, 2))."""
        gate = self.weights(tokens)
        fused = jnp.einsum("nbec,bnc->bec", text.astype(jnp.float32), gate)
        return fused, gate
