"""Many sites' local training at once, for the simulation: the same steps as
:func:`fedcare.training.local.train_local`, with every site's parameters stacked.

A simulated round of a small model is mostly per-call overhead (building a module,
an optimiser, a few tiny matrix products per batch). Here each step multiplies the
batches of all sites in one batched product (``torch.baddbmm``) over stacked
weights: site ``s`` sees exactly its own batches, drawn from its own seed as the
per-site path draws them, padded to the longest batch with rows that carry no
weight. The per-site path stays the reference; the test suite checks the two agree
to 1e-6. Logistic regression and the MLP without dropout, plain or momentum SGD,
no proximal term; anything else trains site by site.

DP-SGD batches the same way: each site draws its Poisson batches and its noise from
its own secret seed exactly as :func:`fedcare.training.local.train_local` does, and
every step clips each site's rows with the ghost-clipping formula of
:class:`fedcare.training.dp_sgd.GhostClipper`, over stacked weights. Only for sites
without a privacy ledger (a simulation's sites, whose seeds are derived or fresh):
a ledger admits one site's round when that site is asked, not before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from numpy.typing import NDArray

from fedcare.ids import derive_seed
from fedcare.study import ModelKind, ModelSpec, OptimizerKind, Study, TrainingSpec
from fedcare.training.dp_sgd import DpSgdSettings, noise_rows, poisson_batches
from fedcare.training.local import LocalResult, finite, shuffled_batches, train_local


def batchable(study: Study) -> bool:
    """Whether a study's local training can run stacked across sites."""
    model, training = study.model, study.training
    return (
        model.kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP)
        and model.dropout == 0
        and training.optimizer is OptimizerKind.SGD
        and training.proximal_mu == 0
        and study.personalization is None
    )


@dataclass(frozen=True)
class Job:
    """One site's share of a batched call: its rows, its training seed and, under DP,
    its DP-SGD settings for the round."""

    features: NDArray[np.float32]
    labels: NDArray[np.float32]
    seed: int
    dp: DpSgdSettings | None = None


def _widths(spec: ModelSpec, n_inputs: int) -> list[int]:
    hidden = spec.hidden if spec.kind is ModelKind.MLP else ()
    return [n_inputs, *hidden, 1]


def _stacked(
    model_spec: ModelSpec, start: NDArray[np.float32], jobs: Sequence[Job], grad: bool
) -> tuple[list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """The model's (fan in, fan out) per layer, and each layer's weight (sites x out x in)
    and bias (sites x out), every site at ``start``."""
    layers = list(pairwise(_widths(model_spec, jobs[0].features.shape[1])))
    n_sites = len(jobs)
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    offset = 0
    flat = torch.tensor(np.asarray(start, dtype=np.float32))
    for fan_in, fan_out in layers:
        w = flat[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
        offset += fan_in * fan_out
        b = flat[offset : offset + fan_out]
        offset += fan_out
        weights.append(w.expand(n_sites, fan_out, fan_in).clone().requires_grad_(grad))
        biases.append(b.expand(n_sites, fan_out).clone().requires_grad_(grad))
    return layers, weights, biases


def _padded_rows(
    xs: list[torch.Tensor], ys: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every site's rows in one zero-padded tensor, and the index of an all-zero row
    (the row a padded batch slot points at)."""
    n_max = max(int(x.shape[0]) for x in xs)
    x_all = torch.zeros(len(xs), n_max + 1, xs[0].shape[1])
    y_all = torch.zeros(len(xs), n_max + 1)
    for site, (x, y) in enumerate(zip(xs, ys, strict=True)):
        x_all[site, : x.shape[0]] = x
        y_all[site, : y.shape[0]] = y
    return x_all, y_all, n_max


def _index(batches: Sequence[torch.Tensor | None], width: int, pad: int) -> torch.Tensor:
    """Site ``s``'s rows of one step in row ``s``, padded with ``pad``."""
    index = torch.full((len(batches), width), pad, dtype=torch.long)
    for site, batch in enumerate(batches):
        if batch is not None:
            index[site, : batch.numel()] = batch
    return index


def train_many(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: NDArray[np.float32],
    jobs: Sequence[Job],
) -> list[LocalResult]:
    """Train every job from ``start``; result ``i`` is what ``train_local`` gives job ``i``
    (with ``dp=jobs[i].dp``). Jobs are all DP or none."""
    with_dp = [job.dp is not None for job in jobs]
    if any(with_dp):
        if not all(with_dp):
            raise ValueError("a batched call trains every site with DP-SGD or none")
        return _train_many_dp(model_spec, training, start, jobs)
    n_sites = len(jobs)
    layers, weights, biases = _stacked(model_spec, start, jobs, grad=True)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    velocity: list[torch.Tensor | None] = [None] * len(params)

    xs, ys = _tensors(jobs)
    schedules = [
        shuffled_batches(int(x.shape[0]), training, torch.Generator().manual_seed(job.seed))
        for x, job in zip(xs, jobs, strict=True)
    ]
    steps = max(len(s) for s in schedules)
    losses = np.zeros(n_sites)
    width = max(int(b.numel()) for s in schedules for b in s)
    x_all, y_all, pad = _padded_rows(xs, ys)
    # index[s, t, k]: site s's k-th row at step t.
    index = torch.stack(
        [
            _index([s[step] if step < len(s) else None for s in schedules], width, pad)
            for step in range(steps)
        ],
        dim=1,
    )
    mask_all = (index != pad).to(torch.float32)
    rows = torch.arange(n_sites).unsqueeze(1)
    took_all = torch.tensor([[t < len(s) for t in range(steps)] for s in schedules])
    for step in range(steps):
        active = took_all[:, step]
        x_step = x_all[rows, index[:, step]]
        y_step = y_all[rows, index[:, step]]
        mask = mask_all[:, step]
        h = x_step
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer < len(layers) - 1:
                h = torch.relu(h)
        per_row = torch.nn.functional.binary_cross_entropy_with_logits(
            h.squeeze(-1), y_step, reduction="none"
        )
        per_site = (per_row * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        for p in params:
            p.grad = None
        torch.autograd.backward(per_site.sum())
        losses += np.where(active.numpy(), per_site.detach().numpy(), 0.0)
        grads = [p.grad for p in params]
        _sgd_step(params, grads, velocity, training, active)
    by_site = _flat_by_site(params)
    return [
        _local_result(
            by_site[site], int(xs[site].shape[0]), len(schedule), losses[site] / len(schedule)
        )
        for site, schedule in enumerate(schedules)
    ]


def _tensors(jobs: Sequence[Job]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs = [torch.from_numpy(np.ascontiguousarray(j.features, dtype=np.float32)) for j in jobs]
    ys = [torch.from_numpy(np.ascontiguousarray(j.labels, dtype=np.float32)) for j in jobs]
    return xs, ys


def _flat_by_site(params: list[torch.Tensor]) -> NDArray[np.float32]:
    """Row ``s``: site ``s``'s flat parameter vector (each layer's weight, then its bias),
    in one copy for all the sites rather than a slice and a concatenation per site."""
    n_sites = int(params[0].shape[0])
    stacked = torch.cat([t.detach().reshape(n_sites, -1) for t in params], dim=1)
    flat: NDArray[np.float32] = stacked.numpy().copy()
    return flat


def _local_result(flat: NDArray[np.float32], n: int, steps: int, loss: float) -> LocalResult:
    return LocalResult(params=finite(flat), n_samples=n, steps=steps, loss=float(loss))


@torch.no_grad()
def _train_many_dp(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: NDArray[np.float32],
    jobs: Sequence[Job],
) -> list[LocalResult]:
    """DP-SGD for every job at once: ``_train_dp`` of :mod:`fedcare.training.local` with
    :class:`~fedcare.training.dp_sgd.GhostClipper`'s clipping, over stacked weights."""
    n_sites = len(jobs)
    layers, weights, biases = _stacked(model_spec, start, jobs, grad=False)
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    velocity: list[torch.Tensor | None] = [None] * len(params)
    n_params = sum(int(p[0].numel()) for p in params)
    xs, ys = _tensors(jobs)
    settings = [job.dp for job in jobs if job.dp is not None]
    schedules: list[list[torch.Tensor]] = []
    noises = []
    for x, dp in zip(xs, settings, strict=True):
        # The order train_local draws in: every step's rows, then the noise rows.
        secret = torch.Generator().manual_seed(dp.secret_seed)
        schedules.append(poisson_batches(int(x.shape[0]), dp.sampling_rate, dp.steps, secret))
        noises.append(
            noise_rows(dp.steps, n_params, dp.noise_multiplier * dp.max_grad_norm, secret)
        )
    clip = torch.tensor([dp.max_grad_norm for dp in settings]).unsqueeze(1)
    expected = torch.tensor(
        [dp.sampling_rate * int(x.shape[0]) for x, dp in zip(xs, settings, strict=True)]
    ).unsqueeze(1)
    x_all, y_all, pad = _padded_rows(xs, ys)
    rows = torch.arange(n_sites).unsqueeze(1)
    zeros = torch.zeros(n_params)
    loss_sums = np.zeros(n_sites)
    row_counts = np.zeros(n_sites)
    for step in range(max(dp.steps for dp in settings)):
        active = torch.tensor([step < dp.steps for dp in settings])
        batches = [s[step] if step < len(s) else None for s in schedules]
        index = _index(batches, max(1, *(0 if b is None else b.numel() for b in batches)), pad)
        mask = (index != pad).to(torch.float32)
        noise = torch.stack(
            [next(n) if took else zeros for n, took in zip(noises, active.tolist(), strict=True)]
        )
        inputs: list[torch.Tensor] = []
        relus: list[torch.Tensor] = []
        h = x_all[rows, index]
        for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
            inputs.append(h)
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if layer < len(layers) - 1:
                relus.append(h > 0)
                h = torch.relu(h)
        logits = h.squeeze(-1)
        y = y_all[rows, index]
        per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss_sums += np.where(active.numpy(), (per_row * mask).sum(1).numpy(), 0.0)
        row_counts += np.where(active.numpy(), mask.sum(1).numpy(), 0.0)
        # Each row's gradient at the logit; padded rows get none, so they add nothing.
        g = ((torch.sigmoid(logits) - y) * mask).unsqueeze(-1)
        backprops: list[torch.Tensor] = []
        for layer in reversed(range(len(layers))):
            backprops.append(g)
            if layer > 0:
                g = torch.bmm(g, weights[layer]) * relus[layer - 1]
        backprops.reverse()
        squared = torch.zeros(mask.shape)
        for a, g in zip(inputs, backprops, strict=True):
            squared += (g * g).sum(-1) * ((a * a).sum(-1) + 1.0)
        factor = (clip / (squared.sqrt_() + 1e-6)).clamp_(max=1.0)
        parts: list[torch.Tensor] = []
        for a, g in zip(inputs, backprops, strict=True):
            scaled = g * factor.unsqueeze(-1)
            parts.append(torch.bmm(scaled.transpose(1, 2), a).reshape(n_sites, -1))
            parts.append(scaled.sum(1))
        flat = torch.cat(parts, dim=1).add_(noise).div_(expected)
        grads = [
            part.view_as(p)
            for part, p in zip(
                torch.split(flat, [int(p[0].numel()) for p in params], dim=1), params, strict=True
            )
        ]
        _sgd_step(params, grads, velocity, training, active)
    by_site = _flat_by_site(params)
    return [
        _local_result(
            by_site[site],
            int(xs[site].shape[0]),
            dp.steps,
            loss_sums[site] / max(row_counts[site], 1),
        )
        for site, dp in enumerate(settings)
    ]


@torch.no_grad()
def _sgd_step(
    params: list[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    velocity: list[torch.Tensor | None],
    training: TrainingSpec,
    active: torch.Tensor,
) -> None:
    """:class:`fedcare.training.sgd.SGD`'s update, for the sites that took a step."""
    for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
        assert grad is not None
        d_p = grad
        if training.weight_decay != 0:
            d_p = d_p.add(p, alpha=training.weight_decay)
        shape = (-1,) + (1,) * (p.dim() - 1)
        took = active.reshape(shape)
        if training.momentum != 0:
            held = velocity[i]
            if held is None:
                held = torch.where(took, d_p, torch.zeros_like(d_p))
            else:
                held = torch.where(took, held * training.momentum + d_p, held)
            velocity[i] = held
            d_p = held
        p.add_(torch.where(took, d_p, torch.zeros_like(d_p)), alpha=-training.learning_rate)


DpSource = Callable[[int], DpSgdSettings]
"""A site's DP-SGD settings for a round number (derived or fresh secret seed, no ledger)."""


class SharedRound:
    """The sites of one simulation training together: the first site to train from a
    model trains every registered site from it, in one :func:`train_many` call, and each
    site then takes its own result. Only for a study where every site trains from the
    same model each round (synchronous, no sampling: :func:`shares_rounds`)."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self._sites: dict[
            str, tuple[NDArray[np.float32], NDArray[np.float32], DpSource | None]
        ] = {}
        self._key: tuple[bytes, int, int] | None = None
        self._results: dict[str, LocalResult] = {}

    def register(
        self,
        name: str,
        features: NDArray[np.float32],
        labels: NDArray[np.float32],
        dp: DpSource | None = None,
    ) -> None:
        """Add a site and its training rows; under a DP study, where its settings come from."""
        if self.study.privacy.dp and dp is None:
            raise ValueError(
                f"site '{name}' joins a DP study's shared training without DP settings"
            )
        self._sites[name] = (features, labels, dp)

    def train(
        self, name: str, start: NDArray[np.float32], round_seed: int, round_number: int
    ) -> LocalResult:
        """What ``train_local`` gives site ``name`` from ``start`` (its seed derived from
        ``round_seed`` and its name, as the site derives it; under DP, its settings for
        ``round_number``)."""
        key = (
            hashlib.sha256(np.ascontiguousarray(start).tobytes()).digest(),
            round_seed,
            round_number,
        )
        if key != self._key:
            names = list(self._sites)
            jobs = [
                Job(x, y, derive_seed(round_seed, site), None if dp is None else dp(round_number))
                for site, (x, y, dp) in self._sites.items()
            ]
            results = train_many(self.study.model, self.study.training, start, jobs)
            self._key, self._results = key, dict(zip(names, results, strict=True))
        result = self._results.pop(name, None)
        if result is None:  # asked twice for one model (a retried round): train alone
            features, labels, dp = self._sites[name]
            result = train_local(
                self.study.model,
                self.study.training,
                start,
                features,
                labels,
                seed=derive_seed(round_seed, name),
                dp=None if dp is None else dp(round_number),
            )
        return result


def shares_rounds(study: Study) -> bool:
    """Whether every site trains from the same model each round and can train batched."""
    return batchable(study) and study.rounds.fraction == 1.0 and not study.participation.is_async
