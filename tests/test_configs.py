"""Every config file: says how to get missing weights, and its ``tiny`` variant trains two steps end
to end through ``python -m zsad_jax.train``'s code path on the synthetic benchmark. (Each method's
test file builds its full-size config by shape and checks the trainable count; the demo is built
here.)"""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np
import pytest
from flax import nnx

from zsad_jax import methods
from zsad_jax import train as train_lib
from zsad_jax.data import synthetic
from zsad_jax.nn import Trainable

METHOD_CONFIGS = ("af_clip", "ava_dino", "acd_clip", "dlvp_clip")


def _config(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_demo_config_builds_abstractly():
    config = _config("demo")
    model = nnx.eval_shape(lambda: methods.build(config, rngs=nnx.Rngs(0), load_weights=False))
    trainable = nnx.state(model, Trainable)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)) > 0
    assert config.method in methods.METHODS


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


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_CONFIGS)
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
