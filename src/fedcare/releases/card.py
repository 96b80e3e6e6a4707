"""The model card exported with a promoted release: what the model is for, where it was
checked, how it did per site and subgroup, what privacy it cost, and which gates it met.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from fedcare.durable import write_file_atomically
from fedcare.releases.bundle import MANIFEST, MODEL, STUDY, manifest_for
from fedcare.releases.registry import RegistryError, Release, ReleaseRegistry
from fedcare.study import Study
from fedcare.validation.cells import (
    FEW_POSITIVES,
    CellReport,
    Estimate,
    SuppressedCell,
    ValidationReport,
)
from fedcare.validation.gates import Verdict
from fedcare.validation.release import ReleaseState
from fedcare.validation_spec import GateSpec, Metric

CARD_METRICS = (
    Metric.AUROC,
    Metric.AUPRC,
    Metric.SENSITIVITY,
    Metric.SPECIFICITY,
    Metric.PPV,
    Metric.ECE,
    Metric.CALIBRATION_SLOPE,
    Metric.BRIER,
)


class SiteSection(BaseModel):
    site: str
    verdict: Verdict
    report: ValidationReport


class ModelCard(BaseModel):
    """The machine-readable model card (``model_card.json``)."""

    release: int
    state: ReleaseState
    decision: str
    override_by: str | None
    override_reason: str | None
    parent: int | None
    study_name: str
    study_hash: str
    round: int
    model_sha256: str
    intended_use: str
    label: str
    features: list[str]
    operating_threshold: float
    privacy: str
    study_gates: list[GateSpec]
    sites: list[SiteSection]


def privacy_statement(study: Study) -> str:
    """What the study's configuration says about the privacy its training cost."""
    privacy = study.privacy
    if not privacy.dp:
        trained = (
            "No differential privacy is configured in this study: training updates carry no "
            "formal (epsilon, delta) guarantee."
        )
    elif privacy.epsilon is not None:
        trained = (
            f"Trained with DP-SGD at every site (clipping norm {privacy.max_grad_norm}, "
            f"{privacy.accountant.value} accountant): each site's plan keeps the whole study "
            f"within epsilon = {privacy.epsilon}, delta = {privacy.delta} on its data; what "
            "each site actually spent is in its own privacy ledger (fedcare site budget)."
        )
    else:
        trained = (
            f"Trained with DP-SGD at every site with noise multiplier "
            f"{privacy.noise_multiplier} (clipping norm {privacy.max_grad_norm}, delta "
            f"{privacy.delta}); the epsilon this cost depends on each site's training records "
            "and is in each site's own privacy ledger (fedcare site budget)."
        )
    return (
        f"{trained} Validation reports left each site only as metrics of groups of at "
        f"least {study.disclosure.min_cohort_size} patients (smaller groups are suppressed)."
    )


def build_card(release: Release, study: Study) -> ModelCard:
    schema = study.feature_schema
    label = schema.label.name + (
        f": {schema.label.description}" if schema.label.description else ""
    )
    return ModelCard(
        release=release.id,
        state=release.state,
        decision=release.reason,
        override_by=None if release.override is None else release.override.by,
        override_reason=None if release.override is None else release.override.reason,
        parent=release.parent,
        study_name=study.name,
        study_hash=release.study_hash,
        round=release.round,
        model_sha256=release.model_sha256,
        intended_use=(study.description.strip() or study.name)
        + f" Validated only at: {', '.join(release.required)}.",
        label=label,
        features=[f.name + (f" [{f.unit}]" if f.unit else "") for f in schema.features],
        operating_threshold=study.validation.threshold,
        privacy=privacy_statement(study),
        study_gates=list(study.validation.gates),
        sites=[
            SiteSection(site=v.site, verdict=v.verdict, report=v.report) for v in release.verdicts
        ],
    )


def _estimate(value: Estimate) -> str:
    if value.value is None:
        return "n/a"
    text = f"{value.value:.3f}"
    if value.ci_low is not None and value.ci_high is not None:
        text += f" ({value.ci_low:.3f}-{value.ci_high:.3f})"
    return text


def _row(cell: CellReport | SuppressedCell) -> str:
    if isinstance(cell, SuppressedCell):
        return f"| {cell.group} | suppressed | | " + " | ".join("" for _ in CARD_METRICS) + " |"
    values = " | ".join(_estimate(cell.estimate(m)) for m in CARD_METRICS)
    return f"| {cell.group} | {cell.n} | {cell.positives} | {values} |"


def render_markdown(card: ModelCard) -> str:
    """The card for people (``model_card.md``)."""
    lines = [
        f"# Model card: {card.study_name}, release {card.release}",
        "",
        f"- **State:** {card.state.value}. {card.decision}",
        f"- **Study:** {card.study_name} (`{card.study_hash}`), global model after round "
        f"{card.round}; parent release: {card.parent or 'none'}",
        f"- **Model file SHA-256:** `{card.model_sha256}`",
    ]
    if card.override_by:
        lines.append(f"- **Manual override** by {card.override_by}: {card.override_reason}")
    lines += [
        "",
        "## Intended use",
        card.intended_use,
        "",
        f"Predicts **{card.label}** from: {', '.join(card.features)}. A score at or above "
        f"**{card.operating_threshold}** flags a patient.",
        "",
        "## Privacy",
        card.privacy,
        "",
        "## Release gates",
    ]
    lines += [f"- study: `{gate.model_dump_json(exclude_none=True)}`" for gate in card.study_gates]
    if not card.study_gates:
        lines.append("- the study sets no consortium-wide gates")
    header = "| group | n | positives | " + " | ".join(m.value for m in CARD_METRICS) + " |"
    rule = "|" + "---|" * (3 + len(CARD_METRICS))
    for section in card.sites:
        verdict = section.verdict
        lines += ["", f"## Site {section.site}: {'passed' if verdict.passed else 'FAILED'}"]
        lines += [f"- failed: {reason}" for reason in verdict.reasons]
        lines += [f"- note: {note}" for note in verdict.notes]
        lines += [
            "",
            f"Held-out patients; 95 % bootstrap intervals ({section.report.n_bootstrap} "
            f"resamples; n/a where too few resamples define the metric); cells under "
            f"{section.report.min_cohort} patients, or with 1 to "
            f"{section.report.min_events - 1} positives or negatives, are suppressed.",
            "",
            header,
            rule,
            _row(section.report.overall),
        ]
        for cells in section.report.subgroups.values():
            lines += [_row(cell) for cell in cells]
        overall = section.report.overall
        if isinstance(overall, CellReport) and overall.positives < FEW_POSITIVES:
            lines += [
                "",
                f"**Warning:** {overall.positives} positive(s) in {overall.n} held-out patients "
                f"(fewer than {FEW_POSITIVES}): read every number here with its interval.",
            ]
    return "\n".join(lines) + "\n"


def export_release(registry: ReleaseRegistry, release_id: int, out: Path) -> list[Path]:
    """Write a promoted release's model, study, manifest and model card into ``out``:
    what ``fedcare predict`` reads (:mod:`fedcare.releases.bundle`)."""
    release = registry.get(release_id)
    if release.state is not ReleaseState.PROMOTED:
        raise RegistryError(
            f"release {release_id} is {release.state.value}: only a promoted release leaves "
            "the consortium (an operator may promote it with a recorded reason first)"
        )
    study = registry.study_of(release)
    payload, _ = registry.model(release)
    card = build_card(release, study)
    manifest = manifest_for(study, release.id, release.round, release.model_sha256)
    files = {
        out / MODEL: payload,
        out / STUDY: study.model_dump_json(by_alias=True, indent=2).encode(),
        out / MANIFEST: manifest.model_dump_json(indent=2).encode(),
        out / "model_card.json": json.dumps(card.model_dump(mode="json"), indent=2).encode(),
        out / "model_card.md": render_markdown(card).encode(),
    }
    for path, data in files.items():
        write_file_atomically(path, data)
    return list(files)
