"""Optimiser recipes from ``config.optim`` with the same numerics as the PyTorch training scripts.

Fields (see ``configs/common.py``): ``name`` adam | adamw, ``lr``, ``b1``, ``b2``, ``eps``,
``weight_decay``, ``schedule`` constant | warmup_constant | step, ``warmup_fraction``,
``decay_rate``, ``decay_every_epochs``, ``epochs`` or ``steps``, ``grad_clip``, ``clip_only``,
``lr_groups``.

The PyTorch semantics reproduced (checked against ``torch.optim`` in tests/test_train_optim.py):

- ``adam`` with ``weight_decay`` > 0 is torch ``Adam``'s coupled L2 term (``g + wd * p`` before the
  moments); ``adamw`` is the decoupled decay ``p * (1 - lr * wd)``.
- ``warmup_fraction`` w: the learning rate is multiplied by ``count / int(w * total_steps)`` until
  that step (AVA-DINO's ``LambdaLR``, which starts at 0), then 1; ``int(w * total_steps) == 0``
  means no warm-up, as there. ``warmup_constant`` is ``constant`` with it (any schedule honours it).
- ``step``: ``lr * decay_rate ** floor(count / (decay_every_epochs * steps_per_epoch))`` (``StepLR``
  stepped once per epoch, as ACD-CLIP does).
- ``grad_clip`` is ``clip_grad_norm_``: every group of gradients is scaled by
  ``min(1, grad_clip / (norm + 1e-6))``. ``clip_only`` (a regex) restricts clipping to the
  parameters whose dotted path it matches, and the *matched text* names the group: parameters whose
  matches are equal share one norm. So ``r"m_i_w\\.\\d+"`` clips each ``m_i_w.<i>`` module on its
  own (ACD-CLIP's per-module ``clip_grad_norm_``) while ``r"m_i_w"`` clips all of them under one
  norm (a capture group, if any, names the group instead). Without ``clip_only`` every gradient
  forms one group (a global norm clip).
- ``lr_groups``: a list of ``{pattern, lr}``; a parameter takes the ``lr`` of the first pattern that
  ``re.search``-es its dotted path (torch param groups), the others ``config.optim.lr``.

The gradient pytrees are flat dicts keyed by the parameter's dotted path (``head.kernel``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

NAMES = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_constant", "step")
DEFAULT_GROUP = "default"
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
TORCH_CLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation plus what the training loop logs about it.

    Attributes:
      tx: the update rule over flat ``{path: array}`` gradients.
      learning_rates: group name -> schedule ``count -> lr`` (``default`` is ``config.optim.lr``).
      groups: parameter path -> its learning-rate group.
    """

    tx: optax.GradientTransformation
    learning_rates: dict[str, Callable[[Any], Any]]
    groups: dict[str, str]


def _get(optim: Any, name: str, default: Any = None) -> Any:
    value = optim.get(name, default) if hasattr(optim, "get") else getattr(optim, name, default)
    return default if value is None else value


def total_train_steps(optim: Any, steps_per_epoch: int) -> int:
    """``config.optim.steps`` if set, else ``epochs * steps_per_epoch``."""
    steps = _get(optim, "steps")
    if steps:
        return int(steps)
    if steps_per_epoch < 1:
        raise ValueError(
            "the training set gives no full batch per epoch (steps_per_epoch=0): lower "
            "config.data.batch_size or add images; or set config.optim.steps"
        )
    return int(round(float(_get(optim, "epochs", 1)) * steps_per_epoch))


def learning_rate_schedule(
    optim: Any, lr: float, *, total_steps: int, steps_per_epoch: int
) -> Callable[[Any], Any]:
    """``count -> learning rate`` for one parameter group (``count`` = updates applied so far)."""
    kind = _get(optim, "schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={kind!r}; choose one of {SCHEDULES}")
    warmup = int(float(_get(optim, "warmup_fraction", 0.0)) * total_steps)
    decay_rate = float(_get(optim, "decay_rate", 1.0))
    decay_steps = max(1, int(round(float(_get(optim, "decay_every_epochs", 1)) * steps_per_epoch)))
    lr = float(lr)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        value = jnp.full((), lr, jnp.float32)
        if kind == "step":
            value = value * jnp.float32(decay_rate) ** jnp.floor(count / decay_steps)
        if warmup > 0:
            value = value * jnp.minimum(1.0, count / warmup)
        return value

    return schedule


class ClipState(NamedTuple):
    """Stateless; a named type so checkpoints show what the slot is."""


def clip_grad_norm_by_group(
    max_norm: float, group_of: Mapping[str, str]
) -> optax.GradientTransformation:
    """torch ``clip_grad_norm_`` applied separately to each group of a flat gradient dict.

    ``group_of`` maps a parameter path to its clipping group; paths not in it are left unclipped.
    """
    members: dict[str, list[str]] = {}
    for path, group in group_of.items():
        members.setdefault(group, []).append(path)

    def init_fn(params):
        del params
        return ClipState()

    def update_fn(updates, state, params=None):
        del params
        updates = dict(updates)
        for paths in members.values():
            sq = sum(jnp.sum(jnp.square(updates[p].astype(jnp.float32))) for p in sorted(paths))
            coef = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + TORCH_CLIP_EPS))
            for p in paths:
                updates[p] = (updates[p] * coef).astype(updates[p].dtype)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_groups(param_paths: Sequence[str], clip_only: str | None) -> dict[str, str]:
    """Path -> clipping group (see the module docstring for how ``clip_only`` names groups)."""
    if not clip_only:
        return {p: "all" for p in param_paths}
    pattern = re.compile(clip_only)
    out = {}
    for path in param_paths:
        m = pattern.search(path)
        if m:
            out[path] = m.group(1) if pattern.groups else m.group(0)
    if not out:
        raise ValueError(
            f"config.optim.clip_only={clip_only!r} matches no trainable parameter; paths look like "
            f"{list(param_paths)[:5]}"
        )
    return out


def lr_group_of(param_paths: Sequence[str], lr_groups: Sequence[Any]) -> dict[str, str]:
    """Path -> ``group<i>`` of the first matching ``lr_groups[i].pattern``, else ``default``."""
    patterns = [re.compile(_get(g, "pattern")) for g in lr_groups]
    out = {}
    for path in param_paths:
        out[path] = next(
            (f"group{i}" for i, pat in enumerate(patterns) if pat.search(path)), DEFAULT_GROUP
        )
    for i, group in enumerate(lr_groups):
        if f"group{i}" not in out.values():
            raise ValueError(
                f"config.optim.lr_groups[{i}].pattern={_get(group, 'pattern')!r} matches no "
                f"trainable parameter not already taken by an earlier pattern; paths look like "
                f"{list(param_paths)[:5]}"
            )
    return out


def _adam(optim: Any, schedule: Callable[[Any], Any]) -> optax.GradientTransformation:
    name = _get(optim, "name", "adam")
    if name not in NAMES:
        raise ValueError(f"config.optim.name={name!r}; choose one of {NAMES}")
    wd = float(_get(optim, "weight_decay", 0.0))
    adam = optax.scale_by_adam(
        b1=float(_get(optim, "b1", 0.9)),
        b2=float(_get(optim, "b2", 0.999)),
        eps=float(_get(optim, "eps", 1e-8)),
    )
    parts = []
    if name == "adam" and wd:
        parts.append(optax.add_decayed_weights(wd))  # torch Adam: L2 added to the gradient
    parts.append(adam)
    if name == "adamw" and wd:
        parts.append(optax.add_decayed_weights(wd))  # decoupled: scaled by lr below with the step
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def build_optimizer(
    optim: Any, param_paths: Sequence[str], *, steps_per_epoch: int, total_steps: int
) -> Optimizer:
    """The optax transformation of ``config.optim`` for parameters with these dotted paths."""
    param_paths = list(param_paths)
    if not param_paths:
        raise ValueError("the model has no Trainable parameters: nothing to optimise")
    lr_groups = list(_get(optim, "lr_groups", []))
    groups = lr_group_of(param_paths, lr_groups)
    rates = {DEFAULT_GROUP: float(_get(optim, "lr"))}
    for i, g in enumerate(lr_groups):
        rates[f"group{i}"] = float(_get(g, "lr"))
    schedules = {
        name: learning_rate_schedule(
            optim, lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
        for name, lr in rates.items()
        if name in groups.values()
    }
    transforms = {name: _adam(optim, schedules[name]) for name in schedules}
    tx = optax.multi_transform(transforms, {p: groups[p] for p in param_paths})
    grad_clip = _get(optim, "grad_clip")
    if grad_clip is not None:
        tx = optax.chain(
            clip_grad_norm_by_group(
                float(grad_clip), clip_groups(param_paths, _get(optim, "clip_only"))
            ),
            tx,
        )
    return Optimizer(tx=tx, learning_rates=schedules, groups=groups)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
