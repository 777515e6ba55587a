"""Converts the official trained heads of AF-CLIP, AVA-DINO and ACD-CLIP into a zsad_jax checkpoint.

    python -m convert.heads af_clip --adaptor weight/mvtec_adaptor.pt \\
        --prompt weight/mvtec_prompt.pt --out runs/af_clip_official [--backbone DIR]
    python -m convert.heads ava_dino --src ckpt/epoch_9.pth --out runs/ava_dino_official \\
        [--backbone DIR] [--text_encoder DIR]
    python -m convert.heads acd_clip --src ckpt/adapter_20.pth --out runs/acd_clip_official \\
        [--backbone DIR]

then ``python -m zsad_jax.evaluate --checkpoint=runs/af_clip_official`` (or ``zsad_jax.predict``,
``--export`` included), exactly as for a training workdir.

Inputs are the files the official training scripts write:

* AF-CLIP (Faustinaqq/AF-CLIP ``main.py``): ``<dataset>_adaptor.pt``, the whole pickled adaptor
  module (``torch.save(clip_model.adaptor)``, class ``clip.adaptor.Adaptor``), and
  ``<dataset>_prompt.pt``, the learnt context (1, 12, 768). The module is read without the
  official classes and without running anything (``convert.torchscript.read_saved``: the pickle's
  classes become inert attribute holders).
* AVA-DINO (aqeeelmirza/AVA-DINO ``train.py``): ``ckpt/epoch_N.pth``, a dict of the six heads'
  state dicts (``cls_token_adapter_normal`` ... ``prompt_adapter``, ``text_projection``).
* ACD-CLIP (cockmake/ACD-CLIP ``train.py``): ``adapter_<epoch>.pth`` with the ``text_adapter``
  and ``image_adapter`` state dicts.

Every file is read as data by the same code-free reader (no ``torch.load``, torch not needed).
Each method has an explicit name table (``{our key: (official key, transform)}``, see
``af_clip_table`` / ``ava_dino_table`` / ``acd_clip_table``); every official key is used or
explicitly ignored (with the reason), every shape is checked against the model the config builds,
and anything else is an error listing the keys.

Output ``OUT``: ``OUT/checkpoints/<step>/`` written by ``zsad_jax.checkpoint.TrainCheckpointer``
(the training format: ``params`` = the converted Trainable state, ``opt_state`` and ``mutable``
placeholders (there is no optimiser state to convert, so the folder evaluates, predicts and
exports but does not resume training), ``meta`` with the config, ``step`` and ``threshold`` null
until ``evaluate --store_threshold`` fills it) and ``OUT/conversion.json`` (the source files with
their sha256, the name table used and the keys ignored).

The stored config is ``--config`` (default: the method's ``configs/<method>.py`` as it is, i.e.
with the switches that reproduce the official code's numerics) with ``--config.KEY=VALUE``
overrides; ``--backbone`` (and AVA-DINO's ``--text_encoder``) set
``model.backbone.checkpoint`` (``model.text_encoder.checkpoint``): the converted encoder the
heads run on (``python -m convert.clip`` / ``convert.dinov3``). Pick the config variant of the
training data (``configs/af_clip.py:train_set=visa`` for heads trained on VisA, which then test on
MVTec AD; ``configs/acd_clip.py:n_groups=N`` for ACD-CLIP trained with ``--n_groups N``).

DLVP-CLIP has no official code or released weights (no public repository exists), so there is
nothing to convert: train it with ``python -m zsad_jax.train --config=configs/dlvp_clip.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert.common import NameTable, apply_name_table, flatten_nested
from convert.torchscript import SavedModule, read_saved
from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import cli, methods
from zsad_jax.encoders import checkpoint as encoder_checkpoint
from zsad_jax.nn import Trainable

METHODS = ("af_clip", "ava_dino", "acd_clip")
OFFICIAL_CODE = {
    "af_clip": "Faustinaqq/AF-CLIP @bb7edec (main.py, clip/adaptor.py, clip/model.py)",
    "ava_dino": "aqeeelmirza/AVA-DINO @a5474a1 (train.py, CLIP/adapter.py)",
    "acd_clip": "cockmake/ACD-CLIP @2026067 (train.py, model/adapter.py, adapter_modules.py)",
}
FORMAT = "convert.heads/1"
PROVENANCE_FILE = "conversion.json"
# The classes a pickled AF-CLIP adaptor names besides torch.nn's (``clip/adaptor.py``).
AF_CLIP_CLASSES = {"clip.adaptor": ("Adaptor", "BasicTransformerBlock", "CrossAttention")}
AF_CLIP_ROOT = "clip.adaptor.Adaptor"
# ``opt_state`` / ``mutable`` items of a converted checkpoint (orbax refuses empty items).
NO_OPTIMIZER_STATE = {"_converted_heads_no_optimizer_state": np.zeros((), np.uint8)}


# ----------------------------------------------------------------------------------------------
# Transforms (official torch layout -> ours).


def _linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax kernel (in, out)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-d Linear weight, got shape {w.shape}")
    return np.ascontiguousarray(w.T)


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-d Conv2d weight, got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv1x1(w: np.ndarray) -> np.ndarray:
    """torch 1 x 1 Conv2d weight (out, in, 1, 1) -> per-token Linear kernel (in, out)."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a (out, in, 1, 1) Conv2d weight, got shape {w.shape}")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def _channels(w: np.ndarray) -> np.ndarray:
    """ACD-CLIP ``AddWeight.i_w`` (1, 1, D) -> (D,)."""
    if w.ndim != 3 or w.shape[:2] != (1, 1):
        raise ValueError(f"expected a (1, 1, D) AddWeight parameter, got shape {w.shape}")
    return w.reshape(-1)


def _context(w: np.ndarray) -> np.ndarray:
    """AF-CLIP's learnt context (1, n, D) (or (n, D)) -> (1, n, D)."""
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[0] != 1:
        raise ValueError(f"expected the (1, n_ctx, width) context tensor, got shape {w.shape}")
    return w


def _layer_norm(table: NameTable, ours: str, theirs: str) -> None:
    table[f"{ours}.scale"] = (f"{theirs}.weight", None)
    table[f"{ours}.bias"] = (f"{theirs}.bias", None)


def _torch_linear(table: NameTable, ours: str, theirs: str, *, bias: bool = True) -> None:
    table[f"{ours}.kernel"] = (f"{theirs}.weight", _linear)
    if bias:
        table[f"{ours}.bias"] = (f"{theirs}.bias", None)


# ----------------------------------------------------------------------------------------------
# Name tables: {our Trainable path: (official key(s), transform)}.


def af_clip_table() -> NameTable:
    """AF-CLIP. Official keys are the ``CLIP`` model's: ``adaptor.*`` (the pickled
    ``clip.adaptor.Adaptor``: ``attention`` = ``BasicTransformerBlock`` with ``norm`` and ``attn``
    = ``CrossAttention``, whose ``to_out`` is ``Sequential(Linear, Dropout)``) and
    ``state_prompt_embedding`` (the prompt file)."""
    table: NameTable = {}
    a = "adaptor.attention"
    _layer_norm(table, "adaptor.norm", f"{a}.norm")
    for name in ("to_q", "to_k", "to_v"):
        _torch_linear(table, f"adaptor.{name}", f"{a}.attn.{name}", bias=False)
    _torch_linear(table, "adaptor.to_out", f"{a}.attn.to_out.0")
    table["state_prompt_embedding"] = ("state_prompt_embedding", _context)
    return table


AF_CLIP_IGNORE: dict[str, str] = {}


def ava_dino_table(n_layers: int, *, prompt_fc2: bool) -> NameTable:
    """AVA-DINO. Official keys are ``<head>.<state dict key>`` of the ``epoch_N.pth`` dict:
    ``{cls,patch}_token_adapter_{normal,anomaly}.<layer>.fc{1,2}.0.weight`` (``BottleneckAdapter``:
    ``fc1``/``fc2`` = ``Sequential(Linear(bias=False), LeakyReLU)``),
    ``prompt_adapter.{0,1}.fc{1,2}.0.weight``, ``text_projection.weight``."""
    table: NameTable = {}
    for ours, theirs in (
        ("cls_adapters", "cls_token_adapter"),
        ("patch_adapters", "patch_token_adapter"),
    ):
        for i in range(n_layers):
            for branch in ("normal", "anomaly"):
                for fc in ("fc1", "fc2"):
                    _torch_linear(
                        table,
                        f"{ours}.{i}.{branch}.{fc}",
                        f"{theirs}_{branch}.{i}.{fc}.0",
                        bias=False,
                    )
    for k in range(2):
        _torch_linear(table, f"prompt_adapters.{k}.fc1", f"prompt_adapter.{k}.fc1.0", bias=False)
        if prompt_fc2:
            _torch_linear(
                table, f"prompt_adapters.{k}.fc2", f"prompt_adapter.{k}.fc2.0", bias=False
            )
    _torch_linear(table, "text_projection", "text_projection", bias=False)
    return table


def ava_dino_ignore(*, prompt_fc2: bool) -> dict[str, str]:
    ignore = {"epoch": "the epoch counter train.py stores next to the heads"}
    if not prompt_fc2:
        ignore[r"prompt_adapter\.[01]\.fc2\.0\.weight"] = (
            "the prompt adapters' fc2, which the official forward never uses "
            "(config.model.prompt_adapter_fc2=False)"
        )
    return ignore


def acd_clip_table(n_groups: int, n_kernels: int) -> NameTable:
    """ACD-CLIP. Official keys are ``image_adapter.*`` / ``text_adapter.*`` (the two
    ``nn.ModuleDict`` of ``ACDCLIP``): ``lora_adapters.<g>`` (``ConvLoraAdapter``:
    ``conv_lora_blocks.<j>.{lora_A, conv_lora_A, conv_lora_B, lora_B}``, ``fusion_conv``),
    ``m_i_w.<g>.i_w``, ``{seg,det}_proj.<g>.fc.{0,2}``, ``{seg,det}_layer_norms.<g>``,
    ``vision_text_gate.<g>.{0,2}``; ``text_adapter.{lora_adapters.<g>.lora_{A,B}, m_t_w.<g>.i_w,
    layer_norms.<g>}``."""
    table: NameTable = {}
    img, txt = "image_adapter", "text_adapter"
    for g in range(n_groups):
        lora = f"{img}.lora_adapters.{g}"
        for j in range(n_kernels):
            ours, theirs = f"image_lora.{g}.blocks.{j}", f"{lora}.conv_lora_blocks.{j}"
            table[f"{ours}.lora_a"] = (f"{theirs}.lora_A", None)
            table[f"{ours}.conv_a.kernel"] = (f"{theirs}.conv_lora_A.weight", _conv)
            table[f"{ours}.conv_b.kernel"] = (f"{theirs}.conv_lora_B.weight", _conv)
            table[f"{ours}.lora_b"] = (f"{theirs}.lora_B", None)
        table[f"image_lora.{g}.fusion_conv.kernel"] = (f"{lora}.fusion_conv.weight", _conv1x1)
        table[f"image_blend.{g}.weight"] = (f"{img}.m_i_w.{g}.i_w", _channels)
        for head in ("seg", "det"):
            _torch_linear(table, f"{head}_proj.{g}.fc1", f"{img}.{head}_proj.{g}.fc.0")
            _torch_linear(table, f"{head}_proj.{g}.fc2", f"{img}.{head}_proj.{g}.fc.2")
            _layer_norm(table, f"{head}_norm.{g}", f"{img}.{head}_layer_norms.{g}")
        _torch_linear(table, f"fusion_gate.{g}.fc1", f"{img}.vision_text_gate.{g}.0")
        _torch_linear(table, f"fusion_gate.{g}.fc2", f"{img}.vision_text_gate.{g}.2")
        table[f"text_lora.{g}.lora_a"] = (f"{txt}.lora_adapters.{g}.lora_A", None)
        table[f"text_lora.{g}.lora_b"] = (f"{txt}.lora_adapters.{g}.lora_B", None)
        table[f"text_blend.{g}.weight"] = (f"{txt}.m_t_w.{g}.i_w", _channels)
        _layer_norm(table, f"text_norm.{g}", f"{txt}.layer_norms.{g}")
    return table


ACD_CLIP_IGNORE = {"epoch": "the epoch counter train.py stores next to the adapters"}


# ----------------------------------------------------------------------------------------------
# Reading the official files.


def _describe(obj: Any) -> str:
    if isinstance(obj, SavedModule):
        return f"a pickled {obj.qualname} module"
    if isinstance(obj, np.ndarray):
        return f"a tensor of shape {obj.shape}"
    return f"a {type(obj).__name__}"


def read_af_clip(adaptor: str | Path, prompt: str | Path, config: Any) -> dict[str, Any]:
    """The official ``CLIP``'s trained keys (``adaptor.*``, ``state_prompt_embedding``) from the
    two AF-CLIP files, after checking the adaptor's non-weight attributes against the config."""
    module = read_saved(adaptor, classes=AF_CLIP_CLASSES)
    if not isinstance(module, SavedModule) or module.qualname != AF_CLIP_ROOT:
        raise ValueError(
            f"{adaptor}: holds {_describe(module)}, not the pickled {AF_CLIP_ROOT} that AF-CLIP's "
            "main.py saves (torch.save(clip_model.adaptor)); is this the *_adaptor.pt file?"
        )
    modules = module.modules()
    attn, norm = modules.get("attention.attn"), modules.get("attention.norm")
    if attn is None or norm is None:
        raise ValueError(
            f"{adaptor}: the adaptor has no attention.attn / attention.norm submodules; found "
            f"{sorted(k for k in modules if k)}"
        )
    a = config.model.adaptor
    heads, head_dim = int(a.heads), int(a.head_dim)
    found_heads, scale = attn.state.get("heads"), attn.state.get("scale")
    if found_heads != heads:
        raise ValueError(
            f"{adaptor}: attention.attn.heads={found_heads!r}, but config.model.adaptor.heads="
            f"{heads}; set --config.model.adaptor.heads={found_heads}"
        )
    if not isinstance(scale, float) or abs(scale - head_dim**-0.5) > 1e-6 * head_dim**-0.5:
        found_dim = round(scale**-2) if isinstance(scale, float) and scale > 0 else scale
        raise ValueError(
            f"{adaptor}: attention.attn.scale={scale!r} (head_dim {found_dim}), but "
            f"config.model.adaptor.head_dim={head_dim}; set --config.model.adaptor.head_dim="
            f"{found_dim}"
        )
    eps = norm.state.get("eps")
    if eps != 1e-5:
        raise ValueError(
            f"{adaptor}: attention.norm.eps={eps!r}; the adaptor's LayerNorm here uses 1e-5 "
            "(torch's default, as the official clip/adaptor.py)"
        )
    state = {f"adaptor.{k}": v for k, v in module.state_dict().items()}
    context = read_saved(prompt)
    if not isinstance(context, np.ndarray):
        raise ValueError(
            f"{prompt}: holds {_describe(context)}, not the learnt context tensor that AF-CLIP's "
            "main.py saves (torch.save(clip_model.state_prompt_embedding)); is this the "
            "*_prompt.pt file?"
        )
    state["state_prompt_embedding"] = context
    return state


def read_state_dicts(path: str | Path, heads: Sequence[str]) -> dict[str, Any]:
    """A saved dict of state dicts -> one dotted state dict; each of ``heads`` must be present."""
    obj = read_saved(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds {_describe(obj)}, not a dict of state dicts")
    missing = [h for h in heads if not isinstance(obj.get(h), dict)]
    if missing:
        raise ValueError(
            f"{path}: no state dict under {', '.join(repr(h) for h in missing)}; the file has "
            f"keys {sorted(map(str, obj))}"
        )
    return flatten_nested(obj)


AVA_DINO_HEADS = (
    "cls_token_adapter_normal",
    "cls_token_adapter_anomaly",
    "patch_token_adapter_normal",
    "patch_token_adapter_anomaly",
    "prompt_adapter",
    "text_projection",
)
ACD_CLIP_HEADS = ("text_adapter", "image_adapter")


def _indices(state: dict[str, Any], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))})


# ----------------------------------------------------------------------------------------------
# Conversion.


def _named_transforms(table: NameTable) -> NameTable:
    """The table with each transform's errors naming its official key."""

    def wrap(keys, fn: Callable) -> Callable:
        def run(*arrays):
            bad = [k for k, a in zip(keys, arrays, strict=True) if not isinstance(a, np.ndarray)]
            if bad:
                raise ValueError(f"{', '.join(bad)}: not a tensor")
            try:
                return fn(*arrays) if fn is not None else arrays[0]
            except ValueError as e:
                raise ValueError(f"{', '.join(keys)}: {e}") from None

        return run

    out: NameTable = {}
    for ours, (theirs, fn) in table.items():
        keys = (theirs,) if isinstance(theirs, str) else tuple(theirs)
        out[ours] = (theirs, wrap(keys, fn))
    return out


def convert_state(
    state: dict[str, Any],
    table: NameTable,
    ignore: dict[str, str],
    template: dict[str, tuple[tuple[int, ...], Any]],
    *,
    source: str,
) -> dict[str, np.ndarray]:
    """``{our key: array}`` through ``table``, every shape checked against ``template`` ({our
    Trainable key: (shape, dtype)} of the model the config builds)."""
    arrays = apply_name_table(state, _named_transforms(table), source=source, ignore=ignore)
    missing = sorted(set(template) - set(arrays))
    unexpected = sorted(set(arrays) - set(template))
    wrong = []
    for key in sorted(set(arrays) & set(template)):
        shape, _ = template[key]
        if tuple(arrays[key].shape) != tuple(shape):
            theirs = table[key][0]
            shown = ", ".join(
                f"{k} {tuple(np.shape(state[k]))}"
                for k in ((theirs,) if isinstance(theirs, str) else theirs)
            )
            wrong.append(
                f"{shown} -> {key} {tuple(arrays[key].shape)}, the model needs {tuple(shape)}"
            )
    if missing or unexpected or wrong:
        lines = [f"{source}: the official weights do not fit the model built from the config"]
        for title, items in (
            ("not produced", missing),
            ("unexpected", unexpected),
            ("shape", wrong),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]))
        lines.append(
            "  Check the config variant and sizes (--config=... / --config.model.KEY=VALUE) "
            "against the official run's arguments."
        )
        raise ValueError("\n".join(lines))
    return {k: np.asarray(v, dtype=template[k][1]) for k, v in arrays.items()}


def trainable_template(config: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{Trainable path: (shape, dtype)}`` of ``config``'s model, built abstractly (no weights
    read: the encoder architecture comes from its converted ``config.json`` or the preset)."""
    model = nnx.eval_shape(lambda: methods.build(config, load_weights=False))
    flat = ckpt_lib.flat_arrays(nnx.state(model, Trainable))
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def _method_tables(method: str, config: Any, files: dict[str, Path]):
    """(official state, name table, ignore patterns, source description) for ``method``."""
    m = config.model
    if method == "af_clip":
        state = read_af_clip(files["adaptor"], files["prompt"], config)
        return state, af_clip_table(), AF_CLIP_IGNORE, f"{files['adaptor']} + {files['prompt']}"
    src = files["src"]
    if method == "ava_dino":
        state = read_state_dicts(src, AVA_DINO_HEADS)
        found = _indices(state, r"cls_token_adapter_normal\.(\d+)\.fc1\.0\.weight")
        if len(found) != len(m.layers):
            raise ValueError(
                f"{src}: adapters for {len(found)} layers, but config.model.layers="
                f"{tuple(m.layers)} taps {len(m.layers)} (the official code taps blocks "
                "6/12/18/24); set --config.model.layers=..."
            )
        fc2 = bool(m.prompt_adapter_fc2)
        table = ava_dino_table(len(m.layers), prompt_fc2=fc2)
        return state, table, ava_dino_ignore(prompt_fc2=fc2), str(src)
    if method == "acd_clip":
        state = read_state_dicts(src, ACD_CLIP_HEADS)
        groups = _indices(state, r"image_adapter\.m_i_w\.(\d+)\.i_w")
        if len(groups) != int(m.n_groups):
            raise ValueError(
                f"{src}: {len(groups)} groups (image_adapter.m_i_w.*), but config.model.n_groups="
                f"{int(m.n_groups)}; add --config.model.n_groups={len(groups)} (it keeps the "
                "--config you gave, its variant included)"
            )
        kernels = []
        for j in _indices(
            state, r"image_adapter\.lora_adapters\.0\.conv_lora_blocks\.(\d+)\.lora_A"
        ):
            w = state.get(f"image_adapter.lora_adapters.0.conv_lora_blocks.{j}.conv_lora_A.weight")
            kernels.append(int(w.shape[-1]) if isinstance(w, np.ndarray) and w.ndim == 4 else None)
        expected = [int(k) for k in m.adapter.kernel_sizes]
        if kernels != expected:
            raise ValueError(
                f"{src}: Conv-LoRA kernel sizes {kernels} (image_adapter.lora_adapters.0."
                f"conv_lora_blocks.*), but config.model.adapter.kernel_sizes={tuple(expected)}; "
                f"set --config.model.adapter.kernel_sizes={tuple(kernels)}"
            )
        table = acd_clip_table(int(m.n_groups), len(expected))
        return state, table, ACD_CLIP_IGNORE, str(src)
    raise ValueError(f"unknown method {method!r}; converted here: {', '.join(METHODS)}")


def convert(
    method: str, files: dict[str, str | Path], config: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(params, provenance)``: the converted Trainable state of ``config``'s model from the
    official ``files`` (``adaptor`` + ``prompt`` for AF-CLIP, ``src`` otherwise)."""
    if config.method != method:
        raise ValueError(
            f"the config is for method {config.method!r}, not {method!r}; pass "
            f"--config=configs/{method}.py[:variant]"
        )
    files = {role: Path(p) for role, p in files.items()}
    for role, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"--{role}={path}: no such file")
    state, table, ignore, source = _method_tables(method, config, files)
    params = convert_state(state, table, ignore, trainable_template(config), source=source)
    ignored = {
        k: reason
        for k in sorted(state)
        for pattern, reason in ignore.items()
        if re.fullmatch(pattern, k)
    }
    provenance = {
        "format": FORMAT,
        "method": method,
        "official_code": OFFICIAL_CODE[method],
        "sources": {role: _file_record(path) for role, path in files.items()},
        "name_table": {ours: theirs for ours, (theirs, _) in table.items()},
        "ignored": ignored,
        "ignored_values": {
            k: state[k] for k in ignored if isinstance(state[k], (int, float, str, bool))
        },
    }
    return params, provenance


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": str(path.absolute()),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def write_checkpoint(
    out: str | Path,
    config: Any,
    params: dict[str, np.ndarray],
    *,
    step: int = 0,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Writes ``params`` as step ``step`` of the training workdir ``out`` (TrainCheckpointer, the
    format ``zsad_jax.checkpoint.load_for_inference`` reads) and ``out/conversion.json``; returns
    the step folder. Refuses a workdir that already holds checkpoints."""

    out = Path(out)
    folder = out / ckpt_lib.CHECKPOINT_SUBDIR
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"--out={out}: already holds checkpoints ({folder}); choose a new folder or remove it"
        )
    meta: dict = {"step": int(step), "threshold": None}
    if hasattr(config, "to_json_best_effort"):
        meta["config"] = config.to_json_best_effort(sort_keys=True)
        # As zsad_jax.train records them: the None fields' types, the frozen encoders' weights.
        meta["config_types"] = ckpt_lib.none_field_types(config)
        meta["encoders"] = ckpt_lib.encoder_digests(config)
    else:
        meta["config"] = json.dumps(config, sort_keys=True)
    checkpointer = ckpt_lib.TrainCheckpointer(folder, keep=1, async_save=False)
    try:
        checkpointer.save(
            int(step), params=params, opt_state=dict(NO_OPTIMIZER_STATE), mutable={}, meta=meta
        )
        checkpointer.wait()
    finally:
        checkpointer.close()
    step_dir = ckpt_lib.resolve_step_dir(out, int(step))
    ckpt_lib.read_meta(step_dir)  # what evaluate / predict validate first
    differences = ckpt_lib.tree_differences(ckpt_lib.saved_params_metadata(step_dir), params)
    if differences:
        raise RuntimeError(f"{step_dir}: written params differ: {'; '.join(differences)}")
    record = dict(provenance or {}, step=int(step), checkpoint=str(step_dir))
    record["note"] = (
        "opt_state and mutable are placeholders (no official optimiser state): this workdir "
        "evaluates, predicts and exports, but python -m zsad_jax.train cannot resume it"
    )
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return step_dir


# ----------------------------------------------------------------------------------------------
# The command.


def default_config_file(method: str) -> str:
    """``configs/<method>.py`` of the current folder, else of the source tree holding this file."""
    local = Path("configs") / f"{method}.py"
    if local.is_file():
        return str(local)
    tree = Path(__file__).resolve().parent.parent / "configs" / f"{method}.py"
    if tree.is_file():
        return str(tree)
    raise FileNotFoundError(
        f"no configs/{method}.py here or next to {Path(__file__).parent}; pass "
        f"--config=path/to/configs/{method}.py (the file of the zsad_jax source tree)"
    )


def _siblings_importable(config_file: str) -> None:
    """A config file imports ``configs.common``: make its source tree importable when the command
    runs from another folder."""
    folder = Path(config_file.partition(":")[0]).resolve().parent
    if folder.name == "configs" and (folder / "common.py").is_file():
        root = str(folder.parent)
        if root not in sys.path:
            sys.path.insert(0, root)


ENCODER_FLAGS = {
    "af_clip": {"backbone": "model.backbone"},
    "ava_dino": {"backbone": "model.backbone", "text_encoder": "model.text_encoder"},
    "acd_clip": {"backbone": "model.backbone"},
}


def build_config(method: str, config_file: str | None, overrides, encoders: dict[str, str | None]):
    """The config to store: ``config_file`` (default ``configs/<method>.py``) with the overrides
    and the encoder paths (``--backbone`` = ``--config.model.backbone.checkpoint=...``)."""
    spec = config_file or default_config_file(method)
    _siblings_importable(spec)
    overrides = list(overrides)
    for flag, field in ENCODER_FLAGS[method].items():
        if encoders.get(flag):
            overrides.append((f"{field}.checkpoint", str(encoders[flag])))
    config = cli.build_config(config_file=spec, overrides=overrides)
    return config, spec, overrides


def encoder_notes(method: str, config: Any) -> list[str]:
    """A note per encoder whose converted weights are not there yet (the heads were checked
    against its preset architecture)."""
    notes = []
    for flag, field in ENCODER_FLAGS[method].items():
        cfg = config.model[field.split(".")[1]]
        if cfg.random_init:
            continue
        path = Path(cfg.checkpoint) if cfg.checkpoint else None
        if path is None or not (path / encoder_checkpoint.CONFIG_FILE).is_file():
            script = "convert.clip" if cfg.kind == "clip" else "convert.dinov3"
            notes.append(
                f"note: config.{field}.checkpoint={cfg.checkpoint!r} holds no converted {cfg.kind} "
                f"encoder yet (the heads were checked against its preset {cfg.preset!r}); convert "
                f"it with python -m {script} --src SRC --out {cfg.checkpoint} before evaluating, "
                f"or pass --{flag}=DIR"
            )
    return notes


def _af_clip_dataset_note(adaptor: str, config: Any) -> str | None:
    """AF-CLIP names its files ``<dataset>_adaptor.pt``: a note when the stored config trains on
    the other dataset."""
    name = Path(adaptor).name
    trained_on = {"mvtec_": "mvtec_ad", "visa_": "visa"}
    train_set = config.data.train_set
    for prefix, dataset in trained_on.items():
        if name.startswith(prefix) and train_set in trained_on.values() and train_set != dataset:
            return (
                f"note: {name} was trained on {dataset} (AF-CLIP's <dataset>_adaptor.pt naming), "
                f"but the stored config has data.train_set={config.data.train_set!r}; convert with "
                f"--config=configs/af_clip.py:train_set={dataset} for the cross-dataset protocol"
            )
    return None


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    epilog = (
        "Method options: python -m convert.heads METHOD --help. Config overrides: "
        "--config.KEY=VALUE (as for zsad_jax.train). DLVP-CLIP has no official code or released "
        "weights (no public repository exists): there is nothing to convert for it; train it with "
        "python -m zsad_jax.train --config=configs/dlvp_clip.py."
    )
    parser = argparse.ArgumentParser(
        prog="python -m convert.heads",
        description=doc[0] + "\n\n" + doc[1],
        epilog=textwrap.fill(epilog, 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subs = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    helps = {
        "af_clip": "AF-CLIP: <dataset>_adaptor.pt (pickled module) + <dataset>_prompt.pt",
        "ava_dino": "AVA-DINO: ckpt/epoch_N.pth (dict of the six heads' state dicts)",
        "acd_clip": "ACD-CLIP: adapter_<epoch>.pth (text_adapter / image_adapter state dicts)",
    }
    for method in METHODS:
        sub = subs.add_parser(method, help=helps[method], description=helps[method])
        if method == "af_clip":
            sub.add_argument("--adaptor", required=True, help="<dataset>_adaptor.pt")
            sub.add_argument("--prompt", required=True, help="<dataset>_prompt.pt")
        else:
            sub.add_argument("--src", required=True, help="the official checkpoint file")
        sub.add_argument("--out", required=True, help="output workdir (evaluate --checkpoint=OUT)")
        sub.add_argument(
            "--config",
            default=None,
            help=f"config file[:variant] to store (default configs/{method}.py as it is)",
        )
        for flag, field in ENCODER_FLAGS[method].items():
            sub.add_argument(
                f"--{flag}",
                default=None,
                help=f"converted encoder directory (= --config.{field}.checkpoint=DIR; default the "
                "config's)",
            )
        sub.add_argument("--step", type=int, default=0, help="step number of the checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = cli.split_overrides(argv)
    except cli.CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rest[:1] == ["dlvp_clip"]:
        print(
            "error: DLVP-CLIP has no official code or released weights (no public repository "
            "exists), so there is nothing to convert; train it with python -m zsad_jax.train "
            "--config=configs/dlvp_clip.py",
            file=sys.stderr,
        )
        return 2
    args = _parser().parse_args(rest)
    method = args.method
    files = (
        {"adaptor": args.adaptor, "prompt": args.prompt}
        if method == "af_clip"
        else {"src": args.src}
    )
    encoders = {flag: getattr(args, flag) for flag in ENCODER_FLAGS[method]}
    try:
        config, spec, used = build_config(method, args.config, overrides, encoders)
        params, provenance = convert(method, files, config)
        provenance.update(config_file=spec, overrides=[f"{k}={v}" for k, v in used])
        notes = encoder_notes(method, config)
        if method == "af_clip":
            notes.append(_af_clip_dataset_note(args.adaptor, config))
        step_dir = write_checkpoint(args.out, config, params, step=args.step, provenance=provenance)
    except cli.CommandLineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in filter(None, notes):
        print(note, file=sys.stderr)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "checkpoint": str(step_dir),
                "method": method,
                "params": int(sum(v.size for v in params.values())),
                "evaluate": f"python -m zsad_jax.evaluate --checkpoint={args.out}",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
