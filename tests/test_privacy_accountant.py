"""The accountant against published values, its inverse, and the privacy CLI."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.privacy.dp.accountant import (
    NOISE_TOLERANCE,
    AccountantKind,
    AccountingError,
    Mechanism,
    epsilon,
    noise_multiplier,
)

runner = CliRunner()


@pytest.mark.parametrize(
    ("rate", "sigma", "steps", "expected"),
    [
        # Published RDP values for DP-SGD (Abadi et al. 2016 settings; TF Privacy / Opacus).
        (0.01, 1.1, 10_000, 5.632),
        (0.04, 1.5, 2_250, 7.329),
    ],
)
def test_rdp_matches_published_values(
    rate: float, sigma: float, steps: int, expected: float
) -> None:
    value = epsilon([Mechanism(rate, sigma, steps)], 1e-5, AccountantKind.RDP)
    assert value == pytest.approx(expected, abs=5e-3)


@pytest.mark.parametrize("kind", [AccountantKind.PLD, AccountantKind.PRV])
def test_tight_accountants_are_below_rdp_but_close(kind: AccountantKind) -> None:
    """PLD and PRV are tighter than RDP's bound, and agree with each other within 1 %."""
    mechanism = [Mechanism(0.04, 1.5, 2_250)]
    tight = epsilon(mechanism, 1e-5, kind)
    assert 6.6 < tight < 7.329
    other = AccountantKind.PRV if kind is AccountantKind.PLD else AccountantKind.PLD
    assert tight == pytest.approx(epsilon(mechanism, 1e-5, other), rel=0.01)


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    base = epsilon([Mechanism(0.02, 1.0, 500)], 1e-5)
    assert epsilon([Mechanism(0.02, 1.0, 1000)], 1e-5) > base
    assert epsilon([Mechanism(0.02, 2.0, 500)], 1e-5) < base
    assert epsilon([], 1e-5) == 0.0


def test_composition_of_two_runs_is_the_run_of_their_sum() -> None:
    split = epsilon([Mechanism(0.02, 1.0, 300), Mechanism(0.02, 1.0, 200)], 1e-5)
    assert split == pytest.approx(epsilon([Mechanism(0.02, 1.0, 500)], 1e-5), rel=1e-9)


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_noise_for_target_epsilon_round_trips(kind: AccountantKind) -> None:
    sigma = noise_multiplier(2.0, 0.05, 400, 1e-5, kind)
    reached = epsilon([Mechanism(0.05, sigma, 400)], 1e-5, kind)
    assert reached <= 2.0  # never more than asked
    # and not wastefully noisy: 0.1 % less noise already exceeds the target
    assert epsilon([Mechanism(0.05, sigma * (1 - NOISE_TOLERANCE), 400)], 1e-5, kind) > 2.0


@pytest.mark.parametrize(
    ("target", "rate", "steps", "prior"),
    [
        (0.5, 0.01, 2000, ()),
        (8.0, 0.3, 50, ()),
        (50.0, 1.0, 5, ()),  # an answer below 1: the bracket grows downwards
        (4.0, 0.05, 200, (Mechanism(0.05, 2.0, 200),)),
    ],
)
def test_the_noise_is_the_smallest_that_fits_to_the_tolerance(
    target: float, rate: float, steps: int, prior: tuple[Mechanism, ...]
) -> None:
    sigma = noise_multiplier(target, rate, steps, 1e-5, prior=prior)
    assert epsilon([*prior, Mechanism(rate, sigma, steps)], 1e-5) <= target
    less = sigma * (1 - NOISE_TOLERANCE)
    assert epsilon([*prior, Mechanism(rate, less, steps)], 1e-5) > target


def test_noise_accounts_for_prior_spend() -> None:
    prior = [Mechanism(0.05, 2.0, 200)]
    fresh = noise_multiplier(4.0, 0.05, 200, 1e-5)
    after = noise_multiplier(4.0, 0.05, 200, 1e-5, prior=prior)
    assert after > fresh
    assert epsilon([*prior, Mechanism(0.05, after, 200)], 1e-5) <= 4.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 1.0, 10), "sampling rate"),
        ((1.5, 1.0, 10), "sampling rate"),
        ((0.1, 0.0, 10), "noise multiplier"),
        ((0.1, math.inf, 10), "noise multiplier"),
        ((0.1, 1.0, 0), "steps"),
    ],
)
def test_bad_mechanisms_are_refused(args: tuple[float, float, int], message: str) -> None:
    with pytest.raises(AccountingError, match=message):
        Mechanism(*args)


def test_bad_delta_and_unreachable_target() -> None:
    with pytest.raises(AccountingError, match="delta"):
        epsilon([Mechanism(0.1, 1.0, 10)], 0.0)
    with pytest.raises(AccountingError, match="no noise multiplier"):
        noise_multiplier(1e-9, 1.0, 10_000, 1e-12)
    with pytest.raises(AccountingError, match="already spend"):
        noise_multiplier(0.5, 0.1, 10, 1e-5, prior=[Mechanism(0.1, 0.5, 1000)])


def test_cli_epsilon_and_noise() -> None:
    done = runner.invoke(
        app,
        [
            "privacy",
            "epsilon",
            "--sampling-rate",
            "0.01",
            "--noise-multiplier",
            "1.1",
            "--steps",
            "10000",
            "--delta",
            "1e-5",
        ],
    )
    assert done.exit_code == 0, done.output
    assert float(done.output) == pytest.approx(5.632, abs=1e-3)
    done = runner.invoke(
        app,
        [
            "privacy",
            "noise",
            "--epsilon",
            "5.632",
            "--sampling-rate",
            "0.01",
            "--steps",
            "10000",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ],
    )
    assert done.exit_code == 0, done.output
    assert float(done.output) == pytest.approx(1.1, abs=2e-3)


def test_cli_reports_bad_parameters_clearly() -> None:
    done = runner.invoke(
        app,
        [
            "privacy",
            "epsilon",
            "--sampling-rate",
            "0",
            "--noise-multiplier",
            "1",
            "--steps",
            "10",
            "--delta",
            "1e-5",
        ],
    )
    assert done.exit_code == 2
    assert "sampling rate" in done.output
