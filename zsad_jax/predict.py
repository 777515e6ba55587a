r"""Anomaly maps and decisions for your own images: ``python -m zsad_jax.predict``.

    python -m zsad_jax.predict --checkpoint=runs/af_clip --out=predictions photo.jpg more_images/
    python -m zsad_jax.predict --checkpoint=runs/af_clip --threshold=0.62 scans/
    python -m zsad_jax.predict --checkpoint=runs/af_clip --reference=normals/ --out=pred images/
    python -m zsad_jax.predict --checkpoint=runs/af_clip --export=af_clip.stablehlo

Inputs: image files and folders (searched recursively, sorted), any size and any format Pillow
reads: grayscale, RGBA (alpha dropped), palette, 16-bit and float images are converted as
``zsad_jax.data.decode`` documents. Each image is resized to the method's input
(``config.data.transform`` at ``config.data.image_size``), scored in batches split over all devices,
and its map is resized back (bilinear) to the original size.

Outputs in ``--out`` (default ``predictions``), per image ``NAME`` (the file's stem; for folders its
path under the folder, with the folder's name in front; when two inputs share a stem, compared
case-insensitively, the suffix is kept, ``a_png`` and ``a_jpg``, and a name still taken gets ``_1``,
``_2``, ...):

    NAME_overlay.png    the jet heatmap (map values 0..1 = blue..red) blended over the image
    NAME.npy            the anomaly map, float32 (H, W) at the original size, values in [0, 1]
    predictions.jsonl   one JSON line per image (also printed on stdout): path, pred_score,
                        pred_label (1 = anomalous: pred_score >= threshold; null without one),
                        threshold, anomaly_map and overlay file names, width, height

An input reached more than once (``photo.jpg ./photo.jpg``, a folder and a file in it) is scored
once, and a note says how many were dropped. Predict outputs inside an input folder are not inputs
and are passed over with a note (count and folders): this run's ``--out``, any folder holding a
``predictions.jsonl``, and an overlay ``NAME_overlay.png`` beside its ``NAME.npy``.

An ``--out`` that already holds a ``predictions.jsonl`` is refused unless ``--overwrite``, which
first removes the earlier run's outputs: exactly the ``.npy`` and overlay files its
``predictions.jsonl`` lists (then the folders left empty), so only the new run's remain; files it
does not list (yours) stay. Where that cannot be told (a line that is not a record, a listed file
outside ``--out``) it is refused too. An ``--export`` whose files exist is refused the same way
unless ``--overwrite``. An ``--out`` or ``--export`` folder that is a file or cannot be written is
refused before the model is loaded.

A run stopped part way (Ctrl-C, or an unreadable image without ``--skip_corrupt``) keeps the records
of the images it finished: ``predictions.jsonl`` stays one record per line, and a file
``INCOMPLETE`` beside it (one line: ``interrupted after 40 of 300 images: ...``) marks it as
partial; ``--overwrite`` removes both with the listed outputs. The outputs of the batch being
written when it stopped are removed (no record names them). A run stopped before its first
record leaves no ``predictions.jsonl``. Ctrl-C ends the command with that line and status 130, as
``train`` does.

The threshold is the F1-optimal image threshold stored with the checkpoint by training's final
held-out evaluation (or by ``python -m zsad_jax.evaluate --store_threshold``); ``--threshold``
replaces it. It is a zero-shot threshold: in few-shot mode only ``--threshold`` gives labels.
``--category`` names the product for methods whose prompts use the class name.

Few-shot (AF-CLIP+): ``--reference=DIR`` of normal images of the same product fills the method's
memory bank (``config.model.few_shot.shots`` images drawn from DIR with ``--seed``; ``--shots=0``
uses all of them). Methods without a memory bank stop with an error saying so.

Several processes (``--distributed`` or ``--coordinator_address/--num_processes/--process_id``, the
``train`` flags): every process runs the same command and lists the same inputs (folders sorted);
pass ``s`` covers inputs ``[s*B, (s+1)*B)`` of the global batch B and process ``p`` takes its
``p``-th slice (``shard_items``), as evaluation batches are split. Each process decodes and scores
only its own images and writes their ``.npy`` and overlay (every output file is written once, by
one process); at the end process 0 gathers every record and writes the one ``predictions.jsonl``,
in input order, and prints its lines. ``--out`` should be a folder every host sees (the lines name
the files of all of them). An unreadable image stops every process with the same error. Inputs are
files only (``config.data.tfds_dir`` does not apply); ``--export`` is written by process 0.

Deployment: ``--export=PATH.stablehlo`` writes the jitted inference function for a fixed batch
(``--export_batch``) and input size with ``jax.export``: ``PATH.stablehlo`` (``Exported.serialize``:
the StableHLO module and its calling convention), ``PATH.weights.npz`` (its array arguments: trained
heads, frozen backbone, memory bank) and ``PATH.json`` (input size, resize filter, normalisation,
threshold, and the weights' count, shape-and-dtype digest and file sha256). ``--export=DIR/`` (a
folder: a trailing slash, or one that exists) writes ``DIR/model.stablehlo`` and its two files.
``load_exported(PATH)`` checks that the three files belong together, then runs it without this
package's model code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax import cli, inference, report, visualize
from zsad_jax import sharding as shard_lib
from zsad_jax import state as state_lib
from zsad_jax.data import decode, readers, sources, transforms
from zsad_jax.encoders import attention

DEFAULT_CATEGORY = "object"
# /2: PATH.json describes the weights (count, shape-and-dtype digest, file digest) for checking.
EXPORT_FORMAT = "zsad_jax.export/2"
PREDICTIONS_FILE = "predictions.jsonl"
# Beside a predictions.jsonl that a stopped run (Ctrl-C, an error) left with fewer lines than
# inputs: its one line says how many.
INCOMPLETE_FILE = "INCOMPLETE"
EXPORT_FILE_NAME = "model.stablehlo"  # what --export=DIR/ writes in DIR
OVERLAY_SUFFIX = "_overlay.png"  # NAME_overlay.png beside NAME.npy
# jax.export's platform names (its docs; it keeps no public list): any other lowers without a word
# and the export fails only when loaded.
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# ----------------------------------------------------------------------------------------------
# Inputs.


def collect_images(
    paths: Iterable[str | os.PathLike], *, out: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """``(file, output name)`` for every image file given or found (recursively) in a folder.

    Inside a folder, mask folders (``readers.is_mask_dir``: ``masks/``, ``ground_truth/``, any case)
    are passed over, as the dataset readers do, so a dataset folder can be scored as it is, and
    linked folders are followed (``folder_images``). So are the outputs of predict runs
    (``_OutputSkipper``: the run's own ``out``, a folder holding a ``predictions.jsonl``, an
    overlay beside its map), with one note giving their count and folders. A file reached more
    than once (``a.jpg ./a.jpg``, a folder and a file in it, a link to it) is kept once, at its
    first place, and a note says how many were dropped and which files. Output names are unique
    per input (compared case-insensitively, as macOS and Windows file systems do) and follow from
    the order of ``paths`` alone (``unique_names``).

    Raises:
      FileNotFoundError: a path does not exist, or a folder holds no image files.
    """
    found: list[tuple[Path, Path]] = []  # (file, its output name with the file's suffix)
    skipper = _OutputSkipper(out)
    unread: list[str] = []  # names of the folders' files that are not images read here
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            before, unread_before = skipper.total(), len(unread)
            files = folder_images(path, skip=skipper, unread=unread)
            if not files:
                if skipper.total() > before:
                    raise FileNotFoundError(
                        f"{given}: the folder holds only the outputs of earlier predict runs "
                        f"({skipper.where()}); give the folder of your own images"
                    )
                formats = decode.unread_images_note(unread[unread_before:])
                kinds = ", ".join(decode.IMAGE_EXTENSIONS)
                raise FileNotFoundError(
                    f"{given}: the folder holds no image files "
                    + (f"that are read here; {formats}" if formats else f"({kinds})")
                )
            base = Path(path.absolute().name or "images")
            found += [(p, base / p.relative_to(path)) for p in files]
        else:
            raise FileNotFoundError(f"{given}: no such image file or folder")
    if skipper.total():
        _note(skipper.note())
    if formats := decode.unread_images_note(unread):
        _note(formats)
    found, repeated = _distinct_files(found)
    if repeated:
        _note(_duplicates_note(repeated))
    names = unique_names([name for _, name in found])
    return [(str(file), name) for (file, _), name in zip(found, names, strict=True)]


class _OutputSkipper:
    """Which parts of an input folder are predict outputs, not inputs, and how many image files
    were passed over where.

    A run that writes its ``--out`` inside an input folder would otherwise score its own overlays
    the next time (and with ``--overwrite`` remove them after listing them as inputs). Passed over
    are: a subfolder that is this run's ``out``, or that holds a ``predictions.jsonl`` (an earlier
    run's ``--out``), and anywhere an overlay ``X_overlay.png`` beside its map ``X.npy`` (an
    ``--out`` that is the input folder or above it).
    """

    def __init__(self, out: str | os.PathLike | None):
        self.out = os.path.realpath(out) if out is not None else None
        self.skipped: dict[str, int] = {}  # folder -> image files passed over in it

    def skips_folder(self, folder: str) -> bool:
        """Whether the walk passes over ``folder`` (a subfolder of an input folder); if so, its
        image files are counted."""
        is_out = self.out is not None and os.path.realpath(folder) == self.out
        if not (is_out or os.path.isfile(os.path.join(folder, PREDICTIONS_FILE))):
            return False
        images = sum(
            Path(name).suffix.lower() in decode.IMAGE_EXTENSIONS
            for _, _, names in os.walk(folder) for name in names
        )  # fmt: skip
        self._count(folder, images)
        return True

    def skips_file(self, file: Path) -> bool:
        """Whether ``file`` is an overlay written beside its map; if so, it is counted."""
        stem = file.name.removesuffix(OVERLAY_SUFFIX)
        if stem == file.name or not (file.parent / f"{stem}.npy").is_file():
            return False
        self._count(str(file.parent), 1)
        return True

    def _count(self, folder: str, images: int) -> None:
        if images:
            self.skipped[folder] = self.skipped.get(folder, 0) + images

    def total(self) -> int:
        return sum(self.skipped.values())

    def where(self) -> str:
        folders = list(self.skipped)
        return ", ".join(folders[:3]) + (f" and {len(folders) - 3} more" if folders[3:] else "")

    def note(self) -> str:
        count = self.total()
        return (
            f"{count} image file{'s' if count != 1 else ''} in {self.where()} passed over: the "
            "outputs of a predict run (its --out, a predictions.jsonl, overlays beside their "
            ".npy maps), not inputs"
        )


def folder_images(
    folder: Path, skip: _OutputSkipper | None = None, unread: list[str] | None = None
) -> list[Path]:
    """The image files under ``folder``, sorted, mask folders (``readers.is_mask_dir``) and, with
    ``skip``, predict outputs (``_OutputSkipper``) passed over; the names of the other files are
    appended to ``unread`` (for ``decode.unread_images_note``).

    Linked folders are followed, as the dataset readers read them (``Path.rglob`` does not follow
    them). A linked folder whose real path lies inside ``folder`` is not: it is reached there by its
    own path, and this stops every link back to a folder above it. Nor is one whose real path was
    already walked (a second link to one folder, a loop outside ``folder``), so the walk ends.
    """
    inside = os.path.realpath(folder)
    walked = {inside}

    def follow(subfolder: str) -> bool:
        real = os.path.realpath(subfolder)
        linked_inside = os.path.islink(subfolder) and Path(real).is_relative_to(inside)
        if real in walked or linked_inside:
            return False
        walked.add(real)
        return not (skip and skip.skips_folder(subfolder))

    files = []
    for top, subfolders, names in os.walk(folder, followlinks=True):
        # Sorted, so which of two links to one folder is walked follows from the names alone.
        subfolders[:] = [
            d for d in sorted(subfolders)
            if not readers.is_mask_dir(d) and follow(os.path.join(top, d))
        ]  # fmt: skip
        images = [n for n in names if Path(n).suffix.lower() in decode.IMAGE_EXTENSIONS]
        if unread is not None:
            unread += sorted(set(names) - set(images))
        candidates = (Path(top, name) for name in images)
        files += [p for p in candidates if p.is_file() and not (skip and skip.skips_file(p))]
    return sorted(files)


def _distinct_files(found: Sequence[tuple[Path, Path]]) -> tuple[list, dict[Path, int]]:
    """``found`` without the files already in it (first place kept), and for each file reached
    more than once, its kept path and how many times it was reached.

    A file is known by its device and inode, so every spelling of one file (``./a.jpg``, an
    absolute path, a symbolic or hard link, another letter case on macOS) counts as the same;
    where the system reports no inode, by its resolved path.
    """
    first: dict = {}  # identity -> the kept path
    times: dict[Path, int] = {}
    kept = []
    for item in found:
        stat = item[0].stat()
        identity = (stat.st_dev, stat.st_ino) if stat.st_ino else str(item[0].resolve())
        if identity in first:
            times[first[identity]] = times.get(first[identity], 1) + 1
        else:
            first[identity] = item[0]
            kept.append(item)
    return kept, times


def _duplicates_note(repeated: Mapping[Path, int]) -> str:
    """``N duplicate inputs dropped (files given more than once: a.png 3 times, ...)``: each file
    once, by the spelling kept, so that the count and the list agree."""
    dropped = sum(count - 1 for count in repeated.values())
    listed = [f"{path} {count} times" for path, count in repeated.items()]
    shown = ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if listed[3:] else "")
    return (
        f"{dropped} duplicate input{'s' if dropped > 1 else ''} dropped (files given more than "
        f"once: {shown}); each file is scored once"
    )


def _note(message: str) -> None:
    """A ``note: ...`` line on stderr, as the other commands print theirs (process 0 only)."""
    if jax.process_index() == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)


def unique_names(names: Sequence[Path]) -> list[str]:
    """Output names for input paths (relative, with suffix): unique, case-insensitively.

    The stem (``shop/a.png`` -> ``shop/a``) when no other input has it; otherwise the suffix is
    kept (``shop/a_png``, ``shop/a_jpg``); whatever is still taken (a ``a_png.png`` next to
    ``a.png`` and ``a.jpg``, two folders of one name) gets ``_1``, ``_2``, ... until it is free.
    """
    stems = [str(n.with_suffix("")) for n in names]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    taken: set[str] = set()
    out = []
    for name, stem in zip(names, stems, strict=True):
        if counts[stem.casefold()] > 1 and name.suffix:
            stem = f"{stem}_{name.suffix[1:]}"
        candidate, n = stem, 0
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}_{n}"
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuses an ``--out`` that holds an earlier run's ``predictions.jsonl`` (its only index of
    which map belongs to which image) unless ``overwrite``; with it, refuses one whose earlier
    files cannot be told (``earlier_outputs``)."""
    jsonl = Path(out_dir) / PREDICTIONS_FILE
    if not jsonl.exists():
        return
    if not overwrite:
        held = "predictions of an earlier run"
        if (Path(out_dir) / INCOMPLETE_FILE).exists():
            held = f"partial predictions of a stopped run ({INCOMPLETE_FILE})"
        raise FileExistsError(
            f"{jsonl}: --out already holds the {held}; pass --overwrite to replace them, or "
            "choose another --out"
        )
    earlier_outputs(out_dir)


def earlier_outputs(out_dir: str | os.PathLike) -> list[Path]:
    """The map and overlay files that the earlier run in ``out_dir`` recorded in its
    ``predictions.jsonl`` (those still there), for ``--overwrite`` to remove.

    A record's paths are as that run wrote them: relative ones are read from the current folder,
    as ``--out`` is. Only files inside ``out_dir`` are ever named; files the earlier run did not
    record (the user's own, or those of a batch an interrupted run never recorded) are not.

    Raises:
      FileExistsError: the earlier files cannot be told: a line that is not one of this command's
        records, or a recorded file outside ``out_dir`` (a run started from another folder, or
        an ``--out`` moved since). One line saying what to do instead.
    """
    out_dir = Path(out_dir)
    jsonl = out_dir / PREDICTIONS_FILE
    inside = out_dir.resolve()

    def cannot_tell(why: str) -> FileExistsError:
        return FileExistsError(
            f"{jsonl}: --overwrite cannot tell which files the earlier run wrote ({why}); delete "
            "that run's files yourself, or choose another --out"
        )

    try:
        lines = jsonl.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise cannot_tell(f"unreadable: {type(e).__name__}") from None
    files = []
    for number, line in enumerate(lines, 1):
        for recorded in _recorded_files(line, lambda why, n=number: cannot_tell(f"line {n} {why}")):
            path = Path(recorded)
            if not path.resolve().is_relative_to(inside):
                raise cannot_tell(f"line {number} names {recorded}, outside {out_dir}")
            if path.is_file():
                files.append(path)
    return files


def _recorded_files(line: str, refuse: Callable[[str], Exception]) -> list[str]:
    """The output files one ``predictions.jsonl`` line names (none for a skipped image)."""
    if not line.strip():
        return []
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise refuse("is not JSON") from None
    if not isinstance(record, dict) or "path" not in record:
        raise refuse("is not a prediction record")
    if "error" in record and "anomaly_map" not in record:
        return []  # skipped with --skip_corrupt: no outputs
    files = [record.get("anomaly_map"), record.get("overlay")]
    if not all(isinstance(f, str) and f for f in files):
        raise refuse("does not name its anomaly_map and overlay files")
    return files


def remove_earlier_outputs(out_dir: str | os.PathLike) -> int:
    """Removes the earlier run's recorded files (``earlier_outputs``), its ``predictions.jsonl``
    (and ``INCOMPLETE``) and the folders that this leaves empty inside ``out_dir``; returns how
    many files went."""
    out_dir = Path(out_dir)
    inside = out_dir.resolve()
    files = earlier_outputs(out_dir)
    folders = set()
    for path in files:
        folders.update(p for p in path.resolve().parents if p.is_relative_to(inside))
        path.unlink(missing_ok=True)
    (out_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
    (out_dir / INCOMPLETE_FILE).unlink(missing_ok=True)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder != inside and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return len(files)


def preprocess(image: np.ndarray, config: Any) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) float32 with ``config.data.transform`` (evaluation mode)."""
    transform = transforms.make_transform(str(config.data.transform), int(config.data.image_size))
    sample = {"image": image, "gt_mask": np.zeros(image.shape[:2], bool)}
    return transform(sample)["image"]


# ----------------------------------------------------------------------------------------------
# Few-shot reference images.


def build_reference_memory(
    model: nnx.Module,
    config: Any,
    reference: str | os.PathLike,
    *,
    shots: int | None = None,
    seed: int = 0,
) -> jax.Array:
    """The method's few-shot memory bank from a folder of normal images.

    Args:
      model: a method with ``build_memory(images)`` (AF-CLIP+).
      config: its config (input size, transform, ``model.few_shot.shots``).
      reference: folder (or file) of normal images of the product.
      shots: images to use (default ``config.model.few_shot.shots``; 0 = all), drawn without
        replacement with ``seed`` when the folder holds more; a ``shots`` given larger than the
        folder is refused (the config's default takes all the folder holds).

    Raises:
      ValueError: the method has no few-shot mode, or ``shots`` is more than the folder holds.
      FileNotFoundError: no reference images.
    """
    if not callable(getattr(model, "build_memory", None)):
        raise ValueError(
            f"--reference: method {config.method!r} has no few-shot memory bank; only AF-CLIP "
            "(configs/af_clip.py, AF-CLIP+) supports reference images. Run without --reference"
        )
    files = [f for f, _ in collect_images([reference])]
    if shots and len(files) < shots:  # asked for, as evaluate --few_shot refuses too few
        raise ValueError(
            f"--shots={shots}: --reference={reference} holds {len(files)} image"
            f"{'s' if len(files) != 1 else ''}, fewer than the {shots} shots asked for; pass "
            f"--shots={len(files)} or fewer (0 uses them all), or add reference images"
        )
    if shots is None:  # the config's number is a default: a smaller folder gives all it holds
        few_shot = config.model.get("few_shot") or {}
        shots = int(few_shot.get("shots", 0) or 0)
        if shots > len(files):
            print(
                f"note: --reference={reference} holds {len(files)} image"
                f"{'s' if len(files) != 1 else ''}, fewer than the config's {shots} shots; "
                "using all of them (--shots=N chooses)",
                file=sys.stderr,
            )
    if shots and len(files) > shots:
        chosen = np.random.default_rng(seed).choice(len(files), size=shots, replace=False)
        files = [files[i] for i in sorted(chosen)]
    options = sources.image_options(config.data)
    images = np.stack([preprocess(decode.load_image(f, **options), config) for f in files])
    memory = nnx.jit(lambda m, x: m.build_memory(x))(model, jnp.asarray(images))
    return jax.device_get(memory)


# ----------------------------------------------------------------------------------------------
# Prediction.


class Predictor:
    """Scores images of any size with a model; maps come back at each image's own size.

    Args:
      model: an ``AnomalyModel`` (trained weights).
      config: its config.
      threshold: image-score threshold for ``pred_label`` (None = no decision).
      category: class name given to ``model.set_classes``.
      memory: few-shot memory bank (``build_reference_memory``), or None for zero-shot.
      batch_size: images per forward pass (default ``config.eval.batch_size``), rounded up to a
        multiple of the device count; in a multi-process run each process passes
        ``local_batch = batch_size / processes`` of them (its own images) per pass.
      mesh: device mesh (default: all devices).

    In a multi-process run every process scores its own images and gets back only their outputs;
    the forward is a collective, so every process must make the same number of ``score_batch``
    calls (``predict_files`` arranges that).
    """

    def __init__(
        self,
        model: nnx.Module,
        config: Any,
        *,
        threshold: float | None = None,
        category: str = DEFAULT_CATEGORY,
        memory: Any = None,
        batch_size: int | None = None,
        mesh=None,
    ):
        self.config = config
        self.threshold = None if threshold is None else float(threshold)
        model.set_classes([category])
        mesh = shard_lib.make_mesh(config.get("mesh")) if mesh is None else mesh
        kwargs = {"memory": memory} if memory is not None else None
        self.infer = inference.BatchedInference(model, mesh, model_kwargs=kwargs)
        self.batch_size = inference.padded_batch_size(
            batch_size or int(config.eval.get("batch_size", 8) or 8), self.infer.num_devices
        )
        self.local_batch = self.batch_size // jax.process_count()
        self.size = int(config.data.image_size)
        # config.data.image_max_pixels (a decompression bomb is refused here too) and bit depth.
        self.image_options = sources.image_options(config.data)

    def label(self, score: float) -> int | None:
        return None if self.threshold is None else int(score >= self.threshold)

    def predict_images(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """(H_i, W_i, 3) uint8 images -> ``(map (H_i, W_i) float32, score)`` each."""
        results = []
        for start in range(0, len(images), self.local_batch):
            results += self.score_batch(images[start : start + self.local_batch])
        return results

    def score_batch(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Up to ``local_batch`` images (none is fine: padding) in one forward pass."""
        if len(images) > self.local_batch:
            raise ValueError(f"score_batch: {len(images)} images, at most {self.local_batch}")
        return self.maps_and_scores(images, self.infer(self.batch_inputs(images), local=True))

    def batch_inputs(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Up to ``local_batch`` images -> the model inputs of one padded batch."""
        batch = np.zeros((self.local_batch, self.size, self.size, 3), np.float32)
        for i, image in enumerate(images):
            batch[i] = preprocess(image, self.config)
        return {"image": batch, "class_id": np.zeros(self.local_batch, np.int32)}

    @staticmethod
    def maps_and_scores(
        images: Sequence[np.ndarray], out: Mapping[str, np.ndarray]
    ) -> list[tuple[np.ndarray, float]]:
        """The batch's outputs -> (map at each image's own size, score) per image."""
        return [
            (visualize.resize_map(out["anomaly_map"][i], *image.shape[:2]),
             float(out["pred_score"][i]))
            for i, image in enumerate(images)
        ]  # fmt: skip


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    skip_corrupt: bool = False,
    progress: bool = False,
    emit: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Scores every image of ``paths`` and writes the outputs (module docstring).

    ``overwrite`` replaces an earlier run in ``out_dir``: the files its ``predictions.jsonl``
    records and that file are removed first (``remove_earlier_outputs``), so that only this run's
    outputs remain; files it did not record stay.

    In a multi-process run every process calls this with the same arguments: each decodes, scores
    and writes the outputs of its share of the images (``shard_items``), and process 0 writes the
    one ``predictions.jsonl``, in input order, and emits its lines once all are scored.

    Returns:
      The JSON records written to ``predictions.jsonl`` (one per image, in input order; unreadable
      files skipped with ``skip_corrupt`` get ``{"path", "error"}``), on every process.

    Raises:
      FileNotFoundError: a missing path.
      FileExistsError: ``out_dir`` holds an earlier run's predictions and not ``overwrite``.
      DataError: an unreadable image (unless ``skip_corrupt``), naming the file.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite=overwrite)
    # Before any removal, so that a bad input removes nothing; the run's own --out is passed over.
    items = collect_images(paths, out=out_dir)
    if overwrite:
        _replace_earlier_run(out_dir)
        # An input the removal took was an earlier output, not an image of the user's.
        items = [item for item in items if Path(item[0]).is_file()]
        if not items:
            raise FileNotFoundError(
                f"every input was an output of the earlier run in --out={out_dir}, removed by "
                "--overwrite; give your own images"
            )
    made = not out_dir.exists()  # removed again if a stop leaves it empty
    out_dir.mkdir(parents=True, exist_ok=True)
    # No predictions.jsonl here now (refused or removed above): a marker left is another's.
    (out_dir / INCOMPLETE_FILE).unlink(missing_ok=True)
    sink = _Records(out_dir / PREDICTIONS_FILE, emit)
    unrecorded: list[Path] = []  # the outputs of the pass being written, until it is recorded
    try:
        _score_and_write(predictor, items, out_dir, sink, unrecorded, skip_corrupt=skip_corrupt,
                         progress=progress)  # fmt: skip
    except BaseException as error:
        _stopped(out_dir, sink, unrecorded, len(items), error, made=made)
        raise
    return sink.records


def _score_and_write(
    predictor: Predictor,
    items: Sequence[tuple[str, str]],
    out_dir: Path,
    sink: _Records,
    unrecorded: list[Path],
    *,
    skip_corrupt: bool,
    progress: bool,
) -> None:
    """``predict_files``' loop: each pass's outputs written, then its records (``sink``)."""
    steps = shard_items(items, predictor.batch_size)
    primary = jax.process_index() == 0
    bar = report.progress_bar(len(items), enabled=progress and primary, desc="predict",
                                unit="image")  # fmt: skip
    with sink:

        def batches():
            for chunk in steps:
                loaded, records = _load_chunk(chunk, predictor.image_options, skip_corrupt)
                images = [image for _, _, image in loaded]
                yield {"loaded": loaded, "records": records, **predictor.batch_inputs(images)}

        # The next chunk is decoded and its forward started before this one's outputs are written.
        for step, (batch, out) in enumerate(predictor.infer.stream(batches(), local=True)):
            loaded, records = batch["loaded"], batch["records"]
            scored = iter(predictor.maps_and_scores([image for _, _, image in loaded], out))
            unrecorded[:] = [f for _, (_, name), _ in loaded for f in _output_files(out_dir, name)]
            for position, (file, name), image in loaded:
                amap, score = next(scored)
                records[position] = _write_outputs(predictor, out_dir, file, name, image, amap,
                                                   score)  # fmt: skip
            sink.add(records)
            unrecorded.clear()
            bar.update(min(len(items), (step + 1) * predictor.batch_size)
                       - min(len(items), step * predictor.batch_size))  # fmt: skip
    bar.close()


class PredictionInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``predict_files``; its message (one line) says what ``--out`` holds."""


def _stopped(out_dir: Path, sink: _Records, unrecorded: list[Path], total: int,
             error: BaseException, *, made: bool) -> None:  # fmt: skip
    """After a stop (Ctrl-C or an error) in the loop: the pass that was being written is removed
    (no record names it, so --overwrite could not) with the folders it leaves empty (``out_dir``
    too if the run ``made`` it), and a ``predictions.jsonl`` with fewer lines than inputs gets
    ``INCOMPLETE`` beside it. Raises ``PredictionInterrupted`` for a Ctrl-C."""
    for path in unrecorded:
        path.unlink(missing_ok=True)
    inside = out_dir.resolve()
    folders = {p for f in unrecorded for p in f.resolve().parents if p.is_relative_to(inside)}
    for folder in sorted(folders - {inside}, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if made and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    done = len(sink.records) if sink.single else 0  # several processes: no file yet (_Records)
    jsonl = out_dir / PREDICTIONS_FILE
    if done:
        how = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
        summary = (
            f"{how} after {done} of {total} images: {jsonl} holds those {done} (partial); rerun "
            "with --overwrite to redo"
        )
        (out_dir / INCOMPLETE_FILE).write_text(summary + "\n")
    else:
        summary = f"interrupted before any image was scored: nothing written to {out_dir}"
    if isinstance(error, KeyboardInterrupt) and not isinstance(error, PredictionInterrupted):
        raise PredictionInterrupted(summary) from None


def _output_files(out_dir: Path, name: str) -> tuple[Path, Path]:
    """One image's ``(map, overlay)`` files in ``out_dir``."""
    return out_dir / f"{name}.npy", out_dir / f"{name}{OVERLAY_SUFFIX}"


def _replace_earlier_run(out_dir: Path) -> None:
    """Process 0 removes the earlier run's files; every process waits for that before writing
    (a map of the same name written first would otherwise be removed)."""
    if jax.process_index() == 0 and (out_dir / PREDICTIONS_FILE).exists():
        removed = remove_earlier_outputs(out_dir)
        _note(f"--overwrite: removed the earlier run's predictions.jsonl and the {removed} files "
              f"it lists from {out_dir}")  # fmt: skip
    shard_lib.sync("predict_replace_earlier_run")


def shard_items(
    items: Sequence[Any],
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[list[tuple[int, Any]]]:
    """This process's ``(input position, item)`` chunks, one per forward pass.

    Pass ``s`` covers inputs ``[s*B, (s+1)*B)`` (B = ``batch_size``, global); process ``p`` of
    ``P`` (default: this one's place) takes its ``p``-th slice of B/P, as evaluation batches are
    split. Every process gets the same number of chunks (some empty at the end), so the forward's
    collectives stay aligned; each input belongs to exactly one process, so each output is written
    once.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per = batch_size // count
    steps = max(1, math.ceil(len(items) / batch_size))
    chunks = []
    for step in range(steps):
        first = step * batch_size + index * per
        chunks.append([(i, items[i]) for i in range(first, min(first + per, len(items)))])
    return chunks


def _load_chunk(
    chunk: Sequence[tuple[int, tuple[str, str]]],
    image_options: Mapping[str, Any],
    skip_corrupt: bool,
) -> tuple[list[tuple[int, tuple[str, str], np.ndarray]], dict[int, dict[str, Any]]]:
    """The chunk's decoded images, and the error records of those that are unreadable."""
    loaded, errors, failure = [], {}, None
    for position, (file, name) in chunk:
        try:
            loaded.append((position, (file, name), decode.load_image(file, **image_options)))
        except decode.DataError as e:
            if not skip_corrupt:
                failure = failure or e
                continue
            print(f"skipped: {e}", file=sys.stderr)
            errors[position] = {"path": file, "error": str(e)}
    shard_lib.raise_together(failure, decode.DataError)
    return loaded, errors


def _write_outputs(
    predictor: Predictor, out_dir: Path, file: str, name: str, image: np.ndarray,
    amap: np.ndarray, score: float,
) -> dict[str, Any]:  # fmt: skip
    """One image's ``.npy`` map and overlay; returns its record."""
    npy, overlay = _output_files(out_dir, name)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, amap.astype(np.float32))
    visualize.save_png(overlay, visualize.heatmap_overlay(image, amap))
    return {
        "path": file,
        "pred_score": score,
        "pred_label": predictor.label(score),
        "threshold": predictor.threshold,
        "anomaly_map": str(npy),
        "overlay": str(overlay),
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
    }


class _Records:
    """``predictions.jsonl``. One process writes (and emits) each pass's lines as the pass ends;
    with several, each keeps its own records and at the end process 0 writes (and emits) all of
    them, gathered, in input order. ``records`` then holds every record on every process."""

    def __init__(self, path: Path, emit: Callable[[str], None] | None):
        self.path, self.emit = path, emit
        self.single = jax.process_count() == 1
        self.records: list[dict[str, Any]] = []
        self._mine: dict[int, dict[str, Any]] = {}
        self._file = None

    def __enter__(self) -> _Records:
        if self.single:
            self._file = open(self.path, "w")  # noqa: SIM115 - closed in __exit__
        return self

    def add(self, records: Mapping[int, dict[str, Any]]) -> None:
        """One pass's records, ``{input position: record}``."""
        if not self.single:
            self._mine.update(records)
            return
        for position in sorted(records):
            self._write(records[position])

    def __exit__(self, kind, error, traceback) -> None:
        if self.single:
            self._file.close()
            if kind is not None and not self.records:
                # An empty file would look like an earlier run's and refuse the next one.
                self.path.unlink(missing_ok=True)
        elif kind is None:
            self._write_gathered()

    def _write_gathered(self) -> None:
        mine = [[position, report.json_ready(r)] for position, r in self._mine.items()]
        gathered = dict(pair for part in shard_lib.allgather_json(mine) for pair in part)
        ordered = [gathered[position] for position in sorted(gathered)]
        if jax.process_index() != 0:
            self.records = ordered
            return
        with open(self.path, "w") as self._file:
            for record in ordered:
                self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(report.json_ready(record))
        self._file.write(line + "\n")
        self._file.flush()
        self.records.append(record)
        if self.emit is not None:
            self.emit(line)


# ----------------------------------------------------------------------------------------------
# Export (jax.export / StableHLO).


def export_inference(
    model: nnx.Module,
    config: Any,
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    memory: Any = None,
    threshold: float | None = None,
    category: str = DEFAULT_CATEGORY,
    platforms: Sequence[str] | None = None,
) -> dict[str, str]:
    """Serialises ``images (B, S, S, 3) -> (anomaly_map (B, S, S), pred_score (B,))``.

    The function takes the model's arrays as its first argument (a list, stored in
    ``PATH.weights.npz``) so the StableHLO file stays small; images are the *normalised* float32
    input (``PATH.json`` gives size, resize filter and mean/std of ``config.data.transform``).

    Args:
      path: ``PATH.stablehlo``, or a folder (``DIR/``, or one that exists) for
        ``DIR/model.stablehlo`` (``export_files``). Existing files are replaced: ``run`` and the
        command refuse them first unless ``overwrite`` (``check_export``).
      platforms: lowering targets, e.g. ``("cpu", "cuda")``; default the current backend.

    Returns:
      ``{"stablehlo", "weights", "meta"}`` file paths.
    """
    check_options(export_platforms=platforms)  # an unknown name would fail only when loaded
    files = {kind: str(file) for kind, file in export_files(path).items()}
    model.set_classes([category])
    weights, infer = _inference_over_arrays(model, memory)
    exported = _export(infer, weights, config, batch_size, platforms)
    Path(files["stablehlo"]).parent.mkdir(parents=True, exist_ok=True)
    with open(files["stablehlo"], "wb") as f:
        f.write(exported.serialize())
    np.savez(files["weights"], *weights)
    meta = _export_meta(
        config, exported, weights, files["weights"], batch_size=batch_size, threshold=threshold,
        few_shot=memory is not None, category=category,
    )  # fmt: skip
    with open(files["meta"], "w") as f:
        json.dump(report.json_ready(meta), f, indent=1)
    return files


def export_files(path: str | os.PathLike) -> dict[str, Path]:
    """The three files of an export to ``path``: ``{"stablehlo", "weights", "meta"}``.

    ``PATH`` gives ``PATH``, ``PATH.weights.npz`` and ``PATH.json``. A folder, written with a
    trailing slash (``exports/``) or one that exists, gets ``EXPORT_FILE_NAME`` inside it: a user
    who names a folder means the files to go in it, not beside it under the folder's name.
    """
    text = os.fspath(path)
    stablehlo = Path(text)
    if text.endswith(tuple(filter(None, (os.sep, os.altsep)))) or stablehlo.is_dir():
        stablehlo = stablehlo / EXPORT_FILE_NAME
    return {
        "stablehlo": stablehlo,
        "weights": stablehlo.with_name(stablehlo.name + ".weights.npz"),
        "meta": stablehlo.with_name(stablehlo.name + ".json"),
    }


def check_export(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuses an ``--export`` whose files exist (an earlier export, maybe of another model) unless
    ``overwrite``, as ``check_out_dir`` refuses an earlier run's ``--out``."""
    for file in export_files(path).values():
        if file.is_dir():
            raise FileExistsError(f"{file}: --export would write this file, but it is a folder; "
                                  "choose another --export path")  # fmt: skip
        if file.exists() and not overwrite:
            raise FileExistsError(
                f"{file}: --export would replace an earlier export's file; pass --overwrite to "
                "replace it, or choose another --export path"
            )


def _inference_over_arrays(model: nnx.Module, memory: Any) -> tuple[list[np.ndarray], Callable]:
    """``(weights, infer)``: the model's arrays (and the memory bank) as one ordered list, PRNG
    keys as key data, and ``infer(weights, images) -> (anomaly_map, pred_score)`` merging them
    back (``nnx.merge``): a serialisable argument structure independent of names."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    impls = [str(jax.random.key_impl(x)) if state_lib.is_key(x) else None for x in leaves]
    weights = [
        np.asarray(jax.random.key_data(x) if impl else x)
        for x, impl in zip(leaves, impls, strict=True)
    ]
    if memory is not None:
        weights.append(np.asarray(memory))

    def infer(arrays, images):
        arrays = list(arrays)
        kwargs = {"memory": arrays.pop()} if memory is not None else {}
        leaves = [
            jax.random.wrap_key_data(a, impl=impl) if impl else a
            for a, impl in zip(arrays, impls, strict=True)
        ]
        method = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        batch = {"image": images, "class_id": jnp.zeros(images.shape[0], jnp.int32)}
        out = method(batch, train=False, **kwargs)
        return out["anomaly_map"].astype(jnp.float32), out["pred_score"].astype(jnp.float32)

    return weights, infer


def _export(
    infer: Callable,
    weights: Sequence[np.ndarray],
    config: Any,
    batch_size: int,
    platforms: Sequence[str] | None,
) -> jax.export.Exported:
    """``infer`` lowered by ``jax.export`` for ``batch_size`` images of the config's size."""
    size = int(config.data.image_size)
    args = (
        [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
        jax.ShapeDtypeStruct((int(batch_size), size, size, 3), jnp.float32),
    )
    targets = tuple(platforms or (jax.default_backend(),))
    # cuDNN's and Pallas' custom calls are not export-stable, and one platform's kernel cannot be
    # lowered for another: outside a CPU-only export, attention takes XLA's own fused path.
    portable = targets != ("cpu",)
    with attention.use_implementation("xla") if portable else contextlib.nullcontext():
        exported = jax.export.export(jax.jit(infer), platforms=platforms)(*args)
    if exported.nr_devices != 1 or exported.ordered_effects or exported.unordered_effects:
        raise ValueError(
            f"export: the inference function of {config.method!r} uses {exported.nr_devices} "
            "devices or side effects; only single-device, effect-free functions are exported"
        )
    return exported


def _export_meta(
    config: Any,
    exported: jax.export.Exported,
    weights: Sequence[np.ndarray],
    weights_file: str,
    *,
    batch_size: int,
    threshold: float | None,
    few_shot: bool,
    category: str,
) -> dict[str, Any]:
    """``PATH.json``: how to feed the function, and what ``load_exported`` checks."""
    name = str(config.data.transform)
    mean, std = transforms.normalization(name)
    resize = transforms.resize_filter(name)
    return {
        "format": EXPORT_FORMAT,
        "method": str(config.method),
        "batch_size": int(batch_size),
        "image_size": int(config.data.image_size),
        "transform": name,
        "resize": resize,
        "mean": list(mean),
        "std": list(std),
        "threshold": threshold,
        "few_shot": few_shot,
        "category": category,
        "platforms": list(exported.platforms),
        # What load_exported checks, so that a mixed-up file set is refused instead of run.
        "weights": {
            "count": len(weights),
            "signature_sha256": _signature_digest((w.shape, w.dtype) for w in weights),
            "file_sha256": _file_digest(weights_file),
        },
        "inputs": (
            "images float32 (batch, size, size, 3): RGB resized to size x size with Pillow's "
            f"{resize} filter (antialiased), / 255, (x - mean) / std"
        ),
        "outputs": "anomaly_map float32 (batch, size, size), pred_score float32 (batch,)",
    }


def load_exported(path: str | os.PathLike) -> tuple[Callable, dict[str, Any]]:
    """``(run, meta)``: ``run(images) -> (anomaly_map, pred_score)`` of an exported model.

    ``images`` must be float32 ``(meta["batch_size"], S, S, 3)``, preprocessed as ``meta`` says.
    Runs the stored StableHLO through ``jax.export``; no model code is imported. The three files
    must belong to one export: format tag, weight count, shapes, dtypes, the weights file's bytes
    and the input signature are checked first.

    Raises:
      FileNotFoundError: a file of the set is missing.
      ValueError: a file is damaged or belongs to another export (one line naming it).
    """
    files = export_files(path)  # a folder: the model.stablehlo that --export=DIR/ wrote
    path, weights_path, meta_path = files["stablehlo"], files["weights"], files["meta"]
    for needed in (path, weights_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: exported model file missing (see --export)")
    meta = _read_export_meta(meta_path)
    exported = _read_exported(path)
    weights = _read_export_weights(weights_path, meta)
    _check_signature(exported, path, meta)
    expected = (meta["batch_size"], meta["image_size"], meta["image_size"], 3)

    def run(images):
        images = jnp.asarray(images, jnp.float32)
        if images.shape != expected:
            raise ValueError(
                f"{path}: exported for images of shape {expected}, got {images.shape} "
                "(see batch_size and image_size in its .json)"
            )
        return exported.call(weights, images)

    return run, meta


def _signature_digest(shapes_dtypes: Iterable[tuple[Sequence[int], Any]]) -> str:
    """sha256 over the ordered ``(shape, dtype)`` list: equal iff the argument lists agree."""
    # dtype names, not .str: bfloat16 and the float8 types all have the .str of raw bytes ("<V2").
    text = json.dumps([[list(map(int, s)), np.dtype(d).name] for s, d in shapes_dtypes])
    return hashlib.sha256(text.encode()).hexdigest()


def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _read_export_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{meta_path}: not a readable export description ({_one_line(e)})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(
            f"{meta_path}: format {found!r} is not {EXPORT_FORMAT!r}; export again with this "
            "version (python -m zsad_jax.predict --export=PATH)"
        )
    weights = meta.get("weights")
    needed = ("count", "signature_sha256", "file_sha256")
    if not all(k in meta for k in ("batch_size", "image_size")) or not (
        isinstance(weights, dict) and all(k in weights for k in needed)
    ):
        raise ValueError(f"{meta_path}: incomplete export description; export again (--export)")
    return meta


def _read_exported(path: Path) -> jax.export.Exported:
    # A truncated or foreign file fails deep in the flatbuffer reader (struct.error and others).
    try:
        return jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # any failure here means the same: not loadable
        raise ValueError(
            f"{path}: not a readable jax.export file (truncated or not written by --export: "
            f"{type(e).__name__})"
        ) from None


def _read_export_weights(weights_path: Path, meta: Mapping[str, Any]) -> list[jax.Array]:
    """The arrays of ``PATH.weights.npz``, after checking them against ``PATH.json``."""
    want = meta["weights"]
    where = f"{weights_path}: does not belong to this export"
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            arrays = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    except Exception as e:  # zip, npy header or KeyError: all a damaged file
        raise ValueError(
            f"{weights_path}: not a readable weights archive ({_one_line(e)})"
        ) from None
    if len(arrays) != want["count"]:
        raise ValueError(f"{where} ({len(arrays)} arrays, the export has {want['count']})")
    if _signature_digest((a.shape, a.dtype) for a in arrays) != want["signature_sha256"]:
        raise ValueError(f"{where} (array shapes or dtypes differ)")
    if _file_digest(weights_path) != want["file_sha256"]:
        # Same-shaped weights of another checkpoint would otherwise run and give wrong maps.
        raise ValueError(f"{where} (same shapes, but its sha256 differs from the .json's)")
    return [jnp.asarray(a) for a in arrays]


def _check_signature(exported: jax.export.Exported, path: Path, meta: Mapping[str, Any]) -> None:
    """The StableHLO's arguments must be the described weights and images."""
    avals = list(exported.in_avals)
    size, batch = meta["image_size"], meta["batch_size"]
    images = (batch, size, size, 3), np.dtype(np.float32)
    weights = [(a.shape, a.dtype) for a in avals[:-1]]
    if (
        len(weights) != meta["weights"]["count"]
        or _signature_digest(weights) != meta["weights"]["signature_sha256"]
        or not avals
        or (avals[-1].shape, np.dtype(avals[-1].dtype)) != images
    ):
        raise ValueError(
            f"{path}: does not belong to this export (its arguments differ from the weights and "
            f"the {batch} x {size} x {size} x 3 float32 images its .json describes)"
        )


# ----------------------------------------------------------------------------------------------
# The command.


def run(
    images: Sequence[str],
    *,
    checkpoint: str | None = None,
    config: Any = None,
    step: int | None = None,
    out: str | os.PathLike = "predictions",
    threshold: float | None = None,
    reference: str | None = None,
    shots: int | None = None,
    seed: int = 0,
    category: str = DEFAULT_CATEGORY,
    batch_size: int | None = None,
    skip_corrupt: bool = False,
    progress: bool = False,
    export: str | None = None,
    export_batch: int = 1,
    export_platforms: Sequence[str] | None = None,
    emit: Callable[[str], None] | None = None,
    overwrite: bool = False,
    allow_custom_code: bool = False,
) -> dict[str, Any]:
    """What the command does: ``{"predictions": [...], "threshold", "export": files or None}``."""
    # Every refusal that needs no model comes before loading one (minutes for a large backbone).
    _refuse_before_loading(
        images, export=export, out=out, overwrite=overwrite, threshold=threshold,
        batch_size=batch_size, export_batch=export_batch, shots=shots, category=category,
        export_platforms=export_platforms,
    )  # fmt: skip
    model, config, stored, _ = inference.load_model(
        checkpoint, config, step=step, allow_custom_code=allow_custom_code
    )
    memory = None
    if reference:  # first: a method without a memory bank is refused before any note
        memory = build_reference_memory(model, config, reference, shots=shots, seed=seed)
        # Built by every process from the same files; process 0's bank is the one all use.
        memory = shard_lib.broadcast_arrays(memory)
    chosen = _image_threshold(stored, threshold, reference=reference, scoring=bool(images))
    result: dict[str, Any] = {"threshold": chosen, "predictions": [], "export": None}
    if export:
        files = None
        if jax.process_index() == 0:  # one set of files, written once
            files = export_inference(
                model, config, export, batch_size=export_batch, memory=memory, threshold=chosen,
                category=category, platforms=export_platforms,
            )  # fmt: skip
        result["export"] = shard_lib.broadcast_json(files)
    if images:
        predictor = Predictor(
            model, config, threshold=chosen, category=category, memory=memory,
            batch_size=batch_size,
        )  # fmt: skip
        result["predictions"] = predict_files(
            predictor, images, out, skip_corrupt=skip_corrupt, progress=progress, emit=emit,
            overwrite=overwrite,
        )  # fmt: skip
    return result


def _refuse_before_loading(
    images: Sequence[str],
    *,
    export: str | None,
    out: str | os.PathLike,
    overwrite: bool,
    threshold: float | None,
    batch_size: int | None,
    export_batch: int,
    shots: int | None,
    category: str,
    export_platforms: Sequence[str] | None,
) -> None:
    """``run``'s refusals that need no model: nothing to do, a bad option value, a missing
    input, and the output checks (``check_outputs``)."""
    if not images and not export:
        raise ValueError("give image files or folders to score (or --export=PATH)")
    check_options(threshold=threshold, batch_size=batch_size, export_batch=export_batch,
                  shots=shots, category=category, export_platforms=export_platforms)  # fmt: skip
    for given in images:
        if not Path(given).exists():
            raise FileNotFoundError(f"{given}: no such image file or folder")
    check_outputs(images, out=out, export=export, overwrite=overwrite)


def check_outputs(
    images: Sequence[str], *, out: str | os.PathLike, export: str | None, overwrite: bool
) -> None:
    """Refuses, before a model is loaded: an ``--out`` holding an earlier run's predictions
    (``check_out_dir``), an input file that ``--overwrite`` would remove as one of them, an
    ``--export`` whose files exist (``check_export``), and an ``--out`` or ``--export`` folder that
    is a file or cannot be written (``cli.ensure_writable``, creating nothing)."""
    if images:
        check_out_dir(out, overwrite=overwrite)
        if overwrite and (Path(out) / PREDICTIONS_FILE).exists():
            _refuse_inputs_among_earlier_outputs(images, out)
        cli.ensure_writable(out, "--out", create=False)
    if export:
        check_export(export, overwrite=overwrite)
        folder = export_files(export)["stablehlo"].parent
        cli.ensure_writable(folder, "--export", create=False, given=export)


def _refuse_inputs_among_earlier_outputs(images: Sequence[str], out: str | os.PathLike) -> None:
    earlier = {path.resolve() for path in earlier_outputs(out)}
    for given in images:
        if Path(given).is_file() and Path(given).resolve() in earlier:
            raise ValueError(
                f"{given}: an output of the earlier run in --out={out}, which --overwrite removes; "
                "copy it elsewhere first, or choose another --out"
            )


def _image_threshold(
    stored: float | None, given: float | None, *, reference: str | None, scoring: bool
) -> float | None:
    """The threshold of pred_label: ``--threshold`` if given, else the checkpoint's; None (with
    a note on stderr saying why) where there is none or the stored one does not apply."""
    chosen = stored if given is None else float(given)
    if chosen is not None and not math.isfinite(float(chosen)):
        chosen = None  # a stored NaN: evaluation found no anomalous image to choose one on
    if reference and given is None and chosen is not None:
        # The stored threshold was chosen on zero-shot scores; few-shot scores have another scale.
        _note(
            "--reference: the checkpoint's threshold was chosen for zero-shot scores and does not "
            "apply to few-shot scores, so pred_label is null. Pass --threshold (e.g. the threshold "
            "in metrics.json of python -m zsad_jax.evaluate --few_shot=K)"
        )
        chosen = None
    elif chosen is None and scoring:
        _note(
            "no image threshold: the checkpoint stores none and --threshold was not given, so "
            "pred_label is null. Evaluate with --store_threshold or pass --threshold"
        )
    return chosen


def check_options(
    *,
    threshold: float | None = None,
    batch_size: int | None = None,
    export_batch: int = 1,
    shots: int | None = None,
    category: str = DEFAULT_CATEGORY,
    export_platforms: Sequence[str] | None = None,
) -> None:
    """Refuses option values that would silently do something else (one line naming the flag)."""
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(
            f"--threshold={threshold}: must be a finite number (omit it to use the checkpoint's "
            "stored threshold)"
        )
    if batch_size is not None and int(batch_size) <= 0:
        raise ValueError(f"--batch_size={batch_size}: must be > 0 (omit it for the config's)")
    if int(export_batch) <= 0:
        raise ValueError(f"--export_batch={export_batch}: must be > 0 (images per exported call)")
    if shots is not None and int(shots) < 0:
        raise ValueError(f"--shots={shots}: must be >= 0 (0 uses every reference image)")
    if not str(category).strip():
        raise ValueError(
            f"--category={category!r}: must name the product, e.g. --category=bottle (omit it for "
            f"{DEFAULT_CATEGORY!r})"
        )
    unknown = [p for p in export_platforms or () if p not in EXPORT_PLATFORMS]
    if unknown:
        raise ValueError(
            f"--export_platforms={','.join(export_platforms)}: unknown platform "
            f"{', '.join(map(repr, unknown))}; give some of {','.join(EXPORT_PLATFORMS)} (omit it "
            "for this machine's)"
        )


def _define_flags() -> None:
    from absl import flags

    cli.define_checkpoint_flags()
    for name in cli.CHECKPOINT_FLAGS:
        flags.declare_key_flag(name)
    flags.DEFINE_string("out", "predictions", "output folder")
    flags.DEFINE_float("threshold", None, "image-score threshold (default: the checkpoint's)")
    flags.DEFINE_string("reference", None, "folder of normal images: few-shot mode (AF-CLIP+)")
    flags.DEFINE_integer("shots", None, "reference images to use (default config; 0 = all)")
    flags.DEFINE_integer("seed", 0, "draw of the reference images")
    flags.DEFINE_string("category", DEFAULT_CATEGORY, "product name for class-aware prompts")
    flags.DEFINE_integer("batch_size", None, "images per forward pass")
    flags.DEFINE_bool("skip_corrupt", False, "skip unreadable images instead of stopping")
    flags.DEFINE_bool("progress", False, "show a progress bar on stderr")
    flags.DEFINE_string("export", None, "also write the jitted inference function here")
    flags.DEFINE_integer("export_batch", 1, "batch size of the exported function")
    flags.DEFINE_list("export_platforms", None, "lowering platforms, e.g. cpu,cuda (default: this)")
    flags.DEFINE_bool(
        "overwrite", False, "replace an earlier run's outputs in --out and an existing --export"
    )
    cli.define_multihost_flags()


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    from absl import flags

    f = flags.FLAGS
    # Before build_config reads the checkpoint (run checks again, for library callers).
    check_options(threshold=f.threshold, batch_size=f.batch_size, export_batch=f.export_batch,
                  shots=f.shots, category=f.category,
                  export_platforms=f.export_platforms)  # fmt: skip
    check_outputs(argv[1:], out=f.out, export=f.export, overwrite=f.overwrite)
    # A Ctrl-C ends in cli.Command's one line: PredictionInterrupted's says what --out holds.
    result = _run_from_flags(argv, overrides)
    if result["predictions"]:
        print(_summary(result["predictions"], result["threshold"], f.out), file=sys.stderr)
    if result["export"]:
        print(f"exported: {', '.join(result['export'].values())}", file=sys.stderr)


def _run_from_flags(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    from absl import flags

    f = flags.FLAGS
    config = cli.config_from_flags(overrides)
    return run(
        list(argv[1:]),
        checkpoint=f.checkpoint,
        config=config,
        step=f.step,
        out=f.out,
        threshold=f.threshold,
        reference=f.reference,
        shots=f.shots,
        seed=f.seed,
        category=f.category,
        batch_size=f.batch_size,
        skip_corrupt=f.skip_corrupt,
        progress=f.progress,
        export=f.export,
        export_batch=f.export_batch,
        export_platforms=f.export_platforms,
        emit=lambda line: print(line, flush=True),
        allow_custom_code=f.allow_custom_code,
        overwrite=f.overwrite,
    )


def _summary(records: Sequence[Mapping[str, Any]], threshold: float | None, out: str) -> str:
    """The command's last stderr line: how many scored, decided anomalous, skipped, and the
    scores' range beside the threshold (so a threshold off the scores' scale shows)."""
    scores = [float(r["pred_score"]) for r in records if "pred_score" in r]
    skipped = sum("error" in r for r in records)
    # Without a threshold no image is decided either way: "0 anomalous" would read as a verdict.
    decisions = (
        "no decisions: no threshold" if threshold is None
        else f"{sum(r.get('pred_label') == 1 for r in records)} anomalous"
    )  # fmt: skip
    images = "image" if len(scores) == 1 else "images"
    scale = ""
    if scores:
        low, high = min(scores), max(scores)
        scale = f"; score {low:.4g}" if low == high else f"; scores {low:.4g} to {high:.4g}"
        if threshold is not None:
            scale += f", threshold {threshold:.4g}"
    counts = f"{decisions}, {skipped} skipped{scale}"
    return f"scored {len(scores)} {images} ({counts}); outputs in {out}"


if __name__ == "__main__":
    # FileExistsError: an --out holding an earlier run's predictions (check_out_dir), an existing
    # --export (check_export).
    cli.Command(_define_flags, main, expected_errors=(FileExistsError,), takes_paths=True).run()
