"""Named per-method preprocessing in NumPy/Pillow, exactly as the official code does on PIL images.

``make_transform(name, image_size, train)`` returns ``f(sample, rng) -> sample`` where ``sample`` is
the dict from ``decode.load_record`` and the result has ``image`` float32 (S, S, 3) normalised and
``gt_mask`` float32 (S, S) in {0, 1}; other fields pass through.

Names (methods.md §1.1, §2.1, §3.1):

- ``clip``: PIL ``resize((S, S), BICUBIC)`` (antialiased, as torchvision's ``Resize`` on a PIL
  image), ``/255``, CLIP mean/std. AF-CLIP train+test, ACD-CLIP test, DLVP-CLIP.
- ``dinov3``: PIL ``resize((S, S), BILINEAR)``, ImageNet mean/std. AVA-DINO.
- ``acd_clip_train``: ACD-CLIP's training augmentations (below) then ``clip``; with ``train=False``
  it is the ``clip`` transform (its test-time preprocessing).
- ``plain``: PIL bilinear, ``/255``, CLIP mean/std (the demo).

Masks are binarised (``> 0``) at full resolution by ``load_record`` and resized here with NEAREST by
default, so they stay binary and no region is lost or grown. The official codes differ, offered with
``mask_resize``: ``bicubic_threshold`` (AF-CLIP: bicubic on the 0/255 mask, then ``> 0.5``),
``bilinear_threshold`` (AnomalyCLIP, AVA-DINO on MVTec: bilinear, ``> 0.5``), ``bilinear_any``
(AVA-DINO on VisA: bilinear, ``> 0``, which slightly dilates regions), and ``bilinear_by_dataset``
(AVA-DINO: ``bilinear_any`` for VisA, ``bilinear_threshold`` otherwise, resolved by
``mask_resize_for`` from the side's dataset, so it stays right when ``--config.data.test_set``
changes).

ACD-CLIP training augmentations (``dataset/__init__.py:TextAndImageDataset``,
``utils.AddGaussianNoise``) in the official order, with their probabilities; randomness comes only
from the given ``np.random.Generator``, so a sample is reproducible from its seed (not bit-equal to
torch's RNG):

1. sparse multiplicative noise, p=0.3: on the pixels where an independent N(0,1) map exceeds 3
   (about 0.13 %), every channel becomes ``x * N(0,1)``, clamped to [0, 1]; the whole image is then
   converted back to uint8 with ``trunc(x * 255)`` as ``ToPILImage`` does (the round trip can lower
   values by 1);
2. brightness, contrast, saturation jitter, each applied with p=0.7, factor U(0.5, 1.5) (Pillow
   ``ImageEnhance``, what torchvision's ``ColorJitter`` calls on PIL images);
3. bicubic resize, ``/255``, CLIP normalisation; mask NEAREST;
4. jointly on image and mask: rotation by U(-30, 30) degrees with p=0.5, translation by
   ``round(U(-0.15, 0.15) * S)`` pixels in x and y with p=0.5, horizontal flip p=0.5, vertical flip
   p=0.5; nearest-neighbour sampling, zero fill (0 in normalised space, i.e. the mean colour),
   matching torchvision's tensor ``rotate``/``affine`` (``grid_sample``, ``align_corners=False``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRANSFORM_NAMES = ("clip", "dinov3", "acd_clip_train", "plain")
MASK_RESIZE_MODES = (
    "nearest", "bicubic_threshold", "bilinear_threshold", "bilinear_any", "bilinear_by_dataset",
)  # fmt: skip

# name -> (PIL resample filter for the image, normalisation mean, std)
_RECIPES = {
    "clip": (Image.Resampling.BICUBIC, CLIP_MEAN, CLIP_STD),
    "dinov3": (Image.Resampling.BILINEAR, IMAGENET_MEAN, IMAGENET_STD),
    "acd_clip_train": (Image.Resampling.BICUBIC, CLIP_MEAN, CLIP_STD),
    "plain": (Image.Resampling.BILINEAR, CLIP_MEAN, CLIP_STD),
}

Transform = Callable[..., dict[str, Any]]


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a named transform normalises with (for undoing it in visualisations)."""
    _check_name(name)
    return _RECIPES[name][1], _RECIPES[name][2]


def resize_filter(name: str) -> str:
    """The Pillow filter a named transform resizes images with, lower case (``"bicubic"``), for
    the exported model's description: serving with another filter gives other scores."""
    _check_name(name)
    return _RECIPES[name][0].name.lower()


def denormalize(image: np.ndarray, name: str) -> np.ndarray:
    """(..., 3) float image produced by transform ``name`` -> uint8 RGB."""
    mean, std = normalization(name)
    rgb = np.asarray(image, np.float32) * np.float32(std) + np.float32(mean)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _check_name(name: str) -> None:
    if name not in _RECIPES:
        raise ValueError(f"unknown transform {name!r}; known transforms: {list(TRANSFORM_NAMES)}")


def resize_image(image: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by Pillow (antialiased, as torchvision on PIL)."""
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def to_normalized_float(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 ``(x / 255 - mean) / std`` in torchvision's float32 op order."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def mask_resize_for(mode: str, dataset: str) -> str:
    """The mask mode a side of ``dataset`` uses: ``bilinear_by_dataset`` resolved (AVA-DINO's
    official data classes keep ``> 0`` for VisA and ``> 0.5`` for the others), others as given."""
    if mode == "bilinear_by_dataset":
        return "bilinear_any" if dataset == "visa" else "bilinear_threshold"
    return mode


def _check_mask_mode(mode: str) -> None:
    if mode not in MASK_RESIZE_MODES:
        raise ValueError(f"unknown mask_resize {mode!r}; known: {list(MASK_RESIZE_MODES)}")
    if mode == "bilinear_by_dataset":
        raise ValueError("mask_resize 'bilinear_by_dataset' depends on the dataset: pass "
                         "mask_resize_for(mode, dataset)")  # fmt: skip


def resize_mask(mask: np.ndarray, size: int, mode: str = "nearest") -> np.ndarray:
    """(H, W) bool -> (size, size) float32 in {0, 1}; ``mode`` one of ``MASK_RESIZE_MODES``."""
    _check_mask_mode(mode)
    pil = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    if mode == "nearest":
        return (np.asarray(pil.resize((size, size), Image.Resampling.NEAREST)) > 0).astype(
            np.float32
        )
    resample = (
        Image.Resampling.BICUBIC if mode == "bicubic_threshold" else Image.Resampling.BILINEAR
    )
    grey = np.asarray(pil.resize((size, size), resample)).astype(np.float32) / np.float32(255.0)
    threshold = 0.0 if mode == "bilinear_any" else 0.5
    return (grey > threshold).astype(np.float32)


# --- ACD-CLIP augmentations -----------------------------------------------------------------------


def sparse_multiplicative_noise(image: np.ndarray, rng: np.random.Generator, std: float = 1.0):
    """ACD-CLIP's ``AddGaussianNoise`` body (step 1 of the module docstring); uint8 in and out."""
    x = image.astype(np.float32) / np.float32(255.0)
    hit = rng.standard_normal(image.shape[:2]) > 3.0
    noise = (rng.standard_normal(image.shape) * std).astype(np.float32)
    x = np.where(hit[..., None], noise * x, x)
    x = np.clip(x, 0.0, 1.0)
    # ToPILImage: ``mul(255).byte()`` truncates.
    return (x * np.float32(255.0)).astype(np.uint8)


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, strength: float = 0.5, p: float = 0.7
):
    """Brightness, contrast, saturation jitter, each with probability ``p`` (uint8 in and out)."""
    pil = Image.fromarray(image)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        if rng.random() < p:
            factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
            pil = enhancer(pil).enhance(factor)
    return np.asarray(pil)


def _nearest_warp(x: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Samples (H, W, C) ``x`` at ``inverse @ p`` for every centred output pixel p.

    Pixel centres are at ``j - W/2 + 0.5`` (torchvision's affine grid); rounding is half-to-even
    like ``grid_sample(mode="nearest")``; out-of-range samples are 0.
    """
    h, w = x.shape[:2]
    xs = np.arange(w, dtype=np.float32) - np.float32(w * 0.5) + np.float32(0.5)
    ys = np.arange(h, dtype=np.float32) - np.float32(h * 0.5) + np.float32(0.5)
    gx, gy = np.meshgrid(xs, ys)
    inv = inverse.astype(np.float32)
    src_x = inv[0, 0] * gx + inv[0, 1] * gy + np.float32(w * 0.5) - np.float32(0.5)
    src_y = inv[1, 0] * gx + inv[1, 1] * gy + np.float32(h * 0.5) - np.float32(0.5)
    col = np.rint(src_x).astype(np.int64)
    row = np.rint(src_y).astype(np.int64)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = x[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)]
    return np.where(inside[..., None], out, np.zeros((), x.dtype))


def rotate_nearest(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates (H, W, C) counter-clockwise about the centre, nearest sampling, zero fill."""
    a = math.radians(degrees)
    # With x right and y down, output pixel p samples the input at [[c, -s], [s, c]] p; for a = 90
    # the pixel right of the centre takes the one below it: a counter-clockwise turn on screen.
    inverse = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _nearest_warp(x, inverse)


def translate(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Shifts (H, W, C) right by ``dx`` and down by ``dy`` pixels, zero fill."""
    out = np.zeros_like(x)
    h, w = x.shape[:2]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src = x[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    out[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


def acd_clip_geometric(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 of the module docstring on a normalised (S, S, 3) image and (S, S) mask."""
    stacked = np.concatenate([image, mask[..., None]], axis=-1)
    size = stacked.shape[1]
    if rng.random() < 0.5:
        stacked = rotate_nearest(stacked, rng.uniform(-30.0, 30.0))
    if rng.random() < 0.5:
        max_shift = 0.15 * size
        dx = int(round(rng.uniform(-max_shift, max_shift)))
        dy = int(round(rng.uniform(-max_shift, max_shift)))
        stacked = translate(stacked, dx, dy)
    if rng.random() < 0.5:
        stacked = stacked[:, ::-1]
    if rng.random() < 0.5:
        stacked = stacked[::-1]
    stacked = np.ascontiguousarray(stacked)
    return stacked[..., :3], stacked[..., 3]


# --- the factory ----------------------------------------------------------------------------------


def make_transform(
    name: str, image_size: int, train: bool = False, *, mask_resize: str = "nearest"
) -> Transform:
    """Builds the named preprocessing (module docstring).

    Args:
      name: one of ``TRANSFORM_NAMES``.
      image_size: output side S.
      train: enables random augmentation (only ``acd_clip_train`` has any); the others ignore it.
      mask_resize: one of ``MASK_RESIZE_MODES``.

    Returns:
      ``f(sample, rng=None) -> dict``: ``image`` float32 (S, S, 3), ``gt_mask`` float32 (S, S) in
      {0, 1}, every other field of ``sample`` unchanged. ``rng`` (``np.random.Generator``) is
      required only when the transform is random.
    """
    _check_name(name)
    _check_mask_mode(mask_resize)
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resample, mean, std = _RECIPES[name]
    size = int(image_size)
    augment = train and name == "acd_clip_train"

    def transform(sample: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        image = np.asarray(sample["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"transform {name!r} expects image uint8 (H, W, 3) from load_record, got "
                f"{image.dtype} {image.shape} for {sample.get('path', '<unknown>')}"
            )
        if augment:
            if rng is None:
                raise ValueError("transform 'acd_clip_train' with train=True needs an rng")
            if rng.random() >= 0.7:
                image = sparse_multiplicative_noise(image, rng)
            image = color_jitter(image, rng)
        out = dict(sample)
        out["image"] = to_normalized_float(resize_image(image, size, resample), mean, std)
        out["gt_mask"] = resize_mask(sample["gt_mask"], size, mask_resize)
        if augment:
            out["image"], out["gt_mask"] = acd_clip_geometric(out["image"], out["gt_mask"], rng)
        return out

    transform.__name__ = f"{name}_{size}{'_train' if augment else ''}"
    return transform
