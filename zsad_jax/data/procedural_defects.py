"""Defect kinds of the auxiliary (training) family, with exact masks.

The auxiliary family uses the synthetic benchmark's five kinds (``synthetic_defects``: scratch,
hole, stain, missing_part, color_shift) and five more, so that what a model learns is not the look
of five particular defects:

``cutpaste``  a blob of the same image from elsewhere, rotated/flipped and re-tinted, pasted in;
``foreign``   a blob of another auxiliary texture (a foreign material) blended in;
``grain``     a blob of strong, possibly coloured, pixel noise (a rough or contaminated patch);
``dent``      a smooth dent or bump: one side shaded darker, the other lighter, texture kept;
``streak``    a straight soft band, lighter or darker (a roller or drag mark).

None of these is a generator of the second held-out family (``novel_scenes``: crack, blur, warp,
debris, misregister). Acceptance is the benchmark's (``synthetic_defects.draw_until_visible``): at
least ``MIN_AREA_FRACTION`` of the image and a mean largest-channel change of ``MIN_MEAN_CHANGE``
over the mask, else the defect is drawn again.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from zsad_jax.data import synthetic_defects
from zsad_jax.data.synthetic_defects import _blob_sdf, _on_object, _place, draw_until_visible
from zsad_jax.data.synthetic_scenes import Scene, coverage, mix, pixel_grid

BENCHMARK_KINDS = synthetic_defects.DEFECT_TYPES
NEW_KINDS = ("cutpaste", "foreign", "grain", "dent", "streak")
AUX_DEFECT_TYPES = BENCHMARK_KINDS + NEW_KINDS


def sample(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of (S, S, 3) ``image`` at pixel coordinates (x, y) (centres at +0.5),
    reflected at the border."""
    coords = np.stack([y - 0.5, x - 0.5])
    return np.stack(
        [ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect") for c in range(3)],
        axis=-1,
    ).astype(np.float32)


def _cutpaste(rng, scene: Scene, size: int, **_):
    cx, cy = _place(rng, scene, size)
    sx, sy = _place(rng, scene, size)
    radius = rng.uniform(0.05, 0.11) * size
    cov = coverage(
        _blob_sdf(rng, size, cx, cy, radius, roughness=0.2),
        rng.choice([1.0, rng.uniform(1.5, 3.0)]),
    )
    x, y = pixel_grid(size)
    a = rng.uniform(0.4, 2 * np.pi - 0.4)
    flip = rng.choice([-1.0, 1.0])
    scale = rng.uniform(0.7, 1.4)
    du, dv = (x - cx) / scale, flip * (y - cy) / scale
    src = sample(
        scene.image,
        sx + math.cos(a) * du - math.sin(a) * dv,
        sy + math.sin(a) * du + math.cos(a) * dv,
    )
    src = np.clip(src * rng.uniform(0.8, 1.2, 3)[None, None, :], 0, 1)
    return mix(scene.image, src, _on_object(scene, cov)), cov


Texture = Callable[[np.random.Generator, int], np.ndarray]


def _foreign(rng, scene: Scene, size: int, *, other: Texture | None = None, **_):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.05, 0.12) * size
    cov = coverage(
        _blob_sdf(rng, size, cx, cy, radius, roughness=0.25), rng.uniform(1.0, 3.0) * size / 128
    )
    if other is not None:
        patch = other(rng, size)
    else:
        patch = rng.random((size, size, 3)).astype(np.float32)
    opacity = rng.uniform(0.7, 1.0)
    return mix(scene.image, patch, _on_object(scene, cov * opacity)), cov


def _grain(rng, scene: Scene, size: int, **_):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.05, 0.11) * size
    cov = coverage(_blob_sdf(rng, size, cx, cy, radius), rng.uniform(1.0, 3.0) * size / 128)
    sigma = rng.uniform(0.12, 0.3)
    shape = (size, size, 3) if rng.random() < 0.5 else (size, size, 1)
    noise = sigma * rng.standard_normal(shape).astype(np.float32)
    if rng.random() < 0.5:  # clumped: noise at half resolution
        noise = np.repeat(np.repeat(noise[::2, ::2], 2, 0), 2, 1)[:size, :size]
    return mix(scene.image, np.clip(scene.image + noise, 0, 1), _on_object(scene, cov)), cov


def _dent(rng, scene: Scene, size: int, **_):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.05, 0.1) * size
    x, y = pixel_grid(size)
    a = rng.uniform(0, 2 * np.pi)
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / radius**2
    slope = ((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / radius
    shade = 1.0 + rng.uniform(0.5, 0.9) * rng.choice([-1, 1]) * slope * np.exp(-d2 * 1.2)
    shade = shade * (1.0 - rng.uniform(0.0, 0.25) * np.exp(-d2 * 1.5))
    # Multiplicative shading plus an additive part, so that dark surfaces show the dent too.
    dented = np.clip(scene.image * shade[..., None] + 0.25 * (shade - 1.0)[..., None], 0, 1)
    cov = coverage((np.sqrt(d2) - 1.0) * radius, 2.0)
    weight = _on_object(scene, np.clip(np.exp(-(np.maximum(d2 - 1.0, 0)) * 4.0), 0, 1))
    return mix(scene.image, dented, weight), cov


def _streak(rng, scene: Scene, size: int, **_):
    cx, cy = _place(rng, scene, size)
    x, y = pixel_grid(size)
    a = rng.uniform(0, np.pi)
    along = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
    across = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
    length = rng.uniform(0.3, 0.9) * size
    half_width = rng.uniform(1.2, 3.5) * size / 128
    sdf = np.maximum(np.abs(across) - half_width, np.abs(along) - length / 2)
    cov = coverage(sdf, rng.uniform(0.8, 1.5))
    gain = rng.uniform(0.35, 0.65) if rng.random() < 0.5 else rng.uniform(1.4, 1.9)
    streaked = np.clip(scene.image * gain + (0.1 if gain > 1 else 0.0), 0, 1)
    return mix(scene.image, streaked, _on_object(scene, cov)), cov


_DRAW = {
    "cutpaste": _cutpaste,
    "foreign": _foreign,
    "grain": _grain,
    "dent": _dent,
    "streak": _streak,
}


def add_defect(rng, scene: Scene, kind: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """A visible defect of ``kind`` (one of ``AUX_DEFECT_TYPES``) on ``scene``; ``other`` (for
    ``foreign``) renders the foreign material: ``other(rng, size) -> (S, S, 3)``."""
    if kind in BENCHMARK_KINDS:
        return synthetic_defects.add_defect(rng, scene, kind)
    if kind not in _DRAW:
        raise ValueError(f"unknown auxiliary defect {kind!r}; known: {list(AUX_DEFECT_TYPES)}")
    return draw_until_visible(rng, scene, _DRAW[kind], kind, **kwargs)
