"""Parameter-free numeric layers the methods share, each matching its PyTorch/SciPy/PyWavelets
reference: Haar wavelet, Sobel/high-frequency operators, torch-exact bilinear resize, Gaussian
smoothing, AF-CLIP neighbour aggregation. Trainable heads live with their method
(``zsad_jax.methods.acd_heads``)."""

from zsad_jax.layers.aggregation import aggregate_neighbours, gaussian_kernel
from zsad_jax.layers.haar import haar_dwt2, haar_idwt2
from zsad_jax.layers.resize import resize_bilinear
from zsad_jax.layers.smoothing import gaussian_blur2d, gaussian_filter, gaussian_filter_np

__all__ = [
    "aggregate_neighbours",
    "gaussian_blur2d",
    "gaussian_filter",
    "gaussian_filter_np",
    "gaussian_kernel",
    "haar_dwt2",
    "haar_idwt2",
    "resize_bilinear",
]
