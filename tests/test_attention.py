"""The attention core's paths (zsad_jax/encoders/attention.py): parity with a float64 reference on
CPU for every path that runs here (the Pallas TPU kernel in Pallas' TPU interpret mode), gradients,
and which path each platform gets (by ``plan`` and by what the lowered/exported code contains).

cuDNN cannot run or even be traced without a CUDA backend: its routing is tested through ``plan``
with ``cuda_available`` patched; ``bench/accelerator.py`` checks its numerics on a GPU.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from zsad_jax.encoders import attention
from zsad_jax.encoders.attention import dot_product_attention, plan, use_implementation

CPU_PATHS = ("blocked", "xla", "dense", "pallas_tpu")
FP32_BOUND = 1e-5
# bfloat16 inputs, probabilities rounded to bfloat16 before probs @ v on the xla/dense/blocked
# paths: measured <= 3.5e-3 at unit variance against float64 on the same bfloat16 inputs.
BF16_BOUND = 1e-2


def _reference(q, k, v):
    """float64 softmax attention, (B, T, heads, d)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _qkv(shape=(2, 150, 3, 64), dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


def _context(name: str):
    """The Pallas TPU kernel runs on CPU only in Pallas' TPU interpret mode."""
    return pltpu.force_tpu_interpret_mode() if name == "pallas_tpu" else contextlib.nullcontext()


def _run(name, q, k, v, query_block=64):
    with _context(name):
        fn = jax.jit(
            lambda q, k, v: dot_product_attention(
                q, k, v, implementation=name, query_block=query_block
            )
        )
        return np.asarray(fn(q, k, v), np.float32)


# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", CPU_PATHS)
@pytest.mark.parametrize("tokens", [150, 40])  # 150: padded blocks (CPU and TPU); 40: one block
def test_float32_paths_match_float64(name, tokens):
    q, k, v = _qkv((2, tokens, 3, 64))
    np.testing.assert_allclose(_run(name, q, k, v), _reference(q, k, v), atol=FP32_BOUND)


@pytest.mark.parametrize("name", CPU_PATHS)
def test_bfloat16_paths_within_stated_bound(name):
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out = _run(name, q, k, v)
    exact = _reference(*(np.asarray(x, np.float32) for x in (q, k, v)))
    assert np.abs(out - exact).max() <= BF16_BOUND


@pytest.mark.parametrize("name", ["blocked", "xla", "pallas_tpu"])
def test_gradients_match_dense(name):
    q, k, v = _qkv((1, 150, 2, 64))

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            jnp.sin(dot_product_attention(q, k, v, implementation=impl, query_block=64))
        )

    with _context(name):
        grads = jax.jit(jax.grad(loss(name), argnums=(0, 1, 2)))(q, k, v)
    dense = jax.jit(jax.grad(loss("dense"), argnums=(0, 1, 2)))(q, k, v)
    for g, d in zip(grads, dense, strict=True):
        np.testing.assert_allclose(g, d, atol=FP32_BOUND)


# The blocked path's own backward (custom_vjp: probabilities recomputed from the logsumexp) against
# jax.grad through the textbook softmax(q k^T * scale) v in float32 at HIGHEST precision.
# bfloat16 inputs: gradients rounded to bfloat16; measured <= 5.5e-3 of the largest reference
# gradient (autodiff through the blocked forward: 8.5e-3).
BF16_GRAD_BOUND = 1e-2


def _textbook_attention(q, k, v):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    with jax.default_matmul_precision("highest"):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _weighted_sum_grads(attend, q, k, v, seed=1):
    """Gradients of sum(w * attend(q, k, v)) for a random w (every output element matters)."""
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(w * attend(q, k, v).astype(jnp.float32))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _blocked(query_block):
    return lambda q, k, v: attention._blocked_attention(q, k, v, query_block)


@pytest.mark.parametrize(
    ("shape", "query_block"),
    [
        ((2, 1370, 3, 64), 256),  # ViT-L/14 at 518 px: 1370 tokens, 6 blocks of 229 rows
        ((3, 257, 5, 32), 100),  # 3 blocks of 86 rows, the last two padded
        ((1, 301, 4, 16), 37),  # 9 blocks, 5 padded rows
    ],
)
def test_blocked_backward_matches_textbook_gradients(shape, query_block):
    rng = np.random.default_rng(0)
    # q and k at 1.5x: logits of std 2.25, a peakier softmax than unit variance gives.
    q, k, v = (jnp.asarray(rng.standard_normal(shape) * s, jnp.float32) for s in (1.5, 1.5, 1))
    blocked = _weighted_sum_grads(_blocked(query_block), q, k, v)
    textbook = _weighted_sum_grads(_textbook_attention, q, k, v)
    for g, want in zip(blocked, textbook, strict=True):
        np.testing.assert_allclose(g, want, rtol=FP32_BOUND, atol=FP32_BOUND)


def test_blocked_backward_bfloat16_within_stated_bound():
    q, k, v = _qkv((2, 300, 3, 64), dtype=jnp.bfloat16)
    blocked = _weighted_sum_grads(_blocked(64), q, k, v)
    textbook = _weighted_sum_grads(_textbook_attention, q, k, v)
    for g, want in zip(blocked, textbook, strict=True):
        assert g.dtype == jnp.bfloat16
        error = np.abs(np.asarray(g, np.float32) - np.asarray(want)).max()
        assert error <= BF16_GRAD_BOUND * np.abs(np.asarray(want)).max()


def test_blocked_backward_with_an_attention_sink():
    """Key 0 takes nearly all of every row and its value is 30x the others: the softmax is
    saturated, dQ and dK are tiny (~1e-5) differences and dV is large (~100): each gradient within
    1e-5 of its largest element. FlashAttention's rowsum(dO * O) form of the backward misses dK
    here by 500x its largest element (measured); the row sum rowsum(P * dP) stays with autodiff."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 1370, 3, 64)) for _ in range(3))
    q += 2.0  # a direction shared by every query ...
    k[:, 0] = 2.0  # ... along which key 0 lies: its logits ~30 above the rest
    v[:, 0] *= 30.0
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    blocked = _weighted_sum_grads(_blocked(256), q, k, v)
    textbook = _weighted_sum_grads(_textbook_attention, q, k, v)
    for g, want in zip(blocked, textbook, strict=True):
        assert np.abs(g - want).max() <= FP32_BOUND * np.abs(want).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_forward_unchanged_under_differentiation(dtype):
    """The forward that saves the logsumexp gives the plain forward's output bit for bit, and the
    custom backward agrees with autodiff through the plain forward (the backward it replaces)."""
    q, k, v = _qkv((2, 150, 3, 64), dtype=dtype)
    plain = jax.jit(_blocked(64))(q, k, v)
    under_vjp = jax.jit(lambda q, k, v: jax.vjp(_blocked(64), q, k, v)[0])(q, k, v)
    np.testing.assert_array_equal(np.asarray(under_vjp), np.asarray(plain))
    if dtype == jnp.float32:
        custom = _weighted_sum_grads(_blocked(64), q, k, v)
        with _autodiff_blocked_backward():
            autodiff = _weighted_sum_grads(_blocked(64), q, k, v)
        for g, want in zip(custom, autodiff, strict=True):
            np.testing.assert_allclose(g, want, rtol=FP32_BOUND, atol=FP32_BOUND)


@contextlib.contextmanager
def _autodiff_blocked_backward():
    saved = attention._blocked_core
    attention._blocked_core = attention._blocked_forward
    try:
        yield
    finally:
        attention._blocked_core = saved


def _gradient_temp_bytes(t=1000, heads=2):
    q = jax.ShapeDtypeStruct((1, t, heads, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(jnp.sin(_blocked(128)(q, k, v)))  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blocked_backward_keeps_no_probability_tensor():
    """What the gradient needs beyond its inputs stays below one (heads, B, T, T) float32 tensor
    (autodiff through the loop keeps two of them)."""
    probs_bytes = 2 * 1000 * 1000 * 4
    assert _gradient_temp_bytes() < probs_bytes / 2
    with _autodiff_blocked_backward():
        assert _gradient_temp_bytes() > 2 * probs_bytes


def test_mask_and_probabilities_take_the_dense_path():
    q, k, v = _qkv((1, 20, 2, 8))
    causal = jnp.tril(jnp.ones((20, 20), bool))
    out, probs = dot_product_attention(q, k, v, mask=causal, return_probs=True)
    assert probs.shape == (1, 2, 20, 20) and probs.dtype == jnp.float32
    np.testing.assert_allclose(np.triu(np.asarray(probs), 1), 0.0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)
    unmasked = dot_product_attention(q, k, v, return_probs=True)[0]
    np.testing.assert_allclose(unmasked, _reference(q, k, v), atol=FP32_BOUND)


def test_encoders_give_the_same_output_on_every_path(monkeypatch):
    """The encoders' call sites pass through the chosen path (CLIP tiny, 16 px -> 17 tokens, in
    8-row query blocks on the blocked path)."""
    from zsad_jax.encoders.clip import ClipVision
    from zsad_jax.encoders.presets import clip_tiny

    monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", 8)

    vision = ClipVision(clip_tiny().vision, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    graphdef, state = nnx.split(vision)
    outputs = {}
    for name in ("dense", "xla", "blocked"):
        with use_implementation(name):  # read while tracing: a fresh jit per path
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
            outputs[name] = np.asarray(fn(state, images))
    for name in ("xla", "blocked"):
        np.testing.assert_allclose(outputs[name], outputs["dense"], atol=1e-5)
    _check_dinov3_paths()


def _check_dinov3_paths():
    from zsad_jax.encoders.dinov3 import DinoV3
    from zsad_jax.encoders.presets import dinov3_tiny

    model = DinoV3(dinov3_tiny(), rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(2), (1, 48, 48, 3))  # 5 prefix + 9 patches
    graphdef, state = nnx.split(model)
    outputs = {}
    for name in ("dense", "xla", "blocked"):
        with use_implementation(name):
            fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
            outputs[name] = np.asarray(fn(state, images))
    for name in ("xla", "blocked"):
        np.testing.assert_allclose(outputs[name], outputs["dense"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Routing


def test_plan_per_platform(monkeypatch):
    cpu_only = plan(64, jnp.float32)
    assert cpu_only["cpu"] == "blocked" and cpu_only["default"] == "xla"
    assert cpu_only["cuda"] == "xla"  # no CUDA backend here: cuDNN cannot even be traced
    assert cpu_only["tpu"] == "xla"  # no TPU backend here: see test_lowering_...
    monkeypatch.setattr(attention, "cuda_available", lambda: True)
    assert plan(64, jnp.bfloat16)["cuda"] == "cudnn"
    assert plan(64, jnp.float16)["cuda"] == "cudnn"
    assert plan(64, jnp.float32)["cuda"] == "xla"  # cuDNN flash attention is half precision only
    assert plan(12, jnp.bfloat16)["cuda"] == "xla"  # head_dim not a multiple of 8
    assert plan(256, jnp.bfloat16)["cuda"] == "xla"  # beyond 128 on pre-Hopper GPUs
    assert set(plan(64, jnp.bfloat16, needs_dense=True).values()) == {"dense"}
    monkeypatch.setattr(attention, "tpu_available", lambda: True)
    assert plan(64, jnp.float32)["tpu"] == "pallas_tpu"
    monkeypatch.setattr(attention, "pallas_tpu_available", lambda: False)
    assert plan(64, jnp.float32)["tpu"] == "xla"


def test_use_implementation_forces_and_restores():
    with use_implementation("xla"):
        assert set(plan(64, jnp.float32).values()) == {"xla"}
        assert set(plan(64, jnp.float32, implementation="dense").values()) == {"dense"}
    assert plan(64, jnp.float32)["cpu"] == "blocked"
    with pytest.raises(ValueError, match="use one of"):
        with use_implementation("flash"):
            pass
    with pytest.raises(ValueError, match="use one of"):
        dot_product_attention(*_qkv((1, 4, 1, 8)), implementation="flash")


def _lowered_text(platforms, tokens=300):
    q = jax.ShapeDtypeStruct((1, tokens, 2, 64), jnp.float32)
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v))
    return jax.export.export(fn, platforms=platforms)(q, q, q).mlir_module()


def test_lowering_picks_the_platforms_path(monkeypatch):
    """platform_dependent resolves at lowering: CPU code holds the blocked loop, CUDA code (no
    cuDNN here) XLA's attention, TPU code XLA's too without a TPU backend (so that one module for
    CPU and TPU lowers) and the Pallas kernel with one (lowered to Mosaic on this CPU machine)."""
    cpu = _lowered_text(["cpu"])
    assert "stablehlo.while" in cpu and "custom_call" not in cpu
    cuda = _lowered_text(["cuda"])
    assert "custom_call" not in cuda and "stablehlo.while" not in cuda
    both = _lowered_text(["cpu", "tpu"])
    assert "stablehlo.while" in both and "custom_call" not in both
    if attention.pallas_tpu_available():
        monkeypatch.setattr(attention, "tpu_available", lambda: True)
        tpu = _lowered_text(["tpu"])
        assert "tpu_custom_call" in tpu and "stablehlo.while" not in tpu


def test_pallas_kernel_runs_per_batch_shard_under_a_mesh(monkeypatch):
    """Under a multi-device mesh the TPU kernel is wrapped in shard_map over the batch. The
    kernel is swapped for a NumPy-checked stand-in: TPU interpret mode does not run on 8 fake
    CPU devices (it stalls), and the wrapper, not the kernel, is under test here."""

    def stand_in(qh, kh, vh, t):
        out = _dense_attention_heads_major(qh[:, :, :t], kh[:, :, :t], vh[:, :, :t])
        return jnp.pad(out, ((0, 0), (0, 0), (0, qh.shape[2] - t), (0, 0)))

    monkeypatch.setattr(attention, "_pallas_tpu_heads_major", stand_in)
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs the 8 fake CPU devices of conftest.py")
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v = _qkv((8, 150, 2, 64))
    fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="pallas_tpu"))
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        out = fn(q, k, v)
    np.testing.assert_allclose(out, _reference(q, k, v), atol=FP32_BOUND)
    # One device: no wrapper.
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))


def _dense_attention_heads_major(qh, kh, vh):
    out = attention._dense_attention(*(x.transpose(0, 2, 1, 3) for x in (qh, kh, vh)))
    return out.transpose(0, 2, 1, 3)
