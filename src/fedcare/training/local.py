"""The local training loop: start from the global model, train on the site's rows."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedcare.models.builders import build_model
from fedcare.models.params import get_flat, set_flat
from fedcare.study import ModelKind, ModelSpec, OptimizerKind, Study, TrainingSpec
from fedcare.training.dp_sgd import (
    DpSgdSettings,
    GhostClipper,
    UnsupportedModelError,
    noise_rows,
    noisy_mean,
    poisson_batches,
)
from fedcare.training.grad_sample import GradSampleClipper
from fedcare.training.sgd import SGD


@dataclass(frozen=True)
class LocalResult:
    """What local training produced; ``params`` are the site's new parameters."""

    params: NDArray[np.float32]
    n_samples: int
    steps: int
    loss: float
    """Mean task loss over the batches, without the proximal term."""


def _optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer | SGD:
    if spec.optimizer is OptimizerKind.ADAM:
        return torch.optim.Adam(
            model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
        )
    return SGD(
        model.parameters(),
        lr=spec.learning_rate,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
    )


def shuffled_batches(n: int, spec: TrainingSpec, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one call: whole shuffled epochs, or exactly ``steps`` batches;
    the same for a generator in the same state, whichever path trains with them."""
    batches: list[torch.Tensor] = []
    wanted = spec.steps
    epochs = spec.epochs or 0
    while True:
        order = torch.randperm(n, generator=generator)
        for batch in torch.split(order, spec.batch_size):
            batches.append(batch)
            if wanted is not None and len(batches) == wanted:
                return batches
        epochs -= 1
        if wanted is None and epochs <= 0:
            return batches


def train_local(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: NDArray[np.float32],
    features: NDArray[np.float32],
    labels: NDArray[np.float32],
    seed: int,
    dp: DpSgdSettings | None = None,
    anchor: NDArray[np.float32] | None = None,
) -> LocalResult:
    """Train from ``start`` on one site's data; deterministic for a seed (and secret seed).

    The proximal term (``training.proximal_mu``) pulls towards ``anchor``, by default
    ``start`` (FedProx); Ditto's personal model starts from itself and is pulled towards
    the global model.

    With ``dp``, training is DP-SGD (:mod:`fedcare.training.dp_sgd`): ``dp.steps``
    Poisson-sampled steps replace the study's epochs or steps.
    """
    n = features.shape[0]
    if n == 0:
        raise ValueError("cannot train on zero rows")
    if labels.shape != (n,):
        raise ValueError(f"labels have shape {labels.shape}, expected ({n},)")
    # Dropout draws from torch's global generator: fork it so a seed fixes everything
    # and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also queues seeds for every
        # accelerator backend, a millisecond per call with a stack capture each.
        torch.default_generator.manual_seed(seed)
        model = build_model(model_spec, features.shape[1:])
        set_flat(model, start)
        model.train()
        optimizer = _optimizer(model, training)
        loss_fn = nn.BCEWithLogitsLoss()
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        if dp is not None:
            if anchor is not None:
                raise ValueError("a proximal anchor other than the start is not used under DP")
            loss_mean = _train_dp(model, optimizer, training, dp, x, y)
            return _result(model, n, dp.steps, loss_mean)
        batches = shuffled_batches(n, training, torch.Generator().manual_seed(seed))
        mu = training.proximal_mu
        pull = _anchor(model, anchor) if mu > 0 else []
        total = 0.0
        for index in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[index]).reshape(-1), y[index])
            total += float(loss.detach())
            if mu > 0:
                # FedProx (Li et al. 2020): keep local parameters near the global model.
                drift = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), pull, strict=True)
                )
                loss = loss + 0.5 * mu * drift
            loss.backward()
            optimizer.step()
    return _result(model, n, len(batches), total / len(batches))


def _anchor(model: nn.Module, anchor: NDArray[np.float32] | None) -> list[torch.Tensor]:
    """The proximal term's target, shaped like the model's parameters."""
    if anchor is None:
        return [p.detach().clone() for p in model.parameters()]
    target = copy.deepcopy(model)
    set_flat(target, anchor)
    return [p.detach() for p in target.parameters()]


def _train_dp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | SGD,
    training: TrainingSpec,
    dp: DpSgdSettings,
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """DP-SGD steps; returns the mean per-row loss over the rows sampled."""
    clipper = per_sample_clipper(model, dp.max_grad_norm)
    n = x.shape[0]
    secret = torch.Generator().manual_seed(dp.secret_seed)
    params = list(model.parameters())
    mu = training.proximal_mu
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    batches = poisson_batches(n, dp.sampling_rate, dp.steps, secret)
    std = dp.noise_multiplier * dp.max_grad_norm
    noise = noise_rows(dp.steps, sum(p.numel() for p in params), std, secret)
    expected_batch = dp.sampling_rate * n
    total, rows = 0.0, 0
    for index, row in zip(batches, noise, strict=True):
        sums, loss_sum = clipper(x[index], y[index])
        total, rows = total + loss_sum, rows + index.shape[0]
        grads = noisy_mean(sums, row, expected_batch)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            # The proximal term does not depend on the data: it needs no clipping or noise.
            p.grad = g + mu * (p.detach() - anchor[i]) if mu > 0 else g
        optimizer.step()
    return total / max(rows, 1)


def per_sample_clipper(model: nn.Module, max_grad_norm: float) -> GhostClipper | GradSampleClipper:
    """fedcare's ghost clipping for stacks of Linear, ReLU and Dropout (the faster path);
    Opacus' per-sample gradients for anything else; BatchNorm refused."""
    try:
        return GhostClipper(model, max_grad_norm)
    except UnsupportedModelError:
        return GradSampleClipper(model, max_grad_norm)


def check_dp_model(study: Study) -> None:
    """Under DP, refuse a model whose gradients cannot be clipped per patient, before any
    round: :class:`~fedcare.training.dp_sgd.UnsupportedModelError` with the reason."""
    if not study.privacy.dp:
        return
    with torch.random.fork_rng(devices=[]):
        per_sample_clipper(build_model(study.model, study.feature_schema.input_shape), 1.0)


def finite(params: NDArray[np.float32]) -> NDArray[np.float32]:
    """``params``, unless training diverged."""
    if not np.all(np.isfinite(params)):
        raise FloatingPointError(
            "local training diverged (non-finite parameters); lower the learning rate"
        )
    return params


def _result(model: nn.Module, n: int, steps: int, loss: float) -> LocalResult:
    return LocalResult(params=finite(get_flat(model)), n_samples=n, steps=steps, loss=loss)


def _dense_logits(
    model_spec: ModelSpec, params: NDArray[np.float32], features: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Logistic regression's or the MLP's logits in numpy (float32, as PyTorch computes
    them): the flat vector is each Linear's weight (out x in) then its bias, in order."""
    hidden = model_spec.hidden if model_spec.kind is ModelKind.MLP else ()
    widths = [features.shape[1], *hidden, 1]
    h = np.ascontiguousarray(features, dtype=np.float32)
    offset = 0
    for layer, (fan_in, fan_out) in enumerate(pairwise(widths)):
        weight = params[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
        offset += fan_in * fan_out
        bias = params[offset : offset + fan_out]
        offset += fan_out
        h = h @ weight.T + bias
        if layer < len(widths) - 2:
            h = np.maximum(h, np.float32(0.0))
    logits: NDArray[np.float32] = h.reshape(-1)
    return logits


def predict_proba(
    model_spec: ModelSpec, params: NDArray[np.float32], features: NDArray[np.float32]
) -> NDArray[np.float64]:
    """Predicted probability of the positive class for each row."""
    if model_spec.kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP) and features.ndim == 2:
        # Called for every site every round: building a PyTorch module per call costs
        # more than the arithmetic of these small models.
        z = _dense_logits(model_spec, np.asarray(params, dtype=np.float32), features)
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float64)
    model = build_model(model_spec, features.shape[1:])
    set_flat(model, params)
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with torch.no_grad():
        # In blocks: an image cohort's activations need not all be held at once.
        logits = torch.cat([model(block).reshape(-1) for block in torch.split(x, 4096)])
    return torch.sigmoid(logits).to(torch.float64).numpy()
