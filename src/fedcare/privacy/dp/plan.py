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

from fedcare.privacy.dp.accountant import Mechanism, epsilon, noise_multiplier
from fedcare.privacy.dp.counts import count_mechanism
from fedcare.study import AccountantKind, Study, Weighting


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
    count_noise: float | None
    """Std of the noise on the record count the site reports once per study; None when the
    study's weighting needs no count (equal), so none is released."""

    @property
    def round_mechanism(self) -> Mechanism:
        return Mechanism(self.sampling_rate, self.noise_multiplier, self.steps_per_round)

    @property
    def count(self) -> tuple[Mechanism, ...]:
        """The one release of the site's noisy record count, if the study needs one."""
        return () if self.count_noise is None else (count_mechanism(self.count_noise),)

    def epsilon_after(
        self,
        rounds: int,
        delta: float | None = None,
        accountant: AccountantKind | None = None,
    ) -> float:
        """Epsilon after the count and ``rounds`` rounds of this plan, at ``delta`` by
        ``accountant`` (default: the study's own)."""
        mechanisms = list(self.count)
        if rounds > 0:
            steps = self.steps_per_round * rounds
            mechanisms.append(Mechanism(self.sampling_rate, self.noise_multiplier, steps))
        return epsilon(mechanisms, delta or self.delta, accountant or self.accountant)

    @property
    def study_epsilon(self) -> float:
        """Epsilon at ``delta`` after the count and every round of the study."""
        return self.epsilon_after(self.rounds)


def delta_problem(name: str, delta: float, n_train: int) -> str | None:
    """Why ``delta`` cannot be used with ``n_train`` rows, or None: delta >= 1/n allows
    releasing one whole record outright (Dwork & Roth 2014, 2.3)."""
    if delta < 1.0 / n_train:
        return None
    return f"{name} {delta:g} is not below 1 / {n_train} training rows at this site"


def plan_site(study: Study, n_train: int) -> SitePlan:
    """The site's DP-SGD plan; raises :class:`PlanError` when the study has DP off."""
    spec = study.privacy
    if not spec.dp or spec.delta is None:
        raise PlanError(f"study '{study.name}' does not use differential privacy (privacy.dp)")
    if n_train < 1:
        raise PlanError("a site needs training rows to plan DP-SGD")
    if problem := delta_problem("privacy.delta", spec.delta, n_train):
        raise PlanError(problem)
    training = study.training
    rate = min(1.0, training.batch_size / n_train)
    if training.steps is not None:
        steps = training.steps
    else:
        assert training.epochs is not None
        steps = training.epochs * max(1, math.ceil(1.0 / rate - 1e-9))
    rounds = study.rounds.count
    count_noise = spec.count_noise if needs_count(study) else None
    if count_noise is not None and spec.epsilon is not None:
        alone = epsilon([count_mechanism(count_noise)], spec.delta, spec.accountant)
        if alone >= spec.epsilon:
            raise PlanError(
                f"the site's noisy record count (privacy.count_noise {count_noise:g}) alone "
                f"spends epsilon {alone:.3g} at delta {spec.delta:g}, the study's target is "
                f"{spec.epsilon:g}: raise count_noise, or weight sites equally (no count)"
            )
    if spec.noise_multiplier is not None:
        sigma = spec.noise_multiplier
    else:
        assert spec.epsilon is not None
        sigma = _noise(spec.epsilon, rate, steps * rounds, spec.delta, spec.accountant, count_noise)
    return SitePlan(
        sampling_rate=rate,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=sigma,
        max_grad_norm=spec.max_grad_norm,
        delta=spec.delta,
        accountant=spec.accountant,
        count_noise=count_noise,
    )


def needs_count(study: Study) -> bool:
    """Whether the study's weighting uses each site's record count."""
    return study.aggregation.weighting is not Weighting.EQUAL


@lru_cache(maxsize=256)
def _noise(
    target: float,
    rate: float,
    steps: int,
    delta: float,
    kind: AccountantKind,
    count_noise: float | None,
) -> float:
    # Pure and a few hundred milliseconds each: benchmarks plan the same site many times.
    prior = () if count_noise is None else (count_mechanism(count_noise),)
    return noise_multiplier(target, rate, steps, delta, kind, prior=prior)
