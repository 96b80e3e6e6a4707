"""Build the study's model. Every party builds the same architecture from the study."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedcare.models.module import ModelSourceError, load_builder
from fedcare.models.params import get_flat
from fedcare.study import ModelKind, ModelSpec, Normalization, PersonalizationMethod, Study

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
"""The normalisation layers FedBN keeps at each site."""


class ModelError(ValueError):
    """A model that cannot serve the study (wrong output, or not trainable as asked)."""


def build_model(spec: ModelSpec, input_shape: tuple[int, ...]) -> nn.Module:
    """A binary classifier that outputs one logit per row of shape ``input_shape``."""
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"a model needs at least one input, got shape {input_shape}")
    if spec.kind is ModelKind.MODULE:
        builder = load_builder(spec)
        try:
            model = builder(tuple(input_shape))
        except Exception as exc:  # the study's own code: its failure is the user's to fix
            raise ModelError(
                f"{spec.entrypoint} failed for input shape {tuple(input_shape)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise ModelSourceError(
                f"{spec.entrypoint} returned {type(model).__name__}, not a torch.nn.Module"
            )
        return model
    if spec.kind is ModelKind.CNN:
        return _cnn(spec, input_shape)
    (n_inputs,) = input_shape
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


def _cnn(spec: ModelSpec, input_shape: tuple[int, ...]) -> nn.Module:
    """3x3 convolutions, each normalised, rectified and max-pooled by 2, then the largest
    response of each channel anywhere in the image (a small lesion is local: an average
    over the whole image would dilute it) and one linear logit. Small enough to train on
    CPU in seconds."""
    channels = input_shape[0]
    layers: list[nn.Module] = []
    for width in spec.cnn_channels:
        layers.append(nn.Conv2d(channels, width, 3, padding=1))
        if spec.cnn_norm is Normalization.BATCH:
            layers.append(nn.BatchNorm2d(width))
        elif spec.cnn_norm is Normalization.GROUP:
            layers.append(nn.GroupNorm(min(4, width), width))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    if spec.dropout > 0:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(channels, 1))
    return nn.Sequential(*layers)


def initial_parameters(
    spec: ModelSpec, input_shape: tuple[int, ...], seed: int
) -> NDArray[np.float32]:
    """The round-0 global model, identical for a given seed on every machine."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(spec, input_shape)
    finally:
        torch.random.set_rng_state(generator_state)
    if spec.kind is ModelKind.LOGISTIC_REGRESSION:
        # Zero start: the optimum is unique and the first rounds do not depend on init noise.
        for parameter in model.parameters():
            nn.init.zeros_(parameter)
    return get_flat(model)


def has_norm_layers(model: nn.Module) -> bool:
    return any(isinstance(m, NORM_LAYERS) for m in model.modules())


def check_model(study: Study) -> None:
    """Build the study's model once and refuse it, with the reason, if it cannot serve:
    not one logit per row, BatchNorm under DP, FedBN without normalisation layers."""
    shape = study.feature_schema.input_shape
    with torch.random.fork_rng(devices=[]):
        model = build_model(study.model, shape)
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((2, *shape)))
    if not isinstance(out, torch.Tensor) or out.numel() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model must give one logit per row: for 2 rows it gave {got}")
    if study.privacy.dp and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ModelError(
            "privacy.dp clips each patient's gradient, and the model's BatchNorm mixes the "
            "patients of a batch: use GroupNorm or LayerNorm"
        )
    personal = study.personalization
    if personal and personal.method is PersonalizationMethod.FEDBN and not has_norm_layers(model):
        raise ModelError("personalization 'fedbn' needs normalisation layers in the model")
