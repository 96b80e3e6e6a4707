"""Build the study's model. Every party builds the same architecture from the study."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedcare.models.params import get_flat
from fedcare.study import ModelKind, ModelSpec


def build_model(spec: ModelSpec, n_inputs: int) -> nn.Module:
    """A binary classifier that outputs one logit per row."""
    if n_inputs < 1:
        raise ValueError(f"a model needs at least one input, got {n_inputs}")
    if spec.kind is ModelKind.LOGISTIC_REGRESSION:
        return nn.Linear(n_inputs, 1)
    layers: list[nn.Module] = []
    width = n_inputs
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def initial_parameters(spec: ModelSpec, n_inputs: int, seed: int) -> NDArray[np.float32]:
    """The round-0 global model, identical for a given seed on every machine."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(spec, n_inputs)
    finally:
        torch.random.set_rng_state(generator_state)
    if spec.kind is ModelKind.LOGISTIC_REGRESSION:
        # Zero start: the optimum is unique and the first rounds do not depend on init noise.
        for parameter in model.parameters():
            nn.init.zeros_(parameter)
    return get_flat(model)
