"""The site's privacy check before an update leaves: plan, record in the ledger, or refuse.

The rule (docs/privacy.md):

* a study with ``privacy.dp`` on needs a budget for the data set in the site's
  policy; there is no default budget;
* each round's spend is composed with everything the data set spent before and
  recorded durably before training; if it would exceed the budget the round is
  refused and no update is computed or sent;
* a study without DP on a data set that has a budget is refused: its epsilon is
  unbounded. A data set without a budget runs non-DP studies as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedcare.privacy.dp.budget import Budget, BudgetExceededError
from fedcare.privacy.dp.plan import SitePlan, plan_site
from fedcare.study import Study
from fedcare.training.dp_sgd import DpSgdSettings

if TYPE_CHECKING:
    # SQLAlchemy is imported only by a process that opens a ledger.
    from fedcare.privacy.dp.ledger import PrivacyLedger


@dataclass
class PrivacyGuard:
    """One site's ledger, the data set a study reads, and its budget from the policy."""

    ledger: PrivacyLedger
    dataset: str
    budget: Budget | None
    _plans: dict[tuple[str, int], SitePlan] = field(default_factory=dict, repr=False)

    def plan(self, study: Study, n_train: int) -> SitePlan:
        key = (study.content_hash, n_train)
        if key not in self._plans:
            self._plans[key] = plan_site(study, n_train)
        return self._plans[key]

    def admit(
        self, study: Study, n_train: int, round_number: int, task: bytes
    ) -> DpSgdSettings | None:
        """DP-SGD settings for this round, recorded in the ledger; None for a non-DP study.

        Raises :class:`BudgetExceededError` when the round may not run.
        """
        if not study.privacy.dp:
            if self.budget is not None:
                raise BudgetExceededError(
                    f"data set '{self.dataset}' has a privacy budget (epsilon "
                    f"{self.budget.epsilon:g}) but study '{study.name}' is not differentially "
                    "private: its spend is unbounded; the update is not sent"
                )
            return None
        if self.budget is None:
            raise BudgetExceededError(
                f"study '{study.name}' is differentially private but the site policy sets no "
                f"privacy_budget for data set '{self.dataset}'; the privacy officer must set "
                "one (there is no default); the update is not sent"
            )
        plan = self.plan(study, n_train)
        reservation = self.ledger.reserve(
            self.dataset,
            self.budget,
            study.content_hash,
            study.name,
            round_number,
            hashlib.sha256(task).hexdigest(),
            plan.round_mechanism,
        )
        return dp_settings(plan, reservation.secret_seed)


def dp_settings(plan: SitePlan, secret_seed: int) -> DpSgdSettings:
    """The training settings for one round of ``plan``."""
    return DpSgdSettings(
        sampling_rate=plan.sampling_rate,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        steps=plan.steps_per_round,
        secret_seed=secret_seed,
    )


__all__ = ["BudgetExceededError", "PrivacyGuard", "dp_settings"]
