"""Heatmap overlays of anomaly maps on their images (NumPy + Pillow; no plotting library).

Colours use the "jet" ramp (blue = normal, red = anomalous) that the peers' visualisations use. Maps
are drawn on a fixed value range (default [0, 1], the range every method's ``anomaly_map`` lies in),
not min-max normalised per image, so that a normal image looks normal: the colour of a pixel means
the same on every image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


def panel_tiles(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
    relative: bool = False,
) -> list[tuple[str, np.ndarray]]:
    """``(title, (H, W, 3) uint8)`` tiles: the image, its overlay on ``value_range``,
    (``relative``) the overlay min-max scaled on this map alone (where the model looks, even when
    every value is small), and (``mask`` given) the ground truth."""
    amap = np.asarray(anomaly_map, np.float32)
    low, high = float(value_range[0]), float(value_range[1])
    tiles = [
        ("image", np.asarray(image)),
        (
            f"overlay [{low:g},{high:g}]",
            heatmap_overlay(image, amap, alpha=alpha, value_range=value_range, mask=mask),
        ),
    ]
    if relative:
        tiles.append(
            ("overlay (min-max)", heatmap_overlay(image, amap, alpha=alpha,
                                                  value_range=_min_max(amap), mask=mask))
        )  # fmt: skip
    if mask is not None:
        gray = (np.asarray(mask, bool) * 255).astype(np.uint8)
        tiles.append(("mask", np.repeat(gray[..., None], 3, -1)))
    return tiles


def _min_max(amap: np.ndarray) -> tuple[float, float]:
    low, high = float(amap.min()), float(amap.max())
    return (low, high) if high > low else (low, low + 1.0)  # a flat map: one colour, no ramp


def panel(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
    relative: bool = False,
    score: float | None = None,
    label: int | None = None,
    threshold: float | None = None,
    annotate: bool = True,
) -> np.ndarray:
    """The tiles of ``panel_tiles`` side by side, for people to look at.

    With ``annotate`` (default) each tile gets its title above it, and below the tiles come a line
    with ``score`` and the decision of ``threshold`` (``score >= threshold`` is anomalous; "no
    threshold" when None or not finite) and the ground-truth ``label``, then a jet colour bar of
    ``value_range`` with tick labels. Text scales with the tile width (``font_size``) and never
    drops below a legible size. ``annotate=False`` gives the bare tiles, (H, k W, 3).

    Returns:
      (title band + H + footer, k W, 3) uint8 RGB; the heights are ``panel_layout``'s.
    """
    tiles = panel_tiles(image, anomaly_map, mask=mask, alpha=alpha, value_range=value_range,
                        relative=relative)  # fmt: skip
    body = np.concatenate([t for _, t in tiles], axis=1)
    if not annotate:
        return body
    parts = info_lines(
        score=score,
        label=label,
        threshold=threshold,
        relative_range=_min_max(np.asarray(anomaly_map)) if relative else None,
    )
    height, width = body.shape[:2]
    tile_width = width // len(tiles)
    layout = panel_layout(height, width, len(tiles), parts)
    font, pad = _font(layout["font"]), layout["pad"]
    canvas = Image.new("RGB", (width, layout["height"]), BACKGROUND)
    canvas.paste(Image.fromarray(body), (0, layout["tiles"][0]))
    draw = ImageDraw.Draw(canvas)
    for i, (title, _) in enumerate(tiles):
        _centred_text(draw, (i + 0.5) * tile_width, layout["title"][0] + pad, title, font)
    for j, text in enumerate(layout["lines"]):
        draw.text((pad, layout["info"][0] + j * layout["line"] + pad), text, fill=TEXT, font=font)
    _draw_colour_bar(canvas, draw, font, layout, value_range)
    return np.asarray(canvas)


BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MIN_FONT = 12  # below this the built-in font is hard to read on screen
TICKS = 5


def _text_metrics(tile_width: int) -> tuple[int, int]:
    """(font size, padding) for tiles ``tile_width`` wide."""
    size = font_size(tile_width)
    return size, max(2, size // 3)


def _centred_text(draw, x: float, top: int, text: str, font) -> None:
    # Centred by measuring, not by anchor: Pillow's bitmap fallback font has no anchors.
    draw.text((round(x - font.getlength(text) / 2), top), text, fill=TEXT, font=font)


def font_size(tile_width: int) -> int:
    """Text height in pixels for tiles ``tile_width`` wide: 1/22 of it, at least ``MIN_FONT``
    (12 px at 128 px tiles, 24 px at the methods' 518 px)."""
    return max(MIN_FONT, round(tile_width / 22))


def _font(size: int):
    # Pillow >= 10.1 with FreeType: a scalable built-in font; otherwise its fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def info_lines(
    *,
    score: float | None,
    label: int | None,
    threshold: float | None,
    relative_range: tuple[float, float] | None = None,
) -> list[str]:
    """The text under the tiles (ASCII: the built-in font has no >= or arrow glyphs)."""
    lines = []
    if score is not None:
        score = float(score)
        if threshold is None or not math.isfinite(float(threshold)):
            lines.append(f"score {score:.3f}  (no threshold)")
        else:
            t = float(threshold)
            decision = f">= t={t:.3f} -> anomalous" if score >= t else f"< t={t:.3f} -> normal"
            lines.append(f"score {score:.3f}  {decision}")
    if label is not None:
        lines.append(f"ground truth: {'anomalous' if label else 'normal'}")
    if relative_range is not None:
        low, high = relative_range
        lines.append(f"min-max tile: blue = {low:.3f}, red = {high:.3f}")
    return lines


def _wrap(parts: Sequence[str], font, width: int, sep: str = "   |   ") -> list[str]:
    """Joins ``parts`` on lines no wider than ``width`` (a part wider than that stays alone)."""
    lines: list[str] = []
    for part in parts:
        if lines and font.getlength(lines[-1] + sep + part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def panel_layout(height: int, width: int, num_tiles: int, parts: Sequence[str]) -> dict:
    """Where ``panel`` puts things for tiles (``height``, ``width`` all together) and the text
    ``parts`` (``info_lines``): ``(top, bottom)`` rows of ``title``, ``tiles``, ``info``, ``bar``,
    the colour bar's ``bar_x`` columns, the wrapped text ``lines``, ``font`` size, ``line``
    height, ``pad``, total ``height``."""
    font, pad = _text_metrics(width // max(num_tiles, 1))
    lines = _wrap(parts, _font(font), width - 2 * pad)
    line = font + 2 * pad
    title = (0, line)
    tiles = (title[1], title[1] + height)
    info = (tiles[1], tiles[1] + line * len(lines))
    bar = (info[1] + pad, info[1] + pad + font)
    # Room for half a tick label ("1" or "0.25") beyond both ends of the bar.
    margin = pad + round(_font(font).getlength("0.00") / 2)
    bar_x = (margin, max(margin + 2, width - margin))
    total = bar[1] + pad + line  # ticks and their labels
    return {"title": title, "tiles": tiles, "info": info, "bar": bar, "bar_x": bar_x,
        "lines": lines,
            "font": font, "line": line, "pad": pad, "height": total}  # fmt: skip


def _draw_colour_bar(canvas, draw, font, layout, value_range) -> None:
    """The jet ramp of ``value_range`` (what the fixed-range overlay's colours mean)."""
    (x0, x1), (y0, y1) = layout["bar_x"], layout["bar"]
    ramp = jet_colors(np.linspace(0.0, 1.0, x1 - x0, dtype=np.float32))
    canvas.paste(Image.fromarray(np.repeat(ramp[None], y1 - y0, 0)), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=TEXT)
    low, high = float(value_range[0]), float(value_range[1])
    tick = max(2, layout["pad"])
    for k in range(TICKS):
        x = x0 + round(k * (x1 - 1 - x0) / (TICKS - 1))
        draw.line((x, y1, x, y1 + tick), fill=TEXT)
        value = low + k * (high - low) / (TICKS - 1)
        _centred_text(draw, x, y1 + tick, f"{value:g}", font)


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
