"""Reading PyTorch checkpoints and mapping their keys onto zsad_jax state paths (CPU, torch only).

A conversion is an explicit name table: ``{flax_key: (torch_key_or_keys, transform)}``. Every flax
key must be produced, every source key must be used or explicitly ignored, and every shape is
checked when the arrays are loaded into the Flax model; anything else raises an error that lists the
keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from convert import torchscript

Transform = Callable[..., np.ndarray]
NameTable = dict[str, tuple[str | tuple[str, ...], Transform | None]]

# A key that only one encoder family has (any wrapper prefix before it): for the hint that names
# the other converter when a checkpoint is given to the wrong one.
_FAMILY_KEYS = {
    "clip": ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    "dinov3": ("embeddings.patch_embeddings.weight", "patch_embed.proj.weight"),
}
_FAMILY_NAMES = {"clip": "CLIP", "dinov3": "DINOv3"}


def family_of(state: Iterable[str]) -> str | None:
    """Which encoder family a state dict's keys show: "clip", "dinov3", or None."""
    for family, markers in _FAMILY_KEYS.items():
        if any(k == m or k.endswith("." + m) for k in state for m in markers):
            return family
    return None


def wrong_family_message(src: str | os.PathLike, state: Iterable[str], expected: str) -> str | None:
    """The refusal for a checkpoint of the other encoder family, naming its converter; None when
    the keys show no other family."""
    found = family_of(state)
    if found is None or found == expected:
        return None
    return (
        f"{src} is a {_FAMILY_NAMES[found]} checkpoint, not a {_FAMILY_NAMES[expected]} one: "
        f"convert it with python -m convert.{found} (convert.verify compares a source with a "
        "converted folder of the same kind)"
    )


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def load_torch_state(src: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a state dict as float32/int NumPy arrays from any common PyTorch checkpoint form.

    ``src`` may be a transformers directory (``model.safetensors`` or ``pytorch_model.bin``), a
    ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` state dict (optionally nested under
    ``state_dict``/``model``), or an OpenAI TorchScript archive (``ViT-L-14-336px.pt``).

    Nothing in ``src`` is run: safetensors is preferred (plain arrays); pickled state dicts go
    through ``torch.load(weights_only=True)`` (tensors and containers only); TorchScript archives
    through ``convert.torchscript`` (data only), never ``torch.jit.load``, which runs their code.
    """
    path = Path(src)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"{src}: no model.safetensors or pytorch_model.bin in this directory; pass the "
                "transformers model directory or the checkpoint file itself"
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"{src}: no such file or folder; give --src the downloaded model folder or its "
            "checkpoint file (.safetensors, .pt, .pth, .bin)"
        )
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: np.asarray(v) for k, v in load_file(path).items()}

    if torchscript.is_torchscript(path):  # OpenAI's CLIP releases
        return {k: _float32(v) for k, v in torchscript.read_state(path).items()}

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled object but tensors and containers
        raise ValueError(_unreadable_pickle_message(path, e)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


def _unreadable_pickle_message(path: Path, error: Exception) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refuses. torch's own message is not
    quoted: it suggests loading with ``weights_only=False``, which runs whatever the file holds."""
    text = str(error)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return (
            f"{path}: holds pickled Python objects, not only tensors (it refers to "
            f"{named.group(1)}), and pickled objects can run code, so it is not loaded; convert "
            "it to .safetensors in an environment where you trust the file, or use a "
            ".safetensors copy of these weights"
        )
    # A truncated or foreign file: the reader's own detail, without torch's weights_only advice.
    details = [
        line.strip().removeprefix("WeightsUnpickler error:").strip()
        for line in text.splitlines()
        if line.strip() and not line.startswith(("Weights only load failed", "Check the doc"))
    ]
    details = [d for d in details if d and "weights_only" not in d]
    reason = details[0] if details else type(error).__name__
    return (
        f"{path}: not a PyTorch checkpoint of tensors that loads without running code ({reason}); "
        "is the file complete? A .safetensors copy of these weights also works"
    )


def _float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def strip_prefix(state: dict[str, np.ndarray], prefixes: Iterable[str]) -> dict[str, np.ndarray]:
    """Removes the first matching wrapper prefix (``module.``, ``model.``) from every key."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def apply_name_table(
    state: dict[str, np.ndarray],
    table: NameTable,
    *,
    source: str,
    ignore: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Builds ``{flax_key: array}`` from ``state`` through ``table``.

    ``ignore`` holds regular expressions of source keys that are deliberately unused (buffers such
    as ``position_ids``, ``logit_scale``). Raises ``ValueError`` listing absent and unused source
    keys.
    """
    ignore_res = [re.compile(p) for p in ignore]
    out, absent, used = {}, [], set()
    for flax_key, (torch_keys, fn) in table.items():
        keys = (torch_keys,) if isinstance(torch_keys, str) else tuple(torch_keys)
        missing = [k for k in keys if k not in state]
        if missing:
            absent.extend(missing)
            continue
        used.update(keys)
        arrays = [state[k] for k in keys]
        out[flax_key] = fn(*arrays) if fn is not None else arrays[0]
    unused = sorted(
        k for k in state if k not in used and not any(r.fullmatch(k) for r in ignore_res)
    )
    if absent or unused:
        lines = [f"{source}: checkpoint keys do not match the expected architecture"]
        if absent:
            lines.append(f"  expected but absent ({len(absent)}): " + ", ".join(absent[:20]))
        if unused:
            lines.append(f"  present but unused ({len(unused)}): " + ", ".join(unused[:20]))
        lines.append("  Is this the right model family/size for this converter?")
        raise ValueError("\n".join(lines))
    return out


def flatten_nested(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": x}, "c": y}`` -> ``{"a.b": x, "c": y}``: a dict of state dicts (the
    checkpoints official training scripts save) as one dotted state dict. Leaves are kept as they
    are (arrays, and plain values such as an ``epoch`` counter)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_nested(value, f"{name}."))
        else:
            out[name] = value
    return out
