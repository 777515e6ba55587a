"""Train-step time and memory per method, and images/s scaling over 1..8 (fake) CPU devices.

    python bench/train_step.py                          # every configs/<method>.py, variant "tiny"
    python bench/train_step.py --configs=configs/af_clip.py --variant=tiny --batch=8 --steps=5
    PYTHONPATH=tests python bench/train_step.py --configs=tests/toys.py --variant=loop  # loop toy

For each config the step is the one ``python -m zsad_jax.train`` runs (``zsad_jax.train``'s jitted
step over the split model, optimiser of the config), fed a random batch of ``--batch`` images at the
config's ``data.image_size``. Printed per method: compile seconds, step milliseconds (median of
``--steps`` after one warm-up), images/s, XLA's memory analysis of the compiled step (arguments,
outputs, temporaries; the peak the step needs) and the process's peak RSS. Then, in fresh
processes with 8 fake CPU devices, images/s on a mesh of 1, 2, 4, 8 devices, printed as ratios to 1
device (fake devices share this machine's cores, so the ratios measure the sharding overhead, not a
speed-up).
Methods whose config or module does not exist yet are listed as missing. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_CONFIGS = ["af_clip", "ava_dino", "acd_clip", "dlvp_clip"]
CLASS_NAMES = ["bottle", "screw"]


def _load_config(path: str, variant: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a config look their module up there
    spec.loader.exec_module(module)
    return module.get_config(variant or None)


def fake_batch(config, batch: int, seed: int = 0) -> dict:
    """A random training batch of ``batch`` images at the config's size, every other one with a
    square defect."""
    import numpy as np

    size = int(config.data.image_size)
    r = np.random.default_rng(seed)
    mask = np.zeros((batch, size, size), np.float32)
    for i in range(0, batch, 2):  # every other image anomalous, a square defect
        y, x = r.integers(0, size // 2, 2)
        mask[i, y : y + size // 4, x : x + size // 4] = 1
    return {
        "image": r.normal(size=(batch, size, size, 3)).astype(np.float32),
        "gt_mask": mask,
        "gt_label": (mask.max(axis=(1, 2)) > 0).astype(np.int32),
        "has_mask": np.ones(batch, bool),
        "class_id": (np.arange(batch) % len(CLASS_NAMES)).astype(np.int32),
    }


class TrainStep:
    """``zsad_jax.train``'s jitted step (the config's optimiser; params, opt state and mutable
    donated) over the model's state placed on ``mesh``, compiled for the host batch ``local``.

    The trained state is a copy (the step donates it; the model keeps its arrays, e.g. for
    inference afterwards); the frozen state is placed without a copy where it already is.
    """

    def __init__(self, model, config, mesh, local):
        import jax

        from zsad_jax import optim as optim_lib
        from zsad_jax import sharding as shard_lib
        from zsad_jax import state as state_lib
        from zsad_jax import train as train_lib

        split, params, mutable, frozen = state_lib.split_for_training(model)
        self.trainable_params = sum(int(v.size) for v in params.values())
        self.frozen_params = sum(int(v.size) for v in jax.tree.leaves(frozen))
        optimizer = optim_lib.build_optimizer(
            config.optim, sorted(params), steps_per_epoch=100, total_steps=100
        )
        opt_state = optimizer.tx.init(params)
        shardings = [shard_lib.state_shardings(mesh, t) for t in (params, opt_state, mutable)]
        self.params, self.opt_state, self.mutable = (
            shard_lib.put_state(t, s)
            for t, s in zip((params, opt_state, mutable), shardings, strict=True)
        )
        self.frozen = jax.device_put(frozen, shard_lib.state_shardings(mesh, frozen))
        self.mesh, self.local = mesh, local
        grad_accum = int(config.optim.get("grad_accum", 1) or 1)
        step = jax.jit(
            train_lib.make_train_step(split, optimizer.tx, grad_accum=grad_accum, mesh=mesh),
            out_shardings=(*shardings, shard_lib.replicated(mesh)),
            donate_argnums=(0, 1, 2),
        )
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            self.compiled = step.lower(*self._args()).compile()
            self.compile_s = time.perf_counter() - t0
        self.memory = self.compiled.memory_analysis()

    def device_batch(self):
        """The host batch as the step's global device batch."""
        import jax

        from zsad_jax import sharding as shard_lib

        with jax.set_mesh(self.mesh):
            return shard_lib.global_batch_from_local(self.local, self.mesh)

    def _args(self, batch=None) -> tuple:
        batch = self.device_batch() if batch is None else batch
        return self.params, self.opt_state, self.mutable, self.frozen, batch

    def __call__(self, batch=None) -> dict:
        """One step (on ``device_batch()`` unless given); returns its metrics, ready."""
        import jax

        with jax.set_mesh(self.mesh):
            self.params, self.opt_state, self.mutable, metrics = self.compiled(*self._args(batch))
            return jax.block_until_ready(metrics)


def measure(config_path: str, variant: str, batch: int, steps: int, devices: int) -> dict:
    """One method's step on a mesh of ``devices`` devices (this process)."""
    from zsad_jax import methods
    from zsad_jax import sharding as shard_lib

    config = _load_config(config_path, variant)
    config.data.batch_size = batch
    model = methods.build(config, load_weights=True)
    model.set_classes(CLASS_NAMES)
    mesh = shard_lib.make_mesh({"data": devices, "fsdp": 1})
    step = TrainStep(model, config, mesh, fake_batch(config, batch))
    del model
    metrics = step()  # warm-up
    times = []
    for _ in range(steps):
        batch_arrays = step.device_batch()
        t0 = time.perf_counter()
        metrics = step(batch_arrays)
        times.append(time.perf_counter() - t0)
    memory, compile_s = step.memory, step.compile_s
    n_trainable, n_frozen = step.trainable_params, step.frozen_params
    step_s = statistics.median(times)
    out = {
        "config": config_path,
        "method": config.method,
        "image_size": int(config.data.image_size),
        "batch": batch,
        "devices": devices,
        "trainable_params": n_trainable,
        "frozen_params": n_frozen,
        "compile_s": round(compile_s, 2),
        "step_ms": round(1e3 * step_s, 2),
        "images_per_s": round(batch / step_s, 2),
        "loss": float(metrics["loss"]),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if memory is not None:
        for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            out[key.replace("_size_in_bytes", "_mib")] = round(getattr(memory, key, 0) / 2**20, 2)
    return out


def _subprocess(args: list[str], n_fake: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_fake}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(f"configs/{m}.py" for m in METHOD_CONFIGS))
    parser.add_argument("--variant", default="tiny", help="config variant (after the colon)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scaling", default="1,2,4,8", help="device counts ('' = skip)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]

    if args.worker:
        print(json.dumps(measure(configs[0], args.variant, args.batch, args.steps, args.devices)))
        return

    common = [f"--variant={args.variant}", f"--batch={args.batch}", f"--steps={args.steps}"]
    print(f"train step, variant {args.variant!r}, batch {args.batch}, median of {args.steps} steps")
    missing, results = [], {}
    for path in configs:
        if not (ROOT / path).exists():
            missing.append(f"{path} (no config file)")
            continue
        res = _subprocess([f"--configs={path}", "--devices=1", *common], n_fake=1)
        if "error" in res:
            missing.append(f"{path} ({res['error']})")
            continue
        results[path] = res
        mem = ", ".join(
            f"{k[:-4]} {res[k]:.1f} MiB"
            for k in ("argument_mib", "output_mib", "temp_mib")
            if k in res
        )
        print(
            f"  {res['method']:>22}  {res['image_size']}px  compile {res['compile_s']:.1f} s  "
            f"step {res['step_ms']:.1f} ms  {res['images_per_s']:.1f} img/s  "
            f"trainable {res['trainable_params']:,}  frozen {res['frozen_params']:,}  "
            f"XLA: {mem}  peak RSS {res['peak_rss_mib']:.0f} MiB"
        )
    counts = [int(n) for n in args.scaling.split(",") if n]
    if counts and results:
        print(f"images/s on n of 8 fake CPU devices ({os.cpu_count()} cores), ratio to n=1:")
        for path in results:
            rates = {}
            for n in counts:
                res = _subprocess([f"--configs={path}", f"--devices={n}", *common], n_fake=8)
                rates[n] = res.get("images_per_s")
            base = rates.get(counts[0])
            ratios = "  ".join(
                f"n={n}: {r / base:.2f}" if r and base else f"n={n}: failed"
                for n, r in rates.items()
            )
            print(f"  {results[path]['method']:>22}  {ratios}   (n={counts[0]}: {base} img/s)")
    if missing:
        print("missing: " + "; ".join(missing))
    print(json.dumps({"results": list(results.values()), "missing": missing}))


if __name__ == "__main__":
    main()
