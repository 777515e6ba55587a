"""zsad_jax.metrics against independent references.

AUROC / AP / F1-max against scikit-learn (heavy ties, dtypes, tiny and one-class sets); the exact
AUPRO against a slow per-threshold, per-region loop (scipy.ndimage.label, trapezoid clipped at the
limit) and, for larger sets, against a sort-and-cumsum computation written the MVTec way; the peers'
AUPRO variants against straight transcriptions of their loops; the binned on-device AUROC against
its stated error bound.
"""

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from zsad_jax import metrics

STRUCTURES = {
    8: np.ones((3, 3), bool),
    4: ndimage.generate_binary_structure(2, 1),
}


# ---------------------------------------------------------------------------------------------
# References


def sklearn_f1_max(labels, scores, eps=0.0):
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall + eps
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * precision * recall / denominator, 0.0)
    return float(f1.max())


def regions_of(masks, connectivity):
    """[(image index, boolean region mask)] of every connected component of every mask."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=STRUCTURES[connectivity])
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    return regions


def area_up_to(xs, ys, limit):
    """Area under the polyline (xs, ys), xs non-decreasing, clipped at x = limit."""
    area = 0.0
    for xa, ya, xb, yb in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if xa >= limit:
            break
        if xb <= limit:
            area += 0.5 * (ya + yb) * (xb - xa)
        else:
            y_limit = ya + (yb - ya) * (limit - xa) / (xb - xa)
            area += 0.5 * (ya + y_limit) * (limit - xa)
    return area


def slow_aupro(maps, masks, limit, connectivity=8):
    """Every distinct score a threshold; per-region overlaps region by region."""
    regions = regions_of(masks, connectivity)
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        xs.append(np.sum(predicted & normal) / np.sum(normal))
        ys.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    xs.append(1.0)
    ys.append(1.0)
    return area_up_to(xs, ys, limit) / limit


def sorted_aupro(maps, masks, limit, connectivity=8):
    """The MVTec evaluation's algorithm: argsort everything, cumulative FPR/PRO changes."""
    fp_change = (~masks).astype(np.float64)
    pro_change = np.zeros(maps.shape)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=STRUCTURES[connectivity])
        sizes = np.bincount(labelled.ravel())
        pro_change[i] = np.where(labelled > 0, 1.0 / sizes[labelled], 0.0)
        num_regions += count
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pros = np.cumsum(pro_change.ravel()[order]) / num_regions
    last_of_tie = np.append(np.diff(scores) != 0, True)
    xs = np.concatenate([[0.0], fprs[last_of_tie], [1.0]])
    ys = np.concatenate([[0.0], pros[last_of_tie], [1.0]])
    return area_up_to(xs, ys, limit) / limit


def peer_aupro(maps, masks, variant, num_thresholds=200, expect_fpr=0.3):
    """AnomalyCLIP cal_pro_score / AF-CLIP compute_pro, loop for loop (NumPy 1.x promotion)."""
    low, high = maps.min(), maps.max()  # scalars of the map dtype, as theirs
    step = np.float64(high - low) / num_thresholds  # float32 difference, float64 division
    # Their np.arange(min_th, max_th, delta) on those scalars: the length from the float32 range.
    return peer_auc_on_grid(maps, masks, np.arange(low, high, step), variant, expect_fpr)


def peer_auc_on_grid(maps, masks, grid, variant, expect_fpr=0.3):
    """The peers' loop over the thresholds ``grid``: PRO and FPR per threshold, the points with
    FPR < ``expect_fpr`` kept, FPRs normalised as ``variant`` does, trapezoid area."""
    regions, normal = regions_of(masks, 8), ~masks
    pros, fprs = [], []
    for threshold in grid:
        binary = maps > maps.dtype.type(threshold)  # NumPy 1.x: array dtype wins the comparison
        pros.append(np.mean([binary[i][region].sum() / region.sum() for i, region in regions]))
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    if variant == "anomalyclip":
        fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    else:
        fprs = fprs / fprs.max()
    return auc(fprs, pros)


# ---------------------------------------------------------------------------------------------
# Data


def blob_masks(rng, num_images, height, width, max_blobs=3):
    """Random rectangles and single pixels, some touching only diagonally; some images clean."""
    masks = np.zeros((num_images, height, width), bool)
    for mask in masks[: num_images - num_images // 4]:
        for _ in range(rng.integers(1, max_blobs + 1)):
            y, x = rng.integers(0, height - 2), rng.integers(0, width - 2)
            h, w = rng.integers(1, height // 3 + 2), rng.integers(1, width // 3 + 2)
            mask[y : y + h, x : x + w] = True
        y, x = rng.integers(1, height - 1), rng.integers(1, width - 1)
        mask[y, x] = mask[y - 1, x - 1] = True  # may join a blob only through a corner
    return masks


def noisy_maps(rng, masks, decimals, dtype):
    maps = rng.random(masks.shape) + 0.6 * masks - 0.8  # both signs in both classes (sort keys)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Flat metrics vs scikit-learn


def assert_flat_metrics_match_sklearn(scores, labels):
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert metrics.f1_max(scores, labels) == pytest.approx(
        sklearn_f1_max(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32])
@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("size", [2, 3, 17, 5000])
def test_flat_metrics_match_sklearn(dtype, decimals, size):
    rng = np.random.default_rng(size * 7 + (decimals or 0))
    labels = rng.random(size) < 0.3
    labels[:2] = [True, False]  # both classes present
    scores = rng.normal(size=size) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    if dtype == np.int32:
        scores = np.round(scores * 3)
    scores = scores.astype(dtype)
    assert_flat_metrics_match_sklearn(scores, labels)


def test_many_distinct_values_cross_search_chunks():
    """More distinct positive scores than one search chunk, 0/1 integer labels."""
    rng = np.random.default_rng(0)
    labels = (rng.random(200_000) < 0.2).astype(np.int64)
    scores = (rng.random(200_000) + 0.3 * labels).astype(np.float32)
    assert np.unique(scores[labels == 1]).size > 4 * metrics._SEARCH_CHUNK
    assert_flat_metrics_match_sklearn(scores, labels)


def test_signed_zeros_are_one_value():
    scores = np.array([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0, 0.0, -0.0], np.float32)
    labels = np.array([1, 0, 1, 0, 0, 1, 1, 0], bool)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    maps = scores.reshape(1, 2, 4)
    masks = labels.reshape(1, 2, 4)
    assert metrics.aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks, 0.3), abs=1e-12)


@pytest.mark.parametrize("eps", [1e-16, 1e-8, 1e-2])
def test_f1_max_with_peer_eps(eps):
    rng = np.random.default_rng(3)
    labels = rng.random(3000) < 0.1
    scores = np.round(rng.random(3000) + 0.2 * labels, 2)
    expected = sklearn_f1_max(labels, scores, eps=eps)
    assert metrics.f1_max(scores, labels, eps=eps) == pytest.approx(expected, abs=1e-12)
    # Without eps the value is the exact one, which is larger when eps matters.
    assert metrics.f1_max(scores, labels) >= metrics.f1_max(scores, labels, eps=eps)


def test_constant_scores_and_no_negatives_match_sklearn():
    labels = np.array([0, 1, 1, 0, 0, 1, 0], bool)
    scores = np.full(labels.shape, 0.25)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert metrics.average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores)
    )
    assert metrics.f1_max(scores, labels) == pytest.approx(sklearn_f1_max(labels, scores))
    only_positive = np.ones(4, bool)
    values = np.array([0.1, 0.4, 0.4, 0.2])
    assert metrics.average_precision(values, only_positive) == pytest.approx(
        average_precision_score(only_positive, values)
    )
    assert metrics.f1_max(values, only_positive) == pytest.approx(
        sklearn_f1_max(only_positive, values)
    )


@pytest.mark.parametrize(
    ("labels", "function", "reason"),
    [
        (np.zeros(5, bool), metrics.auroc, "no positive"),
        (np.ones(5, bool), metrics.auroc, "no negative"),
        (np.zeros(5, bool), metrics.average_precision, "no positive"),
        (np.zeros(5, bool), metrics.f1_max, "no positive"),
        (np.zeros(1, bool), metrics.auroc, "no positive"),
    ],
)
def test_one_class_is_nan_with_warning(labels, function, reason):
    scores = np.linspace(0, 1, labels.size)
    with pytest.warns(metrics.UndefinedMetricWarning, match=reason):
        assert math.isnan(function(scores, labels))


def test_image_metrics_names_and_values():
    rng = np.random.default_rng(5)
    labels = rng.random(300) < 0.55
    scores = np.round(rng.random(300) + 0.3 * labels, 2).astype(np.float32)
    result = metrics.image_metrics(scores, labels)
    assert result == pytest.approx(
        {
            "image_AUROC": roc_auc_score(labels, scores),
            "image_AP": average_precision_score(labels, scores),
            "image_F1max": sklearn_f1_max(labels, scores),
        },
        abs=1e-12,
    )
    assert all(type(value) is float for value in result.values())


def test_bad_inputs_raise_with_the_field_name():
    with pytest.raises(ValueError, match=r"labels.*`labels > 0`"):
        metrics.auroc(np.arange(4.0), np.array([0, 255, 0, 255]))
    with pytest.raises(ValueError, match="masks"):
        metrics.aupro(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        metrics.auroc(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pixel_metrics(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="method"):
        metrics.aupro(np.zeros((1, 2, 2)), np.eye(2, dtype=bool)[None], method="pro200")
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 2, 2)), np.eye(2, dtype=bool)[None], fpr_limit=0.0)


# ---------------------------------------------------------------------------------------------
# AUPRO


def test_references_agree_with_each_other():
    """The fast sorted reference used below equals the slow loop on small data."""
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, 6, 12, 14)
    maps = noisy_maps(rng, masks, 2, np.float64)
    for limit in (0.3, 0.07, 1.0):
        assert sorted_aupro(maps, masks, limit) == pytest.approx(
            slow_aupro(maps, masks, limit), abs=1e-12
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
def test_aupro_exact_matches_slow_reference(dtype, decimals, limit):
    rng = np.random.default_rng(int(limit * 100) + (decimals or 7))
    masks = blob_masks(rng, 5, 10, 13)
    maps = noisy_maps(rng, masks, decimals, dtype)
    expected = slow_aupro(maps, masks, limit)
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("connectivity", [8, 4])
def test_aupro_connectivity(connectivity):
    # 8 is everyone's default: the MVTec script labels with a 3x3 structuring element, anomalib
    # with cv2.connectedComponents (default 8), AnomalyCLIP/AF-CLIP with skimage.measure.label
    # (default: full connectivity, i.e. 8).
    # Two squares that touch only at a corner: one region with 8-connectivity, two with 4.
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = masks[0, 3:6, 3:6] = True
    masks[1, 6, 6] = True
    maps = np.zeros(masks.shape)
    maps[0, 1:3, 1:3] = 0.9
    maps[0, 3:6, 3:6] = 0.2
    maps[1] = np.linspace(0, 1, 64).reshape(8, 8)
    expected = slow_aupro(maps, masks, 0.3, connectivity)
    got = metrics.aupro(maps, masks, connectivity=connectivity)
    assert got == pytest.approx(expected, abs=1e-12)
    other = slow_aupro(maps, masks, 0.3, 12 - connectivity)
    assert abs(expected - other) > 1e-3  # the two choices really differ here


def test_aupro_limit_on_a_curve_point():
    """FPR limit exactly reached by a threshold (no interpolation) and ties on both sides."""
    masks = np.zeros((1, 4, 5), bool)
    masks[0, 0, :2] = True  # 18 normal pixels; the limit 1/3 = 6/18 is a curve point
    maps = np.array([[[5, 3, 9, 9, 8], [8, 8, 7, 7, 3], [3, 2, 2, 1, 1], [1, 0, 0, 0, 0]]], float)
    for limit in (6 / 18, 0.3, 1.0):
        assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            slow_aupro(maps, masks, limit), abs=1e-12
        )


def test_aupro_constant_maps():
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 1:3, 1:4] = True
    maps = np.full(masks.shape, 0.5, np.float32)
    assert metrics.aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks, 0.3), abs=1e-12)


@pytest.mark.parametrize("masks", [np.zeros((2, 4, 4), bool), np.ones((2, 4, 4), bool)])
def test_aupro_undefined_is_nan_with_warning(masks):
    maps = np.random.default_rng(0).random(masks.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metrics.pixel_metrics(maps, masks)
    assert math.isnan(result["pixel_AUPRO"])
    assert math.isnan(result["pixel_AUROC"])
    assert {w.category for w in caught} == {metrics.UndefinedMetricWarning}
    assert any("pixel_AUPRO is undefined" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 2])
def test_pixel_metrics_on_a_larger_set(dtype, decimals):
    """100 maps (more than one image chunk), many distinct or heavily tied scores; uint8 masks."""
    rng = np.random.default_rng(21)
    masks = blob_masks(rng, 100, 32, 40)
    maps = noisy_maps(rng, masks, decimals, dtype)
    result = metrics.pixel_metrics(maps, masks.astype(np.uint8))
    labels, scores = masks.ravel(), maps.ravel()
    assert result["pixel_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["pixel_AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["pixel_F1max"] == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    assert result["pixel_AUPRO"] == pytest.approx(sorted_aupro(maps, masks, 0.3), abs=1e-12)
    assert list(result) == ["pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO"]


def with_hot_normal_pixels(maps, masks):
    """Give a few normal pixels the top score, so that even the top threshold has FPR > 0 (there
    AnomalyCLIP's min-max and AF-CLIP's divide-by-max normalisations differ)."""
    maps = maps.copy()
    normal = np.flatnonzero(~masks.ravel())[:: max(1, masks.size // 7)]
    maps.reshape(-1)[normal] = maps.max()
    return maps


PEER_CASES = [(np.float32, None, False), (np.float32, 2, True), (np.float64, 1, True)]


@pytest.mark.parametrize("variant", ["anomalyclip", "af_clip"])
@pytest.mark.parametrize(("dtype", "decimals", "hot"), PEER_CASES)
def test_peer_aupro_variants_match_transcriptions(variant, dtype, decimals, hot):
    rng = np.random.default_rng(len(variant) + (decimals or 0))
    masks = blob_masks(rng, 6, 16, 16)
    maps = noisy_maps(rng, masks, decimals, dtype)
    if hot:
        maps = with_hot_normal_pixels(maps, masks)
    expected = peer_aupro(maps, masks, variant)
    assert metrics.aupro(maps, masks, method=variant) == pytest.approx(expected, abs=1e-12)
    got = metrics.pixel_metrics(maps, masks, aupro_method=variant)["pixel_AUPRO"]
    assert got == pytest.approx(expected, abs=1e-12)


def test_peer_variants_differ_from_exact_and_each_other():
    # Scores span exactly [0, 1], so the grid is 0, 0.005, ..., 0.995 and normal pixels at 1.0 keep
    # every FPR above 0: min-max and divide-by-max normalisations then differ.
    rng = np.random.default_rng(2)
    masks = blob_masks(rng, 6, 16, 16)
    maps = np.clip((noisy_maps(rng, masks, 2, np.float64) + 0.8) / 1.6, 0.0, 1.0)
    maps.reshape(-1)[0] = 0.0
    maps = with_hot_normal_pixels(maps, masks)
    assert maps.max() == 1.0
    values = {m: metrics.aupro(maps, masks, method=m) for m in metrics.AUPRO_METHODS}
    assert values["af_clip"] == pytest.approx(peer_aupro(maps, masks, "af_clip"), abs=1e-12)
    assert values["anomalyclip"] == pytest.approx(peer_aupro(maps, masks, "anomalyclip"), abs=1e-12)
    assert len({round(v, 6) for v in values.values()}) == 3


def test_peer_grid_rounds_thresholds_to_the_map_dtype():
    """float32 maps whose values sit on the rounded grid: NumPy 1.x (the peers' runtime) compared
    against float32(threshold), NumPy 2 would compare against the float64 threshold."""
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 6, 16, 16)
    high = np.float32(0.7)
    grid = np.arange(0.0, np.float64(high), np.float64(high) / 200).astype(np.float32)
    maps = rng.choice(np.append(grid, high), size=masks.shape).astype(np.float32)
    maps.reshape(-1)[:2] = [0.0, high]
    expected = peer_aupro(maps, masks, "anomalyclip")
    assert metrics.aupro(maps, masks, method="anomalyclip") == pytest.approx(expected, abs=1e-12)
    # The rounding matters on this data: the float64 comparison gives another number.
    unrounded_grid = np.arange(0.0, np.float64(high), np.float64(high) / 200)
    unrounded = peer_auc_on_grid(maps.astype(np.float64), masks, unrounded_grid, "anomalyclip")
    assert abs(unrounded - expected) > 1e-6


def _grid_lengths(low, high, num_thresholds=200):
    """(the peers' grid length, a float64 arange's length) for float32 scalars low < high."""
    step = np.float64(high - low) / num_thresholds
    return len(np.arange(low, high, step)), len(np.arange(np.float64(low), np.float64(high), step))


def test_peer_grid_length_comes_from_the_float32_range():
    """np.arange(min, max, delta) on float32 scalars takes ceil((max - min) / delta) with max - min
    in float32: for many (min, max) pairs of float32 maps the grid is one longer or shorter than a
    float64 arange's (15 % of uniform pairs in [0, 1); 46 % with min in [0, 0.1) and max in
    [0.5, 1), ~43 % of the 400 drawn here). Maps spanning such pairs give the peers' numbers. The
    extra or missing point changes AUPRO, most with AnomalyCLIP's min-max normalisation when it
    moves the smallest kept FPR (up to 1.4e-2 on maps like these)."""
    rng = np.random.default_rng(7)
    pairs = [(np.float32(rng.uniform(0, 0.1)), np.float32(rng.uniform(0.5, 1))) for _ in range(400)]
    lengths = [_grid_lengths(lo, hi) for lo, hi in pairs]
    differ = [p for p, (peer, wide) in zip(pairs, lengths, strict=True) if peer != wide]
    assert 0.2 < len(differ) / len(pairs) < 0.6
    assert {peer - wide for peer, wide in lengths} == {-1, 0, 1}

    masks = blob_masks(np.random.default_rng(8), 6, 16, 16)
    moved = 0
    for lo, hi in differ[:4]:
        unit = np.clip((noisy_maps(rng, masks, None, np.float64) + 0.8) / 1.6, 0.0, 1.0)
        maps = (np.float64(lo) + unit * (np.float64(hi) - np.float64(lo))).astype(np.float32)
        maps = with_hot_normal_pixels(maps, masks)
        maps.reshape(-1)[[0, 1]] = [lo, hi]
        assert (maps.min(), maps.max()) == (lo, hi)
        for variant in ("anomalyclip", "af_clip"):
            expected = peer_aupro(maps, masks, variant)
            got = metrics.aupro(maps, masks, method=variant)
            assert got == pytest.approx(expected, abs=1e-12), (lo, hi, variant)
            # The float64-length grid (the previous implementation) gives another number here.
            step = np.float64(hi - lo) / 200
            wide = np.arange(np.float64(lo), np.float64(hi), step).astype(np.float32)
            moved += abs(peer_auc_on_grid(maps, masks, wide, variant) - expected) > 1e-9
    assert moved >= 1


# ---------------------------------------------------------------------------------------------
# Mean over categories


def test_category_mean_excludes_nan_and_says_which():
    values = {"candle": 0.9, "pcb1": math.nan, "fryum": 0.7, "pcb2": math.nan}
    with pytest.warns(metrics.UndefinedMetricWarning, match="pcb1, pcb2"):
        result = metrics.category_mean(values)
    assert result.mean == pytest.approx(np.mean([0.9, 0.7]))
    assert result.excluded == ("pcb1", "pcb2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.category_mean({"a": 0.5, "b": 1.0}) == (0.75, ())
    with pytest.warns(metrics.UndefinedMetricWarning):
        assert math.isnan(metrics.category_mean({"a": math.nan}).mean)


# ---------------------------------------------------------------------------------------------
# Binned (on-device) AUROC


@pytest.mark.parametrize(("bins", "decimals"), [(8, None), (64, 2), (4096, None), (4096, 3)])
def test_binned_auroc_within_its_bound(bins, decimals):
    rng = np.random.default_rng(bins)
    labels = rng.random(20_000) < 0.2
    scores = rng.normal(size=20_000) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(np.float32)
    exact = roc_auc_score(labels, scores)
    value, bound = metrics.auroc_binned(scores, labels, bins=bins)
    assert abs(value - exact) <= bound + 1e-12
    if bins == 8:
        assert abs(value - exact) > 1e-4  # coarse bins really are approximate
    if bins == 4096 and decimals is None:
        assert bound < 1e-3


def test_binned_auroc_bound_is_attained():
    # Every negative at the bottom and every positive at the top of the same bin: exact AUROC 1,
    # binned 1/2, and the stated bound 1/2 is reached, so it cannot be made smaller.
    scores = np.array([0.26, 0.26, 0.49, 0.49, 0.49], np.float32)
    labels = np.array([0, 0, 1, 1, 1], bool)
    value, bound = metrics.auroc_binned(scores, labels, bins=4, value_range=(0.0, 1.0))
    assert roc_auc_score(labels, scores) == 1.0
    assert value == pytest.approx(0.5) and bound == pytest.approx(0.5)


def test_binned_histograms_sum_over_batches_and_clip_range():
    rng = np.random.default_rng(1)
    labels = rng.random(10_000) < 0.3
    scores = (rng.random(10_000) * 3 - 1).astype(np.float32)  # partly outside [0, 1]
    whole = metrics.score_histograms(scores, labels, 0.0, 1.0, bins=100)
    halves = sum(
        np.asarray(metrics.score_histograms(s, y, 0.0, 1.0, bins=100), np.int64)
        for s, y in ((scores[:4000], labels[:4000]), (scores[4000:], labels[4000:]))
    )
    np.testing.assert_array_equal(np.asarray(whole), halves)
    assert int(np.asarray(whole)[1].sum()) == int(labels.sum())
    value, bound = metrics.auroc_from_histograms(whole)
    assert abs(value - roc_auc_score(labels, scores)) <= bound + 1e-12
