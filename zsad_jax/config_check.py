"""Checks a whole config before any work: every bad value at once, one line each.

    from zsad_jax import config_check
    config_check.check(config)           # raises ConfigError listing every problem
    lines = config_check.problems(config)  # [] when the config is fine

Each line names the full key and what is allowed, e.g.
``config.optim.lr=-1.0: must be a finite number > 0``. Only keys that exist are checked, so a
config built by a test (a toy method, no ``model.backbone``, missing sections) is judged on what it
has. The checks are static: nothing is read but a converted encoder's ``config.json`` (for its
patch size) and a self-pretrained one's ``pretrain.json``, and nothing that needs the devices
(the mesh shape against the device count, the batch against the devices) is decided here;
``zsad_jax.train`` still checks those.

What is checked (when present):

- ``optim``: ``lr`` and every ``lr_groups[i].lr`` finite and > 0 (each group a ``{pattern, lr}``
  whose pattern compiles); ``b1``, ``b2`` in [0, 1); ``eps`` > 0; ``weight_decay`` >= 0;
  ``name`` in ``zsad_jax.optim.NAMES``; ``schedule`` in ``zsad_jax.optim.SCHEDULES``; ``steps``
  None or an integer >= 1 (0 is not "unset": write None); ``epochs`` > 0 when ``steps`` is None
  (fractions allowed: ``total_train_steps`` rounds ``epochs * steps_per_epoch``);
  ``warmup_fraction`` in [0, 1]; ``decay_rate`` and ``decay_every_epochs`` > 0; ``grad_accum`` an
  integer >= 1; ``grad_clip`` None or > 0; ``clip_only`` None or a regex that compiles.
- ``data``: ``batch_size`` an integer >= 1 and a multiple of ``optim.grad_accum`` (x ``mesh.data``
  x ``mesh.fsdp`` when ``mesh.data`` is explicit); ``image_size`` an integer >= 1 and
  ``train_image_size`` one >= 0 (0 = ``image_size``), each a multiple of the vision encoder's patch
  size (``model.backbone``: from its converted ``config.json`` when
  that exists and ``random_init`` is off, else from its preset); ``num_workers`` >= 0;
  ``transform``/``train_transform`` in ``zsad_jax.data.transforms.TRANSFORM_NAMES``;
  ``mask_resize``/``train_mask_resize`` in ``MASK_RESIZE_MODES``; ``train_set`` a dataset name of
  ``zsad_jax.data.protocol.READERS`` (any case, as ``read_dataset``) or a
  ``package.module:callable``; ``test_set`` a dataset name (unless ``eval.enabled`` is False).
  With ``data.tfds_dir`` set the names are TFDS configs and are not checked.
- ``eval``: ``batch_size`` >= 1, ``num_vis`` >= 0, ``every_steps`` >= 0 (0 = only at the end),
  ``map_dtype`` one of ``MAP_DTYPES``.
- ``ckpt``: ``keep`` >= 0 (0 = keep every checkpoint: ``TrainCheckpointer`` passes
  ``max_to_keep=None``), ``every_steps`` >= 0 (0 = only the final checkpoint).
- ``mesh``: ``data`` -1 (every device left over) or >= 1; ``fsdp`` >= 1.
- Top level: ``method`` a ``zsad_jax.methods.METHODS`` name or a ``package.module:Class``;
  ``compute_dtype`` in ``zsad_jax.nn.COMPUTE_DTYPES`` (float32 | bfloat16 | auto, resolved when
  the model is built); ``seed`` an integer >= 0; ``max_bad_steps`` and ``log_every_steps``
  integers >= 1 (the training loop would silently turn 0 into 10).
- ``model``: ``backbone`` / ``text_encoder`` ``kind`` and ``preset`` known to
  ``zsad_jax.encoders.presets.PRESETS``; the fractions ``image_score_weight``,
  ``image_blend_init``, ``text_blend_init`` in [0, 1]; ``temperature``, ``routing_temperature``
  > 0; ``few_shot.alpha`` >= 0; the test-time smoothing ``smoothing_sigma`` / ``sigma`` >= 0
  (0 = off). A backbone pretrained by ``zsad_jax.pretrain.backbone`` (a ``pretrain.json`` beside
  its weights) tested on ``synthetic_aux`` or ``synthetic_aux_select`` must have held the test
  categories' families out of its pretraining (``--hold_out``), or the test is not zero-shot.

Integers must be integers (``True`` is not 1); a float where an integer is wanted is a problem.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path
from typing import Any

from zsad_jax import optim as optim_lib
from zsad_jax.data import procedural, transforms
from zsad_jax.encoders.presets import PRESETS
from zsad_jax.methods import METHODS
from zsad_jax.names import did_you_mean, known_datasets
from zsad_jax.nn import COMPUTE_DTYPES

_MISSING = object()

POSITIVE = "a finite number > 0"
NON_NEGATIVE = "a finite number >= 0"
FRACTION = "a number in [0, 1]"
BETA = "a number in [0, 1)"
# The NumPy dtypes the evaluation may hold its maps in (the metrics read them as float32).
MAP_DTYPES = ("float32", "float16")


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _fraction(v: float) -> bool:
    return 0 <= v <= 1


def _beta(v: float) -> bool:
    return 0 <= v < 1


class ConfigError(ValueError):
    """A config with bad values; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def check(config: Any) -> None:
    """Raises ``ConfigError`` (a ``ValueError``) listing every problem of ``config``, one a line."""
    found = problems(config)
    if found:
        raise ConfigError(found)


def problems(config: Any) -> list[str]:
    """One line per bad value of ``config`` (an ``ml_collections.ConfigDict`` or a mapping), each
    naming the full key (``config.optim.lr``) and what is allowed; [] when all is well."""
    out: list[str] = []
    _check_optim(config, out)
    _check_data(config, out)
    _check_eval(config, out)
    _check_ckpt(config, out)
    _check_mesh(config, out)
    _check_top(config, out)
    _check_model(config, out)
    _check_pretraining_saw_test(config, out)
    return out


# ----------------------------------------------------------------------------------------------
# Reading values defensively.


def _section(parent: Any, name: str) -> Any:
    """``parent.name`` when it is a mapping-like section, else None."""
    value = _value(parent, name)
    return value if value is not _MISSING and _is_section(value) else None


def _is_section(value: Any) -> bool:
    return hasattr(value, "get") and hasattr(value, "keys")


def _value(section: Any, name: str) -> Any:
    """``section[name]`` (FieldReferences resolved), or ``_MISSING`` when the key is absent."""
    if section is None:
        return _MISSING
    try:
        if name not in section:
            return _MISSING
        return section.get(name)
    except (TypeError, AttributeError, KeyError):
        return getattr(section, name, _MISSING)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fmt(key: str, value: Any) -> str:
    return f"{key}={value!r}"


class _Checker:
    """Checks the keys of one section; ``prefix`` is its full path (``config.optim``)."""

    def __init__(self, section: Any, prefix: str, out: list[str]):
        self.section, self.prefix, self.out = section, prefix, out

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def get(self, name: str) -> Any:
        return _value(self.section, name)

    def problem(self, name: str, value: Any, message: str) -> None:
        self.out.append(f"{_fmt(self.key(name), value)}: {message}")

    def number(self, name: str, ok, want: str, *, optional: bool = False) -> Any:
        """A finite real number for which ``ok(value)`` holds (``want`` says which, e.g. "> 0");
        returns the value (or _MISSING)."""
        value = self.get(name)
        if value is _MISSING or (optional and value is None):
            return value
        if not (_is_number(value) and math.isfinite(float(value)) and ok(float(value))):
            self.problem(name, value, f"must be {'None or ' if optional else ''}{want}")
        return value

    def integer(self, name: str, *, ge: int, optional: bool = False, note: str = "") -> Any:
        """An integer >= ``ge``; returns the value (or _MISSING)."""
        value = self.get(name)
        if value is _MISSING or (optional and value is None):
            return value
        if not _is_int(value) or value < ge:
            self.problem(
                name, value, f"must be {'None or ' if optional else ''}an integer >= {ge}{note}"
            )
        return value

    def choice(self, name: str, allowed: tuple[str, ...] | list[str]) -> Any:
        value = self.get(name)
        if value is _MISSING:
            return value
        if not isinstance(value, str) or value not in allowed:
            self.problem(name, value, f"must be one of {', '.join(allowed)}")
        return value

    def regex(self, name: str, *, optional: bool = True) -> Any:
        value = self.get(name)
        if value is _MISSING or (optional and value is None):
            return value
        if not isinstance(value, str):
            self.problem(name, value, "must be None or a regular expression (a string)")
            return value
        try:
            re.compile(value)
        except re.error as e:
            self.problem(name, value, f"is not a valid regular expression ({e})")
        return value


# ----------------------------------------------------------------------------------------------
# The sections.


def _check_optim(config: Any, out: list[str]) -> None:
    optim = _section(config, "optim")
    if optim is None:
        return
    c = _Checker(optim, "config.optim", out)
    c.choice("name", optim_lib.NAMES)
    c.choice("schedule", optim_lib.SCHEDULES)
    c.number("lr", _positive, POSITIVE)
    lr_groups = c.get("lr_groups")
    if lr_groups is not _MISSING and lr_groups is not None:
        if isinstance(lr_groups, (str, bytes)) or not hasattr(lr_groups, "__iter__"):
            c.problem("lr_groups", lr_groups, "must be a list of {pattern, lr}")
        else:
            for i, group in enumerate(lr_groups):
                where = f"config.optim.lr_groups[{i}]"
                if not _is_section(group):
                    out.append(f"{_fmt(where, group)}: must be a {{pattern, lr}} mapping")
                    continue
                g = _Checker(group, where, out)
                if g.get("pattern") is _MISSING:
                    out.append(f"{where}.pattern: missing (a regex of the parameter paths)")
                else:
                    g.regex("pattern", optional=False)
                if g.get("lr") is _MISSING:
                    out.append(f"{where}.lr: missing (a finite number > 0)")
                else:
                    g.number("lr", _positive, POSITIVE)
    c.number("b1", _beta, BETA)
    c.number("b2", _beta, BETA)
    c.number("eps", _positive, POSITIVE)
    c.number("weight_decay", _non_negative, NON_NEGATIVE)
    steps = c.integer(
        "steps", ge=1, optional=True, note=" (None = optim.epochs x the steps of an epoch)"
    )
    if steps is _MISSING or steps is None:
        c.number("epochs", _positive, f"{POSITIVE} when optim.steps is None (fractions allowed)")
    c.number("warmup_fraction", _fraction, FRACTION)
    c.number("decay_rate", _positive, POSITIVE)
    c.number("decay_every_epochs", _positive, POSITIVE)
    c.integer("grad_accum", ge=1)
    c.number("grad_clip", _positive, POSITIVE, optional=True)
    c.regex("clip_only")


def _check_data(config: Any, out: list[str]) -> None:
    data = _section(config, "data")
    if data is None:
        return
    c = _Checker(data, "config.data", out)
    batch = c.integer("batch_size", ge=1)
    _check_batch_divisible(config, batch, out)
    size = c.integer("image_size", ge=1)
    if _is_int(size) and size >= 1:
        _check_patch_size(config, "image_size", size, out)
    train_size = c.integer("train_image_size", ge=0, note=" (0 = image_size)")
    if _is_int(train_size) and train_size >= 1:
        _check_patch_size(config, "train_image_size", train_size, out)
    c.integer("num_workers", ge=0)
    for name in ("transform", "train_transform"):
        c.choice(name, transforms.TRANSFORM_NAMES)
    for name in ("mask_resize", "train_mask_resize"):
        c.choice(name, transforms.MASK_RESIZE_MODES)

    tfds_dir = c.get("tfds_dir")
    if tfds_dir is not _MISSING and tfds_dir:
        return  # TFDS config names, not reader names
    datasets = known_datasets()
    train_set = c.get("train_set")
    if train_set is not _MISSING:
        is_spec = isinstance(train_set, str) and ":" in train_set
        if not is_spec and not _is_dataset(train_set, datasets):
            c.problem(
                "train_set",
                train_set,
                f"must be a known dataset ({', '.join(datasets)}) or a package.module:callable"
                f"{did_you_mean(train_set, datasets)}",
            )
    eval_enabled = _value(_section(config, "eval"), "enabled")
    test_set = c.get("test_set")
    if test_set is not _MISSING and eval_enabled is not False:
        if not _is_dataset(test_set, datasets):
            c.problem(
                "test_set",
                test_set,
                f"must be a known dataset ({', '.join(datasets)})"
                f"{did_you_mean(test_set, datasets)}",
            )


def _check_batch_divisible(config: Any, batch: Any, out: list[str]) -> None:
    if not (_is_int(batch) and batch >= 1):
        return
    accum = _value(_section(config, "optim"), "grad_accum")
    accum = accum if _is_int(accum) and accum >= 1 else 1
    mesh = _section(config, "mesh")
    data, fsdp = _value(mesh, "data"), _value(mesh, "fsdp")
    devices, what = 1, ""
    if _is_int(data) and data >= 1:
        fsdp = fsdp if _is_int(fsdp) and fsdp >= 1 else 1
        devices, what = data * fsdp, f" x config.mesh.data ({data}) x config.mesh.fsdp ({fsdp})"
    if batch % (accum * devices):
        out.append(
            f"config.data.batch_size={batch!r}: must be a multiple of config.optim.grad_accum "
            f"({accum}){what}"
        )


def _check_eval(config: Any, out: list[str]) -> None:
    c = _Checker(_section(config, "eval"), "config.eval", out)
    if c.section is None:
        return
    c.integer("batch_size", ge=1)
    c.integer("num_vis", ge=0)
    c.integer("every_steps", ge=0, note=" (0 = only at the end)")
    c.choice("map_dtype", MAP_DTYPES)


def _check_ckpt(config: Any, out: list[str]) -> None:
    c = _Checker(_section(config, "ckpt"), "config.ckpt", out)
    if c.section is None:
        return
    c.integer("keep", ge=0, note=" (0 = keep every checkpoint)")
    c.integer("every_steps", ge=0, note=" (0 = only the final checkpoint)")


def _check_mesh(config: Any, out: list[str]) -> None:
    c = _Checker(_section(config, "mesh"), "config.mesh", out)
    if c.section is None:
        return
    data = c.get("data")
    if data is not _MISSING and not (_is_int(data) and (data == -1 or data >= 1)):
        c.problem("data", data, "must be -1 (every device left over by fsdp) or an integer >= 1")
    c.integer("fsdp", ge=1)


def _check_top(config: Any, out: list[str]) -> None:
    c = _Checker(config, "config", out)
    method = c.get("method")
    if method is not _MISSING:
        if not isinstance(method, str) or (method not in METHODS and ":" not in method):
            c.problem(
                "method",
                method,
                f"must be one of {', '.join(sorted(METHODS))} or a package.module:Class"
                f"{did_you_mean(method, METHODS)}",
            )
    c.choice("compute_dtype", COMPUTE_DTYPES)
    c.integer("seed", ge=0)
    c.integer("max_bad_steps", ge=1)
    c.integer("log_every_steps", ge=1)


def _check_model(config: Any, out: list[str]) -> None:
    model = _section(config, "model")
    if model is None:
        return
    c = _Checker(model, "config.model", out)
    for name in ("backbone", "text_encoder"):
        encoder = _section(model, name)
        if encoder is not None:
            _check_encoder(encoder, f"config.model.{name}", out)
    for name in ("image_score_weight", "image_blend_init", "text_blend_init"):
        c.number(name, _fraction, FRACTION)
    for name in ("temperature", "routing_temperature"):
        c.number(name, _positive, POSITIVE)
    for name in ("smoothing_sigma", "sigma"):
        c.number(name, _non_negative, f"{NON_NEGATIVE} (0 = no smoothing)")
    few_shot = _section(model, "few_shot")
    if few_shot is not None:
        _Checker(few_shot, "config.model.few_shot", out).number(
            "alpha", _non_negative, NON_NEGATIVE
        )


def _check_pretraining_saw_test(config: Any, out: list[str]) -> None:
    """A self-pretrained backbone whose pretraining rendered the families of the ``synthetic_aux``
    (or ``synthetic_aux_select``) categories it is tested on (``configs/demo.py:select`` without a
    ``--hold_out`` backbone)."""
    data = _section(config, "data")
    backbone = _section(_section(config, "model"), "backbone")
    checkpoint = _value(backbone, "checkpoint")
    if (
        str(_value(data, "test_set")).lower()
        not in {procedural.AUX.name, procedural.AUX_SELECT.name}
        or not isinstance(checkpoint, str)
        or not checkpoint
        or _value(backbone, "random_init") is True
    ):
        return
    record_file = Path(checkpoint) / "pretrain.json"
    if not record_file.is_file():
        return
    categories = _value(data, "test_categories")
    if categories is _MISSING or not categories:
        categories = procedural.aux_categories(procedural.AUX.defaults)
    families = sorted({procedural.aux_family(c) for c in categories} - {None})
    held = str(json.loads(record_file.read_text()).get("options", {}).get("hold_out", ""))
    held_out = procedural.aux_families(held)  # as --hold_out reads it: "cloud, sand" too
    seen = [f for f in families if f not in held_out]
    if seen:
        out.append(
            f"config.model.backbone.checkpoint={checkpoint}: its pretraining rendered the test "
            f"families {','.join(seen)} (pretrain.json hold_out={held!r}); pretrain a candidate "
            f"with python -m zsad_jax.pretrain.backbone --out DIR --hold_out {','.join(families)} "
            "and pass --config.model.backbone.checkpoint=DIR"
        )


def _check_encoder(encoder: Any, where: str, out: list[str]) -> None:
    c = _Checker(encoder, where, out)
    kind = c.get("kind")
    if kind is _MISSING:
        return
    if kind not in PRESETS:
        c.problem("kind", kind, f"must be one of {', '.join(PRESETS)}")
        return
    preset = c.get("preset")
    if preset is not _MISSING and preset not in PRESETS[kind]:
        c.problem(
            "preset",
            preset,
            f"must be a {kind} preset: one of {', '.join(sorted(PRESETS[kind]))}"
            f"{did_you_mean(preset, PRESETS[kind])}",
        )


# ----------------------------------------------------------------------------------------------
# Helpers.


def _is_dataset(value: Any, datasets: tuple[str, ...]) -> bool:
    # read_dataset lower-cases the name.
    return isinstance(value, str) and value.lower() in datasets


def patch_size(encoder: Any) -> int | None:
    """The patch side of a ``model.backbone`` block, without building it: from the converted
    ``config.json`` when that exists and ``random_init`` is off (what ``build_backbone`` builds),
    else from the preset; None when it cannot be told (unknown kind/preset, unreadable file)."""
    kind, preset = _value(encoder, "kind"), _value(encoder, "preset")
    checkpoint = _value(encoder, "checkpoint")
    arch = None
    if checkpoint not in (_MISSING, None, "") and _value(encoder, "random_init") is not True:
        meta_file = Path(str(checkpoint)) / "config.json"
        if meta_file.is_file():
            try:
                arch = json.loads(meta_file.read_text()).get("config")
            except (OSError, ValueError):
                return None
    if arch is None:
        presets = PRESETS.get(kind) if isinstance(kind, str) else None
        if not presets or preset not in presets:
            return None
        arch = presets[preset]().to_dict()
    if not isinstance(arch, dict):
        return None
    value = arch.get("vision", {}).get("patch_size") if kind == "clip" else arch.get("patch_size")
    return int(value) if _is_int(value) and value >= 1 else None


def _check_patch_size(config: Any, key: str, size: int, out: list[str]) -> None:
    backbone = _section(_section(config, "model"), "backbone")
    if backbone is None:
        return
    p = patch_size(backbone)
    if p and size % p:
        lower, upper = size // p * p, (size // p + 1) * p
        near = f"{lower} or {upper}" if lower else f"{upper}"
        out.append(
            f"config.data.{key}={size!r}: must be a multiple of the "
            f"config.model.backbone patch size {p} (e.g. {near})"
        )
