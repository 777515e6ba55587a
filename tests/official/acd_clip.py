"""ACD-CLIP's official forward and loss in PyTorch (model/adapter.py, adapter_modules.py,
utils.py)."""

import math

import torch
import torch.nn.functional as F

from official import to_torch as _t
from official import torch_layer_norm as _ln
from official import torch_linear as _linear
from zsad_jax.methods import backbone as backbone_lib
from zsad_jax.prompts import acd_clip_sentences


def _param(x) -> torch.nn.Parameter:
    return torch.nn.Parameter(_t(x))


class TorchBlock(torch.nn.Module):
    """open_clip ResidualAttentionBlock (LND, nn.MultiheadAttention, exact GELU)."""

    def __init__(self, blk, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = _ln(blk.ln_1, width), _ln(blk.ln_2, width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.attn.in_proj_weight.data = _t(blk.attn.in_proj.kernel[...]).T.contiguous()
        self.attn.in_proj_bias.data = _t(blk.attn.in_proj.bias[...])
        self.attn.out_proj.weight.data = _t(blk.attn.out_proj.kernel[...]).T.contiguous()
        self.attn.out_proj.bias.data = _t(blk.attn.out_proj.bias[...])
        self.c_fc, self.c_proj = _linear(blk.mlp.c_fc), _linear(blk.mlp.c_proj)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


def _conv(kernel):  # ours (k, k, in, out) -> torch Conv2d(in, out, k, padding=k//2, bias=False)
    k, _, c_in, c_out = kernel.shape
    m = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
    m.weight.data = _t(kernel).permute(3, 2, 0, 1).contiguous()
    return m


class TorchConvLoraBlock(torch.nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.lora_A, self.lora_B = _param(ours.lora_a[...]), _param(ours.lora_b[...])
        self.conv_lora_A, self.conv_lora_B = (
            _conv(ours.conv_a.kernel[...]),
            _conv(ours.conv_b.kernel[...]),
        )
        self.lora_scale, self.conv_scale = ours.lora_scale, ours.conv_scale

    def forward(self, x):  # x (HW, B, C)
        h, b = int(math.sqrt(x.shape[0])), x.shape[1]
        down = (x @ self.lora_A).permute(1, 2, 0).reshape(b, -1, h, h)
        up = self.conv_lora_B(self.conv_lora_A(down)) * self.conv_scale
        return up.reshape(b, -1, h * h).permute(2, 0, 1) @ self.lora_B * self.lora_scale


class TorchConvLoraAdapter(torch.nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchConvLoraBlock(b) for b in ours.blocks])
        w = _t(ours.fusion_conv.kernel[...]).T
        self.fusion_conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False)
        self.fusion_conv.weight.data = w[:, :, None, None].contiguous()

    def forward(self, x):
        h, b = int(math.sqrt(x.shape[0])), x.shape[1]
        outs = [blk(x).permute(1, 2, 0).reshape(b, -1, h, h) for blk in self.blocks]
        out = self.fusion_conv(torch.cat(outs, dim=1))
        return out.reshape(b, -1, h * h).permute(2, 0, 1)


def _mlp(ours):
    return torch.nn.Sequential(_linear(ours.fc1), torch.nn.LeakyReLU(), _linear(ours.fc2))


def _gate(ours):
    return torch.nn.Sequential(_linear(ours.fc1), torch.nn.GELU(), _linear(ours.fc2))


class TorchAcdClip(torch.nn.Module):
    """``ACDCLIP`` with the tiny tower's blocks; weights copied from ours."""

    def __init__(self, model):
        super().__init__()
        vis, txt = model.backbone.vision, model.backbone.text
        vc, tc = vis.config, txt.config
        self.n = model.n_groups
        self.image_levels, self.text_levels = model.image_levels, model.text_levels
        self.vblocks = [TorchBlock(b, vc.width, vc.heads) for b in vis.blocks]
        self.tblocks = [TorchBlock(b, tc.width, tc.heads) for b in txt.blocks]
        self.token_embedding = _t(txt.token_embedding.embedding[...])
        self.positional_embedding = _t(txt.positional_embedding[...])
        n_ctx = tc.context_length
        self.attn_mask = torch.empty(n_ctx, n_ctx).fill_(float("-inf")).triu_(1)
        self.lora = torch.nn.ModuleList([TorchConvLoraAdapter(a) for a in model.image_lora])
        self.m_i_w = torch.nn.ParameterList(
            [_param(w.weight[...]).reshape(1, 1, -1) for w in model.image_blend]
        )
        self.seg_proj = torch.nn.ModuleList([_mlp(p) for p in model.seg_proj])
        self.det_proj = torch.nn.ModuleList([_mlp(p) for p in model.det_proj])
        self.seg_ln = torch.nn.ModuleList([_ln(n, n.scale.shape[0]) for n in model.seg_norm])
        self.det_ln = torch.nn.ModuleList([_ln(n, n.scale.shape[0]) for n in model.det_norm])
        self.gate = torch.nn.ModuleList([_gate(g) for g in model.fusion_gate])
        self.text_A = torch.nn.ParameterList([_param(a.lora_a[...]) for a in model.text_lora])
        self.text_B = torch.nn.ParameterList([_param(a.lora_b[...]) for a in model.text_lora])
        self.text_scale = model.text_lora[0].scale
        self.m_t_w = torch.nn.ParameterList(
            [_param(w.weight[...]).reshape(1, 1, -1) for w in model.text_blend]
        )
        self.text_ln = torch.nn.ModuleList([_ln(n, n.scale.shape[0]) for n in model.text_norm])

    @staticmethod
    def add_weight(w, x, a):
        return (1 - w) * x + w * a

    def forward(self, embedded):  # embedded (B, T, D): CLIP's ln_pre output
        x = embedded.permute(1, 0, 2)
        groups = []
        for i, blk in enumerate(self.vblocks):
            x = blk(x)
            if i + 1 in self.image_levels:
                j = self.image_levels.index(i + 1)
                t = x[1:]
                a = self.lora[j](t)
                a = a * t.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
                g = self.add_weight(self.m_i_w[j], t, a)
                groups.append(g)
                x = torch.cat([x[:1], g], dim=0)
        tokens = [g.permute(1, 0, 2) for g in groups]
        seg = [
            F.normalize(self.seg_ln[i](self.seg_proj[i](t)), dim=-1) for i, t in enumerate(tokens)
        ]
        det = [
            F.normalize(self.det_ln[i](self.det_proj[i](t)), dim=-1).mean(1)
            for i, t in enumerate(tokens)
        ]
        return seg, det

    def encode_text(self, ids):
        x = (self.token_embedding[ids] + self.positional_embedding).permute(1, 0, 2)
        out = []
        for i, blk in enumerate(self.tblocks):
            x = blk(x, self.attn_mask)
            if i + 1 in self.text_levels:
                j = self.text_levels.index(i + 1)
                a = x @ self.text_A[j] @ self.text_B[j] * self.text_scale
                a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
                x = self.add_weight(self.m_t_w[j], x, a)
                out.append(x)
        eot = ids.argmax(dim=-1)
        out = [self.text_ln[i](t.permute(1, 0, 2)) for i, t in enumerate(out)]
        return [t[torch.arange(t.shape[0]), eot] for t in out]

    def class_text(self, normal_ids, abnormal_ids):
        """``get_multiple_adapted_single_class_text_embedding`` -> (N, E, 2)."""
        feats = []
        for ids in (normal_ids, abnormal_ids):
            for f in self.encode_text(ids):
                f = f / f.norm(dim=-1, keepdim=True)
                f = f.mean(dim=0)
                feats.append(f / f.norm())
        return torch.stack([torch.stack(feats[i :: self.n], dim=1) for i in range(self.n)])

    def fusion_gate_seg(self, vision_tokens, text, img_size, test_mode, kernel, sigma):
        b, p = vision_tokens.shape[1:3]
        h = int(math.sqrt(p))
        preds = []
        for i in range(self.n):
            feat = vision_tokens[i]
            w = self.gate[i](feat.mean(dim=1, keepdim=True)).squeeze(1)
            w = F.softmax(w.view(b, self.n, 2), dim=1)
            fused = (text.permute(1, 0, 2, 3) * w.unsqueeze(2)).sum(dim=1)
            preds.append(torch.matmul(10 * feat, fused).permute(0, 2, 1).reshape(b, 2, h, h))
        if test_mode:
            preds = [torch_gaussian_blur2d(x, kernel, sigma) for x in preds]
        preds = [
            F.interpolate(x, size=img_size, mode="bilinear", align_corners=True) for x in preds
        ]
        out = F.softmax(torch.stack(preds).mean(dim=0), dim=1)
        return out[:, 1] if test_mode else out


def torch_gaussian_blur2d(x, kernel, sigma):
    """kornia.filters.gaussian_blur2d (odd kernel, reflect border), as a depthwise 2-D conv."""
    offsets = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    k2 = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel, kernel)
    x = F.pad(x, (kernel // 2,) * 4, mode="reflect")
    return F.conv2d(x, k2, groups=x.shape[1])


def torch_official_loss(cls_logits, seg_pred, labels, mask):
    """train.py: CE + utils.calculate_seg_loss (Hsuxu FocalLoss, BinaryDiceLoss)."""
    n_class = seg_pred.shape[1]
    logit = seg_pred.reshape(seg_pred.shape[0], n_class, -1).permute(0, 2, 1).reshape(-1, n_class)
    target = mask.reshape(-1, 1).long()
    one_hot = torch.zeros(target.shape[0], n_class).scatter_(1, target, 1)
    one_hot = torch.clamp(one_hot, 1e-5 / (n_class - 1), 1.0 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    focal = (-1 * torch.pow(1 - pt, 2) * pt.log()).mean()

    def dice(inp, tgt):
        n = tgt.shape[0]
        i, t = inp.reshape(n, -1), tgt.reshape(n, -1)
        eff = (2 * (i * t).sum(1) + 1) / (i.sum(1) + t.sum(1) + 1)
        return 1 - eff.sum() / n

    seg = focal + dice(seg_pred[:, 0], 1 - mask) + dice(seg_pred[:, 1], mask)
    return F.cross_entropy(cls_logits, labels) + seg


def torch_reference(model, embedded, class_ids, *, size, test_mode):
    """The official forward on ``embedded`` tokens of ``size`` x ``size`` images, each image's
    class text from ``model.class_names``."""
    ref = TorchAcdClip(model)
    tokenizer = backbone_lib.byte_tokenizer()
    texts = []
    for c in class_ids:
        normal, abnormal = acd_clip_sentences(model.class_names[c])
        texts.append(
            ref.class_text(
                torch.from_numpy(tokenizer(normal, 77)).long(),
                torch.from_numpy(tokenizer(abnormal, 77)).long(),
            )
        )
    text = torch.stack(texts, dim=1)  # (N, B, E, 2)
    seg, det = ref(embedded)
    seg, det = torch.stack(seg), torch.stack(det)
    cls_logits = torch.stack([(det[i].unsqueeze(1) @ text[i]).squeeze(1) for i in range(ref.n)])
    cls_logits = cls_logits.mean(0)
    seg_pred = ref.fusion_gate_seg(seg, text, size, test_mode, model.blur_kernel, model.blur_sigma)
    return ref, dict(text=text, seg=seg, det=det, cls_logits=cls_logits, seg_pred=seg_pred)
