"""Parameter-free high-frequency operators on channels-last feature grids (DLVP-CLIP's HFD and the
Sobel alternative of its ablation). The Haar wavelet itself is :mod:`zsad_jax.layers.haar`.

- :func:`sobel_gradients`: per-channel (depthwise) 3x3 Sobel responses ``(gx, gy)``, i.e.
  ``scipy.ndimage.sobel(x, axis=W)`` / ``axis=H`` with ``mode="nearest"`` (edge samples
  repeated), the same as ``torch.nn.functional.conv2d`` with the Sobel kernels after
  ``F.pad(..., mode="replicate")``.
- :func:`sobel_magnitude`: ``sqrt(gx**2 + gy**2 + eps)``; ``eps`` keeps the gradient finite on flat
  regions (``sqrt`` has an infinite slope at 0).

Only pads, slices and adds: jit-able, differentiable, any grid size (odd 37x37 included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HERE = "zsad_jax/layers/frequency.py"


def _check_grid(x: jax.Array) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"{_HERE}: expects a channels-last grid (..., H, W, C), got shape {tuple(x.shape)}; "
            "add a trailing channel axis with x[..., None]."
        )


def sobel_gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Depthwise Sobel derivatives of a channels-last grid.

    Args:
      x: (..., H, W, C) float.

    Returns:
      ``(gx, gy)``, each (..., H, W, C): ``gx`` the derivative along W (kernel
      ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` as a correlation), ``gy`` along H (its transpose).
      Borders repeat the edge sample.
    """
    _check_grid(x)
    # Edge repeat by concatenating slices of the H and W axes only (not jnp.pad "edge", which
    # slices every axis): a batch sharded under an explicit-sharding mesh stays sharded.
    p = jnp.concatenate([x[..., :1, :, :], x, x[..., -1:, :, :]], axis=-3)
    p = jnp.concatenate([p[..., :, :1, :], p, p[..., :, -1:, :]], axis=-2)
    h, w = x.shape[-3], x.shape[-2]

    def tap(dy: int, dx: int) -> jax.Array:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w, :]

    # Derivative along one axis, [1, 2, 1] smoothing along the other.
    gx = tap(-1, 1) + 2 * tap(0, 1) + tap(1, 1) - (tap(-1, -1) + 2 * tap(0, -1) + tap(1, -1))
    gy = tap(1, -1) + 2 * tap(1, 0) + tap(1, 1) - (tap(-1, -1) + 2 * tap(-1, 0) + tap(-1, 1))
    return gx, gy


def sobel_magnitude(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(..., H, W, C) -> per-channel gradient magnitude ``sqrt(gx**2 + gy**2 + eps)``."""
    gx, gy = sobel_gradients(x)
    return jnp.sqrt(gx * gx + gy * gy + jnp.asarray(eps, x.dtype))
