r"""DLVP-CLIP (Zhang et al., CVPR 2026): dynamic local visual prompts + wavelet HFD on frozen CLIP.

Run (train on the MVTec-AD test split, test zero-shot on VisA; the other direction with
``:train_set=visa``)::

    python -m zsad_jax.train --config=configs/dlvp_clip.py --workdir=runs/dlvp_clip
    python -m zsad_jax.train --config=configs/dlvp_clip.py:train_set=visa --workdir=runs/dlvp_visa
    python -m zsad_jax.summary --config=configs/dlvp_clip.py

Variants after the colon (comma-separated): ``train_set=visa``, ``tiny`` (random-weight tiny CLIP,
36-px images, for tests and smoke runs), and the paper's ablation rows ``ablation=none`` (w/o SLFS &
MLoP), ``ablation=slfs`` (+SLFS only), ``ablation=mlop`` (+MLoP only), ``ablation=no_hfd`` (SLFS &
MLoP, w/o HFD), ``ablation=sobel`` (HFD replaced by Sobel), ``ablation=full`` (default).

Reported by the paper (zero-shot, %, macro over classes; no code was released, so these are the
paper's numbers, not a code's logs): MVTec-AD (trained on VisA) I-AUROC 94.2, P-AUROC 90.4; VisA
(trained on MVTec-AD) I-AUROC 87.9, P-AUROC 95.7; BTAD I 92.6, DAGM I 99.3, DTD-Synthetic I 96.8.
Ablation (MVTec I/P, VisA I/P): w/o SLFS & MLoP 89.5/89.0, 84.2/95.0; +SLFS only 91.0/89.3,
86.3/95.2; +MLoP only 90.4/89.6, 85.1/95.1; w/o HFD 92.8/89.5, 85.8/95.3; full 94.2/90.4,
87.9/95.7; Sobel instead of HFD: VisA 86.7/95.2. Top-K = 1..5, MVTec I: 92.1/92.4/92.9/94.2/92.7.

Facts from the paper (methods.md §4): frozen CLIP ViT-L/14, 518x518 input, patch features of
layers 6/12/18/24, K = 4 top-attention patches, 4 local prompts, prompt depth 9, Adam lr 1.5e-4,
AnomalyCLIP's cross-dataset protocol, loss BCE + per-layer (Dice_a + Dice_n + Focal), map
``mean_l (M^a_l + 1 - M^n_l) / 2``, image feature ``X_p + X_c``.

Everything else is a CHOICE (no official code), with AnomalyCLIP (zqhang/AnomalyCLIP, the base the
paper says it follows) as the default where it has an answer. Each is a field below:

- ``backbone``: OpenAI ViT-L/14@336 (AnomalyCLIP's weights; the paper says "OpenCLIP ViT-L/14"),
  QuickGELU (``act``; OpenAI ``clip`` code as AnomalyCLIP), bilinear positional-grid resize
  (``pos_resize``; AnomalyCLIP's ``F.interpolate(mode="bilinear")``).
- Text side: AnomalyCLIP's object-agnostic prompts "X x n_ctx object." / "X x n_ctx damaged
  object." with ``n_ctx=12`` learnt vectors; deep prompts in text blocks 2..``prompt_depth`` (9:
  AnomalyCLIP's depth 9 = 8 deep prompts of ``text_prompt_len=4`` tokens, the paper's "4 prompts,
  depth 9"). MLoP's text prompt of block j is ``F_theta(P') + E_j`` with ``E_j`` the AnomalyCLIP
  compound prompt and ``F_theta`` one Linear(D_vision -> D_text) shared by all blocks.
- ``dpam_layers=20``: AnomalyCLIP's DPAM (V-V attention, dual path without the MLP, blocks 6..24)
  in the prompted pass; the taps come from the V-V path, the global token from the original path.
  1 = no DPAM.
- SLFS: ``slfs_attn_layer=24`` (the last block; heads averaged, the paper does not say),
  ``slfs_feature_layer=24`` (V = that block's patch tokens), ``slfs_ln_post=True`` (V through the
  frozen ``ln_post``: the raw residual stream of OpenAI CLIP has a few huge channels). The
  selection runs on a separate plain CLIP pass (the paper selects from "the original CLIP visual
  encoder"), so the method costs two vision passes.
- MLoP, vision: M = K (``top_k=4``), ``P' = Linear(D, D)(P)`` token-wise; ``visual_fixed_depth``
  J = 9 (= prompt depth): blocks 1..J+1 take P' afresh (outputs of blocks <= J discarded), later
  blocks let the prompt tokens evolve.
- Ablation mapping: without SLFS the prompt source is the global CLS token repeated K times (the
  paper's "Global token" comparison); "+SLFS only" appends the selected prompts to the vision
  tower only (text keeps the static AnomalyCLIP prompts); "w/o SLFS & MLoP" is AnomalyCLIP's
  prompting plus HFD and the X_p branch.
- HFD: ``hfd_space="projected"`` (on the ``ln_post @ proj`` patch features, 768 wide, where the
  maps are computed; ``"residual"`` = on the 1024-wide residual stream before ``ln_post``);
  ``F_v``, ``low``, ``high`` are Linear(C, C) with torch's default init, ``high`` shared by LH, HL,
  HH; odd 37x37 grids: the last row/column is repeated before the DWT (PyWavelets' "symmetric"
  mode for Haar) and cropped after the inverse. ``hfd_kind="sobel"``: ``F + low(F~) +
  high(sqrt(gx^2 + gy^2 + 1e-6))`` with replicate borders.
- Image score: ``X_p = Linear(L*E, E)(concat_l GAP_l)`` over the HFD-enhanced patch features,
  ``X_c`` = global token ``@ proj`` WITHOUT ``ln_post`` (``global_ln_post=False`` reproduces
  AnomalyCLIP's ``x_ori[0] @ proj``), temperature 0.07; BCE on ``S_p`` (as two-class
  cross-entropy on the logits, the same value).
- ``model.remat`` (shared field): rematerialise the prompted pass's blocks in the backward pass
  (the visual prompts are trained, so gradients flow through every vision block at 37x37+5
  tokens); same gradients, less activation memory.
- Loss: AnomalyCLIP's two-class focal loss (gamma 2) and soft Dice; ``loss.seg_weight=4``
  (AnomalyCLIP's ``lam``; the paper's formula shows weight 1), ``loss.cls_weight=1``.
- Optimiser/data: Adam lr 1.5e-4 (paper) with AnomalyCLIP's betas (0.5, 0.999), 15 epochs,
  batch 8, Gaussian sigma 4 on the test maps (``sigma``; 0 = off), maps upsampled bilinearly
  (align_corners=False) before the loss, as AnomalyCLIP.

Trainable parameters at full size (ViT-L/14, widths 1024/768, E = 768): context 2*12*768 +
deep prompts 8*4*768 + visual projection 1024*1024+1024 + F_theta 1024*768+768 + HFD 4 layers *
3 * (768*768+768) + X_p (4*768)*768+768 = 11,326,976.
"""

from __future__ import annotations

import ml_collections

from configs.common import CLIP_L14_336, backbone, base_config, parse_arg, use_synthetic_benchmark

ABLATIONS = {
    # name: (use_slfs, use_mlop, use_hfd, hfd_kind)
    "none": (False, False, True, "haar"),
    "slfs": (True, False, True, "haar"),
    "mlop": (False, True, True, "haar"),
    "no_hfd": (True, True, False, "haar"),
    "sobel": (True, True, True, "sobel"),
    "full": (True, True, True, "haar"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_arg(arg)
    unknown = sorted(set(variant) - {"train_set", "test_set", "tiny", "ablation"})
    if unknown:
        raise ValueError(
            f"configs/dlvp_clip.py: unknown variant(s) {unknown}; use train_set=..., test_set=..., "
            f"tiny, ablation={'|'.join(ABLATIONS)}"
        )
    c = base_config("dlvp_clip", arg)
    m = c.model
    m.backbone = backbone("clip", CLIP_L14_336, "vit_l14_336")
    m.act = "quick_gelu"
    m.pos_resize = "bilinear"
    m.layers = (6, 12, 18, 24)
    # Ablation switches (the paper's table).
    m.use_slfs = True
    m.use_mlop = True
    m.use_hfd = True
    m.hfd_kind = "haar"
    m.hfd_space = "projected"
    # SLFS
    m.top_k = 4
    m.slfs_attn_layer = 24
    m.slfs_feature_layer = 24
    m.slfs_ln_post = True
    # MLoP
    m.visual_fixed_depth = 9
    m.n_ctx = 12
    m.text_prompt_len = 4
    m.prompt_depth = 9
    m.dpam_layers = 20
    # Scoring
    m.temperature = 0.07
    m.sigma = 4.0
    m.global_ln_post = False
    m.local_image_branch = True
    c.loss = ml_collections.ConfigDict({"cls_weight": 1.0, "seg_weight": 4.0})

    c.data.image_size = 518
    c.data.batch_size = 8
    c.optim.lr = 1.5e-4
    c.optim.b1 = 0.5
    c.optim.b2 = 0.999
    c.optim.epochs = 15

    ablation = str(variant.get("ablation", "full"))
    if ablation not in ABLATIONS:
        raise ValueError(
            f"configs/dlvp_clip.py: ablation={ablation!r}; use one of {list(ABLATIONS)}"
        )
    m.use_slfs, m.use_mlop, m.use_hfd, m.hfd_kind = ABLATIONS[ablation]

    if variant.get("tiny"):
        m.backbone.preset = "tiny"
        m.backbone.random_init = True
        m.backbone.checkpoint = None
        m.layers = (1, 2, 3)
        m.slfs_attn_layer = 3
        m.slfs_feature_layer = 3
        m.visual_fixed_depth = 1
        m.dpam_layers = 2  # DPAM on the last block only
        m.prompt_depth = 3
        m.n_ctx = 6
        m.sigma = 1.0
        c.data.image_size = 36  # 9x9 patches: an odd grid, like 37x37
        c.data.batch_size = 2
        c.eval.batch_size = 2
        c.optim.epochs = 1
        use_synthetic_benchmark(c)
    return c
