"""DLVP-CLIP (zsad_jax/methods/dlvp_clip.py, configs/dlvp_clip.py) on the tiny random CLIP.

Proofs: every variant of the config is one row of the paper, with the paper's numbers beside it and
the switches that row implies; every variant builds and runs with the interface's shapes and ranges,
holds exactly the heads its switches ask for (trainable count by formula, and pinned at full size),
and the variants differ where the paper's rows differ (which passes run, which heads exist); the
defaults are the paper's where it decides (loss weights 1, no DPAM); only Trainable weights are
differentiated and each of them gets a non-zero gradient; SLFS's top-K equals a NumPy argsort of
the heads-averaged CLS attention; HFD with identity/zero band maps equals PyWavelets'
reconstruction (the Sobel branch scipy's ``ndimage.sobel``), and its documented start (torch init
~0.33 of the norm away, ``hfd_init="zero"`` the identity); without DPAM the maps come from the
plain CLIP path; the whole forward and loss equal a PyTorch transcription of the paper's math
written here (float64) with our weights copied into it, for every variant.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
import scipy.ndimage
from extras import optional
from flax import nnx

from configs.dlvp_clip import ABLATIONS, BACKBONES, TOP_K, VARIANTS, get_config
from zsad_jax import methods, summary
from zsad_jax.layers.frequency import sobel_gradients
from zsad_jax.methods.dlvp_clip import DlvpClip, HighLowFrequencyDecomposition
from zsad_jax.nn import Trainable

# None without the convert extra; the tests that use it are marked torch (tests/extras.py).
torch_ref = optional("official.dlvp_clip")  # the paper's forward transcribed in PyTorch

TOL = 1e-4

# The paper's ablation tables (papers/DLVP-CLIP.txt), typed in again here so that the config's data
# is checked against the source: row label -> (MVTec I, MVTec P, VisA I, VisA P), None = not given.
PAPER_ABLATION = {
    "w/o SLFS & MLoP": (89.5, 89.0, 84.2, 95.0),
    "+ SLFS only": (91.0, 89.3, 86.3, 95.2),
    "+ MLoP only": (90.4, 89.6, 85.1, 95.1),
    "+ SLFS & MLoP (w/o HFD)": (92.8, 89.5, 85.8, 95.3),
    "Full (DLVP + HFD)": (94.2, 90.4, 87.9, 95.7),
    "Global token (supplement)": (None, None, 85.6, 95.6),
    "Sobel instead of DWT (supplement)": (None, None, 86.7, 95.2),
}
PAPER_TOP_K = {1: (92.1, 84.5), 2: (92.4, 85.7), 3: (92.9, 86.7), 4: (94.2, 87.9), 5: (92.7, 85.7)}

# Variant -> (paper row, use_slfs, use_mlop, use_hfd, hfd_kind, top_k): what each row implies.
# "+ MLoP only" and "Global token" both take the CLS token as the source (no selector) and differ by
# HFD, as the table's incremental reading says (methods.md §9).
EXPECTED_ROWS = {
    "baseline": ("w/o SLFS & MLoP", False, False, False, "haar", 4),
    "slfs_only": ("+ SLFS only", True, False, False, "haar", 4),
    "mlop_only": ("+ MLoP only", False, True, False, "haar", 4),
    "no_hfd": ("+ SLFS & MLoP (w/o HFD)", True, True, False, "haar", 4),
    "full": ("Full (DLVP + HFD)", True, True, True, "haar", 4),
    "global_token": ("Global token (supplement)", False, True, True, "haar", 4),
    "sobel": ("Sobel instead of DWT (supplement)", True, True, True, "sobel", 4),
}

# Every variant the tests build: the paper's rows, then the AnomalyCLIP internals and backbones.
ROW_VARIANTS = [f"ablation={a}" for a in ABLATIONS] + [f"top_k={k}" for k in TOP_K]
OTHER_VARIANTS = ["dpam", "anomalyclip", "seg_weight=4", *(f"backbone={b}" for b in BACKBONES)]


def _batch(config, seed: int = 0, batch: int = 2) -> dict[str, jax.Array]:
    s = config.data.image_size
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, s, s), np.float32)
    mask[1, 5:17, 9:25] = 1.0  # one anomalous image with a rectangular defect
    return {
        "image": jnp.asarray(rng.normal(size=(batch, s, s, 3)), jnp.float32),
        "gt_mask": jnp.asarray(mask),
        "gt_label": jnp.asarray([0, 1], jnp.int32),
        "has_mask": jnp.asarray([True, True]),
        "class_id": jnp.zeros((batch,), jnp.int32),
    }


def _tiny(variant: str | None = None) -> str:
    return "tiny" if not variant else f"tiny,{variant}"


def _model(arg: str = "tiny", seed: int = 0):
    config = get_config(arg)
    model = methods.build(config, rngs=nnx.Rngs(seed))
    model.set_classes(["stripes", "disc"])
    return config, model


def _trainable_count(model) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, Trainable)))


def _linear(i: int, o: int) -> int:
    return i * o + o


def _expected_trainable(m, d_vision: int, d_text: int, embed: int) -> int:
    """The design's count: AnomalyCLIP-style text prompts and X_p always; the heads each switch
    adds (P -> P', K -> M tokens, F_theta, HFD's three C x C maps per tapped layer)."""
    hfd_width = embed if m.hfd_space == "projected" else d_vision
    n_layers = len(m.layers)
    count = 2 * m.n_ctx * d_text + (m.prompt_depth - 1) * m.text_prompt_len * d_text
    count += _linear(n_layers * embed, embed)  # X_p compression
    if m.use_slfs or m.use_mlop:
        count += _linear(d_vision, d_vision)  # P -> P'
    if m.use_slfs and m.top_k != m.local_prompts:
        count += _linear(m.top_k, m.local_prompts)  # K selected patches -> M prompt tokens
    if m.use_mlop:
        count += _linear(d_vision, d_text)  # F_theta
    if m.use_hfd:
        count += n_layers * 3 * _linear(hfd_width, hfd_width)
    return count


@pytest.fixture(scope="module")
def full():
    return _model("tiny")


# ----------------------------------------------------------------------------------------------
# The config: each variant is one row of the paper


def test_ablation_rows_carry_the_papers_numbers_and_switches():
    assert set(ABLATIONS) == set(EXPECTED_ROWS)
    for name, row in ABLATIONS.items():
        label, use_slfs, use_mlop, use_hfd, hfd_kind, top_k = EXPECTED_ROWS[name]
        assert row.row == label, name
        assert (row.use_slfs, row.use_mlop, row.use_hfd, row.hfd_kind, row.top_k) == (
            use_slfs,
            use_mlop,
            use_hfd,
            hfd_kind,
            top_k,
        ), name
        assert (*row.mvtec_ad, *row.visa) == PAPER_ABLATION[label], name


def test_top_k_rows_are_the_full_model_with_k_patches_and_four_prompts():
    assert sorted(TOP_K) == [1, 2, 3, 4, 5]
    for k, row in TOP_K.items():
        assert (row.use_slfs, row.use_mlop, row.use_hfd, row.hfd_kind) == (True, True, True, "haar")
        assert (row.mvtec_ad[0], row.visa[0]) == PAPER_TOP_K[k]
        assert row.mvtec_ad[1] is None and row.visa[1] is None  # image AUROC only
        c = get_config(f"top_k={k}")
        assert (c.model.top_k, c.model.local_prompts, c.model.text_prompt_len) == (k, 4, 4)
    # K = 4 is the full model: same switches, same numbers.
    assert TOP_K[4].mvtec_ad[0] == ABLATIONS["full"].mvtec_ad[0]
    assert TOP_K[4].visa[0] == ABLATIONS["full"].visa[0]
    assert get_config("top_k=4").to_dict() == get_config().to_dict()


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_variant_sets_its_rows_switches(name):
    m = get_config(f"ablation={name}").model
    _, use_slfs, use_mlop, use_hfd, hfd_kind, top_k = EXPECTED_ROWS[name]
    assert (m.use_slfs, m.use_mlop, m.use_hfd, m.hfd_kind, m.top_k) == (
        use_slfs,
        use_mlop,
        use_hfd,
        hfd_kind,
        top_k,
    )
    # The rows change only the paper's modules; everything else stays the default's.
    default = get_config().model.to_dict()
    changed = {k for k, v in m.to_dict().items() if default[k] != v}
    assert changed <= {"use_slfs", "use_mlop", "use_hfd", "hfd_kind"}


def test_defaults_are_the_paper_where_it_decides():
    c = get_config()
    m = c.model
    # "L_total = L_cls(S_p, y) + sum_l L^l_seg": weight 1 each (not AnomalyCLIP's lam = 4).
    assert (c.loss.cls_weight, c.loss.seg_weight) == (1.0, 1.0)
    # Plain CLIP layers: no DPAM; X_c is CLIP's own image embedding (ln_post, then proj).
    assert m.dpam_layers == 1 and m.global_ln_post is True
    # "Number of local prompts is 4", "K=4", "prompt depth 9", the last layer's attention.
    assert (m.top_k, m.local_prompts, m.prompt_depth, m.slfs_attn_layer) == (4, 4, 9, 24)
    assert (m.use_slfs, m.use_mlop, m.use_hfd, m.hfd_kind) == (True, True, True, "haar")
    # Documented choices (the paper is silent).
    assert m.hfd_init == "torch" and m.hfd_space == "projected"
    assert (m.act, m.pos_resize, m.backbone.checkpoint) == (
        "quick_gelu",
        "bilinear",
        "weights/clip-vit-l14-336",
    )
    # AnomalyCLIP's protocol: masks bilinear then > 0.5, on both sides.
    assert c.data.mask_resize == c.data.train_mask_resize == "bilinear_threshold"


@pytest.mark.parametrize(
    "arg, dpam_layers, seg_weight, global_ln_post",
    [
        (None, 1, 1.0, True),
        ("dpam", 20, 1.0, True),  # AnomalyCLIP's DPAM_layer = 20: blocks 6..24
        ("seg_weight=4", 1, 4.0, True),  # AnomalyCLIP's lam = 4
        ("seg_weight=1", 1, 1.0, True),
        ("anomalyclip", 20, 4.0, False),  # all three, with x_ori[0] @ proj
        ("anomalyclip,seg_weight=1", 20, 1.0, False),  # the explicit weight wins
        ("tiny,dpam", 3, 1.0, True),  # blocks 2..3 of 3
    ],
)
def test_anomalyclip_internals_are_variants_off_by_default(
    arg, dpam_layers, seg_weight, global_ln_post
):
    c = get_config(arg)
    assert c.model.dpam_layers == dpam_layers
    assert c.loss.seg_weight == seg_weight
    assert c.model.global_ln_post is global_ln_post


@pytest.mark.parametrize(
    "name, checkpoint, act, pos_resize",
    [
        ("openai", "weights/clip-vit-l14-336", "quick_gelu", "bilinear"),
        ("openai_gelu", "weights/clip-vit-l14-336", "gelu", "bicubic_antialias"),
        ("laion400m", "weights/clip-vit-l14-laion400m", "gelu", "bicubic_antialias"),
    ],
)
def test_backbone_variants(name, checkpoint, act, pos_resize):
    assert set(BACKBONES) == {"openai", "openai_gelu", "laion400m"}
    m = get_config(f"backbone={name}").model
    assert (m.backbone.checkpoint, m.act, m.pos_resize) == (checkpoint, act, pos_resize)
    assert m.backbone.kind == "clip" and m.backbone.preset == "vit_l14_336"
    # The tiny preset keeps the reading's activation and resize (random weights, no checkpoint).
    tiny = get_config(f"tiny,backbone={name}").model
    assert (tiny.backbone.checkpoint, tiny.act, tiny.pos_resize) == (None, act, pos_resize)


def test_variant_refusals_are_one_line():
    for arg, expected in [
        ("ablation=mlop", "ablation='mlop' is not allowed (did you mean 'mlop_only'?)"),
        ("top_k=6", "top_k='6' is not allowed; use top_k=1|2|3|4|5"),
        ("seg_weight=2", "seg_weight='2' is not allowed; use seg_weight=1|4"),
        ("backbone=laion2b", "backbone='laion2b' is not allowed"),
        ("top_k=2,ablation=sobel", "top_k=2 is the paper's Top-K ablation of the full model"),
    ]:
        with pytest.raises(ValueError) as err:
            get_config(arg)
        message = str(err.value)
        assert message.startswith("configs/dlvp_clip.py: ") and "\n" not in message, message
        assert expected in message, message
    assert get_config("top_k=2,ablation=full").model.top_k == 2
    assert set(VARIANTS) >= {"ablation", "top_k", "backbone", "dpam", "seg_weight", "anomalyclip"}


# ----------------------------------------------------------------------------------------------
# The model: every variant builds, runs and has the heads its switches ask for


@pytest.mark.parametrize("variant", ROW_VARIANTS + ["dpam", "anomalyclip"])
def test_every_variant_builds_runs_and_has_its_heads(variant):
    config, model = _model(_tiny(variant))
    m = config.model
    batch = _batch(config)
    s, b, n_layers = config.data.image_size, 2, len(m.layers)
    out = model(batch)
    assert out["anomaly_map"].shape == (b, s, s)
    assert out["pred_score"].shape == (b,)
    assert out["image_logits"].shape == (b, 2)
    assert out["layer_probs"].shape == (n_layers, b, s, s, 2)
    if m.use_slfs:
        assert out["local_indices"].shape == (b, m.top_k)
    else:
        assert "local_indices" not in out
    for key in ("anomaly_map", "pred_score"):
        v = np.asarray(out[key])
        assert np.all(np.isfinite(v)) and v.min() >= 0.0 and v.max() <= 1.0, key
    # Switches decide which heads exist (so Trainable state == what the variant trains).
    assert (model.visual_prompt_proj is not None) == (m.use_slfs or m.use_mlop)
    assert (model.prompt_token_proj is not None) == (m.use_slfs and m.top_k != 4)
    assert (model.text_prompt_proj is not None) == m.use_mlop
    assert (model.hfd is not None) == m.use_hfd
    if m.use_hfd:
        assert all(h.kind == m.hfd_kind for h in model.hfd)
    assert model.dpam_start == (2 if m.dpam_layers > 1 else 4)  # 4 = past the 3 tiny blocks
    vcfg, tcfg = model.clip.vision.config, model.clip.text.config
    assert _trainable_count(model) == _expected_trainable(
        m, vcfg.width, tcfg.width, vcfg.output_dim
    )
    loss, parts = model.loss(model(batch, train=True), batch)
    assert np.isfinite(float(loss)) and set(parts) == {
        "cls",
        "focal",
        "dice_abnormal",
        "dice_normal",
    }


def _footprint(variant: str, monkeypatch) -> tuple:
    """What a variant does, observed: which plain passes it runs (with the attention block they
    ask for, None = no attention), whether SLFS indices come out, its trainable heads and HFD
    kinds, and the prompt-token shape."""
    config, model = _model(_tiny(variant))
    passes = []
    plain_pass = DlvpClip._plain_pass

    def spy(self, images, feature_layer, attn_layer=None):
        passes.append(attn_layer)
        return plain_pass(self, images, feature_layer, attn_layer)

    monkeypatch.setattr(DlvpClip, "_plain_pass", spy)
    out = model(_batch(config))
    monkeypatch.undo()
    heads = sorted({p[0] for p, _ in nnx.to_flat_state(nnx.state(model, Trainable))})
    kinds = tuple(h.kind for h in model.hfd) if model.hfd is not None else ()
    prompts = None
    if model.visual_prompts_on:
        prompts = tuple(model.visual_prompts(_batch(config)["image"])[0].shape)
    return tuple(passes), "local_indices" in out, tuple(heads), kinds, prompts


def test_variants_differ_where_the_papers_rows_differ(monkeypatch):
    seen = {v: _footprint(v, monkeypatch) for v in ROW_VARIANTS}
    slfs_pass = (3,)  # one plain pass asking for the last tiny block's attention
    global_pass = (None,)  # one plain pass, no attention: the CLS token only
    b = 2
    # The baseline: no plain pass, no prompts, no DLVP head, no HFD.
    text_and_x_p = ("ctx_abnormal", "ctx_normal", "local_compress", "text_deep_prompts")
    assert seen["ablation=baseline"] == ((), False, text_and_x_p, (), None)
    # + SLFS only: the selector and the vision-side projection, no F_theta, no HFD.
    passes, indices, heads, kinds, prompts = seen["ablation=slfs_only"]
    assert passes == slfs_pass and indices and kinds == () and prompts == (b, 4, 48)
    assert "visual_prompt_proj" in heads and "text_prompt_proj" not in heads
    # + MLoP only: no SLFS pass (the global token), no HFD parameters, F_theta on.
    passes, indices, heads, kinds, _ = seen["ablation=mlop_only"]
    assert passes == global_pass and not indices and kinds == () and "hfd" not in heads
    assert "text_prompt_proj" in heads
    # Global token: the same source as "+ MLoP only", with HFD; no SLFS pass, no indices.
    passes, indices, heads, kinds, _ = seen["ablation=global_token"]
    assert passes == global_pass and not indices and kinds == ("haar",) * 3 and "hfd" in heads
    # w/o HFD vs full vs Sobel: the same prompts, HFD absent / Haar / Sobel.
    for name, expected in [("no_hfd", ()), ("full", ("haar",) * 3), ("sobel", ("sobel",) * 3)]:
        passes, indices, _, kinds, prompts = seen[f"ablation={name}"]
        assert passes == slfs_pass and indices and kinds == expected and prompts == (b, 4, 48)
    # Top-K: K patches, always M = 4 prompt tokens; K != 4 adds the K -> M token map.
    for k in TOP_K:
        passes, indices, heads, kinds, prompts = seen[f"top_k={k}"]
        assert passes == slfs_pass and prompts == (b, 4, 48)
        assert ("prompt_token_proj" in heads) == (k != 4)
    assert seen["top_k=4"] == seen["ablation=full"]
    # Every row of the main table and the supplement differs from every other one.
    rows = [f"ablation={a}" for a in ABLATIONS]
    for one, other in itertools.combinations(rows, 2):
        assert seen[one] != seen[other], (one, other)


def test_top_k_selects_k_patches_into_four_prompts():
    config, model = _model("tiny,top_k=2")
    images = _batch(config)["image"]
    local, indices = model.select_local_features(images)
    assert local.shape == (2, 2, 48) and indices.shape == (2, 2)
    prompts, _ = model.visual_prompts(images)
    assert prompts.shape == (2, 4, 48)
    assert model.prompt_token_proj.kernel.shape == (2, 4)


def test_without_dpam_the_maps_come_from_the_plain_path():
    """No prompts and no DPAM (the baseline): the prompted pass is plain CLIP, so its taps equal
    the encoder's own block outputs and the global token its last CLS."""
    config, model = _model("tiny,ablation=baseline")
    images = _batch(config, seed=7)["image"]
    taps, global_token = model.encode_image(images, None)
    _, aux = model.clip.vision(images, layers=config.model.layers)
    for layer in config.model.layers:
        np.testing.assert_allclose(taps[layer], aux["layers"][layer], atol=1e-6)
    np.testing.assert_allclose(global_token, aux["layers"][3][:, 0], atol=1e-6)
    # With DPAM the taps of the DPAM blocks differ (the V-V path).
    _, dpam = _model("tiny,ablation=baseline,dpam")
    dpam_taps, _ = dpam.encode_image(images, None)
    np.testing.assert_allclose(dpam_taps[1], aux["layers"][1], atol=1e-6)  # before DPAM
    assert np.abs(np.asarray(dpam_taps[3]) - np.asarray(aux["layers"][3])).max() > 1e-3


def test_jit_over_split_state_matches_eager(full):
    config, model = full
    batch = _batch(config, seed=3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch)

    jitted = forward(state, batch)
    eager = model(batch)
    for key in ("anomaly_map", "pred_score", "image_logits"):
        np.testing.assert_allclose(jitted[key], eager[key], atol=1e-5)


def test_bad_config_values_name_the_field():
    config = get_config("tiny")
    config.model.layers = (1, 4)
    with pytest.raises(ValueError, match=r"config\.model\.layers=4"):
        methods.build(config, rngs=nnx.Rngs(0))
    config = get_config("tiny")
    config.model.text_prompt_len = 3
    with pytest.raises(ValueError, match="text_prompt_len=3 must equal local_prompts=4"):
        methods.build(config, rngs=nnx.Rngs(0))
    config = get_config("tiny")
    config.model.hfd_init = "identity"
    with pytest.raises(ValueError, match=r"config\.model\.hfd_init='identity'"):
        methods.build(config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.slow
@pytest.mark.parametrize("variant", [None, "top_k=2"])
def test_gradients_only_and_all_trainable(variant):
    # The full variant holds every head but the K -> M map, which top_k=2 adds.
    config, model = _model(_tiny(variant))
    batch = _batch(config, seed=1)

    def loss_fn(m):
        return m.loss(m(batch, train=True), batch)[0]

    # Differentiate with respect to Trainable state only (as zsad_jax.train does), under jit.
    grads = nnx.jit(lambda m: nnx.grad(loss_fn, argnums=nnx.DiffState(0, Trainable))(m))(model)
    grad_leaves = dict(nnx.to_flat_state(grads))
    trainable_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, Trainable))}
    frozen_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} - trainable_paths
    # Only Trainable state is differentiated: the frozen backbone gets no gradient at all.
    assert set(grad_leaves) == trainable_paths
    assert frozen_paths and all(p[0] == "clip" for p in frozen_paths)
    assert not any(p[0] == "clip" for p in grad_leaves)
    # Every trainable weight receives a gradient.
    for path, g in grad_leaves.items():
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"zero gradient for {'.'.join(map(str, path))}"


@pytest.mark.slow
def test_remat_changes_memory_not_gradients():
    config, model = _model("tiny,dpam")  # both block kinds (plain and DPAM) rematerialised
    batch = _batch(config, seed=6)

    def grads_of(m):
        def loss_fn(m):
            return m.loss(m(batch, train=True), batch)[0]

        return nnx.jit(lambda m: nnx.grad(loss_fn, argnums=nnx.DiffState(0, Trainable))(m))(m)

    config.model.remat = True
    remat_model = methods.build(config, rngs=nnx.Rngs(0))
    remat_model.set_classes([])
    assert remat_model.remat and not model.remat
    expected = dict(nnx.to_flat_state(grads_of(model)))
    for path, g in nnx.to_flat_state(grads_of(remat_model)):
        np.testing.assert_allclose(g[...], expected[path][...], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# SLFS


def test_topk_selection_equals_numpy_argsort_of_cls_attention(full):
    config, model = full
    images = _batch(config, seed=2)["image"]
    vision = model.clip.vision
    k = config.model.top_k
    layer = config.model.slfs_attn_layer
    _, aux = vision(images, layers=(config.model.slfs_feature_layer,), attn_layer=layer)
    attn = np.asarray(aux["attn"], np.float64)  # (B, heads, 1+N, 1+N)
    scores = attn.mean(axis=1)[:, 0, 1:]
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    local, indices = model.select_local_features(images)
    np.testing.assert_array_equal(np.asarray(indices), expected)
    # P = V[T]: the patch tokens of the chosen block at those indices, through ln_post.
    tokens = np.asarray(aux["layers"][config.model.slfs_feature_layer], np.float64)[:, 1:]
    gathered = np.take_along_axis(tokens, expected[..., None], axis=1)
    mean = gathered.mean(-1, keepdims=True)
    var = gathered.var(-1, keepdims=True)
    normed = (gathered - mean) / np.sqrt(var + 1e-5)
    normed = normed * np.asarray(vision.ln_post.scale[...]) + np.asarray(vision.ln_post.bias[...])
    np.testing.assert_allclose(np.asarray(local), normed, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# HFD


def _set_linear(linear, kernel: np.ndarray) -> None:
    linear.kernel[...] = jnp.asarray(kernel, jnp.float32)
    linear.bias[...] = jnp.zeros_like(linear.bias[...])


@pytest.mark.parametrize("low_gain, high_gain", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, -0.5)])
def test_hfd_with_identity_band_maps_is_residual_of_haar_band_filter(low_gain, high_gain):
    c = 5
    hfd = HighLowFrequencyDecomposition(c, kind="haar", rngs=nnx.Rngs(0))
    eye = np.eye(c)
    _set_linear(hfd.spatial, eye)
    _set_linear(hfd.low, low_gain * eye)
    _set_linear(hfd.high, high_gain * eye)
    x = np.random.default_rng(0).normal(size=(2, 9, 7, c))  # odd grid, like 37 x 37
    out = np.asarray(hfd(jnp.asarray(x, jnp.float32)))
    # Reference: PyWavelets' Haar DWT (mode "symmetric"), bands scaled, inverse, cropped.
    ll, (lh, hl, hh) = pywt.dwt2(x, "haar", axes=(1, 2))
    bands = (low_gain * ll, (high_gain * lh, high_gain * hl, high_gain * hh))
    detail = pywt.idwt2(bands, "haar", axes=(1, 2))[:, :9, :7]
    np.testing.assert_allclose(out, x + detail, atol=1e-5)
    if low_gain == high_gain == 1.0:  # perfect reconstruction: F + F
        np.testing.assert_allclose(out, 2 * x, atol=1e-5)


def test_sobel_matches_scipy_and_sobel_hfd_residual():
    x = np.random.default_rng(1).normal(size=(2, 8, 11, 3))
    gx, gy = sobel_gradients(jnp.asarray(x, jnp.float32))
    # scipy smooths along every other axis of an N-d array: filter each (H, W) plane on its own.
    for axis, ours in ((1, gx), (0, gy)):
        expected = np.stack(
            [
                np.stack(
                    [
                        scipy.ndimage.sobel(x[b, :, :, ch], axis=axis, mode="nearest")
                        for ch in range(x.shape[-1])
                    ],
                    -1,
                )
                for b in range(x.shape[0])
            ]
        )
        np.testing.assert_allclose(ours, expected, atol=1e-5)
    c = 3
    hfd = HighLowFrequencyDecomposition(c, kind="sobel", rngs=nnx.Rngs(0))
    _set_linear(hfd.spatial, np.eye(c))
    _set_linear(hfd.low, np.zeros((c, c)))
    _set_linear(hfd.high, np.eye(c))
    magnitude = np.sqrt(np.asarray(gx, np.float64) ** 2 + np.asarray(gy, np.float64) ** 2 + 1e-6)
    np.testing.assert_allclose(hfd(jnp.asarray(x, jnp.float32)), x + magnitude, atol=1e-4)


@pytest.mark.parametrize("kind", ["haar", "sobel"])
def test_hfd_start_is_the_documented_one(kind):
    """``hfd_init="torch"`` (default): a fresh nn.Linear per map, so F^D is ~1/3 of F's norm
    (each C x C map scales by ~1/sqrt(3); cosine ~0.95), as configs/dlvp_clip.py says;
    ``hfd_init="zero"``: HFD is the identity at the start."""
    c = 256
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, c)), jnp.float32)
    out = HighLowFrequencyDecomposition(c, kind=kind, init="zero", rngs=nnx.Rngs(0))(x)
    np.testing.assert_array_equal(out, x)
    if kind == "haar":
        out = np.asarray(HighLowFrequencyDecomposition(c, kind=kind, rngs=nnx.Rngs(0))(x))
        x = np.asarray(x)
        ratio = np.linalg.norm(out - x, axis=-1).mean() / np.linalg.norm(x, axis=-1).mean()
        cos = np.mean(
            np.sum(out * x, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(x, axis=-1))
        )
        assert 0.30 < ratio < 0.37 and 0.93 < cos < 0.96, (ratio, cos)


def test_hfd_init_zero_model_starts_at_the_no_hfd_maps():
    """With ``hfd_init="zero"`` the full model's maps at step 0 equal those of the same weights
    without HFD: the zero band maps add nothing."""
    config = get_config("tiny")
    config.model.hfd_init = "zero"
    model = methods.build(config, rngs=nnx.Rngs(1))
    model.set_classes([])
    batch = _batch(config, seed=8)
    with_hfd = model(batch, train=True)
    model.hfd = None  # same weights otherwise
    without = model(batch, train=True)
    np.testing.assert_allclose(with_hfd["layer_probs"], without["layer_probs"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Parameter counts at full size

# Variant -> trainable parameters at full size (ViT-L/14: widths 1024 / 768, E = 768). From the
# design's formula: AnomalyCLIP text prompts 2*12*768 + 8*4*768 and X_p 3072*768+768 always
# (2,403,072); P -> P' 1024*1024+1024; F_theta 1024*768+768; HFD 4*3*(768*768+768); K -> M
# tokens K*4+4 where K != 4.
FULL_SIZE_TRAINABLE = {
    "ablation=baseline": 2_403_072,
    "ablation=slfs_only": 3_452_672,
    "ablation=mlop_only": 4_239_872,
    "ablation=no_hfd": 4_239_872,
    "ablation=full": 11_326_976,
    "ablation=global_token": 11_326_976,
    "ablation=sobel": 11_326_976,
    "top_k=1": 11_326_984,
    "top_k=2": 11_326_988,
    "top_k=3": 11_326_992,
    "top_k=4": 11_326_976,
    "top_k=5": 11_327_000,
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(FULL_SIZE_TRAINABLE))
def test_trainable_count_at_full_size(variant):
    config = get_config(variant)
    model = summary.abstract_model(config)  # what `python -m zsad_jax.summary` counts
    count = _trainable_count(model)
    assert summary.count_parameters(model)["trainable_params"] == count
    assert count == _expected_trainable(config.model, 1024, 768, 768)
    assert count == FULL_SIZE_TRAINABLE[variant]
    backbone = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model.clip)))
    assert backbone > 400_000_000  # ViT-L/14 both towers, none of it Trainable


def test_full_size_count_of_the_default_is_the_docstrings():
    import configs.dlvp_clip as module

    assert "= 11,326,976" in module.__doc__
    assert FULL_SIZE_TRAINABLE["ablation=full"] == 11_326_976


# ----------------------------------------------------------------------------------------------
# The paper's forward transcribed in PyTorch (tests/official/dlvp_clip.py), our weights copied in.

OTHER_CHOICES = {
    "hfd_space": "residual",
    "global_ln_post": False,
    "dpam_layers": 2,  # DPAM on the last block only
    "visual_fixed_depth": 0,  # prompts evolve from block 1 on
    "slfs_attn_layer": 2,
    "slfs_feature_layer": 1,
}


@pytest.mark.torch
@pytest.mark.parametrize(
    "variant, overrides",
    [(v, {}) for v in ROW_VARIANTS if v != "top_k=4"]  # top_k=4 is ablation=full
    + [(v, {}) for v in OTHER_VARIANTS if v != "backbone=openai"]  # openai is the default
    + [("ablation=full", OTHER_CHOICES), ("ablation=global_token", OTHER_CHOICES)],
    ids=lambda p: p if isinstance(p, str) else ("other_choices" if p else ""),
)
def test_forward_and_loss_match_torch_transcription(variant, overrides):
    config = get_config(_tiny(variant))
    config.model.update(overrides)
    model = methods.build(config, rngs=nnx.Rngs(4))
    model.set_classes([])
    batch = _batch(config, seed=5)
    ours = model(batch, train=True)
    loss, _ = model.loss(ours, batch)
    ref = torch_ref.torch_forward(model, config, batch)
    if ref["local_indices"] is not None:
        np.testing.assert_array_equal(ours["local_indices"], ref["local_indices"].numpy())
    for key in ("layer_probs", "anomaly_map", "image_logits", "pred_score"):
        np.testing.assert_allclose(ours[key], ref[key].numpy(), atol=TOL, err_msg=key)
    np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=1e-5, atol=TOL)
    # Test time: the map is Gaussian-smoothed like scipy.ndimage.gaussian_filter (AnomalyCLIP).
    smoothed = model(batch)["anomaly_map"]
    expected = np.stack(
        [scipy.ndimage.gaussian_filter(a, sigma=config.model.sigma) for a in ref["anomaly_map"]]
    )
    np.testing.assert_allclose(smoothed, expected, atol=TOL)
