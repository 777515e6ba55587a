"""The built-in synthetic benchmark: determinism, layout, exact masks, caching."""

from __future__ import annotations

import filecmp
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from zsad_jax.data import generated, synthetic, synthetic_defects, synthetic_scenes
from zsad_jax.data.decode import load_record
from zsad_jax.data.protocol import read_dataset

SMALL = {"image_size": 64, "n_train_good": 1, "n_test_good": 2, "n_test_defect": 5}


def _files(root):
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(out)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    cats = ("stripes", "pill")
    a = synthetic.generate(str(tmp_path / "a"), seed=3, categories=cats, **SMALL)
    b = synthetic.generate(str(tmp_path / "b"), seed=3, categories=cats, **SMALL)
    c = synthetic.generate(str(tmp_path / "c"), seed=4, categories=cats, **SMALL)
    files = _files(a)
    assert files == _files(b) == _files(c)
    assert len([f for f in files if f.endswith(".png")]) == 2 * (1 + 2 + 5 + 5)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    images = [f for f in files if f.endswith(".png") and "ground_truth" not in f]
    _, mismatch, _ = filecmp.cmpfiles(a, c, images, shallow=False)
    assert sorted(mismatch) == sorted(images)
    # A subset of categories renders exactly the same files for those categories.
    d = synthetic.generate(str(tmp_path / "d"), seed=3, categories=("pill",), **SMALL)
    pill = [f for f in files if f.startswith("pill")]
    assert filecmp.cmpfiles(a, d, pill, shallow=False)[0] == pill


def test_written_tree_reads_as_mvtec_with_masks_exactly_for_defects(tmp_path):
    root = synthetic.generate(str(tmp_path), seed=0, categories=("weave", "chip"), **SMALL)
    records = read_dataset("mvtec_ad", root, "test")
    assert [r.category for r in records] == ["chip"] * 7 + ["weave"] * 7
    assert {r.defect_type for r in records} == {"good", *synthetic_defects.DEFECT_TYPES}
    for record in records:
        sample = load_record(record)
        assert sample["image"].shape == (64, 64, 3)
        assert sample["gt_mask"].any() == bool(record.gt_label)
        assert record.has_mask
    train = read_dataset("mvtec_ad", root, "train")
    assert [(r.category, r.gt_label) for r in train] == [("chip", 0), ("weave", 0)]


@pytest.mark.parametrize("category", synthetic.SYNTHETIC_CATEGORIES)
def test_every_defect_is_visible_and_its_mask_exact(category):
    size = 96
    for d, kind in enumerate(synthetic_defects.DEFECT_TYPES):
        scene = synthetic_scenes.RENDERERS[category](np.random.default_rng(d), size)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.float32
        image, mask = synthetic_defects.add_defect(np.random.default_rng(100 + d), scene, kind)
        change = np.abs(image - scene.image).max(axis=-1)
        assert mask.sum() >= synthetic_defects.MIN_AREA_FRACTION * size * size
        assert change[mask].mean() >= synthetic_defects.MIN_MEAN_CHANGE
        # Antialiased and soft edges change a thin band around the mask, nothing beyond it.
        near = ndimage.binary_dilation(mask, iterations=4)
        assert change[~near].max() == 0.0, (category, kind)
        if scene.is_object and kind != "missing_part":
            assert change[scene.object_cov == 0].max() == 0.0
            assert np.all(scene.object_cov[mask] >= 0.5)


def test_normal_images_vary(tmp_path):
    images = [
        synthetic.render_image("screw", seed=0, image_size=64, split="train", defect=None, index=i)[
            0
        ]
        for i in range(4)
    ]
    means = [im.reshape(-1, 3).mean(0) for im in images]
    assert len({im.tobytes() for im in images}) == 4
    # Position and rotation change: the dark object pixels are not in the same place.
    dark = [im.mean(-1) < 140 for im in images]
    assert all((a ^ b).sum() > 50 for a, b in zip(dark, dark[1:], strict=False))
    assert np.ptp(np.array(means), axis=0).max() > 1.0


def test_a_data_root_that_is_a_link_is_generated_where_it_points(tmp_path, monkeypatch):
    """A folder cannot be renamed onto a link: ``data/synthetic`` linked to another disk ended
    in a raw ``NotADirectoryError`` after the whole generation, and nothing was kept."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "scratch" / "bench"
    target.mkdir(parents=True)
    os.symlink(target, "bench", target_is_directory=True)
    params = {"image_size": 48, "n_train_good": 1, "n_test_good": 1, "n_test_defect": 1}
    for seed in (0, 1):  # generated into the empty folder, then regenerated there
        records = read_dataset("synthetic", "bench", "test", ["disc"], seed=seed, **params)
        assert len(records) == 2 and os.path.islink("bench")
        assert generated.read_manifest(str(target), synthetic.MANIFEST)["seed"] == seed
    assert os.listdir(target.parent) == ["bench"]  # nothing staged left beside it


def test_read_synthetic_generates_once_then_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = "bench"  # relative: read from the folder the command runs in, which the note names
    params = {"image_size": 48, "n_train_good": 1, "n_test_good": 1, "n_test_defect": 1}
    umask = os.umask(0o022)  # the usual one, whatever this machine's is
    try:
        records = read_dataset("synthetic", root, "test", ["wood", "disc"], **params)
    finally:
        os.umask(umask)
    assert capsys.readouterr().err == (
        f"note: generating a synthetic benchmark in {tmp_path / 'bench'} (once)\n"
    )
    # Readable by others as the folders inside it are (not mkdtemp's private 0700).
    mode = os.stat(root).st_mode & 0o777
    assert mode == os.stat(os.path.join(root, "disc")).st_mode & 0o777 == 0o755
    assert [(r.category, r.gt_label) for r in records] == [
        ("wood", 0), ("wood", 1), ("disc", 0), ("disc", 1),  # good/ sorts before scratch/
    ]  # fmt: skip
    assert sorted(d for d in os.listdir(root) if not d.endswith(".json")) == sorted(
        synthetic.SYNTHETIC_CATEGORIES
    )
    stamp = os.stat(os.path.join(root, "disc/test/good/000.png")).st_mtime_ns
    read_dataset("synthetic", root, "test", ["disc"], **params)
    assert os.stat(os.path.join(root, "disc/test/good/000.png")).st_mtime_ns == stamp
    assert capsys.readouterr().err == ""  # reused: nothing to say
    # Other parameters: the folder (ours, per its manifest) is regenerated.
    read_dataset("synthetic", root, "test", ["disc"], **{**params, "seed": 1})
    assert Image.open(os.path.join(root, "disc/test/good/000.png")).size == (48, 48)
    assert generated.read_manifest(root, synthetic.MANIFEST)["seed"] == 1
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".synthetic")]
    with pytest.raises(ValueError, match=r"unknown synthetic categories \['bottle'\].*'wood'"):
        read_dataset("synthetic", root, categories=["bottle"], **params)
    with pytest.raises(ValueError, match="unknown synthetic options"):
        read_dataset("synthetic", root, image_sze=64)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a synthetic benchmark"):
        read_dataset("synthetic", str(foreign), **params)
    assert (foreign / "notes.txt").read_text() == "user data"


def test_category_split_and_contact_sheet(tmp_path):
    train, held = (
        set(synthetic.SYNTHETIC_TRAIN_CATEGORIES),
        set(synthetic.SYNTHETIC_HELDOUT_CATEGORIES),
    )
    assert not train & held and train | held == set(synthetic.SYNTHETIC_CATEGORIES)
    assert held & set(synthetic.SYNTHETIC_TEXTURES) and held & set(synthetic.SYNTHETIC_OBJECTS)
    root = synthetic.generate(str(tmp_path / "b"), categories=("dots", "washer"), **SMALL)
    sheet = synthetic.contact_sheet(root, str(tmp_path / "sheet.png"), tile=32)
    assert Image.open(sheet).size == (32 * 2 * 6, 32 * 2)
