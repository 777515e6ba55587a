"""The attention core shared by the CLIP and DINOv3 encoders (one place to tune for speed).

``dot_product_attention(q, k, v)`` computes ``softmax(q k^T / sqrt(d)) v`` through one of these
paths, chosen at trace time (``plan``) and, per platform, at lowering time
(``jax.lax.platform_dependent``, so an exported or AOT-lowered function picks the right one for the
platform it is compiled for):

* ``blocked`` (CPU): one head and one query block (at least two per sequence, at most
  ``CPU_QUERY_BLOCK`` rows) at a time (``jax.lax.map``), so each (rows, T) logits slab stays
  small. The textbook form writes 16 x 1370^2 float32 logits (120 MB per block at 518 px) and
  streams them through memory several times; ``jax.nn.
  dot_product_attention``'s XLA path does the same and is 4-5x slower here (``bench/encoders.py``).
  Its backward (``jax.custom_vjp``) recomputes the probabilities block by block from each row's
  logsumexp instead of keeping them: its gradient's temporaries 54 instead of 544 MiB per ViT-L
  attention at 518 px, batch 2 (``bench/attention_backward.py`` measures whole blocks).
* ``cudnn`` (CUDA, bfloat16/float16, head_dim a multiple of 8 up to 128): ``jax.nn.
  dot_product_attention(implementation="cudnn")``, cuDNN's fused flash attention (no logits tensor
  in memory, fused backward). Only offered when a CUDA backend exists: jax looks the cuDNN version
  up while tracing it.
* ``pallas_tpu`` (TPU): the Pallas flash-attention kernel (``jax.experimental.pallas.ops.tpu.
  flash_attention``). It works on whole 128-row blocks, so T is padded and segment ids keep the
  padding out of every real row's softmax; under a multi-device mesh it runs per batch shard
  (``jax.shard_map``), since XLA cannot partition an opaque kernel. Only offered when a TPU backend
  exists (``tpu_available``).
* ``xla`` (everything else: float32 on GPU, ROCm, unknown platforms; the fallbacks):
  ``jax.nn.dot_product_attention(implementation="xla")``, XLA's fused softmax over the whole
  logits tensor.
* ``dense`` (any platform, whenever the caller needs the probabilities (``return_probs``:
  DLVP-CLIP's CLS attention, CLIP's attention map) or passes a ``mask`` (the causal text tower)):
  the explicit einsum + softmax.

``use_implementation(name)`` forces one path for code traced inside it: benchmarks, parity tests,
and ``jax.export`` on a GPU or TPU machine. There the ``cudnn``/``pallas_tpu`` branches are kernels
that lower for their own platform only, so a module for several platforms fails to lower, and
cuDNN's ``__cudnn$fmha*`` custom calls are not on ``jax.export``'s list of stable targets; export
inside ``use_implementation("xla")`` (the Pallas kernel's ``tpu_custom_call`` is stable, so a
TPU-only export may keep it).

Numerics: every path takes logits and the softmax in float32 and computes the same function. In
float32 the paths agree with a float64 reference to ~5e-7 on unit-variance inputs (tested bound
1e-5, ``tests/test_attention.py``; the error grows with the logits' spread, ~1e-5 at logit std 9).
In bfloat16 the inputs are bfloat16 and the ``xla``/``dense``/``blocked`` paths round the
probabilities to bfloat16 before ``probs @ v`` (cuDNN and the Pallas kernel keep them in float32
inside the kernel): each path is within 3.5e-3 of the float64 attention of the same bfloat16
inputs at unit variance (tested bound 1e-2; 1.4e-2 at logit std 9). The blocked path's gradients
equal autodiff of the textbook float32 attention to ~1e-6 (tested 1e-5); in bfloat16 they are
within 5.5e-3 of the largest float32 gradient (tested bound 1e-2).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

# Query rows per slab on CPU, at most, and at least two slabs. Fewer, larger slabs run faster:
# each iteration of the loop is a round of XLA:CPU's per-op thread synchronisation. Attention core
# at T = 1370 / 1029 / 577 (batch 2, 16 heads x 64; 2-core Sapphire Rapids VM): 2 slabs 118 / 74 /
# 33 ms, slabs of <= 256 rows (6 / 5 / 3) 145 / 88 / 34 ms, one dense slab 274 / 170 / 42 ms;
# the CLIP ViT-L vision tower at 518 px, batch 2: 0.93x the time of 256-row slabs.
CPU_QUERY_BLOCK = 688
# Sequences up to this length (and up to the query block) run as one dense slab.
CPU_DENSE_TOKENS = 256
# The Pallas TPU kernel works on whole blocks of this many rows (its lane width).
TPU_BLOCK = 128
# cuDNN's flash attention: bfloat16/float16 inputs, head_dim a multiple of 8 up to this (256 on
# Hopper and later, but 128 holds on every GPU jax supports).
CUDNN_MAX_HEAD_DIM = 128

IMPLEMENTATIONS = ("auto", "blocked", "cudnn", "pallas_tpu", "xla", "dense")
# Platforms given their own branch; anything else takes "default".
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_forced: str | None = None
# Lists receiving one entry per attention call traced (``record_calls``).
_recorders: list[list[dict]] = []


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Forces one path (``IMPLEMENTATIONS``) for attention traced inside the ``with`` block.

    Read at trace time: a function already compiled outside the block keeps its path.
    """
    global _forced
    _check_implementation(name)
    previous, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def record_calls() -> Iterator[list[dict]]:
    """Collects ``{"shape", "dtype", "paths"}`` (``paths``: ``plan``'s dict) for every attention
    call traced inside the block: benchmarks use it to say which path ran and to count the FLOPs
    of kernels that XLA's cost analysis cannot see into."""
    calls: list[dict] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _record(q, paths: dict[str, str]) -> None:
    for calls in _recorders:
        calls.append({"shape": tuple(q.shape), "dtype": str(q.dtype), "paths": paths})


def _check_implementation(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r}; use one of {list(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------------------------
# Which path where


def cudnn_supports(head_dim: int, dtype) -> bool:
    """Whether cuDNN's flash attention takes these inputs (its trace-time checks, done early)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return half and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


@functools.cache
def cuda_available() -> bool:
    """A CUDA backend exists in this process (jax's CUDA wheels bundle cuDNN with it).

    Without one the ``cudnn`` branch cannot even be traced (jax looks up the cuDNN version).
    """
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


@functools.cache
def tpu_available() -> bool:
    """A TPU backend exists in this process.

    The Pallas branch is only offered then: lowering one module for several platforms (``jax.
    export(platforms=("cpu", "tpu"))``) lowers every branch for every platform, and the kernel
    has no CPU lowering; without a TPU here, TPU code gets the ``xla`` path (works everywhere).
    """
    try:
        return bool(jax.devices("tpu"))
    except RuntimeError:
        return False


@functools.cache
def pallas_tpu_available() -> bool:
    """The installed jax ships the Pallas TPU flash-attention kernel."""
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def plan(
    head_dim: int,
    dtype,
    *,
    needs_dense: bool = False,
    implementation: str | None = None,
) -> dict[str, str]:
    """The path per platform (``PLATFORMS`` and ``"default"``) for one attention call.

    Args:
      head_dim, dtype: of q/k/v.
      needs_dense: the caller wants the probabilities or passes a mask.
      implementation: force a path (``IMPLEMENTATIONS``); None or "auto" = the module's choice
        (or the one set by ``use_implementation``).
    """
    forced = implementation if implementation not in (None, "auto") else _forced
    if forced is not None:
        _check_implementation(forced)
    if needs_dense or forced == "dense":
        return dict.fromkeys((*PLATFORMS, "default"), "dense")
    if forced is not None:
        return dict.fromkeys((*PLATFORMS, "default"), forced)
    gpu = "cudnn" if cuda_available() and cudnn_supports(head_dim, dtype) else "xla"
    return {
        "cpu": "blocked",
        "cuda": gpu,
        "rocm": "xla",
        "tpu": "pallas_tpu" if tpu_available() and pallas_tpu_available() else "xla",
        "default": "xla",
    }


# ----------------------------------------------------------------------------------------------
# The paths. Inputs (B, T, heads, head_dim), output (B, T, heads, head_dim) in v's dtype.


def _dense_attention(q, k, v, mask=None, return_probs=False):
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return (out, probs) if return_probs else out


def _blocked_attention(q, k, v, query_block: int = CPU_QUERY_BLOCK):
    """Same result as ``_dense_attention`` without a mask, one (head, query block) at a time."""
    b, t, h, d = q.shape
    if t <= min(query_block, CPU_DENSE_TOKENS):  # short: the loop would only add overhead
        return _dense_attention(q, k, v)
    n_blocks = max(2, math.ceil(t / query_block))
    rows = math.ceil(t / n_blocks)  # even blocks: at most n_blocks - 1 padded rows in total
    q = q * jnp.asarray(d**-0.5, q.dtype)
    # (heads, B, T, d): each head's operands contiguous for the per-head loop.
    qh, kh, vh = (x.transpose(2, 0, 1, 3) for x in (q, k, v))
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n_blocks * rows - t), (0, 0)))
    # (heads, n_blocks, B, rows, d)
    qh = qh.reshape(h, b, n_blocks, rows, d).transpose(0, 2, 1, 3, 4)
    out = _blocked_core(qh, kh, vh)  # (heads, n_blocks, B, rows, d)
    out = out.transpose(2, 1, 3, 0, 4).reshape(b, n_blocks * rows, h, d)
    return out[:, :t]


# The blocked core has its own backward (``jax.custom_vjp``). Autodiff through the loop saves every
# block's probabilities, i.e. whole (heads, B, T, T) float32 arrays per attention call (~460 MB per
# ViT-L block at 518 px, batch 2): the peak of a CPU train step through frozen blocks. Instead the
# forward keeps each row's logsumexp and the backward recomputes the probabilities block by block
# (FlashAttention-2's backward, with whole key rows per block): q, k, v and the logsumexp are all it
# keeps, O(T) per query row instead of O(T^2).


def _block_logits(q_block, k_head):
    """(B, rows, d) x (B, T, d) -> (B, rows, T) float32; q already scaled by 1/sqrt(d)."""
    return jnp.einsum("bqd,bkd->bqk", q_block, k_head, preferred_element_type=jnp.float32)


def _block_output(probs, v_head):
    return jnp.einsum("bqk,bkd->bqd", probs.astype(v_head.dtype), v_head)


def _each_head_and_block(one_block, qh, kh, vh):
    """``one_block(q_block, k_head, v_head)`` over (heads, n_blocks, B, rows, d) query blocks."""

    def one_head(args):
        q_blocks, k_head, v_head = args
        return jax.lax.map(lambda q_block: one_block(q_block, k_head, v_head), q_blocks)

    return jax.lax.map(one_head, (qh, kh, vh))


def _blocked_forward(qh, kh, vh):
    """(heads, n_blocks, B, rows, d) scaled queries, (heads, B, T, d) keys and values -> the
    attention output in the queries' layout. Differentiable by autodiff too (the old backward:
    ``bench/attention_backward.py`` compares the two)."""

    def one_block(q_block, k_head, v_head):
        return _block_output(jax.nn.softmax(_block_logits(q_block, k_head), axis=-1), v_head)

    return _each_head_and_block(one_block, qh, kh, vh)


def _blocked_forward_with_lse(qh, kh, vh):
    """``_blocked_forward``'s output (the same ops: bit for bit) and the residuals, with each
    row's logsumexp."""

    def one_block(q_block, k_head, v_head):
        logits = _block_logits(q_block, k_head)
        out = _block_output(jax.nn.softmax(logits, axis=-1), v_head)
        return out, jax.nn.logsumexp(logits, axis=-1)

    out, lse = _each_head_and_block(one_block, qh, kh, vh)
    return out, (qh, kh, vh, lse)


def _blocked_backward(residuals, d_out):
    """FlashAttention-2's backward per query block, accumulated in float32: P = exp(S - lse),
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dQ = dS K, dK = dS^T Q.

    ``rowsum(P dP)`` runs over the block's whole key row, as autodiff of the softmax does.
    FlashAttention's ``rowsum(dO * O)`` (needed there because keys are tiled too) is the same sum
    only in exact arithmetic: it cancels badly where one high-norm value dominates a row (the
    attention sink of ``tests/test_attention.py``: dK off by 500x its largest element, 40x further
    from float64 than autodiff), is 2.5x further from the dense gradient at unit variance in
    float32 and carries the bfloat16 rounding of P V. dV takes P rounded to v's dtype, as the
    forward's P V did. The scale 1/sqrt(d) is applied outside (``_blocked_attention``), so
    autodiff applies it to dQ.
    """
    qh, kh, vh, lse = residuals
    f32 = jnp.float32

    def one_head(args):
        q_blocks, k_head, v_head, d_out_blocks, lse_blocks = args

        def one_block(carry, block):
            dk, dv = carry
            q_block, d_out_block, lse_block = block
            probs = jnp.exp(_block_logits(q_block, k_head) - lse_block[..., None])
            dv = dv + jnp.einsum(
                "bqk,bqd->bkd", probs.astype(v_head.dtype), d_out_block, preferred_element_type=f32
            )
            d_probs = jnp.einsum("bqd,bkd->bqk", d_out_block, v_head, preferred_element_type=f32)
            d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
            dq = jnp.einsum("bqk,bkd->bqd", d_logits, k_head, preferred_element_type=f32)
            dk = dk + jnp.einsum("bqk,bqd->bkd", d_logits, q_block, preferred_element_type=f32)
            return (dk, dv), dq

        zeros = jnp.zeros(k_head.shape, f32)
        (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros), (q_blocks, d_out_blocks, lse_blocks))
        return dq, dk, dv

    dq, dk, dv = jax.lax.map(one_head, (qh, kh, vh, d_out, lse))
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


_blocked_core = jax.custom_vjp(_blocked_forward)
_blocked_core.defvjp(_blocked_forward_with_lse, _blocked_backward)


def _xla_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _cudnn_attention(q, k, v):
    """cuDNN flash attention; XLA's path if jax's own trace-time checks still refuse the inputs
    (e.g. a cuDNN older than what the shape needs): slower, never wrong."""
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError):
        return _xla_attention(q, k, v)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tpu_block_sizes(padded: int):
    """Forward blocks: the largest of 512/256/128 dividing the padded length (fewer grid steps);
    the backward keeps the kernel's 128 defaults."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    block = next(n for n in (512, 256, TPU_BLOCK) if padded % n == 0)
    default = fa.BlockSizes.get_default(1, 1, padded, padded, 1)
    return fa.BlockSizes(
        **{**default.__dict__, "block_q": block, "block_k_major": block, "block_k": block}
    )


def _pallas_tpu_heads_major(qh, kh, vh, t: int):
    """The Pallas kernel on (B, heads, T_padded, d); rows >= ``t`` are padding."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, _, padded, d = qh.shape
    segments = None
    if padded != t:
        # Real tokens segment 0, padding segment 1: no real query sees a padded key. Padded queries
        # attend among themselves and are cropped afterwards.
        ids = jnp.broadcast_to((jnp.arange(padded) >= t).astype(jnp.int32), (b, padded))
        segments = fa.SegmentIds(q=ids, kv=ids)
    return fa.flash_attention(
        qh, kh, vh, segment_ids=segments, sm_scale=d**-0.5, block_sizes=_tpu_block_sizes(padded)
    )


def _batch_spec(batch: int):
    """The context mesh and a batch PartitionSpec for a per-device kernel, or None (one device).

    A Pallas kernel is opaque to XLA's partitioner, which would gather a sharded batch onto every
    device; under a multi-device mesh (``jax.set_mesh``) the kernel runs per shard instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
        return None  # one device, or already inside a per-device (shard_map) body
    axes = tuple(mesh.axis_names) if batch % mesh.size == 0 else None
    return mesh, jax.sharding.PartitionSpec(axes)


def _pallas_tpu_attention(q, k, v):
    b, t, _, _ = q.shape
    padded = _round_up(t, TPU_BLOCK)
    qh, kh, vh = (
        jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))
        for x in (q, k, v)
    )
    kernel = functools.partial(_pallas_tpu_heads_major, t=t)
    sharded = _batch_spec(b)
    if sharded is not None:
        mesh, spec = sharded
        # check_vma=False: the kernel declares its outputs without mesh-axis types.
        kernel = jax.shard_map(
            kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
        )
    out = kernel(qh, kh, vh)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)


_PATHS: dict[str, Callable] = {
    "blocked": _blocked_attention,
    "cudnn": _cudnn_attention,
    "pallas_tpu": _pallas_tpu_attention,
    "xla": _xla_attention,
    "dense": _dense_attention,
}


# ----------------------------------------------------------------------------------------------
# The entry point


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    return_probs: bool = False,
    query_block: int | None = None,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention with scale 1/sqrt(head_dim).

    Args:
      q, k, v: (B, T, heads, head_dim).
      mask: optional boolean, broadcastable to (B, heads, T, T); True = attend.
      return_probs: also return the attention probabilities (B, heads, T, T), float32.
      query_block: query rows per slab of the CPU ``blocked`` path; default ``CPU_QUERY_BLOCK``,
        read at trace time.
      implementation: force a path (module docstring); default: chosen per platform.

    Returns:
      (B, T, heads, head_dim) [, probs].
    """
    if mask is not None or return_probs:
        _record(q, plan(q.shape[-1], q.dtype, needs_dense=True, implementation=implementation))
        return _dense_attention(q, k, v, mask, return_probs)
    paths = plan(q.shape[-1], q.dtype, implementation=implementation)
    _record(q, paths)
    block = CPU_QUERY_BLOCK if query_block is None else query_block
    # One callable per distinct path, so that platform_dependent merges identical branches.
    branch = {
        name: functools.partial(_blocked_attention, query_block=block)
        if name == "blocked"
        else _PATHS[name]
        for name in set(paths.values())
    }
    if len(branch) == 1:
        return next(iter(branch.values()))(q, k, v)
    per_platform = {p: branch[paths[p]] for p in PLATFORMS}
    return jax.lax.platform_dependent(q, k, v, default=branch[paths["default"]], **per_platform)
