"""zsad_jax.predict: users' own images in, maps, overlays and decisions out.

On a checkpoint of the placeholder ``ToyDetector`` (tests/toys.py) trained for two steps:
scores equal a direct NumPy forward, the saved maps equal an independent bilinear resize back to
each image's size, labels apply the stored threshold (or ``--threshold``); grayscale, RGBA, palette,
16-bit and JPEG inputs load; bad paths, corrupt files and a missing checkpoint fail with messages
naming them; the StableHLO export deserialises and reproduces the model. End to end with AF-CLIP
(tiny random backbone): train 2 steps on the synthetic benchmark (the final held-out evaluation
through zsad_jax.evaluate stores the threshold), evaluate and predict from that checkpoint, and the
few-shot AF-CLIP+ mode with a reference folder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from toys import CATEGORIES, ToyDetector, toy_config, toy_numpy_forward, trained_toy_config

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import evaluate as eval_lib
from zsad_jax import predict as predict_lib
from zsad_jax import train as train_lib
from zsad_jax.data import decode, synthetic, transforms

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.63  # between the random-looking images (about 0.60) and those with colour (0.66)
# The placeholder's checkpoints name test code (config.method="toys:ToyDetector").
TRUST = {"allow_custom_code": True}


def bilinear_upsample(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear enlargement, edges clamped (written out, for comparison)."""

    def axis_weights(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis_weights(x.shape[0], height)
    c0, c1, fc = axis_weights(x.shape[1], width)
    rows = x[r0] * (1 - fr)[:, None] + x[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A placeholder training run (2 steps), with an image threshold stored in its checkpoint."""
    workdir = tmp_path_factory.mktemp("toy_run")
    config = trained_toy_config()
    model = ToyDetector(config, rngs=nnx.Rngs(config.seed))
    train_lib.train(config, workdir, model=model, evaluator=None, progress=False)
    ckpt_lib.save_threshold(workdir, THRESHOLD)
    return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One file per input kind, larger than the 16 px model input and not square."""
    folder = tmp_path_factory.mktemp("images")
    r = np.random.default_rng(0)
    rgb = r.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rgb[5:15, 10:20] = 5  # a dark patch: the placeholder calls dark pixels anomalous
    paths = {
        "rgb": folder / "shop" / "rgb.png",
        "gray": folder / "shop" / "sub" / "gray.jpg",
        "rgba": folder / "shop" / "rgba.png",
        "palette": folder / "shop" / "palette.gif",
        "gray16": folder / "scan16.png",
    }
    paths["rgb"].parent.mkdir(parents=True)
    paths["gray"].parent.mkdir(parents=True)
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(r.integers(0, 256, (50, 20), dtype=np.uint8), "L").save(paths["gray"])
    rgba = np.concatenate([rgb, r.integers(0, 256, (30, 40, 1), dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(paths["rgba"])
    Image.fromarray(rgb).convert("P").save(paths["palette"])
    gray16 = (r.integers(0, 65536, (24, 33))).astype(np.uint16)
    Image.fromarray(gray16).save(paths["gray16"])  # mode I;16
    assert Image.open(paths["gray16"]).mode.startswith("I")
    return paths


def test_predictions_equal_a_direct_forward_and_apply_the_stored_threshold(
    toy_run, images, tmp_path
):
    out = tmp_path / "pred"
    result = predict_lib.run(
        [str(images["rgb"].parent), str(images["gray16"])],
        checkpoint=str(toy_run),
        **TRUST,
        out=out,
    )
    model, config, threshold = ckpt_lib.load_for_inference(toy_run, **TRUST)
    assert threshold == THRESHOLD and result["threshold"] == THRESHOLD
    records = result["predictions"]
    assert len(records) == 5
    lines = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [line["path"] for line in lines] == [r["path"] for r in records]
    labels = set()
    for line in lines:
        image = decode.load_image(line["path"])
        height, width = image.shape[:2]
        small, score = toy_numpy_forward(model, predict_lib.preprocess(image, config))
        assert line["pred_score"] == pytest.approx(score, abs=2e-6)
        assert line["pred_label"] == int(line["pred_score"] >= THRESHOLD)
        labels.add(line["pred_label"])
        amap = np.load(line["anomaly_map"])
        assert amap.dtype == np.float32 and amap.shape == (height, width)
        np.testing.assert_allclose(amap, bilinear_upsample(small, height, width), atol=2e-6)
        overlay = Image.open(line["overlay"])
        assert overlay.size == (width, height) and overlay.mode == "RGB"
        assert (line["width"], line["height"]) == (width, height)
    assert labels == {0, 1}  # the threshold splits these images
    # Folder inputs keep their structure, prefixed with the folder's name.
    assert (out / "shop" / "sub" / "gray.npy").is_file() and (out / "scan16_overlay.png").is_file()

    override = predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), out=tmp_path / "o",
                               threshold=2.0, **TRUST)  # fmt: skip
    assert override["predictions"][0]["pred_label"] == 0 and override["threshold"] == 2.0


def test_evaluate_stores_its_threshold_for_predict(toy_run, images, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(toy_run, run_dir)
    bench = synthetic.generate(str(tmp_path / "bench"), image_size=48, n_train_good=0,
                               n_test_good=4, n_test_defect=5, categories=CATEGORIES)  # fmt: skip
    config = toy_config(bench)  # the stored config with a test set
    config.model.random_init = False
    result = eval_lib.run(workdir=tmp_path / "eval", checkpoint=str(run_dir), config=config,
                          progress=False, store_threshold=True, **TRUST)  # fmt: skip
    assert result["threshold"] != THRESHOLD
    assert ckpt_lib.read_meta(run_dir)["threshold"] == result["threshold"]
    info = json.load(open(tmp_path / "eval" / "run.json"))
    assert info["stored_threshold"] == THRESHOLD and info["step"] == 2
    assert info["checkpoint"] == str((run_dir / "checkpoints" / "2").absolute())
    predicted = predict_lib.run(
        [str(images["rgb"])], checkpoint=str(run_dir), **TRUST, out=tmp_path / "p"
    )
    assert predicted["threshold"] == result["threshold"]


def test_bad_inputs_fail_naming_the_file(toy_run, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        predict_lib.run(
            [str(tmp_path / "nowhere.png")], checkpoint=str(toy_run), **TRUST, out=tmp_path
        )
    with pytest.raises(FileNotFoundError, match="no_run"):
        predict_lib.run([str(images["rgb"])], checkpoint=str(tmp_path / "no_run"), out=tmp_path)
    corrupt = tmp_path / "in" / "broken.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "in" / "ok.png")
    with pytest.raises(decode.DataError, match="broken.png"):
        predict_lib.run([str(corrupt.parent)], checkpoint=str(toy_run), **TRUST, out=tmp_path / "a")
    skipped = predict_lib.run([str(corrupt.parent)], checkpoint=str(toy_run), **TRUST,
                              out=tmp_path / "b", skip_corrupt=True)["predictions"]  # fmt: skip
    assert [("error" in r, Path(r["path"]).name) for r in skipped] == [
        (True, "broken.png"),
        (False, "ok.png"),
    ]


class ZeroShotOnly(ToyDetector):
    build_memory = None  # a method without a few-shot mode


def test_reference_folder_fills_the_memory_bank_and_methods_without_one_refuse(
    toy_run, images, tmp_path, capsys, monkeypatch
):
    reference = images["rgb"].parent / "sub"  # one normal image: gray.jpg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note for the user, not a Python warning
        result = predict_lib.run(
            [str(images["rgb"])],
            checkpoint=str(toy_run),
            **TRUST,
            out=tmp_path,
            reference=str(reference),
        )
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith("note: --reference: ") and "does not apply to few-shot scores" in note
    assert result["predictions"][0]["pred_label"] is None
    model, config, _ = ckpt_lib.load_for_inference(toy_run, **TRUST)
    refs = predict_lib.preprocess(decode.load_image(str(images["gray"])), config)[None]
    image = predict_lib.preprocess(decode.load_image(str(images["rgb"])), config)
    _, score = toy_numpy_forward(model, image, refs)
    assert result["predictions"][0]["pred_score"] == pytest.approx(score, abs=2e-6)
    assert score != pytest.approx(toy_numpy_forward(model, image)[1], abs=1e-3)

    plain = ZeroShotOnly(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no few-shot memory bank"):
        predict_lib.build_reference_memory(plain, config, reference)
    # Through run, the refusal alone: no note about a threshold that would not be used anyway.
    monkeypatch.setattr(ToyDetector, "build_memory", None)
    with pytest.raises(ValueError, match="no few-shot memory bank"):
        predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), **TRUST,
                        out=tmp_path / "zero", reference=str(reference))  # fmt: skip
    assert capsys.readouterr().err == ""


def test_export_deserialises_and_reproduces_the_model(toy_run, tmp_path):
    model, config, threshold = ckpt_lib.load_for_inference(toy_run, **TRUST)
    files = predict_lib.export_inference(
        model, config, tmp_path / "toy.stablehlo", batch_size=3, threshold=threshold
    )
    run, meta = predict_lib.load_exported(files["stablehlo"])
    assert meta["image_size"] == 16 and meta["batch_size"] == 3 and meta["threshold"] == THRESHOLD
    images = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
    maps, scores = run(images)
    want = model({"image": images}, train=False)
    np.testing.assert_allclose(np.asarray(maps), np.asarray(want["anomaly_map"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want["pred_score"]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.stablehlo"):
        predict_lib.load_exported(tmp_path / "missing.stablehlo")


@pytest.mark.slow
def test_command_prints_one_json_line_per_image(toy_run, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "zsad_jax.predict", f"--checkpoint={toy_run}", "--allow_custom_code",
         f"--out={tmp_path / 'cli'}", str(images["gray"]), str(images["rgba"])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["gray.jpg", "rgba.png"]
    assert all(line["pred_label"] in (0, 1) and line["threshold"] == THRESHOLD for line in lines)
    assert "scored 2 images" in proc.stderr


# ----------------------------------------------------------------------------------------------
# End to end with a real method.


@pytest.mark.slow
def test_af_clip_train_evaluate_predict_and_few_shot(tmp_path):
    from configs import af_clip

    bench = synthetic.generate(str(tmp_path / "bench"), image_size=48, n_train_good=2,
                               n_test_good=3, n_test_defect=5, categories=CATEGORIES)  # fmt: skip
    config = af_clip.get_config("tiny")
    config.data.update({"train_set": "mvtec_ad", "train_root": bench, "categories": CATEGORIES,
                        "test_set": "mvtec_ad", "test_root": bench,
                        "test_categories": CATEGORIES})  # fmt: skip
    config.optim.steps = 2
    config.ckpt.every_steps = 0
    config.mesh.data = 1  # one device: sharding is proven on the placeholder; compiles faster
    run_dir = tmp_path / "run"
    trained = train_lib.train(config, run_dir, progress=False)  # default evaluator: ours
    assert trained["steps"] == 2 and math.isfinite(trained["loss"]) and trained["bad_steps"] == 0
    assert (run_dir / "checkpoints").is_dir()
    for metric in eval_lib.METRIC_NAMES:
        assert 0.0 <= trained[metric] <= 1.0
    threshold = ckpt_lib.read_meta(run_dir)["threshold"]
    assert threshold == pytest.approx(trained["threshold"])

    model, loaded, _ = ckpt_lib.load_for_inference(run_dir)
    result = eval_lib.run(workdir=tmp_path / "eval", checkpoint=str(run_dir), progress=False)
    assert result["image_AUROC"] == pytest.approx(trained["image_AUROC"], abs=1e-6)
    assert (tmp_path / "eval" / "metrics.md").is_file()

    good = [str(p) for p in sorted(Path(bench, "wood", "test", "good").glob("*.png"))]
    reference = Path(bench, "wood", "train", "good")
    unlabelled = predict_lib.run(good[:1], checkpoint=str(run_dir), out=tmp_path / "fs0",
                                 reference=str(reference))  # fmt: skip
    assert unlabelled["predictions"][0]["pred_label"] is None and unlabelled["threshold"] is None
    few_shot = predict_lib.run(good[:2], checkpoint=str(run_dir), out=tmp_path / "fs",
                               reference=str(reference), threshold=0.5)  # fmt: skip
    # AF-CLIP+ through the exported function: the memory of the same two normal images, the
    # same inputs (a separately traced forward of the model).
    memory = predict_lib.build_reference_memory(model, loaded, reference)
    assert memory.shape[1] == 2 * (32 // 4) ** 2  # two images x an 8 x 8 grid
    from zsad_jax.data import transforms

    transform = transforms.make_transform("clip", 32)
    batch = np.stack([transform(decode.load_record(_record(p)))["image"] for p in good[:2]])
    # Lowered for CPU and CUDA at once (one file for either server); it runs here on CPU.
    files = predict_lib.export_inference(model, loaded, tmp_path / "af.stablehlo", batch_size=2,
                                         memory=memory, platforms=("cpu", "cuda"))  # fmt: skip
    run, meta = predict_lib.load_exported(files["stablehlo"])
    maps, scores = (np.asarray(x) for x in run(batch))
    assert meta["few_shot"] and maps.shape == (2, 32, 32) and meta["platforms"] == ["cpu", "cuda"]
    got = [r["pred_score"] for r in few_shot["predictions"]]
    np.testing.assert_allclose(got, scores, atol=1e-5)
    for r, small in zip(few_shot["predictions"], maps, strict=True):
        assert r["pred_label"] == int(r["pred_score"] >= 0.5)
        np.testing.assert_allclose(np.load(r["anomaly_map"]), bilinear_upsample(small, 48, 48),
                                   atol=1e-5)  # fmt: skip


def _record(path: str):
    from zsad_jax.data.records import Record

    return Record(path=path, category="wood", gt_label=0, has_mask=True)


def test_overlay_colours_blend_and_outline():
    from zsad_jax import visualize

    # The jet ramp: dark blue at 0, green at 1/2, dark red at 1 (the classic MATLAB jet ramp).
    np.testing.assert_array_equal(
        visualize.jet_colors(np.array([0.0, 0.5, 1.0, 2.0])),
        [[0, 0, 128], [128, 255, 128], [128, 0, 0], [128, 0, 0]],
    )
    image = np.full((6, 8, 3), 100, np.uint8)
    amap = np.ones((3, 4), np.float32)  # resized to the image
    np.testing.assert_array_equal(visualize.heatmap_overlay(image, amap, alpha=0.0), image)
    red = visualize.heatmap_overlay(image, amap, alpha=0.5)
    np.testing.assert_array_equal(red[0, 0], [114, 50, 50])  # (100 + 128) / 2, 100 / 2, 100 / 2
    mask = np.zeros((6, 8), bool)
    mask[1:5, 2:6] = True
    outlined = visualize.heatmap_overlay(image, amap, mask=mask)
    assert (outlined[1, 2] == 255).all() and not (outlined[2, 3] == 255).all()
    assert visualize.panel(image, amap, mask=mask, annotate=False).shape == (6, 24, 3)
    ramp = np.linspace(0.1, 0.2, 8, dtype=np.float32)[None].repeat(6, 0)
    tiles = visualize.panel(image, ramp, relative=True, alpha=1.0, annotate=False)
    assert tiles.shape == (6, 24, 3)  # relative: the ramp's ends become dark blue and dark red
    np.testing.assert_array_equal(tiles[0, 16], [0, 0, 128])
    np.testing.assert_array_equal(tiles[0, 23], [128, 0, 0])


# ----------------------------------------------------------------------------------------------
# Output names, earlier runs, option values, exported file sets.


def _save(path: Path, height: int, width: int, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


def test_files_in_formats_not_decoded_get_a_note_and_a_folder_of_only_those_names_them(
    tmp_path, capsys
):
    _save(tmp_path / "scans" / "a.png", 4, 4)
    for name in ("b.dcm", "deep/c.dcm", "d.heic", "e.txt"):
        (tmp_path / "scans" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "scans" / name).touch()
    assert [Path(f).name for f, _ in predict_lib.collect_images([tmp_path / "scans"])] == ["a.png"]
    assert capsys.readouterr().err.splitlines() == [
        "note: 3 files in a format not decoded here (2 .dcm, 1 .heic) were not read; convert to "
        "PNG or TIFF to include them (read: .png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp, .gif)"
    ]
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "x.dcm").touch()
    with pytest.raises(FileNotFoundError) as err:
        predict_lib.collect_images([tmp_path / "dicom"])
    assert str(err.value) == (
        f"{tmp_path / 'dicom'}: the folder holds no image files that are read here; 1 file in a "
        "format not decoded here (1 .dcm) was not read; convert to PNG or TIFF to include it "
        "(read: .png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp, .gif)"
    )


def test_output_names_are_unique_case_insensitively_and_follow_the_input_order(tmp_path):
    folder = tmp_path / "f"
    for name in ("a.png", "a.jpg", "a_1.png", "A.png", "a_png.png", "b.png"):
        _save(folder / name, 4, 4)
    single = _save(tmp_path / "single" / "b.png", 4, 4)
    other = _save(tmp_path / "other" / "b.jpg", 4, 4)
    items = predict_lib.collect_images([folder, single, other])
    names = [name for _, name in items]
    # Sorted: A.png a.jpg a.png a_1.png a_png.png b.png; "A", "a", "a" share a stem.
    assert [Path(file).name for file, _ in items[:6]] == [
        "A.png", "a.jpg", "a.png", "a_1.png", "a_png.png", "b.png"
    ]  # fmt: skip
    assert names == [
        "f/A_png", "f/a_jpg", "f/a_png_1", "f/a_1", "f/a_png_2", "f/b", "b_png", "b_jpg"
    ]  # fmt: skip
    assert len({n.casefold() for n in names}) == len(names)
    assert predict_lib.collect_images([folder, single, other]) == items


def test_linked_folders_are_followed_once_and_link_loops_end(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(2):
        _save(data / "good" / f"{i}.png", 4, 4)
    outside = tmp_path / "elsewhere" / "hole"
    for i in range(2):
        _save(outside / f"{i}.png", 4, 4)
    (data / "hole").symlink_to(outside, target_is_directory=True)  # what evaluate's readers read
    (data / "hole_again").symlink_to(outside, target_is_directory=True)  # one folder, walked once
    (data / "good" / "up").symlink_to(data, target_is_directory=True)  # a loop inside
    (outside / "back").symlink_to(outside.parent, target_is_directory=True)  # a loop outside
    _save(data / "masks" / "hole" / "0.png", 4, 4)  # mask folders: still passed over
    items = predict_lib.collect_images([data])
    assert [name for _, name in items] == ["data/good/0", "data/good/1", "data/hole/0",
                                           "data/hole/1"]  # fmt: skip
    assert [file for file, _ in items][2:] == [str(data / "hole" / "0.png"),
                                               str(data / "hole" / "1.png")]  # fmt: skip
    assert capsys.readouterr().err == ""  # no file reached twice, so no duplicate note
    # Every subfolder a link (the report's osym/): scored, not "the folder holds no image files".
    only_links = tmp_path / "only_links"
    only_links.mkdir()
    (only_links / "hole").symlink_to(outside, target_is_directory=True)
    assert [name for _, name in predict_lib.collect_images([only_links])] == [
        "only_links/hole/0", "only_links/hole/1"
    ]  # fmt: skip


def test_the_duplicate_note_lists_each_file_once_with_how_often_it_was_given(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    photo = _save(tmp_path / "in" / "a.png", 4, 4)
    _save(tmp_path / "in" / "b.png", 4, 4)
    (tmp_path / "link_a.png").symlink_to(photo)
    given = ["in/a.png", "./in/a.png", str(tmp_path / "link_a.png"), "in", "in/b.png"]
    assert [file for file, _ in predict_lib.collect_images(given)] == ["in/a.png", "in/b.png"]
    (note,) = capsys.readouterr().err.splitlines()
    # 3 more of a.png and 1 more of b.png: the count is what the list adds up to.
    assert note == (
        "note: 4 duplicate inputs dropped (files given more than once: in/a.png 4 times, "
        "in/b.png 2 times); each file is scored once"
    )


def test_a_file_given_twice_is_scored_once_and_a_note_says_so(
    toy_run, tmp_path, capsys, monkeypatch
):
    photo = _save(tmp_path / "in" / "photo.jpg", 12, 10, value=40)
    _save(tmp_path / "in" / "other.png", 8, 8)
    monkeypatch.chdir(tmp_path)  # the spellings a user types: the same file three times
    given = ["in/photo.jpg", "in/photo.jpg", "./in/photo.jpg", str(photo), "in"]
    result = predict_lib.run(given, checkpoint=str(toy_run), **TRUST, out="pred")
    assert [r["path"] for r in result["predictions"]] == ["in/photo.jpg", "in/other.png"]
    assert sorted(p.name for p in Path("pred").rglob("*.npy")) == ["other.npy", "photo.npy"]
    (note,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: ")]
    assert note.startswith("note: 4 duplicate inputs dropped (files given more than once: "
                           "in/photo.jpg 5 times)")  # fmt: skip


def test_inputs_sharing_a_stem_get_their_own_outputs(toy_run, tmp_path):
    sizes = {"a.png": (20, 30), "a.jpg": (24, 18), "a_1.png": (16, 40)}
    for name, (height, width) in sizes.items():
        _save(tmp_path / "in" / name, height, width, value=40)
    out = tmp_path / "out"
    records = predict_lib.run([str(tmp_path / "in")], checkpoint=str(toy_run), **TRUST, out=out)
    records = records["predictions"]
    assert len({r["anomaly_map"] for r in records}) == len({r["overlay"] for r in records}) == 3
    for r in records:  # each map on disk is its own image's, not a later one written over it
        assert np.load(r["anomaly_map"]).shape == sizes[Path(r["path"]).name]
    assert sorted(p.name for p in (out / "in").glob("*.npy")) == ["a_1.npy", "a_jpg.npy",
                                                                  "a_png.npy"]  # fmt: skip


def test_an_earlier_runs_predictions_are_kept_unless_overwrite(toy_run, images, tmp_path):
    out = tmp_path / "pred"
    predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), **TRUST, out=out)
    first = (out / "predictions.jsonl").read_text()
    # Refused before any model is loaded: the checkpoint here does not exist.
    with pytest.raises(FileExistsError, match="--overwrite") as refused:
        predict_lib.run([str(images["gray"])], checkpoint=str(tmp_path / "no_run"), out=out)
    assert "\n" not in str(refused.value) and "predictions.jsonl" in str(refused.value)
    assert (out / "predictions.jsonl").read_text() == first
    predict_lib.run(
        [str(images["gray"])], checkpoint=str(toy_run), **TRUST, out=out, overwrite=True
    )
    lines = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [Path(line["path"]).name for line in lines] == ["gray.jpg"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_overwrite_leaves_only_the_new_runs_outputs_and_the_users_own_files(
    toy_run, images, tmp_path, capsys
):
    out = tmp_path / "pred"
    predict_lib.run([str(images["rgb"].parent)], checkpoint=str(toy_run), **TRUST, out=out)
    assert "shop/sub/gray.npy" in _files(out)  # a nested output, its folder made by the run
    (out / "shop" / "notes.txt").write_text("mine")  # the user's own files: not the run's
    (out / "mine.npy").write_bytes(b"not listed in predictions.jsonl")
    predict_lib.run([str(images["gray16"])], checkpoint=str(toy_run), **TRUST, out=out,
                    overwrite=True)  # fmt: skip
    assert _files(out) == ["mine.npy", "predictions.jsonl", "scan16.npy", "scan16_overlay.png",
                           "shop/notes.txt"]  # fmt: skip
    assert not (out / "shop" / "sub").exists()  # left empty by the removal: removed too
    assert "note: --overwrite: removed the earlier run's predictions.jsonl and the 8 files" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "line 2 is not JSON"),
        ('{"path": "x.png", "pred_score": 0.5}', "line 2 does not name its anomaly_map"),
        ('{"path": "x.png", "anomaly_map": "/elsewhere/x.npy", "overlay": "/elsewhere/x.png"}',
         "line 2 names /elsewhere/x.npy, outside"),
    ],
)  # fmt: skip
def test_overwrite_refuses_when_the_earlier_runs_files_cannot_be_told(
    toy_run, images, tmp_path, line, why
):
    out = tmp_path / "pred"
    predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), **TRUST, out=out)
    jsonl = out / "predictions.jsonl"
    jsonl.write_text(jsonl.read_text() + line + "\n")
    before = _files(out)
    # Refused before any model is loaded: the checkpoint here does not exist.
    with pytest.raises(FileExistsError, match="cannot tell which files") as refused:
        predict_lib.run([str(images["gray"])], checkpoint=str(tmp_path / "no_run"), out=out,
                        overwrite=True)  # fmt: skip
    assert why in str(refused.value) and "\n" not in str(refused.value)
    assert _files(out) == before  # nothing removed


def test_export_refuses_an_existing_export_unless_overwrite(toy_run, tmp_path):
    path = tmp_path / "toy.stablehlo"
    predict_lib.run([], checkpoint=str(toy_run), **TRUST, export=str(path))
    for name in ("toy.stablehlo", "toy.stablehlo.json", "toy.stablehlo.weights.npz"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_text("an earlier export's file")  # any one of the three
        # Refused before any model is loaded: the checkpoint here does not exist.
        with pytest.raises(FileExistsError, match="--overwrite") as refused:
            predict_lib.run([], checkpoint=str(tmp_path / "no_run"),
                            export=str(folder / "toy.stablehlo"))  # fmt: skip
        message = str(refused.value)
        assert message.startswith(f"{folder / name}: ") and "\n" not in message
        assert "another --export path" in message
    predict_lib.run([], checkpoint=str(toy_run), **TRUST, export=str(path), export_batch=2,
                    overwrite=True)  # fmt: skip
    _, meta = predict_lib.load_exported(path)
    assert meta["batch_size"] == 2  # replaced, and the three files still belong together


def test_export_to_a_folder_writes_model_stablehlo_in_it(toy_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = predict_lib.run([], checkpoint=str(toy_run), **TRUST, export="exp_dir/")["export"]
    assert _files(tmp_path) == ["exp_dir/model.stablehlo", "exp_dir/model.stablehlo.json",
                                "exp_dir/model.stablehlo.weights.npz"]  # fmt: skip
    assert files["stablehlo"] == str(Path("exp_dir", "model.stablehlo"))
    _, meta = predict_lib.load_exported("exp_dir")  # an existing folder, no slash: the same
    assert meta["batch_size"] == 1
    with pytest.raises(FileExistsError, match="exp_dir/model.stablehlo"):
        predict_lib.run([], checkpoint="no_run", export="exp_dir")


@pytest.mark.parametrize(
    "option, value",
    [
        ("threshold", float("nan")),
        ("threshold", float("inf")),
        ("threshold", -float("inf")),
        ("batch_size", 0),
        ("batch_size", -2),
        ("export_batch", 0),
        ("shots", -1),
        ("category", ""),
        ("category", "  "),
        ("export_platforms", ["bogus"]),
        ("export_platforms", ["cpu", "gpu"]),  # jax.export's name is cuda (or rocm)
    ],
)
def test_bad_option_values_are_refused_before_loading_a_model(images, tmp_path, option, value):
    # A missing checkpoint: reaching the model loader would raise FileNotFoundError instead.
    with pytest.raises(ValueError, match=f"^--{option}=") as refused:
        predict_lib.run([str(images["rgb"])], checkpoint=str(tmp_path / "no_run"),
                        out=tmp_path / "o", **{option: value})  # fmt: skip
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_command_refuses_bad_values_and_an_earlier_run_in_one_line(images, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "predictions.jsonl").write_text('{"path": "kept.png"}\n')
    for flag, wanted in (
        ("--threshold=nan", "--threshold"),
        (f"--out={out}", "--overwrite"),
        ("--category=", "--category"),
        ("--export_platforms=bogus", "cpu,cuda"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "zsad_jax.predict", f"--checkpoint={tmp_path / 'no_run'}",
             flag, str(images["rgb"])],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and wanted in lines[0], proc.stderr
    assert (out / "predictions.jsonl").read_text() == '{"path": "kept.png"}\n'


@pytest.mark.slow
def test_command_prints_notes_and_says_when_nothing_is_decided(toy_run, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    reference = images["rgb"].parent / "sub"

    def predict(*args):
        return subprocess.run(
            [sys.executable, "-m", "zsad_jax.predict", f"--checkpoint={toy_run}",
             "--allow_custom_code", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    rgb = str(images["rgb"])
    few_shot = predict(f"--reference={reference}", "--out=fs", rgb, rgb)
    assert few_shot.returncode == 0, few_shot.stderr
    assert len(few_shot.stdout.strip().splitlines()) == 1  # the same file twice: scored once
    err = few_shot.stderr.strip().splitlines()
    assert "Warning" not in few_shot.stderr and "predict.py:" not in few_shot.stderr, err
    assert [x.split(":")[1] for x in err if x.startswith("note: ")] == [
        " --reference", " 1 duplicate input dropped (files given more than once"
    ]  # fmt: skip
    assert re.fullmatch(
        r"scored 1 image \(no decisions: no threshold, 0 skipped; score [0-9.e-]+\); outputs in fs",
        err[-1],
    ), err[-1]

    exported = predict("--export=exp_dir/")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exp_dir" / "model.stablehlo.weights.npz").is_file()
    again = predict("--export=exp_dir/")
    (line,) = again.stderr.strip().splitlines()
    assert again.returncode == 1 and line.startswith("error: exp_dir/model.stablehlo: "), line
    assert "--overwrite" in line and "another --export path" in line
    assert predict("--export=exp_dir/", "--overwrite").returncode == 0


@pytest.fixture(scope="module")
def exports(toy_run, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Three exports of the placeholder: batch 3; batch 3 with a memory bank; batch 2."""
    folder = tmp_path_factory.mktemp("exports")
    model, config, threshold = ckpt_lib.load_for_inference(toy_run, **TRUST)
    memory = np.asarray([0.1, 0.2, 0.3], np.float32)
    return {
        "plain": predict_lib.export_inference(model, config, folder / "plain.stablehlo",
                                              batch_size=3, threshold=threshold),
        "memory": predict_lib.export_inference(model, config, folder / "memory.stablehlo",
                                               batch_size=3, memory=memory),
        "batch2": predict_lib.export_inference(model, config, folder / "batch2.stablehlo",
                                               batch_size=2),
    }  # fmt: skip


def _copy_export(files: dict[str, str], folder: Path) -> dict[str, Path]:
    folder.mkdir()
    return {k: Path(shutil.copy(v, folder / Path(v).name)) for k, v in files.items()}


def _refusal(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as refused:
        predict_lib.load_exported(path)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_export_refuses_weights_of_another_export(exports, tmp_path):
    files = _copy_export(exports["plain"], tmp_path / "a")
    predict_lib.load_exported(files["stablehlo"])  # the set as written loads
    shutil.copy(exports["memory"]["weights"], files["weights"])  # one array more
    message = _refusal(files["stablehlo"], "arrays")
    assert message.startswith(str(files["weights"]))

    with np.load(exports["plain"]["weights"]) as archive:
        arrays = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    np.savez(files["weights"], *arrays[:-1], arrays[-1][None])  # same count, a shape differs
    assert _refusal(files["stablehlo"], "shapes or dtypes").startswith(str(files["weights"]))
    np.savez(files["weights"], *arrays[:-1], arrays[-1] + 1)  # same shapes, other values
    assert _refusal(files["stablehlo"], "sha256").startswith(str(files["weights"]))


def test_export_refuses_a_stablehlo_of_another_export_or_a_truncated_one(exports, tmp_path):
    files = _copy_export(exports["plain"], tmp_path / "a")
    shutil.copy(exports["batch2"]["stablehlo"], files["stablehlo"])  # same weights, batch 2
    assert _refusal(files["stablehlo"], "arguments differ").startswith(str(files["stablehlo"]))
    shutil.copy(exports["memory"]["stablehlo"], files["stablehlo"])  # one argument more
    assert _refusal(files["stablehlo"], "arguments differ").startswith(str(files["stablehlo"]))
    data = Path(exports["plain"]["stablehlo"]).read_bytes()
    files["stablehlo"].write_bytes(data[: len(data) // 2])
    message = _refusal(files["stablehlo"], "not a readable jax.export file")
    assert message.startswith(str(files["stablehlo"]))


def test_export_refuses_another_format_tag_and_wrong_input_shapes(exports, tmp_path):
    files = _copy_export(exports["plain"], tmp_path / "a")
    run, meta = predict_lib.load_exported(files["stablehlo"])
    with pytest.raises(ValueError, match=r"\(3, 16, 16, 3\)"):
        run(np.zeros((2, 16, 16, 3), np.float32))
    meta["format"] = "zsad_jax.export/1"
    files["meta"].write_text(json.dumps(meta))
    assert _refusal(files["stablehlo"], "format 'zsad_jax.export/1'").startswith(str(files["meta"]))
    files["meta"].write_text("{not json")
    assert _refusal(files["stablehlo"], "not a readable").startswith(str(files["meta"]))


def test_export_platforms_outside_jax_exports_are_refused_before_any_work(toy_run, tmp_path):
    path = tmp_path / "x.stablehlo"
    # A missing checkpoint: the refusal comes before the model is loaded.
    with pytest.raises(ValueError, match="^--export_platforms=cpu,bogus: ") as refused:
        predict_lib.run([], checkpoint=str(tmp_path / "no_run"), export=str(path),
                        export_platforms=["cpu", "bogus"])  # fmt: skip
    message = str(refused.value)
    assert "'bogus'" in message and "cpu,cuda,rocm,tpu" in message and "\n" not in message
    model, config, _ = ckpt_lib.load_for_inference(toy_run, **TRUST)
    with pytest.raises(ValueError, match="^--export_platforms=bogus: "):  # the library call too
        predict_lib.export_inference(model, config, path, platforms=["bogus"])
    assert list(tmp_path.iterdir()) == []
    files = predict_lib.export_inference(model, config, path, platforms=["cpu"])
    assert predict_lib.load_exported(files["stablehlo"])[1]["platforms"] == ["cpu"]


def test_export_json_names_the_resize_filter_each_transform_uses(toy_run, exports):
    """Rebuilding the input from the .json alone (as a server without zsad_jax would) gives
    predict's input, for every transform; the other filter would not."""
    files = exports["plain"]
    _, meta = predict_lib.load_exported(files["stablehlo"])
    assert meta["transform"] == "plain" and meta["resize"] == "bilinear"
    assert "bilinear filter" in meta["inputs"]
    exported = jax.export.deserialize(bytearray(Path(files["stablehlo"]).read_bytes()))
    with np.load(files["weights"]) as archive:
        weights = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    _, config, _ = ckpt_lib.load_for_inference(toy_run, **TRUST)
    image = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    size = int(config.data.image_size)

    def from_json(meta, resize):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling[resize.upper()])
        x = np.asarray(resized).astype(np.float32) / np.float32(255.0)
        return (x - np.float32(meta["mean"])) / np.float32(meta["std"])

    filters = set()
    for name in transforms.TRANSFORM_NAMES:
        config.data.transform = name
        meta = predict_lib._export_meta(
            config, exported, weights, files["weights"], batch_size=1, threshold=None,
            few_shot=False, category="object",
        )  # fmt: skip
        got = predict_lib.preprocess(image, config)
        np.testing.assert_allclose(got, from_json(meta, meta["resize"]), atol=1e-5, err_msg=name)
        other = "bicubic" if meta["resize"] == "bilinear" else "bilinear"
        assert np.abs(got - from_json(meta, other)).max() > 1e-2, name
        assert f"{meta['resize']} filter" in meta["inputs"]
        filters.add(meta["resize"])
    assert filters == {"bicubic", "bilinear"}


def test_more_shots_than_reference_images_are_refused(toy_run, images, tmp_path, capsys):
    reference = images["rgb"].parent / "sub"  # one image: gray.jpg
    with pytest.raises(ValueError, match="^--shots=3: ") as refused:
        predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), **TRUST, out=tmp_path,
                        reference=str(reference), shots=3)  # fmt: skip
    message = str(refused.value)
    assert f"--reference={reference} holds 1 image, fewer than the 3 shots asked for" in message
    assert "--shots=1 or fewer" in message and "\n" not in message
    result = predict_lib.run([str(images["rgb"])], checkpoint=str(toy_run), **TRUST,
                             out=tmp_path / "ok", reference=str(reference), shots=1)  # fmt: skip
    assert len(result["predictions"]) == 1
    # The config's number is a default: a smaller folder gives all it holds, and says so.
    model, config, _ = ckpt_lib.load_for_inference(toy_run, **TRUST)
    with config.unlocked():
        config.model.few_shot = {"shots": 4}
    capsys.readouterr()
    memory = predict_lib.build_reference_memory(model, config, reference)
    one = predict_lib.build_reference_memory(model, config, reference, shots=1)
    np.testing.assert_array_equal(memory, one)
    assert capsys.readouterr().err == (
        f"note: --reference={reference} holds 1 image, fewer than the config's 4 shots; using all "
        "of them (--shots=N chooses)\n"
    )


def test_the_summary_puts_the_scores_range_beside_the_threshold():
    """A threshold off the scores' scale (--threshold=2 for scores in [0, 1]) shows at a glance."""
    records = [{"pred_score": 0.41, "pred_label": 0}, {"pred_score": 0.77, "pred_label": 0},
               {"path": "bad.png", "error": "cannot decode"}]  # fmt: skip
    assert predict_lib._summary(records, 2.0, "out") == (
        "scored 2 images (0 anomalous, 1 skipped; scores 0.41 to 0.77, threshold 2); outputs in out"
    )
    assert predict_lib._summary(records[2:], None, "out") == (
        "scored 0 images (no decisions: no threshold, 1 skipped); outputs in out"
    )


# ----------------------------------------------------------------------------------------------
# Outputs inside input folders, stopped runs, unusable output paths.


def _lines(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_outputs_inside_an_input_folder_are_not_scored_again(toy_run, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        _save(data / "good" / f"{i}.png", 20, 24, value=40 * i)
    inside = data / "pred"
    assert len(predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=inside)[
        "predictions"]) == 3  # fmt: skip
    capsys.readouterr()
    # Another --out: the earlier run's overlays under data/pred are passed over, with a note.
    again = predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=tmp_path / "o")
    assert sorted(Path(r["path"]).name for r in again["predictions"]) == ["0.png", "1.png", "2.png"]
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: ")]
    assert notes == [f"note: 3 image files in {inside} passed over: the outputs of a predict run "
                     "(its --out, a predictions.jsonl, overlays beside their .npy maps), not "
                     "inputs"]  # fmt: skip
    # The same --out with --overwrite: the earlier outputs go and the three images are scored.
    redo = predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=inside,
                           overwrite=True)["predictions"]  # fmt: skip
    assert [Path(r["path"]).parent.name for r in redo] == ["good"] * 3
    assert len(_lines(inside / "predictions.jsonl")) == 3
    # An --out that is the input folder itself: its overlays beside their maps are passed over.
    predict_lib.run([str(data / "good")], checkpoint=str(toy_run), **TRUST, out=data / "good")
    assert (data / "good" / "good" / "0_overlay.png").is_file()
    third = predict_lib.run([str(data / "good")], checkpoint=str(toy_run), **TRUST,
                            out=tmp_path / "o3")["predictions"]  # fmt: skip
    assert len(third) == 3
    # An input file that --overwrite would remove as an earlier output: refused before loading.
    overlay = str(data / "good" / "good" / "0_overlay.png")
    with pytest.raises(ValueError, match="which --overwrite removes") as refused:
        predict_lib.run([overlay], checkpoint=str(tmp_path / "no_run"), out=data / "good",
                        overwrite=True)  # fmt: skip
    assert str(refused.value).startswith(f"{overlay}: an output of the earlier run in --out=")
    # A folder holding nothing but outputs says so.
    with pytest.raises(FileNotFoundError, match="holds only the outputs of earlier predict runs"):
        predict_lib.collect_images([inside])


def test_a_run_that_fails_at_once_leaves_no_predictions_file(toy_run, tmp_path):
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    with pytest.raises(decode.DataError, match="broken.png"):
        predict_lib.run([str(broken.parent)], checkpoint=str(toy_run), **TRUST, out=out)
    assert not (out / "predictions.jsonl").exists()  # an empty one would refuse the next run
    _save(tmp_path / "ok.png", 20, 20)
    assert predict_lib.run([str(tmp_path / "ok.png")], checkpoint=str(toy_run), **TRUST, out=out)[
        "predictions"]  # fmt: skip


def _interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C (KeyboardInterrupt) at the ``call``-th overlay written."""
    save, calls = predict_lib.visualize.save_png, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(predict_lib.visualize, "save_png", interrupting)


def test_ctrl_c_keeps_the_finished_records_and_marks_them_partial(toy_run, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(20):  # 3 passes of 8 (the 8 test devices)
        _save(data / f"{i:02d}.png", 16, 18, value=10 * i)
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 10)  # the second pass's second image
    with pytest.raises(KeyboardInterrupt) as stopped:
        predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=out, batch_size=8)
    message = (f"interrupted after 8 of 20 images: {out / 'predictions.jsonl'} holds those 8 "
               "(partial); rerun with --overwrite to redo")  # fmt: skip
    assert isinstance(stopped.value, predict_lib.PredictionInterrupted)
    assert str(stopped.value) == message
    assert (out / "INCOMPLETE").read_text() == message + "\n"
    records = _lines(out / "predictions.jsonl")
    assert [Path(r["path"]).name for r in records] == [f"{i:02d}.png" for i in range(8)]
    # The interrupted pass's outputs are gone (no record names them); the recorded ones stay.
    assert sorted(p.name for p in (out / "data").glob("*.npy")) == [
        f"{i:02d}.npy" for i in range(8)
    ]
    monkeypatch.undo()
    with pytest.raises(
        FileExistsError, match=r"partial predictions of a stopped run \(INCOMPLETE\)"
    ):
        predict_lib.run([str(data)], checkpoint=str(tmp_path / "no_run"), out=out)
    predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=out, overwrite=True)
    assert len(_lines(out / "predictions.jsonl")) == 20 and not (out / "INCOMPLETE").exists()
    # Stopped in the first pass: nothing recorded, so no predictions.jsonl and no outputs.
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(predict_lib.PredictionInterrupted, match="before any image was scored"):
        predict_lib.run([str(data)], checkpoint=str(toy_run), **TRUST, out=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()  # made by the run and left empty: removed


@pytest.mark.slow
def test_command_says_in_one_line_how_far_a_ctrl_c_got_and_exits_130(toy_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    for i in range(12):
        _save(tmp_path / "data" / f"{i:02d}.png", 16, 18, value=10 * i)
    # A real SIGINT at the tenth overlay (the second pass of 8). Ctrl-C's handler as in a
    # terminal: a job a shell starts in the background inherits SIGINT ignored, and Python keeps
    # it ignored (the signal would then be lost and the run finish).
    script = (
        "import os, runpy, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from zsad_jax import visualize\n"
        "save, calls = visualize.save_png, []\n"
        "def interrupting(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 10:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return save(*args, **kwargs)\n"
        "visualize.save_png = interrupting\n"
        "runpy.run_module('zsad_jax.predict', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, f"--checkpoint={toy_run}", "--allow_custom_code",
         "--out=out", "--batch_size=8", "data"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: interrupted after 8 of 12 images: out/predictions.jsonl holds those 8 (partial); "
        "rerun with --overwrite to redo"
    )
    assert (
        len(proc.stdout.strip().splitlines()) == 8 and (tmp_path / "out" / "INCOMPLETE").is_file()
    )


def test_an_out_or_export_that_is_a_file_or_unwritable_is_refused_before_loading(
    images, tmp_path, monkeypatch
):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    rgb = [str(images["rgb"])]
    # A missing checkpoint: reaching the model loader would raise FileNotFoundError instead.
    for kwargs, message in (
        ({"out": a_file}, f"--out={a_file}: is a file, not a folder"),
        ({"out": a_file / "sub"}, f"--out={a_file / 'sub'}: {a_file} is a file, not a"),
        (
            {"export": str(a_file / "m.stablehlo")},
            f"--export={a_file / 'm.stablehlo'}: {a_file} is a",
        ),
    ):
        with pytest.raises(ValueError) as refused:
            predict_lib.run(rgb if "out" in kwargs else [], checkpoint=str(tmp_path / "no_run"),
                            **kwargs)  # fmt: skip
        assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
        assert "choose a folder" in str(refused.value)

    # A folder this process may not write in (as root, chmod does not stop writes: the probe is
    # made to fail the way a read-only or immutable folder fails it).
    def not_permitted(self, data):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "write_bytes", not_permitted)
    unwritable = (
        ({"out": tmp_path / "ro" / "pred"}, "--out"),
        ({"export": str(tmp_path / "ro" / "x.stablehlo")}, "--export"),
    )
    for kwargs, flag in unwritable:
        with pytest.raises(ValueError) as refused:
            predict_lib.run(rgb if flag == "--out" else [], checkpoint=str(tmp_path / "no_run"),
                            **kwargs)  # fmt: skip
        given = kwargs.get("out") or kwargs.get("export")
        assert str(refused.value) == (
            f"{flag}={given}: cannot write there (Operation not permitted); choose a writable "
            "folder"
        )
    assert not (tmp_path / "ro").exists()  # nothing made
