"""A data set's privacy budget, and the refusal when a round would exceed it."""

from __future__ import annotations

from dataclasses import dataclass

from fedcare.study import AccountantKind


class BudgetExceededError(RuntimeError):
    """The round may not run at this site (budget spent, or none set); nothing is sent."""


@dataclass(frozen=True)
class Budget:
    """A data set's total (epsilon, delta), and the accountant that measures spending."""

    epsilon: float
    delta: float
    accountant: AccountantKind = AccountantKind.RDP
