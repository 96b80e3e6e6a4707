"""Label-free estimates on new data from the model's scores (pure).

* **Prevalence** by black-box shift estimation (BBSE, Lipton et al. 2018): under label
  shift the share of patients flagged at the threshold is
  ``TPR * prevalence + FPR * (1 - prevalence)``, with TPR and FPR measured on the
  reference, so the new prevalence is ``(flagged - FPR) / (TPR - FPR)``.
* **AUROC** by confidence-based performance estimation (CBPE): the reference's
  isotonic calibration turns each new score into a probability of the event, adjusted
  to the BBSE prevalence; the expected AUROC is the share of (event, non-event) pairs
  the scores order correctly, each pair weighted by how likely it is to be one.

Both assume what each method assumes: BBSE that only the prevalence moved (the
patients with and without the event look as before), CBPE that the calibration still
holds. The monitor reports them beside what the labels measure whenever labels exist.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

_EPS = 1e-6


def bbse_prevalence(
    ref_labels: NDArray[np.int64], ref_scores: FloatArray, new_scores: FloatArray, threshold: float
) -> float | None:
    """The new prevalence by BBSE, clipped to [0, 1]; None when the reference cannot
    identify it (TPR equal to FPR, or one class only)."""
    positives = ref_labels == 1
    if not 0 < int(positives.sum()) < ref_labels.size or new_scores.size == 0:
        return None
    flagged = ref_scores >= threshold
    tpr = float(flagged[positives].mean())
    fpr = float(flagged[~positives].mean())
    if abs(tpr - fpr) < _EPS:
        return None
    rate = float((new_scores >= threshold).mean())
    return float(np.clip((rate - fpr) / (tpr - fpr), 0.0, 1.0))


def fit_calibration(scores: FloatArray, labels: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """The knots (score, probability) of the isotonic calibration of ``labels`` on
    ``scores``; :func:`calibrated` interpolates between them."""
    # scikit-learn is imported when used: most commands never need it, and it costs
    # 0.8 s and 75 MB to load.
    from sklearn.isotonic import IsotonicRegression

    fit = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    return np.asarray(fit.X_thresholds_, dtype=np.float64), np.asarray(
        fit.y_thresholds_, dtype=np.float64
    )


def calibrated(knots_x: FloatArray, knots_y: FloatArray, scores: FloatArray) -> FloatArray:
    """Each score's calibrated probability (linear between knots, flat beyond them)."""
    values: FloatArray = np.interp(scores, knots_x, knots_y)
    return values


def adjust_prior(probabilities: FloatArray, reference: float, new: float) -> FloatArray:
    """Probabilities calibrated at prevalence ``reference``, moved to prevalence ``new``
    (Bayes' rule with the ratio of the priors' odds)."""
    if not (0 < reference < 1) or not (0 < new < 1):
        return probabilities
    ratio = (new / (1 - new)) / (reference / (1 - reference))
    odds = probabilities * ratio
    adjusted: FloatArray = odds / (odds + 1 - probabilities)
    return np.where(probabilities >= 1, 1.0, np.where(probabilities <= 0, 0.0, adjusted))


def expected_auroc(scores: FloatArray, probabilities: FloatArray) -> float | None:
    """The AUROC expected when patient i has the event with probability p_i:
    sum over pairs i != j of p_i (1 - p_j) [s_i > s_j] (ties count a half), over
    the expected number of (event, non-event) pairs. None without expected pairs."""
    if scores.size < 2:
        return None
    p = np.clip(probabilities, 0.0, 1.0)
    q = 1.0 - p
    unique, inverse = np.unique(scores, return_inverse=True)
    p_at = np.bincount(inverse, weights=p, minlength=unique.size)
    q_at = np.bincount(inverse, weights=q, minlength=unique.size)
    q_below = np.cumsum(q_at) - q_at
    # Pairs within one tied score: i != j, counted a half each way.
    pq_same = np.bincount(inverse, weights=p * q, minlength=unique.size)
    concordant = float(np.sum(p_at * q_below) + 0.5 * np.sum(p_at * q_at - pq_same))
    pairs = float(p.sum() * q.sum() - np.sum(p * q))
    if pairs <= _EPS:
        return None
    return concordant / pairs
