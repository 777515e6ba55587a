"""Writing a generated dataset (``synthetic``, ``procedural``) in the MVTec-AD layout.

``write_dataset`` renders every image of some categories into a folder, with the manifest (the
generation parameters) written last, so that an interrupted write never looks complete.
``ensure_generated`` returns a folder holding a wanted manifest, generating it first in a temporary
sibling that is then renamed into place: concurrent processes (multi-host tests on one machine) and
interrupted runs never see a half-written dataset. PNG files are written with fixed encoder
settings, so the same parameters give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from zsad_jax import report
from zsad_jax.data import readers

# (category, split, defect or None, index) -> (image (S, S, 3) uint8, mask (S, S) bool)
Render = Callable[[str, str, str | None, int], tuple[np.ndarray, np.ndarray]]


def cache_root(folder: str) -> str:
    """``folder`` in the per-user cache (``$ZSAD_JAX_CACHE`` or ``~/.cache/zsad_jax``)."""
    cache = os.environ.get("ZSAD_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "zsad_jax"
    )
    return os.path.join(cache, folder)


def read_manifest(root: str, manifest: str) -> dict | None:
    """The manifest ``root/manifest``, or None where there is none (or it is torn)."""
    try:
        with open(os.path.join(root, manifest)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


def save_png(path: str, array: np.ndarray) -> None:
    # Fixed encoder settings keep files byte-identical between runs.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _jobs(defect_types: Sequence[str], n_train_good: int, n_test_good: int, n_test_defect: int):
    """(split, defect, index) of one category: the normals, then the defects dealt round-robin
    over ``defect_types`` (each numbered from 0)."""
    jobs = [("train", None, i) for i in range(n_train_good)]
    jobs += [("test", None, i) for i in range(n_test_good)]
    per_type = [0] * len(defect_types)
    for i in range(n_test_defect):
        kind = i % len(defect_types)
        jobs.append(("test", defect_types[kind], per_type[kind]))
        per_type[kind] += 1
    return jobs


def _write_category(root: str, category: str, jobs, render: Render) -> None:
    shutil.rmtree(os.path.join(root, category), ignore_errors=True)
    for split, defect, index in jobs:
        image, mask = render(category, split, defect, index)
        folder = os.path.join(root, category, split, defect or "good")
        os.makedirs(folder, exist_ok=True)
        save_png(os.path.join(folder, f"{index:03d}.png"), image)
        if defect is not None:
            gt_folder = os.path.join(root, category, readers.GROUND_TRUTH_DIR, defect)
            os.makedirs(gt_folder, exist_ok=True)
            save_png(os.path.join(gt_folder, f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)


def write_dataset(
    root: str,
    *,
    manifest: str,
    params: dict,
    categories: Sequence[str],
    defect_types: Sequence[str],
    counts: tuple[int, int, int],
    render: Render,
    what: str,
) -> str:
    """Writes ``categories`` to ``root`` and then ``root/manifest`` (``params`` + categories).

    ``counts``: (n_train_good, n_test_good, n_test_defect) per category; ``render(category, split,
    defect, index)`` draws one image. A non-empty ``root`` without ``manifest`` is refused (it is
    never overwritten); ``what`` names the dataset in that error.
    """
    if os.path.isdir(root) and os.listdir(root) and read_manifest(root, manifest) is None:
        raise ValueError(
            f"{root} is a non-empty folder without {manifest}; refusing to write {what} into it. "
            "Choose an empty or new folder"
        )
    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, manifest)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rewrite must not look complete
    jobs = _jobs(defect_types, *counts)
    for category in categories:
        _write_category(root, category, jobs, render)
    with open(manifest_path, "w") as f:
        json.dump({**params, "categories": list(categories)}, f, indent=1, sort_keys=True)
    return root


def ensure_generated(
    root: str, *, manifest: str, wanted: dict, generate: Callable[[str], object], what: str
) -> str:
    """``root`` once it holds ``wanted`` as its manifest, written by ``generate(folder)`` if needed.

    A folder generated with other parameters is replaced; any other non-empty folder is left
    alone (``ValueError`` naming ``what``).
    """
    if read_manifest(root, manifest) == wanted:
        return root
    if os.path.isdir(root) and os.listdir(root) and read_manifest(root, manifest) is None:
        raise ValueError(
            f"{root} exists, is not empty and holds no {manifest}: it is not {what}. Point the "
            "dataset at a new folder (or None for the cache)"
        )
    target = report.link_target(root)  # a root linked to another disk is generated there
    parent = os.path.dirname(os.path.abspath(target))
    # Said because a relative root is read from the folder the command runs in: a command run
    # from another folder generates its own copy there.
    print(f"note: generating {what} in {os.path.abspath(root)} (once)", file=sys.stderr)
    os.makedirs(parent, exist_ok=True)
    prefix = "." + os.path.splitext(manifest)[0]
    staging = tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent)
    try:
        generate(staging)
        if read_manifest(root, manifest) == wanted:  # another process finished first
            return root
        try:
            report.replace_folder(staging, target)
        except OSError:
            if read_manifest(root, manifest) != wanted:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
