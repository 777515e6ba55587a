"""convert.torchscript: TorchScript archives (OpenAI's CLIP releases) read as data, never run.

Archives written by ``torch.jit.save`` (traced and scripted, half/int/non-contiguous tensors,
Optional and plain attributes) give exactly ``torch.jit.load(...).state_dict()``, while
``torch.jit.load`` is made to fail; an OpenAI-layout CLIP archive converts to the same arrays as the
same weights saved with ``torch.save``; crafted files (a foreign global in data.pkl or in a pickled
state dict, a tensor reaching outside its storage) are refused without running anything.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
from extras import CONVERT_EXTRA

torch = pytest.importorskip("torch", reason=CONVERT_EXTRA)  # the convert package needs torch
pytest.importorskip("transformers", reason=CONVERT_EXTRA)

import numpy as np  # noqa: E402
from official.hf_clip import hf_to_openai, numpy_state, small_clip  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from convert import clip as convert_clip  # noqa: E402
from convert import common, torchscript  # noqa: E402
from zsad_jax.encoders import checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
    return small_clip()


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(4)
        self.attn = torch.nn.MultiheadAttention(4, 2)

    def forward(self, x):
        return self.ln(x) + self.attn(x, x, x)[0]


class _Traced(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(), _Block())
        self.proj = torch.nn.Parameter(torch.randn(3, 4).T.half())  # half, non-contiguous
        self.register_buffer("input_resolution", torch.tensor(336))

    def forward(self, x):
        return self.blocks(x) @ self.proj.float()


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4).T)
        self.b: torch.Tensor | None = None  # an Optional parameter left out of state_dict
        self.plain = torch.ones(2)  # an attribute, not a parameter or buffer
        self.sizes = [1, 2, 3]
        self.scale = 2.5
        self.register_buffer("ids", torch.arange(4, dtype=torch.int32))

    def forward(self, x):
        return x @ self.w + self.plain.sum() * self.scale


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_archive_gives_the_state_dict_of_torch_jit_load(kind, tmp_path, monkeypatch):
    torch.manual_seed(0)
    if kind == "traced":
        module = torch.jit.trace(_Traced(), torch.randn(2, 4))
    else:
        module = torch.jit.script(_Scripted())
    path = tmp_path / "model.pt"
    module.save(str(path))
    want = {k: v.detach().numpy() for k, v in torch.jit.load(str(path)).state_dict().items()}

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    assert torchscript.is_torchscript(path)
    got = torchscript.read_state(path)
    assert list(got) == list(want)
    for key, value in want.items():
        assert isinstance(got[key], np.ndarray) and got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    as_float32 = common.load_torch_state(path)  # what the converters get
    for key, value in want.items():
        assert as_float32[key].dtype == (np.float32 if value.dtype.kind == "f" else value.dtype)
        np.testing.assert_array_equal(as_float32[key], value.astype(as_float32[key].dtype))


def _script_archive(state: dict[str, np.ndarray], path) -> None:
    """A TorchScript archive whose state_dict is ``state`` (OpenAI's releases are such files)."""
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if name not in node._modules:
                node.add_module(name, torch.nn.Module())
            node = node._modules[name]
        tensor = torch.from_numpy(np.array(value, order="C"))  # ascontiguousarray makes 0-d 1-d
        if tensor.is_floating_point():
            node.register_parameter(leaf, torch.nn.Parameter(tensor))
        else:
            node.register_buffer(leaf, tensor)
    torch.jit.script(root).save(str(path))


def test_openai_torchscript_archive_converts_like_its_state_dict(hf_model, tmp_path, monkeypatch):
    half = {
        k: v.astype(np.float16) if v.dtype.kind == "f" else v
        for k, v in hf_to_openai(numpy_state(hf_model)).items()
    }  # OpenAI ships float16 weights
    pickled, archive = tmp_path / "pickled" / "ViT-tiny.pt", tmp_path / "jit" / "ViT-tiny.pt"
    pickled.parent.mkdir()
    archive.parent.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in half.items()}, pickled)
    _script_archive(half, archive)
    monkeypatch.setattr(torch.jit, "load", pytest.fail)
    assert convert_clip.main(["--src", str(pickled), "--out", str(tmp_path / "a")]) == 0
    assert convert_clip.main(["--src", str(archive), "--out", str(tmp_path / "b")]) == 0
    a = load_file(tmp_path / "a" / checkpoint.WEIGHTS_FILE)
    b = load_file(tmp_path / "b" / checkpoint.WEIGHTS_FILE)
    assert sorted(a) == sorted(b) and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class _RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip(path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def test_an_archive_whose_data_pkl_calls_a_function_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    _zip(path, {"evil/constants.pkl": pickle.dumps(()), "evil/data.pkl": pickle.dumps(
        {"w": _RunsCode(marker)}, protocol=2)})  # fmt: skip
    with pytest.raises(ValueError, match="system") as refused:
        common.load_torch_state(path)
    assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)
    assert not marker.exists()


def test_a_pickled_state_dict_that_calls_a_function_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="pickled Python objects.*system.*not loaded") as refused:
        common.load_torch_state(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "convert it to .safetensors in an environment where you trust the file" in message
    # torch's own message advises weights_only=False, the step that would run the file's code.
    assert "weights_only" not in message and "likely succeed" not in message
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "page.pt"
    path.write_bytes(b"<html>a download page, not the weights</html>")
    with pytest.raises(ValueError, match="is the file complete") as refused:
        common.load_torch_state(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "weights_only" not in message and "likely succeed" not in message


class _Storage:
    pass


class _Tensor:
    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, self.size, (1,), False,
                                                 OrderedDict())  # fmt: skip


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Storage) else None


def test_a_tensor_reaching_outside_its_storage_is_refused(tmp_path):
    def archive(size) -> bytes:
        buffer = io.BytesIO()
        _StoragePickler(buffer, protocol=2).dump({"w": _Tensor(size)})
        return buffer.getvalue()

    path = tmp_path / "big.pt"
    storage = np.arange(4, dtype=np.float32).tobytes()
    _zip(path, {"x/constants.pkl": b"", "x/data/0": storage, "x/data.pkl": archive((1000,))})
    with pytest.raises(ValueError, match="outside its storage"):
        torchscript.read_state(path)
    _zip(path, {"x/constants.pkl": b"", "x/data/0": storage, "x/data.pkl": archive((4,))})
    with pytest.raises(ValueError, match="not a TorchScript module"):  # it got past the tensor
        torchscript.read_state(path)
