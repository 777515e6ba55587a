"""PyTorch transcriptions of the official code (written from reading it, not copied), the references
of the parity tests: one module per method, our weights copied in. They need torch (the convert
extra); tests import them through ``extras.optional`` and are marked ``torch``."""

import numpy as np
import torch


def to_torch(x) -> torch.Tensor:
    """An array (ours or NumPy) as a float32 torch tensor."""
    return torch.from_numpy(np.array(x, dtype=np.float32))


def torch_layer_norm(ln, width: int) -> torch.nn.LayerNorm:
    """A torch LayerNorm holding our ``nnx.LayerNorm``'s scale and bias."""
    m = torch.nn.LayerNorm(width)
    m.weight.data, m.bias.data = to_torch(ln.scale[...]), to_torch(ln.bias[...])
    return m


def torch_linear(lin) -> torch.nn.Linear:
    """A torch Linear holding our ``nnx.Linear``'s kernel (transposed) and bias."""
    w = to_torch(lin.kernel[...]).T.contiguous()
    m = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    m.weight.data = w
    if lin.bias is not None:
        m.bias.data = to_torch(lin.bias[...])
    return m
