"""``python -m zsad_jax.train`` as a command: 2 processes x 4 CPU devices (jax.distributed, gloo
collectives) equal 1 process x 8 devices, also across a SIGTERM to one process (both save the same
step, exit 143, and re-running the command finishes the run); missing
converted weights fail at once with the path and the convert command. The model and data are the
loop toy of tests/toys.py (its config file).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from toys import ToyModel, loop_config, saved, train_toy
from xla_env import xla_flags

from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import methods, run_log
from zsad_jax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "toys.py")


def _env(devices: int) -> dict[str, str]:
    """The commands' environment; the session's compilation cache comes with it (conftest.py)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    # tests/conftest.py's float32 matmul precision, so commands compute like this process.
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"
    return env


def _command(workdir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zsad_jax.train",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        "--noprogress",
        *overrides,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _launch_two_processes(workdir: Path, *overrides: str) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            _command(
                workdir,
                *overrides,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(4),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _wait_for_metrics(workdir: Path, lines: int, procs: list[subprocess.Popen]) -> None:
    metrics = workdir / run_log.METRICS_FILE
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            return
        time.sleep(0.05)
    raise AssertionError("the run ended (or hung) before it could be signalled")


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_after_preemption(tmp_path):
    """2 x 4 devices, SIGTERM to process 0 only: JAX's preemption sync makes both processes save
    the same step and exit; re-running both finishes with the single-process run's curve."""
    config = loop_config()
    config.optim.steps = 12
    history = []
    train_toy(config, tmp_path / "single", history=history)

    workdir = tmp_path / "multi"
    steps = "--config.optim.steps=12"
    procs = _launch_two_processes(workdir, steps, "--config.data.toy_sleep_s=0.2")
    _wait_for_metrics(workdir, 2, procs)
    procs[0].send_signal(signal.SIGTERM)
    outputs = _wait_all(procs)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == train_lib.PREEMPTED_EXIT_CODE, err[-3000:]
    stopped = _last_json(outputs[0][0])
    assert stopped["preempted"] and 0 < stopped["steps"] < 12
    assert ckpt_lib.resolve_step_dir(workdir).name == str(stopped["steps"])

    # The same command again (a changed config would be refused: tests/test_user_path.py).
    procs = _launch_two_processes(workdir, steps, "--config.data.toy_sleep_s=0.2")
    outputs = _wait_all(procs)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert _last_json(outputs[0][0])["steps"] == 12
    # Only process 0 prints the result (gloo's own connection lines go to stdout of both).
    assert not [line for line in outputs[1][0].splitlines() if line.startswith("{")]
    lines = run_log.read_metrics(workdir)
    assert [line["step"] for line in lines] == list(range(1, 13))
    np.testing.assert_allclose(
        [line["loss"] for line in lines], [h["loss"] for h in history], rtol=1e-5
    )
    multi, single = saved(workdir), saved(tmp_path / "single")
    for k, v in single.items():
        np.testing.assert_allclose(multi[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_missing_converted_weights_fail_at_once_with_the_path(tmp_path):
    expected = tmp_path / "weights" / "clip-vit-l14-336"
    proc = subprocess.run(
        _command(tmp_path / "run", f"--config.model.backbone_checkpoint={expected}"),
        env=_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert str(expected) in proc.stderr and "python -m convert.clip" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_toy_config_file_builds(tmp_path):
    """The config file the commands above use: its method and data hooks import."""
    config = loop_config()
    model = methods.build(config)
    assert isinstance(model, ToyModel)
    data = train_lib.make_train_data(config)
    batch = next(data)
    assert batch["image"].shape == (16, 4, 4, 3) and data.steps_per_epoch == 4
