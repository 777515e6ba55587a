"""DINOv3 ViT encoder and its conversion, proven against transformers' ``DINOv3ViTModel``.

The reference models have random weights at unit-variance scales (every Linear ~ 1/sqrt(fan_in),
LayerScale in [0.1, 0.6], non-zero biases and tokens), so attention is far from uniform, RoPE
matters, and every weight shows up in the outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from extras import optional
from flax import nnx
from safetensors.numpy import load_file, save_file

from zsad_jax.encoders import checkpoint, dinov3, presets

# None without the convert extra; the tests that use them are marked torch (tests/extras.py).
torch = optional("torch")
transformers = optional("transformers")
convert_dinov3 = optional("convert.dinov3")
verify = optional("convert.verify")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,  # head_dim 16: 4 RoPE frequencies per axis
    num_register_tokens=4,
    patch_size=16,
)
TOL = 1e-5


def _randomise(model: transformers.DINOv3ViTModel, seed: int) -> transformers.DINOv3ViTModel:
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):  # LayerScale: far from its constant init
                p.copy_(0.1 + 0.5 * torch.rand(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * randn(p.shape))
            elif name.endswith("proj.weight") or name == "embeddings.patch_embeddings.weight":
                p.copy_(randn(p.shape) / p[0].numel() ** 0.5)  # unit-variance outputs
            else:  # biases, CLS / register / mask tokens
                p.copy_(0.3 * randn(p.shape))
    return model.eval()


def _reference(seed: int = 0, **overrides) -> transformers.DINOv3ViTModel:
    config = transformers.DINOv3ViTConfig(**{**TINY, **overrides})
    return _randomise(
        transformers.DINOv3ViTModel._from_config(config, attn_implementation="eager"), seed
    )


def _run_reference(model, images):
    with torch.no_grad():
        out = model(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
            output_hidden_states=True,
        )
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


def _run_ours(model, images):
    layers = tuple(range(1, model.config.num_layers + 1))
    tokens, aux = nnx.jit(lambda m, x: m(x, layers=layers))(model, images)
    return {i: np.asarray(v) for i, v in aux["layers"].items()}, np.asarray(tokens)


def _images(height, width, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_model():
    return _reference(seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "dinov3-tiny"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "dinov3"
    assert convert_dinov3.main(["--src", str(hf_dir), "--out", str(out)]) == 0
    return out


def _assert_parity(reference, ours_model, images):
    hidden, last = _run_reference(reference, images)
    layers, tokens = _run_ours(ours_model, images)
    # hidden_states[0] is the embedding output, so block i (1-indexed) is hidden_states[i].
    assert len(hidden) == ours_model.config.num_layers + 1
    for i, tap in layers.items():
        assert tap.shape == hidden[i].shape
        np.testing.assert_allclose(tap, hidden[i], rtol=0, atol=TOL, err_msg=f"block {i}")
    np.testing.assert_allclose(tokens, last, rtol=0, atol=TOL, err_msg="final normed tokens")
    return last


@pytest.mark.torch
@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)], ids=["square", "non_square"])
def test_converted_matches_transformers_every_block(hf_model, converted, height, width):
    model = checkpoint.load(converted)
    assert isinstance(model, dinov3.DinoV3)
    images = _images(height, width)
    last = _assert_parity(hf_model, model, images)
    grid = (height // 16) * (width // 16)
    assert last.shape == (2, model.num_prefix_tokens + grid, TINY["hidden_size"])
    assert model.num_prefix_tokens == 1 + TINY["num_register_tokens"]

    # The comparison is sensitive to RoPE: another theta with the same weights is far off.
    wrong_rope = checkpoint.load_flat_state(
        dinov3.DinoV3(
            dinov3.DinoV3Config(**{**model.config.to_dict(), "rope_theta": 10_000.0}),
            rngs=nnx.Rngs(0),
        ),
        load_file(converted / checkpoint.WEIGHTS_FILE),
        source="test",
    )
    _, wrong_tokens = _run_ours(wrong_rope, images)
    assert np.abs(wrong_tokens - last).max() > 100 * TOL


@pytest.mark.torch
def test_gated_mlp_without_registers_matches_transformers(tmp_path):
    reference = _reference(
        seed=1, use_gated_mlp=True, hidden_act="silu", num_register_tokens=0, num_hidden_layers=2
    )
    reference.save_pretrained(tmp_path / "hf")
    convert_dinov3.main(["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    model = checkpoint.load(tmp_path / "out")
    assert model.config.use_gated_mlp and model.config.act == "silu"
    assert model.num_prefix_tokens == 1
    _assert_parity(reference, model, _images(32, 48))


@pytest.mark.torch
def test_in_memory_key_names_convert_identically(hf_dir, converted, tmp_path):
    """Files name blocks ``layer.N``; transformers >= 5 state dicts call them ``model.layer.N``."""
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    state = load_file(hf_dir / "model.safetensors")
    assert any(k.startswith("layer.") for k in state)
    state = {f"model.{k}" if k.startswith("layer.") else k: v for k, v in state.items()}
    save_file(state, renamed / "model.safetensors")
    (renamed / "config.json").write_text((hf_dir / "config.json").read_text())
    convert_dinov3.main(["--src", str(renamed), "--out", str(tmp_path / "out")])
    _assert_same_arrays(tmp_path / "out", converted)


def _assert_same_arrays(a, b):
    left, right = load_file(a / checkpoint.WEIGHTS_FILE), load_file(b / checkpoint.WEIGHTS_FILE)
    assert sorted(left) == sorted(right)
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)
    assert checkpoint.read_meta(a)["config"] == checkpoint.read_meta(b)["config"]


def _original_layout(
    hf_model: transformers.DINOv3ViTModel, *, key_bias=0.7, with_mask=True
) -> dict:
    """The facebookresearch/dinov3 state dict holding ``hf_model``'s weights."""
    sd = {k: v.clone() for k, v in hf_model.state_dict().items()}
    d = TINY["hidden_size"]
    head_dim = d // TINY["num_attention_heads"]
    # dinov3/layers/rope_position_encoding.py: periods = base ** (2 * arange(D/4) / (D/2)).
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, d),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": periods,
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    for i in range(TINY["num_hidden_layers"]):
        hf, orig = f"model.layer.{i}", f"blocks.{i}"
        att = f"{hf}.attention"
        out[f"{orig}.attn.qkv.weight"] = torch.cat(
            [sd[f"{att}.{p}_proj.weight"] for p in "qkv"], dim=0
        )
        # A stored key bias that bias_mask zeroes must not leak into the conversion.
        out[f"{orig}.attn.qkv.bias"] = torch.cat(
            [sd[f"{att}.q_proj.bias"], torch.full((d,), key_bias), sd[f"{att}.v_proj.bias"]]
        )
        if with_mask:
            out[f"{orig}.attn.qkv.bias_mask"] = torch.cat(
                [torch.ones(d), torch.zeros(d), torch.ones(d)]
            )
        out[f"{orig}.attn.proj.weight"] = sd[f"{att}.o_proj.weight"]
        out[f"{orig}.attn.proj.bias"] = sd[f"{att}.o_proj.bias"]
        for n in (1, 2):
            out[f"{orig}.norm{n}.weight"] = sd[f"{hf}.norm{n}.weight"]
            out[f"{orig}.norm{n}.bias"] = sd[f"{hf}.norm{n}.bias"]
            out[f"{orig}.ls{n}.gamma"] = sd[f"{hf}.layer_scale{n}.lambda1"]
        for orig_name, hf_name in (("fc1", "up_proj"), ("fc2", "down_proj")):
            for p in ("weight", "bias"):
                out[f"{orig}.mlp.{orig_name}.{p}"] = sd[f"{hf}.mlp.{hf_name}.{p}"]
    return out


@pytest.mark.torch
def test_original_pth_converts_to_the_same_arrays(hf_model, converted, tmp_path, capsys):
    src = tmp_path / "dinov3_vitt16_pretrain_test-00000000.pth"
    torch.save(_original_layout(hf_model), src)
    out = tmp_path / "from_pth"
    assert convert_dinov3.main(["--src", str(src), "--out", str(out)]) == 0
    _assert_same_arrays(out, converted)

    # The verifier rebuilds the transformers reference from the .pth layout too.
    capsys.readouterr()
    assert verify.main(["--src", str(src), "--converted", str(out), "--tolerance", str(TOL)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["outputs_compared"] == TINY["num_hidden_layers"] + 1


@pytest.mark.torch
def test_original_unmasked_key_bias_is_rejected(hf_model, tmp_path):
    src = tmp_path / "unmasked.pth"
    torch.save(_original_layout(hf_model, with_mask=False), src)
    with pytest.raises(ValueError, match="non-zero .*key bias"):
        convert_dinov3.convert(src, tmp_path / "out")


@pytest.mark.torch
def test_original_rope_periods_must_match_theta(hf_model, tmp_path):
    state = _original_layout(hf_model)
    state["rope_embed.periods"] = state["rope_embed.periods"] * 1.5
    src = tmp_path / "other_rope.pth"
    torch.save(state, src)
    with pytest.raises(ValueError, match="rope_embed.periods"):
        convert_dinov3.convert(src, tmp_path / "out")


@pytest.mark.torch
def test_verify_cli_reports_every_block(hf_dir, converted, capsys):
    capsys.readouterr()
    assert verify.main(["--src", str(hf_dir), "--converted", str(converted)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["outputs_compared"] == TINY["num_hidden_layers"] + 1
    assert summary["max_abs_diff"] <= TOL
    assert [line.split()[0] for line in lines[:-1]] == [
        "block_01",
        "block_02",
        "block_03",
        "output",
    ]


@pytest.mark.torch
def test_missing_and_unknown_keys_are_listed(hf_dir, tmp_path):
    state = load_file(hf_dir / "model.safetensors")
    del state["layer.1.mlp.up_proj.bias"]
    state["layer.1.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, bad / "model.safetensors")
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError) as err:
        convert_dinov3.main(["--src", str(bad), "--out", str(tmp_path / "out")])
    message = str(err.value)
    assert "absent" in message and "layer.1.mlp.up_proj.bias" in message
    assert "unused" in message and "layer.1.mlp.extra.weight" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.torch
def test_vitl16_matches_transformers_by_shape():
    """Full-size ViT-L/16 without allocating weights: every key mapped, same parameter count."""
    config = presets.dinov3_vitl16()
    assert (config.hidden_size, config.num_layers, config.num_heads, config.mlp_dim) == (
        1024,
        24,
        16,
        4096,
    )
    # facebook/dinov3-vitl16-pretrain-lvd1689m config.json (architecture fields).
    hf_config = transformers.DINOv3ViTConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_register_tokens=4,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        rope_theta=100.0,
        use_gated_mlp=False,
        key_bias=False,
    )
    assert convert_dinov3.config_from_transformers(hf_config.to_dict(), source="hub") == config
    with torch.device("meta"):
        reference = transformers.DINOv3ViTModel(hf_config)
    # Zero-stride stand-ins: the name table only transposes, so nothing is allocated.
    state = {
        k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in reference.state_dict().items()
    }
    arrays = convert_dinov3.from_transformers(state, config, source="meta")
    expected = convert_dinov3.model_shapes(config)
    assert sorted(arrays) == sorted(expected)
    for key, shape in expected.items():
        assert tuple(arrays[key].shape) == shape, key
    ours = sum(int(np.prod(s)) for s in expected.values())
    theirs = sum(p.numel() for p in reference.parameters())
    # The only unmapped weight is the mask token of masked-image pre-training.
    assert ours == theirs - reference.embeddings.mask_token.numel()
    assert 300_000_000 < ours < 305_000_000


@pytest.mark.torch
def test_compute_dtype_override_and_input_checks(converted):
    reference = checkpoint.load(converted)
    half = checkpoint.load(converted, dtype="bfloat16")
    assert half.config.dtype == "bfloat16"
    images = _images(32, 32, batch=1)
    _, full_tokens = _run_ours(reference, images)
    half_layers, half_tokens = _run_ours(half, images)
    assert half_tokens.dtype == np.float32 and half_layers[2].dtype == np.float32
    # bfloat16 matmuls: close to float32 but not identical.
    err = np.abs(half_tokens - full_tokens)
    assert 0 < err.max() < 0.25 and err.mean() < 0.03

    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        reference(_images(32, 40, batch=1))
    with pytest.raises(ValueError, match="1-indexed"):
        reference(images, layers=[0])
    with pytest.raises(ValueError, match="only 'dtype'"):
        checkpoint.load(converted, patch_size=8)
    with pytest.raises(ValueError, match="unknown field"):
        dinov3.DinoV3Config.from_dict({"hidden": 3})
    vitb16 = presets.dinov3_vitb16()
    assert dinov3.DinoV3Config.from_dict(vitb16.to_dict()) == vitb16
