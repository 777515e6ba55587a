r"""What the three commands (``train``, ``evaluate``, ``predict``) share on the command line.

The config::

    --config=configs/af_clip.py[:variant,...]   a config file (``get_config(arg)``), the user's own
    --checkpoint=RUN                            evaluate/predict: the config stored with RUN
    --config.KEY=VALUE                          overrides on top of either, e.g.
                                                --config.data.test_set=folder

Overrides are parsed here (not by ml_collections' flags) so that they work the same on a config
file and on a config read back from a checkpoint's JSON, where tuples came back as lists and
``None`` fields lost their type: a value is read as the type of the field it replaces (a bool,
int, float or str; a tuple from ``'(a, b)'`` or ``a,b``; a Python literal where the field is None).
An unknown key is refused with the closest known one. When an override changes a side's dataset
(``data.train_set`` / ``data.test_set``) and the same command line does not also set its
categories (or root), those follow the new dataset: every category of it, under ``data/<name>``.
The result is validated (``zsad_jax.config_check``) before any work.

Multi-host: ``--distributed`` (cluster auto-detection) or ``--coordinator_address``,
``--num_processes``, ``--process_id``, the same for every command.

Every command turns on jax's persistent compilation cache (``zsad_jax.compile_cache``).

Errors end the command with one line ``error: ...`` (one line per problem for an invalid config)
and exit status 1 (2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import compile_cache, config_check, methods, report
from zsad_jax.data import protocol, sources
from zsad_jax.errors import EXPECTED_ERRORS, INTERRUPTED_EXIT_CODE, CommandLineError, fail

CONFIG_PREFIX = "--config."
# ``data.<side>_set`` -> the fields that describe that side's dataset and follow it when it changes.
DATASET_FIELDS = {
    "train_set": ("categories", "train_root"),
    "test_set": ("test_categories", "test_root"),
}


# ----------------------------------------------------------------------------------------------
# Config files and overrides.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` -> ``get_config(arg)`` of that file (relative paths from the current
    folder, like every other path a command takes)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise CommandLineError(f"--config={spec}: no such config file {path}")
    # The project's config files import their siblings as ``configs.common``: make the folder that
    # holds ``configs/`` importable, so the file also loads when given from elsewhere.
    folder = Path(path).absolute().parent
    if folder.name == "configs" and str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    name = "zsad_config_" + "".join(c if c.isalnum() else "_" for c in str(Path(path).absolute()))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise CommandLineError(f"--config={spec}: {path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise CommandLineError(f"--config={spec}: get_config() returned {type(config).__name__}")
    return config


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``(other args, [(key, value), ...])``: ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``)
    taken out of ``args``."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(CONFIG_PREFIX):
            key, sep, value = arg[len(CONFIG_PREFIX) :].partition("=")
            if not sep:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise CommandLineError(f"{arg}: give a value, e.g. {arg}=VALUE")
                i, value = i + 1, args[i + 1]
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parent_and_leaf(config: ml_collections.ConfigDict, key: str) -> tuple[Any, str]:
    """The section holding ``key`` (dotted) and the last part; unknown parts are refused naming
    the closest known key."""
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            known = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            prefix = ".".join(parts[:depth])
            close = difflib.get_close_matches(part, known, n=1)
            suggestion = ".".join([*parts[:depth], *close, *parts[depth + 1 :]])
            hint = f"; did you mean {CONFIG_PREFIX}{suggestion}?"
            if not close:
                where = f"config.{prefix}" if prefix else "config"
                hint = f"; keys of {where}: {', '.join(sorted(known)) or 'none'}"
            raise CommandLineError(f"{CONFIG_PREFIX}{key}: no such config key{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_value(key: str, text: str, current: Any, field_type: type | None) -> Any:
    """``text`` read as the type of the value it replaces (module docstring)."""
    kind = field_type if current is None and field_type not in (None, type(None)) else None
    kind = kind or type(current)

    def bad(expected: str) -> CommandLineError:
        return CommandLineError(f"{CONFIG_PREFIX}{key}={text}: expected {expected}")

    if isinstance(current, (ml_collections.ConfigDict, dict)):
        raise CommandLineError(
            f"{CONFIG_PREFIX}{key}: is a section; set one of its keys "
            f"({', '.join(f'{CONFIG_PREFIX}{key}.{k}' for k in sorted(current)[:4])}, ...)"
        )
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise bad("True or False")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if kind is str:
        return text
    if kind in (tuple, list):
        stripped = text.strip()
        if stripped[:1] in "([":
            value = _literal(stripped)
            if not isinstance(value, (tuple, list)):
                raise bad("a sequence such as '(a, b)'")
        else:
            value = [_literal(item.strip()) for item in stripped.split(",") if item.strip()]
        return kind(value)
    return _literal(text)  # a None field: whatever the text says


def _field_type(section: ml_collections.ConfigDict, leaf: str) -> type | None:
    try:
        return section.get_type(leaf)
    except (AttributeError, KeyError, TypeError):
        return None


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
    """``config`` with every ``(key, value)`` set, values parsed as the fields' types."""
    for key, text in overrides:
        section, leaf = _parent_and_leaf(config, key)
        value = _parse_value(key, text, section[leaf], _field_type(section, leaf))
        try:
            section[leaf] = value
        except (TypeError, ValueError) as e:
            raise CommandLineError(f"{CONFIG_PREFIX}{key}={text}: {e}") from e
    return config


def follow_dataset_changes(
    config: ml_collections.ConfigDict,
    before: Mapping[str, Any],
    overridden: set[str],
) -> list[str]:
    """Resets the categories and root of each side whose dataset an override changed (and whose
    categories/root the command line did not set); returns a note per reset."""
    notes = []
    data = config.get("data")
    for set_field, followers in DATASET_FIELDS.items():
        if data is None or set_field not in data or f"data.{set_field}" not in overridden:
            continue
        name = data[set_field]
        if name == before.get(set_field) or ":" in str(name):
            continue
        categories_field, root_field = followers
        if f"data.{categories_field}" not in overridden and data.get(categories_field):
            data[categories_field] = type(data[categories_field])()
            notes.append(f"config.data.{categories_field}: every category of {name}")
        if f"data.{root_field}" not in overridden and root_field in data:
            data[root_field] = protocol.default_root(name)
            notes.append(f"config.data.{root_field}={data[root_field]}")
    return notes


def add_keys_it_predates(config: ml_collections.ConfigDict) -> None:
    """Gives a stored config the keys it predates, with the values that keep what it did: the
    optional ``data`` keys ("not set"), ``data.train_image_size`` (0: the test size),
    ``eval.map_dtype`` and its method's added ``model`` keys,
    so that ``--config.data.test_mask_dir=...`` or ``--config.model.smoothing_sigma=4`` also work
    on a checkpoint written before them, and a run resumed by a newer zsad_jax is the same run."""
    added = {
        "data": {**sources.optional_data_keys(), "train_image_size": 0},  # 0 = image_size
        "model": methods.added_model_keys(str(config.get("method", ""))),
        "eval": {"map_dtype": "float32"},  # what evaluate read from a config without the key
    }
    for section, keys in added.items():
        fields = config.get(section)
        if fields is None:
            continue
        for key, value in keys.items():
            if key not in fields:
                fields[key] = value


def stored_config_json(meta: Mapping[str, Any]) -> str:
    """A checkpoint's config as JSON with the keys it predates filled in (``add_keys_it_predates``):
    what a resumed run compares with its config."""
    config = ckpt_lib.config_from_meta(meta)
    add_keys_it_predates(config)
    return report.config_json(config)


def build_config(
    *,
    config_file: str | None,
    overrides: Sequence[tuple[str, str]],
    checkpoint: str | None = None,
    step: int | None = None,
) -> ml_collections.ConfigDict:
    """The config a command runs with (module docstring), validated.

    Raises:
      CommandLineError: neither or both of ``--config`` and ``--checkpoint`` where that matters,
        an unknown key or a value of the wrong type.
      zsad_jax.config_check.ConfigError: an invalid value (one line per problem).
    """
    if checkpoint and config_file:
        raise CommandLineError(
            f"--config={config_file} with --checkpoint={checkpoint}: the config stored with the "
            "checkpoint is used; change its keys with --config.KEY=VALUE (e.g. "
            "--config.data.test_set=folder --config.data.test_root=my_data)"
        )
    if checkpoint:
        config = ckpt_lib.config_from_meta(ckpt_lib.read_meta(checkpoint, step))
        add_keys_it_predates(config)
    elif config_file:
        config = load_config_file(config_file)
    else:
        raise CommandLineError("give --config=FILE (e.g. --config=configs/demo.py)")
    data = config.get("data") or {}
    before = {k: data.get(k) for k in DATASET_FIELDS}
    apply_overrides(config, overrides)
    notes = follow_dataset_changes(config, before, {k for k, _ in overrides})
    if notes:
        print(f"note: dataset changed, so {'; '.join(notes)}", file=sys.stderr)
    config_check.check(config)
    return config


def config_from_flags(overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """What every command does first: join the other processes (multi-host flags; before anything
    touches a JAX backend), then build the config from ``--config`` / ``--checkpoint`` (where the
    command has it) and the overrides."""
    from absl import flags

    f = flags.FLAGS
    initialize_from_flags()
    has = set(f)
    return build_config(
        config_file=f.config,
        overrides=overrides,
        checkpoint=f.checkpoint if "checkpoint" in has else None,
        step=f.step if "step" in has else None,
    )


# ----------------------------------------------------------------------------------------------
# Paths.


# Folders ensure_writable created (the topmost new one of each path): a command refused later
# removes those still empty, so a refusal leaves no empty --workdir behind.
_CREATED: list[Path] = []


def ensure_writable(
    folder: str | os.PathLike,
    flag: str,
    *,
    create: bool = True,
    given: str | os.PathLike | None = None,
) -> Path:
    """Creates ``folder`` and checks a file can be written there, so that a read-only location or
    a file in the way fails at once with one line naming ``flag=given`` (default: the folder)
    instead of after the work. With ``create=False`` nothing is made: the nearest folder that
    exists is probed, as the missing ones would be made in it."""
    folder = Path(folder)
    named = folder if given is None else Path(given)
    shown = f"{flag}={folder if given is None else given}"  # as typed: DIR/ keeps its slash
    existing = folder  # the folder itself, or without create the nearest that exists
    while not create and not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == named else f"{existing} is a file"
        raise ValueError(f"{shown}: {where}, not a folder; choose a folder (or a new name)")
    try:
        if create:
            new = [p for p in (folder, *folder.absolute().parents) if not p.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            if new:
                _CREATED.append(new[-1])
        probe = existing / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"{shown}: cannot write there ({e.strerror or e}); choose a writable folder"
        ) from e
    return folder


def remove_empty_created_folders() -> None:
    """Removes the folders ``ensure_writable`` created that are still empty (innermost first)."""
    while _CREATED:
        top = _CREATED.pop()
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
            _remove_if_empty(path)
        _remove_if_empty(top)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (or already gone): keep it


# ----------------------------------------------------------------------------------------------
# Flags of the commands that run a trained model (evaluate, predict).


CHECKPOINT_FLAGS = ("config", "checkpoint", "step", "allow_custom_code")


def define_checkpoint_flags() -> None:
    """``CHECKPOINT_FLAGS``; the command declares them its key flags (``flags.declare_key_flag``)
    so that its ``--help`` lists them."""
    from absl import flags

    flags.DEFINE_string(
        "config", None, "method config file[:variant] for a random-init smoke run without "
        "--checkpoint; with --checkpoint its stored config is used (change keys with "
        "--config.KEY=VALUE)",
    )  # fmt: skip
    flags.DEFINE_string("checkpoint", None, "training workdir, its checkpoints/ or a step folder")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool(
        "allow_custom_code", False,
        "import the Python code a checkpoint's config names (config.method='module:Class'); "
        "only for checkpoints you trust",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Multi-host.


def define_multihost_flags() -> None:
    from absl import flags

    flags.DEFINE_bool(
        "distributed", False, "call jax.distributed.initialize() with cluster auto-detection"
    )
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: index of this process")


def initialize_distributed(
    *,
    auto: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` when asked to (before any other JAX call).

    ``auto`` lets JAX detect the cluster (TPU pod, SLURM, Open MPI); otherwise the three arguments
    name the coordinator (process 0's ``host:port``), the process count and this process's index.
    """
    import jax

    if not (auto or coordinator_address or num_processes):
        return
    # Cross-process collectives on CPU hosts (tests, CPU clusters); ignored by GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except ValueError as e:
        if coordinator_address:
            raise
        # JAX's own text ("coordinator_address should be defined.") names no flag.
        raise CommandLineError(
            f"--distributed: no TPU pod, SLURM or Open MPI cluster detected ({e}); elsewhere "
            "pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I"
        ) from None


def initialize_from_flags() -> None:
    from absl import flags

    f = flags.FLAGS
    initialize_distributed(
        auto=f.distributed,
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
    )


# ----------------------------------------------------------------------------------------------
# Running a command.


# absl's flags that print a help text and exit (``-?`` is --help's short name).
HELP_FLAGS = frozenset({"help", "?", "helpshort", "helpfull", "helpxml"})


def _asks_for_help(args: Sequence[str]) -> bool:
    """Whether ``args`` (the command line after the program) holds one of absl's help flags."""
    return any(a.startswith("-") and a.lstrip("-").split("=")[0] in HELP_FLAGS for a in args)


class Command:
    """An absl command whose ``--config.KEY=VALUE`` overrides are parsed here.

    ``define_flags()`` defines the command's own flags; ``main(argv, overrides)`` does the work.
    Arguments that are not flags are refused before it unless the command ``takes_paths`` (they
    reach ``main`` as ``argv[1:]``). The expected failures of ``main`` (bad paths, data, configs,
    checkpoints) end with one line.
    """

    EXPECTED_ERRORS = EXPECTED_ERRORS

    def __init__(
        self,
        define_flags: Callable[[], None],
        main: Callable[[list[str], list[tuple[str, str]]], None],
        *,
        expected_errors: tuple[type[BaseException], ...] = (),
        takes_paths: bool = False,
    ):
        self._define_flags, self._main = define_flags, main
        self._takes_paths = takes_paths
        self._expected = self.EXPECTED_ERRORS + tuple(expected_errors)
        self.overrides: list[tuple[str, str]] = []

    def _parse(self, argv: list[str]) -> list[str]:
        from absl import flags

        try:
            rest, self.overrides = split_overrides(argv[1:])
            remaining = flags.FLAGS([argv[0], *rest])
            if len(remaining) > 1 and not self._takes_paths:
                raise CommandLineError(f"unexpected arguments {remaining[1:]}")
            return remaining
        except (flags.Error, CommandLineError) as e:
            fail(str(e), code=2)
        except SystemExit as e:
            # absl exits with 1 after printing the help asked for; asking is not a failure
            # (scripts and `make` read 1 as one), as for every argparse command of the project.
            if e.code == 1 and _asks_for_help(argv[1:]):
                raise SystemExit(0) from None
            raise

    def _run(self, argv: list[str]) -> None:
        from absl import flags
        from absl import logging as absl_logging

        if not flags.FLAGS["verbosity"].present:
            # orbax logs every save at INFO; keep the terminal for progress bars and errors.
            absl_logging.set_verbosity(absl_logging.WARNING)
        compile_cache.schedule_for_memory()  # fewer buffers alive at once (before any array)
        compile_cache.enable_compilation_cache()  # a second run of a command does not recompile
        compile_cache.release_compiler_memory()  # the compiler's freed memory is not the peak's
        try:
            self._main(argv, self.overrides)
        except CommandLineError as e:
            remove_empty_created_folders()
            fail(str(e), code=2)
        except self._expected as e:
            remove_empty_created_folders()
            fail(str(e))
        except KeyboardInterrupt as e:
            # A command may say what it leaves (predict: which records a stopped run kept).
            remove_empty_created_folders()
            fail(str(e) or "interrupted (Ctrl-C)", code=INTERRUPTED_EXIT_CODE)

    def run(self) -> None:
        from absl import app

        self._define_flags()
        # --help prints the module docstring through %-formatting (absl: "%s" becomes the
        # program's path); a docstring's own "%" signs ("% std") must print as written.
        main_module = sys.modules["__main__"]
        if main_module.__doc__:
            main_module.__doc__ = main_module.__doc__.replace("%", "%%")
        app.run(self._run, flags_parser=self._parse)
