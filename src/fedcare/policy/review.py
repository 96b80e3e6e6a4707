"""A study review: everything the officer needs to decide on one exact study hash.

What will run, on which columns, what leaves the site and how often, what it
costs in privacy, what the rules say, and whether this hash is already approved.
Built from the study, the site policy and (optionally) the site's mapping, with
no I/O except reading the shipped jurisdiction profile.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedcare.models.size import count_parameters
from fedcare.policy.checks import check_study, declares_differential_privacy
from fedcare.policy.findings import Finding, Severity, refusals
from fedcare.policy.model import ApprovedStudy, DatasetBudget, Jurisdiction, SitePolicy
from fedcare.policy.profiles import JurisdictionProfile, load_profile
from fedcare.schema.features import Strict
from fedcare.schema.mapping import ColumnMapping, SiteMapping
from fedcare.study import (
    AggregationSpec,
    Artefact,
    ModelKind,
    RoundSpec,
    Study,
    TrainingSpec,
)

# Parameters travel as little-endian float32 (models/wire.py).
BYTES_PER_PARAMETER = 4


class ModelReview(Strict):
    kind: ModelKind
    hidden: tuple[int, ...]
    n_inputs: int
    n_params: int


class ColumnReview(Strict):
    """One column the study reads at the site, and where the site's mapping finds it."""

    role: Literal["feature", "attribute", "label"]
    name: str
    type: str | None = None
    unit: str | None = None
    range: tuple[float, float] | None = None
    categories: tuple[str, ...] | None = None
    missing: str | None = None
    local_column: str | None = None
    local_unit: str | None = None


class Outflow(Strict):
    """One kind of information that leaves the site."""

    artefact: Artefact
    description: str
    bytes_per_round: int | None = Field(
        default=None, description="Payload per round, when the study fixes it."
    )
    rounds: int | None = Field(default=None, description="At most this many sends.")

    @property
    def total_bytes(self) -> int | None:
        if self.bytes_per_round is None or self.rounds is None:
            return None
        return self.bytes_per_round * self.rounds


class PrivacyCost(Strict):
    differentially_private: bool
    statement: str
    budget: dict[str, DatasetBudget] = Field(
        default_factory=dict, description="What the site's policy allows per data set."
    )


class StudyReview(Strict):
    """The officer's view of one study at one site."""

    study_name: str
    study_hash: str
    description: str
    site: str
    jurisdiction: Jurisdiction
    profile_title: str
    model: ModelReview
    training: TrainingSpec
    aggregation: AggregationSpec
    rounds: RoundSpec
    columns: tuple[ColumnReview, ...]
    outflows: tuple[Outflow, ...]
    coordinator_url: str | None
    coordinator_region: str | None
    study_min_cohort_size: int
    required_min_cohort_size: int
    privacy: PrivacyCost
    findings: tuple[Finding, ...]
    approval: ApprovedStudy | None
    notes: tuple[str, ...] = ()

    @property
    def approved(self) -> bool:
        """Whether this exact hash is in the policy's approved studies."""
        return self.approval is not None

    @property
    def refusals(self) -> list[Finding]:
        return refusals(self.findings)

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARN]

    @property
    def approvable(self) -> bool:
        """No rule refuses the study (warnings are for the officer to weigh)."""
        return not self.refusals


def _local(mapping: SiteMapping | None, name: str, label: bool) -> ColumnMapping | None:
    if mapping is None:
        return None
    if label:
        return mapping.label_column()
    try:
        return mapping.column(name)
    except KeyError:
        return None


def _columns(study: Study, mapping: SiteMapping | None) -> tuple[list[ColumnReview], list[str]]:
    schema = study.feature_schema
    columns: list[ColumnReview] = []
    for f in schema.features:
        local = _local(mapping, f.name, label=False)
        columns.append(
            ColumnReview(
                role="feature",
                name=f.name,
                type=f.type.value,
                unit=f.unit,
                range=f.range,
                categories=f.categories,
                missing=f.missing.rule.value,
                local_column=local.column if local else None,
                local_unit=local.unit if local else None,
            )
        )
    for a in schema.attributes:
        local = _local(mapping, a.name, label=False)
        columns.append(
            ColumnReview(
                role="attribute",
                name=a.name,
                categories=a.categories,
                local_column=local.column if local else None,
            )
        )
    label = _local(mapping, schema.label.name, label=True)
    columns.append(
        ColumnReview(
            role="label",
            name=schema.label.name,
            type="binary",
            local_column=label.column if label else None,
        )
    )
    notes: list[str] = []
    if mapping is not None:
        unmapped = [c.name for c in columns if c.local_column is None and c.role == "feature"]
        if unmapped:
            notes.append(f"the mapping has no local column for: {', '.join(unmapped)}")
    return columns, notes


def _outflows(study: Study, n_params: int, url: str | None) -> tuple[list[Outflow], list[str]]:
    rounds = study.rounds
    declared = study.disclosure.artefacts
    minimum = study.disclosure.min_cohort_size
    where = url or "the coordinator named in site.yaml"
    share = "" if rounds.fraction == 1.0 else f" (each round picks {rounds.fraction:.0%} of sites)"
    outflows = [
        Outflow(
            artefact=Artefact.MODEL_UPDATES,
            description=(
                f"to {where}: one model update per round the site is picked for{share}: "
                f"{n_params:,} float32 parameter changes, with a header naming the study "
                "hash, round, site, the number of training records and the mean training loss"
            ),
            bytes_per_round=BYTES_PER_PARAMETER * n_params,
            rounds=rounds.count,
        )
    ]
    if Artefact.METRICS in declared:
        spec = study.validation
        releases = sum(spec.is_candidate_round(n, rounds.count) for n in range(1, rounds.count + 1))
        by = f", overall and by {', '.join(spec.subgroups)}" if spec.subgroups else ""
        outflows.append(
            Outflow(
                artefact=Artefact.METRICS,
                description=f"to {where}: one validation report per candidate release "
                f"({releases} in all): AUROC, AUPRC, sensitivity, specificity, PPV, "
                f"calibration and Brier score on the site's held-out patients{by}, with "
                "bootstrap intervals and the verdict on the study's and this site's gates; "
                f"groups of fewer than {minimum} patients are suppressed",
            )
        )
    if Artefact.COUNTS in declared:
        outflows.append(
            Outflow(
                artefact=Artefact.COUNTS,
                description=f"to {where}: patient counts, each of at least {minimum} patients",
            )
        )
    notes = []
    if Artefact.MODEL_UPDATES not in declared:
        notes.append(
            "the study does not list model_updates among its artefacts, yet every round "
            "it trains sends one"
        )
    return outflows, notes


def _privacy(study: Study, policy: SitePolicy) -> PrivacyCost:
    if declares_differential_privacy(study):
        spec = study.privacy
        target = (
            f"a target epsilon of {spec.epsilon:g} per site for the whole study"
            if spec.epsilon is not None
            else f"noise multiplier {spec.noise_multiplier:g}"
        )
        statement = (
            f"model updates are differentially private (DP-SGD, {target}, delta {spec.delta:g}, "
            f"gradients clipped to {spec.max_grad_norm:g}, {spec.accountant.value} accountant); "
            "the site's privacy ledger records every round before its update is sent and "
            "refuses a round that would exceed this site's budget for the data set"
        )
    else:
        statement = (
            "model updates are NOT differentially private: no noise is added, so the "
            "privacy ledger will record no epsilon for this study. Patient records never "
            "leave the site, but an update is computed from them and can leak information "
            "about them."
        )
    return PrivacyCost(
        differentially_private=declares_differential_privacy(study),
        statement=statement,
        budget=dict(policy.privacy_budget),
    )


def review_study(
    study: Study,
    policy: SitePolicy,
    mapping: SiteMapping | None = None,
    *,
    profile: JurisdictionProfile | None = None,
    coordinator_url: str | None = None,
) -> StudyReview:
    """Review ``study`` for the site ``policy`` governs (profile: the shipped one by default)."""
    profile = profile or load_profile(policy.jurisdiction)
    schema = study.feature_schema
    n_params = count_parameters(study.model, schema.n_inputs)
    columns, column_notes = _columns(study, mapping)
    outflows, outflow_notes = _outflows(study, n_params, coordinator_url)
    notes = column_notes + outflow_notes
    if mapping is not None and mapping.site != policy.site:
        notes.insert(0, f"the mapping is for site '{mapping.site}', the policy for '{policy.site}'")
    return StudyReview(
        study_name=study.name,
        study_hash=study.content_hash,
        description=study.description.strip(),
        site=policy.site,
        jurisdiction=policy.jurisdiction,
        profile_title=profile.title,
        model=ModelReview(
            kind=study.model.kind,
            hidden=study.model.hidden,
            n_inputs=schema.n_inputs,
            n_params=n_params,
        ),
        training=study.training,
        aggregation=study.aggregation,
        rounds=study.rounds,
        columns=tuple(columns),
        outflows=tuple(outflows),
        coordinator_url=coordinator_url,
        coordinator_region=study.disclosure.coordinator_region,
        study_min_cohort_size=study.disclosure.min_cohort_size,
        required_min_cohort_size=max(profile.cohort_rule.min_cohort_size, policy.min_cohort_size),
        privacy=_privacy(study, policy),
        findings=tuple(check_study(study, policy, profile, coordinator_url)),
        approval=policy.approval(study.content_hash),
        notes=tuple(notes),
    )
