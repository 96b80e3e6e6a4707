"""A white-box audit of the noisy gradient step that fedcare's DP-SGD runs.

The accountant's epsilon rests on one assumption about each step: the clipped
gradient sum leaves with Gaussian noise of standard deviation ``sigma * C``,
where ``C`` bounds one record's contribution. This audit tests that assumption
against the code a site runs, :func:`fedcare.training.train_local` with DP-SGD,
from the outside:

* ``m`` "Dirac" canaries each sit alone on an input of their own (row
  ``scale * e_(k+i)``, label 1), so the canary's clipped gradient is ``C`` on that
  input (up to ``scale / sqrt(scale**2 + 1)``) and zero on every other canary's;
  each goes in with probability 1/2. One step at sampling rate 1 (every row
  taken) from zero weights is run; the step's update on input ``k + i``, times
  ``-n / learning_rate``, is the noisy sum on that coordinate: the canary's
  shift if it is in, plus the noise. Every run gives ``m`` independent
  observations of the step's mechanism; ``runs`` runs with fresh secret seeds
  give ``m * runs``.
* **Step bound** (no assumption about the noise): for a grid of thresholds, the
  test "in if the observation is above the threshold" has false-positive and
  false-negative rates bounded above by Clopper-Pearson at the significance
  (Bonferroni over the grid). Any (epsilon, delta)-DP step obeys
  ``FNR + e^epsilon FPR >= 1 - delta``, so ``log((1 - delta - FNR) / FPR)`` is a
  lower bound on the step's epsilon. It is compared with the accountant's
  epsilon of one step without sampling, ``Mechanism(1, sigma, 1)``.
* **Noise bound** (the noise is Gaussian of unknown scale): the upper confidence
  bound on the noise's standard deviation (chi-square) gives the least noise the
  code can be adding; the accountant's epsilon of the planned run (rate, steps)
  at that noise is a lower bound on the run's epsilon, compared with the claim.

An implementation that adds less noise than planned (``noise_divisor`` > 1
simulates one) pushes both bounds above their claims; the correct one leaves
both below. What is not audited here: the amplification by Poisson sampling
and the composition over steps, which come from the accountant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.stats import beta, chi2

from fedcare.privacy.dp.accountant import Mechanism, epsilon, noise_multiplier
from fedcare.study import AccountantKind, ModelSpec, TrainingSpec
from fedcare.training import train_local
from fedcare.training.dp_sgd import DpSgdSettings


@dataclass(frozen=True)
class AuditSettings:
    """The claim to audit (the planned run) and the audit's own size."""

    claimed_epsilon: float = 4.0
    delta: float = 1e-5
    sampling_rate: float = 0.1
    """The planned run's Poisson rate (the audit's step itself takes every row)."""
    steps: int = 200
    """The planned run's steps."""
    max_grad_norm: float = 1.0
    canaries: int = 4000
    runs: int = 25
    real_rows: int = 200
    real_features: int = 4
    canary_scale: float = 100.0
    learning_rate: float = 1.0
    significance: float = 0.05
    thresholds: int = 40
    seed: int = 0


@dataclass(frozen=True)
class AuditResult:
    settings: AuditSettings
    noise_multiplier: float
    """The noise the accountant plans for the claim."""
    noise_divisor: float
    """1 for the code as it is; above 1, the noise actually added was divided by it."""
    observations: int
    step_epsilon: float
    """The accountant's epsilon of one step without sampling, at delta."""
    step_lower_bound: float
    estimated_noise_multiplier: float
    noise_multiplier_upper: float
    run_lower_bound: float
    """The accountant's epsilon of the planned run at the least noise the data allow."""

    @property
    def caught(self) -> bool:
        """True if either bound exceeds what it is compared with."""
        return (
            self.step_lower_bound > self.step_epsilon
            or self.run_lower_bound > self.settings.claimed_epsilon
        )


def canary_data(
    settings: AuditSettings, rng: np.random.Generator
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_]]:
    """Ordinary rows plus the canaries that went in, and which canaries are in."""
    k, m = settings.real_features, settings.canaries
    real = rng.normal(size=(settings.real_rows, k))
    labels = (real @ rng.normal(size=k) + rng.normal(size=settings.real_rows) > 0).astype(
        np.float32
    )
    included = rng.random(m) < 0.5
    x = np.zeros((settings.real_rows + int(included.sum()), k + m), dtype=np.float32)
    x[: settings.real_rows, :k] = real
    rows = np.arange(settings.real_rows, x.shape[0])
    x[rows, k + np.flatnonzero(included)] = settings.canary_scale
    y = np.concatenate([labels, np.ones(int(included.sum()), dtype=np.float32)])
    return x, y, included


def canary_shift(settings: AuditSettings) -> float:
    """What one canary adds to the clipped sum on its own input: at zero weights its
    gradient is ``-0.5 * (scale * e, 1)``, clipped to ``C``."""
    s, c = settings.canary_scale, settings.max_grad_norm
    norm = 0.5 * math.hypot(s, 1.0)
    return 0.5 * s * min(1.0, c / (norm + 1e-6))


def observe(
    settings: AuditSettings, sigma: float, secret_seed: int, rng: np.random.Generator
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """One step of DP-SGD through ``train_local``; on every canary's input, minus the noisy
    sum (the canary's shift if it is in, plus the noise)."""
    x, y, included = canary_data(settings, rng)
    n, d = x.shape
    dp = DpSgdSettings(
        sampling_rate=1.0,
        noise_multiplier=sigma,
        max_grad_norm=settings.max_grad_norm,
        steps=1,
        secret_seed=secret_seed,
    )
    training = TrainingSpec(steps=1, batch_size=n, learning_rate=settings.learning_rate)
    start = np.zeros(d + 1, dtype=np.float32)
    result = train_local(ModelSpec(), training, start, x, y, seed=settings.seed, dp=dp)
    k = settings.real_features
    update = result.params[k : k + settings.canaries].astype(np.float64)
    # The update is -lr * (sum + noise) / n, and a canary's gradient there is negative:
    # minus the noisy sum, which a canary that is in pushes up by its shift.
    return update * n / settings.learning_rate, included


def step_lower_bound(
    inside: NDArray[np.float64],
    outside: NDArray[np.float64],
    delta: float,
    significance: float,
    thresholds: int,
) -> float:
    """The largest ``log((1 - delta - FNR) / FPR)`` over a grid of thresholds, each rate
    replaced by its Clopper-Pearson upper bound (Bonferroni over the grid and both rates)."""
    alpha = significance / (2 * thresholds)
    grid = np.quantile(outside, np.linspace(0.5, 1.0 - 1.0 / len(outside), thresholds))
    best = 0.0
    for tau in grid:
        false_pos = int((outside > tau).sum())
        false_neg = int((inside <= tau).sum())
        fpr = _upper(false_pos, len(outside), alpha)
        fnr = _upper(false_neg, len(inside), alpha)
        if 1.0 - delta - fnr > 0 and fpr > 0:
            best = max(best, math.log((1.0 - delta - fnr) / fpr))
    return best


def _upper(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson upper bound on a rate seen ``k`` times in ``n``."""
    if k >= n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def noise_upper(noise: NDArray[np.float64], significance: float) -> float:
    """Upper confidence bound on the std of zero-mean Gaussian ``noise`` (chi-square)."""
    n = len(noise)
    return math.sqrt(float((noise**2).sum()) / float(chi2.ppf(significance, n)))


def run_audit(
    settings: AuditSettings = AuditSettings(), noise_divisor: float = 1.0, secret_seed: int = 1
) -> AuditResult:
    """Audit the step at the noise the claim plans; ``noise_divisor`` > 1 runs the code
    with that much less noise (a broken implementation) and keeps the claim."""
    kind = AccountantKind.PLD
    sigma = noise_multiplier(
        settings.claimed_epsilon, settings.sampling_rate, settings.steps, settings.delta, kind
    )
    rng = np.random.default_rng(settings.seed)
    shift = canary_shift(settings)
    inside, outside = [], []
    for run in range(settings.runs):
        scores, included = observe(settings, sigma / noise_divisor, secret_seed + run, rng)
        inside.append(scores[included])
        outside.append(scores[~included])
    ins, outs = np.concatenate(inside), np.concatenate(outside)
    c = settings.max_grad_norm
    noise = np.concatenate([outs, ins - shift]) / c
    upper = noise_upper(noise, settings.significance)
    planned = Mechanism(settings.sampling_rate, upper, settings.steps)
    return AuditResult(
        settings=settings,
        noise_multiplier=sigma,
        noise_divisor=noise_divisor,
        observations=len(noise),
        step_epsilon=epsilon([Mechanism(1.0, sigma, 1)], settings.delta, kind),
        step_lower_bound=step_lower_bound(
            ins / c, outs / c, settings.delta, settings.significance, settings.thresholds
        ),
        estimated_noise_multiplier=float(np.sqrt(np.mean(noise**2))),
        noise_multiplier_upper=upper,
        run_lower_bound=epsilon([planned], settings.delta, kind),
    )
