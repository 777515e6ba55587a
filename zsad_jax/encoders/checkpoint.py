"""Converted encoder checkpoints, readable without torch.

A converted checkpoint is a directory::

    config.json           {"format": "zsad_jax.encoder/1", "type": "clip" | "dinov3",
                           "config": {...}, "source": "<what it was converted from>"}
    weights.safetensors   one array per variable, keyed by its NNX state path joined with "."
                          (e.g. ``vision.blocks.0.attn.in_proj.kernel``)
    vocab.json, merges.txt  (CLIP only) the BPE tokenizer files

Each encoder type has a builder in ``BUILDERS``: ``build(config_dict, rngs, **overrides) ->
module``, where ``overrides`` are architecture fields that change no weight shape (activation,
position-embedding resize mode, compute dtype) and that a method may set differently from the
source.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from zsad_jax import report
from zsad_jax.encoders import clip, dinov3

FORMAT = "zsad_jax.encoder/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

# Encoder type (``config.json`` "type") -> ``build(config_dict, rngs, **overrides)``.
BUILDERS: dict[str, Callable[..., nnx.Module]] = {"clip": clip.build, "dinov3": dinov3.build}


def _builder(kind: str):
    if kind not in BUILDERS:
        raise ValueError(f"unknown encoder type {kind!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[kind]


def flat_state(module: nnx.Module) -> dict[str, jax.Array]:
    """Every variable of ``module`` keyed by its dotted state path."""
    return {
        ".".join(str(p) for p in path): var[...]
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Variable))
    }


def load_flat_state(
    module: nnx.Module, arrays: dict[str, np.ndarray], *, source: str
) -> nnx.Module:
    """Returns ``module`` (possibly abstract) with every variable replaced by ``arrays[path]``.

    Every variable must be present with its exact shape, and every array must be used; otherwise a
    ``ValueError`` lists the missing, unexpected and mis-shaped keys and names ``source``.
    """
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    missing, wrong = [], []
    leaves = []
    used = set()
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        if key not in arrays:
            missing.append(key)
            leaves.append((path, var))
            continue
        used.add(key)
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(var.shape):
            wrong.append(f"{key}: file {tuple(value.shape)} vs model {tuple(var.shape)}")
        leaves.append((path, var.replace(jax.numpy.asarray(value, dtype=var.dtype))))
    unexpected = sorted(set(arrays) - used)
    if missing or unexpected or wrong:
        lines = [f"{source}: weights do not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
                if len(items) > 20:
                    lines.append(f"    ... and {len(items) - 20} more")
        raise ValueError("\n".join(lines))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save(
    out_dir: str | os.PathLike,
    kind: str,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    source: str,
    extra_files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Writes a converted checkpoint atomically (a temporary directory renamed into place); an
    ``out_dir`` that holds anything but a converted checkpoint is refused, never deleted. An
    ``out_dir`` that is a symbolic link (say to a larger disk) is written where it points, and
    the link is kept."""
    out = report.link_target(out_dir)
    if out.exists() and converted_kind(out) is None and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out}: holds other files than a converted checkpoint, which writing one there "
            "would delete; choose a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = {"format": FORMAT, "type": kind, "config": config, "source": str(source)}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (logit_scale) into (1,).
        save_file({k: np.array(v, order="C") for k, v in arrays.items()}, tmp / WEIGHTS_FILE)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        report.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def converted_kind(folder: str | os.PathLike) -> str | None:
    """The encoder type ("clip", "dinov3") of a converted checkpoint folder of any format
    version; None if it is not one (a Hugging Face model's folder has a ``config.json`` too)."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith(
        FORMAT.split("/")[0] + "/"
    ):
        return None
    return str(meta.get("type", "unknown"))


def check_out_dir(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuses, before any work, an ``--out`` that writing a converted checkpoint (``save``, which
    replaces the whole folder) would replace: a converted checkpoint unless ``overwrite``, and
    always a file, a folder of other files or a symbolic link. The converters and
    ``zsad_jax.pretrain.backbone`` call it first, so that a refusal never comes after a long
    conversion or pretraining."""
    out = Path(out)
    if out.is_symlink():
        # ``save`` renames its finished folder onto ``out``, which fails on a link (also a
        # dangling one); the folder it points to can be written instead.
        raise FileExistsError(
            f"--out {out}: is a symbolic link (to {os.readlink(out)}); writing replaces the "
            f"whole folder, so pass the folder itself: --out {out.resolve()}"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file, not a folder; choose another --out")
    kind = converted_kind(out)
    if kind is not None:
        if overwrite:
            return
        raise FileExistsError(
            f"--out {out}: already holds a converted {kind} checkpoint; pass --overwrite to "
            "replace it, or choose another --out"
        )
    held = sorted(p.name for p in out.iterdir())
    if held:
        raise FileExistsError(
            f"--out {out}: a folder of other files ({', '.join(held[:5])}"
            f"{', ...' if len(held) > 5 else ''}), not a converted checkpoint; writing there "
            "would delete them, so choose a new or empty --out"
        )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a converted checkpoint, with a clear error if it is not one."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a converted zsad_jax encoder "
            f"(expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "convert a PyTorch checkpoint first: python -m convert.clip --src SRC --out "
            f"{path}  (or python -m convert.dinov3 ...)"
        )
    meta = json.loads(cfg.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{cfg}: format {meta.get('format')!r}, expected {FORMAT!r}; re-convert it"
        )
    return meta


def weights_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a converted encoder's weights file: what a trained checkpoint records
    of each frozen encoder, so that other weights put in that folder later are noticed."""
    weights = Path(path) / WEIGHTS_FILE
    stat = weights.stat()
    return _file_digest(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Memoised per file version (size and mtime in the key): a process hashes each file once."""
    del size, mtime_ns
    with open(path, "rb") as f:
        return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


def load(path: str | os.PathLike, *, submodule: str | None = None, **overrides: Any) -> nnx.Module:
    """Builds the encoder described by ``path/config.json`` and fills in its converted weights.

    ``submodule`` (e.g. ``"text"`` of a CLIP checkpoint) returns only that attribute of the
    encoder, reading only its tensors from the file (AVA-DINO needs CLIP's text tower, not its
    300M-parameter vision tower). ``overrides`` go to the type's builder (for example
    ``act="gelu"`` or the position-embedding resize mode a method needs).
    """
    path = Path(path)
    meta = read_meta(path)
    build = _builder(meta["type"])
    abstract = nnx.eval_shape(lambda: build(meta["config"], nnx.Rngs(0), **overrides))
    weights = path / WEIGHTS_FILE
    if submodule is None:
        return load_flat_state(abstract, load_file(weights), source=str(weights))
    if not isinstance(getattr(abstract, submodule, None), nnx.Module):
        raise ValueError(f"{path}: a {meta['type']} encoder has no submodule {submodule!r}")
    prefix = submodule + "."
    with safe_open(weights, framework="numpy") as f:
        arrays = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    return load_flat_state(
        getattr(abstract, submodule), arrays, source=f"{weights} ({submodule} tensors)"
    )
