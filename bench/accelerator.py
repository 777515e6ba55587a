"""Accelerator throughput: the one script to run whenever a GPU or TPU is available.

Run (one command; <= 8 minutes on one H100/H200, sections past ``--budget-s`` are skipped):
  .venv/bin/python bench/accelerator.py 2>&1 | tee accelerator.log
  .venv/bin/python bench/accelerator.py --small        # CPU, reduced sizes (tests/test_bench.py)
  .venv/bin/python bench/accelerator.py --sections=encoders,train --methods=af_clip

Output: first a line on stderr naming the platform and what is about to run (on a CPU without
``--small``: that this is the full-size run), then one JSON line per figure as it is measured (so
a run cut short keeps what it measured), then a Markdown table of all of them. The device
description (``device``) comes from a subprocess of its own. Sections, in the order they run:

* ``peak`` (in a subprocess, see ``train``): a measured matmul
  peak per dtype (N x N @ N x N, N = 8192; 512 with ``--small``) with jax's default matmul
  precision (what the models run with; on GPU float32 dots may use TF32). MFU figures are against
  it, not against the data sheet.
* ``train``: each method's train step (``bench/train_step.py``'s ``measure``: the step of
  ``zsad_jax.train``, the config's optimiser, one device) at the full presets and the official
  batch (``config.data.batch_size``), random weights (``random_init`` on every encoder), compute
  dtype ``--dtype``; one subprocess per method, started before this process touches the device
  (jax reserves its share of device memory on first use), so that peak device memory
  (``memory_stats()["peak_bytes_in_use"]``; XLA's memory analysis of the step on devices without
  stats) is the method's own and an out-of-memory stops only that row. MFU as for the encoders;
  a backward attention kernel in the compiled step counts twice the forward's FLOPs.
* ``attention``: the path each platform gets (``zsad_jax.encoders.attention.plan``) and, on this
  device, the chosen path's and XLA's forward and gradient against float32 XLA attention of the
  same inputs (CLIP@518's shapes, batch 4).
* ``encoders``: forward images/s of the CLIP ViT-L/14 vision tower (``presets.clip_vit_l14_336``;
  518 resizes the position grid) at 336 and 518 and DINOv3 ViT-L/16 (``vitl16``) at 336 and 512,
  in bfloat16 and float32, random weights, batch ``--encoder-batch``; compile seconds; MFU =
  FLOPs / time / peak, FLOPs from XLA's cost analysis of the compiled forward
  (``jax.jit(f).lower(...).compile().cost_analysis()``) plus, where attention runs in a kernel XLA
  cannot see into (cuDNN, Pallas), the kernel's 4 B H T^2 d (``attention_kernel_flops``). CLIP@518
  bfloat16 also runs through the ``xla`` attention path: the kernel's speed-up, and a check that
  XLA's count does not already hold the kernel's FLOPs (if it does, none are added).
* ``eval``: ``zsad_jax.evaluate.evaluate`` end to end (decode, transform, forward, metrics) on
  generated MVTec-like PNGs (``bench/pipeline.py``'s files; 64 files repeated 16 times), best of
  two runs, with ``data.num_workers`` 0 (the config default: 2 reader threads in this process)
  and ``--eval-workers``; next to it the forward alone (``BatchedInference``) at the same batch
  size: end to end / forward well below 1 means the host, not the chip, limits evaluation.
* ``torch``: transformers' PyTorch CLIPVisionModel / DINOv3ViTModel (SDPA attention), same
  architecture, batch, dtype and device, as a ratio ours/torch of images/s (skipped without torch).

``--small`` runs everything at toy sizes on any backend (CPU in the tests): two-layer 64-wide
encoders at 56/84 (CLIP) and 48/64 (DINOv3) px, the methods' ``tiny`` variants, 8 images.
The persistent compilation cache (``zsad_jax.compile_cache``) is on unless ``ZSAD_JAX_CACHE_DIR=""``
is set; a second run reports warm-cache compile seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

METHODS = ("af_clip", "ava_dino", "acd_clip", "dlvp_clip")
ENCODER_FIELDS = ("backbone", "text_encoder")
# In the order they run.
SECTIONS = ("peak", "train", "attention", "encoders", "eval", "torch")
DTYPES = ("bfloat16", "float32")
# (model, full-size image sizes, small image sizes)
ENCODERS = (("clip", (336, 518), (56, 84)), ("dinov3", (336, 512), (48, 64)))
SMALL_WIDTH, SMALL_LAYERS, SMALL_HEADS = 64, 2, 4

ROWS: list[dict] = []


def emit(row: dict) -> dict:
    """Prints one figure as a JSON line now and keeps it for the final table."""
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# Timing and FLOPs


def _median_seconds(fn, iters: int) -> float:
    """Median wall seconds of ``fn()`` (which blocks until its result is ready) after a warm-up."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def platform() -> str:
    """``plan``'s name for the default device's platform (cpu, cuda, rocm, tpu)."""
    import jax

    from zsad_jax.encoders import attention

    name = jax.default_backend()
    if name == "gpu":
        return "cuda" if attention.cuda_available() else "rocm"
    return name


def kernel_flops(calls: list[dict], where: str) -> float:
    """Forward FLOPs (4 B H T^2 d) of the attention calls that run in a kernel on ``where``."""
    total = 0.0
    for call in calls:
        if call["paths"].get(where, call["paths"]["default"]) in ("cudnn", "pallas_tpu"):
            b, t, h, d = call["shape"]
            total += 4.0 * b * h * t * t * d
    return total


def has_backward_kernel(hlo_text: str, calls: list[dict], where: str) -> bool:
    """Whether the compiled program differentiates through a kernel attention."""
    if where == "cuda":
        return "Backward" in hlo_text and "__cudnn$fmha" in hlo_text
    if where == "tpu":  # the Pallas backward adds two kernels (dq, dk/dv) per forward one
        forward = sum(c["paths"].get("tpu") == "pallas_tpu" for c in calls)
        return forward > 0 and hlo_text.count("tpu_custom_call") > forward
    return False


def _mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or not flops:
        return None
    return round(flops / seconds / (peak_tflops * 1e12), 4)


# ----------------------------------------------------------------------------------------------
# Sections


def _matmul_tflops(dtype: str, n: int, iters: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), iters)
    return round(2.0 * n**3 / seconds / 1e12, 3)


def bench_peak(small: bool) -> dict[str, float]:
    """Measured matmul TFLOP/s per dtype."""
    n = 512 if small else 8192
    peaks = {}
    for dtype in DTYPES:
        peaks[dtype] = _matmul_tflops(dtype, n, 3 if small else 20)
        emit({"figure": "matmul_peak", "dtype": dtype, "n": n, "tflops": peaks[dtype]})
    return peaks


def _clip_config(dtype: str, small: bool):
    """The CLIP vision tower's config (every image size runs the same tower: 518 resizes the
    position grid)."""
    from zsad_jax.encoders.clip import ClipVisionConfig
    from zsad_jax.encoders.presets import clip_vit_l14_336

    if small:
        return ClipVisionConfig(
            width=SMALL_WIDTH,
            layers=SMALL_LAYERS,
            heads=SMALL_HEADS,
            image_size=56,
            mlp_dim=4 * SMALL_WIDTH,
            output_dim=32,
            dtype=dtype,
        )
    return clip_vit_l14_336(dtype=dtype).vision


def _dinov3_config(dtype: str, small: bool):
    import dataclasses

    from zsad_jax.encoders.presets import dinov3_vitl16

    config = dataclasses.replace(dinov3_vitl16(), dtype=dtype)
    if small:
        config = dataclasses.replace(
            config,
            hidden_size=SMALL_WIDTH,
            num_layers=SMALL_LAYERS,
            num_heads=SMALL_HEADS,
            mlp_dim=4 * SMALL_WIDTH,
        )
    return config


def _encoder_model(name: str, dtype: str, small: bool):
    """Our encoder ``name`` (clip, dinov3) with random weights."""
    from flax import nnx

    from zsad_jax.encoders.clip import ClipVision
    from zsad_jax.encoders.dinov3 import DinoV3

    if name == "clip":
        return ClipVision(_clip_config(dtype, small), rngs=nnx.Rngs(0))
    return DinoV3(_dinov3_config(dtype, small), rngs=nnx.Rngs(0))


def _encoder_forward(model):
    """A jitted forward over the model's split state, returning the final tokens/embedding."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)[0]

    return jax.jit(forward), state


def bench_encoder(
    name: str,
    image_size: int,
    dtype: str,
    args,
    peaks: dict,
    *,
    implementation: str = "auto",
    add_kernel_flops: bool = True,
) -> dict:
    """Forward images/s, compile seconds and MFU of one encoder configuration.

    ``add_kernel_flops``: add the attention kernels' FLOPs to XLA's count (module docstring).
    """
    import jax
    import jax.numpy as jnp

    from zsad_jax.encoders import attention

    batch = args.encoder_batch
    model = _encoder_model(name, dtype, args.small)
    forward, state = _encoder_forward(model)
    images = jax.random.normal(jax.random.key(0), (batch, image_size, image_size, 3), jnp.float32)
    with attention.use_implementation(implementation), attention.record_calls() as calls:
        t0 = time.perf_counter()
        compiled = forward.lower(state, images).compile()
        compile_s = time.perf_counter() - t0
    seconds = _median_seconds(lambda: compiled(state, images).block_until_ready(), args.iters)
    where = platform()
    xla = _xla_flops(compiled)
    kernel = kernel_flops(calls, where)
    return {
        "figure": "encoder_forward",
        "model": name,
        "image_size": image_size,
        "dtype": dtype,
        "batch": batch,
        "attention": _paths_used(calls, where),
        "compile_s": round(compile_s, 2),
        "ms_per_batch": round(1e3 * seconds, 2),
        "images_per_s": round(batch / seconds, 2),
        "xla_flops": xla,
        "attention_kernel_flops": kernel,
        "mfu": _mfu(xla + (kernel if add_kernel_flops else 0.0), seconds, peaks.get(dtype)),
    }


def _paths_used(calls: list[dict], where: str) -> str:
    return ",".join(sorted({c["paths"].get(where, c["paths"]["default"]) for c in calls}))


def bench_attention(small: bool) -> None:
    """The plan on this platform; the chosen path and XLA's against float32 XLA attention of the
    same inputs, forward and gradient (CLIP@518's shapes; toy shapes with --small)."""
    import jax
    import jax.numpy as jnp

    from zsad_jax.encoders import attention

    shape = (2, 37, 4, 16) if small else (4, 1 + 37 * 37, 16, 64)
    where = platform()

    def attend(implementation):
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    for dtype in DTYPES:
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.dtype(dtype)) for i in range(3))
        with attention.record_calls() as calls:
            (_, out), grads = attend("auto")(q, k, v)
        (_, xla_out), xla_grads = attend("xla")(q, k, v)
        (_, ref), ref_grads = attend("xla")(*(x.astype(jnp.float32) for x in (q, k, v)))

        def diff(a, b):
            return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))

        emit(
            {
                "figure": "attention_parity",
                "platform": where,
                "dtype": dtype,
                "shape": list(shape),
                "path": _paths_used(calls, where),
                "plan": calls[0]["paths"],
                "out_diff_vs_fp32": diff(out, ref),
                "xla_out_diff_vs_fp32": diff(xla_out, ref),
                "grad_q_diff_vs_fp32": diff(grads[0], ref_grads[0]),
                "xla_grad_q_diff_vs_fp32": diff(xla_grads[0], ref_grads[0]),
            }
        )


def _guarded(what: str, fn, *args, **kwargs):
    """Runs one measurement; an exception becomes an error row and the other figures still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # a benchmark reports a failure and goes on
        emit({"figure": "error", "what": what, "error": f"{type(e).__name__}: {e}"[:500]})
        return None


def _past(deadline: float, what: str) -> bool:
    """True (and says so) once the time budget is spent."""
    if time.monotonic() < deadline:
        return False
    emit({"figure": "skipped", "what": what, "reason": "--budget-s spent"})
    return True


def _encoder_sizes(small: bool) -> list[tuple[str, int]]:
    return [(name, size) for name, full, tiny in ENCODERS for size in (tiny if small else full)]


def bench_encoders(args, peaks: dict, deadline: float) -> None:
    """Every (dtype, encoder, size). CLIP at its largest size in bfloat16 runs first, through the
    default path and XLA's: the kernel's speed-up, and whether XLA's own FLOP count already holds
    the kernel's FLOPs (then both counts agree and no kernel FLOPs are added anywhere)."""
    clip_size = max(size for name, size in _encoder_sizes(args.small) if name == "clip")
    what = f"encoder clip@{clip_size} bfloat16"
    first = _guarded(what, bench_encoder, "clip", clip_size, "bfloat16", args, peaks)
    add_kernel = True
    if first and first["attention_kernel_flops"]:
        xla_row = _guarded(
            f"{what} xla",
            bench_encoder,
            "clip",
            clip_size,
            "bfloat16",
            args,
            peaks,
            implementation="xla",
        )
        if xla_row:
            add_kernel = (
                abs(first["xla_flops"] - xla_row["xla_flops"]) > 0.01 * xla_row["xla_flops"]
            )
            if not add_kernel:
                seconds = first["ms_per_batch"] / 1e3
                first["mfu"] = _mfu(first["xla_flops"], seconds, peaks.get("bfloat16"))
            xla_row["kernel_speedup"] = round(first["images_per_s"] / xla_row["images_per_s"], 3)
            xla_row["xla_counts_kernel_flops"] = not add_kernel
            emit(xla_row)
    if first:
        emit(first)
    for dtype in DTYPES:
        for name, size in _encoder_sizes(args.small):
            what = f"encoder {name}@{size} {dtype}"
            if (name, size, dtype) == ("clip", clip_size, "bfloat16") or _past(deadline, what):
                continue
            row = _guarded(
                what, bench_encoder, name, size, dtype, args, peaks, add_kernel_flops=add_kernel
            )
            if row:
                emit(row)


# ----------------------------------------------------------------------------------------------
# Train steps (one subprocess per method)


def _method_config(method: str, small: bool, dtype: str, batch: int | None = None):
    """The method's config: full preset (``tiny`` with --small), random weights, ``dtype``."""
    import importlib

    config = importlib.import_module(f"configs.{method}").get_config("tiny" if small else None)
    for field in ENCODER_FIELDS:
        if field in config.model:
            config.model[field].random_init = True
    config.compute_dtype = dtype
    if batch:
        config.data.batch_size = batch
    return config


@contextlib.contextmanager
def _capture_compiled():
    """Collects every ``Lowered.compile()`` result made inside the block: ``train_step.measure``
    keeps its compiled step to itself, and MFU needs the step's cost analysis and HLO."""
    import jax

    captured = []
    original = jax.stages.Lowered.compile

    def compile_and_keep(self, *args, **kwargs):
        compiled = original(self, *args, **kwargs)
        captured.append(compiled)
        return compiled

    jax.stages.Lowered.compile = compile_and_keep
    try:
        yield captured
    finally:
        jax.stages.Lowered.compile = original


def _device_peak_mib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**20, 1)


def train_worker(method: str, small: bool, dtype: str, peak_tflops: float | None) -> dict:
    """One method's step through ``bench/train_step.py``'s ``measure`` (in this process)."""
    import train_step

    from zsad_jax.encoders import attention

    batch = int(_method_config(method, small, dtype).data.batch_size)  # the official batch
    # measure() loads the config from its file by variant; hand it this one instead.
    train_step._load_config = lambda path, variant: _method_config(method, small, dtype, batch)
    with _capture_compiled() as compiled, attention.record_calls() as calls:
        out = train_step.measure(f"configs/{method}.py", "", batch, 3 if small else 5, 1)
    step, where = compiled[-1], platform()
    xla = _xla_flops(step)
    kernel = kernel_flops(calls, where)
    if kernel and has_backward_kernel(step.as_text(), calls, where):
        kernel *= 3.0  # forward + a backward of twice its matmuls
    xla_mib = sum(out.get(k, 0.0) for k in ("argument_mib", "output_mib", "temp_mib"))
    out.update(
        figure="train_step",
        dtype=dtype,
        attention=_paths_used(calls, where),
        xla_flops=xla,
        attention_kernel_flops=kernel,
        mfu=_mfu(xla + kernel, out["step_ms"] / 1e3, peak_tflops),
        peak_device_mib=_device_peak_mib() or round(xla_mib, 1),
    )
    return out


def _worker(args, worker: str, what: str, deadline: float, extra=()) -> list[dict] | None:
    """Runs ``--worker=<worker>`` of this script in a fresh process; its JSON lines, or None
    after emitting an error row for ``what``."""
    command = [sys.executable, __file__, f"--worker={worker}", f"--dtype={args.dtype}", *extra]
    command += [f"--cache-min-compile-s={args.cache_min_compile_s}"]
    command += ["--small"] if args.small else []
    limit = max(deadline - time.monotonic(), 0.0) + 60.0
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired:
        emit({"figure": "error", "what": what, "error": f"timed out ({limit:.0f} s)"})
        return None
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        emit({"figure": "error", "what": what, "error": error[:300]})
        return None
    return lines


def bench_train(args, peaks: dict, deadline: float) -> None:
    for method in args.methods:
        if _past(deadline, f"train {method}"):
            continue
        peak = f"--peak-tflops={peaks.get(args.dtype) or 0}"
        rows = _worker(args, f"train:{method}", f"train {method}", deadline, [peak])
        if rows:
            emit(rows[-1])


def announce(args, device: dict | None) -> None:
    """The first lines (stderr): the platform and what is about to run; on a CPU without
    ``--small``, that this is the full-size run (an accelerator's, far slower there)."""
    if device:
        where = f"{device['backend']} ({device['devices']} x {device['device']})"
    else:
        where = "an unknown device (its query failed: see the error row)"
    size = "toy sizes (--small)" if args.small else "full size"
    sections, methods = ",".join(args.sections) or "none", ",".join(args.methods)
    print(
        f"bench/accelerator.py on {where}: {size}; sections {sections}; methods {methods}; a "
        f"section that would start after --budget-s={args.budget_s:g} s is skipped",
        file=sys.stderr,
        flush=True,
    )
    if device and device["backend"] == "cpu" and not args.small:
        print(
            "note: no accelerator found: this is the full-size run (8192 x 8192 matmuls, ViT-L "
            "encoders, the methods' full train steps), meant for a GPU or TPU and very slow on a "
            "CPU; --small runs the toy sizes (a few minutes on 2 cores)",
            file=sys.stderr,
            flush=True,
        )


def device_row(cache: str | None, small: bool) -> dict:
    import jax

    return {
        "figure": "device",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "host_cores": os.cpu_count(),
        "small": small,
        "compilation_cache": cache,
    }


# ----------------------------------------------------------------------------------------------
# Evaluation end to end


def bench_eval(args, deadline: float) -> None:
    """``evaluate()`` on generated files, timed on its second run (the first compiles), next to
    the forward alone on the same batch size."""
    from pipeline import write_files

    with tempfile.TemporaryDirectory(prefix="zsad_accelerator_eval_") as root:
        unique = write_files(Path(root), "mvtec_png", 4 if args.small else 64)
        records = unique * (2 if args.small else 16)
        for method in args.methods:
            if not _past(deadline, f"eval {method}"):
                _guarded(f"eval {method}", _eval_method, method, records, args, deadline)


def _eval_method(method: str, records: list, args, deadline: float) -> None:
    from zsad_jax import evaluate, methods

    config = _method_config(method, args.small, args.dtype)
    model = methods.build(config, load_weights=True)  # as bench/train_step.py builds it
    forward = _forward_images_per_s(model, config, records, args.iters)
    for workers in sorted({0, args.eval_workers}):
        if _past(deadline, f"eval {method} num_workers={workers}"):
            continue
        config.data.num_workers = workers
        runs = [evaluate.evaluate(model, config, records=records, num_vis=0) for _ in range(2)]
        rate = max(run["num_images"] / run["seconds"] for run in runs)
        emit(
            {
                "figure": "evaluate",
                "method": method,
                "image_size": int(config.data.image_size),
                "dtype": args.dtype,
                "batch": int(config.eval.batch_size),
                "num_workers": workers,
                "images": runs[0]["num_images"],
                "seconds": [run["seconds"] for run in runs],
                "images_per_s": round(rate, 2),
                "forward_images_per_s": forward,
                "end_to_end_over_forward": round(rate / forward, 3),
                "host_cores": os.cpu_count(),
            }
        )


def _forward_images_per_s(model, config, records: list, iters: int) -> float:
    """The method's jitted inference alone (``BatchedInference``) on one batch of real inputs."""
    from zsad_jax import inference
    from zsad_jax.data import pipeline, transforms

    batch = int(config.eval.batch_size)
    model.set_classes(sorted({r.category for r in records}))
    infer = inference.BatchedInference(model)
    transform = transforms.make_transform(str(config.data.transform), int(config.data.image_size))
    source = pipeline.RecordSource(records)
    host = next(iter(pipeline.eval_batches(source, batch_size=batch, transform=transform)))
    seconds = _median_seconds(lambda: infer(host), iters)
    return round(batch / seconds, 2)


# ----------------------------------------------------------------------------------------------
# transformers' PyTorch models on the same device


def _torch_model(name: str, image_size: int, small: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModel, DINOv3ViTConfig, DINOv3ViTModel

    from convert.dinov3 import transformers_config_dict

    # Our configs only (building our models here would only draw weights nobody reads).
    if name == "clip":
        ours = _clip_config("float32", small)
        config = CLIPVisionConfig(
            hidden_size=ours.width,
            intermediate_size=ours.mlp_dim,
            num_hidden_layers=ours.layers,
            num_attention_heads=ours.heads,
            patch_size=ours.patch_size,
            image_size=ours.image_size,
            attn_implementation="sdpa",
        )
        return CLIPVisionModel(config), image_size != ours.image_size
    ours = _dinov3_config("float32", small)
    config = DINOv3ViTConfig(**transformers_config_dict(ours), attn_implementation="sdpa")
    return DINOv3ViTModel(config), None


def bench_torch(args, deadline: float) -> None:
    """Ours/torch images/s for every encoder row measured above."""
    try:
        import torch
    except ImportError:
        emit({"figure": "skipped", "what": "torch", "reason": "torch is not installed"})
        return
    where = platform()
    if where not in ("cpu", "cuda") or (where == "cuda" and not torch.cuda.is_available()):
        reason = f"this torch {torch.__version__} has no {where} device"
        emit({"figure": "skipped", "what": "torch", "reason": reason})
        return
    device = torch.device("cuda" if where == "cuda" else "cpu")
    ours = [
        r for r in list(ROWS) if r.get("figure") == "encoder_forward" and "kernel_speedup" not in r
    ]
    for row in ours:
        what = f"torch {row['model']}@{row['image_size']} {row['dtype']}"
        if not _past(deadline, what):
            _guarded(what, _torch_row, row, device, args)


def _torch_row(row: dict, device, args) -> None:
    import torch

    model, interpolate = _torch_model(row["model"], row["image_size"], args.small)
    dtype = getattr(torch, row["dtype"])
    model = model.to(device=device, dtype=dtype).eval()
    size = row["image_size"]
    pixels = torch.randn(row["batch"], 3, size, size, device=device, dtype=dtype)
    kwargs = {} if interpolate is None else {"interpolate_pos_encoding": interpolate}
    rate = row["batch"] / _torch_seconds(model, pixels, kwargs, args.iters)
    emit(
        {
            "figure": "torch_forward",
            "model": row["model"],
            "image_size": size,
            "dtype": row["dtype"],
            "batch": row["batch"],
            "device": str(device),
            "torch": torch.__version__,
            "images_per_s": round(rate, 2),
            "ours_over_torch": round(row["images_per_s"] / rate, 3),
        }
    )


def _torch_seconds(model, pixels, kwargs: dict, iters: int) -> float:
    """Median seconds of one inference-mode forward (synchronised on CUDA)."""
    import torch

    def run():
        with torch.inference_mode():
            model(pixel_values=pixels, **kwargs)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    return _median_seconds(run, iters)


# ----------------------------------------------------------------------------------------------
# Table and command line


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table_row(r: dict) -> str | None:
    fig = r.get("figure")
    pct = None if r.get("mfu") is None else 100 * r["mfu"]
    if fig == "matmul_peak":
        return f"| matmul peak | {r['dtype']} {r['n']}^3 | {r['tflops']:.1f} TFLOP/s | | | | |"
    if fig == "attention_parity":
        return (
            f"| attention | {r['dtype']} {r['platform']}: {r['path']} | out err "
            f"{r['out_diff_vs_fp32']:.1e} (xla {r['xla_out_diff_vs_fp32']:.1e}), grad err "
            f"{r['grad_q_diff_vs_fp32']:.1e} (xla {r['xla_grad_q_diff_vs_fp32']:.1e}) | | | | |"
        )
    if fig == "encoder_forward":
        extra = (
            f"xla path: kernel {r['kernel_speedup']:.2f}x faster" if "kernel_speedup" in r else ""
        )
        return (
            f"| encoder | {r['model']}@{r['image_size']} {r['dtype']} b{r['batch']} "
            f"({r['attention']}) | {_fmt(r['images_per_s'])} img/s | {_fmt(pct)} | "
            f"{_fmt(r['compile_s'])} | | {extra} |"
        )
    if fig == "error":
        return f"| failed | {r['what']} | {r['error']} | | | | |"
    if fig == "train_step":
        return (
            f"| train step | {r['method']} {r['image_size']}px {r['dtype']} b{r['batch']} "
            f"({r['attention']}) | {_fmt(r['images_per_s'])} img/s | {_fmt(pct)} | "
            f"{_fmt(r['compile_s'])} | {_fmt(r['peak_device_mib'], 0)} | |"
        )
    if fig == "evaluate":
        return (
            f"| evaluate | {r['method']} {r['image_size']}px b{r['batch']} num_workers="
            f"{r['num_workers']} | {_fmt(r['images_per_s'])} img/s | | | | forward "
            f"{_fmt(r['forward_images_per_s'])} img/s, end to end / forward "
            f"{r['end_to_end_over_forward']:.2f} |"
        )
    if fig == "torch_forward":
        return (
            f"| torch | {r['model']}@{r['image_size']} {r['dtype']} b{r['batch']} ({r['device']}) "
            f"| {_fmt(r['images_per_s'])} img/s | | | | ours/torch {r['ours_over_torch']:.2f} |"
        )
    if fig == "skipped":
        return f"| skipped | {r['what']} | {r['reason']} | | | | |"
    return None


def table(rows: list[dict]) -> str:
    lines = [
        "| figure | what | result | MFU % | compile s | peak MiB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [line for r in rows if (line := _table_row(r))])


def _parse(argv):
    from zsad_jax.compile_cache import MIN_COMPILE_SECONDS  # imports no jax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU tests)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="train/eval methods")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="train/eval dtype")
    parser.add_argument("--encoder-batch", type=int, default=None, help="default 32; 2 small")
    parser.add_argument("--iters", type=int, default=None, help="timed calls; default 10, 2")
    parser.add_argument("--eval-workers", type=int, default=None, help="default: cores, max 16")
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip sections after this")
    parser.add_argument(
        "--cache-min-compile-s",
        type=float,
        default=MIN_COMPILE_SECONDS,
        help="store programs that took at least this long to compile in the compilation cache "
        f"(default {MIN_COMPILE_SECONDS:g}); 0 (the tests) lets this process load, not compile "
        "again, the many small weight-init programs the train worker compiled for the same method",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.sections) - set(SECTIONS)) + sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown sections/methods {unknown}; sections {SECTIONS}, methods {METHODS}")
    args.encoder_batch = args.encoder_batch or (2 if args.small else 32)
    args.iters = args.iters or (2 if args.small else 10)
    if args.eval_workers is None:
        args.eval_workers = 0 if args.small else min(os.cpu_count() or 1, 16)
    return args


def run_worker(args, cache: str | None) -> None:
    """``--worker=device`` (the device row), ``peak`` (matmul peaks) or ``train:<method>``."""
    if args.worker == "device":
        print(json.dumps(device_row(cache, args.small)), flush=True)
        return
    if args.worker == "peak":
        bench_peak(args.small)
        return
    method = args.worker.removeprefix("train:")
    row = train_worker(method, args.small, args.dtype, args.peak_tflops or None)
    print(json.dumps(row), flush=True)


def measure_peaks(args, deadline: float) -> dict[str, float]:
    """The matmul peaks per dtype, measured in a worker (see ``main``); {} without ``peak``."""
    peaks = {}
    if "peak" in args.sections:
        for row in _worker(args, "peak", "matmul peak", deadline) or []:
            emit(row)
            if row["figure"] == "matmul_peak":
                peaks[row["dtype"]] = row["tflops"]
    return peaks


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not args.worker:
        # This process shares the device with the train workers (run while it has not touched
        # the device yet) and then with torch: leave room instead of jax's default 75 %.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    from zsad_jax.compile_cache import enable_compilation_cache

    cache = enable_compilation_cache(min_compile_seconds=args.cache_min_compile_s)
    if args.worker:
        run_worker(args, cache)
        return
    start = time.monotonic()
    deadline = start + args.budget_s
    # Device queries and the peak in workers: once this process touches a GPU, jax reserves
    # its share of the memory, and the train workers need theirs. The device comes first, on
    # its own, so that the first line says where this runs before the first slow section.
    devices = _worker(args, "device", "device", deadline) or []
    announce(args, devices[0] if devices else None)
    for row in devices:
        emit(row)
    peaks = measure_peaks(args, deadline)
    if "train" in args.sections:
        bench_train(args, peaks, deadline)
    if "attention" in args.sections:
        _guarded("attention", bench_attention, args.small)
    if "encoders" in args.sections:
        _guarded("encoders", bench_encoders, args, peaks, deadline)
    if "eval" in args.sections:
        _guarded("eval", bench_eval, args, deadline)
    if "torch" in args.sections:
        _guarded("torch", bench_torch, args, deadline)
    emit({"figure": "total", "seconds": round(time.monotonic() - start, 1)})
    print("\n" + table(ROWS), flush=True)


if __name__ == "__main__":
    main()
