"""The report's ROC and calibration curves against scikit-learn's, ties and edges included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_curve

from fedcare.validation.curves import calibration_points, curves, roc_points


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = []
    for n in (2, 3, 10, 57, 400):
        y = (rng.random(n) < 0.3).astype(np.int64)
        y[0], y[-1] = 0, 1  # both classes
        smooth = rng.random(n)
        tied = np.round(rng.random(n), 1)  # many ties
        edges = rng.choice([0.0, 0.1, 0.2, 0.5, 0.9, 1.0], size=n)  # on the bin edges
        out += [(y, smooth), (y, tied), (y, edges)]
    return out


@pytest.mark.parametrize(("y", "p"), _cases())
def test_the_curves_are_scikit_learn_s(y: np.ndarray, p: np.ndarray) -> None:
    fpr, tpr = roc_points(y, p)
    want_fpr, want_tpr, _ = roc_curve(y, p)
    np.testing.assert_allclose(fpr, want_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, want_tpr, rtol=0, atol=1e-12)
    observed, predicted = calibration_points(y, p, 10)
    want_observed, want_predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(observed, want_observed, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predicted, want_predicted, rtol=0, atol=1e-12)


def test_one_class_has_no_curves() -> None:
    assert curves(np.zeros(5), np.linspace(0, 1, 5)) is None
