"""Benchmark of zsad_jax.metrics: speed against scikit-learn, and a VisA-sized pixel evaluation.

Run:
  .venv/bin/python bench/metrics.py            # 100 maps vs sklearn, then 2,162 maps at 518x518
  .venv/bin/python bench/metrics.py --quick    # 20 maps vs sklearn, then 200 maps

Part 1 times pixel AUROC + AP + F1-max with scikit-learn (``roc_auc_score``,
``average_precision_score``, ``precision_recall_curve``) and ``zsad_jax.metrics.pixel_metrics``
(which computes the same three plus the exact AUPRO) on the same maps, checks that the values agree
and prints the speed ratio. It also estimates the peers' 200-threshold AUPRO loop (AnomalyCLIP /
AF-CLIP style: per threshold, binarise every map and measure every region) from a few thresholds.
Part 2 times all four pixel metrics on a VisA-sized synthetic test set (VisA's 2,162 test images,
1,200 anomalous, at 518x518: 0.58 G pixels, float32 maps, bool masks) and reports peak memory.

Data are synthetic: maps are uniform noise plus a shift inside elliptic anomalies (1-3 per anomalous
image). Timings are wall-clock on whatever machine runs this; the values are not a test. Part 2 runs
twice: on a VM whose memory is backed lazily the first call also pays for first-touching the
(~2.3 GB) sort buffer.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from scipy import ndimage

from zsad_jax import metrics


def memory_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    if "VmRSS" in fields:
        return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return peak, peak


def synthetic_set(num_images, num_anomalous, size, max_radius, seed=0):
    """(N, size, size) float32 maps and bool masks with elliptic anomalies."""
    rng = np.random.default_rng(seed)
    maps = np.empty((num_images, size, size), np.float32)
    masks = np.zeros((num_images, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_images):
        maps[i] = rng.random((size, size), dtype=np.float32)
        if i < num_anomalous:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(0, size, 2)
                ry, rx = rng.integers(3, max_radius, 2)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            maps[i][masks[i]] += np.float32(0.4) * rng.random(dtype=np.float32)
    return maps, masks


def sklearn_pixel_metrics(maps, masks):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    labels, scores = masks.ravel(), maps.ravel()
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)  # fmt: skip
    return {
        "pixel_AUROC": roc_auc_score(labels, scores),
        "pixel_AP": average_precision_score(labels, scores),
        "pixel_F1max": float(f1.max()),
    }


def peer_aupro_seconds(maps, masks, probe_thresholds=3, num_thresholds=200):
    """Seconds the peers' loop would take: time a few of its 200 thresholds, scale up."""
    structure = np.ones((3, 3), bool)
    low, high = maps.min(), maps.max()
    thresholds = np.arange(np.float64(low), np.float64(high), np.float64(high - low) / 200)
    start = time.perf_counter()
    for threshold in thresholds[:: len(thresholds) // probe_thresholds][:probe_thresholds]:
        binary = maps > maps.dtype.type(threshold)
        overlaps = []
        for binary_map, mask in zip(binary, masks, strict=True):
            labelled, count = ndimage.label(mask, structure=structure)  # relabelled every time
            for k in range(1, count + 1):
                region = labelled == k
                overlaps.append(binary_map[region].sum() / region.sum())
        np.logical_and(~masks, binary).sum() / (~masks).sum()
    return (time.perf_counter() - start) / probe_thresholds * num_thresholds


def compare_with_sklearn(num_images, size, max_radius):
    maps, masks = synthetic_set(num_images, num_images * 1200 // 2162, size, max_radius, seed=1)
    print(f"\n[1] {num_images} maps at {size}x{size} = {maps.size / 1e6:.1f} M pixels, "
          f"{masks.mean():.2%} anomalous")  # fmt: skip
    start = time.perf_counter()
    reference = sklearn_pixel_metrics(maps, masks)
    sklearn_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = metrics.pixel_metrics(maps, masks)
    ours_s = time.perf_counter() - start
    for name, value in reference.items():
        print(f"    {name:12s} sklearn {value:.12f}  zsad_jax {ours[name]:.12f}  "
              f"|diff| {abs(value - ours[name]):.1e}")  # fmt: skip
    print(f"    pixel_AUPRO  zsad_jax {ours['pixel_AUPRO']:.12f} (exact; sklearn has none)")
    print(f"    sklearn AUROC+AP+F1max:        {sklearn_s:7.2f} s")
    print(
        f"    zsad_jax AUROC+AP+F1max+AUPRO: {ours_s:7.2f} s   -> {sklearn_s / ours_s:.1f}x faster"
    )
    peer_s = peer_aupro_seconds(maps, masks)
    print(f"    peers' 200-threshold AUPRO loop (estimated from 3 thresholds): {peer_s:.0f} s "
          f"-> {peer_s / ours_s:.0f}x our time for all four")  # fmt: skip


def visa_sized(num_images, num_anomalous, size, max_radius):
    maps, masks = synthetic_set(num_images, num_anomalous, size, max_radius, seed=2)
    rss, _ = memory_gib()
    print(f"\n[2] {num_images} maps ({num_anomalous} anomalous) at {size}x{size} = "
          f"{maps.size / 1e9:.3f} G pixels, {masks.mean():.2%} anomalous; "
          f"data in memory: {rss:.2f} GiB")  # fmt: skip
    for attempt in ("first call", "second call"):
        start = time.perf_counter()
        result = metrics.pixel_metrics(maps, masks)
        seconds = time.perf_counter() - start
        _, peak = memory_gib()
        print(f"    zsad_jax pixel AUROC+AP+F1max+AUPRO, {attempt}: {seconds:.1f} s, "
              f"peak RSS {peak:.2f} GiB (incl. the data)")  # fmt: skip
    for name, value in result.items():
        print(f"    {name:12s} {value:.6f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--size", type=int, default=518, help="map side (default 518)")
    parser.add_argument("--max-radius", type=int, default=60, help="largest anomaly half-axis")
    args = parser.parse_args()
    compare_with_sklearn(20 if args.quick else 100, args.size, args.max_radius)
    if args.quick:
        visa_sized(200, 111, args.size, args.max_radius)
    else:
        visa_sized(2162, 1200, args.size, args.max_radius)


if __name__ == "__main__":
    main()
