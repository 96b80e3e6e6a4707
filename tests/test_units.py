"""Unit conversion: temperatures, mass/molar concentrations, spellings and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.schema.units import UnitError, canonical_unit, check_convertible, convert

MICRO_SIGN = "\u00b5"  # µ, as typed on most keyboards
GREEK_MU = "\u03bc"  # μ, as some lab systems export it


# --- temperature -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fahrenheit", "celsius"),
    [(98.6, 37.0), (212.0, 100.0), (32.0, 0.0), (-40.0, -40.0), (104.0, 40.0)],
)
def test_fahrenheit_to_celsius(fahrenheit: float, celsius: float) -> None:
    out = convert(np.array([fahrenheit]), "degF", "degC")
    assert out[0] == pytest.approx(celsius, abs=1e-9)


@pytest.mark.parametrize(
    ("celsius", "fahrenheit"),
    [(37.0, 98.6), (100.0, 212.0), (0.0, 32.0), (-40.0, -40.0), (-10.0, 14.0)],
)
def test_celsius_to_fahrenheit(celsius: float, fahrenheit: float) -> None:
    out = convert(np.array([celsius]), "degC", "degF")
    assert out[0] == pytest.approx(fahrenheit, abs=1e-9)


def test_conversion_is_elementwise_and_returns_float64() -> None:
    out = convert(np.array([98.6, 212.0, -40.0]), "degF", "degC")
    assert out.dtype == np.float64
    assert out.shape == (3,)
    np.testing.assert_allclose(out, [37.0, 100.0, -40.0], atol=1e-9)


def test_integer_and_list_input_is_accepted() -> None:
    out = convert([212, 32], "degF", "degC")  # type: ignore[arg-type]
    np.testing.assert_allclose(out, [100.0, 0.0], atol=1e-9)
    assert out.dtype == np.float64


# --- mass <-> molar ----------------------------------------------------------------------


def test_creatinine_mg_dl_to_umol_l() -> None:
    # 1 mg/dL = 10 mg/L; / 113.12 g/mol = 0.08840 mmol/L = 88.40 umol/L
    out = convert(np.array([1.0, 2.0]), "mg/dL", "umol/L", "creatinine")
    np.testing.assert_allclose(out, [10 / 113.12 * 1000, 20 / 113.12 * 1000], rtol=1e-12)
    assert out[0] == pytest.approx(88.40, abs=0.005)


def test_creatinine_umol_l_to_mg_dl() -> None:
    out = convert(np.array([88.40169731258840, 176.8]), "umol/L", "mg/dL", "creatinine")
    assert out[0] == pytest.approx(1.0, rel=1e-12)
    assert out[1] == pytest.approx(176.8 * 113.12 / 10_000, rel=1e-12)  # = 2.0000...


def test_creatinine_mg_dl_to_mmol_l() -> None:
    out = convert(np.array([1.0]), "mg/dL", "mmol/L", "creatinine")
    assert out[0] == pytest.approx(10 / 113.12, rel=1e-12)  # 0.08840


def test_lactate_mg_dl_to_mmol_l() -> None:
    # lactate M = 90.08 g/mol, so 9.008 mg/dL = 90.08 mg/L = 1 mmol/L
    out = convert(np.array([9.008, 18.016, 0.0]), "mg/dL", "mmol/L", "lactate")
    np.testing.assert_allclose(out, [1.0, 2.0, 0.0], rtol=1e-12, atol=0)


def test_glucose_mg_dl_to_mmol_l_and_back() -> None:
    # glucose M = 180.16 g/mol, so 180.16 mg/dL = 1801.6 mg/L = 10 mmol/L
    assert convert(np.array([180.16]), "mg/dL", "mmol/L", "glucose")[0] == pytest.approx(10.0)
    assert convert(np.array([10.0]), "mmol/L", "mg/dL", "glucose")[0] == pytest.approx(180.16)


def test_urea_mg_dl_to_mmol_l() -> None:
    # urea M = 60.06 g/mol: 6.006 mg/dL = 1 mmol/L
    assert convert(np.array([6.006]), "mg/dL", "mmol/L", "urea")[0] == pytest.approx(1.0)


def test_umol_l_to_mmol_l_with_analyte() -> None:
    out = convert(np.array([1500.0, 88.4]), "umol/L", "mmol/L", "creatinine")
    np.testing.assert_allclose(out, [1.5, 0.0884], rtol=1e-12)


def test_mmol_l_to_umol_l_with_analyte() -> None:
    out = convert(np.array([1.5, 0.0884]), "mmol/L", "umol/L", "creatinine")
    np.testing.assert_allclose(out, [1500.0, 88.4], rtol=1e-12)


def test_umol_l_to_mmol_l_needs_no_molar_mass() -> None:
    """umol/L -> mmol/L is a pure prefix change (x 1/1000), true for every substance.

    BUG (units.py, _converter): the molar<->molar branch sits inside
    ``if analyte is not None and analyte in _MOLAR_MASS``, so without an analyte, or
    for an analyte whose molar mass is not listed (potassium, sodium, ...), the
    conversion is refused although it needs no molar mass.
    """
    np.testing.assert_allclose(convert(np.array([1500.0]), "umol/L", "mmol/L"), [1.5])
    np.testing.assert_allclose(
        convert(np.array([4.2]), "mmol/L", "umol/L", analyte="potassium"), [4200.0]
    )


def test_same_unit_is_identity_even_without_analyte() -> None:
    values = np.array([1.25, -3.0, 1e6])
    for unit in ("mg/dL", "umol/L", "mmol/L", "degC", "bpm"):
        np.testing.assert_array_equal(convert(values, unit, unit), values)


# --- spellings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("\u00b0C", "degC"),
        ("\u00b0c", "degC"),
        ("degC", "degC"),
        ("DEGC", "degC"),
        ("celsius", "degC"),
        ("C", "degC"),
        ("\u00b0F", "degF"),
        ("degF", "degF"),
        ("Fahrenheit", "degF"),
        ("mg/dl", "mg/dL"),
        ("MG/DL", "mg/dL"),
        (f"{MICRO_SIGN}mol/L", "umol/L"),
        (f"{GREEK_MU}mol/L", "umol/L"),
        (f"{GREEK_MU}mol/l", "umol/L"),
        ("umol/l", "umol/L"),
        ("mmol/l", "mmol/L"),
        ("  mmol/L  ", "mmol/L"),
    ],
)
def test_canonical_unit_aliases(spelling: str, canonical: str) -> None:
    assert canonical_unit(spelling) == canonical


def test_unknown_unit_passes_through_stripped_with_case_kept() -> None:
    assert canonical_unit("  10^9/L ") == "10^9/L"
    assert canonical_unit("mmHg") == "mmHg"


def test_conversion_accepts_every_alias() -> None:
    for source in ("\u00b0F", "degf", "F", "fahrenheit"):
        for target in ("\u00b0C", "degC", "c", "Celsius"):
            assert convert(np.array([212.0]), source, target)[0] == pytest.approx(100.0)


@pytest.mark.parametrize("micro", [MICRO_SIGN, GREEK_MU])
def test_creatinine_with_both_micro_characters(micro: str) -> None:
    out = convert(np.array([1.0]), "mg/dl", f"{micro}mol/L", "creatinine")
    assert out[0] == pytest.approx(10 / 113.12 * 1000, rel=1e-12)
    back = convert(np.array([88.4]), f"{micro}mol/l", "MG/DL", "creatinine")
    assert back[0] == pytest.approx(88.4 * 113.12 / 10_000, rel=1e-12)


# --- missing values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target", "analyte"),
    [
        ("degF", "degC", None),
        ("degC", "degF", None),
        ("mg/dL", "umol/L", "creatinine"),
        ("umol/L", "mg/dL", "creatinine"),
        ("mg/dL", "mmol/L", "lactate"),
        ("mmol/L", "umol/L", "glucose"),
        ("degC", "degC", None),
    ],
)
def test_nan_stays_nan(source: str, target: str, analyte: str | None) -> None:
    out = convert(np.array([np.nan, 1.0, np.nan]), source, target, analyte)
    assert np.isnan(out[0])
    assert np.isnan(out[2])
    assert np.isfinite(out[1])


# --- refusals ----------------------------------------------------------------------------


def test_mass_to_molar_without_analyte_names_both_units() -> None:
    with pytest.raises(UnitError, match=r"^cannot convert mg/dL to mmol/L: mass to molar needs"):
        convert(np.array([1.0]), "mg/dL", "mmol/L")


def test_mass_to_molar_with_unknown_analyte_names_units_and_analyte() -> None:
    with pytest.raises(UnitError, match=r"cannot convert mg/dL to mmol/L for sodium"):
        convert(np.array([1.0]), "mg/dL", "mmol/L", "sodium")


def test_temperature_to_concentration_is_refused() -> None:
    with pytest.raises(UnitError, match=r"cannot convert degC to mmol/L"):
        convert(np.array([37.0]), "degC", "mmol/L")
    # an analyte does not make a temperature convertible
    with pytest.raises(UnitError, match=r"cannot convert degC to mmol/L for lactate"):
        convert(np.array([37.0]), "\u00b0C", "mmol/l", "lactate")


def test_unknown_units_are_refused_by_name() -> None:
    with pytest.raises(UnitError, match=r"cannot convert bpm to /min"):
        convert(np.array([60.0]), "bpm", "/min")


def test_mass_to_mass_is_dimensional_and_needs_no_analyte() -> None:
    np.testing.assert_allclose(convert(np.array([150.0]), "mg/dL", "g/L"), [1.5], rtol=1e-12)


def test_unit_error_is_a_value_error() -> None:
    assert issubclass(UnitError, ValueError)


def test_check_convertible() -> None:
    check_convertible("\u00b0F", "degC")
    check_convertible("mg/dl", f"{GREEK_MU}mol/L", "creatinine")
    with pytest.raises(UnitError, match=r"cannot convert mg/dL to umol/L"):
        check_convertible("mg/dl", f"{MICRO_SIGN}mol/L")


# --- properties --------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=20))
def test_temperature_round_trip(values: list[float]) -> None:
    x = np.array(values)
    back = convert(convert(x, "degC", "degF"), "degF", "degC")
    np.testing.assert_allclose(back, x, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(positive, min_size=1, max_size=20),
    st.sampled_from(["creatinine", "lactate", "glucose", "urea"]),
    st.sampled_from(["mmol/L", "umol/L"]),
)
def test_mass_molar_round_trip(values: list[float], analyte: str, molar: str) -> None:
    x = np.array(values)
    there = convert(x, "mg/dL", molar, analyte)
    back = convert(there, molar, "mg/dL", analyte)
    np.testing.assert_allclose(back, x, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(positive, min_size=2, max_size=20), st.sampled_from(["creatinine", "glucose"]))
def test_molar_conversion_is_linear_and_monotone(values: list[float], analyte: str) -> None:
    x = np.array(sorted(values))
    out = convert(x, "mg/dL", "umol/L", analyte)
    factor = 10_000 / {"creatinine": 113.12, "glucose": 180.16}[analyte]
    np.testing.assert_allclose(out, x * factor, rtol=1e-12)
    assert np.all(np.diff(out) >= 0)


@settings(max_examples=60, deadline=None)
@given(finite)
def test_fahrenheit_celsius_formula(celsius: float) -> None:
    fahrenheit = convert(np.array([celsius]), "degC", "degF")[0]
    assert math.isclose(fahrenheit, celsius * 1.8 + 32, rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("source", "target", "analyte", "source_analyte", "expected"),
    [
        ("g/dL", "mmol/L", "haemoglobin", None, 0.6206),  # per haem, the clinical convention
        ("ug/dL", "nmol/L", "t4", None, 12.87),
        ("ng/dL", "nmol/L", "t3", None, 0.01536),
        ("mg/dL", "umol/L", "bilirubin", None, 17.10),
        ("mg/dL", "mmol/L", "urea", "urea_nitrogen", 0.3570),  # BUN to urea
        ("lb", "kg", None, None, 0.45359),
        ("inch", "cm", None, None, 2.54),
    ],
)
def test_published_conversion_factors(
    source: str, target: str, analyte: str | None, source_analyte: str | None, expected: float
) -> None:
    from fedcare.schema.units import conversion

    factor, offset = conversion(source, target, analyte, source_analyte)
    assert factor == pytest.approx(expected, rel=1e-3)
    assert offset == 0.0
