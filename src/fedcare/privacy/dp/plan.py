"""A site's DP-SGD plan for a study: sampling rate, steps, and the noise that fits the target.

Each site plans for itself, from the study and its own number of training rows:
the sampling rate is ``batch_size / rows`` (Poisson, so the expected batch is the
study's batch size), a round is the study's steps, or its epochs of ``rows /
batch_size`` steps each, and the noise multiplier is the study's, or the smallest
that keeps every round of the study within the target epsilon at delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from fedcare.privacy.dp.accountant import AccountantKind, Mechanism, epsilon, noise_multiplier
from fedcare.study import Study


class PlanError(ValueError):
    """A study whose DP settings cannot be planned at a site."""


@dataclass(frozen=True)
class SitePlan:
    """What one site spends per round, and over the whole study if it takes part in every round."""

    sampling_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: AccountantKind

    @property
    def round_mechanism(self) -> Mechanism:
        return Mechanism(self.sampling_rate, self.noise_multiplier, self.steps_per_round)

    @property
    def study_epsilon(self) -> float:
        """Epsilon at ``delta`` after every round of the study."""
        whole = Mechanism(
            self.sampling_rate, self.noise_multiplier, self.steps_per_round * self.rounds
        )
        return epsilon([whole], self.delta, self.accountant)


def plan_site(study: Study, n_train: int) -> SitePlan:
    """The site's DP-SGD plan; raises :class:`PlanError` when the study has DP off."""
    spec = study.privacy
    if not spec.dp or spec.delta is None:
        raise PlanError(f"study '{study.name}' does not use differential privacy (privacy.dp)")
    if n_train < 1:
        raise PlanError("a site needs training rows to plan DP-SGD")
    if spec.delta >= 1.0 / n_train:
        # delta >= 1/n allows releasing one whole record outright (Dwork & Roth 2014, 2.3).
        raise PlanError(
            f"privacy.delta {spec.delta:g} is not below 1 / {n_train} training rows at this site"
        )
    training = study.training
    rate = min(1.0, training.batch_size / n_train)
    if training.steps is not None:
        steps = training.steps
    else:
        assert training.epochs is not None
        steps = training.epochs * max(1, math.ceil(1.0 / rate - 1e-9))
    rounds = study.rounds.count
    if spec.noise_multiplier is not None:
        sigma = spec.noise_multiplier
    else:
        assert spec.epsilon is not None
        sigma = _noise(spec.epsilon, rate, steps * rounds, spec.delta, spec.accountant)
    return SitePlan(
        sampling_rate=rate,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=sigma,
        max_grad_norm=spec.max_grad_norm,
        delta=spec.delta,
        accountant=spec.accountant,
    )


@lru_cache(maxsize=256)
def _noise(target: float, rate: float, steps: int, delta: float, kind: AccountantKind) -> float:
    # Pure and a few hundred milliseconds each: benchmarks plan the same site many times.
    return noise_multiplier(target, rate, steps, delta, kind)
