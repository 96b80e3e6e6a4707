"""Unit conversion for clinical measurements.

Dimensional conversions (kg to lb, inch to cm, g/dL to g/L, degF to degC) are
pint's. Mass concentration to molar concentration depends on the substance, so
it goes through the molar mass of a named analyte from :data:`MOLAR_MASSES`.
A unit pint does not know (``bpm``, ``10^9/L``) is an opaque label: it matches
only itself, and a conversion from or to it is refused rather than guessed.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pint
    from numpy.typing import NDArray

    FloatArray = NDArray[np.float64]

# Spellings seen in hospital extracts that pint reads differently or not at all
# ("C" would be coulomb, "F" farad), mapped to one canonical token each.
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
    "g/dl": "g/dL",
    "ug/dl": "ug/dL",
    "\u00b5g/dl": "ug/dL",
    "ng/dl": "ng/dL",
    "pg/ml": "pg/mL",
    "\u00b5mol/l": "umol/L",  # micro sign
    "\u03bcmol/l": "umol/L",  # Greek small mu, as some lab systems export it
    "umol/l": "umol/L",
    "mmol/l": "mmol/L",
    "nmol/l": "nmol/L",
    "pmol/l": "pmol/L",
    "g/l": "g/L",
}

MOLAR_MASSES: dict[str, float] = {
    "creatinine": 113.12,
    "lactate": 90.08,
    "glucose": 180.16,
    "urea": 60.06,
    # Blood urea nitrogen counts the mass of the two nitrogen atoms per urea
    # molecule, so one mole of urea is 28.014 g of BUN: declare a BUN column with
    # ``analyte: urea_nitrogen`` and it converts to urea in mmol/L.
    "urea_nitrogen": 28.014,
    "bilirubin": 584.66,
    "t3": 650.98,  # triiodothyronine
    "t4": 776.87,  # thyroxine
    # Haemoglobin in mmol/L is reported per haem (monomer) in clinical use.
    "haemoglobin": 16_114.5,
    "hemoglobin": 16_114.5,
    "cholesterol": 386.65,
    "triglycerides": 885.7,
    "calcium": 40.08,
    "magnesium": 24.305,
    "phosphate": 30.97,
    "uric_acid": 168.11,
    "cortisol": 362.46,
}
"""Molar masses in g/mol of the analytes a mass-to-molar conversion knows."""


class UnitError(ValueError):
    """A unit that fedcare does not know, or two units it cannot convert between."""


def canonical_unit(unit: str) -> str:
    """The canonical spelling of ``unit``; other spellings pass through stripped."""
    return _ALIASES.get(unit.strip().lower(), unit.strip())


@cache
def _registry() -> pint.UnitRegistry[float]:
    import pint

    return pint.UnitRegistry()


def _parse(unit: str) -> pint.Unit | None:
    import pint

    try:
        parsed = _registry().parse_units(unit)
    except (pint.errors.PintError, AttributeError, TypeError, ValueError, SyntaxError):
        return None
    return parsed


def _dimensions(unit: pint.Unit) -> str:
    return str(_registry().Quantity(1.0, unit).dimensionality)


def _molar_mass(analyte: str | None) -> float:
    known = ", ".join(sorted(MOLAR_MASSES))
    if analyte is None:
        raise UnitError(f"mass to molar needs the analyte (one of {known})")
    try:
        return MOLAR_MASSES[analyte]
    except KeyError:
        raise UnitError(
            f"no molar mass for '{analyte}' (known: {known}); declare factor/offset instead"
        ) from None


def _linear(
    source: str, target: str, analyte: str | None, source_analyte: str | None
) -> tuple[float, float]:
    """(factor, offset) with ``target = source * factor + offset``."""
    if source == target and (source_analyte is None or source_analyte == analyte):
        return 1.0, 0.0
    what = f" for {analyte}" if analyte else ""
    try:
        return _affine(source, target, analyte, source_analyte)
    except UnitError as exc:
        raise UnitError(f"cannot convert {source} to {target}{what}: {exc}") from None


def _affine(
    source: str, target: str, analyte: str | None, source_analyte: str | None
) -> tuple[float, float]:
    src, dst = _parse(source), _parse(target)
    unknown = [u for u, parsed in ((source, src), (target, dst)) if parsed is None]
    if unknown or src is None or dst is None:
        raise UnitError(f"unknown unit {', '.join(repr(u) for u in unknown)}")
    registry = _registry()

    def to_target(value: float) -> float:
        quantity = registry.Quantity(value, src)
        src_dim, dst_dim = _dimensions(src), _dimensions(dst)
        if src_dim != dst_dim:
            mass, molar = "[mass] / [length] ** 3", "[substance] / [length] ** 3"
            if (src_dim, dst_dim) == (mass, molar):
                grams = _molar_mass(source_analyte or analyte)
                quantity = quantity / registry.Quantity(grams, "g/mol")
            elif (src_dim, dst_dim) == (molar, mass):
                grams = _molar_mass(analyte)
                quantity = quantity * registry.Quantity(grams, "g/mol")
            else:
                raise UnitError(f"{src_dim} is not {dst_dim}")
        return float(quantity.to(dst).magnitude)

    # Every clinical conversion is affine, so two points define it; the check at
    # a third point refuses anything that is not (pint's log units, say).
    offset = to_target(0.0)
    factor = (to_target(100.0) - offset) / 100.0
    if not math.isclose(to_target(10.0), 10.0 * factor + offset, rel_tol=1e-9, abs_tol=1e-12):
        raise UnitError("the conversion is not linear")
    return factor, offset


def conversion(
    source: str, target: str, analyte: str | None = None, source_analyte: str | None = None
) -> tuple[float, float]:
    """``(factor, offset)`` taking values in ``source`` units to ``target`` units.

    ``analyte`` names the substance for mass/molar conversions; ``source_analyte``
    the substance whose mass the source counts when it differs (BUN for urea).
    Raises :class:`UnitError` for an unknown unit or an impossible conversion.
    """
    return _linear(canonical_unit(source), canonical_unit(target), analyte, source_analyte)


def check_convertible(
    source: str, target: str, analyte: str | None = None, source_analyte: str | None = None
) -> None:
    """Raise :class:`UnitError` unless ``source`` converts to ``target``."""
    conversion(source, target, analyte, source_analyte)


def convert(
    values: FloatArray,
    source: str,
    target: str,
    analyte: str | None = None,
    source_analyte: str | None = None,
) -> FloatArray:
    """Convert ``values`` from ``source`` to ``target`` units. NaN stays NaN."""
    import numpy as np  # here: reading a study (units checked, nothing converted) needs none

    factor, offset = conversion(source, target, analyte, source_analyte)
    converted: FloatArray = np.asarray(values, dtype=np.float64) * factor + offset
    return converted
