"""Validation report (metrics, intervals, suppression) and release gates."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
)

from fedcare.validation.cells import CellReport, Estimate, SuppressedCell, ValidationReport
from fedcare.validation.gates import GateKind, GateSpec, evaluate_gates
from fedcare.validation.report import (
    Metric,
    age_band,
    batch_metrics,
    calibration_fit,
    expected_calibration_error,
    validate,
)

Data = tuple[NDArray[np.int64], NDArray[np.float64], pd.DataFrame]


def _cohort(n: int, seed: int = 0) -> Data:
    """Calibrated scores (labels drawn from them) with sex, age and ethnicity."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(2.0, 4.0, n)
    labels = (rng.random(n) < scores).astype(np.int64)
    attributes = pd.DataFrame(
        {
            "sex": rng.choice(["female", "male"], n),
            "age": rng.integers(18, 95, n).astype(float),
            "ethnicity": rng.choice(
                ["asian", "black", "white", "other"], n, p=[0.3, 0.3, 0.39, 0.01]
            ),
        }
    )
    return labels, scores, attributes


def _sklearn_reference(
    y: NDArray[np.int64], p: NDArray[np.float64], threshold: float
) -> dict[str, float]:
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    # Bin sizes with calibration_curve's own (right-closed) bins, to weight its rates.
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    return {
        "auroc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "ppv": tp / (tp + fp),
        "brier": brier_score_loss(y, p),
        "ece": float(np.sum(counts[counts > 0] / y.size * np.abs(prob_true - prob_pred))),
    }


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def test_metrics_agree_with_scikit_learn_overall_and_in_a_subgroup() -> None:
    y, p, attributes = _cohort(2000)
    report = validate(y, p, attributes, threshold=0.4, min_cohort=10, n_bootstrap=20)
    female = (attributes["sex"] == "female").to_numpy()
    cells = {
        "all": (report.overall, y, p),
        "sex=female": (report.subgroups["sex"][0], y[female], p[female]),
    }
    for group, (cell, ys, ps) in cells.items():
        assert isinstance(cell, CellReport)
        assert cell.group == group
        assert (cell.n, cell.positives) == (ys.size, int(ys.sum()))
        for name, expected in _sklearn_reference(ys, ps, 0.4).items():
            assert cell.estimate(Metric(name)).value == pytest.approx(expected, abs=1e-12), name


def test_bootstrap_metrics_agree_with_scikit_learn_on_resamples_with_ties() -> None:
    # The bootstrap re-implements the metrics in numpy; ties in the scores are
    # where a hand-written AUROC or average precision usually goes wrong.
    y, p, _ = _cohort(300, seed=3)
    p = np.round(p, 1)
    index = np.random.default_rng(0).integers(0, y.size, size=(5, y.size))
    batch = batch_metrics(y, p, index, 0.3)
    for row in range(index.shape[0]):
        ys, ps = y[index[row]], p[index[row]]
        for name, expected in _sklearn_reference(ys, ps, 0.3).items():
            assert batch[Metric(name)][row] == pytest.approx(expected, abs=1e-12), name
        intercept, slope = calibration_fit(ys, ps) or (np.nan, np.nan)
        assert batch[Metric.CALIBRATION_SLOPE][row] == pytest.approx(slope, abs=1e-5)
        assert batch[Metric.CALIBRATION_INTERCEPT][row] == pytest.approx(intercept, abs=1e-5)


def test_each_resample_gets_its_own_calibration_fit_whichever_rows_finish_first() -> None:
    # Rows leave the Newton iteration as they converge or fail; the fits of the rows
    # that stay must not be mixed up with theirs. Row 0 has one class (undefined); the
    # others are resamples whose fits need few steps from the full sample's fit, or
    # many from the default start for an over-confident model's scores.
    y, p, _ = _cohort(400, seed=5)
    rng = np.random.default_rng(1)
    index = rng.integers(0, y.size, size=(8, y.size))
    index[0] = np.flatnonzero(y == 0)[rng.integers(0, int((y == 0).sum()), size=y.size)]
    over_confident = expit(6.0 * logit(p))
    for scores, start in ((p, calibration_fit(y, p)), (over_confident, None)):
        batch = batch_metrics(y, scores, index, 0.5, start)
        assert np.isnan(batch[Metric.CALIBRATION_SLOPE][0])
        for row in range(1, index.shape[0]):
            fit = calibration_fit(y[index[row]], scores[index[row]])
            assert fit is not None
            got = (batch[Metric.CALIBRATION_INTERCEPT][row], batch[Metric.CALIBRATION_SLOPE][row])
            assert got == pytest.approx(fit, abs=1e-5), row


def test_intervals_contain_the_estimate_and_narrow_with_more_data() -> None:
    def widths(n: int) -> dict[Metric, float]:
        y, p, attributes = _cohort(n, seed=1)
        cell = validate(y, p, attributes, 0.4, min_cohort=10, subgroups=(), n_bootstrap=200).overall
        assert isinstance(cell, CellReport)
        out = {}
        for metric in Metric:
            estimate = cell.estimate(metric)
            assert estimate.value is not None
            assert estimate.ci_low is not None
            assert estimate.ci_high is not None
            assert estimate.ci_low <= estimate.value <= estimate.ci_high, metric
            out[metric] = estimate.ci_high - estimate.ci_low
        return out

    small, large = widths(400), widths(6400)
    for metric in Metric:
        # 16x the data should roughly quarter the width; half is a safe margin.
        assert large[metric] < 0.5 * small[metric], metric


def test_same_seed_gives_the_same_report() -> None:
    y, p, attributes = _cohort(500)
    first = validate(y, p, attributes, 0.5, min_cohort=20, n_bootstrap=50, seed=7)
    assert validate(y, p, attributes, 0.5, min_cohort=20, n_bootstrap=50, seed=7) == first
    assert validate(y, p, attributes, 0.5, min_cohort=20, n_bootstrap=50, seed=8) != first


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_a_small_cell_is_suppressed_without_any_number() -> None:
    y, p, attributes = _cohort(1000)
    other = int((attributes["ethnicity"] == "other").sum())
    assert 0 < other < 30
    report = validate(y, p, attributes, 0.5, min_cohort=30, n_bootstrap=10)
    serialised = json.loads(report.model_dump_json())
    cell = next(c for c in serialised["subgroups"]["ethnicity"] if c["group"] == "ethnicity=other")
    assert cell == {"group": "ethnicity=other", "suppressed": True}
    assert _numbers(cell) == []
    assert str(other) not in json.dumps(cell)
    # The report still round-trips, suppressed cells included.
    assert ValidationReport.model_validate_json(report.model_dump_json()) == report


def test_suppression_is_on_patients_and_includes_the_overall_cell() -> None:
    y, p, attributes = _cohort(40)
    exact = validate(y, p, attributes, 0.5, min_cohort=40, subgroups=(), n_bootstrap=10)
    assert isinstance(exact.overall, CellReport)  # n == min_cohort is released
    below = validate(y, p, attributes, 0.5, min_cohort=41, subgroups=(), n_bootstrap=10)
    assert below.overall == SuppressedCell(group="all")


def test_undefined_metrics_are_none_never_nan() -> None:
    y, p, attributes = _cohort(300)
    y = np.zeros_like(y)  # one class: AUROC, AUPRC, sensitivity, slope undefined
    cell = validate(
        y, p, attributes, 2.0 / 3.0, min_cohort=10, subgroups=(), n_bootstrap=20
    ).overall
    assert isinstance(cell, CellReport)
    for metric in (Metric.AUROC, Metric.AUPRC, Metric.SENSITIVITY, Metric.CALIBRATION_SLOPE):
        assert cell.estimate(metric) == Estimate(value=None, ci_low=None, ci_high=None)
    assert cell.estimate(Metric.BRIER).value == pytest.approx(float(np.mean(p**2)))
    assert "NaN" not in cell.model_dump_json()


def test_ece_is_near_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(np.int64)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.15


def test_calibration_slope_is_one_when_calibrated_and_below_one_when_over_confident() -> None:
    rng = np.random.default_rng(6)
    p = expit(rng.normal(-0.5, 1.2, 20_000))
    y = (rng.random(p.size) < p).astype(np.int64)
    fitted = calibration_fit(y, p)
    assert fitted is not None
    assert fitted[1] == pytest.approx(1.0, abs=0.07)
    assert fitted[0] == pytest.approx(0.0, abs=0.07)
    over_confident = expit(2.0 * logit(p))  # pushed towards 0 and 1
    steep = calibration_fit(y, over_confident)
    assert steep is not None
    assert steep[1] == pytest.approx(0.5, abs=0.05)


def test_age_band_is_derived_from_age_and_unknown_attributes_are_refused() -> None:
    ages = pd.Series([18, 39.9, 40, 64, 65, 79, 80, 101, np.nan])
    assert age_band(ages).tolist() == [
        "<40",
        "<40",
        "40-64",
        "40-64",
        "65-79",
        "65-79",
        "80+",
        "80+",
        "missing",
    ]
    y, p, attributes = _cohort(200)
    with pytest.raises(ValueError, match="'religion' is not a column"):
        validate(y, p, attributes, 0.5, min_cohort=10, subgroups=("religion",), n_bootstrap=0)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        validate(y * 2, p, attributes, 0.5, min_cohort=10, n_bootstrap=0)


# --------------------------------------------------------------------------- #
# Gates on hand-made reports
# --------------------------------------------------------------------------- #

SITE = "kestrel-renal"


def _made(group: str, n: int = 200, positives: int = 50, **values: float | None) -> CellReport:
    """A cell with every metric at a harmless default unless given."""
    defaults: dict[str, float | None] = {
        "auroc": 0.85, "auprc": 0.6, "sensitivity": 0.9, "specificity": 0.8, "ppv": 0.5,
        "ece": 0.02, "calibration_slope": 1.0, "calibration_intercept": 0.0, "brier": 0.15,
    }  # fmt: skip
    defaults.update(values)
    estimates = {k: Estimate(value=v, ci_low=v, ci_high=v) for k, v in defaults.items()}
    return CellReport(group=group, n=n, positives=positives, **estimates)


def _report(
    overall: CellReport, ethnicity: list[CellReport | SuppressedCell] | None = None
) -> ValidationReport:
    return ValidationReport(
        threshold=0.5,
        min_cohort=20,
        n_bootstrap=0,
        seed=0,
        overall=overall,
        subgroups={"ethnicity": ethnicity or []},
    )


def test_overall_threshold_gate() -> None:
    gates = [
        GateSpec(kind=GateKind.OVERALL, metric=Metric.AUROC, op=">=", threshold=0.80),
        GateSpec(kind=GateKind.OVERALL, metric=Metric.ECE, op="<=", threshold=0.05),
    ]
    assert evaluate_gates(_report(_made("all")), gates, site=SITE).passed
    verdict = evaluate_gates(_report(_made("all", auroc=0.78, ece=0.07)), gates, site=SITE)
    assert not verdict.passed
    assert verdict.reasons == [
        "site kestrel-renal: auroc 0.78 is below 0.8",
        "site kestrel-renal: ece 0.07 is above 0.05",
    ]
    undefined = evaluate_gates(_report(_made("all", auroc=None)), gates[:1], site=SITE)
    assert not undefined.passed
    assert "undefined" in undefined.reasons[0]


def test_every_subgroup_gate_names_site_subgroup_and_threshold() -> None:
    gate = GateSpec(
        kind=GateKind.EVERY_SUBGROUP, metric=Metric.SENSITIVITY, op=">=", threshold=0.85,
        attribute="ethnicity", min_positives=20,
    )  # fmt: skip
    cells: list[CellReport | SuppressedCell] = [
        _made("ethnicity=asian", sensitivity=0.9),
        _made("ethnicity=white", positives=12, sensitivity=0.5),  # too few positives to judge
        SuppressedCell(group="ethnicity=other"),
    ]
    passing = evaluate_gates(_report(_made("all"), cells), [gate], site=SITE)
    assert passing.passed
    assert any("ethnicity=other" in note and "suppressed" in note for note in passing.notes)
    assert any("ethnicity=white" in note and "fewer than 20" in note for note in passing.notes)

    failing = evaluate_gates(
        _report(_made("all"), [*cells, _made("ethnicity=black", sensitivity=0.71)]),
        [gate],
        site=SITE,
    )
    assert not failing.passed
    assert failing.reasons == [
        "site kestrel-renal: sensitivity 0.71 in ethnicity=black is below 0.85"
    ]


def test_subgroup_gap_gate() -> None:
    gate = GateSpec(
        kind=GateKind.SUBGROUP_GAP, metric=Metric.SENSITIVITY, threshold=0.10, attribute="ethnicity"
    )
    close: list[CellReport | SuppressedCell] = [
        _made("ethnicity=asian", sensitivity=0.88),
        _made("ethnicity=white", sensitivity=0.93),
    ]
    assert evaluate_gates(_report(_made("all"), list(close)), [gate], site=SITE).passed
    wide: list[CellReport | SuppressedCell] = [
        *close,
        _made("ethnicity=black", sensitivity=0.75),
        SuppressedCell(group="ethnicity=other"),
    ]
    verdict = evaluate_gates(_report(_made("all"), wide), [gate], site=SITE)
    assert not verdict.passed
    assert verdict.reasons == [
        "site kestrel-renal: sensitivity gap across ethnicity is 0.18 "
        "(0.93 in ethnicity=white vs 0.75 in ethnicity=black), above 0.1"
    ]
    assert len(verdict.notes) == 1
    assert "ethnicity=other" in verdict.notes[0]
    unknown = GateSpec(
        kind=GateKind.SUBGROUP_GAP, metric=Metric.AUROC, threshold=0.1, attribute="sex"
    )
    assert not evaluate_gates(_report(_made("all"), wide), [unknown], site=SITE).passed


def test_no_drop_gate() -> None:
    gates = [
        GateSpec(kind=GateKind.NO_DROP, metric=Metric.AUROC, tolerance=0.02),
        GateSpec(kind=GateKind.NO_DROP, metric=Metric.BRIER, tolerance=0.01),
    ]
    previous = _report(_made("all", auroc=0.86, brier=0.15))
    small_drop = _report(_made("all", auroc=0.845, brier=0.155))
    assert evaluate_gates(small_drop, gates, previous, site=SITE).passed
    big_drop = _report(_made("all", auroc=0.82, brier=0.17))
    verdict = evaluate_gates(big_drop, gates, previous, site=SITE)
    assert verdict.reasons == [
        "site kestrel-renal: auroc worsened by 0.04 (from 0.86 to 0.82), more than 0.02",
        "site kestrel-renal: brier worsened by 0.02 (from 0.15 to 0.17), more than 0.01",
    ]
    first_release = evaluate_gates(big_drop, gates, None, site=SITE)
    assert first_release.passed
    assert len(first_release.notes) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "overall", "metric": "auroc", "op": "<=", "threshold": 0.8}, "higher-is-better"),
        ({"kind": "overall", "metric": "ece", "op": ">=", "threshold": 0.05}, "lower-is-better"),
        ({"kind": "overall", "metric": "auroc", "threshold": 0.8}, "needs op"),
        (
            {"kind": "subgroup_gap", "metric": "sensitivity", "threshold": 0.1},
            "needs the attribute",
        ),
        ({"kind": "no_drop", "metric": "auroc"}, "needs a tolerance"),
        (
            {"kind": "no_drop", "metric": "auroc", "tolerance": 0.02, "threshold": 0.8},
            "not op/threshold",
        ),
    ],
)
def test_gate_specs_that_make_no_sense_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GateSpec.model_validate(fields)


@pytest.mark.parametrize("seed", range(6))
def test_intervals_contain_their_estimate_on_skewed_overconfident_scores(seed: int) -> None:
    # The reported failure: an over-confident model on a rare outcome gave a
    # calibration slope of 0.254 with an "interval" of 0.590-0.820, because the
    # bootstrap fits that diverged were dropped and the rest were not a sample
    # of the estimate's spread.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(x - 3)))).astype(np.int64)
    p = 1 / (1 + np.exp(-(4 * x - 8)))
    cell = validate(y, p, pd.DataFrame(index=range(300)), 0.5, 1, (), 200, seed).overall
    assert isinstance(cell, CellReport)
    assert cell.calibration_slope.ci_low is not None  # the fits no longer diverge
    for metric in Metric:
        estimate = cell.estimate(metric)
        if estimate.value is not None and estimate.ci_low is not None:
            assert estimate.ci_high is not None
            assert estimate.ci_low <= estimate.value <= estimate.ci_high, metric


def test_an_interval_resting_on_few_defined_resamples_is_withheld() -> None:
    # Two positives in 60: about 1 - (58/60)^60 = 87 % of resamples keep a
    # positive, below the 90 % an interval needs, so none is given.
    y = np.zeros(60, dtype=np.int64)
    y[:2] = 1
    p = np.linspace(0.9, 0.1, 60)
    cell = validate(y, p, pd.DataFrame(index=range(60)), 0.5, 1, (), 200, 0).overall
    assert isinstance(cell, CellReport)
    assert cell.auroc.value == pytest.approx(1.0)
    assert (cell.auroc.ci_low, cell.auroc.ci_high) == (None, None)


def test_cells_with_one_or_two_positives_are_suppressed_and_zero_is_released() -> None:
    y, p, _ = _cohort(200)
    attributes = pd.DataFrame({"unit": ["a"] * 100 + ["b"] * 100})
    y[:100] = 0
    y[:2] = 1  # unit a: 2 positives
    y[100:] = 0  # unit b: no positives
    report = validate(y, p, attributes, 0.5, 10, ("unit",), 20, 0, min_events=3)
    cells = {c.group: c for c in report.subgroups["unit"]}
    assert cells["unit=a"] == SuppressedCell(group="unit=a")
    assert isinstance(cells["unit=b"], CellReport)
    assert cells["unit=b"].positives == 0


def test_binary_subgroup_levels_read_as_integers_not_floats() -> None:
    y, p, _ = _cohort(100)
    attributes = pd.DataFrame({"sex_female": np.where(np.arange(100) % 2 == 0, 0.0, 1.0)})
    report = validate(y, p, attributes, 0.5, 10, ("sex_female",), 10, 0)
    assert [c.group for c in report.subgroups["sex_female"]] == ["sex_female=0", "sex_female=1"]


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_agree_with_scikit_learn(seed: int) -> None:
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        brier_score_loss,
        roc_auc_score,
    )

    from fedcare.validation.metrics import binary_metrics

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = (rng.random(n) < 0.3).astype(np.int64)
    y[:2] = [0, 1]
    # Rounded scores: many ties, where the two ways of counting could part.
    p = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), int(rng.integers(1, 4)))
    got = binary_metrics(y, p, threshold=0.4)
    assert got.auroc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got.auprc == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert got.accuracy == pytest.approx(accuracy_score(y, p >= 0.4), abs=1e-12)
    assert got.brier == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="not all finite"):
        binary_metrics(y, np.where(np.arange(n) == 3, np.nan, p))
    one_class = binary_metrics(np.zeros(5, dtype=np.int64), np.linspace(0, 1, 5))
    assert one_class.auroc is None
    assert one_class.auprc is None


@pytest.mark.parametrize("seed", range(4))
def test_metrics_by_part_equal_each_part_alone(seed: int) -> None:
    """Parts scored together give each part's own metrics: ties, one-class parts, a part
    of one row, and scores that repeat across parts (which must not mix)."""
    from fedcare.validation.metrics import binary_metrics, binary_metrics_by_part

    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 120, size=9)]
    sizes[2] = 1
    ys, ps = [], []
    for i, size in enumerate(sizes):
        y = (rng.random(size) < 0.35).astype(np.int64)
        if i == 4:
            y[:] = 0
        p = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), int(rng.integers(1, 3)))
        ys.append(y)
        ps.append(p)
    together = binary_metrics_by_part(np.concatenate(ys), np.concatenate(ps), sizes, 0.4)
    for y, p, got in zip(ys, ps, together, strict=True):
        alone = binary_metrics(y, p, threshold=0.4)
        assert (got.n, got.positives) == (alone.n, alone.positives)
        for name in ("auroc", "auprc", "accuracy", "brier"):
            want = getattr(alone, name)
            if want is None:
                assert getattr(got, name) is None, name
            else:
                assert getattr(got, name) == pytest.approx(want, abs=1e-12), name
    assert together[4].auroc is None
    assert together[2].auroc is None


def test_metrics_by_part_refuse_what_does_not_add_up() -> None:
    from fedcare.validation.metrics import binary_metrics_by_part

    y = np.array([0, 1, 0, 1], dtype=np.int64)
    p = np.array([0.1, 0.9, 0.2, 0.8])
    with pytest.raises(ValueError, match="rows the parts add up to"):
        binary_metrics_by_part(y, p, [2, 3])
    with pytest.raises(ValueError, match="at least one row"):
        binary_metrics_by_part(y, p, [4, 0])
    with pytest.raises(ValueError, match="not all finite"):
        binary_metrics_by_part(y, np.array([0.1, np.inf, 0.2, 0.8]), [2, 2])
