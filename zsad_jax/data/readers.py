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
- Folder (users' own data): ``{root}/good/*`` normal, every other subfolder a defect type; optional
  masks in ``{root}/ground_truth/{defect}/{stem}*`` or a separate ``mask_dir``. Several categories:
  ``{root}/{cls}/good/...``. An extra ``{split}`` level (``{root}/test/good``) is also accepted.

Ordering is deterministic: categories in the order asked for (discovered ones sorted), then defect
folder, then file name.

Pixel ground truth (``Record.has_mask``): anomalous images without a mask have ``has_mask=False``. A
category in which *no* anomalous image has a mask is image-level only: then its normal images get
``has_mask=False`` too, so pixel losses and pixel metrics skip the whole category instead of
learning or scoring on normal pixels alone (USERS.md item 1). Normal images of categories that do
have masks keep ``has_mask=True`` (their mask is implicitly empty).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

from zsad_jax.data.records import Record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GROUND_TRUTH_DIR = "ground_truth"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


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
    from zsad_jax.data.decode import DataError  # decode imports nothing from here; avoids a cycle

    layout = f"expected {{root}}/{{category}}/{split}/{{{normal_dir}|defect}}/*.png"
    _require_dir(root, f"{dataset} root", layout)
    available = [c for c in _subdirs(root) if os.path.isdir(os.path.join(root, c, split))]
    if categories is None and not available:
        raise ValueError(
            f"no {dataset} categories with a '{split}' folder in {root}; {layout}. Folders there: "
            f"{_subdirs(root)}"
        )
    if categories is not None:
        names = [categories] if isinstance(categories, str) else list(categories)
        missing_split = [
            c for c in names if os.path.isdir(os.path.join(root, c)) and c not in available
        ]
        if missing_split:
            raise FileNotFoundError(
                f"{dataset} categories {missing_split} in {root} have no '{split}' folder; {layout}"
            )
    chosen = _select_categories(dataset, available, categories, root)

    records: list[Record] = []
    for category in chosen:
        split_dir = os.path.join(root, category, split)
        category_records: list[Record] = []
        for defect in _subdirs(split_dir):
            is_normal = defect == normal_dir
            mask_index = (
                {}
                if is_normal
                else _index_masks(os.path.join(root, category, GROUND_TRUTH_DIR, defect))
            )
            for name in _images_in(os.path.join(split_dir, defect)):
                path = os.path.join(split_dir, defect, name)
                mask_path = (
                    None if is_normal else _find_mask(mask_index, _stem(name), mask_suffixes)
                )
                if not is_normal and mask_path is None and require_masks:
                    expected = os.path.join(
                        root, category, GROUND_TRUTH_DIR, defect, _stem(name) + mask_suffixes[0]
                    )
                    raise DataError(
                        f"no mask for defect image {path} (looked for {expected}.* and stems "
                        f"{[_stem(name) + s for s in mask_suffixes]}); restore the mask, or read "
                        "with require_masks=False to use image-level labels",
                        path,
                    )
                category_records.append(
                    Record(
                        path=path,
                        category=category,
                        gt_label=0 if is_normal else 1,
                        mask_path=mask_path,
                        defect_type="good" if is_normal else defect,
                        has_mask=is_normal or mask_path is not None,
                    )
                )
        if not category_records:
            raise ValueError(
                f"{dataset} category '{category}' has no images in {split_dir} (subfolders: "
                f"{_subdirs(split_dir)}); {layout}"
            )
        records.extend(finalize_category(category_records))
    return records


def _check_file(path: str, source: str, what: str) -> None:
    from zsad_jax.data.decode import DataError

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
            "split_csv/1cls.csv (from the VisA repository), or pass csv_path=..."
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
            "preprocessing script, or pass meta_path=..."
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


def _folder_mask(search_dirs: Sequence[str], stem: str) -> str | None:
    """Mask of image ``stem``: ``{stem}.*`` first, then ``{stem}{sep}*`` (``_mask``, ``-gt``)."""
    from zsad_jax.data.decode import DataError

    for directory in search_dirs:
        if not os.path.isdir(directory):
            continue
        names = [n for n in os.listdir(directory) if _is_image(n)]
        exact = sorted(n for n in names if _stem(n) == stem)
        if exact:
            return os.path.join(directory, exact[0])
        prefixed = sorted(
            n
            for n in names
            if len(_stem(n)) > len(stem)
            and _stem(n).startswith(stem)
            and _stem(n)[len(stem)] in "_-. "
        )
        if len(prefixed) == 1:
            return os.path.join(directory, prefixed[0])
        if len(prefixed) > 1:
            preferred = [n for n in prefixed if _stem(n) == stem + "_mask"]
            if preferred:
                return os.path.join(directory, preferred[0])
            raise DataError(
                f"several masks in {directory} match image stem {stem!r}: {prefixed}; keep one, or "
                "name it {stem}_mask.png",
                os.path.join(directory, prefixed[0]),
            )
    return None


def _read_folder_category(
    folder: str, category: str, normal_dir: str, mask_dir: str | None
) -> list[Record]:
    defects = [d for d in _subdirs(folder) if d != GROUND_TRUTH_DIR]
    if normal_dir not in defects:
        raise ValueError(
            f"folder dataset {folder} has no normal-image folder '{normal_dir}/' (subfolders: "
            f"{defects}); put normal images in {os.path.join(folder, normal_dir)} or pass "
            "normal_dir=... naming your normal folder"
        )
    records: list[Record] = []
    for defect in defects:
        is_normal = defect == normal_dir
        search = []
        if not is_normal:
            search = [os.path.join(folder, GROUND_TRUTH_DIR, defect)]
            if mask_dir:
                search += [os.path.join(mask_dir, defect), mask_dir]
        for name in _images_in(os.path.join(folder, defect)):
            mask_path = None if is_normal else _folder_mask(search, _stem(name))
            records.append(
                Record(
                    path=os.path.join(folder, defect, name),
                    category=category,
                    gt_label=0 if is_normal else 1,
                    mask_path=mask_path,
                    defect_type="good" if is_normal else defect,
                    has_mask=is_normal or mask_path is not None,
                )
            )
    if not records:
        raise ValueError(f"folder dataset {folder} holds no images in its subfolders {defects}")
    return finalize_category(records)


def read_folder(
    root: str,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    normal_dir: str = "good",
    mask_dir: str | None = None,
) -> list[Record]:
    """Reads users' own images: ``{root}/good/*`` normal, other subfolders defect types.

    One category (``root`` holds ``good/``, or ``{split}/good/``): its name is ``categories[0]`` if
    given, else the folder's name. Several categories (``{root}/{cls}/good/`` or
    ``{root}/{cls}/{split}/good/``): ``categories`` selects among them. Masks are optional per image
    (``ground_truth/{defect}/{stem}*`` beside the images, or ``mask_dir[/{defect}]/{stem}*``);
    images with only a label work (module docstring, ``has_mask``).
    """
    _require_dir(
        root, "folder dataset root", f"expected {root}/{normal_dir}/* and defect subfolders"
    )

    def category_folder(path: str) -> str | None:
        if os.path.isdir(os.path.join(path, normal_dir)):
            return path
        if os.path.isdir(os.path.join(path, split, normal_dir)):
            return os.path.join(path, split)
        return None

    single = category_folder(root)
    if single is not None:
        if categories is not None and not isinstance(categories, str) and len(categories) != 1:
            raise ValueError(
                f"{root} holds one category (it has '{normal_dir}/'); pass at most one category "
                f"name to name it, got {list(categories)}"
            )
        name = categories if isinstance(categories, str) else (categories or [None])[0]
        name = name or os.path.basename(os.path.normpath(root))
        return _read_folder_category(single, name, normal_dir, mask_dir)

    available = [c for c in _subdirs(root) if category_folder(os.path.join(root, c)) is not None]
    if not available:
        raise ValueError(
            f"no images found in folder dataset {root}: expected {root}/{normal_dir}/ (one "
            f"category) or {root}/<category>/{normal_dir}/ (several); subfolders there: "
            f"{_subdirs(root)}"
        )
    chosen = _select_categories("folder", available, categories, root)
    records: list[Record] = []
    for category in chosen:
        folder = category_folder(os.path.join(root, category))
        category_masks = os.path.join(mask_dir, category) if mask_dir else None
        if category_masks and not os.path.isdir(category_masks):
            category_masks = mask_dir
        records.extend(_read_folder_category(folder, category, normal_dir, category_masks))
    return records
