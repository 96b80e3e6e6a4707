"""DP-SGD (Abadi et al. 2016) for the site's models: Poisson sampling, per-sample clipping,
Gaussian noise.

Each step takes every training row independently with probability ``q`` (Poisson
sampling, the assumption of the accountants in :mod:`fedcare.privacy.dp.accountant`),
clips each row's gradient to L2 norm ``C``, sums, adds ``N(0, (sigma * C)^2)`` to
every coordinate, and divides by the expected batch size ``q * n`` (as Opacus does
for Poisson batches, so an empty or large batch does not change the noise scale).

Per-sample gradient norms use *ghost clipping* (Goodfellow 2015; Li et al. 2022),
with the norm formula of Opacus' fast gradient clipping
(``opacus.grad_sample.linear.compute_linear_norm_sample``): for a linear layer the
gradient of row ``i`` is ``g_i a_i^T``, so its norm is ``|g_i| |a_i|`` and the
clipped sum is one matrix product ``(f * G)^T A``. Per-sample gradients are never
materialised, and one backward pass (to the layers' outputs) is enough: on the
demo's model this is what keeps a DP epoch near the cost of a plain one, where
Opacus' hook-based ``GradSampleModule`` costs over 3x (benchmarks/dp_sgd.py). A
test checks the clipped sums against ``GradSampleModule``.

The randomness (which rows, which noise) comes from a generator seeded with the
site's secret seed, never from the round seed the coordinator knows: whoever knew
the seed could subtract the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DpSgdSettings:
    """One site's DP-SGD for one round."""

    sampling_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    secret_seed: int
    """Seeds sampling and noise; drawn from ``secrets`` and kept at the site."""


class UnsupportedModelError(ValueError):
    """A model with layers DP-SGD here cannot clip per sample."""


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's linear layers in order; refuses anything but Linear, ReLU and Dropout.

    Those are the layers :func:`fedcare.models.builders.build_model` uses. A layer
    mixing rows (batch norm) would break per-sample clipping, so it is refused.
    """
    modules = list(model) if isinstance(model, nn.Sequential) else [model]
    for module in modules:
        if not isinstance(module, nn.Linear | nn.ReLU | nn.Dropout):
            raise UnsupportedModelError(
                f"DP-SGD supports Linear, ReLU and Dropout layers, not {type(module).__name__}"
            )
    return [m for m in modules if isinstance(m, nn.Linear)]


def clipped_gradient_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> tuple[list[torch.Tensor], float]:
    """Sum over rows of each row's gradient clipped to ``max_grad_norm``, and the summed loss.

    The gradients are in ``model.parameters()`` order. An empty batch gives zeros.
    """
    from opacus.grad_sample.linear import compute_linear_norm_sample

    params = list(model.parameters())
    if x.shape[0] == 0:
        return [torch.zeros_like(p) for p in params], 0.0
    modules = list(model) if isinstance(model, nn.Sequential) else [model]
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    h = x
    for module in modules:
        if isinstance(module, nn.Linear):
            inputs.append(h)
            h = module(h)
            outputs.append(h)
        else:
            h = module(h)
    loss = nn.functional.binary_cross_entropy_with_logits(h.squeeze(-1), y, reduction="sum")
    # With a summed loss, the gradient at row i of a layer's output is row i's own.
    backprops = torch.autograd.grad(loss, outputs)
    layers = [m for m in modules if isinstance(m, nn.Linear)]
    squared = torch.zeros(x.shape[0], dtype=x.dtype)
    for layer, a, g in zip(layers, inputs, backprops, strict=True):
        for norm in compute_linear_norm_sample(layer, [a.detach()], g).values():
            squared = squared + norm**2
    factor = (max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
    by_param: dict[torch.Tensor, torch.Tensor] = {}
    for layer, a, g in zip(layers, inputs, backprops, strict=True):
        scaled = g * factor[:, None]
        by_param[layer.weight] = scaled.T @ a.detach()
        if layer.bias is not None:
            by_param[layer.bias] = scaled.sum(0)
    return [by_param[p] for p in params], float(loss.detach())


def noisy_mean(
    sums: Sequence[torch.Tensor],
    settings: DpSgdSettings,
    n_rows: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Add ``N(0, (sigma C)^2)`` to each clipped sum and divide by the expected batch size."""
    std = settings.noise_multiplier * settings.max_grad_norm
    expected_batch = settings.sampling_rate * n_rows
    return [
        (s + torch.normal(0.0, std, size=s.shape, generator=generator)) / expected_batch
        for s in sums
    ]


def poisson_batch(n_rows: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the rows taken this step, each independently with probability ``rate``."""
    return (torch.rand(n_rows, generator=generator) < rate).nonzero().squeeze(-1)
