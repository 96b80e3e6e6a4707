"""Many sites' local training at once, for the simulation: the same steps as
:func:`fedcare.training.local.train_local`, with every site's parameters stacked.

A simulated round of a small model is mostly per-call overhead (building a module,
an optimiser, a few tiny matrix products per batch). Here each step multiplies the
batches of all sites in one batched product (``torch.baddbmm``) over stacked
weights: site ``s`` sees exactly its own batches, drawn from its own seed as the
per-site path draws them, padded to the longest batch with rows that carry no
weight. The per-site path stays the reference; the test suite checks the two agree
to 1e-6. Logistic regression and the MLP without dropout, plain or momentum SGD,
no proximal term and no DP; anything else trains site by site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from numpy.typing import NDArray

from fedcare.ids import derive_seed
from fedcare.study import ModelKind, ModelSpec, OptimizerKind, Study, TrainingSpec
from fedcare.training.local import LocalResult, finite, shuffled_batches, train_local


def batchable(study: Study) -> bool:
    """Whether a study's local training can run stacked across sites."""
    model, training = study.model, study.training
    return (
        model.kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP)
        and model.dropout == 0
        and training.optimizer is OptimizerKind.SGD
        and training.proximal_mu == 0
        and not study.privacy.dp
        and study.personalization is None
    )


@dataclass(frozen=True)
class Job:
    """One site's share of a batched call: its rows and its training seed."""

    features: NDArray[np.float32]
    labels: NDArray[np.float32]
    seed: int


def _widths(spec: ModelSpec, n_inputs: int) -> list[int]:
    hidden = spec.hidden if spec.kind is ModelKind.MLP else ()
    return [n_inputs, *hidden, 1]


def train_many(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: NDArray[np.float32],
    jobs: Sequence[Job],
) -> list[LocalResult]:
    """Train every job from ``start``; result ``i`` is what ``train_local`` gives job ``i``."""
    n_sites = len(jobs)
    widths = _widths(model_spec, jobs[0].features.shape[1])
    layers = list(pairwise(widths))
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    offset = 0
    flat = torch.from_numpy(np.asarray(start, dtype=np.float32))
    for fan_in, fan_out in layers:
        w = flat[offset : offset + fan_in * fan_out].reshape(fan_out, fan_in)
        offset += fan_in * fan_out
        b = flat[offset : offset + fan_out]
        offset += fan_out
        weights.append(w.expand(n_sites, fan_out, fan_in).clone().requires_grad_(True))
        biases.append(b.expand(n_sites, fan_out).clone().requires_grad_(True))
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    velocity: list[torch.Tensor | None] = [None] * len(params)

    xs = [torch.from_numpy(np.ascontiguousarray(j.features, dtype=np.float32)) for j in jobs]
    ys = [torch.from_numpy(np.ascontiguousarray(j.labels, dtype=np.float32)) for j in jobs]
    schedules = [
        shuffled_batches(int(x.shape[0]), training, torch.Generator().manual_seed(job.seed))
        for x, job in zip(xs, jobs, strict=True)
    ]
    steps = max(len(s) for s in schedules)
    losses = np.zeros(n_sites)
    width = max(int(b.numel()) for s in schedules for b in s)
    # Every site's rows in one zero-padded tensor; row n_max is all zeros, the row a
    # padded batch slot points at. index[s, t, k]: site s's k-th row at step t.
    n_max = max(int(x.shape[0]) for x in xs)
    x_all = torch.zeros(n_sites, n_max + 1, widths[0])
    y_all = torch.zeros(n_sites, n_max + 1)
    index = torch.full((n_sites, steps, width), n_max, dtype=torch.long)
    for site, schedule in enumerate(schedules):
        x_all[site, : xs[site].shape[0]] = xs[site]
        y_all[site, : ys[site].shape[0]] = ys[site]
        for step, batch in enumerate(schedule):
            index[site, step, : batch.numel()] = batch
    mask_all = (index != n_max).to(torch.float32)
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
        _sgd_step(params, velocity, training, active)
    results = []
    for site, schedule in enumerate(schedules):
        flat_params = torch.cat([t[site].detach().reshape(-1) for t in params]).numpy().copy()
        results.append(
            LocalResult(
                params=finite(flat_params),
                n_samples=int(xs[site].shape[0]),
                steps=len(schedule),
                loss=float(losses[site] / len(schedule)),
            )
        )
    return results


@torch.no_grad()
def _sgd_step(
    params: list[torch.Tensor],
    velocity: list[torch.Tensor | None],
    training: TrainingSpec,
    active: torch.Tensor,
) -> None:
    """:class:`fedcare.training.sgd.SGD`'s update, for the sites that took a step."""
    for i, p in enumerate(params):
        assert p.grad is not None
        d_p = p.grad
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


class SharedRound:
    """The sites of one simulation training together: the first site to train from a
    model trains every registered site from it, in one :func:`train_many` call, and each
    site then takes its own result. Only for a study where every site trains from the
    same model each round (synchronous, no sampling: :func:`shares_rounds`)."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self._sites: dict[str, tuple[NDArray[np.float32], NDArray[np.float32]]] = {}
        self._key: tuple[bytes, int] | None = None
        self._results: dict[str, LocalResult] = {}

    def register(
        self, name: str, features: NDArray[np.float32], labels: NDArray[np.float32]
    ) -> None:
        """Add a site and its training rows."""
        self._sites[name] = (features, labels)

    def train(self, name: str, start: NDArray[np.float32], round_seed: int) -> LocalResult:
        """What ``train_local`` gives site ``name`` from ``start`` (its seed derived from
        ``round_seed`` and its name, as the site derives it)."""
        key = (hashlib.sha256(np.ascontiguousarray(start).tobytes()).digest(), round_seed)
        if key != self._key:
            names = list(self._sites)
            jobs = [
                Job(x, y, derive_seed(round_seed, site)) for site, (x, y) in self._sites.items()
            ]
            results = train_many(self.study.model, self.study.training, start, jobs)
            self._key, self._results = key, dict(zip(names, results, strict=True))
        result = self._results.pop(name, None)
        if result is None:  # asked twice for one model (a retried round): train alone
            features, labels = self._sites[name]
            result = train_local(
                self.study.model,
                self.study.training,
                start,
                features,
                labels,
                seed=derive_seed(round_seed, name),
            )
        return result


def shares_rounds(study: Study) -> bool:
    """Whether every site trains from the same model each round and can train batched."""
    return batchable(study) and study.rounds.fraction == 1.0 and not study.participation.is_async
