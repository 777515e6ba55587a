"""Converts a PyTorch DINOv3 ViT checkpoint into a zsad_jax encoder checkpoint (CPU).

    python -m convert.dinov3 --src SRC --out OUT [--overwrite]

SRC is either
  * a transformers directory (``config.json`` + ``model.safetensors``, e.g. a download of
    ``facebook/dinov3-vitl16-pretrain-lvd1689m``; block keys ``layer.N.*``, or ``model.layer.N.*``
    as transformers >= 5 names them in memory), or
  * an original release file ``dinov3_vit*_pretrain_*.pth`` from facebookresearch/dinov3 (fused
    ``blocks.N.attn.qkv`` with a masked key bias, ``storage_tokens``, ``blocks.N.ls1.gamma`` ...);
    the architecture is inferred from the array shapes (head width from ``rope_embed.periods``).

Every source key is used or deliberately ignored (``mask_token``: masked-image training only; the
RoPE period buffers, recomputed from ``rope_theta`` after checking them; ``local_cls_norm``: a
training-only norm of the SAT-493M ViT-L); anything else raises with the key lists. Check the
result against transformers with ``python -m convert.verify --src SRC --converted OUT``. An ``OUT``
that already holds a converted checkpoint is replaced only with ``--overwrite``, and one holding
other files never is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convert.common import (
    NameTable,
    apply_name_table,
    load_torch_state,
    strip_prefix,
    wrong_family_message,
)
from zsad_jax.encoders import checkpoint
from zsad_jax.encoders.dinov3 import ACTIVATIONS, DinoV3, DinoV3Config
from zsad_jax.errors import run_command

KIND = "dinov3"

TRANSFORMERS_IGNORE = (r"embeddings\.mask_token", r"rope_embeddings\.inv_freq")
ORIGINAL_IGNORE = (r"mask_token", r"rope_embed\.periods", r"local_cls_norm\.(weight|bias)")

# transformers config fields whose other values this encoder does not implement.
_TRANSFORMERS_FIXED = {
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
}


def _linear(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax kernel (in, out)."""
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


# ----------------------------------------------------------------------------------------------
# transformers layout


def config_from_transformers(hf: dict[str, Any], *, source: str) -> DinoV3Config:
    """Our config from a transformers ``DINOv3ViTConfig`` dict (its ``config.json``)."""
    wrong = {
        k: hf[k] for k, expected in _TRANSFORMERS_FIXED.items() if hf.get(k, expected) != expected
    }
    if wrong:
        raise ValueError(
            f"{source}: unsupported DINOv3 variant {wrong}; this encoder implements q/v/out/MLP "
            f"biases and no key bias ({_TRANSFORMERS_FIXED})"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (one of {ACTIVATIONS})")
    patch = hf.get("patch_size", 16)
    if isinstance(patch, list | tuple):
        if len(set(patch)) != 1:
            raise ValueError(f"{source}: non-square patch_size {patch} is not supported")
        patch = patch[0]
    return DinoV3Config(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        patch_size=int(patch),
        num_channels=hf.get("num_channels", 3),
        num_register_tokens=hf.get("num_register_tokens", 0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        rope_theta=float(hf.get("rope_theta", 100.0)),
        use_gated_mlp=hf.get("use_gated_mlp", False),
        act=act,
    )


def transformers_config_dict(config: DinoV3Config) -> dict[str, Any]:
    """``DINOv3ViTConfig`` keyword arguments describing ``config`` (for the reference model)."""
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "num_register_tokens": config.num_register_tokens,
        "layer_norm_eps": config.layer_norm_eps,
        "rope_theta": config.rope_theta,
        "use_gated_mlp": config.use_gated_mlp,
        "hidden_act": config.act,
        **_TRANSFORMERS_FIXED,
    }


def _normalise_transformers_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Files (the hub's and save_pretrained's) name the blocks ``layer.N``; the in-memory state dict
    # of transformers >= 5 calls them ``model.layer.N``. Use the file names, which errors then show.
    return {re.sub(r"^model\.layer\.(\d+)\.", r"layer.\1.", k): v for k, v in state.items()}


def transformers_table(config: DinoV3Config) -> NameTable:
    """``{flax_key: (transformers_key, transform)}`` for a ``DINOv3ViTModel`` file (``layer.N``)."""
    table: NameTable = {
        "patch_embed.kernel": ("embeddings.patch_embeddings.weight", _conv),
        "patch_embed.bias": ("embeddings.patch_embeddings.bias", None),
        "cls_token": ("embeddings.cls_token", None),
        "norm.scale": ("norm.weight", None),
        "norm.bias": ("norm.bias", None),
    }
    if config.num_register_tokens:
        table["register_tokens"] = ("embeddings.register_tokens", None)
    mlp = (
        ("gate_proj", "up_proj", "down_proj") if config.use_gated_mlp else ("up_proj", "down_proj")
    )
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}", f"layer.{i}"
        for norm in ("norm1", "norm2"):
            table[f"{ours}.{norm}.scale"] = (f"{theirs}.{norm}.weight", None)
            table[f"{ours}.{norm}.bias"] = (f"{theirs}.{norm}.bias", None)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table[f"{ours}.attn.{proj}.kernel"] = (f"{theirs}.attention.{proj}.weight", _linear)
            if proj != "k_proj":
                table[f"{ours}.attn.{proj}.bias"] = (f"{theirs}.attention.{proj}.bias", None)
        for proj in mlp:
            table[f"{ours}.mlp.{proj}.kernel"] = (f"{theirs}.mlp.{proj}.weight", _linear)
            table[f"{ours}.mlp.{proj}.bias"] = (f"{theirs}.mlp.{proj}.bias", None)
        for n in (1, 2):
            table[f"{ours}.layer_scale{n}.gamma"] = (f"{theirs}.layer_scale{n}.lambda1", None)
    return table


def from_transformers(
    state: dict[str, np.ndarray], config: DinoV3Config, *, source: str
) -> dict[str, np.ndarray]:
    """Flax arrays from a transformers ``DINOv3ViTModel`` state dict (either key generation)."""
    state = _normalise_transformers_keys(state)
    registers = state.get("embeddings.register_tokens")
    if registers is not None and registers.size == 0 and not config.num_register_tokens:
        # transformers keeps a (1, 0, D) parameter when there are no registers; nothing to map.
        state = {k: v for k, v in state.items() if k != "embeddings.register_tokens"}
    return apply_name_table(
        state, transformers_table(config), source=source, ignore=TRANSFORMERS_IGNORE
    )


# ----------------------------------------------------------------------------------------------
# original facebookresearch/dinov3 layout


def rope_periods(head_dim: int, theta: float) -> np.ndarray:
    """The original ``rope_embed.periods`` buffer, ``theta ** (4k / head_dim)``, k < head_dim/4."""
    return theta ** (np.arange(head_dim // 4, dtype=np.float64) * 4.0 / head_dim)


def config_from_original(state: dict[str, np.ndarray], *, source: str) -> DinoV3Config:
    """Infers the architecture of an original-layout state dict from its array shapes.

    LayerNorm epsilon (1e-5, "layernormbf16") and RoPE theta (100) are not stored; they are the
    values of every released DINOv3 ViT (``dinov3/hub/backbones.py``), and the stored RoPE
    periods are checked against theta.
    """
    needed = ("cls_token", "patch_embed.proj.weight", "rope_embed.periods", "blocks.0.norm1.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(
            f"{source}: not an original DINOv3 ViT state dict (missing {absent}); pass a "
            "dinov3_vit*_pretrain_*.pth file or a transformers DINOv3 directory"
        )
    hidden = state["cls_token"].shape[-1]
    out_ch, in_ch, ph, pw = state["patch_embed.proj.weight"].shape
    if ph != pw:
        raise ValueError(f"{source}: non-square patches {ph}x{pw} are not supported")
    head_dim = 4 * state["rope_embed.periods"].shape[0]
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    gated = "blocks.0.mlp.w1.weight" in state
    mlp_dim = state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    registers = state["storage_tokens"].shape[1] if "storage_tokens" in state else 0
    if hidden % head_dim:
        raise ValueError(
            f"{source}: width {hidden} is not a multiple of the head width {head_dim} implied by "
            "rope_embed.periods"
        )
    config = DinoV3Config(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=hidden // head_dim,
        mlp_dim=mlp_dim,
        patch_size=ph,
        num_channels=in_ch,
        num_register_tokens=registers,
        use_gated_mlp=gated,
        # The original SwiGLU FFN hard-codes SiLU; the plain MLP uses nn.GELU (exact).
        act="silu" if gated else "gelu",
    )
    expected = rope_periods(head_dim, config.rope_theta)
    periods = np.asarray(state["rope_embed.periods"], np.float64)
    if not np.allclose(periods, expected, rtol=1e-4, atol=0):
        raise ValueError(
            f"{source}: rope_embed.periods {periods.tolist()} are not theta**(4k/{head_dim}) for "
            f"theta={config.rope_theta} ({expected.tolist()}); this checkpoint uses another RoPE "
            "parametrisation (min/max period) that the encoder does not implement"
        )
    return config


def _effective_qkv_bias(state: dict[str, np.ndarray], block: int, *, source: str) -> np.ndarray:
    """The fused qkv bias as the original forward uses it (times ``bias_mask`` when present);
    raises unless its key part is zero (our attention has no key bias)."""
    bias = state[f"blocks.{block}.attn.qkv.bias"]
    mask = state.get(f"blocks.{block}.attn.qkv.bias_mask")
    effective = bias * mask if mask is not None else bias
    d = bias.shape[0] // 3
    if not np.all(np.isfinite(effective)) or np.any(effective[d : 2 * d] != 0):
        raise ValueError(
            f"{source}: blocks.{block}.attn.qkv has a non-zero (or non-finite) key bias after "
            "bias_mask; released DINOv3 ViTs mask it to zero and this encoder has no key bias"
        )
    return effective


def original_table(state: dict[str, np.ndarray], config: DinoV3Config, *, source: str) -> NameTable:
    """``{flax_key: (original_key(s), transform)}`` for a facebookresearch/dinov3 state dict."""
    d = config.hidden_size
    table: NameTable = {
        "patch_embed.kernel": ("patch_embed.proj.weight", _conv),
        "patch_embed.bias": ("patch_embed.proj.bias", None),
        "cls_token": ("cls_token", None),
        "norm.scale": ("norm.weight", None),
        "norm.bias": ("norm.bias", None),
    }
    if config.num_register_tokens:
        table["register_tokens"] = ("storage_tokens", None)
    mlp = (
        {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if config.use_gated_mlp
        else {"up_proj": "fc1", "down_proj": "fc2"}
    )
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}", f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            table[f"{ours}.{norm}.scale"] = (f"{theirs}.{norm}.weight", None)
            table[f"{ours}.{norm}.bias"] = (f"{theirs}.{norm}.bias", None)
        qkv_bias_keys: tuple[str, ...] = (f"{theirs}.attn.qkv.bias",)
        if f"{theirs}.attn.qkv.bias_mask" in state:
            qkv_bias_keys += (f"{theirs}.attn.qkv.bias_mask",)
        if qkv_bias_keys[0] in state:
            _effective_qkv_bias(state, i, source=source)
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(part * d, (part + 1) * d)
            table[f"{ours}.attn.{proj}.kernel"] = (
                f"{theirs}.attn.qkv.weight",
                lambda w, rows=rows: w[rows].T,
            )
            if proj != "k_proj":
                table[f"{ours}.attn.{proj}.bias"] = (
                    qkv_bias_keys,
                    lambda b, m=None, rows=rows: (b * m if m is not None else b)[rows],
                )
        table[f"{ours}.attn.o_proj.kernel"] = (f"{theirs}.attn.proj.weight", _linear)
        table[f"{ours}.attn.o_proj.bias"] = (f"{theirs}.attn.proj.bias", None)
        for flax_name, torch_name in mlp.items():
            table[f"{ours}.mlp.{flax_name}.kernel"] = (f"{theirs}.mlp.{torch_name}.weight", _linear)
            table[f"{ours}.mlp.{flax_name}.bias"] = (f"{theirs}.mlp.{torch_name}.bias", None)
        for n in (1, 2):
            table[f"{ours}.layer_scale{n}.gamma"] = (f"{theirs}.ls{n}.gamma", None)
    return table


def from_original(
    state: dict[str, np.ndarray], config: DinoV3Config, *, source: str
) -> dict[str, np.ndarray]:
    """Flax arrays from an original facebookresearch/dinov3 ViT state dict."""
    table = original_table(state, config, source=source)
    return apply_name_table(state, table, source=source, ignore=ORIGINAL_IGNORE)


def original_to_transformers(
    state: dict[str, np.ndarray], config: DinoV3Config
) -> dict[str, np.ndarray]:
    """An original-layout state dict renamed for ``DINOv3ViTModel`` (the verify reference)."""
    d = config.hidden_size
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state.get("mask_token", np.zeros((d,), np.float32)).reshape(
            1, 1, d
        ),
        "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if config.num_register_tokens:
        out["embeddings.register_tokens"] = state["storage_tokens"]
    mlp = (
        {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if config.use_gated_mlp
        else {"up_proj": "fc1", "down_proj": "fc2"}
    )
    for i in range(config.num_layers):
        src, dst = f"blocks.{i}", f"model.layer.{i}"
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{dst}.{norm}.{p}"] = state[f"{src}.{norm}.{p}"]
        w = state[f"{src}.attn.qkv.weight"]
        b = _effective_qkv_bias(state, i, source="original_to_transformers")
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.attention.{proj}.weight"] = w[part * d : (part + 1) * d]
            if proj != "k_proj":
                out[f"{dst}.attention.{proj}.bias"] = b[part * d : (part + 1) * d]
        out[f"{dst}.attention.o_proj.weight"] = state[f"{src}.attn.proj.weight"]
        out[f"{dst}.attention.o_proj.bias"] = state[f"{src}.attn.proj.bias"]
        for hf_name, orig_name in mlp.items():
            for p in ("weight", "bias"):
                out[f"{dst}.mlp.{hf_name}.{p}"] = state[f"{src}.mlp.{orig_name}.{p}"]
        for n in (1, 2):
            out[f"{dst}.layer_scale{n}.lambda1"] = state[f"{src}.ls{n}.gamma"]
    return out


# ----------------------------------------------------------------------------------------------
# reading a source, checking and saving


def _is_original(state: dict[str, np.ndarray]) -> bool:
    return any(k.startswith("blocks.") for k in state)


def _is_transformers(state: dict[str, np.ndarray]) -> bool:
    return any(re.match(r"(model\.)?layer\.\d+\.", k) for k in state)


def _transformers_config_file(src: Path) -> Path:
    return (src if src.is_dir() else src.parent) / "config.json"


def read_source(src: str | Path) -> tuple[str, dict[str, np.ndarray], DinoV3Config]:
    """Loads ``src`` and returns (layout "transformers" | "original", state dict, our config)."""
    src = Path(src)
    state = strip_prefix(load_torch_state(src), ("module.", "backbone."))
    if _is_original(state):
        return "original", state, config_from_original(state, source=str(src))
    if _is_transformers(state):
        cfg_file = _transformers_config_file(src)
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{src}: a transformers DINOv3 checkpoint needs its config.json beside it (the "
                f"head count is not in the weights) and there is no {cfg_file}: copy the "
                "config.json of the same Hugging Face model there, or give --src that model's "
                "folder"
            )
        hf = json.loads(cfg_file.read_text())
        if hf.get("model_type", "dinov3_vit") != "dinov3_vit":
            raise ValueError(f"{cfg_file}: model_type {hf['model_type']!r}, expected 'dinov3_vit'")
        return "transformers", state, config_from_transformers(hf, source=str(cfg_file))
    raise ValueError(
        wrong_family_message(src, state, expected=KIND)
        or f"{src}: neither an original DINOv3 ViT (blocks.N.*) nor a transformers DINOv3ViTModel "
        f"(layer.N.* / model.layer.N.*) state dict; first keys: {sorted(state)[:8]}"
    )


def model_shapes(config: DinoV3Config) -> dict[str, tuple[int, ...]]:
    """Every variable of ``DinoV3(config)`` with its shape, without allocating weights."""
    from flax import nnx

    abstract = nnx.eval_shape(lambda: DinoV3(config, rngs=nnx.Rngs(0)))
    return {
        ".".join(str(p) for p in path): tuple(var.shape)
        for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Variable))
    }


def check_shapes(arrays: dict[str, np.ndarray], config: DinoV3Config, *, source: str) -> None:
    """Raises listing missing, unexpected and mis-shaped keys against the Flax model."""
    expected = model_shapes(config)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = [
        f"{k}: {tuple(arrays[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(arrays))
        if tuple(arrays[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        lines = [f"{source}: converted arrays do not fit DinoV3({config})"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
        raise ValueError("\n".join(lines))


def convert(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Converts ``src`` (see the module docstring) and writes the checkpoint directory ``out``;
    an ``out`` that already holds a converted checkpoint is replaced only with ``overwrite``."""
    checkpoint.check_out_dir(
        out, overwrite=overwrite
    )  # before the (long) read of a full-size model
    layout, state, config = read_source(src)
    if layout == "original":
        arrays = from_original(state, config, source=str(src))
    else:
        arrays = from_transformers(state, config, source=str(src))
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    check_shapes(arrays, config, source=str(src))
    return checkpoint.save(out, KIND, config.to_dict(), arrays, source=f"{layout}:{src}")


# ----------------------------------------------------------------------------------------------
# parity with transformers (used by python -m convert.verify)


def reference_model(src: str | Path):
    """transformers ``DINOv3ViTModel`` (eval, float32, eager attention) with ``src``'s weights."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    layout, state, config = read_source(src)
    if layout == "transformers":
        directory = Path(src) if Path(src).is_dir() else Path(src).parent
        model = DINOv3ViTModel.from_pretrained(
            directory, attn_implementation="eager", dtype=torch.float32
        )
    else:
        model = DINOv3ViTModel._from_config(
            DINOv3ViTConfig(**transformers_config_dict(config)), attn_implementation="eager"
        )
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in original_to_transformers(state, config).items()
        }
        model.load_state_dict(tensors, strict=True)
    return model.float().eval()


def compare(src: str | Path, converted: str | Path, seed: int = 0) -> list[tuple[str, float]]:
    """Max abs differences between transformers and the converted encoder on random images.

    Two non-square images (6 x 9 patches) of standard-normal pixels; compares the residual stream
    after every block (transformers' ``hidden_states[i]``: index 0 is the embedding output, so
    block ``i`` is index ``i``) and the final normed tokens. Float32, full-precision matmuls.
    """
    import jax
    import torch
    from flax import nnx

    reference = reference_model(src)
    model = checkpoint.load(converted)
    cfg = model.config
    rng = np.random.default_rng(seed)
    p = cfg.patch_size
    images = rng.standard_normal((2, 6 * p, 9 * p, cfg.num_channels)).astype(np.float32)

    with torch.no_grad():
        ref = reference(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            output_hidden_states=True,
        )
    layers = tuple(range(1, cfg.num_layers + 1))
    with jax.default_matmul_precision("float32"):
        tokens, aux = nnx.jit(lambda m, x: m(x, layers=layers))(model, images)

    diffs = []
    for i in layers:
        diff = np.abs(np.asarray(aux["layers"][i]) - ref.hidden_states[i].numpy()).max()
        diffs.append((f"block_{i:02d}", float(diff)))
    diffs.append(
        ("output", float(np.abs(np.asarray(tokens) - ref.last_hidden_state.numpy()).max()))
    )
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="transformers directory or original .pth")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a converted checkpoint already at --out"
    )
    args = parser.parse_args(argv)
    out = convert(args.src, args.out, overwrite=args.overwrite)
    config = checkpoint.read_meta(out)["config"]
    print(f"wrote {out}: dinov3 {json.dumps(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
