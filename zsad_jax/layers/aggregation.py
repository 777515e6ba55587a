"""AF-CLIP's parameter-free multi-scale neighbour aggregation (``CLIP.aggerate_neighbors``).

For a window size r > 1 every patch token becomes the Gaussian-weighted sum of the r×r patch
tokens around it on the (h, w) grid. As in the official ``F.unfold(padding=r // 2)`` code, the
grid is zero-padded and the weights are *not* renormalised at the borders (border tokens shrink
towards zero). The CLS token passes through unchanged, and r = 1 is the identity.

The sum is written as r² static shifted slices (a depthwise correlation) rather than a
convolution call, so no backend convolution/matmul precision setting can change the float32
result.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HERE = "zsad_jax/layers/aggregation.py"


def gaussian_kernel(size: int, sigma: float = 4.0) -> np.ndarray:
    """Normalised 2-D Gaussian window, coordinates centred at (size - 1) / 2.

    ``k[i, j] ∝ exp(-((i - c)² + (j - c)²) / (2 sigma²))`` with ``c = (size - 1) / 2``, divided
    by its sum (AF-CLIP's ``gaussian_kernel(size, sigma=4)``).

    Returns:
      (size, size) float32 NumPy array summing to 1 (computed in float64).
    """
    if size < 1:
        raise ValueError(f"{_HERE}: gaussian_kernel size must be >= 1, got {size}.")
    if not sigma > 0:
        raise ValueError(f"{_HERE}: gaussian_kernel sigma must be positive, got {sigma}.")
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    squared = coords[:, None] ** 2 + coords[None, :] ** 2
    kernel = np.exp(-squared / (2.0 * float(sigma) ** 2))
    return (kernel / kernel.sum()).astype(np.float32)


def _aggregate_grid(grid_tokens: jax.Array, size: int, sigma: float) -> jax.Array:
    """Zero-padded Gaussian window sum over (B, h, w, D) tokens; returns (B, h, w, D)."""
    kernel = gaussian_kernel(size, sigma)
    radius = size // 2
    height, width = grid_tokens.shape[1], grid_tokens.shape[2]
    padded = jnp.pad(grid_tokens, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    out = None
    for di in range(size):
        for dj in range(size):
            window = padded[:, di : di + height, dj : dj + width, :]
            term = window * jnp.asarray(kernel[di, dj], grid_tokens.dtype)
            out = term if out is None else out + term
    return out


def aggregate_neighbours(
    tokens: jax.Array,
    grid: tuple[int, int],
    sizes: Sequence[int] = (1, 3, 5),
    sigma: float = 4.0,
) -> list[jax.Array]:
    """Multi-scale Gaussian neighbour aggregation of ViT tokens (AF-CLIP §1.2).

    Args:
      tokens: (B, 1 + h·w, D), CLS first, then patches in row-major (h, w) order.
      grid: (h, w) patch grid, e.g. (37, 37) for CLIP ViT-L/14 at 518 px.
      sizes: odd window sizes; 1 returns ``tokens`` itself.
      sigma: Gaussian sigma in patches (AF-CLIP: 4 for every size).

    Returns:
      One (B, 1 + h·w, D) array per entry of ``sizes``, in that order, each with the CLS token
      unchanged.
    """
    if tokens.ndim != 3:
        raise ValueError(
            f"{_HERE}: tokens must be (B, 1 + h*w, D) with the CLS token first, got "
            f"{tuple(tokens.shape)}."
        )
    height, width = int(grid[0]), int(grid[1])
    if tokens.shape[1] != 1 + height * width:
        raise ValueError(
            f"{_HERE}: tokens have {tokens.shape[1]} positions but grid {height}x{width} needs "
            f"1 + {height * width} (CLS + patches); pass the encoder's patch grid."
        )
    for size in sizes:
        if int(size) < 1 or int(size) % 2 == 0:
            raise ValueError(
                f"{_HERE}: window sizes must be positive odd ints (unfold with padding r//2 keeps "
                f"the grid only for odd r), got {tuple(sizes)}."
            )
    cls_token, patches = tokens[:, :1], tokens[:, 1:]
    batch, dim = tokens.shape[0], tokens.shape[2]
    grid_tokens = patches.reshape(batch, height, width, dim)
    outputs = []
    for size in sizes:
        if int(size) == 1:
            outputs.append(tokens)
            continue
        aggregated = _aggregate_grid(grid_tokens, int(size), sigma)
        outputs.append(
            jnp.concatenate([cls_token, aggregated.reshape(batch, height * width, dim)], axis=1)
        )
    return outputs
