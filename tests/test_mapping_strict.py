"""A mapping never changes a value silently: attacks on recoding, units, invalid values,
transforms and time-to-event labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from fedcare.schema.features import (
    Attribute,
    Censored,
    Feature,
    FeatureSchema,
    FeatureType,
    Label,
    MissingPolicy,
    MissingRule,
    OnInvalid,
    Transform,
)
from fedcare.schema.mapping import (
    ColumnMapping,
    DataValidationError,
    EventMapping,
    MappingError,
    SiteMapping,
    Violation,
    apply_mapping,
)
from fedcare.schema.preprocess import fit_preprocessor
from fedcare.study import Scaling


def schema(*features: Feature, label: Label | None = None) -> FeatureSchema:
    return FeatureSchema(
        features=features,
        label=label or Label(name="outcome"),
        attributes=(Attribute(name="site_code", categories=("1", "2")),),
    )


def mapping(
    label: EventMapping | ColumnMapping | str = "y", **features: ColumnMapping
) -> SiteMapping:
    return SiteMapping(site="thyroid-a", features=dict(features), label=label)


def refused(frame: pd.DataFrame, site: SiteMapping, sch: FeatureSchema) -> list[Violation]:
    with pytest.raises(DataValidationError) as info:
        apply_mapping(frame, site, sch)
    return info.value.violations


SEX = Feature(name="sex_female", type=FeatureType.BINARY)


def test_the_reported_sex_mapping_no_longer_turns_men_into_women() -> None:
    # values {"1": 0, "2": 1} on a column exported as 1.0/2.0: the men used to pass
    # through unmapped as 1 (female). 1.0 is the number 1, so it now maps to 0.
    frame = pd.DataFrame({"sex": ["1.0"] * 505 + ["2.0"] * 300, "y": ["0", "1"] * 402 + ["0"]})
    site = mapping(sex_female=ColumnMapping(column="sex", values={"1": 0, "2": 1}))
    out = apply_mapping(frame, site, schema(SEX)).frame
    assert int((out["sex_female"] == 0).sum()) == 505
    assert int((out["sex_female"] == 1).sum()) == 300


def test_a_value_not_listed_is_refused_with_the_raw_value_and_its_count() -> None:
    frame = pd.DataFrame({"sex": ["1.0", "2.0", "3", "1.5", "3"], "y": ["0", "1", "0", "1", "0"]})
    site = mapping(sex_female=ColumnMapping(column="sex", values={"1": 0, "2": 1}))
    assert refused(frame, site, schema(SEX)) == [
        Violation("sex", "not listed in values ['1', '2']: '3' (2), '1.5' (1)", 3)
    ]


def test_text_codes_do_not_match_numbers_by_accident() -> None:
    frame = pd.DataFrame({"sex": ["M", "F", "1"], "y": ["0", "1", "0"]})
    site = mapping(sex_female=ColumnMapping(column="sex", values={"M": 0, "F": 1}))
    assert refused(frame, site, schema(SEX)) == [
        Violation("sex", "not listed in values ['F', 'M']: '1'", 1)
    ]


def test_two_keys_for_the_same_number_are_an_ambiguous_mapping() -> None:
    with pytest.raises(ValidationError, match=r"values keys '1' and '1.0' are the same number"):
        ColumnMapping(column="sex", values={"1": 0, "1.0": 1})


def test_yaml_integer_keys_and_integer_categories_are_read_as_their_text() -> None:
    feature = Feature.model_validate(
        {"name": "stage", "type": "categorical", "categories": [0, 1, 2, 3]}
    )
    assert feature.categories == ("0", "1", "2", "3")
    entry = ColumnMapping.model_validate(yaml.safe_load("{column: s, values: {1: 0, 2: 3}}"))
    assert entry.values == {"1": 0, "2": 3}
    frame = pd.DataFrame({"s": ["1", "2.0", "2"], "y": ["0", "1", "0"]})
    out = apply_mapping(frame, mapping(stage=entry), schema(feature)).frame
    assert out["stage"].tolist() == ["0", "3", "3"]


def test_a_float_category_is_still_an_error() -> None:
    with pytest.raises(ValidationError, match="valid string"):
        Feature.model_validate({"name": "stage", "type": "categorical", "categories": [0.5, 1]})


def test_integer_coded_categories_match_numerically_and_refuse_the_rest() -> None:
    feature = Feature(name="stage", type=FeatureType.CATEGORICAL, categories=("1", "2"))
    frame = pd.DataFrame({"s": ["1", "2.0", "3", "1.5"], "y": ["0", "1", "0", "1"]})
    assert refused(frame, mapping(stage=ColumnMapping(column="s")), schema(feature)) == [
        Violation("s", "not among the categories ['1', '2']: '3' (1), '1.5' (1)", 2)
    ]


def test_declared_factor_and_offset_convert_and_are_range_checked_after() -> None:
    t3 = Feature(name="t3", unit="nmol/L", range=(0.1, 15))
    entry = ColumnMapping(column="T3_ngdl", factor=0.01536)
    frame = pd.DataFrame({"T3_ngdl": ["100", "130.2", "2000"], "y": ["0", "1", "0"]})
    violations = refused(frame, mapping(t3=entry), schema(t3))
    assert violations == [
        Violation(
            "T3_ngdl",
            "outside the valid range [0.1, 15] after conversion to nmol/L for 't3': '2000'",
            1,
        )
    ]
    frame["T3_ngdl"] = ["100", "130.2", "50"]
    out = apply_mapping(frame, mapping(t3=entry), schema(t3)).frame
    np.testing.assert_allclose(out["t3"], [1.536, 130.2 * 0.01536, 0.768])


@pytest.mark.parametrize(
    ("feature", "entry", "raw", "expected"),
    [
        (
            Feature(name="t3", unit="nmol/L", analyte="t3"),
            ColumnMapping(column="v", unit="ng/dL"),
            130.0,
            2.0,
        ),
        (
            Feature(name="t4", unit="nmol/L", analyte="t4"),
            ColumnMapping(column="v", unit="µg/dL"),
            8.0,
            103.0,
        ),
        (Feature(name="weight", unit="kg"), ColumnMapping(column="v", unit="lb"), 154.0, 69.85),
        (Feature(name="height", unit="cm"), ColumnMapping(column="v", unit="inch"), 70.0, 177.8),
        (
            Feature(name="bilirubin", unit="umol/L", analyte="bilirubin"),
            ColumnMapping(column="v", unit="mg/dL"),
            1.0,
            17.1,
        ),
        (
            Feature(name="urea", unit="mmol/L", analyte="urea"),
            ColumnMapping(column="v", unit="mg/dL", analyte="urea_nitrogen"),
            14.0,
            5.0,
        ),
        (Feature(name="hb", unit="g/L"), ColumnMapping(column="v", unit="g/dL"), 13.5, 135.0),
    ],
)
def test_declared_units_convert(
    feature: Feature, entry: ColumnMapping, raw: float, expected: float
) -> None:
    frame = pd.DataFrame({"v": [str(raw)], "y": ["1"]})
    out = apply_mapping(frame, mapping(**{feature.name: entry}), schema(feature)).frame
    assert out[feature.name].iloc[0] == pytest.approx(expected, rel=2e-3)


def test_unit_and_factor_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="either unit or factor/offset"):
        ColumnMapping(column="v", unit="lb", factor=0.45)


def test_an_impossible_conversion_names_the_feature_and_both_units() -> None:
    weight = Feature(name="weight", unit="kg")
    frame = pd.DataFrame({"v": ["70"], "y": ["1"]})
    with pytest.raises(MappingError, match=r"feature 'weight': cannot convert cm to kg"):
        apply_mapping(frame, mapping(weight=ColumnMapping(column="v", unit="cm")), schema(weight))


def test_on_invalid_missing_blanks_and_counts_instead_of_refusing_the_file() -> None:
    age = Feature(
        name="age",
        unit="years",
        range=(0, 120),
        missing=MissingPolicy(rule=MissingRule.VALUE, fill=50),
        on_invalid=OnInvalid.MISSING,
    )
    frame = pd.DataFrame(
        {"age": ["40", "455", "-3", "sixty", "70"], "y": ["0", "1", "0", "1", "0"]}
    )
    table = apply_mapping(frame, mapping(age=ColumnMapping(column="age")), schema(age))
    assert table.frame["age"].isna().tolist() == [False, True, True, True, False]
    assert table.notices == (
        Violation("age", "not a number: 'sixty'; set to missing", 1),
        Violation(
            "age",
            "outside the valid range [0, 120] years for 'age': '455' (1), '-3' (1); set to missing",
            2,
        ),
    )
    # The default still refuses the whole file.
    strict = age.model_copy(update={"on_invalid": OnInvalid.REFUSE})
    assert len(refused(frame, mapping(age=ColumnMapping(column="age")), schema(strict))) == 2


def test_on_invalid_missing_needs_a_rule_that_imputes() -> None:
    with pytest.raises(ValidationError, match="needs a missing rule that imputes"):
        Feature(name="age", range=(0, 120), on_invalid=OnInvalid.MISSING)


def test_transforms_are_applied_after_clipping_and_before_scaling() -> None:
    tsh = Feature(name="tsh", range=(0.01, 500), clip=(0.1, 100), transform=Transform.LOG)
    frame = pd.DataFrame({"tsh": ["0.05", "1", "400"], "y": ["0", "1", "0"]})
    sch = schema(tsh)
    mapped = apply_mapping(frame, mapping(tsh=ColumnMapping(column="tsh")), sch).frame
    # The mapping keeps the value in schema units; the preprocessor shapes it.
    assert mapped["tsh"].tolist() == [0.05, 1.0, 400.0]
    x = fit_preprocessor(mapped, sch, Scaling.NONE).transform(mapped, sch)
    np.testing.assert_allclose(x[:, 0], np.log([0.1, 1.0, 100.0]), rtol=1e-6)
    log1p = tsh.model_copy(update={"transform": Transform.LOG1P})
    x = fit_preprocessor(mapped, schema(log1p), Scaling.NONE).transform(mapped, schema(log1p))
    np.testing.assert_allclose(x[:, 0], np.log1p([0.1, 1.0, 100.0]), rtol=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"transform": "log"}, "needs a range or clip whose low bound is above 0"),
        ({"transform": "log", "range": [0, 10]}, "above 0"),
        ({"transform": "log1p", "range": [-1, 10]}, "above -1"),
        ({"clip": [5, 1]}, "clip must be"),
        ({"type": "binary", "transform": "log"}, "only to continuous"),
    ],
)
def test_transforms_that_could_produce_infinities_are_refused(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Feature.model_validate({"name": "tsh", **fields})


TIMED = Label(name="death_1y", horizon=365)


def test_time_to_event_labels_follow_the_horizon_and_leave_censored_patients_out() -> None:
    age = Feature(name="age", range=(0, 120))
    frame = pd.DataFrame(
        {
            "age": ["50", "60", "70", "80", "90"],
            "dead": ["1", "1", "0", "0", "1"],
            "months": ["3", "18", "24", "6", "12"],
        }
    )
    label = EventMapping(event="dead", time=ColumnMapping(column="months", unit="month"))
    table = apply_mapping(
        frame, mapping(label, age=ColumnMapping(column="age")), schema(age, label=TIMED)
    )
    # event at 3 months -> 1; event at 18 months -> after the horizon -> 0;
    # followed 24 months event-free -> 0; censored at 6 months -> left out;
    # event at 12 months (365.2 days) -> just after 365 days -> 0.
    assert table.frame["age"].tolist() == [50.0, 60.0, 70.0, 90.0]
    assert table.frame["death_1y"].tolist() == [1, 0, 0, 0]
    assert table.notices == (
        Violation("months", "censored before the horizon of 365 days: row left out", 1),
    )
    refusing = TIMED.model_copy(update={"censored": Censored.REFUSE})
    violations = refused(
        frame, mapping(label, age=ColumnMapping(column="age")), schema(age, label=refusing)
    )
    assert violations == [
        Violation("months", "censored before the horizon of 365 days (censored: refuse)", 1)
    ]


def test_time_to_event_needs_both_columns_and_a_time_unit() -> None:
    age = Feature(name="age")
    frame = pd.DataFrame({"age": ["50"], "dead": ["1"], "days": ["3"]})
    with pytest.raises(MappingError, match="is time-to-event"):
        apply_mapping(
            frame, mapping("dead", age=ColumnMapping(column="age")), schema(age, label=TIMED)
        )
    untimed = EventMapping(event="dead", time="days")
    with pytest.raises(MappingError, match="give its unit"):
        apply_mapping(
            frame, mapping(untimed, age=ColumnMapping(column="age")), schema(age, label=TIMED)
        )
    timed = EventMapping(event="dead", time=ColumnMapping(column="days", unit="day"))
    with pytest.raises(MappingError, match="has no horizon"):
        apply_mapping(frame, mapping(timed, age=ColumnMapping(column="age")), schema(age))


def test_negative_or_missing_follow_up_is_refused() -> None:
    age = Feature(name="age")
    frame = pd.DataFrame({"age": ["50", "60"], "dead": ["1", "0"], "days": ["-2", ""]})
    label = EventMapping(event="dead", time=ColumnMapping(column="days", unit="day"))
    violations = refused(
        frame, mapping(label, age=ColumnMapping(column="age")), schema(age, label=TIMED)
    )
    assert violations == [
        Violation("days", "follow-up time is negative: '-2'", 1),
        Violation("days", "follow-up time is missing", 1),
    ]
