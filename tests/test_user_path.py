"""The README's commands as a user types them: from a repo root, with relative paths.

The commands are read from README.md itself (the train command of the run-command block, then the
block after ``<!-- user-journey -->``), so the README and this test cannot drift apart. They run
in a scratch folder laid out like the repo root (``configs/`` linked in, ``my_data/`` written in
the layout of the README's "Your own data" section), one process and one device as on a user's
machine. The only changes to what the README prints: the interpreter is this one, and the demo is
shrunk to its ``tiny`` variant for 2 steps.

Journey: train -> evaluate the checkpoint -> evaluate it on ``my_data`` by overrides alone (its
stored synthetic categories must not leak into the folder dataset) -> predict on a folder whose
names collide (``a.png``, ``a.jpg``, ``a_1.png``) -> export -> reload the export without the model
code and get predict's scores. Then the mistakes a user makes, each refused in one line naming
the key, file or flag.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from xla_env import xla_flags

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHRINK = {"--config=configs/demo.py": "--config=configs/demo.py:tiny"}
TRAIN_EXTRA = ["--config.optim.steps=2", "--noprogress"]


def readme_block(marker: str) -> list[str]:
    """The command lines of the first fenced block after ``<!-- marker -->`` (comments and
    blank lines dropped)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->")
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return [ln for ln in lines[fence + 1 : end] if ln.strip() and not ln.startswith("#")]


def readme_train_command() -> list[str]:
    """The training part of the run-command block (after the install)."""
    (block,) = readme_block("run-command")
    train = [part for part in block.split("&&") if "zsad_jax.train" in part]
    assert len(train) == 1, block
    return shlex.split(train[0])


def as_typed(argv: list[str]) -> list[str]:
    """A README command with this interpreter and the demo shrunk (module docstring)."""
    assert Path(argv[0]).name == "python" or argv[0].endswith("/python"), argv
    out = [sys.executable, *(SHRINK.get(a, a) for a in argv[1:])]
    if "zsad_jax.train" in out:
        out += TRAIN_EXTRA
    return out


def user_env() -> dict[str, str]:
    """A user's environment: one CPU device (not the test suite's 8), the repo importable as an
    installed package would be; the tests' quick compilation (tests/xla_env.py)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    env["PYTHONPATH"] = str(REPO)
    return env


def run(argv: list[str], cwd: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        argv, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=600
    )
    if ok:
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-3000:]}"
    return proc


def write_my_data(root: Path) -> None:
    """The README's "Your own data" layout: good/, one folder per defect, masks/<defect>/."""
    r = np.random.default_rng(0)

    def image(path: Path, dark: bool = False) -> None:
        pixels = r.integers(120, 200, (40, 48, 3), dtype=np.uint8)
        if dark:
            pixels[10:20, 12:24] = 10
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)

    for name in ("a.png", "a.jpg", "a_1.png", "b.png"):
        image(root / "good" / name)
    for stem in ("s1", "s2"):
        image(root / "scratch" / f"{stem}.png", dark=True)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:20, 12:24] = 255
        (root / "masks" / "scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / "scratch" / f"{stem}.png")


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> dict:
    """Runs the README's journey once in a fresh repo-like folder; returns its outputs."""
    root = tmp_path_factory.mktemp("repo_root")
    (root / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    write_my_data(root / "my_data")
    outputs = {"root": root, "train": run(as_typed(readme_train_command()), root)}
    for command in readme_block("user-journey"):
        argv = as_typed(shlex.split(command))
        outputs[command] = run(argv, root)
    return outputs


def _journey_command(
    journey: dict, *needles: str, without: str | None = None
) -> tuple[list[str], subprocess.CompletedProcess]:
    """The one journey command containing every needle (and not ``without``), and its result."""
    found = [
        c
        for c in journey
        if isinstance(c, str) and all(n in c for n in needles) and not (without and without in c)
    ]
    assert len(found) == 1, (needles, [c for c in journey if isinstance(c, str)])
    return shlex.split(found[0]), journey[found[0]]


def _flag(argv: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return value


def test_readme_backbone_candidate_commands_run_as_printed(tmp_path):
    """The README's two lines that judge a backbone candidate on the selection split: pretrain
    with the four families held out (shrunk to the module's reduced scale), then train and test
    the heads on ``configs/demo.py:select`` (2 steps, 64 px): the config check accepts the
    candidate, and the last line scores the held-out families' categories beside the baselines."""
    from zsad_jax.data import procedural
    from zsad_jax.pretrain import backbone

    pretrain, train = (shlex.split(line) for line in readme_block("select-candidate"))
    reduced = [part for k, v in backbone.REDUCED.items() for part in (f"--{k}", str(v))]
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    run([*as_typed(pretrain), *reduced, "--no_reduced"], tmp_path)
    small = ["--config.data.image_size=64", "--config.data.train_image_size=64"]
    proc = run([*as_typed(train), *small], tmp_path)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    families = {procedural.aux_family(name) for name in last["per_category"]}
    assert families == set(procedural.SELECT_FAMILIES) and len(last["per_category"]) == 12
    (report,) = last["transfer"].values()
    assert set(report) == {"model", "colour_median", "random_token_median"}


def test_readme_journey_has_every_step():
    commands = readme_block("user-journey")
    for needle in ("zsad_jax.evaluate", "test_set=folder", "zsad_jax.predict", "--export="):
        assert any(needle in c for c in commands), needle
    for command in commands:  # relative paths only, as typed from the repo root
        assert not re.search(r"(^|[ =])/", command), command


@pytest.mark.slow
def test_train_then_evaluate_with_relative_paths(journey):
    root = journey["root"]
    train_result = json.loads(journey["train"].stdout.strip().splitlines()[-1])
    assert train_result["steps"] == 2
    argv, proc = _journey_command(journey, "zsad_jax.evaluate", without="test_set")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((root / _flag(argv, "workdir") / "metrics.json").read_text())
    assert set(metrics["per_category"]) == {"wood", "dots", "washer", "pill"}
    assert summary["num_images"] == metrics["num_images"] == train_result["num_images"]


@pytest.mark.slow
def test_evaluate_on_own_data_by_overrides_alone(journey):
    root = journey["root"]
    argv, proc = _journey_command(journey, "zsad_jax.evaluate", "test_set=folder")
    metrics = json.loads((root / _flag(argv, "workdir") / "metrics.json").read_text())
    # The stored held-out synthetic categories are not carried over to the folder dataset.
    assert list(metrics["per_category"]) == ["my_data"]
    counts = metrics["per_category"]["my_data"]
    assert (counts["num_images"], counts["num_anomalous"]) == (6, 2)
    assert counts["num_pixel_images"] == 6  # the masks in masks/scratch/ were found
    assert "test_categories" in proc.stderr  # the reset is said, not silent
    # The demo's two overlays: one anomalous and one normal, although good/ is read first.
    names = sorted(p.name for p in (root / _flag(argv, "workdir") / "vis" / "my_data").iterdir())
    assert [("normal" in n) for n in names].count(True) == 1 and len(names) == 2, names


@pytest.mark.slow
def test_predict_outputs_are_unique_per_input(journey):
    root = journey["root"]
    argv, _ = _journey_command(journey, "zsad_jax.predict", "--out=")
    out = root / _flag(argv, "out")
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    maps = [line["anomaly_map"] for line in lines]
    assert len(set(maps)) == len(maps)
    for line in lines:
        amap = np.load(root / line["anomaly_map"])
        assert amap.shape == (line["height"], line["width"]) == (40, 48)
        assert (root / line["overlay"]).is_file()


@pytest.mark.slow
def test_export_reloads_without_the_model_code_and_gives_predicts_scores(journey):
    import ml_collections

    from zsad_jax import predict as predict_lib
    from zsad_jax.data import decode

    root = journey["root"]
    export_argv, _ = _journey_command(journey, "zsad_jax.predict", "--export=")
    run_exported, meta = predict_lib.load_exported(root / _flag(export_argv, "export"))
    # Preprocessing as the export's meta describes it, not from the checkpoint's config.
    config = ml_collections.ConfigDict(
        {"data": {"transform": meta["transform"], "image_size": meta["image_size"]}}
    )
    out_argv, _ = _journey_command(journey, "zsad_jax.predict", "--out=")
    jsonl = root / _flag(out_argv, "out") / "predictions.jsonl"
    for line in [json.loads(x) for x in jsonl.read_text().splitlines()][:2]:
        image = predict_lib.preprocess(decode.load_image(str(root / line["path"])), config)
        _, scores = run_exported(np.repeat(image[None], meta["batch_size"], axis=0))
        assert float(scores[0]) == pytest.approx(line["pred_score"], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Mistakes, each refused in one line that names what to change.


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode != 0 and lines, proc.stderr
    assert lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--config.optim.lrr=1"], "--config.optim.lr?"),
        (["--config.optim.lr=-1"], "config.optim.lr=-1.0"),
        (["--config.optim.lr=abc"], "--config.optim.lr=abc"),
        (["--config.data.batch_size=0"], "config.data.batch_size"),
    ],
)
def test_bad_overrides_are_refused_in_one_line(journey, extra, expected):
    argv = [a for a in as_typed(readme_train_command()) if not a.startswith("--workdir")]
    proc = run([*argv, "--workdir=runs/other", *extra], journey["root"], ok=False)
    assert expected in _error_line(proc)
    assert not (journey["root"] / "runs" / "other").exists()  # refused before any work


@pytest.mark.slow
def test_variant_typo_is_refused_naming_the_known_ones(journey):
    proc = run([sys.executable, "-m", "zsad_jax.train", "--config=configs/af_clip.py:tinyy",
                "--workdir=runs/typo"], journey["root"], ok=False)  # fmt: skip
    line = _error_line(proc)
    assert "tinyy" in line and "tiny" in line.replace("tinyy", "")


@pytest.mark.slow
def test_finished_workdir_with_a_changed_config_is_refused_naming_the_keys(journey):
    argv = as_typed(readme_train_command())
    proc = run([*argv, "--config.optim.lr=0.5"], journey["root"], ok=False)
    line = _error_line(proc)
    assert "config.optim.lr" in line and "--workdir" in line and "--allow_config_change" in line
    # The same command as before still reports the finished run.
    again = run(argv, journey["root"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["resumed_finished_run"] is True


@pytest.mark.slow
def test_config_file_with_a_checkpoint_is_refused_saying_to_use_overrides(journey):
    proc = run([sys.executable, "-m", "zsad_jax.evaluate", "--checkpoint=runs/demo",
                "--config=configs/demo.py", "--workdir=runs/demo/eval_x"],
               journey["root"], ok=False)  # fmt: skip
    assert "--config.KEY=VALUE" in _error_line(proc)


@pytest.mark.slow
def test_unwritable_workdir_is_one_line(journey):
    # A workdir below a file cannot be created, whoever runs the test (root ignores permissions).
    (journey["root"] / "a_file").write_text("")
    proc = run([sys.executable, "-m", "zsad_jax.evaluate", "--checkpoint=runs/demo",
                "--workdir=a_file/eval"], journey["root"], ok=False)  # fmt: skip
    line = _error_line(proc)
    assert "--workdir=a_file/eval" in line and "writable" in line


@pytest.mark.slow
def test_a_stored_configs_boolean_override_is_read_as_a_boolean(journey):
    # The checkpoint's JSON config keeps None, not "bool" (meta config_types restores it): without
    # the type, "false" was the string "false", i.e. true, and "maybe" passed.
    argv, _ = _journey_command(journey, "zsad_jax.evaluate", "test_set=folder")
    argv = [a for a in as_typed(argv) if not a.startswith("--workdir=")]
    argv += ["--workdir=runs/demo/eval_bool"]
    proc = run([*argv, "--config.data.test_require_masks=maybe"], journey["root"], ok=False)
    assert "--config.data.test_require_masks=maybe: expected True or False" in _error_line(proc)
    run([*argv, "--config.data.test_require_masks=false"], journey["root"])
    stored = json.loads((journey["root"] / "runs/demo/eval_bool/config.json").read_text())
    assert stored["data"]["test_require_masks"] is False
