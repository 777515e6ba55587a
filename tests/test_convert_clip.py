"""CLIP conversion, proven against transformers' PyTorch ``CLIPModel``.

A small ``CLIPModel`` with random weights is saved with ``save_pretrained`` and converted through
the CLI entry; every block output and both embeddings must match transformers to 1e-5 (float32). The
OpenAI/open_clip layout is built from the same weights with the tests' own (inverse) mapping
(tests/official/hf_clip.py) and must give identical arrays. Full-size (ViT-L/14@336) key and shape
coverage uses transformers on the meta device and ``nnx.eval_shape``, so nothing of that size is
allocated.
"""

import json
import shutil

import pytest
from extras import CONVERT_EXTRA

torch = pytest.importorskip("torch", reason=CONVERT_EXTRA)  # every test here compares with torch
pytest.importorskip("transformers", reason=CONVERT_EXTRA)

import numpy as np  # noqa: E402
from official.hf_clip import VOCAB, hf_to_openai, numpy_state, small_clip  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from convert import clip as convert_clip  # noqa: E402
from convert import verify  # noqa: E402
from zsad_jax.encoders import checkpoint  # noqa: E402
from zsad_jax.encoders.clip import ClipConfig  # noqa: E402
from zsad_jax.encoders.presets import clip_vit_l14_336  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_model():
    return small_clip()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_clip")
    hf_model.save_pretrained(path)
    (path / "vocab.json").write_text("{}")
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "clip"
    assert convert_clip.main(["--src", str(hf_dir), "--out", str(out)]) == 0
    return out


def _ids(batch: int = 3, length: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    for b, n in enumerate(rng.integers(3, length - 1, batch)):
        ids[b, 0] = VOCAB - 2
        ids[b, 1:n] = rng.integers(1, VOCAB - 2, n - 1)
        ids[b, n] = VOCAB - 1
    return ids


def test_converted_config_and_tokenizer_files(converted):
    meta = checkpoint.read_meta(converted)
    config = ClipConfig.from_dict(meta["config"])
    assert (config.vision.width, config.vision.layers, config.vision.heads) == (192, 3, 3)
    assert (config.vision.patch_size, config.vision.image_size, config.vision.output_dim) == (
        4,
        16,
        48,
    )
    assert (config.text.width, config.text.layers, config.text.heads) == (128, 3, 2)
    assert (config.text.context_length, config.text.vocab_size) == (16, VOCAB)
    assert config.vision.act == config.text.act == "quick_gelu"
    assert (converted / "vocab.json").is_file() and (converted / "merges.txt").is_file()


def test_every_block_and_embedding_match_transformers(hf_dir, converted):
    rows = convert_clip.compare(hf_dir, converted, seed=3)
    names = [n for n, _ in rows]
    assert names == [
        "vision.embed",
        "vision.block1",
        "vision.block2",
        "vision.block3",
        "vision.image_embedding",
        "text.block1",
        "text.block2",
        "text.block3",
        "text.text_embedding",
    ]
    worst = max(d for _, d in rows)
    assert worst <= TOL, rows


def test_final_embeddings_match_transformers_own_pooling(hf_model, converted):
    """transformers' own get_image_features / get_text_features (first-EOS pooling)."""
    model = checkpoint.load(converted)
    images = np.random.default_rng(5).standard_normal((2, 16, 16, 3)).astype(np.float32)
    ids = _ids(batch=2).astype(np.int32)
    with torch.no_grad():
        ref_image = hf_model.get_image_features(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        ).pooler_output.numpy()
        ref_text = hf_model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
    # The converter's compiled forward (same shapes as compare's, so compiled once per session).
    _, image, _, text, _ = convert_clip._forward_all(model, images, ids)
    np.testing.assert_allclose(image, ref_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(text, ref_text.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(model.logit_scale[...], hf_model.logit_scale.item(), rtol=1e-7)


def test_exact_gelu_checkpoint_matches_transformers(hf_dir, tmp_path):
    """``hidden_act: gelu`` (exact erf GELU in transformers) converts to act='gelu'."""
    src = tmp_path / "gelu_src"
    shutil.copytree(hf_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = cfg["text_config"]["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "gelu_out"
    convert_clip.main(["--src", str(src), "--out", str(out)])
    config = ClipConfig.from_dict(checkpoint.read_meta(out)["config"])
    assert config.vision.act == config.text.act == "gelu"
    rows = convert_clip.compare(src, out, seed=4)
    assert max(d for _, d in rows) <= TOL, rows


def test_openai_state_dict_gives_identical_arrays(hf_model, converted, tmp_path):
    openai = {k: torch.from_numpy(v) for k, v in hf_to_openai(numpy_state(hf_model)).items()}
    src = tmp_path / "ViT-tiny.pt"
    torch.save(openai, src)
    (tmp_path / convert_clip.BPE_FILE).write_bytes(b"fake bpe")
    out = tmp_path / "from_openai"
    assert convert_clip.main(["--src", str(src), "--out", str(out)]) == 0

    ours = load_file(out / checkpoint.WEIGHTS_FILE)
    reference = load_file(converted / checkpoint.WEIGHTS_FILE)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert checkpoint.read_meta(out)["config"] == checkpoint.read_meta(converted)["config"]
    assert (out / convert_clip.BPE_FILE).read_bytes() == b"fake bpe"
    # The verifier maps the OpenAI layout back to transformers in memory.
    rows = convert_clip.compare(src, out, seed=6)
    assert max(d for _, d in rows) <= TOL, rows


def test_verify_main_prints_json_and_fails_above_tolerance(hf_dir, converted, tmp_path, capsys):
    assert verify.main(["--src", str(hf_dir), "--converted", str(converted)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["outputs_compared"] == 9 and last["max_abs_diff"] <= TOL

    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    weights = load_file(broken / checkpoint.WEIGHTS_FILE)
    weights["text.blocks.1.mlp.c_fc.bias"] = weights["text.blocks.1.mlp.c_fc.bias"] + 0.01
    save_file(weights, broken / checkpoint.WEIGHTS_FILE)
    assert verify.main(["--src", str(hf_dir), "--converted", str(broken)]) == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["max_abs_diff"] > TOL


def test_missing_and_unexpected_keys_are_listed(hf_model):
    state = numpy_state(hf_model)
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    state["vision_model.extra_adapter.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        convert_clip.convert_state(state, source="bad.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message
    assert "text_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "vision_model.extra_adapter.weight" in message


def test_mis_shaped_key_is_listed(hf_model):
    state = numpy_state(hf_model)
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    state[key] = state[key][:100]
    with pytest.raises(ValueError, match=r"vision\.blocks\.1\.mlp\.c_fc\.kernel"):
        convert_clip.convert_state(state, source="bad.safetensors")


def test_unknown_checkpoint_names_its_keys():
    with pytest.raises(ValueError, match="not a CLIP checkpoint.*encoder.weight"):
        convert_clip.convert_state({"encoder.weight": np.zeros(2)}, source="x.pt")


def _meta_state(config: CLIPConfig) -> tuple[dict[str, np.ndarray], int]:
    """Shape-only arrays (zero-stride, one byte) of transformers' model built on the meta device."""
    with torch.device("meta"):
        model = CLIPModel(config)
    state = {
        k: np.broadcast_to(np.bool_(False), tuple(v.shape)) for k, v in model.state_dict().items()
    }
    return state, sum(p.numel() for p in model.parameters())


def test_full_size_vit_l14_336_every_key_mapped(tmp_path):
    hf_config = CLIPConfig(
        projection_dim=768,
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=336,
            projection_dim=768,
        ),
        text_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=768,
        ),
    )
    hf_config.save_pretrained(tmp_path)
    state, hf_params = _meta_state(hf_config)
    expected = clip_vit_l14_336()
    shapes = convert_clip.model_shapes(expected)
    assert sum(int(np.prod(s)) for s in shapes.values()) == hf_params

    config, arrays, layout = convert_clip.convert_state(
        state, source="meta", hf_config=tmp_path / "config.json"
    )
    assert layout == "transformers" and config == expected
    assert {k: a.shape for k, a in arrays.items()} == shapes

    config, arrays, layout = convert_clip.convert_state(hf_to_openai(state), source="meta-openai")
    assert layout == "openai" and config == expected
    assert {k: a.shape for k, a in arrays.items()} == shapes
