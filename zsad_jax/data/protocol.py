"""Dataset names, category lists, the zero-shot protocol as data, and ``read_dataset``.

The cross-dataset zero-shot protocol (AnomalyCLIP, AdaCLIP and all four reproduced methods;
methods.md §5): a model is trained on the **test** split of one dataset (all its categories mixed,
with masks) and evaluated on the test split of another dataset whose categories it has never seen.
MVTec-AD's test split has 1725 images (467 good / 1258 defect); VisA's ``1cls.csv`` test split has
2162 (962 / 1200).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from zsad_jax.data import procedural, readers, synthetic
from zsad_jax.data.records import Record

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
    "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
MPDD_CATEGORIES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
BTAD_CATEGORIES = ("01", "02", "03")
SYNTHETIC_TRAIN_CATEGORIES = synthetic.SYNTHETIC_TRAIN_CATEGORIES
SYNTHETIC_HELDOUT_CATEGORIES = synthetic.SYNTHETIC_HELDOUT_CATEGORIES
SYNTHETIC_CATEGORIES = synthetic.SYNTHETIC_CATEGORIES

# The published category lists; readers discover categories on disk, these document and check them.
DATASET_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec_ad": MVTEC_AD_CATEGORIES,
    "visa": VISA_CATEGORIES,
    "mpdd": MPDD_CATEGORIES,
    "btad": BTAD_CATEGORIES,
    "synthetic": SYNTHETIC_CATEGORIES,
}


@dataclasses.dataclass(frozen=True)
class ZeroShotSetting:
    """One train -> test pairing: which dataset/split/categories each side reads.

    ``None`` categories = every category of that dataset.
    """

    train_set: str
    test_set: str
    train_split: str = "test"
    test_split: str = "test"
    train_categories: tuple[str, ...] | None = None
    test_categories: tuple[str, ...] | None = None


# Keyed by the training dataset. The paper tables' "MVTec (VisA)" column is "visa" here.
ZERO_SHOT_PROTOCOL: dict[str, ZeroShotSetting] = {
    "mvtec_ad": ZeroShotSetting(train_set="mvtec_ad", test_set="visa"),
    "visa": ZeroShotSetting(train_set="visa", test_set="mvtec_ad"),
    # Built-in benchmark: learn on some procedural categories, detect on held-out ones (the demo).
    "synthetic": ZeroShotSetting(
        train_set="synthetic",
        test_set="synthetic",
        train_categories=SYNTHETIC_TRAIN_CATEGORIES,
        test_categories=SYNTHETIC_HELDOUT_CATEGORIES,
    ),
}
# Further test sets reported by the papers for a model trained on MVTec-AD (methods.md §7).
EXTRA_TEST_SETS = ("mpdd", "btad")


def _read_mvtec(root, split, categories, **options):
    return readers.read_mvtec_layout(root, split, categories, dataset="mvtec_ad", **options)


def _read_mpdd(root, split, categories, **options):
    return readers.read_mvtec_layout(root, split, categories, dataset="mpdd", **options)


def _read_btad(root, split, categories, **options):
    options.setdefault("normal_dir", "ok")
    return readers.read_mvtec_layout(root, split, categories, dataset="btad", **options)


def _read_synthetic(root, split, categories, **options):
    return synthetic.read_synthetic(root, split, categories, **options)


def _procedural_reader(name: str):
    def read(root, split, categories, **options):
        return procedural.read(name, root, split, categories, **options)

    return read


# Built-in procedural families (zsad_jax.data.procedural): many auxiliary training categories and
# defect kinds (and their selection-split twin), and a second held-out family of new categories
# and defect kinds.
_PROCEDURAL_OPTIONS = {
    name: frozenset(family.defaults) for name, family in procedural.FAMILIES.items()
}


_MVTEC_OPTIONS = frozenset({"normal_dir", "require_masks", "mask_suffixes"})
# The keyword options each reader takes (``read_dataset(**options)``); ``sources`` checks a config's
# ``data.<side>_<option>`` keys against this before reading.
READER_OPTIONS: dict[str, frozenset[str]] = {
    "mvtec_ad": _MVTEC_OPTIONS,
    "visa": frozenset({"csv_path", "check_files"}),
    "mpdd": _MVTEC_OPTIONS,
    "btad": _MVTEC_OPTIONS,
    "meta_json": frozenset({"meta_path", "check_files"}),
    "folder": frozenset({"normal_dir", "mask_dir", "require_masks"}),
    "synthetic": frozenset(synthetic.DEFAULTS),
    **_PROCEDURAL_OPTIONS,
}

READERS: dict[str, Callable[..., list[Record]]] = {
    "mvtec_ad": _read_mvtec,
    "visa": readers.read_visa,
    "mpdd": _read_mpdd,
    "btad": _read_btad,
    "meta_json": readers.read_meta_json,
    "folder": readers.read_folder,
    "synthetic": _read_synthetic,
    **{name: _procedural_reader(name) for name in _PROCEDURAL_OPTIONS},
}


def read_dataset(
    name: str,
    root: str | None,
    split: str = "test",
    categories: Sequence[str] | None = None,
    **options: Any,
) -> list[Record]:
    """Lists the records of one split of a dataset.

    Args:
      name: ``mvtec_ad`` | ``visa`` | ``mpdd`` | ``btad`` | ``meta_json`` | ``folder`` |
        ``synthetic``.
      root: the dataset directory (layouts in ``zsad_jax.data.readers``). For ``synthetic``, where
        the benchmark is generated if absent (``None`` = a per-user cache directory).
      split: ``test`` (the zero-shot protocol trains on it too) or ``train``.
      categories: names to read, in this order; ``None`` or empty = all categories found.
      **options: reader-specific (``READER_OPTIONS``), e.g. ``mask_dir``/``normal_dir``/
        ``require_masks`` (folder), ``csv_path`` (visa), ``meta_path`` (meta_json),
        ``normal_dir``/``require_masks`` (MVTec layouts), ``seed``/``image_size`` (synthetic).

    Raises:
      ValueError: unknown dataset, category or option name (the message lists the known ones), a
        category without images.
      FileNotFoundError: ``root`` or its index file is missing (the message gives the layout).
    """
    key = name.lower()
    if key not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(READERS)}")
    unknown = sorted(set(options) - READER_OPTIONS[key])
    if unknown:
        raise ValueError(f"unknown {key} options {unknown}; known: {sorted(READER_OPTIONS[key])}")
    if isinstance(categories, str):
        categories = (categories,)
    if categories is not None and len(categories) == 0:
        categories = None
    if root is None and key not in ("synthetic", *_PROCEDURAL_OPTIONS):
        raise ValueError(f"dataset {name!r} needs a root directory (got None)")
    return READERS[key](root, split, None if categories is None else tuple(categories), **options)


def default_root(name: str) -> str:
    """Where a dataset is read from unless the config says otherwise (relative to the working
    folder; the synthetic families are generated there on first use)."""
    return f"data/{name}"


def category_names(records: Sequence[Record]) -> list[str]:
    """The categories of ``records`` in order of first appearance (the ``class_id`` order)."""
    return list(dict.fromkeys(r.category for r in records))
