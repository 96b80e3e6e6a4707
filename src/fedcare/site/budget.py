"""A site's privacy budget per data set and per study, from its policy and its ledger:
what ``fedcare site budget`` prints and the site portal shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcare.policy import SitePolicy
from fedcare.privacy.dp.ledger import Budget, PrivacyLedger, StudySpend


@dataclass(frozen=True)
class DatasetBudget:
    """One data set: its budget (None when the policy sets none) and what was spent."""

    dataset: str
    budget: Budget | None
    spent: float | None
    remaining: float | None


def budget_summary(
    policy: SitePolicy, ledger_path: Path
) -> tuple[list[DatasetBudget], list[StudySpend]]:
    """Every data set the policy budgets or the ledger records, and each study's spend."""
    ledger = PrivacyLedger(ledger_path) if ledger_path.exists() else None
    totals: list[DatasetBudget] = []
    studies: list[StudySpend] = []
    try:
        recorded = ledger.datasets() if ledger is not None else []
        for name in sorted(set(policy.privacy_budget) | set(recorded)):
            allowed = policy.privacy_budget.get(name)
            if allowed is None:
                totals.append(DatasetBudget(name, None, None, None))
                continue
            budget = Budget(allowed.epsilon, allowed.delta, allowed.accountant)
            spent = ledger.spent(name, budget) if ledger is not None else 0.0
            totals.append(DatasetBudget(name, budget, spent, max(budget.epsilon - spent, 0.0)))
            if ledger is not None:
                studies += ledger.by_study(name, budget)
    finally:
        if ledger is not None:
            ledger.close()
    return totals, studies
