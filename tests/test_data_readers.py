"""Dataset readers, decoding and transforms, on tiny trees written in each dataset's real layout.

Expected values are computed directly (NumPy, Pillow's documented operations, torch's
``grid_sample`` for the rotation convention), never copied from this code's output.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from extras import optional
from PIL import Image

from zsad_jax.data import decode, protocol, transforms
from zsad_jax.data.decode import DataError, load_image, load_mask, load_record
from zsad_jax.data.protocol import read_dataset
from zsad_jax.data.records import Record

# None without the convert extra; the tests that use it are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")

RNG = np.random.default_rng(0)


def _rgb(h=6, w=8):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def _mask(h=6, w=8, value=255):
    m = np.zeros((h, w), np.uint8)
    m[1:3, 2:5] = value
    return m


# --- MVTec-style layouts --------------------------------------------------------------------------


def _mvtec_tree(root, categories=("bottle", "cable")):
    expected = []
    for cat in categories:
        for i in range(2):
            _write(f"{root}/{cat}/train/good/{i:03d}.png", _rgb())
        p = _write(f"{root}/{cat}/test/good/000.png", _rgb())
        expected.append(Record(p, cat, 0, None, "good", True))
        for defect in ("broken", "crack"):
            for i in range(2):
                p = _write(f"{root}/{cat}/test/{defect}/{i:03d}.png", _rgb())
                m = _write(f"{root}/{cat}/ground_truth/{defect}/{i:03d}_mask.png", _mask())
                expected.append(Record(p, cat, 1, m, defect, True))
    # Sorted defect folders: broken < crack < good.
    order = {"broken": 0, "crack": 1, "good": 2}
    return sorted(
        expected, key=lambda r: (categories.index(r.category), order[r.defect_type], r.path)
    )


def test_mvtec_reader_lists_every_image_with_its_mask(tmp_path):
    expected = _mvtec_tree(str(tmp_path))
    assert read_dataset("mvtec_ad", str(tmp_path), "test") == expected
    train = read_dataset("mvtec_ad", str(tmp_path), "train")
    assert len(train) == 4 and all(r.gt_label == 0 and r.defect_type == "good" for r in train)
    only = read_dataset("mvtec_ad", str(tmp_path), "test", ["cable"])
    assert [r for r in expected if r.category == "cable"] == only


def test_mvtec_missing_mask_names_the_image(tmp_path):
    _mvtec_tree(str(tmp_path), ("bottle",))
    os.remove(tmp_path / "bottle/ground_truth/crack/001_mask.png")
    with pytest.raises(DataError, match=r"bottle/test/crack/001\.png") as info:
        read_dataset("mvtec_ad", str(tmp_path))
    assert info.value.path.endswith("crack/001.png")
    records = read_dataset("mvtec_ad", str(tmp_path), require_masks=False)
    missing = [r for r in records if r.path.endswith("crack/001.png")][0]
    assert missing.mask_path is None and not missing.has_mask and missing.gt_label == 1


def test_unknown_dataset_and_category_list_the_known_ones(tmp_path):
    _mvtec_tree(str(tmp_path), ("bottle",))
    with pytest.raises(ValueError, match=r"unknown dataset 'mvtec'.*'mvtec_ad'.*'visa'"):
        read_dataset("mvtec", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown mvtec_ad category \['botle'\].*\['bottle'\]"):
        read_dataset("mvtec_ad", str(tmp_path), categories=["botle"])


def test_empty_category_and_missing_root_are_clear(tmp_path):
    _mvtec_tree(str(tmp_path), ("bottle",))
    os.makedirs(tmp_path / "empty/test/good")
    with pytest.raises(ValueError, match=r"category 'empty' has no images"):
        read_dataset("mvtec_ad", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mvtec_ad root not found") as missing:
        read_dataset("mvtec_ad", str(tmp_path / "nope"))
    # The expected tree names the real root, placeholders in <>, nothing left unformatted.
    assert f"expected {tmp_path / 'nope'}/<category>/test/good/*.png and " in str(missing.value)
    assert "{" not in str(missing.value)
    with pytest.raises(FileNotFoundError, match=r"\['bottle'\].*no 'validation' folder"):
        read_dataset("mvtec_ad", str(tmp_path), "validation", ["bottle"])


def test_mpdd_reads_the_mvtec_layout(tmp_path):
    expected = _mvtec_tree(str(tmp_path), ("bracket_black",))
    assert read_dataset("mpdd", str(tmp_path)) == expected
    assert set(protocol.MPDD_CATEGORIES) >= {"bracket_black", "tubes"}


def test_btad_pairs_bmp_images_with_png_or_bmp_masks(tmp_path):
    root = str(tmp_path)
    _write(f"{root}/01/train/ok/0000.bmp", _rgb())
    ok = _write(f"{root}/01/test/ok/0001.bmp", _rgb())
    ko = _write(f"{root}/01/test/ko/0002.bmp", _rgb())
    ko_mask = _write(f"{root}/01/ground_truth/ko/0002.png", _mask())
    ko3 = _write(f"{root}/03/test/ko/0005.bmp", _rgb())
    ko3_mask = _write(f"{root}/03/ground_truth/ko/0005.bmp", _mask())
    records = read_dataset("btad", root, "test")
    assert records == [
        Record(ko, "01", 1, ko_mask, "ko", True),
        Record(ok, "01", 0, None, "good", True),
        Record(ko3, "03", 1, ko3_mask, "ko", True),
    ]
    assert load_record(records[2])["gt_mask"].sum() == 6
    assert protocol.BTAD_CATEGORIES == ("01", "02", "03")


def test_mvtec_loco_mask_directory_is_the_union_of_its_regions(tmp_path):
    root = str(tmp_path)
    img = _write(f"{root}/pushpins/test/logical_anomalies/000.png", _rgb())
    a, b = np.zeros((6, 8), np.uint8), np.zeros((6, 8), np.uint8)
    a[0, 0], b[5, 7] = 236, 255
    _write(f"{root}/pushpins/ground_truth/logical_anomalies/000/000.png", a)
    _write(f"{root}/pushpins/ground_truth/logical_anomalies/000/001.png", b)
    (record,) = read_dataset("mvtec_ad", root)
    assert record.path == img and os.path.isdir(record.mask_path)
    np.testing.assert_array_equal(load_record(record)["gt_mask"], (a > 0) | (b > 0))


# --- VisA, meta.json, folder ----------------------------------------------------------------------


def test_visa_csv_reader_and_region_id_masks(tmp_path):
    root = str(tmp_path)
    rows = [["object", "split", "label", "image", "mask"]]
    expected = []
    for cat in ("pcb1", "candle"):
        for split in ("train", "test"):
            for i, label in enumerate(("normal", "anomaly")):
                kind = "Normal" if label == "normal" else "Anomaly"
                rel = f"{cat}/Data/Images/{kind}/{split}{i:03d}.JPG"
                _write(f"{root}/{rel}", _rgb())
                mask_rel = ""
                if label == "anomaly":
                    mask_rel = f"{cat}/Data/Masks/Anomaly/{split}{i:03d}.png"
                    region_ids = np.zeros((6, 8), np.uint8)
                    region_ids[0, :2], region_ids[4, 4] = 1, 2  # VisA masks hold region ids
                    _write(f"{root}/{mask_rel}", region_ids)
                rows.append([cat, split, label, rel, mask_rel])
                if split == "test":
                    mask = f"{root}/{mask_rel}" if mask_rel else None
                    expected.append(
                        Record(f"{root}/{rel}", cat, int(label == "anomaly"), mask,
                               "anomaly" if mask else "good", True)
                    )  # fmt: skip
    os.makedirs(f"{root}/split_csv")
    with open(f"{root}/split_csv/1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    records = read_dataset("visa", root, "test")
    by_cat = sorted(expected, key=lambda r: r.category)  # categories sorted, csv order within
    assert records == by_cat
    sample = load_record([r for r in records if r.gt_label][0])
    assert sample["gt_mask"].sum() == 3 and sample["gt_mask"][0, :2].all()
    with pytest.raises(ValueError, match=r"unknown visa category \['pcb9'\].*'candle', 'pcb1'"):
        read_dataset("visa", root, categories=["pcb9"])


def test_visa_missing_file_is_named(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/split_csv")
    with open(f"{root}/split_csv/1cls.csv", "w") as f:
        f.write("object,split,label,image,mask\ncandle,test,normal,candle/x.JPG,\n")
    with pytest.raises(DataError, match=r"candle/x\.JPG"):
        read_dataset("visa", root)


def test_meta_json_reader_with_image_level_only_category(tmp_path):
    root = str(tmp_path)
    meta = {"train": {}, "test": {"brain": [], "liver": []}}
    for i, anomaly in enumerate((0, 1, 1)):
        rel = _write(f"{root}/brain/test/{i}.png", _rgb())
        meta["test"]["brain"].append(
            {"img_path": os.path.relpath(rel, root), "mask_path": "", "cls_name": "brain",
             "specie_name": "tumor" if anomaly else "good", "anomaly": anomaly}
        )  # fmt: skip
    for i, anomaly in enumerate((0, 1)):
        rel = _write(f"{root}/liver/test/{i}.png", _rgb())
        mask = _write(f"{root}/liver/gt/{i}.png", _mask()) if anomaly else ""
        mask_rel = os.path.relpath(mask, root) if mask else ""
        meta["test"]["liver"].append(
            {"img_path": os.path.relpath(rel, root), "mask_path": mask_rel, "cls_name": "liver",
             "specie_name": "lesion" if anomaly else "good", "anomaly": anomaly}
        )  # fmt: skip
    with open(f"{root}/meta.json", "w") as f:
        json.dump(meta, f)
    records = read_dataset("meta_json", root, "test")
    brain = [r for r in records if r.category == "brain"]
    liver = [r for r in records if r.category == "liver"]
    # No anomalous brain image has a mask: the whole category is image-level (normals too).
    assert [r.has_mask for r in brain] == [False, False, False]
    assert [r.defect_type for r in brain] == ["good", "tumor", "tumor"]
    assert [(r.gt_label, r.has_mask, r.mask_path is not None) for r in liver] == [
        (0, True, False),
        (1, True, True),
    ]
    no_mask = load_record(brain[1])
    assert (
        not no_mask["gt_mask"].any() and no_mask["has_mask"] is False and no_mask["gt_label"] == 1
    )
    with pytest.raises(ValueError, match=r"no split 'val'.*\['train', 'test'\]"):
        read_dataset("meta_json", root, "val")


def test_folder_reader_masks_optional_and_category_naming(tmp_path):
    root = str(tmp_path / "my_part")
    good = [_write(f"{root}/good/{n}.png", _rgb()) for n in ("a", "b")]
    dent = _write(f"{root}/dent/d1.jpg", _rgb())
    scr1 = _write(f"{root}/scratch/s1.png", _rgb())
    scr2 = _write(f"{root}/scratch/s2.png", _rgb())
    m1 = _write(f"{root}/ground_truth/scratch/s1_mask.png", _mask())
    # A mask folder exists, so by default every defect image needs its mask ...
    with pytest.raises(DataError, match=r"no mask for defect image .*dent/d1\.jpg .*2 of the 3"):
        read_dataset("folder", root)
    # ... and require_masks=False makes them optional per image.
    records = read_dataset("folder", root, require_masks=False)
    assert records == [
        Record(dent, "my_part", 1, None, "dent", False),
        Record(good[0], "my_part", 0, None, "good", True),
        Record(good[1], "my_part", 0, None, "good", True),
        Record(scr1, "my_part", 1, m1, "scratch", True),
        Record(scr2, "my_part", 1, None, "scratch", False),
    ]
    named = read_dataset("folder", root, categories=["widget"], require_masks=False)
    assert {r.category for r in named} == {"widget"}
    # Masks from a separate directory, matched by stem.
    masks = str(tmp_path / "masks")
    m2 = _write(f"{masks}/s2.png", _mask())
    d1 = _write(f"{masks}/dent/d1-gt.png", _mask())
    records = read_dataset("folder", root, mask_dir=masks)
    assert {os.path.basename(r.path): r.mask_path for r in records if r.gt_label} == {
        "d1.jpg": d1,
        "s1.png": m1,
        "s2.png": m2,
    }


def test_folder_reader_image_level_only_and_several_categories(tmp_path):
    root = str(tmp_path)
    for cat in ("cup", "fork"):
        _write(f"{root}/{cat}/good/0.png", _rgb())
        _write(f"{root}/{cat}/bad/0.png", _rgb())
    records = read_dataset("folder", root)
    assert [(r.category, r.gt_label, r.has_mask) for r in records] == [
        ("cup", 1, False),
        ("cup", 0, False),
        ("fork", 1, False),
        ("fork", 0, False),
    ]
    assert [r.category for r in read_dataset("folder", root, categories=["fork"])] == ["fork"] * 2
    with pytest.raises(ValueError, match=r"unknown folder category \['knife'\].*\['cup', 'fork'\]"):
        read_dataset("folder", root, categories=["knife"])
    os.makedirs(f"{root}/empty_set/good")
    with pytest.raises(ValueError, match="holds no images"):
        read_dataset("folder", f"{root}/empty_set")
    _write(f"{root}/nogood/ok/0.png", _rgb())
    with pytest.raises(ValueError, match=r"no images found .*nogood/good/ \(one category\)"):
        read_dataset("folder", f"{root}/nogood")
    assert [r.gt_label for r in read_dataset("folder", f"{root}/nogood", normal_dir="ok")] == [0]


def test_protocol_is_data():
    assert len(protocol.MVTEC_AD_CATEGORIES) == 15 and len(protocol.VISA_CATEGORIES) == 12
    for setting in protocol.ZERO_SHOT_PROTOCOL.values():
        assert setting.train_split == "test" and setting.test_split == "test"
    assert protocol.ZERO_SHOT_PROTOCOL["mvtec_ad"].test_set == "visa"
    assert protocol.ZERO_SHOT_PROTOCOL["visa"].test_set == "mvtec_ad"
    syn = protocol.ZERO_SHOT_PROTOCOL["synthetic"]
    assert not set(syn.train_categories) & set(syn.test_categories)


# --- decoding -------------------------------------------------------------------------------------


def test_decode_formats_against_direct_expectations(tmp_path):
    rgb = _rgb()
    gray = rgb[..., 0]
    np.testing.assert_array_equal(
        load_image(_write(tmp_path / "g.png", gray)), np.stack([gray] * 3, -1)
    )
    rgba = np.concatenate([rgb, RNG.integers(0, 256, (6, 8, 1), dtype=np.uint8)], -1)
    np.testing.assert_array_equal(
        load_image(_write(tmp_path / "a.png", rgba)), rgb
    )  # alpha dropped
    la = np.stack([gray, 255 - gray], -1)
    np.testing.assert_array_equal(
        load_image(_write(tmp_path / "la.png", la, "LA")), np.stack([gray] * 3, -1)
    )

    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.tobytes())
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "p.png")), palette[index])

    deep = RNG.integers(0, 65536, (6, 8), dtype=np.uint16)
    deep[0, :4] = (0, 128, 129, 65535)
    Image.fromarray(deep).save(tmp_path / "d.png")
    expected = np.floor(deep.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(load_image(str(tmp_path / "d.png")), np.stack([expected] * 3, -1))

    cmyk = RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(load_image(str(tmp_path / "c.tif")), expected)

    bits = gray > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "b.png"))[..., 1], bits * np.uint8(255))

    floats = RNG.normal(3.0, 2.0, (6, 8)).astype(np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    scaled = (floats.astype(np.float64) - floats.min()) / (floats.max() - floats.min())
    np.testing.assert_array_equal(
        load_image(str(tmp_path / "f.tif"))[..., 2], np.floor(scaled * 255 + 0.5)
    )


def test_masks_binarised_at_full_resolution_in_any_mode(tmp_path):
    values = np.array([[0, 1, 2, 236, 255, 0]], np.uint8)
    np.testing.assert_array_equal(load_mask(_write(tmp_path / "m.png", values)), values > 0)
    rgb = np.zeros((1, 6, 3), np.uint8)
    rgb[0, 1, 2] = 1  # a faint pure-blue pixel (convert("L") would round it to 0)
    np.testing.assert_array_equal(
        load_mask(_write(tmp_path / "rgb.png", rgb))[0], [0, 1, 0, 0, 0, 0]
    )
    deep = np.array([[0, 1, 300, 0]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "d.png")), deep > 0)


def test_corrupt_and_missing_files_raise_data_error_naming_them(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="garbage.png") as info:
        load_image(str(garbage))
    assert info.value.path == str(garbage)
    good = _write(tmp_path / "full.png", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good, "rb").read()[:-200])
    with pytest.raises(DataError, match="truncated.png"):
        load_record(Record(str(truncated), "x", 0))
    with pytest.raises(DataError, match="not found: .*nothere.png"):
        load_image(str(tmp_path / "nothere.png"))
    with pytest.raises(DataError, match="garbage.png"):
        load_record(Record(good, "x", 1, str(garbage), "d", True))


def test_load_record_fields_and_mask_size_mismatch(tmp_path):
    image = _write(tmp_path / "i.png", _rgb(6, 8))
    mask = _write(tmp_path / "m.png", _mask(6, 8, value=3))
    sample = load_record(Record(image, "cat", 1, mask, "d", True))
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (6, 8, 3)
    assert sample["gt_mask"].dtype == bool
    np.testing.assert_array_equal(sample["gt_mask"], _mask(6, 8) > 0)
    assert (sample["has_mask"], sample["gt_label"], sample["category"], sample["path"]) == (
        True, 1, "cat", image,
    )  # fmt: skip
    normal = load_record(
        Record(image, "cat", 0, mask, "good", True)
    )  # a normal image's mask is ignored
    assert not normal["gt_mask"].any() and normal["gt_label"] == 0
    small = _write(tmp_path / "small.png", _mask(3, 4))
    with pytest.raises(DataError, match=r"small\.png is 4x3 .*/i\.png is 8x6"):
        load_record(Record(image, "cat", 1, small, "d", True))
    resized = load_record(Record(image, "cat", 1, small, "d", True), resize_mismatched_mask=True)
    np.testing.assert_array_equal(
        resized["gt_mask"], np.repeat(np.repeat(_mask(3, 4) > 0, 2, 0), 2, 1)
    )


# --- transforms -----------------------------------------------------------------------------------


def _sample(h=40, w=56):
    mask = np.zeros((h, w), bool)
    mask[10:22, 20:31] = True
    return {"image": _rgb(h, w), "gt_mask": mask, "has_mask": True, "gt_label": 1,
            "category": "c", "path": "p.png"}  # fmt: skip


@pytest.mark.parametrize(
    "name, resample, mean, std",
    [
        ("clip", Image.Resampling.BICUBIC, transforms.CLIP_MEAN, transforms.CLIP_STD),
        ("dinov3", Image.Resampling.BILINEAR, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
        ("plain", Image.Resampling.BILINEAR, transforms.CLIP_MEAN, transforms.CLIP_STD),
        ("acd_clip_train", Image.Resampling.BICUBIC, transforms.CLIP_MEAN, transforms.CLIP_STD),
    ],
)
def test_deterministic_transforms_match_pil_resize_and_normalisation(name, resample, mean, std):
    sample = _sample()
    out = transforms.make_transform(name, 24)(sample, None)
    resized = np.asarray(Image.fromarray(sample["image"]).resize((24, 24), resample), np.float64)
    expected = (resized / 255.0 - np.array(mean)) / np.array(std)
    assert out["image"].dtype == np.float32 and out["image"].shape == (24, 24, 3)
    np.testing.assert_allclose(out["image"], expected, atol=2e-6)
    assert out["gt_mask"].dtype == np.float32 and out["gt_mask"].shape == (24, 24)
    assert set(np.unique(out["gt_mask"])) <= {0.0, 1.0}
    for key in ("has_mask", "gt_label", "category", "path"):
        assert out[key] == sample[key]
    np.testing.assert_array_equal(
        transforms.denormalize(out["image"], name), resized.astype(np.uint8)
    )


def test_mask_resize_nearest_and_the_official_variants():
    mask = np.zeros((8, 8), bool)
    mask[1::2, 1::2] = True  # isolated pixels: nearest keeps exactly the sampled ones
    # Pillow's nearest samples source pixel floor((i + 0.5) * 2) = 2 i + 1 when halving.
    np.testing.assert_array_equal(transforms.resize_mask(mask, 4), np.ones((4, 4), np.float32))
    blob = np.zeros((40, 40), bool)
    blob[8:20, 10:27] = True
    near = transforms.resize_mask(blob, 20)
    np.testing.assert_array_equal(near, blob[1::2, 1::2])
    half = transforms.resize_mask(blob, 20, "bilinear_threshold")
    anything = transforms.resize_mask(blob, 20, "bilinear_any")
    bicubic = transforms.resize_mask(blob, 20, "bicubic_threshold")
    assert np.all(anything >= half) and anything.sum() > half.sum()  # "> 0" dilates
    for m in (half, anything, bicubic):
        assert set(np.unique(m)) == {0.0, 1.0}
    with pytest.raises(ValueError, match="unknown mask_resize"):
        transforms.resize_mask(blob, 20, "area")


def test_transform_errors():
    with pytest.raises(ValueError, match=r"unknown transform 'clip2'.*'clip', 'dinov3'"):
        transforms.make_transform("clip2", 8)
    bad = dict(_sample(), image=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="expects image uint8"):
        transforms.make_transform("clip", 8)(bad)
    with pytest.raises(ValueError, match="needs an rng"):
        transforms.make_transform("acd_clip_train", 8, train=True)(_sample())


def test_acd_clip_train_is_reproducible_and_joint():
    sample = _sample()
    augment = transforms.make_transform("acd_clip_train", 32, train=True)
    runs = [augment(sample, np.random.default_rng(s)) for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0]["image"], runs[1]["image"])
    np.testing.assert_array_equal(runs[0]["gt_mask"], runs[1]["gt_mask"])
    outs = [augment(sample, np.random.default_rng(s)) for s in range(12)]
    assert len({o["image"].tobytes() for o in outs}) == 12
    for o in outs:
        assert o["image"].shape == (32, 32, 3) and set(np.unique(o["gt_mask"])) <= {0.0, 1.0}
    # Geometry is applied to image and mask together: an image equal to its mask stays equal.
    mask = transforms.resize_mask(sample["gt_mask"], 32)
    for seed in range(8):
        image, moved = transforms.acd_clip_geometric(
            np.stack([mask] * 3, -1), mask, np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(image[..., 1], moved)


@pytest.mark.torch
def test_rotation_matches_torch_grid_sample_convention():
    x = RNG.normal(size=(20, 20, 2)).astype(np.float32)
    np.testing.assert_array_equal(transforms.rotate_nearest(x, 90.0), np.rot90(x, 1, axes=(0, 1)))
    for degrees in (17.0, -29.5):
        a = math.radians(degrees)
        # torchvision's tensor rotate: inverse map [[cos, -sin], [sin, cos]] on pixel-centred
        # coordinates, normalised by half the size, then grid_sample(nearest, align_corners=False).
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        grid = F.affine_grid(theta[None], [1, 2, 20, 20], align_corners=False)
        ref = (
            F.grid_sample(
                torch.from_numpy(x).permute(2, 0, 1)[None],
                grid,
                mode="nearest",
                align_corners=False,
            )[0]
            .permute(1, 2, 0)
            .numpy()
        )
        ours = transforms.rotate_nearest(x, degrees)
        mismatch = np.mean(np.any(ours != ref, axis=-1))
        assert mismatch < 0.01, mismatch  # float32 ties at exactly half a pixel may round apart


def test_translate_and_sparse_noise_against_direct_computation():
    x = RNG.normal(size=(6, 7, 2))
    shifted = transforms.translate(x, 2, -1)
    expected = np.zeros_like(x)
    expected[0:5, 2:7] = x[1:6, 0:5]
    np.testing.assert_array_equal(shifted, expected)
    image = RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    noisy = transforms.sparse_multiplicative_noise(image, np.random.default_rng(1))
    # ToPILImage truncates x * 255 after the float32 round trip, so untouched pixels can lose 1.
    round_trip = ((image.astype(np.float32) / np.float32(255)) * np.float32(255)).astype(np.uint8)
    hit = np.any(noisy != round_trip, axis=-1)
    assert 0.0003 < hit.mean() < 0.004  # P(N(0,1) > 3) = 0.00135 of the pixels


def test_decode_module_and_pipeline_contract_names():
    assert issubclass(decode.DataError, ValueError)
    assert set(transforms.TRANSFORM_NAMES) == {"clip", "dinov3", "acd_clip_train", "plain"}
