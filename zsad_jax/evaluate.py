r"""Evaluation of a trained method on a test set: ``python -m zsad_jax.evaluate``.

    python -m zsad_jax.evaluate --checkpoint=runs/af_clip --workdir=runs/af_clip/eval
    python -m zsad_jax.evaluate --checkpoint=runs/af_clip --workdir=runs/af_clip/eval_visa \
        --config.data.test_set=visa
    python -m zsad_jax.evaluate --config=configs/af_clip.py:tiny --workdir=/tmp/eval  # random init

Per category and as the mean over categories (NaN categories left out and listed), with anomalib's
names: image_AUROC/AP/F1max and pixel_AUROC/AP/F1max/AUPRO (``zsad_jax.metrics``), plus the
F1-optimal image threshold (``--store_threshold`` writes it into the checkpoint for ``predict``).
``--few_shot=K`` fills the memory bank per category with K normal ``train`` images drawn with
``--few_shot_seed``. Writes ``metrics.json/.csv/.md``, ``vis/`` panels, ``config.json`` and, last,
``run.json`` into ``--workdir``; the last printed line is JSON with the mean metrics.

Batches go through ``zsad_jax.inference``; a category's pixel metrics are computed as soon as its
images are in, so the host holds one category's maps at a time (``eval.map_dtype="float16"``
halves that, at a price: the rounded maps tie many small scores, so the pixel metrics move; a note
says so). In a multi-process run every process runs the same command, the k-th category's
metrics are computed by process ``k % P`` and shared, and process 0 writes the files. A killed
evaluation leaves no result files (earlier ones are removed first); run it again. The README's
"Evaluation and prediction" section and ``tests/test_evaluate.py`` hold the details.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import cli, inference, methods, report, visualize
from zsad_jax import metrics as metrics_lib
from zsad_jax import sharding as shard_lib
from zsad_jax.data import decode, pipeline, sources, transforms
from zsad_jax.data.decode import DataError

IMAGE_METRICS = ("image_AUROC", "image_AP", "image_F1max")
PIXEL_METRICS = ("pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS


# ----------------------------------------------------------------------------------------------
# Per-category accumulation.


class _Category:
    """One category's scores and labels (every process) and maps and masks (its owner only),
    collected until the category is complete."""

    def __init__(self, name: str, expected: int | None, owned: bool):
        self.name, self.expected, self.owned = name, expected, owned
        self.seen = 0
        self.finished = False
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.anomalous_without_mask = 0
        self.result: dict[str, Any] | None = None


def _category_metrics(cat: _Category, aupro_method: str) -> dict[str, Any]:
    scores, labels = np.asarray(cat.scores, np.float64), np.asarray(cat.labels, np.int32)
    out: dict[str, Any] = {
        "num_images": int(labels.size),
        "num_anomalous": int(labels.sum()),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics_lib.UndefinedMetricWarning)
        if labels.size:
            out.update(metrics_lib.image_metrics(scores, labels))
        else:
            out.update(dict.fromkeys(IMAGE_METRICS, math.nan))
        masks = np.stack(cat.masks) if cat.masks else np.zeros((0, 1, 1), bool)
        if masks.any():
            maps = np.stack(cat.maps)
            out.update(metrics_lib.pixel_metrics(maps, masks, aupro_method=aupro_method))
            out["num_pixel_images"] = int(masks.shape[0])
            if cat.anomalous_without_mask:
                out["note"] = (
                    f"{cat.anomalous_without_mask} anomalous images without a mask are left out "
                    "of the pixel metrics"
                )
        else:
            out.update(dict.fromkeys(PIXEL_METRICS, math.nan))
            out["num_pixel_images"] = 0
            out["note"] = "no pixel ground truth: pixel metrics are NaN and left out of the means"
    if labels.size and (not labels.any() or labels.all()):
        # One class only: AUROC is undefined, and AP and F1-max would be 1 (or 0) by construction
        # (an empty good/ folder is the usual cause), so none of them says anything.
        out.update(dict.fromkeys(IMAGE_METRICS, math.nan))
        missing = "normal" if labels.all() else "anomalous"
        out.setdefault(
            "note",
            f"no {missing} image: the image metrics are undefined (NaN), left out of the means",
        )
    return out


def _label_counts(source: Any) -> dict[str, tuple[int, int]] | None:
    """``{category: (anomalous, normal)}`` of a source that lists its records, else None."""
    records = getattr(source, "records", None)
    if records is None:
        return None
    counts: dict[str, list[int]] = {}
    for record in records:
        counts.setdefault(record.category, [0, 0])[0 if record.gt_label else 1] += 1
    return {name: (a, n) for name, (a, n) in counts.items()}


def _vis_quota(num_vis: int, counts: tuple[int, int] | None) -> tuple[int, int]:
    """(anomalous, normal) overlays of one category: ``num_vis`` in all, at least a quarter normal
    when it has normal images, the rest anomalous; what one label cannot fill goes to the other.
    Labels not known ahead (a TFDS source): a quarter normal, the rest anomalous (one overlay: the
    first image met)."""
    normal_quota = max(1, num_vis // 4) if num_vis > 1 else 0
    if counts is None:
        return (num_vis - normal_quota, normal_quota) if num_vis > 1 else (num_vis, num_vis)
    anomalous, normal = counts
    chosen_anomalous = min(anomalous, num_vis - min(normal_quota, normal))
    return chosen_anomalous, min(normal, num_vis - chosen_anomalous)


def _vis_pick(num_vis: int, quota: tuple[int, int], picked: list[int], label: int) -> bool:
    """Whether this image (``label``) gets an overlay: first come first served within its label's
    ``quota`` and ``num_vis`` in all; ``picked`` counts [anomalous, normal] so far."""
    index = 0 if label else 1
    if sum(picked) >= num_vis or picked[index] >= quota[index]:
        return False
    picked[index] += 1
    return True


# ----------------------------------------------------------------------------------------------
# evaluate().


def make_test_source(config: Any):
    """The test side of ``config.data`` (files or TFDS) as an ``ExampleSource``."""
    return sources.split_source(config.data, "test")


def evaluate(
    model: nnx.Module,
    config: Any,
    source: Any = None,
    *,
    records: Sequence[Any] | None = None,
    mesh=None,
    batch_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    aupro_method: str = "exact",
    vis_dir: str | os.PathLike | None = None,
    num_vis: int | None = None,
    progress: bool = False,
    keep_outputs: bool = False,
    set_classes: bool = True,
    few_shot: int = 0,
    few_shot_seed: int = 0,
    vis_threshold: float | None = None,
) -> dict[str, Any]:
    """Evaluates ``model`` on the test set of ``config`` (or on ``source``/``records``).

    Args:
      model: an ``AnomalyModel`` with its trained weights (left unchanged; ``set_classes`` is
        called with the test categories, which only caches per-class text).
      config: the ml_collections config (``data.*`` test fields, ``data.transform``,
        ``data.image_size``, ``eval.batch_size``, ``eval.num_vis``, ``mesh``).
      source: an ``ExampleSource`` to use instead of the config's test side.
      records: a list of ``Record`` to use instead (wrapped in a ``RecordSource``).
      mesh: device mesh (default: from ``config.mesh``).
      batch_size: global evaluation batch (default ``config.eval.batch_size``), rounded up to a
        multiple of the device count.
      model_kwargs: extra keyword arrays for the model call (AF-CLIP+'s ``memory``).
      aupro_method: ``exact`` | ``anomalyclip`` | ``af_clip`` (``zsad_jax.metrics.aupro``).
      vis_dir: write heatmap panels for ``num_vis`` images per category here (None = none).
      vis_threshold: the image threshold the panels show decisions for (the checkpoint's stored
        one; this evaluation's own is only known at its end); None = "no threshold".
      num_vis: default ``config.eval.num_vis``.
      progress: show a tqdm bar (process 0).
      keep_outputs: also return every map/score/label under ``"outputs"`` (NumPy; tests, notebooks;
        every process keeps every row then, so not for large test sets on many hosts).
      set_classes: call ``model.set_classes(source.class_names)`` first.
      few_shot: k > 0 evaluates the method's few-shot mode (AF-CLIP+): per category, k normal
        images drawn (``few_shot_seed``) from the ``train`` split of the test dataset fill the
        memory bank (``model.build_memory``) used for that category's images.
      few_shot_seed: the draw of the reference images (the papers average 5 seeds).

    Returns:
      The mean over categories of ``METRIC_NAMES`` (NaN categories left out), ``threshold`` (the
      F1-optimal image threshold over all test images, ``zsad_jax.metrics.choose_threshold``),
      ``per_category`` ({category: metrics and counts}), ``excluded`` ({metric: categories left
      out of its mean}), ``num_images``, ``skipped_files`` (unreadable files with
      ``data.skip_corrupt``), ``seconds``; the same on every process of a multi-process run (call
      it on all of them, as training does).
    """
    start = time.time()
    source = _test_source(config, source, records)
    if set_classes:
        model.set_classes(
            methods.text_class_names(config, config.data.get("test_set"), source.class_names)
        )
    mesh = shard_lib.make_mesh(config.get("mesh")) if mesh is None else mesh
    infer = inference.BatchedInference(model, mesh, model_kwargs=model_kwargs)
    batch_size = inference.padded_batch_size(
        batch_size or int(config.eval.get("batch_size", 8) or 8), infer.num_devices
    )
    transform_name = str(config.data.get("transform", "clip"))
    transform = _eval_transform(config.data, transform_name)
    num_vis = int(config.eval.get("num_vis", 0) or 0) if num_vis is None else int(num_vis)
    collector = _Collector(
        source,
        map_dtype=_map_dtype(config),
        aupro_method=aupro_method,
        vis_dir=None if vis_dir is None or not num_vis else Path(vis_dir),
        num_vis=num_vis,
        transform_name=transform_name,
        keep_outputs=keep_outputs,
        vis_threshold=vis_threshold,
    )
    # One pass over the whole source (zero-shot), or one per category with its own memory bank.
    passes: list[tuple[Any, Mapping[str, Any] | None]] = [(source, None)]
    if few_shot:
        passes = _few_shot_passes(model, config, source, transform, few_shot, few_shot_seed)
    skipped = _score_passes(
        infer, collector, passes, config.data, batch_size=batch_size, transform=transform,
        progress=progress,
    )  # fmt: skip
    collector.finish_all()
    result = _summary(collector.results(), collector.categories.values())
    if few_shot:
        result["few_shot"] = {"shots": int(few_shot), "seed": int(few_shot_seed)}
    result.update(skipped_files=skipped, seconds=round(time.time() - start, 3))
    if jax.process_count() > 1:
        # Every process computed the same from the same gathered values; process 0's copy makes
        # that a guarantee (and its timing the one reported).
        result = shard_lib.broadcast_json(result)
    if keep_outputs:
        result["outputs"] = {k: np.stack(v) for k, v in collector.kept.items()}
    return result


def _map_dtype(config: Any) -> np.dtype:
    dtype = np.dtype(str(config.eval.get("map_dtype", "float32")))
    if dtype != np.float32 and jax.process_index() == 0:
        # Measured on the demo checkpoint: pixel AUROC 0.8978 in float32, 0.9087 in float16.
        print(
            f"note: config.eval.map_dtype={dtype.name} rounds the anomaly maps, which ties many "
            "small scores: the pixel metrics differ from float32's (by 0.01 pixel AUROC on the "
            "demo); use it only when the host cannot hold a category's maps in float32",
            file=sys.stderr,
        )
    return dtype


def _test_source(config: Any, source: Any, records: Sequence[Any] | None) -> Any:
    """``records`` as a source, else ``source``, else the config's test side."""
    if records is not None:
        return pipeline.RecordSource(list(records))
    return make_test_source(config) if source is None else source


def _eval_transform(d: Any, transform_name: str) -> Callable:
    return transforms.make_transform(
        transform_name,
        int(d.image_size),
        mask_resize=transforms.mask_resize_for(str(d.get("mask_resize", "nearest")), d.test_set),
    )


def _score_passes(
    infer: inference.BatchedInference,
    collector: _Collector,
    passes: Sequence[tuple[Any, Mapping[str, Any] | None]],
    d: Any,
    *,
    batch_size: int,
    transform: Callable,
    progress: bool,
) -> list[str]:
    """Scores every batch of every pass into ``collector``; returns the skipped files in order."""
    batch_lists = [
        pipeline.eval_batches(
            part,
            batch_size=batch_size,
            transform=transform,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            skip_corrupt=bool(d.get("skip_corrupt", False)),
            num_workers=int(d.get("num_workers", 0) or 0),
        )
        for part, _ in passes
    ]
    bar = report.progress_bar(
        sum(len(b) for b in batch_lists), enabled=progress and jax.process_index() == 0,
        desc="evaluate", unit="batch",
    )  # fmt: skip
    skipped: list[str] = []
    try:
        for (part, kwargs), batches in zip(passes, batch_lists, strict=True):
            unreadable: list[int] = []
            for local, outputs in infer.stream(_together(batches), kwargs):
                collector.add(part, local, outputs)
                unreadable += _unreadable_rows(local)
                bar.update(1)
            skipped += _skipped_in_order(unreadable, batches.skipped)
    finally:
        bar.close()
    return skipped


def _summary(per_category: dict[str, dict[str, Any]], categories: Any) -> dict[str, Any]:
    """Means over categories (NaN ones left out and listed) and the threshold over all images."""
    result: dict[str, Any] = {}
    excluded: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics_lib.UndefinedMetricWarning)
        for metric in METRIC_NAMES:
            mean = metrics_lib.category_mean({n: r[metric] for n, r in per_category.items()})
            result[metric] = mean.mean
            if mean.excluded:
                excluded[metric] = list(mean.excluded)
        all_scores = np.concatenate([np.asarray(c.scores) for c in categories] or [[]])
        all_labels = np.concatenate([np.asarray(c.labels) for c in categories] or [[]])
        threshold = (
            metrics_lib.choose_threshold(all_scores, all_labels) if all_scores.size else math.nan
        )
    if excluded and jax.process_index() == 0:
        # One line per set of categories: a normal-only category makes every metric NaN at once.
        by_categories: dict[tuple[str, ...], list[str]] = {}
        for metric, names in excluded.items():
            by_categories.setdefault(tuple(names), []).append(metric)
        for names, metrics in by_categories.items():
            print(
                f"note: {', '.join(metrics)} {'is' if len(metrics) == 1 else 'are'} NaN for "
                f"{', '.join(names)} (left out of the mean)",
                file=sys.stderr,
            )
    result.update(
        threshold=threshold,
        per_category=per_category,
        excluded=excluded,
        num_images=int(all_scores.size),
    )
    return result


def _unreadable_rows(local: Mapping[str, np.ndarray]) -> list[int]:
    """Source indices of this process's rows that are unreadable files (not padding)."""
    index, valid = np.asarray(local["index"]), np.asarray(local["valid"])
    return [int(i) for i in index[~valid & (index >= 0)]]


def _skipped_in_order(indices: Sequence[int], paths: Sequence[str]) -> list[str]:
    """Every process's skipped files (its ``indices`` and ``paths``, in step) in source order."""
    pairs = [[i, p] for i, p in zip(indices, paths, strict=True)]
    merged = sorted(pair for part in shard_lib.allgather_json(pairs) for pair in part)
    return [path for _, path in merged]


# The per-row fields every process gathers from every batch (maps and scores come from the
# forward): small, so each process can follow every category and agree on who does what.
ROW_FIELDS = ("gt_label", "has_mask", "class_id", "index", "valid", "gt_mask")


class _Collector:
    """Host side of evaluation: per-category accumulation, visualisations, kept outputs.

    Every process sees every row's labels and scores (for the threshold and the bookkeeping); the
    maps and masks of a category are kept only by its owner, process ``k % P`` for the k-th
    category met, which computes that category's metrics once (``results`` shares them).
    """

    def __init__(
        self,
        source: Any,
        *,
        map_dtype: np.dtype,
        aupro_method: str,
        vis_dir: Path | None,
        num_vis: int,
        transform_name: str,
        keep_outputs: bool,
        vis_threshold: float | None = None,
    ):
        self.class_names = list(source.class_names)
        self.label_counts = _label_counts(source) or {}
        self.expected = {name: sum(counts) for name, counts in self.label_counts.items()}
        self.map_dtype, self.aupro_method = map_dtype, aupro_method
        self.vis_dir, self.num_vis, self.transform_name = vis_dir, num_vis, transform_name
        self.keep_outputs, self.vis_threshold = keep_outputs, vis_threshold
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.categories: dict[str, _Category] = {}  # in the order met
        self.kept: dict[str, list[np.ndarray]] = {}
        self._vis_picked: dict[str, list[int]] = {}

    def add(self, source: Any, local: Mapping[str, np.ndarray], outputs: Mapping[str, Any]):
        """One padded batch (this process's rows) and the model's (global) outputs for it."""
        fields = {k: np.asarray(local[k]) for k in ROW_FIELDS}
        fields["gt_mask"] = fields["gt_mask"] > 0.5  # masks travel as bytes, not float32
        rows = shard_lib.gather_rows(fields)
        picks = []
        for row in range(rows["index"].shape[0]):
            if rows["index"][row] < 0:
                continue  # padding
            name = self._name(source, rows, row)
            if name is None:
                continue  # an unreadable file of a source without a record list: no category
            cat = self._category(name)
            cat.seen += 1
            if rows["valid"][row] and self._take(cat, source, rows, row, outputs):
                picks.append(row)
            if cat.expected is not None and cat.seen == cat.expected:
                self._finish(cat)
        if picks:
            self._draw(source, local["image"], rows, outputs, picks)

    def _name(self, source: Any, rows: Mapping[str, np.ndarray], row: int) -> str | None:
        if rows["valid"][row]:
            return self.class_names[int(rows["class_id"][row])]
        # An unreadable file (skip_corrupt) has a padding class_id; only a record list knows more.
        records = getattr(source, "records", None)
        return records[int(rows["index"][row])].category if records is not None else None

    def _category(self, name: str) -> _Category:
        cat = self.categories.get(name)
        if cat is not None and not cat.finished:
            return cat
        if cat is not None:
            raise ValueError(
                f"evaluation: images of category {name!r} come after those of another category "
                "that followed it; the test source must list each category's images together "
                "(the dataset readers and TFDS builds do)"
            )
        # Without a record list (TFDS) there are no counts: the source lists each category's
        # images together, so the first image of another category completes the open ones.
        for other in self.categories.values():
            if other.expected is None and not other.finished:
                self._finish(other)
        owner = len(self.categories) % self.process_count
        cat = _Category(name, self.expected.get(name), owned=owner == self.process_index)
        self.categories[name] = cat
        return cat

    def _take(self, cat: _Category, source: Any, rows, row: int, outputs) -> bool:
        """Adds one scored image to its category; True when it is one to draw a panel of."""
        label = int(rows["gt_label"][row])
        score = float(outputs["pred_score"][row])
        has_mask = bool(rows["has_mask"][row])
        cat.scores.append(score)
        cat.labels.append(label)
        if label and not has_mask:
            cat.anomalous_without_mask += 1
        if has_mask and cat.owned:
            cat.maps.append(np.asarray(outputs["anomaly_map"][row], self.map_dtype))
            cat.masks.append(rows["gt_mask"][row] > 0.5)
        if self.keep_outputs:
            index = int(rows["index"][row])
            self._keep(
                anomaly_map=np.asarray(outputs["anomaly_map"][row], self.map_dtype),
                pred_score=score, gt_label=label, gt_mask=rows["gt_mask"][row] > 0.5,
                has_mask=has_mask, path=source.describe(index), category=cat.name,
            )  # fmt: skip
        # Decided on every process alike: all of them take part in gathering the panels' images.
        if self.vis_dir is None:
            return False
        quota = _vis_quota(self.num_vis, self.label_counts.get(cat.name))
        picked = self._vis_picked.setdefault(cat.name, [0, 0])
        return _vis_pick(self.num_vis, quota, picked, label)

    def _draw(self, source: Any, local_images: np.ndarray, rows, outputs, picks: list[int]):
        """Panels of the picked rows, drawn by process 0; only their images are gathered."""
        images = _gather_picked(np.asarray(local_images), picks)
        if self.process_index != 0:
            return
        for row in picks:
            index, label = int(rows["index"][row]), int(rows["gt_label"][row])
            name = self.class_names[int(rows["class_id"][row])]
            mask = rows["gt_mask"][row] > 0.5 if rows["has_mask"][row] else None
            image = transforms.denormalize(images[row], self.transform_name)
            _write_vis(self.vis_dir, name, source.describe(index), index, label, image,
                       outputs["anomaly_map"][row], mask, float(outputs["pred_score"][row]),
                       self.vis_threshold)  # fmt: skip

    def _finish(self, cat: _Category) -> None:
        cat.finished = True
        if cat.owned:
            cat.result = _category_metrics(cat, self.aupro_method)
            # Where each category's metrics were computed (shown with --verbosity=0).
            logging.info(
                "evaluate: metrics of %s (%d images) computed on process %d of %d",
                cat.name, len(cat.scores), self.process_index, self.process_count,
            )  # fmt: skip
        cat.maps, cat.masks = [], []  # free the category's maps before the next one arrives

    def finish_all(self) -> None:
        """Completes the categories still open (those of a source without counts, at its end)."""
        for cat in self.categories.values():
            if not cat.finished:
                self._finish(cat)

    def results(self) -> dict[str, dict[str, Any]]:
        """Every category's metrics, on every process, in the order met: each owner's, gathered."""
        merged: dict[str, dict[str, Any]] = {}
        owned = {name: cat.result for name, cat in self.categories.items() if cat.owned}
        for part in shard_lib.allgather_json(owned):
            merged.update(part)
        return {name: merged[name] for name in self.categories}

    def _keep(self, **values: Any) -> None:
        for key, value in values.items():
            self.kept.setdefault(key, []).append(np.asarray(value))


def _gather_picked(local_images: np.ndarray, picks: Sequence[int]) -> dict[int, np.ndarray]:
    """``{global row: image}`` for the picked rows of a batch, on every process.

    Each process sends only its picked rows (padded to the most any process has), not its whole
    part of the batch: a panel needs a few images, and a pod's global batch is large.
    """
    per_process = local_images.shape[0]
    count = jax.process_count()
    by_process = [[row for row in picks if row // per_process == p] for p in range(count)]
    most = max(len(rows) for rows in by_process)
    mine = [row % per_process for row in by_process[jax.process_index()]]
    sent = np.zeros((most, *local_images.shape[1:]), local_images.dtype)
    sent[: len(mine)] = local_images[mine]
    gathered = shard_lib.gather_rows(sent)
    return {
        row: gathered[p * most + i]
        for p, rows in enumerate(by_process)
        for i, row in enumerate(rows)
    }


def _together(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches; a file one process cannot read stops every process with its error
    (every process has the same number of padded batches, so they also end together)."""
    if jax.process_count() == 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        local, failure = None, None
        try:
            local = next(iterator)
        except StopIteration:
            return
        except DataError as e:
            failure = e
        shard_lib.raise_together(failure, DataError)
        yield local


def _few_shot_passes(
    model: nnx.Module, config: Any, source: Any, transform: Callable, shots: int, seed: int
) -> list[tuple[Any, dict[str, Any]]]:
    """Per category: (the category's test images, {"memory": bank of k reference images}).

    References are normal images of the test dataset's ``train`` split that are not scored: a train
    image that is also a test image (same resolved path; a ``folder`` root without a ``train/``
    level reads the same images for both splits) is left out, and too few left is an error.
    """
    import functools

    if not callable(getattr(model, "build_memory", None)):
        raise ValueError(
            f"few-shot evaluation: method {config.method!r} has no memory bank "
            "(model.build_memory); only AF-CLIP (AF-CLIP+) has a few-shot mode"
        )
    records = getattr(source, "records", None)
    if records is None:
        raise ValueError("few-shot evaluation needs file records (not config.data.tfds_dir)")
    load = functools.partial(decode.load_record, **sources.decode_options(config.data))
    build = nnx.jit(lambda m, x: m.build_memory(x))
    passes = []
    for name in dict.fromkeys(r.category for r in records):
        scored = [r for r in records if r.category == name]
        normals = _few_shot_references(config, name, scored, shots)
        chosen = np.random.default_rng(seed).choice(len(normals), size=shots, replace=False)
        images = np.stack([transform(load(normals[i]))["image"] for i in sorted(chosen)])
        # Every process builds the bank from the same images; process 0's is used by all, so the
        # references are the same everywhere whatever each host's arithmetic.
        memory = shard_lib.broadcast_arrays(jax.device_get(build(model, jax.numpy.asarray(images))))
        part = pipeline.RecordSource(scored, class_names=source.class_names, load=load)
        passes.append((part, {"memory": memory}))
    return passes


def _few_shot_references(config: Any, name: str, scored: Sequence[Any], shots: int) -> list[Any]:
    """The normal ``train`` images of category ``name`` that are not among its ``scored`` ones."""
    d = config.data
    train = sources.read_records(d, "test", split="train", categories=[name])
    normals = [r for r in train if not r.gt_label]
    test_paths = {os.path.realpath(r.path) for r in scored}
    held_out = [r for r in normals if os.path.realpath(r.path) not in test_paths]
    overlap = len(normals) - len(held_out)
    if overlap and len(held_out) < shots:
        raise ValueError(
            f"few-shot evaluation: {overlap} of the {len(normals)} normal 'train' images of "
            f"category {name!r} in {d.test_root} are also test images, and reference images must "
            f"not be scored; put {shots}+ reference normals in {d.test_root}/train/good/ and the "
            f"test images in {d.test_root}/test/good/ and {d.test_root}/test/<defect>/ (several "
            f"categories: {d.test_root}/<category>/train/good/, {d.test_root}/<category>/test/...)"
        )
    if len(held_out) < shots:
        raise ValueError(
            f"few-shot evaluation: category {name!r} has {len(held_out)} normal images in the "
            f"'train' split of {d.test_root}, fewer than the {shots} shots asked for"
        )
    if overlap and jax.process_index() == 0:
        print(
            f"note: few-shot {name}: {overlap} train images that are also test images are not "
            "used as references",
            file=sys.stderr,
        )
    return held_out


def _write_vis(
    folder: Path,
    category: str,
    path: str,
    index: int,
    label: int,
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray | None,
    score: float,
    threshold: float | None = None,
) -> None:
    """One labelled panel (``visualize.panel``); ``threshold`` (e.g. the checkpoint's stored one:
    this evaluation's own is only known at its end) draws the decision, None says "no threshold".
    """
    stem = visualize.safe_name([f"{index:05d}", "anomalous" if label else "normal",
                                Path(path).stem, f"score{score:.3f}"])  # fmt: skip
    picture = visualize.panel(image, np.asarray(amap, np.float32), mask=mask, relative=True,
                              score=score, label=label, threshold=threshold)  # fmt: skip
    visualize.save_png(folder / visualize.safe_name([category]) / f"{stem}.png", picture)


# ----------------------------------------------------------------------------------------------
# Result files.


def _fmt(value: Any) -> str:
    value = float(value)
    return "NaN" if math.isnan(value) else f"{100 * value:.1f}"


def write_results(result: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, str]:
    """``metrics.json``, ``metrics.csv`` and ``metrics.md`` of an ``evaluate`` result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(workdir / "metrics.json"), "csv": str(workdir / "metrics.csv"),
             "md": str(workdir / "metrics.md")}  # fmt: skip
    report.write_atomic(paths["json"], _results_json(result))
    report.write_atomic(paths["csv"], _results_csv(result))
    report.write_atomic(paths["md"], _results_markdown(result))
    return paths


def _results_json(result: Mapping[str, Any]) -> str:
    """``metrics.json``: the means, every category, and what the values mean."""
    doc = {
        "mean": {m: result[m] for m in METRIC_NAMES},
        "per_category": result["per_category"],
        "excluded_from_mean": result.get("excluded", {}),
        "threshold": result.get("threshold"),
        "num_images": result.get("num_images"),
        "skipped_files": result.get("skipped_files", []),
        "metric_notes": {
            "values": "fractions in [0, 1]; null = undefined (NaN)",
            "mean": "arithmetic mean over categories, NaN categories left out (excluded_from_mean)",
            "pixel_AUPRO": f"{result.get('aupro_method', 'exact')} AUPRO, FPR limit 0.3",
            "threshold": "F1-optimal image threshold over all test images (score >= t)",
        },
    }
    return json.dumps(report.json_ready(doc), indent=1, allow_nan=False)


def _results_csv(result: Mapping[str, Any]) -> str:
    """``metrics.csv``: a row per category, then the mean (``repr``: the floats round-trip)."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["category", *METRIC_NAMES, "num_images", "num_anomalous"])
    for name, values in result["per_category"].items():
        writer.writerow(
            [name, *(repr(float(values[m])) for m in METRIC_NAMES),
             values["num_images"], values["num_anomalous"]]
        )  # fmt: skip
    writer.writerow(["mean", *(repr(float(result[m])) for m in METRIC_NAMES),
                     result.get("num_images", ""), ""])  # fmt: skip
    return table.getvalue()


def _results_markdown(result: Mapping[str, Any]) -> str:
    """``metrics.md``: the table in %, then the notes (left-out categories, threshold)."""
    per_category = result["per_category"]
    mean = {m: result[m] for m in METRIC_NAMES}
    lines = [
        "| category | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for name, values in per_category.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values[m]) for m in METRIC_NAMES) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_fmt(mean[m])}**" for m in METRIC_NAMES) + " |")
    lines.append("")
    lines.append("Values in %. NaN = undefined for that category (e.g. no pixel masks).")
    for metric, names in result.get("excluded", {}).items():
        lines.append(f"- {metric}: mean leaves out {', '.join(names)} (NaN).")
    for name, values in per_category.items():
        if values.get("note"):
            lines.append(f"- {name}: {values['note']}.")
    threshold = result.get("threshold")
    if threshold is not None and math.isfinite(float(threshold)):
        lines.append(f"- F1-optimal image threshold: {float(threshold):.6g}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The command.


def run(
    *,
    workdir: str | os.PathLike,
    checkpoint: str | None = None,
    config: Any = None,
    step: int | None = None,
    aupro_method: str = "exact",
    progress: bool = True,
    store_threshold: bool = False,
    few_shot: int = 0,
    few_shot_seed: int = 0,
    allow_custom_code: bool = False,
) -> dict[str, Any]:
    """What the command does; returns the ``evaluate`` result (files written by process 0).

    In a multi-process run every process calls it and returns the same result; it returns once
    process 0 has written the files. A run killed part-way leaves no result files (those of an
    earlier evaluation in ``workdir``, its panels included, are removed first): run it again, it
    starts over.
    """

    start = time.time()
    if store_threshold and few_shot:
        raise ValueError("--store_threshold is for zero-shot runs (the checkpoint's mode)")
    if store_threshold and not checkpoint:
        raise ValueError(
            "--store_threshold writes the threshold into a checkpoint, and --config has none: "
            "pass --checkpoint=WORKDIR instead of --config"
        )
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    if primary:
        cli.ensure_writable(workdir, "--workdir")
        _remove_results(workdir)
    model, config, stored_threshold, info = inference.load_model(
        checkpoint, config, step=step, allow_custom_code=allow_custom_code
    )
    try:
        result = evaluate(
            model,
            config,
            aupro_method=aupro_method,
            vis_dir=workdir / "vis",
            progress=progress,
            few_shot=few_shot,
            few_shot_seed=few_shot_seed,
            # The stored threshold was chosen on zero-shot scores; few-shot ones have another scale.
            vis_threshold=None if few_shot else stored_threshold,
        )
    except KeyboardInterrupt:
        if primary:  # Ctrl-C: the panels drawn so far are no result either
            _remove_results(workdir)
        raise
    result["aupro_method"] = aupro_method
    if primary:
        write_results(result, workdir)
        config_doc = json.loads(report.config_json(config))
        report.write_atomic(
            workdir / "config.json", json.dumps(config_doc, indent=1, sort_keys=True)
        )
        record = _run_record(info, stored_threshold, result, config, start, aupro_method)
        # Last: run.json is the record of a finished evaluation.
        report.write_atomic(workdir / "run.json", json.dumps(report.json_ready(record), indent=1))
        if store_threshold:
            _store_threshold(info["checkpoint"], result["threshold"], stored_threshold)
    shard_lib.sync("zsad_jax.evaluate: results written")
    return result


def _store_threshold(checkpoint: str, threshold: float, stored: float | None) -> None:
    if not math.isfinite(threshold):  # e.g. a test set of one label: no F1-optimal threshold
        print(f"note: no finite threshold to store; {checkpoint} keeps {stored}", file=sys.stderr)
        return
    ckpt_lib.save_threshold(checkpoint, threshold)
    print(
        f"note: threshold {threshold:.6g} stored in {checkpoint} (was {stored}); predict decides "
        "with it from now on",
        file=sys.stderr,
    )


def _run_record(
    info: Mapping[str, Any],
    stored_threshold: float | None,
    result: Mapping[str, Any],
    config: Any,
    start: float,
    aupro_method: str,
) -> dict[str, Any]:
    """What ``run.json`` holds: the checkpoint, both thresholds, time, devices, protocol."""
    return {
        **info,
        "stored_threshold": stored_threshold,
        "threshold": result["threshold"],
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - start, 3),
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "test_set": str(config.data.get("test_set")),
        "aupro_method": aupro_method,
        "few_shot": result.get("few_shot"),
    }


# What ``run`` writes besides the panels; an evaluation starting in a workdir removes them first.
RESULT_FILES = ("run.json", "metrics.json", "metrics.csv", "metrics.md", "config.json")


# The panels ``_write_vis`` names: ``vis/<category>/00012__anomalous__<stem>__score0.873.png``.
_PANEL_NAME = re.compile(r"\d{5}__(anomalous|normal)__.*__score(-?\d+\.\d{3}|nan|-?inf)\.png")


def _remove_results(workdir: Path) -> None:
    """An earlier evaluation's result files and its panels (files of other names stay), so that
    a new one never leaves the old categories' panels beside its own."""
    for name in RESULT_FILES:
        (workdir / name).unlink(missing_ok=True)
    vis = workdir / "vis"
    for folder in sorted(vis.iterdir()) if vis.is_dir() else ():
        if not folder.is_dir():
            continue
        for panel in folder.iterdir():
            if panel.is_file() and _PANEL_NAME.fullmatch(panel.name):
                panel.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def summary_line(result: Mapping[str, Any]) -> str:
    """The last printed line: mean metrics, threshold and exclusions as JSON."""
    keys = (*METRIC_NAMES, "threshold", "num_images")
    return json.dumps(
        report.json_ready({**{k: result[k] for k in keys}, "excluded": result.get("excluded", {})})
    )


def _define_flags() -> None:
    from absl import flags

    cli.define_checkpoint_flags()
    for name in cli.CHECKPOINT_FLAGS:
        flags.declare_key_flag(name)
    flags.DEFINE_string("workdir", None, "metrics, overlays and the run record go here")
    flags.DEFINE_enum("aupro_method", "exact", list(metrics_lib.AUPRO_METHODS), "AUPRO variant")
    flags.DEFINE_bool("progress", True, "show a progress bar")
    flags.DEFINE_bool(
        "store_threshold", False, "write the F1-optimal threshold into the checkpoint's meta"
    )
    flags.DEFINE_integer(
        "few_shot", 0, "k > 0: AF-CLIP+ few-shot mode, k normal train images per category",
        lower_bound=0,
    )  # fmt: skip
    flags.DEFINE_integer("few_shot_seed", 0, "draw of the few-shot reference images")
    cli.define_multihost_flags()
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    from absl import flags

    f = flags.FLAGS
    config = cli.config_from_flags(overrides)
    result = run(
        workdir=f.workdir,
        checkpoint=f.checkpoint,
        config=config,
        step=f.step,
        aupro_method=f.aupro_method,
        progress=f.progress,
        store_threshold=f.store_threshold,
        few_shot=f.few_shot,
        few_shot_seed=f.few_shot_seed,
        allow_custom_code=f.allow_custom_code,
    )
    if jax.process_index() == 0:
        panels = ", vis/" if int(config.eval.get("num_vis", 0) or 0) > 0 else ""
        print(f"results in {f.workdir}: metrics.json/.csv/.md{panels}", file=sys.stderr)
    # Every process ends with the same line (the result is shared): any host's log has it.
    print(summary_line(result), flush=True)


if __name__ == "__main__":
    cli.Command(_define_flags, main).run()
