"""Users' own data and untrusted files: the ``folder`` reader's traps, config wiring of every reader
and decode option, few-shot references that are never scored, decompression bombs, one list of
image formats.

Every test builds the tree it needs in ``tmp_path`` and states the expected records directly.
"""

from __future__ import annotations

import inspect
import os
import struct
import sys
import time
import warnings
import zlib

import ml_collections
import numpy as np
import PIL.ImageFile
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from PIL import Image
from toys import ToyDetector, toy_config, toy_numpy_forward

from configs.common import base_config
from zsad_jax import evaluate as eval_lib
from zsad_jax.data import decode, pipeline, protocol, readers, sources, transforms
from zsad_jax.data.decode import DataError, load_image, load_record
from zsad_jax.data.protocol import read_dataset
from zsad_jax.data.records import Record

RNG = np.random.default_rng(0)


def _img(path, h=6, w=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _mask(path, h=6, w=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[1:3, 2:5] = 255
    Image.fromarray(m).save(path)
    return str(path)


def _summary(records):
    return [(os.path.basename(r.path), r.defect_type, r.gt_label, r.mask_path, r.has_mask)
            for r in records]  # fmt: skip


# --- 1a/1b: mask folders beside good/ are masks, not defect types --------------------------------


@pytest.mark.parametrize("mask_folder", [*readers.MASK_DIR_NAMES, "Masks", "GT"])
def test_mask_folder_beside_good_is_not_a_defect_and_its_masks_are_found(tmp_path, mask_folder):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    s1 = _img(root / "scratch/s1.png")
    d1 = _img(root / "dent/d1.png")
    m_s1 = _mask(root / mask_folder / "scratch/s1.png")
    m_d1 = _mask(root / mask_folder / "dent/d1_mask.png")
    records = read_dataset("folder", str(root))
    assert {r.defect_type for r in records} == {"good", "scratch", "dent"}
    assert [(r.path, r.mask_path, r.has_mask) for r in records if r.gt_label] == [
        (d1, m_d1, True),
        (s1, m_s1, True),
    ]
    assert len(records) == 3  # the mask files are not images of the dataset


def test_mask_dir_inside_the_root_is_not_a_defect(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    s1 = _img(root / "scratch/s1.png")
    m = _mask(root / "annotations/s1.png")  # flat: today's reader took it for an anomalous image
    records = read_dataset("folder", str(root), mask_dir=str(root / "annotations"))
    assert _summary(records) == [
        ("n1.png", "good", 0, None, True),
        ("s1.png", "scratch", 1, m, True),
    ]
    assert records[1].path == s1


def test_mask_folder_without_any_matching_mask_is_a_naming_mistake(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "scratch/s1.png")
    _img(root / "scratch/s2.png")
    _mask(root / "masks/scratch/mask_of_s1.png")  # wrong naming: the stem must come first
    with pytest.raises(DataError, match=r"no mask found for any of its 2 defect images") as info:
        read_dataset("folder", str(root))
    message = str(info.value)
    assert os.path.join(str(root), "masks", "scratch", "s1.png") in message  # the expected name
    assert "require_masks=False" in message and "\n" not in message
    # Opting out: image-level labels only (the whole category, normals included).
    records = read_dataset("folder", str(root), require_masks=False)
    assert [r.has_mask for r in records] == [False, False, False]


def test_some_masks_missing_names_the_first_image_and_opt_out_keeps_the_rest(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "scratch/s1.png")
    _img(root / "scratch/s2.png")
    m1 = _mask(root / "masks/scratch/s1.png")
    with pytest.raises(DataError, match=r"no mask for defect image .*scratch/s2\.png .*1 of the 2"):
        read_dataset("folder", str(root))
    records = read_dataset("folder", str(root), require_masks=False)
    assert [(r.mask_path, r.has_mask) for r in records if r.gt_label] == [(m1, True), (None, False)]
    # No mask folder at all: image-level data, fine by default, refused when masks are required.
    bare = tmp_path / "bare"
    _img(bare / "good/n1.png")
    _img(bare / "scratch/s1.png")
    assert [r.has_mask for r in read_dataset("folder", str(bare))] == [False, False]
    with pytest.raises(DataError, match=r"require_masks=True but category 'bare'.*no mask folder"):
        read_dataset("folder", str(bare), require_masks=True)


def test_masks_that_match_no_image_get_a_note(tmp_path, capsys):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "scratch/s1.png")
    _img(root / "scratch/s2.png")
    _mask(root / "masks/good/n1.png")  # empty masks of normal images: not a mistake
    _mask(root / "masks/scratch/s1.png")
    stray = _mask(root / "masks/scrach/s2.png")  # a misspelt defect folder
    records = read_dataset("folder", str(root), require_masks=False)
    assert [r.has_mask for r in records if r.gt_label] == [True, False]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: 1 mask file(s) match no image and are not used, e.g. {stray}; a mask is "
        "<mask folder>/<defect>/<image stem>.png (or <stem>_mask.png)"
    ]
    os.remove(stray)
    read_dataset("folder", str(root), require_masks=False)
    assert "note:" not in capsys.readouterr().err


def test_one_flat_mask_matching_two_images_is_refused(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "dent/001.png")
    _img(root / "scratch/001.png")
    _mask(root / "masks/001.png")  # flat: it cannot say which defect it belongs to
    with pytest.raises(DataError, match=r"matches two defect images.*masks/scratch/"):
        read_dataset("folder", str(root))


def test_missing_mask_dir_is_refused(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    with pytest.raises(FileNotFoundError, match=r"mask folder not found: .*nope; .*mask_dir="):
        read_dataset("folder", str(root), mask_dir=str(tmp_path / "nope"))


# --- 1c: MVTec-style own data: ground_truth beside test/ -----------------------------------------


def test_mvtec_style_own_data_finds_ground_truth_beside_the_split(tmp_path):
    root = tmp_path / "mine"
    _img(root / "train/good/t1.png")
    _img(root / "test/good/n1.png")
    c1 = _img(root / "test/crack/000.png")
    m1 = _mask(root / "ground_truth/crack/000_mask.png")
    records = read_dataset("folder", str(root), "test")
    assert [(r.path, r.mask_path, r.category) for r in records if r.gt_label] == [(c1, m1, "mine")]
    assert [r.defect_type for r in read_dataset("folder", str(root), "train")] == ["good"]


def test_mvtec_style_several_categories_find_their_ground_truth(tmp_path):
    expected = []
    for cat in ("cup", "fork"):
        _img(tmp_path / cat / "train/good/t1.png")
        _img(tmp_path / cat / "test/good/n1.png")
        image = _img(tmp_path / cat / "test/bent/000.png")
        expected.append((cat, image, _mask(tmp_path / cat / "ground_truth/bent/000_mask.png")))
    records = read_dataset("folder", str(tmp_path), "test")
    assert [(r.category, r.path, r.mask_path) for r in records if r.gt_label] == expected


# --- 1d: layouts that cannot be understood --------------------------------------------------------


def test_flat_and_split_layout_mixed_is_refused_with_the_tree(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "scratch/s1.png")
    _img(root / "train/good/t1.png")  # a train split beside a flat category: which one is meant?
    with pytest.raises(ValueError, match=r"train has its own 'good/' folder") as info:
        read_dataset("folder", str(root))
    assert "expected layout:" in str(info.value) and "masks/<defect>/" in str(info.value)


def test_flat_masks_in_a_capitalised_mask_folder_are_masks_not_a_defect_type(tmp_path):
    # Masks/ with its masks lying flat was read as a defect type: the masks became anomalous test
    # images and the pixel metrics NaN.
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    s1 = _img(root / "scratch/s1.png")
    m_s1 = _mask(root / "Masks/s1.png")
    records = read_dataset("folder", str(root))
    assert [(r.path, r.defect_type, r.mask_path) for r in records if r.gt_label] == [
        (s1, "scratch", m_s1)
    ]
    assert len(records) == 2


def test_a_normal_folder_in_another_case_is_named_in_the_advice(tmp_path):
    _img(tmp_path / "part/Good/n1.png")
    _img(tmp_path / "part/scratch/s1.png")
    with pytest.raises(ValueError, match=r"normal_dir=Good\n"):
        read_dataset("folder", str(tmp_path / "part"))


def test_no_normal_folder_and_nested_defect_folders_are_refused_with_the_tree(tmp_path):
    root = tmp_path / "part"
    _img(root / "ok/n1.png")
    with pytest.raises(ValueError, match=r"no images found .*normal_dir=NAME\n") as info:
        read_dataset("folder", str(root))
    assert f"  {root}/\n    good/" in str(info.value)
    nested = tmp_path / "nested"
    _img(nested / "good/n1.png")
    _img(nested / "scratch/deep/s1.png")  # images one level too deep would be silently lost
    with pytest.raises(ValueError, match=r"scratch holds no image files .*\['deep'\]"):
        read_dataset("folder", str(nested))


def test_stray_subfolder_of_a_several_category_root_is_refused(tmp_path):
    for cat in ("cup", "fork"):
        _img(tmp_path / cat / "good/n.png")
    _img(tmp_path / "knife/ok/n.png")  # a typo'd normal folder would silently drop the category
    with pytest.raises(ValueError, match=r"subfolders \['knife'\] have no 'good/'"):
        read_dataset("folder", str(tmp_path))
    # Naming the categories to read is fine.
    assert {r.category for r in read_dataset("folder", str(tmp_path), categories=["cup"])} == {
        "cup"
    }


def test_only_the_other_split_present_is_refused(tmp_path):
    _img(tmp_path / "train/good/t.png")
    with pytest.raises(ValueError, match=r"\['train'\] look like split folders.*'test' split"):
        read_dataset("folder", str(tmp_path), "test")


# --- 2: every reader option from the config -------------------------------------------------------


def _data(**overrides) -> ml_collections.ConfigDict:
    data = base_config("test_own_data").data
    data.update(overrides)
    return data


def test_every_config_reader_option_exists_per_side_and_is_a_reader_keyword():
    data = base_config("test_own_data").data
    keywords = set()
    for fn in (readers.read_folder, readers.read_mvtec_layout, readers.read_visa,
               readers.read_meta_json):  # fmt: skip
        keywords |= set(inspect.signature(fn).parameters)
    for option in sources.READER_OPTIONS:
        assert option in keywords
        assert any(option in accepted for accepted in protocol.READER_OPTIONS.values())
        for side in ("train", "test"):
            assert data[f"{side}_{option}"] is None  # neutral: the reader's own default
    assert data.resize_mismatched_mask is False
    assert data.image_max_pixels == decode.DEFAULT_MAX_IMAGE_PIXELS


def test_reader_option_table_matches_the_reader_signatures():
    def keywords(fn):
        params = inspect.signature(fn).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - {"dataset"}

    assert protocol.READER_OPTIONS["folder"] == keywords(readers.read_folder)
    assert protocol.READER_OPTIONS["visa"] == keywords(readers.read_visa)
    assert protocol.READER_OPTIONS["meta_json"] == keywords(readers.read_meta_json)
    for name in ("mvtec_ad", "mpdd", "btad"):
        assert protocol.READER_OPTIONS[name] == keywords(readers.read_mvtec_layout)


def test_command_line_sets_reader_and_decode_options(monkeypatch):
    argv = [
        "prog",
        "--config.data.test_mask_dir=my/masks",
        "--config.data.test_require_masks=False",
        "--config.data.train_normal_dir=ok",
        "--config.data.image_max_pixels=1000",
        "--config.data.resize_mismatched_mask=True",
    ]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the overrides in sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", base_config("x"), flag_values=values)
    values(argv)
    d = values.config.data
    assert (d.test_mask_dir, d.test_require_masks, d.train_normal_dir) == ("my/masks", False, "ok")
    assert (d.image_max_pixels, d.resize_mismatched_mask) == (1000, True)


def test_split_source_passes_the_sides_options_and_names_their_flags(tmp_path):
    root = tmp_path / "part"
    _img(root / "ok/n1.png")
    s1 = _img(root / "scratch/s1.png")
    m1 = _mask(tmp_path / "labels/scratch/s1.png")
    data = _data(test_set="folder", test_root=str(root), test_normal_dir="ok",
                 test_mask_dir=str(tmp_path / "labels"))  # fmt: skip
    source = sources.split_source(data, "test")
    assert [(r.path, r.mask_path) for r in source.records if r.gt_label] == [(s1, m1)]
    assert source.load(1)["gt_mask"].sum() == 6
    # Reader messages name the flag of the side being read.
    os.remove(m1)
    _mask(tmp_path / "labels/scratch/other.png")
    with pytest.raises(DataError, match=r"--config\.data\.test_require_masks=False"):
        sources.split_source(data, "test")
    data.test_require_masks = False
    assert [r.has_mask for r in sources.split_source(data, "test").records] == [False, False]


def test_an_option_the_reader_does_not_take_is_refused_naming_the_key(tmp_path):
    data = _data(test_set="visa", test_root=str(tmp_path), test_mask_dir="masks")
    with pytest.raises(ValueError, match=r"^config\.data\.test_mask_dir='masks' does not apply to "
                       r"the 'visa' reader .*remove --config\.data\.test_mask_dir$"):  # fmt: skip
        sources.split_source(data, "test")
    data = _data(train_set="mvtec_ad", train_root=str(tmp_path), train_csv_path="x.csv")
    with pytest.raises(ValueError, match=r"config\.data\.train_csv_path.*\['normal_dir', "):
        sources.split_source(data, "train")
    with pytest.raises(ValueError, match=r"unknown visa options \['mask_dir'\]"):
        read_dataset("visa", str(tmp_path), mask_dir="m")


def test_btad_keeps_its_normal_folder_when_the_config_sets_none(tmp_path):
    _img(tmp_path / "01/test/ok/0.bmp")
    data = _data(test_set="btad", test_root=str(tmp_path))
    assert [r.defect_type for r in sources.split_source(data, "test").records] == ["good"]


def test_decode_options_reach_load_record_through_the_source(tmp_path):
    root = tmp_path / "part"
    _img(root / "good/n1.png", 6, 8)
    _img(root / "scratch/s1.png", 6, 8)
    _mask(root / "masks/scratch/s1.png", 3, 4)  # half size
    data = _data(test_set="folder", test_root=str(root))
    with pytest.raises(DataError, match=r"set --config\.data\.resize_mismatched_mask=True"):
        sources.split_source(data, "test").load(1)
    data.resize_mismatched_mask = True
    assert sources.split_source(data, "test").load(1)["gt_mask"].shape == (6, 8)
    data.image_max_pixels = 47  # the 8x6 images have 48
    with pytest.raises(DataError, match=r"8x6 = 48 px, more than the limit of 47 px"):
        sources.split_source(data, "test").load(0)
    for bad in (0, decode.DEFAULT_MAX_IMAGE_PIXELS + 1):
        data.image_max_pixels = bad
        with pytest.raises(ValueError, match=rf"image_max_pixels={bad} must be in 1\.\.178956970"):
            sources.split_source(data, "test")


def test_corrupt_file_advice_names_the_real_flags(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        load_image(str(bad))
    assert "--config.data.skip_corrupt=True" in str(info.value)
    assert "--skip_corrupt (predict)" in str(info.value)


# --- 3: few-shot references are never scored ------------------------------------------------------


def _toy(root, **data):
    config = toy_config(str(root))
    config.data.update({"test_set": "folder", "test_categories": (), **data})
    return ToyDetector(config, rngs=nnx.Rngs(0)), config


def _images(folder, names, size=16):
    return [_img(os.path.join(folder, n), size, size) for n in names]


def test_few_shot_refuses_references_that_are_test_images(tmp_path):
    root = tmp_path / "flat"
    _images(root / "good", ["a.png", "b.png", "c.png"])
    _images(root / "bad", ["x.png"])
    model, config = _toy(root)
    with pytest.raises(ValueError, match=r"3 of the 3 normal 'train' images .* are also test "
                       r"images.*/train/good/ and the test images in .*/test/good/"):  # fmt: skip
        eval_lib.evaluate(model, config, few_shot=2)


def test_few_shot_draws_references_from_the_train_folder_only(tmp_path):
    root = tmp_path / "split"
    train = _images(root / "train/good", ["r1.png", "r2.png"])
    _images(root / "test/good", ["a.png", "b.png"])
    _images(root / "test/bad", ["x.png"])
    model, config = _toy(root)
    result = eval_lib.evaluate(model, config, keep_outputs=True, few_shot=2)
    transform = transforms.make_transform("plain", 16)
    references = np.stack([transform(load_record(Record(p, "split", 0)))["image"] for p in train])
    out = result["outputs"]
    assert not {os.path.realpath(p) for p in out["path"]} & {os.path.realpath(p) for p in train}
    for i, path in enumerate(out["path"]):
        image = transform(load_record(Record(str(path), "split", 0, has_mask=False)))["image"]
        amap, _ = toy_numpy_forward(model, image, references)
        np.testing.assert_allclose(out["anomaly_map"][i], amap, atol=2e-6)


def test_few_shot_leaves_out_overlapping_references_when_enough_remain(tmp_path):
    import json

    root = tmp_path / "meta"
    paths = _images(root / "imgs", ["t1.png", "t2.png", "shared.png", "x.png"])
    rel = [os.path.relpath(p, root) for p in paths]
    entry = lambda p, a: {"img_path": p, "mask_path": "", "anomaly": a, "specie_name": ""}  # noqa
    meta = {"train": {"c": [entry(rel[0], 0), entry(rel[1], 0), entry(rel[2], 0)]},
            "test": {"c": [entry(rel[2], 0), entry(rel[3], 1)]}}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    model, config = _toy(root, test_set="meta_json")
    scored = read_dataset("meta_json", str(root), "test")
    assert [r.path for r in eval_lib._few_shot_references(config, "c", scored, 2)] == paths[:2]
    with pytest.raises(ValueError, match=r"1 of the 3 normal 'train' images"):
        eval_lib._few_shot_references(config, "c", scored, 3)


# --- 4: decompression bombs -----------------------------------------------------------------------


def _png_header(path, width, height):
    """A valid PNG signature + IHDR claiming width x height RGB, and a tiny IDAT: ~100 bytes."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    path.write_bytes(blob + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every ``ImageFile.load`` (the call that allocates and decodes the pixels)."""
    calls = []
    original = PIL.ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", spy)
    return calls


def test_decompression_bomb_is_a_data_error_before_decoding(tmp_path, no_decoding):
    bomb = _png_header(tmp_path / "bomb.png", 50_000, 50_000)  # 2.5 G px, 7.5 GB as RGB
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"bomb\.png claims more pixels than Pillow opens") as info:
        load_image(bomb)
    assert info.value.path == bomb
    assert str(info.value).count("skip such files") == 1  # the advice once, not wrapped again
    # Between Pillow's warning and its hard limit: our own check refuses, without a warning.
    big = _png_header(tmp_path / "big.png", 12_000, 12_000)  # 144 M px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"12000x12000 = 144,000,000 px, more than the limit"):
            load_image(big, max_pixels=100_000_000)
    assert no_decoding == [] and time.perf_counter() - start < 2.0
    # The same check guards masks, and a real image over a small limit is refused undecoded too.
    image = _img(tmp_path / "ok.png", 10, 10)
    with pytest.raises(DataError, match=r"mask file .*big\.png claims"):
        load_record(Record(image, "c", 1, big, "d", True), max_pixels=100_000_000)
    assert set(no_decoding) == {(10, 10)}  # the record's image only, never the mask
    no_decoding.clear()
    with pytest.raises(DataError, match=r"ok\.png claims 10x10 = 100 px"):
        load_image(image, max_pixels=99)
    assert no_decoding == []
    assert load_image(image, max_pixels=100).shape == (10, 10, 3) and no_decoding


def test_bomb_is_skipped_like_a_corrupt_file(tmp_path):
    good = _img(tmp_path / "good.png", 8, 8)
    bomb = _png_header(tmp_path / "bomb.png", 50_000, 50_000)
    source = pipeline.RecordSource([Record(good, "c", 0), Record(bomb, "c", 0)])
    batches = pipeline.eval_batches(
        source, batch_size=2, transform=transforms.make_transform("plain", 8), process_index=0,
        process_count=1, skip_corrupt=True,
    )  # fmt: skip
    (batch,) = list(batches)
    assert batch["valid"].tolist() == [True, False] and batches.skipped == (bomb,)


# --- 5: one list of image formats -----------------------------------------------------------------


def test_gif_images_are_read_by_the_folder_reader(tmp_path):
    root = tmp_path / "part"
    os.makedirs(root / "good")
    os.makedirs(root / "scratch")
    pixels = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("P").save(root / "good/n.gif")
    Image.fromarray(pixels).save(root / "scratch/s.gif")
    records = read_dataset("folder", str(root))
    assert [os.path.basename(r.path) for r in records] == ["n.gif", "s.gif"]
    assert load_record(records[1])["image"].shape == (6, 8, 3)
    assert ".gif" in decode.IMAGE_EXTENSIONS and readers.IMAGE_EXTENSIONS is decode.IMAGE_EXTENSIONS


def test_files_in_formats_not_decoded_get_a_note_other_files_do_not(tmp_path, capsys):
    root = tmp_path / "scans"
    _img(root / "good/n1.png")
    _img(root / "lesion/l1.png")
    for name in ("good/n2.dcm", "lesion/l2.DCM", "good/n3.nii.gz", "good/notes.txt"):
        (root / name).touch()
    records = read_dataset("folder", str(root), require_masks=False)
    assert [os.path.basename(r.path) for r in records] == ["n1.png", "l1.png"]
    assert capsys.readouterr().err.splitlines() == [
        f"note: folder dataset {root}: 3 files in a format not decoded here (2 .dcm, 1 .nii.gz) "
        "were not read; convert to PNG or TIFF to include them (read: "
        + ", ".join(decode.IMAGE_EXTENSIONS) + ")"
    ]  # fmt: skip
    for name in ("good/n2.dcm", "lesion/l2.DCM", "good/n3.nii.gz"):
        os.remove(root / name)
    read_dataset("folder", str(root), require_masks=False)
    assert capsys.readouterr().err == ""  # a notes.txt is no image
    assert set(decode.UNREAD_IMAGE_EXTENSIONS).isdisjoint(decode.IMAGE_EXTENSIONS)


def test_twelve_bit_camera_data_in_16_bit_files_gets_a_note_and_an_option(tmp_path, capsys):
    """Mono12 in a 16-bit PNG (values 0..4095): read as 16-bit it is nearly black, which is said
    once; ``data.image_bit_depth=12`` scales it as the camera meant, through the data source (as
    evaluate and train read) and through predict's decoding alike."""
    root = tmp_path / "part"
    values = np.linspace(0, 4095, 48).reshape(6, 8).astype(np.uint16)
    for name in ("good/n1.png", "good/n2.png"):
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        Image.fromarray(values).save(root / name)  # mode I;16
    _img(root / "scratch/s1.png")
    data = _data(test_set="folder", test_root=str(root), test_require_masks=False)
    decode._NOTED["fewer bits"].clear()  # once per process: this test's files are the first
    dark = sources.split_source(data, "test").load(0)["image"]
    assert dark.max() == round(4095 * 255 / 65535)  # 16
    sources.split_source(data, "test").load(1)
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "--config.data.image_bit_depth=12" in err, err
    data.image_bit_depth = 12
    bright = sources.split_source(data, "test").load(0)["image"]
    assert bright.min() == 0 and bright.max() == 255
    np.testing.assert_array_equal(bright[..., 0], np.round(values * (255 / 4095)).astype(np.uint8))
    np.testing.assert_array_equal(
        decode.load_image(str(root / "good/n1.png"), **sources.image_options(data)), bright
    )
    for bad in (0, 17):
        data.image_bit_depth = bad
        with pytest.raises(ValueError, match=r"image_bit_depth=.* must be an integer in 1\.\.16"):
            sources.split_source(data, "test")


def test_graded_and_empty_masks_get_a_note_and_a_threshold_option(tmp_path, capsys):
    """An anti-aliased or JPEG mask (many grey values) counts every value above 0 as defect, and a
    defect image's empty mask counts none: each is said once; ``data.mask_threshold`` binarises
    graded masks where the user wants. Region-id masks (VisA's few values) get no note."""
    root = tmp_path / "part"
    _img(root / "good/n1.png")
    _img(root / "scratch/s1.png")
    _img(root / "scratch/s2.png")
    _img(root / "dent/d1.png")
    graded = np.linspace(0, 255, 48).reshape(6, 8).astype(np.uint8)  # 48 distinct values
    os.makedirs(root / "masks/scratch")
    os.makedirs(root / "masks/dent")
    Image.fromarray(graded).save(root / "masks/scratch/s1.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "masks/scratch/s2.png")
    regions = np.zeros((6, 8), np.uint8)
    regions[1:3, 1:3], regions[4:6, 5:7] = 1, 2  # VisA-style region ids
    Image.fromarray(regions).save(root / "masks/dent/d1.png")
    data = _data(test_set="folder", test_root=str(root))
    for kind in decode._NOTED:
        decode._NOTED[kind].clear()
    source = sources.split_source(data, "test")
    by_path = {os.path.basename(r.path): i for i, r in enumerate(source.records)}
    assert source.load(by_path["d1.png"])["gt_mask"].sum() == 8  # every region, no note
    assert capsys.readouterr().err == ""
    assert source.load(by_path["s1.png"])["gt_mask"].sum() == 47  # every value above 0
    source.load(by_path["s2.png"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "48 distinct values" in err[0] and "mask_threshold=127" in err[0]
    assert "s2.png" in err[1] and "is empty" in err[1]
    source.load(by_path["s1.png"])
    assert capsys.readouterr().err == ""  # once per process
    data.mask_threshold = 127
    strong = sources.split_source(data, "test").load(by_path["s1.png"])["gt_mask"]
    np.testing.assert_array_equal(strong, graded > 127)
    data.mask_threshold = -1
    with pytest.raises(ValueError, match=r"mask_threshold=-1 must be an integer >= 0"):
        sources.split_source(data, "test")


def test_a_training_set_of_normal_images_only_gets_a_note(tmp_path, capsys):
    from zsad_jax import train as train_lib

    for i in range(2):
        _img(tmp_path / "normal" / "good" / f"n{i}.png")
    config = base_config("test_own_data")
    config.data.update(train_set="folder", train_root=str(tmp_path / "normal"), batch_size=2)
    train_lib.make_train_data(config)
    err = capsys.readouterr().err
    assert "note: the training set (folder at " in err and "holds no anomalous images" in err
    _img(tmp_path / "normal" / "hole" / "h0.png")
    config.data.train_require_masks = False
    train_lib.make_train_data(config)
    assert "no anomalous" not in capsys.readouterr().err
