"""convert.heads: official trained heads of AF-CLIP, AVA-DINO and ACD-CLIP -> a zsad_jax workdir.

Proofs: for each method, torch modules with the official layout and attribute names (written here
from the structure of the official code, read not copied: Faustinaqq/AF-CLIP ``clip/adaptor.py``,
aqeeelmirza/AVA-DINO ``CLIP/adapter.py``, cockmake/ACD-CLIP ``model/adapter*.py``) get random
weights and are saved in the official format (AF-CLIP's whole pickled ``clip.adaptor.Adaptor``
module included, converted while that class is not importable); ``python -m convert.heads``'s
``main`` turns them into a workdir that ``zsad_jax.inference.load_model`` (the loader of evaluate
and predict) reads like a trained one; the loaded model's maps and scores equal the torch forward
of the official modules (the PyTorch transcriptions in tests/official/) within 1e-5. Mismatched,
corrupt or code-naming files are refused with an error naming the key or the file, and nothing in
them is run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
from extras import CONVERT_EXTRA

torch = pytest.importorskip("torch", reason=CONVERT_EXTRA)  # every test here compares with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from official import acd_clip as acd_ref  # noqa: E402
from official import af_clip as af_ref  # noqa: E402
from official import ava_dino as ava_ref  # noqa: E402
from official import to_torch  # noqa: E402
from torch import nn  # noqa: E402

from convert import heads, torchscript  # noqa: E402
from zsad_jax import checkpoint as ckpt_lib  # noqa: E402
from zsad_jax import inference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tiny models' inputs.
AVA_DINO_CLASSES = ("bottle", "metal_nut")
# Short descriptive names keep the byte-tokenised prompts under the 77-token context.
ACD_CLIP_CLASSES = ("screw", "candle", "foo_bar")
ACD_CLIP_SIZE = 32


def _config_file(method: str, variant: str = "tiny") -> str:
    return f"{ROOT / 'configs' / method}.py:{variant}"


def _template(method: str, variant: str = "tiny"):
    config, _, _ = heads.build_config(method, _config_file(method, variant), [], {})
    return config, heads.trainable_template(config)


def _convert(tmp_path: Path, method: str, files: dict[str, Path], variant: str = "tiny") -> Path:
    out = tmp_path / f"{method}_run"
    argv = [method]
    for role, path in files.items():
        argv += [f"--{role}", str(path)]
    argv += ["--out", str(out), "--config", _config_file(method, variant)]
    assert heads.main(argv) == 0
    return out


def _load(out: Path):
    model, config, threshold, info = inference.load_model(str(out))
    assert threshold is None and info["step"] == 0
    meta = ckpt_lib.read_meta(out)
    assert meta["format"] == ckpt_lib.FORMAT and meta["threshold"] is None
    record = json.loads((out / heads.PROVENANCE_FILE).read_text())
    assert record["format"] == heads.FORMAT and record["step"] == 0
    assert all(len(s["sha256"]) == 64 for s in record["sources"].values())
    return model, config, record


def _forward(model, batch, also):
    """``(model(batch), also(model, batch["image"]))`` in one compiled call."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        return m(batch), also(m, batch["image"])

    return run(state, batch)


def _randomize_layer_norms(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))


# ---------------------------------------------------------------------------------------------
# AF-CLIP: clip/adaptor.py's module tree (Adaptor -> BasicTransformerBlock -> CrossAttention).


class CrossAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.scale, self.heads = dim_head**-0.5, heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(query_dim, inner, bias=False)
        self.to_v = nn.Linear(query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):  # b n (h d) -> (b h) n d
            return t.reshape(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        attn = (q @ k.transpose(1, 2) * self.scale).softmax(dim=-1)
        out = (attn @ v).reshape(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head):
        super().__init__()
        self.attn = CrossAttention(dim, n_heads, d_head)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.attn(self.norm(x))


class Adaptor(nn.Module):
    def __init__(self, inplanes, n_heads, d_head):
        super().__init__()
        self.attention = BasicTransformerBlock(inplanes, n_heads, d_head)

    def forward(self, img_token):
        return self.attention(img_token)


OFFICIAL_AF_CLIP_CLASSES = (Adaptor, BasicTransformerBlock, CrossAttention)


@contextlib.contextmanager
def official_module_path(module_name: str, classes):
    """While inside, ``classes`` are importable as ``module_name.<Name>`` (what torch.save
    pickles); afterwards that module does not exist again."""
    parts = module_name.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    originals = {c: (c.__module__, c.__qualname__) for c in classes}
    modules = [types.ModuleType(n) for n in names]
    for parent, child in zip(modules, modules[1:], strict=False):
        setattr(parent, child.__name__.rsplit(".", 1)[-1], child)
    for c in classes:
        c.__module__, c.__qualname__ = module_name, c.__name__
        setattr(modules[-1], c.__name__, c)
    sys.modules.update(zip(names, modules, strict=True))
    try:
        yield
    finally:
        for c, (module, qualname) in originals.items():
            c.__module__, c.__qualname__ = module, qualname
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _af_clip_files(tmp_path: Path, template, *, heads_n=None, head_dim=None, seed=0):
    width = template["adaptor.norm.scale"][0][0]
    inner = template["adaptor.to_q.kernel"][0][1]
    _, n_ctx, text_width = template["state_prompt_embedding"][0]
    heads_n = heads_n or 2
    head_dim = head_dim or inner // heads_n
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adaptor = Adaptor(width, heads_n, head_dim)
    _randomize_layer_norms(adaptor, g)
    prompt = nn.Parameter(0.5 * torch.randn(1, n_ctx, text_width, generator=g))
    paths = {"adaptor": tmp_path / "mvtec_adaptor.pt", "prompt": tmp_path / "mvtec_prompt.pt"}
    with official_module_path("clip.adaptor", OFFICIAL_AF_CLIP_CLASSES):
        torch.save(adaptor, paths["adaptor"])  # main.py: torch.save(clip_model.adaptor)
        torch.save(prompt, paths["prompt"])
    return paths, adaptor.eval(), prompt.detach()


@pytest.mark.slow
def test_af_clip_pickled_module_converts_without_its_class_and_matches_official(tmp_path):
    config, template = _template("af_clip")
    paths, adaptor, prompt = _af_clip_files(tmp_path, template)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("clip.adaptor")  # the official class cannot be imported now
    with pytest.raises(pickle.UnpicklingError):
        torch.load(paths["adaptor"], weights_only=True)  # torch's safe loader cannot read it

    out = _convert(tmp_path, "af_clip", paths)
    model, config, record = _load(out)
    assert record["name_table"]["adaptor.to_out.kernel"] == "adaptor.attention.attn.to_out.0.weight"
    np.testing.assert_array_equal(model.state_prompt_embedding[...], prompt.numpy())

    batch = _af_clip_batch()
    out_jax, taps = _forward(model, batch, lambda m, x: m._layer_tokens(x, m.feature_layers))
    ids = torch.from_numpy(np.array(model.state_prompt_ids[...])).long()
    with torch.no_grad():
        cls_prob, amap, _ = af_ref.torch_official_forward(
            model, [to_torch(taps[i]) for i in model.feature_layers], ids, adaptor, prompt
        )
    size = batch["image"].shape[1]
    up = F.interpolate(amap, size=(size, size), mode="bilinear").numpy()
    smoothed = np.stack([scipy.ndimage.gaussian_filter(m, model.smoothing_sigma) for m in up])
    np.testing.assert_allclose(out_jax["pred_score"], cls_prob.numpy(), atol=1e-5)
    np.testing.assert_allclose(out_jax["patch_map"], amap[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out_jax["anomaly_map"], smoothed[:, 0], atol=1e-5)
    assert float(np.std(out_jax["anomaly_map"])) > 1e-3


def _af_clip_batch():
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.normal(size=(3, 32, 32, 3)).astype(np.float32))}


def test_af_clip_attribute_and_file_mismatches_name_them(tmp_path):
    config, template = _template("af_clip")
    inner = template["adaptor.to_q.kernel"][0][1]
    # 4 heads of inner/4 instead of 2 of inner/2: the same weight shapes, another attention.
    paths, _, _ = _af_clip_files(tmp_path, template, heads_n=4, head_dim=inner // 4)
    with pytest.raises(ValueError, match=r"attention\.attn\.heads=4.*adaptor\.heads=2"):
        heads.convert("af_clip", paths, config)
    paths, _, _ = _af_clip_files(tmp_path, template)
    swapped = {"adaptor": paths["prompt"], "prompt": paths["adaptor"]}
    with pytest.raises(ValueError, match=r"mvtec_prompt\.pt: holds a tensor of shape"):
        heads.convert("af_clip", swapped, config)
    # A damaged file: an error naming it, no traceback from inside a reader.
    data = paths["adaptor"].read_bytes()
    paths["adaptor"].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"mvtec_adaptor\.pt: not a torch\.save zip archive"):
        heads.convert("af_clip", paths, config)


# ---------------------------------------------------------------------------------------------
# AVA-DINO: CLIP/adapter.py's heads, saved as train.py does.


class BottleneckAdapter(nn.Module):
    def __init__(self, c_in, bottleneck):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(c_in, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, c_in, bias=False), nn.LeakyReLU())


class OfficialAvaDinoHeads(nn.Module):
    def __init__(self, width, text_width, bottleneck, n_layers):
        super().__init__()

        def adapters():
            return nn.ModuleList([BottleneckAdapter(width, bottleneck) for _ in range(n_layers)])

        self.cls_token_adapter_normal = adapters()
        self.patch_token_adapter_normal = adapters()
        self.cls_token_adapter_anomaly = adapters()
        self.patch_token_adapter_anomaly = adapters()
        self.prompt_adapter = nn.ModuleList(
            [BottleneckAdapter(text_width, text_width) for _ in range(2)]
        )
        self.text_projection = nn.Linear(text_width, width, bias=False)

    def checkpoint(self, epoch):
        """train.py's ``epoch_N.pth`` dict."""
        heads_ = ("cls_token_adapter", "patch_token_adapter")
        out = {"epoch": epoch}
        for name in [f"{h}_{b}" for h in heads_ for b in ("normal", "anomaly")]:
            out[name] = getattr(self, name).state_dict()
        out["prompt_adapter"] = self.prompt_adapter.state_dict()
        out["text_projection"] = self.text_projection.state_dict()
        return out

    def reference_weights(self):
        """The weight dict of tests/test_ava_dino.py's ``torch_official_heads``."""

        def pair(a):
            return a.fc1[0].weight, a.fc2[0].weight

        return {
            "pa0": self.prompt_adapter[0].fc1[0].weight,
            "pa1": self.prompt_adapter[1].fc1[0].weight,
            "P": self.text_projection.weight,
            "cls_n": [pair(a) for a in self.cls_token_adapter_normal],
            "cls_a": [pair(a) for a in self.cls_token_adapter_anomaly],
            "patch_n": [pair(a) for a in self.patch_token_adapter_normal],
            "patch_a": [pair(a) for a in self.patch_token_adapter_anomaly],
        }


def _ava_dino_heads(template, n_layers):
    width, bottleneck = template["cls_adapters.0.normal.fc1.kernel"][0]
    text_width = template["text_projection.kernel"][0][0]
    torch.manual_seed(1)
    return OfficialAvaDinoHeads(width, text_width, bottleneck, n_layers)


def _ava_dino_batch() -> dict[str, jax.Array]:
    """Three 64 x 64 images of the two classes (what the forward reads)."""
    images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    return {"image": jnp.asarray(images), "class_id": jnp.asarray([0, 1, 1], jnp.int32)}


@pytest.mark.slow
def test_ava_dino_epoch_file_converts_and_matches_official(tmp_path):
    config, template = _template("ava_dino")
    official = _ava_dino_heads(template, len(config.model.layers))
    src = tmp_path / "epoch_3.pth"
    torch.save(official.checkpoint(3), src)
    out = _convert(tmp_path, "ava_dino", {"src": src})
    model, config, record = _load(out)
    assert record["ignored_values"] == {"epoch": 3}
    assert "prompt_adapter.1.fc2.0.weight" in record["ignored"]  # the unused fc2, by name

    model.set_classes(AVA_DINO_CLASSES)
    batch = _ava_dino_batch()
    out_jax, (cls, patches) = _forward(model, batch, lambda m, x: m.features(x))
    text = model.class_text[...][batch["class_id"]]
    size = batch["image"].shape[1:3]
    grid = model.backbone.patch_grid(*size)
    with torch.no_grad():
        ref = ava_ref.torch_official_heads(
            [to_torch(c) for c in cls],
            [to_torch(p) for p in patches],
            to_torch(text).permute(0, 2, 1),  # official (B, E, 2)
            official.reference_weights(),
            interleave=True,
            grid=grid,
            size=tuple(size),
        )
    cross = ref["cross_modal"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out_jax["cross_modal"], cross, atol=1e-5)
    np.testing.assert_allclose(out_jax["anomaly_map"], cross[..., 1], atol=1e-5)
    np.testing.assert_allclose(out_jax["pred_score"], cross[..., 1].max(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(out_jax["routing_weights"][:, 0], ref["w_n"].numpy(), atol=1e-5)
    assert float(np.std(out_jax["anomaly_map"])) > 1e-3


def test_ava_dino_mismatches_name_the_key(tmp_path):
    config, template = _template("ava_dino")
    official = _ava_dino_heads(template, len(config.model.layers))
    state = official.checkpoint(0)
    src = tmp_path / "epoch_0.pth"

    bad = dict(state, text_projection={"weight": state["text_projection"]["weight"].T})
    torch.save(bad, src)
    with pytest.raises(ValueError, match=r"text_projection\.weight \(\d+, \d+\) -> text_proj"):
        heads.convert("ava_dino", {"src": src}, config)

    bad = dict(state, prompt_adapter=dict(state["prompt_adapter"]))
    bad["prompt_adapter"]["0.fc3.0.weight"] = bad["prompt_adapter"].pop("0.fc1.0.weight")
    torch.save(bad, src)
    with pytest.raises(ValueError) as e:
        heads.convert("ava_dino", {"src": src}, config)
    assert "expected but absent (1): prompt_adapter.0.fc1.0.weight" in str(e.value)
    assert "present but unused (1): prompt_adapter.0.fc3.0.weight" in str(e.value)

    torch.save({k: v for k, v in state.items() if k != "text_projection"}, src)
    with pytest.raises(ValueError, match=r"no state dict under 'text_projection'"):
        heads.convert("ava_dino", {"src": src}, config)

    more = _ava_dino_heads(template, 3).checkpoint(0)
    torch.save(more, src)
    with pytest.raises(ValueError, match=r"adapters for 3 layers.*model\.layers"):
        heads.convert("ava_dino", {"src": src}, config)


# ---------------------------------------------------------------------------------------------
# ACD-CLIP: model/adapter_modules.py's modules in ACDCLIP's two ModuleDicts, saved as train.py.


class AddWeight(nn.Module):
    def __init__(self, d_model, generator):
        super().__init__()
        self.i_w = nn.Parameter(0.1 + 0.8 * torch.rand(1, 1, d_model, generator=generator))


class TextLoraAdapter(nn.Module):
    def __init__(self, c_in, c_out, r, alpha):
        super().__init__()
        self.scale = alpha / r**0.5
        self.lora_A = nn.Parameter(torch.empty(c_in, r))
        self.lora_B = nn.Parameter(torch.empty(r, c_out))
        nn.init.kaiming_uniform_(self.lora_A)
        nn.init.normal_(self.lora_B, std=0.02)


class ConvLoraBlock(nn.Module):
    def __init__(self, c_in, c_out, rank, alpha, conv_rank, conv_alpha, k):
        super().__init__()
        self.lora_scale, self.conv_lora_scale = alpha / rank**0.5, conv_alpha / conv_rank
        self.lora_A = nn.Parameter(torch.empty(c_in, rank))
        self.conv_lora_A = nn.Conv2d(rank, conv_rank, k, padding=k // 2, bias=False)
        self.conv_lora_B = nn.Conv2d(conv_rank, rank, k, padding=k // 2, bias=False)
        self.lora_B = nn.Parameter(torch.empty(rank, c_out))
        nn.init.kaiming_uniform_(self.lora_A)
        nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, x):  # (HW, B, C), square grid
        h, b = int(math.sqrt(x.shape[0])), x.shape[1]
        down = (x @ self.lora_A).permute(1, 2, 0).reshape(b, -1, h, h)
        up = self.conv_lora_B(self.conv_lora_A(down)) * self.conv_lora_scale
        return up.reshape(b, -1, h * h).permute(2, 0, 1) @ self.lora_B * self.lora_scale


class ConvLoraAdapter(nn.Module):
    def __init__(self, c_in, c_out, rank, alpha, conv_rank, conv_alpha, kernel_sizes):
        super().__init__()
        self.conv_lora_blocks = nn.ModuleList(
            [
                ConvLoraBlock(c_in, c_out, rank, alpha, conv_rank, conv_alpha, k)
                for k in kernel_sizes
            ]
        )
        self.fusion_conv = nn.Conv2d(len(kernel_sizes) * c_out, c_out, 1, bias=False)

    def forward(self, x):
        h, b = int(math.sqrt(x.shape[0])), x.shape[1]
        outs = [blk(x).permute(1, 2, 0).reshape(b, -1, h, h) for blk in self.conv_lora_blocks]
        out = self.fusion_conv(torch.cat(outs, dim=1))
        return out.reshape(b, -1, h * h).permute(2, 0, 1)


class MLPAdapter(nn.Module):
    def __init__(self, c_in, c_out, hidden):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, c_out))

    def forward(self, x):
        return self.fc(x)


class OfficialAcdClipAdapters(nn.Module):
    """``ACDCLIP``'s ``image_adapter`` / ``text_adapter`` (the frozen CLIP left out)."""

    def __init__(self, config, template, n_groups=None):
        super().__init__()
        m, a = config.model, config.model.adapter
        n = n_groups or int(m.n_groups)
        width = template["image_blend.0.weight"][0][0]
        text_width = template["text_blend.0.weight"][0][0]
        g = torch.Generator().manual_seed(2)
        torch.manual_seed(2)

        def each(make):
            return nn.ModuleList([make() for _ in range(n)])

        self.image_adapter = nn.ModuleDict(
            {
                "m_i_w": each(lambda: AddWeight(width, g)),
                "lora_adapters": each(
                    lambda: ConvLoraAdapter(
                        width, width, a.rank, a.alpha, a.conv_rank, a.conv_alpha, a.kernel_sizes
                    )
                ),
                "seg_layer_norms": each(lambda: nn.LayerNorm(text_width)),
                "seg_proj": each(lambda: MLPAdapter(width, text_width, m.head_hidden)),
                "det_layer_norms": each(lambda: nn.LayerNorm(text_width)),
                "det_proj": each(lambda: MLPAdapter(width, text_width, m.head_hidden)),
                "vision_text_gate": each(
                    lambda: nn.Sequential(
                        nn.Linear(text_width, m.gate_hidden),
                        nn.GELU(),
                        nn.Linear(m.gate_hidden, 2 * n),
                    )
                ),
            }
        )
        self.text_adapter = nn.ModuleDict(
            {
                "m_t_w": each(lambda: AddWeight(text_width, g)),
                "layer_norms": each(lambda: nn.LayerNorm(text_width)),
                "lora_adapters": each(
                    lambda: TextLoraAdapter(text_width, text_width, a.rank, a.alpha)
                ),
            }
        )
        _randomize_layer_norms(self, g)

    def checkpoint(self, epoch):
        """train.py's ``adapter_<epoch>.pth`` dict."""
        return {
            "epoch": epoch,
            "text_adapter": self.text_adapter.state_dict(),
            "image_adapter": self.image_adapter.state_dict(),
        }

    def into(self, ref):
        """Puts these modules into tests/test_acd_clip.py's ``TorchAcdClip`` ``ref`` in place of
        the weights it copied from our model, so that its forward runs the official weights."""
        ia, ta = self.image_adapter, self.text_adapter
        ref.lora = ia["lora_adapters"]
        ref.m_i_w = nn.ParameterList([w.i_w for w in ia["m_i_w"]])
        ref.seg_proj, ref.det_proj = ia["seg_proj"], ia["det_proj"]
        ref.seg_ln, ref.det_ln = ia["seg_layer_norms"], ia["det_layer_norms"]
        ref.gate = ia["vision_text_gate"]
        ref.text_A = nn.ParameterList([t.lora_A for t in ta["lora_adapters"]])
        ref.text_B = nn.ParameterList([t.lora_B for t in ta["lora_adapters"]])
        ref.text_scale = ta["lora_adapters"][0].scale
        ref.m_t_w = nn.ParameterList([w.i_w for w in ta["m_t_w"]])
        ref.text_ln = ta["layer_norms"]
        return ref


@pytest.mark.slow
def test_acd_clip_adapter_file_converts_and_matches_official(tmp_path, monkeypatch):
    config, template = _template("acd_clip")
    official = OfficialAcdClipAdapters(config, template)
    src = tmp_path / "adapter_20.pth"
    torch.save(official.checkpoint(20), src)
    out = _convert(tmp_path, "acd_clip", {"src": src})
    model, config, record = _load(out)
    assert record["ignored_values"] == {"epoch": 20}
    assert record["name_table"]["image_lora.0.fusion_conv.kernel"] == (
        "image_adapter.lora_adapters.0.fusion_conv.weight"
    )

    model.set_classes(ACD_CLIP_CLASSES)
    rng = np.random.default_rng(0)
    size = ACD_CLIP_SIZE
    images = jnp.asarray(rng.normal(size=(2, size, size, 3)).astype(np.float32))
    class_ids = [0, 2]
    batch = {"image": images, "class_id": jnp.asarray(class_ids, jnp.int32)}
    out_jax, embedded = _forward(model, batch, lambda m, x: m.backbone.vision.embed(x))
    embedded = to_torch(embedded)
    reference = official.into(acd_ref.TorchAcdClip(model))
    monkeypatch.setattr(acd_ref, "TorchAcdClip", lambda _: reference)
    with torch.no_grad():
        _, ref = acd_ref.torch_reference(model, embedded, class_ids, size=size, test_mode=True)
    amap = ref["seg_pred"].numpy()
    p_img = torch.softmax(ref["cls_logits"], dim=1)[:, 1].numpy()
    w = model.image_score_weight
    score = w * p_img + (1 - w) * amap.reshape(len(class_ids), -1).max(1)
    np.testing.assert_allclose(out_jax["image_logits"], ref["cls_logits"].numpy(), atol=1e-5)
    np.testing.assert_allclose(out_jax["anomaly_map"], amap, atol=1e-5)
    np.testing.assert_allclose(out_jax["pred_score"], score, atol=1e-5)
    assert float(np.std(out_jax["anomaly_map"])) > 1e-4


def test_acd_clip_mismatches_name_the_key(tmp_path):
    config, template = _template("acd_clip")
    official = OfficialAcdClipAdapters(config, template)
    state = official.checkpoint(1)
    src = tmp_path / "adapter_1.pth"

    image = dict(state["image_adapter"])
    image["m_i_w.0.i_w"] = image["m_i_w.0.i_w"][0]  # (1, D): not AddWeight's (1, 1, D)
    torch.save(dict(state, image_adapter=image), src)
    with pytest.raises(ValueError, match=r"image_adapter\.m_i_w\.0\.i_w: expected a \(1, 1, D\)"):
        heads.convert("acd_clip", {"src": src}, config)

    text = dict(state["text_adapter"])
    del text["layer_norms.2.bias"]
    text["layer_norm.2.bias"] = torch.zeros(3)
    torch.save(dict(state, text_adapter=text), src)
    with pytest.raises(ValueError) as e:
        heads.convert("acd_clip", {"src": src}, config)
    assert "expected but absent (1): text_adapter.layer_norms.2.bias" in str(e.value)
    assert "present but unused (1): text_adapter.layer_norm.2.bias" in str(e.value)

    torch.save(OfficialAcdClipAdapters(config, template, n_groups=2).checkpoint(1), src)
    with pytest.raises(ValueError, match=r"2 groups .*n_groups=3; add --config\.model\.n_groups=2"):
        heads.convert("acd_clip", {"src": src}, config)


# ---------------------------------------------------------------------------------------------
# Files that name code, the command line.


def _torch_save_zip(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3")


def _touch(path: str) -> None:
    Path(path).touch()


class _RunsCode:
    """Pickles as a call of ``_touch(marker)``: what a file that runs code looks like."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_files_naming_code_are_refused_without_running_it(tmp_path):
    config, _ = _template("ava_dino")
    marker = tmp_path / "ran"
    src = tmp_path / "epoch_0.pth"
    _torch_save_zip(src, pickle.dumps({"text_projection": _RunsCode(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"epoch_0\.pth: .*refers to test_convert_heads\._touch"):
        heads.convert("ava_dino", {"src": src}, config)
    assert not marker.exists()

    # A pickled module of a class outside the allow-list (another module path) is refused too.
    config, template = _template("af_clip")
    paths, adaptor, _ = _af_clip_files(tmp_path, template)
    with official_module_path("evil.adaptor", OFFICIAL_AF_CLIP_CLASSES):
        torch.save(adaptor, paths["adaptor"])
    with pytest.raises(ValueError, match=r"refers to evil\.adaptor\.Adaptor"):
        heads.convert("af_clip", paths, config)
    assert torchscript.is_saved_archive(paths["prompt"])


def test_command_line_help_errors_and_existing_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        heads.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "DLVP-CLIP has no official code" in help_text and "af_clip" in help_text
    assert heads.main(["dlvp_clip", "--src", "x.pth", "--out", str(tmp_path / "d")]) == 2
    assert "DLVP-CLIP has no official code" in capsys.readouterr().err

    # A config of another method, a missing file, an unknown override: one line, no traceback.
    src = tmp_path / "missing.pth"
    args = ["ava_dino", "--src", str(src), "--out", str(tmp_path / "o")]
    assert heads.main([*args, "--config", _config_file("acd_clip")]) == 1
    assert "not 'ava_dino'" in capsys.readouterr().err
    assert heads.main([*args, "--config", _config_file("ava_dino")]) == 1
    assert "missing.pth: no such file" in capsys.readouterr().err
    assert heads.main([*args, "--config", _config_file("ava_dino"), "--config.model.nope=1"]) == 2
    assert "no such config key" in capsys.readouterr().err

    # --backbone is --config.model.backbone.checkpoint; an existing workdir is not overwritten.
    config, _, used = heads.build_config(
        "acd_clip", _config_file("acd_clip"), [], {"backbone": "b"}
    )
    assert config.model.backbone.checkpoint == "b" and used == [("model.backbone.checkpoint", "b")]
    official = OfficialAcdClipAdapters(*_template("acd_clip"))
    torch.save(official.checkpoint(1), src)
    args = ["acd_clip", "--src", str(src), "--out", str(tmp_path / "o")]
    assert heads.main([*args, "--config", _config_file("acd_clip")]) == 0
    assert heads.main([*args, "--config", _config_file("acd_clip")]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err


def test_reader_matches_torch_load_on_state_dicts(tmp_path):
    """The code-free reader gives torch.load's arrays (non-contiguous, half, int, Parameter)."""
    state = {
        "a": torch.randn(3, 4).T,
        "b": {"c": torch.randn(5).half(), "d": torch.arange(6).reshape(2, 3)[:, 1]},
        "p": nn.Parameter(torch.randn(2, 2)),
        "n": 7,
    }
    path = tmp_path / "s.pth"
    torch.save(state, path)
    ours = torchscript.read_saved(path)
    theirs = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(ours["a"], theirs["a"].numpy())
    np.testing.assert_array_equal(ours["b"]["c"], theirs["b"]["c"].numpy())
    np.testing.assert_array_equal(ours["b"]["d"], theirs["b"]["d"].numpy())
    np.testing.assert_array_equal(ours["p"], theirs["p"].detach().numpy())
    assert ours["n"] == 7
    buf = io.BytesIO()
    torch.save(state, buf)
    assert buf.getvalue()[:2] == b"PK"  # torch.save writes the zip format read here
