"""The one-run privacy audit: DP-SGD's measured lower bound stays under its claim, and
the same run without noise is caught."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.privacy.audit import AuditSettings, audit_data, run_audit


def test_canaries_are_alone_on_their_inputs_and_half_go_in() -> None:
    settings = AuditSettings(canaries=200, real_rows=50)
    x, y, included = audit_data(settings, np.random.default_rng(3))
    k = settings.real_features
    assert x.shape == (50 + included.sum(), k + 200)
    canary_rows = x[50:]
    assert np.all(canary_rows[:, :k] == 0)
    assert np.all((canary_rows[:, k:] != 0).sum(1) == 1)  # one input each
    assert sorted(np.nonzero(canary_rows[:, k:])[1]) == list(np.flatnonzero(included))
    assert np.all(x[:50, k:] == 0)  # real rows never touch canary inputs
    assert np.all(y[50:] == 1)
    assert 70 < included.sum() < 130


@pytest.mark.slow
@pytest.mark.parametrize("claimed", [2.0, 8.0])
def test_dp_lower_bound_stays_below_the_claim_and_the_control_is_caught(claimed: float) -> None:
    result = run_audit(AuditSettings(claimed_epsilon=claimed))
    assert result.accounted_epsilon <= claimed
    assert 0.0 <= result.dp.epsilon_lower_bound < claimed
    # Without noise every canary is told apart: the bound is as large as 1000 canaries allow.
    assert result.control.attack_auroc == 1.0
    assert result.control.epsilon_lower_bound > 4.0
    assert result.control.epsilon_lower_bound > 3 * result.dp.epsilon_lower_bound


@pytest.mark.slow
def test_audit_command_prints_both_runs() -> None:
    done = CliRunner().invoke(app, ["privacy", "audit", "--epsilon", "4", "--canaries", "400"])
    assert done.exit_code == 0, done.output
    assert "control (no noise)" in done.output
    assert "below the claimed epsilon" in done.output
