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
materialised, and the backward pass to the layers' outputs is written out (see
:class:`GhostClipper`). On the demo's model a DP epoch costs 1.26x a plain one;
the same step with Opacus' hook-based ``GradSampleModule`` costs 4.9x, and with
autograd for the backward pass 2.0x (benchmarks/dp_sgd.py, docs/privacy.md).
Tests check the clipped sums against ``GradSampleModule`` and, with dropout, a
row-by-row autograd reference.

The randomness (which rows, which noise) comes from a generator seeded with the
site's secret seed, never from the round seed the coordinator knows: whoever knew
the seed could subtract the noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
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


class GhostClipper:
    """Per-sample clipped gradient sums for one model, set up once per training run.

    The backward pass is written out for the layers :func:`linear_layers` allows
    (Linear, ReLU, Dropout, and the logistic loss on the last layer's one output):
    through torch's autograd engine a small model's step costs more in overhead
    than in arithmetic (measured 2.0x plain training instead of 1.26x).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.modules = list(model) if isinstance(model, nn.Sequential) else [model]
        self.layers = linear_layers(model)
        if self.layers[-1] is not self.modules[-1] or self.layers[-1].out_features != 1:
            raise UnsupportedModelError("DP-SGD needs a last Linear layer with one output")
        self.params = list(model.parameters())
        self.max_grad_norm = max_grad_norm
        # Where each layer's weight and bias go in model.parameters() order.
        position = {id(p): i for i, p in enumerate(self.params)}
        self._slots = [
            (position[id(layer.weight)], None if layer.bias is None else position[id(layer.bias)])
            for layer in self.layers
        ]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """Sum over rows of each row's gradient clipped to ``max_grad_norm``, and the summed
        loss; gradients in ``model.parameters()`` order. An empty batch gives zeros."""
        if x.shape[0] == 0:
            return [torch.zeros_like(p) for p in self.params], 0.0
        inputs: list[torch.Tensor] = []  # what each linear layer saw
        factors: list[torch.Tensor] = []  # d(output)/d(input) of the other layers
        h = x
        for module in self.modules:
            if isinstance(module, nn.Linear):
                inputs.append(h)
                h = nn.functional.linear(h, module.weight, module.bias)
            elif isinstance(module, nn.ReLU):
                factors.append(h > 0)
                h = torch.relu(h)
            elif _drops(module):  # as nn.Dropout draws it
                assert isinstance(module, nn.Dropout)
                keep = torch.empty_like(h).bernoulli_(1.0 - module.p).div_(1.0 - module.p)
                factors.append(keep)
                h = h * keep
        logits = h.squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        # Backward by hand. With a summed loss, row i of each layer's output gradient
        # is row i's own: d loss_i / d logit_i = sigmoid(logit_i) - y_i.
        g = (torch.sigmoid(logits) - y).unsqueeze(-1)
        backprops: list[torch.Tensor] = []
        pending = list(factors)
        for module in reversed(self.modules):
            if isinstance(module, nn.Linear):
                backprops.append(g)
                if module is not self.modules[0]:
                    g = g @ module.weight
            elif isinstance(module, nn.ReLU) or _drops(module):
                g = g * pending.pop()
        backprops.reverse()
        # Per-row norms without per-row gradients (Opacus' ghost norms for linear layers,
        # compute_linear_norm_sample): |g_i a_i^T|^2 = |g_i|^2 |a_i|^2; bias: |g_i|^2.
        squared = torch.zeros(x.shape[0], dtype=x.dtype)
        for layer, a, g in zip(self.layers, inputs, backprops, strict=True):
            g2 = (g * g).sum(1)
            squared += g2 * ((a * a).sum(1) + (0.0 if layer.bias is None else 1.0))
        factor = (self.max_grad_norm / (squared.sqrt_() + 1e-6)).clamp_(max=1.0)
        grads: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for (weight, bias), a, g in zip(self._slots, inputs, backprops, strict=True):
            scaled = g * factor[:, None]
            grads[weight] = scaled.T @ a
            if bias is not None:
                grads[bias] = scaled.sum(0)
        return grads, float(loss)


def _drops(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.training and module.p > 0


def clipped_gradient_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> tuple[list[torch.Tensor], float]:
    """One batch through a fresh :class:`GhostClipper` (see there)."""
    return GhostClipper(model, max_grad_norm)(x, y)


def noise_rows(
    steps: int, size: int, std: float, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` vectors of ``N(0, std^2)`` noise, drawn in blocks (fewer calls per step)."""
    per_block = max(1, (1 << 20) // max(size, 1))
    done = 0
    while done < steps:
        block = min(per_block, steps - done)
        yield from torch.normal(0.0, std, size=(block, size), generator=generator).unbind(0)
        done += block


def noisy_mean(
    sums: Sequence[torch.Tensor], noise: torch.Tensor, expected_batch: float
) -> list[torch.Tensor]:
    """``(sum + noise) / expected_batch`` for the clipped sums, as views of one flat vector.

    ``noise`` is one row of :func:`noise_rows` with ``std = sigma * C``.
    """
    flat = torch.cat([s.reshape(-1) for s in sums]).add_(noise).div_(expected_batch)
    parts = torch.split(flat, [s.numel() for s in sums])
    return [part.view_as(s) for part, s in zip(parts, sums, strict=True)]


def poisson_batches(
    n_rows: int, rate: float, steps: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Row indices for each of ``steps`` steps, every row taken independently with
    probability ``rate`` at every step (Poisson sampling).

    Drawn for all steps at once as one Bernoulli process over ``steps * n_rows``
    positions, through its geometric gaps: the same distribution as one uniform
    draw per row and step, at a cost in the rows taken rather than the rows held.
    """
    if rate >= 1.0:
        return [torch.arange(n_rows) for _ in range(steps)]
    total = steps * n_rows
    expected = rate * total
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    picked: list[torch.Tensor] = []
    last = -1
    while last < total:
        gaps = torch.empty(chunk, dtype=torch.float64).geometric_(rate, generator=generator)
        positions = last + torch.cumsum(gaps, 0).to(torch.int64)
        picked.append(positions[positions < total])
        last = int(positions[-1])
    taken = torch.cat(picked)
    bounds = torch.searchsorted(taken, torch.arange(1, steps, dtype=torch.int64) * n_rows)
    return [part % n_rows for part in torch.tensor_split(taken, bounds)]
