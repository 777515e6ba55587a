"""Config blocks shared by every method config (``get_config(arg)`` files in this folder).

Sections: ``method``, ``model`` (method fields + ``model.backbone``), ``data``, ``optim``, ``mesh``,
``ckpt``, ``eval``, ``seed``, ``compute_dtype``, ``max_bad_steps``.

Variants are given after a colon as comma-separated ``key=value`` or flags::

    --config=configs/af_clip.py:train_set=visa
    --config=configs/af_clip.py:tiny          # tiny random-weight backbone for smoke tests
"""

from __future__ import annotations

import ml_collections

from zsad_jax.names import did_you_mean, known_datasets

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


def dataset_name(value) -> str:
    """A dataset variant's value as read: any case, as ``read_dataset`` takes it (``VisA`` is
    ``visa``); a ``package.module:callable`` as written."""
    value = str(value)
    return value if ":" in value else value.lower()


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
    train_set = dataset_name(variant.get("train_set", "mvtec_ad"))
    test_set = dataset_name(variant.get("test_set", ZERO_SHOT_PAIRS.get(train_set, train_set)))
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
            # The side training images are resized to; 0 = image_size (each paper's recipe trains
            # and tests at one size). Heads on a RoPE encoder (DINOv3) may train smaller than they
            # test: configs/demo.py trains at 160 and tests at image_size.
            "train_image_size": 0,
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
            # Decoding (both sides): resize a mask whose size differs from its image's (nearest)
            # instead of refusing it, and refuse files whose header claims more pixels than this
            # before decoding them (decompression bombs; zsad_jax.data.decode).
            "resize_mismatched_mask": False,
            "image_max_pixels": 178_956_970,  # decode.DEFAULT_MAX_IMAGE_PIXELS, also the maximum
            # The bits a 16-bit image's values use: 12 for 12-bit camera data in 16-bit files.
            "image_bit_depth": 16,
            # A mask pixel is defect above this value (127 for anti-aliased or JPEG masks).
            "mask_threshold": 0,
            # Reader options per side (zsad_jax.data.sources); None = the reader's default, a set
            # one the side's reader does not take is refused. mask_dir: a further mask folder
            # (folder); normal_dir: the normal-image folder (folder, MVTec layouts; default good,
            # BTAD ok); require_masks: folder default = needed iff a mask folder exists, MVTec
            # layouts default True; csv_path: VisA's split csv; meta_path: the meta.json index.
            "train_mask_dir": ml_collections.FieldReference(None, field_type=str),
            "train_normal_dir": ml_collections.FieldReference(None, field_type=str),
            "train_require_masks": ml_collections.FieldReference(None, field_type=bool),
            "train_csv_path": ml_collections.FieldReference(None, field_type=str),
            "train_meta_path": ml_collections.FieldReference(None, field_type=str),
            "test_mask_dir": ml_collections.FieldReference(None, field_type=str),
            "test_normal_dir": ml_collections.FieldReference(None, field_type=str),
            "test_require_masks": ml_collections.FieldReference(None, field_type=bool),
            "test_csv_path": ml_collections.FieldReference(None, field_type=str),
            "test_meta_path": ml_collections.FieldReference(None, field_type=str),
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
    # map_dtype: the dtype the host keeps one category's maps in ("float16" halves that memory but
    # ties small scores, so the pixel metrics move: zsad_jax/evaluate.py).
    c.eval = ml_collections.ConfigDict(
        {"enabled": True, "every_steps": 0, "batch_size": 8, "num_vis": 8, "map_dtype": "float32"}
    )
    c.seed = 0
    # The matrix products' dtype: "auto" = bfloat16 on GPU/TPU, float32 on CPU, decided when the
    # model is built (zsad_jax.nn.resolve_compute_dtype); "float32" / "bfloat16" force one.
    # LayerNorms, softmax, logits and losses are float32 whatever this says.
    c.compute_dtype = "auto"
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


# ----------------------------------------------------------------------------------------------
# Variant checking: every config refuses a variant it does not know, before building anything.

# What a variant in ``parse_variants``'s ``known`` takes: ``FLAG`` a bare name (``tiny``), ``VALUE``
# ``name=<any non-empty value>``, ``DATASET`` ``name=<a zsad_jax.data.protocol.READERS key>``
# (``train_set`` also takes a ``package.module:callable``, see ``zsad_jax.train``), or a tuple of
# the allowed values (``n_groups=2|3|4|6``).
FLAG = None
VALUE = "<value>"
DATASET = "<dataset>"
# The dataset variants every config takes (``base_config`` reads them).
DATASET_VARIANTS = {"train_set": DATASET, "test_set": DATASET}


def describe_variants(known) -> str:
    """``"train_set=..., test_set=..., tiny, n_groups=2|3|4|6"`` for a ``known`` mapping."""
    parts = []
    for name, kind in dict(known).items():
        if kind is FLAG:
            parts.append(name)
        elif isinstance(kind, str):  # VALUE, DATASET
            parts.append(f"{name}=...")
        else:
            parts.append(f"{name}={'|'.join(str(v) for v in kind)}")
    return ", ".join(parts)


def parse_variants(arg: str | None, known, config_file: str) -> dict[str, str | bool]:
    """``parse_arg(arg)``, refusing anything ``known`` does not allow, with a one-line message.

    Args:
      arg: the text after the colon of ``--config=configs/x.py:ARG`` (comma-separated ``key=value``
        or flags), or None.
      known: variant name -> ``FLAG`` | ``VALUE`` | ``DATASET`` | a tuple of allowed values (see
        above), in the order the message lists them.
      config_file: the file named in the message, e.g. ``"configs/af_clip.py"``.

    Returns:
      ``{name: value}`` with ``True`` for flags, as ``parse_arg`` returns.

    Raises:
      ValueError: an unknown variant (with a "did you mean" suggestion), a value given to a flag
        (``tiny=3``), a key variant without a value (``train_set``), a value not allowed
        (``n_groups=5``, ``train_set=vissa``), or one key given twice with different values. The
        message is one line naming ``config_file``.
    """
    known = dict(known)
    listing = f"known variants: {describe_variants(known)}"
    items = [item.strip() for item in (arg or "").split(",")]
    items = [item for item in items if item]
    unknown = [
        f"{name!r}{did_you_mean(name, known)}"
        for name in (item.partition("=")[0].strip() for item in items)
        if name not in known
    ]
    if unknown:
        noun = "variant" if len(unknown) == 1 else "variants"
        raise ValueError(f"{config_file}: unknown {noun} {', '.join(unknown)}; {listing}")

    out: dict[str, str | bool] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        kind = known[name]
        if kind is FLAG:
            if sep:
                raise ValueError(
                    f"{config_file}: variant {name!r} is a flag and takes no value (got {item!r}, "
                    f"write just {name!r}); {listing}"
                )
            out[name] = True
            continue
        if not value:
            raise ValueError(
                f"{config_file}: variant {name!r} needs a value ({name}=..., got {item!r}); "
                f"{listing}"
            )
        if kind is DATASET:
            datasets = known_datasets()
            value = dataset_name(value)
            if value not in datasets and not (name == "train_set" and ":" in value):
                extra = " (or a package.module:callable)" if name == "train_set" else ""
                raise ValueError(
                    f"{config_file}: {name}={value!r} is not a known dataset"
                    f"{did_you_mean(value, datasets)}; known datasets: "
                    f"{', '.join(datasets)}{extra}"
                )
        elif kind is not VALUE:
            allowed = [str(v) for v in kind]
            if value not in allowed:
                raise ValueError(
                    f"{config_file}: {name}={value!r} is not allowed"
                    f"{did_you_mean(value, allowed)}; use {name}={'|'.join(allowed)}"
                )
        if name in out and out[name] != value:
            raise ValueError(
                f"{config_file}: variant {name!r} given twice ({out[name]!r} and {value!r})"
            )
        out[name] = value
    return out
