"""Single-level 2-D Haar wavelet transform and its inverse (DLVP-CLIP's HFD block).

Written out by hand, so nothing wavelet-specific is needed at run time: a 2×2 block
``[[a, b], [c, d]]`` of the (H, W) plane maps to four coefficients

    ll = (a + b + c + d) / 2      approximation            (pywt ``cA``)
    lh = (a + b - c - d) / 2      detail along H, low in W  (pywt ``cH``, "horizontal")
    hl = (a - b + c - d) / 2      detail along W, low in H  (pywt ``cV``, "vertical")
    hh = (a - b - c + d) / 2      detail along both         (pywt ``cD``, "diagonal")

which is exactly ``pywt.dwt2(x, "haar", axes=(H, W))`` (filters ±1/√2 per axis, so 1/2 in 2-D, and
pywt's detail filter gives ``x[2i] - x[2i+1]``). The transform is orthonormal: energy is preserved
and the inverse uses the same four sign patterns.

Odd sizes (the 37×37 CLIP grid): the last row/column is repeated once before the transform, so an
odd side n gives (n + 1) // 2 coefficients. A one-sample edge repeat is the same as PyWavelets'
default ``mode="symmetric"`` (half-sample symmetric extension) for a length-2 filter, so the
coefficients equal pywt's for odd sizes too. ``haar_idwt2(..., size=(H, W))`` crops the repeated
row/column again, so ``haar_idwt2(*haar_dwt2(x), size=x.shape[-3:-1]) == x`` for every size
(pywt's ``idwt2`` returns the even size and leaves the crop to the caller).

Only strided slices, pads, adds and a multiply by 1/2 (exact in every float dtype): jit-able,
differentiable and fine with a batch sharded over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SubBands = tuple[jax.Array, jax.Array, jax.Array]


def _check_rank(x: jax.Array, name: str) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"zsad_jax/layers/haar.py: {name} must be (..., H, W, C) channels-last with at least 3 "
            f"dims, got shape {tuple(x.shape)}; add a trailing channel axis with x[..., None]."
        )


def haar_dwt2(x: jax.Array) -> tuple[jax.Array, SubBands]:
    """One level of the 2-D Haar DWT over the H and W axes of a channels-last array.

    Args:
      x: (..., H, W, C), e.g. (B, H, W, C); any float dtype; H and W may be odd.

    Returns:
      ``(ll, (lh, hl, hh))``, each (..., (H + 1) // 2, (W + 1) // 2, C), in pywt's
      ``(cA, (cH, cV, cD))`` order and normalisation (see the module docstring; odd sides are
      extended by repeating the last row/column, as pywt's default ``mode="symmetric"`` does).
    """
    _check_rank(x, "x")
    height, width = x.shape[-3], x.shape[-2]
    # Repeat the last row/column of odd sides: identical to pywt's half-sample symmetric
    # extension for a length-2 filter. Slicing only the H/W axes (jnp.pad "edge" slices every
    # axis) keeps a batch sharded under explicit-sharding meshes.
    if height % 2:
        x = jnp.concatenate([x, x[..., height - 1 :, :, :]], axis=-3)
    if width % 2:
        x = jnp.concatenate([x, x[..., :, width - 1 :, :]], axis=-2)
    # Strided slices, not a (h, 2, w, 2) reshape: explicit-sharding meshes reject reshapes that
    # split an axis unless told the output sharding, while slices of unsharded axes always work.
    a = x[..., 0::2, 0::2, :]
    b = x[..., 0::2, 1::2, :]
    c = x[..., 1::2, 0::2, :]
    d = x[..., 1::2, 1::2, :]
    half = jnp.asarray(0.5, x.dtype)
    # Row sums/differences first, then columns: 8 adds instead of 12.
    top_sum, top_diff = a + b, a - b
    bottom_sum, bottom_diff = c + d, c - d
    ll = (top_sum + bottom_sum) * half
    lh = (top_sum - bottom_sum) * half
    hl = (top_diff + bottom_diff) * half
    hh = (top_diff - bottom_diff) * half
    return ll, (lh, hl, hh)


def haar_idwt2(
    ll: jax.Array,
    details: SubBands,
    size: tuple[int, int] | None = None,
) -> jax.Array:
    """Inverse of :func:`haar_dwt2`.

    Args:
      ll: (..., h, w, C) approximation coefficients (pywt ``cA``).
      details: ``(lh, hl, hh)``, each shaped like ``ll`` (pywt ``(cH, cV, cD)``).
      size: the (H, W) to return; each side must be 2h or 2h - 1 (resp. 2w, 2w - 1). ``None``
        returns (2h, 2w). Pass the input's size to undo the odd-size extension.

    Returns:
      (..., H, W, C) in the dtype of ``ll``.
    """
    _check_rank(ll, "ll")
    lh, hl, hh = details
    for name, band in (("lh", lh), ("hl", hl), ("hh", hh)):
        if band.shape != ll.shape:
            raise ValueError(
                f"zsad_jax/layers/haar.py: haar_idwt2 detail band {name} has shape "
                f"{tuple(band.shape)} but ll has {tuple(ll.shape)}; pass the four bands that "
                "haar_dwt2 returned."
            )
    half_h, half_w = ll.shape[-3], ll.shape[-2]
    half = jnp.asarray(0.5, ll.dtype)
    # Undo the column step, then the row step (the transform is its own inverse up to layout).
    top_sum = (ll + lh) * half
    bottom_sum = (ll - lh) * half
    top_diff = (hl + hh) * half
    bottom_diff = (hl - hh) * half
    a, b = top_sum + top_diff, top_sum - top_diff
    c, d = bottom_sum + bottom_diff, bottom_sum - bottom_diff
    # Interleave by interior padding (zeros between samples) and adding: like the forward
    # slices this never reshapes, so any sharding of the leading axes passes through.
    zero = jnp.zeros((), ll.dtype)
    lead_pad = [(0, 0, 0)] * (ll.ndim - 3)
    even, odd = (0, 1, 1), (1, 0, 1)
    x = (
        jax.lax.pad(a, zero, [*lead_pad, even, even, (0, 0, 0)])
        + jax.lax.pad(b, zero, [*lead_pad, even, odd, (0, 0, 0)])
        + jax.lax.pad(c, zero, [*lead_pad, odd, even, (0, 0, 0)])
        + jax.lax.pad(d, zero, [*lead_pad, odd, odd, (0, 0, 0)])
    )
    if size is None:
        return x
    height, width = int(size[0]), int(size[1])
    if height not in (2 * half_h, 2 * half_h - 1) or width not in (2 * half_w, 2 * half_w - 1):
        raise ValueError(
            f"zsad_jax/layers/haar.py: haar_idwt2 size={tuple(size)} does not fit sub-bands of "
            f"{half_h}x{half_w}; each side must be 2n or 2n-1 (give the shape haar_dwt2 was called "
            "on)."
        )
    return x[..., :height, :width, :]
