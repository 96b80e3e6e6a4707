"""Privacy accounting for DP-SGD with Poisson sampling: epsilon for the steps taken, and back.

Pure functions over :class:`Mechanism` values; the arithmetic is done by vetted
accountants, never re-derived here:

* ``rdp``: Rényi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov,
  Talwar, Zhang 2019), Google's ``dp-accounting`` ``RdpAccountant``.
* ``pld``: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022),
  ``dp-accounting``'s ``PLDAccountant``: tighter than RDP.
* ``prv``: privacy random variables (Gopi, Lee, Wutschitz 2021), Opacus'
  ``PRVAccountant``: also tight; imports PyTorch.

A list of mechanisms composes: the site's ledger asks for the epsilon of every
release ever made from one data set, across studies and rounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedcare.study import AccountantKind


class AccountingError(ValueError):
    """Parameters an accountant cannot work with (named in the message)."""


@dataclass(frozen=True)
class Mechanism:
    """``steps`` DP-SGD steps, each on a Poisson sample of rate ``sampling_rate``."""

    sampling_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 < self.sampling_rate <= 1.0:
            raise AccountingError(f"sampling rate {self.sampling_rate} is not in (0, 1]")
        if not (self.noise_multiplier > 0.0 and math.isfinite(self.noise_multiplier)):
            raise AccountingError(f"noise multiplier {self.noise_multiplier} must be positive")
        if self.steps < 1:
            raise AccountingError(f"steps {self.steps} must be at least 1")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise AccountingError(f"delta {delta} is not in (0, 1)")


def _dp_accounting_event(mechanisms: Sequence[Mechanism]) -> Any:
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    m.sampling_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
                ),
                m.steps,
            )
            for m in mechanisms
        ]
    )


def _fresh_accountant(kind: AccountantKind) -> Any:
    import logging

    from dp_accounting import pld, rdp

    # The RDP accountant logs a warning for each fractional order whose series does
    # not converge and leaves that order out: fewer orders can only raise epsilon,
    # so the result stays a valid bound and the warning is noise to a site operator.
    logging.getLogger("absl").setLevel(logging.ERROR)

    if kind is AccountantKind.RDP:
        return rdp.RdpAccountant()
    return pld.PLDAccountant()


def merged(mechanisms: Sequence[Mechanism]) -> list[Mechanism]:
    """The same composition with runs of equal (rate, noise) joined: exact, and faster."""
    steps: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        key = (m.sampling_rate, m.noise_multiplier)
        steps[key] = steps.get(key, 0) + m.steps
    return [Mechanism(rate, sigma, n) for (rate, sigma), n in steps.items()]


def epsilon(
    mechanisms: Sequence[Mechanism],
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
) -> float:
    """The epsilon at ``delta`` of all ``mechanisms`` composed (0 for none)."""
    _check_delta(delta)
    if not mechanisms:
        return 0.0
    mechanisms = merged(mechanisms)
    if accountant is AccountantKind.PRV:
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(m.noise_multiplier, m.sampling_rate, m.steps) for m in mechanisms]
        with warnings.catch_warnings():
            # PRV bounds its domain with an RDP estimate; a coarse estimate only widens
            # the domain (slower, not wrong), so its warning tells a user nothing.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            value = float(prv.get_epsilon(delta))
    else:
        acc = _fresh_accountant(accountant)
        acc.compose(_dp_accounting_event(mechanisms))
        value = float(acc.get_epsilon(delta))
    if math.isnan(value) or value < 0.0:
        raise AccountingError(f"the {accountant.value} accountant returned epsilon {value}")
    return value


NOISE_TOLERANCE = 1e-3
"""How close :func:`noise_multiplier` gets to the smallest noise that fits (relative)."""


def noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = AccountantKind.RDP,
    prior: Sequence[Mechanism] = (),
) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``steps`` keep epsilon <= target.

    ``prior`` mechanisms are composed first, so a site can ask what noise fits in
    what is left of a budget. The result is checked against the accountant: the
    epsilon it gives is never above ``target_epsilon``.
    """
    _check_delta(delta)
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target epsilon {target_epsilon} must be positive and finite")
    Mechanism(sampling_rate, 1.0, steps)  # validates rate and steps
    spent = epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise AccountingError(
            f"earlier releases already spend epsilon {spent:.4g} of {target_epsilon:g}"
        )

    def gap(sigma: float) -> float:
        """log epsilon(sigma) - log target: positive while there is too little noise."""
        spent = epsilon([*prior, Mechanism(sampling_rate, sigma, steps)], delta, accountant)
        return math.log(max(spent, 1e-300)) - math.log(target_epsilon)

    # Bracket the answer: `low` too little noise, `high` enough.
    high, g_high = 1.0, gap(1.0)
    low, g_low = high, g_high
    while g_high > 0:
        low, g_low = high, g_high
        high *= 2.0
        if high > 1e4:
            raise AccountingError(
                f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} "
                f"with {steps} steps at sampling rate {sampling_rate:g}"
            )
        g_high = gap(high)
    while g_low <= 0:
        if low < 1e-6:  # epsilon grows without bound as the noise vanishes
            return high
        high, g_high = low, g_low
        low /= 2.0
        g_low = gap(low)
    # Secant steps on log epsilon against log sigma (a smooth, nearly straight
    # curve), kept inside the bracket; once a step is within the tolerance, two
    # points just either side of the estimate close the bracket. Each accountant
    # call costs tens of milliseconds: this takes 5-7 of them where bisection to
    # 0.1 % took 10-14. `high` stays feasible: more noise, never less.
    last = [(math.log(low), g_low), (math.log(high), g_high)]
    for _ in range(64):
        if high - low <= NOISE_TOLERANCE * high:
            break
        (u1, g1), (u2, g2) = last[-2:]
        u = u2 - g2 * (u2 - u1) / (g2 - g1) if g2 != g1 else math.inf
        if not math.log(low) < u < math.log(high):
            u = (math.log(low) + math.log(high)) / 2.0
        estimate = math.exp(u)
        if abs(u - u2) < NOISE_TOLERANCE / 2:
            probes = [estimate * (1 + NOISE_TOLERANCE / 3), estimate * (1 - NOISE_TOLERANCE / 3)]
        else:
            probes = [estimate]
        for sigma in [x for x in probes if low < x < high] or [(low + high) / 2.0]:
            g = gap(sigma)
            last.append((math.log(sigma), g))
            if g <= 0:
                high = sigma
            else:
                low = sigma
                break  # a lower probe would have too little noise as well
    return high
