"""The four methods behind one interface (``zsad_jax.methods.base.AnomalyModel``).

``build(config, rngs=..., load_weights=True)`` returns the method named by ``config.method``.
``load_weights=False`` builds the architecture without reading converted weights (for
``nnx.eval_shape``, e.g. ``python -m zsad_jax.summary``).
"""

from __future__ import annotations

import importlib

from flax import nnx

from zsad_jax.methods.base import AnomalyModel

METHODS = {
    "af_clip": ("zsad_jax.methods.af_clip", "AfClip"),
    "ava_dino": ("zsad_jax.methods.ava_dino", "AvaDino"),
    "acd_clip": ("zsad_jax.methods.acd_clip", "AcdClip"),
    "dlvp_clip": ("zsad_jax.methods.dlvp_clip", "DlvpClip"),
}


def method_class(name: str) -> type[AnomalyModel]:
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not a method; choose one of {sorted(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(module), cls)


def build(config, *, rngs: nnx.Rngs, load_weights: bool = True) -> AnomalyModel:
    """Builds ``config.method`` from the whole ml_collections config."""
    return method_class(config.method)(config, rngs=rngs, load_weights=load_weights)
