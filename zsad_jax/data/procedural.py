"""Two more built-in procedural datasets (MVTec-AD layout, generated on first use, no download).

``synthetic_aux``: the auxiliary *training* family, many categories and ten defect kinds. Its
categories are the synthetic benchmark's six training categories plus ``n_styles`` styles of each
family in ``procedural_scenes`` (``plaid_0``, ``plaid_1``, ..., ``tag_2``); its defects are the
benchmark's five kinds plus five more (``procedural_defects``). It shares no generator with either
held-out family, so a model trained on it meets the held-out categories and (for the second
family) defect kinds for the first time at test time. ``synthetic_aux_select`` is the same with the
``foreign`` defect's material never drawn from ``SELECT_FAMILIES`` (the training-side selection
split of ``configs/demo.py:select``).

``synthetic_novel``: the second *held-out* family (``novel_scenes``): six new categories and five
new defect kinds. Nothing on the training side reads it.

Both are written like ``zsad_jax.data.synthetic`` (same layout, manifest, atomic ``ensure``, per-
image ``SeedSequence``), so the same parameters give byte-identical files::

    {root}/{category}/test/{good|defect}/000.png
    {root}/{category}/ground_truth/{defect}/000_mask.png
    {root}/{category}/train/good/000.png          (n_train_good normal images)

Command line: ``python -m zsad_jax.data.procedural --dataset synthetic_novel --out DIR [--sheet
sheet.png]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from zsad_jax.data import (
    generated,
    novel_scenes,
    procedural_defects,
    procedural_scenes,
    readers,
    synthetic,
    synthetic_defects,
    synthetic_scenes,
)
from zsad_jax.data.records import Record

PROCEDURAL_VERSION = 1
MANIFEST = "procedural.json"


def _code(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclasses.dataclass(frozen=True)
class Family:
    """One procedural dataset: its categories, defect kinds and defaults."""

    name: str
    defect_types: tuple[str, ...]
    defaults: dict
    categories: Callable[[dict], tuple[str, ...]]
    render: Callable[[str, np.random.Generator, int, dict], synthetic_scenes.Scene]
    add_defect: Callable[..., tuple[np.ndarray, np.ndarray]]


# --- synthetic_aux ------------------------------------------------------------------------------


def aux_categories(params: dict) -> tuple[str, ...]:
    styles = [f"{f}_{i}" for f in procedural_scenes.AUX_FAMILIES for i in range(params["n_styles"])]
    return tuple(synthetic.SYNTHETIC_TRAIN_CATEGORIES) + tuple(styles)


def aux_family(category: str) -> str | None:
    """The auxiliary family of a ``synthetic_aux`` category ``{family}_{index}``; None for the
    benchmark's training categories (and any other name)."""
    family, _, index = category.rpartition("_")
    return family if family in procedural_scenes.AUX_FAMILIES and index.isdigit() else None


def aux_families(value: str) -> tuple[str, ...]:
    """Comma-separated auxiliary family names (``pretrain.backbone --hold_out``, as its
    ``pretrain.json`` records it), checked; "" is none."""
    names = tuple(name.strip() for name in str(value).split(",") if name.strip())
    unknown = [name for name in names if name not in procedural_scenes.AUX_FAMILIES]
    if unknown:
        raise ValueError(
            f"unknown auxiliary {', '.join(map(repr, unknown))}; the families are "
            f"{','.join(procedural_scenes.AUX_FAMILIES)}"
        )
    return names


def aux_style(family: str, index: int, seed: int) -> dict:
    """The fixed style of category ``{family}_{index}``."""
    rng = np.random.default_rng(np.random.SeedSequence((int(seed), _code(family), int(index), 7)))
    return procedural_scenes.AUX_FAMILIES[family][0](rng)


def render_aux_scene(category: str, rng: np.random.Generator, size: int, params: dict):
    """A normal scene of an auxiliary category (benchmark training category or a style)."""
    if category in synthetic.SYNTHETIC_TRAIN_CATEGORIES:
        return synthetic_scenes.RENDERERS[category](rng, size)
    family, _, index = category.rpartition("_")
    if family not in procedural_scenes.AUX_FAMILIES or not index.isdigit():
        raise ValueError(f"unknown synthetic_aux category {category!r}")
    style = aux_style(family, int(index), params["seed"])
    return procedural_scenes.AUX_FAMILIES[family][1](style, rng, size)


def foreign_texture(
    rng: np.random.Generator, size: int, hold_out: Sequence[str] = ()
) -> np.ndarray:
    """A random auxiliary texture (random family not in ``hold_out``, random style): the
    ``foreign`` defect's material."""
    names = [name for name in procedural_scenes.AUX_TEXTURES if name not in hold_out]
    family = names[int(rng.integers(len(names)))]
    style = procedural_scenes.AUX_TEXTURES[family][0](rng)
    return procedural_scenes.AUX_TEXTURES[family][1](style, rng, size).image


def _aux_defects(hold_out: Sequence[str] = ()):
    """``Family.add_defect`` of ``synthetic_aux``, its foreign material never from ``hold_out``."""

    def add_defect(rng, scene, kind, params):
        del params
        return procedural_defects.add_defect(
            rng, scene, kind, other=lambda r, s: foreign_texture(r, s, hold_out)
        )

    return add_defect


AUX = Family(
    name="synthetic_aux",
    defect_types=procedural_defects.AUX_DEFECT_TYPES,
    defaults={
        "seed": 0,
        "image_size": 128,
        "n_styles": 3,
        "n_train_good": 0,
        "n_test_good": 12,
        "n_test_defect": 20,
    },
    categories=aux_categories,
    render=render_aux_scene,
    add_defect=_aux_defects(),
)

# The auxiliary families of the training-side selection split (``configs/demo.py:select``): it
# trains on the others' categories and tests on these. Its dataset, ``synthetic_aux_select``, is
# ``synthetic_aux`` whose ``foreign`` defect never pastes these families' textures, so that no
# training image shows the test families' material; a backbone judged on it is pretrained with
# ``--hold_out`` them.
SELECT_FAMILIES = ("cloud", "sand", "knurl", "pebble")
AUX_SELECT = dataclasses.replace(
    AUX, name="synthetic_aux_select", add_defect=_aux_defects(SELECT_FAMILIES)
)


# --- synthetic_novel ----------------------------------------------------------------------------


def _novel_render(category, rng, size, params):
    del params
    if category not in novel_scenes.RENDERERS:
        raise ValueError(
            f"unknown synthetic_novel category {category!r}; "
            f"known: {list(novel_scenes.NOVEL_CATEGORIES)}"
        )
    return novel_scenes.RENDERERS[category](rng, size)


NOVEL = Family(
    name="synthetic_novel",
    defect_types=novel_scenes.NOVEL_DEFECT_TYPES,
    defaults={
        "seed": 0,
        "image_size": 128,
        "n_train_good": 8,
        "n_test_good": 12,
        "n_test_defect": 20,
    },
    categories=lambda params: novel_scenes.NOVEL_CATEGORIES,
    render=_novel_render,
    add_defect=lambda rng, scene, kind, params: novel_scenes.add_defect(rng, scene, kind),
)

FAMILIES = {family.name: family for family in (AUX, AUX_SELECT, NOVEL)}


# --- writing and reading ------------------------------------------------------------------------


def render_image(
    family: Family, category: str, params: dict, split: str, defect: str | None, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (S, S, 3) uint8 and its mask (S, S) bool of ``family``."""
    split_code = {"train": 0, "test": 1}[split]
    defect_code = 0 if defect is None else 1 + family.defect_types.index(defect)
    entropy = (
        int(params["seed"]),
        _code(family.name),
        _code(category),
        split_code,
        defect_code,
        int(index),
    )
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    size = int(params["image_size"])
    scene = family.render(category, rng, size, params)
    if defect is None:
        image, mask = scene.image, np.zeros((size, size), bool)
    else:
        image, mask = family.add_defect(rng, scene, defect, params)
    return synthetic_defects.finish(rng, image), mask


def _full_params(family: Family, params: dict) -> dict:
    unknown = sorted(set(params) - set(family.defaults))
    if unknown:
        raise ValueError(
            f"unknown {family.name} options {unknown}; known: {sorted(family.defaults)}"
        )
    full = {**family.defaults, **{k: int(v) for k, v in params.items()}}
    if min(full["n_train_good"], full["n_test_good"], full["n_test_defect"]) < 0:
        raise ValueError(f"{family.name}: counts must be >= 0")
    if full["image_size"] < 32:
        raise ValueError(f"{family.name}: image_size must be >= 32")
    return {"version": PROCEDURAL_VERSION, "dataset": family.name, **full}


def generate(
    family: Family | str, root: str, categories: Sequence[str] | None = None, **params
) -> str:
    """Writes ``family`` (or some of its categories) to ``root``; returns ``root``."""
    family = FAMILIES[family] if isinstance(family, str) else family
    full = _full_params(family, params)
    known = family.categories(full)
    categories = tuple(known if categories is None else categories)
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"unknown {family.name} categories {unknown}; known: {list(known)}")
    return generated.write_dataset(
        root,
        manifest=MANIFEST,
        params=full,
        categories=categories,
        defect_types=family.defect_types,
        counts=(full["n_train_good"], full["n_test_good"], full["n_test_defect"]),
        render=lambda category, *job: render_image(family, category, full, *job),
        what=family.name,
    )


def default_root(family: Family, full: dict) -> str:
    tag = "-".join(f"{k}{full[k]}" for k in sorted(family.defaults))
    return generated.cache_root(f"{family.name}-v{PROCEDURAL_VERSION}-{tag}")


def ensure(family: Family | str, root: str | None = None, **params) -> str:
    """A folder holding all of ``family`` with ``params``, generated (atomically) if needed."""
    family = FAMILIES[family] if isinstance(family, str) else family
    full = _full_params(family, params)
    root = root or default_root(family, full)
    wanted = {**full, "categories": list(family.categories(full))}
    return generated.ensure_generated(
        root,
        manifest=MANIFEST,
        wanted=wanted,
        generate=lambda folder: generate(family, folder, **{k: full[k] for k in family.defaults}),
        what=f"a {family.name} dataset",
    )


def read(
    family: Family | str,
    root: str | None = None,
    split: str = "test",
    categories: Sequence[str] | None = None,
    **params,
) -> list[Record]:
    """Generates ``family`` into ``root`` if absent (``None`` = cache folder), then reads it."""
    family = FAMILIES[family] if isinstance(family, str) else family
    full = _full_params(family, params)
    if categories is not None:
        known = family.categories(full)
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"unknown {family.name} categories {unknown}; known: {list(known)}")
    root = ensure(family, root, **params)
    return readers.read_mvtec_layout(root, split, categories, dataset=family.name)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate a procedural anomaly dataset.")
    parser.add_argument("--dataset", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True, help="folder to write (MVTec-AD layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--sheet", help="also write a contact-sheet PNG here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate(args.dataset, args.out, seed=args.seed, image_size=args.image_size)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    if args.sheet:
        print(f"contact sheet: {synthetic.contact_sheet(args.out, args.sheet)}")


if __name__ == "__main__":
    main()
