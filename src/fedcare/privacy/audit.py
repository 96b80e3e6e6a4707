"""An empirical privacy audit of fedcare's DP-SGD in one training run.

Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training
Run": ``m`` canaries are each put into the training data with probability 1/2,
the model is trained once, and an attacker scores every canary from the trained
model. If DP-SGD gave (epsilon, delta)-DP, no attacker could guess the
membership of many canaries much better than the epsilon allows; the number of
correct guesses therefore yields a lower bound on the epsilon actually achieved,
at a chosen significance. The statistics are those of the published auditor in
Google's jax-privacy (``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run``),
not re-derived here.

The run trains a logistic regression through :func:`fedcare.training.train_local`
with DP-SGD, exactly as a site does. The data are built for auditing (white-box
"Dirac" canaries, the strongest input canaries for a linear model): ``k`` real
features carry ordinary rows; canary ``i`` is the row ``scale * e_(k+i)`` with
label 1, alone on its own input, so the attacker's score for canary ``i`` is the
trained weight on input ``k + i``. A control run removes only the noise
(clipping and sampling unchanged) and must give a clearly larger bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedcare.privacy.dp.accountant import AccountantKind, Mechanism, epsilon, noise_multiplier
from fedcare.study import ModelSpec, TrainingSpec
from fedcare.training import train_local
from fedcare.training.dp_sgd import DpSgdSettings


@dataclass(frozen=True)
class AuditSettings:
    claimed_epsilon: float = 4.0
    delta: float = 1e-5
    canaries: int = 1000
    real_rows: int = 1000
    real_features: int = 4
    canary_scale: float = 4.0
    batch_size: int = 100
    steps: int = 200
    learning_rate: float = 1.0
    max_grad_norm: float = 1.0
    significance: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class AuditRun:
    """One training run and what the auditor concluded from it."""

    noise_multiplier: float
    included: int
    epsilon_lower_bound: float
    attack_auroc: float


@dataclass(frozen=True)
class AuditResult:
    settings: AuditSettings
    accounted_epsilon: float
    """What the accountant (RDP) says the DP run spends: at most the claimed epsilon."""
    dp: AuditRun
    control: AuditRun
    """The same run without noise."""


def audit_data(
    settings: AuditSettings, rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_]]:
    """Features and labels of real rows plus the included canaries, and which canaries are in."""
    k, m = settings.real_features, settings.canaries
    real = rng.normal(size=(settings.real_rows, k))
    truth = rng.normal(size=k)
    labels = (real @ truth + rng.normal(size=settings.real_rows) > 0).astype(np.float32)
    included = rng.random(m) < 0.5
    x = np.zeros((settings.real_rows + int(included.sum()), k + m), dtype=np.float32)
    x[: settings.real_rows, :k] = real
    rows = np.arange(settings.real_rows, x.shape[0])
    x[rows, k + np.flatnonzero(included)] = settings.canary_scale
    y = np.concatenate([labels, np.ones(int(included.sum()), dtype=np.float32)])
    return x, y, included


def _train(
    settings: AuditSettings,
    x: NDArray[np.float32],
    y: NDArray[np.float32],
    sigma: float,
    secret_seed: int,
) -> NDArray[np.float32]:
    """Train once with DP-SGD (noise ``sigma``); the attacker's score of every canary."""
    n, d = x.shape
    dp = DpSgdSettings(
        sampling_rate=min(1.0, settings.batch_size / n),
        noise_multiplier=sigma,
        max_grad_norm=settings.max_grad_norm,
        steps=settings.steps,
        secret_seed=secret_seed,
    )
    training = TrainingSpec(
        steps=settings.steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate
    )
    start = np.zeros(d + 1, dtype=np.float32)
    result = train_local(ModelSpec(), training, start, x, y, seed=settings.seed, dp=dp)
    k = settings.real_features
    return result.params[k : k + settings.canaries]  # the weight on each canary's input


def _judge(
    scores: NDArray[np.float32], included: NDArray[np.bool_], settings: AuditSettings, sigma: float
) -> AuditRun:
    from jax_privacy.auditing import CanaryScoreAuditor

    auditor = CanaryScoreAuditor(scores[included], scores[~included])
    return AuditRun(
        noise_multiplier=sigma,
        included=int(included.sum()),
        epsilon_lower_bound=float(auditor.epsilon_one_run(settings.significance, settings.delta)),
        attack_auroc=float(auditor.attack_auroc()),
    )


def run_audit(settings: AuditSettings = AuditSettings(), secret_seed: int = 1) -> AuditResult:
    """The DP run at the noise that meets the claimed epsilon, and the control without noise."""
    x, y, included = audit_data(settings, np.random.default_rng(settings.seed))
    rate = min(1.0, settings.batch_size / x.shape[0])
    sigma = noise_multiplier(
        settings.claimed_epsilon, rate, settings.steps, settings.delta, AccountantKind.RDP
    )
    accounted = epsilon([Mechanism(rate, sigma, settings.steps)], settings.delta)
    dp = _judge(_train(settings, x, y, sigma, secret_seed), included, settings, sigma)
    control = _judge(_train(settings, x, y, 0.0, secret_seed), included, settings, 0.0)
    return AuditResult(settings, accounted, dp, control)
