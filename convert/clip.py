"""Converts a PyTorch CLIP checkpoint into a zsad_jax encoder checkpoint (CPU).

    python -m convert.clip --src SRC --out OUT [--dtype float32] [--bpe FILE] [--overwrite]

SRC is either
  * a transformers CLIP directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, e.g. a download of ``openai/clip-vit-large-patch14-336``); heads,
    activation and LayerNorm epsilon come from ``config.json``, everything else from the array
    shapes; ``vocab.json`` and ``merges.txt`` are copied into OUT when present; or
  * an OpenAI / open_clip state dict (``.pt``/``.pth``/``.bin``/``.safetensors``, OpenAI's
    TorchScript ``ViT-L-14-336px.pt`` included): the architecture is inferred from the shapes as
    OpenAI's ``build_model`` does (64-wide heads, QuickGELU, epsilon 1e-5). A
    ``bpe_simple_vocab_16e6.txt.gz`` next to it, or given with ``--bpe``, is copied into OUT.

The tokenizer files must read as a CLIP tokenizer whose ids (SOS and EOT included) all index the
text tower's token embedding; an ``OUT`` that already holds a converted checkpoint is replaced only
with ``--overwrite``, and one holding other files never is.

``--dtype`` is the compute dtype recorded in the converted config (weights are always stored as
float32; a method can still override it at load time). Every source key is used or explicitly
ignored (OpenAI's ``input_resolution``/``context_length``/``vocab_size`` scalars, transformers'
``position_ids`` buffers); anything else raises with the key lists, and every shape is checked
against the model. Check the result with ``python -m convert.verify --src SRC --converted OUT``:
``compare`` below runs transformers' ``CLIPModel`` (for an OpenAI state dict, after mapping it to
the transformers layout in memory with ``openai_to_transformers``) and the converted model on the
same random image and ids.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert.common import (
    NameTable,
    apply_name_table,
    load_torch_state,
    strip_prefix,
    wrong_family_message,
)
from zsad_jax.encoders import checkpoint
from zsad_jax.encoders.clip import (
    ACTIVATIONS,
    DTYPES,
    Clip,
    ClipConfig,
    ClipTextConfig,
    ClipVisionConfig,
)
from zsad_jax.encoders.tokenizer import ClipTokenizer
from zsad_jax.errors import run_command

KIND = "clip"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt")

TRANSFORMERS_IGNORE = (r"(text|vision)_model\.embeddings\.position_ids",)
OPENAI_IGNORE = (r"input_resolution", r"context_length", r"vocab_size")

# transformers' CLIPVisionConfig / CLIPTextConfig defaults, for keys a config.json leaves out.
_HF_VISION_DEFAULTS = {
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_HF_TEXT_DEFAULTS = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax kernel (in, out)."""
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def _qkv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three torch (D, D) projections -> fused Flax kernel (D, 3D), columns [q | k | v]."""
    return np.concatenate([q, k, v], axis=0).T


def _qkv_bias(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([q, k, v], axis=0)


def _count_blocks(state: dict[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    if found and found != set(range(len(found))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(found)}")
    return len(found)


def _layer_norm_entries(table: NameTable, ours: str, theirs: str) -> None:
    table[f"{ours}.scale"] = (f"{theirs}.weight", None)
    table[f"{ours}.bias"] = (f"{theirs}.bias", None)


# ----------------------------------------------------------------------------------------------
# transformers layout


def transformers_table(vision_layers: int, text_layers: int, *, logit_scale: bool) -> NameTable:
    """``{our key: (transformers key(s), transform)}`` for a transformers ``CLIPModel``."""
    table: NameTable = {}
    v, t = "vision_model", "text_model"
    table["vision.conv1.kernel"] = (f"{v}.embeddings.patch_embedding.weight", _conv)
    table["vision.class_embedding"] = (f"{v}.embeddings.class_embedding", None)
    table["vision.positional_embedding"] = (f"{v}.embeddings.position_embedding.weight", None)
    _layer_norm_entries(table, "vision.ln_pre", f"{v}.pre_layrnorm")
    _layer_norm_entries(table, "vision.ln_post", f"{v}.post_layernorm")
    table["vision.proj"] = ("visual_projection.weight", _linear)
    table["text.token_embedding.embedding"] = (f"{t}.embeddings.token_embedding.weight", None)
    table["text.positional_embedding"] = (f"{t}.embeddings.position_embedding.weight", None)
    _layer_norm_entries(table, "text.ln_final", f"{t}.final_layer_norm")
    table["text.text_projection"] = ("text_projection.weight", _linear)
    for tower, prefix, depth in (("vision", v, vision_layers), ("text", t, text_layers)):
        for i in range(depth):
            ours, theirs = f"{tower}.blocks.{i}", f"{prefix}.encoder.layers.{i}"
            attn = f"{theirs}.self_attn"
            qkv = tuple(f"{attn}.{n}_proj" for n in "qkv")
            table[f"{ours}.attn.in_proj.kernel"] = (tuple(f"{p}.weight" for p in qkv), _qkv_kernel)
            table[f"{ours}.attn.in_proj.bias"] = (tuple(f"{p}.bias" for p in qkv), _qkv_bias)
            table[f"{ours}.attn.out_proj.kernel"] = (f"{attn}.out_proj.weight", _linear)
            table[f"{ours}.attn.out_proj.bias"] = (f"{attn}.out_proj.bias", None)
            _layer_norm_entries(table, f"{ours}.ln_1", f"{theirs}.layer_norm1")
            _layer_norm_entries(table, f"{ours}.ln_2", f"{theirs}.layer_norm2")
            table[f"{ours}.mlp.c_fc.kernel"] = (f"{theirs}.mlp.fc1.weight", _linear)
            table[f"{ours}.mlp.c_fc.bias"] = (f"{theirs}.mlp.fc1.bias", None)
            table[f"{ours}.mlp.c_proj.kernel"] = (f"{theirs}.mlp.fc2.weight", _linear)
            table[f"{ours}.mlp.c_proj.bias"] = (f"{theirs}.mlp.fc2.bias", None)
    if logit_scale:
        table["logit_scale"] = ("logit_scale", None)
    return table


def _is_transformers(state: dict[str, Any]) -> bool:
    return "vision_model.embeddings.patch_embedding.weight" in state


def _transformers_tower_fields(cfg: dict[str, Any], defaults: dict[str, Any], *, source: str):
    cfg = {**defaults, **cfg}
    act = cfg["hidden_act"]
    if act not in ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act {act!r} is not supported; CLIP here implements {ACTIVATIONS} "
            "('gelu' is the exact erf GELU, as in transformers)"
        )
    return {"heads": int(cfg["num_attention_heads"]), "act": act, "ln_eps": cfg["layer_norm_eps"]}


def read_transformers_config(path: Path) -> dict[str, dict[str, Any]]:
    """Heads / activation / epsilon of both towers from a transformers CLIP ``config.json``."""
    source = str(path)
    hf = json.loads(path.read_text())
    if hf.get("model_type", "clip") != "clip":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r}, expected 'clip'")
    return {
        "vision": _transformers_tower_fields(
            hf.get("vision_config", {}), _HF_VISION_DEFAULTS, source=source
        ),
        "text": _transformers_tower_fields(
            hf.get("text_config", {}), _HF_TEXT_DEFAULTS, source=source
        ),
    }


# ----------------------------------------------------------------------------------------------
# OpenAI / open_clip layout


def openai_table(vision_layers: int, text_layers: int, *, logit_scale: bool) -> NameTable:
    """``{our key: (OpenAI key(s), transform)}`` for an OpenAI/open_clip CLIP state dict."""
    table: NameTable = {}
    table["vision.conv1.kernel"] = ("visual.conv1.weight", _conv)
    for name in ("class_embedding", "positional_embedding", "proj"):
        table[f"vision.{name}"] = (f"visual.{name}", None)
    for name in ("ln_pre", "ln_post"):
        _layer_norm_entries(table, f"vision.{name}", f"visual.{name}")
    table["text.token_embedding.embedding"] = ("token_embedding.weight", None)
    table["text.positional_embedding"] = ("positional_embedding", None)
    table["text.text_projection"] = ("text_projection", None)
    _layer_norm_entries(table, "text.ln_final", "ln_final")
    for tower, prefix, depth in (
        ("vision", "visual.transformer", vision_layers),
        ("text", "transformer", text_layers),
    ):
        for i in range(depth):
            ours, theirs = f"{tower}.blocks.{i}", f"{prefix}.resblocks.{i}"
            table[f"{ours}.attn.in_proj.kernel"] = (f"{theirs}.attn.in_proj_weight", _linear)
            table[f"{ours}.attn.in_proj.bias"] = (f"{theirs}.attn.in_proj_bias", None)
            table[f"{ours}.attn.out_proj.kernel"] = (f"{theirs}.attn.out_proj.weight", _linear)
            table[f"{ours}.attn.out_proj.bias"] = (f"{theirs}.attn.out_proj.bias", None)
            for ln in ("ln_1", "ln_2"):
                _layer_norm_entries(table, f"{ours}.{ln}", f"{theirs}.{ln}")
            for fc in ("c_fc", "c_proj"):
                table[f"{ours}.mlp.{fc}.kernel"] = (f"{theirs}.mlp.{fc}.weight", _linear)
                table[f"{ours}.mlp.{fc}.bias"] = (f"{theirs}.mlp.{fc}.bias", None)
    if logit_scale:
        table["logit_scale"] = ("logit_scale", None)
    return table


def _is_openai(state: dict[str, Any]) -> bool:
    return "visual.conv1.weight" in state


# ----------------------------------------------------------------------------------------------
# Shared


def config_from_arrays(
    arrays: dict[str, Any],
    *,
    vision: dict[str, Any],
    text: dict[str, Any],
    dtype: str = "float32",
) -> ClipConfig:
    """Our config from converted arrays (shapes) plus the fields shapes cannot tell (``vision``
    and ``text``: ``heads``, ``act``, ``ln_eps``)."""
    conv = arrays["vision.conv1.kernel"].shape  # (p, p, 3, D)
    n_pos, width = arrays["vision.positional_embedding"].shape
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ValueError(f"vision positional embedding has {n_pos - 1} patch rows, not a square")
    vision_cfg = ClipVisionConfig(
        width=width,
        layers=_count_blocks(arrays, r"vision\.blocks\.(\d+)\.attn\.in_proj\.kernel"),
        patch_size=conv[0],
        image_size=conv[0] * grid,
        output_dim=arrays["vision.proj"].shape[1],
        mlp_dim=arrays["vision.blocks.0.mlp.c_fc.kernel"].shape[1],
        dtype=dtype,
        **vision,
    )
    ctx, text_width = arrays["text.positional_embedding"].shape
    text_cfg = ClipTextConfig(
        width=text_width,
        layers=_count_blocks(arrays, r"text\.blocks\.(\d+)\.attn\.in_proj\.kernel"),
        context_length=ctx,
        vocab_size=arrays["text.token_embedding.embedding"].shape[0],
        output_dim=arrays["text.text_projection"].shape[1],
        mlp_dim=arrays["text.blocks.0.mlp.c_fc.kernel"].shape[1],
        dtype=dtype,
        **text,
    )
    return ClipConfig(vision=vision_cfg, text=text_cfg, logit_scale="logit_scale" in arrays)


def _openai_heads(arrays: dict[str, Any], tower: str, source: str) -> int:
    """OpenAI's ``build_model`` rule: 64-wide attention heads."""
    width = arrays[f"{tower}.positional_embedding"].shape[1]
    if width < 64 or width % 64:
        raise ValueError(
            f"{source}: {tower} width {width} is not a multiple of 64, so the head count cannot be "
            "inferred the OpenAI way; convert a transformers directory whose config.json names "
            "num_attention_heads instead"
        )
    return width // 64


def convert_state(
    state: dict[str, Any],
    *,
    source: str,
    hf_config: Path | None = None,
    dtype: str = "float32",
) -> tuple[ClipConfig, dict[str, Any], str]:
    """(config, ``{our key: array}``, layout name) from a loaded source state dict.

    ``hf_config`` is the transformers ``config.json`` for the transformers layout (without it,
    OpenAI's conventions are assumed: 64-wide heads, QuickGELU, epsilon 1e-5).
    """
    state = strip_prefix(state, ("module.", "model.", "clip."))
    logit_scale = "logit_scale" in state
    if _is_transformers(state):
        layout = "transformers"
        table = transformers_table(
            _count_blocks(
                state, r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight"
            ),
            _count_blocks(state, r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight"),
            logit_scale=logit_scale,
        )
        ignore = TRANSFORMERS_IGNORE
    elif _is_openai(state):
        layout = "openai"
        table = openai_table(
            _count_blocks(state, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
            _count_blocks(state, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
            logit_scale=logit_scale,
        )
        ignore = OPENAI_IGNORE
    else:
        sample = ", ".join(sorted(state)[:8])
        raise ValueError(
            wrong_family_message(source, state, expected=KIND)
            or f"{source}: not a CLIP checkpoint this converter knows (no "
            "'vision_model.embeddings.patch_embedding.weight' (transformers) or "
            f"'visual.conv1.weight' (OpenAI/open_clip)); first keys: {sample}"
        )
    arrays = apply_name_table(state, table, source=source, ignore=ignore)
    if layout == "transformers" and hf_config is not None:
        fields = read_transformers_config(hf_config)
    else:
        fields = {
            tower: {
                "heads": _openai_heads(arrays, tower, source),
                "act": "quick_gelu",
                "ln_eps": 1e-5,
            }
            for tower in ("vision", "text")
        }
    config = config_from_arrays(arrays, dtype=dtype, **fields)
    check_shapes(arrays, config, source=source)
    return config, arrays, layout


def model_shapes(config: ClipConfig) -> dict[str, tuple[int, ...]]:
    """Every variable path of ``Clip(config)`` and its shape, without allocating (eval_shape)."""
    return dict(_model_shapes(config))


@functools.lru_cache(maxsize=8)
def _model_shapes(config: ClipConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: Clip(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Variable))
    return {".".join(str(p) for p in path): tuple(var.shape) for path, var in flat}


def check_shapes(arrays: dict[str, Any], config: ClipConfig, *, source: str) -> None:
    """Raises ``ValueError`` listing missing, unexpected and mis-shaped keys."""
    expected = model_shapes(config)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [
        f"{k}: file {tuple(arrays[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(arrays))
        if tuple(arrays[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        lines = [f"{source}: converted weights do not fit the inferred CLIP architecture"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
        raise ValueError("\n".join(lines))


def read_source(src: str | Path, *, dtype: str = "float32"):
    """(config, arrays, layout, tokenizer files to copy) for any supported ``src``."""
    src = Path(src)
    state = load_torch_state(src)
    hf_config = src / "config.json" if src.is_dir() else src.parent / "config.json"
    config, arrays, layout = convert_state(
        state,
        source=str(src),
        hf_config=hf_config if hf_config.is_file() else None,
        dtype=dtype,
    )
    folder = src if src.is_dir() else src.parent
    if layout == "transformers":
        tokenizer = [folder / n for n in HF_TOKENIZER_FILES if (folder / n).is_file()]
    else:
        tokenizer = [folder / BPE_FILE] if (folder / BPE_FILE).is_file() else []
    return config, arrays, layout, tokenizer


def check_tokenizer(files: list[Path], text_rows: int, *, source: str) -> None:
    """Refuses tokenizer files that are not a CLIP tokenizer, or whose largest id (SOS and EOT
    included) is past the text tower's ``text_rows`` embedding rows: otherwise conversion and
    verification pass (verify uses random ids) and only training finds out, with NaN losses."""
    names = {f.name: f for f in files}
    openai = len(files) == 1 and files[0].name not in HF_TOKENIZER_FILES
    if not openai and set(names) != set(HF_TOKENIZER_FILES):
        lacking = [n for n in HF_TOKENIZER_FILES if n not in names]
        raise FileNotFoundError(
            f"{files[0].parent}: has {' + '.join(names)} but not {' + '.join(lacking)}; a CLIP "
            "tokenizer needs both files: copy the missing one there from the same model"
        )
    try:
        if openai:
            tokenizer = ClipTokenizer.from_files(bpe_file=files[0])
        else:
            tokenizer = ClipTokenizer.from_files(*(names[n] for n in HF_TOKENIZER_FILES))
    except (OSError, EOFError, UnicodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{' + '.join(str(f) for f in files)}: not readable as CLIP tokenizer files "
            f"({type(e).__name__}: {e})"
        ) from None
    tokenizer.check_fits(text_rows, where=f"the text tower of {source}")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    bpe: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts ``src`` into the checkpoint directory ``out``; returns ``out``. An ``out`` that
    already holds a converted checkpoint is replaced only with ``overwrite``."""
    checkpoint.check_out_dir(
        out, overwrite=overwrite
    )  # before the (long) read of a full-size model
    if bpe is not None and not Path(bpe).is_file():
        raise FileNotFoundError(f"--bpe {bpe}: no such file")
    config, arrays, layout, tokenizer = read_source(src, dtype=dtype)
    if bpe is not None:
        tokenizer = [Path(bpe)]
    if tokenizer:
        check_tokenizer(tokenizer, config.text.vocab_size, source=str(src))
    else:
        print(
            f"note: no tokenizer files next to {src} ({' + '.join(HF_TOKENIZER_FILES)} or "
            f"{BPE_FILE}); pass --bpe or copy them into {out} before tokenising text",
            file=sys.stderr,
        )
    return checkpoint.save(
        out,
        KIND,
        config.to_dict(),
        {k: np.asarray(v, np.float32) for k, v in arrays.items()},
        source=f"{src} ({layout} layout)",
        extra_files=tokenizer,
    )


# ----------------------------------------------------------------------------------------------
# Verification against transformers


def transformers_config(config: ClipConfig):
    """A transformers ``CLIPConfig`` with our architecture (eos = the largest id, as OpenAI)."""
    from transformers import CLIPConfig

    v, t = config.vision, config.text
    return CLIPConfig(
        projection_dim=v.output_dim,
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_dim,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            patch_size=v.patch_size,
            image_size=v.image_size,
            hidden_act=v.act,
            layer_norm_eps=v.ln_eps,
            projection_dim=v.output_dim,
        ),
        text_config=dict(
            hidden_size=t.width,
            intermediate_size=t.mlp_dim,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            vocab_size=t.vocab_size,
            hidden_act=t.act,
            layer_norm_eps=t.ln_eps,
            projection_dim=t.output_dim,
            bos_token_id=t.vocab_size - 2,
            eos_token_id=t.vocab_size - 1,
            pad_token_id=0,
        ),
    )


# OpenAI/open_clip key -> (transformers key, transform); their linear projections are (in, out)
# matrices, transformers' are (out, in) Linear weights.
_OPENAI_TOP_LEVEL = {
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", None),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", None),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", None),
    "visual.proj": ("visual_projection.weight", np.transpose),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", None),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", None),
    "text_projection": ("text_projection.weight", np.transpose),
    "logit_scale": ("logit_scale", None),
    **{
        f"{name}.{suffix}": (f"{hf}.{suffix}", None)
        for name, hf in (
            ("visual.ln_pre", "vision_model.pre_layrnorm"),
            ("visual.ln_post", "vision_model.post_layernorm"),
            ("ln_final", "text_model.final_layer_norm"),
        )
        for suffix in ("weight", "bias")
    },
}
_OPENAI_BLOCK_KEY = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)")
_OPENAI_TOWERS = {"visual.transformer": "vision_model", "transformer": "text_model"}
# Prefixes of a residual block's keys; the fused attention in-projection is split apart instead.
_OPENAI_BLOCK_RENAMES = {
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def openai_to_transformers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames an OpenAI/open_clip state dict to transformers' ``CLIPModel`` keys (splitting the
    fused in-projections and transposing the projection matrices)."""
    state = strip_prefix(state, ("module.", "model.", "clip."))
    out = {}
    for key, value in state.items():
        if any(re.fullmatch(p, key) for p in OPENAI_IGNORE):
            continue
        block = _OPENAI_BLOCK_KEY.fullmatch(key)
        if block:
            out.update(_openai_block_entries(key, block, value))
            continue
        if key not in _OPENAI_TOP_LEVEL:
            raise ValueError(f"openai_to_transformers: unexpected key {key}")
        hf_key, fn = _OPENAI_TOP_LEVEL[key]
        out[hf_key] = fn(value) if fn is not None else value
    return out


def _openai_block_entries(key: str, block: re.Match, value: np.ndarray) -> dict[str, np.ndarray]:
    """The transformers entries of one residual-block key (q, k and v for the fused one)."""
    base = f"{_OPENAI_TOWERS[block.group(1)]}.encoder.layers.{block.group(2)}"
    rest = block.group(3)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        parts = np.split(value, 3, axis=0)
        return {
            f"{base}.self_attn.{name}_proj.{kind}": part
            for name, part in zip("qkv", parts, strict=True)
        }
    for theirs, hf in _OPENAI_BLOCK_RENAMES.items():
        if rest.startswith(theirs):
            return {f"{base}.{hf}{rest[len(theirs) :]}": value}
    raise ValueError(f"openai_to_transformers: unexpected block key {key}")


def reference_model(src: str | Path):
    """transformers ``CLIPModel`` (float32, eval, eager attention) holding ``src``'s weights."""
    import torch
    from transformers import CLIPModel

    config, _, layout, _ = read_source(src)
    state = load_torch_state(src)
    if layout == "openai":
        state = openai_to_transformers(state)
    model = CLIPModel._from_config(transformers_config(config), attn_implementation="eager")
    state = strip_prefix(state, ("module.", "model.", "clip."))
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in state.items()
        if not any(re.fullmatch(p, k) for p in TRANSFORMERS_IGNORE)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A checkpoint without CLIP's temperature leaves transformers' initial value, unused here.
    missing = [k for k in missing if k != "logit_scale" or config.logit_scale]
    if missing or unexpected:
        raise ValueError(
            f"{src}: reference model keys differ: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}"
        )
    return model.eval(), config


def random_inputs(config: ClipConfig, seed: int, batch: int = 2):
    """(images (B, S, S, 3) float32 at the native size, ids (B, T) int32 with one EOT each)."""
    rng = np.random.default_rng(seed)
    s, t = config.vision.image_size, config.text
    images = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
    ids = np.zeros((batch, t.context_length), np.int32)
    for b in range(batch):
        n = int(rng.integers(2, t.context_length - 1))  # SOS + n-1 tokens + EOT, then padding
        ids[b, 0] = t.vocab_size - 2
        ids[b, 1:n] = rng.integers(1, t.vocab_size - 2, n - 1)
        ids[b, n] = t.vocab_size - 1
    return images, ids


@nnx.jit
def _forward_all(model: Clip, images, ids):
    """Every output ``compare`` checks, in one compiled call (reused across calls)."""
    image, v_aux = model.vision(images, layers=range(1, model.config.vision.layers + 1))
    text, t_aux = model.text(ids, layers=range(1, model.config.text.layers + 1))
    return model.vision.embed(images), image, v_aux, text, t_aux


def compare(src: str | Path, converted: str | Path, seed: int = 0) -> list[tuple[str, float]]:
    """Max abs differences between transformers and the converted model on random inputs, for
    every vision and text block output, the image embedding and the text embedding.

    transformers' ``hidden_states[0]`` is the input of the first block (after ``pre_layrnorm`` for
    the vision tower) and ``hidden_states[i]`` the output of block ``i``, as ``aux["layers"][i]``.
    Images are compared at the native size (transformers' own resize is bicubic and differs from
    both of our modes; the resize modes are tested against ``F.interpolate`` directly). The text
    embedding is pooled at ``argmax(ids)`` on both sides (OpenAI's rule; transformers pools at the
    first ``eos_token_id``, the same token for CLIP-tokenised text).
    """
    import jax
    import torch

    reference, _ = reference_model(src)
    ours = checkpoint.load(converted)
    images, ids = random_inputs(ours.config, seed)
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        tids = torch.from_numpy(ids.astype(np.int64))
        v_out = reference.vision_model(pixel_values=pixels, output_hidden_states=True)
        t_out = reference.text_model(input_ids=tids, output_hidden_states=True)
        image_emb = reference.visual_projection(v_out.pooler_output).numpy()
        pooled = t_out.last_hidden_state[torch.arange(len(ids)), tids.argmax(-1)]
        text_emb = reference.text_projection(pooled).numpy()
    depth_v, depth_t = ours.config.vision.layers, ours.config.text.layers
    with jax.default_matmul_precision("float32"):
        our_embed, our_image, v_aux, our_text, t_aux = _forward_all(ours, images, ids)

    def diff(a, b) -> float:
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    rows = [("vision.embed", diff(our_embed, v_out.hidden_states[0]))]
    rows += [
        (f"vision.block{i}", diff(v_aux["layers"][i], v_out.hidden_states[i]))
        for i in range(1, depth_v + 1)
    ]
    rows.append(("vision.image_embedding", diff(our_image, image_emb)))
    rows += [
        (f"text.block{i}", diff(t_aux["layers"][i], t_out.hidden_states[i]))
        for i in range(1, depth_t + 1)
    ]
    rows.append(("text.text_embedding", diff(our_text, text_emb)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="transformers CLIP directory or state dict")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="compute dtype recorded in the config (weights stay float32)",
    )
    parser.add_argument("--bpe", default=None, help=f"OpenAI tokenizer file ({BPE_FILE})")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a converted checkpoint already at --out"
    )
    args = parser.parse_args(argv)
    out = convert(args.src, args.out, dtype=args.dtype, bpe=args.bpe, overwrite=args.overwrite)
    meta = checkpoint.read_meta(out)
    print(json.dumps({"out": str(out), "source": meta["source"], "config": meta["config"]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
