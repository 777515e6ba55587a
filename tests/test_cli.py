"""zsad_jax.cli: ``--config.KEY=VALUE`` overrides on a config file and on a config read back from a
checkpoint's JSON (lists for tuples, untyped None), dataset changes that carry their categories
and root along, and the one-line refusals. In-process; tests/test_user_path.py types the commands.
"""

from __future__ import annotations

import json

import ml_collections
import pytest
from toys import REPO, run_module

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import cli, compile_cache, config_check, report


def _stored_demo(*, with_types: bool = True) -> ml_collections.ConfigDict:
    """The demo config as a checkpoint stores it (JSON, and the None fields' types in
    ``config_types``) and evaluate reads it back; ``with_types=False``: a checkpoint from before
    ``config_types``."""
    config = cli.load_config_file("configs/demo.py")
    meta = {"config": report.config_json(config)}
    if with_types:
        meta["config_types"] = ckpt_lib.none_field_types(config)
    return ckpt_lib.config_from_meta(meta)


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("optim.lr", "3e-4", 3e-4),
        ("optim.steps", "12", 12),  # a typed None FieldReference (int)
        ("optim.grad_clip", "1.5", 1.5),  # a typed None FieldReference (float)
        ("data.skip_corrupt", "True", True),
        ("data.test_set", "folder", "folder"),
        ("data.test_categories", "wood,pill", ("wood", "pill")),
        ("data.test_categories", "('wood', 'pill')", ("wood", "pill")),
        ("data.test_categories", "()", ()),
        ("model.layers", "(2, 4)", (2, 4)),
    ],
)
def test_overrides_on_a_config_file_take_the_fields_types(key, text, expected):
    config = cli.apply_overrides(cli.load_config_file("configs/demo.py"), [(key, text)])
    section, leaf = key.rsplit(".", 1)
    assert config[section][leaf] == expected
    assert type(config[section][leaf]) is type(expected)


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("data.test_categories", "wood,pill", ["wood", "pill"]),  # lists in the stored JSON
        ("data.tfds_dir", "gs://bucket/tfds", "gs://bucket/tfds"),  # an untyped None
        ("optim.grad_clip", "1.5", 1.5),
        ("optim.lr", "0.5", 0.5),
        ("data.test_require_masks", "false", False),  # a typed None: config_types keeps "bool"
        ("data.test_require_masks", "True", True),
    ],
)
def test_overrides_on_a_stored_config_work_although_json_lost_the_types(key, text, expected):
    config = cli.apply_overrides(_stored_demo(), [(key, text)])
    section, leaf = key.rsplit(".", 1)
    assert config[section][leaf] == expected
    assert type(config[section][leaf]) is type(expected)


def test_a_stored_configs_typed_none_fields_refuse_what_their_type_does_not_take():
    with pytest.raises(cli.CommandLineError, match="expected True or False"):
        cli.apply_overrides(_stored_demo(), [("data.test_require_masks", "maybe")])
    # A checkpoint from before config_types: the value is read as a literal, as before.
    old = cli.apply_overrides(
        _stored_demo(with_types=False), [("data.test_require_masks", "False")]
    )
    assert old.data.test_require_masks is False


@pytest.mark.parametrize(
    "key, text, message",
    [
        (
            "optim.lrr",
            "1",
            "--config.optim.lrr: no such config key; did you mean --config.optim.lr?",
        ),  # noqa: E501
        ("dat.lr", "1", "did you mean --config.data.lr?"),
        ("optim.zzz", "1", "keys of config.optim: "),
        ("data", "3", "--config.data: is a section; set one of its keys"),
        ("optim.lr", "fast", "--config.optim.lr=fast: expected a number"),
        ("optim.steps", "1.5", "--config.optim.steps=1.5: expected an integer"),
        ("data.skip_corrupt", "maybe", "expected True or False"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_flag(key, text, message):
    with pytest.raises(cli.CommandLineError) as error:
        cli.apply_overrides(cli.load_config_file("configs/demo.py"), [(key, text)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_split_overrides_takes_both_spellings_and_leaves_the_rest():
    rest, overrides = cli.split_overrides(
        ["--workdir=w", "--config.optim.lr=0.1", "--config.optim.steps", "3", "img.png"]
    )
    assert rest == ["--workdir=w", "img.png"]
    assert overrides == [("optim.lr", "0.1"), ("optim.steps", "3")]
    with pytest.raises(cli.CommandLineError, match="give a value"):
        cli.split_overrides(["--config.optim.lr"])


def test_a_changed_dataset_brings_its_categories_and_root_along(capsys):
    # ava_dino's small variant: the synthetic benchmark's categories on both sides.
    config = cli.build_config(
        config_file="configs/ava_dino.py:small",
        overrides=[("data.train_set", "folder"), ("data.train_root", "my_data")],
    )
    assert config.data.categories == () and config.data.train_root == "my_data"
    # The test side was not touched: still the synthetic held-out categories.
    assert config.data.test_categories == ("wood", "dots", "washer", "pill")
    assert "config.data.categories: every category of folder" in capsys.readouterr().err
    chosen = cli.build_config(
        config_file="configs/ava_dino.py:small",
        overrides=[("data.test_set", "mvtec_ad"), ("data.test_categories", "bottle")],
    )
    assert chosen.data.test_categories == ("bottle",) and chosen.data.test_root == "data/mvtec_ad"


def test_invalid_values_are_refused_by_the_config_check():
    with pytest.raises(config_check.ConfigError, match=r"config\.optim\.lr=-1\.0"):
        cli.build_config(config_file="configs/demo.py", overrides=[("optim.lr", "-1")])


def test_config_file_and_checkpoint_together_are_refused(tmp_path):
    with pytest.raises(cli.CommandLineError, match=r"--config\.KEY=VALUE"):
        cli.build_config(config_file="configs/demo.py", overrides=[], checkpoint=str(tmp_path))
    with pytest.raises(cli.CommandLineError, match="no such config file"):
        cli.build_config(config_file="configs/nope.py", overrides=[])


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("model.smoothing_sigma", "4", 4.0),  # AVA-DINO's test-time keys, added on 2026-12-01
        ("model.image_score_weight", "0.5", 0.5),
        ("data.test_mask_dir", "my_masks", "my_masks"),
        ("eval.map_dtype", "float16", "float16"),  # the key evaluate's --help names
    ],
)
def test_overrides_work_on_a_stored_config_that_predates_the_key(key, text, expected):
    stored = _stored_demo()
    section, leaf = key.rsplit(".", 1)
    del stored[section][leaf]
    with pytest.raises(cli.CommandLineError, match="no such config key"):
        cli.apply_overrides(ml_collections.ConfigDict(stored.to_dict()), [(key, text)])
    cli.add_keys_it_predates(stored)
    assert cli.apply_overrides(stored, [(key, text)])[section][leaf] == expected


def test_keys_a_stored_config_predates_keep_what_it_did():
    stored = _stored_demo()
    for leaf in ("smoothing_sigma", "image_score_weight", "visa_class_name_quirk"):
        del stored.model[leaf]
    cli.add_keys_it_predates(stored)
    model = stored.model
    assert (model.smoothing_sigma, model.image_score_weight) == (0.0, 0.0)  # the official scores
    assert model.visa_class_name_quirk is False  # the real class names, as before the switch
    del stored.eval["map_dtype"]
    cli.add_keys_it_predates(stored)
    assert stored.eval.map_dtype == "float32"  # what evaluate used without the key
    custom = ml_collections.ConfigDict({"method": "toys:ToyDetector", "model": {}})
    cli.add_keys_it_predates(custom)  # user code is not imported to ask it
    assert custom.model.to_dict() == {}


def test_every_command_schedules_for_memory_before_anything_compiles(monkeypatch):
    """``schedule_for_memory`` only works before the first computation: it comes first."""
    calls = []
    for name in ("schedule_for_memory", "enable_compilation_cache", "release_compiler_memory"):
        monkeypatch.setattr(compile_cache, name, lambda name=name: calls.append(name))
    cli.Command(lambda: None, lambda argv, overrides: calls.append("main"))._run(["command"])
    assert calls == [
        "schedule_for_memory",
        "enable_compilation_cache",
        "release_compiler_memory",
        "main",
    ]


def test_help_prints_the_docstrings_percent_signs_as_written_and_exits_0(tmp_path):
    """absl %-formats the module docstring for --help: "% std" must not become the path. Asking
    for help succeeds (absl itself exits with 1)."""
    proc = run_module("zsad_jax.reproduce", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "{metric: % std over seeds}" in proc.stdout, proc.stdout[:3000]
    doc = proc.stdout.split("\nflags:\n")[0]  # absl's flag list (which names the file) follows
    assert "reproduce.py" not in doc


@pytest.mark.parametrize(
    ("args", "asks"),
    [
        (["--help"], True),
        (["-?"], True),
        (["--workdir=runs/x", "--helpfull"], True),
        (["-helpshort"], True),
        (["--helpxml=true"], True),
        (["--workdir=help"], False),
        (["help"], False),
        (["--helper"], False),
    ],
)
def test_only_absls_help_flags_count_as_asking_for_help(args, asks):
    assert cli._asks_for_help(args) is asks


def test_a_bad_flag_still_fails_after_help_exits_0(capsys):
    """The help exit is 0, and an unknown flag is still the one-line refusal with exit 2."""
    command = cli.Command(lambda: None, lambda argv, overrides: None)
    with pytest.raises(SystemExit) as exit_:
        command._parse(["prog", "--no_such_flag_here=1"])
    assert exit_.value.code == 2
    assert "no_such_flag_here" in capsys.readouterr().err


def test_distributed_without_a_detected_cluster_names_the_flags_to_pass(monkeypatch):
    import jax

    def no_cluster(**kwargs):
        assert kwargs["coordinator_address"] is None
        raise ValueError("coordinator_address should be defined.")  # what jax says then

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the test process keeps its own
    with pytest.raises(cli.CommandLineError) as refused:
        cli.initialize_distributed(auto=True)
    assert str(refused.value) == (
        "--distributed: no TPU pod, SLURM or Open MPI cluster detected (coordinator_address "
        "should be defined.); elsewhere pass --coordinator_address=HOST:PORT --num_processes=N "
        "--process_id=I"
    )


def test_a_refused_command_leaves_no_empty_folder_it_created(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    cli.ensure_writable(tmp_path / "runs" / "eval" / "deep", "--workdir")
    cli.ensure_writable(kept / "sub", "--out")
    (kept / "sub" / "result.json").write_text("{}")  # written before the refusal: kept
    cli.remove_empty_created_folders()
    assert not (tmp_path / "runs").exists()
    assert (kept / "sub" / "result.json").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"^--workdir=.*afile: is a file, not a folder"):
        cli.ensure_writable(tmp_path / "afile", "--workdir")


def test_ctrl_c_in_a_command_is_one_line_and_exit_status_130(monkeypatch, capsys, tmp_path):
    for name in ("schedule_for_memory", "enable_compilation_cache", "release_compiler_memory"):
        monkeypatch.setattr(compile_cache, name, lambda: None)

    def interrupted(argv, overrides):
        cli.ensure_writable(tmp_path / "eval", "--workdir")
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        cli.Command(lambda: None, interrupted)._run(["command"])
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
    assert not (tmp_path / "eval").exists()  # the empty --workdir it made is gone


def test_summary_prints_the_table_and_json_and_refuses_a_typo_in_one_line():
    """The README's ``python -m zsad_jax.summary`` reads its config as the other commands do."""
    proc = run_module("zsad_jax.summary", ["--config=configs/demo.py:tiny"], REPO)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ava_dino: parameters by module" and lines[-2].startswith("total ")
    counts = json.loads(lines[-1])
    assert counts["total_params"] == counts["trainable_params"] + counts["frozen_params"] > 0
    typo = run_module(
        "zsad_jax.summary", ["--config=configs/demo.py", "--config.optim.stepz=3"], REPO
    )
    assert typo.returncode == 2 and typo.stdout == ""
    assert typo.stderr.splitlines() == [
        "error: --config.optim.stepz: no such config key; did you mean --config.optim.steps?"
    ]
    # A stray argument is refused while the flags are read, before any config file is opened.
    stray = run_module("zsad_jax.summary", ["--config=configs/nosuch.py", "extra"], REPO)
    assert stray.returncode == 2 and stray.stderr.splitlines() == [
        "error: unexpected arguments ['extra']"
    ]


def test_the_package_lists_its_commands_and_says_how_to_type_one():
    listing = run_module("zsad_jax", [], REPO)
    assert listing.returncode == 0 and listing.stderr == ""
    commands = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ")]
    assert commands == ["train", "evaluate", "predict", "reproduce", "summary",
                        "pretrain.backbone", "data.tfds_builder", "data.synthetic",
                        "data.procedural"]  # fmt: skip
    for command in commands:  # each one runs as a module: a __main__ block that does the work
        source = (REPO / "zsad_jax" / (command.replace(".", "/") + ".py")).read_text()
        assert 'if __name__ == "__main__":' in source, command
    assert "  train              Trains a method's heads on a frozen backbone\n" in listing.stdout
    typed = run_module("zsad_jax", ["train", "--config=configs/demo.py"], REPO)
    assert typed.returncode == 2 and typed.stderr.splitlines() == [
        "error: a command is a module of its own: type python -m zsad_jax.train "
        "--config=configs/demo.py"
    ]
    unknown = run_module("zsad_jax", ["fit"], REPO)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no command 'fit'; ")
