"""The Fed-Heart-Disease benchmark: pooled, local and every strategy, beside the published table.

Every federated run goes through :func:`fedcare.simulation.runner.run_federation`
(the study service with a :class:`SiteWorker` per centre), the code path of
``fedcare simulate``; pooled and local models come from
:func:`fedcare.simulation.runner.train_baselines`. Each method runs once per
seed: the seed is the study seed (round seeds, local shuffling, baseline
seeds); the train/test split stays at the protocol's seed 43.

Metric: accuracy at 0.5 on each centre's test set, averaged over seeds, and
"avg" = the mean over the four centres (FLamby's "Avg").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, Field

from fedcare.data.heart_disease import CENTER_NAMES, heart_disease_study
from fedcare.models.size import study_parameter_count
from fedcare.simulation.cells import run_cells
from fedcare.simulation.results import RoundRecord
from fedcare.simulation.runner import (
    POOLED,
    evaluate,
    local_model_name,
    run_federation,
    train_baselines,
)
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import PersonalizationSpec, Strategy, Study

FEDPROX = "fedprox"

METHODS: tuple[str, ...] = (
    Strategy.FEDAVG.value,
    FEDPROX,
    Strategy.FEDAVGM.value,
    Strategy.FEDADAGRAD.value,
    Strategy.FEDADAM.value,
    Strategy.FEDYOGI.value,
)
"""Federated methods: the server strategies, plus FedProx (FedAvg + a proximal term)."""

PERSONAL_PREFIX = "fedavg+"
"""Rows of FedAvg with each centre's personal model: "fedavg+finetune", "fedavg+ditto"."""

DEFAULT_PROXIMAL_MU = 0.1
"""FedProx's mu in this benchmark (docs/strategies.md, sweep)."""

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``."""


def _quiet(stage: str, done: int, total: int) -> None:
    del stage, done, total


class Scores(BaseModel):
    """One method's accuracy on each centre's test set (mean over seeds) and their mean."""

    avg: float | None
    centers: dict[str, float | None]
    avg_sd: float | None = Field(
        default=None, description="Standard deviation over seeds of the per-seed avg."
    )


class BenchmarkSettings(BaseModel):
    """What was run: enough to reproduce the table."""

    study_name: str
    study_hash: str
    seeds: list[int]
    split_seed: int | None
    rounds: int
    training: dict[str, object]
    weighting: str
    server_learning_rate: dict[str, float]
    proximal_mu: float
    privacy: dict[str, object] = Field(
        default_factory=dict,
        description="The study's privacy section: DP-SGD at every site for the federated "
        "methods when dp is on (pooled and local models are trained without DP).",
    )


class BenchmarkResult(BaseModel):
    measured: dict[str, Scores]
    published: dict[str, Scores]
    lift: dict[str, float | None]
    """Cross-site generalisation lift of each method over the local models (median gain)."""
    published_lift: dict[str, float | None]
    settings: BenchmarkSettings
    wall_s: float


def _published(avg: float, *centers: float) -> Scores:
    return Scores(avg=avg, centers=dict(zip(CENTER_NAMES, centers, strict=True)))


PUBLISHED: dict[str, Scores] = {
    POOLED: _published(0.735, 0.783, 0.764, 0.750, 0.644),
    local_model_name("Cleveland"): _published(0.722, 0.746, 0.760, 0.725, 0.658),
    local_model_name("Hungary"): _published(0.629, 0.746, 0.746, 0.525, 0.498),
    local_model_name("Switzerland"): _published(0.567, 0.481, 0.391, 0.725, 0.671),
    local_model_name("VA"): _published(0.637, 0.577, 0.467, 0.800, 0.702),
    "fedavg": _published(0.685, 0.731, 0.719, 0.650, 0.640),
    FEDPROX: Scores(avg=0.685, centers=dict.fromkeys(CENTER_NAMES)),
    "scaffold": _published(0.684, 0.727, 0.719, 0.650, 0.640),
    "fedadagrad": _published(0.731, 0.760, 0.753, 0.738, 0.676),
    "fedadam": _published(0.726, 0.752, 0.746, 0.738, 0.667),
}
"""FLamby's Fed-Heart-Disease table (mean accuracy over 5 seeds), as in the data README."""


def cross_site_lift(
    table: Mapping[str, Scores], method: str, centers: Sequence[str] = CENTER_NAMES
) -> float | None:
    """Median over centres c of (M_c - L_c) / L_c, or None when a number is missing.

    L_c: mean accuracy of c's local model on the other centres' test sets;
    M_c: the method's mean accuracy on those same test sets.
    """
    if method not in table:
        return None
    gains: list[float] = []
    for center in centers:
        local = table.get(local_model_name(center))
        if local is None:
            return None
        others = [c for c in centers if c != center]
        local_scores = [local.centers.get(c) for c in others]
        method_scores = [table[method].centers.get(c) for c in others]
        if any(v is None for v in (*local_scores, *method_scores)):
            return None
        l_c = statistics.fmean(v for v in local_scores if v is not None)
        m_c = statistics.fmean(v for v in method_scores if v is not None)
        gains.append((m_c - l_c) / l_c)
    return statistics.median(gains)


def lifts(table: Mapping[str, Scores]) -> dict[str, float | None]:
    """The lift of every non-local method in ``table``; none for personal models (each
    centre's own, never scored on another centre: the lift's premise)."""
    return {
        name: None if name.startswith(PERSONAL_PREFIX) else cross_site_lift(table, name)
        for name in table
        if not name.startswith(local_model_name(""))
    }


def method_study(
    base: Study,
    method: str,
    server_learning_rate: float | None = None,
    proximal_mu: float = DEFAULT_PROXIMAL_MU,
) -> Study:
    """``base`` set up for one method; server learning rate None means the strategy default."""
    strategy = Strategy.FEDAVG if method == FEDPROX else Strategy(method)
    aggregation = {
        **base.canonical()["aggregation"],
        "strategy": strategy.value,
        "server_learning_rate": server_learning_rate,
    }
    training = {
        **base.canonical()["training"],
        "proximal_mu": proximal_mu if method == FEDPROX else 0.0,
    }
    return base.replace(aggregation=aggregation, training=training)


def accuracies(
    study: Study, params: NDArray[np.float32], sites: Sequence[SiteDataset]
) -> dict[str, float]:
    """Accuracy at 0.5 of one model on every site's test set (``binary_metrics``)."""
    return {name: m.accuracy for name, m in evaluate(study, params, sites).items()}


@dataclass(frozen=True)
class FederatedRun:
    """The final global model, its test accuracy per site, and the per-round records."""

    params: NDArray[np.float32]
    accuracy: dict[str, float]
    records: list[RoundRecord]


def federate(
    study: Study, sites: Sequence[SiteDataset], progress: Progress = _quiet
) -> FederatedRun:
    """One federated run, exactly as ``fedcare simulate`` runs it."""
    run = run_federation(study, sites, progress)
    return FederatedRun(run.params, accuracies(study, run.params, sites), run.rounds)


def personal_accuracies(
    study: Study, sites: Sequence[SiteDataset], noise_seed: int | None = None
) -> dict[str, float]:
    """Each centre's personal model (the study's ``personalization``) on that centre's own
    test set: the accuracy a personalised centre would see."""
    n_params = study_parameter_count(study)
    workers = {s.name: SiteWorker(study, s, n_params, noise_seed=noise_seed) for s in sites}
    run = run_federation(study, sites, workers=workers)
    out = {}
    for site in sites:
        personal = workers[site.name].personal_model(run.params)
        assert personal is not None  # every centre trains every round here
        out[site.name] = evaluate(study, personal, [site])[site.name].accuracy
    return out


def summarise(per_seed: Sequence[Mapping[str, float]], centers: Sequence[str]) -> Scores:
    """Mean over seeds per centre, their mean, and the seed-to-seed spread of the avg."""
    means = {c: statistics.fmean(run[c] for run in per_seed) for c in centers}
    seed_avgs = [statistics.fmean(run[c] for c in centers) for run in per_seed]
    return Scores(
        avg=statistics.fmean(means.values()),
        centers=dict(means),
        avg_sd=statistics.stdev(seed_avgs) if len(seed_avgs) > 1 else None,
    )


LABELS: dict[str, str] = {
    POOLED: "pooled (centralised)",
    **{local_model_name(c): f"local, {c} only" for c in CENTER_NAMES},
    "fedavg": "FedAvg",
    FEDPROX: "FedProx",
    "fedavgm": "FedAvgM",
    "scaffold": "Scaffold",
    "fedadagrad": "FedAdagrad",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedavg+finetune": "FedAvg + fine-tuning (personal)",
    "fedavg+ditto": "FedAvg + Ditto (personal)",
}


class TableRow(BaseModel):
    """One row of the published table's layout: our scores beside the published ones."""

    method: str
    label: str
    measured: Scores | None
    published: Scores | None
    lift: float | None
    published_lift: float | None

    @property
    def is_local(self) -> bool:
        return self.method.startswith(local_model_name(""))

    def pairs(
        self, centers: Sequence[str] = CENTER_NAMES
    ) -> list[tuple[float | None, float | None]]:
        """(ours, published) for the avg and then each centre; None where there is no number."""

        def values(scores: Scores | None) -> list[float | None]:
            if scores is None:
                return [None] * (len(centers) + 1)
            return [scores.avg, *(scores.centers.get(c) for c in centers)]

        return list(zip(values(self.measured), values(self.published), strict=True))


def table_rows(result: BenchmarkResult) -> list[TableRow]:
    """Rows in the published order: pooled, the local models, then each federated method."""
    # The published rows in their order, then methods the publication does not have.
    names = list(dict.fromkeys([*result.published, *result.measured]))
    return [
        TableRow(
            method=name,
            label=LABELS.get(name, name),
            measured=result.measured.get(name),
            published=result.published.get(name),
            lift=result.lift.get(name),
            published_lift=result.published_lift.get(name),
        )
        for name in names
    ]


BASELINES = "pooled and local"
"""The cell that trains the pooled model and every centre's local model for one seed."""


@dataclass(frozen=True)
class BenchmarkInputs:
    """What every run of the benchmark reads: sent to each worker once."""

    base: Study
    sites: tuple[SiteDataset, ...]
    proximal_mu: float


BenchmarkCell = tuple[str, int, PersonalizationSpec | None]
"""(row: BASELINES, a method or a personalised row; seed; that row's personalisation)."""


def run_cell(inputs: BenchmarkInputs, cell: BenchmarkCell) -> dict[str, dict[str, float]]:
    """One seed of one row (or of the baselines): each row's test accuracy per centre.

    DP noise, when the study has it, is seeded from the cell's seed, so a cell gives the
    same accuracies in any process."""
    name, seed, spec = cell
    seeded, sites = inputs.base.replace(seed=seed), inputs.sites
    if name == BASELINES:
        baselines = train_baselines(seeded, sites)
        return {row: accuracies(seeded, params, sites) for row, params in baselines.items()}
    if spec is None:
        study = method_study(seeded, name, proximal_mu=inputs.proximal_mu)
        params = run_federation(study, sites, noise_seed=seed).params
        return {name: accuracies(study, params, sites)}
    personal = method_study(seeded, Strategy.FEDAVG.value).replace(personalization=spec)
    return {name: personal_accuracies(personal, sites, noise_seed=seed)}


def run_benchmark(
    sites: Sequence[SiteDataset],
    study: Study | None = None,
    n_seeds: int = 5,
    methods: Sequence[str] = METHODS,
    progress: Progress = _quiet,
    proximal_mu: float = DEFAULT_PROXIMAL_MU,
    personalization: Sequence[PersonalizationSpec] = (),
    *,
    processes: int | None = None,
    ray_address: str | None = None,
) -> BenchmarkResult:
    """Pooled, the local models and every method over ``n_seeds`` seeds (study seed + i);
    each ``personalization`` on FedAvg as "fedavg+<method>" (each centre's personal model
    on its own test set). Each (row, seed) is an independent cell: on ``processes`` local
    processes (by default one per core when long enough to gain from them) or on the Ray
    cluster at ``ray_address``."""
    if n_seeds < 1:
        raise ValueError("the benchmark needs at least one seed")
    started = time.perf_counter()
    base = study or heart_disease_study()
    seeds = [base.seed + i for i in range(n_seeds)]
    centers = [s.name for s in sites]
    rows: list[tuple[str, PersonalizationSpec | None]] = [(BASELINES, None)]
    rows += [(method, None) for method in methods]
    rows += [(f"{PERSONAL_PREFIX}{spec.method.value}", spec) for spec in personalization]
    cells: list[BenchmarkCell] = [(name, seed, spec) for name, spec in rows for seed in seeds]
    scored = run_cells(
        run_cell,
        BenchmarkInputs(base, tuple(sites), proximal_mu),
        cells,
        processes=processes,
        ray_address=ray_address,
        progress=lambda done, total: progress("benchmark runs", done, total),
    )
    runs: dict[str, list[dict[str, float]]] = {}
    for result in scored:
        for name, accuracy in result.items():
            runs.setdefault(name, []).append(accuracy)
    rounds = base.rounds.count
    measured = {name: summarise(per_seed, centers) for name, per_seed in runs.items()}
    return BenchmarkResult(
        measured=measured,
        published=PUBLISHED,
        lift=lifts(measured),
        published_lift=lifts(PUBLISHED),
        settings=BenchmarkSettings(
            study_name=base.name,
            study_hash=base.content_hash,
            seeds=seeds,
            split_seed=base.preprocessing.split_seed,
            rounds=rounds,
            training=base.canonical()["training"],
            weighting=base.aggregation.weighting.value,
            server_learning_rate={
                m: method_study(base, m).aggregation.effective_learning_rate for m in methods
            },
            proximal_mu=proximal_mu,
            privacy=base.canonical()["privacy"],
        ),
        wall_s=time.perf_counter() - started,
    )
