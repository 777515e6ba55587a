"""zsad_jax.visualize.panel: the labelled evaluation picture (titles, score line, colour bar).

The annotated panel holds the bare tiles unchanged under a title band; the title band and the score
line hold text (dark pixels on the white background); the colour bar is the jet ramp of the value
range, its hue falling monotonically from blue to red; the text grows with the tile size and never
drops below ``MIN_FONT``.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from zsad_jax import visualize


def _inputs(size: int):
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.full((size, size, 3), 120, np.uint8)
    mask = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.05
    amap = (0.2 + 0.6 * mask).astype(np.float32)
    return image, amap, mask


def _has_text(region: np.ndarray) -> bool:
    return bool((region.min(axis=-1) < 128).any())  # dark strokes on the white background


@pytest.mark.parametrize("size", [16, 128, 518])
def test_annotated_panel_puts_titles_above_the_unchanged_tiles(size):
    image, amap, mask = _inputs(size)
    kwargs = {"mask": mask, "relative": True}
    bare = visualize.panel(image, amap, annotate=False, **kwargs)
    out = visualize.panel(image, amap, score=0.734, label=1, threshold=0.61, **kwargs)
    assert bare.shape == (size, 4 * size, 3)
    parts = visualize.info_lines(score=0.734, label=1, threshold=0.61, relative_range=(0.2, 0.8))
    layout = visualize.panel_layout(size, 4 * size, 4, parts)
    top, bottom = layout["tiles"]
    assert out.shape == (layout["height"], 4 * size, 3) and top > 0 and bottom == top + size
    np.testing.assert_array_equal(out[top:bottom], bare)
    title = out[: layout["title"][1]]
    for column in range(4):  # every tile has a title over it (at 16 px they may overlap)
        assert _has_text(title[:, column * size : (column + 1) * size])
    assert _has_text(out[slice(*layout["info"])])


def test_text_scales_with_the_tile_and_stays_legible():
    assert visualize.font_size(16) == visualize.font_size(128) == visualize.MIN_FONT
    assert visualize.font_size(518) > 2 * visualize.MIN_FONT - 2
    small = visualize.panel(*_inputs(128)[:2], score=0.5)
    large = visualize.panel(*_inputs(518)[:2], score=0.5)
    assert large.shape[0] - 518 > small.shape[0] - 128  # a taller band for larger text


@pytest.mark.parametrize("size", [128, 518])
def test_colour_bar_is_the_jet_ramp_with_hue_falling_from_blue_to_red(size):
    image, amap, mask = _inputs(size)
    out = visualize.panel(image, amap, mask=mask, relative=True, score=0.1, label=0)
    parts = visualize.info_lines(score=0.1, label=0, threshold=None, relative_range=(0.2, 0.8))
    layout = visualize.panel_layout(size, 4 * size, 4, parts)
    (x0, x1), (y0, y1) = layout["bar_x"], layout["bar"]
    row = out[(y0 + y1) // 2, x0:x1]
    assert x1 - x0 > 3 * size  # nearly the whole width
    np.testing.assert_array_equal(row[0], [0, 0, 128])  # jet's dark blue at 0
    np.testing.assert_array_equal(row[-1], [128, 0, 0])  # and dark red at 1
    hues = np.array([colorsys.rgb_to_hsv(*(c / 255.0))[0] for c in row.astype(float)])
    hues[hues > 0.9] = 0.0  # red wraps around to 1
    assert np.all(np.diff(hues) <= 1e-6) and hues[0] == pytest.approx(2 / 3)
    assert _has_text(out[y1 : layout["height"]])  # tick labels under the bar


def test_score_line_states_the_decision_or_that_there_is_no_threshold():
    line = visualize.info_lines(score=0.734, label=1, threshold=0.61)
    assert line == ["score 0.734  >= t=0.610 -> anomalous", "ground truth: anomalous"]
    assert visualize.info_lines(score=0.5, label=0, threshold=0.61)[0].endswith("-> normal")
    for missing in (None, float("nan")):
        assert visualize.info_lines(score=0.5, label=None, threshold=missing) == [
            "score 0.500  (no threshold)"
        ]
