"""``zsad_jax.config_check``: the tests' toy configs have no problem (every config file with every
variant: tests/test_configs.py); each bad value gives one line naming the full key and what is
allowed; only keys that exist are judged."""

from __future__ import annotations

import importlib
import json

import ml_collections
import pytest
import toys

from configs.common import base_config
from zsad_jax import config_check
from zsad_jax.config_check import ConfigError, check, problems


def test_the_tests_toy_configs_have_no_problem():
    toy_train = toys.loop_config()
    toy_evaluate = toys.toy_config()
    assert problems(toy_train) == []
    assert problems(toy_evaluate) == []


def _af_clip():
    return importlib.import_module("configs.af_clip").get_config()


def _set(config, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    section = config
    for part in parents:
        section = section[part]
    section[last] = value


BAD = [
    # key, value, the line problems() must contain
    ("optim.lr", -1.0, "config.optim.lr=-1.0: must be a finite number > 0"),
    ("optim.lr", 0.0, "config.optim.lr=0.0: must be a finite number > 0"),
    ("optim.lr", float("inf"), "config.optim.lr=inf: must be a finite number > 0"),
    ("optim.lr", float("nan"), "config.optim.lr=nan: must be a finite number > 0"),
    ("optim.b1", 1.0, "config.optim.b1=1.0: must be a number in [0, 1)"),
    ("optim.b2", -0.1, "config.optim.b2=-0.1: must be a number in [0, 1)"),
    ("optim.eps", 0.0, "config.optim.eps=0.0: must be a finite number > 0"),
    ("optim.weight_decay", -1e-2, "config.optim.weight_decay=-0.01: must be a finite number >= 0"),
    ("optim.steps", 0, "config.optim.steps=0: must be None or an integer >= 1"),
    ("optim.epochs", 0, "config.optim.epochs=0: must be a finite number > 0 when optim.steps"),
    ("optim.warmup_fraction", 1.5, "config.optim.warmup_fraction=1.5: must be a number in [0, 1]"),
    ("optim.decay_rate", 0.0, "config.optim.decay_rate=0.0: must be a finite number > 0"),
    ("optim.grad_accum", 0, "config.optim.grad_accum=0: must be an integer >= 1"),
    ("optim.grad_clip", 0.0, "config.optim.grad_clip=0.0: must be None or a finite number > 0"),
    ("optim.clip_only", "(", "config.optim.clip_only='(': is not a valid regular expression"),
    ("optim.name", "sgd", "config.optim.name='sgd': must be one of adam, adamw"),
    ("optim.schedule", "cosine", "config.optim.schedule='cosine': must be one of constant, "),
    ("data.batch_size", 0, "config.data.batch_size=0: must be an integer >= 1"),
    ("data.image_size", 0, "config.data.image_size=0: must be an integer >= 1"),
    ("data.image_size", 500, "config.data.image_size=500: must be a multiple of the "
                             "config.model.backbone patch size 14 (e.g. 490 or 504)"),
    ("data.train_image_size", -1,
     "config.data.train_image_size=-1: must be an integer >= 0 (0 = image_size)"),
    ("data.train_image_size", 200, "config.data.train_image_size=200: must be a multiple of the "
                                   "config.model.backbone patch size 14 (e.g. 196 or 210)"),
    ("data.num_workers", -1, "config.data.num_workers=-1: must be an integer >= 0"),
    ("data.transform", "clipp", "config.data.transform='clipp': must be one of clip, "),
    ("data.mask_resize", "linear", "config.data.mask_resize='linear': must be one of nearest, "),
    ("data.train_set", "vissa", "config.data.train_set='vissa': must be a known dataset ("),
    ("data.test_set", "mvtec", "config.data.test_set='mvtec': must be a known dataset ("),
    ("eval.batch_size", 0, "config.eval.batch_size=0: must be an integer >= 1"),
    ("eval.num_vis", -1, "config.eval.num_vis=-1: must be an integer >= 0"),
    ("eval.map_dtype", "float64", "config.eval.map_dtype='float64': must be one of float32, "),
    ("eval.every_steps", -1, "config.eval.every_steps=-1: must be an integer >= 0"),
    ("ckpt.keep", -1, "config.ckpt.keep=-1: must be an integer >= 0 (0 = keep every checkpoint)"),
    ("ckpt.every_steps", -5, "config.ckpt.every_steps=-5: must be an integer >= 0"),
    ("mesh.data", 0, "config.mesh.data=0: must be -1 (every device left over by fsdp) or an "),
    ("mesh.fsdp", -1, "config.mesh.fsdp=-1: must be an integer >= 1"),
    ("max_bad_steps", 0, "config.max_bad_steps=0: must be an integer >= 1"),
    ("log_every_steps", 0, "config.log_every_steps=0: must be an integer >= 1"),
    ("compute_dtype", "fp16", "config.compute_dtype='fp16': must be one of float32, bfloat16, "),
    ("seed", -1, "config.seed=-1: must be an integer >= 0"),
    ("method", "af_clp", "config.method='af_clp': must be one of acd_clip, af_clip, ava_dino, "),
    ("model.backbone.preset", "vit_l14", "config.model.backbone.preset='vit_l14': must be a clip "),
    ("model.temperature", 0.0, "config.model.temperature=0.0: must be a finite number > 0"),
    ("model.smoothing_sigma", -1.0, "config.model.smoothing_sigma=-1.0: must be a finite number"),
    ("model.few_shot.alpha", -0.1, "config.model.few_shot.alpha=-0.1: must be a finite number"),
]  # fmt: skip


@pytest.mark.parametrize("key, value, expected", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_bad_value_is_one_line_naming_the_key(key, value, expected):
    config = _af_clip()
    _set(config, key, value)
    found = problems(config)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found
    with pytest.raises(ConfigError) as err:
        check(config)
    assert str(err.value) == found[0]


def test_suggestions_for_names():
    config = _af_clip()
    config.data.train_set = "vissa"
    config.method = "af_clp"
    config.model.backbone.preset = "vit_l14"
    text = "\n".join(problems(config))
    assert "(did you mean 'visa'?)" in text
    assert "(did you mean 'af_clip'?)" in text
    assert "(did you mean 'vit_l14_336'?)" in text


def test_every_problem_at_once_in_a_value_error():
    config = _af_clip()
    config.optim.lr = -1.0
    config.data.batch_size = 0
    config.ckpt.keep = -2
    with pytest.raises(ValueError) as err:  # ConfigError is a ValueError
        check(config)
    assert isinstance(err.value, ConfigError)
    assert err.value.problems == problems(config)
    assert str(err.value).splitlines() == [
        "config.optim.lr=-1.0: must be a finite number > 0",
        "config.data.batch_size=0: must be an integer >= 1",
        "config.ckpt.keep=-2: must be an integer >= 0 (0 = keep every checkpoint)",
    ]


def test_lr_groups_entries():
    config = importlib.import_module("configs.acd_clip").get_config()
    config.optim.lr_groups = [
        ml_collections.ConfigDict({"pattern": "^text_", "lr": -5e-4}),
        {"pattern": "["},
        "text",
    ]
    found = problems(config)
    assert found[0] == "config.optim.lr_groups[0].lr=-0.0005: must be a finite number > 0"
    assert found[1].startswith("config.optim.lr_groups[1].pattern='[': is not a valid regular")
    assert found[2] == "config.optim.lr_groups[1].lr: missing (a finite number > 0)"
    assert found[3] == "config.optim.lr_groups[2]='text': must be a {pattern, lr} mapping"
    assert len(found) == 4


def test_allowed_special_values():
    config = _af_clip()
    config.ckpt.keep = 0  # keep every checkpoint (TrainCheckpointer: max_to_keep=None)
    config.ckpt.every_steps = 0
    config.eval.every_steps = 0
    config.eval.num_vis = 0
    config.mesh.data = -1
    config.optim.grad_clip = None
    config.optim.warmup_fraction = 1.0
    config.optim.b1 = 0.0
    config.compute_dtype = "bfloat16"
    config.data.test_set = "VisA"  # read_dataset lower-cases the name
    config.model.smoothing_sigma = 0.0  # off
    assert problems(config) == []
    config.optim.steps = 10
    config.optim.epochs = 0  # unused when steps is set
    assert problems(config) == []


def test_batch_must_split_over_grad_accum_and_an_explicit_mesh():
    config = _af_clip()
    config.optim.grad_accum = 3
    assert problems(config) == [
        "config.data.batch_size=8: must be a multiple of config.optim.grad_accum (3)"
    ]
    config.optim.grad_accum = 2
    config.mesh.data = 8
    assert problems(config) == [
        "config.data.batch_size=8: must be a multiple of config.optim.grad_accum (2) x "
        "config.mesh.data (8) x config.mesh.fsdp (1)"
    ]
    config.mesh.data = -1  # the device count is not known here
    assert problems(config) == []


def test_integers_must_be_integers_and_fractional_epochs_are_allowed():
    config = ml_collections.ConfigDict(
        {"data": {"batch_size": True, "num_workers": 1.5}, "optim": {"epochs": 0.5}}
    )
    # total_train_steps rounds epochs * steps_per_epoch, so 0.5 epochs is a valid request.
    assert problems(config) == [
        "config.data.batch_size=True: must be an integer >= 1",
        "config.data.num_workers=1.5: must be an integer >= 0",
    ]


def test_dataset_names():
    config = _af_clip()
    config.data.train_set = "my_pkg.data:train_data"  # zsad_jax.train imports it
    assert problems(config) == []
    config.data.test_set = "my_pkg.data:test_data"  # evaluation reads only known datasets
    assert problems(config)[0].startswith("config.data.test_set='my_pkg.data:test_data'")
    config.eval.enabled = False  # ... and only when it runs
    assert problems(config) == []
    config.eval.enabled = True
    config.data.tfds_dir = "/tfds"  # TFDS config names are not reader names
    config.data.train_set = "mvtec_ad_518"
    config.data.test_set = "visa_518"
    assert problems(config) == []


def test_patch_size_comes_from_the_converted_config_json(tmp_path):
    config = _af_clip()
    arch = {"vision": {"patch_size": 16}, "text": {}}
    (tmp_path / "config.json").write_text(json.dumps({"type": "clip", "config": arch}))
    config.model.backbone.checkpoint = str(tmp_path)
    assert config_check.patch_size(config.model.backbone) == 16
    assert problems(config) == [
        "config.data.image_size=518: must be a multiple of the config.model.backbone patch size "
        "16 (e.g. 512 or 528)"
    ]
    config.model.backbone.random_init = True  # then the preset is built: patch 14
    assert config_check.patch_size(config.model.backbone) == 14
    assert problems(config) == []
    dino = importlib.import_module("configs.ava_dino").get_config()
    assert config_check.patch_size(dino.model.backbone) == 16
    dino.model.backbone.kind = "vit"
    assert config_check.patch_size(dino.model.backbone) is None
    assert problems(dino) == ["config.model.backbone.kind='vit': must be one of clip, dinov3"]


def test_only_present_keys_are_checked():
    assert problems(ml_collections.ConfigDict()) == []
    assert problems({}) == []
    partial = ml_collections.ConfigDict({"optim": {"lr": -1.0}, "eval": {"num_vis": 2}})
    assert problems(partial) == ["config.optim.lr=-1.0: must be a finite number > 0"]
    # A method given as an importable class, no backbone section, a callable training set.
    toy = base_config("my_pkg.models:Toy")
    toy.data.train_set = "my_pkg.data:toy"
    toy.eval.enabled = False
    assert problems(toy) == []
