"""Site mappings, data readers and the feature schema they map onto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedcare.schema.features import (
    Attribute,
    Feature,
    FeatureSchema,
    FeatureType,
    Label,
    MissingPolicy,
    MissingRule,
    OnInvalid,
)
from fedcare.schema.mapping import (
    DEFAULT_MISSING_TOKENS,
    ColumnMapping,
    DataValidationError,
    MappingError,
    SiteMapping,
    Violation,
    _as_missing,
    _Column,
    _map_feature,
    apply_mapping,
    check_mapping,
    clean_numbers,
    load_mapping,
)
from fedcare.schema.readers import DataFileError, read_table

CREATININE_UMOL_PER_MGDL = 10_000 / 113.12  # 88.40...


def make_schema() -> FeatureSchema:
    return FeatureSchema(
        features=(
            Feature(
                name="temperature",
                unit="degC",
                range=(30, 44),
                missing=MissingPolicy(rule=MissingRule.MEDIAN, indicator=True),
            ),
            Feature(
                name="creatinine",
                unit="umol/L",
                analyte="creatinine",
                range=(10, 2500),
                missing=MissingPolicy(rule=MissingRule.MEDIAN),
            ),
            Feature(name="age", unit="years", range=(16, 110)),  # missing: refuse (default)
            Feature(
                name="sex_female",
                type=FeatureType.BINARY,
                missing=MissingPolicy(rule=MissingRule.MODE),
            ),
            Feature(
                name="ward",
                type=FeatureType.CATEGORICAL,
                categories=("icu", "med", "surg"),
                missing=MissingPolicy(rule=MissingRule.MODE),
            ),
        ),
        label=Label(name="y"),
        attributes=(Attribute(name="ethnicity", categories=("white", "black", "asian")),),
    )


def make_mapping(**changes: object) -> SiteMapping:
    data: dict[str, object] = {
        "site": "st-marys",
        "features": {
            "temperature": {"column": "Temp_F", "unit": "\u00b0F"},
            "creatinine": {"column": "Creat", "unit": "mg/dl"},
            "age": "AgeYears",
            "sex_female": {"column": "Sex", "values": {"M": 0, "F": 1}},
            "ward": "Ward",
        },
        "attributes": {"ethnicity": "Eth"},
        "label": "Outcome",
    }
    data.update(changes)
    return SiteMapping.model_validate(data)


def good_frame() -> pd.DataFrame:
    """A site extract as read from CSV: every cell is text."""
    return pd.DataFrame(
        {
            "Temp_F": ["98.6", "100.4", "96.8", ""],
            "Creat": ["1.0", "2.5", "NA", "0.5"],
            "AgeYears": ["40", "55", "71", "18"],
            "Sex": ["M", "F", "F", "M"],
            "Ward": ["icu", "med", "surg", "?"],
            "Eth": ["white", "asian", "black", "white"],
            "Outcome": ["0", "1", "0", "1"],
            "Unused": ["x", "y", "z", "w"],
        }
    )


def refused(frame: pd.DataFrame, mapping: SiteMapping, schema: FeatureSchema) -> list[Violation]:
    with pytest.raises(DataValidationError) as info:
        apply_mapping(frame, mapping, schema)
    assert info.value.site == mapping.site
    return info.value.violations


# --- converting a good extract -----------------------------------------------------------


def test_good_extract_is_renamed_converted_and_recoded() -> None:
    out = apply_mapping(good_frame(), make_mapping(), make_schema()).frame

    assert list(out.columns) == [
        "temperature",
        "creatinine",
        "age",
        "sex_female",
        "ward",
        "ethnicity",
        "y",
    ]
    # degF -> degC: (F - 32) * 5/9
    np.testing.assert_allclose(out["temperature"].iloc[:3], [37.0, 38.0, 36.0], atol=1e-12)
    assert np.isnan(out["temperature"].iloc[3])
    # mg/dL -> umol/L for creatinine: x 88.40
    np.testing.assert_allclose(
        out["creatinine"].iloc[[0, 1, 3]],
        [88.40169731, 221.00424328, 44.20084866],
        rtol=1e-9,
    )
    assert out["creatinine"].iloc[1] == pytest.approx(2.5 * CREATININE_UMOL_PER_MGDL)
    assert np.isnan(out["creatinine"].iloc[2])  # "NA" is a missing token
    assert out["age"].tolist() == [40.0, 55.0, 71.0, 18.0]
    assert out["sex_female"].tolist() == [0.0, 1.0, 1.0, 0.0]  # M -> 0, F -> 1
    assert out["ward"].iloc[:3].tolist() == ["icu", "med", "surg"]
    assert pd.isna(out["ward"].iloc[3])  # "?" is a missing token
    assert out["ethnicity"].tolist() == ["white", "asian", "black", "white"]
    assert out["y"].tolist() == [0, 1, 0, 1]
    assert out["y"].dtype == np.int64
    for name in ("temperature", "creatinine", "age", "sex_female"):
        assert out[name].dtype == np.float64


def test_index_is_reset() -> None:
    frame = good_frame()
    frame.index = [10, 20, 30, 40]
    out = apply_mapping(frame, make_mapping(), make_schema()).frame
    assert out.index.tolist() == [0, 1, 2, 3]


def test_range_is_checked_in_schema_units_after_conversion() -> None:
    # 98.6 is outside [30, 44] as a number but is 37 degC, so it is fine;
    # 40 degF is inside [30, 44] as a number but is 4.4 degC, so it is refused.
    frame = good_frame()
    frame.loc[1, "Temp_F"] = "40"
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation(
            "Temp_F",
            "outside the valid range [30, 44] after conversion to degC for 'temperature': '40'",
            1,
        )
    ]


def test_numeric_cells_from_parquet_are_mapped_too() -> None:
    frame = pd.DataFrame(
        {
            "Temp_F": [98.6, np.nan],
            "Creat": [1.0, 2.0],
            "AgeYears": [40, 50],
            "Sex": ["F", "M"],
            "Ward": ["icu", None],
            "Eth": ["white", None],
            "Outcome": [1, 0],
        }
    )
    out = apply_mapping(frame, make_mapping(), make_schema()).frame
    assert out["temperature"].iloc[0] == pytest.approx(37.0)
    assert np.isnan(out["temperature"].iloc[1])
    assert out["creatinine"].iloc[1] == pytest.approx(2 * CREATININE_UMOL_PER_MGDL)
    assert out["sex_female"].tolist() == [1.0, 0.0]
    assert pd.isna(out["ward"].iloc[1])
    assert out["y"].tolist() == [1, 0]


@pytest.mark.parametrize("token", ["", "NA", "?", " NA ", "N/A", "null", "NaN"])
def test_missing_tokens_become_missing(token: str) -> None:
    frame = good_frame()
    frame.loc[0, "Temp_F"] = token
    frame.loc[0, "Creat"] = token
    frame.loc[0, "Ward"] = token
    out = apply_mapping(frame, make_mapping(), make_schema()).frame
    assert np.isnan(out["temperature"].iloc[0])
    assert np.isnan(out["creatinine"].iloc[0])
    assert pd.isna(out["ward"].iloc[0])
    # the other rows are untouched
    assert out["temperature"].iloc[1] == pytest.approx(38.0)


def test_custom_missing_tokens_replace_the_defaults() -> None:
    frame = good_frame()
    frame.loc[0, "Creat"] = "-999"
    frame.loc[3, "Temp_F"] = "98.6"  # no default token left in the numeric columns except Creat
    mapping = make_mapping(missing_tokens=("-999", "?"))
    violations = refused(frame, mapping, make_schema())
    # "-999" is missing now, but "NA" (row 2) is just text that is not a number
    assert violations == [Violation("Creat", "not a number: 'NA'", 1)]

    frame.loc[2, "Creat"] = "1.2"
    out = apply_mapping(frame, mapping, make_schema()).frame
    assert np.isnan(out["creatinine"].iloc[0])
    assert out["creatinine"].iloc[2] == pytest.approx(1.2 * CREATININE_UMOL_PER_MGDL)


def test_set_missing_out_of_range_blanks_the_value_without_refusing() -> None:
    schema = FeatureSchema(
        features=(
            Feature(
                name="heart_rate",
                range=(20, 250),
                on_invalid=OnInvalid.MISSING,
                missing=MissingPolicy(rule=MissingRule.MEDIAN),
            ),
        ),
        label=Label(name="y"),
    )
    mapping = SiteMapping(site="s", features={"heart_rate": "HR"}, label="Y")
    frame = pd.DataFrame({"HR": ["80", "5", "300", "250", "20", ""], "Y": ["0"] * 6})
    out = apply_mapping(frame, mapping, schema).frame
    values = out["heart_rate"].tolist()
    assert values[0] == 80.0
    assert np.isnan(values[1])  # below
    assert np.isnan(values[2])  # above
    assert values[3:5] == [250.0, 20.0]  # the bounds themselves are valid
    assert np.isnan(values[5])


def test_refuse_out_of_range_keeps_inclusive_bounds() -> None:
    frame = good_frame()
    frame["AgeYears"] = ["16", "110", "15.9", "110.5"]
    violations = refused(frame, make_mapping(), make_schema())
    assert Violation(
        "AgeYears", "outside the valid range [16, 110] years for 'age': '15.9' (1), '110.5' (1)", 2
    ) in (violations)


def test_label_values_can_be_recoded() -> None:
    frame = good_frame()
    frame["Outcome"] = ["no", "yes", "yes", "no"]
    mapping = make_mapping(label={"column": "Outcome", "values": {"yes": 1, "no": 0}})
    out = apply_mapping(frame, mapping, make_schema()).frame
    assert out["y"].tolist() == [0, 1, 1, 0]


def test_attribute_not_in_mapping_is_left_out() -> None:
    out = apply_mapping(good_frame(), make_mapping(attributes={}), make_schema()).frame
    assert "ethnicity" not in out.columns
    assert list(out.columns)[-1] == "y"


# --- refusing a bad extract: every violation at once -------------------------------------


def test_every_violation_is_listed_with_column_rule_and_row_count() -> None:
    frame = pd.DataFrame(
        {
            # Creat is absent altogether
            "Temp_F": ["98.6", "abc", "40", "120", "99.5", ""],
            "AgeYears": ["40", "55", "", "70", "80", "33"],
            "Sex": ["M", "F", "F", "2", "M", "F"],
            "Ward": ["icu", "med", "zoo", "surg", "icu", ""],
            "Eth": ["white", "martian", "black", "asian", "white", "white"],
            "Outcome": ["0", "1", "0", "", "2", "1"],
        }
    )
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation("Temp_F", "not a number: 'abc'", 1),
        Violation(
            "Temp_F",
            "outside the valid range [30, 44] after conversion to degC for 'temperature': "
            "'40' (1), '120' (1)",
            2,
        ),
        Violation("Creat", "column not found in the data", 6),
        Violation("AgeYears", "missing value, and 'age' may not be missing", 1),
        Violation("Sex", "not listed in values ['F', 'M']: '2'", 1),
        Violation("Ward", "not among the categories ['icu', 'med', 'surg']: 'zoo'", 1),
        Violation("Eth", "not among the categories ['white', 'black', 'asian']: 'martian'", 1),
        Violation("Outcome", "label, not 0 or 1: '2'", 1),
        Violation("Outcome", "label is missing", 1),
    ]


def test_error_message_names_site_columns_rules_and_counts() -> None:
    frame = good_frame()
    frame["Temp_F"] = ["40", "41", "98.6", "abc"]
    frame["Outcome"] = ["0", "3", "", "1"]
    with pytest.raises(DataValidationError) as info:
        apply_mapping(frame, make_mapping(), make_schema())
    message = str(info.value)
    assert message.startswith("site 'st-marys': data refused, 4 rule(s) broken")
    assert "nothing was trained or sent" in message
    assert "  - column 'Temp_F': not a number: 'abc' (1 row)\n" in message
    assert (
        "  - column 'Temp_F': outside the valid range [30, 44] after conversion to degC for "
        "'temperature': '40' (1), '41' (1) (2 rows)" in message
    )
    assert "  - column 'Outcome': label is missing (1 row)" in message
    assert "  - column 'Outcome': label, not 0 or 1: '3' (1 row)" in message


def test_unknown_category_lists_what_was_seen() -> None:
    frame = good_frame()
    frame["Ward"] = ["zoo", "ICU", "zoo", "med"]
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation(
            "Ward", "not among the categories ['icu', 'med', 'surg']: 'zoo' (2), 'ICU' (1)", 3
        )
    ]


def test_binary_values_other_than_zero_and_one_are_refused() -> None:
    frame = good_frame()
    frame["Sex"] = ["0.5", "1", "-1", "0"]
    mapping = make_mapping()
    features = dict(mapping.features)
    features["sex_female"] = ColumnMapping(column="Sex")  # no recoding: numbers as they are
    violations = refused(frame, mapping.model_copy(update={"features": features}), make_schema())
    assert violations == [Violation("Sex", "binary, not 0 or 1: '0.5' (1), '-1' (1)", 2)]


def test_values_the_mapping_does_not_list_are_refused_even_when_they_look_valid() -> None:
    # The attack: with values {M: 0, F: 1}, a stray 1 or 0 used to pass as if coded.
    frame = good_frame()
    frame["Sex"] = ["M", "1", "0", "female"]
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation("Sex", "not listed in values ['F', 'M']: '1' (1), '0' (1), 'female' (1)", 3)
    ]


def test_missing_in_a_refuse_feature_counts_the_empty_rows() -> None:
    frame = good_frame()
    frame["AgeYears"] = ["", "NA", "?", "50"]
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [Violation("AgeYears", "missing value, and 'age' may not be missing", 3)]


def test_absent_feature_column_counts_every_row() -> None:
    frame = good_frame().drop(columns=["AgeYears"])
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [Violation("AgeYears", "column not found in the data", 4)]


def test_absent_label_column_is_reported() -> None:
    frame = good_frame().drop(columns=["Outcome"])
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [Violation("Outcome", "column not found in the data", 4)]


def test_non_numeric_label_is_refused() -> None:
    frame = good_frame()
    frame["Outcome"] = ["0", "1", "0", "0.5"]
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [Violation("Outcome", "label, not 0 or 1: '0.5'", 1)]


def test_empty_table_is_refused() -> None:
    frame = good_frame().iloc[0:0]
    with pytest.raises(DataValidationError, match=r"the table has no rows"):
        apply_mapping(frame, make_mapping(), make_schema())


def test_violation_str_uses_singular_and_plural() -> None:
    assert str(Violation("A", "bad", 1)) == "column 'A': bad (1 row)"
    assert str(Violation("A", "bad", 3)) == "column 'A': bad (3 rows)"


def test_data_validation_error_is_a_value_error() -> None:
    assert issubclass(DataValidationError, ValueError)
    assert issubclass(MappingError, ValueError)
    assert issubclass(DataFileError, ValueError)


# The two tests below expose a double count in mapping._map_feature / apply_mapping:
# the "may not be missing" rule (and "label is missing") counts ``out.isna()`` *after*
# invalid values were blanked, so a cell that held a value (out of range, not a
# number, unknown category) is reported twice, once as itself and once as "missing".


def test_invalid_values_are_not_also_counted_as_missing() -> None:
    frame = good_frame()
    frame["AgeYears"] = ["5", "forty", "", "50"]  # 1 out of range, 1 text, 1 missing
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation("AgeYears", "not a number: 'forty'", 1),
        Violation("AgeYears", "outside the valid range [16, 110] years for 'age': '5'", 1),
        Violation("AgeYears", "missing value, and 'age' may not be missing", 1),
    ]


def test_non_numeric_label_is_not_also_counted_as_missing() -> None:
    frame = good_frame()
    frame["Outcome"] = ["0", "dead", "", "1"]
    violations = refused(frame, make_mapping(), make_schema())
    assert violations == [
        Violation("Outcome", "not a number: 'dead'", 1),
        Violation("Outcome", "label is missing", 1),
    ]


# --- mapping checks ----------------------------------------------------------------------


def test_mapping_missing_a_feature_is_refused_by_name() -> None:
    mapping = make_mapping(features={"temperature": "T", "creatinine": "C", "ward": "W"})
    with pytest.raises(
        MappingError,
        match=r"mapping for site 'st-marys': no mapping for feature\(s\): age, sex_female$",
    ):
        check_mapping(mapping, make_schema())
    # apply_mapping checks the mapping before looking at data
    with pytest.raises(MappingError, match=r"no mapping for feature\(s\): age, sex_female"):
        apply_mapping(good_frame(), mapping, make_schema())


def test_mapping_naming_an_unknown_feature_is_refused() -> None:
    features = dict(make_mapping().features)
    features["pulse"] = "HR"
    with pytest.raises(MappingError, match=r"mapping names feature\(s\) not in the schema: pulse"):
        check_mapping(make_mapping(features=features), make_schema())


def test_mapping_naming_an_unknown_attribute_is_refused() -> None:
    with pytest.raises(
        MappingError, match=r"mapping names attribute\(s\) not in the schema: religion"
    ):
        check_mapping(make_mapping(attributes={"religion": "R"}), make_schema())


def test_mapping_with_unconvertible_unit_is_refused() -> None:
    features = dict(make_mapping().features)
    features["temperature"] = ColumnMapping(column="Temp", unit="mmol/L")
    with pytest.raises(MappingError, match=r"feature 'temperature': cannot convert mmol/L to degC"):
        check_mapping(make_mapping(features=features), make_schema())


def test_mass_unit_for_a_feature_without_analyte_is_refused() -> None:
    schema = FeatureSchema(
        features=(Feature(name="glucose", unit="mmol/L", missing=MissingPolicy(rule="median")),),
        label=Label(name="y"),
    )
    mapping = SiteMapping(
        site="s", features={"glucose": {"column": "GLU", "unit": "mg/dL"}}, label="Y"
    )
    with pytest.raises(MappingError, match=r"feature 'glucose': cannot convert mg/dL to mmol/L"):
        check_mapping(mapping, schema)


def test_unit_on_a_unitless_schema_feature_is_refused() -> None:
    features = dict(make_mapping().features)
    features["sex_female"] = {"column": "Sex", "unit": "degC"}
    with pytest.raises(
        MappingError, match=r"feature 'sex_female' has no unit in the schema; drop the unit"
    ):
        check_mapping(make_mapping(features=features), make_schema())


def test_mapping_problems_are_reported_together() -> None:
    features = {"temperature": {"column": "T", "unit": "bpm"}, "pulse": "P"}
    with pytest.raises(MappingError) as info:
        check_mapping(make_mapping(features=features), make_schema())
    message = str(info.value)
    assert "no mapping for feature(s): age, creatinine, sex_female, ward" in message
    assert "not in the schema: pulse" in message
    assert "feature 'temperature': cannot convert bpm to degC" in message


def test_site_mapping_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match=r"colour"):
        SiteMapping.model_validate(
            {"site": "s", "features": {"a": "A"}, "label": "Y", "colour": "blue"}
        )


def test_site_mapping_column_lookup() -> None:
    mapping = make_mapping()
    assert mapping.column("age") == ColumnMapping(column="AgeYears")
    assert mapping.column("temperature").unit == "\u00b0F"
    assert mapping.column("ethnicity").column == "Eth"
    assert mapping.label_column() == ColumnMapping(column="Outcome")
    with pytest.raises(KeyError, match="nothing"):
        mapping.column("nothing")


# --- load_mapping ------------------------------------------------------------------------


VALID_MAPPING_YAML = """\
site: st-marys
features:
  temperature: {column: Temp_F, unit: degF}
  creatinine: {column: Creat, unit: mg/dL}
  age: AgeYears
  sex_female:
    column: Sex
    values: {M: 0, F: 1}
  ward: Ward
attributes:
  ethnicity: Eth
label: Outcome
"""


def test_load_mapping_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(VALID_MAPPING_YAML, encoding="utf-8")
    mapping = load_mapping(path)
    assert mapping.site == "st-marys"
    assert mapping.column("sex_female").values == {"M": 0.0, "F": 1.0}
    assert mapping.column("creatinine") == ColumnMapping(column="Creat", unit="mg/dL")
    out = apply_mapping(good_frame(), mapping, make_schema()).frame
    expected = apply_mapping(good_frame(), make_mapping(), make_schema()).frame
    pd.testing.assert_frame_equal(out, expected)


def test_load_mapping_with_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(VALID_MAPPING_YAML + "lable: oops\n", encoding="utf-8")
    with pytest.raises(
        MappingError, match=r"mapping\.yaml: the mapping does not validate:(?s:.*)lable"
    ):
        load_mapping(path)


def test_load_mapping_without_required_key(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text("site: s\nfeatures: {a: A}\n", encoding="utf-8")
    with pytest.raises(MappingError, match=r"the mapping does not validate:(?s:.*)label"):
        load_mapping(path)


def test_load_mapping_with_broken_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text("site: s\nfeatures: {a: A\n", encoding="utf-8")
    with pytest.raises(MappingError, match=r"mapping\.yaml: not valid YAML"):
        load_mapping(path)


def test_load_mapping_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(MappingError, match=r"absent\.yaml: cannot read the mapping"):
        load_mapping(path)


# --- readers -----------------------------------------------------------------------------


def extract_frame() -> pd.DataFrame:
    """A typed extract, as a hospital system would write it."""
    return pd.DataFrame(
        {
            "Temp_F": [98.6, 100.4, np.nan, 96.8, 99.5],
            "Creat": [1.0, 2.5, 0.8, np.nan, 1.1],
            "AgeYears": [40, 55, 71, 18, 90],
            "Sex": ["M", "F", "F", "M", "F"],
            "Ward": ["icu", "med", None, "surg", "med"],
            "Eth": ["white", "asian", "black", "white", "black"],
            "Outcome": [0, 1, 0, 1, 1],
        }
    )


def test_csv_and_parquet_give_the_same_mapped_table(tmp_path: Path) -> None:
    frame = extract_frame()
    csv_path = tmp_path / "extract.csv"
    parquet_path = tmp_path / "extract.parquet"
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)

    from_csv = read_table(csv_path)
    from_parquet = read_table(parquet_path)
    assert list(from_csv.columns) == list(frame.columns)
    assert list(from_parquet.columns) == list(frame.columns)
    assert len(from_csv) == len(from_parquet) == 5

    mapped_csv = apply_mapping(from_csv, make_mapping(), make_schema()).frame
    mapped_parquet = apply_mapping(from_parquet, make_mapping(), make_schema()).frame
    pd.testing.assert_frame_equal(mapped_csv, mapped_parquet)
    np.testing.assert_allclose(
        mapped_csv["temperature"].to_numpy(), [37.0, 38.0, np.nan, 36.0, 37.5], atol=1e-12
    )
    assert mapped_csv["y"].tolist() == [0, 1, 0, 1, 1]


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "extract.csv"
    path.write_text("id,value\n007,NA\n010,\n", encoding="utf-8")
    frame = read_table(path)
    assert frame["id"].tolist() == ["007", "010"]  # no numeric parsing
    assert frame["value"].tolist() == ["NA", ""]  # the mapping decides what is missing


def test_txt_and_pq_suffixes_are_read(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    frame.to_csv(tmp_path / "x.TXT", index=False)
    frame.to_parquet(tmp_path / "x.pq", index=False)
    assert read_table(tmp_path / "x.TXT")["a"].tolist() == ["1", "2"]
    assert read_table(tmp_path / "x.pq")["a"].tolist() == [1, 2]


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "extract.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataFileError, match=r"unsupported data format '\.xlsx'"):
        read_table(path)


@pytest.mark.parametrize("name", ["absent.csv", "absent.parquet"])
def test_missing_file_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataFileError, match=rf"{name.replace('.', '[.]')}: no such data file"):
        read_table(tmp_path / name)


def test_corrupt_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataFileError, match=r"broken\.parquet: cannot read as parquet"):
        read_table(path)


# --- schema validation -------------------------------------------------------------------


def test_schema_refuses_duplicate_names() -> None:
    with pytest.raises(ValidationError, match=r"names used more than once: age, y"):
        FeatureSchema(
            features=(Feature(name="age"), Feature(name="age"), Feature(name="y")),
            label=Label(name="y"),
        )


def test_schema_refuses_attribute_named_like_a_feature() -> None:
    with pytest.raises(ValidationError, match=r"names used more than once: ward"):
        FeatureSchema(
            features=(Feature(name="ward"),),
            label=Label(name="y"),
            attributes=(Attribute(name="ward"),),
        )


def test_categorical_needs_categories() -> None:
    with pytest.raises(ValidationError, match=r"categorical feature needs at least two categories"):
        Feature(name="ward", type=FeatureType.CATEGORICAL)
    with pytest.raises(ValidationError, match=r"categorical feature needs at least two categories"):
        Feature(name="ward", type=FeatureType.CATEGORICAL, categories=("icu",))


def test_categories_must_be_distinct() -> None:
    with pytest.raises(ValidationError, match=r"categories must be distinct"):
        Feature(name="ward", type=FeatureType.CATEGORICAL, categories=("icu", "icu"))


def test_categories_only_on_categorical_features() -> None:
    with pytest.raises(ValidationError, match=r"categories are only allowed on categorical"):
        Feature(name="age", categories=("a", "b"))


@pytest.mark.parametrize("bounds", [(44.0, 30.0), (30.0, 30.0)])
def test_range_low_must_be_below_high(bounds: tuple[float, float]) -> None:
    with pytest.raises(ValidationError, match=r"range must be \[low, high\] with low < high"):
        Feature(name="temperature", range=bounds)


def test_range_only_on_continuous_features() -> None:
    with pytest.raises(ValidationError, match=r"a range applies only to continuous features"):
        Feature(name="sex", type=FeatureType.BINARY, range=(0, 1))


def test_indicator_needs_an_imputation_rule() -> None:
    with pytest.raises(ValidationError, match=r"missing-indicator needs an imputation rule"):
        MissingPolicy(rule=MissingRule.REFUSE, indicator=True)
    with pytest.raises(ValidationError, match=r"missing-indicator needs an imputation rule"):
        Feature.model_validate({"name": "wbc", "missing": {"indicator": True}})


def test_categorical_only_imputes_with_mode() -> None:
    with pytest.raises(ValidationError, match=r"categorical features can only impute with 'mode'"):
        Feature(
            name="ward",
            type=FeatureType.CATEGORICAL,
            categories=("a", "b"),
            missing=MissingPolicy(rule=MissingRule.MEDIAN),
        )


def test_reference_std_must_be_positive() -> None:
    with pytest.raises(ValidationError, match=r"reference std must be positive"):
        Feature(name="age", reference=(50.0, 0.0))


@pytest.mark.parametrize("name", ["Age", "2age", "age-years", ""])
def test_feature_names_are_lower_snake_case(name: str) -> None:
    with pytest.raises(ValidationError, match=r"name"):
        Feature(name=name)


def test_schema_needs_a_feature_and_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match=r"features"):
        FeatureSchema(features=(), label=Label(name="y"))
    with pytest.raises(ValidationError, match=r"colour"):
        Feature.model_validate({"name": "age", "colour": "red"})


def test_input_names_expand_categories_and_indicators() -> None:
    schema = make_schema()
    assert schema.input_names() == [
        "temperature",
        "temperature_missing",
        "creatinine",
        "age",
        "sex_female",
        "ward=icu",
        "ward=med",
        "ward=surg",
    ]
    assert schema.n_inputs == 8
    assert schema.feature("ward").categories == ("icu", "med", "surg")
    with pytest.raises(KeyError, match="ethnicity"):
        schema.feature("ethnicity")  # an attribute, not a feature


# --- the numpy path for clean numeric columns --------------------------------------------

_CELLS = [
    "98.6",
    " 100.4 ",
    "1e2",
    "-0.0",
    "0",
    "1",
    "2",
    "1_000",
    "inf",
    "-inf",
    "0x10",
    "1,5",
    "",
    " ",
    "NA",
    "nan",
    "NaN",
    "?",
    "null",
    "abc",
    "40",
    "  7",
    "3.",
    ".5",
    "1e400",
    "\u00a012",
    "12\t",
]


@settings(max_examples=300, deadline=None)
# Clean columns, so the numpy path's own result is compared for certain.
@example(
    ["98.6", " 100.4 ", "", "1e2"], "continuous", "degF", True, MissingRule.MEDIAN, OnInvalid.REFUSE
)
@example(["0", "1", " 1", "NA"], "binary", None, False, MissingRule.MEDIAN, OnInvalid.MISSING)
@given(
    cells=st.lists(st.sampled_from(_CELLS), min_size=1, max_size=12),
    kind=st.sampled_from(["continuous", "binary"]),
    unit=st.sampled_from([None, "degF", "degC"]),
    with_range=st.booleans(),
    rule=st.sampled_from([MissingRule.MEDIAN, MissingRule.REFUSE]),
    on_invalid=st.sampled_from(list(OnInvalid)),
)
def test_clean_numbers_is_the_mapping_s_result_or_steps_aside(
    cells: list[str],
    kind: str,
    unit: str | None,
    with_range: bool,
    rule: MissingRule,
    on_invalid: OnInvalid,
) -> None:
    binary = kind == "binary"
    if rule is MissingRule.REFUSE:
        on_invalid = OnInvalid.REFUSE  # blanking a value needs a rule that imputes
    feature = Feature(
        name="x",
        type=FeatureType.BINARY if binary else FeatureType.CONTINUOUS,
        unit=None if binary else "degC",
        range=(30, 110) if with_range and not binary else None,
        missing=MissingPolicy(rule=rule),
        on_invalid=on_invalid,
    )
    entry = ColumnMapping(column="X", unit=None if binary else unit)
    raw = pd.Series(cells, index=pd.RangeIndex(3, 3 + len(cells)), dtype=object)
    tokens = frozenset(DEFAULT_MISSING_TOKENS)
    fast = clean_numbers(feature, entry, raw, tokens)
    violations: list[Violation] = []
    notices: list[Violation] = []
    column = _Column("X", _as_missing(raw, DEFAULT_MISSING_TOKENS), on_invalid, violations, notices)
    slow = _map_feature(feature, entry, column)
    if violations or notices:
        # Something to say about the column: only the full mapping may say it.
        assert fast is None
    else:
        assert fast is not None
        assert fast.dtype == slow.dtype == np.float64
        assert fast.index.equals(slow.index)
        np.testing.assert_array_equal(fast.to_numpy(), slow.to_numpy())


_LABEL_CELLS = ["0", "1", " 1", "1 ", "1.0", "0.0", "2", "-1", "", "NA", "yes", "01"]


@settings(max_examples=200, deadline=None)
@given(
    cells=st.lists(st.sampled_from(_LABEL_CELLS), min_size=4, max_size=12),
    as_integers=st.booleans(),
    recoded=st.booleans(),
)
def test_clean_label_is_the_mapping_s_label_or_steps_aside(
    cells: list[str], as_integers: bool, recoded: bool
) -> None:
    """The numpy label path gives the full mapping's labels, or the same refusal."""
    from unittest import mock

    import fedcare.schema.mapping as mapping_module

    schema = FeatureSchema(features=[Feature(name="a")], label=Label(name="y"))
    values = {"yes": 1, "no": 0} if recoded else {}
    mapping = SiteMapping(
        site="s", features={"a": "A"}, label=ColumnMapping(column="Y", values=values)
    )
    label: list[object] = list(cells)
    if as_integers:
        label = [
            int(float(c)) if c.strip().lstrip("-").replace(".0", "").isdigit() else 0 for c in cells
        ]
    frame = pd.DataFrame({"A": ["1.5"] * len(cells), "Y": label})

    def outcome() -> tuple[str, object]:
        try:
            table = apply_mapping(frame, mapping, schema)
        except DataValidationError as exc:
            return "refused", str(exc)
        return "mapped", table.frame["y"].tolist()

    fast = outcome()
    with mock.patch.object(mapping_module, "clean_label", return_value=None):
        slow = outcome()
    assert fast == slow
