"""DLVP-CLIP's forward and loss as the paper describes them, in PyTorch (float64)."""

import numpy as np
import torch
import torch.nn.functional as F


def _t(v) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v[...] if hasattr(v, "__getitem__") else v, np.float64))


def _ln(x, ln, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), _t(ln.scale), _t(ln.bias), eps)


def _lin(x, linear):
    return x @ _t(linear.kernel) + _t(linear.bias)


def _qkv(block, h):
    b, t, d = h.shape
    heads = block.attn.heads
    qkv = _lin(h, block.attn.in_proj).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _attend(q, k, v, mask=None):
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(-1)
    out = probs @ v
    b, h, t, dh = out.shape
    return out.transpose(1, 2).reshape(b, t, h * dh), probs


def _mlp(block, x, act):
    h = _lin(x, block.mlp.c_fc)
    h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)  # exact erf GELU
    return _lin(h, block.mlp.c_proj)


def _block(block, x, act, mask=None):
    out, probs = _attend(*_qkv(block, _ln(x, block.ln_1)), mask)
    x = x + _lin(out, block.attn.out_proj)
    return x + _mlp(block, _ln(x, block.ln_2), act), probs


def _torch_embed(vision, images, pos_resize):
    x = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
    weight = _t(vision.conv1.kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
    p = vision.config.patch_size
    x = F.conv2d(x, weight, stride=p)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = _t(vision.positional_embedding)
    g = vision.config.grid
    grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    if pos_resize == "bilinear":  # AnomalyCLIP's F.interpolate(mode="bilinear")
        grid = F.interpolate(grid, (gh, gw), mode="bilinear", align_corners=False)
    else:  # open_clip's resize_pos_embed
        grid = F.interpolate(grid, (gh, gw), mode="bicubic", antialias=True, align_corners=False)
    pos = torch.cat([pos[:1], grid[0].flatten(1).T])
    x = torch.cat([_t(vision.class_embedding).expand(b, 1, d), x], 1) + pos
    return _ln(x, vision.ln_pre), (gh, gw)


_HAAR = (
    0.5
    * torch.tensor(
        [[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]],
        dtype=torch.float64,
    )[:, None]
)  # (4, 1, 2, 2): ll, lh, hl, hh


def _torch_hfd(hfd, grid):
    """grid (B, h, w, C) -> F + F^D, the DWT as a stride-2 conv, its inverse the transposed conv."""
    f = _lin(grid, hfd.spatial)
    b, h, w, c = f.shape
    planes = f.permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    if hfd.kind == "haar":
        planes = F.pad(planes, (0, w % 2, 0, h % 2), mode="replicate")
        bands = F.conv2d(planes, _HAAR, stride=2)  # (B*C, 4, h', w')
        bands = bands.reshape(b, c, 4, *bands.shape[-2:]).permute(2, 0, 3, 4, 1)
        mapped = torch.stack([_lin(bands[0], hfd.low)] + [_lin(x, hfd.high) for x in bands[1:]])
        mapped = mapped.permute(1, 4, 0, 2, 3).reshape(b * c, 4, *bands.shape[2:4])
        detail = F.conv_transpose2d(mapped, _HAAR, stride=2)[:, 0, :h, :w]
        detail = detail.reshape(b, c, h, w).permute(0, 2, 3, 1)
    else:
        sobel_x = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
        kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
        grads = F.conv2d(F.pad(planes, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = torch.sqrt((grads**2).sum(1) + 1e-6).reshape(b, c, h, w).permute(0, 2, 3, 1)
        detail = _lin(f, hfd.low) + _lin(magnitude, hfd.high)
    return grid + detail


def _torch_prompts(model, m, images):
    """The prompt source on a plain CLIP pass, then P -> P' (B, M, D); and the SLFS indices."""
    vision = model.clip.vision
    x, _ = _torch_embed(vision, images, m.pos_resize)
    b = x.shape[0]
    for i, block in enumerate(vision.blocks, start=1):
        x, probs = _block(block, x, m.act)
        if i == m.slfs_attn_layer:
            cls_attention = probs.mean(1)[:, 0, 1:]  # heads averaged
        if i == m.slfs_feature_layer:
            features = x
    indices = None
    if m.use_slfs:  # SLFS: the top-K patches by CLS attention, P = V[T]
        indices = cls_attention.topk(m.top_k, dim=-1).indices
        source = _ln(torch.stack([features[j, 1:][indices[j]] for j in range(b)]), vision.ln_post)
        if m.top_k != m.local_prompts:  # K tokens -> M tokens
            source = _lin(source.transpose(1, 2), model.prompt_token_proj).transpose(1, 2)
    else:  # the "Global token": the last block's CLS in each of the M slots
        source = _ln(x[:, :1], vision.ln_post).expand(b, m.local_prompts, -1)
    return _lin(source, model.visual_prompt_proj), indices


def torch_forward(model, config, batch):
    """The paper's DLVP-CLIP forward and loss, transcribed in torch."""
    m = config.model
    vision, text = model.clip.vision, model.clip.text
    images = batch["image"]
    b, height, width, _ = images.shape
    prompts = indices = None
    if m.use_slfs or m.use_mlop:
        prompts, indices = _torch_prompts(model, m, images)

    # The prompted pass: plain CLIP blocks, or AnomalyCLIP's DPAM (dual path) on the last ones.
    x, grid_hw = _torch_embed(vision, images, m.pos_resize)
    n_tokens = x.shape[1]
    if prompts is not None:
        x = torch.cat([x, prompts], 1)
    depth = len(vision.blocks)
    dpam_start = depth - m.dpam_layers + 2
    x_ori, taps = None, {}
    for i, block in enumerate(vision.blocks, start=1):
        if prompts is not None and i <= m.visual_fixed_depth + 1:
            x = torch.cat([x[:, :n_tokens], prompts], 1)
            if x_ori is not None:
                x_ori = torch.cat([x_ori[:, :n_tokens], prompts], 1)
        if i < dpam_start:
            x, _ = _block(block, x, m.act)
        else:
            if x_ori is None:
                x_ori = x
            q, kk, v = _qkv(block, _ln(x_ori, block.ln_1))
            ori, _ = _attend(q, kk, v)
            vv, _ = _attend(v, v, v)
            x_ori = x_ori + _lin(ori, block.attn.out_proj)
            x_ori = x_ori + _mlp(block, _ln(x_ori, block.ln_2), m.act)
            x = x + _lin(vv, block.attn.out_proj)
        if i in m.layers:
            taps[i] = x[:, :n_tokens]
    global_token = (x if x_ori is None else x_ori)[:, 0]

    # Text: AnomalyCLIP object-agnostic prompts, deep prompts F_theta(P') + E_j in blocks 2..depth.
    ids = torch.from_numpy(np.asarray(model.prompt_ids[...], np.int64))
    emb = _t(text.token_embedding.embedding)[ids]
    ctx = torch.stack([_t(model.ctx_normal), _t(model.ctx_abnormal)])
    emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + m.n_ctx :]], 1)
    static = _t(model.text_deep_prompts)
    if m.use_mlop:
        shared = _lin(prompts, model.text_prompt_proj)
        deep = [(shared + e).repeat_interleave(2, 0) for e in static]
        emb = emb.repeat(b, 1, 1)
        ids = ids.repeat(b, 1)
    else:
        deep = [e.expand(2, -1, -1) for e in static]
    t = emb.shape[1]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    y = emb + _t(text.positional_embedding)[:t]
    for i, block in enumerate(text.blocks, start=1):
        if 2 <= i <= len(deep) + 1:
            p = deep[i - 2]
            y = torch.cat([y[:, :1], p, y[:, 1 + p.shape[1] :]], 1)
        y, _ = _block(block, y, m.act, mask)
    pooled = y[torch.arange(y.shape[0]), ids.argmax(-1)]
    text_feats = _ln(pooled, text.ln_final) @ _t(text.text_projection)
    text_feats = text_feats.reshape(-1, 2, text_feats.shape[-1]).expand(b, -1, -1)
    text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)

    # Maps and image score.
    layer_probs, pooled_layers = [], []
    for n, layer in enumerate(m.layers):
        tokens = taps[layer][:, 1:]
        if m.use_hfd and m.hfd_space == "residual":
            tokens = _torch_hfd(model.hfd[n], tokens.reshape(b, *grid_hw, -1)).flatten(1, 2)
        feats = _ln(tokens, vision.ln_post) @ _t(vision.proj)
        if m.use_hfd and m.hfd_space == "projected":
            feats = _torch_hfd(model.hfd[n], feats.reshape(b, *grid_hw, -1)).flatten(1, 2)
        pooled_layers.append(feats.mean(1))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        sim = ((feats @ text_feats.transpose(1, 2)) / m.temperature).softmax(-1)
        sim = sim.reshape(b, *grid_hw, 2).permute(0, 3, 1, 2)
        sim = F.interpolate(sim, (height, width), mode="bilinear", align_corners=False)
        layer_probs.append(sim)  # (B, 2, H, W)
    anomaly_map = torch.stack([(p[:, 1] + 1 - p[:, 0]) / 2 for p in layer_probs]).mean(0)
    if m.global_ln_post:  # CLIP's image embedding
        image_feat = _ln(global_token, vision.ln_post) @ _t(vision.proj)
    else:  # AnomalyCLIP's quirk: no ln_post on the global token
        image_feat = global_token @ _t(vision.proj)
    image_feat = image_feat + _lin(torch.cat(pooled_layers, -1), model.local_compress)
    image_feat = image_feat / image_feat.norm(dim=-1, keepdim=True)
    image_logits = (image_feat[:, None] @ text_feats.transpose(1, 2))[:, 0] / m.temperature

    # Loss: BCE on S_p + seg_weight * per-layer (focal + Dice_a + Dice_n), AnomalyCLIP's forms.
    gt = torch.from_numpy(np.asarray(batch["gt_mask"], np.float64))
    label = torch.from_numpy(np.asarray(batch["gt_label"], np.float64))

    def dice(pred, target):
        inter = (pred.flatten(1) * target.flatten(1)).sum(1)
        score = (2 * inter + 1) / (pred.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        return 1 - score.mean()

    def focal(probs, target, smooth=1e-5):
        one_hot = torch.stack([1 - target, target], 1).clamp(smooth, 1 - smooth)
        pt = (one_hot * probs).sum(1) + smooth
        return (-((1 - pt) ** 2) * pt.log()).mean()

    seg = sum(focal(p, gt) + dice(p[:, 1], gt) + dice(p[:, 0], 1 - gt) for p in layer_probs)
    s_p = image_logits.softmax(-1)[:, 1]
    bce = F.binary_cross_entropy(s_p, label)
    loss = config.loss.cls_weight * bce + config.loss.seg_weight * seg
    return {
        "anomaly_map": anomaly_map,
        "pred_score": s_p,
        "image_logits": image_logits,
        "layer_probs": torch.stack(layer_probs).permute(0, 1, 3, 4, 2),
        "local_indices": indices,
        "loss": loss,
    }
