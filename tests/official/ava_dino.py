"""AVA-DINO's official heads and loss in PyTorch (written from reading the official code)."""

import torch
import torch.nn.functional as F

from official import to_torch as _t


def torch_bottleneck(x, fc1, fc2):
    """``BottleneckAdapter.forward``: (LeakyReLU(fc1 x), LeakyReLU(fc2 h))."""
    h = F.leaky_relu(F.linear(x, fc1))
    return h, (None if fc2 is None else F.leaky_relu(F.linear(h, fc2)))


def torch_official_heads(cls_tokens, patch_tokens, text, w, *, interleave, grid, size):
    """``ava_dino_forward`` after feature extraction. ``text`` (B, E, 2) as the official code
    holds it; ``w`` a dict of torch weights (out, in). Returns NCHW maps."""
    b, e = text.shape[0], text.shape[1]
    tn, ta = text[:, :, 0], text[:, :, 1]
    adj0 = torch_bottleneck(tn, w["pa0"], None)[0]
    adj1 = torch_bottleneck(ta, w["pa1"], None)[0]
    if interleave:
        adjusted = torch.cat([adj0, adj1], dim=1).view(b, e, 2)
    else:
        adjusted = torch.stack([adj0, adj1], dim=2)
    proj = F.linear(adjusted.permute(0, 2, 1), w["P"]).permute(0, 2, 1)  # (B, D, 2)
    cms, aacms, globals_, wns, was = [], [], [], [], []
    for i, (cls_i, patch_i) in enumerate(zip(cls_tokens, patch_tokens, strict=True)):
        t_n = F.normalize(F.linear(tn, w["P"]), dim=-1)
        t_a = F.normalize(F.linear(ta, w["P"]), dim=-1)
        f = F.normalize(cls_i, dim=-1)
        r = F.softmax(torch.stack([(f * t_n).sum(-1), (f * t_a).sum(-1)], dim=1) / 0.1, dim=1)
        w_n, w_a = r[:, 0], r[:, 1]
        wns.append(w_n)
        was.append(w_a)
        c_n = torch_bottleneck(cls_i, *w["cls_n"][i])[1]
        c_a = torch_bottleneck(cls_i, *w["cls_a"][i])[1]
        cls_feat = F.normalize(w_n.view(-1, 1) * c_n + w_a.view(-1, 1) * c_a + cls_i, dim=-1)
        p_n = torch_bottleneck(patch_i, *w["patch_n"][i])[1]
        p_a = torch_bottleneck(patch_i, *w["patch_a"][i])[1]
        patch_feat = w_n.view(-1, 1, 1) * p_n + w_a.view(-1, 1, 1) * p_a + patch_i
        patch_feat = F.normalize(patch_feat, dim=-1)
        cm = 100 * patch_feat @ proj
        cm = F.interpolate(
            cm.permute(0, 2, 1).reshape(-1, 2, *grid),
            size=size,
            mode="bilinear",
            align_corners=True,
        )
        cms.append(torch.softmax(cm, dim=1))
        a = 10 * patch_feat @ cls_feat.unsqueeze(-1)
        a = F.interpolate(
            a.permute(0, 2, 1).reshape(-1, 1, *grid),
            size=size,
            mode="bilinear",
            align_corners=True,
        )
        a = torch.sigmoid(a)
        aacms.append(torch.cat([1 - a, a], dim=1))
        globals_.append((100 * (cls_feat.unsqueeze(1) @ proj)).squeeze(1))
    return {
        "cross_modal": torch.stack(cms).mean(0),
        "aacm": torch.stack(aacms).mean(0),
        "global_logits": torch.stack(globals_).mean(0),
        "w_n": torch.stack(wns).mean(0),
        "w_a": torch.stack(was).mean(0),
    }


def torch_weights(model):
    def k(lin):
        return _t(lin.kernel[...]).T.contiguous()

    def pair(ad):
        return (k(ad.fc1), k(ad.fc2))

    return {
        "pa0": k(model.prompt_adapters[0].fc1),
        "pa1": k(model.prompt_adapters[1].fc1),
        "P": k(model.text_projection),
        "cls_n": [pair(a.normal) for a in model.cls_adapters],
        "cls_a": [pair(a.anomaly) for a in model.cls_adapters],
        "patch_n": [pair(a.normal) for a in model.patch_adapters],
        "patch_a": [pair(a.anomaly) for a in model.patch_adapters],
    }


def torch_official_loss(ava_map, cm_map, global_score, w_n, w_a, mask, labels):
    """``train.py`` loss with ``tools/loss.py``'s FocalLoss (alpha None, gamma 2, smooth 1e-5)
    and BinaryDiceLoss; maps (B, 2, H, W), mask (B, 1, H, W) in {0, 1}."""

    def focal(logit, target, gamma=2, smooth=1e-5):
        c = logit.shape[1]
        logit = logit.reshape(logit.size(0), c, -1).permute(0, 2, 1).reshape(-1, c)
        target = target.reshape(-1, 1)
        one_hot = torch.zeros(target.size(0), c).scatter_(1, target.long(), 1)
        one_hot = torch.clamp(one_hot, smooth / (c - 1), 1.0 - smooth)
        pt = (one_hot * logit).sum(1) + smooth
        return (-1.0 * torch.pow(1 - pt, gamma) * pt.log()).mean()

    def dice(pred, target):
        n = target.size(0)
        p, t = pred.reshape(n, -1), target.reshape(n, -1)
        return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()

    y = labels.float()
    routing = F.mse_loss(w_n, 1.0 - y) + F.mse_loss(w_a, y)
    aware = focal(ava_map, mask) + dice(ava_map[:, 1], mask)
    seg = focal(cm_map, mask) + dice(cm_map[:, 1], mask)
    glob = F.cross_entropy(global_score, labels.long())
    parts = {"aware": aware, "seg": seg, "global": glob, "routing": routing}
    return 0.25 * aware + 0.5 * seg + 0.25 * glob + 0.1 * routing, parts
