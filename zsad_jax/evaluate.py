r"""Zero-shot evaluation of a trained method on a test set: ``python -m zsad_jax.evaluate``.

    python -m zsad_jax.evaluate --checkpoint=runs/af_clip --workdir=runs/af_clip/eval
    python -m zsad_jax.evaluate --config=configs/af_clip.py --checkpoint=runs/af_clip \
        --workdir=runs/af_clip/eval_visa --config.data.test_set=visa
    python -m zsad_jax.evaluate --config=configs/af_clip.py:tiny --workdir=/tmp/eval  # random init

Few-shot AF-CLIP+ (``--few_shot=K``): per test category, K normal images drawn with
``--few_shot_seed`` from the ``train`` split of the test dataset fill the method's memory bank
(the papers report the mean over 5 seeds: run seeds 0..4). ``--store_threshold`` writes the
F1-optimal image threshold of a zero-shot run into the checkpoint for ``zsad_jax.predict``.

``--config`` is optional with ``--checkpoint`` (the config stored with the checkpoint is used); when
given it replaces the stored one (same method and architecture; e.g. another test set). Without
``--checkpoint`` the config must build with random weights (``model.backbone.random_init``), which
is for smoke tests only.

What it computes (``config.data``: ``test_set``/``test_root``/``test_split``/``test_categories``
through ``config.data.transform`` at ``config.data.image_size``): per category and as the mean over
categories, with anomalib's names,

    image_AUROC  image_AP  image_F1max  pixel_AUROC  pixel_AP  pixel_F1max  pixel_AUPRO

(``zsad_jax.metrics``: AUROC/AP/F1-max equal scikit-learn's; AUPRO is the exact MVTec AD integral to
FPR 0.3, ``--aupro_method`` selects the peers' variants). The maps are the method's test-time
``anomaly_map`` (its own post-processing, e.g. AF-CLIP's Gaussian smoothing) at the evaluation
resolution and the image score its ``pred_score``. Pixel metrics use only images with pixel ground
truth; a category without any (image-level labels only) gets NaN pixel metrics, listed under
``excluded_from_mean`` in ``metrics.json`` and left out of those means (``metrics.md`` says so).

Outputs in ``--workdir``: ``metrics.json`` (mean, per category, exclusions, the F1-optimal image
threshold), ``metrics.csv``, ``metrics.md``, ``vis/<category>/*.png`` for ``config.eval.num_vis``
images per category (image | heatmap overlay on [0, 1] | overlay min-max scaled per image | mask),
``config.json`` and ``run.json`` (checkpoint, step, time, devices). The last line printed is JSON
with the mean metrics.

How it runs: one ``jax.jit`` forward over the model split into flat arrays (state replicated on the
mesh of ``config.mesh``, batches split over its data axes), padded batches from
``zsad_jax.data.pipeline.eval_batches`` whose ``valid`` mask drops padding, a tqdm bar over batches.
Maps come back to the host as float32 (a config field ``eval.map_dtype="float16"``, where present,
halves host memory at the cost of ties) and a category's pixel metrics are computed as soon as all
its images are in, so host memory holds one category's maps at a time (the data readers list
categories contiguously).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from zsad_jax import metrics as metrics_lib
from zsad_jax import sharding as shard_lib
from zsad_jax import visualize

IMAGE_METRICS = ("image_AUROC", "image_AP", "image_F1max")
PIXEL_METRICS = ("pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
# Fields of a batch the forward pass receives (labels and masks stay on the host).
MODEL_INPUTS = ("image", "class_id")


# ----------------------------------------------------------------------------------------------
# Threshold.


def choose_threshold(scores, labels) -> float:
    """The F1-optimal image-score threshold: predict anomalous iff ``score >= threshold``.

    Every distinct score is a candidate (the points of scikit-learn's ``precision_recall_curve``);
    the one with the largest F1 wins, the highest such score on ties (fewest false alarms).

    Args:
      scores: (N,) image scores.
      labels: (N,) 0/1 or bool ground truth.

    Returns:
      The threshold; NaN (with a warning) when there is no anomalous image.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"choose_threshold: {scores.shape[0]} scores but {labels.shape[0]} labels")
    if np.isnan(scores).any():
        raise ValueError("choose_threshold: scores contain NaN")
    num_pos = int(labels.sum())
    if num_pos == 0:
        warnings.warn(
            "choose_threshold: no anomalous image, so no F1-optimal threshold; returning NaN",
            metrics_lib.UndefinedMetricWarning,
            2,
        )
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(~sorted_labels)
    # The last element of each run of equal scores: predicting ">= that score" takes the whole run.
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    f1 = 2.0 * tp[last] / (tp[last] + fp[last] + num_pos)
    return float(sorted_scores[last[int(np.argmax(f1))]])


# ----------------------------------------------------------------------------------------------
# The jitted, sharded forward pass.


def _place(x: Any, sharding) -> Any:
    """An array on ``sharding``; arrays already there (the training loop's state) are not copied."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return jax.device_put(x, sharding)
    return shard_lib.put_state(x, sharding)


class BatchedInference:
    """``model(batch, train=False)`` jitted over its flat state, batches split over the mesh.

    Args:
      model: an ``AnomalyModel`` (its arrays are used in place; the model stays usable).
      mesh: the device mesh (default: ``config.mesh``-style mesh over all devices).
      model_kwargs: extra keyword arrays for the call (e.g. AF-CLIP+'s ``memory``), replicated.

    Calling it with a host batch (dict of NumPy arrays whose leading size is a multiple of the
    device count) returns host NumPy ``anomaly_map`` (B, H, W) and ``pred_score`` (B,) float32.
    """

    def __init__(
        self,
        model: nnx.Module,
        mesh=None,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        from zsad_jax.train import SplitModel  # the training loop's flat-state split

        self.mesh = shard_lib.make_mesh() if mesh is None else mesh
        split = SplitModel(model)
        self._state = self._placed(split.take_arrays())
        self._kwargs = self._placed(dict(model_kwargs or {}))
        self._batch_sharding = shard_lib.batch_sharding(self.mesh)

        self._forward = _jitted_forward(split, self._batch_sharding)

    def _placed(self, tree: Any) -> Any:
        return jax.tree.map(
            lambda x: _place(x, shard_lib.state_sharding(self.mesh, np.shape(x))), tree
        )

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def __call__(
        self, batch: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Host batch -> host outputs; ``model_kwargs`` replace the constructor's for this call."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        device_batch = shard_lib.global_batch_from_local(inputs, self.mesh)
        kwargs = self._kwargs if model_kwargs is None else self._placed(dict(model_kwargs))
        with jax.set_mesh(self.mesh):
            outputs = self._forward(*self._state, kwargs, device_batch)
        return _to_host(outputs)


# Jitted forwards by (model structure, output sharding): the training loop's periodic evaluations
# of one model reuse one compiled function instead of tracing and compiling it again each time.
# Graph definitions hold lists and dicts (unhashable), so they are compared with ``==``.
_FORWARDS: list[tuple[Any, Any, Callable]] = []
_MAX_FORWARDS = 4


def _jitted_forward(split: Any, out_sharding) -> Callable:
    for graphdef, sharding, fn in _FORWARDS:
        if sharding == out_sharding and graphdef == split.graphdef:
            return fn

    def forward(params, mutable, frozen, kwargs, batch):
        outputs = split.merge(params, mutable, frozen)(batch, train=False, **kwargs)
        return {
            "anomaly_map": outputs["anomaly_map"].astype(np.float32),
            "pred_score": outputs["pred_score"].astype(np.float32),
        }

    fn = jax.jit(forward, out_shardings=out_sharding)
    _FORWARDS.insert(0, (split.graphdef, out_sharding, fn))
    del _FORWARDS[_MAX_FORWARDS:]
    return fn


def _to_host(tree: Any) -> Any:
    """Global arrays -> full NumPy copies on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _gather_local(values: np.ndarray) -> np.ndarray:
    """This process's rows of a host field -> the global rows (in process order)."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values), tiled=False)).reshape(
        -1, *np.shape(values)[1:]
    )


def padded_batch_size(batch_size: int, num_devices: int) -> int:
    """The evaluation batch rounded up to a multiple of the device count (padding is masked)."""
    return max(num_devices, -(-int(batch_size) // num_devices) * num_devices)


# ----------------------------------------------------------------------------------------------
# Per-category accumulation.


class _Category:
    """Maps, masks and scores of one category, collected until the category is complete."""

    def __init__(self, name: str, expected: int | None):
        self.name, self.expected = name, expected
        self.seen = 0
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
    if not labels.any() or labels.all():
        out.setdefault(
            "note", "only one image class: image AUROC is undefined (NaN), left out of the mean"
        )
    return out


def _expected_counts(source: Any) -> dict[str, int] | None:
    records = getattr(source, "records", None)
    if records is None:
        return None
    counts: dict[str, int] = {}
    for record in records:
        counts[record.category] = counts.get(record.category, 0) + 1
    return counts


def _vis_pick(num_vis: int, cat: _Category, label: int, picked: dict[str, list[int]]) -> bool:
    """Up to ``num_vis`` images per category, anomalous ones first come first served, but at least
    a quarter normal ones when the category has any."""
    chosen = picked.setdefault(cat.name, [0, 0])  # [anomalous, normal]
    if sum(chosen) >= num_vis:
        return False
    normal_quota = max(1, num_vis // 4) if num_vis > 1 else 0
    if label and chosen[0] >= num_vis - normal_quota:
        return False
    chosen[0 if label else 1] += 1
    return True


# ----------------------------------------------------------------------------------------------
# evaluate().


def make_test_source(config: Any):
    """The test side of ``config.data`` (files or TFDS) as an ``ExampleSource``."""
    from zsad_jax.data import sources

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
      keep_outputs: also return every map/score/label under ``"outputs"`` (NumPy; tests, notebooks).
      set_classes: call ``model.set_classes(source.class_names)`` first.
      few_shot: k > 0 evaluates the method's few-shot mode (AF-CLIP+): per category, k normal
        images drawn (``few_shot_seed``) from the ``train`` split of the test dataset fill the
        memory bank (``model.build_memory``) used for that category's images.
      few_shot_seed: the draw of the reference images (the papers average 5 seeds).

    Returns:
      The mean over categories of ``METRIC_NAMES`` (NaN categories left out), ``threshold`` (the
      F1-optimal image threshold over all test images, see ``choose_threshold``), ``per_category``
      ({category: metrics and counts}), ``excluded`` ({metric: categories left out of its mean}),
      ``num_images``, ``skipped_files`` (unreadable files with ``data.skip_corrupt``), ``seconds``.
    """
    from zsad_jax.data import pipeline, transforms

    start = time.time()
    d = config.data
    if records is not None:
        source = pipeline.RecordSource(list(records))
    elif source is None:
        source = make_test_source(config)
    if set_classes:
        model.set_classes(list(source.class_names))
    mesh = shard_lib.make_mesh(config.get("mesh")) if mesh is None else mesh
    infer = BatchedInference(model, mesh, model_kwargs=model_kwargs)
    batch_size = padded_batch_size(
        batch_size or int(config.eval.get("batch_size", 8) or 8), infer.num_devices
    )
    transform_name = str(d.get("transform", "clip"))
    transform = transforms.make_transform(
        transform_name, int(d.image_size), mask_resize=str(d.get("mask_resize", "nearest"))
    )
    num_vis = int(config.eval.get("num_vis", 0) or 0) if num_vis is None else int(num_vis)
    collector = _Collector(
        source,
        map_dtype=np.dtype(str(config.eval.get("map_dtype", "float32"))),
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
    skipped: list[str] = []
    primary = jax.process_index() == 0
    bars = [
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
    bar = progress_bar(sum(len(b) for b in bars), enabled=progress and primary)
    try:
        for (part, kwargs), batches in zip(passes, bars, strict=True):
            for local in batches:
                collector.add(part, local, infer(local, kwargs))
                bar.update(1)
            skipped += batches.skipped
    finally:
        bar.close()
    categories = collector.categories
    kept = collector.kept
    for cat in categories.values():
        if cat.result is None:
            _finish(cat, aupro_method)

    per_category = {name: cat.result for name, cat in categories.items()}
    result: dict[str, Any] = {}
    excluded: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics_lib.UndefinedMetricWarning)
        for metric in METRIC_NAMES:
            mean = metrics_lib.category_mean({n: r[metric] for n, r in per_category.items()})
            result[metric] = mean.mean
            if mean.excluded:
                excluded[metric] = list(mean.excluded)
    all_scores = np.concatenate([np.asarray(c.scores) for c in categories.values()] or [[]])
    all_labels = np.concatenate([np.asarray(c.labels) for c in categories.values()] or [[]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics_lib.UndefinedMetricWarning)
        threshold = choose_threshold(all_scores, all_labels) if all_scores.size else math.nan
    if few_shot:
        result["few_shot"] = {"shots": int(few_shot), "seed": int(few_shot_seed)}
    if excluded and primary:
        for metric, names in excluded.items():
            print(
                f"note: {metric} is NaN for {', '.join(names)} (left out of the mean)",
                file=sys.stderr,
            )
    result.update(
        threshold=threshold,
        per_category=per_category,
        excluded=excluded,
        num_images=int(all_scores.size),
        skipped_files=skipped,
        seconds=round(time.time() - start, 3),
    )
    if keep_outputs:
        result["outputs"] = {k: np.stack(v) for k, v in kept.items()}
    return result


class _Collector:
    """Host side of evaluation: per-category accumulation, visualisations, kept outputs."""

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
        self.expected = _expected_counts(source) or {}
        self.map_dtype, self.aupro_method = map_dtype, aupro_method
        self.vis_dir, self.num_vis, self.transform_name = vis_dir, num_vis, transform_name
        self.keep_outputs, self.vis_threshold = keep_outputs, vis_threshold
        self.primary = jax.process_index() == 0
        self.categories: dict[str, _Category] = {}
        self.kept: dict[str, list[np.ndarray]] = {}
        self._vis_picked: dict[str, list[int]] = {}

    def add(self, source: Any, local: Mapping[str, np.ndarray], outputs: Mapping[str, Any]):
        """One padded batch (this process's rows) and the model's (global) outputs for it."""
        from zsad_jax.data import transforms

        fields = {
            k: _gather_local(local[k])
            for k in ("gt_label", "gt_mask", "has_mask", "class_id", "index", "valid")
        }
        images = _gather_local(local["image"]) if self.vis_dir is not None else None
        for row in range(fields["valid"].shape[0]):
            index = int(fields["index"][row])
            if index < 0:
                continue  # padding
            name = self.class_names[int(fields["class_id"][row])]
            if not fields["valid"][row]:
                # An unreadable file (skip_corrupt): its class_id is padding, find it by index.
                name = _category_of(source, index, name)
            cat = self.categories.get(name)
            if cat is None:
                cat = self.categories[name] = _Category(name, self.expected.get(name))
            cat.seen += 1
            if fields["valid"][row]:
                label = int(fields["gt_label"][row])
                score = float(outputs["pred_score"][row])
                amap = np.asarray(outputs["anomaly_map"][row], self.map_dtype)
                mask = fields["gt_mask"][row] > 0.5 if fields["has_mask"][row] else None
                cat.scores.append(score)
                cat.labels.append(label)
                if mask is not None:
                    cat.maps.append(amap)
                    cat.masks.append(mask)
                elif label:
                    cat.anomalous_without_mask += 1
                if self.keep_outputs:
                    self._keep(
                        anomaly_map=amap, pred_score=score, gt_label=label,
                        gt_mask=fields["gt_mask"][row] > 0.5, has_mask=mask is not None,
                        path=source.describe(index), category=name,
                    )  # fmt: skip
                if (
                    images is not None
                    and self.primary
                    and _vis_pick(self.num_vis, cat, label, self._vis_picked)
                ):
                    image = transforms.denormalize(images[row], self.transform_name)
                    _write_vis(self.vis_dir, name, source.describe(index), index, label, image,
                               amap, mask, score, self.vis_threshold)  # fmt: skip
            if cat.expected is not None and cat.seen == cat.expected:
                _finish(cat, self.aupro_method)

    def _keep(self, **values: Any) -> None:
        for key, value in values.items():
            self.kept.setdefault(key, []).append(np.asarray(value))


def _few_shot_passes(
    model: nnx.Module, config: Any, source: Any, transform: Callable, shots: int, seed: int
) -> list[tuple[Any, dict[str, Any]]]:
    """Per category: (the category's test images, {"memory": bank of k reference images}).

    References are normal images of the test dataset's ``train`` split that are not scored: a train
    image that is also a test image (same resolved path; a ``folder`` root without a ``train/``
    level reads the same images for both splits) is left out, and too few left is an error.
    """
    import functools

    from zsad_jax.data import decode, pipeline, sources

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
        memory = jax.device_get(build(model, jax.numpy.asarray(images)))
        part = pipeline.RecordSource(scored, class_names=source.class_names, load=load)
        passes.append((part, {"memory": memory}))
    return passes


def _few_shot_references(config: Any, name: str, scored: Sequence[Any], shots: int) -> list[Any]:
    """The normal ``train`` images of category ``name`` that are not among its ``scored`` ones."""
    from zsad_jax.data import sources

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


def _category_of(source: Any, index: int, fallback: str) -> str:
    records = getattr(source, "records", None)
    return records[index].category if records is not None else fallback


def _finish(cat: _Category, aupro_method: str) -> None:
    cat.result = _category_metrics(cat, aupro_method)
    cat.maps, cat.masks = [], []  # free the category's maps before the next one arrives


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


def progress_bar(total: int, *, enabled: bool, desc: str = "evaluate", unit: str = "batch"):
    """A tqdm bar on stderr, or a stand-in that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# Result files.


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def json_ready(value: Any) -> Any:
    """Results as JSON values: NaN/inf -> null, NumPy scalars/arrays -> Python numbers/lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return value.tolist()
    try:
        return _number(value)
    except (TypeError, ValueError):
        return str(value)


def _fmt(value: Any) -> str:
    value = float(value)
    return "NaN" if math.isnan(value) else f"{100 * value:.1f}"


def write_results(result: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, str]:
    """``metrics.json``, ``metrics.csv`` and ``metrics.md`` of an ``evaluate`` result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    per_category = result["per_category"]
    mean = {m: result[m] for m in METRIC_NAMES}
    doc = {
        "mean": mean,
        "per_category": per_category,
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
    paths = {"json": str(workdir / "metrics.json"), "csv": str(workdir / "metrics.csv"),
             "md": str(workdir / "metrics.md")}  # fmt: skip
    with open(paths["json"], "w") as f:
        json.dump(json_ready(doc), f, indent=1, allow_nan=False)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", *METRIC_NAMES, "num_images", "num_anomalous"])
        for name, values in per_category.items():
            writer.writerow(
                [name, *(repr(float(values[m])) for m in METRIC_NAMES),
                 values["num_images"], values["num_anomalous"]]
            )  # fmt: skip
        writer.writerow(["mean", *(repr(float(mean[m])) for m in METRIC_NAMES),
                         result.get("num_images", ""), ""])  # fmt: skip
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
    notes = [(n, v["note"]) for n, v in per_category.items() if v.get("note")]
    for name, note in notes:
        lines.append(f"- {name}: {note}.")
    threshold = result.get("threshold")
    if threshold is not None and math.isfinite(float(threshold)):
        lines.append(f"- F1-optimal image threshold: {float(threshold):.6g}.")
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------
# The command.


def has_random_init(config: Any) -> bool:
    """Whether ``config`` builds without trained or converted weights (tests, smoke runs)."""
    model = config.get("model") or {}
    backbone = model.get("backbone") if hasattr(model, "get") else None
    if backbone is not None and bool(backbone.get("random_init", False)):
        return True
    return bool(model.get("random_init", False)) if hasattr(model, "get") else False


def load_model(
    checkpoint: str | None,
    config: Any = None,
    *,
    step: int | None = None,
    allow_custom_code: bool = False,
) -> tuple[nnx.Module, Any, float | None, dict[str, Any]]:
    """``(model, config, threshold, info)`` from a checkpoint, or a random-init config.

    ``config`` replaces the checkpoint's stored one (the command line passes the stored one with
    its ``--config.KEY=VALUE`` overrides); a config naming code to import is refused unless
    ``allow_custom_code`` (``zsad_jax.checkpoint.load_for_inference``). ``info`` has
    ``checkpoint`` (absolute step folder or None) and ``step``.
    """
    from zsad_jax import checkpoint as ckpt_lib

    if checkpoint:
        step_dir = ckpt_lib.resolve_step_dir(checkpoint, step)
        model, config, threshold = ckpt_lib.load_for_inference(
            step_dir, config=config, allow_custom_code=allow_custom_code
        )
        return model, config, threshold, {"checkpoint": str(step_dir), "step": int(step_dir.name)}
    if config is None:
        raise ValueError("pass --checkpoint=DIR (a training workdir or checkpoint folder)")
    if not has_random_init(config):
        raise ValueError(
            "--checkpoint is required: the config's backbone is not random_init, so the trained "
            "heads must come from a training run (--checkpoint=WORKDIR of python -m "
            "zsad_jax.train)"
        )
    info = {"checkpoint": None, "step": None}
    return ckpt_lib.build_model(config, load_weights=True), config, None, info


def _config_json(config: Any) -> Any:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json_ready(dict(config))


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
    """What the command does; returns the ``evaluate`` result (files written by process 0)."""
    from zsad_jax import cli

    start = time.time()
    if store_threshold and few_shot:
        raise ValueError("--store_threshold is for zero-shot runs (the checkpoint's mode)")
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    if primary:
        cli.ensure_writable(workdir, "--workdir")
    model, config, stored_threshold, info = load_model(
        checkpoint, config, step=step, allow_custom_code=allow_custom_code
    )
    result = evaluate(
        model,
        config,
        aupro_method=aupro_method,
        vis_dir=workdir / "vis",
        progress=progress,
        few_shot=few_shot,
        few_shot_seed=few_shot_seed,
        # The stored threshold was chosen on zero-shot scores; few-shot scores have another scale.
        vis_threshold=None if few_shot else stored_threshold,
    )
    result["aupro_method"] = aupro_method
    if primary:
        write_results(result, workdir)
        with open(workdir / "config.json", "w") as f:
            json.dump(_config_json(config), f, indent=1, sort_keys=True)
        run_info = {
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
        with open(workdir / "run.json", "w") as f:
            json.dump(json_ready(run_info), f, indent=1)
        if store_threshold and info["checkpoint"] and math.isfinite(result["threshold"]):
            from zsad_jax import checkpoint as ckpt_lib

            ckpt_lib.save_threshold(info["checkpoint"], result["threshold"])
    return result


def summary_line(result: Mapping[str, Any]) -> str:
    """The last printed line: mean metrics, threshold and exclusions as JSON."""
    keys = (*METRIC_NAMES, "threshold", "num_images")
    return json.dumps(
        json_ready({**{k: result[k] for k in keys}, "excluded": result.get("excluded", {})})
    )


def _define_flags() -> None:
    from absl import flags

    from zsad_jax import cli

    flags.DEFINE_string(
        "config", None, "method config file[:variant] for a random-init smoke run without "
        "--checkpoint; with --checkpoint its stored config is used (change keys with "
        "--config.KEY=VALUE)",
    )  # fmt: skip
    flags.DEFINE_string("checkpoint", None, "training workdir, its checkpoints/ or a step folder")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
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
    flags.DEFINE_bool(
        "allow_custom_code", False,
        "import the Python code a checkpoint's config names (config.method='module:Class'); "
        "only for checkpoints you trust",
    )  # fmt: skip
    cli.define_multihost_flags()
    flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str], overrides: Sequence[tuple[str, str]]) -> None:
    from absl import flags

    from zsad_jax import cli

    if len(argv) > 1:
        raise cli.CommandLineError(f"unexpected arguments {list(argv[1:])}")
    f = flags.FLAGS
    cli.initialize_from_flags()
    config = cli.build_config(
        config_file=f.config, overrides=overrides, checkpoint=f.checkpoint, step=f.step
    )
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
        print(f"results in {f.workdir}: metrics.json/.csv/.md, vis/", file=sys.stderr)
        print(summary_line(result), flush=True)


if __name__ == "__main__":
    from zsad_jax import cli

    cli.Command(_define_flags, main).run()
