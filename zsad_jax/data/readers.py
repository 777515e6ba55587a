"""Readers that turn a dataset directory (in its published layout) into ``Record`` lists.

Layouts (checked against the public preprocessing scripts of AnomalyCLIP/AdaCLIP and anomalib):

- MVTec-AD, MPDD: ``{root}/{cls}/{train,test}/{defect|good}/*.png``, masks
  ``{root}/{cls}/ground_truth/{defect}/{stem}_mask.png``.
- BTAD (``BTech_Dataset_transformed``): ``{root}/{01,02,03}/{train,test}/{ok|ko}/*.{bmp,png}``,
  masks ``{root}/{cls}/ground_truth/ko/{stem}.{png,bmp}`` (same stem, any image extension).
- MVTec LOCO (read with the MVTec reader): a mask "file" is a directory
  ``ground_truth/{defect}/{stem}/`` of per-region masks; ``decode.load_mask`` takes their union.
- VisA: ``{root}/split_csv/1cls.csv`` with columns ``object,split,label,image,mask`` (label
  ``normal`` | ``anomaly``; paths relative to root).
- AnomalyCLIP ``meta.json`` (VisA, the medical benchmarks, anything converted to it):
  ``{"train"|"test": {cls: [{img_path, mask_path, cls_name, specie_name, anomaly}]}}``, paths
  relative to root, ``mask_path`` empty for normal images and for image-level-only sets.
- Folder (users' own data): ``{root}/good/*`` normal, every other subfolder a defect type, except
  the mask folders ``MASK_DIR_NAMES`` (``ground_truth``, ``masks``, ``mask``, ``gt``; any case) and
  the folder ``mask_dir`` names. Masks: ``{mask folder}/{defect}/{stem}*`` (or ``{mask
  folder}/{stem}*``), the mask folder beside ``good/``, beside the split folder (MVTec style:
  ``{root}/test/{good,defect}`` with ``{root}/ground_truth/{defect}``) or given as ``mask_dir``.
  Several categories:
  ``{root}/{cls}/good/...`` or ``{root}/{cls}/{split}/good/...``. See ``read_folder`` for when
  masks are required.

Ordering is deterministic: categories in the order asked for (discovered ones sorted), then defect
folder, then file name.

Pixel ground truth (``Record.has_mask``): anomalous images without a mask have ``has_mask=False``. A
category in which *no* anomalous image has a mask is image-level only: then its normal images get
``has_mask=False`` too, so pixel losses and pixel metrics skip the whole category instead of
learning or scoring on normal pixels alone (USERS.md item 1). Normal images of categories that do
have masks keep ``has_mask=True`` (their mask is implicitly empty).
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from zsad_jax.data.decode import IMAGE_EXTENSIONS, DataError, unread_images_note
from zsad_jax.data.records import Record

GROUND_TRUTH_DIR = "ground_truth"
# Folders of a ``folder`` dataset that hold masks and are therefore never defect types: MVTec's name
# and the ones users reach for. A defect type cannot be called like this.
MASK_DIR_NAMES = (GROUND_TRUTH_DIR, "masks", "mask", "gt")

# How messages name a reader option. Python callers pass keywords (``require_masks=False``); while
# ``sources`` reads one side of a config it installs the config flag names
# (``--config.data.test_require_masks``), so that the advice is something the user can type.
_OPTION_NAMES: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar(
    "zsad_option_names", default=None
)


@contextlib.contextmanager
def options_named(name: Callable[[str], str]) -> Iterator[None]:
    """Within this block, messages call reader option ``x`` (or ``categories``) ``name(x)``."""
    token = _OPTION_NAMES.set(name)
    try:
        yield
    finally:
        _OPTION_NAMES.reset(token)


def option_name(option: str) -> str:
    """``require_masks``, or ``--config.data.test_require_masks`` inside a config read."""
    name = _OPTION_NAMES.get()
    return option if name is None else name(option)


def option_advice(option: str, value: str) -> str:
    """``require_masks=False``, or ``--config.data.test_require_masks=False`` in a config read."""
    return f"{option_name(option)}={value}"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def is_mask_dir(name: str) -> bool:
    """A mask folder's name (``MASK_DIR_NAMES``, any case: ``Masks/`` is one too), never a defect
    type or a category."""
    return name.lower() in MASK_DIR_NAMES


def _subdirs(path: str) -> list[str]:
    return sorted(
        d
        for d in os.listdir(path)
        if not d.startswith(".") and os.path.isdir(os.path.join(path, d))
    )


def _images_in(path: str) -> list[str]:
    return sorted(
        f for f in os.listdir(path) if _is_image(f) and os.path.isfile(os.path.join(path, f))
    )


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _require_dir(path: str, what: str, hint: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}. {hint}")


def _unknown_category_error(
    dataset: str, unknown: Sequence[str], available: Sequence[str], where: str
) -> ValueError:
    return ValueError(
        f"unknown {dataset} categor{'y' if len(unknown) == 1 else 'ies'} {list(unknown)} in "
        f"{where}; known categories there: {list(available)}"
    )


def _select_categories(
    dataset: str, available: Sequence[str], categories: Sequence[str] | None, where: str
) -> list[str]:
    if categories is None:
        if not available:
            raise ValueError(f"no {dataset} categories found in {where}")
        return list(available)
    if isinstance(categories, str):
        categories = [categories]
    categories = list(categories)
    if not categories:
        raise ValueError(f"empty category list for {dataset}; pass None for every category")
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise _unknown_category_error(dataset, unknown, available, where)
    return categories


def finalize_category(records: list[Record]) -> list[Record]:
    """Applies the image-level-only rule (module docstring) to one category's records."""
    anomalous = [r for r in records if r.gt_label]
    if anomalous and not any(r.has_mask for r in anomalous):
        return [dataclasses.replace(r, has_mask=False) for r in records]
    return records


def _index_masks(mask_dir: str) -> dict[str, str]:
    """Mask stem -> path for the files (or LOCO-style region directories) in ``mask_dir``."""
    index: dict[str, str] = {}
    if not os.path.isdir(mask_dir):
        return index
    for name in sorted(os.listdir(mask_dir)):
        full = os.path.join(mask_dir, name)
        if name.startswith("."):
            continue
        if os.path.isdir(full) or _is_image(name):
            index.setdefault(_stem(name) if not os.path.isdir(full) else name, full)
    return index


def _find_mask(index: dict[str, str], stem: str, suffixes: Sequence[str]) -> str | None:
    for suffix in suffixes:
        if stem + suffix in index:
            return index[stem + suffix]
    return None


def read_mvtec_layout(
    root: str,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    dataset: str = "mvtec_ad",
    normal_dir: str = "good",
    mask_suffixes: Sequence[str] = ("_mask", ""),
    require_masks: bool = True,
) -> list[Record]:
    """Reads an MVTec-style tree (MVTec-AD, MPDD, BTAD, MVTec LOCO, the synthetic benchmark).

    Args:
      root: the folder holding one subfolder per category.
      split: ``train`` | ``test`` (or any split folder present, e.g. LOCO's ``validation``).
      categories: names to read, in this order; ``None`` = every category folder holding ``split``.
      dataset: name used in messages.
      normal_dir: folder of normal images (``good``; BTAD: ``ok``).
      mask_suffixes: tried in order after the image stem to find its mask (``000`` -> ``000_mask``).
      require_masks: a defect image without a mask raises (default); ``False`` gives
      ``has_mask=False``.

    Raises:
      FileNotFoundError: ``root`` or a category's split folder is missing.
      ValueError: unknown category, or a category with no images in ``split``.
      DataError: a defect image has no mask (the message names the image).
    """
    tree = _MvtecTree(root, split, dataset, normal_dir, tuple(mask_suffixes), require_masks)
    _require_dir(root, f"{dataset} root", tree.layout)
    records: list[Record] = []
    for category in _mvtec_categories(tree, categories):
        records.extend(finalize_category(_read_mvtec_category(tree, category)))
    return records


@dataclasses.dataclass(frozen=True)
class _MvtecTree:
    """What ``read_mvtec_layout`` was asked to read, passed as one value to its helpers."""

    root: str
    split: str
    dataset: str
    normal_dir: str
    mask_suffixes: tuple[str, ...]
    require_masks: bool

    @property
    def layout(self) -> str:
        """The expected tree, quoted by every message about a layout problem."""
        where = f"{self.root}/<category>/{self.split}"
        return f"expected {where}/{self.normal_dir}/*.png and {where}/<defect>/*.png"


def _mvtec_categories(tree: _MvtecTree, categories: Sequence[str] | None) -> list[str]:
    """The categories to read; a category folder without ``split`` is named as such."""
    root, split, dataset = tree.root, tree.split, tree.dataset
    available = [c for c in _subdirs(root) if os.path.isdir(os.path.join(root, c, split))]
    if categories is None and not available:
        raise ValueError(
            f"no {dataset} categories with a '{split}' folder in {root}; {tree.layout}. Folders "
            f"there: {_subdirs(root)}"
        )
    if categories is not None:
        names = [categories] if isinstance(categories, str) else list(categories)
        missing_split = [
            c for c in names if os.path.isdir(os.path.join(root, c)) and c not in available
        ]
        if missing_split:
            raise FileNotFoundError(
                f"{dataset} categories {missing_split} in {root} have no '{split}' folder; "
                f"{tree.layout}"
            )
    return _select_categories(dataset, available, categories, root)


def _read_mvtec_category(tree: _MvtecTree, category: str) -> list[Record]:
    """One category's records, defect folder by defect folder (``good`` is one of them)."""
    split_dir = os.path.join(tree.root, category, tree.split)
    records: list[Record] = []
    for defect in _subdirs(split_dir):
        if defect == tree.normal_dir:
            records.extend(_mvtec_normal_records(split_dir, category, defect))
        else:
            records.extend(_mvtec_defect_records(tree, split_dir, category, defect))
    if not records:
        raise ValueError(
            f"{tree.dataset} category '{category}' has no images in {split_dir} (subfolders: "
            f"{_subdirs(split_dir)}); {tree.layout}"
        )
    return records


def _mvtec_normal_records(split_dir: str, category: str, normal_dir: str) -> Iterator[Record]:
    folder = os.path.join(split_dir, normal_dir)
    for name in _images_in(folder):
        yield Record(
            path=os.path.join(folder, name),
            category=category,
            gt_label=0,
            mask_path=None,
            defect_type="good",
            has_mask=True,
        )


def _mvtec_defect_records(
    tree: _MvtecTree, split_dir: str, category: str, defect: str
) -> Iterator[Record]:
    """A defect folder's records, each with the mask found in ``ground_truth/{defect}``."""
    mask_dir = os.path.join(tree.root, category, GROUND_TRUTH_DIR, defect)
    mask_index = _index_masks(mask_dir)
    folder = os.path.join(split_dir, defect)
    for name in _images_in(folder):
        path = os.path.join(folder, name)
        mask_path = _find_mask(mask_index, _stem(name), tree.mask_suffixes)
        if mask_path is None and tree.require_masks:
            raise _missing_mask_error(path, mask_dir, _stem(name), tree.mask_suffixes)
        yield Record(
            path=path,
            category=category,
            gt_label=1,
            mask_path=mask_path,
            defect_type=defect,
            has_mask=mask_path is not None,
        )


def _missing_mask_error(path: str, mask_dir: str, stem: str, suffixes: Sequence[str]) -> DataError:
    expected = os.path.join(mask_dir, stem + suffixes[0])
    return DataError(
        f"no mask for defect image {path} (looked for {expected}.* and stems "
        f"{[stem + s for s in suffixes]}); restore the mask, or set "
        f"{option_advice('require_masks', 'False')} to use image-level labels",
        path,
    )


def _check_file(path: str, source: str, what: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{what} listed in {source} does not exist: {path}", path)


def read_visa(
    root: str,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    csv_path: str | None = None,
    check_files: bool = True,
) -> list[Record]:
    """Reads VisA from its split csv (default ``{root}/split_csv/1cls.csv``; paths under root).

    VisA has no defect-type names in the csv: anomalous records get ``defect_type="anomaly"``.
    """
    csv_path = csv_path or os.path.join(root, "split_csv", "1cls.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f"VisA split csv not found: {csv_path}. Download VisA_20220922 and its "
            "split_csv/1cls.csv (from the VisA repository), or set "
            + option_advice("csv_path", "PATH")
        )
    expected = ["object", "split", "label", "image", "mask"]
    by_category: dict[str, list[Record]] = {}
    splits_seen: set[str] = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if any(col not in header for col in expected):
            raise ValueError(f"{csv_path} has columns {header}; expected {expected}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            splits_seen.add(row["split"])
            if row["split"] != split:
                continue
            label = row["label"].lower()
            if label not in ("normal", "anomaly"):
                raise ValueError(
                    f"{csv_path} line {line}: label {row['label']!r} is not normal|anomaly"
                )
            is_anomaly = label == "anomaly"
            path = os.path.join(root, row["image"])
            mask_path = os.path.join(root, row["mask"]) if (is_anomaly and row["mask"]) else None
            if check_files:
                _check_file(path, csv_path, "image")
                if mask_path:
                    _check_file(mask_path, csv_path, "mask")
            by_category.setdefault(row["object"], []).append(
                Record(
                    path=path,
                    category=row["object"],
                    gt_label=int(is_anomaly),
                    mask_path=mask_path,
                    defect_type="anomaly" if is_anomaly else "good",
                    has_mask=(not is_anomaly) or mask_path is not None,
                )
            )
    if not by_category:
        raise ValueError(
            f"{csv_path} has no rows for split {split!r}; splits present: {sorted(splits_seen)}"
        )
    chosen = _select_categories("visa", sorted(by_category), categories, f"{csv_path} ({split})")
    return [r for c in chosen for r in finalize_category(by_category[c])]


def read_meta_json(
    root: str,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    meta_path: str | None = None,
    check_files: bool = True,
) -> list[Record]:
    """Reads an AnomalyCLIP/AdaCLIP ``meta.json`` index (default ``{root}/meta.json``)."""
    meta_path = meta_path or os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"meta.json not found: {meta_path}. Generate it with the dataset's AnomalyCLIP/AdaCLIP "
            "preprocessing script, or set " + option_advice("meta_path", "PATH")
        )
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or split not in meta:
        keys = list(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} has no split {split!r}; top-level keys: {keys}")
    per_split = meta[split]
    chosen = _select_categories(
        "meta_json", sorted(per_split), categories, f"{meta_path} ({split})"
    )
    records: list[Record] = []
    for category in chosen:
        entries = per_split[category]
        if not entries:
            raise ValueError(
                f"{meta_path}: category {category!r} of split {split!r} has no entries"
            )
        category_records = []
        for i, entry in enumerate(entries):
            missing = [k for k in ("img_path", "anomaly") if k not in entry]
            if missing:
                raise ValueError(f"{meta_path}: {split}/{category}[{i}] lacks fields {missing}")
            is_anomaly = bool(int(entry["anomaly"]))
            path = os.path.join(root, entry["img_path"])
            mask_rel = entry.get("mask_path") or ""
            mask_path = os.path.join(root, mask_rel) if (is_anomaly and mask_rel) else None
            if check_files:
                _check_file(path, meta_path, "image")
                if mask_path:
                    _check_file(mask_path, meta_path, "mask")
            category_records.append(
                Record(
                    path=path,
                    category=category,
                    gt_label=int(is_anomaly),
                    mask_path=mask_path,
                    defect_type=entry.get("specie_name") or ("anomaly" if is_anomaly else "good"),
                    has_mask=(not is_anomaly) or mask_path is not None,
                )
            )
        records.extend(finalize_category(category_records))
    return records


# --- folder: users' own data ----------------------------------------------------------------------


def _folder_layout(root: str, normal_dir: str) -> str:
    """The expected ``folder`` layouts as a small tree, appended to layout refusals."""
    r = os.path.normpath(root)
    rows = [
        (f"{normal_dir}/", "normal images"),
        ("<defect>/", "anomalous images, one folder per defect type (e.g. scratch/)"),
        ("masks/<defect>/", "optional: scratch/s1.png or scratch/s1_mask.png for scratch/s1.png"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(
        [
            "expected layout:",
            f"  {r}/",
            *(f"    {name.ljust(width)}{what}" for name, what in rows),
            f"  several categories: {r}/<category>/{normal_dir}/, {r}/<category>/<defect>/, ...",
            f"  MVTec style: {r}/[<category>/]test/{{{normal_dir},<defect>}}/ with masks in "
            f"{r}/[<category>/]ground_truth/<defect>/",
        ]
    )


def _image_names(directory: str, cache: dict[str, list[str]]) -> list[str]:
    """Image files of ``directory`` (none if absent), listed once per category read."""
    if directory not in cache:
        cache[directory] = _images_in(directory) if os.path.isdir(directory) else []
    return cache[directory]


def _folder_mask(search_dirs: Sequence[str], stem: str, cache: dict[str, list[str]]) -> str | None:
    """Mask of image ``stem``: ``{stem}.*`` first, then ``{stem}{sep}*`` (``_mask``, ``-gt``)."""
    for directory in search_dirs:
        names = _image_names(directory, cache)
        exact = [n for n in names if _stem(n) == stem]
        if exact:
            return os.path.join(directory, exact[0])
        prefixed = [
            n
            for n in names
            if len(_stem(n)) > len(stem)
            and _stem(n).startswith(stem)
            and _stem(n)[len(stem)] in "_-. "
        ]
        if len(prefixed) == 1:
            return os.path.join(directory, prefixed[0])
        if len(prefixed) > 1:
            preferred = [n for n in prefixed if _stem(n) == stem + "_mask"]
            if preferred:
                return os.path.join(directory, preferred[0])
            raise DataError(
                f"several masks in {directory} match image stem {stem!r}: {prefixed}; keep one, or "
                f"name it {stem}_mask.png",
                os.path.join(directory, prefixed[0]),
            )
    return None


def _mask_roots(folder: str, split_parent: str | None, mask_dir: str | None) -> list[str]:
    """The existing mask folders of one category, in search order, without duplicates."""
    candidates = _mask_dirs_in(folder)
    if split_parent is not None:  # MVTec style: ground_truth/ beside test/, not inside it
        candidates += _mask_dirs_in(split_parent)
    if mask_dir:
        candidates.append(mask_dir)
    found: dict[str, str] = {}
    for path in candidates:
        if os.path.isdir(path):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def _mask_dirs_in(folder: str) -> list[str]:
    """``folder``'s mask folders, in ``MASK_DIR_NAMES`` order (any case)."""
    found = [d for d in _subdirs(folder) if is_mask_dir(d)] if os.path.isdir(folder) else []
    return [
        os.path.join(folder, d)
        for d in sorted(found, key=lambda d: MASK_DIR_NAMES.index(d.lower()))
    ]


def _defect_dirs(folder: str, normal_dir: str, mask_roots: Sequence[str], root: str) -> list[str]:
    """The defect-type subfolders of a category folder; refuses folders that are not one."""
    excluded = {os.path.realpath(r) for r in mask_roots}
    defects = []
    for name in _subdirs(folder):
        path = os.path.join(folder, name)
        if name == normal_dir or is_mask_dir(name) or os.path.realpath(path) in excluded:
            continue
        if os.path.isdir(os.path.join(path, normal_dir)):
            raise ValueError(
                f"folder dataset {root}: {path} has its own '{normal_dir}/' folder beside "
                f"{os.path.join(folder, normal_dir)}, which mixes one category's images with "
                f"split or category folders; keep one layout, e.g. move "
                f"{os.path.join(folder, normal_dir)} and the defect folders into "
                f"{os.path.join(folder, 'test')}\n" + _folder_layout(root, normal_dir)
            )
        if not _images_in(path):
            held = sorted(os.listdir(path))[:5]
            raise ValueError(
                f"folder dataset {root}: defect folder {path} holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) directly (it holds {held or 'nothing'}); put the "
                f"images in it, or move it out of {folder}\n" + _folder_layout(root, normal_dir)
            )
        defects.append(name)
    return defects


def _check_masks_found(
    records: Sequence[Record], mask_roots: Sequence[str], require_masks: bool | None, folder: str
) -> None:
    """Refuses defect images without a mask where masks are required (``read_folder``)."""
    required = bool(mask_roots) if require_masks is None else require_masks
    anomalous = [r for r in records if r.gt_label]
    missing = [r for r in anomalous if r.mask_path is None]
    if not (required and missing):
        return
    first = missing[0]
    stem = _stem(os.path.basename(first.path))
    where = mask_roots[0] if mask_roots else os.path.join(folder, "masks")
    example = os.path.join(where, first.defect_type, stem + ".png")
    opt_out = option_advice("require_masks", "False")
    if len(missing) == len(anomalous):
        raise DataError(
            f"folder dataset {folder}: no mask found for any of its {len(anomalous)} defect images "
            f"although mask folders {list(mask_roots)} exist; name a mask <mask folder>/<defect>/"
            f"<stem>.png (or <stem>_mask.png), e.g. {example} for {first.path}, or set {opt_out} "
            "to use image-level labels only",
            first.path,
        )
    raise DataError(
        f"no mask for defect image {first.path} ({len(missing)} of the {len(anomalous)} defect "
        f"images of {folder} have none; mask folders: {list(mask_roots)}); add {example} (or "
        f"{stem}_mask.png), or set {opt_out} to keep images without a mask as image-level",
        first.path,
    )


def _read_folder_category(
    folder: str,
    category: str,
    normal_dir: str,
    *,
    root: str,
    split_parent: str | None,
    mask_dir: str | None,
    require_masks: bool | None,
) -> list[Record]:
    mask_roots = _mask_roots(folder, split_parent, mask_dir)
    if require_masks and not mask_roots:
        raise DataError(
            f"{option_advice('require_masks', 'True')} but category {category!r} ({folder}) has no "
            f"mask folder ({'/, '.join(MASK_DIR_NAMES)}/ or {option_name('mask_dir')}); add "
            f"{os.path.join(folder, 'masks', '<defect>', '<stem>.png')} files",
            folder,
        )
    listing: dict[str, list[str]] = {}
    claimed: dict[str, str] = {}
    records: list[Record] = []
    defects = sorted([normal_dir, *_defect_dirs(folder, normal_dir, mask_roots, root)])
    _note_unread_images(folder, [os.path.join(folder, d) for d in defects])
    for defect in defects:
        is_normal = defect == normal_dir
        # Per mask folder: the defect's own subfolder first, then masks lying flat in it.
        search = [d for r in mask_roots for d in (os.path.join(r, defect), r)]
        for name in _images_in(os.path.join(folder, defect)):
            path = os.path.join(folder, defect, name)
            mask_path = None if is_normal else _folder_mask(search, _stem(name), listing)
            if mask_path is not None:
                _claim(claimed, mask_path, path, mask_roots[0], defect)
            records.append(
                Record(
                    path=path,
                    category=category,
                    gt_label=0 if is_normal else 1,
                    mask_path=mask_path,
                    defect_type="good" if is_normal else defect,
                    has_mask=is_normal or mask_path is not None,
                )
            )
    if not records:
        raise ValueError(
            f"folder dataset {folder} holds no images in {os.path.join(folder, normal_dir)} nor "
            "in its defect folders"
        )
    _check_masks_found(records, mask_roots, require_masks, folder)
    own_roots = [r for r in mask_roots if not (mask_dir and os.path.samefile(r, mask_dir))]
    _note_unused_masks(own_roots, set(claimed), listing, normal_dir)
    return finalize_category(records)


def _note_unread_images(folder: str, image_folders: Sequence[str]) -> None:
    """A note for the files of a category's image folders in a format not decoded here (DICOM,
    NIfTI, ...): they are not read, and nothing else would say so."""
    names = [n for d in image_folders if os.path.isdir(d) for n in os.listdir(d)]
    if note := unread_images_note(names):
        print(f"note: folder dataset {folder}: {note}", file=sys.stderr)


def _note_unused_masks(
    mask_roots: Sequence[str], claimed: set[str], listing: dict[str, list[str]], normal_dir: str
) -> None:
    """A note for mask files of a category's own mask folders that match no image: usually a
    renamed image or a misspelt defect folder, whose image then has no pixel ground truth.
    (A ``mask_dir`` shared by several categories is not checked: other categories' masks lie
    there, nor a ``{normal_dir}/`` folder of empty masks.)"""
    unused = []
    for root in mask_roots:
        subdirs = [os.path.join(root, d) for d in _subdirs(root) if d != normal_dir]
        for directory in (root, *subdirs):
            unused += [
                path
                for path in (os.path.join(directory, n) for n in _image_names(directory, listing))
                if path not in claimed
            ]
    if unused:
        print(
            f"note: {len(unused)} mask file(s) match no image and are not used, e.g. {unused[0]}; "
            "a mask is <mask folder>/<defect>/<image stem>.png (or <stem>_mask.png)",
            file=sys.stderr,
        )


def _claim(claimed: dict[str, str], mask_path: str, image: str, mask_root: str, defect: str):
    # Flat mask folders match by stem only: scratch/001.png and dent/001.png would share a mask.
    if mask_path in claimed:
        raise DataError(
            f"mask {mask_path} matches two defect images, {claimed[mask_path]} and {image}; put "
            f"each defect type's masks in its own folder, e.g. {os.path.join(mask_root, defect)}/",
            mask_path,
        )
    claimed[mask_path] = image


def _locate_category(path: str, split: str, normal_dir: str) -> tuple[str, str | None] | None:
    """``(folder holding normal_dir, the folder above the split level or None)``, or None."""
    if os.path.isdir(os.path.join(path, normal_dir)):
        return path, None
    if os.path.isdir(os.path.join(path, split, normal_dir)):
        return os.path.join(path, split), path
    return None


# Names that mean a split level, not a category, when they turn up as categories.
_SPLIT_NAMES = ("train", "test", "val", "validation")


def read_folder(
    root: str,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    normal_dir: str = "good",
    mask_dir: str | None = None,
    require_masks: bool | None = None,
) -> list[Record]:
    """Reads users' own images: ``{root}/good/*`` normal, other subfolders defect types.

    One category (``root`` holds ``good/``, or ``{split}/good/``): its name is ``categories[0]`` if
    given, else the folder's name. Several categories (``{root}/{cls}/good/`` or
    ``{root}/{cls}/{split}/good/``): ``categories`` selects among them; without it every subfolder
    must be a category. Mask folders (``MASK_DIR_NAMES``, never defect types) are looked for beside
    ``good/``, beside the split folder, and at ``mask_dir`` (``mask_dir/{cls}`` if it exists); a
    mask is ``{mask folder}/{defect}/{stem}*`` or ``{mask folder}/{stem}*``.

    Args:
      normal_dir: the folder of normal images.
      mask_dir: a further mask folder (it is never read as a defect type).
      require_masks: ``None`` (default): a category with a mask folder needs a mask for every defect
        image (a missing one is almost always a naming mistake) and one without is image-level
        only. ``True``: every category needs a mask folder and every mask. ``False``: masks are
        optional per image; images without one get ``has_mask=False``.

    Raises:
      FileNotFoundError: ``root`` or ``mask_dir`` is missing.
      ValueError: a layout it cannot understand (the message shows the expected tree).
      DataError: a required mask is missing, or one mask matches two images.
    """
    _require_dir(
        root, "folder dataset root", f"expected {root}/{normal_dir}/ and one folder per defect type"
    )
    if mask_dir and not os.path.isdir(mask_dir):
        raise FileNotFoundError(
            f"mask folder not found: {mask_dir}; fix or unset {option_advice('mask_dir', 'PATH')}"
        )
    single = _locate_category(root, split, normal_dir)
    if single is not None:
        return _read_single_category(
            root, single, categories, normal_dir, mask_dir=mask_dir, require_masks=require_masks
        )

    chosen = _folder_categories(root, split, categories, normal_dir, mask_dir)
    records: list[Record] = []
    for category in chosen:
        folder, split_parent = _locate_category(os.path.join(root, category), split, normal_dir)
        category_masks = os.path.join(mask_dir, category) if mask_dir else None
        if category_masks and not os.path.isdir(category_masks):
            category_masks = mask_dir
        records.extend(
            _read_folder_category(
                folder,
                category,
                normal_dir,
                root=root,
                split_parent=split_parent,
                mask_dir=category_masks,
                require_masks=require_masks,
            )
        )
    return records


def _read_single_category(
    root: str,
    located: tuple[str, str | None],
    categories: Sequence[str] | str | None,
    normal_dir: str,
    *,
    mask_dir: str | None,
    require_masks: bool | None,
) -> list[Record]:
    """``read_folder`` of a root that is one category (``located``: its folder and split parent);
    named by the one ``categories`` entry if given, else by the root folder's name."""
    if categories is not None and not isinstance(categories, str) and len(categories) != 1:
        raise ValueError(
            f"{root} holds one category (it has '{normal_dir}/'); pass at most one category "
            f"name to name it, got {list(categories)}"
        )
    name = categories if isinstance(categories, str) else (categories or [None])[0]
    name = name or os.path.basename(os.path.normpath(root))
    folder, split_parent = located
    return _read_folder_category(
        folder, name, normal_dir, root=root, split_parent=split_parent, mask_dir=mask_dir,
        require_masks=require_masks,
    )  # fmt: skip


def _folder_categories(
    root: str,
    split: str,
    categories: Sequence[str] | None,
    normal_dir: str,
    mask_dir: str | None,
) -> list[str]:
    """The category folders of a several-category ``folder`` root; refuses strays."""
    layout = _folder_layout(root, normal_dir)
    excluded = {os.path.realpath(mask_dir)} if mask_dir else set()
    candidates = [
        c
        for c in _subdirs(root)
        if not is_mask_dir(c) and os.path.realpath(os.path.join(root, c)) not in excluded
    ]
    available = [
        c for c in candidates if _locate_category(os.path.join(root, c), split, normal_dir)
    ]
    if not available:
        # ``Good/`` for ``good/``: name the exact option value to type.
        spelled = [c for c in _subdirs(root) if c.lower() == normal_dir.lower()]
        name = spelled[0] if spelled else "NAME"
        raise ValueError(
            f"no images found in folder dataset {root}: expected {root}/{normal_dir}/ (one "
            f"category) or {root}/<category>/{normal_dir}/ (several); subfolders there: "
            f"{_subdirs(root)}; if your normal images are in another folder, set "
            f"{option_advice('normal_dir', name)}\n" + layout
        )
    splits = [c for c in available if c in _SPLIT_NAMES]
    if splits:
        raise ValueError(
            f"folder dataset {root}: {splits} look like split folders, but the '{split}' split "
            f"({os.path.join(root, split, normal_dir)}) does not exist; add it, or read another "
            f"split\n" + layout
        )
    if categories is None:
        strays = [c for c in candidates if c not in available]
        if strays:
            raise ValueError(
                f"folder dataset {root}: subfolders {strays} have no '{normal_dir}/' (nor "
                f"'{split}/{normal_dir}/') folder, unlike the categories {available}; add one, "
                f"move them out, or select categories with {option_advice('categories', 'NAMES')}"
                "\n" + layout
            )
    return _select_categories("folder", available, categories, root)
