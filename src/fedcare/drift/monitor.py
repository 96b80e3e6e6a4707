"""The monitor's checks of new data against a release's reference profile (pure).

One family of tests, each with a p-value: per feature, KS (continuous) or chi-squared
(binary, categorical) and, where anything is missing, Fisher's test of the missingness
rate; the model's score distribution (permutation KS); and, with labels, the
prevalence. Benjamini-Hochberg at the study's ``monitoring.alpha`` flags the tests
that shifted; the overall verdict is *drift* when any is flagged. Beside them, the
label-free estimates (BBSE prevalence, CBPE AUROC, overall and per subgroup) and,
with labels, what the labels measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fedcare.drift.checks import Check, CheckKind, DriftChecks, Estimates
from fedcare.drift.estimate import adjust_prior, bbse_prevalence, calibrated, expected_auroc
from fedcare.drift.profile import LevelProfile, NumericProfile, ReferenceProfile, level_counts
from fedcare.drift.tests import (
    TestResult,
    benjamini_hochberg,
    categorical_test,
    numeric_test,
    permutation_ks,
    rate_test,
)
from fedcare.schema.features import FeatureSchema
from fedcare.validation.cells import few_events
from fedcare.validation.report import subgroup_levels


def _feature_results(
    profile: ReferenceProfile, frame: pd.DataFrame, schema: FeatureSchema
) -> list[tuple[str, CheckKind, TestResult]]:
    out: list[tuple[str, CheckKind, TestResult]] = []
    n_ref, n_new = profile.input_rows, len(frame)
    for feature in schema.features:
        reference = profile.features.get(feature.name)
        if reference is None:
            raise ValueError(f"the reference profile has no feature '{feature.name}'")
        column = frame[feature.name]
        if isinstance(reference, NumericProfile):
            values = pd.to_numeric(column, errors="coerce").dropna().to_numpy(np.float64)
            result = numeric_test(np.asarray(reference.values), values, np.asarray(reference.edges))
            out.append((feature.name, CheckKind.KS, result))
        else:
            assert isinstance(reference, LevelProfile)
            result = categorical_test(reference.counts, level_counts(column))
            out.append((feature.name, CheckKind.CHI2, result))
        new_missing = int(column.isna().sum())
        if reference.missing or new_missing:
            missing = rate_test(reference.missing, n_ref, new_missing, n_new)
            out.append((feature.name, CheckKind.MISSINGNESS, missing))
    return out


def check_drift(
    profile: ReferenceProfile,
    frame: pd.DataFrame,
    scores: NDArray[np.float64],
    labels: NDArray[np.int64] | None,
    schema: FeatureSchema,
    *,
    alpha: float,
    permutations: int,
    seed: int,
    subgroups: Sequence[str] = (),
    min_cohort: int = 1,
    min_events: int = 1,
) -> DriftChecks:
    """Test a mapped table of new patients (and the release's scores on them) against
    the reference profile; ``labels`` when the outcomes are known."""
    if len(frame) != scores.size or (labels is not None and labels.size != scores.size):
        raise ValueError("new rows, scores and labels must be equally long")
    if scores.size == 0:
        raise ValueError("there are no new rows to monitor")
    ref_scores = np.asarray(profile.scores, dtype=np.float64)
    results = _feature_results(profile, frame, schema)
    rng = np.random.default_rng([seed, scores.size])
    shift = permutation_ks(ref_scores, scores, permutations, rng)
    results.append(("scores", CheckKind.SCORES, shift))
    if labels is not None:
        prevalence = rate_test(
            profile.label_positives, profile.input_rows, int(labels.sum()), labels.size
        )
        results.append(("label", CheckKind.PREVALENCE, prevalence))
    flagged, adjusted = benjamini_hochberg([r.p_value for _, _, r in results], alpha)
    checks = [
        Check(
            name=name,
            kind=kind,
            statistic=result.statistic,
            p_value=result.p_value,
            p_adjusted=p_adj,
            effect=result.effect,
            effect_name=result.effect_name,
            flagged=flag,
        )
        for (name, kind, result), flag, p_adj in zip(results, flagged, adjusted, strict=True)
    ]
    estimates = _estimates(profile, frame, scores, labels, subgroups, min_cohort, min_events)
    return DriftChecks(
        n=int(scores.size),
        labelled=labels is not None,
        alpha=alpha,
        drift=any(flagged),
        checks=checks,
        estimates=estimates,
    )


def _auroc(labels: NDArray[np.int64], scores: NDArray[np.float64]) -> float | None:
    # scikit-learn is imported when used: most commands never need it, and it costs
    # 0.8 s and 75 MB to load.
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < labels.size else None


def _estimates(
    profile: ReferenceProfile,
    frame: pd.DataFrame,
    scores: NDArray[np.float64],
    labels: NDArray[np.int64] | None,
    subgroups: Sequence[str],
    min_cohort: int,
    min_events: int,
) -> Estimates:
    ref_scores = np.asarray(profile.scores, dtype=np.float64)
    ref_labels = np.asarray(profile.labels, dtype=np.int64)
    reference = profile.prevalence
    estimated = bbse_prevalence(ref_labels, ref_scores, scores, profile.threshold)
    probabilities = calibrated(
        np.asarray(profile.calibration_x), np.asarray(profile.calibration_y), scores
    )
    if estimated is not None:
        probabilities = adjust_prior(probabilities, reference, estimated)
    by_cell: dict[str, float | None] = {}
    for name in subgroups:
        levels = subgroup_levels(frame, name)
        for level in sorted(set(levels.tolist())):
            mask = levels == level
            expected_events = round(float(probabilities[mask].sum()))
            small = int(mask.sum()) < min_cohort or few_events(
                expected_events, int(mask.sum()), min_events
            )
            by_cell[f"{name}={level}"] = (
                None if small else expected_auroc(scores[mask], probabilities[mask])
            )
    return Estimates(
        reference_prevalence=reference,
        estimated_prevalence=estimated,
        measured_prevalence=None if labels is None else float(labels.mean()),
        reference_auroc=_auroc(ref_labels, ref_scores),
        estimated_auroc=expected_auroc(scores, probabilities),
        measured_auroc=None if labels is None else _auroc(labels, scores),
        estimated_subgroup_auroc=by_cell,
    )
