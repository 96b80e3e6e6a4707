"""The flat float32 view of a model's state.

A model's parameters, then its floating-point buffers (BatchNorm's running
statistics), travel as one flat float32 vector in ``named_parameters()`` then
``named_buffers()`` order; the architecture comes from the study, so the vector
alone is enough. Integer buffers (BatchNorm's batch counter) stay where they are:
they do not change what the model computes.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the flat vector holds, in its order."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return [*model.parameters(), *buffers]


def state_names(model: nn.Module) -> list[str]:
    """The names of :func:`state_tensors`, in the same order."""
    buffers = [name for name, b in model.named_buffers() if b.is_floating_point()]
    return [*(name for name, _ in model.named_parameters()), *buffers]


def parameter_count(model: nn.Module) -> int:
    """The flat vector's length: parameters and floating-point buffers."""
    return sum(t.numel() for t in state_tensors(model))


def get_flat(model: nn.Module) -> NDArray[np.float32]:
    """A copy of every parameter and floating-point buffer, concatenated, as float32."""
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in state_tensors(model)])
    return flat.numpy().copy()


def set_flat(model: nn.Module, flat: NDArray[np.float32]) -> None:
    """Load a flat vector into ``model``; refuses a vector of the wrong length."""
    expected = parameter_count(model)
    if flat.ndim != 1 or flat.shape[0] != expected:
        raise ValueError(f"parameter vector has shape {flat.shape}, the model needs ({expected},)")
    if not np.all(np.isfinite(flat)):
        raise ValueError("parameter vector contains NaN or infinite values")
    offset = 0
    with torch.no_grad():
        for tensor in state_tensors(model):
            n = tensor.numel()
            chunk = torch.tensor(flat[offset : offset + n])
            tensor.copy_(chunk.reshape(tensor.shape))
            offset += n


def norm_mask(model: nn.Module, layers: tuple[type[nn.Module], ...]) -> NDArray[np.bool_]:
    """True at the flat vector's positions that belong to modules of type ``layers``."""
    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, layers):
            owned.update(id(t) for t in module.parameters(recurse=False))
            owned.update(id(t) for t in module.buffers(recurse=False))
    return np.concatenate(
        [np.full(t.numel(), id(t) in owned, dtype=bool) for t in state_tensors(model)]
    )
