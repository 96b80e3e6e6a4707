"""The white-box audit of the noisy gradient step: it passes the mechanism as written and
catches one that adds a quarter of the planned noise, at claimed epsilon 2 and 8."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.privacy.audit import AuditSettings, canary_data, canary_shift, observe, run_audit


def test_canaries_are_alone_on_their_inputs_and_half_go_in() -> None:
    settings = AuditSettings(canaries=200, real_rows=50)
    x, y, included = canary_data(settings, np.random.default_rng(3))
    k = settings.real_features
    assert x.shape == (50 + included.sum(), k + 200)
    canary_rows = x[50:]
    assert np.all(canary_rows[:, :k] == 0)
    assert np.all((canary_rows[:, k:] != 0).sum(1) == 1)  # one input each
    assert sorted(np.nonzero(canary_rows[:, k:])[1]) == list(np.flatnonzero(included))
    assert np.all(x[:50, k:] == 0)  # real rows never touch canary inputs
    assert np.all(y[50:] == 1)
    assert 70 < included.sum() < 130


def test_without_noise_the_observation_is_exactly_the_canary_shift() -> None:
    """The observation is the clipped sum on the canary's input: its shift, or zero."""
    settings = AuditSettings(canaries=300)
    scores, included = observe(settings, 0.0, 1, np.random.default_rng(0))
    np.testing.assert_allclose(scores[included], canary_shift(settings), rtol=1e-4)
    np.testing.assert_allclose(scores[~included], 0.0, atol=1e-6)
    assert canary_shift(settings) == pytest.approx(settings.max_grad_norm, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("claimed", [2.0, 8.0])
def test_the_audit_passes_the_mechanism_and_catches_a_quarter_of_the_noise(
    claimed: float,
) -> None:
    honest = run_audit(AuditSettings(claimed_epsilon=claimed))
    assert not honest.caught
    assert honest.step_lower_bound < honest.step_epsilon
    assert honest.run_lower_bound <= claimed
    # The bound can approach the claim: within 5 % of it for the mechanism as written.
    assert honest.run_lower_bound > 0.95 * claimed
    broken = run_audit(AuditSettings(claimed_epsilon=claimed), noise_divisor=4.0)
    assert broken.caught
    # Both bounds catch it, the one that assumes nothing about the noise too.
    assert broken.step_lower_bound > broken.step_epsilon
    assert broken.run_lower_bound > claimed


@pytest.mark.slow
def test_audit_command_passes_and_fails() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["privacy", "audit", "--epsilon", "4", "--runs", "10"])
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.output
    bad = runner.invoke(
        app, ["privacy", "audit", "--epsilon", "4", "--runs", "10", "--noise-divisor", "4"]
    )
    assert bad.exit_code == 1, bad.output
    assert "CAUGHT" in bad.output
