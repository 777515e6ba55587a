"""Procedural normal images of the *auxiliary* (training) family: many categories, from styles.

A category is one style of a scene family: ``plaid_2`` is style 2 of the ``plaid`` family, whose
palette, periods and proportions are fixed by ``(seed, family, style)``; its images then vary in
position, rotation, phase, colour jitter and (in ``synthetic_defects.finish``) lighting and noise,
like the categories of the synthetic benchmark. Every family here is a different generator from
the benchmark's held-out categories (wood grain, printed dots, a washer ring, a capsule) and from
the second held-out family (``novel_scenes``: marble veins, honeycomb, bricks, leather cells, a
gear, a hex nut), so a model trained on this family has seen none of their appearances.

Textures: ``plaid`` (crossed bands), ``cloud`` (fractal noise through a colour ramp), ``brushed``
(anisotropic streaked metal), ``waves`` (interfering sinusoids), ``sand`` (dense fine speckle),
``chevron`` (zig-zag bands), ``checker`` (soft checkerboard), ``knurl`` (crossed shaded grooves).
Objects on a background: ``plate`` (rounded regular polygon), ``cross`` (a plus-shaped bracket),
``pebble`` (a smooth irregular lump), ``star`` (a rounded star), ``tag`` (a label with a printed
bar code).

Each family is ``style(rng) -> dict`` (drawn once per category) and ``render(style, rng, size) ->
Scene`` (once per image).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np

from zsad_jax.data.synthetic_scenes import (
    Scene,
    _blank,
    _shadow,
    coverage,
    fractal_noise,
    mix,
    pixel_grid,
    rotate,
    rounded_box,
    surface,
    value_noise,
)

# --- helpers shared with the other procedural generators --------------------------------------


def rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] (h wraps) -> RGB float32."""
    return np.array(
        colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32
    )


def jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = 0.06) -> np.ndarray:
    """A colour with independent per-channel multiplicative jitter."""
    return np.clip(colour * (1.0 + rng.uniform(-amount, amount, 3)), 0, 1).astype(np.float32)


def random_colour(rng: np.random.Generator, s=(0.2, 0.8), v=(0.25, 0.9)) -> np.ndarray:
    return rgb(rng.uniform(0, 1), rng.uniform(*s), rng.uniform(*v))


def lattice_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, n: int = 64):
    """Smooth value noise at arbitrary lattice coordinates (u, v), wrapping every ``n`` cells."""
    lattice = rng.random((n, n)).astype(np.float32)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64) % n, iv.astype(np.int64) % n
    ju, jv = (iu + 1) % n, (iv + 1) % n
    top = lattice[iv, iu] * (1 - fu) + lattice[iv, ju] * fu
    bottom = lattice[jv, iu] * (1 - fu) + lattice[jv, ju] * fu
    return (top * (1 - fv) + bottom * fv).astype(np.float32)


def ramp(t: np.ndarray, colours: list[np.ndarray]) -> np.ndarray:
    """(S, S) values in [0, 1] -> (S, S, 3) through a piecewise-linear colour ramp."""
    t = np.clip(t, 0, 1) * (len(colours) - 1)
    i = np.minimum(np.floor(t).astype(np.int64), len(colours) - 2)
    f = (t - i)[..., None].astype(np.float32)
    table = np.stack(colours).astype(np.float32)
    return (table[i] * (1 - f) + table[i + 1] * f).astype(np.float32)


def smooth_band(x: np.ndarray, width: float, sharp: float = 4.0) -> np.ndarray:
    """Periodic band profile in [0, 1]: ``x`` in periods, band of relative ``width``."""
    d = np.abs((x % 1.0) - 0.5) * 2.0  # 0 at the band centre, 1 at its edges' far side
    return (0.5 - 0.5 * np.tanh(sharp * (d - width) / max(width, 1e-3))).astype(np.float32)


def _sdf_shade(sdf: np.ndarray, depth: float) -> np.ndarray:
    """A bevel: brighter just inside the edge, from the signed distance (pixels)."""
    return (1.0 + 0.25 * np.exp(-np.maximum(-sdf, 0) / depth) * (sdf < 0)).astype(np.float32)


# --- textures -------------------------------------------------------------------------------------


def plaid_style(rng):
    base = random_colour(rng, v=(0.3, 0.85))
    return {
        "base": base,
        "c1": random_colour(rng),
        "c2": random_colour(rng),
        "p1": rng.uniform(0.08, 0.2),
        "p2": rng.uniform(0.08, 0.2),
        "w1": rng.uniform(0.15, 0.4),
        "w2": rng.uniform(0.1, 0.35),
        "angle": rng.uniform(0, np.pi / 2),
        "strength": rng.uniform(0.45, 0.75),
    }


def plaid(st, rng, size):
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, st["angle"] + rng.normal(0, 0.05))
    b1 = smooth_band(u / (st["p1"] * size) + rng.uniform(0, 1), st["w1"])
    b2 = smooth_band(v / (st["p2"] * size) + rng.uniform(0, 1), st["w2"])
    image = surface(rng, size, jitter(rng, st["base"]), 0.06)
    image = mix(image, jitter(rng, st["c1"]), st["strength"] * b1)
    image = mix(image, jitter(rng, st["c2"]), st["strength"] * b2)
    image = image * (1.0 - 0.15 * (b1 * b2))[..., None]
    thread = 1.0 + 0.05 * np.sin((u + v) * (2 * np.pi / (0.025 * size)))
    under = surface(rng, size, st["base"] * 0.3, 0.2)
    return Scene(np.clip(image * thread[..., None], 0, 1), _blank(size), under, False)


def cloud_style(rng):
    return {
        "colours": [random_colour(rng) for _ in range(int(rng.integers(2, 4)))],
        "cells": int(rng.integers(2, 7)),
        "octaves": int(rng.integers(3, 6)),
        "contrast": rng.uniform(1.0, 2.2),
    }


def cloud(st, rng, size):
    n = fractal_noise(rng, size, st["cells"], st["octaves"])
    t = np.clip(0.5 + (n - n.mean()) * st["contrast"] * 1.8, 0, 1)
    image = ramp(t, [jitter(rng, c) for c in st["colours"]])
    image = image * (1.0 + 0.04 * (value_noise(rng, size, min(size, 48)) - 0.5))[..., None]
    under = surface(rng, size, st["colours"][0] * 0.35, 0.2)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def brushed_style(rng):
    return {
        "metal": rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.5, 0.85)),
        "angle": rng.uniform(0, np.pi),
        "along": rng.uniform(2.0, 5.0),
        "across": rng.uniform(30, 60),
        "depth": rng.uniform(0.15, 0.3),
    }


def brushed(st, rng, size):
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, st["angle"] + rng.normal(0, 0.04))
    fine = lattice_noise(rng, u * st["along"] / size, v * st["across"] / size, 96)
    coarse = lattice_noise(rng, u * 2 / size, v * 8 / size, 32)
    shade = 1.0 + st["depth"] * (fine - 0.5) + 0.1 * (coarse - 0.5)
    sheen = 1.0 + 0.15 * np.cos(2 * np.pi * (x + y) / (size * rng.uniform(1.0, 2.0)))
    image = jitter(rng, st["metal"])[None, None, :] * (shade * sheen)[..., None]
    under = surface(rng, size, st["metal"] * 0.3, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def waves_style(rng):
    k = int(rng.integers(2, 4))
    return {
        "c1": random_colour(rng),
        "c2": random_colour(rng),
        "angles": rng.uniform(0, np.pi, k),
        "periods": rng.uniform(0.05, 0.2, k),
        "power": rng.uniform(0.6, 2.0),
    }


def waves(st, rng, size):
    x, y = pixel_grid(size)
    total = np.zeros((size, size), np.float32)
    for a, p in zip(st["angles"], st["periods"], strict=True):
        a = a + rng.normal(0, 0.03)
        total += np.sin(
            (x * math.cos(a) + y * math.sin(a)) * (2 * np.pi / (p * size))
            + rng.uniform(0, 2 * np.pi)
        )
    t = (0.5 + 0.5 * total / len(st["angles"])) ** st["power"]
    image = mix(
        np.broadcast_to(jitter(rng, st["c1"]), (size, size, 3)),
        jitter(rng, st["c2"]),
        t.astype(np.float32),
    )
    under = surface(rng, size, st["c1"] * 0.3, 0.2)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def sand_style(rng):
    return {
        "base": random_colour(rng, s=(0.1, 0.6), v=(0.4, 0.85)),
        "dark": rng.uniform(0.3, 0.7),
        "share": rng.uniform(0.15, 0.4),
        "cells": rng.uniform(0.35, 0.6),
    }


def sand(st, rng, size):
    base = jitter(rng, st["base"])
    image = surface(rng, size, base, 0.12)
    cells = min(size, int(st["cells"] * size))
    for colour, share in ((base * st["dark"], st["share"]), (np.minimum(base * 1.25, 1), 0.2)):
        grains = value_noise(rng, size, cells)
        level = np.quantile(grains, 1.0 - share)
        image = mix(image, colour, 0.8 * coverage((level - grains) * 40.0))
    under = surface(rng, size, base * 0.3, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def chevron_style(rng):
    return {
        "c1": random_colour(rng),
        "c2": random_colour(rng),
        "period": rng.uniform(0.08, 0.16),
        "zig": rng.uniform(0.1, 0.25),
        "slope": rng.uniform(0.5, 1.5),
        "angle": rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.2),
    }


def chevron(st, rng, size):
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, st["angle"] + rng.normal(0, 0.04))
    zig_period = st["zig"] * size
    tri = np.abs((u / zig_period) % 1.0 - 0.5) * zig_period * st["slope"]
    band = smooth_band((v + tri) / (st["period"] * size) + rng.uniform(0, 1), 0.5, 3.0)
    image = mix(
        np.broadcast_to(jitter(rng, st["c1"]), (size, size, 3)), jitter(rng, st["c2"]), band
    )
    image = image * (1.0 + 0.06 * (fractal_noise(rng, size, 4) - 0.5))[..., None]
    under = surface(rng, size, st["c2"] * 0.3, 0.2)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def checker_style(rng):
    c1 = random_colour(rng)
    return {
        "c1": c1,
        "c2": rng.uniform(0.3, 0.7) * c1 if rng.random() < 0.4 else random_colour(rng),
        "period": rng.uniform(0.1, 0.25),
        "angle": rng.uniform(0, np.pi / 2),
        "soft": rng.uniform(0.5, 2.0),
    }


def checker(st, rng, size):
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, st["angle"] + rng.normal(0, 0.04))
    p = st["period"] * size
    su = np.sin(np.pi * (u / p + rng.uniform(0, 2)))
    sv = np.sin(np.pi * (v / p + rng.uniform(0, 2)))
    t = 0.5 + 0.5 * np.tanh(su * sv * p / (st["soft"] * 3.0))
    image = mix(
        np.broadcast_to(jitter(rng, st["c1"]), (size, size, 3)),
        jitter(rng, st["c2"]),
        t.astype(np.float32),
    )
    image = image * (1.0 + 0.08 * (fractal_noise(rng, size, 3) - 0.5))[..., None]
    under = surface(rng, size, st["c1"] * 0.3, 0.2)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def knurl_style(rng):
    return {
        "metal": rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.45, 0.8)),
        "pitch": rng.uniform(0.05, 0.09),
        "angle": rng.uniform(0.5, 1.1),
        "depth": rng.uniform(0.25, 0.45),
    }


def knurl(st, rng, size):
    x, y = pixel_grid(size)
    base = rng.normal(0, 0.05)
    p = st["pitch"] * size
    u1, _ = rotate(x, y, 0, 0, base + st["angle"] / 2)
    u2, _ = rotate(x, y, 0, 0, base - st["angle"] / 2)
    g1 = np.sin(2 * np.pi * (u1 / p + rng.uniform(0, 1)))
    g2 = np.sin(2 * np.pi * (u2 / p + rng.uniform(0, 1)))
    shade = 1.0 + st["depth"] * 0.5 * (np.tanh(2 * g1) + np.tanh(2 * g2)) * 0.5
    image = jitter(rng, st["metal"])[None, None, :] * shade[..., None]
    image = image * (1.0 + 0.05 * (fractal_noise(rng, size, 3) - 0.5))[..., None]
    under = surface(rng, size, st["metal"] * 0.3, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


# --- objects --------------------------------------------------------------------------------------


def _object_scene(rng, size, sdf_fn, body: np.ndarray, background: np.ndarray, shadow=0.4):
    x, y = pixel_grid(size)
    background = _shadow(background, sdf_fn, size, shadow)
    cov = coverage(sdf_fn(x, y))
    image = mix(background, body, cov)
    return Scene(np.clip(image, 0, 1).astype(np.float32), cov, background, True)


def _object_style(rng):
    return {
        "colour": random_colour(rng, s=(0.05, 0.7), v=(0.45, 0.9)),
        "background": random_colour(rng, s=(0.0, 0.4), v=(0.1, 0.9)),
        "scale": rng.uniform(0.28, 0.36),
    }


def _lit(rng, sdf, colour, size, bevel=0.03):
    """Flat body colour with mottling, a bevel along the edge and a soft light gradient."""
    x, y = pixel_grid(size)
    a = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.15 * ((x / size - 0.5) * math.cos(a) + (y / size - 0.5) * math.sin(a))
    body = (
        surface(rng, size, jitter(rng, colour), 0.1)
        * (light * _sdf_shade(sdf, bevel * size))[..., None]
    )
    return np.clip(body, 0, 1).astype(np.float32)


def plate_style(rng):
    return {
        **_object_style(rng),
        "sides": int(rng.choice([3, 4, 5, 8])),
        "corner": rng.uniform(0.05, 0.25),
    }


def _polygon_sdf(u, v, sides, radius):
    """Signed distance (approx.) to a regular polygon of circumradius ``radius``."""
    theta = np.arctan2(v, u)
    sector = 2 * np.pi / sides
    local = (theta % sector) - sector / 2
    r = np.hypot(u, v)
    return r * np.cos(local) - radius * math.cos(sector / 2)


def plate(st, rng, size):
    cx, cy = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    radius = st["scale"] * size * rng.uniform(0.95, 1.08)
    corner = st["corner"] * radius

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        return _polygon_sdf(u, v, st["sides"], radius - corner) - corner

    x, y = pixel_grid(size)
    body = _lit(rng, sdf(x, y), st["colour"], size)
    background = surface(rng, size, jitter(rng, st["background"]), 0.15)
    return _object_scene(rng, size, sdf, body, background)


def cross_style(rng):
    return {**_object_style(rng), "arm": rng.uniform(0.25, 0.45)}


def cross(st, rng, size):
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    half = st["scale"] * size * rng.uniform(0.95, 1.08)
    arm = st["arm"] * half

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        return np.minimum(
            rounded_box(u, v, half, arm, 0.3 * arm), rounded_box(u, v, arm, half, 0.3 * arm)
        )

    x, y = pixel_grid(size)
    body = _lit(rng, sdf(x, y), st["colour"], size)
    background = surface(rng, size, jitter(rng, st["background"]), 0.15)
    return _object_scene(rng, size, sdf, body, background)


def pebble_style(rng):
    return {**_object_style(rng), "rough": rng.uniform(0.05, 0.2), "grain": rng.uniform(0.1, 0.3)}


def pebble(st, rng, size):
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    radius = st["scale"] * size * rng.uniform(0.9, 1.05)
    coeffs = [(k, rng.uniform(0, st["rough"]), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    aspect = rng.uniform(0.7, 1.0)
    angle = rng.uniform(0, np.pi)

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        v = v / aspect
        theta = np.arctan2(v, u)
        wobble = 1.0 + sum(a * np.sin(k * theta + p) for k, a, p in coeffs)
        return np.hypot(u, v) - radius * wobble

    x, y = pixel_grid(size)
    d = sdf(x, y)
    nz = np.sqrt(np.clip(-d / radius, 0, 1))
    body = surface(rng, size, jitter(rng, st["colour"]), st["grain"])
    body = body * (0.55 + 0.45 * nz + 0.1 * ((cx - x) + (cy - y)) / radius)[..., None]
    background = surface(rng, size, jitter(rng, st["background"]), 0.15)
    return _object_scene(rng, size, sdf, np.clip(body, 0, 1).astype(np.float32), background)


def star_style(rng):
    return {
        **_object_style(rng),
        "points": int(rng.integers(4, 8)),
        "inner": rng.uniform(0.4, 0.65),
    }


def star(st, rng, size):
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    radius = st["scale"] * size * rng.uniform(1.0, 1.12)
    k = st["points"]

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        theta = np.arctan2(v, u)
        r = np.hypot(u, v)
        t = np.abs(((theta * k / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the points, 0 between
        edge = radius * (st["inner"] + (1 - st["inner"]) * t**1.5)
        return (r - edge) * 0.8

    x, y = pixel_grid(size)
    body = _lit(rng, sdf(x, y), st["colour"], size, 0.02)
    background = surface(rng, size, jitter(rng, st["background"]), 0.15)
    return _object_scene(rng, size, sdf, body, background)


def tag_style(rng):
    return {
        **_object_style(rng),
        "aspect": rng.uniform(0.45, 0.75),
        "ink": rgb(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.05, 0.3)),
        "bars": int(rng.integers(10, 20)),
    }


def tag(st, rng, size):
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    half = st["scale"] * size * 1.2
    half_v = half * st["aspect"]

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        return rounded_box(u, v, half, half_v, 0.12 * half_v)

    x, y = pixel_grid(size)
    u, v = rotate(x, y, cx, cy, angle)
    body = _lit(rng, sdf(x, y), st["colour"], size, 0.02)
    edges = np.cumsum(rng.uniform(0.5, 2.0, st["bars"] * 2))
    edges = -0.7 * half + edges / edges[-1] * 1.4 * half
    bars = np.zeros((size, size), np.float32)
    for left, right in zip(edges[0::2], edges[1::2], strict=True):
        bars = np.maximum(
            bars,
            coverage(
                np.maximum(
                    np.abs(u - (left + right) / 2) - (right - left) / 2,
                    np.abs(v + 0.1 * half_v) - 0.5 * half_v,
                )
            ),
        )
    body = mix(body, jitter(rng, st["ink"]), 0.9 * bars)
    background = surface(rng, size, jitter(rng, st["background"]), 0.15)
    return _object_scene(rng, size, sdf, body, background, 0.3)


Family = tuple[Callable[[np.random.Generator], dict], Callable[..., Scene]]

AUX_TEXTURES: dict[str, Family] = {
    "plaid": (plaid_style, plaid),
    "cloud": (cloud_style, cloud),
    "brushed": (brushed_style, brushed),
    "waves": (waves_style, waves),
    "sand": (sand_style, sand),
    "chevron": (chevron_style, chevron),
    "checker": (checker_style, checker),
    "knurl": (knurl_style, knurl),
}
AUX_OBJECTS: dict[str, Family] = {
    "plate": (plate_style, plate),
    "cross": (cross_style, cross),
    "pebble": (pebble_style, pebble),
    "star": (star_style, star),
    "tag": (tag_style, tag),
}
AUX_FAMILIES: dict[str, Family] = {**AUX_TEXTURES, **AUX_OBJECTS}
