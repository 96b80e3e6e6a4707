"""``fedcare site monitor``: a release's drift at this site, on new patients.

The new table goes through the site's mapping (every schema rule; labels optional)
and the preprocessing frozen with the release; the release scores it; the monitor
tests it against the release's reference profile (:mod:`fedcare.drift.monitor`) and,
with labels, measures its performance against the study's and the site's gates. The
full result stays at the site (JSON, an HTML page, an audit entry); when the study
declares ``monitoring`` a :class:`~fedcare.drift.summary.DriftSummary` is what leaves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, select_autoescape
from pydantic import BaseModel, ConfigDict

from fedcare.drift.checks import TEST_NAMES, DriftChecks
from fedcare.drift.monitor import check_drift
from fedcare.drift.summary import DriftSummary, SummaryRefusedError, summarize
from fedcare.durable import write_file_atomically
from fedcare.ids import derive_seed
from fedcare.policy import SitePolicy
from fedcare.schema.mapping import SiteMapping, apply_mapping
from fedcare.site.profiles import ProfileStore
from fedcare.site.validation import disclosure_cohort, report_on, site_verdict
from fedcare.study import MonitoringSpec, Study
from fedcare.training import predict_proba
from fedcare.validation.cells import ValidationReport
from fedcare.validation_spec import GateKind, GateSpec, Metric


class MonitorResult(BaseModel):
    """Everything one monitor run found (kept at the site)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    study_hash: str
    study_name: str
    site: str
    release: int
    release_round: int
    monitored_at: datetime
    data_sha256: str
    checks: DriftChecks
    estimated_gates: list[str]
    """Study and site AUROC gates the label-free estimate fails, one reason each."""
    report: ValidationReport | None
    performance_passed: bool | None
    reasons: list[str]


@dataclass(frozen=True)
class MonitorRun:
    result: MonitorResult
    summary: DriftSummary | None
    refused: str | None
    """Why no summary may leave (too few patients), or None."""
    json_path: Path
    html_path: Path


def _estimated_gates(
    study: Study, gates: tuple[GateSpec, ...], estimate: float | None
) -> list[str]:
    reasons: list[str] = []
    for gate in (*study.validation.gates, *gates):
        if gate.kind is not GateKind.OVERALL or gate.metric is not Metric.AUROC:
            continue
        assert gate.threshold is not None  # GateSpec insists on both for overall gates
        assert gate.op is not None
        if estimate is None:
            continue
        fails = estimate < gate.threshold if gate.op == ">=" else estimate > gate.threshold
        if fails:
            reasons.append(
                f"estimated auroc {estimate:.3f} (no labels) is not {gate.op} {gate.threshold:g}"
            )
    return reasons


def monitor_table(
    study: Study,
    mapping: SiteMapping,
    policy: SitePolicy | None,
    store: ProfileStore,
    frame: pd.DataFrame,
    data_sha256: str,
    release: int | None = None,
) -> MonitorResult:
    """Monitor a table of new patients against a frozen release (no files written)."""
    profile, params = store.load(release)
    schema = study.feature_schema
    labelled = mapping.label_column().column in frame.columns
    mapped = apply_mapping(frame, mapping, schema, label=labelled).frame
    scores = predict_proba(
        study.model, params, profile.preprocessor.transform(mapped, schema)
    ).astype(np.float64)
    labels = mapped[schema.label.name].to_numpy(np.int64) if labelled else None
    spec = study.monitoring or MonitoringSpec()
    policy_cohort = policy.min_cohort_size if policy is not None else 1
    min_cohort = disclosure_cohort(study, policy_cohort)
    site_gates = policy.validation_gates if policy is not None else ()
    seed = derive_seed(study.seed, "monitor", profile.release, mapping.site, data_sha256)
    checks = check_drift(
        profile,
        mapped,
        scores,
        labels,
        schema,
        alpha=spec.alpha,
        permutations=spec.permutations,
        seed=seed,
        subgroups=study.validation.subgroups,
        min_cohort=min_cohort,
        min_events=study.disclosure.min_cell_events,
    )
    report = None
    passed = None
    reasons: list[str] = []
    if labels is not None:
        report = report_on(study, labels, scores, mapped, policy_cohort, seed)
        verdict = site_verdict(study, mapping.site, report, site_gates, profile.report)
        passed, reasons = verdict.passed, list(verdict.reasons)
    return MonitorResult(
        study_hash=study.content_hash,
        study_name=study.name,
        site=mapping.site,
        release=profile.release,
        release_round=profile.round,
        monitored_at=datetime.now(UTC),
        data_sha256=data_sha256,
        checks=checks,
        estimated_gates=_estimated_gates(study, site_gates, checks.estimates.estimated_auroc),
        report=report,
        performance_passed=passed,
        reasons=reasons,
    )


def summary_of(result: MonitorResult, study: Study, policy: SitePolicy | None) -> DriftSummary:
    """What may leave about a run (raises :class:`SummaryRefusedError` when nothing may)."""
    min_cohort = disclosure_cohort(study, policy.min_cohort_size if policy is not None else 1)
    return summarize(
        study_hash=result.study_hash,
        site=result.site,
        release=result.release,
        monitored_at=result.monitored_at,
        checks=result.checks,
        report=result.report,
        passed=result.performance_passed,
        reasons=result.reasons,
        min_cohort=min_cohort,
    )


def write_monitor(
    result: MonitorResult, study: Study, policy: SitePolicy | None, out_dir: Path
) -> MonitorRun:
    """Write the run's JSON and HTML page; the summary that may leave, if any."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result.monitored_at.strftime("%Y%m%dT%H%M%SZ")
    stem = out_dir / f"monitor-release-{result.release}-{stamp}"
    json_path, html_path = stem.with_suffix(".json"), stem.with_suffix(".html")
    write_file_atomically(json_path, result.model_dump_json(indent=2).encode("utf-8"))
    write_file_atomically(html_path, render_html(result).encode("utf-8"))
    summary, refused = None, None
    try:
        summary = summary_of(result, study, policy)
    except SummaryRefusedError as exc:
        refused = str(exc)
    return MonitorRun(result, summary, refused, json_path, html_path)


def frame_digest(frame: pd.DataFrame) -> str:
    """SHA-256 of a table held in memory, as the CSV it would be written as."""
    return hashlib.sha256(frame.to_csv(index=False).encode("utf-8")).hexdigest()


def render_html(result: MonitorResult) -> str:
    """The run as one self-contained HTML page (no external assets)."""
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    page = files("fedcare.site").joinpath("templates/monitor.html").read_text("utf-8")

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f} %"

    def num(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    return env.from_string(page).render(
        r=result,
        names=TEST_NAMES,
        flagged=[c for c in result.checks.checks if c.flagged],
        pct=pct,
        num=num,
    )
