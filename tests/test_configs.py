"""Every config file: every variant it accepts has no config problem and builds by shape with its
exact trainable parameter count; it says how to get missing weights, and its ``tiny`` variant
trains two steps end to end through ``python -m zsad_jax.train``'s code path on the synthetic
benchmark; its variants are checked and its recipe constants are the official ones."""

from __future__ import annotations

import importlib
import json
import math
import re

import numpy as np
import pytest

from configs import dlvp_clip
from zsad_jax import methods, summary
from zsad_jax import train as train_lib
from zsad_jax.config_check import check, problems
from zsad_jax.data import synthetic, transforms
from zsad_jax.nn import resolve_compute_dtype

METHOD_CONFIGS = ("af_clip", "ava_dino", "acd_clip", "dlvp_clip")


def _config(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


# ----------------------------------------------------------------------------------------------
# Every config file with every variant it accepts: no config problem, and the model builds by shape
# (``nnx.eval_shape``: no weights read, nothing computed) with exactly this many trainable
# parameters. The counts the spec (/work/shared/spec/methods.md) and the config docstrings state
# are these: AF-CLIP 2,109,440 (2.11 M), AVA-DINO 27,131,904 (28,311,552 with fc2), ACD-CLIP (N=4)
# 13,283,360 (13.3 M), DLVP-CLIP 11,326,976 (STATED below). A string: the build refuses the
# variant with that message (the tiny CLIP has 3 blocks, which only N=3 groups divide).
N_GROUPS_REFUSED = "does not divide the 3 blocks of this backbone"
TRAINABLE = {
    "af_clip": {
        None: 2_109_440, "tiny": 3_344, "small": 25_632, "clean": 2_109_440, "tiny,clean": 3_344,
        "small,clean": 25_632, "train_set=visa": 2_109_440,
        "train_set=visa,test_set=mvtec_ad": 2_109_440, "train_set=visa,tiny": 3_344,
        "test_set=btad": 2_109_440,
    },
    "acd_clip": {
        None: 13_283_360, "tiny": 29_202, "domain=medical": 13_283_360,
        "domain=industrial": 13_283_360, "train_set=visa": 13_283_360, "n_groups=2": 6_639_624,
        "n_groups=3": 9_960_978, "n_groups=4": 13_283_360, "n_groups=6": 19_931_208,
        "tiny,n_groups=2": N_GROUPS_REFUSED, "tiny,n_groups=3": 29_202,
        "tiny,n_groups=4": N_GROUPS_REFUSED, "tiny,n_groups=6": N_GROUPS_REFUSED,
    },
    "dlvp_clip": {
        None: 11_326_976, "tiny": 11_712, "train_set=visa": 11_326_976,
        "ablation=baseline": 2_403_072, "ablation=slfs_only": 3_452_672,
        "ablation=mlop_only": 4_239_872, "ablation=no_hfd": 4_239_872,
        "ablation=full": 11_326_976, "ablation=global_token": 11_326_976,
        "ablation=sobel": 11_326_976, "tiny,ablation=baseline": 2_392,
        "tiny,ablation=slfs_only": 4_744, "tiny,ablation=mlop_only": 6_312,
        "tiny,ablation=no_hfd": 6_312, "tiny,ablation=full": 11_712,
        "tiny,ablation=global_token": 11_712, "tiny,ablation=sobel": 11_712,
        "top_k=1": 11_326_984, "top_k=2": 11_326_988, "top_k=3": 11_326_992,
        "top_k=4": 11_326_976, "top_k=5": 11_327_000, "dpam": 11_326_976,
        "seg_weight=4": 11_326_976, "anomalyclip": 11_326_976, "backbone=openai": 11_326_976,
        "backbone=openai_gelu": 11_326_976, "backbone=laion400m": 11_326_976,
    },
    "ava_dino": {
        None: 27_131_904, "tiny": 10_112, "small": 161_792, "paper": 27_131_904,
        "fc2": 28_311_552, "paper,fc2": 28_311_552, "tiny,paper": 10_112,
        "train_set=visa": 27_131_904, "small,train_set=visa": 161_792,
    },
    "demo": {
        None: 161_792, "tiny": 10_112, "paper": 161_792, "fc2": 169_984,
        "train_set=visa": 161_792,
    },
}  # fmt: skip
VARIANTS = [(name, arg) for name, counts in TRAINABLE.items() for arg in counts]
# (config, variant, the count as its module docstring states it)
STATED = [
    ("af_clip", None, "2,109,440"),
    ("ava_dino", None, "27,131,904"),
    ("ava_dino", "fc2", "28,311,552"),
    ("acd_clip", None, "13,283,360"),
    ("dlvp_clip", None, "11,326,976"),
]
# The sections methods.build does not read: variants that differ only there share one build.
_NOT_BUILT_FROM = ("ckpt", "eval", "log_every_steps", "max_bad_steps", "mesh", "optim")
_BUILDS: dict[str, int | Exception] = {}


def _trainable_count(config) -> int:
    """The trainable parameter count of ``config``'s model, built by shape (once per model)."""
    built_from = {k: v for k, v in config.to_dict().items() if k not in _NOT_BUILT_FROM}
    built_from["data"] = {"image_size": config.data.image_size}
    key = json.dumps(built_from, sort_keys=True, default=str)
    if key not in _BUILDS:
        try:
            model = summary.abstract_model(config)  # what `python -m zsad_jax.summary` counts
            _BUILDS[key] = summary.count_parameters(model)["trainable_params"]
        except ValueError as e:
            _BUILDS[key] = e
    if isinstance(_BUILDS[key], Exception):
        raise _BUILDS[key]
    return _BUILDS[key]


@pytest.mark.parametrize("name, arg", VARIANTS, ids=[f"{n}:{a or ''}" for n, a in VARIANTS])
def test_every_config_file_and_variant_has_no_problem(name, arg):
    config = _config(name, arg)
    assert problems(config) == []
    check(config)  # does not raise


@pytest.mark.parametrize("name, arg", VARIANTS, ids=[f"{n}:{a or ''}" for n, a in VARIANTS])
def test_every_variant_builds_by_shape_with_its_exact_trainable_count(name, arg):
    config = _config(name, arg)
    assert config.method in methods.METHODS
    expected = TRAINABLE[name][arg]
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            _trainable_count(config)
    else:
        assert _trainable_count(config) == expected


def test_the_table_holds_every_variant_the_config_files_declare():
    dlvp = {f"top_k={k}" for k in dlvp_clip.TOP_K} | {f"backbone={b}" for b in dlvp_clip.BACKBONES}
    for ablation in dlvp_clip.ABLATIONS:
        dlvp |= {f"ablation={ablation}", f"tiny,ablation={ablation}"}
    assert dlvp <= set(TRAINABLE["dlvp_clip"])
    groups = {f"{tiny}n_groups={n}" for n in (2, 3, 4, 6) for tiny in ("", "tiny,")}
    assert groups <= set(TRAINABLE["acd_clip"])


def test_stated_trainable_counts_are_the_built_ones():
    for name, arg, stated in STATED:
        assert f"{stated}" in importlib.import_module(f"configs.{name}").__doc__, (name, stated)
        assert TRAINABLE[name][arg] == int(stated.replace(",", "")), (name, arg)


# ----------------------------------------------------------------------------------------------
# Missing weights, and the tiny variants train.


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_full_size_config_without_weights_says_how_to_convert(name, tmp_path):
    config = _config(name)
    config.model.backbone.checkpoint = str(tmp_path / "weights" / "missing")
    with pytest.raises(FileNotFoundError) as err:
        train_lib.train(config, tmp_path / "run", evaluator=None, progress=False)
    message = str(err.value)
    assert str(tmp_path / "weights" / "missing") in message
    assert "python -m convert." in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any work


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    return synthetic.ensure(root)  # the readers regenerate any other parameter set


# The other two tiny variants train through the same code path elsewhere, then are evaluated:
# AF-CLIP's in tests/test_predict.py (test_af_clip_train_evaluate_predict_and_few_shot, with these
# assertions), AVA-DINO's as configs/demo.py:tiny in tests/test_user_path.py (the README's train
# command, 2 steps, checkpoints read back by evaluate).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["acd_clip", "dlvp_clip"])
def test_tiny_variant_trains_a_step(name, synthetic_root, tmp_path):
    config = _config(name, "tiny")
    config.data.train_root = config.data.test_root = synthetic_root
    config.data.batch_size = 8  # a multiple of the 8 test devices
    config.optim.steps = 2
    config.eval.enabled = False
    result = train_lib.train(config, tmp_path / "run", progress=False)
    assert result["steps"] == 2 and math.isfinite(result["loss"]) and result["bad_steps"] == 0
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert np.isfinite(result["loss"])


# ----------------------------------------------------------------------------------------------
# Variants: every config refuses what it does not know, in one line naming the file.

ALL_CONFIGS = (*METHOD_CONFIGS, "demo")


def _refusal(name: str, arg: str) -> str:
    with pytest.raises(ValueError) as err:
        _config(name, arg)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"configs/{name}.py: "), message
    return message


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_unknown_variant_is_refused_with_a_suggestion_and_the_known_ones(name):
    message = _refusal(name, "tinyy")
    assert "unknown variant 'tinyy' (did you mean 'tiny'?)" in message
    assert "known variants: train_set=..., test_set=..., " in message
    assert ", tiny" in message
    message = _refusal(name, "tiny,foo,bar")
    assert "unknown variants 'foo', 'bar'" in message


@pytest.mark.parametrize("name", ALL_CONFIGS)
@pytest.mark.parametrize(
    "arg, expected",
    [
        ("tiny=3", "variant 'tiny' is a flag and takes no value (got 'tiny=3'"),
        ("train_set", "variant 'train_set' needs a value"),
        ("test_set=", "variant 'test_set' needs a value"),
        ("train_set=vissa", "train_set='vissa' is not a known dataset (did you mean 'visa'?)"),
        ("test_set=mvtec", "test_set='mvtec' is not a known dataset (did you mean 'mvtec_ad'?)"),
        ("test_set=pkg.mod:fn", "test_set='pkg.mod:fn' is not a known dataset"),
        ("train_set=visa,train_set=mvtec_ad", "variant 'train_set' given twice"),
    ],
)
def test_malformed_variants_are_refused(name, arg, expected):
    assert expected in _refusal(name, arg)


def test_dataset_variants_list_the_known_datasets():
    from zsad_jax.data.protocol import READERS

    message = _refusal("af_clip", "train_set=nope")
    assert f"known datasets: {', '.join(sorted(READERS))}" in message


def test_dataset_variants_take_any_case_as_the_readers_do():
    # read_dataset lower-cases the name, and so does --config.data.train_set=VisA
    # (config_check); the variant must not refuse what the key accepts.
    assert (
        _config("af_clip", "train_set=VisA").to_dict()
        == _config("af_clip", "train_set=visa").to_dict()
    )
    assert "(did you mean 'visa'?)" in _refusal("af_clip", "train_set=VISSA")


@pytest.mark.parametrize(
    "name, arg, expected",
    [
        ("acd_clip", "n_groups=5", "n_groups='5' is not allowed; use n_groups=2|3|4|6"),
        ("acd_clip", "domain=medicl", "domain='medicl' is not allowed (did you mean 'medical'?)"),
        ("dlvp_clip", "ablation=sobell", "ablation='sobell' is not allowed (did you mean 'sobel'"),
        ("dlvp_clip", "ablation", "variant 'ablation' needs a value"),
        ("af_clip", "clean=1", "variant 'clean' is a flag"),
        ("ava_dino", "paperr", "unknown variant 'paperr' (did you mean 'paper'?)"),
        ("demo", "fc", "unknown variant 'fc' (did you mean 'fc2'?)"),
    ],
)
def test_config_specific_variants_are_checked(name, arg, expected):
    assert expected in _refusal(name, arg)


def test_known_variants_still_build():
    c = _config("af_clip", " train_set=visa , clean ")
    assert (c.data.train_set, c.data.test_set) == ("visa", "mvtec_ad")
    assert c.model.loss.normal_target == 0.0
    assert _config("af_clip", "train_set=visa,test_set=btad").data.test_set == "btad"
    # A package.module:callable training set (zsad_jax.train.make_train_data) passes.
    assert _config("af_clip", "train_set=my_pkg.data:train_data").data.train_set == (
        "my_pkg.data:train_data"
    )
    assert _config("acd_clip", "n_groups=2,domain=medical").model.n_groups == 2
    assert _config("dlvp_clip", "ablation=sobel").model.hfd_kind == "sobel"
    assert _config("ava_dino", "paper,fc2").model.prompt_adapter_fc2
    assert _config("demo", "paper").model.backbone.preset == "small"


def test_parse_variants_helper():
    from configs.common import DATASET, FLAG, VALUE, parse_variants

    known = {"train_set": DATASET, "tag": VALUE, "k": ("1", "2"), "tiny": FLAG}
    assert parse_variants(None, known, "x.py") == {}
    assert parse_variants("", known, "x.py") == {}
    assert parse_variants("tiny,,tag=a b ,k=2,tiny", known, "x.py") == {
        "tiny": True,
        "tag": "a b",
        "k": "2",
    }
    with pytest.raises(ValueError) as err:
        parse_variants("tiyn", known, "x.py")
    assert str(err.value) == (
        "x.py: unknown variant 'tiyn' (did you mean 'tiny'?); "
        "known variants: train_set=..., tag=..., k=1|2, tiny"
    )
    with pytest.raises(ValueError, match=re.escape("k='3' is not allowed; use k=1|2")):
        parse_variants("k=3", known, "x.py")


# ----------------------------------------------------------------------------------------------
# Recipe constants: each default config against the numbers of /work/shared/spec/methods.md (the
# section is cited per row).


def _recipe(name, key, expected, section, arg=None):
    """One row: ``config.<key>`` of ``configs/<name>.py[:arg]`` must equal ``expected``, the number
    of methods.md ``section``."""
    return pytest.param(
        name, arg, key, expected, section, id=f"{name}{':' + arg if arg else ''}:{key}"
    )


RECIPE = [
    # --- AF-CLIP (methods.md §1; §0 for the backbone) ---
    _recipe("af_clip", "model.backbone.preset", "vit_l14_336", "§0, §1.1 ViT-L/14@336px"),
    _recipe("af_clip", "model.act", "quick_gelu", "§0 activation quirk"),
    _recipe("af_clip", "model.pos_resize", "bilinear", "§0 pos-embed resize"),
    _recipe("af_clip", "compute_dtype", "auto", "§0 precision: float32 on CPU"),
    _recipe("af_clip", "data.image_size", 518, "§1.1 --img_size 518"),
    _recipe("af_clip", "data.transform", "clip", "§1.1 bicubic + CLIP normalise"),
    _recipe("af_clip", "data.train_transform", "clip", "§1.6 no augmentation"),
    _recipe("af_clip", "model.feature_layers", (6, 12, 18, 24), "§1.1 --feature_layers"),
    _recipe("af_clip", "model.aggregation_sizes", (1, 3, 5), "§1.2 r in {1,3,5}"),
    _recipe("af_clip", "model.aggregation_sigma", 4.0, "§1.2 sigma=4"),
    _recipe("af_clip", "model.adaptor.heads", 8, "§1.3 heads=8"),
    _recipe("af_clip", "model.adaptor.head_dim", 64, "§1.3 dim_head=64"),
    _recipe("af_clip", "model.prompt_length", 12, "§1.3 --prompt_len 12"),
    _recipe("af_clip", "model.temperature", 0.07, "§1.5 logits / 0.07"),
    _recipe("af_clip", "model.smoothing_sigma", 4.0, "§1.5 gaussian_filter(sigma=4)"),
    _recipe("af_clip", "model.memory_layers", (6, 12, 18, 24), "§1.5 --memory_layers"),
    _recipe("af_clip", "model.few_shot.alpha", 0.1, "§1.5 alpha=0.1"),
    _recipe("af_clip", "model.loss.gamma", 4.0, "§1.6 focal gamma=4"),
    _recipe("af_clip", "model.loss.lambda1", 1.0, "§1.6 lambda1=1"),
    _recipe("af_clip", "model.loss.lambda2", 1.0, "§1.6 lambda2=1"),
    _recipe("af_clip", "model.loss.normal_target", -1.0, "§1.6 hidden side effect (t=-1)"),
    _recipe("af_clip", "model.loss.normal_target", 0.0, "§1.6 clean port", arg="clean"),
    _recipe("af_clip", "optim.name", "adam", "§1.6 Adam"),
    _recipe("af_clip", "optim.lr", 1e-4, "§1.6 lr 1e-4"),
    _recipe("af_clip", "optim.b1", 0.5, "§1.6 betas (0.5, 0.999)"),
    _recipe("af_clip", "optim.b2", 0.999, "§1.6 betas (0.5, 0.999)"),
    _recipe("af_clip", "optim.weight_decay", 0.0, "§1.6 no weight decay"),
    _recipe("af_clip", "optim.schedule", "constant", "§1.6 no scheduler"),
    _recipe("af_clip", "optim.warmup_fraction", 0.0, "§1.6 no scheduler"),
    _recipe("af_clip", "data.batch_size", 8, "§1.6 batch 8"),
    _recipe("af_clip", "optim.epochs", 2, "§1.6 2 epochs"),
    _recipe("af_clip", "seed", 122, "§1.6 seed 122"),
    _recipe("af_clip", "data.train_split", "test", "§1.6 trains on the test split"),
    _recipe(
        "af_clip",
        "data.mask_resize",
        "bicubic_threshold",
        "§1.7 / §9: test masks Resize(518, BICUBIC) then > 0.5",
    ),
    # --- AVA-DINO (methods.md §2) ---
    _recipe("ava_dino", "model.backbone.kind", "dinov3", "§2.1 DINOv3"),
    _recipe("ava_dino", "model.backbone.preset", "vitl16", "§2.1 ViT-L/16"),
    _recipe("ava_dino", "model.text_encoder.preset", "vit_l14_336", "§2.1 CLIP ViT-L/14-336 text"),
    _recipe("ava_dino", "model.text_act", "gelu", "§2.1 / §0 exact GELU"),
    _recipe("ava_dino", "compute_dtype", "auto", "§0 precision: float32 on CPU"),
    _recipe("ava_dino", "data.image_size", 512, "§2.1 512x512"),
    _recipe("ava_dino", "data.transform", "dinov3", "§2.1 bilinear + ImageNet mean/std"),
    _recipe("ava_dino", "data.train_transform", "dinov3", "§2.5 no augmentation"),
    _recipe("ava_dino", "model.layers", (6, 12, 18, 24), "§2.1 blocks[5,11,17,23]"),
    _recipe("ava_dino", "model.patch_std_eps", 1e-6, "§2.1 std + 1e-6"),
    _recipe("ava_dino", "model.bottleneck", 768, "§2.3 bottleneck=768"),
    _recipe("ava_dino", "model.routing_temperature", 0.1, "§2.4 tau=0.1"),
    _recipe("ava_dino", "model.map_scale", 100.0, "§2.4 100 p'T, 100 cls'T"),
    _recipe("ava_dino", "model.aacm_scale", 10.0, "§2.4 sigmoid(10 p'cls')"),
    _recipe("ava_dino", "model.text_interleave_quirk", True, "§2.4 view(B,768,2) quirk"),
    _recipe("ava_dino", "model.image_score_weight", 0.0, "§2.6 image score = max of map"),
    _recipe("ava_dino", "model.smoothing_sigma", 0.0, "§2.6 no Gaussian smoothing"),
    _recipe("ava_dino", "model.visa_class_name_quirk", True, "§2.1 class = path.split('/')[-4]"),
    _recipe("ava_dino", "model.visa_class_name_quirk", False, "paper: real names", arg="paper"),
    _recipe("ava_dino", "model.loss.aacm", 0.25, "§2.5 0.25 [focal+dice](AACM)"),
    _recipe("ava_dino", "model.loss.seg", 0.5, "§2.5 0.5 [focal+dice](CM)"),
    _recipe("ava_dino", "model.loss.global", 0.25, "§2.5 0.25 CE(global)"),
    _recipe("ava_dino", "model.loss.routing", 0.1, "§2.5 0.1 L_route"),
    _recipe("ava_dino", "model.loss.include_aacm", True, "§2.7 code adds 0.25 L_aware"),
    _recipe("ava_dino", "model.loss.include_aacm", False, "§2.7 README loss", arg="paper"),
    _recipe("ava_dino", "optim.name", "adamw", "§2.5 AdamW"),
    _recipe("ava_dino", "optim.lr", 1e-4, "§2.5 lr 1e-4"),
    _recipe("ava_dino", "optim.b1", 0.9, "§2.5 betas (0.9, 0.999)"),
    _recipe("ava_dino", "optim.b2", 0.999, "§2.5 betas (0.9, 0.999)"),
    _recipe("ava_dino", "optim.weight_decay", 1e-2, "§2.5 wd 1e-2"),
    _recipe("ava_dino", "optim.schedule", "warmup_constant", "§2.5 warm-up then constant"),
    _recipe("ava_dino", "optim.warmup_fraction", 0.03, "§2.5 3% of total steps"),
    _recipe("ava_dino", "data.batch_size", 16, "§2.5 batch 16"),
    _recipe("ava_dino", "optim.epochs", 10, "§2.5 10 epochs"),
    _recipe("ava_dino", "data.train_split", "test", "§2.5 trains on the TEST split"),
    # Resolved per side by test_ava_dino_masks_follow_each_sides_dataset: VisA > 0, MVTec > 0.5.
    _recipe("ava_dino", "data.train_mask_resize", "bilinear_by_dataset", "§2.6 by dataset"),
    _recipe("ava_dino", "data.mask_resize", "bilinear_by_dataset", "§2.6 by dataset"),
    # --- ACD-CLIP (methods.md §3; §0 for the backbone) ---
    _recipe("acd_clip", "model.backbone.preset", "vit_l14_336", "§3.1 ViT-L-14-336"),
    _recipe("acd_clip", "model.act", "gelu", "§0 / §3.1 exact GELU"),
    _recipe("acd_clip", "model.pos_resize", "bicubic_antialias", "§0 open_clip resize_pos_embed"),
    _recipe("acd_clip", "compute_dtype", "auto", "§0 precision: float32 on CPU"),
    _recipe("acd_clip", "data.image_size", 518, "§3.1 img_size 518"),
    _recipe("acd_clip", "data.transform", "clip", "§3.1 test transform"),
    _recipe("acd_clip", "data.train_transform", "acd_clip_train", "§3.1 train augmentations"),
    _recipe("acd_clip", "data.mask_resize", "nearest", "§3.1 mask NEAREST, != 0"),
    _recipe("acd_clip", "model.n_groups", 4, "§3.2 default N=4"),
    _recipe("acd_clip", "model.adapter.rank", 16, "§3.3 A: 1024x16"),
    _recipe("acd_clip", "model.adapter.conv_rank", 8, "§3.3 Conv2d(16->8)"),
    _recipe("acd_clip", "model.adapter.kernel_sizes", (3, 5), "§3.3 k in {3,5}"),
    _recipe("acd_clip", "model.adapter.alpha", 2.0, "§3.3 lora_scale 2/sqrt(16)"),
    _recipe("acd_clip", "model.adapter.conv_alpha", 2.0, "§3.3 conv_scale 2/8"),
    _recipe("acd_clip", "model.image_blend_init", 0.2, "§3.3 AddWeight init 0.2"),
    _recipe("acd_clip", "model.text_blend_init", 0.2, "§3.5 w init 0.2"),
    _recipe("acd_clip", "model.head_hidden", 256, "§3.4 Linear(1024->256)"),
    _recipe("acd_clip", "model.gate_hidden", 256, "§3.6 Linear(768->256)"),
    _recipe("acd_clip", "model.seg_logit_scale", 10.0, "§3.6 10 x seg logits"),
    _recipe("acd_clip", "model.blur_kernel", 7, "§3.6 kernel 7 (industrial)"),
    _recipe("acd_clip", "model.blur_sigma", 1.0, "§3.6 sigma 1 (industrial)"),
    _recipe("acd_clip", "model.image_score_weight", 0.9, "§3.6 0.9 p_img + 0.1 max"),
    _recipe("acd_clip", "model.blur_kernel", 9, "§3.6 medical", arg="domain=medical"),
    _recipe("acd_clip", "model.blur_sigma", 1.5, "§3.6 medical", arg="domain=medical"),
    _recipe("acd_clip", "model.image_score_weight", 0.5, "§3.6 medical", arg="domain=medical"),
    _recipe("acd_clip", "optim.name", "adam", "§3.7 Adam"),
    _recipe("acd_clip", "optim.lr", 1e-3, "§3.7 image params lr 1e-3"),
    _recipe(
        "acd_clip",
        "optim.lr_groups",
        [{"pattern": "^text_", "lr": 5e-4}],
        "§3.7 text params lr 5e-4",
    ),
    # §3.7 names no betas: torch Adam's defaults.
    _recipe("acd_clip", "optim.b1", 0.9, "§3.7 Adam (torch default betas)"),
    _recipe("acd_clip", "optim.b2", 0.999, "§3.7 Adam (torch default betas)"),
    _recipe("acd_clip", "optim.weight_decay", 0.0, "§3.7 Adam (no weight decay)"),
    _recipe("acd_clip", "optim.schedule", "step", "§3.7 StepLR per epoch"),
    _recipe("acd_clip", "optim.decay_rate", 0.9, "§3.7 StepLR gamma 0.9"),
    _recipe("acd_clip", "optim.decay_every_epochs", 1, "§3.7 StepLR per epoch"),
    _recipe("acd_clip", "optim.epochs", 20, "§3.7 20 epochs"),
    _recipe("acd_clip", "data.batch_size", 6, "§3.7 batch 6"),
    _recipe("acd_clip", "optim.grad_clip", 1.0, "§3.7 clip_grad_norm_(..., 1.0)"),
    _recipe("acd_clip", "data.train_split", "test", "§3.7 training data = the test splits"),
    # --- DLVP-CLIP (methods.md §4 facts; §4 suggested AnomalyCLIP defaults; §9 corrections) ---
    _recipe("dlvp_clip", "data.image_size", 518, "§4 input 518"),
    _recipe("dlvp_clip", "model.layers", (6, 12, 18, 24), "§4 layers 6/12/18/24"),
    _recipe("dlvp_clip", "optim.lr", 1.5e-4, "§4 Adam lr 1.5e-4"),
    _recipe("dlvp_clip", "optim.name", "adam", "§4 Adam"),
    _recipe("dlvp_clip", "model.top_k", 4, "§4 / §9 K = M = 4"),
    _recipe("dlvp_clip", "model.local_prompts", 4, "§4 / §9 K = M = 4 (4 local prompts)"),
    _recipe("dlvp_clip", "model.local_prompts", 4, "§4 4 local prompts at any K", arg="top_k=2"),
    _recipe("dlvp_clip", "model.text_prompt_len", 4, "§4 4 local prompts (t_n_ctx=4)"),
    _recipe("dlvp_clip", "model.prompt_depth", 9, "§4 prompt depth 9"),
    _recipe("dlvp_clip", "model.slfs_attn_layer", 24, "§4 / §9 SLFS uses the last layer"),
    _recipe("dlvp_clip", "model.n_ctx", 12, "§4 suggested: AnomalyCLIP 12 ctx"),
    _recipe("dlvp_clip", "model.temperature", 0.07, "§4 suggested: AnomalyCLIP 0.07"),
    _recipe("dlvp_clip", "optim.epochs", 15, "§4 suggested: AnomalyCLIP 15 epochs"),
    _recipe("dlvp_clip", "data.batch_size", 8, "§4 suggested: AnomalyCLIP bs 8"),
    _recipe("dlvp_clip", "optim.b1", 0.5, "§4 suggested: betas (0.5, 0.999)"),
    _recipe("dlvp_clip", "optim.b2", 0.999, "§4 suggested: betas (0.5, 0.999)"),
    _recipe("dlvp_clip", "model.sigma", 4.0, "§4 suggested: AnomalyCLIP sigma 4"),
    _recipe("dlvp_clip", "data.train_split", "test", "§4 / §5 AnomalyCLIP protocol"),
    _recipe("dlvp_clip", "data.mask_resize", "bilinear_threshold", "§5 bilinear, threshold 0.5"),
    _recipe(
        "dlvp_clip", "data.train_mask_resize", "bilinear_threshold", "§5 bilinear, threshold 0.5"
    ),
    _recipe("dlvp_clip", "model.backbone.preset", "vit_l14_336", "§4 suggested: OpenAI L/14@336"),
    _recipe("dlvp_clip", "model.act", "quick_gelu", "§0 OpenAI weights, OpenAI clip code"),
    _recipe("dlvp_clip", "model.pos_resize", "bilinear", "§0 AnomalyCLIP pos-embed resize"),
    _recipe("dlvp_clip", "compute_dtype", "auto", "§0 precision: float32 on CPU"),
    _recipe("dlvp_clip", "loss.cls_weight", 1.0, "§9 L_total = L_cls + sum_l L_seg"),
    _recipe("dlvp_clip", "loss.seg_weight", 1.0, "§9 weight 1, not AnomalyCLIP's 4"),
    _recipe("dlvp_clip", "loss.seg_weight", 4.0, "§4 AnomalyCLIP's seg x 4", arg="seg_weight=4"),
    _recipe("dlvp_clip", "model.dpam_layers", 1, "§9 DPAM a switch, off by default (1 = no DPAM)"),
    _recipe("dlvp_clip", "model.dpam_layers", 20, "§4 AnomalyCLIP DPAM_layer=20", arg="dpam"),
    _recipe("dlvp_clip", "model.act", "gelu", "§0 open_clip GELU", arg="backbone=openai_gelu"),
]


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _plain(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


@pytest.mark.parametrize("name, arg, key, expected, section", RECIPE)
def test_recipe_constants_are_the_official_ones(name, arg, key, expected, section):
    value = _plain(_lookup(_config(name, arg), key))
    where = f"configs/{name}.py{':' + arg if arg else ''}: config.{key} (methods.md {section})"
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-12), where
    else:
        assert value == expected, where
    assert type(value) is type(expected) or isinstance(expected, float), where


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_auto_compute_dtype_is_the_official_float32_on_cpu_and_bfloat16_on_accelerators(name):
    value = _config(name).compute_dtype
    assert resolve_compute_dtype(value, "cpu") == "float32"
    assert resolve_compute_dtype(value, "gpu") == resolve_compute_dtype(value, "tpu") == "bfloat16"


@pytest.mark.parametrize(
    ("overrides", "train_mode", "test_mode"),
    [
        ({}, "bilinear_threshold", "bilinear_any"),  # MVTec > 0.5 -> VisA > 0 (§2.6)
        ({"train_set": "visa", "test_set": "mvtec_ad"}, "bilinear_any", "bilinear_threshold"),
    ],
)
def test_ava_dino_masks_follow_each_sides_dataset(overrides, train_mode, test_mode):
    """The official thresholds hold whichever way the datasets are set (variant or
    ``--config.data.*_set``): the mode is resolved from each side's dataset."""
    d = _config("ava_dino").data
    d.update(overrides)
    assert transforms.mask_resize_for(d.train_mask_resize, d.train_set) == train_mode
    assert transforms.mask_resize_for(d.mask_resize, d.test_set) == test_mode
