"""The TFDS array_record builder: built from a tiny MVTec tree without TensorFlow, read back."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from toys import run_module

from zsad_jax.data import pipeline, protocol, sources, tfds_builder
from zsad_jax.data.decode import load_record
from zsad_jax.data.transforms import make_transform

SIZE = 16  # stored side of the resized layout, and the transforms' output side


def _write_mvtec_tree(root: str) -> None:
    """Two categories in the MVTec-AD layout; sizes and formats vary (RGB, grayscale, palette)."""
    rng = np.random.default_rng(0)
    shapes = {"bottle": (21, 19), "wood": (18, 24)}
    for category, (height, width) in shapes.items():
        folders = [("train", "good", 3), ("test", "good", 2), ("test", "crack", 2)]
        for split, defect, count in folders + [("test", "hole", 1)]:
            os.makedirs(os.path.join(root, category, split, defect))
            for i in range(count):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")  # load_record replicates it to RGB
                elif i == 2:
                    image = image.convert("P")  # mapped through its palette
                image.save(os.path.join(root, category, split, defect, f"{i:03d}.png"))
                if defect != "good":
                    mask_dir = os.path.join(root, category, "ground_truth", defect)
                    os.makedirs(mask_dir, exist_ok=True)
                    mask = (rng.random((height, width)) > 0.8).astype(np.uint8) * 255
                    Image.fromarray(mask).save(os.path.join(mask_dir, f"{i:03d}_mask.png"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    manual_dir = str(tmp_path_factory.mktemp("mvtec_manual"))
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    _write_mvtec_tree(manual_dir)
    png_name = tfds_builder.build("mvtec_ad", manual_dir, data_dir)
    resized_name = tfds_builder.build("mvtec_ad", manual_dir, data_dir, image_size=SIZE)
    return manual_dir, data_dir, png_name, resized_name


def _assert_no_tensorflow():
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None  # built and read with TF absent


def _assert_batches_equal(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("split", ["train", "test"])
def test_original_size_layout_reads_back_the_reader_arrays(built, split):
    manual_dir, data_dir, name, _ = built
    assert name == "zsad_anomaly/mvtec_ad"
    records = protocol.read_dataset("mvtec_ad", manual_dir, split)
    data_source = tfds.data_source(name, data_dir=data_dir, split=split)
    assert len(data_source) == len(records)
    raw = data_source[0]
    assert raw["image"].dtype == np.uint8 and raw["image"].ndim == 1  # PNG bytes as a uint8 Tensor
    source = tfds_builder.TfdsSource(name, data_dir, split)
    assert source.class_names == tuple(protocol.category_names(records))
    for index, record in enumerate(records):
        direct, stored = load_record(record), source.load(index)
        for key in ("image", "gt_mask", "has_mask", "gt_label", "category"):
            np.testing.assert_array_equal(stored[key], direct[key], err_msg=f"{key} of {index}")
        assert stored["gt_mask"].dtype == bool and stored["image"].dtype == np.uint8
        assert stored["path"] == os.path.relpath(record.path, manual_dir)
        assert data_source[index]["defect_type"].decode() == record.defect_type
    if split == "test":
        assert any(source.load(i)["gt_mask"].any() for i in range(len(source)))
    _assert_no_tensorflow()


def test_resized_layout_matches_pillow_resize_of_the_reader_arrays(built):
    manual_dir, data_dir, _, name = built
    assert name == f"zsad_anomaly/mvtec_ad_{SIZE}_bicubic"
    records = protocol.read_dataset("mvtec_ad", manual_dir, "test")
    data_source = tfds.data_source(name, data_dir=data_dir, split="test")
    for index, record in enumerate(records):
        direct, stored = load_record(record), data_source[index]
        expected_image = Image.fromarray(direct["image"]).resize((SIZE, SIZE), Image.BICUBIC)
        np.testing.assert_array_equal(stored["image"], np.asarray(expected_image))
        expected_mask = Image.fromarray(direct["gt_mask"].astype(np.uint8) * 255).resize(
            (SIZE, SIZE), Image.NEAREST
        )
        np.testing.assert_array_equal(stored["gt_mask"], np.asarray(expected_mask) > 0)
    _assert_no_tensorflow()


@pytest.mark.parametrize("layout", ["original", "resized"])
def test_pipeline_batches_from_tfds_equal_batches_from_files(built, layout):
    manual_dir, data_dir, png_name, resized_name = built
    name = png_name if layout == "original" else resized_name
    records = protocol.read_dataset("mvtec_ad", manual_dir, "test")
    files = pipeline.RecordSource(records)
    stored = tfds_builder.TfdsSource(name, data_dir, "test")
    layout_kwargs = dict(process_index=0, process_count=1)

    evaluate = make_transform("clip", SIZE)
    _assert_batches_equal(
        list(pipeline.eval_batches(files, batch_size=4, transform=evaluate, **layout_kwargs)),
        list(pipeline.eval_batches(stored, batch_size=4, transform=evaluate, **layout_kwargs)),
    )
    # A random training transform: equal pixels also mean equal per-example RNG streams. Its noise
    # and colour jitter act on the full-size image before resizing (as ACD-CLIP's code does), so
    # only the original-size layout can reproduce it; the resized one is checked resize-first.
    if layout == "original":
        augment = make_transform("acd_clip_train", SIZE, train=True)
    else:
        augment = make_transform("clip", SIZE)
    train = dict(global_batch=4, seed=3, transform=augment, num_epochs=2, **layout_kwargs)
    _assert_batches_equal(
        list(pipeline.train_iterator(files, **train)),
        list(pipeline.train_iterator(stored, **train)),
    )
    _assert_no_tensorflow()


def test_source_survives_pickling_for_worker_processes(built):
    _, data_dir, name, _ = built
    source = tfds_builder.TfdsSource(name, data_dir, "test")
    first = source.load(1)
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy.load(1)["image"], first["image"])
    assert copy.class_names == source.class_names


def test_config_errors_are_explained(built, tmp_path):
    manual_dir, data_dir, _, _ = built
    with pytest.raises(ValueError, match="unknown resample"):
        tfds_builder.make_config("mvtec_ad", image_size=8, resample="lanczos9")
    with pytest.raises(ValueError, match="predefined with different settings"):
        tfds_builder.build("mvtec_ad", manual_dir, data_dir, image_size=8, name="visa")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        tfds_builder.build("mvtec_ad", str(tmp_path / "absent"), data_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: download mvtec_ad there first"):
        tfds_builder.build("mvtec_ad", str(tmp_path / "empty"), str(tmp_path / "tfds_empty"))
    assert not (tmp_path / "tfds_empty").exists()  # refused before TFDS made any folder


def test_command_line_builds_and_prints_the_name(built, capsys):
    manual_dir, data_dir, _, _ = built
    argv = ["--dataset", "mvtec_ad", "--manual_dir", manual_dir, "--data_dir", data_dir]
    tfds_builder.main(argv + ["--image_size", "8", "--resample", "nearest"])
    name = capsys.readouterr().out.strip().splitlines()[-1]
    assert name == "zsad_anomaly/mvtec_ad_8_nearest"
    record = tfds.data_source(name, data_dir=data_dir, split="train")[0]
    assert record["image"].shape == (8, 8, 3)


def test_command_line_refusal_is_one_line(tmp_path):
    """The README's command with no download at --manual_dir: one line ``error: ...``, exit 1."""
    argv = ["--dataset", "mvtec_ad", "--manual_dir", str(tmp_path / "absent")]
    proc = run_module("zsad_jax.data.tfds_builder", [*argv, "--data_dir", "gs://BUCKET"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: manual_dir {tmp_path / 'absent'} is not a directory: download mvtec_ad there first"
    ]


def test_unknown_dataset_is_refused_in_one_line_before_any_folder_is_made(tmp_path):
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "file.png").touch()
    argv = ["--dataset", "mvtec", "--manual_dir", "download", "--data_dir", "tfds"]
    proc = run_module("zsad_jax.data.tfds_builder", argv, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    known = sorted(protocol.READERS)
    assert proc.stderr.strip().splitlines() == [
        f"error: unknown dataset 'mvtec'; known datasets: {known}"
    ]
    assert not (tmp_path / "tfds").exists()


def test_config_reads_the_same_split_from_tfds_as_from_files(built):
    manual_dir, data_dir, png_name, _ = built
    assert png_name == "zsad_anomaly/mvtec_ad"  # the name split_source derives from the dataset
    data = ml_collections.ConfigDict(
        {"test_set": "mvtec_ad", "test_root": manual_dir, "test_split": "test",
         "test_categories": (), "tfds_dir": None}
    )  # fmt: skip
    files = sources.split_source(data, "test")
    data.tfds_dir = data_dir
    stored = sources.split_source(data, "test")
    assert isinstance(stored, tfds_builder.TfdsSource)
    assert len(stored) == len(files) and stored.class_names == files.class_names
    for i in range(len(files)):
        a, b = files.load(i), stored.load(i)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["gt_mask"], b["gt_mask"])
    data.test_categories = ("bottle",)
    with pytest.raises(ValueError, match="config.data.test_categories"):
        sources.split_source(data, "test")
