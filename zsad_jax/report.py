"""What the commands write and show, in one form: JSON values, the config as JSON, progress bars.

Every JSON file and line of zsad_jax (metrics, predictions, run records, tables) goes through
``json_ready``, so NaN is always ``null`` and NumPy/JAX values are plain numbers; result files are
written with ``write_atomic`` and folders (converted checkpoints, generated datasets) put in place
with ``replace_folder``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def json_ready(value: Any) -> Any:
    """``value`` as JSON values: NaN/inf -> None, NumPy/JAX scalars -> Python numbers, arrays ->
    (nested) lists, mappings -> dicts with string keys; anything else its ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (int, np.integer)):
        return int(value)
    if np.ndim(value) > 0:
        return json_ready(np.asarray(value).tolist())
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``path`` whole or not at all (a temporary file, flushed to disk, renamed over it), so
    that a process killed while writing never leaves a half-written file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def link_target(path: str | os.PathLike) -> Path:
    """``path``, or where it points if it is a symbolic link (say to a larger disk): the folder
    to stage beside and ``replace_folder``, since a folder cannot be renamed onto a link or
    across disks, and replacing the link would lose where it points."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def replace_folder(staging: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Puts the finished folder ``staging`` (made with ``tempfile.mkdtemp`` beside ``dest``) at
    ``dest``, readable by others as a folder made with ``os.makedirs`` would be.

    mkdtemp makes its folder private (0700) and safetensors its files (0600), so the modes are
    set from the umask, as ``os.makedirs`` and ``open`` would have. An existing ``dest`` is renamed
    aside first and deleted only once the new folder is in place (put back if that fails), so a
    process killed or failing midway leaves the old or the new folder whole on disk, never half
    deleted. A ``dest`` that is a file or a link is not touched: the rename fails (``OSError``),
    as it does when another process put a ``dest`` there first (callers pass ``link_target``).
    """
    staging, dest = Path(staging), Path(dest)
    umask = _umask()
    for path in (staging, *staging.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    aside = None
    try:
        if dest.is_dir() and not dest.is_symlink():  # anything else makes the rename below fail
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
            os.rename(dest, aside / "old")
        os.rename(staging, dest)
    except BaseException:
        if aside is not None and not os.path.lexists(dest):
            os.rename(aside / "old", dest)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def config_json(config: Any) -> str:
    """The config as sorted JSON text (what checkpoints store and resumes compare)."""
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(sort_keys=True)
    import json

    return json.dumps(json_ready(dict(config)), sort_keys=True)


# Seconds between a bar's redraws when stderr is not a terminal (a log file, a pod's log, a CI
# capture): each redraw is appended there, and tqdm's own 0.1 s wrote the demo's 600 steps as 1,145
# redraws (125 kB); every 30 s is a few redraws a run that still show the rate and the loss.
LOG_REFRESH_SECONDS = 30.0


def progress_bar(total: int, *, enabled: bool, desc: str, unit: str, initial: int = 0):
    """A tqdm bar on stderr, or (``enabled`` False: other processes, tests) a silent stand-in.
    Off a terminal it redraws every ``LOG_REFRESH_SECONDS`` only."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # only where a bar is shown

    refresh = 0.1 if sys.stderr.isatty() else LOG_REFRESH_SECONDS
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
        file=sys.stderr, mininterval=refresh, maxinterval=max(10.0, refresh),
    )  # fmt: skip


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, *args: Any, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass
