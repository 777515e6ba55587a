"""A shared checkpoint is data: loading one never imports what its stored config names.

The attack as a user would meet it: a checkpoint folder whose stored config says
``"method": "zsad_probe_module:Probe"``, unpacked next to a ``zsad_probe_module.py`` that writes a
marker file when imported, and ``evaluate``/``predict`` run from inside that folder (so the module
is importable). Both refuse before any import, naming ``config.method`` and the opt-in flag; with
``--allow_custom_code`` the module is imported (and the evaluation runs). A damaged or foreign
``meta`` gets one line naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from toys import CATEGORIES, ToyDetector, toy_config
from xla_env import xla_flags

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import train as train_lib
from zsad_jax.data import synthetic

REPO = Path(__file__).resolve().parents[1]
PROBE = """\
from pathlib import Path

Path(__file__).with_name("IMPORTED").write_text("the checkpoint's code ran")
from toys import ToyDetector as Probe
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}  # one device
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    return env


def _meta_path(workdir: Path) -> Path:
    return ckpt_lib.resolve_step_dir(workdir) / "meta" / ckpt_lib.META_FILE


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A folder holding a trained checkpoint (``ckpt/``) whose config names the probe module,
    the probe module itself and an image, as someone might hand them out."""
    folder = tmp_path_factory.mktemp("bundle")
    bench = synthetic.generate(str(folder / "bench"), image_size=48, n_train_good=0,
                               n_test_good=2, n_test_defect=2, categories=CATEGORIES)  # fmt: skip
    config = toy_config(bench)
    config.model.random_init = False
    config.data.train_set = "toys:toy_train_data"
    config.data.batch_size = 8
    config.optim.steps = 1
    config.ckpt.every_steps = 0
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    train_lib.train(config, folder / "ckpt", model=model, evaluator=None, progress=False)
    meta_path = _meta_path(folder / "ckpt")
    meta = json.loads(meta_path.read_text())
    stored = json.loads(meta["config"])
    stored["method"] = "zsad_probe_module:Probe"
    meta["config"] = json.dumps(stored)
    meta_path.write_text(json.dumps(meta))
    (folder / "zsad_probe_module.py").write_text(PROBE)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(folder / "photo.png")
    return folder


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=folder, env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ("zsad_jax.evaluate", "--checkpoint=ckpt", "--workdir=eval", "--noprogress"),
        ("zsad_jax.predict", "--checkpoint=ckpt", "--out=pred", "photo.png"),
        ("zsad_jax.predict", "--checkpoint=ckpt", "--export=exported/model.stablehlo"),
    ],
)
def test_stored_code_is_refused_before_any_import(bundle, command):
    proc = _run(bundle, *command)
    assert proc.returncode == 1, proc.stderr
    assert not (bundle / "IMPORTED").exists(), "the checkpoint's module was imported"
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and "config.method='zsad_probe_module:Probe'" in line
    assert "--allow_custom_code" in line and str(ckpt_lib.META_FILE) in line


@pytest.mark.slow
def test_allow_custom_code_imports_it(bundle):
    proc = _run(bundle, "zsad_jax.evaluate", "--checkpoint=ckpt", "--workdir=eval",
                "--noprogress", "--allow_custom_code")  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stderr
        assert (bundle / "IMPORTED").exists()
        assert json.loads(proc.stdout.strip().splitlines()[-1])["num_images"] == 8
    finally:
        (bundle / "IMPORTED").unlink(missing_ok=True)


def test_python_api_refuses_too_and_names_the_field(bundle):
    with pytest.raises(ckpt_lib.CustomCodeRefused, match=r"config\.method=.*allow_custom_code"):
        ckpt_lib.load_for_inference(bundle / "ckpt")
    assert not (bundle / "IMPORTED").exists()
    # data.train_set is a code field too (a training-data factory).
    config = ckpt_lib.config_from_meta(ckpt_lib.read_meta(bundle / "ckpt"))
    config.method = "af_clip"
    assert ckpt_lib.code_specs(config) == {"config.data.train_set": "toys:toy_train_data"}


def _damaged_copy(bundle: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(bundle / "ckpt", copy)
    path = _meta_path(copy)
    path.write_text(edit(path.read_text()))
    return copy


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: text.replace('"zsad_jax.train/1"', '"other/2"'), "format 'other/2'"),
        (lambda text: text.replace('"step": 1', '"step": "one"'), "'step' is str"),
        (lambda text: text[:-1] + ', "surprise": 1}', "unknown keys ['surprise']"),
        (lambda text: json.dumps({**json.loads(text), "config": "{oops"}), "stored config is not"),
        (lambda text: "[]", "expected a JSON object"),
    ],
)
def test_malformed_meta_is_one_error_naming_the_file(bundle, tmp_path, edit, expected):
    copy = _damaged_copy(bundle, tmp_path, edit)
    with pytest.raises(ckpt_lib.MalformedCheckpoint) as error:
        ckpt_lib.read_meta(copy)
    message = str(error.value)
    assert expected in message and str(_meta_path(copy)) in message and "\n" not in message


@pytest.mark.slow
def test_malformed_meta_from_the_command_line_is_one_line(bundle, tmp_path):
    copy = _damaged_copy(bundle, tmp_path, lambda text: text[:40])
    proc = _run(tmp_path, "zsad_jax.evaluate", f"--checkpoint={copy.name}", "--workdir=eval")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "not valid JSON" in line and ckpt_lib.META_FILE in line
