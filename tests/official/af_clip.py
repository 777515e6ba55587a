"""AF-CLIP's official forward and loss in PyTorch (clip/model.py, clip/adaptor.py, main.py)."""

import copy
import math

import torch
import torch.nn.functional as F

from official import to_torch as _t
from official import torch_layer_norm as _ln
from official import torch_linear as _linear


def torch_gaussian_kernel(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    x, y = torch.meshgrid(x, x, indexing="ij")
    k = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / k.sum()


def torch_aggregate(x, r, sigma):
    """``aggerate_neighbor``: F.unfold with zero padding r // 2, Gaussian-weighted sum."""
    if r == 1:
        return x
    cls, x = x[:, :1], x[:, 1:]
    b, n, c = x.shape
    h = int(math.sqrt(n))
    x = F.unfold(x.reshape(b, h, h, c).permute(0, 3, 1, 2), kernel_size=r, padding=r // 2)
    x = x.permute(0, 2, 1).reshape(-1, c, r * r).permute(0, 2, 1)
    x = torch.sum(x * torch_gaussian_kernel(r, sigma).reshape(1, r * r, 1), dim=1)
    return torch.cat([cls, x.reshape(b, n, c)], dim=1)


class TorchAdaptor(torch.nn.Module):
    """LayerNorm -> multi-head attention (q/k/v without bias, out with bias), no residual."""

    def __init__(self, width, heads, head_dim):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim**-0.5
        self.norm = torch.nn.LayerNorm(width)
        self.to_q = torch.nn.Linear(width, inner, bias=False)
        self.to_k = torch.nn.Linear(width, inner, bias=False)
        self.to_v = torch.nn.Linear(width, inner, bias=False)
        self.to_out = torch.nn.Linear(inner, width)

    def forward(self, x):
        x = self.norm(x)
        b, n, _ = x.shape

        def split(t):  # b n (h d) -> (b h) n d
            return (
                t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)
            )

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        attn = (torch.einsum("bid,bjd->bij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bij,bjd->bid", attn, v)
        out = out.reshape(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


class TorchTextTower(torch.nn.Module):
    """OpenAI CLIP's text transformer (LND, nn.MultiheadAttention, causal -inf mask, QuickGELU)
    and ``encode_state_prompt`` with the context before SOS."""

    def __init__(self, text):
        super().__init__()
        cfg = text.config
        self.heads = cfg.heads
        self.token_embedding = _t(text.token_embedding.embedding[...])
        self.positional_embedding = _t(text.positional_embedding[...])
        self.blocks = []
        for blk in text.blocks:
            attn = torch.nn.MultiheadAttention(cfg.width, cfg.heads)
            attn.in_proj_weight.data = _t(blk.attn.in_proj.kernel[...]).T.contiguous()
            attn.in_proj_bias.data = _t(blk.attn.in_proj.bias[...])
            attn.out_proj.weight.data = _t(blk.attn.out_proj.kernel[...]).T.contiguous()
            attn.out_proj.bias.data = _t(blk.attn.out_proj.bias[...])
            self.blocks.append(
                dict(
                    ln_1=_ln(blk.ln_1, cfg.width),
                    attn=attn,
                    ln_2=_ln(blk.ln_2, cfg.width),
                    c_fc=_linear(blk.mlp.c_fc),
                    c_proj=_linear(blk.mlp.c_proj),
                )
            )
        self.ln_final = _ln(text.ln_final, cfg.width)
        self.text_projection = _t(text.text_projection[...])
        n = cfg.context_length
        self.mask = torch.empty(n, n).fill_(float("-inf")).triu_(1)

    def encode_state_prompt(self, ids, prompt):
        x = self.token_embedding[ids]
        x = torch.cat([prompt.repeat(2, 1, 1), x], dim=1)[:, : ids.shape[1], :]
        x = (x + self.positional_embedding).permute(1, 0, 2)
        for blk in self.blocks:
            h = blk["ln_1"](x)
            x = x + blk["attn"](h, h, h, need_weights=False, attn_mask=self.mask)[0]
            h = blk["c_fc"](blk["ln_2"](x))
            x = x + blk["c_proj"](h * torch.sigmoid(1.702 * h))
        x = self.ln_final(x.permute(1, 0, 2))
        eot = prompt.shape[1] + ids.argmax(dim=-1)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


def torch_adaptor_from(model):
    a = model.adaptor
    cfg = model.backbone.vision.config
    t = TorchAdaptor(cfg.width, a.heads, a.head_dim)
    t.norm.weight.data, t.norm.bias.data = _t(a.norm.scale[...]), _t(a.norm.bias[...])
    for name in ("to_q", "to_k", "to_v", "to_out"):
        ours, theirs = getattr(a, name), getattr(t, name)
        theirs.weight.data = _t(ours.kernel[...]).T.contiguous()
        if ours.bias is not None:
            theirs.bias.data = _t(ours.bias[...])
    return t


def torch_official_forward(model, taps, ids, adaptor, prompt):
    """``detect_forward_seg``: -> (cls prob (B,), map (B, 1, h, w), projected token sets)."""
    vision = model.backbone.vision
    ln_post = _ln(vision.ln_post, vision.config.width)
    proj = _t(vision.proj[...])
    text = F.normalize(TorchTextTower(model.backbone.text).encode_state_prompt(ids, prompt), dim=-1)
    token_sets = [torch_aggregate(x, r, 4.0) for x in taps for r in (1, 3, 5)]
    projected = [ln_post(adaptor(x)) @ proj for x in token_sets]
    scores = 0
    for x in projected:
        scores = scores + torch.matmul(F.normalize(x, dim=-1), text.T) / 0.07
    prob = torch.softmax(scores, dim=-1)
    b, t = prob.shape[:2]
    h = int(math.sqrt(t - 1))
    return prob[:, 0, 1], prob[:, 1:, 1].reshape(b, 1, h, h), projected


def torch_official_loss(pred_labels, pred_masks, img_tokens, labels, gts):
    """``main.py``'s loss, including its ``copy.copy`` target rewrite."""

    def focal(inputs, targets, gamma=4):
        ce = F.binary_cross_entropy(inputs, targets, reduction="none")
        p_t = inputs * targets + (1 - inputs) * (1 - targets)
        return (ce * (1 - p_t) ** gamma).mean()

    def alignment(tokens, gts):
        gts = gts.reshape(tokens[0].size(0), -1)
        new = copy.copy(gts)
        if len(new[new == 0]) == 0:
            return 0
        new[new == 0] = -1
        b, n = new.shape
        mask = torch.matmul(new.reshape(b, n, 1), new.reshape(b, 1, n))
        total = 0
        for x in tokens:
            x = F.normalize(x[:, 1:, :], dim=-1)
            sim = torch.matmul(x, x.permute(0, 2, 1))
            sim = sim[mask == -1].mean() - sim[mask == 1].mean()
            total = total + (sim if sim > 0 else 0)
        return total / len(tokens)

    gts = F.interpolate(gts, size=pred_masks.shape[-2:], mode="bilinear")
    gts[gts < 0.5] = 0
    gts[gts > 0.5] = 1
    return (
        focal(pred_labels, labels)
        + (focal(pred_masks, gts) + F.l1_loss(pred_masks, gts))
        + alignment(img_tokens, gts)
    )
