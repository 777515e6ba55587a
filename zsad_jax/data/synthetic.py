"""A built-in synthetic anomaly-detection benchmark (no download), written in the MVTec-AD layout.

Ten procedurally rendered categories, five textures (``stripes``, ``weave``, ``granite``, ``wood``,
``dots``) and five objects (``disc``, ``chip``, ``screw``, ``washer``, ``pill``), with five defect
types shared by all (``scratch``, ``hole``, ``stain``, ``missing_part``, ``color_shift``; see
``synthetic_defects``) and exact pixel masks. Normal images vary in colour, position, rotation,
scale, lighting and noise. The zero-shot split: a model trains on ``SYNTHETIC_TRAIN_CATEGORIES`` and
is evaluated on ``SYNTHETIC_HELDOUT_CATEGORIES``, whose appearance it has never seen (wood grain and
printed dots vs stripes/weave/stone; a brass ring and a capsule vs a disc, a chip and a screw).

Layout (readable by ``read_dataset("mvtec_ad", root)`` unchanged)::

    {root}/{category}/train/good/000.png
    {root}/{category}/test/good/000.png
    {root}/{category}/test/{defect}/000.png
    {root}/{category}/ground_truth/{defect}/000_mask.png      (0 / 255)
    {root}/synthetic.json                                      (parameters; written last)

Determinism: each image is drawn from its own ``np.random.SeedSequence((seed, crc32(category),
split, defect, index))``, so the same parameters give byte-identical PNG files (on the same
NumPy/Pillow/zlib; transcendental functions may differ in the last bit across CPUs) and generating a
subset of categories gives the same files for those categories.

Command line: ``python -m zsad_jax.data.synthetic --out data/synthetic [--sheet sheet.png]``.
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from zsad_jax.data import generated, readers, synthetic_defects, synthetic_scenes
from zsad_jax.data.decode import load_image, load_mask
from zsad_jax.data.records import Record
from zsad_jax.data.synthetic_defects import DEFECT_TYPES
from zsad_jax.visualize import mask_outline

SYNTHETIC_VERSION = 1
SYNTHETIC_TEXTURES = ("stripes", "weave", "granite", "wood", "dots")
SYNTHETIC_OBJECTS = ("disc", "chip", "screw", "washer", "pill")
SYNTHETIC_TRAIN_CATEGORIES = ("stripes", "weave", "granite", "disc", "chip", "screw")
SYNTHETIC_HELDOUT_CATEGORIES = ("wood", "dots", "washer", "pill")
SYNTHETIC_CATEGORIES = SYNTHETIC_TRAIN_CATEGORIES + SYNTHETIC_HELDOUT_CATEGORIES
MANIFEST = "synthetic.json"

DEFAULTS = {"seed": 0, "image_size": 128, "n_train_good": 8, "n_test_good": 12, "n_test_defect": 20}


def _category_code(category: str) -> int:
    return zlib.crc32(category.encode())


def render_image(
    category: str, *, seed: int, image_size: int, split: str, defect: str | None, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one image of the benchmark.

    Args:
      category: one of ``SYNTHETIC_CATEGORIES``.
      split: ``train`` | ``test``.
      defect: ``None`` for a normal image, else one of ``DEFECT_TYPES``.
      index: position within its folder.

    Returns:
      image (S, S, 3) uint8 and mask (S, S) bool (all False for normal images).
    """
    if category not in synthetic_scenes.RENDERERS:
        raise ValueError(
            f"unknown synthetic category {category!r}; known: {list(SYNTHETIC_CATEGORIES)}"
        )
    split_code = {"train": 0, "test": 1}[split]
    defect_code = 0 if defect is None else 1 + DEFECT_TYPES.index(defect)
    entropy = (int(seed), _category_code(category), split_code, defect_code, int(index))
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    scene = synthetic_scenes.RENDERERS[category](rng, int(image_size))
    if defect is None:
        image, mask = scene.image, np.zeros(scene.image.shape[:2], bool)
    else:
        image, mask = synthetic_defects.add_defect(rng, scene, defect)
    return synthetic_defects.finish(rng, image), mask


def _params(seed, image_size, n_train_good, n_test_good, n_test_defect) -> dict:
    return {
        "version": SYNTHETIC_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "n_train_good": int(n_train_good),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
    }


def generate(
    root: str,
    *,
    seed: int = DEFAULTS["seed"],
    image_size: int = DEFAULTS["image_size"],
    n_train_good: int = DEFAULTS["n_train_good"],
    n_test_good: int = DEFAULTS["n_test_good"],
    n_test_defect: int = DEFAULTS["n_test_defect"],
    categories: Sequence[str] | None = None,
) -> str:
    """Writes the benchmark to ``root`` (created) and returns ``root``.

    Args:
      seed: everything is a function of it (module docstring).
      image_size: side S of the square images (128..512 sensible).
      n_train_good: normal images in ``train/good`` per category.
      n_test_good: normal images in ``test/good`` per category.
      n_test_defect: defect images per category, dealt round-robin over ``DEFECT_TYPES``.
      categories: subset of ``SYNTHETIC_CATEGORIES`` (default all).

    Raises:
      ValueError: unknown category, bad counts, or ``root`` is a non-empty folder that is not a
        synthetic benchmark (it is never overwritten).
    """
    categories = tuple(SYNTHETIC_CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        raise ValueError(
            f"unknown synthetic categories {unknown}; known: {list(SYNTHETIC_CATEGORIES)}"
        )
    if min(n_train_good, n_test_good, n_test_defect) < 0 or image_size < 32:
        raise ValueError("counts must be >= 0 and image_size >= 32")

    def render(category, split, defect, index):
        return render_image(
            category, seed=seed, image_size=image_size, split=split, defect=defect, index=index
        )

    return generated.write_dataset(
        root,
        manifest=MANIFEST,
        params=_params(seed, image_size, n_train_good, n_test_good, n_test_defect),
        categories=categories,
        defect_types=DEFECT_TYPES,
        counts=(n_train_good, n_test_good, n_test_defect),
        render=render,
        what="the synthetic benchmark",
    )


def default_root(seed: int, image_size: int) -> str:
    """Per-user cache folder (``$ZSAD_JAX_CACHE`` or ``~/.cache/zsad_jax``) for a parameter set."""
    return generated.cache_root(f"synthetic-v{SYNTHETIC_VERSION}-seed{seed}-{image_size}px")


def ensure(root: str | None = None, **params) -> str:
    """Returns a folder holding the full benchmark with ``params``, generating it if needed
    (``generated.ensure_generated``: never half-written; a folder generated with other parameters
    is replaced; any other non-empty folder is left alone, error)."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown synthetic options {unknown}; known: {sorted(DEFAULTS)}")
    full = {**DEFAULTS, **params}
    root = root or default_root(full["seed"], full["image_size"])
    wanted = {**_params(**full), "categories": list(SYNTHETIC_CATEGORIES)}
    return generated.ensure_generated(
        root,
        manifest=MANIFEST,
        wanted=wanted,
        generate=lambda folder: generate(folder, **full),
        what="a synthetic benchmark",
    )


def read_synthetic(
    root: str | None = None,
    split: str = "test",
    categories: Sequence[str] | None = None,
    **params,
) -> list[Record]:
    """Generates the benchmark into ``root`` if absent (``None`` = cache folder), then reads it."""
    if categories is not None:
        unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
        if unknown:
            raise ValueError(
                f"unknown synthetic categories {unknown}; known: {list(SYNTHETIC_CATEGORIES)} "
                f"(train: {list(SYNTHETIC_TRAIN_CATEGORIES)}, held out: "
                f"{list(SYNTHETIC_HELDOUT_CATEGORIES)})"
            )
    root = ensure(root, **params)
    return readers.read_mvtec_layout(root, split, categories, dataset="synthetic")


def contact_sheet(
    root: str,
    out_path: str,
    *,
    categories: Sequence[str] | None = None,
    tile: int = 112,
) -> str:
    """Writes a PNG: per category one normal and one image per defect type, each shown plain and
    with its mask (tinted red, outlined) beside it. Returns ``out_path``."""
    records = readers.read_mvtec_layout(root, "test", categories, dataset="synthetic")
    by_category: dict[str, list[Record]] = {}
    for r in records:
        picked = by_category.setdefault(r.category, [])
        if all(p.defect_type != r.defect_type for p in picked):
            picked.append(r)
    columns = 2 * max(len(v) for v in by_category.values())
    sheet = np.full((tile * len(by_category), tile * columns, 3), 255, np.uint8)
    for row, (_, picked) in enumerate(by_category.items()):
        for col, r in enumerate(picked):
            image = np.asarray(Image.fromarray(load_image(r.path)).resize((tile, tile)))
            mask = np.zeros((tile, tile), bool)
            if r.mask_path:
                small = Image.fromarray(load_mask(r.mask_path).astype(np.uint8) * 255)
                mask = np.asarray(small.resize((tile, tile), Image.Resampling.NEAREST)) > 0
            overlay = image.copy()
            overlay[mask] = (0.5 * overlay[mask] + [127, 0, 0]).astype(np.uint8)
            overlay[mask_outline(mask)] = [255, 0, 0]
            y0, x0 = row * tile, 2 * col * tile
            sheet[y0 : y0 + tile, x0 : x0 + tile] = image
            sheet[y0 : y0 + tile, x0 + tile : x0 + 2 * tile] = overlay
    Image.fromarray(sheet).save(out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic anomaly benchmark.")
    parser.add_argument("--out", required=True, help="folder to write (MVTec-AD layout)")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=value)
    parser.add_argument("--sheet", help="also write a contact-sheet PNG here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate(args.out, **{k: getattr(args, k) for k in DEFAULTS})
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    if args.sheet:
        print(f"contact sheet: {contact_sheet(args.out, args.sheet)}")


if __name__ == "__main__":
    main()
