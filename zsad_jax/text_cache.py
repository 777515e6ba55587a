"""Frozen per-class text embeddings: encoded in batches with a progress bar, cached on disk.

A method whose class text does not depend on trained weights (AVA-DINO's prompt ensemble through the
frozen CLIP text tower) computes it once per class and stores it here, so a second evaluation of
the same classes does not pay for it again. Methods whose text goes through trained weights
(ACD-CLIP's text adapters, AF-CLIP / DLVP-CLIP's learnt prompts) must not use this cache.

Where the files go (``cache_dir``):

* ``$ZSAD_TEXT_CACHE`` if set (``""``, ``off`` or ``0`` turn the disk cache off);
* else ``<converted text encoder directory>/text_cache/``, next to the weights it was computed from;
* else nowhere: random-init encoders (tests, the demo) have no converted directory, and nothing is
  ever written into the repository tree unasked.

What a file is keyed by (``CacheKey``): a hash of the text tower's weights (every array's path,
dtype, shape and bytes) and architecture (activation included), a method tag naming the pooling
recipe, and the token ids of the class's prompts (hence the prompt list and the tokenizer). One
``<name>-<key>.npy`` per class; written to a temporary file in the same directory and renamed
(atomic on POSIX), so a crashed or concurrent writer never leaves a half file under the final
name. Unreadable or malformed files are treated as missing and rewritten; an unwritable directory
gives one warning and the run continues without the disk cache. Values are also kept in memory
for the life of the process (no disk needed for a second ``set_classes`` in the same run).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from zsad_jax import report

ENV_VAR = "ZSAD_TEXT_CACHE"
SUBDIR = "text_cache"
_OFF = ("", "off", "0", "false", "none")
# Prompts per jitted text-tower call: bounds the activation memory of one call (at ViT-L/14 width
# and 77 tokens: 64 x 77 x 3072 float32 = 58 MB for the MLP hidden) and sets the progress step.
DEFAULT_BATCH = 64

# Tower fingerprints by the identity of its arrays: hashing ~0.5 GB of weights takes about a
# second, and every evaluation during training calls set_classes on the same frozen arrays.
_FINGERPRINTS: list[tuple[list[weakref.ref], str]] = []
_MEMORY: dict[str, np.ndarray] = {}
_MAX_MEMORY = 4096  # per-class arrays kept in memory (a few KB each)
_WARNED: set[str] = set()


def cache_dir(checkpoint: str | os.PathLike | None, *, random_init: bool) -> Path | None:
    """Where class text files go: ``$ZSAD_TEXT_CACHE``, else ``<checkpoint>/text_cache``, else
    None (random-init encoder or no converted directory)."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    if random_init or not checkpoint:
        return None
    return Path(checkpoint) / SUBDIR


def _leaves(module: nnx.Module) -> list[tuple[str, Any]]:
    flat = nnx.to_flat_state(nnx.state(module, nnx.Variable))
    return sorted((".".join(map(str, p)), v.get_value()) for p, v in flat)


def weights_fingerprint(module: nnx.Module) -> str:
    """blake2b of every array of ``module`` (path, dtype, shape, bytes), memoised by identity."""
    leaves = _leaves(module)
    arrays = [x for _, x in leaves]
    for refs, digest in _FINGERPRINTS:
        if len(refs) == len(arrays) and all(r() is x for r, x in zip(refs, arrays, strict=True)):
            return digest
    h = hashlib.blake2b(digest_size=20)
    for path, x in leaves:
        host = np.ascontiguousarray(np.asarray(x))
        h.update(f"{path}|{host.dtype.str}|{host.shape}\n".encode())
        h.update(host.tobytes())
    digest = h.hexdigest()
    try:
        refs = [weakref.ref(x) for x in arrays]
    except TypeError:  # a leaf type without weak references: no memo
        return digest
    _FINGERPRINTS[:] = [(r, d) for r, d in _FINGERPRINTS if all(x() is not None for x in r)]
    _FINGERPRINTS.append((refs, digest))
    return digest


class CacheKey:
    """What one class's embedding depends on, except its prompt ids (see the module docstring)."""

    def __init__(self, tower: nnx.Module, tag: str):
        self.prefix = f"{tag}|{getattr(tower, 'config', None)!r}|{weights_fingerprint(tower)}"

    def of(self, ids: np.ndarray, extra: str = "") -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(self.prefix.encode())
        h.update(f"|{extra}|{ids.dtype.str}|{ids.shape}|".encode())
        h.update(np.ascontiguousarray(ids).tobytes())
        return h.hexdigest()


def _file(directory: Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "class"
    return directory / f"{safe}-{key}.npy"


def _valid(value: Any, shape: tuple[int, ...]) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.shape == tuple(shape)
        and value.dtype == np.float32
        and bool(np.isfinite(value).all())
    )


def load(directory: Path | None, name: str, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached float32 array of ``shape``, or None (missing, unreadable, wrong shape, not
    finite)."""
    value = _MEMORY.get(key)
    if value is None and directory is not None:
        try:
            value = np.load(_file(directory, name, key), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if _valid(value, shape):
            _remember(key, value)
    return value if _valid(value, shape) else None


def _remember(key: str, value: np.ndarray) -> None:
    if len(_MEMORY) >= _MAX_MEMORY:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = value


def save(directory: Path | None, name: str, key: str, value: np.ndarray) -> None:
    """Stores ``value`` (kept in memory; written atomically when ``directory`` is set)."""
    value = np.ascontiguousarray(value, np.float32)
    _remember(key, value)
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, value, allow_pickle=False)
            os.replace(tmp, _file(directory, name, key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        if str(directory) not in _WARNED:
            _WARNED.add(str(directory))
            warnings.warn(
                f"zsad_jax.text_cache: cannot write class text to {directory} ({e}); continuing "
                f"without the disk cache (set {ENV_VAR} to a writable directory, or to 'off')",
                stacklevel=2,
            )


def encode_in_batches(
    encode: Callable[[np.ndarray], Any],
    ids: np.ndarray,
    *,
    batch: int = DEFAULT_BATCH,
    desc: str = "class text",
) -> np.ndarray:
    """Runs ``encode`` (ids (batch, T) -> (batch, ...)) over the rows of ``ids`` in fixed-size
    batches (the last one padded with copies of row 0, so one compilation serves all), with a
    progress bar on stderr (process 0's); blocks until every row is on the host. Returns (S, ...)
    float32."""
    n = ids.shape[0]
    batch = max(1, min(batch, n))
    out = []
    bar = report.progress_bar(n, enabled=jax.process_index() == 0, desc=desc, unit="prompt")
    try:
        for start in range(0, n, batch):
            chunk = ids[start : start + batch]
            rows = chunk.shape[0]
            if rows < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - rows, axis=0)])
            out.append(np.asarray(jax.device_get(encode(chunk)), np.float32)[:rows])
            bar.update(rows)
    finally:
        bar.close()
    return np.concatenate(out)


def cached_per_class(
    prompts: dict[str, tuple[np.ndarray, str]],
    key: CacheKey,
    directory: Path | None,
    compute: Callable[[dict[str, tuple[np.ndarray, str]]], list[np.ndarray]],
    shape: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """{name: (ids, extra)} -> {name: float32 array of ``shape``}: from the cache where present,
    the missing classes from one ``compute`` call (their ``prompts`` entries, in order), then
    stored. ``extra`` is whatever else the value depends on (e.g. where the states split)."""
    keys = {name: key.of(ids, extra) for name, (ids, extra) in prompts.items()}
    found = {name: load(directory, name, keys[name], shape) for name in prompts}
    missing = {name: prompts[name] for name, value in found.items() if value is None}
    if missing:
        for name, value in zip(missing, compute(missing), strict=True):
            value = np.asarray(value, np.float32)
            save(directory, name, keys[name], value)
            found[name] = value
    return found


def clear_memory() -> None:
    """Forgets the in-memory copies (tests; the disk files stay)."""
    _MEMORY.clear()
