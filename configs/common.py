"""Config blocks shared by every method config (``get_config(arg)`` files in this folder).

Sections: ``method``, ``model`` (method fields + ``model.backbone``), ``data``, ``optim``, ``mesh``,
``ckpt``, ``eval``, ``seed``, ``compute_dtype``, ``max_bad_steps``.

Variants are given after a colon as comma-separated ``key=value`` or flags::

    --config=configs/af_clip.py:train_set=visa
    --config=configs/af_clip.py:tiny          # tiny random-weight backbone for smoke tests
"""

from __future__ import annotations

import ml_collections

# Where the converted backbones are expected unless a config says otherwise (convert with
# `python -m convert.clip --src ... --out weights/clip-vit-l14-336`).
WEIGHTS_DIR = "weights"
CLIP_L14_336 = f"{WEIGHTS_DIR}/clip-vit-l14-336"
DINOV3_L16 = f"{WEIGHTS_DIR}/dinov3-vitl16"

DATA_ROOTS = {"mvtec_ad": "data/mvtec_ad", "visa": "data/visa", "synthetic": "data/synthetic"}
# The cross-dataset zero-shot protocol: train on one dataset's test split, test on the other.
ZERO_SHOT_PAIRS = {"mvtec_ad": "visa", "visa": "mvtec_ad"}


def parse_arg(arg: str | None) -> dict[str, str | bool]:
    """``"train_set=visa,tiny"`` -> ``{"train_set": "visa", "tiny": True}``."""
    out: dict[str, str | bool] = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        out[key.strip()] = value.strip() if sep else True
    return out


def backbone(kind: str, checkpoint: str | None, preset: str) -> ml_collections.ConfigDict:
    """``kind`` "clip" | "dinov3"; ``checkpoint`` a converted directory; ``preset`` the architecture
    used when building without weights (``summary``, ``eval_shape``) or with random weights
    (``random_init=True``: tests and the demo only)."""
    return ml_collections.ConfigDict(
        {"kind": kind, "checkpoint": checkpoint, "preset": preset, "random_init": False}
    )


def base_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """All sections with neutral defaults; method configs override what their recipe says."""
    variant = parse_arg(arg)
    train_set = str(variant.get("train_set", "mvtec_ad"))
    test_set = str(variant.get("test_set", ZERO_SHOT_PAIRS.get(train_set, train_set)))
    c = ml_collections.ConfigDict()
    c.method = method
    # Method fields; ``model.remat`` asks the method to rematerialise its backbone blocks in the
    # backward pass (trades compute for activation memory; the method decides where it applies).
    c.model = ml_collections.ConfigDict({"remat": False})
    c.data = ml_collections.ConfigDict(
        {
            "train_set": train_set,
            "train_root": DATA_ROOTS.get(train_set, f"data/{train_set}"),
            "train_split": "test",
            "test_set": test_set,
            "test_root": DATA_ROOTS.get(test_set, f"data/{test_set}"),
            "test_split": "test",
            "categories": (),  # empty = every category of the split
            "test_categories": (),
            "image_size": 518,
            "transform": "clip",
            "train_transform": "clip",
            # How masks reach image_size (zsad_jax.data.transforms.MASK_RESIZE_MODES), for the
            # test side and the training side; methods whose official code thresholds a bilinear
            # resize set them.
            "mask_resize": "nearest",
            "train_mask_resize": "nearest",
            "batch_size": 8,
            "num_workers": 0,
            "skip_corrupt": False,
            # A TFDS data directory (python -m zsad_jax.data.tfds_builder) to read both sides from
            # instead of files; None = files under train_root / test_root.
            "tfds_dir": ml_collections.FieldReference(None, field_type=str),
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "name": "adam",
            "lr": 1e-4,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "schedule": "constant",
            "warmup_fraction": 0.0,
            "decay_rate": 1.0,
            "decay_every_epochs": 1,
            "epochs": 1,
            "steps": ml_collections.FieldReference(None, field_type=int),
            "grad_clip": ml_collections.FieldReference(None, field_type=float),
            "clip_only": ml_collections.FieldReference(None, field_type=str),
            "lr_groups": [],
            "grad_accum": 1,
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.ckpt = ml_collections.ConfigDict({"keep": 3, "every_steps": 500, "async": True})
    # Held-out evaluation of config.data.test_set at the end of training (and every_steps > 0).
    c.eval = ml_collections.ConfigDict(
        {"enabled": True, "every_steps": 0, "batch_size": 8, "num_vis": 8}
    )
    c.seed = 0
    c.compute_dtype = "float32"
    # Steps in a row with a non-finite loss or gradient (each one skipped) before training stops.
    c.max_bad_steps = 10
    # metrics.jsonl / TensorBoard rows are means over this many steps.
    c.log_every_steps = 10
    return c


def use_synthetic_benchmark(c: ml_collections.ConfigDict) -> None:
    """Train on the built-in synthetic benchmark's training categories and test zero-shot on its
    held-out ones (generated on first use into ``data/synthetic``): tests, smoke runs, the demo."""
    from zsad_jax.data.synthetic import SYNTHETIC_HELDOUT_CATEGORIES, SYNTHETIC_TRAIN_CATEGORIES

    c.data.update(
        {
            "train_set": "synthetic",
            "train_root": DATA_ROOTS["synthetic"],
            "categories": SYNTHETIC_TRAIN_CATEGORIES,
            "test_set": "synthetic",
            "test_root": DATA_ROOTS["synthetic"],
            "test_categories": SYNTHETIC_HELDOUT_CATEGORIES,
        }
    )
