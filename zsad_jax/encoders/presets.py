"""Every named encoder architecture, in one table: ``PRESETS[kind][name]()`` is the config a
``model.backbone.preset`` names (``configs.common.backbone``), built when no converted weights are
read.

The full-size presets are the released models the methods run on; ``tiny`` (tests) and ``small``
(the CPU demo) are random-weight architectures whose CLIP text towers take the byte-level
tokenizer's prompts (``methods.backbone.byte_tokenizer``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zsad_jax.encoders.clip import ClipConfig, ClipTextConfig, ClipVisionConfig
from zsad_jax.encoders.dinov3 import DinoV3Config

# Random-init CLIP text towers use the byte-level vocabulary without merges (``byte_tokenizer``):
# 512 byte symbols + SOS + EOT.
BYTE_VOCAB_SIZE = 514


def clip_vit_l14_336(**overrides: Any) -> ClipConfig:
    """OpenAI CLIP ViT-L/14@336px (``ViT-L-14-336px.pt``, ``openai/clip-vit-large-patch14-336``)."""
    return ClipConfig().with_overrides(**overrides)


def clip_tiny(**overrides: Any) -> ClipConfig:
    """A few-kilobyte CLIP with the full architecture, for tests. Widths differ between the towers
    and from the head count so that transposition mistakes change shapes."""
    vision = ClipVisionConfig(
        width=48, layers=3, heads=4, patch_size=4, image_size=16, output_dim=24, mlp_dim=96
    )
    text = ClipTextConfig(
        width=32,
        layers=3,
        heads=4,
        context_length=16,
        vocab_size=100,
        output_dim=24,
        mlp_dim=64,
    )
    return ClipConfig(vision=vision, text=text).with_overrides(**overrides)


def _clip_tiny_byte_text() -> ClipConfig:
    """``clip_tiny`` with a text tower that takes byte-tokenised 77-token prompts."""
    c = clip_tiny()
    text = dataclasses.replace(c.text, vocab_size=BYTE_VOCAB_SIZE, context_length=77)
    return dataclasses.replace(c, text=text)


def _clip_small() -> ClipConfig:
    """A small CLIP for the CPU demo: patch 8 on 128-pixel images (16x16 patches), 6 blocks."""
    vision = ClipVisionConfig(
        width=96, layers=6, heads=4, patch_size=8, image_size=128, output_dim=64, mlp_dim=192
    )
    text = ClipTextConfig(
        width=64,
        layers=2,
        heads=4,
        context_length=77,
        vocab_size=BYTE_VOCAB_SIZE,
        output_dim=64,
        mlp_dim=128,
    )
    return ClipConfig(vision=vision, text=text)


def dinov3_vits16() -> DinoV3Config:
    """ViT-S/16 (``dinov3_vits16``, 21M parameters)."""
    return DinoV3Config(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536)


def dinov3_vitb16() -> DinoV3Config:
    """ViT-B/16 (``dinov3_vitb16``, 86M parameters)."""
    return DinoV3Config(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)


def dinov3_vitl16() -> DinoV3Config:
    """ViT-L/16 (``dinov3_vitl16``, 300M parameters): the AVA-DINO backbone."""
    return DinoV3Config(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)


def dinov3_tiny() -> DinoV3Config:
    """A few-thousand-parameter DINOv3 with the same structure, for tests and smoke runs."""
    return DinoV3Config(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


def _dinov3_small() -> DinoV3Config:
    """A small DINOv3 for the CPU demo: patch 8 on 128-pixel images (16x16 patches), 6 blocks."""
    return DinoV3Config(hidden_size=96, num_layers=6, num_heads=4, mlp_dim=192, patch_size=8)


PRESETS = {
    "clip": {
        "vit_l14_336": clip_vit_l14_336,
        "tiny": _clip_tiny_byte_text,
        "small": _clip_small,
    },
    "dinov3": {
        "vits16": dinov3_vits16,
        "vitb16": dinov3_vitb16,
        "vitl16": dinov3_vitl16,
        "tiny": dinov3_tiny,
        "small": _dinov3_small,
    },
}
