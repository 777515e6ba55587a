"""The Flax CLIP towers against direct torch computations (transformers' modules, F.interpolate).

Covers what the conversion parity test does not: position-embedding resize modes at a new grid,
attention maps, AF-CLIP's context-before-SOS and AnomalyCLIP-style deep text prompts, the CPU
blocked attention core, bfloat16 compute, configs, load-time overrides and input errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import optional
from flax import nnx

from zsad_jax.encoders import checkpoint
from zsad_jax.encoders.attention import dot_product_attention
from zsad_jax.encoders.clip import (
    Clip,
    ClipConfig,
    ClipTextConfig,
    ClipVisionConfig,
    resize_grid,
)
from zsad_jax.encoders.presets import clip_tiny, clip_vit_l14_336

# None without the convert extra; the tests that use them are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")
transformers = optional("transformers")
convert_clip = optional("convert.clip")
hf_clip = optional("official.hf_clip")

TOL = 1e-5
VOCAB = 64
SMALL = dict(
    projection_dim=32,
    vision_config=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        patch_size=4,
        image_size=24,
        projection_dim=32,
    ),
    text_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=20,
        vocab_size=VOCAB,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=0,
        projection_dim=32,
    ),
)


@pytest.fixture(scope="module")
def pair():
    """(transformers CLIPModel with random O(1)-activation weights, our converted Clip)."""
    config = transformers.CLIPConfig(**SMALL)
    hf = transformers.CLIPModel._from_config(config, attn_implementation="eager")
    hf = hf_clip.randomise(hf, seed=0)
    state = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    config, arrays, _ = convert_clip.convert_state(state, source="test")
    abstract = nnx.eval_shape(lambda: Clip(config, rngs=nnx.Rngs(0)))
    return hf, checkpoint.load_flat_state(abstract, arrays, source="test")


def _with_overrides(model: Clip, **overrides) -> Clip:
    """The same weights in a model built with ``overrides`` (act, pos_resize, dtype)."""
    config = model.config.with_overrides(**overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Clip(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def _ids(batch=2, length=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    for b, n in enumerate(rng.integers(3, 8, batch)):
        ids[b, 0] = VOCAB - 2
        ids[b, 1:n] = rng.integers(1, VOCAB - 2, n - 1)
        ids[b, n] = VOCAB - 1
    return ids


def _images(h, w, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Position-embedding resizing


@pytest.mark.torch
@pytest.mark.parametrize(
    "mode,torch_kwargs",
    [
        ("bilinear", dict(mode="bilinear", align_corners=False)),
        ("bicubic_antialias", dict(mode="bicubic", align_corners=False, antialias=True)),
    ],
)
@pytest.mark.parametrize("out_hw", [(37, 37), (16, 20), (24, 31)])
def test_resize_grid_matches_torch_interpolate(mode, torch_kwargs, out_hw):
    grid = np.random.default_rng(1).standard_normal((24, 24, 6)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=out_hw, **torch_kwargs)
    ours = resize_grid(jnp.asarray(grid), out_hw, mode)
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize(
    "mode,torch_kwargs",
    [
        ("bilinear", dict(mode="bilinear", align_corners=False)),
        ("bicubic_antialias", dict(mode="bicubic", align_corners=False, antialias=True)),
    ],
)
def test_embed_at_new_size_matches_torch(pair, mode, torch_kwargs):
    """Patch conv + CLS + resized positions (F.interpolate) + pre-LN at 40x28 (trained 24x24)."""
    hf, ours = pair
    ours = _with_overrides(ours, pos_resize=mode)
    images = _images(40, 28)
    emb = hf.vision_model.embeddings
    with torch.no_grad():
        x = emb.patch_embedding(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        x = x.flatten(2).transpose(1, 2)
        pos = emb.position_embedding.weight
        grid = pos[1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(10, 7), **torch_kwargs)[0].permute(1, 2, 0).reshape(70, -1)
        cls = emb.class_embedding.expand(2, 1, -1)
        x = torch.cat([cls, x], 1) + torch.cat([pos[:1], grid])
        ref = hf.vision_model.pre_layrnorm(x).numpy()
    np.testing.assert_allclose(ours.vision.embed(images), ref, atol=TOL, rtol=0)


@pytest.mark.torch
def test_load_overrides_set_act_resize_and_dtype(pair, tmp_path):
    _, ours = pair
    meta_config = ours.config.to_dict()
    checkpoint.save(tmp_path / "c", "clip", meta_config, checkpoint.flat_state(ours), source="t")
    loaded = checkpoint.load(tmp_path / "c", act="gelu", pos_resize="bicubic_antialias")
    assert loaded.vision.config.act == loaded.text.config.act == "gelu"
    assert loaded.vision.config.pos_resize == "bicubic_antialias"
    assert loaded.vision.blocks[0].mlp.act == "gelu"
    with pytest.raises(ValueError, match="width"):
        checkpoint.load(tmp_path / "c", width=8)


# ------------------------------------------------------------------------------------------------
# Vision tower outputs


@pytest.mark.torch
def test_vision_layers_and_attention_map_match_transformers(pair):
    hf, ours = pair
    images = _images(24, 24)
    with torch.no_grad():
        out = hf.vision_model(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            output_hidden_states=True,
            output_attentions=True,
        )
    emb, aux = ours.vision(images, layers=(1, 3), attn_layer=2)
    assert sorted(aux["layers"]) == [1, 3]
    for i in (1, 3):
        np.testing.assert_allclose(aux["layers"][i], out.hidden_states[i], atol=TOL, rtol=0)
    assert aux["attn"].shape == (2, 2, 37, 37)
    np.testing.assert_allclose(aux["attn"], out.attentions[1], atol=1e-6, rtol=0)
    head = ours.vision.head(aux["layers"][3])
    np.testing.assert_allclose(head[:, 0], emb, atol=1e-6)


@pytest.mark.torch
def test_vision_runs_under_jit_on_split_state(pair):
    _, ours = pair
    graphdef, state = nnx.split(ours.vision)

    @jax.jit
    def forward(state, images):
        emb, aux = nnx.merge(graphdef, state)(images, layers=(2,))
        return emb, aux["layers"][2]

    images = _images(32, 36)
    emb, tokens = forward(state, images)
    eager_emb, eager_aux = ours.vision(images, layers=(2,))
    assert tokens.shape == (2, 1 + 8 * 9, 128)
    np.testing.assert_allclose(emb, eager_emb, atol=1e-6)
    np.testing.assert_allclose(tokens, eager_aux["layers"][2], atol=1e-6)


@pytest.mark.torch
def test_bfloat16_compute_stays_close_to_float32(pair):
    _, ours = pair
    bf16 = _with_overrides(ours, dtype="bfloat16")
    images, ids = _images(24, 24), _ids()

    @nnx.jit
    def run(model, images, ids):
        image, aux = model.vision(images, layers=(3,))
        return image, aux["layers"][3], model.text(ids)[0]

    ref_image, _, ref_text = run(ours, images, ids)
    image, tokens, text = run(bf16, images, ids)
    assert image.dtype == text.dtype == tokens.dtype == jnp.float32
    assert bf16.vision.blocks[0].attn.in_proj.kernel[...].dtype == jnp.float32
    assert bf16.vision.blocks[0].attn.in_proj.dtype == jnp.bfloat16
    for got, ref in ((image, ref_image), (text, ref_text)):
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert 0 < err < 3e-2


# ------------------------------------------------------------------------------------------------
# Text tower: plain, context before SOS (AF-CLIP), deep prompts (AnomalyCLIP compound prompts)


def _torch_text(hf, ids, context=None, deep_prompts=()):
    """The text tower written out with transformers' modules, prompts inserted as the papers do."""
    tm = hf.text_model
    ids = torch.from_numpy(ids)
    batch, length = ids.shape
    x = tm.embeddings.token_embedding(ids)
    eot = ids.argmax(-1)
    if context is not None:
        context = torch.from_numpy(np.asarray(context)).expand(batch, -1, -1)
        x = torch.cat([context, x], 1)[:, :length]
        eot = eot + context.shape[1]
    x = x + tm.embeddings.position_embedding.weight[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(tm.encoder.layers):
        if 1 <= i <= len(deep_prompts):
            prompt = torch.from_numpy(np.asarray(deep_prompts[i - 1])).expand(batch, -1, -1)
            x = torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1] :]], 1)
        x = layer(x, mask)
    x = tm.final_layer_norm(x)
    return hf.text_projection(x[torch.arange(batch), eot]).detach().numpy()


@pytest.mark.torch
def test_torch_text_reference_is_transformers(pair):
    hf, _ = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    np.testing.assert_allclose(_torch_text(hf, ids), ref, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("batched", [False, True])
def test_context_before_sos_matches_torch(pair, batched):
    hf, ours = pair
    ids = _ids(seed=2)
    rng = np.random.default_rng(3)
    shape = (2, 5, 64) if batched else (5, 64)
    context = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    with torch.no_grad():
        ref = _torch_text(hf, ids, context=context)
    ours_emb, _ = ours.text(ids, context=context)
    np.testing.assert_allclose(ours_emb, ref, atol=TOL, rtol=0)
    plain, _ = ours.text(ids)
    assert np.abs(plain - ours_emb).max() > 1e-3  # the context really changes the output


@pytest.mark.torch
@pytest.mark.parametrize("batched", [False, True])
def test_deep_prompts_match_torch(pair, batched):
    hf, ours = pair
    ids = _ids(seed=4)
    rng = np.random.default_rng(5)
    shape = (2, 3, 64) if batched else (3, 64)
    deep = [(0.3 * rng.standard_normal(shape)).astype(np.float32) for _ in range(2)]
    with torch.no_grad():
        ref = _torch_text(hf, ids, deep_prompts=deep)
    ours_emb, aux = ours.text(ids, deep_prompts=deep, layers=(3,))
    np.testing.assert_allclose(ours_emb, ref, atol=TOL, rtol=0)
    assert aux["layers"][3].shape == (2, 20, 64)
    # Only the first deep prompt: block 3 runs on what block 2 made of it.
    with torch.no_grad():
        ref_one = _torch_text(hf, ids, deep_prompts=deep[:1])
    np.testing.assert_allclose(ours.text(ids, deep_prompts=deep[:1])[0], ref_one, atol=TOL)
    with pytest.raises(ValueError, match="at most 2"):
        ours.text(ids, deep_prompts=deep * 2)


@pytest.mark.torch
def test_text_loop_pieces_reproduce_call(pair):
    """embed -> blocks (causal mask) -> pool_and_project, as ACD-CLIP runs it."""
    from zsad_jax.encoders.clip import causal_mask

    _, ours = pair
    ids = _ids(seed=6)
    x, eot = ours.text.embed(ids)
    for block in ours.text.blocks:
        x = block(x, mask=causal_mask(x.shape[1]))
    np.testing.assert_allclose(ours.text.pool_and_project(x, eot), ours.text(ids)[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Attention core


def _numpy_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("query_block", [16, 50])
def test_blocked_attention_matches_numpy_and_dense_gradients(query_block):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 50, 3, 8)).astype(np.float32) for _ in range(3))
    blocked = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, query_block=query_block))
    np.testing.assert_allclose(blocked(q, k, v), _numpy_attention(q, k, v), atol=1e-6)

    def loss(qb):
        return lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, query_block=qb)))

    grads = jax.jit(jax.grad(loss(query_block), argnums=(0, 1, 2)))(q, k, v)
    dense = jax.jit(jax.grad(loss(1000), argnums=(0, 1, 2)))(q, k, v)
    for g, d in zip(grads, dense, strict=True):
        np.testing.assert_allclose(g, d, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Configs and errors


def test_config_round_trip_presets_and_errors():
    config = clip_vit_l14_336()
    assert ClipConfig.from_dict(config.to_dict()) == config
    v, t = config.vision, config.text
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size, v.output_dim) == (
        1024,
        24,
        16,
        14,
        336,
        768,
    )
    assert (t.width, t.layers, t.heads, t.context_length, t.vocab_size, t.output_dim) == (
        768,
        12,
        12,
        77,
        49408,
        768,
    )
    assert v.act == t.act == "quick_gelu" and v.pos_resize == "bilinear"
    tiny = clip_tiny(act="gelu", dtype="bfloat16")
    assert tiny.vision.act == tiny.text.act == "gelu" and tiny.text.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"ClipVisionConfig\.act='relu'"):
        ClipVisionConfig(act="relu")
    with pytest.raises(ValueError, match=r"ClipVisionConfig\.pos_resize"):
        ClipVisionConfig(pos_resize="nearest")
    with pytest.raises(ValueError, match="unknown field.*'depth'"):
        ClipTextConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="allowed"):
        config.with_overrides(layers=12)


@pytest.mark.torch
def test_bad_inputs_say_what_to_do(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        ours.vision(_images(24, 26))
    with pytest.raises(ValueError, match="NHWC"):
        ours.vision(_images(24, 24).transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"layers \[4\] out of range.*1\.\.3"):
        ours.vision(_images(24, 24), layers=(4,))
    with pytest.raises(ValueError, match="T <= 20"):
        ours.text(np.zeros((1, 21), np.int32))
    with pytest.raises(ValueError, match="context must be"):
        ours.text(_ids(), context=np.zeros((3, 5, 64), np.float32))


def _saved_shapes(f, *args) -> list[str]:
    """The shapes of what ``jax.vjp(f)`` keeps for the backward pass, e.g. ``"f32[2,24,128]"``
    (jax's public ``print_saved_residuals``, one residual per line)."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_block_backward_keeps_only_the_inputs_of_layernorm_and_activation(act, monkeypatch):
    """Through a frozen block, LayerNorm and the activation keep their input only (one (B, T, D)
    array per LayerNorm, one (B, T, 4D) for the MLP; autodiff kept three of each) and the
    gradient is plain autodiff's to float32 rounding (the same operations; XLA may fuse the
    recomputed ones differently)."""
    from zsad_jax.encoders import clip as clip_lib

    b, t, d, hidden = 2, 24, 32, 128
    block = clip_lib.ResidualAttentionBlock(
        d, 2, hidden, act, 1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (b, t, d))

    def loss(x):
        return jnp.sum(jnp.sin(block(x)))

    mlp, stream = f"f32[{b},{t},{hidden}]", f"f32[{b},{t},{d}]"
    saved = _saved_shapes(loss, x)
    assert saved.count(mlp) == 1
    assert saved.count(stream) <= 3  # the two LayerNorm inputs and sin's
    new = jax.jit(jax.grad(loss))(x)
    monkeypatch.setattr(clip_lib, "_recomputed_in_backward", lambda fn: fn)
    monkeypatch.setattr(clip_lib, "_keeping_input_only", lambda module, x: module(x))
    old = _saved_shapes(loss, x)
    assert old.count(mlp) >= 2 and old.count(stream) >= 6  # what plain autodiff keeps
    reference = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.abs(np.asarray(new) - reference).max() <= TOL * np.abs(reference).max()
