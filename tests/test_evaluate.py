"""zsad_jax.evaluate on a tiny placeholder method and the synthetic benchmark at 48 px.

Proofs: the maps evaluate() scores equal a direct NumPy forward of the placeholder on the same
files; every metric equals scikit-learn (AUROC, AP, F1-max) computed here on those maps per
category, and the means are plain means; a category without masks gets NaN pixel metrics that are
listed and left out of the means; the threshold is the argmax of F1 over scikit-learn's PR curve;
few-shot evaluation gives each category the memory of its own reference images; 8 devices give the
maps of 1 device; the command writes every result file and ends with JSON.
The placeholder ``ToyDetector`` lives in tests/toys.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from toys import CATEGORIES, IMAGE_SIZE, ToyDetector, toy_bench, toy_config, toy_numpy_forward

from zsad_jax import evaluate as eval_lib
from zsad_jax import inference
from zsad_jax import metrics as metrics_lib
from zsad_jax.data import decode, protocol, transforms
from zsad_jax.data.records import Record

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    return toy_bench(str(tmp_path_factory.mktemp("bench") / "synthetic"))


def sklearn_metrics(scores, labels) -> dict[str, float]:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "AUROC": roc_auc_score(labels, scores),
        "AP": average_precision_score(labels, scores),
        "F1max": float(f1.max()),
    }


# ----------------------------------------------------------------------------------------------
# Tests.


def test_choose_threshold_is_the_f1_argmax_of_sklearns_curve():
    r = np.random.default_rng(1)
    for trial in range(20):
        n = int(r.integers(2, 60))
        labels = r.random(n) > 0.6
        labels[0] = True
        # Heavy ties in half of the trials.
        scores = r.random(n) if trial % 2 else np.round(r.random(n) * 4) / 4
        t = metrics_lib.choose_threshold(scores, labels)
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0)
        best = f1[:-1].max()
        # The threshold reaches the best F1 of sklearn's curve ...
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(best, abs=1e-12)
        # ... and is the highest of sklearn's thresholds that does.
        assert t == pytest.approx(thresholds[np.isclose(f1[:-1], best, atol=1e-12)].max())
    with pytest.warns(metrics_lib.UndefinedMetricWarning):
        assert math.isnan(metrics_lib.choose_threshold([0.1, 0.2], [0, 0]))


def test_maps_and_metrics_equal_direct_numpy_and_sklearn(bench):
    config = toy_config(bench)
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    result = eval_lib.evaluate(model, config, keep_outputs=True)
    assert model.class_names == tuple(CATEGORIES)

    # The maps: an independent forward on the same files through the same transform.
    records = protocol.read_dataset("mvtec_ad", bench, "test", CATEGORIES)
    out = result["outputs"]
    assert result["num_images"] == len(records) == 18
    assert out["path"].tolist() == [r.path for r in records]
    transform = transforms.make_transform("plain", IMAGE_SIZE)
    for i, record in enumerate(records):
        sample = transform(decode.load_record(record))
        amap, score = toy_numpy_forward(model, sample["image"])
        np.testing.assert_allclose(out["anomaly_map"][i], amap, atol=2e-6)
        assert out["pred_score"][i] == pytest.approx(score, abs=2e-6)
        np.testing.assert_array_equal(out["gt_mask"][i], sample["gt_mask"] > 0)
        assert out["gt_label"][i] == record.gt_label and out["category"][i] == record.category

    # The metrics: scikit-learn on those maps, per category, then the plain mean.
    for name in CATEGORIES:
        rows = out["category"] == name
        got = result["per_category"][name]
        image = sklearn_metrics(out["pred_score"][rows], out["gt_label"][rows])
        pixel = sklearn_metrics(out["anomaly_map"][rows].ravel(), out["gt_mask"][rows].ravel())
        for key in ("AUROC", "AP", "F1max"):
            assert got[f"image_{key}"] == pytest.approx(image[key], abs=1e-9)
            assert got[f"pixel_{key}"] == pytest.approx(pixel[key], abs=1e-9)
        assert got["pixel_AUPRO"] == pytest.approx(
            metrics_lib.aupro(out["anomaly_map"][rows], out["gt_mask"][rows]), abs=1e-12
        )
        assert got["num_images"] == 9 and got["num_anomalous"] == 5
        assert 0.0 < got["pixel_AUPRO"] <= 1.0
    for metric in eval_lib.METRIC_NAMES:
        assert result[metric] == pytest.approx(
            np.mean([result["per_category"][c][metric] for c in CATEGORIES]), abs=1e-12
        )
    assert result["excluded"] == {}
    assert result["threshold"] == metrics_lib.choose_threshold(out["pred_score"], out["gt_label"])


def test_few_shot_uses_each_categorys_own_reference_images(bench):
    config = toy_config(bench)
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    result = eval_lib.evaluate(model, config, keep_outputs=True, few_shot=2, few_shot_seed=3)
    assert result["few_shot"] == {"shots": 2, "seed": 3}
    transform = transforms.make_transform("plain", IMAGE_SIZE)
    out = result["outputs"]
    for name in CATEGORIES:
        # Two shots from a train split of two normal images: both, whatever the seed.
        train = protocol.read_dataset("mvtec_ad", bench, "train", [name])
        references = np.stack([transform(decode.load_record(r))["image"] for r in train])
        rows = np.flatnonzero(out["category"] == name)
        for i in rows:
            record = Record(str(out["path"][i]), name, int(out["gt_label"][i]), has_mask=False)
            amap, score = toy_numpy_forward(
                model, transform(decode.load_record(record))["image"], references
            )
            np.testing.assert_allclose(out["anomaly_map"][i], amap, atol=2e-6)
        image = sklearn_metrics(out["pred_score"][rows], out["gt_label"][rows])
        assert result["per_category"][name]["image_AUROC"] == pytest.approx(image["AUROC"])
    with pytest.raises(ValueError, match="fewer than the 3 shots"):
        eval_lib.evaluate(model, config, few_shot=3)


def test_category_without_masks_gets_nan_pixel_metrics_left_out_of_the_means(
    bench, tmp_path, capsys
):
    config = toy_config(bench)
    records = protocol.read_dataset("mvtec_ad", bench, "test", CATEGORIES)
    # "pill" with image-level labels only, as the readers mark such a category.
    records = [
        Record(r.path, r.category, r.gt_label, None, r.defect_type, has_mask=False)
        if r.category == "pill"
        else r
        for r in records
    ]
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined metrics are reported, not warned per call
        result = eval_lib.evaluate(model, config, records=records, batch_size=5)
    pill, wood = result["per_category"]["pill"], result["per_category"]["wood"]
    assert all(math.isnan(pill[m]) for m in eval_lib.PIXEL_METRICS)
    assert "no pixel ground truth" in pill["note"]
    assert all(math.isfinite(pill[m]) for m in eval_lib.IMAGE_METRICS)
    for metric in eval_lib.PIXEL_METRICS:
        assert result["excluded"][metric] == ["pill"]
        assert result[metric] == wood[metric]
    assert result["image_AUROC"] == pytest.approx((pill["image_AUROC"] + wood["image_AUROC"]) / 2)
    # One note for the category, naming every metric it leaves out (not one line per metric).
    notes = [line for line in capsys.readouterr().err.splitlines() if "NaN for" in line]
    metrics = ", ".join(eval_lib.PIXEL_METRICS)
    assert notes == [f"note: {metrics} are NaN for pill (left out of the mean)"]

    paths = eval_lib.write_results(result, tmp_path)
    doc = json.load(open(paths["json"]))
    assert doc["per_category"]["pill"]["pixel_AUROC"] is None
    assert doc["excluded_from_mean"]["pixel_AUPRO"] == ["pill"]
    table = open(paths["md"]).read()
    assert "pixel_AUPRO: mean leaves out pill" in table and "| pill |" in table


def test_a_category_without_normal_images_gets_nan_image_metrics_not_ones(bench, capsys):
    """An empty good/ folder: AP and F1-max would be 1 by construction; all three are NaN, left
    out of the means, with a note naming what is missing."""
    config = toy_config(bench)
    records = protocol.read_dataset("mvtec_ad", bench, "test", CATEGORIES)
    records = [r for r in records if r.category != "pill" or r.gt_label]
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    result = eval_lib.evaluate(model, config, records=records, batch_size=5)
    pill, wood = result["per_category"]["pill"], result["per_category"]["wood"]
    assert all(math.isnan(pill[m]) for m in eval_lib.IMAGE_METRICS)
    assert pill["note"] == (
        "no normal image: the image metrics are undefined (NaN), left out of the means"
    )
    assert all(math.isfinite(pill[m]) for m in eval_lib.PIXEL_METRICS)
    for metric in eval_lib.IMAGE_METRICS:
        assert result["excluded"][metric] == ["pill"] and result[metric] == wood[metric]
    metrics = ", ".join(eval_lib.IMAGE_METRICS)
    assert f"note: {metrics} are NaN for pill (left out of the mean)" in capsys.readouterr().err


def test_eight_devices_give_the_maps_of_one_device(bench):
    config = toy_config(bench)
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    many = eval_lib.evaluate(model, config, keep_outputs=True, batch_size=8)
    one_mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    one = eval_lib.evaluate(model, config, keep_outputs=True, mesh=one_mesh, batch_size=3)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(many["outputs"]["anomaly_map"], one["outputs"]["anomaly_map"],
                               atol=1e-6)  # fmt: skip
    for metric in eval_lib.METRIC_NAMES:
        assert many[metric] == pytest.approx(one[metric], abs=1e-6)


@pytest.mark.slow
def test_command_writes_every_result_file_and_ends_with_json(bench, tmp_path):
    """``python -m zsad_jax.evaluate`` with a config file (random-init placeholder)."""
    config_file = tmp_path / "toy_eval_config.py"
    config_file.write_text(
        "from toys import toy_config\n\n"
        f"def get_config(arg=None):\n    return toy_config({bench!r})\n"
    )
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "zsad_jax.evaluate", f"--config={config_file}",
         f"--workdir={out}", "--noprogress", "--config.eval.num_vis=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"results in {out}: metrics.json/.csv/.md, vis/" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    doc = json.load(open(out / "metrics.json"))
    for metric in eval_lib.METRIC_NAMES:
        assert summary[metric] == pytest.approx(doc["mean"][metric])
        assert 0.0 <= summary[metric] <= 1.0
    assert set(doc["per_category"]) == set(CATEGORIES)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["category"] for r in rows] == [*CATEGORIES, "mean"]
    assert float(rows[-1]["pixel_AUROC"]) == pytest.approx(doc["mean"]["pixel_AUROC"])
    assert "| **mean** |" in (out / "metrics.md").read_text()
    run = json.load(open(out / "run.json"))
    assert run["checkpoint"] is None and run["device_count"] == 8
    assert json.load(open(out / "config.json"))["model"]["weight"] == [-2.0, -1.5, -1.0]
    for name in CATEGORIES:
        pngs = sorted((out / "vis" / name).glob("*.png"))
        assert len(pngs) == 3 and any("normal" in p.name for p in pngs)
        panel = np.asarray(__import__("PIL.Image").Image.open(pngs[0]))
        # image, 2 overlays, mask; titles above, score line and colour bar below
        assert panel.shape[1:] == (4 * IMAGE_SIZE, 3) and panel.shape[0] > IMAGE_SIZE

    # A bad checkpoint path fails with a message naming it, exit status 1.
    bad = subprocess.run(
        [sys.executable, "-m", "zsad_jax.evaluate", f"--checkpoint={tmp_path / 'missing'}",
         f"--workdir={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1 and "missing" in bad.stderr and "error:" in bad.stderr


def test_without_checkpoint_a_trained_config_is_refused():
    config = toy_config()
    config.model.random_init = False
    with pytest.raises(ValueError, match="--checkpoint is required"):
        inference.load_model(None, config)


def test_repeated_evaluations_of_one_model_structure_reuse_the_compiled_forward():
    """Training evaluates periodically: one compiled forward per model structure and mesh (jax's
    own cache, keyed on the hashable graphdef)."""
    config = toy_config()
    batch = {"image": np.ones((8, 4, 4, 3), np.float32), "class_id": np.zeros(8, np.int32)}
    first = inference.BatchedInference(ToyDetector(config, rngs=nnx.Rngs(0)))(batch)
    compiled = inference._forward._cache_size()
    again = inference.BatchedInference(ToyDetector(config, rngs=nnx.Rngs(1)))(batch)
    assert inference._forward._cache_size() == compiled
    other = ToyDetector(config, rngs=nnx.Rngs(0))
    other.class_names = ("changed",)  # a different static attribute: another compilation
    inference.BatchedInference(other)(batch)
    assert inference._forward._cache_size() == compiled + 1
    # Same function, each call with its own weights.
    assert not np.allclose(first["pred_score"], again["pred_score"])


@pytest.mark.parametrize(
    "num_vis, counts, quota",
    [
        (2, (3, 5), (1, 1)),  # good/ read first must not take both overlays
        (8, (3, 5), (3, 5)),  # fewer anomalous than slots: normal ones fill the rest
        (8, (20, 5), (6, 2)),  # a quarter normal
        (8, (20, 0), (8, 0)),  # no normal images: all anomalous
        (8, (0, 20), (0, 8)),  # no anomalous images: all normal
        (1, (3, 5), (1, 0)),  # one overlay: an anomalous one
        (8, None, (6, 2)),  # labels not known ahead (TFDS): a quarter normal
        (1, None, (1, 1)),  # ... one overlay: the first image met
        (0, (3, 5), (0, 0)),
    ],
)
def test_overlays_per_category_take_both_labels(num_vis, counts, quota):
    assert eval_lib._vis_quota(num_vis, counts) == quota
    picked = [0, 0]
    chosen = [
        label for label in [0] * 10 + [1] * 10 if eval_lib._vis_pick(num_vis, quota, picked, label)
    ]
    assert len(chosen) <= num_vis and chosen.count(1) <= quota[0] and chosen.count(0) <= quota[1]


def test_a_new_evaluation_removes_the_earlier_ones_panels_and_keeps_other_files(tmp_path):
    # A second evaluate into one workdir on another dataset kept the first one's vis/<category>/
    # folders beside its own.
    old = tmp_path / "vis" / "wood"
    old.mkdir(parents=True)
    for name in ("00000__normal__g0__score0.000.png", "00003__anomalous__s_1__score-1.250.png",
                 "00004__anomalous__x__scorenan.png"):  # fmt: skip
        (old / name).write_bytes(b"")
    (tmp_path / "vis" / "mine").mkdir()
    (tmp_path / "vis" / "mine" / "notes.png").write_bytes(b"mine")
    (tmp_path / "metrics.json").write_text("{}")
    eval_lib._remove_results(tmp_path)
    assert not old.exists() and not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "vis" / "mine" / "notes.png").read_bytes() == b"mine"


def test_ctrl_c_during_an_evaluation_leaves_none_of_its_panels(tmp_path, monkeypatch):
    config = toy_config()

    def interrupted(model, config, *, vis_dir, **kwargs):
        (vis_dir / "wood").mkdir(parents=True)
        (vis_dir / "wood" / "00000__anomalous__s1__score0.997.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_lib.inference, "load_model", lambda *a, **k: (None, config, None, {}))
    monkeypatch.setattr(eval_lib, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_lib.run(workdir=tmp_path, config=config)
    assert not (tmp_path / "vis" / "wood").exists()


def test_store_threshold_without_a_checkpoint_is_refused_before_any_work(tmp_path):
    """With ``--config`` there is no checkpoint to store the threshold in: said, not skipped."""
    with pytest.raises(ValueError, match=r"--store_threshold.*pass --checkpoint=WORKDIR"):
        eval_lib.run(workdir=tmp_path / "eval", config=toy_config(), store_threshold=True)
    assert not (tmp_path / "eval").exists()


def test_float16_maps_are_kept_in_float16_with_a_note_that_the_pixel_metrics_move(bench, capsys):
    config = toy_config(bench)
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    full = eval_lib.evaluate(model, config, keep_outputs=True)
    assert "map_dtype" not in capsys.readouterr().err
    config.eval.map_dtype = "float16"
    half = eval_lib.evaluate(model, config, keep_outputs=True)
    assert half["outputs"]["anomaly_map"].dtype == np.float16
    np.testing.assert_allclose(
        half["outputs"]["anomaly_map"], full["outputs"]["anomaly_map"], rtol=1e-3, atol=1e-4
    )
    assert "note: config.eval.map_dtype=float16 rounds the anomaly maps" in capsys.readouterr().err
