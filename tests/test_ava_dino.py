"""AVA-DINO (zsad_jax/methods/ava_dino.py) on the tiny random DINOv3 and CLIP text tower.

Proofs: output shapes/ranges under jit and routing weights summing to 1; only the Trainable state
is trained, every one of its leaves gets a gradient and neither frozen encoder any; the full-size
trainable count is 27,131,904 (28,311,552 with the prompt adapters' unused fc2, the official
module's declared count) and the CLIP vision tower is never built; the feature extraction (final
norm, unbiased per-channel standardisation), the prompt ensemble, and the heads (routing, dual
adapters, interleaved or paper text columns, cross-modal / AACM maps, global logits, layer
averaging) equal a PyTorch transcription of the official ``tools/utils.py`` / ``CLIP/adapter.py``
/ ``utils.py`` written here (aqeeelmirza/AVA-DINO @a5474a1, read, not copied); the loss equals
the official ``tools/loss.py`` + ``train.py`` composition in torch, with and without the AACM term;
``set_classes`` encodes in fixed batches with a progress bar, returns with the values computed,
and a second evaluation reads them from the ``zsad_jax.text_cache`` directory (none is written for
random weights unless ``ZSAD_TEXT_CACHE`` names one).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toys
from extras import optional
from flax import nnx
from scipy import ndimage as scipy_ndimage

from configs.ava_dino import get_config
from zsad_jax import config_check, methods, text_cache
from zsad_jax.encoders import clip
from zsad_jax.methods import ava_dino
from zsad_jax.methods.ava_dino import text_columns
from zsad_jax.nn import Buffer, Trainable
from zsad_jax.prompts import ensemble_sentences

# None without the convert extra; the tests that use them are marked torch (tests/extras.py).
torch = optional("torch")
F = optional("torch.nn.functional")
torch_ref = optional("official.ava_dino")  # the PyTorch transcription of the official code

B, SIZE = 3, 64  # tiny DINOv3: patch 16 -> 4 x 4 grid
GRID = (4, 4)
CLASSES = ("bottle", "metal_nut")


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, SIZE, SIZE), np.float32)
    mask[1, 10:30, 20:44] = 1.0
    mask[2, 40:60, 5:20] = 1.0
    return {
        "image": jnp.asarray(rng.normal(size=(B, SIZE, SIZE, 3)).astype(np.float32)),
        "class_id": jnp.asarray([0, 1, 1], jnp.int32),
        "gt_mask": jnp.asarray(mask),
        "gt_label": jnp.asarray([0, 1, 1], jnp.int32),
        "has_mask": jnp.asarray([True, True, True]),
    }


def _build(arg: str = "tiny"):
    model = methods.build(get_config(arg), rngs=nnx.Rngs(0))
    model.set_classes(CLASSES)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _build()
    graphdef, params, rest, forward, loss_and_grad = toys.jitted_method(model)

    @jax.jit
    def features(params, rest, images):
        return nnx.merge(graphdef, params, rest).features(images)

    return {
        "model": model,
        "params": params,
        "rest": rest,
        "forward": forward,
        "loss_and_grad": loss_and_grad,
        "features": features,
        "batch": _batch(),
    }


# ---------------------------------------------------------------------------------------------


def test_outputs_shapes_ranges_and_routing(setup):
    out = setup["forward"](setup["params"], setup["rest"], setup["batch"])
    assert out["anomaly_map"].shape == (B, SIZE, SIZE)
    assert out["pred_score"].shape == (B,)
    assert out["cross_modal"].shape == out["aacm"].shape == (B, SIZE, SIZE, 2)
    assert out["global_logits"].shape == out["routing_weights"].shape == (B, 2)
    assert out["routing_weights_per_layer"].shape == (2, B, 2)
    for key in ("anomaly_map", "pred_score", "cross_modal", "aacm", "routing_weights"):
        v = np.asarray(out[key])
        assert np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0, key
    assert float(np.std(out["anomaly_map"])) > 0.0
    # Test-time scores: pixel = cross-modal anomalous channel, image = its maximum.
    np.testing.assert_array_equal(out["anomaly_map"], out["cross_modal"][..., 1])
    np.testing.assert_allclose(out["pred_score"], np.max(out["anomaly_map"], axis=(1, 2)))
    # Routing weights are a distribution per image, per layer and after layer averaging.
    for key in ("routing_weights", "routing_weights_per_layer"):
        np.testing.assert_allclose(np.sum(out[key], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.sum(out["cross_modal"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sum(out["aacm"], axis=-1), 1.0, atol=1e-6)


@pytest.mark.slow
def test_only_trainable_state_gets_gradients(setup):
    model, batch = setup["model"], setup["batch"]
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, Trainable))}
    expected = {"text_projection.kernel"} | {f"prompt_adapters.{i}.fc1.kernel" for i in (0, 1)}
    for group in ("cls_adapters", "patch_adapters"):
        for layer in (0, 1):
            for branch in ("normal", "anomaly"):
                for fc in ("fc1", "fc2"):
                    expected.add(f"{group}.{layer}.{branch}.{fc}.kernel")
    assert paths == expected
    for encoder in (model.backbone, model.text_encoder):
        assert not nnx.state(encoder, Trainable)  # never retyped
        assert jax.tree.leaves(nnx.state(encoder, nnx.Param))
    assert isinstance(model.class_text, Buffer)

    (_, (parts, _)), grads = setup["loss_and_grad"](setup["params"], setup["rest"], batch)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(expected)
    for path, g in flat:
        assert float(jnp.abs(g[...]).max()) > 0.0, f"no gradient for {path}"
    assert all(np.isfinite(float(v)) for v in parts.values())

    # The tapped features are cut from the graph: differentiating every DINOv3 weight through
    # them gives exact zeros, so no backward pass runs into the backbone.
    graphdef, backbone_params, rest = nnx.split(model, nnx.Param, ...)

    def tapped(p):
        cls, patches = nnx.merge(graphdef, p, rest).features(batch["image"])
        return sum(jnp.sum(c**2) for c in cls) + sum(jnp.sum(jnp.sin(x)) for x in patches)

    g = jax.jit(jax.grad(tapped))(backbone_params)["backbone"]
    assert jax.tree.leaves(g["blocks"])
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) == 0.0


@pytest.mark.slow
def test_full_size_trainable_count():
    # Built with the unused prompt fc2 (the official module's declared count); the default
    # (prompt_adapter_fc2=False) leaves exactly those two kernels out, as the tiny model's exact
    # path set in test_only_trainable_state_gets_gradients shows.
    config = get_config("fc2")
    assert not get_config().model.prompt_adapter_fc2 and config.model.prompt_adapter_fc2
    model = nnx.eval_shape(lambda: methods.build(config, rngs=nnx.Rngs(0), load_weights=False))
    counts = {
        ".".join(map(str, p)): math.prod(v.shape)
        for p, v in nnx.to_flat_state(nnx.state(model, Trainable))
    }
    adapter = 2 * 1024 * 768
    assert adapter == 1_572_864
    assert sum(v for k, v in counts.items() if k.startswith(("cls_", "patch_"))) == 16 * adapter
    assert counts["text_projection.kernel"] == 768 * 1024
    assert counts["prompt_adapters.0.fc1.kernel"] == counts["prompt_adapters.1.fc2.kernel"]
    assert sum(counts.values()) == 28_311_552
    unused = {f"prompt_adapters.{i}.fc2.kernel" for i in (0, 1)}
    assert sum(v for k, v in counts.items() if k not in unused) == 27_131_904
    assert model.layers == (6, 12, 18, 24) and model.backbone.config.num_layers == 24
    # Text-only CLIP: the vision tower is not part of the model at all.
    assert isinstance(model.text_encoder, clip.ClipText)
    assert model.text_encoder.config.act == "gelu"
    all_paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))]
    assert not any("vision" in p for p in all_paths)

    # The full-size forward and loss at 512 px, traced abstractly (no FLOPs): 32 x 32 grid.
    model.class_text = Buffer(jax.ShapeDtypeStruct((15, 2, 768), jnp.float32))
    graphdef, state = nnx.split(model)
    f32 = jnp.float32
    batch = {
        "image": jax.ShapeDtypeStruct((1, 512, 512, 3), f32),
        "class_id": jax.ShapeDtypeStruct((1,), jnp.int32),
        "gt_mask": jax.ShapeDtypeStruct((1, 512, 512), f32),
        "gt_label": jax.ShapeDtypeStruct((1,), jnp.int32),
        "has_mask": jax.ShapeDtypeStruct((1,), bool),
    }

    def forward_and_loss(state, batch):
        m = nnx.merge(graphdef, state)
        out = m(batch, train=True)
        return out, m.loss(out, batch)[0]

    out, loss = jax.eval_shape(forward_and_loss, state, batch)
    assert out["cross_modal"].shape == (1, 512, 512, 2) and out["anomaly_map"].shape == (
        1,
        512,
        512,
    )
    assert out["routing_weights_per_layer"].shape == (4, 1, 2) and loss.shape == ()


@pytest.mark.torch
def test_features_match_torch(setup):
    model, images = setup["model"], setup["batch"]["image"]
    cls, patches = setup["features"](setup["params"], setup["rest"], images)
    _, aux = nnx.jit(lambda enc, x: enc(x, layers=model.layers))(model.backbone, images)
    norm = model.backbone.norm
    for i, layer in enumerate(model.layers):
        toks = F.layer_norm(
            _t(aux["layers"][layer]),
            (toks_w := _t(norm.scale[...])).shape,
            toks_w,
            _t(norm.bias[...]),
            eps=1e-5,
        )
        p = toks[:, 5:, :]  # CLS + 4 registers
        p = (p - p.mean(dim=1, keepdim=True)) / (p.std(dim=1, keepdim=True) + 1e-6)
        np.testing.assert_allclose(cls[i], toks[:, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(patches[i], p.numpy(), atol=1e-4)


def test_prompt_ensemble_matches_numpy(setup):
    model = setup["model"]
    assert model.class_text.shape == (len(CLASSES), 2, model.text_encoder.config.output_dim)
    graphdef, state = nnx.split(model.text_encoder)
    encode = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])
    c, name = 1, CLASSES[1]  # "metal_nut": the raw folder name, underscore kept
    normal, abnormal = ensemble_sentences(name)
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a metal_nut." and abnormal[-1].endswith(
        "with damage in the scene."
    )
    for k, sentences in enumerate((normal, abnormal)):
        emb = np.asarray(encode(state, jnp.asarray(model.tokenize(sentences))), np.float64)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        mean = emb.mean(axis=0)
        np.testing.assert_allclose(
            model.class_text[...][c, k], mean / np.linalg.norm(mean), atol=1e-5
        )


@pytest.mark.torch
def test_text_columns_interleave_is_torch_view():
    a0 = np.arange(6, dtype=np.float32)[None] + 10
    a1 = np.arange(6, dtype=np.float32)[None] + 20
    ours = np.asarray(text_columns(jnp.asarray(a0), jnp.asarray(a1), True))
    theirs = torch.cat([_t(a0), _t(a1)], dim=1).view(1, 6, 2).permute(0, 2, 1).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[0, 0], [10, 12, 14, 20, 22, 24])
    paper = np.asarray(text_columns(jnp.asarray(a0), jnp.asarray(a1), False))
    np.testing.assert_array_equal(paper[0], np.concatenate([a0, a1]))


@pytest.mark.torch
def test_heads_match_torch(setup):
    model, batch = setup["model"], setup["batch"]
    cls, patches = setup["features"](setup["params"], setup["rest"], batch["image"])
    text = model.class_text[...][batch["class_id"]]
    weights = torch_ref.torch_weights(model)
    outs = {}
    for interleave in (True, False):
        model.interleave = interleave
        try:
            out = jax.jit(lambda c, p, t: model.heads(c, p, t, GRID, (SIZE, SIZE)))(
                cls, patches, text
            )
        finally:
            model.interleave = True
        ref = torch_ref.torch_official_heads(
            [_t(c) for c in cls],
            [_t(p) for p in patches],
            _t(text).permute(0, 2, 1),  # official (B, E, 2)
            weights,
            interleave=interleave,
            grid=GRID,
            size=(SIZE, SIZE),
        )
        for key in ("cross_modal", "aacm"):
            np.testing.assert_allclose(
                out[key], ref[key].permute(0, 2, 3, 1).numpy(), atol=1e-4, err_msg=key
            )
        np.testing.assert_allclose(out["global_logits"], ref["global_logits"].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["routing_weights"][:, 0], ref["w_n"].numpy(), atol=1e-5)
        np.testing.assert_allclose(out["routing_weights"][:, 1], ref["w_a"].numpy(), atol=1e-5)
        outs[interleave] = out
    # The quirk changes the text columns, hence the maps; routing (raw text) is unaffected.
    assert float(np.abs(outs[True]["global_logits"] - outs[False]["global_logits"]).max()) > 1e-3
    np.testing.assert_array_equal(outs[True]["routing_weights"], outs[False]["routing_weights"])
    # The jitted model output is the same head computation.
    full = setup["forward"](setup["params"], setup["rest"], batch)
    np.testing.assert_allclose(full["cross_modal"], outs[True]["cross_modal"], atol=1e-6)


@pytest.mark.torch
def test_loss_matches_official_composition(setup):
    model, batch = setup["model"], setup["batch"]
    out = setup["forward"](setup["params"], setup["rest"], batch)
    total, parts = model.loss(out, batch)
    ref_total, ref_parts = torch_ref.torch_official_loss(
        _t(out["aacm"]).permute(0, 3, 1, 2),
        _t(out["cross_modal"]).permute(0, 3, 1, 2),
        _t(out["global_logits"]),
        _t(out["routing_weights"][:, 0]),
        _t(out["routing_weights"][:, 1]),
        _t(batch["gt_mask"])[:, None],
        torch.from_numpy(np.array(batch["gt_label"])),
    )
    for key, value in ref_parts.items():
        np.testing.assert_allclose(parts[key], value.item(), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(total, ref_total.item(), rtol=1e-5)

    # README loss (include_aacm False): the official total without the 0.25 AACM term.
    model.loss_weights = tuple(dict(model.loss_weights, aacm=0.0).items())
    try:
        readme, _ = model.loss(out, batch)
    finally:
        model.loss_weights = tuple(dict(model.loss_weights, aacm=0.25).items())
    np.testing.assert_allclose(
        readme, ref_total.item() - 0.25 * ref_parts["aware"].item(), rtol=1e-5
    )

    # Images without pixel ground truth leave the pixel terms (image terms unchanged).
    no_masks = dict(batch, has_mask=jnp.zeros((B,), bool))
    _, none = model.loss(out, no_masks)
    assert float(none["seg"]) == 0.0 and float(none["aware"]) == 0.0
    np.testing.assert_allclose(none["global"], parts["global"])


def test_variants_and_bad_fields():
    paper = get_config("paper")
    assert not paper.model.text_interleave_quirk and not paper.model.loss.include_aacm
    default = get_config()
    assert default.model.text_interleave_quirk and default.model.loss.include_aacm
    assert default.optim.name == "adamw" and default.optim.weight_decay == 1e-2
    assert default.optim.warmup_fraction == 0.03 and default.data.image_size == 512
    bad = get_config("tiny")
    bad.model.layers = (1, 5)
    with pytest.raises(ValueError, match="model.layers"):
        methods.build(bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown variant"):
        get_config("tiny,foo")


def test_image_score_weight_blends_the_global_head_into_the_max():
    """``model.image_score_weight`` w: 0 is exactly the map's maximum (the official score), 1
    exactly the global head's softmax(.)[1], in between the blend; [0, 1] is enforced."""
    config = get_config("tiny")
    assert config.model.image_score_weight == 0.0
    config.model.image_score_weight = 0.25
    model = _build_from(config)
    batch = _batch()
    out = model(batch)
    map_max = np.max(out["anomaly_map"], axis=(1, 2))
    global_prob = np.asarray(jax.nn.softmax(out["global_logits"], axis=-1)[:, 1])
    assert not np.allclose(map_max, global_prob)  # the three rules below are distinguishable
    np.testing.assert_allclose(out["pred_score"], 0.25 * global_prob + 0.75 * map_max, atol=1e-7)
    for weight, expected in ((0.0, map_max), (1.0, global_prob)):
        model.image_score_weight = weight
        np.testing.assert_array_equal(model(batch)["pred_score"], expected)
    # A stored config written before the switch has no key: the official maximum.
    del config.model.image_score_weight
    assert ava_dino._image_score_weight(config.model) == 0.0
    for bad in (-0.1, 1.5):
        config = get_config("tiny")
        config.model.image_score_weight = bad
        assert config_check.problems(config) == [
            f"config.model.image_score_weight={bad}: must be {config_check.FRACTION}"
        ]
        with pytest.raises(ValueError, match="model.image_score_weight"):
            methods.build(config, rngs=nnx.Rngs(0))


def test_smoothing_sigma_smooths_the_test_map_after_the_image_score():
    """``model.smoothing_sigma`` s > 0: the test-time map is scipy's gaussian_filter of the
    cross-modal map, the image score still the unsmoothed maximum; training sees no smoothing."""
    config = get_config("tiny")
    assert config.model.smoothing_sigma == 0.0
    config.model.smoothing_sigma = 2.0
    model = _build_from(config)
    batch = _batch()
    out = model(batch)
    raw = np.asarray(out["cross_modal"][..., 1])
    expected = np.stack([scipy_ndimage.gaussian_filter(m, 2.0) for m in raw])
    np.testing.assert_allclose(out["anomaly_map"], expected, atol=1e-6)
    np.testing.assert_array_equal(out["pred_score"], np.max(raw, axis=(1, 2)))
    np.testing.assert_array_equal(model(batch, train=True)["anomaly_map"], raw)
    config.model.smoothing_sigma = -1.0
    assert config_check.problems(config) == [
        f"config.model.smoothing_sigma=-1.0: must be {config_check.NON_NEGATIVE} (0 = no smoothing)"
    ]


def _build_from(config):
    model = methods.build(config, rngs=nnx.Rngs(0))
    model.set_classes(CLASSES)
    return model


def _count_text_batches(monkeypatch) -> list[int]:
    """Rows of each jitted text-tower call of set_classes."""
    calls: list[int] = []
    original = ava_dino._unit_text_embeddings

    def counted(graphdef, state, ids):
        calls.append(int(ids.shape[0]))
        return original(graphdef, state, ids)

    monkeypatch.setattr(ava_dino, "_unit_text_embeddings", counted)
    return calls


def test_set_classes_encodes_in_batches_blocks_and_caches_on_disk(
    setup, tmp_path, monkeypatch, capsys
):
    """set_classes encodes every prompt in fixed batches with a bar on stderr and returns with the
    values computed; a second evaluation (a new process: memory cleared) reads them from the
    cache directory without running the tower; other weights or classes are encoded anew."""
    monkeypatch.setenv(text_cache.ENV_VAR, str(tmp_path))
    text_cache.clear_memory()
    calls = _count_text_batches(monkeypatch)
    capsys.readouterr()
    model = _build()
    per_class = len(ensemble_sentences(CLASSES[0])[0]) + len(ensemble_sentences(CLASSES[0])[1])
    batch = text_cache.DEFAULT_BATCH
    assert calls == [batch] * -(-len(CLASSES) * per_class // batch)
    assert "AVA-DINO class text" in capsys.readouterr().err
    assert model.class_text[...].is_ready()  # nothing left running into the first forward
    np.testing.assert_allclose(model.class_text[...], setup["model"].class_text[...], atol=1e-6)
    files = sorted(tmp_path.glob("*.npy"))
    assert [f.name.split("-")[0] for f in files] == sorted(CLASSES)

    text_cache.clear_memory()
    calls.clear()
    again = _build()
    assert calls == [] and capsys.readouterr().err == ""  # no work, no bar
    np.testing.assert_array_equal(again.class_text[...], model.class_text[...])

    # A new class is encoded alone; the cached one is read.
    calls.clear()
    again.set_classes([CLASSES[0], "zipper"])
    assert sum(calls) == -(-per_class // batch) * batch
    np.testing.assert_array_equal(again.class_text[...][0], model.class_text[...][0])

    # Other text-tower weights: another key, everything encoded again.
    calls.clear()
    ln = again.text_encoder.ln_final
    ln.scale[...] = ln.scale[...] * 1.5
    again.set_classes(CLASSES)
    assert sum(calls) == -(-len(CLASSES) * per_class // batch) * batch
    assert len(list(tmp_path.glob("*.npy"))) == 5
    assert not list(tmp_path.glob(".tmp-*"))


def test_random_weights_write_no_cache_without_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(text_cache.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    text_cache.clear_memory()
    model = _build()
    assert model._text_cache_dir() is None
    assert not list(tmp_path.rglob("*.npy"))


def test_visa_class_name_quirk_names_every_visa_class_data():
    """The official class name is ``image_path.split('/')[-4]``: the category for MVTec-layout
    paths, "Data" for VisA's ``<cls>/Data/Images/<state>/x.JPG``."""
    official, paper = get_config(), get_config("paper")
    visa = ["candle", "pcb1"]
    assert methods.text_class_names(official, "visa", visa) == ["Data", "Data"]
    assert methods.text_class_names(official, "mvtec_ad", ["bottle"]) == ["bottle"]
    assert methods.text_class_names(paper, "visa", visa) == visa
    # A config stored before the switch existed keeps the names it was trained with.
    del official.model["visa_class_name_quirk"]
    assert methods.text_class_names(official, "visa", visa) == visa


def test_evaluating_visa_prompts_data_for_every_category(tmp_path, monkeypatch):
    from zsad_jax import evaluate as evaluate_lib
    from zsad_jax.data import protocol, synthetic

    categories = ("pill", "wood")
    root = synthetic.generate(
        str(tmp_path / "bench"), image_size=48, n_train_good=1, n_test_good=1,
        n_test_defect=1, categories=categories,
    )  # fmt: skip
    records = protocol.read_dataset("mvtec_ad", root, "test", categories)
    seen = []
    original = ava_dino.AvaDino.set_classes
    monkeypatch.setattr(
        ava_dino.AvaDino,
        "set_classes",
        lambda self, names: (seen.append(names), original(self, names))[1],
    )
    config = get_config("tiny")
    model = methods.build(config, rngs=nnx.Rngs(0))
    config.data.test_set = "visa"  # scored as VisA's categories are
    result = evaluate_lib.evaluate(model, config, records=records)
    assert seen == [["Data", "Data"]]
    assert sorted(result["per_category"]) == sorted(categories)  # reported under the real names
    np.testing.assert_array_equal(model.class_text[0], model.class_text[1])
