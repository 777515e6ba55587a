"""The four methods behind one interface (``zsad_jax.methods.base.AnomalyModel``), and the one
factory that builds whatever ``config.method`` names.

``build(config, load_weights=True)`` returns the method with its initial weights drawn from
``config.seed``; ``load_weights=False`` builds the architecture without reading converted weights
(for ``nnx.eval_shape``, e.g. ``python -m zsad_jax.summary``). ``config.method`` is a registry name
or ``package.module:ClassName`` for a user-defined ``AnomalyModel`` subclass with the same
constructor (imported here; a config stored in a checkpoint is checked before it gets here, see
``zsad_jax.checkpoint.load_for_inference``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from flax import nnx

from zsad_jax.methods.base import AnomalyModel

METHODS = {
    "af_clip": ("zsad_jax.methods.af_clip", "AfClip"),
    "ava_dino": ("zsad_jax.methods.ava_dino", "AvaDino"),
    "acd_clip": ("zsad_jax.methods.acd_clip", "AcdClip"),
    "dlvp_clip": ("zsad_jax.methods.dlvp_clip", "DlvpClip"),
}


# What ``image_path.split('/')[-4]`` gives for every VisA image (``<cls>/Data/Images/<state>/x``).
VISA_PATH_CLASS_NAME = "Data"


def text_class_names(config, dataset: str, names: Sequence[str]) -> list[str]:
    """The class names ``set_classes`` gets for ``dataset``'s categories ``names``.

    The real names, except with ``config.model.visa_class_name_quirk`` (AVA-DINO's default): its
    official code takes the class name from the image path, ``split('/')[-4]``, which is the
    category for MVTec-layout paths but "Data" for every VisA image, so its VisA prompts read "a
    photo of a damaged Data." (training and test alike)."""
    if dataset == "visa" and config.model.get("visa_class_name_quirk", False):
        return [VISA_PATH_CLASS_NAME] * len(names)
    return [str(n) for n in names]


def import_object(spec: str, field: str) -> Any:
    """``package.module:name`` (user code a config names) -> the object; errors name ``field``."""
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}={spec!r}: cannot import {attr} from {module}: {e}") from e


def method_class(name: str) -> type[AnomalyModel]:
    if ":" in name:
        return import_object(name, "config.method")
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not a method; choose one of {sorted(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)


def added_model_keys(name: str) -> dict[str, Any]:
    """The ``model`` keys the registry method ``name`` gained after checkpoints of it were written,
    each with the value that keeps what those checkpoints did (its module's ``ADDED_MODEL_KEYS``).
    Nothing for ``module:Class`` methods: importing a stored config's code here would run it before
    ``--allow_custom_code`` is checked."""
    if name not in METHODS:
        return {}
    return dict(getattr(importlib.import_module(METHODS[name][0]), "ADDED_MODEL_KEYS", {}))


def build(config, *, rngs: nnx.Rngs | None = None, load_weights: bool = True) -> AnomalyModel:
    """Builds ``config.method`` from the whole ml_collections config (``rngs`` default: from
    ``config.seed``, so training and ``load_for_inference`` draw the same random-init parts).
    Missing converted weights raise the backbone loader's error (naming the expected path and the
    convert command) before any work."""
    rngs = nnx.Rngs(int(config.seed)) if rngs is None else rngs
    return method_class(config.method)(config, rngs=rngs, load_weights=load_weights)
