"""The privacy-utility sweep: what each epsilon costs in discrimination and in sensitivity
per subgroup, for the compliance lead and the clinical lead to read together.

For each epsilon of the grid (and without DP) and each seed, the study runs as
``fedcare simulate`` runs it (:func:`fedcare.simulation.runner.run_federation`,
DP-SGD at every site with that epsilon per site for the whole study), and the
final model is scored on every site's held-out rows:

* AUROC over all held-out rows, and per site;
* sensitivity at one fixed operating point (a probability threshold that does
  not move with epsilon) in each level of sex, age band and ethnicity, where the
  data has them. A level with fewer than the study's minimum cohort size of
  patients, or no positives, has no number.

Each figure is the mean over seeds with its standard deviation. The runs make no
candidate releases: a site's validation of a candidate never changes the model, and
the sweep scores the final model itself. Sites run without a privacy ledger here:
nothing leaves a machine, and each run's DP noise is seeded from its seed, so the table
is the same on one process, on several, or on a Ray cluster.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from pydantic import BaseModel, Field
from sklearn.metrics import roc_auc_score

from fedcare.simulation.cells import run_cells
from fedcare.simulation.runner import run_federation
from fedcare.site.dataset import SiteDataset
from fedcare.study import AccountantKind, Artefact, Study
from fedcare.training import predict_proba
from fedcare.validation.report import age_band

DEFAULT_EPSILONS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
SUBGROUPS: tuple[str, ...] = ("sex", "age_band", "ethnicity")
NO_DP = "no DP"

Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    del stage, done, total


class Spread(BaseModel):
    """Mean and standard deviation over seeds; None where no seed had a number."""

    mean: float | None
    sd: float | None
    n_seeds: int


class GridPoint(BaseModel):
    epsilon: float | None
    """None: without differential privacy."""
    label: str
    auroc: Spread
    auroc_by_site: dict[str, Spread]
    sensitivity: dict[str, Spread] = Field(description="By subgroup level, e.g. 'sex=female'.")


class CalibrationResult(BaseModel):
    study_name: str
    delta: float
    accountant: str
    max_grad_norm: float
    threshold: float
    min_cohort: int
    seeds: list[int]
    subgroups: list[str]
    unavailable_subgroups: list[str]
    points: list[GridPoint]


def subgroup_levels(frame: pd.DataFrame, name: str) -> NDArray[np.str_] | None:
    """Each held-out row's level of ``name``, or None when the data cannot tell."""
    if name == "sex":
        if "sex" in frame.columns:
            column = frame["sex"].map({1: "male", 0: "female"})
        elif "sex_female" in frame.columns:
            column = frame["sex_female"].map({1: "female", 0: "male"})
        else:
            return None
    elif name == "age_band":
        if "age" not in frame.columns:
            return None
        column = age_band(frame["age"])
    elif name in frame.columns:
        column = frame[name]
    else:
        return None
    return column.astype(object).where(column.notna(), "missing").astype(str).to_numpy(np.str_)


def _spread(values: Sequence[float | None]) -> Spread:
    known = [v for v in values if v is not None]
    return Spread(
        mean=statistics.fmean(known) if known else None,
        sd=statistics.stdev(known) if len(known) > 1 else None,
        n_seeds=len(known),
    )


def _private_study(
    study: Study, epsilon: float | None, delta: float, max_grad_norm: float, kind: AccountantKind
) -> Study:
    if epsilon is None:
        return study.replace(privacy={"dp": False})
    privacy = {
        "dp": True,
        "epsilon": epsilon,
        "delta": delta,
        "max_grad_norm": max_grad_norm,
        "accountant": kind.value,
    }
    return study.replace(privacy=privacy)


def without_release_validation(study: Study) -> dict[str, object]:
    """The study's disclosure section without metrics, so its runs validate no releases."""
    disclosure = study.disclosure.model_dump(mode="json")
    disclosure["artefacts"] = [a for a in disclosure["artefacts"] if a != Artefact.METRICS.value]
    return disclosure


def _score(
    study: Study, params: NDArray[np.float32], sites: Sequence[SiteDataset]
) -> dict[str, NDArray[np.float64]]:
    return {s.name: predict_proba(study.model, params, s.x_test) for s in sites}


def _sensitivity(
    y: NDArray[np.float64], predicted: NDArray[np.bool_], min_cohort: int
) -> float | None:
    positives = y == 1
    if y.size < min_cohort or not positives.any():
        return None
    return float(predicted[positives].mean())


@dataclass(frozen=True)
class SweepInputs:
    """What every cell of the sweep reads: sent to each worker once."""

    study: Study
    sites: tuple[SiteDataset, ...]
    delta: float
    max_grad_norm: float
    accountant: AccountantKind
    threshold: float
    levels: dict[str, NDArray[np.str_]]
    """Each held-out row's subgroup level, per subgroup the data has."""


@dataclass(frozen=True)
class CellScores:
    """One run of the study (one epsilon, one seed), scored on every site's held-out rows."""

    auroc: float
    auroc_by_site: dict[str, float | None]
    sensitivity: dict[str, float | None]


def score_cell(inputs: SweepInputs, cell: tuple[float | None, int]) -> CellScores:
    """Run the study at ``cell`` = (epsilon per site or None for no DP, seed) and score it.

    DP noise is seeded from the cell's seed (no ledger: nothing leaves the machine), so a
    cell gives the same scores in any process."""
    epsilon, seed = cell
    study, sites = inputs.study, inputs.sites
    run = _private_study(study, epsilon, inputs.delta, inputs.max_grad_norm, inputs.accountant)
    run = run.replace(seed=seed, disclosure=without_release_validation(run))
    params = run_federation(run, sites, noise_seed=seed).params
    scores = _score(run, params, sites)
    y_all = np.concatenate([s.y_test for s in sites]).astype(np.float64)
    p_all = np.concatenate([scores[s.name] for s in sites])
    by_site: dict[str, float | None] = {}
    for site in sites:
        y = site.y_test.astype(np.float64)
        ok = 0 < y.sum() < y.size
        by_site[site.name] = float(roc_auc_score(y, scores[site.name])) if ok else None
    predicted = p_all >= inputs.threshold
    min_cohort = study.disclosure.min_cohort_size
    sensitivity: dict[str, float | None] = {}
    for name, lv in inputs.levels.items():
        for level in sorted(set(lv.tolist())):
            mask = lv == level
            sensitivity[f"{name}={level}"] = _sensitivity(y_all[mask], predicted[mask], min_cohort)
    return CellScores(float(roc_auc_score(y_all, p_all)), by_site, sensitivity)


def calibrate(
    study: Study,
    sites: Sequence[SiteDataset],
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    delta: float = 1e-5,
    n_seeds: int = 3,
    threshold: float | None = None,
    max_grad_norm: float = 1.0,
    accountant: AccountantKind = AccountantKind.RDP,
    progress: Progress = _quiet,
    *,
    processes: int | None = None,
    ray_address: str | None = None,
) -> CalibrationResult:
    """Sweep ``epsilons`` (and no DP) over ``n_seeds`` seeds; see the module docstring.

    ``threshold`` defaults to the study's operating threshold when its sites
    validate releases (``validation.threshold``, the point the consortium agreed),
    otherwise to the positive rate of all sites' training labels, a fixed
    operating point that suits rare outcomes better than 0.5. The runs are independent
    cells: on ``processes`` local processes (by default one per core for a sweep long
    enough to gain from them; 1 runs them here) or
    on the Ray cluster at ``ray_address`` (:func:`fedcare.simulation.cells.run_cells`),
    with the same table either way.
    """
    if n_seeds < 1:
        raise ValueError("the sweep needs at least one seed")
    if any(not (e > 0) for e in epsilons):
        raise ValueError("every epsilon of the grid must be positive")
    if threshold is None and study.validates_releases:
        threshold = study.validation.threshold
    if threshold is None:
        threshold = float(np.concatenate([s.y_train for s in sites]).mean())
    frame = pd.concat([s.test_frame for s in sites], ignore_index=True)
    levels = {name: subgroup_levels(frame, name) for name in SUBGROUPS}
    available = {name: lv for name, lv in levels.items() if lv is not None}
    seeds = [study.seed + i for i in range(n_seeds)]
    grid: list[float | None] = [*sorted(epsilons), None]
    inputs = SweepInputs(
        study, tuple(sites), delta, max_grad_norm, accountant, threshold, available
    )
    cells = [(epsilon, seed) for epsilon in grid for seed in seeds]
    scored = run_cells(
        score_cell,
        inputs,
        cells,
        processes=processes,
        ray_address=ray_address,
        progress=lambda done, total: progress("calibrate", done, total),
    )
    points: list[GridPoint] = []
    for k, epsilon in enumerate(grid):
        runs = scored[k * n_seeds : (k + 1) * n_seeds]
        groups = list(dict.fromkeys(g for r in runs for g in r.sensitivity))
        points.append(
            GridPoint(
                epsilon=epsilon,
                label=NO_DP if epsilon is None else f"{epsilon:g}",
                auroc=_spread([r.auroc for r in runs]),
                auroc_by_site={
                    s.name: _spread([r.auroc_by_site[s.name] for r in runs]) for s in sites
                },
                sensitivity={g: _spread([r.sensitivity.get(g) for r in runs]) for g in groups},
            )
        )
    return CalibrationResult(
        study_name=study.name,
        delta=delta,
        accountant=accountant.value,
        max_grad_norm=max_grad_norm,
        threshold=threshold,
        min_cohort=study.disclosure.min_cohort_size,
        seeds=seeds,
        subgroups=list(available),
        unavailable_subgroups=[n for n in SUBGROUPS if n not in available],
        points=points,
    )
