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
path under the folder, with the folder's name in front):

    NAME_overlay.png    the jet heatmap (map values 0..1 = blue..red) blended over the image
    NAME.npy            the anomaly map, float32 (H, W) at the original size, values in [0, 1]
    predictions.jsonl   one JSON line per image (also printed on stdout): path, pred_score,
                        pred_label (1 = anomalous: pred_score >= threshold; null without one),
                        threshold, anomaly_map and overlay file names, width, height

The threshold is the F1-optimal image threshold stored with the checkpoint by training's final
held-out evaluation (or by ``python -m zsad_jax.evaluate --store_threshold``); ``--threshold``
replaces it. It is a zero-shot threshold: in few-shot mode only ``--threshold`` gives labels.
``--category`` names the product for methods whose prompts use the class name.

Few-shot (AF-CLIP+): ``--reference=DIR`` of normal images of the same product fills the method's
memory bank (``config.model.few_shot.shots`` images drawn from DIR with ``--seed``; ``--shots=0``
uses all of them). Methods without a memory bank stop with an error saying so.

Deployment: ``--export=PATH.stablehlo`` writes the jitted inference function for a fixed batch
(``--export_batch``) and input size with ``jax.export``: ``PATH.stablehlo`` (``Exported.serialize``:
the StableHLO module and its calling convention), ``PATH.weights.npz`` (its array arguments: trained
heads, frozen backbone, memory bank) and ``PATH.json`` (input size, normalisation, threshold).
``load_exported(PATH)`` runs it without this package's model code.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsad_jax import evaluate as eval_lib
from zsad_jax import visualize
from zsad_jax.data import decode, transforms

DEFAULT_CATEGORY = "object"
EXPORT_FORMAT = "zsad_jax.export/1"


# ----------------------------------------------------------------------------------------------
# Inputs.


def collect_images(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(file, output name)`` for every image file given or found (recursively) in a folder.

    Raises:
      FileNotFoundError: a path does not exist, or a folder holds no image files.
    """
    found: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            found.append((str(path), path.stem))
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in decode.IMAGE_EXTENSIONS
            )  # fmt: skip
            if not files:
                kinds = ", ".join(decode.IMAGE_EXTENSIONS)
                raise FileNotFoundError(f"{given}: the folder holds no image files ({kinds})")
            base = Path(path.absolute().name or "images")
            found += [(str(p), str(base / p.relative_to(path).with_suffix(""))) for p in files]
        else:
            raise FileNotFoundError(f"{given}: no such image file or folder")
    names: dict[str, int] = {}
    unique = []
    for file, name in found:  # the same stem from two places must not overwrite outputs
        count = names.get(name, 0)
        names[name] = count + 1
        unique.append((file, name if count == 0 else f"{name}_{count}"))
    return unique


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
        replacement with ``seed`` when the folder holds more.

    Raises:
      ValueError: the method has no few-shot mode.
      FileNotFoundError: no reference images.
    """
    if not callable(getattr(model, "build_memory", None)):
        raise ValueError(
            f"--reference: method {config.method!r} has no few-shot memory bank; only AF-CLIP "
            "(configs/af_clip.py, AF-CLIP+) supports reference images. Run without --reference"
        )
    files = [f for f, _ in collect_images([reference])]
    if shots is None:
        few_shot = config.model.get("few_shot") or {}
        shots = int(few_shot.get("shots", 0) or 0)
    if shots and len(files) > shots:
        chosen = np.random.default_rng(seed).choice(len(files), size=shots, replace=False)
        files = [files[i] for i in sorted(chosen)]
    images = np.stack([preprocess(decode.load_image(f), config) for f in files])
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
        multiple of the device count.
      mesh: device mesh (default: all devices).
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
        from zsad_jax import sharding as shard_lib

        self.config = config
        self.threshold = None if threshold is None else float(threshold)
        model.set_classes([category])
        mesh = shard_lib.make_mesh(config.get("mesh")) if mesh is None else mesh
        kwargs = {"memory": memory} if memory is not None else None
        self.infer = eval_lib.BatchedInference(model, mesh, model_kwargs=kwargs)
        self.batch_size = eval_lib.padded_batch_size(
            batch_size or int(config.eval.get("batch_size", 8) or 8), self.infer.num_devices
        )
        self.size = int(config.data.image_size)

    def label(self, score: float) -> int | None:
        return None if self.threshold is None else int(score >= self.threshold)

    def predict_images(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """(H_i, W_i, 3) uint8 images -> ``(map (H_i, W_i) float32, score)`` each."""
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.zeros((self.batch_size, self.size, self.size, 3), np.float32)
            for i, image in enumerate(chunk):
                batch[i] = preprocess(image, self.config)
            out = self.infer({"image": batch, "class_id": np.zeros(self.batch_size, np.int32)})
            for i, image in enumerate(chunk):
                amap = visualize.resize_map(out["anomaly_map"][i], *image.shape[:2])
                results.append((amap, float(out["pred_score"][i])))
        return results


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    skip_corrupt: bool = False,
    progress: bool = False,
    emit: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Scores every image of ``paths`` and writes the outputs (module docstring).

    Returns:
      The JSON records written to ``predictions.jsonl`` (one per image; unreadable files skipped
      with ``skip_corrupt`` get ``{"path", "error"}``).

    Raises:
      FileNotFoundError: a missing path.
      DataError: an unreadable image (unless ``skip_corrupt``), naming the file.
    """
    out_dir = Path(out_dir)
    items = collect_images(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    bar = eval_lib.progress_bar(len(items), enabled=progress, desc="predict", unit="image")
    with open(out_dir / "predictions.jsonl", "w") as jsonl:

        def write(record: dict[str, Any]) -> None:
            line = json.dumps(eval_lib.json_ready(record))
            jsonl.write(line + "\n")
            jsonl.flush()
            records.append(record)
            if emit is not None:
                emit(line)

        for start in range(0, len(items), predictor.batch_size):
            chunk, images = [], []
            for file, name in items[start : start + predictor.batch_size]:
                try:
                    images.append(decode.load_image(file))
                    chunk.append((file, name))
                except decode.DataError as e:
                    if not skip_corrupt:
                        raise
                    print(f"skipped: {e}", file=sys.stderr)
                    write({"path": file, "error": str(e)})
            for (file, name), image, (amap, score) in zip(
                chunk, images, predictor.predict_images(images), strict=True
            ):
                npy = out_dir / f"{name}.npy"
                overlay = out_dir / f"{name}_overlay.png"
                npy.parent.mkdir(parents=True, exist_ok=True)
                np.save(npy, amap.astype(np.float32))
                visualize.save_png(overlay, visualize.heatmap_overlay(image, amap))
                write(
                    {
                        "path": file,
                        "pred_score": score,
                        "pred_label": predictor.label(score),
                        "threshold": predictor.threshold,
                        "anomaly_map": str(npy),
                        "overlay": str(overlay),
                        "width": int(image.shape[1]),
                        "height": int(image.shape[0]),
                    }
                )
            bar.update(len(items[start : start + predictor.batch_size]))
    bar.close()
    return records


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
      platforms: lowering targets, e.g. ``("cpu", "cuda")``; default the current backend.

    Returns:
      ``{"stablehlo", "weights", "meta"}`` file paths.
    """
    from zsad_jax.train import SplitModel

    path = Path(path)
    model.set_classes([category])
    split = SplitModel(model)
    params, mutable, frozen = split.take_arrays()
    key_impls = {k: str(jax.random.key_impl(v)) for k, v in mutable.items() if _is_key(v)}
    mutable = {k: jax.random.key_data(v) if k in key_impls else v for k, v in mutable.items()}
    # One flat, ordered list of arrays: a serialisable argument structure independent of names.
    groups = {"params": params, "mutable": mutable, "frozen": frozen}
    if memory is not None:
        groups["memory"] = {"memory": memory}
    order = [(g, k) for g in groups for k in sorted(groups[g])]
    weights = [np.asarray(groups[g][k]) for g, k in order]

    def infer(arrays, images):
        parts: dict[str, dict[str, Any]] = {g: {} for g in groups}
        for (g, k), value in zip(order, arrays, strict=True):
            parts[g][k] = value
        rngs = {
            k: jax.random.wrap_key_data(v, impl=key_impls[k]) if k in key_impls else v
            for k, v in parts["mutable"].items()
        }
        kwargs = {"memory": parts["memory"]["memory"]} if memory is not None else {}
        batch = {"image": images, "class_id": jnp.zeros(images.shape[0], jnp.int32)}
        out = split.merge(parts["params"], rngs, parts["frozen"])(batch, train=False, **kwargs)
        return out["anomaly_map"].astype(jnp.float32), out["pred_score"].astype(jnp.float32)

    size = int(config.data.image_size)
    args = (
        [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
        jax.ShapeDtypeStruct((int(batch_size), size, size, 3), jnp.float32),
    )
    exported = jax.export.export(jax.jit(infer), platforms=platforms)(*args)
    if exported.nr_devices != 1 or exported.ordered_effects or exported.unordered_effects:
        raise ValueError(
            f"export: the inference function of {config.method!r} uses {exported.nr_devices} "
            "devices or side effects; only single-device, effect-free functions are exported"
        )
    files = {
        "stablehlo": str(path),
        "weights": str(path.with_name(path.name + ".weights.npz")),
        "meta": str(path.with_name(path.name + ".json")),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(files["stablehlo"], "wb") as f:
        f.write(exported.serialize())
    np.savez(files["weights"], *weights)
    name = str(config.data.transform)
    mean, std = transforms.normalization(name)
    meta = {
        "format": EXPORT_FORMAT,
        "method": str(config.method),
        "batch_size": int(batch_size),
        "image_size": size,
        "transform": name,
        "mean": list(mean),
        "std": list(std),
        "threshold": threshold,
        "few_shot": memory is not None,
        "category": category,
        "platforms": list(exported.platforms),
        "inputs": "images float32 (batch, size, size, 3): RGB / 255, resized, (x - mean) / std",
        "outputs": "anomaly_map float32 (batch, size, size), pred_score float32 (batch,)",
    }
    with open(files["meta"], "w") as f:
        json.dump(eval_lib.json_ready(meta), f, indent=1)
    return files


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def load_exported(path: str | os.PathLike) -> tuple[Callable, dict[str, Any]]:
    """``(run, meta)``: ``run(images) -> (anomaly_map, pred_score)`` of an exported model.

    ``images`` must be float32 ``(meta["batch_size"], S, S, 3)``, preprocessed as ``meta`` says.
    Runs the stored StableHLO through ``jax.export``; no model code is imported.
    """
    path = Path(path)
    weights_path = path.with_name(path.name + ".weights.npz")
    meta_path = path.with_name(path.name + ".json")
    for needed in (path, weights_path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: exported model file missing (see --export)")
    meta = json.load(open(meta_path))
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{meta_path}: not a zsad_jax export (format {meta.get('format')!r})")
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    with np.load(weights_path) as archive:
        weights = [jnp.asarray(archive[f"arr_{i}"]) for i in range(len(archive.files))]

    def run(images):
        return exported.call(weights, jnp.asarray(images, jnp.float32))

    return run, meta


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
) -> dict[str, Any]:
    """What the command does: ``{"predictions": [...], "threshold", "export": files or None}``."""
    if not images and not export:
        raise ValueError("give image files or folders to score (or --export=PATH)")
    for given in images:  # fail on a bad path before loading any model
        if not Path(given).exists():
            raise FileNotFoundError(f"{given}: no such image file or folder")
    model, config, stored, _ = eval_lib.load_model(checkpoint, config, step=step)
    chosen = stored if threshold is None else float(threshold)
    if chosen is not None and not math.isfinite(float(chosen)):
        chosen = None
    if reference and threshold is None and chosen is not None:
        # The stored threshold was chosen on zero-shot scores; few-shot scores have another scale.
        warnings.warn(
            "--reference: the checkpoint's threshold was chosen for zero-shot scores and does not "
            "apply to few-shot scores, so pred_label is null. Pass --threshold (e.g. the threshold "
            "in metrics.json of python -m zsad_jax.evaluate --few_shot=K)",
            stacklevel=2,
        )
        chosen = None
    elif chosen is None and images:
        warnings.warn(
            "no image threshold: the checkpoint stores none and --threshold was not given, so "
            "pred_label is null. Evaluate with --store_threshold or pass --threshold",
            stacklevel=2,
        )
    memory = None
    if reference:
        memory = build_reference_memory(model, config, reference, shots=shots, seed=seed)
    result: dict[str, Any] = {"threshold": chosen, "predictions": [], "export": None}
    if export:
        result["export"] = export_inference(
            model, config, export, batch_size=export_batch, memory=memory, threshold=chosen,
            category=category, platforms=export_platforms,
        )  # fmt: skip
    if images:
        predictor = Predictor(
            model, config, threshold=chosen, category=category, memory=memory,
            batch_size=batch_size,
        )  # fmt: skip
        result["predictions"] = predict_files(
            predictor, images, out, skip_corrupt=skip_corrupt, progress=progress, emit=emit
        )
    return result


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "method config (default: the one stored with --checkpoint)",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("checkpoint", None, "training workdir, its checkpoints/ or a step folder")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
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
    return flags.FLAGS


def main(argv: Sequence[str]) -> None:
    from absl import flags
    from absl import logging as absl_logging

    f = flags.FLAGS
    if not f["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        result = run(
            list(argv[1:]),
            checkpoint=f.checkpoint,
            config=f.config,
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
        )
    except (FileNotFoundError, decode.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result["predictions"]:
        counts = _counts(result["predictions"])
        print(
            f"scored {counts['images']} images ({counts['anomalous']} anomalous, "
            f"{counts['skipped']} skipped); outputs in {f.out}",
            file=sys.stderr,
        )
    if result["export"]:
        print(f"exported: {', '.join(result['export'].values())}", file=sys.stderr)


def _counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        "images": sum("pred_score" in r for r in records),
        "anomalous": sum(r.get("pred_label") == 1 for r in records),
        "skipped": sum("error" in r for r in records),
    }


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
