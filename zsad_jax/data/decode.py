"""Decoding image and mask files into the arrays every transform starts from.

Format policy (users' medical and industrial sets mix all of these; USERS.md item 7):

- RGB: as stored. 16-bit RGB PNGs are reduced to 8 bits by Pillow itself (it keeps the high byte).
- Grayscale (``L``, ``1``): replicated to three channels.
- Alpha (``RGBA``, ``LA``, ``PA``): the alpha channel is **dropped**, not composited. That is what
  ``Image.open(p).convert("RGB")`` does in every official code base we reproduce, so numbers stay
  comparable; compositing on black would darken transparent pixels that the reference code sees.
- Palette (``P``): mapped through its palette (transparency ignored, as above).
- 16-bit grayscale (``I;16*``) and 32-bit integer (``I``): values are scaled with
  ``round(v * 255 / (2**bits - 1))``, ``bits`` = ``image_bit_depth`` (default 16; config
  ``data.image_bit_depth``; larger values clip). Pillow's own ``convert`` clips them at 255 instead,
  which turns most 16-bit images white. Inspection cameras often store 12 bits in a 16-bit file:
  read as 16-bit such an image is nearly black, so the first one met (every value below 4096) gets
  a note naming ``--config.data.image_bit_depth=12``.
- Float (``F``): there is no fixed range, so each image is min-max scaled to 0..255.
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB.
- Multi-frame files (GIF, TIFF stacks): the first frame. EXIF orientation is NOT applied (the
  official code does not, and the masks are drawn on the stored pixel grid).

Untrusted files: an image or mask whose header claims more than ``max_pixels`` pixels (default
``DEFAULT_MAX_IMAGE_PIXELS``; config ``data.image_max_pixels``) is refused with a ``DataError``
*before* its pixels are decoded, so a decompression bomb (a few hundred bytes claiming
50,000 x 50,000 px) costs no memory and counts as a corrupt file under ``skip_corrupt``.

Masks: a pixel is anomalous when any colour channel is non-zero (above ``data.mask_threshold``,
default 0; alpha ignored; palette masks through their palette, 16-bit masks on the raw values). A
mask of many grey values (anti-aliased, JPEG) and a defect image's empty mask each get a note. This
binarisation happens at full resolution, before any resizing: VisA masks hold region ids 1..k and
MVTec LOCO uses 236..255, so ``== 255`` would lose regions and resizing before binarising creates
grey values. A mask path may also be a directory of mask files (MVTec LOCO stores one file per
defect region); their union is the mask.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from zsad_jax.data.records import Record

# The one list of image file extensions: the dataset readers, ``predict``'s folder search and mask
# directories all use it, so a file one of them accepts is never silently skipped by another.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Formats of inspection, camera and medical images that this decoder does not read (DICOM, NIfTI,
# NRRD, MetaImage, HEIF, camera raw, whole-slide, OpenEXR). A folder's files of these kinds are
# counted in a note (``unread_images_note``), not passed over without a word as other files are.
UNREAD_IMAGE_EXTENSIONS = (
    ".dcm", ".dicom", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".heic", ".heif", ".dng",
    ".cr2", ".nef", ".arw", ".svs", ".ndpi", ".exr",
)  # fmt: skip


def unread_images_note(names: Iterable[str]) -> str | None:
    """What a note says of the ``UNREAD_IMAGE_EXTENSIONS`` files among ``names`` (``3 .dcm``),
    or None where there are none."""
    counts = collections.Counter(
        next((kind for kind in UNREAD_IMAGE_EXTENSIONS if name.lower().endswith(kind)), None)
        for name in names
    )
    counts.pop(None, None)
    if not counts:
        return None
    total, kinds = sum(counts.values()), ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return (
        f"{total} file{'s' if total != 1 else ''} in a format not decoded here ({kinds}) "
        f"{'were' if total != 1 else 'was'} not read; convert to PNG or TIFF to include "
        f"{'them' if total != 1 else 'it'} (read: {', '.join(IMAGE_EXTENSIONS)})"
    )


# The largest image Pillow itself agrees to open (2 x its ``MAX_IMAGE_PIXELS`` default of
# 89,478,485; above that ``Image.open`` raises ``DecompressionBombError``): 178,956,970 px, about
# 512 MiB as decoded RGB. Accepting up to it keeps what decoded before this check existed; lower it
# (``data.image_max_pixels``) on machines that read many files in parallel.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# The bits a 16/32-bit integer image's values use (config data.image_bit_depth; module docstring).
DEFAULT_BIT_DEPTH = 16
# A mask pixel is anomalous above this value (config data.mask_threshold; module docstring).
DEFAULT_MASK_THRESHOLD = 0
# Region-id masks (VisA: 1..k) hold a few values; anti-aliased or JPEG-compressed ones many.
GRADED_MASK_VALUES = 16
# Each note once per process: one such file usually means a whole set of them.
_NOTED = {kind: threading.Event() for kind in ("fewer bits", "graded mask", "empty mask")}


def _note_once(kind: str, message: str) -> None:
    if not _NOTED[kind].is_set():
        _NOTED[kind].set()
        print(f"note: {message}", file=sys.stderr)


# ``warnings.catch_warnings`` swaps process-wide state; the reader threads must not interleave it.
_WARNINGS_LOCK = threading.Lock()

CORRUPT_ADVICE = (
    "replace it, delete it, or skip such files with --config.data.skip_corrupt=True "
    "(train/evaluate) or --skip_corrupt (predict)"
)


class DataError(ValueError):
    """A dataset file cannot be used: unreadable, corrupt, or inconsistent with its pair.

    Attributes:
      path: the offending file (the pipeline reports these when it skips corrupt examples).
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def _open_header(path: str, what: str) -> Image.Image:
    """``Image.open`` (reads the header only), with Pillow's bomb warning/error as ``DataError``."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # Our own size check (``_check_size``) decides; Pillow's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as e:
            raise DataError(
                f"{what} file {path} claims more pixels than Pillow opens at all ({e}); a "
                f"decompression bomb or an image too large to use: {CORRUPT_ADVICE}",
                path,
            ) from e


def _check_size(img: Image.Image, path: str, what: str, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise DataError(
            f"{what} file {path} claims {width}x{height} = {width * height:,} px, more than the "
            f"limit of {max_pixels:,} px: a decompression bomb, or a real image too large (raise "
            f"--config.data.image_max_pixels, at most {DEFAULT_MAX_IMAGE_PIXELS:,}); "
            f"{CORRUPT_ADVICE}",
            path,
        )


def _open(path: str, what: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Opens and fully decodes ``path`` (lazy decoding would hide truncation until later).

    The pixel count is checked on the header, before ``load()`` allocates anything.
    """
    try:
        img = _open_header(path, what)
    except FileNotFoundError as e:
        raise DataError(f"{what} file not found: {path}", path) from e
    except DataError:
        raise  # already says what is wrong and what to do (a DataError is a ValueError too)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise _undecodable(path, what, e) from e
    try:
        _check_size(img, path, what, max_pixels)
        img.seek(0)
        img.load()
    except DataError:
        img.close()  # release the file handle now: a refused file is not read again
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        img.close()
        raise _undecodable(path, what, e) from e
    return img


def _undecodable(path: str, what: str, e: BaseException) -> DataError:
    # Pillow raises OSError for truncated data, UnidentifiedImageError for garbage, and a few
    # plugins raise SyntaxError/ValueError for malformed headers.
    return DataError(
        f"cannot decode {what} file {path} ({type(e).__name__}: {e}); the file is corrupt or "
        f"not an image: {CORRUPT_ADVICE}",
        path,
    )


def _to_rgb_uint8(img: Image.Image, bit_depth: int = 16) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 following the module's format policy."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        top = float(2**bit_depth - 1)
        gray = np.round(np.clip(values, 0, top) * (255.0 / top)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        gray = np.round(np.nan_to_num(scaled, nan=0.0) * 255.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_image(
    path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, bit_depth: int = DEFAULT_BIT_DEPTH
) -> np.ndarray:
    """Reads any supported image file as (H, W, 3) uint8 RGB; ``DataError`` names a bad file.

    ``max_pixels``: files whose header claims more pixels are refused before decoding.
    ``bit_depth``: the bits used by 16/32-bit integer images (module docstring).
    """
    img = _open(path, "image", max_pixels)
    if bit_depth == 16 and img.mode.startswith("I;16"):
        _note_if_fewer_bits(img, path)
    try:
        return _to_rgb_uint8(img, bit_depth)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot convert image {path} (mode {img.mode}) to RGB: {e}", path) from e


def _note_if_fewer_bits(img: Image.Image, path: str) -> None:
    if _NOTED["fewer bits"].is_set():
        return
    _, top = img.getextrema()
    if 0 < top < 4096:
        _note_once(
            "fewer bits",
            f"{path} is a 16-bit image whose values stay below 4096 (at most {top}): read as "
            "16-bit it is nearly black. If the camera wrote 12 bits, pass "
            "--config.data.image_bit_depth=12 (10, 14: likewise)",
        )


def _mask_foreground(
    img: Image.Image, threshold: int = DEFAULT_MASK_THRESHOLD, path: str = ""
) -> np.ndarray:
    """Any Pillow mode -> (H, W) bool, True where a channel of the mask is above ``threshold``."""
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
    elif img.mode == "P":
        img = img.convert("RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    values = np.asarray(img)
    if threshold == DEFAULT_MASK_THRESHOLD:
        _note_if_graded(values, path)
    if values.ndim == 3:
        return np.any(values > threshold, axis=-1)
    return values > threshold


def _note_if_graded(values: np.ndarray, path: str) -> None:
    if _NOTED["graded mask"].is_set() or values.dtype != np.uint8:
        return
    distinct = len(np.unique(values))  # uint8: ~3 ms per 1 Mpx mask, as a bincount
    if distinct > GRADED_MASK_VALUES:
        _note_once(
            "graded mask",
            f"mask {path} holds {distinct} distinct values (anti-aliased edges or JPEG "
            "compression?): every value above 0 counts as defect. To count only the strong ones, "
            "pass e.g. --config.data.mask_threshold=127; better, save masks losslessly as 0/255",
        )


def load_mask(
    path: str,
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    threshold: int = DEFAULT_MASK_THRESHOLD,
) -> np.ndarray:
    """Reads a mask file (or a directory of region masks) as (H, W) bool, ``True`` = anomalous:
    a pixel whose value (any channel) is above ``threshold`` (config ``data.mask_threshold``)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"mask directory {path} holds no image files", path)
        masks = [
            load_mask(os.path.join(path, f), max_pixels=max_pixels, threshold=threshold)
            for f in files
        ]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1:
            raise DataError(f"mask directory {path} mixes sizes {sorted(shapes)}", path)
        return np.logical_or.reduce(masks)
    return _mask_foreground(_open(path, "mask", max_pixels), threshold, path)


def _resize_mask_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    small = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(small.resize((width, height), Image.Resampling.NEAREST)) > 0


def load_record(
    record: Record,
    *,
    resize_mismatched_mask: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    bit_depth: int = DEFAULT_BIT_DEPTH,
    mask_threshold: int = DEFAULT_MASK_THRESHOLD,
) -> dict[str, Any]:
    """Loads one record's image and pixel ground truth.

    Args:
      record: from a reader in ``zsad_jax.data.readers``.
      resize_mismatched_mask: if a mask's size differs from its image's, resize it (nearest, after
        binarising) instead of raising. Off by default: a size mismatch usually means a mis-paired
        file. Config: ``data.resize_mismatched_mask``.
      max_pixels: refuse image and mask files whose header claims more pixels (module docstring).
        Config: ``data.image_max_pixels``.
      bit_depth: the bits used by 16/32-bit integer images. Config: ``data.image_bit_depth``.
      mask_threshold: a mask pixel is anomalous above this value. Config: ``data.mask_threshold``.

    Returns:
      ``image`` (H, W, 3) uint8 RGB; ``gt_mask`` (H, W) bool, all False for normal images and for
      images without pixel ground truth; ``has_mask`` bool; ``gt_label`` int; ``category`` str;
      ``path`` str.

    Raises:
      DataError: unreadable/corrupt image or mask (the message names the file), or a size mismatch.
    """
    image = load_image(record.path, max_pixels=max_pixels, bit_depth=bit_depth)
    height, width = image.shape[:2]
    gt_mask = np.zeros((height, width), dtype=bool)
    # Normal images have an implicit empty mask; a mask file listed for them is ignored on purpose
    # (some dataset indices point normal images at placeholder files).
    if record.gt_label and record.has_mask:
        if not record.mask_path:
            raise DataError(
                f"record for {record.path} says has_mask=True but has no mask_path; fix the reader "
                "or dataset index (use has_mask=False for image-level labels)",
                record.path,
            )
        mask = load_mask(record.mask_path, max_pixels=max_pixels, threshold=mask_threshold)
        if not mask.any():
            _note_once(
                "empty mask",
                f"the mask of defect image {record.path} ({record.mask_path}) is empty: all its "
                "pixels count as normal in the pixel metrics. Check the mask, or list the image "
                "without one",
            )
        if mask.shape != (height, width):
            if not resize_mismatched_mask:
                raise DataError(
                    f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its "
                    f"image {record.path} is {width}x{height}; a mask must have its image's size. "
                    "Check the image/mask pairing, or set "
                    "--config.data.resize_mismatched_mask=True to resize masks (nearest-neighbour)",
                    record.mask_path,
                )
            mask = _resize_mask_nearest(mask, height, width)
        gt_mask = mask
    return {
        "image": image,
        "gt_mask": gt_mask,
        "has_mask": bool(record.has_mask),
        "gt_label": int(record.gt_label),
        "category": record.category,
        "path": record.path,
    }
