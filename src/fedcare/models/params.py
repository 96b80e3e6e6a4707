"""The flat float32 view of a model's parameters.

Parameters travel as one flat float32 vector in ``model.parameters()`` order;
the architecture comes from the study, so the vector alone is enough.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> NDArray[np.float32]:
    """A copy of every parameter, concatenated, as float32."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.to(torch.float32).numpy().copy()


def set_flat(model: nn.Module, flat: NDArray[np.float32]) -> None:
    """Load a flat vector into ``model``; refuses a vector of the wrong length."""
    expected = parameter_count(model)
    if flat.ndim != 1 or flat.shape[0] != expected:
        raise ValueError(f"parameter vector has shape {flat.shape}, the model needs ({expected},)")
    if not np.all(np.isfinite(flat)):
        raise ValueError("parameter vector contains NaN or infinite values")
    offset = 0
    with torch.no_grad():
        for parameter in model.parameters():
            n = parameter.numel()
            chunk = torch.from_numpy(np.ascontiguousarray(flat[offset : offset + n]))
            parameter.copy_(chunk.reshape(parameter.shape))
            offset += n
