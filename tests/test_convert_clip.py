"""CLIP conversion, proven against transformers' PyTorch ``CLIPModel``.

A small ``CLIPModel`` with random weights is saved with ``save_pretrained`` and converted through
the CLI entry; every block output and both embeddings must match transformers to 1e-5 (float32). The
OpenAI/open_clip layout is built from the same weights with the tests' own (inverse) mapping
(tests/official/hf_clip.py) and must give identical arrays. Full-size (ViT-L/14@336) key and shape
coverage uses transformers on the meta device and ``nnx.eval_shape``, so nothing of that size is
allocated.
"""

import gzip
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
from zsad_jax.encoders import tokenizer as tk  # noqa: E402
from zsad_jax.encoders.clip import ClipConfig  # noqa: E402
from zsad_jax.encoders.presets import clip_vit_l14_336  # noqa: E402
from zsad_jax.errors import run_command  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_model():
    return small_clip()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_clip")
    hf_model.save_pretrained(path)
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


# The smallest CLIP byte-level tokenizer: 512 byte symbols + SOS + EOT (ids 0..513), no merges.
BYTE_VOCAB = tk.openai_vocab([])


def _write_byte_tokenizer(folder) -> None:
    (folder / "vocab.json").write_text(json.dumps(BYTE_VOCAB), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _with_text_rows(hf_dir, dst, rows: int):
    """A copy of ``hf_dir`` whose text token embedding has ``rows`` rows (the test model's VOCAB
    rows, then zeros), so that a real CLIP tokenizer fits it."""
    shutil.copytree(hf_dir, dst)
    state = load_file(dst / "model.safetensors")
    key = "text_model.embeddings.token_embedding.weight"
    state[key] = np.concatenate([state[key], np.zeros((rows - VOCAB, state[key].shape[1]))])
    state = {k: np.array(v, np.float32, order="C") for k, v in state.items()}
    save_file(state, dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = rows
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_files_that_fit_are_copied_and_load(hf_dir, tmp_path):
    src = _with_text_rows(hf_dir, tmp_path / "src", rows=len(BYTE_VOCAB))
    _write_byte_tokenizer(src)
    out = tmp_path / "out"
    assert convert_clip.main(["--src", str(src), "--out", str(out)]) == 0
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    assert tk.ClipTokenizer.from_dir(out).eot_id == len(BYTE_VOCAB) - 1


def test_tokenizer_with_ids_past_the_text_embedding_is_refused(hf_dir, tmp_path, capsys):
    """The user's case: conversion and verify passed, then every training step was NaN."""
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    _write_byte_tokenizer(src)  # ids up to 513 for a text tower of VOCAB (100) rows
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_command(convert_clip.main, ["--src", str(src), "--out", str(out)])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert str(src / "vocab.json") in err and "513" in err and f"{VOCAB} token embedding" in err
    assert not out.exists()


def test_a_vocab_json_with_a_repeated_token_is_refused(hf_dir, tmp_path):
    src = _with_text_rows(hf_dir, tmp_path / "src", rows=len(BYTE_VOCAB) + 1)
    _write_byte_tokenizer(src)
    tokens = list(BYTE_VOCAB)  # "a" a second time: every later id moves up by one
    lines = [f"{json.dumps(t)}: {i}" for i, t in enumerate(tokens[:100] + ["a"] + tokens[100:])]
    (src / "vocab.json").write_text("{" + ", ".join(lines) + "}", encoding="utf-8")
    with pytest.raises(ValueError, match="'a' appears twice"):
        convert_clip.convert(src, tmp_path / "out")


def test_one_tokenizer_file_of_two_is_refused(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "vocab.json").write_text(json.dumps(BYTE_VOCAB))
    with pytest.raises(FileNotFoundError, match="but not merges.txt"):
        convert_clip.convert(src, tmp_path / "out")


def _fake_converted(folder, kind: str) -> None:
    """A folder that reads as a converted ``kind`` checkpoint (what --out must not replace)."""
    folder.mkdir(parents=True)
    meta = {"format": checkpoint.FORMAT, "type": kind, "config": {}, "source": "test"}
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    save_file({"x": np.zeros(1, np.float32)}, folder / checkpoint.WEIGHTS_FILE)


def test_out_holding_a_converted_checkpoint_needs_overwrite(hf_dir, tmp_path, capsys):
    out = tmp_path / "weights" / "dinov3-vitl16"
    _fake_converted(out, "dinov3")
    before = (out / checkpoint.CONFIG_FILE).read_text()
    with pytest.raises(SystemExit) as stop:
        run_command(convert_clip.main, ["--src", str(hf_dir), "--out", str(out)])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}: already holds a converted dinov3 checkpoint")
    assert "--overwrite" in err and "another --out" in err and "\n" not in err
    assert (out / checkpoint.CONFIG_FILE).read_text() == before

    argv = ["--src", str(hf_dir), "--out", str(out), "--overwrite"]
    assert convert_clip.main(argv) == 0
    assert checkpoint.read_meta(out)["type"] == "clip"


def test_out_holding_other_files_is_refused_even_with_overwrite(hf_dir, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="notes.txt.*would delete them"):
            convert_clip.main(["--src", str(hf_dir), "--out", str(out), *extra])
    assert (out / "notes.txt").read_text() == "mine"


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
    out = tmp_path / "from_openai"
    assert convert_clip.main(["--src", str(src), "--out", str(out)]) == 0

    ours = load_file(out / checkpoint.WEIGHTS_FILE)
    reference = load_file(converted / checkpoint.WEIGHTS_FILE)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert checkpoint.read_meta(out)["config"] == checkpoint.read_meta(converted)["config"]
    # The verifier maps the OpenAI layout back to transformers in memory.
    rows = convert_clip.compare(src, out, seed=6)
    assert max(d for _, d in rows) <= TOL, rows


def test_openai_bpe_file_is_read_checked_and_copied(hf_model, tmp_path):
    openai = hf_to_openai(numpy_state(hf_model))
    rows = len(BYTE_VOCAB)  # a BPE file with no merges gives the byte-level ids 0..513
    emb = openai["token_embedding.weight"]
    openai["token_embedding.weight"] = np.concatenate([emb, np.zeros((rows - VOCAB, emb.shape[1]))])
    openai["vocab_size"] = np.asarray(rows)
    src = tmp_path / "ViT-tiny.pt"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in openai.items()}, src)
    with gzip.open(tmp_path / convert_clip.BPE_FILE, "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt#version: 0.2\n")
    out = tmp_path / "out"
    assert convert_clip.main(["--src", str(src), "--out", str(out)]) == 0
    assert tk.ClipTokenizer.from_dir(out).vocab_size == rows

    not_gzip = tmp_path / "other" / convert_clip.BPE_FILE
    not_gzip.parent.mkdir()
    not_gzip.write_bytes(b"fake bpe")
    with pytest.raises(ValueError, match="not readable as CLIP tokenizer files"):
        convert_clip.convert(src, tmp_path / "out2", bpe=not_gzip)
    assert not (tmp_path / "out2").exists()


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
