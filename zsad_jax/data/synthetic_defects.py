"""Defects for the synthetic benchmark with their exact pixel masks, and the final lighting/noise.

Every defect is a shape with antialiased coverage ``c`` that blends the clean image towards a defect
appearance; its mask is the set of pixels whose centre lies inside the shape (``c >= 0.5``) and, for
object categories, on the object. Pixels outside the mask change by less than half the blend (the
antialiased rim) or not at all. Defect sizes scale with the image side, so a benchmark rendered at
256 pixels is the 128-pixel one in finer detail.

Types (shared by all categories, so held-out categories test the same defects on new appearances):
``scratch`` thin bright or dark curve; ``hole`` dark irregular blob with a raised, lighter rim;
``stain`` soft-edged coloured blot; ``missing_part`` object region (or texture patch) cut out to
what lies beneath; ``color_shift`` local hue rotation and tint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from zsad_jax.data.synthetic_scenes import Scene, coverage, mix, pixel_grid, value_noise

DEFECT_TYPES = ("scratch", "hole", "stain", "missing_part", "color_shift")

# A rendered defect must cover at least this share of the image and change the masked pixels by at
# least this much (mean over the mask of the largest channel change); otherwise it is drawn again.
MIN_AREA_FRACTION = 0.0012
MIN_MEAN_CHANGE = 0.08
MAX_ATTEMPTS = 40


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _place(rng: np.random.Generator, scene: Scene, size: int) -> tuple[float, float]:
    """A defect centre: on the object (coverage 1) for objects, off the border for textures."""
    if scene.is_object:
        ys, xs = np.nonzero(scene.object_cov >= 0.999)
        k = rng.integers(len(xs))
        return float(xs[k]) + 0.5, float(ys[k]) + 0.5
    return tuple(rng.uniform(0.12, 0.88, 2) * size)


def _blob_sdf(rng, size, cx, cy, radius, roughness=0.12, aspect=(0.6, 1.0)) -> np.ndarray:
    """Signed distance (approximate, pixels) to an irregular ellipse-like blob."""
    x, y = pixel_grid(size)
    angle = rng.uniform(0, np.pi)
    c, s = math.cos(angle), math.sin(angle)
    u = c * (x - cx) + s * (y - cy)
    v = (-s * (x - cx) + c * (y - cy)) / rng.uniform(*aspect)
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5, 7):
        wobble = wobble + rng.uniform(0, roughness) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.sqrt(u * u + v * v) - radius * wobble


def _on_object(scene: Scene, weight: np.ndarray) -> np.ndarray:
    return weight * scene.object_cov if scene.is_object else weight


def _scratch(rng, scene: Scene, size: int):
    x, y = pixel_grid(size)
    cx, cy = _place(rng, scene, size)
    length = rng.uniform(0.22, 0.45) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.25, 0.25) * length
    t = np.linspace(-0.5, 0.5, 40)[:, None]
    # A quadratic bend plus a small wiggle, sampled as a polyline.
    wiggle = rng.uniform(0, 0.02) * length * np.sin(t * rng.uniform(8, 20) + rng.uniform(0, 6))
    pts = np.array([cx, cy]) + t * length * direction + ((1 - 4 * t**2) * bend + wiggle) * normal
    half_width = rng.uniform(0.55, 1.1) * size / 128
    # Distances only matter near the curve: work on its bounding box.
    lo = np.clip(np.floor(pts.min(axis=0) - half_width - 2), 0, size).astype(int)
    hi = np.clip(np.ceil(pts.max(axis=0) + half_width + 2), 0, size).astype(int)
    bx, by = x[lo[1] : hi[1], lo[0] : hi[0]], y[lo[1] : hi[1], lo[0] : hi[0]]
    near = np.full(bx.shape, np.inf, np.float32)
    for (ax, ay), (ex, ey) in zip(pts[:-1], pts[1:] - pts[:-1], strict=True):
        h = np.clip(((bx - ax) * ex + (by - ay) * ey) / (ex * ex + ey * ey + 1e-9), 0, 1)
        near = np.minimum(near, np.hypot(bx - ax - h * ex, by - ay - h * ey))
    dist = np.full((size, size), np.inf, np.float32)
    dist[lo[1] : hi[1], lo[0] : hi[0]] = near
    cov = coverage(dist - half_width)
    local = float(np.mean(_luma(scene.image)[cov > 0])) if np.any(cov > 0) else 0.5
    dark = local > 0.55 if rng.random() < 0.8 else local <= 0.55
    colour = np.full(3, rng.uniform(0.02, 0.12) if dark else rng.uniform(0.88, 1.0), np.float32)
    alpha = _on_object(scene, cov * rng.uniform(0.85, 1.0))
    return mix(scene.image, colour, alpha), cov


def _hole(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.03, 0.065) * size
    sdf = _blob_sdf(rng, size, cx, cy, radius)
    rim = rng.uniform(0.9, 1.8) * size / 128
    inside = coverage(sdf)
    outer = coverage(sdf - rim)
    x, y = pixel_grid(size)
    # The far wall of a pit catches light: interior brightens slightly along a random direction.
    a = rng.uniform(0, 2 * np.pi)
    depth = np.clip(((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / radius, -1, 1)
    pit = scene.image * rng.uniform(0.05, 0.18) * (1.0 + 0.6 * depth)[..., None]
    lip = np.minimum(scene.image * 1.3 + 0.15, 1.0)
    image = mix(scene.image, lip, _on_object(scene, outer - inside))
    image = image + (pit - image) * _on_object(scene, inside)[..., None]
    return image, outer


_STAIN_COLOURS = (
    (0.45, 0.3, 0.12), (0.8, 0.7, 0.2), (0.15, 0.12, 0.1), (0.6, 0.25, 0.1), (0.15, 0.2, 0.6),
    (0.35, 0.5, 0.2),
)  # fmt: skip


def _stain(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.05, 0.11) * size
    softness = rng.uniform(1.5, 4.0) * size / 128
    cov = coverage(_blob_sdf(rng, size, cx, cy, radius, roughness=0.18), softness)
    colour = np.array(_STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))], np.float32)
    colour = np.clip(colour + rng.uniform(-0.08, 0.08, 3), 0, 1).astype(np.float32)
    mottle = 0.75 + 0.5 * value_noise(rng, size, 10)
    opacity = rng.uniform(0.5, 0.8) * mottle
    # A stain dyes the surface: keep some of its shading so it reads as on it, not pasted over it.
    dyed = colour[None, None, :] * (0.55 + 0.7 * _luma(scene.image))[..., None]
    return mix(scene.image, dyed, _on_object(scene, cov * opacity)), cov


def _missing_part(rng, scene: Scene, size: int):
    if scene.is_object:
        ys, xs = np.nonzero((scene.object_cov > 0.2) & (scene.object_cov < 0.8))
        k = rng.integers(len(xs))
        cx, cy = float(xs[k]) + 0.5, float(ys[k]) + 0.5
        radius = rng.uniform(0.07, 0.14) * size
    else:
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        radius = rng.uniform(0.06, 0.11) * size
    cut = coverage(_blob_sdf(rng, size, cx, cy, radius, roughness=0.25, aspect=(0.5, 1.0)))
    # Scene.image = mix(under, object, object_cov), so removing the object there reveals ``under``.
    image = mix(scene.image, scene.under, _on_object(scene, cut))
    return image, cut


def _color_shift(rng, scene: Scene, size: int):
    cx, cy = _place(rng, scene, size)
    radius = rng.uniform(0.06, 0.13) * size
    softness = rng.uniform(1.0, 3.0) * size / 128
    cov = coverage(_blob_sdf(rng, size, cx, cy, radius), softness)
    img = scene.image
    luma = _luma(img)
    # YIQ chroma plane: rotate the hue, boost it, and add a tint so grey surfaces change colour too.
    i = img[..., 0] * 0.596 - img[..., 1] * 0.274 - img[..., 2] * 0.322
    q = img[..., 0] * 0.211 - img[..., 1] * 0.523 + img[..., 2] * 0.312
    turn = rng.uniform(1.2, 3.1) * rng.choice([-1, 1])
    gain = rng.uniform(1.1, 1.6)
    tint_angle, tint = rng.uniform(0, 2 * np.pi), rng.uniform(0.07, 0.13)
    i2 = gain * (math.cos(turn) * i - math.sin(turn) * q) + tint * math.cos(tint_angle)
    q2 = gain * (math.sin(turn) * i + math.cos(turn) * q) + tint * math.sin(tint_angle)
    luma2 = luma * rng.uniform(0.85, 1.15)
    shifted = np.stack(
        [
            luma2 + 0.956 * i2 + 0.621 * q2,
            luma2 - 0.272 * i2 - 0.647 * q2,
            luma2 - 1.106 * i2 + 1.703 * q2,
        ],
        axis=-1,
    )
    return mix(img, np.clip(shifted, 0, 1), _on_object(scene, cov)), cov


_DRAW = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "missing_part": _missing_part,
    "color_shift": _color_shift,
}


def draw_until_visible(
    rng, scene: Scene, draw: Callable, kind: str, *, min_change: float = MIN_MEAN_CHANGE, **kwargs
):
    """The benchmark's acceptance loop around one ``draw(rng, scene, size, **kwargs) -> (image,
    shape coverage)``: returns (image (S, S, 3) float32 in [0, 1], mask (S, S) bool).
    ``min_change``: the least mean largest-channel change over the mask."""
    size = scene.image.shape[0]
    min_area = max(8, int(MIN_AREA_FRACTION * size * size))
    for _ in range(MAX_ATTEMPTS):
        image, shape = draw(rng, scene, size, **kwargs)
        mask = shape >= 0.5
        if scene.is_object:
            mask &= scene.object_cov >= 0.5
        if mask.sum() < min_area:
            continue
        change = np.abs(image - scene.image).max(axis=-1)
        if float(change[mask].mean()) >= min_change:
            return np.clip(image, 0, 1).astype(np.float32), mask
    raise RuntimeError(f"could not draw a visible {kind!r} defect in {MAX_ATTEMPTS} attempts")


def add_defect(rng: np.random.Generator, scene: Scene, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Draws a visible defect of ``kind`` on ``scene``.

    Returns:
      image (S, S, 3) float32 in [0, 1] and its mask (S, S) bool: pixel centres inside the defect
      (and on the object, for objects); never empty.
    """
    return draw_until_visible(rng, scene, _DRAW[kind], kind)


def finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Uneven lighting and sensor noise over the whole picture, then (S, S, 3) uint8."""
    size = image.shape[0]
    x, y = pixel_grid(size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x / size - 0.5) * math.cos(a) + (y / size - 0.5) * math.sin(a)) * rng.uniform(0, 0.25)
    lit = image * (1.0 + ramp)[..., None]
    sigma = np.float32(rng.uniform(0.004, 0.015))
    noisy = lit + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(noisy * np.float32(255.0)), 0, 255).astype(np.uint8)
