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

Each figure is the mean over seeds with its standard deviation. Sites run
without a privacy ledger here: nothing leaves a machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from pydantic import BaseModel, Field
from sklearn.metrics import roc_auc_score

from fedcare.models.size import study_parameter_count
from fedcare.simulation.runner import run_federation
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import AccountantKind, Study
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
) -> CalibrationResult:
    """Sweep ``epsilons`` (and no DP) over ``n_seeds`` seeds; see the module docstring.

    ``threshold`` defaults to the study's operating threshold when its sites
    validate releases (``validation.threshold``, the point the consortium agreed),
    otherwise to the positive rate of all sites' training labels, a fixed
    operating point that suits rare outcomes better than 0.5.
    """
    if n_seeds < 1:
        raise ValueError("the sweep needs at least one seed")
    if any(not (e > 0) for e in epsilons):
        raise ValueError("every epsilon of the grid must be positive")
    if threshold is None and study.validates_releases:
        threshold = study.validation.threshold
    if threshold is None:
        threshold = float(np.concatenate([s.y_train for s in sites]).mean())
    min_cohort = study.disclosure.min_cohort_size
    y_all = np.concatenate([s.y_test for s in sites]).astype(np.float64)
    frame = pd.concat([s.test_frame for s in sites], ignore_index=True)
    levels = {name: subgroup_levels(frame, name) for name in SUBGROUPS}
    available = {name: lv for name, lv in levels.items() if lv is not None}
    n_params = study_parameter_count(study)
    seeds = [study.seed + i for i in range(n_seeds)]
    grid: list[float | None] = [*sorted(epsilons), None]
    points: list[GridPoint] = []
    for k, epsilon in enumerate(grid):
        label = NO_DP if epsilon is None else f"{epsilon:g}"
        auroc: list[float | None] = []
        by_site: dict[str, list[float | None]] = {s.name: [] for s in sites}
        sensitivity: dict[str, list[float | None]] = {}
        for i, seed in enumerate(seeds):
            run = _private_study(study, epsilon, delta, max_grad_norm, accountant)
            run = run.replace(seed=seed)
            workers = {s.name: SiteWorker(run, s, n_params) for s in sites}
            params = run_federation(run, sites, workers=workers).params
            scores = _score(run, params, sites)
            p_all = np.concatenate([scores[s.name] for s in sites])
            auroc.append(float(roc_auc_score(y_all, p_all)))
            for site in sites:
                y = site.y_test.astype(np.float64)
                ok = 0 < y.sum() < y.size
                by_site[site.name].append(
                    float(roc_auc_score(y, scores[site.name])) if ok else None
                )
            predicted = p_all >= threshold
            for name, lv in available.items():
                for level in sorted(set(lv.tolist())):
                    mask = lv == level
                    value = _sensitivity(y_all[mask], predicted[mask], min_cohort)
                    sensitivity.setdefault(f"{name}={level}", []).append(value)
            progress("calibrate", k * n_seeds + i + 1, len(grid) * n_seeds)
        points.append(
            GridPoint(
                epsilon=epsilon,
                label=label,
                auroc=_spread(auroc),
                auroc_by_site={name: _spread(v) for name, v in by_site.items()},
                sensitivity={group: _spread(v) for group, v in sensitivity.items()},
            )
        )
    return CalibrationResult(
        study_name=study.name,
        delta=delta,
        accountant=accountant.value,
        max_grad_norm=max_grad_norm,
        threshold=threshold,
        min_cohort=min_cohort,
        seeds=seeds,
        subgroups=list(available),
        unavailable_subgroups=[n for n in SUBGROUPS if n not in available],
        points=points,
    )
