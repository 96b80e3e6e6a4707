"""A site's validation of a candidate release: its report and its verdict.

Runs at the site, on the site's held-out rows. The verdict checks the study's
consortium-wide gates and the site's own policy gates; the report obeys the
larger of the study's and the site's minimum cohort size, so a small cell is
suppressed before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcare.ids import derive_seed
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study
from fedcare.training import predict_proba
from fedcare.validation.cells import ValidationReport
from fedcare.validation.gates import Verdict, evaluate_gates
from fedcare.validation.messages import ValidationReply, ValidationTaskHeader
from fedcare.validation.report import validate
from fedcare.validation_spec import GateSpec


def disclosure_cohort(study: Study, min_cohort: int) -> int:
    """The smallest group any released number may describe: the larger of the study's
    and the site's (or its policy's) minimum cohort."""
    return max(min_cohort, study.disclosure.min_cohort_size)


def report_on(
    study: Study,
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    frame: pd.DataFrame,
    min_cohort: int,
    seed: int,
) -> ValidationReport:
    """A validation report under the study's settings (threshold, subgroups, bootstrap)
    and the larger of the study's and ``min_cohort``'s suppression rule."""
    spec = study.validation
    return validate(
        labels,
        scores,
        frame,
        threshold=spec.threshold,
        min_cohort=disclosure_cohort(study, min_cohort),
        subgroups=spec.subgroups,
        n_bootstrap=spec.n_bootstrap,
        seed=seed,
        min_events=study.disclosure.min_cell_events,
    )


def site_report(
    study: Study,
    data: SiteDataset,
    params: NDArray[np.float32],
    min_cohort: int,
    seed: int,
) -> ValidationReport:
    """The model's report on the site's held-out data, overall and per study subgroup."""
    scores = predict_proba(study.model, params, data.x_test)
    return report_on(study, data.y_test.astype(np.int64), scores, data.test_frame, min_cohort, seed)


def site_verdict(
    study: Study,
    site: str,
    report: ValidationReport,
    site_gates: Sequence[GateSpec],
    previous: ValidationReport | None,
) -> Verdict:
    """The study's gates and then the site's own gates; one verdict with every reason."""
    consortium = evaluate_gates(report, study.validation.gates, previous, site=site)
    own = evaluate_gates(report, site_gates, previous, site=site)
    return Verdict(
        site=site,
        passed=consortium.passed and own.passed,
        reasons=consortium.reasons + [f"{r} (site policy)" for r in own.reasons],
        notes=consortium.notes + own.notes,
    )


def validate_candidate(
    study: Study,
    data: SiteDataset,
    header: ValidationTaskHeader,
    params: NDArray[np.float32],
    site_gates: Sequence[GateSpec] = (),
    min_cohort: int = 1,
) -> ValidationReply:
    """Everything a site returns for one candidate release."""
    seed = derive_seed(study.seed, "validation", header.release, data.name)
    report = site_report(study, data, params, min_cohort, seed)
    verdict = site_verdict(study, data.name, report, site_gates, header.previous)
    return ValidationReply(
        study_hash=header.study_hash,
        release=header.release,
        site=data.name,
        report=report,
        verdict=verdict,
    )
