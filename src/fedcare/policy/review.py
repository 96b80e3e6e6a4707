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
from fedcare.privacy.dp.accountant import AccountingError, epsilon
from fedcare.privacy.dp.plan import PlanError, SitePlan, delta_problem, plan_site
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


class BudgetFit(Strict):
    """How a study's plan at this site fits one data set's budget."""

    dataset: str
    epsilon: float
    delta: float
    accountant: str
    study_epsilon: float = Field(description="The whole study's spend, by this accountant.")
    rounds_affordable: int = Field(description="Rounds (after the count) within the budget.")
    problem: str | None = Field(default=None, description="Why the budget cannot be used.")


class DpPlanReview(Strict):
    """The site's DP-SGD plan for the study, computed from its own number of rows, and
    what it spends by the study's accountant."""

    training_rows: int
    plan: SitePlan
    count_epsilon: float | None
    round_epsilon: float
    study_epsilon: float
    budgets: tuple[BudgetFit, ...]


class PrivacyCost(Strict):
    differentially_private: bool
    statement: str
    budget: dict[str, DatasetBudget] = Field(
        default_factory=dict, description="What the site's policy allows per data set."
    )
    plan: DpPlanReview | None = Field(
        default=None, description="The site's DP plan, when its row count is known."
    )
    plan_problem: str | None = Field(
        default=None, description="Why the study cannot be planned at this site."
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
    if study.monitoring is not None:
        loss = "" if study.privacy.dp else " and the new model's loss on its held-out patients"
        outflows.append(
            Outflow(
                artefact=Artefact.DRIFT_SUMMARIES,
                description=f"to {where}: after each aggregated round, the cosine between "
                f"this site's update and the consortium's step{loss} (also under secure "
                "aggregation); and for each `fedcare site monitor` run on a promoted "
                "release, a drift summary: per test its flag, p-value and PSI, the "
                "estimated and measured AUROC and the live gate verdict with its reasons; "
                f"nothing from a run on fewer than {minimum} patients",
            )
        )
    notes = []
    if Artefact.MODEL_UPDATES not in declared:
        notes.append(
            "the study does not list model_updates among its artefacts, yet every round "
            "it trains sends one"
        )
    return outflows, notes


def _rounds_affordable(plan: SitePlan, budget: DatasetBudget) -> int:
    """The most rounds of ``plan`` that, after the count, stay within ``budget``."""

    def fits(rounds: int) -> bool:
        return plan.epsilon_after(rounds, budget.delta, budget.accountant) <= budget.epsilon

    if not fits(0):
        return 0
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
        if high > 1_000_000:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def dp_plan_review(study: Study, policy: SitePolicy, n_train: int) -> DpPlanReview:
    """The study's DP plan at a site with ``n_train`` training rows, against every budget
    of its policy. Raises :class:`PlanError` when the study cannot run there."""
    plan = plan_site(study, n_train)
    fits = []
    for dataset, budget in policy.privacy_budget.items():
        fits.append(
            BudgetFit(
                dataset=dataset,
                epsilon=budget.epsilon,
                delta=budget.delta,
                accountant=budget.accountant.value,
                study_epsilon=plan.epsilon_after(plan.rounds, budget.delta, budget.accountant),
                rounds_affordable=_rounds_affordable(plan, budget),
                problem=delta_problem("the budget's delta", budget.delta, n_train),
            )
        )
    return DpPlanReview(
        training_rows=n_train,
        plan=plan,
        count_epsilon=(
            epsilon(list(plan.count), plan.delta, plan.accountant) if plan.count else None
        ),
        round_epsilon=epsilon([plan.round_mechanism], plan.delta, plan.accountant),
        study_epsilon=plan.study_epsilon,
        budgets=tuple(fits),
    )


def _privacy(study: Study, policy: SitePolicy, n_train: int | None) -> PrivacyCost:
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
    plan, problem = None, None
    if declares_differential_privacy(study) and n_train is not None:
        try:
            plan = dp_plan_review(study, policy, n_train)
        except (PlanError, AccountingError) as exc:
            problem = str(exc)
    return PrivacyCost(
        differentially_private=declares_differential_privacy(study),
        statement=statement,
        budget=dict(policy.privacy_budget),
        plan=plan,
        plan_problem=problem,
    )


def _plan_findings(privacy: PrivacyCost) -> list[Finding]:
    out = []
    if privacy.plan_problem is not None:
        out.append(
            Finding(
                rule_id="privacy.plan",
                source="study privacy section at this site's row count",
                message=privacy.plan_problem,
                severity=Severity.REFUSE,
            )
        )
    if privacy.plan is not None:
        for fit in privacy.plan.budgets:
            if fit.problem is not None:
                out.append(
                    Finding(
                        rule_id="privacy.budget-delta",
                        source=f"policy privacy_budget.{fit.dataset}",
                        message=fit.problem,
                        severity=Severity.REFUSE,
                    )
                )
    return out


def review_study(
    study: Study,
    policy: SitePolicy,
    mapping: SiteMapping | None = None,
    *,
    profile: JurisdictionProfile | None = None,
    coordinator_url: str | None = None,
    n_train: int | None = None,
) -> StudyReview:
    """Review ``study`` for the site ``policy`` governs (profile: the shipped one by default).

    With ``n_train``, the site's training rows, a DP study's plan is computed at this site
    and held against each budget; a study that cannot be planned there is refused."""
    profile = profile or load_profile(policy.jurisdiction)
    schema = study.feature_schema
    n_params = count_parameters(study.model, schema.input_shape)
    columns, column_notes = _columns(study, mapping)
    outflows, outflow_notes = _outflows(study, n_params, coordinator_url)
    notes = column_notes + outflow_notes
    privacy = _privacy(study, policy, n_train)
    findings = check_study(study, policy, profile, coordinator_url)
    findings.extend(_plan_findings(privacy))
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
        privacy=privacy,
        findings=tuple(findings),
        approval=policy.approval(study.content_hash),
        notes=tuple(notes),
    )
