"""Heatmap overlays of anomaly maps on their images (NumPy + Pillow; no plotting library).

Colours use the "jet" ramp (blue = normal, red = anomalous) that the peers' visualisations use. Maps
are drawn on a fixed value range (default [0, 1], the range every method's ``anomaly_map`` lies in),
not min-max normalised per image, so that a normal image looks normal: the colour of a pixel means
the same on every image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def jet_colors(values: np.ndarray) -> np.ndarray:
    """(...) values in [0, 1] -> (..., 3) uint8 RGB on the jet ramp (clipped outside [0, 1])."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    # Each channel is a tent centred at 3/4 (red), 1/2 (green) and 1/4 (blue), flattened at 1.
    centres = np.asarray([0.75, 0.5, 0.25], np.float32)
    rgb = np.clip(1.5 - np.abs(4.0 * v - 4.0 * centres), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float map -> (height, width) float32, bilinear (Pillow, half-pixel centres)."""
    amap = np.asarray(anomaly_map, np.float32)
    if amap.shape == (height, width):
        return amap
    resized = Image.fromarray(amap, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool, the pixels of ``mask`` with a 4-neighbour outside it."""
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    alpha: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Blends the jet-coloured map over the image.

    Args:
      image: (H, W, 3) uint8 RGB.
      anomaly_map: (h, w) scores; resized (bilinear) to (H, W) when the sizes differ.
      alpha: weight of the heatmap colour (0 = image only, 1 = heatmap only).
      value_range: (low, high) mapped to blue and red.
      mask: optional (H, W) ground truth, drawn as a white outline.

    Returns:
      (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"heatmap_overlay: image must be (H, W, 3) uint8, got {image.dtype} {image.shape}"
        )
    low, high = float(value_range[0]), float(value_range[1])
    if not high > low:
        raise ValueError(f"heatmap_overlay: value_range must have high > low, got {value_range}")
    height, width = image.shape[:2]
    amap = resize_map(anomaly_map, height, width)
    colors = jet_colors((amap - low) / (high - low)).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    out = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        out[mask_outline(mask)] = 255
    return out


def panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
    relative: bool = False,
) -> np.ndarray:
    """Tiles side by side: the image, its overlay on ``value_range``, (``relative``) the overlay
    min-max scaled on this map alone (where the model looks, even when every value is small), and
    (``mask`` given) the ground truth. Returns (H, k W, 3) uint8."""
    amap = np.asarray(anomaly_map, np.float32)
    tiles: list[np.ndarray] = [
        np.asarray(image),
        heatmap_overlay(image, amap, alpha=alpha, value_range=value_range, mask=mask),
    ]
    if relative:
        low, high = float(amap.min()), float(amap.max())
        span = (low, high) if high > low else (low, low + 1.0)
        tiles.append(heatmap_overlay(image, amap, alpha=alpha, value_range=span, mask=mask))
    if mask is not None:
        tiles.append(np.repeat((np.asarray(mask, bool) * 255).astype(np.uint8)[..., None], 3, -1))
    return np.concatenate(tiles, axis=1)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> str:
    """Writes (H, W, 3) uint8 as PNG, creating the folder; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path)
    return path


def safe_name(parts: Sequence[str]) -> str:
    """A file-name stem from path parts: separators and odd characters become ``_``."""
    text = "__".join(p for p in parts if p)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "image"
