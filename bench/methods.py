"""Per method: class-text setup, inference and train-step time with the class text prepared, and
the peak memory of each phase; times also as ratios to the frozen image encoder in the same run.

Run:
  .venv/bin/python bench/methods.py                           # the four methods, full size, batch 2
  .venv/bin/python bench/methods.py --methods=acd_clip,ava_dino --batch=2 --repeats=5
  .venv/bin/python bench/methods.py --variant=tiny            # the tests' sizes (seconds, smoke)
  .venv/bin/python bench/methods.py --no-train                # inference only

What is measured, per method, each in a fresh process (one CPU device, float32, random weights of
the stated architecture: ``random_init`` on every encoder, since this bench needs no converted
weights; random-init CLIP text towers use the byte tokenizer, so prompts are about one token per
character, longer than with CLIP's BPE):

* ``set_classes`` of two categories (bottle, screw): seconds until it returns, seconds until every
  model array is ready (work left running asynchronously would land in the first forward
  otherwise), and a second call with the same classes (AVA-DINO's text cache; with
  ``--cache-dir`` unset a temporary ``ZSAD_TEXT_CACHE`` directory is used and removed).
* inference: ``zsad_jax.inference.BatchedInference`` (what ``evaluate``/``predict`` run), compile +
  first call, then the median of ``--repeats`` calls on a batch of ``--batch`` images.
* train step: the step of ``zsad_jax.train`` (``make_train_step``, the config's optimiser,
  params/opt state/mutable donated), compile + first step, then the median of ``--repeats``.
* reference: the frozen image encoder alone (CLIP vision tower / DINOv3) on the same batch,
  jitted. Inference, train step and reference run alternately, repeat after repeat, so load from
  other processes hits all three alike; read ``infer/ref`` and ``train/ref``, not the absolute
  times (this machine is shared).
* memory: the process's peak RSS (``VmHWM``, reset between phases through
  ``/proc/self/clear_refs``) after build, set_classes, train compile + first step and inference
  compile + first call; and XLA's memory analysis of the compiled train step (arguments, outputs,
  temporaries, and how many argument bytes are donated = aliased to outputs).

Not a test.

Findings (2-core shared VM, jax 0.10.2, full size, random weights, batch 2, byte-tokenised
prompts; "before" = the code before per-class text, run from a copy of the tree):

* ACD-CLIP inference: infer/ref 1.22 and 1.15 before (two runs), 0.97 after: no text work per
  batch once ``set_classes`` ran (zero text-tower runs, tests/test_acd_clip.py counts them). The
  same-process interleaved A/B of the jitted forward (before/after code, same weights, outputs
  equal to 1.2e-7) gave after/before 0.87 and 0.89. What is left is the vision tower itself
  (infer/ref ~1.0; the tower is 1.13x torch's, bench/encoders.py).
* ACD-CLIP training: text once per distinct class of the batch in the forward, once more in the
  backward (recomputed instead of stored). A/B of the train gradient at full widths, 6 vision
  blocks: batch 2 of 2 classes 1.10x the time (the recompute; the worst case, every image its own
  class), batch 4 of 2 classes 1.02x (noisy, pairs 0.82-1.02); XLA temporaries 4.0 -> 3.4 GB and
  8.5 -> 6.7 GB. Full depth, batch 2: 14.6 -> 14.0 GB.
* ACD-CLIP memory: the train step's temporaries (14.4 GB at batch 2, peak RSS 17.7 GB) are
  dominated by the CPU attention path (``zsad_jax/encoders/attention.py``, blocked over heads and
  query rows with ``lax.map``): its VJP keeps two (B, 16, 1370, 1370) float32 arrays per
  differentiated vision block (460 MB at batch 2, 18 blocks), which ``model.remat`` does not
  remove (12.4 GB). A flash-style custom VJP (saving q, k, v, the output and the row logsumexp,
  recomputing each slab in the backward) measured 5.9 GB and 0.92x the step time at 6 blocks
  (prototype, not in the tree).
* AVA-DINO ``set_classes`` (2 classes, 840 prompts): before it returned after 1.5-2.5 s and the
  work (165-202 s here) ran on into the first forward; a second call paid it again (99-272 s).
  After: blocks until done (27 s quiet, 93 s loaded: batches of 64 prompts, cut to the longest
  EOT), a second call 0.03 s (in memory), a new process reads the disk cache. Its phase peak RSS
  3.67 -> 2.46 GB: one 420 x 77-token call per class held ~1.4 GB of activations; the process
  peak is now the train compile + first step (3.41 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["acd_clip", "ava_dino", "af_clip", "dlvp_clip"]
CLASS_NAMES = ["bottle", "screw"]
ENCODER_FIELDS = ("backbone", "text_encoder")


def _mib_peak_and_reset() -> float:
    """Peak RSS (MiB) since the last reset, then resets the peak to the current RSS."""
    peak = 0.0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # no reset: later phases report the running peak
    return round(peak, 1)


def _config(method: str, variant: str, batch: int):
    import importlib

    config = importlib.import_module(f"configs.{method}").get_config(variant or None)
    for field in ENCODER_FIELDS:
        if field in config.model:
            config.model[field].random_init = True
    config.data.batch_size = batch
    config.eval.batch_size = batch
    return config


def _image_encoder(model):
    """The frozen image encoder and how to call it on images."""
    for owner in ("backbone", "clip"):
        encoder = getattr(model, owner, None)
        if encoder is None:
            continue
        vision = getattr(encoder, "vision", None)
        return vision if vision is not None else encoder
    raise ValueError(f"{type(model).__name__}: no image encoder found")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(method: str, variant: str, batch: int, repeats: int, train: bool) -> dict:
    """One method in this process (see the module docstring)."""
    import jax
    from flax import nnx
    from train_step import TrainStep, fake_batch  # bench/train_step.py: the one train-step setup

    from zsad_jax import compile_cache, inference, methods
    from zsad_jax import sharding as shard_lib

    # As every command does (zsad_jax.cli), so that the peaks below are the commands' peaks.
    compile_cache.schedule_for_memory()
    compile_cache.release_compiler_memory()
    out: dict = {"method": method, "variant": variant or "full", "batch": batch}
    config = _config(method, variant, batch)
    out["image_size"] = int(config.data.image_size)
    _mib_peak_and_reset()
    t0 = time.perf_counter()
    model = methods.build(config, rngs=nnx.Rngs(int(config.seed)), load_weights=True)
    jax.block_until_ready(nnx.state(model))
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["peak_build_mib"] = _mib_peak_and_reset()

    t0 = time.perf_counter()
    model.set_classes(CLASS_NAMES)
    out["set_classes_return_s"] = round(time.perf_counter() - t0, 2)
    jax.block_until_ready(nnx.state(model))
    out["set_classes_ready_s"] = round(time.perf_counter() - t0, 2)
    out["set_classes_again_s"] = round(
        _timed(lambda: (model.set_classes(CLASS_NAMES), jax.block_until_ready(nnx.state(model)))),
        2,
    )
    out["peak_set_classes_mib"] = _mib_peak_and_reset()

    local = fake_batch(config, batch)
    mesh = shard_lib.make_mesh({"data": 1, "fsdp": 1})
    step = None
    if train:
        t0 = time.perf_counter()
        step = TrainStep(model, config, mesh, local)
        out["train_loss"] = float(step()["loss"])
        out["train_compile_s"] = round(time.perf_counter() - t0, 2)
        out["peak_train_mib"] = _mib_peak_and_reset()
        memory = step.memory
        if memory is not None:
            for key in ("argument", "output", "temp", "alias"):
                value = getattr(memory, f"{key}_size_in_bytes", 0)
                out[f"train_xla_{key}_mib"] = round(value / 2**20, 1)

    infer = inference.BatchedInference(model, mesh)
    inputs = {k: local[k] for k in inference.MODEL_INPUTS}
    out["infer_compile_s"] = round(_timed(lambda: infer(inputs)), 2)
    out["peak_infer_mib"] = _mib_peak_and_reset()

    encoder = _image_encoder(model)
    graphdef, state = nnx.split(encoder)
    reference = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    images = jax.device_put(local["image"])
    jax.block_until_ready(reference(state, images))

    times: dict[str, list[float]] = {"infer": [], "ref": [], "train": []}
    for _ in range(repeats):
        times["infer"].append(_timed(lambda: infer(inputs)))
        times["ref"].append(_timed(lambda: jax.block_until_ready(reference(state, images))))
        if step is not None:
            times["train"].append(_timed(step))
    for key, values in times.items():
        if values:
            out[f"{key}_ms"] = round(1e3 * statistics.median(values), 1)
    out["infer_over_ref"] = round(out["infer_ms"] / out["ref_ms"], 3)
    if step is not None:
        out["train_over_ref"] = round(out["train_ms"] / out["ref_ms"], 3)
    return out


def _run_worker(method: str, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"--methods={method}",
        f"--variant={args.variant}",
        f"--batch={args.batch}",
        f"--repeats={args.repeats}",
        *([] if args.train else ["--no-train"]),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"method": method, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_row(res: dict) -> None:
    if "error" in res:
        print(f"  {res['method']:>9}  failed: {res['error']}")
        return
    train = (
        f"train {res['train_ms']:8.0f} ms ({res['train_over_ref']:.2f} x ref, compile+1st "
        f"{res['train_compile_s']:.0f} s)  "
        if "train_ms" in res
        else ""
    )
    print(
        f"  {res['method']:>9} {res['image_size']}px  set_classes {res['set_classes_return_s']:.1f}"
        f" s returned / {res['set_classes_ready_s']:.1f} s ready / again "
        f"{res['set_classes_again_s']:.1f} s  infer {res['infer_ms']:7.0f} ms "
        f"({res['infer_over_ref']:.2f} x ref, compile+1st {res['infer_compile_s']:.0f} s)  "
        f"{train}ref {res['ref_ms']:.0f} ms"
    )
    peaks = ", ".join(
        f"{k[5:-4]} {res[k]:.0f}" for k in res if k.startswith("peak_") and k.endswith("_mib")
    )
    xla = ", ".join(
        f"{k[10:-4]} {res[k]:.0f}" for k in res if k.startswith("train_xla_") and k.endswith("_mib")
    )
    print(f"  {'':>9} peak RSS MiB: {peaks}" + (f"; train step XLA MiB: {xla}" if xla else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variant", default="", help="config variant ('' = full size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--cache-dir", default=None, help="ZSAD_TEXT_CACHE for the workers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]

    if args.worker:
        print(json.dumps(measure(methods[0], args.variant, args.batch, args.repeats, args.train)))
        return

    with tempfile.TemporaryDirectory(prefix="zsad_text_cache_") as tmp:
        os.environ.setdefault("ZSAD_TEXT_CACHE", args.cache_dir or tmp)
        print(
            f"methods, variant {args.variant or 'full'!r}, batch {args.batch}, median of "
            f"{args.repeats}, {os.cpu_count()} cores; ref = frozen image encoder forward"
        )
        results = []
        for method in methods:
            res = _run_worker(method, args)
            _print_row(res)
            results.append(res)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
