"""The converters as a user types them: a refusal is one line ``error: ...`` that names the file or
flag and what to do, never a traceback; an output is never silently replaced.

Each command runs as ``python -m convert.X`` in a folder of the user's files, with relative paths
(the README's commands). The sources are a few arrays with the keys that decide each refusal:
every refusal here comes before the weights are used, so no model is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from extras import CONVERT_EXTRA
from safetensors.numpy import save_file

torch = pytest.importorskip("torch", reason=CONVERT_EXTRA)  # the convert package reads with torch

from convert import dinov3 as convert_dinov3  # noqa: E402
from zsad_jax import errors  # noqa: E402
from zsad_jax.encoders import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONE_KEY = np.zeros((2, 2), np.float32)


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _fake_converted(folder: Path, kind: str) -> None:
    """A folder that reads as a converted ``kind`` checkpoint."""
    folder.mkdir(parents=True)
    meta = {"format": checkpoint.FORMAT, "type": kind, "config": {}, "source": "test"}
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    save_file({"x": ONE_KEY}, folder / checkpoint.WEIGHTS_FILE)


class _RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint does)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """models/ with a CLIP-keyed, a DINOv3-keyed (transformers names, no config.json beside it)
    and a malicious pickled file; weights/ with a converted DINOv3 folder."""
    folder = tmp_path_factory.mktemp("user")
    models = folder / "models"
    models.mkdir()
    save_file(
        {"vision_model.embeddings.patch_embedding.weight": ONE_KEY}, models / "clip.safetensors"
    )
    dino = {
        "embeddings.patch_embeddings.weight": ONE_KEY,
        "layer.0.attention.k_proj.weight": ONE_KEY,
    }
    save_file(dino, models / "dinov3_hf_keys.safetensors")
    torch.save({"w": _RunsCode("ran")}, models / "dinov3_vitl16_pretrain_evil.pth")
    _fake_converted(folder / "weights" / "dinov3-vitl16", "dinov3")
    return folder


# (command line, what the one line must say)
REFUSALS = {
    "missing_src": (
        "convert.clip --src models/clip-vit-large-patch14-336 --out weights/x",
        ["models/clip-vit-large-patch14-336: no such file or folder", "--src"],
    ),
    "dinov3_given_to_clip": (
        "convert.clip --src models/dinov3_hf_keys.safetensors --out weights/x",
        ["is a DINOv3 checkpoint, not a CLIP one", "python -m convert.dinov3"],
    ),
    "hf_dinov3_without_config": (
        "convert.dinov3 --src models/dinov3_hf_keys.safetensors --out weights/x",
        ["needs its config.json beside it", "models/config.json", "copy the config.json"],
    ),
    "verify_missing_converted": (
        "convert.verify --src models/clip.safetensors --converted weights/nope",
        ["weights/nope is not a converted zsad_jax encoder", "python -m convert.clip"],
    ),
    "verify_against_the_other_kind": (
        "convert.verify --src models/clip.safetensors --converted weights/dinov3-vitl16",
        ["is a CLIP checkpoint, not a DINOv3 one", "python -m convert.clip"],
    ),
    "pickled_code": (
        "convert.dinov3 --src models/dinov3_vitl16_pretrain_evil.pth --out weights/x",
        ["pickled Python objects", "posix.system", "not loaded", "to .safetensors"],
    ),
    "clip_onto_a_converted_dinov3": (
        "convert.clip --src models/clip.safetensors --out weights/dinov3-vitl16",
        ["--out weights/dinov3-vitl16: already holds a converted dinov3", "--overwrite"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refusal_is_one_line_naming_the_file_and_the_remedy(user_folder, case):
    command, expected = REFUSALS[case]
    line = _one_line_error(_run(user_folder, *command.split()))
    for words in expected:
        assert words in line, line
    assert "weights_only" not in line  # torch's advice to load pickles unsafely is not quoted
    assert not (user_folder / "ran").exists() and not (user_folder / "weights" / "x").exists()
    assert checkpoint.read_meta(user_folder / "weights" / "dinov3-vitl16")["type"] == "dinov3"


def test_a_bug_keeps_its_traceback_and_a_refusal_becomes_one_line(capsys):
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.run_command(buggy, [])

    def refuses(argv):
        raise FileNotFoundError("x.pt: no such file")

    with pytest.raises(SystemExit) as stop:
        errors.run_command(refuses, [])
    assert stop.value.code == 1 and capsys.readouterr().err == "error: x.pt: no such file\n"


def test_dinov3_out_holding_a_converted_checkpoint_needs_overwrite(user_folder, tmp_path, capsys):
    out = tmp_path / "weights" / "clip-vit-l14-336"
    _fake_converted(out, "clip")
    src = str(user_folder / "models" / "dinov3_hf_keys.safetensors")
    with pytest.raises(SystemExit):
        errors.run_command(convert_dinov3.main, ["--src", src, "--out", str(out)])
    err = capsys.readouterr().err
    assert f"--out {out}: already holds a converted clip checkpoint" in err and "--overwrite" in err
    assert checkpoint.read_meta(out)["type"] == "clip"
    # With --overwrite the conversion goes on (and this source is then refused for its own reason).
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_dinov3.main(["--src", src, "--out", str(out), "--overwrite"])
