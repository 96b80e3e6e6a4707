"""A site's personal model, validated and released at the site under the same gates.

The personal model (docs/personalization.md) never leaves the site, and neither does
this record: the site checks it on its own held-out rows against the study's gates and
its policy's gates, with the final global model's report on the same rows as the
``no_drop`` reference (a personal model may not be worse than the global one by more
than the tolerance). Passed: released for use at this site; failed: held, with every
reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict

from fedcare.ids import derive_seed
from fedcare.site.dataset import SiteDataset
from fedcare.site.validation import site_report, site_verdict
from fedcare.study import Study
from fedcare.validation.cells import SuppressedCell, ValidationReport
from fedcare.validation.gates import Verdict
from fedcare.validation_spec import GateSpec


class PersonalRelease(BaseModel):
    """The site's own record of its personal model: released or held, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str
    site: str
    method: str
    round: int
    """The last round of the study the personal model follows."""
    model_sha256: str
    """SHA-256 of the personal model's float32 parameters."""
    released: bool
    verdict: Verdict
    personal: ValidationReport
    global_model: ValidationReport
    """The final global model on the same held-out rows, side by side."""

    def summary(self) -> str:
        """One line: both AUROCs with their intervals, and released or held (why)."""
        state = (
            "released at this site" if self.released else "held: " + "; ".join(self.verdict.reasons)
        )
        return (
            f"AUROC personal {_auroc(self.personal)}, global {_auroc(self.global_model)}; {state}"
        )


def _auroc(report: ValidationReport) -> str:
    cell = report.overall
    if isinstance(cell, SuppressedCell) or cell.auroc.value is None:
        return "n/a"
    estimate = cell.auroc
    interval = "" if estimate.ci_low is None else f" ({estimate.ci_low:.2f}-{estimate.ci_high:.2f})"
    return f"{estimate.value:.3f}{interval}"


def release_personal(
    study: Study,
    data: SiteDataset,
    personal: NDArray[np.float32],
    final_global: NDArray[np.float32],
    final_round: int,
    site_gates: Sequence[GateSpec] = (),
    min_cohort: int = 1,
) -> PersonalRelease:
    """Validate ``personal`` at this site beside ``final_global``; released if it passes."""
    assert study.personalization is not None
    seed = derive_seed(study.seed, "personal-validation", data.name)
    global_report = site_report(study, data, final_global, min_cohort, seed)
    report = site_report(study, data, personal, min_cohort, seed)
    verdict = site_verdict(study, data.name, report, site_gates, global_report)
    return PersonalRelease(
        study_hash=study.content_hash,
        site=data.name,
        method=study.personalization.method.value,
        round=final_round,
        model_sha256=hashlib.sha256(np.ascontiguousarray(personal).tobytes()).hexdigest(),
        released=verdict.passed,
        verdict=verdict,
        personal=report,
        global_model=global_report,
    )
