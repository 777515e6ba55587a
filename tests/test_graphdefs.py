"""Every method's and test placeholder's graph definition is hashable: ``zsad_jax.inference`` and
the train step pass it to ``jax.jit`` as a static argument (Flax's ``nnx.split`` / ``nnx.merge``
pattern), so a dict- or list-valued module attribute would break them."""

from __future__ import annotations

import importlib

import pytest
from flax import nnx
from toys import ToyDetector, ToyModel, loop_config, toy_config

from zsad_jax import methods

METHOD_CONFIGS = ("af_clip", "ava_dino", "acd_clip", "dlvp_clip")


def _assert_hashable_and_equal_for_equal_structure(build) -> None:
    graphdef = nnx.split(build(0))[0]
    hash(graphdef)
    again = nnx.split(build(1))[0]
    assert again == graphdef and hash(again) == hash(graphdef)


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_method_graphdef_is_hashable(name):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")

    def build(seed):
        return nnx.eval_shape(
            lambda: methods.build(config, rngs=nnx.Rngs(seed), load_weights=False)
        )

    _assert_hashable_and_equal_for_equal_structure(build)


@pytest.mark.parametrize("cls, config", [(ToyDetector, toy_config()), (ToyModel, loop_config())])
def test_test_placeholders_graphdefs_are_hashable_after_set_classes(cls, config):
    def build(seed):
        model = cls(config, rngs=nnx.Rngs(seed))
        model.set_classes(["a", "b"])
        return model

    _assert_hashable_and_equal_for_equal_structure(build)
