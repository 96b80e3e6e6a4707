"""A site's validation report: discrimination, threshold metrics and calibration,
overall and per subgroup, each with a bootstrap confidence interval.

The report is what a site may send about a model release, so it obeys the site's
minimum cohort size: a subgroup with fewer than ``min_cohort`` patients appears
only as ``{"group": ..., "suppressed": true}``, without even its size. The rule is
on the number of patients ``n`` in the cell, the same rule the policy applies to
any released number (``PolicyFile.min_cohort_size``).

Known limit of cell suppression alone: counts of a cell can sometimes be recovered
by difference (overall ``n`` minus the other levels of the same attribute). The
counts are kept because the gates need them; complementary suppression is a job
for the release step, not for this pure computation.

Point estimates come from scikit-learn. The bootstrap re-computes the same
quantities with numpy over a matrix of resamples (one row per resample), because
calling scikit-learn 200 times per cell would dominate the run time; the test
suite checks that both agree.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from fedcare.validation.cells import (
    CONFIDENCE,
    OVERALL,
    CellReport,
    Estimate,
    SuppressedCell,
    ValidationReport,
    few_events,
)
from fedcare.validation.curves import uniform_bins
from fedcare.validation_spec import AGE_BAND, Metric

ECE_BINS = 10

# The calibration model is the unpenalised logistic fit of the label on
# logit(score); C = 1e6 keeps scikit-learn's L2 term negligible while still
# giving a finite answer when a sample is perfectly separated.
CALIBRATION_C = 1e6

# A score of exactly 0 or 1 has an infinite logit; clipping to this margin keeps
# the calibration fit finite and changes no realistic score.
LOGIT_EPS = 1e-7

# Bootstrap matrices are processed in chunks of at most this many elements so
# that a large cell does not allocate gigabytes at once.
_CHUNK_ELEMENTS = 2_000_000

# Newton iterations for the bootstrap calibration fits; from the start point
# (intercept 0, slope 1) a well-posed fit converges in well under ten.
_NEWTON_MAX_ITER = 50
_NEWTON_TOL = 1e-8
_HALVINGS = 30

# An interval from fewer defined resamples than this share would describe the
# resamples the metric happened to be defined on, not the sampling spread of
# the estimate (a calibration fit that fails on near-separated resamples drops
# exactly the extreme ones); the interval is withheld instead.
MIN_DEFINED_SHARE = 0.9

AGE_BANDS: tuple[tuple[float, str], ...] = (
    (40.0, "<40"),
    (65.0, "40-64"),
    (80.0, "65-79"),
    (math.inf, "80+"),
)
"""Upper bound (exclusive) and label of each band ``age_band`` is derived with."""

MISSING_LEVEL = "missing"
"""The level given to patients whose attribute is unknown, so counts still add up."""


# --------------------------------------------------------------------------- #
# Point estimates (scikit-learn)
# --------------------------------------------------------------------------- #


def expected_calibration_error(y: NDArray[np.int64], p: NDArray[np.float64]) -> float:
    """ECE over ``ECE_BINS`` equal-width bins: sum of |observed - predicted| rate
    in each bin, weighted by the bin's share of patients.

    The bins are scikit-learn's ``calibration_curve`` bins (right-closed, the
    first one also holding 0), so this and the bootstrap use the same edges.
    """
    from sklearn.calibration import calibration_curve  # when used: see _point_estimates

    prob_true, prob_pred = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform", pos_label=1)
    counts = np.bincount(uniform_bins(p, ECE_BINS), minlength=ECE_BINS)
    weights = counts[counts > 0] / y.size
    return float(np.sum(weights * np.abs(prob_true - prob_pred)))


def calibration_fit(y: NDArray[np.int64], p: NDArray[np.float64]) -> tuple[float, float] | None:
    """(intercept, slope) of the logistic regression of the label on logit(score).

    A slope below 1 means over-confident scores (too extreme), above 1 under-
    confident; the intercept is the calibration-in-the-large offset. None with
    one class, where the fit is undefined.
    """
    if not 0 < int(y.sum()) < y.size:
        return None
    from sklearn.linear_model import LogisticRegression  # when used: see _point_estimates

    x = _logit(p).reshape(-1, 1)
    fit = LogisticRegression(C=CALIBRATION_C, tol=1e-10, max_iter=1000).fit(x, y)
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def _point_estimates(
    y: NDArray[np.int64], p: NDArray[np.float64], threshold: float
) -> dict[Metric, float | None]:
    # The point estimates are scikit-learn's, imported when a report is made: a
    # simulation without release validation never loads it (0.8 s and 75 MB).
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        confusion_matrix,
        roc_auc_score,
    )

    both = 0 < int(y.sum()) < y.size
    predicted = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    calibration = calibration_fit(y, p)
    return {
        Metric.AUROC: float(roc_auc_score(y, p)) if both else None,
        Metric.AUPRC: float(average_precision_score(y, p)) if both else None,
        Metric.SENSITIVITY: tp / (tp + fn) if tp + fn else None,
        Metric.SPECIFICITY: tn / (tn + fp) if tn + fp else None,
        Metric.PPV: tp / (tp + fp) if tp + fp else None,
        Metric.ECE: expected_calibration_error(y, p),
        Metric.CALIBRATION_SLOPE: calibration[1] if calibration else None,
        Metric.CALIBRATION_INTERCEPT: calibration[0] if calibration else None,
        Metric.BRIER: float(brier_score_loss(y, p, pos_label=1)),
    }


# --------------------------------------------------------------------------- #
# The same metrics over a batch of resamples (numpy)
# --------------------------------------------------------------------------- #


def batch_metrics(
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    index: NDArray[np.intp],
    threshold: float,
    calibration_start: tuple[float, float] | None = None,
) -> dict[Metric, NDArray[np.float64]]:
    """Every metric for each resample of ``y`` and ``p``: row r of ``index`` names the
    patients of resample r (shape: resamples x patients).

    A metric that is undefined in a row is NaN there (the caller drops it);
    this is internal to the bootstrap, the report itself never holds NaN.
    ``calibration_start`` is where the calibration fits start (the full
    sample's intercept and slope).
    """
    ys, ps = y[index], p[index]
    with np.errstate(divide="ignore", invalid="ignore"):
        yf = ys.astype(np.float64)
        positives = yf.sum(axis=1)
        negatives = ys.shape[1] - positives
        predicted = ps >= threshold
        tp = np.sum(predicted & (ys == 1), axis=1).astype(np.float64)
        fp = np.sum(predicted & (ys == 0), axis=1).astype(np.float64)
        tn = negatives - fp
        intercept, slope = _batch_calibration(ys, _logit(p)[index], calibration_start)
        pos, neg = _tied_counts(y, p, index)
        return {
            Metric.AUROC: _counted_auroc(pos, neg),
            Metric.AUPRC: _counted_average_precision(pos, neg),
            Metric.SENSITIVITY: tp / positives,
            Metric.SPECIFICITY: tn / negatives,
            Metric.PPV: tp / (tp + fp),
            Metric.ECE: _batch_ece(yf, ps),
            Metric.CALIBRATION_SLOPE: slope,
            Metric.CALIBRATION_INTERCEPT: intercept,
            Metric.BRIER: np.mean((ps - yf) ** 2, axis=1),
        }


def ranking_metrics(
    y: NDArray[np.int64], p: NDArray[np.float64]
) -> tuple[float | None, float | None]:
    """AUROC and average precision (AUPRC) of one sample, None with one class: the
    bootstrap's counting over distinct scores, equal to scikit-learn's (to rounding) and
    without its per-call input checks, which dominate on a few hundred patients."""
    pos, neg = _tied_counts(y, p, np.arange(y.size)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):  # one class: NaN, returned as None
        auroc, auprc = (
            float(_counted_auroc(pos, neg)[0]),
            float(_counted_average_precision(pos, neg)[0]),
        )
    return (None if math.isnan(auroc) else auroc), (None if math.isnan(auprc) else auprc)


def _tied_counts(
    y: NDArray[np.int64], p: NDArray[np.float64], index: NDArray[np.intp]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per resample, how many positives and negatives sit at each distinct score,
    scores ascending. A resample draws from the patients' own scores, so sorting
    them once and counting replaces a sort per resample."""
    unique, inverse = np.unique(p, return_inverse=True)
    rows, width = index.shape[0], unique.size
    keys = (np.arange(rows)[:, None] * width + inverse[index]).ravel()
    size = rows * width
    total = np.bincount(keys, minlength=size).reshape(rows, width).astype(np.float64)
    pos = np.bincount(keys, weights=y[index].ravel().astype(np.float64), minlength=size)
    positives: NDArray[np.float64] = pos.reshape(rows, width).astype(np.float64)
    negatives: NDArray[np.float64] = total - positives
    return positives, negatives


def _counted_auroc(pos: NDArray[np.float64], neg: NDArray[np.float64]) -> NDArray[np.float64]:
    # Mann-Whitney U with ties counted a half: exactly roc_auc_score.
    positives, negatives = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    u = np.sum(pos * (below + 0.5 * neg), axis=1)
    auroc: NDArray[np.float64] = u / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auroc, np.nan)


def _counted_average_precision(
    pos: NDArray[np.float64], neg: NDArray[np.float64]
) -> NDArray[np.float64]:
    # average_precision_score = sum over distinct thresholds of (recall gain) x
    # (precision at that threshold): each positive adds 1/P of recall at its own
    # score, with the precision of everyone scored at or above it.
    down_pos, down_all = pos[:, ::-1], (pos + neg)[:, ::-1]
    flagged = np.cumsum(down_all, axis=1)
    precision = np.divide(
        np.cumsum(down_pos, axis=1), flagged, out=np.zeros_like(flagged), where=flagged > 0
    )
    positives, n = pos.sum(axis=1), down_all.sum(axis=1)
    ap: NDArray[np.float64] = np.sum(down_pos * precision, axis=1) / positives
    return np.where((positives > 0) & (positives < n), ap, np.nan)


def _batch_ece(y: NDArray[np.float64], p: NDArray[np.float64]) -> NDArray[np.float64]:
    # Per bin, n_b/n * |mean(y) - mean(p)| = |sum(y - p)| / n, so one weighted
    # bincount over (row, bin) gives every row's ECE at once.
    rows, n = y.shape
    flat = (np.arange(rows)[:, None] * ECE_BINS + uniform_bins(p, ECE_BINS)).ravel()
    sums = np.bincount(flat, weights=(y - p).ravel(), minlength=rows * ECE_BINS)
    ece: NDArray[np.float64] = np.abs(sums.reshape(rows, ECE_BINS)).sum(axis=1) / n
    return ece


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    # log(q) - log(1 - q) in numpy: scipy.special would cost every simulation 26 MB.
    q = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
    clipped: NDArray[np.float64] = np.log(q) - np.log1p(-q)
    return clipped


def _likelihood_and_mean(
    y: NDArray[np.float64],
    x: NDArray[np.float64],
    intercept: NDArray[np.float64],
    slope: NDArray[np.float64],
    penalty: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each row's penalised log-likelihood at (intercept, slope), and the fitted
    probabilities there, which the next Newton step needs: both from one exponential."""
    eta = intercept[:, None] + slope[:, None] * x
    # e^-|eta| never overflows; log(1 + e^eta) = max(eta, 0) + log1p(e^-|eta|), the
    # objective scikit-learn maximises, and the logistic function from the same term.
    tail = np.exp(-np.abs(eta))
    softplus = np.maximum(eta, 0.0) + np.log1p(tail)
    mean: NDArray[np.float64] = np.where(eta >= 0.0, 1.0, tail) / (1.0 + tail)
    ll: NDArray[np.float64] = np.sum(y * eta - softplus, axis=1) - 0.5 * penalty * slope**2
    return ll, mean


def _batch_calibration(
    y: NDArray[np.int64],
    x: NDArray[np.float64],
    start: tuple[float, float] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Damped Newton-Raphson for (intercept, slope) in every row at once, of the labels
    ``y`` on the logits of the scores ``x`` (rows: resamples).

    It maximises the same objective as :func:`calibration_fit` (log-likelihood
    minus slope^2 / 2C; scikit-learn leaves the intercept unpenalised). Each row
    starts from ``start`` (the full sample's fit, which a resample is close to)
    and halves a step until the likelihood does not fall, so an over-confident
    model's extreme logits cannot make it diverge. Rows with one class, or that
    do not converge, are NaN and left out of the interval.

    A row leaves the iteration once it converges or fails: most converge in three
    or four steps, and the last steps are computed for the few still moving.
    """
    yf = y.astype(np.float64)
    rows = y.shape[0]
    a0, b0 = start if start is not None else (0.0, 1.0)
    intercept = np.full(rows, a0)
    slope = np.full(rows, b0)
    converged = np.zeros(rows, dtype=bool)
    penalty = 1.0 / CALIBRATION_C
    with np.errstate(all="ignore"):
        # The rows still iterating (as indices into the full arrays), their data,
        # parameters, likelihood and fitted probabilities.
        live = np.arange(rows)
        ya, xa, a, b = yf, x, intercept.copy(), slope.copy()
        current, mean = _likelihood_and_mean(ya, xa, a, b, penalty)
        for _ in range(_NEWTON_MAX_ITER):
            if live.size == 0:
                break
            w = mean * (1.0 - mean)
            residual = ya - mean
            wx = w * xa
            g_a = residual.sum(axis=1)
            g_b = (residual * xa).sum(axis=1) - penalty * b
            h_aa = w.sum(axis=1)
            h_ab = wx.sum(axis=1)
            h_bb = (wx * xa).sum(axis=1) + penalty
            det = h_aa * h_bb - h_ab**2
            step_a = (h_bb * g_a - h_ab * g_b) / det
            step_b = (h_aa * g_b - h_ab * g_a) / det
            # A row without a finite step cannot move, so it never converges.
            stuck = ~(np.isfinite(step_a) & np.isfinite(step_b))
            scale = np.ones(live.size)
            pending = ~stuck
            for _ in range(_HALVINGS):
                if not pending.any():
                    break
                trying = np.flatnonzero(pending)
                trial, trial_mean = _likelihood_and_mean(
                    ya[trying],
                    xa[trying],
                    a[trying] + scale[trying] * step_a[trying],
                    b[trying] + scale[trying] * step_b[trying],
                    penalty,
                )
                accepted = trial >= current[trying] - 1e-12
                taken = trying[accepted]
                current[taken] = trial[accepted]
                mean[taken] = trial_mean[accepted]
                pending[taken] = False
                scale = np.where(pending, scale / 2.0, scale)
            # A row no halving could improve has failed, however small its step.
            moved = ~stuck & ~pending
            a = np.where(moved, a + scale * step_a, a)
            b = np.where(moved, b + scale * step_b, b)
            done = moved & (
                np.maximum(np.abs(scale * step_a), np.abs(scale * step_b)) < _NEWTON_TOL
            )
            intercept[live], slope[live] = a, b
            converged[live[done]] = True
            keep = moved & ~done
            if not keep.all():
                live, ya, xa, a, b = live[keep], ya[keep], xa[keep], a[keep], b[keep]
                current, mean = current[keep], mean[keep]
    positives = yf.sum(axis=1)
    valid = converged & (positives > 0) & (positives < y.shape[1])
    valid &= np.isfinite(intercept) & np.isfinite(slope)
    return np.where(valid, intercept, np.nan), np.where(valid, slope, np.nan)


# --------------------------------------------------------------------------- #
# Cells and the report
# --------------------------------------------------------------------------- #


def _cell_rng(seed: int, group: str) -> np.random.Generator:
    # One stream per (seed, group): a cell's interval does not depend on which
    # other subgroups were requested or in what order.
    return np.random.default_rng([seed, zlib.crc32(group.encode())])


def _bootstrap(
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    threshold: float,
    n_bootstrap: int,
    rng: np.random.Generator,
    calibration_start: tuple[float, float] | None,
) -> dict[Metric, NDArray[np.float64]]:
    n = y.size
    chunk = max(1, _CHUNK_ELEMENTS // n)
    parts: dict[Metric, list[NDArray[np.float64]]] = {metric: [] for metric in Metric}
    for start in range(0, n_bootstrap, chunk):
        rows = min(chunk, n_bootstrap - start)
        index = rng.integers(0, n, size=(rows, n))
        batch = batch_metrics(y, p, index, threshold, calibration_start)
        for metric, values in batch.items():
            parts[metric].append(values)
    return {
        metric: np.concatenate(values) if values else np.empty(0)
        for metric, values in parts.items()
    }


def auroc_interval(
    y: NDArray[np.int64], p: NDArray[np.float64], n_bootstrap: int, seed: int
) -> tuple[float, float] | None:
    """The percentile bootstrap interval of AUROC, or None where it is undefined or
    too few resamples define it (:data:`MIN_DEFINED_SHARE`)."""
    if n_bootstrap < 1 or not 0 < int(y.sum()) < y.size:
        return None
    rng = np.random.default_rng([seed, y.size])
    chunk = max(1, _CHUNK_ELEMENTS // y.size)
    parts = []
    for start in range(0, n_bootstrap, chunk):
        index = rng.integers(0, y.size, size=(min(chunk, n_bootstrap - start), y.size))
        with np.errstate(divide="ignore", invalid="ignore"):  # one-class resamples: NaN, left out
            parts.append(_counted_auroc(*_tied_counts(y, p, index)))
    point, _ = ranking_metrics(y, p)
    assert point is not None  # both classes are present
    low, high = _interval(point, np.concatenate(parts))
    return None if low is None or high is None else (low, high)


def _interval(
    value: float | None, resampled: NDArray[np.float64]
) -> tuple[float | None, float | None]:
    if value is None:
        return None, None
    defined = resampled[np.isfinite(resampled)]
    if defined.size == 0 or defined.size < MIN_DEFINED_SHARE * resampled.size:
        return None, None
    alpha = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(defined, [alpha, 100.0 - alpha])
    return float(low), float(high)


def _cell(
    group: str,
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    threshold: float,
    min_cohort: int,
    min_events: int,
    n_bootstrap: int,
    seed: int,
) -> CellReport | SuppressedCell:
    if y.size < min_cohort or few_events(int(y.sum()), int(y.size), min_events):
        return SuppressedCell(group=group)
    points = _point_estimates(y, p, threshold)
    intercept, slope = points[Metric.CALIBRATION_INTERCEPT], points[Metric.CALIBRATION_SLOPE]
    start = None if intercept is None or slope is None else (intercept, slope)
    resampled = _bootstrap(y, p, threshold, n_bootstrap, _cell_rng(seed, group), start)
    estimates: dict[str, Estimate] = {}
    for metric, value in points.items():
        low, high = _interval(value, resampled[metric])
        estimates[metric.value] = Estimate(value=value, ci_low=low, ci_high=high)
    return CellReport(group=group, n=int(y.size), positives=int(y.sum()), **estimates)


def age_band(age: pd.Series) -> pd.Series:
    """Bands of ``AGE_BANDS`` (<40, 40-64, 65-79, 80+); unknown age is ``missing``."""
    values = pd.to_numeric(age, errors="coerce").to_numpy(dtype=np.float64)
    bounds = np.array([upper for upper, _ in AGE_BANDS])
    labels = np.array([label for _, label in AGE_BANDS], dtype=object)
    banded = labels[np.searchsorted(bounds, np.nan_to_num(values), side="right")]
    return pd.Series(np.where(np.isnan(values), MISSING_LEVEL, banded), index=age.index)


def subgroup_levels(attributes: pd.DataFrame, name: str) -> NDArray[np.str_]:
    """The level of attribute ``name`` for each row, as text."""
    if name in attributes.columns:
        column = attributes[name]
    elif name == AGE_BAND and "age" in attributes.columns:
        column = age_band(attributes["age"])
    else:
        derivable = " (or 'age' to derive it from)" if name == AGE_BAND else ""
        raise ValueError(f"subgroup attribute '{name}' is not a column{derivable}")
    # Compare levels as text so 1 and "1" (or a category dtype) are one level, and
    # write a 0/1 column read as floats as 0/1 rather than "sex_female=0.0".
    labelled = column.astype(object).map(level_text, na_action="ignore")
    return labelled.where(column.notna(), MISSING_LEVEL).astype(str).to_numpy(dtype=np.str_)


def level_text(value: object) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _check_inputs(
    y: NDArray[np.int64],
    p: NDArray[np.float64],
    attributes: pd.DataFrame,
    threshold: float,
    min_cohort: int,
    min_events: int,
    n_bootstrap: int,
) -> None:
    if y.ndim != 1 or y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels {y.shape} and scores {p.shape} must be equal-length vectors")
    if len(attributes) != y.size:
        raise ValueError(f"attributes have {len(attributes)} rows, labels have {y.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is not in [0, 1]")
    if min_cohort < 1 or min_events < 1:
        raise ValueError("min_cohort and min_events must be at least 1")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap cannot be negative")


def validate(
    y_true: ArrayLike,
    scores: ArrayLike,
    attributes: pd.DataFrame,
    threshold: float,
    min_cohort: int,
    subgroups: Sequence[str] = ("sex", "age_band", "ethnicity"),
    n_bootstrap: int = 200,
    seed: int = 0,
    min_events: int = 1,
) -> ValidationReport:
    """Evaluate scores against labels overall and in every level of each subgroup.

    Rows of ``attributes`` are matched to labels by position, not index. Every
    cell (overall included) with fewer than ``min_cohort`` patients is
    suppressed. ``age_band`` is read as a column when present, otherwise derived
    from ``age``; any other requested attribute must be a column (a silently
    skipped subgroup would look like a checked one). Missing attribute values
    form their own ``missing`` level.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(scores, dtype=np.float64)
    _check_inputs(y, p, attributes, threshold, min_cohort, min_events, n_bootstrap)

    def cell(group: str, mask: NDArray[np.bool_] | None = None) -> CellReport | SuppressedCell:
        ys, ps = (y, p) if mask is None else (y[mask], p[mask])
        return _cell(group, ys, ps, threshold, min_cohort, min_events, n_bootstrap, seed)

    cells: dict[str, list[CellReport | SuppressedCell]] = {}
    for name in subgroups:
        levels = subgroup_levels(attributes, name)
        cells[name] = [
            cell(f"{name}={level}", levels == level) for level in sorted(set(levels.tolist()))
        ]
    return ValidationReport(
        threshold=threshold,
        min_cohort=min_cohort,
        min_events=min_events,
        n_bootstrap=n_bootstrap,
        seed=seed,
        overall=cell(OVERALL),
        subgroups=dict(cells),
    )
