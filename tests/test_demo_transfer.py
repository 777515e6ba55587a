"""The demo's zero-shot transfer setup: the procedural families (deterministic, and disjoint from
both held-out families), the training-free baselines, the shipped backbone (loads through the
converted-checkpoint path; its pretraining script reproduces the recorded reduced-scale run) and
the demo config that ties them together."""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx
from toys import run_module

from configs import demo
from zsad_jax import train as train_lib
from zsad_jax.data import (
    novel_scenes,
    procedural,
    procedural_defects,
    procedural_scenes,
    protocol,
    synthetic,
    synthetic_defects,
    synthetic_scenes,
)
from zsad_jax.data.protocol import read_dataset
from zsad_jax.encoders import checkpoint
from zsad_jax.methods import baselines

SMALL = {"image_size": 64, "n_train_good": 1, "n_test_good": 1}
SMALL_TEST = {"n_train_good": 1, "n_test_good": 2, "n_test_defect": 2}


def _files(root):
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# The families.


def test_training_side_shares_no_category_or_defect_kind_with_either_held_out_family():
    aux = procedural.aux_categories(procedural.AUX.defaults)
    assert len(aux) == 6 + 3 * len(procedural_scenes.AUX_FAMILIES)
    held_out = set(synthetic.SYNTHETIC_HELDOUT_CATEGORIES) | set(novel_scenes.NOVEL_CATEGORIES)
    families = {c.rpartition("_")[0] or c for c in aux} | set(aux)
    assert not families & held_out
    assert set(synthetic.SYNTHETIC_TRAIN_CATEGORIES) <= set(aux)
    # The second family's defect kinds are new; the benchmark's are among the training kinds.
    assert not set(procedural_defects.AUX_DEFECT_TYPES) & set(novel_scenes.NOVEL_DEFECT_TYPES)
    assert set(synthetic_defects.DEFECT_TYPES) <= set(procedural_defects.AUX_DEFECT_TYPES)
    # Different generators, not re-uses of the training ones.
    training_fns = set(synthetic_scenes.RENDERERS.values()) | {
        f for _, f in procedural_scenes.AUX_FAMILIES.values()
    }
    assert not set(novel_scenes.RENDERERS.values()) & training_fns


@pytest.mark.parametrize("family", sorted(procedural.FAMILIES))
def test_same_parameters_give_identical_bytes(family, tmp_path):
    fam = procedural.FAMILIES[family]
    cats = fam.categories(fam.defaults)[-2:]
    n_defect = len(fam.defect_types)
    a = procedural.generate(family, str(tmp_path / "a"), cats, n_test_defect=n_defect, **SMALL)
    b = procedural.generate(family, str(tmp_path / "b"), cats, n_test_defect=n_defect, **SMALL)
    files = _files(a)
    assert files == _files(b)
    assert len([f for f in files if "ground_truth" in f]) == len(cats) * n_defect
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []


def test_every_held_out_category_and_defect_renders_with_a_visible_mask():
    params = procedural._full_params(procedural.NOVEL, {})
    for category in novel_scenes.NOVEL_CATEGORIES:
        for kind in novel_scenes.NOVEL_DEFECT_TYPES:
            image, mask = procedural.render_image(
                procedural.NOVEL, category, params, "test", kind, 0
            )
            assert image.shape == (128, 128, 3) and image.dtype == np.uint8
            assert mask.sum() >= int(synthetic_defects.MIN_AREA_FRACTION * 128 * 128)


def test_readers_are_registered_and_generate_into_the_root(tmp_path):
    records = read_dataset(
        "synthetic_novel",
        str(tmp_path / "novel"),
        "test",
        ["gear"],
        n_test_good=2,
        n_test_defect=5,
        n_train_good=0,
        image_size=64,
    )
    assert [r.category for r in records] == ["gear"] * 7
    assert {r.defect_type for r in records} == {"good", *novel_scenes.NOVEL_DEFECT_TYPES}
    with pytest.raises(ValueError, match="unknown synthetic_novel options"):
        read_dataset("synthetic_novel", str(tmp_path / "x"), n_styles=2)


def test_existing_benchmark_generator_is_untouched():
    # The benchmark renders through its own modules only (byte identity is checked by
    # tests/test_synthetic.py against itself; this guards against accidental re-routing).
    assert synthetic.render_image.__module__ == "zsad_jax.data.synthetic"
    assert synthetic_defects.DEFECT_TYPES == (
        "scratch",
        "hole",
        "stain",
        "missing_part",
        "color_shift",
    )


# ----------------------------------------------------------------------------------------------
# Baselines.


def test_colour_median_baseline_is_the_distance_to_the_median_colour():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = baselines.ColourMedianDistance()({"image": jnp.asarray(images)})
    d = np.linalg.norm(images - np.median(images, axis=(1, 2), keepdims=True), axis=-1)
    np.testing.assert_allclose(np.asarray(out["anomaly_map"]), d / (1 + d), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out["pred_score"]), (d / (1 + d)).max(axis=(1, 2)), rtol=1e-5
    )


def test_baselines_get_the_configs_test_time_smoothing_after_their_image_score():
    """The demo smooths its model's pixel map (model.smoothing_sigma): the baselines beside it are
    smoothed alike, so a smoothed map is not compared with raw ones."""
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 24, 3)), jnp.float32)
    config = demo.get_config()
    assert config.model.smoothing_sigma == 7.2  # 4 px at 160, the same smoothing at 288
    baseline = baselines.build_baseline("colour_median", config)
    raw = _jitted_call(baselines.ColourMedianDistance(), images)
    out = _jitted_call(baseline, images)
    np.testing.assert_array_equal(np.asarray(out["pred_score"]), np.asarray(raw["pred_score"]))
    smoothed = [scipy.ndimage.gaussian_filter(m, 7.2) for m in np.asarray(raw["anomaly_map"])]
    np.testing.assert_allclose(np.asarray(out["anomaly_map"]), np.stack(smoothed), atol=1e-6)
    # Built abstractly: only the setting is read, not the random encoder's weights.
    tokens = nnx.eval_shape(lambda: baselines.build_baseline("random_token_median", config))
    assert tokens.smoothing_sigma == 7.2
    assert baselines.build_baseline("colour_median", demo.get_config("tiny")).smoothing_sigma == 0


def test_token_baseline_uses_a_random_small_dinov3():
    config = demo.get_config()
    model = baselines.build_baseline("random_token_median", config)
    assert model.backbone.config.hidden_size == 96 and model.layers == (2, 4, 6)
    out = _jitted_call(model, jnp.zeros((1, 128, 128, 3)))
    assert out["anomaly_map"].shape == (1, 128, 128)


def _jitted_call(model, images):
    """``model({"image": images})`` under jit, as evaluation runs it (``zsad_jax.inference``);
    eagerly the smoothing's padding and taps compile dozens of small programs (~3 s)."""
    return nnx.jit(lambda m, x: m({"image": x}))(model, images)


def _small_held_out_sets(tmp_path, monkeypatch):
    """A config whose test side is one small generated category (``pill``) and whose one extra
    held-out set (``mpdd``, read from its patched default root) is another (``wood``)."""
    main_root = synthetic.generate(
        str(tmp_path / "a"), image_size=48, categories=("pill",), **SMALL_TEST
    )
    extra_root = synthetic.generate(
        str(tmp_path / "b"), image_size=48, categories=("wood",), **SMALL_TEST
    )
    monkeypatch.setattr(protocol, "default_root", lambda name: extra_root)
    config = demo.get_config("tiny")
    config.data.update(test_set="mvtec_ad", test_root=main_root, test_categories=("pill",))
    config.data.transform = "plain"
    config.eval.update(extra_test_sets="mpdd", baselines="colour_median", num_vis=0)
    return config


def test_training_reports_transfer_on_every_held_out_set_beside_the_baselines(
    tmp_path, monkeypatch
):
    """The demo's last JSON line: ``train.default_evaluator`` adds ``zsad_jax.transfer``'s report.
    The model here *is* the colour baseline, so both routes must give the same numbers."""
    config = _small_held_out_sets(tmp_path, monkeypatch)
    result = train_lib.default_evaluator(config)(baselines.ColourMedianDistance(), 0)
    report = result["transfer"]
    assert sorted(report) == ["mpdd", "mvtec_ad"]
    assert report["mvtec_ad"]["model"]["pixel_AUROC"] == result["pixel_AUROC"]
    for row in report.values():
        assert set(row) == {"model", "colour_median"}
        assert row["model"] == row["colour_median"]
        assert 0.0 <= row["model"]["image_AUROC"] <= 1.0
    config.eval.update(extra_test_sets="", baselines="")
    assert "transfer" not in train_lib.default_evaluator(config)(
        baselines.ColourMedianDistance(), 0
    )


def test_kind_report_scores_each_defect_kind_against_all_normal_images(tmp_path, monkeypatch):
    """``transfer.kind_report`` (the README's per-kind figures, ``tools/demo_transfer.py
    --by_kind``) against scikit-learn on one full evaluation's kept outputs, split by kind."""
    from sklearn.metrics import roc_auc_score

    from zsad_jax import evaluate as evaluate_lib
    from zsad_jax import transfer

    config = _small_held_out_sets(tmp_path, monkeypatch)
    model = baselines.ColourMedianDistance()
    report = transfer.kind_report(model, config)
    assert sorted(report) == ["mpdd", "mvtec_ad"]
    for set_name, c in transfer.heldout_configs(config).items():
        kept = evaluate_lib.evaluate(model, c, num_vis=0, keep_outputs=True)["outputs"]
        kinds = {r.path: r.defect_type for r in read_dataset("mvtec_ad", c.data.test_root)}
        kind_of = np.array([kinds[str(p)] for p in kept["path"]])
        assert sorted(report[set_name]) == sorted(set(kind_of) - {"good"})
        for kind, row in report[set_name].items():
            assert set(row) == {"model", "colour_median"}
            assert row["model"] == row["colour_median"]
            rows = (kind_of == "good") | (kind_of == kind)
            image = roc_auc_score(kept["gt_label"][rows], kept["pred_score"][rows])
            pixel = roc_auc_score(kept["gt_mask"][rows].ravel(), kept["anomaly_map"][rows].ravel())
            assert row["model"]["image_AUROC"] == pytest.approx(image, abs=1e-6)
            assert row["model"]["pixel_AUROC"] == pytest.approx(pixel, abs=1e-5)


def test_demo_transfer_tool_prints_the_per_kind_report(tmp_path, monkeypatch, capsys):
    """``tools/demo_transfer.py --by_kind`` as typed (baselines only, the small sets above)."""
    import importlib.util

    config = _small_held_out_sets(tmp_path, monkeypatch)
    spec = importlib.util.spec_from_file_location(
        "demo_transfer", Path(__file__).resolve().parent.parent / "tools" / "demo_transfer.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(
        [
            "--config=configs/demo.py:tiny",
            "--baselines_only",
            "--by_kind",
            "--baselines=colour_median",
            "--extra=mpdd",
            "--set=data.test_set=mvtec_ad",
            f"--set=data.test_root={config.data.test_root}",
            "--set=data.transform=plain",
            "--set=eval.num_vis=0",
        ]
    )
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    for set_name, root in [
        ("mvtec_ad", config.data.test_root),
        ("mpdd", protocol.default_root("")),
    ]:
        kinds = {r.defect_type for r in read_dataset("mvtec_ad", root) if r.gt_label}
        assert sorted(result["by_kind"][set_name]) == sorted(kinds)
        for kind, row in result["by_kind"][set_name].items():
            assert set(row) == {"colour_median"} and 0 <= row["colour_median"]["pixel_AUROC"] <= 1
            assert f"{set_name} {kind} " in err


# ----------------------------------------------------------------------------------------------
# The shipped backbone.


def test_demo_uses_the_shipped_backbone_and_the_auxiliary_family():
    config = demo.get_config()
    assert config.model.backbone.checkpoint == demo.PRETRAINED
    assert not config.model.backbone.random_init
    assert config.data.train_set == "synthetic_aux" and config.data.test_set == "synthetic"
    assert tuple(config.data.test_categories) == synthetic.SYNTHETIC_HELDOUT_CATEGORIES
    assert config.eval.extra_test_sets == "synthetic_novel"
    # Heads trained at 160 px, tested at 288 (chosen on the training-side validation split).
    assert (config.data.train_image_size, config.data.image_size) == (160, 288)
    assert demo.get_config("random").model.smoothing_sigma == 4.0  # its earlier figures stand
    old = demo.get_config("random,benchmark")
    assert old.model.backbone.random_init and old.data.train_set == "synthetic"
    tiny = demo.get_config("tiny")
    assert tiny.model.backbone.random_init and tiny.data.train_set == "synthetic"
    assert tiny.eval.extra_test_sets == "" and tiny.eval.baselines == ""


def test_shipped_backbone_loads_through_the_converted_checkpoint_path():
    from zsad_jax.methods.backbone import build_backbone

    meta = checkpoint.read_meta(demo.PRETRAINED)
    assert meta["type"] == "dinov3"
    weights = os.path.join(demo.PRETRAINED, checkpoint.WEIGHTS_FILE)
    assert os.path.getsize(weights) <= 20 * 2**20
    config = demo.get_config()
    encoder = build_backbone(config.model.backbone, rngs=nnx.Rngs(0))
    tokens, _ = encoder(jnp.zeros((1, 128, 128, 3)))
    assert tokens.shape == (1, 1 + 4 + 256, 96) and bool(jnp.isfinite(tokens).all())
    record = json.load(open(os.path.join(demo.PRETRAINED, "pretrain.json")))
    assert record["command"].startswith("python -m zsad_jax.pretrain.backbone")
    assert "reduced" in record and "val" in record
    # The README and --help give the command that made the shipped backbone: this record's.
    readme = " ".join((Path(demo.PRETRAINED).parents[1] / "README.md").read_text().split())
    assert f"`{record['command']}`" in readme
    from zsad_jax.pretrain import backbone

    assert record["command"].split(" ", 3)[3] in " ".join(backbone.EPILOG.split())


@pytest.mark.slow
def test_pretraining_script_reproduces_the_recorded_reduced_run(tmp_path):
    """Re-runs the recorded reduced-scale command; its validation patch AUROC and loss must match
    the ones recorded with the shipped backbone (tolerances: 0.02 AUROC, 2 % loss)."""
    from zsad_jax.pretrain import backbone

    record = json.load(open(os.path.join(demo.PRETRAINED, "pretrain.json")))
    reduced = record["reduced"]
    _, got = backbone.pretrain(dict(reduced["options"]), log=lambda m: None)
    want = reduced["val"]
    assert abs(got["val"]["patch_AUROC"] - want["patch_AUROC"]) <= 0.02
    assert math.isclose(got["val"]["loss"], want["loss"], rel_tol=0.02)
    # The full run's options differ from the reduced run's in scale only, and that scale is the
    # command's own (``REDUCED``): the recorded command would write this record again.
    scale = {"steps", "pool", "val", "batch", "warmup", "log_every"}
    full = record["options"]
    assert {k for k in full if full[k] != reduced["options"][k]} <= scale
    assert {k: reduced["options"][k] for k in backbone.REDUCED} == backbone.REDUCED


def test_pretraining_refuses_an_existing_out_before_it_trains(tmp_path, monkeypatch):
    """``--out`` is checked first: the refusal must not come after half an hour of pretraining
    (``--out pretrained/dinov3-small-procedural`` would replace the shipped backbone)."""
    from zsad_jax.pretrain import backbone

    monkeypatch.setattr(backbone, "pretrain", lambda *a, **k: pytest.fail("trained first"))
    shutil.copytree(demo.PRETRAINED, tmp_path / "shipped")
    with pytest.raises(FileExistsError, match="already holds a converted dinov3 checkpoint"):
        backbone.main(["--out", str(tmp_path / "shipped")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="a folder of other files"):
        backbone.main(["--out", str(tmp_path / "mine")])


def test_pretraining_refuses_a_linked_out_before_it_trains(tmp_path, monkeypatch):
    """A link ``--out`` (to a converted checkpoint, even with ``--overwrite``, or dangling) is
    refused up front with the folder to pass instead: the finished checkpoint is renamed onto
    ``--out``, which fails on a link, so it used to fail with a bare OSError after the training."""
    from zsad_jax.pretrain import backbone

    monkeypatch.setattr(backbone, "pretrain", lambda *a, **k: pytest.fail("trained first"))
    shutil.copytree(demo.PRETRAINED, tmp_path / "shipped")
    (tmp_path / "link").symlink_to(tmp_path / "shipped")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link, target in (("link", "shipped"), ("dangling", "nowhere")):
        want = f"--out {tmp_path / link}: is a symbolic link .* --out {tmp_path / target}$"
        with pytest.raises(FileExistsError, match=want):
            backbone.main(["--out", str(tmp_path / link), "--overwrite"])
    assert checkpoint.weights_digest(tmp_path / "shipped") == checkpoint.weights_digest(
        demo.PRETRAINED
    )


def test_pretraining_refusal_is_one_line_on_the_command_line(tmp_path):
    """``python -m zsad_jax.pretrain.backbone`` with an --out that holds files: one line, exit 1."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    proc = run_module("zsad_jax.pretrain.backbone", ["--out", "mine", "--steps", "6400"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out mine: a folder of other files")


def test_pretraining_help_gives_every_option_a_default_and_names_the_reduced_run():
    from zsad_jax.pretrain import backbone

    text = backbone._parser().format_help()
    for key, value in backbone.DEFAULTS.items():
        assert key in backbone.OPTION_HELP
        assert f"(default: {value})" in " ".join(text.split()), key
    assert "--no_reduced" in text and f"steps={backbone.REDUCED['steps']}" in text
    assert "usage: python -m zsad_jax.pretrain.backbone" in text


def _fake_pretraining(monkeypatch):
    """``main`` with pretrain() and save() replaced: the calls and the saved record."""
    from zsad_jax.pretrain import backbone

    calls, saved = [], {}

    def fake_pretrain(opts, *, log=print):
        calls.append(opts)
        return object(), {"options": opts, "val": {"loss": 1.0}, "seconds": 0.0}

    def fake_save(model, out, record, command):
        saved.update(record, command=command)

    monkeypatch.setattr(backbone, "pretrain", fake_pretrain)
    monkeypatch.setattr(backbone, "save", fake_save)
    return backbone, calls, saved


def test_pretraining_announces_the_reduced_run_and_no_reduced_skips_it(
    tmp_path, monkeypatch, capsys
):
    backbone, calls, saved = _fake_pretraining(monkeypatch)
    backbone.main(["--out", str(tmp_path / "a"), "--steps", "5"])
    assert [c["steps"] for c in calls] == [5, backbone.REDUCED["steps"]]
    assert saved["reduced"]["options"]["steps"] == backbone.REDUCED["steps"]
    steps = backbone.REDUCED["steps"]
    assert f"reference run at the reduced scale ({steps} steps" in capsys.readouterr().err
    assert saved["command"].endswith("--steps 5")

    calls.clear()
    backbone.main(["--out", str(tmp_path / "b"), "--steps", "5", "--no_reduced"])
    assert [c["steps"] for c in calls] == [5]
    assert saved["reduced"] is None and saved["command"].endswith("--steps 5 --no_reduced")
    assert "reduced scale" not in capsys.readouterr().err


def test_demo_transfer_tool_refuses_a_missing_checkpoint_in_one_line():
    """Typed from the repository root with a relative path that is not there."""
    import subprocess
    import sys

    from toys import REPO

    done = subprocess.run(
        [sys.executable, "tools/demo_transfer.py", "--checkpoint=runs/nosuch", "--by_kind"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: runs/nosuch: no such checkpoint directory; pass a training workdir (with "
        "checkpoints/), its checkpoints/ folder or one step folder"
    ]


def test_pretraining_hold_out_never_renders_the_held_out_families(monkeypatch):
    """``--hold_out`` keeps families out of the pretraining images (a backbone can then be judged
    on them, ``configs/demo.py:select``); without it every family is drawn."""
    from zsad_jax.pretrain import backbone

    drawn = []

    def recording(family, render):
        return lambda *a, **k: drawn.append(family) or render(*a, **k)

    families = {
        name: (style, recording(name, render))
        for name, (style, render) in procedural_scenes.AUX_FAMILIES.items()
    }
    monkeypatch.setattr(procedural_scenes, "AUX_FAMILIES", families)
    backbone.normal_pool(60, 32, 0, hold_out=("cloud", "sand"))
    assert drawn and not {"cloud", "sand"} & set(drawn)
    drawn.clear()
    backbone.normal_pool(60, 32, 0)
    assert {"cloud", "sand"} & set(drawn)


def test_pretraining_refuses_a_bad_hold_out_before_it_trains(monkeypatch):
    from zsad_jax.pretrain import backbone

    monkeypatch.setattr(backbone, "pretrain", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(ValueError, match=r"^--hold_out cloud,sandd: unknown auxiliary 'sandd'; "):
        backbone.main(["--out", "unused", "--hold_out", "cloud,sandd"])
    every = ",".join(procedural_scenes.AUX_FAMILIES)
    with pytest.raises(ValueError, match="holds out every auxiliary family"):
        backbone.main(["--out", "unused", "--hold_out", every])
    assert backbone.hold_out_families("") == ()
    assert backbone.hold_out_families(" cloud, sand ") == ("cloud", "sand")


def test_select_splits_synthetic_aux_by_family():
    """``configs/demo.py:select`` trains on synthetic_aux_select without ``SELECT_FAMILIES`` and
    tests on exactly their categories; it refuses the variants that change the data or the
    backbone."""
    config = demo.get_config("select")
    train, test = set(config.data.categories), set(config.data.test_categories)
    assert not train & test
    assert train | test == set(procedural.aux_categories(procedural.AUX.defaults))
    assert {name.rpartition("_")[0] for name in test} == set(demo.SELECT_FAMILIES)
    assert config.data.test_set == config.data.train_set == "synthetic_aux_select"
    assert config.data.test_root == config.data.train_root == "data/synthetic_aux_select"
    assert config.eval.extra_test_sets == ""
    for other in ("tiny", "benchmark", "random"):
        with pytest.raises(ValueError, match="select .* does not combine"):
            demo.get_config(f"select,{other}")


def test_select_training_images_carry_no_test_family_material(monkeypatch):
    """The ``foreign`` defect pastes another auxiliary texture: in ``synthetic_aux_select`` never
    one of ``SELECT_FAMILIES`` (select's training images would show its test families' material),
    in ``synthetic_aux`` any."""
    drawn = []

    def recording(family, render):
        return lambda *a, **k: drawn.append(family) or render(*a, **k)

    textures = {
        name: (style, recording(name, render))
        for name, (style, render) in procedural_scenes.AUX_TEXTURES.items()
    }
    monkeypatch.setattr(procedural_scenes, "AUX_TEXTURES", textures)
    train, _ = demo.select_split()
    for family in (procedural.AUX_SELECT, procedural.AUX):
        drawn.clear()
        params = procedural._full_params(family, {"image_size": 32})
        for category in train[::3]:
            for index in range(3):
                procedural.render_image(family, category, params, "test", "foreign", index)
        assert len(drawn) >= 3 * len(train[::3])  # one per image, more where redrawn
        held = set(drawn) & set(procedural.SELECT_FAMILIES)
        assert bool(held) == (family is procedural.AUX), (family.name, sorted(set(drawn)))


def test_config_check_refuses_a_backbone_that_was_pretrained_on_the_test_families(tmp_path):
    """The shipped backbone saw every auxiliary family, so ``select`` on it would not be zero-shot:
    one line naming the families and the command; a ``--hold_out`` backbone passes."""
    from zsad_jax import config_check

    config = demo.get_config("select")
    found = config_check.problems(config)
    assert len(found) == 1 and "rendered the test families cloud,knurl,pebble,sand" in found[0]
    assert "--hold_out cloud,knurl,pebble,sand" in found[0]
    candidate = tmp_path / "candidate"
    shutil.copytree(demo.PRETRAINED, candidate)
    record = json.loads((candidate / "pretrain.json").read_text())
    for held, problems in (
        ("cloud,sand", 1),
        ("cloud,knurl,pebble,sand", 0),
        (" sand, cloud, knurl, pebble", 0),
    ):
        record["options"]["hold_out"] = held
        (candidate / "pretrain.json").write_text(json.dumps(record))
        config.model.backbone.checkpoint = str(candidate)
        assert len(config_check.problems(config)) == problems, held
    assert config_check.problems(demo.get_config("")) == []
