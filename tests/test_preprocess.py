"""Imputation, scaling and encoding, fitted on a site's training split only."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.schema.features import (
    Feature,
    FeatureSchema,
    FeatureType,
    Label,
    MissingPolicy,
    MissingRule,
)
from fedcare.schema.preprocess import FeatureState, Preprocessor, fit_preprocessor
from fedcare.study import Scaling

NAN = np.nan


def median_with_indicator() -> MissingPolicy:
    return MissingPolicy(rule=MissingRule.MEDIAN, indicator=True)


def make_schema(drop_first: bool = False) -> FeatureSchema:
    return FeatureSchema(
        features=(
            Feature(name="hr", missing=median_with_indicator(), reference=(80.0, 20.0)),
            Feature(name="lac", missing=MissingPolicy(rule=MissingRule.MEAN), reference=(2, 1)),
            Feature(name="age", reference=(50.0, 10.0)),  # refuse: never missing
            Feature(
                name="flag",
                type=FeatureType.BINARY,
                missing=MissingPolicy(rule=MissingRule.MODE, indicator=True),
            ),
            Feature(
                name="ward",
                type=FeatureType.CATEGORICAL,
                categories=("icu", "med", "surg"),
                drop_first=drop_first,
                missing=MissingPolicy(rule=MissingRule.MODE, indicator=True),
            ),
        ),
        label=Label(name="y"),
    )


def train_frame() -> pd.DataFrame:
    """A mapped training split: floats, text for the categorical, NaN/NA where missing."""
    return pd.DataFrame(
        {
            "hr": [60.0, 80.0, NAN, 100.0, 70.0],  # median 75, filled mean 77
            "lac": [1.0, NAN, 1.0, 4.0, 2.0],  # mean 2.0 (median would be 1.5)
            "age": [30.0, 40.0, 50.0, 60.0, 70.0],
            "flag": [1.0, 1.0, 0.0, NAN, 1.0],  # mode 1
            "ward": pd.array(["med", "med", "icu", None, "surg"], dtype="string"),  # mode med
            "y": [0, 1, 0, 1, 0],
        }
    )


def test_fill_values_are_fitted_on_the_training_frame() -> None:
    pre = fit_preprocessor(train_frame(), make_schema(), Scaling.NONE)
    assert pre.states["hr"].fill == 75.0  # median of 60, 80, 100, 70
    assert pre.states["lac"].fill == 2.0  # mean of 1, 1, 4, 2
    assert pre.states["age"].fill is None  # refuse: nothing to impute
    assert pre.states["flag"].fill == 1.0
    assert pre.states["ward"].fill == "med"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(MissingRule.MEDIAN, 2.5), (MissingRule.MEAN, 4.0), (MissingRule.MODE, 1.0)],
)
def test_median_mean_and_mode(rule: MissingRule, expected: float) -> None:
    schema = FeatureSchema(
        features=(Feature(name="x", missing=MissingPolicy(rule=rule)),), label=Label(name="y")
    )
    frame = pd.DataFrame({"x": [1.0, 1.0, 4.0, 10.0, NAN]})
    pre = fit_preprocessor(frame, schema, Scaling.NONE)
    assert pre.states["x"].fill == expected
    matrix = pre.transform(frame, schema)
    np.testing.assert_array_equal(matrix[:, 0], np.array([1, 1, 4, 10, expected], np.float32))


def test_mode_tie_takes_the_smallest_value() -> None:
    schema = FeatureSchema(
        features=(Feature(name="x", missing=MissingPolicy(rule=MissingRule.MODE)),),
        label=Label(name="y"),
    )
    frame = pd.DataFrame({"x": [7.0, 3.0, 7.0, 3.0, NAN]})
    assert fit_preprocessor(frame, schema, Scaling.NONE).states["x"].fill == 3.0


def test_changing_the_test_frame_does_not_change_the_fitted_state() -> None:
    schema = make_schema()
    train = train_frame()
    pre = fit_preprocessor(train, schema, Scaling.SITE)
    snapshot = pre.model_dump()

    test = pd.DataFrame(
        {
            "hr": [NAN, 90.0],
            "lac": [NAN, 3.0],
            "age": [45.0, 55.0],
            "flag": [NAN, 0.0],
            "ward": pd.array([None, "surg"], dtype="string"),
            "y": [1, 0],
        }
    )
    first = pre.transform(test, schema)
    test.loc[1, "hr"] = 1000.0
    test.loc[1, "lac"] = 50.0
    test.loc[1, "ward"] = "icu"
    second = pre.transform(test, schema)

    assert pre.model_dump() == snapshot
    # the row that was not changed transforms identically, with the *training* fills
    np.testing.assert_array_equal(first[0], second[0])
    hr = pre.states["hr"]
    assert first[0, 0] == pytest.approx((75.0 - hr.center) / hr.spread, rel=1e-6)
    # the changed row moves, because transform uses its values but not to refit
    assert second[1, 0] == pytest.approx((1000.0 - hr.center) / hr.spread, rel=1e-6)


def test_fitting_on_more_rows_would_give_other_fills() -> None:
    """The fitted state depends on exactly the frame passed to fit, nothing else."""
    train = train_frame()
    extra = train.copy()
    extra.loc[5] = [200.0, 10.0, 80.0, 0.0, "icu", 1]
    schema = make_schema()
    only_train = fit_preprocessor(train, schema, Scaling.SITE)
    with_extra = fit_preprocessor(extra, schema, Scaling.SITE)
    assert only_train.states["hr"].fill == 75.0
    assert with_extra.states["hr"].fill == 80.0  # median of 60, 80, 100, 70, 200
    assert with_extra.states["lac"].fill == pytest.approx(18.0 / 5)
    # fitting again on the same frame gives the same state
    assert fit_preprocessor(train, schema, Scaling.SITE) == only_train


def test_fit_does_not_modify_the_frame() -> None:
    train = train_frame()
    before = train.copy()
    pre = fit_preprocessor(train, make_schema(), Scaling.SITE)
    pre.transform(train, make_schema())
    pd.testing.assert_frame_equal(train, before)


def test_indicator_is_one_exactly_where_missing() -> None:
    schema = make_schema()
    train = train_frame()
    pre = fit_preprocessor(train, schema, Scaling.SITE)
    matrix = pre.transform(train, schema)
    names = schema.input_names()
    np.testing.assert_array_equal(matrix[:, names.index("hr_missing")], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(matrix[:, names.index("flag_missing")], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(matrix[:, names.index("ward_missing")], [0, 0, 0, 1, 0])


def test_site_scaling_gives_zero_mean_unit_std_on_training_data() -> None:
    schema = make_schema()
    train = train_frame()
    pre = fit_preprocessor(train, schema, Scaling.SITE)
    # hr filled = [60, 80, 75, 100, 70]: mean 77, population variance 880/5 = 176
    assert pre.states["hr"].center == pytest.approx(77.0)
    assert pre.states["hr"].spread == pytest.approx(math.sqrt(176.0))
    # age = [30..70]: mean 50, population std sqrt(200)
    assert pre.states["age"].center == pytest.approx(50.0)
    assert pre.states["age"].spread == pytest.approx(math.sqrt(200.0))

    matrix = pre.transform(train, schema).astype(np.float64)
    names = schema.input_names()
    for name in ("hr", "lac", "age"):
        column = matrix[:, names.index(name)]
        assert column.mean() == pytest.approx(0.0, abs=1e-6)
        assert column.std() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(
        matrix[:, names.index("age")], np.array([-20, -10, 0, 10, 20]) / math.sqrt(200), rtol=1e-6
    )


def test_site_scaling_leaves_binary_and_one_hot_columns_alone() -> None:
    schema = make_schema()
    pre = fit_preprocessor(train_frame(), schema, Scaling.SITE)
    assert pre.states["flag"] == FeatureState(fill=1.0, center=0.0, spread=1.0)
    assert pre.states["ward"] == FeatureState(fill="med", center=0.0, spread=1.0)
    matrix = pre.transform(train_frame(), schema)
    names = schema.input_names()
    np.testing.assert_array_equal(matrix[:, names.index("flag")], [1, 1, 0, 1, 1])


def test_site_scaling_of_a_constant_column_centres_without_dividing_by_zero() -> None:
    schema = FeatureSchema(features=(Feature(name="x"),), label=Label(name="y"))
    frame = pd.DataFrame({"x": [5.0, 5.0, 5.0]})
    pre = fit_preprocessor(frame, schema, Scaling.SITE)
    assert pre.states["x"] == FeatureState(fill=None, center=5.0, spread=1.0)
    np.testing.assert_array_equal(pre.transform(frame, schema)[:, 0], [0.0, 0.0, 0.0])


def test_reference_scaling_uses_the_agreed_mean_and_std() -> None:
    schema = make_schema()
    train = train_frame()
    pre = fit_preprocessor(train, schema, Scaling.REFERENCE)
    assert (pre.states["hr"].center, pre.states["hr"].spread) == (80.0, 20.0)
    assert (pre.states["age"].center, pre.states["age"].spread) == (50.0, 10.0)
    matrix = pre.transform(train, schema)
    names = schema.input_names()
    # hr filled with the site median 75, then (x - 80) / 20
    np.testing.assert_allclose(
        matrix[:, names.index("hr")], [-1.0, 0.0, -0.25, 1.0, -0.5], rtol=1e-6
    )
    np.testing.assert_allclose(matrix[:, names.index("age")], [-2, -1, 0, 1, 2], rtol=1e-6)
    # lac filled with 2.0, then (x - 2) / 1
    np.testing.assert_allclose(matrix[:, names.index("lac")], [-1, 0, -1, 2, 0], rtol=1e-6)


def test_reference_scaling_does_not_depend_on_the_site_data() -> None:
    schema = make_schema()
    shifted = train_frame()
    shifted["age"] = shifted["age"] + 100
    a = fit_preprocessor(train_frame(), schema, Scaling.REFERENCE)
    b = fit_preprocessor(shifted, schema, Scaling.REFERENCE)
    assert a.states["age"] == b.states["age"]


def test_no_scaling_leaves_values_in_raw_units() -> None:
    schema = make_schema()
    train = train_frame()
    pre = fit_preprocessor(train, schema, Scaling.NONE)
    for name in ("hr", "lac", "age"):
        assert (pre.states[name].center, pre.states[name].spread) == (0.0, 1.0)
    matrix = pre.transform(train, schema)
    names = schema.input_names()
    np.testing.assert_array_equal(matrix[:, names.index("hr")], [60, 80, 75, 100, 70])
    np.testing.assert_array_equal(matrix[:, names.index("lac")], [1, 2, 1, 4, 2])
    np.testing.assert_array_equal(matrix[:, names.index("age")], [30, 40, 50, 60, 70])


def test_one_hot_with_all_levels() -> None:
    schema = make_schema(drop_first=False)
    pre = fit_preprocessor(train_frame(), schema, Scaling.NONE)
    matrix = pre.transform(train_frame(), schema)
    names = schema.input_names()
    block = matrix[:, [names.index(f"ward={level}") for level in ("icu", "med", "surg")]]
    # med, med, icu, (missing -> mode med), surg
    np.testing.assert_array_equal(block, [[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert np.all(block.sum(axis=1) == 1)


def test_one_hot_with_drop_first() -> None:
    schema = make_schema(drop_first=True)
    names = schema.input_names()
    assert "ward=icu" not in names
    pre = fit_preprocessor(train_frame(), schema, Scaling.NONE)
    matrix = pre.transform(train_frame(), schema)
    block = matrix[:, [names.index("ward=med"), names.index("ward=surg")]]
    np.testing.assert_array_equal(block, [[1, 0], [1, 0], [0, 0], [1, 0], [0, 1]])


@pytest.mark.parametrize("drop_first", [False, True])
def test_column_order_equals_schema_input_names(drop_first: bool) -> None:
    schema = make_schema(drop_first=drop_first)
    pre = fit_preprocessor(train_frame(), schema, Scaling.NONE)
    matrix = pre.transform(train_frame(), schema)
    assert matrix.dtype == np.float32
    assert matrix.shape == (5, schema.n_inputs)
    expected_names = ["hr", "hr_missing", "lac", "age", "flag", "flag_missing"]
    expected_names += ["ward=med", "ward=surg"] if drop_first else ["ward=icu", "ward=med"]
    expected_names += [] if drop_first else ["ward=surg"]
    expected_names.append("ward_missing")
    assert schema.input_names() == expected_names
    # row 0 written out in input_names() order
    if drop_first:
        assert matrix[0].tolist() == [60, 0, 1, 30, 1, 0, 1, 0, 0]
    else:
        assert matrix[0].tolist() == [60, 0, 1, 30, 1, 0, 0, 1, 0, 0]


def test_column_order_follows_the_schema_not_the_frame() -> None:
    schema = make_schema()
    pre = fit_preprocessor(train_frame(), schema, Scaling.NONE)
    reordered = train_frame()[["y", "ward", "age", "flag", "lac", "hr"]]
    np.testing.assert_array_equal(
        pre.transform(reordered, schema), pre.transform(train_frame(), schema)
    )


def test_feature_never_measured_at_the_site() -> None:
    schema = FeatureSchema(
        features=(
            Feature(name="age"),
            Feature(name="lactate", missing=median_with_indicator()),
            Feature(
                name="unit",
                type=FeatureType.CATEGORICAL,
                categories=("a", "b"),
                missing=MissingPolicy(rule=MissingRule.MODE, indicator=True),
            ),
        ),
        label=Label(name="y"),
    )
    frame = pd.DataFrame(
        {
            "age": [30.0, 50.0, 70.0],
            "lactate": [NAN, NAN, NAN],
            "unit": pd.array([None, None, None], dtype="string"),
        }
    )
    pre = fit_preprocessor(frame, schema, Scaling.SITE)
    assert pre.states["lactate"].fill == 0.0
    assert pre.states["unit"].fill == "a"  # the first category
    matrix = pre.transform(frame, schema)
    assert np.all(np.isfinite(matrix))
    names = schema.input_names()
    np.testing.assert_array_equal(matrix[:, names.index("lactate")], [0, 0, 0])
    np.testing.assert_array_equal(matrix[:, names.index("lactate_missing")], [1, 1, 1])
    np.testing.assert_array_equal(matrix[:, names.index("unit=a")], [1, 1, 1])
    np.testing.assert_array_equal(matrix[:, names.index("unit=b")], [0, 0, 0])
    np.testing.assert_array_equal(matrix[:, names.index("unit_missing")], [1, 1, 1])


def test_fitted_state_round_trips_through_json() -> None:
    pre = fit_preprocessor(train_frame(), make_schema(), Scaling.SITE)
    again = Preprocessor.model_validate_json(pre.model_dump_json())
    assert again == pre
    assert again.states["ward"].fill == "med"
    assert again.states["hr"].fill == 75.0


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(finite, st.just(NAN)), min_size=3, max_size=30).filter(
        lambda xs: sum(not math.isnan(x) for x in xs) >= 2
    )
)
def test_site_scaling_property(values: list[float]) -> None:
    schema = FeatureSchema(
        features=(Feature(name="x", missing=median_with_indicator()),), label=Label(name="y")
    )
    frame = pd.DataFrame({"x": values})
    pre = fit_preprocessor(frame, schema, Scaling.SITE)
    matrix = pre.transform(frame, schema).astype(np.float64)
    missing = np.isnan(np.array(values))
    np.testing.assert_array_equal(matrix[:, 1], missing.astype(float))
    present = np.array(values)[~missing]
    assert pre.states["x"].fill == pytest.approx(float(np.median(present)))
    assert np.all(np.isfinite(matrix))
    assert abs(matrix[:, 0].mean()) < 1e-4
    if pre.states["x"].spread != 1.0:
        assert matrix[:, 0].std() == pytest.approx(1.0, abs=1e-4)


def test_keyed_split_is_per_record_stable_and_keeps_identical_records_together() -> None:
    """docs/privacy.md: a record's side depends on it alone (adding, removing or
    reordering others moves nobody), identical records share a side, and the key
    chooses the split."""
    from fedcare.schema.split import keyed_holdout

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=2000), "b": rng.integers(0, 3, size=2000)})
    held = keyed_holdout(frame, 0.25, key=7)
    assert 0.22 < held.mean() < 0.28
    shuffled = frame.sample(frac=1.0, random_state=1)
    again = keyed_holdout(shuffled, 0.25, key=7)
    assert (again == held[shuffled.index.to_numpy()]).all()
    grown = pd.concat([frame.iloc[:1500], frame.iloc[:1]], ignore_index=True)
    grown_held = keyed_holdout(grown, 0.25, key=7)
    assert (grown_held[:1500] == held[:1500]).all()
    assert grown_held[1500] == held[0]  # an identical record lands where its twin did
    # 1, 1.0 and numpy's 1.0 are one value; another key is another split.
    ints = pd.DataFrame({"a": [1, 2, 3], "b": [0, 1, 2]})
    floats = ints.astype(float)
    assert (keyed_holdout(ints, 0.5, 3) == keyed_holdout(floats, 0.5, 3)).all()
    assert (keyed_holdout(frame, 0.25, key=8) != held).any()


def test_the_split_reads_each_column_as_it_reads_each_cell() -> None:
    """The column-wise text of the keyed split is the per-cell canonical text, for every
    kind of column a mapped table holds (so no record moves when the code path changes)."""
    from fedcare.schema.split import _canonical, _column_text

    rng = np.random.default_rng(0)
    n = 500
    frame = pd.DataFrame(
        {
            "rounded": np.round(rng.normal(size=n), 3),
            "whole": rng.integers(0, 5, n).astype(float),
            "big": rng.integers(-9, 2**60, n),
            "gaps": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
            "text": rng.choice(["x", "y", None], n),
            "inf": np.where(rng.random(n) < 0.05, np.inf, 1.5),
            "flag": rng.random(n) < 0.5,
        }
    )
    for name in frame.columns:
        cells = [_canonical(v) for v in frame[name].tolist()]
        assert _column_text(frame[name]) == cells, name
