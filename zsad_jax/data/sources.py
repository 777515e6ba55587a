"""The example source of one side (``train`` or ``test``) of a config's ``data`` section.

Files (the default): ``protocol.read_dataset(<side>_set, <side>_root, <side>_split, categories,
**reader options)``, decoded by ``decode.load_record`` with the decode options. TFDS (pod runs whose
data lives in a bucket): set ``data.tfds_dir`` to the TFDS data directory written by
``python -m zsad_jax.data.tfds_builder --dataset NAME --manual_dir D --data_dir T``; the side's
dataset is then read as ``zsad_anomaly/<dataset>`` from there, through the same pipeline.

Reader options are per side, ``data.<side>_<option>`` (``test_mask_dir``, ``train_normal_dir``):
the two sides usually read different datasets. ``None`` means "not set": the reader's own default.
A set option that the side's reader does not take (``protocol.READER_OPTIONS``) is refused, never
ignored. Decode options (``resize_mismatched_mask``, ``image_max_pixels``, ``image_bit_depth``,
``mask_threshold``) apply to both sides.
"""

from __future__ import annotations

import functools
from typing import Any

from zsad_jax.data import decode, pipeline, protocol, readers
from zsad_jax.data.records import Record

SIDES = {
    "train": ("train_set", "train_root", "train_split", "categories"),
    "test": ("test_set", "test_root", "test_split", "test_categories"),
}
# Reader options a config can set, as ``data.<side>_<option>`` (configs/common.py).
READER_OPTIONS = ("mask_dir", "normal_dir", "require_masks", "csv_path", "meta_path")
# Decode options with the value that changes nothing (configs/common.py has the same defaults).
DECODE_DEFAULTS = {
    "resize_mismatched_mask": False,
    "image_max_pixels": decode.DEFAULT_MAX_IMAGE_PIXELS,
    "image_bit_depth": decode.DEFAULT_BIT_DEPTH,
    "mask_threshold": decode.DEFAULT_MASK_THRESHOLD,
}


def optional_data_keys() -> dict[str, Any]:
    """Every ``data`` key this module reads with a default, and the value that means "not set"."""
    keys = {f"{side}_{option}": None for side in SIDES for option in READER_OPTIONS}
    return {**keys, **DECODE_DEFAULTS}


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")


def _flag_name(side: str, option: str) -> str:
    """The command-line flag of a reader option (or of the side's category list)."""
    if option == "categories":
        return f"--config.data.{SIDES[side][3]}"
    return f"--config.data.{side}_{option}"


def reader_options(data: Any, side: str) -> dict[str, Any]:
    """The reader options ``data`` sets for ``side``; refuses those its reader does not take."""
    _check_side(side)
    dataset = str(data[SIDES[side][0]]).lower()
    options = {o: data.get(f"{side}_{o}") for o in READER_OPTIONS}
    options = {o: v for o, v in options.items() if v is not None}
    accepted = protocol.READER_OPTIONS.get(dataset)
    if accepted is None:  # unknown dataset: read_dataset names the known ones
        return options
    for option, value in options.items():
        if option not in accepted:
            takes = sorted(set(READER_OPTIONS) & accepted)
            raise ValueError(
                f"config.data.{side}_{option}={value!r} does not apply to the {dataset!r} reader "
                f"(config.data.{SIDES[side][0]}), which takes {takes or 'none of these options'}; "
                f"remove {_flag_name(side, option)}"
            )
    return options


def decode_options(data: Any) -> dict[str, Any]:
    """``decode.load_record`` keywords from ``data`` (defaults for configs that predate them)."""
    resize = data.get("resize_mismatched_mask")
    threshold = data.get("mask_threshold")
    threshold = DECODE_DEFAULTS["mask_threshold"] if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(
            f"config.data.mask_threshold={threshold!r} must be an integer >= 0 (a mask pixel "
            "above it is defect); e.g. --config.data.mask_threshold=127"
        )
    return {
        "resize_mismatched_mask": bool(resize),
        "mask_threshold": threshold,
        **image_options(data),
    }


def image_options(data: Any) -> dict[str, Any]:
    """``decode.load_image`` keywords from ``data``: the pixel limit and the bit depth."""
    bits = data.get("image_bit_depth")
    bits = DECODE_DEFAULTS["image_bit_depth"] if bits is None else bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(
            f"config.data.image_bit_depth={bits!r} must be an integer in 1..16 (the bits a "
            "16-bit image's values use); e.g. --config.data.image_bit_depth=12"
        )
    max_pixels = data.get("image_max_pixels")
    max_pixels = DECODE_DEFAULTS["image_max_pixels"] if max_pixels is None else int(max_pixels)
    most = decode.DEFAULT_MAX_IMAGE_PIXELS
    if not 0 < max_pixels <= most:
        # Pillow itself refuses images above the default (decode.py): a larger limit would not hold.
        raise ValueError(
            f"config.data.image_max_pixels={max_pixels} must be in 1..{most} (the most Pillow "
            f"opens); e.g. --config.data.image_max_pixels={most}"
        )
    return {"max_pixels": max_pixels, "bit_depth": bits}


def read_records(
    data: Any, side: str, split: str | None = None, categories: Any = None
) -> list[Record]:
    """The records of ``side`` (its split unless ``split`` is given) with the side's options.

    Messages from the readers name the side's ``--config.data.*`` flags.
    """
    _check_side(side)
    set_field, root_field, split_field, categories_field = SIDES[side]
    if categories is None:
        categories = list(data.get(categories_field) or ()) or None
    options = reader_options(data, side)
    with readers.options_named(functools.partial(_flag_name, side)):
        return protocol.read_dataset(
            str(data[set_field]), data[root_field], split or str(data[split_field]), categories,
            **options,
        )  # fmt: skip


def _refuse_file_options_with_tfds(data: Any, side: str) -> None:
    categories_field = SIDES[side][3]
    categories = list(data.get(categories_field) or ())
    if categories:
        raise ValueError(
            f"config.data.{categories_field}={categories} selects files only; with "
            f"config.data.tfds_dir build the TFDS dataset with those --categories instead"
        )
    for option in READER_OPTIONS:
        if data.get(f"{side}_{option}") is not None:
            raise ValueError(
                f"config.data.{side}_{option} applies when reading files; with "
                f"config.data.tfds_dir the files were read when the TFDS dataset was built: remove "
                f"{_flag_name(side, option)}"
            )
    for key, default in DECODE_DEFAULTS.items():
        value = data.get(key)
        if value is not None and value != default:
            raise ValueError(
                f"config.data.{key}={value!r} applies when decoding files; with "
                f"config.data.tfds_dir the images were decoded when the TFDS dataset was built: "
                f"remove --config.data.{key}"
            )


def split_source(data: Any, side: str) -> pipeline.ExampleSource:
    """``data``: the ``config.data`` block; ``side``: ``"train"`` or ``"test"``."""
    _check_side(side)
    dataset, split = str(data[SIDES[side][0]]), str(data[SIDES[side][2]])
    tfds_dir = data.get("tfds_dir")
    if tfds_dir:
        from zsad_jax.data import tfds_builder  # TFDS is slow to import; only load it when used.

        _refuse_file_options_with_tfds(data, side)
        name = f"{tfds_builder.BUILDER_NAME}/{dataset}"
        return tfds_builder.TfdsSource(name, str(tfds_dir), split)
    # A partial of a module-level function pickles, so grain worker processes can use it.
    load = functools.partial(decode.load_record, **decode_options(data))
    return pipeline.RecordSource(read_records(data, side), load=load)
