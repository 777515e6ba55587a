"""Host input pipeline: decode + resize + normalise per CPU core, and the cores for 550 img/s.

Run:
  .venv/bin/python bench/pipeline.py            # 12 files per kind, 3 passes
  .venv/bin/python bench/pipeline.py --small    # 3 files per kind, 1 pass (well under a minute)
  .venv/bin/python bench/pipeline.py --target=1000 --threads=16

Files (generated into a temporary directory, removed afterwards): MVTec AD-like PNGs (square,
700-1024 px, the range of MVTec AD's categories) and VisA-like JPEGs (1500x1000, quality 95), each
rendered by the synthetic benchmark's scene generator at 256 px, upscaled and given sensor noise
(sigma 3 grey levels) so that they compress like photographs rather than flat drawings. Half are
anomalous with a binary PNG mask, as in the test splits.

Measured per (file kind, method size): one example through what the input pipeline runs for it,
``zsad_jax.data.decode.load_record`` (image and mask decode) then ``transforms.make_transform``
(resize, ``/255``, normalise; mask resize) at the methods' sizes: 518 ``clip`` (AF-CLIP, ACD-CLIP,
DLVP-CLIP), 512 ``dinov3`` (AVA-DINO), 336 ``clip`` (ViT-L/14@336's native size). Images/s per core
is images / CPU seconds of the one thread doing the work (``time.thread_time``: decode, resize and
normalise are single-threaded, and CPU time does not count the time other processes on a shared
machine take the core); wall-clock images/s of that thread is printed too. Cores for the target
rate = ceil(target / (images/s per core)), i.e. assuming the work spreads over cores linearly;
the last row checks that on this machine: ``pipeline.eval_batches`` with ``--threads`` reader
threads (default: every core), wall-clock images/s over all of them.

Output: one JSON line per figure, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (method image size, transform name, the methods using it)
SIZES = (
    (518, "clip", "af_clip/acd_clip/dlvp_clip"),
    (512, "dinov3", "ava_dino"),
    (336, "clip", "-"),
)
TARGET_IMAGES_PER_S = 550.0
CATEGORIES = ("screw", "washer", "wood", "chip")


def _render(index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A photograph-like (H, W, 3) uint8 image and its (H, W) bool mask (empty for normals)."""
    from PIL import Image

    from zsad_jax.data import synthetic

    anomalous = index % 2 == 1
    image, mask = synthetic.render_image(
        CATEGORIES[index % len(CATEGORIES)],
        seed=0,
        image_size=256,
        split="test",
        defect="scratch" if anomalous else None,
        index=index,
    )
    width, height = size
    big = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    noise = np.random.default_rng(index).normal(0.0, 3.0, big.shape)
    big = np.clip(big + noise, 0, 255).astype(np.uint8)
    big_mask = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    )
    return big, big_mask > 0


def _file_sizes(kind: str, count: int) -> list[tuple[int, int]]:
    if kind == "visa_jpeg":
        return [(1500, 1000)] * count
    sides = np.linspace(700, 1024, count).round().astype(int) if count > 1 else [1024]
    return [(int(s), int(s)) for s in sides]


def write_files(root: Path, kind: str, count: int) -> list:
    """``count`` image files (and masks for the anomalous half) of ``kind``; their Records."""
    from PIL import Image

    from zsad_jax.data.records import Record

    records = []
    for i, size in enumerate(_file_sizes(kind, count)):
        image, mask = _render(i, size)
        if kind == "visa_jpeg":
            path = root / f"{kind}_{i:03d}.JPG"
            Image.fromarray(image).save(path, format="JPEG", quality=95)
        else:
            path = root / f"{kind}_{i:03d}.png"
            Image.fromarray(image).save(path, format="PNG")  # Pillow's default level, as MVTec's
        mask_path = None
        if mask.any():
            mask_path = root / f"{kind}_{i:03d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path, format="PNG")
        records.append(
            Record(
                path=str(path),
                category=CATEGORIES[i % len(CATEGORIES)],
                gt_label=int(mask_path is not None),
                mask_path=None if mask_path is None else str(mask_path),
                defect_type="scratch" if mask_path else "good",
                has_mask=mask_path is not None,
            )
        )
    return records


def measure_one_core(records, image_size: int, transform_name: str, passes: int) -> dict:
    """decode + transform of every record ``passes`` times in this thread: CPU and wall time."""
    from zsad_jax.data import decode, transforms

    transform = transforms.make_transform(transform_name, image_size)
    decode_cpu = transform_cpu = 0.0
    wall0 = time.perf_counter()
    for _ in range(passes):
        for record in records:
            t0 = time.thread_time()
            sample = decode.load_record(record)
            t1 = time.thread_time()
            out = transform(sample)
            decode_cpu += t1 - t0
            transform_cpu += time.thread_time() - t1
            assert out["image"].shape == (image_size, image_size, 3)
    wall = time.perf_counter() - wall0
    n = passes * len(records)
    cpu = decode_cpu + transform_cpu
    return {
        "images": n,
        "images_per_s_per_core": round(n / cpu, 2),
        "images_per_s_wall_one_thread": round(n / wall, 2),
        "decode_ms": round(1e3 * decode_cpu / n, 2),
        "transform_ms": round(1e3 * transform_cpu / n, 2),
    }


def measure_threads(records, image_size: int, transform_name: str, threads: int, batches: int):
    """Wall-clock images/s through ``pipeline.eval_batches`` with ``threads`` reader threads, after
    the first batch (grain's start-up and thread pool are not per-image costs)."""
    from zsad_jax.data import pipeline, transforms

    batch_size = 8
    repeats = math.ceil((batches + 1) * batch_size / len(records))
    source = pipeline.RecordSource(list(records) * repeats)
    iterator = iter(
        pipeline.eval_batches(
            source,
            batch_size=batch_size,
            transform=transforms.make_transform(transform_name, image_size),
            process_index=0,
            process_count=1,
            read_threads=threads,
        )
    )
    next(iterator)
    t0 = time.perf_counter()
    n = sum(int(batch["valid"].sum()) for batch in iterator)
    wall = time.perf_counter() - t0
    return {"images": n, "threads": threads, "images_per_s": round(n / wall, 2)}


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def _table(rows: list[dict], target: float) -> str:
    lines = [
        f"| files | size | transform | img/s per core (CPU time) | img/s one thread (wall) "
        f"| decode ms | transform ms | cores for {target:g} img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "images_per_s_per_core" in r:
            lines.append(
                f"| {r['files']} | {r['image_size']} | {r['transform']} | "
                f"{r['images_per_s_per_core']:.1f} | {r['images_per_s_wall_one_thread']:.1f} | "
                f"{r['decode_ms']:.1f} | {r['transform_ms']:.1f} | {r['cores_for_target']} |"
            )
    for r in rows:
        if "threads" in r:
            lines.append(
                f"| {r['files']} | {r['image_size']} | {r['transform']} | eval_batches, "
                f"{r['threads']} threads: {r['images_per_s']:.1f} img/s wall "
                f"({r['scaling']:.2f} of threads x per-core) | | | | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="3 files per kind, 1 pass")
    parser.add_argument("--files", type=int, default=None, help="files per kind (default 12)")
    parser.add_argument("--passes", type=int, default=None, help="passes over them (default 3)")
    parser.add_argument("--target", type=float, default=TARGET_IMAGES_PER_S, help="images/s")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for the last row")
    parser.add_argument(
        "--thread-batches",
        type=int,
        default=None,
        help="batches of 8 the last row times (default 4 per pass); the tests take 1 to save time",
    )
    args = parser.parse_args(argv)
    files = args.files or (3 if args.small else 12)
    passes = args.passes or (1 if args.small else 3)
    thread_batches = args.thread_batches or 4 * passes
    print(
        f"# bench/pipeline.py: {files} files per kind, {passes} pass(es), "
        f"{os.cpu_count()} cores, target {args.target:g} img/s",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="zsad_pipeline_bench_"))
    rows = []
    try:
        for kind in ("mvtec_png", "visa_jpeg"):
            records = write_files(root, kind, files)
            mean_bytes = np.mean([os.path.getsize(r.path) for r in records])
            for size, name, _ in SIZES:
                row = {"files": kind, "file_kib": round(mean_bytes / 1024), "image_size": size}
                row |= {"transform": name, **measure_one_core(records, size, name, passes)}
                row["cores_for_target"] = math.ceil(args.target / row["images_per_s_per_core"])
                rows.append(row)
                _emit(row)
            size, name, _ = SIZES[0]
            threaded = measure_threads(records, size, name, args.threads, thread_batches)
            per_core = rows[-len(SIZES)]["images_per_s_per_core"]
            threaded |= {"files": kind, "image_size": size, "transform": name}
            threaded["scaling"] = round(threaded["images_per_s"] / (args.threads * per_core), 3)
            rows.append(threaded)
            _emit(threaded)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n" + _table(rows, args.target), flush=True)


if __name__ == "__main__":
    main()
