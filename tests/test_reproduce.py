"""``python -m zsad_jax.reproduce``: the protocol end to end on two generated trees (an MVTec-AD
layout and a VisA layout with ``split_csv/1cls.csv``) with ``configs/af_clip.py:tiny``, killed
after the first direction's training and resumed to the same table as an uninterrupted run; the
best-epoch column; the reported records of every config against methods.md §7; the plan, the
refusals and the table format without training. And the AF-CLIP mask measurements quoted in
``configs/af_clip.py``.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from xla_env import xla_flags

from zsad_jax import cli
from zsad_jax import reproduce as rep
from zsad_jax.data import transforms
from zsad_jax.layers import resize_bilinear

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/af_clip.py:tiny"
# Two steps of a batch of 8 (one per step: each tree's test split has 10 images, one epoch = one
# step), no visualisations.
OVERRIDES = [("optim.steps", "2"), ("eval.num_vis", "0"), ("ckpt.async", "False")]


# ----------------------------------------------------------------------------------------------
# Generated datasets.


def _ellipse(h, w, cy, cx, ry, rx):
    y, x = np.mgrid[:h, :w] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _image(rng, mask=None, h=40, w=48):
    img = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    if mask is not None:
        img[mask] = 230
    return img


def _save(path: Path, array) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _defect(rng, h=40, w=48):
    return _ellipse(h, w, rng.uniform(10, 30), rng.uniform(10, 38), rng.uniform(3, 8),
                    rng.uniform(3, 9))  # fmt: skip


def mvtec_tree(root: Path, seed: int = 0) -> Path:
    """Two categories: train/good (3), test/good (2), test/<defect> (3, with masks)."""
    rng = np.random.default_rng(seed)
    for cat in ("bottle", "screw"):
        for i in range(3):
            _save(root / cat / "train" / "good" / f"{i:03d}.png", _image(rng))
        for i in range(2):
            _save(root / cat / "test" / "good" / f"{i:03d}.png", _image(rng))
        for i in range(3):
            mask = _defect(rng)
            _save(root / cat / "test" / "crack" / f"{i:03d}.png", _image(rng, mask))
            _save(root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png",
                  mask.astype(np.uint8) * 255)  # fmt: skip
    return root


def visa_tree(root: Path, seed: int = 1) -> Path:
    """Two categories in the VisA layout; ``split_csv/1cls.csv`` lists 3 train normals and 5 test
    images (2 normal, 3 anomalous with region-id masks) per category."""
    rng = np.random.default_rng(seed)
    rows = [["object", "split", "label", "image", "mask"]]
    for cat in ("candle", "pcb1"):
        for split, labels in (
            ("train", ["normal"] * 3),
            ("test", ["normal"] * 2 + ["anomaly"] * 3),
        ):
            for i, label in enumerate(labels):
                kind = "Normal" if label == "normal" else "Anomaly"
                rel = f"{cat}/Data/Images/{kind}/{split}{i:03d}.JPG"
                mask_rel = ""
                mask = _defect(rng) if label == "anomaly" else None
                Image.fromarray(_image(rng, mask)).save(_mkdir(root / rel), quality=95)
                if mask is not None:
                    mask_rel = f"{cat}/Data/Masks/Anomaly/{split}{i:03d}.png"
                    _save(root / mask_rel, mask.astype(np.uint8) * 2)  # region ids
                rows.append([cat, split, label, rel, mask_rel])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {"mvtec_ad": mvtec_tree(base / "mvtec_ad"), "visa": visa_tree(base / "visa")}


def _env() -> dict[str, str]:
    """The command's environment; the session's compilation cache comes with it (conftest.py)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices=8)  # as tests/conftest.py
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _command(trees, workdir, *extra):
    return [
        sys.executable, "-m", "zsad_jax.reproduce", f"--config={CONFIG}",
        f"--mvtec_ad={trees['mvtec_ad']}", f"--visa={trees['visa']}", f"--workdir={workdir}",
        "--noprogress", "--few_shot=1", "--seeds=2",
        *(f"--config.{k}={v}" for k, v in OVERRIDES), *extra,
    ]  # fmt: skip


def _run(trees, workdir, **kw):
    return rep.run(CONFIG, trees, workdir, overrides=OVERRIDES, few_shot=(1,), seeds=2, **kw)


# ----------------------------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_protocol_killed_after_the_first_training_resumes_to_the_same_table(trees, tmp_path):
    """The command in a subprocess, SIGKILLed once the MVTec-AD training has finished (its
    training.json appears); re-running continues (the finished training is not redone, finished
    evaluations are reused) and writes the table an uninterrupted run writes."""
    killed = tmp_path / "killed"
    marker = killed / "train_mvtec_ad" / rep.TRAINING_FILE
    proc = subprocess.Popen(_command(trees, killed), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert marker.exists(), output
    assert proc.returncode == -signal.SIGKILL, output
    assert not (killed / "table.md").exists()
    assert not (killed / "train_visa" / rep.TRAINING_FILE).exists()

    resumed = _run(trees, killed)
    assert "train_mvtec_ad: finished earlier (2 steps)" in resumed["actions"]
    assert "train_visa: trained (2 steps)" in resumed["actions"]

    _run(trees, tmp_path / "fresh")
    assert (killed / "table.csv").read_text() == (tmp_path / "fresh" / "table.csv").read_text()
    assert (killed / "table.md").read_text() == (tmp_path / "fresh" / "table.md").read_text()

    # A second re-run trains and evaluates nothing.
    again = _run(trees, killed)
    assert [a for a in again["actions"] if "evaluating" in a or ": trained" in a] == []
    assert (killed / "table.csv").read_text() == (tmp_path / "fresh" / "table.csv").read_text()

    # The table: every direction, metric, reported number and difference.
    rows = list(csv.DictReader(io.StringIO((killed / "table.csv").read_text())))
    groups = {(r["trained_on"], r["tested_on"], r["shots"]) for r in rows}
    assert groups == {("mvtec_ad", "visa", "0"), ("visa", "mvtec_ad", "0"),
                      ("mvtec_ad", "visa", "1"), ("visa", "mvtec_ad", "1")}  # fmt: skip
    assert len(rows) == 4 * len(rep.METRIC_NAMES)
    by = {(r["trained_on"], r["shots"], r["metric"]): r for r in rows}
    row = by[("visa", "0", "image_AUROC")]
    assert float(row["reported"]) == 92.9  # configs/af_clip.py REPORTED
    assert float(row["difference"]) == pytest.approx(float(row["ours"]) - 92.9, abs=2e-6)
    assert row["aupro_method"] == "af_clip"
    doc = json.loads((killed / "eval" / "visa_to_mvtec_ad" / rep.RESULT_FILE).read_text())
    assert float(row["ours"]) == pytest.approx(100 * doc["mean"]["image_AUROC"], abs=1e-6)
    # Few-shot: the mean of the two seeds' evaluations.
    seeds = [json.loads((killed / "eval" / f"visa_to_mvtec_ad_1shot_seed{s}" / rep.RESULT_FILE)
                        .read_text())["mean"]["pixel_AUROC"] for s in (0, 1)]  # fmt: skip
    shot = by[("visa", "1", "pixel_AUROC")]
    assert float(shot["ours"]) == pytest.approx(100 * np.mean(seeds), abs=1e-6)
    assert float(shot["reported"]) == 96.8 and shot["seeds"] == "2"
    assert float(by[("mvtec_ad", "0", "pixel_AP")]["reported"]) == 26.9
    assert by[("mvtec_ad", "1", "pixel_AP")]["reported"] == ""  # not reported for AF-CLIP+
    md = (killed / "table.md").read_text()
    assert "## Trained on VisA, tested on MVTec-AD (zero-shot)" in md
    assert "## Trained on MVTec-AD, tested on VisA (1-shot, mean ± std over 2 seeds)" in md
    assert "| image_AUROC |" in md and "ours − reported" in md
    assert "## Reported but not run here" in md and "add --btad=DIR" in md
    assert "add --few_shot=2" in md
    assert "selected on the test set" not in md  # never without --select_on_test
    for name in ("mvtec_ad_to_visa", "visa_to_mvtec_ad"):
        assert (killed / "eval" / name / "metrics.md").exists()


@pytest.mark.slow
def test_selected_on_test_column_is_the_best_epoch_next_to_the_last_one(trees, tmp_path):
    """Two epochs (one step each), every epoch evaluated by the training loop's hook; the column
    shows the epoch with the best pixel AUROC, the ours column the last epoch."""
    out = rep.run(CONFIG, trees, tmp_path / "sel", overrides=OVERRIDES, directions=("mvtec_ad",),
                  select_on_test=True, select_metrics=("pixel_AUROC",))  # fmt: skip
    epochs = {
        step: json.loads((tmp_path / "sel" / "eval" / "mvtec_ad_to_visa" / "epochs" /
                          f"step_{step:07d}.json").read_text())["mean"]
        for step in (1, 2)
    }  # fmt: skip
    best = max((1, 2), key=lambda s: (epochs[s]["pixel_AUROC"], -s))
    last = json.loads((tmp_path / "sel" / "eval" / "mvtec_ad_to_visa" / rep.RESULT_FILE)
                      .read_text())["mean"]  # fmt: skip
    assert last == epochs[2]  # the final evaluation is the honest number
    for row in out["rows"]:
        assert row["ours"] == pytest.approx(100 * last[row["metric"]], nan_ok=True)
        assert row["selected_on_test"] == pytest.approx(100 * epochs[best][row["metric"]],
                                                        nan_ok=True)  # fmt: skip
        assert row["selected_epoch"] == best
    md = (tmp_path / "sel" / "table.md").read_text()
    assert f"| {rep.SELECTED_LABEL} |" in md and f"(epoch {best})" in md
    assert "selection: mean of pixel_AUROC, best of 2 epochs" in md
    # The metrics.jsonl rows of the training loop agree with the stored epoch evaluations.
    rows = [
        json.loads(line)
        for line in (tmp_path / "sel" / "train_mvtec_ad" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = {r["step"]: r["eval/pixel_AUROC"] for r in rows if "eval/pixel_AUROC" in r}
    assert evals == pytest.approx({s: epochs[s]["pixel_AUROC"] for s in (1, 2)})

    # A run trained without the flag has no per-epoch evaluations: the column says so.
    plain = rep.run(CONFIG, trees, tmp_path / "plain", overrides=OVERRIDES,
                    directions=("mvtec_ad",))  # fmt: skip
    assert plain["rows"][0]["selected_on_test"] is None
    late = rep.run(
        CONFIG,
        trees,
        tmp_path / "plain",
        overrides=OVERRIDES,
        directions=("mvtec_ad",),
        select_on_test=True,
        select_metrics=("image_AUROC",),
    )
    assert late["rows"][0]["selected_on_test"] is None
    assert late["rows"][0]["selection"].startswith("n/a: no evaluation after steps [1, 2]")


# ----------------------------------------------------------------------------------------------
# Without training.


def test_plan_pairs_extras_and_few_shot_seeds():
    planned = rep.plan(("mvtec_ad", "visa"), {"btad": "x", "mpdd": None}, few_shot=(1, 4),
                       seeds=2)  # fmt: skip
    assert [e.name for e in planned["mvtec_ad"]] == [
        "mvtec_ad_to_visa", "mvtec_ad_to_btad", "mvtec_ad_to_visa_1shot_seed0",
        "mvtec_ad_to_visa_1shot_seed1", "mvtec_ad_to_visa_4shot_seed0",
        "mvtec_ad_to_visa_4shot_seed1",
    ]  # fmt: skip
    visa = [e.name for e in planned["visa"]]
    assert visa[:2] == ["visa_to_mvtec_ad", "visa_to_mvtec_ad_1shot_seed0"]  # no extras
    with pytest.raises(ValueError, match="'btad' is not a training set of the protocol"):
        rep.plan(("btad",), {})


def test_direction_configs_set_the_protocol_and_keep_the_variants(trees):
    config = rep.direction_config("configs/ava_dino.py:tiny,paper", [("optim.lr", "0.5")],
                                  "visa", "mvtec_ad", trees)  # fmt: skip
    d = config.data
    assert (d.train_set, d.train_split, d.test_set, d.test_split) == ("visa", "test", "mvtec_ad",
                                                                      "test")  # fmt: skip
    assert d.train_root == os.path.abspath(trees["visa"]) and d.categories == ()
    assert d.test_categories == () and config.optim.lr == 0.5
    assert config.model.text_interleave_quirk is False  # the "paper" variant kept
    full = rep.direction_config("configs/ava_dino.py", [], "mvtec_ad", "visa", trees)
    # Each side's official mask threshold follows its dataset (VisA > 0, MVTec > 0.5).
    d = full.data
    assert (transforms.mask_resize_for(d.train_mask_resize, d.train_set),
            transforms.mask_resize_for(d.mask_resize, d.test_set)) == ("bilinear_threshold",
                                                                       "bilinear_any")  # fmt: skip
    with pytest.raises(cli.CommandLineError, match="the protocol sets the datasets"):
        rep.direction_config(CONFIG, [("data.test_root", "x")], "visa", "mvtec_ad", trees)


def test_refusals_before_any_work(trees, tmp_path):
    with pytest.raises(cli.CommandLineError, match="give --visa=DIR"):
        rep.run(CONFIG, {"mvtec_ad": trees["mvtec_ad"]}, tmp_path)
    with pytest.raises(FileNotFoundError, match="--btad=.*no such directory"):
        rep.run(CONFIG, {**trees, "btad": tmp_path / "nope"}, tmp_path)
    with pytest.raises(cli.CommandLineError, match="--mpdd=.* is the folder given as --mvtec_ad"):
        rep.run(CONFIG, {**trees, "mpdd": trees["mvtec_ad"]}, tmp_path)
    with pytest.raises(ValueError, match="has no SELECT_ON_TEST"):
        rep.run(CONFIG, trees, tmp_path, select_on_test=True)
    with pytest.raises(ValueError, match="has no few-shot mode"):
        rep.run("configs/acd_clip.py:tiny", trees, tmp_path, few_shot=(1,))
    with pytest.raises(cli.CommandLineError, match="--config.data.train_set: the protocol"):
        rep.run(CONFIG, trees, tmp_path, overrides=[("data.train_set", "btad")])
    assert not (tmp_path / "protocol.json").exists()


def test_command_line_errors_are_one_line(trees, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "zsad_jax.reproduce", f"--config={CONFIG}",
         f"--mvtec_ad={trees['mvtec_ad']}", f"--workdir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: give --visa=DIR")


def _row(metric, ours, reported, **kw):
    row = dict.fromkeys(rep.CSV_FIELDS)
    row.update(trained_on="mvtec_ad", tested_on="visa", shots=0, seeds=0, metric=metric,
               ours=ours, reported=reported, aupro_method="exact", source="README",
               difference=None if reported is None else ours - reported, **kw)  # fmt: skip
    return row


def test_table_format():
    rows = [_row("image_AUROC", 88.04, 88.5), _row("image_AP", math.nan, None),
            _row("pixel_AUROC", 96.26, 96.2, selected_on_test=97.0, selected_epoch=3,
                 selection="mean of pixel_AUROC, best of 10 epochs")]  # fmt: skip
    md = rep.table_markdown(rows, spec="configs/x.py", select=True)
    assert "| image_AUROC | 88.0 | 88.5 | -0.5 | n/a |" in md
    assert "| image_AP | NaN | – | – | n/a |" in md
    assert "| pixel_AUROC | 96.3 | 96.2 | +0.1 | 97.0 (epoch 3) |" in md
    assert f"| metric | ours | reported | difference | {rep.SELECTED_LABEL} |" in md
    not_run = [
        {"train_set": "visa", "test_set": "mvtec_ad", "shots": 0, "metrics": {"image_AUROC": 93.5},
         "source": "README"},
        {"train_set": "mvtec_ad", "test_set": "visa", "shots": 4, "metrics": {"image_AUROC": 92.2},
         "source": "Table 2"},
        {"train_set": "mvtec_ad", "test_set": "mpdd", "shots": 0, "metrics": {"image_AUROC": 70.1},
         "source": "README"},
        {"train_set": "mvtec_ad", "test_set": "ksdd2", "shots": 0,
         "metrics": {"image_AUROC": 96.2}, "source": "README"},
    ]  # fmt: skip
    md = rep.table_markdown(rows, spec="configs/x.py", not_run=not_run)
    assert "selected on the test set" not in md
    for line in [
        "- trained on VisA, tested on MVTec-AD: image_AUROC 93.5 (README; the model trained on "
        "VisA was not run (--directions))",
        "- trained on MVTec-AD, tested on VisA (4-shot): image_AUROC 92.2 (Table 2; add "
        "--few_shot=4)",
        "- trained on MVTec-AD, tested on MPDD: image_AUROC 70.1 (README; add --mpdd=DIR)",
        "- trained on MVTec-AD, tested on ksdd2: image_AUROC 96.2 (README; not a test set of this "
        "protocol (no reader here))",
    ]:
        assert line in md, md
    text = rep.table_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed[0]["ours"] == "88.040000" and parsed[1]["reported"] == ""
    assert parsed[1]["ours"] == "nan" and parsed[2]["selected_epoch"] == "3"


# ----------------------------------------------------------------------------------------------
# The reported numbers as data.

# methods.md §7 (and the papers' tables it cites), transcribed here: (config, variant, trained on,
# tested on, shots) -> {metric: %}.
SECTION_7 = {
    ("af_clip", None, "visa", "mvtec_ad", 0): {
        "image_AUROC": 92.9, "image_AP": 96.8, "image_F1max": 92.9, "pixel_AUROC": 92.3,
        "pixel_AP": 46.5, "pixel_F1max": 47.8, "pixel_AUPRO": 85.7},
    ("af_clip", None, "mvtec_ad", "visa", 0): {
        "image_AUROC": 88.5, "image_AP": 89.9, "image_F1max": 85.2, "pixel_AUROC": 96.2,
        "pixel_AP": 26.9, "pixel_F1max": 33.6, "pixel_AUPRO": 88.7},
    ("af_clip", None, "visa", "mvtec_ad", 4): {"image_AUROC": 97.2, "pixel_AUROC": 97.6},
    ("af_clip", None, "mvtec_ad", "visa", 4): {"image_AUROC": 92.2, "pixel_AUROC": 98.5},
    ("ava_dino", None, "visa", "mvtec_ad", 0): {
        "image_AUROC": 93.5, "pixel_AUROC": 92.1, "pixel_F1max": 50.6},
    ("ava_dino", None, "mvtec_ad", "visa", 0): {
        "image_AUROC": 87.2, "pixel_AUROC": 95.9, "pixel_F1max": 29.2},
    ("ava_dino", None, "mvtec_ad", "btad", 0): {"image_AUROC": 91.8, "pixel_AUROC": 92.2},
    ("ava_dino", None, "mvtec_ad", "mpdd", 0): {"image_AUROC": 70.1, "pixel_AUROC": 94.1},
    ("acd_clip", "n_groups=4", "visa", "mvtec_ad", 0): {
        "image_AUROC": 92.4, "image_AP": 96.8, "pixel_AUROC": 90.9, "pixel_AP": 44.0},
    ("acd_clip", "n_groups=4", "mvtec_ad", "visa", 0): {
        "image_AUROC": 83.0, "image_AP": 86.0, "pixel_AUROC": 94.6, "pixel_AP": 27.5},
    ("acd_clip", "n_groups=2", "visa", "mvtec_ad", 0): {"pixel_AUROC": 91.7},
    ("acd_clip", "n_groups=2", "mvtec_ad", "visa", 0): {"image_AUROC": 85.6},
    ("acd_clip", "n_groups=3", "mvtec_ad", "visa", 0): {"pixel_AUROC": 95.9},
    ("acd_clip", "n_groups=4", "mvtec_ad", "btad", 0): {
        "image_AUROC": 93.3, "pixel_AUROC": 96.5},
    ("acd_clip", "n_groups=4", "mvtec_ad", "mpdd", 0): {
        "image_AUROC": 74.7, "pixel_AUROC": 96.1},
    ("dlvp_clip", None, "visa", "mvtec_ad", 0): {"image_AUROC": 94.2, "pixel_AUROC": 90.4},
    ("dlvp_clip", None, "mvtec_ad", "visa", 0): {"image_AUROC": 87.9, "pixel_AUROC": 95.7},
}  # fmt: skip


def _records(name, arg=None):
    module = importlib.import_module(f"configs.{name}")
    return module, rep.reported_records(module, module.get_config(arg))


@pytest.mark.parametrize("name", ["af_clip", "ava_dino", "acd_clip", "dlvp_clip"])
def test_reported_records_are_valid_and_match_methods_md(name):
    module = importlib.import_module(f"configs.{name}")
    everything = rep.reported_records(module)  # checks every field
    assert everything
    for r in everything:
        assert r["train_set"] == ("visa" if r["test_set"] == "mvtec_ad" else "mvtec_ad")
    for (config_name, arg, train_set, test_set, shots), expected in SECTION_7.items():
        if config_name != name:
            continue
        _, records = _records(name, arg)
        found = [
            r
            for r in records
            if (r["train_set"], r["test_set"], r["shots"]) == (train_set, test_set, shots)
        ]
        assert len(found) == 1, (arg, train_set, test_set, shots)
        for metric, value in expected.items():
            assert found[0]["metrics"][metric] == value, (arg, train_set, test_set, metric)


def test_reported_records_follow_the_variant():
    _, default = _records("acd_clip")
    assert {r["when"]["model.n_groups"] for r in default} == {4}
    _, two = _records("acd_clip", "n_groups=2")
    mvtec = next(r for r in two if r["test_set"] == "mvtec_ad")
    assert mvtec["metrics"]["pixel_AUROC"] == 91.7 and mvtec["source"] == "paper Table 1, N = 2"
    _, ablation = _records("dlvp_clip", "ablation=baseline")
    assert {r["test_set"]: r["metrics"]["image_AUROC"] for r in ablation} == {
        "mvtec_ad": 89.5, "visa": 84.2}  # fmt: skip
    _, top_k = _records("dlvp_clip", "top_k=2")
    assert [(r["test_set"], r["metrics"]) for r in top_k] == [
        ("mvtec_ad", {"image_AUROC": 92.4}), ("visa", {"image_AUROC": 85.7})]  # fmt: skip
    module, af = _records("af_clip")
    assert {r["aupro_method"] for r in af} == {"af_clip"}
    assert not hasattr(module, "SELECT_ON_TEST")
    assert importlib.import_module("configs.ava_dino").SELECT_ON_TEST == ("pixel_AUROC",)


def test_malformed_records_are_refused():
    good = {"train_set": "visa", "test_set": "mvtec_ad", "metrics": {"image_AUROC": 90.0},
            "source": "x"}  # fmt: skip
    assert rep.check_records([good], "t")[0]["shots"] == 0
    for bad, message in [
        ({**good, "metrics": {"I-AUROC": 90.0}}, "'I-AUROC' is not one of"),
        ({**good, "metrics": {"image_AUROC": 0.9e3}}, "is not a % value"),
        ({k: v for k, v in good.items() if k != "source"}, r"missing fields \['source'\]"),
        ({**good, "note": 1}, r"unknown fields \['note'\]"),
        ({**good, "aupro_method": "mine"}, "aupro_method 'mine'"),
    ]:
        with pytest.raises(ValueError, match=message):
            rep.check_records([bad], "t")


# ----------------------------------------------------------------------------------------------
# AF-CLIP's masks (the numbers quoted in configs/af_clip.py).


_IDX = np.arange(37) * 14 + 6


def _bilinear_37(x):
    """torch's F.interpolate(size=37, bilinear, align_corners=False) from 518: at this scale the
    mean of the 2 x 2 pixels at rows/cols 14 i + 6, 14 i + 7 (checked against resize_bilinear)."""
    rows = x[_IDX] + x[_IDX + 1]
    return (rows[:, _IDX] + rows[:, _IDX + 1]) / 4


def _official_targets(mask):
    """main.py: the 0/255 mask Resize(518, BICUBIC) -> ToTensor (soft), bilinear to 37 x 37, then
    < 0.5 -> 0, > 0.5 -> 1 (exact 0.5 stays)."""
    soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (518, 518), Image.Resampling.BICUBIC)).astype(np.float32) / np.float32(255)  # fmt: skip
    grid = _bilinear_37(soft)
    out = grid.copy()
    out[grid < 0.5], out[grid > 0.5] = 0.0, 1.0
    return out


def _our_targets(mask, mode="nearest"):
    """The pipeline's binary 518 mask, then AF-CLIP's patch_targets (bilinear, >= 0.5)."""
    return (_bilinear_37(transforms.resize_mask(mask, 518, mode)) >= 0.5).astype(np.float32)


def _random_ellipse(rng, radii=(0.03, 0.25)):
    size = int(rng.choice([700, 900, 1024]))
    ry, rx = rng.uniform(*radii, 2) * size
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    angle = rng.uniform(0, np.pi)
    y, x = np.ogrid[:size, :size]
    y, x = y + 0.5 - cy, x + 0.5 - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x * c + y * s) / rx, (-x * s + y * c) / ry
    return u * u + v * v <= 1.0


@pytest.mark.slow
def test_af_clip_training_targets_differ_from_the_official_soft_ones():
    """Binary training masks flip some of the 37 x 37 patch targets along the boundary, not only
    exact 0.5 ties; test masks: nearest differs from the official bicubic > 0.5 on ~0.2 % of the
    mask pixels."""
    rng = np.random.default_rng(0)
    sample = rng.random((518, 518)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(sample)[None], (37, 37)))[0],
                               _bilinear_37(sample), atol=1e-6)  # fmt: skip
    flipped = positives = ties = with_flip = 0
    worst = 0.0
    for _ in range(200):
        mask = _random_ellipse(rng)
        official, ours = _official_targets(mask), _our_targets(mask)
        d = int((official != ours).sum())
        flipped, positives = flipped + d, positives + int((official == 1).sum())
        ties += int((official == 0.5).sum())
        with_flip += d > 0
        worst = max(worst, d / max(1, int((official == 1).sum())))
    # The numbers quoted in configs/af_clip.py (this seed): 48 % of the masks, 0.66 patches per
    # mask, 0.82 % of the official positive patches, at most 9.5 % of one mask's, 4 exact ties.
    assert with_flip == 96 and flipped == 131 and ties == 4
    assert flipped / positives == pytest.approx(0.0082, abs=1e-4)
    assert worst == pytest.approx(0.095, abs=1e-3)
    small_flipped = small_positives = 0
    for _ in range(100):  # radii 1-3 % of the side: 5.4 % of their positive patches
        mask = _random_ellipse(rng, (0.01, 0.03))
        official, ours = _official_targets(mask), _our_targets(mask)
        small_flipped += int((official != ours).sum())
        small_positives += int((official == 1).sum())
    assert (small_flipped, small_positives) == (9, 167)
    pixels = differ = 0
    for _ in range(50):
        mask = _random_ellipse(rng)
        near, official = (transforms.resize_mask(mask, 518, m)
                          for m in ("nearest", "bicubic_threshold"))  # fmt: skip
        differ, pixels = differ + int((near != official).sum()), pixels + int(official.sum())
    assert differ / pixels == pytest.approx(0.0024, abs=1e-4)
