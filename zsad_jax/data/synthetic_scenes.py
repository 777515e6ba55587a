"""Procedural normal images for the synthetic benchmark: five textures and five objects.

Every renderer takes a ``np.random.Generator`` and the side ``S`` and returns a ``Scene``; all
geometry is in pixel units through signed distance functions, so shapes are antialiased and images
at 128 and 256 pixels look alike. Natural variation comes from colour jitter, position, rotation,
scale, pattern frequency and low-frequency shading; lighting and sensor noise are added after the
defects (in ``synthetic_defects.finish``) so defects carry the same noise as their surroundings.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class Scene:
    """A clean rendering before defects.

    Attributes:
      image: (S, S, 3) float32 in [0, 1].
      object_cov: (S, S) float32 coverage of the inspected object (all ones for textures); defects
        other than missing parts stay on it.
      under: (S, S, 3) float32, what shows where part of the object/pattern is missing (the
        background behind an object, the bare backing of a texture).
      is_object: object category (defects placed on the object) or texture (anywhere).
    """

    image: np.ndarray
    object_cov: np.ndarray
    under: np.ndarray
    is_object: bool


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) x and y pixel-centre coordinates (x right, y down), float32."""
    c = np.arange(size, dtype=np.float32) + np.float32(0.5)
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def coverage(sdf: np.ndarray, softness: float = 1.0) -> np.ndarray:
    """Signed distance in pixels (negative inside) -> antialiased coverage in [0, 1]."""
    return np.clip(0.5 - sdf / np.float32(softness), 0.0, 1.0).astype(np.float32)


def rotate(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float):
    """Coordinates relative to (cx, cy) in a frame rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    return c * dx + s * dy, -s * dx + c * dy


def value_noise(rng: np.random.Generator, size: int, cells_x: int, cells_y: int | None = None):
    """(S, S) smooth noise in [0, 1]: random lattice values, smoothstep-interpolated."""
    cells_y = cells_x if cells_y is None else cells_y
    lattice = rng.random((cells_y + 1, cells_x + 1)).astype(np.float32)

    def axis(cells):
        t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
        i = np.minimum(np.floor(t).astype(np.int64), cells - 1)
        f = t - i
        return i, f * f * (3.0 - 2.0 * f)

    ix, fx = axis(cells_x)
    iy, fy = axis(cells_y)
    # Separable: interpolate every lattice row along x, then those rows along y.
    rows = lattice[:, ix] * (1 - fx) + lattice[:, ix + 1] * fx
    return (rows[iy] * (1 - fy)[:, None] + rows[iy + 1] * fy[:, None]).astype(np.float32)


def fractal_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    """(S, S) multi-octave value noise, rescaled to [0, 1]."""
    total = np.zeros((size, size), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * value_noise(rng, size, min(cells * 2**o, size))
        norm += amp
        amp *= 0.5
    return total / np.float32(norm)


def hsv(rng: np.random.Generator, h, s, v, jitter=(0.03, 0.08, 0.08)) -> np.ndarray:
    """An RGB colour near (h, s, v) with uniform jitter; h wraps, s and v are clipped."""
    hh = (h + rng.uniform(-jitter[0], jitter[0])) % 1.0
    ss = float(np.clip(s + rng.uniform(-jitter[1], jitter[1]), 0, 1))
    vv = float(np.clip(v + rng.uniform(-jitter[2], jitter[2]), 0, 1))
    return np.array(colorsys.hsv_to_rgb(hh, ss, vv), np.float32)


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of (…, 3) colours/images ``a`` -> ``b`` by (S, S) weights ``t``."""
    shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(t) + (1,))
    out = np.empty(shape, np.float32)
    np.subtract(b, a, out=out)
    out *= t[..., None]
    out += a
    return out


def surface(rng: np.random.Generator, size: int, color: np.ndarray, amount: float = 0.08):
    """A flat material with low-frequency mottling: (S, S, 3)."""
    mottle = 1.0 + amount * (fractal_noise(rng, size, 3, 3) - 0.5) * 2.0
    return np.clip(color[None, None, :] * mottle[..., None], 0, 1).astype(np.float32)


def rounded_box(u, v, half_u: float, half_v: float, corner: float) -> np.ndarray:
    """Signed distance to an axis-aligned box with rounded corners, in the (u, v) frame."""
    qu, qv = np.abs(u) - half_u + corner, np.abs(v) - half_v + corner
    outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
    return outside + np.minimum(np.maximum(qu, qv), 0) - corner


def _blank(size: int) -> np.ndarray:
    return np.ones((size, size), np.float32)


# --- textures -------------------------------------------------------------------------------------


def stripes(rng: np.random.Generator, size: int) -> Scene:
    """Woven stripes at a random angle, slightly wavy (a striped textile)."""
    x, y = pixel_grid(size)
    angle = rng.uniform(0.2, 1.3) * rng.choice([-1, 1])
    along, across = rotate(x, y, size / 2, size / 2, angle)
    period = rng.uniform(0.07, 0.11) * size
    across = across + rng.uniform(0.5, 2.0) * np.sin(
        along * (2 * np.pi / rng.uniform(0.4, 0.9) / size)
    )
    phase = rng.uniform(0, 2 * np.pi)
    band = 0.5 + 0.5 * np.tanh(3.0 * np.sin(across * (2 * np.pi / period) + phase))
    c1 = hsv(rng, 0.58, 0.55, 0.75)
    c2 = hsv(rng, 0.58 + rng.choice([-0.45, 0.0, 0.08]), 0.35, 0.35)
    image = mix(np.broadcast_to(c2, (size, size, 3)), c1, band.astype(np.float32))
    threads = (
        1.0
        + 0.05 * np.sin(along * (2 * np.pi / (0.021 * size)))
        + 0.06 * (value_noise(rng, size, 6) - 0.5)
    )
    image = image * threads[..., None]
    under = surface(rng, size, c2 * 0.35, 0.2)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def weave(rng: np.random.Generator, size: int) -> Scene:
    """A plain weave: warp and weft threads alternating over/under (a mesh/canvas)."""
    x, y = pixel_grid(size)
    angle = rng.normal(0.0, 0.12)
    u, v = rotate(x, y, size / 2, size / 2, angle)
    pitch = rng.uniform(0.075, 0.1) * size
    iu, iv = np.floor(u / pitch), np.floor(v / pitch)
    fu, fv = u / pitch - iu, v / pitch - iv
    warp_top = ((iu + iv) % 2) == 0
    gap = 0.14

    def thread_profile(f):
        inside = np.clip((f - gap / 2) / (1 - gap), 0, 1)
        return np.sqrt(np.clip(np.sin(np.pi * inside), 0, 1))

    warp_col = hsv(rng, 0.11, 0.35, 0.78)
    weft_col = warp_col * rng.uniform(0.7, 0.9) if rng.random() < 0.5 else hsv(rng, 0.08, 0.5, 0.6)
    # The thread on top is shaded across its width and dims towards where it dives under.
    warp = thread_profile(fu) * (0.8 + 0.2 * np.cos(np.pi * (fv - 0.5)))
    weft = thread_profile(fv) * (0.8 + 0.2 * np.cos(np.pi * (fu - 0.5)))
    shade = np.where(warp_top, warp, weft).astype(np.float32)
    colour = np.where(warp_top[..., None], warp_col, weft_col)
    backing = warp_col * 0.18
    image = backing + (colour - backing) * (0.25 + 0.75 * shade)[..., None]
    image = image * (1.0 + 0.08 * (fractal_noise(rng, size, 4) - 0.5))[..., None]
    under = surface(rng, size, backing, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def granite(rng: np.random.Generator, size: int) -> Scene:
    """Polished stone: mottled base with small dark, light and pink mineral grains."""
    base = hsv(rng, rng.choice([0.0, 0.05, 0.6]), 0.1, 0.6, jitter=(0.02, 0.05, 0.08))
    image = surface(rng, size, base, 0.18)
    # Grains: thresholded fine noise; a soft threshold keeps their edges from looking blocky.
    cells = min(size, int(rng.uniform(36, 52)))  # ~3-pixel grains at S = 128
    for colour, share in (
        (base * 0.35, rng.uniform(0.2, 0.3)),
        (np.minimum(base * 1.3 + 0.08, 1.0), rng.uniform(0.15, 0.25)),
        (hsv(rng, 0.02, 0.3, 0.7), rng.uniform(0.05, 0.15)),
    ):
        grains = value_noise(rng, size, cells)
        level = np.quantile(grains, 1.0 - share)
        image = mix(image, colour, 0.85 * coverage((level - grains) * 25.0))
    under = surface(rng, size, base * 0.45, 0.35)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def wood(rng: np.random.Generator, size: int) -> Scene:
    """Planed wood: stretched growth rings, turbulence and fine grain."""
    x, y = pixel_grid(size)
    angle = rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.08)
    u, v = rotate(x, y, size / 2, size / 2, angle)
    cx, cy = rng.uniform(-1.5, -0.6) * size, rng.uniform(-0.3, 0.3) * size
    dist = np.sqrt(((u - cx) * 0.35) ** 2 + ((v - cy) * 1.0) ** 2)
    dist = dist + (fractal_noise(rng, size, 3) - 0.5) * rng.uniform(0.08, 0.15) * size
    period = rng.uniform(0.06, 0.1) * size
    ring = (dist / period) % 1.0
    late = ring**3
    light = hsv(rng, 0.08, 0.5, 0.8)
    dark = light * rng.uniform(0.45, 0.6)
    image = mix(np.broadcast_to(light, (size, size, 3)), dark, (0.85 * late).astype(np.float32))
    fine = min(size, 64)
    grain = (
        value_noise(rng, size, 3, fine)
        if abs(math.sin(angle)) < 0.5
        else value_noise(rng, size, fine, 3)
    )
    image = image * (0.92 + 0.12 * grain)[..., None]
    under = surface(rng, size, dark * 0.45, 0.3)
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), under, False)


def dots(rng: np.random.Generator, size: int) -> Scene:
    """Printed polka dots on a hexagonal lattice (a patterned print)."""
    x, y = pixel_grid(size)
    u, v = rotate(x, y, size / 2, size / 2, rng.uniform(0, np.pi / 3))
    pitch = rng.uniform(0.1, 0.14) * size
    radius = rng.uniform(0.2, 0.3) * pitch
    row = pitch * math.sqrt(3.0)

    def lattice_distance(ou, ov):
        du = (u - ou) % pitch - pitch / 2
        dv = (v - ov) % row - row / 2
        return np.sqrt(du * du + dv * dv), du, dv

    d1, du1, dv1 = lattice_distance(0.0, 0.0)
    d2, du2, dv2 = lattice_distance(pitch / 2, row / 2)
    nearest = d1 < d2
    dist = np.where(nearest, d1, d2)
    du, dv = np.where(nearest, du1, du2), np.where(nearest, dv1, dv2)
    paper = hsv(rng, 0.12, 0.12, 0.92)
    ink = hsv(rng, rng.choice([0.0, 0.62, 0.35, 0.8]), 0.7, 0.6, jitter=(0.04, 0.1, 0.1))
    # A slight highlight towards the upper left gives the dots some relief.
    relief = 1.0 + 0.25 * np.clip(-(du + dv) / (2 * radius), -1, 1)
    dot = ink[None, None, :] * relief[..., None]
    background = surface(rng, size, paper, 0.06)
    image = mix(background, dot, coverage(dist - radius))
    return Scene(np.clip(image, 0, 1).astype(np.float32), _blank(size), background, False)


# --- objects --------------------------------------------------------------------------------------


def _centre(rng: np.random.Generator, size: int, jitter: float = 0.06) -> tuple[float, float]:
    return tuple(size / 2 + rng.uniform(-jitter, jitter, 2) * size)


def _shadow(background: np.ndarray, obj_sdf: Callable, size: int, strength: float) -> np.ndarray:
    """Darkens the background under an object's offset, blurred silhouette."""
    x, y = pixel_grid(size)
    shade = coverage(obj_sdf(x - 0.03 * size, y - 0.04 * size), softness=0.04 * size)
    return background * (1.0 - strength * shade)[..., None]


def disc(rng: np.random.Generator, size: int) -> Scene:
    """A machined metal disc with a hub and an engraved mark at a random angle."""
    x, y = pixel_grid(size)
    cx, cy = _centre(rng, size)
    radius = rng.uniform(0.3, 0.37) * size
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy)
    nz = np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0, 1)) * 2.0
    light = np.array([-0.45, -0.55, 0.7]) + rng.normal(0, 0.08, 3)
    light /= np.linalg.norm(light)
    lambert = (light[0] * dx / radius + light[1] * dy / radius + light[2] * nz) / np.sqrt(
        (dx / radius) ** 2 + (dy / radius) ** 2 + nz**2 + 1e-6
    )
    metal = hsv(rng, 0.6, 0.12, 0.78)
    shade = 0.35 + 0.65 * np.clip(lambert, 0, 1) + 0.035 * np.sin(r * (2 * np.pi / (0.018 * size)))
    body = metal[None, None, :] * shade[..., None]
    hub = radius * rng.uniform(0.2, 0.28)
    body = mix(body, body * 0.7, coverage(r - hub))
    body = mix(body, np.minimum(body * 1.35, 1), coverage(np.abs(r - hub) - 0.8))
    mu, mv = rotate(x, y, cx, cy, rng.uniform(0, 2 * np.pi))
    mark = np.maximum(np.abs(mu - 0.62 * radius) - 0.13 * radius, np.abs(mv) - 0.04 * radius)
    body = mix(body, body * 0.45, coverage(mark))
    background = surface(rng, size, hsv(rng, 0.0, 0.0, 0.12, jitter=(0, 0.05, 0.04)), 0.3)
    background = _shadow(
        background, lambda a, b: np.sqrt((a - cx) ** 2 + (b - cy) ** 2) - radius, size, 0.5
    )
    cov = coverage(r - radius)
    return Scene(
        np.clip(mix(background, body, cov), 0, 1).astype(np.float32), cov, background, True
    )


def chip(rng: np.random.Generator, size: int) -> Scene:
    """An integrated circuit on a green board: dark body, metal pins, pin-1 dot and marking."""
    x, y = pixel_grid(size)
    cx, cy = _centre(rng, size, 0.05)
    angle = rng.integers(0, 4) * np.pi / 2 + rng.normal(0, 0.1)
    u, v = rotate(x, y, cx, cy, angle)
    half = rng.uniform(0.2, 0.24) * size
    body_sdf = rounded_box(u, v, half, half, 0.02 * size)
    n_pins = int(rng.integers(5, 8))
    pin_pitch = 2 * half / n_pins
    pin_len, pin_half_w = 0.075 * size, 0.28 * pin_pitch
    pos = (u + half) % pin_pitch - pin_pitch / 2
    pin_sdf = np.maximum(
        np.abs(pos) - pin_half_w, np.abs(np.abs(v) - half - pin_len / 2) - pin_len / 2
    )
    pin_sdf = np.maximum(pin_sdf, np.abs(u) - half)
    board = hsv(rng, 0.36, 0.65, 0.38)
    background = surface(rng, size, board, 0.12)
    trace = (
        np.abs((x * 0.7 + y * 0.3 + rng.uniform(0, size)) % (0.18 * size) - 0.09 * size)
        - 0.012 * size
    )
    background = mix(background, board * 1.5, 0.5 * coverage(trace))
    background = _shadow(
        background, lambda a, b: np.maximum(np.abs(a - cx), np.abs(b - cy)) - half, size, 0.4
    )
    pins_rgb = hsv(rng, 0.1, 0.1, 0.8) * (0.8 + 0.2 * np.cos(np.pi * pos / pin_pitch))[..., None]
    image = mix(background, pins_rgb, coverage(pin_sdf))
    plastic = hsv(rng, 0.62, 0.15, 0.14, jitter=(0.02, 0.05, 0.03))
    body = plastic[None, None, :] * (1.0 + 0.25 * np.clip(-(u + v) / (2 * half), -1, 1))[..., None]
    dot = np.sqrt((u + 0.65 * half) ** 2 + (v + 0.65 * half) ** 2) - 0.1 * half
    body = mix(body, body * 0.5, coverage(dot))
    # Two lines of "characters": small light rectangles of random widths.
    for line, yv in enumerate((-0.1, 0.22)):
        widths = rng.uniform(0.06, 0.12, 6) * half
        start = -0.55 * half
        for w in widths:
            char = np.maximum(
                np.abs(u - (start + w / 2)) - w / 2, np.abs(v - yv * half) - 0.07 * half
            )
            body = mix(body, np.full(3, 0.62, np.float32), 0.8 * coverage(char))
            start += w + 0.05 * half
            if start > 0.6 * half - line * 0.2 * half:
                break
    body_cov = coverage(body_sdf)
    image = mix(image, body, body_cov)
    cov = np.maximum(body_cov, coverage(pin_sdf))
    return Scene(np.clip(image, 0, 1).astype(np.float32), cov, background, True)


def screw(rng: np.random.Generator, size: int) -> Scene:
    """A threaded steel screw at any angle on a light table, with a slotted head and a shadow."""
    x, y = pixel_grid(size)
    cx, cy = _centre(rng, size, 0.07)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.52, 0.64) * size
    shaft_half = rng.uniform(0.045, 0.06) * size
    head_r = shaft_half * rng.uniform(1.8, 2.1)

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        shaft = np.maximum(
            np.abs(u) - length / 2,
            np.abs(v) - shaft_half * np.clip((length / 2 - u) / (0.12 * length), 0.25, 1.0),
        )
        head = np.sqrt((u + length / 2) ** 2 + v**2) - head_r
        return np.minimum(shaft, head)

    u, v = rotate(x, y, cx, cy, angle)
    steel = hsv(rng, 0.58, 0.08, 0.7)
    across = np.clip(v / shaft_half, -1, 1)
    cylinder = 0.55 + 0.45 * np.sqrt(np.clip(1 - across**2, 0, 1)) - 0.15 * across
    pitch = rng.uniform(0.035, 0.045) * size
    thread = 0.8 + 0.2 * np.cos(2 * np.pi * (u + 0.35 * v) / pitch)
    shaft_rgb = steel[None, None, :] * (cylinder * thread)[..., None]
    head_d = np.sqrt((u + length / 2) ** 2 + v**2)
    head_rgb = (
        steel[None, None, :] * (0.6 + 0.4 * np.clip(1 - head_d / head_r, 0, 1) ** 0.5)[..., None]
    )
    slot = np.maximum(np.abs(v) - 0.13 * head_r, np.abs(u + length / 2) - 0.75 * head_r)
    head_rgb = mix(head_rgb, head_rgb * 0.3, coverage(slot))
    body = np.where((head_d < head_r)[..., None], head_rgb, shaft_rgb)
    table = surface(rng, size, hsv(rng, 0.1, 0.04, 0.86, jitter=(0.05, 0.03, 0.05)), 0.06)
    background = _shadow(table, sdf, size, 0.3)
    cov = coverage(sdf(x, y))
    return Scene(
        np.clip(mix(background, body, cov), 0, 1).astype(np.float32), cov, background, True
    )


def washer(rng: np.random.Generator, size: int) -> Scene:
    """A brass or zinc washer (flat ring) with brushed, direction-dependent highlights."""
    x, y = pixel_grid(size)
    cx, cy = _centre(rng, size)
    outer = rng.uniform(0.3, 0.37) * size
    inner = outer * rng.uniform(0.38, 0.5)
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    metal = hsv(rng, 0.12, 0.55, 0.8) if rng.random() < 0.6 else hsv(rng, 0.55, 0.06, 0.78)
    sheen = 0.7 + 0.3 * np.cos(2 * (theta - rng.uniform(0, np.pi)))
    bevel = (
        1.0
        + 0.25 * coverage(np.abs(r - outer + 1.5) - 1.2)
        - 0.25 * coverage(np.abs(r - inner - 1.5) - 1.2)
    )
    ring_rgb = metal[None, None, :] * (sheen * bevel)[..., None]
    background = surface(rng, size, hsv(rng, 0.6, 0.2, 0.2, jitter=(0.04, 0.06, 0.05)), 0.2)
    ring_sdf = np.maximum(r - outer, inner - r)
    background = _shadow(
        background,
        lambda a, b: np.maximum(np.hypot(a - cx, b - cy) - outer, inner - np.hypot(a - cx, b - cy)),
        size,
        0.45,
    )
    cov = coverage(ring_sdf)
    return Scene(
        np.clip(mix(background, ring_rgb, cov), 0, 1).astype(np.float32), cov, background, True
    )


_PILL_COLOURS = (
    (0.0, 0.75, 0.8),
    (0.6, 0.7, 0.75),
    (0.15, 0.75, 0.9),
    (0.33, 0.6, 0.6),
    (0.08, 0.8, 0.9),
)


def pill(rng: np.random.Generator, size: int) -> Scene:
    """A two-tone capsule at any angle on paper, with a seam and a specular stripe."""
    x, y = pixel_grid(size)
    cx, cy = _centre(rng, size, 0.07)
    angle = rng.uniform(0, 2 * np.pi)
    half_len = rng.uniform(0.17, 0.21) * size
    radius = rng.uniform(0.12, 0.15) * size

    def sdf(px, py):
        u, v = rotate(px, py, cx, cy, angle)
        return np.sqrt(np.maximum(np.abs(u) - half_len, 0) ** 2 + v**2) - radius

    u, v = rotate(x, y, cx, cy, angle)
    first = hsv(rng, *_PILL_COLOURS[rng.integers(len(_PILL_COLOURS))])
    second = hsv(rng, 0.1, 0.05, 0.95) if rng.random() < 0.6 else first * 0.8
    colour = np.where((u < 0)[..., None], first, second)
    across = np.clip(v / radius, -1, 1)
    shade = 0.6 + 0.4 * np.sqrt(np.clip(1 - across**2, 0, 1))
    shade = shade + 0.35 * coverage((np.abs(across + 0.45) - 0.08) * radius, softness=2.0)
    body = colour * shade[..., None]
    body = mix(body, body * 0.7, coverage(np.abs(u) - 0.6))
    paper = surface(rng, size, hsv(rng, 0.12, 0.08, 0.9), 0.05)
    background = _shadow(paper, sdf, size, 0.3)
    cov = coverage(sdf(x, y))
    return Scene(
        np.clip(mix(background, body, cov), 0, 1).astype(np.float32), cov, background, True
    )


RENDERERS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "stripes": stripes,
    "weave": weave,
    "granite": granite,
    "wood": wood,
    "dots": dots,
    "disc": disc,
    "chip": chip,
    "screw": screw,
    "washer": washer,
    "pill": pill,
}
