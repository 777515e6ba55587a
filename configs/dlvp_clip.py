r"""DLVP-CLIP (Zhang et al., CVPR 2026): dynamic local visual prompts + wavelet HFD on frozen CLIP.

Run (train on the MVTec-AD test split, test zero-shot on VisA; the other direction with
``:train_set=visa``)::

    python -m zsad_jax.train --config=configs/dlvp_clip.py --workdir=runs/dlvp_clip
    python -m zsad_jax.train --config=configs/dlvp_clip.py:train_set=visa --workdir=runs/dlvp_visa
    python -m zsad_jax.train --config=configs/dlvp_clip.py:ablation=no_hfd --workdir=runs/dlvp_nohfd
    python -m zsad_jax.summary --config=configs/dlvp_clip.py

The paper released no code, so this file is the reference. Its rule: where the paper decides, the
default is the paper; where the paper is silent, the choice is a documented field (and, for the
big ones, a variant); what the project or AnomalyCLIP adds and the paper never mentions is off by
default. DLVP-CLIP follows AnomalyCLIP's *protocol* (train on one dataset's test split, test
zero-shot on the other; the paper: "Following AnomalyCLIP, the model is fine-tuned on MVTec-AD")
and argues *against* AnomalyCLIP's method ("static prompts struggle to adapt to cross-domain
anomaly forms"). Where AnomalyCLIP's internals are borrowed below, that is marked CHOICE
(AnomalyCLIP): our pick for a gap in the paper, not the paper's statement.

Reported by the paper (zero-shot, %, macro over classes; no code, so these are the paper's numbers,
not a code's logs): MVTec-AD (trained on VisA) I-AUROC 94.2, P-AUROC 90.4; VisA (trained on
MVTec-AD) I-AUROC 87.9, P-AUROC 95.7; BTAD I 92.6, DAGM I 99.3, DTD-Synthetic I 96.8.

Variants after the colon (comma-separated)
------------------------------------------
``train_set=visa`` / ``test_set=...`` (datasets), ``tiny`` (random-weight tiny CLIP, 36-px images,
for tests and smoke runs; combines with every other variant), and:

**The paper's ablation rows** (``ABLATIONS`` and ``TOP_K`` below hold the switches and the numbers
as data; AUROC %, image / pixel, "-" = not reported). The main table reads as an incremental
build-up (methods.md §9): baseline, then one module, then both, then HFD::

    paper row                     variant                MVTec I / P  VisA I / P   SLFS MLoP HFD
    w/o SLFS & MLoP ("Remove      ablation=baseline      89.5 / 89.0  84.2 / 95.0  -    -    -
      entire DLVP")
    + SLFS only ("Extract local   ablation=slfs_only     91.0 / 89.3  86.3 / 95.2  on   -    -
      only")
    + MLoP only ("Bidirectional   ablation=mlop_only     90.4 / 89.6  85.1 / 95.1  CLS  on   -
      injection only")
    + SLFS & MLoP (w/o HFD)       ablation=no_hfd        92.8 / 89.5  85.8 / 95.3  on   on   -
    Full (DLVP + HFD)             ablation=full          94.2 / 90.4  87.9 / 95.7  on   on   Haar
                                    (the default)
    suppl.: Global token          ablation=global_token     - / -     85.6 / 95.6  CLS  on   Haar
    suppl.: Sobel instead of DWT  ablation=sobel            - / -     86.7 / 95.2  on   on   Sobel
    Top-K = 1 .. 5 (M stays 4)    top_k=1 .. top_k=5     I 92.1, 92.4, 92.9, 94.2, 92.7 (MVTec)
                                                         I 84.5, 85.7, 86.7, 87.9, 85.7 (VisA)

What each switch does: ``use_slfs`` on = the prompt source is the top-K patches of a plain CLIP
pass ("SLFS"), "CLS" = the source is that pass's global token in each of the M prompt slots (no
attention, no top-K: the "Global token" comparison and, lacking a selector, "+MLoP only"), "-" with
MLoP also off = no prompts and no plain pass at all; ``use_mlop`` on = P' goes to both towers (text
deep prompts ``F_theta(P') + E_j``), off with SLFS on = P' goes to the vision tower only and the
text keeps its static prompts ``E_j`` (how "+SLFS only" can use the selected patches without
MLoP: CHOICE); ``use_hfd`` / ``hfd_kind`` = the per-layer HFD block, Haar DWT or Sobel. Every row
keeps the paper's scoring (``X_p + X_c``, the per-layer maps and losses). ``top_k=k`` is the full
model with K = k selected patches; the number of prompts M stays 4 (the paper: "The number of local
prompts is 4"), so K != 4 adds a learnt token map Linear(K, M) (the paper says P is "projected into
prompt tokens P' in R^{M x C}" and gives no form: CHOICE); ``top_k=4`` is ``full``. ``top_k`` only
combines with the full model (each run is one row of the paper).

**AnomalyCLIP internals the paper does not state** (off by default, for comparison runs):
``dpam`` (AnomalyCLIP's DPAM on blocks 6..24, ``model.dpam_layers=20``), ``seg_weight=4``
(AnomalyCLIP's ``lam = 4``, ``loss.seg_weight``), and ``anomalyclip`` = both plus AnomalyCLIP's
``x_ori[0] @ proj`` image feature without ``ln_post`` (``model.global_ln_post=False``); an explicit
``seg_weight=1`` still wins over ``anomalyclip``.

**Backbone** (``BACKBONES``): ``backbone=openai`` (default), ``backbone=openai_gelu``,
``backbone=laion400m``; see "Backbone" below.

Paper decisions that are defaults (methods.md §4, §9; quotes from papers/DLVP-CLIP.txt)
-------------------------------------------------------------------------------------
- ViT-L/14 frozen, "input size of 518x518", "Patch embeddings from layers 6/12/18/24", "Adam ...
  learning rate of 1.5e-4", "The number of local prompts is 4, and the prompt depth is 9", "K=4 is
  optimal", SLFS on "the attention matrix ... from the last layer".
- Loss: "L_total = L_cls(S_p, y) + sum_l L^l_seg" with "L_seg = Dice(M^a_l, S_gt) +
  Dice(M^n_l, I - S_gt) + Focal(M^a_l, S_gt)": ``loss.cls_weight = loss.seg_weight = 1``. (The
  previous default 4 was AnomalyCLIP's ``lam``; Adam is invariant to a common scale of the loss,
  not to the 1:4 ratio between its terms, so it changes what is learnt: ``seg_weight=4`` keeps it
  as a variant.)
- Plain CLIP layers, no DPAM (``dpam_layers=1``): the paper writes the encoder as CLIP layers
  ``L^P_j`` and motivates HFD by "the self-attention of ViT behaves like a low-pass filter", i.e.
  standard q-k attention; V-V attention is AnomalyCLIP's mechanism. The maps and ``X_c`` then come
  from the one plain prompted path.
- Inference map ``M = 1/L sum_l (M^a_l + I - M^n_l) / 2``; image feature ``X = X_p + X_c``,
  ``S_p = Softmax(X~ F~_T)``.
- Protocol (AnomalyCLIP's, which the paper follows): train on the auxiliary dataset's test split;
  masks ``Resize(518)`` bilinear then ``> 0.5`` for training and testing (AnomalyCLIP's
  ``dataset.py``/``train.py``: 0/255 mask, torchvision bilinear, threshold; methods.md §5):
  ``data.mask_resize = data.train_mask_resize = "bilinear_threshold"``.

Choices (the paper is silent; each is a field)
----------------------------------------------
Backbone. The paper says "OpenCLIP ViT-L/14"; it names neither the weights nor the code path, and
each changes numbers:

- Chosen: OpenAI ViT-L/14@336 weights (``weights/clip-vit-l14-336``) with QuickGELU (``act``) and a
  bilinear positional-grid resize (``pos_resize``). Why: the paper's tables compare against
  AnomalyCLIP (91.5 MVTec I-AUROC, AnomalyCLIP's OpenAI ViT-L/14@336 number) under AnomalyCLIP's
  protocol, at AnomalyCLIP's 518 input with its prompt depth 9 / 4 prompts, so the same backbone
  is the reading that keeps the comparison fair; QuickGELU is the activation those weights were
  trained with (open_clip itself loads OpenAI weights with QuickGELU); bilinear is AnomalyCLIP's
  ``F.interpolate(mode="bilinear")`` of the 24x24 grid to 37x37. CHOICE (AnomalyCLIP).
- ``backbone=openai_gelu``: the same weights through a VAND/APRIL-GAN-style open_clip
  ``create_model("ViT-L-14-336", img_size=518, pretrained="openai")``, which builds the model from
  the json without ``quick_gelu`` and so runs exact (erf) GELU, with open_clip's bicubic
  ``resize_pos_embed`` (methods.md §0: the quirk of ACD-CLIP and AVA-DINO). Same converted weights.
- ``backbone=laion400m``: LAION-400M ViT-L/14 (open_clip ``ViT-L-14``, ``laion400m_e32``, 224 px,
  16x16 grid): exact GELU (open_clip's ``ViT-L-14`` config; only its ``-quickgelu`` configs and
  OpenAI weights use QuickGELU), bicubic grid resize 16 -> 37, CLIP's mean/std (open_clip's
  default for these weights). Convert once::

      python -m convert.clip --src vit_l_14-laion400m_e32-3d133497.pt \
          --bpe bpe_simple_vocab_16e6.txt.gz --out weights/clip-vit-l14-laion400m

  (an open_clip state dict has OpenAI's key layout, so the converter records QuickGELU; this
  config's ``act="gelu"`` replaces it at load time). LAION-2B ``laion2b_s32b_b82k`` is not offered:
  open_clip normalises it with mean = std = 0.5, which no ``data.transform`` does yet.

Text side (CHOICE (AnomalyCLIP) throughout):

- Object-agnostic prompts "X x n_ctx object." / "X x n_ctx damaged object." with ``n_ctx=12``
  learnt vectors, no class names; deep prompts ``E_j`` in text blocks 2..``prompt_depth`` (9) of
  ``text_prompt_len`` = M = 4 tokens: AnomalyCLIP's depth 9 / ``t_n_ctx`` 4 compound prompts fit
  the paper's "4 prompts, depth 9". MLoP's text prompt of block j is ``F_theta(P') + E_j`` with
  ``F_theta`` one Linear(D_vision -> D_text) shared by all blocks.
- Where they go: the paper says the text prompts are "appended to the text tokens S_j"; here they
  *replace* positions 1..M (the first context vectors, right after SOS) from block 2 on, as
  AnomalyCLIP's and MaPLe's deep prompts do. Appending after the sentence cannot work in CLIP's
  text tower: its causal mask hides every later token from the EOT token that gives the text
  feature, so appended prompts would have no effect; replacing keeps the 77-token length and the
  EOT position.

Vision side:

- SLFS: ``slfs_attn_layer=24`` (the paper's last layer; heads averaged, the paper does not say:
  CHOICE), ``slfs_feature_layer=24`` (V = that block's patch tokens: CHOICE), ``slfs_ln_post=True``
  (V, or the global token without SLFS, through the frozen ``ln_post``: the raw residual stream of
  OpenAI CLIP has a few huge channels: CHOICE). The selection runs on a separate plain CLIP pass
  (the paper selects from "the original CLIP visual encoder"), so SLFS costs a second vision pass;
  the "Global token" source reads the CLS token of the same plain pass (last block, ``ln_post``).
- MLoP: ``P' = Linear(D, D)(P)`` token-wise (K = M: the paper's projection; K != M adds
  Linear(K, M) over the tokens first); ``visual_fixed_depth`` J = 9 (= prompt depth: CHOICE):
  blocks 1..J+1 take P' afresh (outputs of blocks <= J discarded), later blocks let the prompt
  tokens evolve; P' is appended after the patch tokens (the vision tower has no causal mask).
- ``dpam_layers=1``: no DPAM (paper). ``dpam`` / ``anomalyclip`` set 20: AnomalyCLIP's V-V
  attention in blocks 6..24 (dual path, no MLP on the V-V path); the maps then come from the V-V
  path and ``X_c`` from the original path.
- HFD: ``hfd_space="projected"`` (on the ``ln_post @ proj`` patch features, 768 wide, where the
  maps are computed; ``"residual"`` = on the 1024-wide residual stream before ``ln_post``: CHOICE);
  ``F_v``, ``low``, ``high`` are Linear(C, C), ``high`` shared by LH, HL, HH (CHOICE); odd 37x37
  grids: the last row/column is repeated before the DWT (PyWavelets' "symmetric" mode for Haar)
  and cropped after the inverse (CHOICE). ``hfd_kind="sobel"``: ``F + low(F~) + high(sqrt(gx^2 +
  gy^2 + 1e-6))`` with replicate borders (CHOICE: the paper names only "Sobel filtering").
- HFD start, ``hfd_init="torch"``: the paper writes a residual ``F^o = F^V + F^D`` and "separate
  linear operations", and says nothing of their initialisation; it does not imply an identity
  start, so the maps are what a fresh ``nn.Linear`` is (torch's default uniform init). Each such
  C x C map scales a vector by about 1/sqrt(3), so at step 0 ``F^D`` is ~0.33 of ``F``'s norm
  (cosine ~0.95 to CLIP's features). ``hfd_init="zero"`` zeroes ``low`` and ``high`` so HFD
  starts as the identity (``F^o = F``); ``F_v`` then gets no gradient on the first step.
- Image score: ``X_p = Linear(L*E, E)(concat_l GAP_l)`` over the HFD-enhanced patch features
  (CHOICE), ``X_c = ln_post(CLS) @ proj`` (``global_ln_post=True``: CLIP's own image embedding, the
  paper's "global CLS feature"; ``False`` = AnomalyCLIP's ``x_ori[0] @ proj``, a quirk of its code,
  in ``anomalyclip``), temperature 0.07 (CHOICE (AnomalyCLIP)); BCE on ``S_p`` (as two-class
  cross-entropy on the logits, the same value).
- Precision: ``compute_dtype = "auto"`` (shared field) runs CLIP's matrix products in bfloat16 on
  GPU/TPU and float32 on CPU; heads, LayerNorms, logits and losses stay float32. The paper states
  no precision and released no code; float32 is the reference (the parity tests'):
  ``--config.compute_dtype=float32`` gives that on a GPU too (README, "Precision").
- ``model.remat`` (shared field): rematerialise the prompted pass's blocks in the backward pass
  (the visual prompts are trained, so gradients flow through every vision block at 37x37+M
  tokens); same gradients, less activation memory.
- Loss forms: AnomalyCLIP's two-class focal loss (gamma 2) and soft Dice (CHOICE (AnomalyCLIP): the
  paper names Focal and Dice only).
- Optimiser/data: Adam lr 1.5e-4 (paper) with betas (0.5, 0.999), 15 epochs, batch 8, Gaussian
  sigma 4 on the test maps (``sigma``; 0 = off), maps upsampled bilinearly (align_corners=False)
  before the loss: CHOICE (AnomalyCLIP) each, the paper gives none of them.

Trainable parameters at full size (ViT-L/14, widths 1024/768, E = 768), default: context
2*12*768 + deep prompts 8*4*768 + visual projection 1024*1024+1024 + F_theta 1024*768+768 + HFD 4
layers * 3 * (768*768+768) + X_p (4*768)*768+768 = 11,326,976 (each variant's count is pinned in
tests/test_dlvp_clip.py).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs.common import (
    CLIP_L14_336,
    DATASET_VARIANTS,
    FLAG,
    WEIGHTS_DIR,
    backbone,
    base_config,
    parse_variants,
    use_synthetic_benchmark,
)

_FILE = "configs/dlvp_clip.py"

# (image AUROC, pixel AUROC) in %, None where the paper reports nothing.
Reported = tuple[float | None, float | None]
NOT_REPORTED: Reported = (None, None)


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's ablation tables: the switches it sets and the numbers it reports
    (zero-shot AUROC %, MVTec-AD trained on VisA and VisA trained on MVTec-AD)."""

    row: str  # the paper's label of the row
    use_slfs: bool
    use_mlop: bool
    use_hfd: bool
    hfd_kind: str = "haar"
    top_k: int = 4
    mvtec_ad: Reported = NOT_REPORTED
    visa: Reported = NOT_REPORTED


ABLATIONS = {
    # The main ablation table, an incremental build-up, then the supplement's two comparisons.
    "baseline": PaperRow("w/o SLFS & MLoP", False, False, False, mvtec_ad=(89.5, 89.0),
                         visa=(84.2, 95.0)),
    "slfs_only": PaperRow("+ SLFS only", True, False, False, mvtec_ad=(91.0, 89.3),
                          visa=(86.3, 95.2)),
    "mlop_only": PaperRow("+ MLoP only", False, True, False, mvtec_ad=(90.4, 89.6),
                          visa=(85.1, 95.1)),
    "no_hfd": PaperRow("+ SLFS & MLoP (w/o HFD)", True, True, False, mvtec_ad=(92.8, 89.5),
                       visa=(85.8, 95.3)),
    "full": PaperRow("Full (DLVP + HFD)", True, True, True, mvtec_ad=(94.2, 90.4),
                     visa=(87.9, 95.7)),
    "global_token": PaperRow("Global token (supplement)", False, True, True, visa=(85.6, 95.6)),
    "sobel": PaperRow("Sobel instead of DWT (supplement)", True, True, True, hfd_kind="sobel",
                      visa=(86.7, 95.2)),
}  # fmt: skip

# The Top-K table: the full model with K selected patches (image AUROC only).
_TOP_K_IMAGE_AUROC = {1: (92.1, 84.5), 2: (92.4, 85.7), 3: (92.9, 86.7), 4: (94.2, 87.9),
                      5: (92.7, 85.7)}  # fmt: skip
TOP_K = {
    k: PaperRow(f"Top-K = {k}", True, True, True, top_k=k, mvtec_ad=(mvtec, None),
                visa=(visa, None))
    for k, (mvtec, visa) in _TOP_K_IMAGE_AUROC.items()
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BackboneChoice:
    """A reading of the paper's "OpenCLIP ViT-L/14": which converted weights, which activation
    and which positional-grid resize (``zsad_jax.encoders.clip``'s ``act`` / ``pos_resize``)."""

    checkpoint: str
    act: str
    pos_resize: str


LAION400M_L14 = f"{WEIGHTS_DIR}/clip-vit-l14-laion400m"
BACKBONES = {
    # OpenAI ViT-L/14@336 through AnomalyCLIP's (OpenAI clip) code: the default.
    "openai": BackboneChoice(CLIP_L14_336, "quick_gelu", "bilinear"),
    # The same weights through a VAND-style open_clip create_model(img_size=518): exact GELU.
    "openai_gelu": BackboneChoice(CLIP_L14_336, "gelu", "bicubic_antialias"),
    # open_clip ViT-L-14 laion400m_e32 (python -m convert.clip, see the docstring).
    "laion400m": BackboneChoice(LAION400M_L14, "gelu", "bicubic_antialias"),
}

# What may follow the colon (``configs.common.parse_variants`` refuses anything else).
VARIANTS = {
    **DATASET_VARIANTS,
    "tiny": FLAG,
    "ablation": tuple(ABLATIONS),
    "top_k": tuple(str(k) for k in TOP_K),
    "backbone": tuple(BACKBONES),
    "dpam": FLAG,
    "seg_weight": ("1", "4"),
    "anomalyclip": FLAG,
}

# AnomalyCLIP's values of the internals the paper does not state (``dpam``, ``seg_weight=4``).
ANOMALYCLIP_DPAM_LAYERS = 20  # DPAM_layer=20: V-V attention in blocks 6..24 of 24
ANOMALYCLIP_SEG_WEIGHT = 4.0  # train.py: lam = 4


def paper_row(variant: dict) -> PaperRow:
    """The paper row a parsed variant asks for: ``ablation=...``, ``top_k=...`` or ``full``."""
    if "top_k" in variant:
        if variant.get("ablation", "full") != "full":
            raise ValueError(
                f"{_FILE}: top_k={variant['top_k']} is the paper's Top-K ablation of the full "
                f"model; it does not combine with ablation={variant['ablation']}"
            )
        return TOP_K[int(variant["top_k"])]
    return ABLATIONS[str(variant.get("ablation", "full"))]


def _set_backbone(m: ml_collections.ConfigDict, name: str) -> None:
    choice = BACKBONES[name]
    # The preset only shapes builds without weights (summary); it is the ViT-L/14 architecture.
    m.backbone = backbone("clip", choice.checkpoint, "vit_l14_336")
    m.act = choice.act
    m.pos_resize = choice.pos_resize


def _use_anomalyclip_internals(c: ml_collections.ConfigDict, variant: dict) -> None:
    """``dpam``, ``seg_weight=4`` and ``anomalyclip``: AnomalyCLIP's internals, off by default."""
    if variant.get("dpam") or variant.get("anomalyclip"):
        c.model.dpam_layers = ANOMALYCLIP_DPAM_LAYERS
    if variant.get("anomalyclip"):
        c.model.global_ln_post = False  # AnomalyCLIP's x_ori[0] @ proj
        c.loss.seg_weight = ANOMALYCLIP_SEG_WEIGHT
    if "seg_weight" in variant:
        c.loss.seg_weight = float(variant["seg_weight"])


def _use_tiny(c: ml_collections.ConfigDict) -> None:
    """Random-weight 3-block CLIP on 36-px images (9x9 patches: an odd grid, like 37x37)."""
    m = c.model
    m.backbone.preset = "tiny"
    m.backbone.random_init = True
    m.backbone.checkpoint = None
    m.layers = (1, 2, 3)
    m.slfs_attn_layer = 3
    m.slfs_feature_layer = 3
    m.visual_fixed_depth = 1
    if m.dpam_layers > 1:
        m.dpam_layers = 3  # blocks 2..3 of 3, as 6..24 of 24: the first taps stay plain
    m.prompt_depth = 3
    m.n_ctx = 6
    m.sigma = 1.0
    c.data.image_size = 36
    c.data.batch_size = 2
    c.eval.batch_size = 2
    c.optim.epochs = 1
    use_synthetic_benchmark(c)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_variants(arg, VARIANTS, _FILE)
    row = paper_row(variant)
    c = base_config("dlvp_clip", arg)
    m = c.model
    _set_backbone(m, str(variant.get("backbone", "openai")))
    m.layers = (6, 12, 18, 24)  # paper
    # The paper row's switches (ABLATIONS / TOP_K).
    m.use_slfs = row.use_slfs
    m.use_mlop = row.use_mlop
    m.use_hfd = row.use_hfd
    m.hfd_kind = row.hfd_kind
    m.hfd_space = "projected"
    m.hfd_init = "torch"  # the paper gives no init: a fresh nn.Linear's
    # SLFS (paper: K = 4 from the last layer's CLS attention)
    m.top_k = row.top_k
    m.slfs_attn_layer = 24
    m.slfs_feature_layer = 24
    m.slfs_ln_post = True
    # MLoP (paper: 4 local prompts, depth 9)
    m.local_prompts = 4
    m.visual_fixed_depth = 9
    m.n_ctx = 12
    m.text_prompt_len = 4
    m.prompt_depth = 9
    m.dpam_layers = 1  # no DPAM: the paper's plain CLIP layers
    # Scoring
    m.temperature = 0.07
    m.sigma = 4.0
    m.global_ln_post = True  # X_c = CLIP's image embedding ln_post(CLS) @ proj
    m.local_image_branch = True
    c.loss = ml_collections.ConfigDict({"cls_weight": 1.0, "seg_weight": 1.0})  # paper

    c.data.image_size = 518
    c.data.batch_size = 8
    # AnomalyCLIP's protocol: bilinear mask resize, then > 0.5, on both sides.
    c.data.mask_resize = "bilinear_threshold"
    c.data.train_mask_resize = "bilinear_threshold"
    c.optim.lr = 1.5e-4
    c.optim.b1 = 0.5
    c.optim.b2 = 0.999
    c.optim.epochs = 15

    _use_anomalyclip_internals(c, variant)
    if variant.get("tiny"):
        _use_tiny(c)
    return c
