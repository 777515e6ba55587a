"""Anomaly-detection metrics: AUROC, AP, F1-max and AUPRO (exact, or the peers' variants by name).

NumPy in, Python floats out. Every metric comes from one sort of the normal scores plus a sort of
the (few) anomalous scores instead of a loop over thresholds, so a VisA-sized pixel set (about
2,000 maps at 518x518, 0.54 G pixels) gets all four in seconds instead of the tens of minutes the
peers' loops take. A metric undefined on the data (a class missing) is NaN with an
:class:`UndefinedMetricWarning`; :func:`category_mean` leaves NaNs out and says which. Scores may
be any real dtype (float16 and integers are widened exactly; NaN raises); labels and masks are
boolean or 0/1.

Each public function's docstring gives its definition; ``tests/test_metrics.py`` checks them
against scikit-learn and against loop-for-loop transcriptions of the peers' code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

AUPRO_METHODS = ("exact", "anomalyclip", "af_clip")

# Queries per window of the sorted negatives in `_count_negatives`: small enough that the window a
# chunk searches stays in cache, large enough that the Python loop is negligible.
_SEARCH_CHUNK = 8192
# Images per chunk when scanning masks, to bound temporaries.
_IMAGE_CHUNK = 64


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined on the given data (for example no anomalous sample) and is NaN."""


class CategoryMean(NamedTuple):
    """Mean over categories of one metric, with the categories left out because they were NaN."""

    mean: float
    excluded: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_scores(values, name: str) -> np.ndarray:
    """Scores as a real array of a dtype that keeps every distinct value distinct."""
    array = np.asarray(values)
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.astype(np.float64)
    raise TypeError(f"{name}: expected real-valued scores, got dtype {array.dtype}.")


def _as_binary(values, name: str) -> np.ndarray:
    """Boolean view or copy of 0/1 labels; anything else is an error that says how to fix it."""
    array = np.asarray(values)
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name}: expected boolean or 0/1 labels, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > 1 or _has_fraction(array)):
        raise ValueError(
            f"{name}: labels must be boolean or 0/1, found other values "
            f"(range {array.min()}..{array.max()}). Binarise first, e.g. `{name} > 0` for 0/255 "
            "masks."
        )
    if array.dtype.itemsize == 1 and np.issubdtype(array.dtype, np.integer):
        return array.view(np.bool_)
    return array.astype(np.bool_)


def _has_fraction(array: np.ndarray) -> bool:
    if not np.issubdtype(array.dtype, np.floating):
        return False
    return bool(np.any((array != 0) & (array != 1)))


def _check_pair(scores: np.ndarray, labels: np.ndarray, names: tuple[str, str]) -> None:
    if scores.shape != labels.shape:
        raise ValueError(
            f"{names[0]} has shape {scores.shape} but {names[1]} has shape {labels.shape}; they "
            "must match element for element."
        )


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined: {reason}; returning NaN.", UndefinedMetricWarning, 3)
    return math.nan


# ---------------------------------------------------------------------------------------------
# The shared sort


@dataclasses.dataclass(frozen=True)
class _RankedScores:
    """Scores of one labelled set, arranged so that every metric is a few vectorised sums.

    Only the distinct *positive* scores are thresholds that matter for AUROC, AP and F1-max (between
    two of them only negatives change, which cannot raise any of the three), and for AUPRO the
    negatives' side is read from ``negatives`` directly.

    Attributes:
      negatives: (num_neg,) scores of the negatives, ascending.
      values: (D,) distinct scores of the positives, ascending.
      counts: (D,) int64 number of positives at each value.
      below: (D,) int64 number of negatives with a score < value.
      at_most: (D,) int64 number of negatives with a score <= value.
      overlap: (D,) float64 region-overlap mass at each value, sum over positives of
        1 / (num_regions * region_area); None when no regions were given.
      num_regions: number of ground-truth regions (0 when none were given).
    """

    negatives: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    below: np.ndarray
    at_most: np.ndarray
    overlap: np.ndarray | None
    num_regions: int

    @property
    def num_pos(self) -> int:
        return int(self.counts.sum())

    @property
    def num_neg(self) -> int:
        return int(self.negatives.size)


def _sorted_negatives(scores: np.ndarray, positive: np.ndarray, num_neg: int) -> np.ndarray:
    """(num_neg,) ascending scores where ``positive`` is False, from a single in-place sort.

    The positives are overwritten with NaN in a plain copy, and ``np.sort`` puts NaN last: cheaper
    than a boolean gather, and a NaN *score* shows up inside the first ``num_neg`` entries.
    """
    work = np.array(scores.reshape(-1), copy=True)
    np.copyto(work, np.nan, where=positive.reshape(-1))
    work.sort()
    if num_neg and np.isnan(work[num_neg - 1]):
        raise ValueError("scores contain NaN; every score must be a number.")
    return work[:num_neg]


def _sort_with_payload(values: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort ``values`` ascending in place and return them with the uint32 ``payload`` carried along.

    For float32 the payload rides in the low half of a uint64 key whose high half orders like the
    float (sign bit flipped for positives, all bits for negatives; -0.0 and +0.0 get adjacent keys):
    NumPy's SIMD sort handles that several times faster than an argsort. Within a run of equal
    values the payloads may come in any order, which is all the callers need (they sum per run).
    Other dtypes fall back to argsort.
    """
    if values.dtype != np.float32:
        order = np.argsort(values, kind="stable")
        return values[order], payload[order].astype(np.intp)
    keys = values.view(np.uint32).astype(np.uint64)
    flip = keys >> np.uint64(31)
    flip *= np.uint64(0x7FFFFFFF)
    flip |= np.uint64(0x80000000)
    keys ^= flip
    del flip
    keys <<= np.uint64(32)
    keys |= payload
    keys.sort()
    keys &= np.uint64(0xFFFFFFFF)
    values.sort()
    return values, keys.view(np.int64)


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """(D,) index of the first element of each run of equal values in an ascending array."""
    if sorted_values.size == 0:
        return np.zeros(0, np.intp)
    change = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate([np.zeros(1, np.intp), change])


def _count_negatives(negatives: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numbers of negatives ``< v`` and ``<= v`` for every ascending query ``v``.

    Queries come in sorted chunks; each chunk searches only the window of ``negatives`` that its
    first and last query delimit, which keeps the binary searches in cache (a plain searchsorted of
    millions of queries into 0.5 G negatives is about three times slower). The second search is only
    run for the queries that some negative equals.
    """
    below = np.empty(values.size, np.int64)
    at_most = np.empty(values.size, np.int64)
    for start in range(0, values.size, _SEARCH_CHUNK):
        queries = values[start : start + _SEARCH_CHUNK]
        lo = int(np.searchsorted(negatives, queries[0], "left"))
        hi = int(np.searchsorted(negatives, queries[-1], "right"))
        window = negatives[lo:hi]
        left = np.searchsorted(window, queries, "left")
        right = left.copy()
        if window.size:
            tied = window[np.minimum(left, window.size - 1)] == queries
            right[tied] = np.searchsorted(window, queries[tied], "right")
        below[start : start + queries.size] = left + lo
        at_most[start : start + queries.size] = right + lo
    return below, at_most


def _rank(
    negatives: np.ndarray,
    positives: np.ndarray,
    region_ids: np.ndarray | None = None,
    region_areas: np.ndarray | None = None,
) -> _RankedScores:
    """Group the positives by distinct value and count the negatives around each value.

    ``positives`` is sorted in place: callers pass a copy they own.
    """
    if np.isnan(positives).any():
        raise ValueError("scores contain NaN; every score must be a number.")
    if region_ids is None:
        positives.sort()
        values, overlap_sorted = positives, None
    else:
        values, ids = _sort_with_payload(positives, region_ids)
        overlap_sorted = (1.0 / (region_areas.size * region_areas.astype(np.float64)))[ids]
    starts = _group_starts(values)
    counts = np.diff(np.append(starts, values.size)).astype(np.int64)
    distinct = values[starts]
    below, at_most = _count_negatives(negatives, distinct)
    overlap = None
    if overlap_sorted is not None:
        overlap = np.add.reduceat(overlap_sorted, starts) if starts.size else np.zeros(0)
    return _RankedScores(
        negatives=negatives,
        values=distinct,
        counts=counts,
        below=below,
        at_most=at_most,
        overlap=overlap,
        num_regions=0 if region_areas is None else int(region_areas.size),
    )


def _rank_flat(scores, labels) -> _RankedScores:
    scores = _as_scores(scores, "scores")
    labels = _as_binary(labels, "labels")
    _check_pair(scores, labels, ("scores", "labels"))
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    num_pos = int(np.count_nonzero(labels))
    negatives = _sorted_negatives(scores, labels, scores.size - num_pos)
    return _rank(negatives, scores[labels])


def _rank_pixels(maps, masks, connectivity: int) -> _RankedScores:
    """Rank every pixel and label each mask's connected components once."""
    maps = _as_scores(maps, "maps")
    masks = _as_binary(masks, "masks")
    if maps.ndim != 3:
        raise ValueError(f"maps: expected (N, H, W) anomaly maps, got shape {maps.shape}.")
    _check_pair(maps, masks, ("maps", "masks"))
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)

    num_images = maps.shape[0]
    anomalous = np.concatenate(
        [
            masks[i : i + _IMAGE_CHUNK].reshape(-1, maps[0].size).any(axis=1)
            for i in range(0, num_images, _IMAGE_CHUNK)
        ]
        or [np.zeros(0, bool)]
    )
    num_pos = int(np.count_nonzero(masks))
    negatives = _sorted_negatives(maps, masks, maps.size - num_pos)

    values, ids, areas, num_regions = [], [], [], 0
    for i in np.flatnonzero(anomalous):
        # Label inside the mask's bounding box only: several times faster for small defects.
        rows, cols = np.flatnonzero(masks[i].any(axis=1)), np.flatnonzero(masks[i].any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask = masks[i][box]
        components, count = ndimage.label(mask, structure=structure)
        values.append(maps[i][box][mask])
        ids.append((components[mask] - 1 + num_regions).astype(np.uint32))
        areas.append(np.bincount(components.reshape(-1), minlength=count + 1)[1:])
        num_regions += count
    positives = np.concatenate(values) if values else np.zeros(0, maps.dtype)
    region_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint32)
    region_areas = np.concatenate(areas) if areas else np.zeros(0, np.int64)
    return _rank(negatives, positives, region_ids, region_areas)


# ---------------------------------------------------------------------------------------------
# Metrics on a ranked set


def _auroc(r: _RankedScores, metric: str) -> float:
    if r.num_pos == 0:
        return _undefined(metric, "there are no positive (anomalous) samples")
    if r.num_neg == 0:
        return _undefined(metric, "there are no negative (normal) samples")
    # Each positive beats the negatives below it and ties half of those equal to it. The doubled
    # sum is at most 2 * num_pos * num_neg: an exact int64 sum unless that could overflow.
    pairs = r.num_pos * r.num_neg
    if 2 * pairs < 2**63:
        return int(np.dot(r.counts, r.below + r.at_most)) / (2 * pairs)
    return float(np.dot(r.counts.astype(np.float64), r.below + r.at_most)) / (2 * pairs)


def _precision_recall(r: _RankedScores) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) at each distinct positive value used as threshold (score >= value), ascending."""
    tp = r.num_pos - (np.cumsum(r.counts) - r.counts)
    fp = r.num_neg - r.below
    return tp, fp


def _average_precision(r: _RankedScores, metric: str) -> float:
    if r.num_pos == 0:
        return _undefined(metric, "there are no positive (anomalous) samples")
    tp, fp = _precision_recall(r)
    return float(np.sum((r.counts / r.num_pos) * (tp / (tp + fp))))


def _f1_max(r: _RankedScores, metric: str, eps: float) -> float:
    if r.num_pos == 0:
        return _undefined(metric, "there are no positive (anomalous) samples")
    tp, fp = _precision_recall(r)
    if eps == 0.0:
        # 2PR/(P+R) with P = tp/(tp+fp), R = tp/num_pos, simplified; tp >= 1 here.
        f1 = 2.0 * tp / (tp + fp + r.num_pos)
    else:
        precision, recall = tp / (tp + fp), tp / r.num_pos
        f1 = 2.0 * precision * recall / (precision + recall + eps)
    # sklearn's curve also has the point (P=1, R=0), where F1 is 0.
    return float(max(f1.max(), 0.0))


def _overlap_suffix(r: _RankedScores) -> np.ndarray:
    """(D + 1,) suffix sums of the overlap mass: ``suffix[k]`` is PRO with values[k:] anomalous."""
    return np.concatenate([np.cumsum(r.overlap[::-1])[::-1], [0.0]])


def _pro_at(r: _RankedScores, suffix: np.ndarray, threshold, inclusive: bool) -> float:
    """Mean region overlap when pixels with score > threshold (>= if inclusive) are anomalous."""
    side = "left" if inclusive else "right"
    return float(suffix[np.searchsorted(r.values, threshold, side)])


def _aupro_exact(r: _RankedScores, fpr_limit: float) -> float:
    negatives, num_neg = r.negatives, r.num_neg
    suffix = _overlap_suffix(r)
    # Largest count of normal pixels above threshold with FPR <= limit (the curve's float test).
    allowed = min(int(fpr_limit * num_neg), num_neg)
    while allowed < num_neg and (allowed + 1) / num_neg <= fpr_limit:
        allowed += 1
    while allowed > 0 and allowed / num_neg > fpr_limit:
        allowed -= 1
    # First included negative: thresholds are distinct scores, so the included set must end at a
    # boundary between distinct values.
    cut = num_neg
    if allowed > 0:
        cut = num_neg - allowed
        first = int(np.searchsorted(negatives, negatives[cut], "left"))
        if first != cut:
            cut = int(np.searchsorted(negatives, negatives[cut], "right"))
    # Curve segments up to the cut, as a sum over negatives j >= cut of the mean of PRO(> s_j) and
    # PRO(>= s_j), rewritten as a sum over positive values (each counted once per negative below it
    # in the included set, half for ties).
    included = r.below >= cut
    weight = np.maximum(r.below - cut, 0) + 0.5 * (r.at_most - r.below) * included
    area = float(np.dot(r.overlap, weight)) / num_neg
    # Last segment: from the last curve point at or below the limit, interpolated to the limit.
    x0 = (num_neg - cut) / num_neg
    if cut > 0 and fpr_limit > x0:
        v_next = negatives[cut - 1]
        x1 = (num_neg - int(np.searchsorted(negatives, v_next, "left"))) / num_neg
        y0 = _pro_at(r, suffix, v_next, inclusive=False)
        y1 = _pro_at(r, suffix, v_next, inclusive=True)
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y_limit + y0) * (fpr_limit - x0)
    return area / fpr_limit


def _trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under (x, y) for monotone x in either direction, as ``sklearn.metrics.auc``."""
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if not np.all(dx <= 0):
            raise ValueError("x must be monotone for the trapezoid area.")
        direction = -1.0
    return direction * float(np.sum(dx * (y[1:] + y[:-1]) / 2.0))


def _aupro_peer(r: _RankedScores, method: str, fpr_limit: float, num_thresholds: int) -> float:
    metric = f"pixel_AUPRO[{method}]"
    # Both classes are present (checked by the caller); the grid spans all maps.
    low = min(r.negatives[0], r.values[0])
    high = max(r.negatives[-1], r.values[-1])
    if not high > low:
        return _undefined(metric, "all scores are equal, so the threshold grid is empty")
    dtype = r.negatives.dtype
    # NumPy 1.x promotion as the peers ran it: (max - min) in the map dtype, then / int in float64.
    low, high = dtype.type(low), dtype.type(high)
    step = np.float64(high - low) / num_thresholds
    # np.arange on the map-dtype scalars, as the peers call it: the grid's length comes from the
    # map-dtype difference high - low (a float64 arange differs by one point for many float32
    # (min, max) pairs, see tests/test_metrics.py); the values are low + i * step in float64.
    thresholds = np.arange(low, high, step).astype(dtype)
    fpr = (r.num_neg - np.searchsorted(r.negatives, thresholds, "right")) / r.num_neg
    suffix = _overlap_suffix(r)
    pro = suffix[np.searchsorted(r.values, thresholds, "right")]
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2:
        return _undefined(metric, f"fewer than 2 thresholds have FPR < {fpr_limit}")
    if method == "anomalyclip":
        span = fpr.max() - fpr.min()
        if span == 0:
            return _undefined(metric, "the kept FPRs are all equal (min-max normalisation is 0/0)")
        fpr = (fpr - fpr.min()) / span
    else:
        if fpr.max() == 0:
            return _undefined(metric, "the kept FPRs are all 0 (division by their maximum)")
        fpr = fpr / fpr.max()
    return _trapezoid_auc(fpr, pro)


def _check_aupro_args(method: str, fpr_limit: float, num_thresholds: int) -> None:
    """Fail before the expensive sort, not after it."""
    if method not in AUPRO_METHODS:
        raise ValueError(f"aupro method must be one of {AUPRO_METHODS}, got {method!r}.")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    if int(num_thresholds) < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}.")


def _aupro(
    r: _RankedScores, fpr_limit: float, method: str, num_thresholds: int, metric: str
) -> float:
    if r.num_regions == 0:
        return _undefined(metric, "the masks contain no anomalous region")
    if r.num_neg == 0:
        return _undefined(metric, "the masks contain no normal pixel, so FPR is undefined")
    if method == "exact":
        return _aupro_exact(r, fpr_limit)
    return _aupro_peer(r, method, fpr_limit, num_thresholds)


# ---------------------------------------------------------------------------------------------
# Public API


def auroc(scores, labels) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` (ties count half: the
    Mann-Whitney statistic).

    Args:
      scores: (...) real scores, higher = more anomalous.
      labels: (...) same shape, boolean or 0/1 (1 = anomalous).

    Returns:
      AUROC in [0, 1]; NaN with a warning when one class is missing.
    """
    return _auroc(_rank_flat(scores, labels), "AUROC")


def average_precision(scores, labels) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score``: ``sum_n (R_n -
    R_{n-1}) P_n`` over all distinct thresholds (step rule, no interpolation).

    Args:
      scores: (...) real scores, higher = more anomalous.
      labels: (...) same shape, boolean or 0/1.

    Returns:
      AP in [0, 1]; NaN with a warning when there is no positive.
    """
    return _average_precision(_rank_flat(scores, labels), "AP")


def f1_max(scores, labels, *, eps: float = 0.0) -> float:
    """Maximum F1 over every point of ``sklearn.metrics.precision_recall_curve``.

    Args:
      scores: (...) real scores, higher = more anomalous.
      labels: (...) same shape, boolean or 0/1.
      eps: added to ``P + R`` in the F1 denominator. 0 (default) is the exact ``2PR / (P + R)`` with
        0 where ``P + R = 0``; AF-CLIP uses 1e-16, AVA-DINO 1e-8. With 0 the value differs from
        theirs by less than ``eps / (2 F1max)`` relative.

    Returns:
      F1-max in [0, 1]; NaN with a warning when there is no positive.
    """
    return _f1_max(_rank_flat(scores, labels), "F1max", eps)


def aupro(
    maps,
    masks,
    fpr_limit: float = 0.3,
    *,
    method: str = "exact",
    connectivity: int = 8,
    num_thresholds: int = 200,
) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    ``"exact"``: the MVTec AD definition (Bergmann et al.; the MVTec evaluation script). Regions
    are the connected components of each mask, labelled once. At every distinct score ``t`` as
    threshold (pixel anomalous iff score >= t), PRO is the mean over all regions of all images of
    the fraction of the region above ``t``, FPR the fraction of all normal pixels above it. The
    curve runs from (0, 0) to (1, 1), is integrated with the trapezoid rule up to ``fpr_limit``
    (the end point interpolated linearly) and divided by ``fpr_limit``. No threshold grid.

    The peers' variants: ``num_thresholds`` thresholds ``np.arange(min, max, (max - min) / n)``
    over all maps, pixel anomalous iff score > t, the points with FPR < ``fpr_limit`` kept and
    integrated with sklearn's trapezoid ``auc`` after normalising their FPRs: min-max for
    ``"anomalyclip"`` (zqhang/AnomalyCLIP ``metrics.py:cal_pro_score``), divided by the maximum
    for ``"af_clip"`` (Faustinaqq/AF-CLIP ``util/utils.py:compute_pro``). The grid and the
    comparisons follow the NumPy 1.x promotion both ran under (map-dtype ``max - min`` and
    ``arange``, thresholds rounded to the map dtype); ``tests/test_metrics.py`` shows where that
    changes the number.

    Args:
      maps: (N, H, W) anomaly maps.
      masks: (N, H, W) ground truth, boolean or 0/1.
      fpr_limit: integration limit in (0, 1] (the peers' variants keep FPR < limit).
      method: "exact" (MVTec AD definition, every distinct score a threshold), "anomalyclip" or
        "af_clip" (the peers' 200-threshold approximations).
      connectivity: 8 (default, as MVTec AD, anomalib and the peers) or 4.
      num_thresholds: grid size of the peers' variants (200 in both).

    Returns:
      AUPRO; NaN with a warning when there is no anomalous region or no normal pixel.
    """
    _check_aupro_args(method, fpr_limit, num_thresholds)
    ranked = _rank_pixels(maps, masks, connectivity)
    return _aupro(ranked, fpr_limit, method, num_thresholds, "pixel_AUPRO")


def pixel_metrics(
    maps,
    masks,
    *,
    fpr_limit: float = 0.3,
    aupro_method: str = "exact",
    connectivity: int = 8,
    num_thresholds: int = 200,
) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and AUPRO from one shared sort.

    Args:
      maps: (N, H, W) anomaly maps (float32 is fastest; other dtypes work).
      masks: (N, H, W) ground truth, boolean or 0/1.
      fpr_limit: AUPRO integration limit.
      aupro_method: "exact", "anomalyclip" or "af_clip" (see :func:`aupro`).
      connectivity: 8 or 4, for the AUPRO regions.
      num_thresholds: grid size of the peers' AUPRO variants.

    Returns:
      ``{"pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO"}`` as Python floats.
    """
    _check_aupro_args(aupro_method, fpr_limit, num_thresholds)
    ranked = _rank_pixels(maps, masks, connectivity)
    return {
        "pixel_AUROC": _auroc(ranked, "pixel_AUROC"),
        "pixel_AP": _average_precision(ranked, "pixel_AP"),
        "pixel_F1max": _f1_max(ranked, "pixel_F1max", 0.0),
        "pixel_AUPRO": _aupro(ranked, fpr_limit, aupro_method, num_thresholds, "pixel_AUPRO"),
    }


def image_metrics(scores, labels) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max.

    Args:
      scores: (N,) image anomaly scores.
      labels: (N,) boolean or 0/1 image labels.

    Returns:
      ``{"image_AUROC", "image_AP", "image_F1max"}`` as Python floats.
    """
    ranked = _rank_flat(scores, labels)
    return {
        "image_AUROC": _auroc(ranked, "image_AUROC"),
        "image_AP": _average_precision(ranked, "image_AP"),
        "image_F1max": _f1_max(ranked, "image_F1max", 0.0),
    }


def choose_threshold(scores, labels) -> float:
    """The F1-optimal image-score threshold: predict anomalous iff ``score >= threshold``.

    Every distinct score is a candidate (the points of scikit-learn's ``precision_recall_curve``);
    the one with the largest F1 wins, the highest such score on ties (fewest false alarms).

    Args:
      scores: (N,) image scores.
      labels: (N,) 0/1 or bool ground truth.

    Returns:
      The threshold; NaN (with a warning) when there is no anomalous image.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"choose_threshold: {scores.shape[0]} scores but {labels.shape[0]} labels")
    if np.isnan(scores).any():
        raise ValueError("choose_threshold: scores contain NaN")
    num_pos = int(labels.sum())
    if num_pos == 0:
        warnings.warn(
            "choose_threshold: no anomalous image, so no F1-optimal threshold; returning NaN",
            UndefinedMetricWarning,
            2,
        )
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    tp = np.cumsum(sorted_labels)
    fp = np.cumsum(~sorted_labels)
    # The last element of each run of equal scores: predicting ">= that score" takes the whole run.
    last = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), scores.size - 1]
    f1 = 2.0 * tp[last] / (tp[last] + fp[last] + num_pos)
    return float(sorted_scores[last[int(np.argmax(f1))]])


def category_mean(values: Mapping[str, float]) -> CategoryMean:
    """Arithmetic mean over categories of one metric, leaving out NaN entries explicitly.

    Args:
      values: {category: metric value}, e.g. every class's ``pixel_AUPRO``.

    Returns:
      ``CategoryMean(mean, excluded)``: the mean of the finite entries (NaN if there is none) and
      the names of the categories that were NaN. A warning names them too.
    """
    excluded = tuple(name for name, value in values.items() if math.isnan(value))
    kept = [float(value) for name, value in values.items() if name not in excluded]
    if excluded:
        warnings.warn(
            f"category mean leaves out {len(excluded)} NaN categor"
            f"{'y' if len(excluded) == 1 else 'ies'}: {', '.join(excluded)}",
            UndefinedMetricWarning,
            2,
        )
    mean = math.fsum(kept) / len(kept) if kept else math.nan
    return CategoryMean(mean=mean, excluded=excluded)


# ---------------------------------------------------------------------------------------------
# On-device approximate AUROC


@functools.partial(jax.jit, static_argnames=("bins",))
def score_histograms(scores: jax.Array, labels: jax.Array, low, high, *, bins: int) -> jax.Array:
    """Per-class histograms of scores on ``bins`` equal bins over [low, high], on device.

    Scores outside the range go to the end bins. Histograms of several batches (same range and
    bins) can be summed before :func:`auroc_from_histograms`. Counts are int32: at most 2**31 - 1
    samples per call.

    Args:
      scores: (...) finite scores.
      labels: (...) same shape, boolean or 0/1.
      low, high: the binning range, high > low.
      bins: number of bins.

    Returns:
      (2, bins) int32 counts: row 0 negatives, row 1 positives.
    """
    s = scores.reshape(-1).astype(jnp.float32)
    y = labels.reshape(-1).astype(jnp.int32)
    scale = bins / (jnp.float32(high) - jnp.float32(low))
    # Rounding, scaling and floor are all monotone, so bin order never contradicts score order.
    index = jnp.clip(jnp.floor((s - jnp.float32(low)) * scale), 0, bins - 1).astype(jnp.int32)
    return jnp.bincount(index + bins * y, length=2 * bins).reshape(2, bins)


def auroc_from_histograms(histograms) -> tuple[float, float]:
    """AUROC from (2, bins) class histograms, with its worst-case binning error.

    Pairs (positive, negative) in different bins are ordered exactly as their scores are; a pair
    in the same bin counts 1/2 where the exact AUROC counts 0, 1/2 or 1. Hence
    ``|auroc - exact| <= max_error = 0.5 * (pairs sharing a bin) / (num_pos * num_neg)``: half the
    fraction of (positive, negative) pairs that share a bin.

    Args:
      histograms: (2, bins) counts, row 0 negatives, row 1 positives.

    Returns:
      (auroc, max_error); (NaN, NaN) with a warning when a class is empty.
    """
    counts = np.asarray(histograms, dtype=np.int64)
    negatives, positives = counts[0], counts[1]
    num_neg, num_pos = int(negatives.sum()), int(positives.sum())
    if num_pos == 0 or num_neg == 0:
        missing = "positive (anomalous)" if num_pos == 0 else "negative (normal)"
        return _undefined("binned AUROC", f"there are no {missing} samples"), math.nan
    below = np.cumsum(negatives) - negatives
    doubled = int(np.dot(positives, 2 * below + negatives))
    same_bin = int(np.dot(positives, negatives))
    pairs = num_pos * num_neg
    return doubled / (2 * pairs), 0.5 * same_bin / pairs


def auroc_binned(
    scores, labels, *, bins: int = 65536, value_range: tuple[float, float] | None = None
) -> tuple[float, float]:
    """Approximate AUROC from on-device histograms (for accelerators; no host sort).

    Args:
      scores: (...) finite scores (NumPy or jax arrays).
      labels: (...) same shape, boolean or 0/1.
      bins: number of equal-width bins.
      value_range: (low, high) of the bins; the scores' min and max when None.

    Returns:
      (auroc, max_error) with ``|auroc - exact AUROC| <= max_error`` (see
      :func:`auroc_from_histograms`).
    """
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} != labels shape {labels.shape}.")
    if value_range is None:
        low, high = float(jnp.min(scores)), float(jnp.max(scores))
        if high <= low:
            high = low + 1.0  # constant scores: one bin holds everything, error bound says so
    else:
        low, high = map(float, value_range)
        if not high > low:
            raise ValueError(f"value_range must have high > low, got {value_range}.")
    return auroc_from_histograms(score_histograms(scores, labels, low, high, bins=bins))
