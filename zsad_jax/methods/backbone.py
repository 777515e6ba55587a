"""The frozen encoders a method runs on, from a converted checkpoint or a named preset.

A config's ``model.backbone`` (see ``configs.common.backbone``) says which::

    kind         "clip" | "dinov3"
    checkpoint   a directory written by ``python -m convert.clip`` / ``python -m convert.dinov3``
    preset       the architecture used when no weights are read (``zsad_jax.encoders.presets``)
    random_init  True: random weights from ``preset`` (tests and the synthetic demo only)

``build_backbone(cfg, rngs=..., load_weights=False)`` builds the architecture without reading any
weights (under ``nnx.eval_shape``: ``python -m zsad_jax.summary``, shape checks of full-size
configs); the architecture comes from the checkpoint's ``config.json`` when it exists, else from
the preset.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from flax import nnx

from zsad_jax.encoders import checkpoint, clip, dinov3
from zsad_jax.encoders.presets import PRESETS
from zsad_jax.encoders.tokenizer import ClipTokenizer, openai_vocab


def _check_kind(cfg: Any, where: str) -> str:
    kind = str(cfg.kind)
    if kind not in PRESETS:
        raise ValueError(f"{where}.kind={kind!r} is not an encoder; use one of {list(PRESETS)}")
    return kind


def preset_config(cfg: Any, where: str = "config.model.backbone") -> dict[str, Any]:
    """The architecture dict of ``cfg.preset`` (what a converted ``config.json`` holds)."""
    kind = _check_kind(cfg, where)
    presets = PRESETS[kind]
    if cfg.preset not in presets:
        raise ValueError(
            f"{where}.preset={cfg.preset!r} is not a {kind} preset; use one of {sorted(presets)}"
        )
    return presets[cfg.preset]().to_dict()


def missing_weights_message(cfg: Any, where: str) -> str:
    script = "convert.clip" if cfg.kind == "clip" else "convert.dinov3"
    source = (
        "a Hugging Face CLIP directory or OpenAI ViT-L-14-336px.pt"
        if cfg.kind == "clip"
        else "a Hugging Face DINOv3 directory or dinov3_vitl16_pretrain_*.pth"
    )
    # A relative path is read from the folder the command runs in, not where training ran.
    relative = "" if Path(cfg.checkpoint).is_absolute() else f" (read from {os.getcwd()})"
    return (
        f"{where}.checkpoint={cfg.checkpoint!r}: no converted {cfg.kind} weights there"
        f"{relative}. This config needs pretrained weights; convert them once with\n"
        f"    python -m {script} --src SRC --out {cfg.checkpoint}\n"
        f"where SRC is {source} (see README, 'Pretrained weights'), or point "
        f"--config.{where.removeprefix('config.')}.checkpoint at your converted directory."
    )


def build_backbone(
    cfg: Any,
    *,
    rngs: nnx.Rngs,
    load_weights: bool = True,
    part: str | None = None,
    where: str = "config.model.backbone",
    **overrides: Any,
) -> nnx.Module:
    """The frozen encoder of ``cfg`` (a ``clip.Clip`` or a ``dinov3.DinoV3``).

    Args:
      cfg: the ``model.backbone`` config block.
      rngs: used for random weights (``random_init`` or ``load_weights=False``).
      load_weights: False builds the architecture only (call it under ``nnx.eval_shape``).
      part: one submodule only, e.g. ``"text"`` for CLIP's text tower (the rest is never built
        nor read from the checkpoint).
      where: the config path named in errors.
      **overrides: architecture fields that change no weight shape (CLIP ``act``, ``pos_resize``,
        ``dtype``; DINOv3 ``dtype``).

    Raises:
      FileNotFoundError: weights are wanted but ``cfg.checkpoint`` holds no converted encoder;
        the message says how to convert them.
    """
    kind = _check_kind(cfg, where)
    path = Path(cfg.checkpoint) if cfg.checkpoint else None
    has_checkpoint = path is not None and (path / checkpoint.CONFIG_FILE).is_file()
    if load_weights and not cfg.random_init:
        if not has_checkpoint:
            raise FileNotFoundError(missing_weights_message(cfg, where))
        found = checkpoint.read_meta(path)["type"]
        if found != kind:
            raise ValueError(
                f"{where}.checkpoint={str(path)!r} holds a {found} encoder, but {where}.kind is "
                f"{kind!r}"
            )
        return checkpoint.load(path, submodule=part, **overrides)
    if has_checkpoint and not cfg.random_init:
        arch = checkpoint.read_meta(path)["config"]
    else:
        arch = preset_config(cfg, where)
    if kind == "clip":
        config = clip.ClipConfig.from_dict(arch).with_overrides(**overrides)
        if part == "text":  # Built alone: the vision tower is never allocated.
            return clip.ClipText(config.text, rngs=rngs)
        if part == "vision":
            return clip.ClipVision(config.vision, rngs=rngs)
        encoder = clip.Clip(config, rngs=rngs)
    else:
        encoder = dinov3.build(arch, rngs, **overrides)
    if part is not None and not isinstance(getattr(encoder, part, None), nnx.Module):
        raise ValueError(f"{where}: a {kind} encoder has no part {part!r}")
    return encoder if part is None else getattr(encoder, part)


def byte_tokenizer() -> ClipTokenizer:
    """CLIP's tokenizer with no merges: every UTF-8 byte is a token (vocabulary 514).

    Only for random-weight text towers (tests, the synthetic demo), whose vocabulary has no
    pretrained meaning anyway; prompts tokenise to about one id per character.
    """
    return ClipTokenizer(openai_vocab([]), [], source="<byte-level, no merges>")


@dataclasses.dataclass(frozen=True)
class TokenizerSource:
    """What ``build_tokenizer`` reads of an encoder config block, as a hashable value: a method
    keeps it as a (graph-static) attribute to rebuild the tokenizer in ``set_classes``. ``kind``
    and ``where`` are for the missing-weights message."""

    checkpoint: str | None
    random_init: bool
    kind: str = "clip"
    where: str = "config.model.backbone"

    @classmethod
    def of(cls, cfg: Any, where: str = "config.model.backbone") -> TokenizerSource:
        return cls(cfg.checkpoint, bool(cfg.random_init), str(cfg.kind), where)

    def build(self) -> ClipTokenizer:
        return build_tokenizer(self, self.where)


def build_tokenizer(cfg: Any, where: str = "config.model.backbone") -> ClipTokenizer:
    """The tokenizer matching the CLIP text tower of ``cfg``: the converted checkpoint's BPE files,
    or the byte-level tokenizer for random weights."""
    if cfg.random_init or not cfg.checkpoint:
        return byte_tokenizer()
    path = Path(cfg.checkpoint)
    if not (path / checkpoint.CONFIG_FILE).is_file():
        raise FileNotFoundError(missing_weights_message(cfg, where))
    return ClipTokenizer.from_dir(path)
