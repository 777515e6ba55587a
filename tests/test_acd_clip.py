"""ACD-CLIP (zsad_jax/methods/acd_clip.py and acd_heads.py), tiny CLIPs.

Proofs: shapes and ranges under jit; only the Trainable state is differentiated and each of its
leaves gets a gradient; the full-size trainable count is the official 13,283,360; gates sum to 1
over groups; norm matching gives adapted tokens the norm of their inputs; the init quirks (LoRA A
with torch's fan_in = rank); every N in {2, 3, 4, 6} builds, picks the official levels and runs; the
whole forward (adapters written back into both towers, blends, heads, gate, fusion, kornia blur,
align_corners upsampling, scores) and the loss with its gradient equal a PyTorch transcription of
the official code written here (cockmake/ACD-CLIP @2026067, read, not copied); the optimiser
config gives the official lr groups and per-module clipping; the text tower runs (counted at run
time) zero times per inference batch after ``set_classes``, once per call for all classes when the
text adapters changed since (never stale), and once per distinct class per training step, with the
loss and gradients of encoding every image's class separately.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from extras import optional
from flax import nnx

from configs.acd_clip import get_config
from zsad_jax import methods
from zsad_jax import optim as optim_lib
from zsad_jax.encoders import clip as clip_lib
from zsad_jax.encoders import presets
from zsad_jax.methods import backbone as backbone_lib
from zsad_jax.methods.acd_clip import AcdClip
from zsad_jax.methods.acd_heads import AdaptiveBlend, norm_match
from zsad_jax.nn import Trainable
from zsad_jax.prompts import acd_clip_sentences

# None without the convert extra; the tests that use them are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")
torch_ref = optional("official.acd_clip")  # the PyTorch transcription of the official code

B, SIZE, GRID = 2, 32, 8  # tiny: patch 4 -> 8 x 8 grid
# Short descriptive names keep the byte-tokenised prompts under the 77-token context, so the
# class table is cut at the longest EOT (40 < 77) and the reference runs the full 77 tokens.
CLASSES = ("screw", "candle", "foo_bar")


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def setup():
    config = get_config("tiny")
    model = methods.build(config, rngs=nnx.Rngs(0))
    model.set_classes(CLASSES)
    # Larger blend weights than the 0.2 init, so the adapters matter in the checks.
    for blend in list(model.image_blend) + list(model.text_blend):
        blend.weight[...] = jnp.linspace(0.1, 0.9, blend.weight.shape[0])
    graphdef, params, rest, forward, loss_and_grad = toys.jitted_method(model)

    @jax.jit
    def embed(params, rest, images):
        return nnx.merge(graphdef, params, rest).backbone.vision.embed(images)

    rng = np.random.default_rng(0)
    batch = toys.cell_batch(rng, B, SIZE, cell=SIZE // GRID, normal=1, class_id=[0, 2])
    return dict(
        model=model,
        params=params,
        rest=rest,
        forward=forward,
        loss_and_grad=loss_and_grad,
        embed=embed,
        batch=batch,
    )


# ---------------------------------------------------------------------------------------------


def test_outputs_shapes_ranges_and_gates(setup):
    out = setup["forward"](setup["params"], setup["rest"], setup["batch"])
    model = setup["model"]
    n = model.n_groups
    assert out["anomaly_map"].shape == (B, SIZE, SIZE)
    assert out["pred_score"].shape == (B,)
    assert out["image_logits"].shape == (B, 2)
    assert out["group_logits"].shape == (n, B, GRID * GRID, 2)
    assert out["gate_weights"].shape == (n, B, n, 2)
    for key in ("anomaly_map", "pred_score", "image_prob"):
        v = np.asarray(out[key])
        assert np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0, key
    assert float(np.std(out["anomaly_map"])) > 0.0
    gates = np.asarray(out["gate_weights"])
    assert (gates > 0).all()
    np.testing.assert_allclose(gates.sum(axis=2), 1.0, atol=1e-6)  # over groups, per state
    # The class table is cut after the longest EOT (rounded up to 8), below the 77-token context.
    tokenizer = backbone_lib.byte_tokenizer()
    full = np.stack([tokenizer(sum(acd_clip_sentences(c), []), 77) for c in CLASSES])
    longest = int(full.argmax(-1).max()) + 1
    assert model.class_prompt_ids.shape == (len(CLASSES), 16, -(-longest // 8) * 8)
    assert model.class_prompt_ids.shape[-1] < 77
    np.testing.assert_array_equal(model.class_prompt_ids[...], full[..., : -(-longest // 8) * 8])


@pytest.mark.slow
def test_only_trainable_state_gets_gradients(setup):
    model, batch = setup["model"], setup["batch"]
    assert not nnx.state(model.backbone, Trainable)  # the backbone is never retyped
    assert jax.tree.leaves(nnx.state(model.backbone, nnx.Param))
    (_, (parts, _)), grads = setup["loss_and_grad"](setup["params"], setup["rest"], batch)
    grads = _flat(grads)
    assert set(grads) == set(_flat(setup["params"]))
    assert not any(p.startswith("backbone") for p in grads)
    prefixes = {p.split(".")[0] for p in grads}
    assert prefixes == {
        "image_lora",
        "image_blend",
        "seg_proj",
        "seg_norm",
        "det_proj",
        "det_norm",
        "fusion_gate",
        "text_lora",
        "text_blend",
        "text_norm",
    }
    for path, g in grads.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0.0, f"no gradient for {path}"
    assert all(np.isfinite(float(v)) for v in parts.values())


def test_full_size_trainable_count_is_official():
    config = get_config()
    model = nnx.eval_shape(lambda: methods.build(config, rngs=nnx.Rngs(0), load_weights=False))
    counts: dict[str, int] = {}
    for p, v in nnx.to_flat_state(nnx.state(model, Trainable)):
        counts[str(p[0])] = counts.get(str(p[0]), 0) + math.prod(v.shape)
    per_group = {
        "image_lora": 2_171_392,
        "seg_proj": 459_776,
        "det_proj": 459_776,
        "seg_norm": 1_536,
        "det_norm": 1_536,
        "fusion_gate": 198_920,
        "image_blend": 1_024,
        "text_lora": 24_576,
        "text_blend": 768,
        "text_norm": 1_536,
    }
    assert counts == {k: 4 * v for k, v in per_group.items()}
    assert sum(counts.values()) == 13_283_360
    assert model.image_levels == (6, 12, 18, 24) and model.text_levels == (3, 6, 9, 12)


def test_norm_matching_and_init_quirks(setup):
    model = setup["model"]  # its adapters still hold their initial values
    adapter = model.image_lora[0]
    width = model.backbone.vision.config.width
    rank, conv_rank = 4, 2  # the tiny config's
    tokens = jax.random.normal(jax.random.key(0), (2, GRID * GRID, width)) * 3.0
    graphdef, state = nnx.split(adapter)

    @jax.jit
    def adapt(state, tokens):
        adapted = nnx.merge(graphdef, state)(tokens, (GRID, GRID))
        return adapted, norm_match(adapted, tokens)

    adapted, matched = adapt(state, tokens)
    np.testing.assert_allclose(
        np.linalg.norm(matched, axis=-1), np.linalg.norm(tokens, axis=-1), rtol=1e-5
    )
    assert not np.allclose(np.linalg.norm(adapted, axis=-1), np.linalg.norm(tokens, axis=-1))
    # Same direction as the adapter output.
    cos = np.sum(np.asarray(matched) * np.asarray(adapted), -1) / (
        np.linalg.norm(matched, axis=-1) * np.linalg.norm(adapted, axis=-1)
    )
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)

    # torch kaiming_uniform_ on a raw (c_in, r) Parameter: fan_in = r -> U(+-sqrt(6/r)), far
    # wider than the sqrt(6/c_in) a (r, c_in) nn.Linear weight would get.
    blocks = [b for a in model.image_lora for b in a.blocks]
    lora_a = np.concatenate(
        [np.ravel(t.lora_a[...]) for t in model.text_lora]
        + [np.ravel(b.lora_a[...]) for b in blocks]
    )
    bound = math.sqrt(6 / rank)
    assert np.abs(lora_a).max() <= bound and np.abs(lora_a).max() > 0.95 * bound
    assert 0.95 * bound > math.sqrt(6 / 32)  # the smaller c_in (text width 32)
    assert abs(lora_a.std() - bound / math.sqrt(3)) < 0.05 * bound
    lora_b = np.concatenate(
        [np.ravel(t.lora_b[...]) for t in model.text_lora]
        + [np.ravel(b.lora_b[...]) for b in blocks]
    )
    assert abs(lora_b.std() - 0.02) < 0.002 and abs(lora_b.mean()) < 0.002
    for blk, k in zip(adapter.blocks, (3, 5), strict=True):
        for conv, c_in in ((blk.conv_a, rank), (blk.conv_b, conv_rank)):
            w = np.asarray(conv.kernel[...])
            assert w.shape[:3] == (k, k, c_in)
            assert 0.8 * math.sqrt(6 / (c_in * k * k)) < np.abs(w).max()
            assert np.abs(w).max() <= math.sqrt(6 / (c_in * k * k))
    fusion = np.asarray(adapter.fusion_conv.kernel[...])  # torch default: U(+-1/sqrt(fan_in))
    assert fusion.shape == (2 * width, width) and np.abs(fusion).max() <= 1 / math.sqrt(2 * width)
    assert np.abs(fusion).max() > 0.95 / math.sqrt(2 * width)


def test_blend_init_from_config(setup):
    """Blend weights start at ``model.*_blend_init`` (official training value 0.2)."""
    del setup  # built after the fixture's model: same shapes, warm caches
    assert get_config().model.image_blend_init == get_config().model.text_blend_init == 0.2
    config = get_config("tiny")
    config.model.image_blend_init, config.model.text_blend_init = 0.25, 0.125
    model = methods.build(config, rngs=nnx.Rngs(0))
    for blend in model.image_blend:
        np.testing.assert_array_equal(np.asarray(blend.weight[...]), np.full((48,), 0.25))
    for blend in model.text_blend:
        np.testing.assert_array_equal(np.asarray(blend.weight[...]), np.full((32,), 0.125))
    blend = AdaptiveBlend(8, 0.25)
    x, a = jnp.ones((2, 8)), jnp.full((2, 8), 3.0)
    np.testing.assert_allclose(blend(x, a), 0.75 * 1.0 + 0.25 * 3.0)


@pytest.mark.torch
def test_forward_matches_official_torch(setup):
    model, batch = setup["model"], setup["batch"]
    out = setup["forward"](setup["params"], setup["rest"], batch)
    embedded = _t(setup["embed"](setup["params"], setup["rest"], batch["image"]))
    with torch.no_grad():
        _, ref = torch_ref.torch_reference(model, embedded, [0, 2], size=SIZE, test_mode=True)
    text = np.asarray(model.encode_class_text(batch["class_id"]))
    assert np.abs(text - ref["text"].numpy()).max() <= 1e-4
    np.testing.assert_allclose(out["image_logits"], ref["cls_logits"].numpy(), atol=1e-4)
    amap = ref["seg_pred"].numpy()
    assert np.abs(np.asarray(out["anomaly_map"]) - amap).max() <= 1e-4
    p_img = torch.softmax(ref["cls_logits"], dim=1)[:, 1].numpy()
    score = 0.9 * p_img + 0.1 * amap.reshape(B, -1).max(1)  # utils.metrics_eval_gpu, industrial
    np.testing.assert_allclose(out["pred_score"], score, atol=1e-4)


@pytest.mark.torch
@pytest.mark.slow
def test_loss_and_gradient_match_official_torch(setup):
    model, batch = setup["model"], setup["batch"]
    (loss, (_, out)), grads = setup["loss_and_grad"](setup["params"], setup["rest"], batch)
    embedded = _t(setup["embed"](setup["params"], setup["rest"], batch["image"]))
    ref, r = torch_ref.torch_reference(model, embedded, [0, 2], size=SIZE, test_mode=False)
    np.testing.assert_allclose(
        np.asarray(out["map_probs"]), r["seg_pred"].permute(0, 2, 3, 1).detach().numpy(), atol=1e-4
    )
    labels = torch.from_numpy(np.array(batch["gt_label"])).long()
    ref_loss = torch_ref.torch_official_loss(
        r["cls_logits"], r["seg_pred"], labels, _t(batch["gt_mask"])
    )
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)

    g = _flat(grads)
    pairs = {}  # our path -> (torch grad in our layout)
    for k in range(model.n_groups):
        pairs[f"image_blend.{k}.weight"] = ref.m_i_w[k].grad.reshape(-1)
        pairs[f"text_blend.{k}.weight"] = ref.m_t_w[k].grad.reshape(-1)
        pairs[f"text_lora.{k}.lora_a"] = ref.text_A[k].grad
        pairs[f"text_lora.{k}.lora_b"] = ref.text_B[k].grad
        pairs[f"image_lora.{k}.fusion_conv.kernel"] = (
            ref.lora[k].fusion_conv.weight.grad[:, :, 0, 0].T
        )
        for j, blk in enumerate(ref.lora[k].blocks):
            pre = f"image_lora.{k}.blocks.{j}"
            pairs[f"{pre}.lora_a"], pairs[f"{pre}.lora_b"] = blk.lora_A.grad, blk.lora_B.grad
            pairs[f"{pre}.conv_a.kernel"] = blk.conv_lora_A.weight.grad.permute(2, 3, 1, 0)
            pairs[f"{pre}.conv_b.kernel"] = blk.conv_lora_B.weight.grad.permute(2, 3, 1, 0)
        for name, mods in (("seg_proj", ref.seg_proj), ("det_proj", ref.det_proj)):
            for fc, idx in (("fc1", 0), ("fc2", 2)):
                pairs[f"{name}.{k}.{fc}.kernel"] = mods[k][idx].weight.grad.T
                pairs[f"{name}.{k}.{fc}.bias"] = mods[k][idx].bias.grad
        for fc, idx in (("fc1", 0), ("fc2", 2)):
            pairs[f"fusion_gate.{k}.{fc}.kernel"] = ref.gate[k][idx].weight.grad.T
            pairs[f"fusion_gate.{k}.{fc}.bias"] = ref.gate[k][idx].bias.grad
        for name, mods in (
            ("seg_norm", ref.seg_ln),
            ("det_norm", ref.det_ln),
            ("text_norm", ref.text_ln),
        ):  # noqa: E501
            pairs[f"{name}.{k}.scale"] = mods[k].weight.grad
            pairs[f"{name}.{k}.bias"] = mods[k].bias.grad
    assert set(pairs) == set(g)
    for name, want in pairs.items():
        want = want.detach().numpy()
        scale = max(float(np.abs(want).max()), 1e-8)
        assert np.abs(g[name] - want).max() <= 1e-4 * scale, name


def test_remat_wraps_the_frozen_blocks(setup):
    """``model.remat`` runs each block under ``jax.checkpoint`` (same values by construction)."""
    model, batch = setup["model"], setup["batch"]
    graphdef, params, rest = nnx.split(model, Trainable, ...)

    def loss(p, remat):
        m = nnx.merge(graphdef, p, rest)
        m.remat = remat
        return m.loss(m(batch, train=True), batch)[0]

    with_remat = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, True)))(params))
    without = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, False)))(params))
    # Blocks before the first adapter need no backward pass, so they leave no trace in the grad.
    differentiated = sum(
        levels[-1] - levels[0] for levels in (model.image_levels, model.text_levels)
    )
    assert differentiated > 0
    assert len(re.findall(r"= (?:remat\d*|checkpoint)\[", with_remat)) >= differentiated
    assert not re.findall(r"= (?:remat\d*|checkpoint)\[", without)


def test_optimizer_config_matches_official_groups(setup):
    config = get_config("tiny")
    paths = sorted(_flat(setup["params"]))
    opt = optim_lib.build_optimizer(config.optim, paths, steps_per_epoch=10, total_steps=20)
    for path in paths:
        lr = float(opt.learning_rates[opt.groups[path]](0))
        assert lr == pytest.approx(5e-4 if path.startswith("text_") else 1e-3), path
    # StepLR(gamma 0.9) once per epoch.
    assert float(opt.learning_rates[opt.groups[paths[0]]](10)) == pytest.approx(
        0.9 * float(opt.learning_rates[opt.groups[paths[0]]](0))
    )
    groups = optim_lib.clip_groups(paths, config.optim.clip_only)
    n = setup["model"].n_groups
    expected = {f"{side}_blend.{k}.weight": f"{side}_blend.{k}" for side in ("image", "text")
                for k in range(n)}  # fmt: skip
    assert groups == expected  # one clip_grad_norm_ per AddWeight module, nothing else clipped
    assert config.optim.grad_clip == 1.0


def test_unknown_class_falls_back_to_its_name(setup):
    ids = setup["model"].tokenize_classes(["foo_bar", "screw"])
    tokenizer = backbone_lib.byte_tokenizer()
    normal, abnormal = acd_clip_sentences("foo_bar")
    assert normal[0] == "foo bar." and len(normal) == 6 and len(abnormal) == 10
    want = tokenizer(normal + abnormal, 77)[:, : ids.shape[-1]]
    np.testing.assert_array_equal(ids[0], want)
    assert acd_clip_sentences("pill")[0][0].startswith("oval white pill")


@pytest.mark.slow
@pytest.mark.parametrize("n_groups", [2, 3, 4, 6])
def test_every_group_count_builds_and_runs(n_groups, monkeypatch):
    """A 12-block tiny CLIP (vision and text), so the official rule depth / N * k applies."""

    def twelve_blocks():
        # The tiny preset's block shapes (their random-init and compile caches are warm), 12 deep.
        tiny = presets.PRESETS["clip"]["tiny"]()
        return clip_lib.ClipConfig(
            vision=dataclasses.replace(tiny.vision, layers=12),
            text=dataclasses.replace(tiny.text, layers=12),
        )

    monkeypatch.setitem(presets.PRESETS["clip"], "tiny12", twelve_blocks)
    config = get_config(f"tiny,n_groups={n_groups}")
    config.model.backbone.preset = "tiny12"
    config.data.image_size = 16  # 4 x 4 grid
    model = methods.build(config, rngs=nnx.Rngs(0))
    model.set_classes(["screw"])
    assert model.image_levels == tuple(12 // n_groups * k for k in range(1, n_groups + 1))
    assert model.text_levels == model.image_levels
    batch = {"image": jnp.ones((1, 16, 16, 3)), "class_id": jnp.zeros((1,), jnp.int32)}
    # Eager: the op-by-op caches are shared by the four depths-12 models, a jit is compiled anew
    # for each (about 4x slower here).
    out = model(batch)
    assert out["anomaly_map"].shape == (1, 16, 16)
    assert out["gate_weights"].shape == (n_groups, 1, n_groups, 2)
    assert np.isfinite(np.asarray(out["pred_score"])).all()
    assert len(model.image_lora) == n_groups and len(model.text_lora) == n_groups


# ---------------------------------------------------------------------------------------------
# How often the text tower runs: counted at run time (jax.debug.callback fires each time the
# traced encode_text executes, so a branch not taken or a slot skipped counts nothing).


@pytest.fixture
def text_encodes(monkeypatch):
    """The number of prompt rows of each executed ``encode_text`` call, in order."""
    calls: list[int] = []
    original = AcdClip.encode_text

    def counted(self, ids):
        jax.debug.callback(functools.partial(calls.append, int(ids.shape[0])))
        return original(self, ids)

    monkeypatch.setattr(AcdClip, "encode_text", counted)
    return calls


def _jitted_forward(graphdef):
    # A new jit per test: the counting encode_text must be traced into it.
    return jax.jit(lambda params, rest, batch: nnx.merge(graphdef, params, rest)(batch))


def _batch_of(class_ids, seed=1):
    rng = np.random.default_rng(seed)
    b = len(class_ids)
    cells = rng.random((b, GRID, GRID)) < 0.3
    masks = np.kron(cells, np.ones((4, 4))).astype(np.float32)
    return {
        "image": jnp.asarray(rng.normal(size=(b, SIZE, SIZE, 3)).astype(np.float32)),
        "gt_mask": jnp.asarray(masks),
        "gt_label": jnp.asarray(cells.reshape(b, -1).any(-1).astype(np.int32)),
        "has_mask": jnp.ones((b,), bool),
        "class_id": jnp.asarray(class_ids, jnp.int32),
    }


def test_inference_encodes_text_once_per_class_not_per_batch(setup, text_encodes):
    """After set_classes (or prepare_text) a forward runs no text; with adapters changed since
    then it re-encodes the C classes once in that call (never stale), with the same outputs as a
    freshly prepared model."""
    model, batch = setup["model"], _batch_of([2, 0, 2, 1])
    n_classes, rows = len(CLASSES), model.n_normal + model.n_abnormal
    # The fixture edited the blend weights after set_classes: its cached text is stale.
    graphdef, params, stale_rest = nnx.split(model, Trainable, ...)
    forward = _jitted_forward(graphdef)
    stale = jax.block_until_ready(forward(params, stale_rest, batch))
    assert text_encodes == [n_classes * rows]
    text_encodes.clear()

    model.prepare_text()
    text_encodes.clear()  # (prepare_text's own jit may predate the counter)
    graphdef, params, rest = nnx.split(model, Trainable, ...)
    forward = _jitted_forward(graphdef)
    for _ in range(2):
        fresh = jax.block_until_ready(forward(params, rest, batch))
    assert text_encodes == []  # zero text encodes per batch
    for key in ("anomaly_map", "pred_score", "image_logits", "gate_weights"):
        np.testing.assert_allclose(fresh[key], stale[key], atol=1e-6, err_msg=key)

    # Trained weights arriving after prepare_text (evaluate/predict load, then set_classes; the
    # training loop's evaluations): the forward sees the change and re-encodes.
    changed = nnx.from_flat_state(
        [
            (p, v.replace(v.get_value() + 0.05) if p[:2] == ("text_blend", 0) else v)
            for p, v in nnx.to_flat_state(params)
        ]
    )
    moved = jax.block_until_ready(forward(changed, rest, batch))
    assert text_encodes == [n_classes * rows]
    assert np.abs(np.asarray(moved["image_logits"]) - np.asarray(fresh["image_logits"])).max() > 0
    text_encodes.clear()
    # The same weights set on the model and prepared: the table is used, the outputs agree.
    nnx.update(model, changed)
    try:
        model.prepare_text()
        text_encodes.clear()
        graphdef, params2, rest2 = nnx.split(model, Trainable, ...)
        again = jax.block_until_ready(_jitted_forward(graphdef)(params2, rest2, batch))
        assert text_encodes == []
        np.testing.assert_allclose(again["image_logits"], moved["image_logits"], atol=1e-6)
        np.testing.assert_allclose(again["anomaly_map"], moved["anomaly_map"], atol=1e-6)
    finally:
        nnx.update(model, params)
        model.prepare_text()


def _per_image_text(model, class_id):
    """The previous ``encode_class_text``: every image's 16 prompts through the tower."""
    table = model.class_prompt_ids[...]
    ids = jnp.take(table, class_id.astype(jnp.int32), axis=0, mode="clip")
    return model.state_embeddings(ids)


def test_training_encodes_text_once_per_distinct_class(setup, text_encodes):
    """A training forward encodes the 16 prompts of each distinct class of the batch once; its
    backward re-runs each distinct class once (distinct_class_text's VJP); the loss and every
    gradient equal those of encoding each image's class separately."""
    model = setup["model"]
    graphdef, params, rest = nnx.split(model, Trainable, ...)
    rows = model.n_normal + model.n_abnormal

    def loss_fn(p, batch, per_image):
        m = nnx.merge(graphdef, p, rest)
        if per_image:
            m.encode_class_text = functools.partial(_per_image_text, m)
        out = m(batch, train=True)
        return m.loss(out, batch)[0], out

    forward = jax.jit(loss_fn, static_argnums=2)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)
    for class_ids in ([2, 2, 0, 2], [1, 1, 1, 1], [0, 1, 2, 0]):  # one compilation for all
        batch, distinct = _batch_of(class_ids), len(set(class_ids))
        jax.block_until_ready(forward(params, batch, False))
        assert text_encodes == [rows] * distinct, class_ids
        text_encodes.clear()
        (loss, out), grads = jax.block_until_ready(grad(params, batch, False))
        assert text_encodes == [rows] * (2 * distinct), class_ids
        text_encodes.clear()
        (ref_loss, ref_out), ref_grads = jax.block_until_ready(grad(params, batch, True))
        assert text_encodes == [rows * len(class_ids)]
        text_encodes.clear()
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        np.testing.assert_allclose(out["map_probs"], ref_out["map_probs"], atol=1e-6)
        g, want = _flat(grads), _flat(ref_grads)
        assert set(g) == set(want)
        for name, value in want.items():
            scale = max(float(np.abs(value).max()), 1e-8)
            # Float32 sums in another order (per class, not per image): the parity tests'
            # criterion.
            assert np.abs(g[name] - value).max() <= 1e-4 * scale, (class_ids, name)
    # The text of each image equals its class's row of the per-image encoding.
    class_id = jnp.asarray([2, 0, 2, 1], jnp.int32)
    np.testing.assert_allclose(
        model.encode_class_text(class_id), _per_image_text(model, class_id), atol=1e-6
    )
