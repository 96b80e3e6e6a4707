"""Unit conversion for clinical measurements.

Mass-per-volume to molar conversions depend on the substance's molar mass, so
they are keyed by analyte; temperature is affine and analyte-free.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

# Spellings seen in hospital extracts, mapped to one canonical token each.
_ALIASES: dict[str, str] = {
    "\u00b0c": "degC",
    "degc": "degC",
    "c": "degC",
    "celsius": "degC",
    "\u00b0f": "degF",
    "degf": "degF",
    "f": "degF",
    "fahrenheit": "degF",
    "mg/dl": "mg/dL",
    "\u00b5mol/l": "umol/L",  # micro sign
    "\u03bcmol/l": "umol/L",  # Greek small mu, as some lab systems export it
    "umol/l": "umol/L",
    "mmol/l": "mmol/L",
}

# Molar masses in g/mol; 1 mg/dL = 10 / M mmol/L.
_MOLAR_MASS: dict[str, float] = {
    "creatinine": 113.12,
    "lactate": 90.08,
    "glucose": 180.16,
    "urea": 60.06,
}


class UnitError(ValueError):
    """A unit that fedcare does not know, or two units it cannot convert between."""


def canonical_unit(unit: str) -> str:
    """The canonical spelling of ``unit``; unknown units pass through unchanged."""
    return _ALIASES.get(unit.strip().lower(), unit.strip())


def _scale(factor: float) -> Callable[[FloatArray], FloatArray]:
    return lambda x: x * factor


def _converter(source: str, target: str, analyte: str | None) -> Callable[[FloatArray], FloatArray]:
    if source == target:
        return lambda x: x
    if (source, target) == ("degF", "degC"):
        return lambda x: (x - 32.0) * 5.0 / 9.0
    if (source, target) == ("degC", "degF"):
        return lambda x: x * 9.0 / 5.0 + 32.0
    molar = {"mmol/L": 1.0, "umol/L": 1000.0}
    if source in molar and target in molar:
        # Molar to molar is a power of ten whatever the substance.
        return _scale(molar[target] / molar[source])
    if analyte is not None and analyte in _MOLAR_MASS:
        mmol_per_mgdl = 10.0 / _MOLAR_MASS[analyte]
        if source == "mg/dL" and target in molar:
            return _scale(mmol_per_mgdl * molar[target])
        if target == "mg/dL" and source in molar:
            return _scale(1.0 / (mmol_per_mgdl * molar[source]))
    what = f" for {analyte}" if analyte else ""
    raise UnitError(f"cannot convert {source} to {target}{what}")


def check_convertible(source: str, target: str, analyte: str | None = None) -> None:
    """Raise :class:`UnitError` unless ``source`` converts to ``target``."""
    _converter(canonical_unit(source), canonical_unit(target), analyte)


def convert(values: FloatArray, source: str, target: str, analyte: str | None = None) -> FloatArray:
    """Convert ``values`` from ``source`` to ``target`` units. NaN stays NaN."""
    fn = _converter(canonical_unit(source), canonical_unit(target), analyte)
    return fn(np.asarray(values, dtype=np.float64))
