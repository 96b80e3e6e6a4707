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
from fedcare.privacy.dp.counts import noisy_count
from fedcare.privacy.dp.plan import SitePlan, delta_problem, plan_site
from fedcare.privacy.dp.release import Release
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

    def _budget(self, study: Study) -> Budget | None:
        """The data set's budget for ``study``; None for a non-DP study on a data set
        without one. Refuses the combinations the rule forbids."""
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
        return self.budget

    def _check_delta(self, budget: Budget, n_train: int) -> None:
        name = f"data set '{self.dataset}': the budget's delta"
        if problem := delta_problem(name, budget.delta, n_train):
            raise BudgetExceededError(f"{problem}; nothing is sent")

    def check(self, study: Study, n_train: int) -> None:
        """Refuse, before anything runs, a DP study this site cannot take part in: the
        study's or the budget's delta not below 1/n, or no noise that fits the target.
        Raises :class:`PlanError`, :class:`AccountingError` or :class:`BudgetExceededError`."""
        if not study.privacy.dp:
            return
        self.plan(study, n_train)
        if self.budget is not None:
            self._check_delta(self.budget, n_train)

    def admit(
        self,
        study: Study,
        n_train: int,
        round_number: int,
        task: bytes,
        fingerprint: str,
        preprocessing: str,
    ) -> DpSgdSettings | None:
        """DP-SGD settings for this round, recorded in the ledger; None for a non-DP study.

        ``fingerprint`` identifies the exact training rows the mechanism will see
        (after mapping and preprocessing) and ``preprocessing`` their parameters;
        the ledger keys the release on both. Raises :class:`BudgetExceededError`
        when the round may not run.
        """
        budget = self._budget(study)
        if budget is None:
            return None
        self._check_delta(budget, n_train)
        plan = self.plan(study, n_train)
        release = Release(
            study_hash=study.content_hash,
            study_name=study.name,
            round=round_number,
            task_sha256=hashlib.sha256(task).hexdigest(),
            fingerprint=fingerprint,
            preprocessing=preprocessing,
        )
        reservation = self.ledger.reserve(self.dataset, budget, release, plan.round_mechanism)
        return dp_settings(plan, reservation.secret_seed)

    def count(
        self, study: Study, n_train: int, fingerprint: str, preprocessing: str, largest: int
    ) -> int:
        """The site's noisy record count for a DP study: released (and charged) once per
        study and fingerprint, the same value every time after. Raises
        :class:`BudgetExceededError` when the release may not happen."""
        budget = self._budget(study)
        if budget is None:
            raise BudgetExceededError(f"study '{study.name}' releases no noisy count without DP")
        self._check_delta(budget, n_train)
        plan = self.plan(study, n_train)
        if plan.count_noise is None:
            raise BudgetExceededError(f"study '{study.name}' weights sites equally: no count")
        release = Release(
            study_hash=study.content_hash,
            study_name=study.name,
            round=0,
            task_sha256=COUNT_RELEASE,
            fingerprint=fingerprint,
            preprocessing=preprocessing,
        )
        (mechanism,) = plan.count
        reservation = self.ledger.reserve(self.dataset, budget, release, mechanism)
        return noisy_count(n_train, plan.count_noise, reservation.secret_seed, largest)


COUNT_RELEASE = "0" * 64
"""The task name under which a study's one count release is recorded (round 0)."""


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
