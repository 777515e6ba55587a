"""PyTorch transcriptions of the official code (written from reading it, not copied), the references
of the parity tests: one module per method, our weights copied in. They need torch (the convert
extra); tests import them through ``extras.optional`` and are marked ``torch``."""

import numpy as np
import torch


def to_torch(x) -> torch.Tensor:
    """An array (ours or NumPy) as a float32 torch tensor."""
    return torch.from_numpy(np.array(x, dtype=np.float32))
