r"""The embedded default: AVA-DINO's heads on small random encoders, synthetic benchmark, CPU.

    python -m zsad_jax.train --config=configs/demo.py --workdir=runs/demo

Trains on the synthetic benchmark's training categories (generated on first use into
``data/synthetic``; no download) and evaluates zero-shot on its four held-out categories, which
the heads never see. The frozen encoders are ``configs/ava_dino.py:small``: a 6-block patch-8
DINOv3 and a small CLIP text tower, both with *random* weights (no pretrained weights can be
assumed on a fresh machine), so what is learnt is AVA-DINO's part: the routed dual adapters, the
prompt adapters and the text projection on per-image standardised tokens. Everything else is the
AVA-DINO recipe (``configs/ava_dino.py``) except a 10x learning rate for a short run. The last line
printed is JSON with the held-out metrics (anomalib names), ``steps`` and ``seconds``.

Why AVA-DINO: of the heads tried on random encoders (README, "The demo"), its per-image token
standardisation transfers best to unseen categories and its step is the cheapest.
"""

from __future__ import annotations

import ml_collections

from configs import ava_dino
from configs.common import parse_variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # The variants are configs/ava_dino.py's (``small`` is implied); checked here so that a typo is
    # reported against this file.
    parse_variants(arg, ava_dino.VARIANTS, "configs/demo.py")
    c = ava_dino.get_config(",".join(filter(None, ["small", arg])))
    c.optim.steps = 600
    c.optim.lr = 1e-3
    c.ckpt.every_steps = 200
    c.eval.num_vis = 2
    return c
