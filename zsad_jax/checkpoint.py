"""Training checkpoints (orbax) and loading a trained model for inference.

A training run writes ``WORKDIR/checkpoints/<step>/`` with four items::

    params     the Trainable weights, a flat {dotted path: array} dict (megabytes; the frozen
               backbone is never stored: it comes from the converted encoder of the config)
    opt_state  the optax state (moments, counts)
    mutable    RNG streams of the model (keys stored as raw uint32 key data)
    meta       JSON: step, data-iterator state, bad-step counters, the values logged since the
               last metrics row (so a resumed run's next row averages the same steps), the config
               (``config.to_json()``), ``threshold`` (image-score threshold, F1-optimal on
               evaluation data, or null) and, in the final checkpoint, ``final: true`` with the
               final metrics

Steps are written atomically by orbax (a temporary directory renamed when complete), the last
``config.ckpt.keep`` are kept, and saving is asynchronous when ``config.ckpt.async`` is set (the
device -> host copy happens before ``save`` returns, so the next step may donate the buffers).

This is the training format; ``zsad_jax.encoders.checkpoint`` is the separate converted-encoder
format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from zsad_jax import methods
from zsad_jax.encoders import checkpoint as encoder_io
from zsad_jax.nn import Trainable
from zsad_jax.state import data_to_keys, flat_arrays, is_key, keys_to_data, path_str

FORMAT = "zsad_jax.train/1"
CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "mutable", "meta")
# Stored as the ``mutable`` item of a model that has no RNG streams (orbax rejects empty items).
_NO_MUTABLE = {"_no_mutable_state": np.zeros((), np.uint8)}


# ----------------------------------------------------------------------------------------------
# Building the model a checkpoint belongs to.


# Config fields that may name Python code as ``package.module:name`` (a user-defined method class,
# a training-data factory). A config the user gives on the command line is theirs to run; a config
# stored inside a checkpoint is data from whoever made the checkpoint, so its specs are refused
# before any import unless the loader opts in (``allow_custom_code``).
CODE_FIELDS = ("method", "data.train_set")


class CustomCodeRefused(ValueError):
    """A stored config names code to import and the loader did not allow it."""


def code_specs(config: Any) -> dict[str, str]:
    """``{"config.<field>": spec}`` for every field of ``CODE_FIELDS`` holding a ``module:name``."""
    found = {}
    for field in CODE_FIELDS:
        value: Any = config
        for part in field.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if isinstance(value, str) and ":" in value:
            found[f"config.{field}"] = value
    return found


def refuse_custom_code(config: Any, where: str | os.PathLike) -> None:
    """Raises ``CustomCodeRefused`` naming the first code-naming field of a stored config."""
    for field, spec in code_specs(config).items():
        raise CustomCodeRefused(
            f"{where}: {field}={spec!r} names Python code to import; a checkpoint is data and "
            "its code is not run unless you trust it: pass --allow_custom_code to import it"
        )


def _abstract(tree: Any) -> Any:
    def one(x):
        if is_key(x):
            x = jax.random.key_data(x)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------
# The checkpoint manager of a training run.


class TrainCheckpointer:
    """Saves and restores the training state of one run in ``directory`` (WORKDIR/checkpoints)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        *,
        params: Mapping[str, jax.Array],
        opt_state: Any,
        mutable: Mapping[str, jax.Array],
        meta: Mapping[str, Any],
    ) -> None:
        """Writes ``step``; returns once the arrays are copied off the devices (async) or saved."""
        mutable, impls = keys_to_data(mutable)
        # orbax refuses an empty item: a model without RNG streams stores a placeholder instead.
        mutable = mutable or dict(_NO_MUTABLE)
        meta = {"format": FORMAT, **meta, "key_impls": impls}
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(dict(params)),
                opt_state=ocp.args.StandardSave(opt_state),
                mutable=ocp.args.StandardSave(mutable),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(
        self,
        step: int,
        *,
        params: Mapping[str, Any],
        opt_state: Any,
        mutable: Mapping[str, Any],
    ) -> tuple[dict[str, jax.Array], Any, dict[str, jax.Array], dict[str, Any]]:
        """The state saved at ``step``, placed like the given templates (arrays or abstract arrays
        with shardings): ``(params, opt_state, mutable, meta)``."""
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(dict(params))),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                mutable=ocp.args.StandardRestore(_abstract(dict(mutable or _NO_MUTABLE))),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = dict(restored["meta"])
        mutable_out = data_to_keys(dict(restored["mutable"]), meta.get("key_impls", {}))
        mutable_out = {k: v for k, v in mutable_out.items() if k not in _NO_MUTABLE}
        return dict(restored["params"]), restored["opt_state"], mutable_out, meta

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        return dict(
            self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------------------------
# Inference.


def resolve_step_dir(checkpoint_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The absolute step directory of a run's workdir, its ``checkpoints`` folder or a step folder
    itself (the latest complete step unless ``step`` is given). Absolute because orbax's readers
    need it (a relative path makes its ``metadata()`` return None)."""
    path = Path(checkpoint_dir).absolute()
    if (path / "meta").is_dir() and (path / "params").is_dir():
        return path
    if (path / CHECKPOINT_SUBDIR).is_dir():
        path = path / CHECKPOINT_SUBDIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"{checkpoint_dir}: no such checkpoint directory; pass a training workdir "
            f"(with {CHECKPOINT_SUBDIR}/), its {CHECKPOINT_SUBDIR}/ folder or one step folder"
        )
    # Complete orbax steps are plain integer folder names (temporaries carry a suffix).
    steps = sorted(
        int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "meta").is_dir()
    )
    if not steps:
        raise FileNotFoundError(
            f"{checkpoint_dir}: no complete training checkpoint found (expected step folders with "
            "params/ and meta/, written by python -m zsad_jax.train)"
        )
    if step is None:
        return path / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"{checkpoint_dir}: no step {step}; saved steps: {steps}")
    return path / str(step)


# The JSON file orbax's JsonCheckpointHandler writes inside an item folder (its default name).
META_FILE = "metadata"
# Every key ``meta`` may hold, and the JSON types allowed for it (module docstring).
META_SCHEMA: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "step": (int,),
    "config": (str,),
    "threshold": (int, float, type(None)),
    "data_state": (dict, list, str, int, type(None)),
    "counters": (dict,),
    "log_window": (dict,),
    "seconds": (int, float),
    "final": (bool,),
    "result": (dict,),
    "key_impls": (dict,),
    "config_changes": (list,),
    "config_types": (dict,),
    "encoders": (dict,),
}
META_REQUIRED = ("format", "step", "config")


class MalformedCheckpoint(ValueError):
    """A checkpoint's ``meta`` item is unreadable or not what ``zsad_jax.train`` writes."""


def validate_meta(meta: Any, where: str | os.PathLike) -> dict[str, Any]:
    """``meta`` checked against ``META_SCHEMA`` (format tag, required keys, types, known keys);
    the stored config must parse as a JSON object. Returns it unchanged."""

    def bad(what: str) -> MalformedCheckpoint:
        return MalformedCheckpoint(f"{where}: not a valid zsad_jax training checkpoint: {what}")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in META_REQUIRED if k not in meta]
    unknown = sorted(set(meta) - set(META_SCHEMA))
    if missing or unknown:
        raise bad(f"missing keys {missing}, unknown keys {unknown}")
    for key, value in meta.items():
        if isinstance(value, bool) and bool not in META_SCHEMA[key]:
            raise bad(f"{key!r} is a boolean")
        if not isinstance(value, META_SCHEMA[key]):
            names = "/".join(t.__name__ for t in META_SCHEMA[key])
            raise bad(f"{key!r} is {type(value).__name__}, expected {names}")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise bad(f"the stored config is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise bad("the stored config is not a JSON object")
    return meta


def read_meta(checkpoint_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` item of a checkpoint (see the module docstring), validated.

    Read as plain JSON rather than through orbax so that a truncated or hand-edited file gets an
    error naming it instead of a traceback from inside orbax.
    """
    path = resolve_step_dir(checkpoint_dir, step) / "meta" / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MalformedCheckpoint(f"{path}: missing (an incomplete checkpoint?)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedCheckpoint(f"{path}: not valid JSON ({e}); the file is damaged") from e
    return validate_meta(meta, path)


# The types a stored config's None fields may declare (``FieldReference(None, field_type=...)``).
_FIELD_TYPES = {t.__name__: t for t in (bool, int, float, str)}


def none_field_types(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{"data.test_require_masks": "bool", ...}``: the declared type of every None field.

    JSON keeps a None but not its type, and without the type a command-line override of such a
    field in a stored config cannot be read as what it is (``--config.data.test_require_masks=
    false`` would become the string "false", which is true); ``meta["config_types"]`` keeps them.
    """
    out: dict[str, str] = {}

    def walk(section: ml_collections.ConfigDict, prefix: str) -> None:
        for key in section.keys():
            value = section[key]
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            elif value is None:
                declared = section.get_type(key)
                if declared in _FIELD_TYPES.values():
                    out[f"{prefix}{key}"] = declared.__name__

    walk(config, "")
    return out


def _encoder_blocks(config: Any) -> dict[str, Any]:
    """``{"model.backbone": block, ...}``: the frozen encoders read from converted weights."""
    model = config.get("model") if hasattr(config, "get") else None
    if not isinstance(model, ml_collections.ConfigDict):
        return {}
    return {
        f"model.{name}": block
        for name, block in model.items()
        if isinstance(block, ml_collections.ConfigDict)
        and {"kind", "checkpoint", "random_init"} <= set(block.keys())
        and block.checkpoint
        and not block.random_init
    }


def encoder_digests(config: Any) -> dict[str, str]:
    """``{"model.backbone": "sha256:...", ...}`` of the converted weights each frozen encoder of
    ``config`` reads (``meta["encoders"]``); an encoder whose folder holds no weights is left out
    (building it fails with its own message)."""
    out = {}
    for key, block in _encoder_blocks(config).items():
        if (Path(block.checkpoint) / encoder_io.WEIGHTS_FILE).is_file():
            out[key] = encoder_io.weights_digest(block.checkpoint)
    return out


def check_encoders(meta: Mapping[str, Any], config: Any, where: str | os.PathLike) -> None:
    """Refuses, in one line, a frozen encoder whose weights differ from those the checkpoint was
    trained on (``meta["encoders"]``; checkpoints written before it are not checked): the trained
    heads would run on other features and give other scores without a word."""
    recorded = meta.get("encoders", {})
    for key, digest in encoder_digests(config).items():
        if key in recorded and recorded[key] != digest:
            folder = config.model[key.removeprefix("model.")].checkpoint
            raise ValueError(
                f"{where}: trained on other {key.split('.')[-1]} weights than "
                f"{folder} holds now ({recorded[key][:19]}... then, {digest[:19]}... "
                f"now); convert the same source into that folder again, or point "
                f"--config.{key}.checkpoint at the weights it was trained on"
            )


def config_from_meta(meta: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The stored config, its None fields typed again from ``meta["config_types"]`` (checkpoints
    written before that key have untyped None fields)."""
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    for dotted, name in meta.get("config_types", {}).items():
        *parents, leaf = dotted.split(".")
        section = config
        for part in parents:
            section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
        if (
            isinstance(section, ml_collections.ConfigDict)
            and leaf in section
            and section[leaf] is None
            and name in _FIELD_TYPES
        ):
            section[leaf] = ml_collections.FieldReference(None, field_type=_FIELD_TYPES[name])
    return config


def save_threshold(
    checkpoint_dir: str | os.PathLike, threshold: float | None, *, step: int | None = None
) -> Path:
    """Stores the image-score ``threshold`` in a saved checkpoint (evaluation fills this slot)."""
    step_dir = resolve_step_dir(checkpoint_dir, step)
    meta = read_meta(step_dir)
    meta["threshold"] = None if threshold is None else float(threshold)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        ckptr.save(step_dir / "meta", args=ocp.args.JsonSave(meta), force=True)
    return step_dir


def tree_differences(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What keeps ``saved`` ({path: array or metadata}) from fitting ``expected``: missing,
    unexpected and reshaped entries, a few of each."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    reshaped = [
        f"{k} {tuple(saved[k].shape)} -> {tuple(np.shape(expected[k]))}"
        for k in sorted(set(saved) & set(expected))
        if tuple(saved[k].shape) != tuple(np.shape(expected[k]))
    ]
    parts = [(missing, "missing"), (unexpected, "unexpected"), (reshaped, "other shape")]
    return [f"{label} {items[:5]}" for items, label in parts if items]


def saved_params_metadata(step_dir: Path) -> dict[str, Any]:
    """``{path: metadata with .shape}`` of a step's ``params`` item, without reading arrays."""
    # The handler itself: a Checkpointer would also look for (and warn about) step-level metadata.
    metadata = ocp.StandardCheckpointHandler().metadata(Path(step_dir).absolute() / "params")
    return dict(metadata.tree)


def load_params(step_dir: Path, like: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The saved Trainable weights, on this process's first device, shaped like ``like``."""
    step_dir = Path(step_dir).absolute()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {
        k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=device) for k, v in like.items()
    }
    differences = tree_differences(saved_params_metadata(step_dir), abstract)
    if differences:
        raise ValueError(
            f"{step_dir}/params does not fit the model built from the config: "
            + "; ".join(differences)
        )
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return dict(ckptr.restore(step_dir / "params", args=ocp.args.StandardRestore(abstract)))


def load_for_inference(
    checkpoint_dir: str | os.PathLike,
    *,
    step: int | None = None,
    config: Any = None,
    allow_custom_code: bool = False,
) -> tuple[nnx.Module, ml_collections.ConfigDict, float | None]:
    """``(model, config, threshold)`` of a trained run.

    ``checkpoint_dir`` is a training workdir, its ``checkpoints`` folder or one step folder (latest
    step unless ``step``). The model is rebuilt from the stored config (frozen backbone read from
    its converted weights), its Trainable weights replaced by the saved ones. ``config`` replaces
    the stored one (e.g. the stored one with a different test set); ``threshold`` is None if
    evaluation never stored one. Call ``model.set_classes(...)`` for the categories to score
    before use.

    A checkpoint is data: a config that names code to import (``CODE_FIELDS``) is refused before
    any import unless ``allow_custom_code``.
    """
    step_dir = resolve_step_dir(checkpoint_dir, step)
    meta = read_meta(step_dir)
    config = config_from_meta(meta) if config is None else config
    if not allow_custom_code:
        refuse_custom_code(config, step_dir / "meta" / META_FILE)
    check_encoders(meta, config, step_dir)
    model = methods.build(config, load_weights=True)
    trainable_state = nnx.state(model, Trainable)
    params = load_params(step_dir, flat_arrays(trainable_state))
    flat = [(p, v.replace(params[path_str(p)])) for p, v in nnx.to_flat_state(trainable_state)]
    nnx.update(model, nnx.from_flat_state(flat))
    return model, config, meta.get("threshold")
