"""Memory and time of a gradient through CLIP ViT-L/14 blocks on CPU: the blocked attention path's
own backward (``zsad_jax/encoders/attention.py``, probabilities recomputed from the logsumexp)
against autodiff through its forward (which keeps two (heads, B, T, T) float32 arrays per block).

    .venv/bin/python bench/attention_backward.py                  # 2 blocks, 1370 tokens, batch 2
    .venv/bin/python bench/attention_backward.py --blocks=4 --tokens=577 --repeats=5

The gradient is the one a train step through frozen CLIP blocks needs (ACD-CLIP's adapters sit
between them): random-weight ViT-L blocks (width 1024, 16 heads, MLP 4096, quick GELU), a random
(batch, tokens, 1024) float32 input, the gradient of sum(sin(out)) with respect to the input only.
Printed per backward: XLA's memory analysis of the compiled value_and_grad (temporaries: what the
step needs beyond its arguments and outputs), the peak RSS of a fresh process that compiles and
runs it once, and the median step time over ``--repeats`` runs, the two backwards alternating so
that load from other processes hits both alike; then new/old ratios. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKWARDS = ("custom_vjp", "autodiff")


def _step(backward: str, blocks: int, tokens: int, batch: int):
    """The compiled value_and_grad for one backward and its arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zsad_jax.encoders import attention
    from zsad_jax.encoders.clip import ResidualAttentionBlock

    rngs = nnx.Rngs(0)
    layers = [
        ResidualAttentionBlock(1024, 16, 4096, "quick_gelu", 1e-5, dtype=jnp.float32, rngs=rngs)
        for _ in range(blocks)
    ]
    graphdef, state = nnx.split(layers)

    def loss(x, state):
        for layer in nnx.merge(graphdef, state):
            x = layer(x)
        return jnp.sum(jnp.sin(x))

    x = jax.random.normal(jax.random.key(1), (batch, tokens, 1024), jnp.float32)
    core = attention._blocked_core if backward == "custom_vjp" else attention._blocked_forward
    saved, attention._blocked_core = attention._blocked_core, core  # read while tracing
    try:
        compiled = jax.jit(jax.value_and_grad(loss)).lower(x, state).compile()
    finally:
        attention._blocked_core = saved
    return compiled, (x, state)


def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {
        key.replace("_size_in_bytes", "_mib"): round(getattr(analysis, key) / 2**20, 1)
        for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    }


def _peak_rss_mib(backward: str, args) -> float:
    """Peak RSS of a fresh process that compiles and runs one step of ``backward``."""
    command = [sys.executable, __file__, "--worker", backward]
    command += [f"--blocks={args.blocks}", f"--tokens={args.tokens}", f"--batch={args.batch}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def _worker(backward: str, args) -> None:
    import jax

    compiled, inputs = _step(backward, args.blocks, args.tokens, args.batch)
    jax.block_until_ready(compiled(*inputs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"backward": backward, "peak_rss_mib": round(peak, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1370, help="1370: ViT-L/14 at 518 px")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=BACKWARDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        return _worker(args.worker, args)

    import jax
    import numpy as np

    rows = {name: {"peak_rss_mib": _peak_rss_mib(name, args)} for name in BACKWARDS}
    steps = {name: _step(name, args.blocks, args.tokens, args.batch) for name in BACKWARDS}
    values = {}
    for name, (compiled, inputs) in steps.items():
        rows[name].update(_memory(compiled))
        values[name] = jax.block_until_ready(compiled(*inputs))  # warm-up, and the parity check
    times = {name: [] for name in BACKWARDS}
    for _ in range(args.repeats):
        for name, (compiled, inputs) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times[name].append(time.perf_counter() - t0)
    (_, grad_new), (_, grad_old) = values["custom_vjp"], values["autodiff"]
    scale = float(np.abs(np.asarray(grad_old)).max())
    difference = float(np.abs(np.asarray(grad_new) - np.asarray(grad_old)).max()) / scale
    for name in BACKWARDS:
        rows[name]["step_s"] = round(statistics.median(times[name]), 3)
        setting = {key: value for key, value in vars(args).items() if key != "worker"}
        print(json.dumps({"backward": name, **setting, **rows[name]}))

    print(f"\n{args.blocks} ViT-L blocks, {args.tokens} tokens, batch {args.batch}, float32")
    print("| backward | temp MiB | peak RSS MiB | step s |")
    print("|---|---|---|---|")
    for name in BACKWARDS:
        r = rows[name]
        print(f"| {name} | {r['temp_mib']} | {r['peak_rss_mib']} | {r['step_s']} |")
    new, old = rows["custom_vjp"], rows["autodiff"]
    print(
        f"| new/old | {new['temp_mib'] / old['temp_mib']:.3f} "
        f"| {new['peak_rss_mib'] / old['peak_rss_mib']:.3f} "
        f"| {new['step_s'] / old['step_s']:.3f} |"
    )
    print(f"\ninput gradient, max |new - old| / max |old|: {difference:.1e}")


if __name__ == "__main__":
    main()
