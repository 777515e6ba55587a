"""Backbone building: converted checkpoints, presets, the missing-weights message, one part only."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.ava_dino import get_config
from zsad_jax import checkpoint as ckpt_lib
from zsad_jax import train as train_lib
from zsad_jax.data import synthetic
from zsad_jax.encoders import checkpoint, clip, presets
from zsad_jax.methods import backbone

CATEGORIES = ("wood", "pill")


def _cfg(kind="clip", checkpoint_dir=None, preset="tiny", random_init=False):
    return ml_collections.ConfigDict(
        {"kind": kind, "checkpoint": checkpoint_dir, "preset": preset, "random_init": random_init}
    )


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A random tiny CLIP written in the converted format (what convert.clip writes)."""
    model = backbone.build_backbone(_cfg(random_init=True), rngs=nnx.Rngs(3))
    out = tmp_path_factory.mktemp("ckpt") / "clip-tiny"
    arrays = {k: np.asarray(v) for k, v in checkpoint.flat_state(model).items()}
    checkpoint.save(out, "clip", model.config.to_dict(), arrays, source="test")
    return model, out


def test_missing_weights_names_the_path_and_the_convert_command(tmp_path):
    cfg = _cfg(checkpoint_dir=str(tmp_path / "nowhere"), preset="vit_l14_336")
    with pytest.raises(FileNotFoundError) as err:
        backbone.build_backbone(cfg, rngs=nnx.Rngs(0))
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "python -m convert.clip --src SRC --out" in message
    assert "config.model.backbone.checkpoint" in message
    relative = _cfg(checkpoint_dir="weights/nowhere", preset="vit_l14_336")
    with pytest.raises(FileNotFoundError, match=r"weights there \(read from /"):
        backbone.build_backbone(relative, rngs=nnx.Rngs(0))  # says where a relative path is read


def test_full_size_builds_abstractly_without_weights(tmp_path):
    cfg = _cfg(checkpoint_dir=str(tmp_path / "nowhere"), preset="vit_l14_336")
    model = nnx.eval_shape(
        lambda: backbone.build_backbone(cfg, rngs=nnx.Rngs(0), load_weights=False)
    )
    assert model.vision.conv1.kernel.shape == (14, 14, 3, 1024)
    dino = _cfg("dinov3", str(tmp_path / "nowhere"), "vitl16")
    model = nnx.eval_shape(
        lambda: backbone.build_backbone(dino, rngs=nnx.Rngs(0), load_weights=False)
    )
    assert len(model.blocks) == 24


def test_loads_converted_weights_and_one_part(saved_clip):
    model, path = saved_clip
    cfg = _cfg(checkpoint_dir=str(path))
    loaded = backbone.build_backbone(cfg, rngs=nnx.Rngs(99))
    for key, value in checkpoint.flat_state(model).items():
        np.testing.assert_array_equal(checkpoint.flat_state(loaded)[key], value, err_msg=key)
    text = backbone.build_backbone(cfg, rngs=nnx.Rngs(99), part="text")
    assert isinstance(text, clip.ClipText)
    ids = jnp.asarray(backbone.byte_tokenizer()(["a b", "c"]))
    np.testing.assert_array_equal(text(ids)[0], model.text(ids)[0])
    abstract = nnx.eval_shape(
        lambda: backbone.build_backbone(cfg, rngs=nnx.Rngs(0), load_weights=False, part="text")
    )
    assert jax.tree.map(lambda a: a.shape, nnx.state(abstract)) == jax.tree.map(
        lambda a: a.shape, nnx.state(text)
    )


def test_kind_mismatch_and_unknown_preset_are_named(saved_clip):
    _, path = saved_clip
    with pytest.raises(ValueError, match="holds a clip encoder"):
        backbone.build_backbone(_cfg("dinov3", str(path)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="preset='huge'"):
        backbone.build_backbone(_cfg(preset="huge", random_init=True), rngs=nnx.Rngs(0))


def test_byte_tokenizer_fits_random_text_towers():
    tok = backbone.byte_tokenizer()
    ids = tok(["a photo of a damaged bottle."])
    assert tok.vocab_size == presets.BYTE_VOCAB_SIZE
    text = "a photo of a damaged bottle."
    assert ids[0, 0] == tok.sos_id and ids[0, len(text.replace(" ", "")) + 1] == tok.eot_id
    assert tok.decode(ids[0]).strip() == "a photo of a damaged bottle ."  # "." is its own word
    tiny = backbone.build_backbone(_cfg(random_init=True), rngs=nnx.Rngs(0))
    assert tiny.text.config.vocab_size == tok.vocab_size


def _convert_tiny_dinov3(out, seed: int) -> None:
    """What ``convert.dinov3`` writes to ``out``: a random tiny DINOv3, weights from ``seed``."""
    cfg = _cfg("dinov3", random_init=True)
    model = backbone.build_backbone(cfg, rngs=nnx.Rngs(seed))
    arrays = {k: np.asarray(v) for k, v in checkpoint.flat_state(model).items()}
    checkpoint.save(out, "dinov3", model.config.to_dict(), arrays, source=f"seed {seed}")


@pytest.mark.slow
def test_other_weights_in_the_backbone_folder_are_refused_not_used(tmp_path):
    """A checkpoint records the sha256 of each frozen encoder's weights (meta ``encoders``): the
    same folder re-converted from another source made evaluate run silently on other features."""
    weights = tmp_path / "weights" / "dinov3-tiny"
    _convert_tiny_dinov3(weights, seed=3)
    config = get_config("tiny")
    config.model.backbone.update(checkpoint=str(weights), random_init=False)
    bench = synthetic.generate(str(tmp_path / "bench"), image_size=48, n_train_good=0,
                               n_test_good=2, n_test_defect=2, categories=CATEGORIES)  # fmt: skip
    config.data.update(train_root=bench, test_root=bench, categories=CATEGORIES[:1],
                       test_categories=CATEGORIES[1:], batch_size=8)  # fmt: skip
    config.optim.steps = 1
    config.eval.enabled = False
    train_lib.train(config, tmp_path / "run", progress=False)
    meta = ckpt_lib.read_meta(tmp_path / "run")
    assert meta["encoders"] == {"model.backbone": checkpoint.weights_digest(weights)}
    ckpt_lib.load_for_inference(tmp_path / "run")  # the same weights: loads

    _convert_tiny_dinov3(weights, seed=4)  # other weights, same architecture, same folder
    with pytest.raises(ValueError, match=r"trained on other backbone weights than .*dinov3-tiny"):
        ckpt_lib.load_for_inference(tmp_path / "run")
    config.optim.steps = 2  # resuming (a changed step count) meets the same refusal
    with pytest.raises(ValueError, match="trained on other backbone weights"):
        train_lib.train(config, tmp_path / "run", progress=False, allow_config_change=True)


def test_saving_into_a_folder_of_other_files_is_refused_and_deletes_nothing(tmp_path):
    # save() replaces its output folder whole: over a user's folder (--out ~/models) that was
    # a silent deletion.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.pt").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="holds other files than a converted checkpoint"):
        _convert_tiny_dinov3(tmp_path / "models", seed=0)
    assert (tmp_path / "models" / "mine.pt").read_bytes() == b"keep me"
    (tmp_path / "models" / "config.json").write_text('{"model_type": "clip"}')  # a HF folder
    with pytest.raises(FileExistsError, match="holds other files than a converted checkpoint"):
        _convert_tiny_dinov3(tmp_path / "models", seed=0)
    _convert_tiny_dinov3(tmp_path / "converted", seed=0)
    _convert_tiny_dinov3(tmp_path / "converted", seed=1)  # a converted checkpoint is replaced


def _modes(folder) -> dict:
    return {p.name: p.stat().st_mode & 0o777 for p in (folder, *folder.iterdir())}


def test_a_converted_checkpoint_is_readable_by_others_as_the_umask_allows(tmp_path):
    """mkdtemp made the folder 0700 and safetensors the weights 0600: a checkpoint converted on
    a shared filesystem could be read by its converter only."""
    umask = os.umask(0o022)  # the usual one, whatever this machine's is
    try:
        _convert_tiny_dinov3(tmp_path / "dinov3-tiny", seed=3)
    finally:
        os.umask(umask)
    folder = tmp_path / "dinov3-tiny"
    files = {"config.json": 0o644, "weights.safetensors": 0o644}
    assert _modes(folder) == {folder.name: 0o755, **files}
    umask = os.umask(0o077)  # a private umask is kept private
    try:
        _convert_tiny_dinov3(folder, seed=3)
    finally:
        os.umask(umask)
    assert set(_modes(folder).values()) <= {0o700, 0o600}


def test_a_replacement_that_fails_keeps_the_old_checkpoint_whole(tmp_path, monkeypatch):
    """The old folder used to be deleted before the new one was renamed into place: a failure
    (or a kill) in between lost the checkpoint that was there."""
    folder = tmp_path / "dinov3-tiny"
    _convert_tiny_dinov3(folder, seed=3)
    digest = checkpoint.weights_digest(folder)
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(f".{folder.name}.") and Path(dst) == folder:
            raise OSError("disk full")  # the new folder's rename into place
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    monkeypatch.setattr(os, "replace", failing_rename)  # the call save used before
    with pytest.raises(OSError, match="disk full"):
        _convert_tiny_dinov3(folder, seed=4)
    monkeypatch.undo()
    assert checkpoint.weights_digest(folder) == digest
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind
    _convert_tiny_dinov3(folder, seed=4)  # a replacement that succeeds replaces it
    assert checkpoint.weights_digest(folder) != digest
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_an_out_that_is_a_link_is_written_where_it_points(tmp_path):
    """A folder cannot be renamed onto a link: an ``--out`` linked to another disk ended in a raw
    ``OSError`` (Not a directory) instead of the checkpoint."""
    target = tmp_path / "big_disk" / "dinov3-tiny"
    target.mkdir(parents=True)
    link = tmp_path / "dinov3-tiny"
    link.symlink_to(target, target_is_directory=True)
    _convert_tiny_dinov3(link, seed=3)  # into the empty folder it points to
    digest = checkpoint.weights_digest(target)
    _convert_tiny_dinov3(link, seed=4)  # and a converted checkpoint there is replaced
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert checkpoint.weights_digest(link) == checkpoint.weights_digest(target) != digest
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # nothing staged left
