"""The second held-out family: new procedural categories *and* new defect kinds.

Nothing here is used by any training step (the auxiliary family, the backbone pretraining or the
synthetic benchmark's training categories): it exists only to test zero-shot transfer to
appearances and defects no generator of the training side draws.

Categories (one renderer each, images vary in colour, pose, scale, phase, lighting and noise):
``marble`` (turbulent veins in polished stone), ``honeycomb`` (hexagonal cells with shaded walls),
``brick`` (offset brick courses with mortar), ``leather`` (irregular cells with creases and pores),
``gear`` (a toothed wheel with a bore and machined grooves), ``hexnut`` (a chamfered hex nut).

Defect kinds (none is a training kind or a variation of one; masks exact as in the benchmark):
``crack``       a branching, jagged dark fracture;
``blur``        a region out of focus or smeared (detail lost, colours kept);
``warp``        a local swirl of the surface (geometry displaced, colours kept);
``debris``      a cluster of small particles and fibres lying on the surface, with shadows;
``misregister`` colour channels locally out of register (print misregistration: colour fringes).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from zsad_jax.data.procedural_defects import sample
from zsad_jax.data.procedural_scenes import jitter, lattice_noise, rgb
from zsad_jax.data.synthetic_defects import _blob_sdf, _on_object, _place, draw_until_visible
from zsad_jax.data.synthetic_scenes import (
    Scene,
    _blank,
    _shadow,
    coverage,
    fractal_noise,
    mix,
    pixel_grid,
    rotate,
    surface,
    value_noise,
)

NOVEL_TEXTURES = ("marble", "honeycomb", "brick", "leather")
NOVEL_OBJECTS = ("gear", "hexnut")
NOVEL_CATEGORIES = NOVEL_TEXTURES + NOVEL_OBJECTS
NOVEL_DEFECT_TYPES = ("crack", "blur", "warp", "debris", "misregister")


def _cells(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest of ``points`` (K, 2) and the nearest's index,
    each (S, S)."""
    x, y = pixel_grid(size)
    d = np.hypot(x[None] - points[:, 0, None, None], y[None] - points[:, 1, None, None])
    order = np.argpartition(d, 1, axis=0)[:2]
    f1 = np.take_along_axis(d, order[:1], 0)[0]
    f2 = np.take_along_axis(d, order[1:2], 0)[0]
    swap = f2 < f1
    first = np.where(swap, order[1], order[0])
    return np.minimum(f1, f2), np.maximum(f1, f2), first


# --- textures -------------------------------------------------------------------------------------


def marble(rng: np.random.Generator, size: int) -> Scene:
    x, y = pixel_grid(size)
    u, _ = rotate(x, y, size / 2, size / 2, rng.uniform(0, np.pi))
    turb = fractal_noise(rng, size, 3, 4) - 0.5
    freq = rng.uniform(1.5, 3.0) / size
    phase = (u * freq + rng.uniform(2.0, 4.0) * turb) * 2 * np.pi
    vein = np.abs(np.sin(phase)) ** rng.uniform(0.15, 0.3)  # 0 on the veins
    palette = rng.integers(3)
    stone = (rgb(0.1, 0.04, 0.92), rgb(0.38, 0.35, 0.55), rgb(0.6, 0.1, 0.2))[palette]
    ink = (rgb(0.6, 0.15, 0.35), rgb(0.35, 0.5, 0.2), rgb(0.1, 0.05, 0.85))[palette]
    stone, ink = jitter(rng, stone), jitter(rng, ink)
    base = surface(rng, size, stone, 0.12)
    image = mix(base, ink, (1.0 - vein).astype(np.float32) * 0.9)
    fine = fractal_noise(rng, size, 16, 2)
    image = mix(image, ink, 0.25 * coverage((0.8 - fine) * 30) * (1 - vein))
    # Crystalline sparkle: fine light and dark grains all over the stone.
    grain = value_noise(rng, size, min(size, 48))
    image = image * (0.8 + 0.4 * grain)[..., None]
    under = surface(rng, size, stone * 0.4, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def _hex_points(rng, size, pitch, angle):
    n = int(size / pitch) + 4
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    px = (i + 0.5 * (j % 2)) * pitch
    py = j * pitch * math.sqrt(3) / 2
    c, s = math.cos(angle), math.sin(angle)
    ox, oy = rng.uniform(0, pitch, 2)
    pts = np.stack([c * px - s * py + size / 2 + ox, s * px + c * py + size / 2 + oy], -1)
    pts = pts.reshape(-1, 2)
    keep = (np.abs(pts - size / 2) < size / 2 + 2 * pitch).all(-1)
    return pts[keep]


def honeycomb(rng: np.random.Generator, size: int) -> Scene:
    pitch = rng.uniform(0.09, 0.13) * size
    f1, f2, _ = _cells(_hex_points(rng, size, pitch, rng.uniform(0, np.pi / 3)), size)
    wall = coverage((f2 - f1) - rng.uniform(1.2, 2.0) * size / 128)
    wax = jitter(rng, rgb(rng.uniform(0.08, 0.13), rng.uniform(0.6, 0.9), rng.uniform(0.75, 0.95)))
    depth = np.clip(f1 / (0.5 * pitch), 0, 1)
    cell = wax[None, None, :] * (0.45 + 0.4 * (1 - depth) ** 0.7)[..., None]
    image = mix(cell, np.minimum(wax * 1.15, 1), wall)
    image = image * (1.0 + 0.08 * (fractal_noise(rng, size, 4) - 0.5))[..., None]
    under = surface(rng, size, wax * 0.25, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def brick(rng: np.random.Generator, size: int) -> Scene:
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, rng.normal(0, 0.03) + rng.choice([0, np.pi / 2]))
    height = rng.uniform(0.08, 0.12) * size
    length = height * rng.uniform(2.0, 2.6)
    row = np.floor(v / height + rng.uniform(0, 1))
    shifted = u / length + 0.5 * (row % 2) + rng.uniform(0, 1)
    col = np.floor(shifted)
    fu = (shifted - col) * length
    fv = (v / height + rng.uniform(0, 0)) % 1.0 * height
    gap = rng.uniform(0.9, 1.6) * size / 128
    mortar_sdf = np.minimum(np.minimum(fu, length - fu), np.minimum(fv, height - fv)) - gap
    clay = rgb(rng.uniform(0.0, 0.06), rng.uniform(0.55, 0.75), rng.uniform(0.5, 0.7))
    ids = (row * 7919 + col * 104729).astype(np.int64) % 997
    tint = 1.0 + 0.12 * (np.sin(ids * 12.9898) * 43758.5453 % 1.0 - 0.5) * 2
    body = clay[None, None, :] * tint[..., None]
    body = body * (0.9 + 0.2 * fractal_noise(rng, size, 12, 2))[..., None]
    mortar = surface(rng, size, jitter(rng, rgb(0.1, 0.08, 0.75)), 0.1)
    image = mix(mortar, body, coverage(-mortar_sdf))
    under = surface(rng, size, clay * 0.3, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def leather(rng: np.random.Generator, size: int) -> Scene:
    cell = rng.uniform(0.07, 0.1) * size
    n = int((size / cell) ** 2 * 1.3)
    points = rng.uniform(-cell, size + cell, (n, 2))
    f1, f2, _ = _cells(points, size)
    crease = coverage((f2 - f1) - rng.uniform(1.0, 1.6) * size / 128, 1.5)
    hide = jitter(
        rng, (rgb(0.07, 0.7, 0.6), rgb(0.08, 0.45, 0.8), rgb(0.6, 0.25, 0.55))[rng.integers(3)], 0.1
    )
    dome = 0.6 + 0.6 * np.clip(1 - f1 / cell, 0, 1) ** 0.5
    image = surface(rng, size, hide, 0.12) * dome[..., None]
    image = mix(image, hide * 0.2, 0.95 * crease)
    pores = value_noise(rng, size, min(size, 64))
    image = mix(image, hide * 0.45, 0.7 * coverage((0.15 - pores) * 60))
    under = surface(rng, size, hide * 0.4, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


# --- objects --------------------------------------------------------------------------------------


def gear(rng: np.random.Generator, size: int) -> Scene:
    x, y = pixel_grid(size)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    teeth = int(rng.integers(10, 17))
    outer = rng.uniform(0.32, 0.38) * size
    tooth = rng.uniform(0.06, 0.09) * size
    bore = outer * rng.uniform(0.2, 0.3)
    spin = rng.uniform(0, 2 * np.pi)

    def sdf(px, py):
        dx, dy = px - cx, py - cy
        r, theta = np.hypot(dx, dy), np.arctan2(dy, dx) + spin
        wave = np.clip(1.6 * np.cos(teeth * theta), -1, 1) * 0.5 + 0.5
        return np.maximum(r - (outer - tooth + tooth * wave), bore - r)

    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    steel = jitter(rng, rgb(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.6, 0.8)))
    grooves = 1.0 + 0.08 * np.sin(r * (2 * np.pi / (0.02 * size)))
    light = 1.0 + 0.25 * ((-dx - dy) / outer)
    hub = 1.0 - 0.2 * coverage(r - bore * 1.8)
    body = steel[None, None, :] * np.clip(grooves * light * hub, 0, 2)[..., None]
    background = surface(rng, size, jitter(rng, rgb(0.6, 0.3, 0.3)), 0.2)
    background = _shadow(background, sdf, size, 0.45)
    cov = coverage(sdf(x, y))
    image = mix(background, np.clip(body, 0, 1), cov)
    return Scene(np.clip(image, 0, 1).astype(np.float32), cov, background, True)


def hexnut(rng: np.random.Generator, size: int) -> Scene:
    x, y = pixel_grid(size)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    radius = rng.uniform(0.3, 0.36) * size
    hole = radius * rng.uniform(0.4, 0.5)
    spin = rng.uniform(0, np.pi / 3)

    def hex_dist(px, py):
        dx, dy = px - cx, py - cy
        theta = np.arctan2(dy, dx) + spin
        local = (theta % (np.pi / 3)) - np.pi / 6
        return np.hypot(dx, dy) * np.cos(local)

    def sdf(px, py):
        return np.maximum(
            hex_dist(px, py) - radius * math.cos(np.pi / 6), hole - np.hypot(px - cx, py - cy)
        )

    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    zinc = jitter(rng, rgb(rng.uniform(0.1, 0.6), rng.uniform(0.05, 0.4), rng.uniform(0.6, 0.85)))
    chamfer = coverage(r - radius * 0.82, 2.0)  # the chamfered ring near the corners
    face = 1.0 + 0.12 * np.cos(theta * 6 + spin * 6) * chamfer
    thread = 1.0 - 0.35 * coverage(r - hole * 1.2) * (0.5 + 0.5 * np.sin(r * 2.2))
    brushed = 1.0 + 0.3 * (lattice_noise(rng, theta * 40, r * 0.2, 64) - 0.5)
    body = zinc[None, None, :] * (face * thread * brushed * (1 - 0.15 * chamfer))[..., None]
    background = surface(rng, size, jitter(rng, rgb(0.1, 0.2, 0.85)), 0.08)
    background = _shadow(background, sdf, size, 0.35)
    cov = coverage(sdf(x, y))
    image = mix(background, np.clip(body, 0, 1), cov)
    return Scene(np.clip(image, 0, 1).astype(np.float32), cov, background, True)


RENDERERS = {
    "marble": marble,
    "honeycomb": honeycomb,
    "brick": brick,
    "leather": leather,
    "gear": gear,
    "hexnut": hexnut,
}


# --- defects --------------------------------------------------------------------------------------


def _polyline_distance(points: np.ndarray, size: int, pad: float) -> np.ndarray:
    """(S, S) distance to a polyline (K, 2), computed on its bounding box (inf elsewhere)."""
    x, y = pixel_grid(size)
    lo = np.clip(np.floor(points.min(axis=0) - pad), 0, size).astype(int)
    hi = np.clip(np.ceil(points.max(axis=0) + pad), 0, size).astype(int)
    out = np.full((size, size), np.inf, np.float32)
    if (hi <= lo).any():
        return out
    bx, by = x[lo[1] : hi[1], lo[0] : hi[0]], y[lo[1] : hi[1], lo[0] : hi[0]]
    near = np.full(bx.shape, np.inf, np.float32)
    for (ax, ay), (ex, ey) in zip(points[:-1], points[1:] - points[:-1], strict=True):
        h = np.clip(((bx - ax) * ex + (by - ay) * ey) / (ex * ex + ey * ey + 1e-9), 0, 1)
        near = np.minimum(near, np.hypot(bx - ax - h * ex, by - ay - h * ey))
    out[lo[1] : hi[1], lo[0] : hi[0]] = near
    return out


def _crack(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    heading = rng.uniform(0, 2 * np.pi)
    step = rng.uniform(1.5, 2.5) * size / 128
    paths = []
    for branch in range(int(rng.integers(2, 5))):
        if branch == 0:
            start, h, n = np.array([cx, cy]), heading, int(rng.integers(18, 36))
        else:
            main = paths[0]
            start = main[rng.integers(len(main) // 4, len(main))]
            h, n = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(6, 16))
        pts = [start]
        for _ in range(n):
            h += rng.normal(0, 0.45)
            pts.append(pts[-1] + step * np.array([math.cos(h), math.sin(h)]))
        paths.append(np.array(pts))
    width = rng.uniform(0.5, 0.9) * size / 128
    dist = np.min([_polyline_distance(p, size, width + 3) for p in paths], axis=0)
    cov = coverage(dist - width)
    halo = coverage(dist - width - 1.5, 1.5) - cov  # a slightly darker, chipped edge
    dark = scene.image * rng.uniform(0.05, 0.25)
    image = mix(scene.image, scene.image * 0.75, _on_object(scene, 0.6 * halo))
    return mix(image, dark, _on_object(scene, cov)), cov


def _blur(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.06, 0.12) * size
    cov = coverage(
        _blob_sdf(rng, size, cx, cy, radius, roughness=0.15), rng.uniform(1.5, 3.0) * size / 128
    )
    sigma = rng.uniform(2.0, 4.0) * size / 128
    if rng.random() < 0.5:  # isotropic defocus
        blurred = ndimage.gaussian_filter(scene.image, (sigma, sigma, 0), mode="reflect")
    else:  # a directional smear
        a = rng.uniform(0, np.pi)
        blurred = np.zeros_like(scene.image)
        taps = np.linspace(-2.5, 2.5, 11) * sigma
        x, y = pixel_grid(size)
        for t in taps:
            blurred += sample(scene.image, x + t * math.cos(a), y + t * math.sin(a))
        blurred /= len(taps)
    return mix(scene.image, blurred.astype(np.float32), _on_object(scene, cov)), cov


def _warp(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.07, 0.13) * size
    x, y = pixel_grid(size)
    dx, dy = x - cx, y - cy
    d = np.hypot(dx, dy) / radius
    fall = np.clip(1 - d, 0, 1) ** 2
    turn = rng.uniform(2.0, 4.0) * rng.choice([-1, 1]) * fall
    pinch = 1.0 + rng.uniform(-0.4, 0.4) * fall
    c, s = np.cos(turn), np.sin(turn)
    src = sample(scene.image, cx + pinch * (c * dx - s * dy), cy + pinch * (s * dx + c * dy))
    cov = coverage((d - 0.85) * radius, 1.5)
    return mix(scene.image, src, _on_object(scene, np.clip(fall * 4, 0, 1))), cov


def _debris(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    spread = rng.uniform(0.03, 0.07) * size
    x, y = pixel_grid(size)
    cov = np.zeros((size, size), np.float32)
    shadow = np.zeros((size, size), np.float32)
    colour_cov = []
    for _ in range(int(rng.integers(6, 16))):
        px, py = cx + rng.normal(0, spread), cy + rng.normal(0, spread)
        r = rng.uniform(0.8, 2.2) * size / 128
        c = coverage(np.hypot(x - px, (y - py) * rng.uniform(0.6, 1.0)) - r)
        colour_cov.append((c, rng.uniform(0, 1)))
        cov = np.maximum(cov, c)
        shadow = np.maximum(shadow, coverage(np.hypot(x - px - 1.2, y - py - 1.2) - r, 1.5))
    for _ in range(int(rng.integers(0, 3))):  # fibres
        a = rng.uniform(0, 2 * np.pi)
        start = np.array([cx, cy]) + rng.normal(0, spread, 2)
        pts = [start]
        for _ in range(int(rng.integers(6, 12))):
            a += rng.normal(0, 0.3)
            pts.append(pts[-1] + 1.5 * size / 128 * np.array([math.cos(a), math.sin(a)]))
        c = coverage(_polyline_distance(np.array(pts), size, 3) - 0.45 * size / 128)
        colour_cov.append((c, rng.uniform(0, 1)))
        cov = np.maximum(cov, c)
    image = mix(scene.image, scene.image * 0.6, _on_object(scene, 0.7 * shadow * (1 - cov)))
    dark = rng.random() < 0.6
    for c, t in colour_cov:
        grey = (0.05 + 0.2 * t) if dark else (0.8 + 0.2 * t)
        tone = np.clip(grey * (1 + rng.uniform(-0.3, 0.3, 3)), 0, 1).astype(np.float32)
        image = mix(image, tone, _on_object(scene, c))
    return image, cov


def _misregister(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.07, 0.13) * size
    cov = coverage(_blob_sdf(rng, size, cx, cy, radius), rng.uniform(1.0, 2.5) * size / 128)
    x, y = pixel_grid(size)
    shifted = scene.image.copy()
    for channel in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(2.0, 4.0) * size / 128
        plane = sample(
            np.repeat(scene.image[..., channel : channel + 1], 3, -1),
            x + d * math.cos(a),
            y + d * math.sin(a),
        )[..., 0]
        shifted[..., channel] = plane
    return mix(scene.image, shifted, _on_object(scene, cov)), cov


_DRAW = {
    "crack": _crack,
    "blur": _blur,
    "warp": _warp,
    "debris": _debris,
    "misregister": _misregister,
}


# Blur, warp and misregistration change a surface only where it has detail, so over their whole
# region the mean change is smaller than for a painted defect at the same visibility.
_MIN_CHANGE = {"blur": 0.04, "warp": 0.04, "misregister": 0.04}


def add_defect(rng, scene: Scene, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A visible held-out defect of ``kind`` (``NOVEL_DEFECT_TYPES``) and its mask."""
    if kind not in _DRAW:
        raise ValueError(f"unknown novel defect {kind!r}; known: {list(NOVEL_DEFECT_TYPES)}")
    extra = {"min_change": _MIN_CHANGE[kind]} if kind in _MIN_CHANGE else {}
    return draw_until_visible(rng, scene, _DRAW[kind], kind, **extra)
