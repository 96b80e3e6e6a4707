"""Run a study on one machine: the federation, and the baselines users compare it with.

The federation runs through the study service, the driver the networked
coordinator runs too, with every site's real worker answering in this process
(:mod:`fedcare.simulation.inprocess`).
The baselines are a local-only model per site and a pooled model trained on
every site's training rows, each with the same number of local epochs (or
steps) as the federation spends in total.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedcare.federation.service import RoundReport
from fedcare.federation.state import SiteState
from fedcare.models.builders import check_model, initial_parameters
from fedcare.models.size import study_parameter_count
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.releases.registry import ReleaseRegistry
from fedcare.simulation.inprocess import run_in_process
from fedcare.simulation.pace import Pacing
from fedcare.simulation.results import (
    PrivacySummary,
    ReleaseRecord,
    RoundRecord,
    SimulationResult,
    SiteComparison,
    SiteSummary,
    SubgroupAuroc,
)
from fedcare.simulation.rules import SiteRules
from fedcare.site.dataset import SiteDataset
from fedcare.site.personal import release_personal
from fedcare.site.validation import report_on
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, TrainingSpec
from fedcare.training import predict_proba, train_local
from fedcare.training.batched import SharedRound, shares_rounds
from fedcare.training.convergence import CONVERGENCE_WINDOW, still_falling
from fedcare.training.local import check_dp_model
from fedcare.validation.cells import FEW_POSITIVES, CellReport
from fedcare.validation.curves import Curves, curves
from fedcare.validation.metrics import BinaryMetrics, binary_metrics, binary_metrics_by_part

FEDERATED = "federated"
POOLED = "pooled"

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` while a simulation runs."""


def _quiet(stage: str, done: int, total: int) -> None:
    del stage, done, total


def local_model_name(site: str) -> str:
    return f"local:{site}"


@dataclass(frozen=True)
class SimulationOptions:
    baselines: bool = True
    descriptions: dict[str, str] | None = None
    site_rules: dict[str, SiteRules] = field(default_factory=dict)
    registry_dir: Path | None = None
    """Where the release registry is kept (``registry.db`` and model files); a
    temporary folder when not given."""
    offline: frozenset[str] = frozenset()
    """Sites that never answer (a site down for the whole study)."""
    pacing: Pacing | None = None
    """Each site's compute speed, latency and availability on the virtual clock."""


def evaluate(
    study: Study,
    params: NDArray[np.float32],
    sites: Sequence[SiteDataset],
    n_bootstrap: int = 0,
) -> dict[str, BinaryMetrics]:
    """Metrics of one parameter vector on every site's held-out data (with bootstrap
    AUROC intervals over ``n_bootstrap`` resamples when > 0)."""
    if n_bootstrap == 0 and sites and all(site.x_test.ndim == 2 for site in sites):
        # Every round scores every site: one prediction and one pass of metrics over
        # all their rows, instead of a dozen small numpy calls per site.
        scores = predict_proba(study.model, params, np.concatenate([s.x_test for s in sites]))
        labels = np.concatenate([site.y_test for site in sites])
        parts = binary_metrics_by_part(labels, scores, [len(site.y_test) for site in sites])
        return {site.name: metrics for site, metrics in zip(sites, parts, strict=True)}
    return {
        site.name: binary_metrics(
            site.y_test,
            predict_proba(study.model, params, site.x_test),
            n_bootstrap=n_bootstrap,
            seed=study.seed,
        )
        for site in sites
    }


@dataclass(frozen=True)
class FederationRun:
    """The final model of an in-process study, its rounds, and why it stopped early."""

    params: NDArray[np.float32]
    rounds: list[RoundRecord]
    halted: str = ""
    left: dict[str, str] = field(default_factory=dict)
    """Sites that stopped taking part, with their standing and why (e.g. withdrawn: budget)."""
    elapsed_s: float = 0.0
    """Virtual seconds the study took (0 without site paces)."""
    stale: dict[str, int] = field(default_factory=dict)
    """Asynchronous mode: updates refused as too stale, per site."""
    drifting: dict[str, int] = field(default_factory=dict)
    """Sites pulling away from the consortium, with the round that flagged them."""


def run_federation(
    study: Study,
    sites: Sequence[SiteDataset],
    progress: Progress = _quiet,
    workers: Mapping[str, SiteWorker] | None = None,
    offline: frozenset[str] = frozenset(),
    registry: ReleaseRegistry | None = None,
    pacing: Pacing | None = None,
    noise_seed: int | None = None,
) -> FederationRun:
    """Run every round of the study through the study service, in this process.

    Each site is a real :class:`SiteWorker` (``workers``, or plain ones built from
    ``sites``, whose DP noise is seeded from ``noise_seed`` when given, so the run
    repeats); sites in ``offline`` never answer. A study that validates releases
    keeps them in ``registry`` (a temporary one when not given). ``pacing`` gives the
    sites their speed, latency and availability on the virtual clock.
    """
    n_params = study_parameter_count(study)
    if workers is None:
        shared = SharedRound(study) if shares_rounds(study) else None
        workers = {
            s.name: SiteWorker(study, s, n_params, shared=shared, noise_seed=noise_seed)
            for s in sites
        }
    records: list[RoundRecord] = []
    total = study.rounds.count

    def on_round(report: RoundReport) -> None:
        outcome = report.outcome
        records.append(
            RoundRecord(
                number=outcome.number,
                status=outcome.status.value,
                participants=list(outcome.participants),
                reason=outcome.reason,
                mean_train_loss=outcome.mean_loss,
                metrics=evaluate(study, report.params, sites),
                elapsed_s=report.elapsed_s if pacing is not None else None,
            )
        )
        progress("federated rounds", outcome.number, total)

    with contextlib.ExitStack() as stack:
        if registry is None and study.validates_releases:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="registry-")))
            registry = ReleaseRegistry.open(f"sqlite:///{folder / 'registry.db'}", folder)
            stack.callback(registry.close)
        service = run_in_process(study, workers, offline, registry, on_round, pacing=pacing)
    halted = service.halted
    if service.waiting_for_sites:
        halted = (
            f"only {len(service.checked_in)} site(s) answered; the first round opens once "
            f"{study.rounds.min_sites} have asked for work"
        )
    left = {
        name: f"{record.state.value} ({record.reason})"
        for name in service.federation.sites
        if (record := service.standing(name)).state is not SiteState.ACTIVE
    }
    elapsed = service.clock() - service.state.study(service.hash).created_at
    drifting = service.drifting()
    cosines = {
        site: {a.round: a.cosine for a in rows} for site, rows in service.alignments().items()
    }
    records = [
        record.model_copy(
            update={
                "alignment": {
                    site: by[record.number] for site, by in cosines.items() if record.number in by
                },
                "drifting": sorted(s for s, since in drifting.items() if since <= record.number),
            }
        )
        for record in records
    ]
    return FederationRun(
        service.federation.params,
        records,
        halted,
        left,
        elapsed,
        dict(service.stale),
        drifting,
    )


def _spend(
    guard: PrivacyGuard | None, study: Study, n_train: int, rounds: int
) -> dict[str, float | list[float]]:
    """What the site's ledger says it spent, its budget, its noise multiplier, and the
    epsilon its plan reaches after each round."""
    if guard is None or guard.budget is None:
        return {}
    plan = guard.plan(study, n_train)
    return {
        "epsilon_spent": guard.ledger.spent(guard.dataset, guard.budget),
        "epsilon_budget": guard.budget.epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "epsilon_by_round": [plan.epsilon_after(r) for r in range(1, rounds + 1)],
    }


def _privacy(study: Study) -> PrivacySummary | None:
    spec = study.privacy
    if not spec.dp:
        return None
    return PrivacySummary(
        epsilon=spec.epsilon,
        delta=spec.delta,
        max_grad_norm=spec.max_grad_norm,
        accountant=spec.accountant.value,
        count_noise=spec.count_noise,
    )


def warnings(study: Study, comparison: Sequence[SiteComparison], run: FederationRun) -> list[str]:
    """What a reader must know before trusting the numbers of a run."""
    rounds = run.rounds
    out = []
    if run.halted:
        out.append(
            f"the study halted after round {len(rounds)} of {study.rounds.count}: {run.halted}"
        )
    out += [
        f"{site} stopped taking part: {why}; later rounds went on without it"
        for site, why in run.left.items()
    ]
    out += [
        f"{row.site}: {row.positives} positive(s) in {row.n} held-out rows (fewer than "
        f"{FEW_POSITIVES}); its AUROC is imprecise, read the interval"
        for row in comparison
        if row.positives < FEW_POSITIVES
    ]
    out += [
        f"{site} pulls away from the consortium: its updates pointed away from the "
        f"consortium's step for {study.monitoring.training.rounds} rounds in a row by round "
        f"{since} (docs/drift.md); check its data and mapping"
        for site, since in run.drifting.items()
        if study.monitoring is not None
    ]
    fall = still_falling([r.mean_train_loss for r in rounds])
    if fall is not None:
        out.append(
            f"the training loss still fell {100 * fall:.1f} % over the last "
            f"{CONVERGENCE_WINDOW} rounds: the model is likely under-trained; "
            "try more rounds (rounds.count)"
        )
    elif study.privacy.dp:
        out.append(
            "under DP no site reports its training loss (it would spend privacy budget), "
            "so convergence is not checked"
        )
    return out


def _baseline_training(training: TrainingSpec, rounds: int) -> TrainingSpec:
    """Same optimiser, with the federation's whole budget of epochs or steps."""
    if training.steps is not None:
        return training.model_copy(update={"steps": training.steps * rounds})
    assert training.epochs is not None
    return training.model_copy(update={"epochs": training.epochs * rounds})


def train_baselines(
    study: Study, sites: Sequence[SiteDataset], progress: Progress = _quiet
) -> dict[str, NDArray[np.float32]]:
    """A local-only model for each site and one pooled model."""
    initial = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    training = _baseline_training(study.training, study.rounds.count)
    models: dict[str, NDArray[np.float32]] = {}
    total = len(sites) + 1
    for i, site in enumerate(sites, start=1):
        result = train_local(
            study.model, training, initial, site.x_train, site.y_train, seed=study.seed + i
        )
        models[local_model_name(site.name)] = result.params
        progress("baselines", i, total)
    pooled = train_local(
        study.model,
        training,
        initial,
        np.concatenate([s.x_train for s in sites]),
        np.concatenate([s.y_train for s in sites]),
        seed=study.seed,
    )
    models[POOLED] = pooled.params
    progress("baselines", total, total)
    return models


def _plot_data(
    study: Study, models: Mapping[str, NDArray[np.float32]], sites: Sequence[SiteDataset]
) -> tuple[dict[str, dict[str, Curves]], dict[str, list[SubgroupAuroc]]]:
    """Per site: the curves of its local, the federated and the pooled model on its
    held-out rows; the federated model's AUROC in each study subgroup."""
    all_curves: dict[str, dict[str, Curves]] = {}
    subgroups: dict[str, list[SubgroupAuroc]] = {}
    for site in sites:
        named = {
            "local": models.get(local_model_name(site.name)),
            "federated": models[FEDERATED],
            "pooled": models.get(POOLED),
        }
        scores = {
            label: predict_proba(study.model, params, site.x_test)
            for label, params in named.items()
            if params is not None
        }
        all_curves[site.name] = {
            label: drawn
            for label, values in scores.items()
            if (drawn := curves(site.y_test, values)) is not None
        }
        if study.validation.subgroups and 0 < site.y_test.sum() < site.n_test:
            labels = site.y_test.astype(np.int64)
            report = report_on(study, labels, scores["federated"], site.test_frame, 1, study.seed)
            subgroups[site.name] = [
                SubgroupAuroc(group=cell.group, suppressed=True)
                if not isinstance(cell, CellReport)
                else SubgroupAuroc(
                    group=cell.group,
                    n=cell.n,
                    auroc=cell.auroc.value,
                    ci_low=cell.auroc.ci_low,
                    ci_high=cell.auroc.ci_high,
                )
                for cells in report.subgroups.values()
                for cell in cells
            ]
    return all_curves, subgroups


def _mean_auroc(metrics: dict[str, BinaryMetrics], sites: Sequence[str]) -> float | None:
    values = [metrics[s].auroc for s in sites if metrics[s].auroc is not None]
    return statistics.fmean(v for v in values if v is not None) if values else None


def _mean_on_others(metrics: dict[str, BinaryMetrics], sites: Sequence[str]) -> dict[str, float]:
    """Per site, :func:`_mean_auroc` of one model on every other site, to the last bit
    (the others' exact sum, rounded once, as ``fsum`` rounds it), without summing the
    others again for each of a thousand sites."""
    values = {s: metrics[s].auroc for s in sites}
    defined = [v for v in values.values() if v is not None]
    total = sum(map(Fraction, defined), Fraction(0))
    out = {}
    for site, own in values.items():
        count = len(defined) - (own is not None)
        if count:
            out[site] = float(total - Fraction(own or 0.0)) / count
    return out


def compare(
    matrix: dict[str, dict[str, BinaryMetrics]], site_names: Sequence[str]
) -> list[SiteComparison]:
    """Per site: local vs federated vs pooled, and cross-site generalisation."""
    rows = []
    federated_elsewhere = _mean_on_others(matrix[FEDERATED], site_names)
    for site in site_names:
        local = matrix.get(local_model_name(site))
        pooled = matrix.get(POOLED)
        federated = matrix[FEDERATED][site]
        rows.append(
            SiteComparison(
                site=site,
                n=federated.n,
                positives=federated.positives,
                local=local[site].auroc if local else None,
                local_ci=local[site].auroc_ci if local else None,
                federated=federated.auroc,
                federated_ci=federated.auroc_ci,
                pooled=pooled[site].auroc if pooled else None,
                pooled_ci=pooled[site].auroc_ci if pooled else None,
                local_on_other_sites=(
                    _mean_auroc(local, [s for s in site_names if s != site]) if local else None
                ),
                federated_on_other_sites=federated_elsewhere.get(site),
            )
        )
    return rows


def _with_personal(
    study: Study,
    comparison: list[SiteComparison],
    workers: Mapping[str, SiteWorker],
    final: NDArray[np.float32],
    sites: Sequence[SiteDataset],
    rounds: int,
) -> list[SiteComparison]:
    """Each site's personal model, scored on its own held-out rows only, and released or
    held under the study's and the site's gates as its site would."""
    by_name = {s.name: s for s in sites}
    rows = []
    for row in comparison:
        worker = workers[row.site]
        personal = worker.personal_model(final)
        if personal is None:
            rows.append(row)
            continue
        metrics = evaluate(study, personal, [by_name[row.site]], study.validation.n_bootstrap)
        own = metrics[row.site]
        release = release_personal(
            study, by_name[row.site], personal, final, rounds, worker.site_gates, worker.min_cohort
        )
        rows.append(
            row.model_copy(
                update={
                    "personalized": own.auroc,
                    "personalized_ci": own.auroc_ci,
                    "personal_released": release.released,
                    "personal_reasons": release.verdict.reasons,
                }
            )
        )
    return rows


def run_simulation(
    study: Study,
    sites: Sequence[SiteDataset],
    options: SimulationOptions = SimulationOptions(),
    progress: Progress = _quiet,
) -> SimulationResult:
    """The federation plus (optionally) its baselines, scored on every site's held-out data."""
    started = time.perf_counter()
    check_model(study)
    check_dp_model(study)
    n_params = study_parameter_count(study)
    guards: dict[str, PrivacyGuard] = {}
    with contextlib.ExitStack() as stack:
        workers = _workers(study, sites, options, n_params, guards, stack)
        return _run(study, sites, options, progress, workers, guards, n_params, started)


def _workers(
    study: Study,
    sites: Sequence[SiteDataset],
    options: SimulationOptions,
    n_params: int,
    guards: dict[str, PrivacyGuard],
    stack: contextlib.ExitStack,
) -> dict[str, SiteWorker]:
    """A worker per site; under a DP study, a site with a budget gets a ledger (in a
    scratch folder: a simulation releases nothing, so nothing carries over to a next run)."""
    ledgers: Path | None = None
    workers = {}
    shared = SharedRound(study) if shares_rounds(study) else None
    for s in sites:
        rules = options.site_rules.get(s.name, SiteRules())
        guard = None
        if study.privacy.dp and rules.budget is not None:
            if ledgers is None:
                ledgers = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ledgers-")))
            ledger = PrivacyLedger(ledgers / f"{s.name}.sqlite")
            stack.callback(ledger.close)
            guard = guards[s.name] = PrivacyGuard(ledger, s.name, rules.budget)
        workers[s.name] = SiteWorker(
            study, s, n_params, rules.gates, rules.min_cohort, privacy=guard, shared=shared
        )
    return workers


def _run(
    study: Study,
    sites: Sequence[SiteDataset],
    options: SimulationOptions,
    progress: Progress,
    workers: dict[str, SiteWorker],
    guards: dict[str, PrivacyGuard],
    n_params: int,
    started: float,
) -> SimulationResult:
    with tempfile.TemporaryDirectory(prefix="fedcare-registry-") as scratch:
        folder = options.registry_dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        registry = ReleaseRegistry.open(f"sqlite:///{folder / 'registry.db'}", folder)
        try:
            run = run_federation(
                study,
                sites,
                progress,
                workers,
                options.offline,
                registry=registry,
                pacing=options.pacing,
            )
            releases = [
                ReleaseRecord.from_release(r) for r in registry.releases(study.content_hash)
            ]
        finally:
            registry.close()
    models = {FEDERATED: run.params}
    if options.baselines:
        models.update(train_baselines(study, sites, progress))
    matrix = {
        name: evaluate(study, params, sites, study.validation.n_bootstrap)
        for name, params in models.items()
    }
    comparison = compare(matrix, [s.name for s in sites])
    if study.personalization is not None:
        comparison = _with_personal(study, comparison, workers, run.params, sites, len(run.rounds))
    site_curves, subgroups = _plot_data(study, models, sites)
    descriptions = options.descriptions or {}
    return SimulationResult(
        study_name=study.name,
        study_hash=study.content_hash,
        seed=study.seed,
        strategy=study.aggregation.strategy.value,
        weighting=study.aggregation.weighting.value,
        n_parameters=n_params,
        sites=[
            SiteSummary(
                name=s.name,
                description=descriptions.get(s.name, ""),
                n_train=s.n_train,
                n_test=s.n_test,
                test_prevalence=float(s.y_test.mean()),
                **_spend(guards.get(s.name), study, s.n_train, len(run.rounds)),
            )
            for s in sites
        ],
        rounds=run.rounds,
        matrix=matrix,
        comparison=comparison,
        releases=releases,
        privacy=_privacy(study),
        warnings=warnings(study, comparison, run),
        wall_s=time.perf_counter() - started,
        virtual_s=run.elapsed_s if options.pacing is not None else None,
        stale_refused=run.stale,
        curves=site_curves,
        subgroups=subgroups,
    )
