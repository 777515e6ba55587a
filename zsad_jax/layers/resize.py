"""Bilinear resize with PyTorch's exact sampling grid (``F.interpolate(mode="bilinear")``).

``jax.image.resize`` cannot stand in for it: it antialiases when downsampling (torch's default
``antialias=False`` does not, e.g. AF-CLIP's 518 -> 37 ground-truth resize) and it has no
``align_corners=True`` (AVA-DINO's and ACD-CLIP's map upsampling).

Torch's grid, per axis with input length ``n_in`` and output length ``n_out``:

- ``align_corners=False``: ``src = (dst + 0.5) * n_in / n_out - 0.5``, clamped below at 0;
- ``align_corners=True``: ``src = dst * (n_in - 1) / (n_out - 1)`` (0 when ``n_out == 1``);

then ``i0 = floor(src)`` (at most ``n_in - 1``), ``i1 = min(i0 + 1, n_in - 1)``,
``lambda = src - i0`` and ``out = (1 - lambda) * x[i0] + lambda * x[i1]``. The grid and weights are
computed on the host in the same precision torch uses (float32 for float32 and narrower inputs), and
``src`` is rounded once, as the fused multiply-add torch's compiled kernels use does; the
interpolation is two static-index takes and a weighted add per axis, W first and H second, the
order torch's kernel nests them in. No matmul, so no backend matmul-precision setting can change the
result.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np


def _fused_multiply_subtract_half(
    scale: np.floating, offsets: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """``scale * offsets - 0.5`` rounded once to ``dtype`` (what an FMA returns).

    float32: the float64 product of two float32 numbers, and the subtraction of 0.5 for results
    that stay >= 0, are exact, so one cast rounds once. float64: exact rational arithmetic.
    """
    if dtype == np.float32:
        return (np.float64(scale) * offsets.astype(np.float64) - 0.5).astype(np.float32)
    exact_scale = Fraction(float(scale))
    return np.array(
        [float(exact_scale * Fraction(float(o)) - Fraction(1, 2)) for o in offsets], np.float64
    )


def _source_grid(
    n_in: int, n_out: int, align_corners: bool, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch's two source indices and the weight of the second, per output position.

    Returns:
      ``(i0, i1, lam)``, each (n_out,): int32, int32, ``dtype``.
    """
    if align_corners:
        scale = dtype.type(n_in - 1) / dtype.type(n_out - 1) if n_out > 1 else dtype.type(0)
        src = np.arange(n_out).astype(dtype) * scale
    else:
        scale = dtype.type(n_in) / dtype.type(n_out)
        # torch's compiled kernels contract scale * (dst + 0.5) - 0.5 into one FMA (a single
        # rounding), which moves some weights by an ulp against two roundings; round once too.
        src = _fused_multiply_subtract_half(scale, np.arange(n_out) + 0.5, dtype)
        src = np.maximum(src, dtype.type(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0.astype(np.int32), i1.astype(np.int32), lam


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool = False) -> np.ndarray:
    """(n_out, n_in) float32 weights of the same 1-D resize, for callers that apply it as a matrix
    product (CLIP's positional grid, ``zsad_jax.encoders.clip.resize_grid``)."""
    i0, i1, lam = _source_grid(n_in, n_out, align_corners, np.dtype(np.float32))
    weights = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, i0), np.float32(1) - lam)
    np.add.at(weights, (rows, i1), lam)  # i1 == i0 at the last input: the weights add up to 1
    return weights


def _interpolate_axis(
    x: jax.Array, axis: int, n_out: int, align_corners: bool, host_dtype: np.dtype
) -> jax.Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x  # both of torch's grids are exactly the identity here.
    i0, i1, lam = _source_grid(n_in, n_out, align_corners, host_dtype)
    shape = [1] * x.ndim
    shape[axis] = n_out
    lam = jnp.asarray(lam.reshape(shape), x.dtype)
    first = jnp.take(x, jnp.asarray(i0), axis=axis, mode="clip")
    second = jnp.take(x, jnp.asarray(i1), axis=axis, mode="clip")
    return (1 - lam) * first + lam * second


def resize_bilinear(
    x: jax.Array, size: int | Sequence[int], align_corners: bool = False
) -> jax.Array:
    """Resizes like ``torch.nn.functional.interpolate(mode="bilinear", antialias=False)``.

    Args:
      x: (B, H, W, C) channels-last, or (B, H, W) maps; any float dtype.
      size: output (H', W'), or one int for a square output.
      align_corners: torch's flag of the same name.

    Returns:
      (B, H', W', C) or (B, H', W'), in the dtype of ``x``; float16/bfloat16 inputs are
      interpolated in float32 (torch's CPU kernel does the same) and cast back.
    """
    if x.ndim not in (3, 4):
        raise ValueError(
            "zsad_jax/layers/resize.py: resize_bilinear expects (B, H, W, C) or (B, H, W), got "
            f"shape {tuple(x.shape)}; move channels last (NCHW -> NHWC) before resizing."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"zsad_jax/layers/resize.py: resize_bilinear needs a float array, got {x.dtype}; "
            "cast with x.astype(jnp.float32) first."
        )
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"zsad_jax/layers/resize.py: size must be positive, got {size}.")
    maps = x.ndim == 3
    if maps:
        x = x[..., None]
    out_dtype = x.dtype
    # Torch computes the grid and the blend in float64 only for float64 tensors.
    compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    host_dtype = np.dtype(np.float64 if compute == jnp.float64 else np.float32)
    y = x.astype(compute)
    y = _interpolate_axis(y, 2, out_w, align_corners, host_dtype)
    y = _interpolate_axis(y, 1, out_h, align_corners, host_dtype)
    y = y.astype(out_dtype)
    return y[..., 0] if maps else y
