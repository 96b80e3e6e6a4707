"""``fedcare demo --drift``: the monitor catching each built-in drift scenario.

The federated model is frozen at one hospital exactly as a site agent freezes a
promoted release (its validation, then :class:`~fedcare.site.profiles.ProfileStore`);
later admissions are drawn for every scenario of :mod:`fedcare.data.drift` and the
site's monitor runs on them, with their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedcare.data.drift import DEFAULT_STRENGTH, DriftScenario, later_admissions
from fedcare.models.size import study_parameter_count
from fedcare.site.dataset import SiteDataset
from fedcare.site.monitor import MonitorResult, frame_digest, monitor_table, write_monitor
from fedcare.site.profiles import ProfileStore, candidate_profile
from fedcare.site.validation import validate_candidate
from fedcare.site.worker import CandidateValidation, SiteWorker
from fedcare.study import Study
from fedcare.validation.messages import ValidationTaskHeader


@dataclass(frozen=True)
class ScenarioOutcome:
    scenario: DriftScenario
    strength: float
    result: MonitorResult
    html: Path


def freeze_reference(
    study: Study,
    data: SiteDataset,
    params: NDArray[np.float32],
    round_number: int,
    state_dir: Path,
) -> ProfileStore:
    """Validate ``params`` at the site and freeze its profile as promoted release 1."""
    worker = SiteWorker(study, data, study_parameter_count(study))
    header = ValidationTaskHeader(study_hash=study.content_hash, release=1, round=round_number)
    reply = validate_candidate(study, data, header, params)
    store = ProfileStore(state_dir, study.content_hash)
    store.keep_candidate(
        candidate_profile(worker, CandidateValidation(header, params, reply)), params
    )
    store.settle(1, "promoted")
    return store


def monitor_scenarios(
    study: Study,
    store: ProfileStore,
    hospital: str,
    rows: int,
    seed: int,
    out: Path,
    scenarios: Sequence[DriftScenario] = tuple(DriftScenario),
) -> list[ScenarioOutcome]:
    """Later admissions at ``hospital`` for each scenario at its declared strength,
    monitored against the frozen release; JSON and HTML per scenario in ``out``."""
    outcomes = []
    for scenario in scenarios:
        cohort = later_admissions(hospital, rows, seed, scenario)
        digest = frame_digest(cohort.frame)
        result = monitor_table(study, cohort.mapping, None, store, cohort.frame, digest)
        run = write_monitor(result, study, None, out / scenario.value)
        outcomes.append(
            ScenarioOutcome(scenario, DEFAULT_STRENGTH[scenario], result, run.html_path)
        )
    return outcomes
