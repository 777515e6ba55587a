"""Pods end to end: ``train``, ``evaluate`` and ``predict`` as 2 processes x 4 CPU devices
(jax.distributed on 127.0.0.1, gloo collectives) give what 1 process x 8 devices gives.

On the placeholder ``ToyDetector`` (tests/toys.py) and the synthetic benchmark: a 2 x 4
training run's final evaluation equals ``evaluate`` of its checkpoint on 1 x 8; ``evaluate`` on
2 x 4 equals 1 x 8 on every metric (zero-shot and few-shot), computes each category's metrics on one
process, prints the same last line on both and writes every file once; the TFDS array_record route
equals the files route; ``predict`` on a folder gives the single process's ``predictions.jsonl``
(order, scores, maps) with no file written twice; a process killed mid-evaluation and a rerun give
the uninterrupted metrics. "Written once" is observed, not assumed: every command runs with an
audit hook (``sitecustomize`` below) that logs each file it opens for writing or renames into place.

The commands' config file is tests/toys.py (``train:BENCH``, ``slow:BENCH``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from toys import (
    CATEGORIES,
    SlowToyDetector,
    ToyDetector,
    detector_command_config,
    toy_bench,
    toy_config,
)
from xla_env import xla_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "toys.py")
METRICS = (
    "image_AUROC", "image_AP", "image_F1max", "pixel_AUROC", "pixel_AP", "pixel_F1max",
    "pixel_AUPRO",
)  # fmt: skip
TRUST = "--allow_custom_code"  # the placeholder's checkpoints name test code

# Imported first by every command the tests start (it is on their PYTHONPATH): logs each file
# opened for writing, or renamed into place, under $ZSAD_AUDIT_ROOT to $ZSAD_AUDIT_LOG.<pid>.
SITECUSTOMIZE = """
import os, sys

_root, _log_path = os.environ.get("ZSAD_AUDIT_ROOT"), os.environ.get("ZSAD_AUDIT_LOG")
if _root and _log_path:
    _log = open(f"{_log_path}.{os.getpid()}", "a")
    _WRITE = os.O_WRONLY | os.O_RDWR

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            if not (isinstance(args[2], int) and args[2] & _WRITE):
                return
            path = args[0]
        elif event == "os.rename":
            path = args[1]
        else:
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_root):
            _log.write(event + "\\t" + path + "\\n")
            _log.flush()

    sys.addaudithook(_hook)
"""


# ----------------------------------------------------------------------------------------------
# Launching commands.


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> dict[str, Path]:
    """The audit hook's folder (the commands share the session's compilation cache: conftest.py)."""
    hook = tmp_path_factory.mktemp("audit_hook")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"hook": hook}


def _env(tools: dict[str, Path], devices: int, audit: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(tools["hook"]), str(ROOT / "tests"), str(ROOT)]),
        # tests/conftest.py's float32 matmul precision, so commands compute like this process.
        JAX_DEFAULT_MATMUL_PRECISION="float32",
    )
    if audit is not None:
        env.update(ZSAD_AUDIT_ROOT=str(audit), ZSAD_AUDIT_LOG=str(audit.parent / "writes"))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    tools, module: str, args: list[str], *, processes: int, audit: Path | None = None
) -> list[subprocess.Popen]:
    """``python -m zsad_jax.MODULE ARGS`` as 1 process x 8 devices or N processes x 8/N."""
    multihost = []
    if processes > 1:
        port = _free_port()
        multihost = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"zsad_jax.{module}",
                *args,
                *multihost,
                *([f"--process_id={i}"] if processes > 1 else []),
            ],
            env=_env(tools, 8 // processes, audit),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(processes)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """Every process's (stdout, stderr); each must exit 0."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _run(tools, module: str, args: list[str], *, processes: int, audit: Path | None = None):
    return _finish(_start(tools, module, args, processes=processes, audit=audit))


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _writes(audit: Path) -> collections.Counter:
    """How often each file under ``audit`` was written, over all the processes logged."""
    counts: collections.Counter = collections.Counter()
    for log in audit.parent.glob("writes.*"):
        for line in log.read_text().splitlines():
            counts[line.split("\t")[1]] += 1
    return counts


def _assert_each_file_written_once(audit: Path) -> collections.Counter:
    """Every file under ``audit`` was written exactly once (by one process); returns the log."""
    counts = _writes(audit)
    files = {str(p) for p in audit.rglob("*") if p.is_file()}
    assert files and files <= set(counts), sorted(files - set(counts))
    assert {f: n for f, n in counts.items() if n != 1 and f in files} == {}
    # Every other write was a temporary file renamed into place (or a probe, removed).
    leftovers = {Path(f).name for f in counts if f not in files}
    assert all(n.startswith(".") for n in leftovers), sorted(leftovers)
    return counts


def _assert_same_metrics(got: dict, want: dict, *, same_order: bool = True) -> None:
    """metrics.json documents equal to 1e-9 on every metric and category (listed in the same
    order unless not ``same_order``)."""
    for metric in METRICS:
        assert got["mean"][metric] == pytest.approx(want["mean"][metric], abs=1e-9), metric
    if same_order:
        assert list(got["per_category"]) == list(want["per_category"])
    assert sorted(got["per_category"]) == sorted(want["per_category"])
    for name, values in want["per_category"].items():
        for metric in METRICS:
            assert got["per_category"][name][metric] == pytest.approx(values[metric], abs=1e-9)
        assert got["per_category"][name]["num_images"] == values["num_images"]
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-9)


def _metrics(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------------
# Data and a multi-host training run.


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> str:
    return toy_bench(str(tmp_path_factory.mktemp("bench") / "synthetic"))


@pytest.fixture(scope="module")
def trained(tools, bench, tmp_path_factory) -> dict:
    """The placeholder trained on 2 processes x 4 devices; its final evaluation on ``bench``."""
    workdir = tmp_path_factory.mktemp("pod_run")
    outputs = _run(tools, "train", [f"--config={CONFIG}:train:{bench}", f"--workdir={workdir}",
                                    "--noprogress"], processes=2)  # fmt: skip
    return {"workdir": workdir, "final": _last_json(outputs[0][0])}


@pytest.fixture(scope="module")
def one_host(tools, trained, tmp_path_factory) -> Path:
    """``evaluate`` of the pod run's checkpoint on 1 process x 8 devices: the reference."""
    workdir = tmp_path_factory.mktemp("eval_1x8")
    _run(tools, "evaluate", [f"--checkpoint={trained['workdir']}", TRUST, f"--workdir={workdir}",
                             "--noprogress"], processes=1)  # fmt: skip
    return workdir


# ----------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.slow
def test_final_evaluation_of_a_pod_training_run_equals_evaluate_on_one_host(trained, one_host):
    final = trained["final"]  # the training result: the final evaluation's metrics
    as_doc = {"mean": final, "per_category": final["per_category"], "threshold": final["threshold"]}
    _assert_same_metrics(as_doc, _metrics(one_host))
    assert json.loads((one_host / "run.json").read_text())["process_count"] == 1


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one_and_writes_each_file_once(
    tools, trained, one_host, tmp_path
):
    workdir = tmp_path / "audited" / "eval_2x4"
    outputs = _run(tools, "evaluate", [f"--checkpoint={trained['workdir']}", TRUST,
                                       f"--workdir={workdir}", "--noprogress", "--verbosity=0"],
                   processes=2, audit=workdir.parent)  # fmt: skip
    _assert_same_metrics(_metrics(workdir), _metrics(one_host))
    # Both processes end with the same line, the one process's line.
    lines = [_last_json(out) for out, _ in outputs]
    assert lines[0] == lines[1]
    reference = _metrics(one_host)
    for metric in METRICS:
        assert lines[0][metric] == pytest.approx(reference["mean"][metric], abs=1e-9)
    # Each category's metrics were computed once, the two categories on different processes.
    computed = {
        name: [i for i, (_, err) in enumerate(outputs) if f"metrics of {name} (" in err]
        for name in CATEGORIES
    }
    assert computed == {CATEGORIES[0]: [0], CATEGORIES[1]: [1]}
    counts = _assert_each_file_written_once(workdir.parent)
    assert {Path(f).name for f in counts} >= {"metrics.json", "metrics.csv", "metrics.md",
                                              "run.json", "config.json"}  # fmt: skip
    assert json.loads((workdir / "run.json").read_text())["process_count"] == 2
    panels = sorted(p.relative_to(workdir) for p in (workdir / "vis").rglob("*.png"))
    assert panels == sorted(p.relative_to(one_host) for p in (one_host / "vis").rglob("*.png"))
    assert len(panels) == 2 * len(CATEGORIES)


@pytest.mark.slow
def test_few_shot_on_two_processes_equals_one(tools, trained, tmp_path):
    args = [f"--checkpoint={trained['workdir']}", TRUST, "--noprogress", "--few_shot=2",
            "--few_shot_seed=1", "--config.eval.num_vis=0"]  # fmt: skip
    _run(tools, "evaluate", [*args, f"--workdir={tmp_path / 'one'}"], processes=1)
    _run(tools, "evaluate", [*args, f"--workdir={tmp_path / 'two'}"], processes=2)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    _assert_same_metrics(two, one)
    zero_shot = json.loads((tmp_path / "one" / "run.json").read_text())
    assert zero_shot["few_shot"] == {"shots": 2, "seed": 1}


@pytest.mark.slow
def test_tfds_route_on_two_processes_equals_the_files_route(
    tools, bench, trained, one_host, tmp_path
):
    from zsad_jax.data import tfds_builder

    tfds_dir = tmp_path / "tfds"
    # Every category of the benchmark: the build that data.test_set=mvtec_ad names.
    tfds_builder.build("mvtec_ad", bench, str(tfds_dir))
    workdir = tmp_path / "eval_tfds"
    _run(tools, "evaluate", [f"--checkpoint={trained['workdir']}", TRUST, f"--workdir={workdir}",
                             "--noprogress", f"--config.data.tfds_dir={tfds_dir}",
                             "--config.data.test_categories=()"], processes=2)  # fmt: skip
    # The build lists the categories in the reader's order, the files route in the config's.
    _assert_same_metrics(_metrics(workdir), _metrics(one_host), same_order=False)


def _predict_inputs(bench: str, folder: Path) -> Path:
    """12 inputs (a pass of 8 and a partial one): the benchmark's wood test images, two of other
    sizes in a subfolder, and a corrupt file (``--skip_corrupt`` records it in its place)."""
    (folder / "odd").mkdir(parents=True)
    for i, path in enumerate(sorted(Path(bench, "wood", "test").rglob("*.png"))):
        Image.open(path).save(folder / f"{i:02d}_{path.stem}.png")
    r = np.random.default_rng(0)
    for i, (height, width) in enumerate([(30, 41), (17, 64)]):
        pixels = r.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "odd" / f"{i}.png")
    (folder / "05_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.mark.slow
def test_predict_on_two_processes_writes_the_one_process_jsonl_and_each_file_once(
    tools, bench, trained, tmp_path
):
    inputs = _predict_inputs(bench, tmp_path / "inputs")
    args = [f"--checkpoint={trained['workdir']}", TRUST, "--skip_corrupt", str(inputs)]
    one_out, two_out = tmp_path / "one" / "pred", tmp_path / "two" / "pred"
    single = _run(tools, "predict", [f"--out={one_out}", *args], processes=1)
    pod = _run(tools, "predict", [f"--out={two_out}", *args], processes=2, audit=two_out.parent)

    def lines(out: Path) -> list[dict]:
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        for row in rows:  # output paths relative to their --out, to compare the two runs
            for key in ("anomaly_map", "overlay"):
                if key in row:
                    row[key] = str(Path(row[key]).relative_to(out))
        return rows

    one, two = lines(one_out), lines(two_out)
    assert len(one) == 12 and sum("error" in row for row in one) == 1
    assert two == one  # same order, paths, scores, labels and output names
    for row in one:
        if "anomaly_map" in row:
            np.testing.assert_array_equal(np.load(two_out / row["anomaly_map"]),
                                          np.load(one_out / row["anomaly_map"]))  # fmt: skip
    # Process 0 prints the file's lines, as the single process does; process 1 prints none.
    for out, stdout in ((one_out, single[0][0]), (two_out, pod[0][0])):
        printed = [line for line in stdout.splitlines() if line.startswith("{")]
        assert printed == (out / "predictions.jsonl").read_text().splitlines()
    assert not [line for line in pod[1][0].splitlines() if line.startswith("{")]
    counts = _assert_each_file_written_once(two_out.parent)
    npys = [f for f in counts if f.endswith(".npy")]
    assert len(npys) == 11
    # Both processes wrote outputs: the inputs were split between them.
    writers = {
        log.name for log in two_out.parent.parent.glob("writes.*")
        if ".npy" in log.read_text()
    }  # fmt: skip
    assert len(writers) == 2


@pytest.mark.slow
def test_a_process_killed_mid_evaluation_and_a_rerun_give_the_same_metrics(tools, bench, tmp_path):
    config = [f"--config={CONFIG}:slow:{bench}", "--noprogress"]
    reference = tmp_path / "reference"
    _run(tools, "evaluate", [*config, f"--workdir={reference}"], processes=1)

    # The workdir holds an earlier evaluation's results: a run killed part-way must not leave
    # them looking like its own.
    workdir = tmp_path / "eval"
    workdir.mkdir()
    for name in ("metrics.json", "metrics.csv", "metrics.md", "run.json", "config.json"):
        shutil.copy(reference / name, workdir / name)
    slow = [*config, f"--workdir={workdir}", "--config.model.sleep_s=0.3"]
    procs = _start(tools, "evaluate", slow, processes=2)
    _wait_for(lambda: any((workdir / "vis").rglob("*.png")), procs)
    procs[1].send_signal(signal.SIGKILL)
    # The job is lost with its process; a scheduler stops the rest of it. (Process 0 reports the
    # broken collective at once, then waits in jax.distributed's shutdown for the dead peer.)
    try:
        procs[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
        procs[0].kill()
    for p in procs:
        p.communicate()
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode != 0
    # No result file at all: neither the earlier ones nor half-written ones.
    assert not [p.name for p in workdir.iterdir() if p.is_file()]

    outputs = _run(tools, "evaluate", slow, processes=2)
    _assert_same_metrics(_metrics(workdir), _metrics(reference))
    assert _last_json(outputs[1][0]) == _last_json(outputs[0][0])


def _wait_for(condition, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if condition():
            return
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError("the evaluation ended (or hung) before a process could be killed")


def test_the_slow_placeholder_computes_the_placeholders_outputs():
    """What the kill test relies on: the sleep changes the time, not the maps."""
    config = detector_command_config("slow", "")
    config.model.sleep_s = 0.01
    slow = SlowToyDetector(config, rngs=nnx.Rngs(0))
    plain = ToyDetector(config, rngs=nnx.Rngs(0))
    batch = {"image": jnp.ones((2, 4, 4, 3))}
    np.testing.assert_array_equal(slow(batch)["anomaly_map"], plain(batch)["anomaly_map"])


def test_inputs_split_over_processes_cover_each_input_once_in_aligned_passes():
    from zsad_jax.predict import shard_items

    items = [f"image_{i}.png" for i in range(11)]
    for processes, batch in ((1, 8), (2, 8), (4, 8), (2, 2)):
        shards = [shard_items(items, batch, p, processes) for p in range(processes)]
        assert len({len(chunks) for chunks in shards}) == 1  # the same number of passes
        for step, chunks in enumerate(zip(*shards, strict=True)):
            # Pass s is inputs [s*B, (s+1)*B) in process order: the one process's batch.
            flat = [pair for chunk in chunks for pair in chunk]
            positions = range(step * batch, min(len(items), (step + 1) * batch))
            assert flat == [(i, items[i]) for i in positions]
            assert all(len(chunk) <= batch // processes for chunk in chunks)


class _WithoutRecords:
    """An example source that, like ``TfdsSource``, has no record list (so no category counts)."""

    def __init__(self, source):
        self._source, self.class_names = source, source.class_names

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        return self._source.load(index)

    def load(self, index):
        return self._source.load(index)

    def describe(self, index):
        return self._source.describe(index)

    def class_id(self, category, index):
        return self._source.class_id(category, index)


def test_a_source_without_counts_completes_each_category_at_the_next_one(bench):
    from zsad_jax import evaluate as eval_lib
    from zsad_jax.data import pipeline, protocol

    config = toy_config(bench)
    model = ToyDetector(config, rngs=nnx.Rngs(0))
    records = protocol.read_dataset("mvtec_ad", bench, "test", CATEGORIES)
    counted = eval_lib.evaluate(model, config, pipeline.RecordSource(records), num_vis=0)
    uncounted = eval_lib.evaluate(
        model, config, _WithoutRecords(pipeline.RecordSource(records)), num_vis=0
    )
    assert uncounted["per_category"] == counted["per_category"]
    # Without counts, a category met again after another one cannot be completed: refused.
    mixed = [records[0], *records[9:], *records[1:9]]
    with pytest.raises(ValueError, match="list each category's images together"):
        eval_lib.evaluate(model, config, _WithoutRecords(pipeline.RecordSource(mixed)), num_vis=0)
