"""Fed-Heart-Disease: the published protocol on the real files, the lift, and clear errors.

The data live beside the repository (``../shared/data/heart-disease``); they
are read in place, never copied into the project.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data.heart_disease import (
    CENTER_NAMES,
    CENTERS,
    INPUT_NAMES,
    HeartDiseaseDataError,
    heart_disease_study,
    load_heart_disease,
    protocol_split,
    read_center_file,
)
from fedcare.simulation.heart_benchmark import (
    PUBLISHED,
    Scores,
    cross_site_lift,
    lifts,
    run_benchmark,
    table_rows,
)
from fedcare.site.dataset import SiteDataset

DATA = Path(__file__).parents[2] / "shared" / "data" / "heart-disease"

# Protocol sizes: sklearn's split gives ceil(0.34 n) test rows.
SIZES = {"Cleveland": (199, 104), "Hungary": (172, 89), "Switzerland": (30, 16), "VA": (85, 45)}


@pytest.fixture(scope="module")
def sites() -> list[SiteDataset]:
    return load_heart_disease(DATA)


def test_740_rows_survive_the_protocol() -> None:
    rows = {c.name: len(read_center_file(DATA / c.file)) for c in CENTERS}
    assert rows == {"Cleveland": 303, "Hungary": 261, "Switzerland": 46, "VA": 130}
    assert sum(rows.values()) == 740


def test_thirteen_inputs_in_the_stated_order() -> None:
    assert heart_disease_study().feature_schema.input_names() == list(INPUT_NAMES)
    assert INPUT_NAMES == (
        "age",
        "sex",
        "cp=2",
        "cp=3",
        "cp=4",
        "trestbps",
        "chol",
        "fbs",
        "restecg=1",
        "restecg=2",
        "thalach",
        "exang",
        "oldpeak",
    )


def test_split_sizes_per_centre(sites: list[SiteDataset]) -> None:
    assert [s.name for s in sites] == list(CENTER_NAMES)
    assert {s.name: (s.n_train, s.n_test) for s in sites} == SIZES
    for site in sites:
        assert site.x_train.shape[1] == site.x_test.shape[1] == 13


def test_labels_are_num_above_zero(sites: list[SiteDataset]) -> None:
    for center, site in zip(CENTERS, sites, strict=True):
        raw = read_center_file(DATA / center.file)
        diseased = int((raw["num"].astype(float) > 0).sum())
        labels = np.concatenate([site.y_train, site.y_test])
        assert set(np.unique(labels)) <= {0.0, 1.0}
        assert int(labels.sum()) == diseased


def test_switzerland_keeps_its_single_negative_in_the_test_set(sites: list[SiteDataset]) -> None:
    """One negative row cannot be stratified; the protocol shuffles without stratifying."""
    switzerland = sites[CENTER_NAMES.index("Switzerland")]
    assert switzerland.y_train.min() == 1.0
    assert int((switzerland.y_test == 0).sum()) == 1


def test_split_is_flamby_s_train_test_split() -> None:
    for center in CENTERS:
        frame = read_center_file(DATA / center.file)
        labels = np.asarray(frame["num"].astype(float) > 0, dtype=np.int64)
        stratify = labels if np.bincount(labels).min() > 2 else None
        flamby_train, flamby_test = train_test_split(
            np.arange(len(frame)),
            test_size=1.0 - 0.66,
            train_size=0.66,
            random_state=43,
            shuffle=True,
            stratify=stratify,
        )
        train, test = protocol_split(frame, labels, 0.34, 43)
        np.testing.assert_array_equal(train.index.to_numpy(), flamby_train)
        np.testing.assert_array_equal(test.index.to_numpy(), flamby_test)


def test_training_columns_are_z_scored_per_centre(sites: list[SiteDataset]) -> None:
    for site in sites:
        mean = site.x_train.astype(np.float64).mean(axis=0)
        std = site.x_train.astype(np.float64).std(axis=0)
        np.testing.assert_allclose(mean, 0.0, atol=1e-5)
        constant = std < 1e-6
        np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-4)
        expected_constant = ["chol"] if site.name == "Switzerland" else []
        assert [INPUT_NAMES[i] for i in np.flatnonzero(constant)] == expected_constant
        # Scaled with the training statistics only: the test rows are not re-centred.
        assert np.abs(site.x_test.mean(axis=0)).max() > 1e-3


def test_the_published_lift_is_reproduced() -> None:
    assert round(100 * (cross_site_lift(PUBLISHED, "fedavg") or 0)) == 14
    assert round(100 * (cross_site_lift(PUBLISHED, "fedadagrad") or 0)) == 22
    assert round(100 * (cross_site_lift(PUBLISHED, "pooled") or 0)) == 24
    # FedProx is published without per-centre numbers: no lift rather than a wrong one.
    assert cross_site_lift(PUBLISHED, "fedprox") is None
    assert "local:Cleveland" not in lifts(PUBLISHED)


def test_lift_by_hand_on_a_tiny_table() -> None:
    centers = ("a", "b")

    def scores(a: float, b: float) -> Scores:
        return Scores(avg=(a + b) / 2, centers={"a": a, "b": b})

    table = {"local:a": scores(0.9, 0.5), "local:b": scores(0.4, 0.8), "m": scores(0.7, 0.6)}
    # centre a: local a on b = 0.5, m on b = 0.6 -> +20 %; centre b: 0.4 vs 0.7 -> +75 %
    assert cross_site_lift(table, "m", centers) == pytest.approx((0.2 + 0.75) / 2)


def test_published_numbers_match_the_data_readme() -> None:
    text = (DATA / "README.md").read_text(encoding="utf-8")
    labels = {
        "pooled (centralised)": "pooled",
        **{f"local, {c} only": f"local:{c}" for c in CENTER_NAMES},
        "FedAvg": "fedavg",
        "FedProx": "fedprox",
        "Scaffold": "scaffold",
        "FedAdagrad": "fedadagrad",
        "FedAdam": "fedadam",
    }
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in labels and re.fullmatch(r"0\.\d+", cells[1]):
            values = [float(c) if c else None for c in cells[1:6]]
            rows[labels[cells[0]]] = Scores(
                avg=values[0], centers=dict(zip(CENTER_NAMES, values[1:], strict=True))
            )
    assert rows == PUBLISHED


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    for center in CENTERS[:3]:
        shutil.copy(DATA / center.file, tmp_path / center.file)
    with pytest.raises(HeartDiseaseDataError, match=r"processed\.va\.data: missing"):
        load_heart_disease(tmp_path)


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(HeartDiseaseDataError, match="no such folder"):
        load_heart_disease(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6", r"line 2: expected 14 .* found 13"),
        ("63,1,1,145,high,1,2,150,0,2.3,3,0,6,0", r"line 2: column 'chol' holds 'high'"),
    ],
)
def test_a_bad_row_is_named_with_its_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "processed.va.data"
    path.write_text("63,1,4,140,260,0,1,112,1,3,2,?,?,2\n" + line + "\n", encoding="ascii")
    with pytest.raises(HeartDiseaseDataError, match=message):
        read_center_file(path)


def test_cli_refuses_a_missing_folder_with_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["benchmark", "heart-disease", "--data-dir", str(tmp_path / "nowhere")]
    )
    assert result.exit_code == 2
    assert "no such folder" in result.output
    assert "Traceback" not in result.output


def test_benchmark_result_layout(sites: list[SiteDataset]) -> None:
    """A two-round, one-seed run: every row of the table, ours beside the published."""
    study = heart_disease_study()
    study = study.replace(rounds={**study.canonical()["rounds"], "count": 2})
    result = run_benchmark(sites, study, n_seeds=1, methods=["fedavg", "fedprox"])
    assert set(result.measured) == {
        "pooled",
        *(f"local:{c}" for c in CENTER_NAMES),
        "fedavg",
        "fedprox",
    }
    for scores in result.measured.values():
        assert set(scores.centers) == set(CENTER_NAMES)
        values = [v for v in scores.centers.values() if v is not None]
        assert scores.avg == pytest.approx(float(np.mean(values)))
    assert result.lift["fedavg"] is not None
    assert result.published_lift["fedadagrad"] == pytest.approx(
        cross_site_lift(PUBLISHED, "fedadagrad")
    )
    assert result.settings.split_seed == 43
    assert result.settings.seeds == [study.seed]
    methods = [row.method for row in table_rows(result)]
    assert methods[:5] == ["pooled", *(f"local:{c}" for c in CENTER_NAMES)]
    assert "scaffold" in methods  # published only


def test_benchmark_with_dp_runs_the_federation_privately(tmp_path: Path) -> None:
    """--epsilon/--delta put DP-SGD at every centre; the settings say so in the JSON."""
    out = tmp_path / "dp.json"
    done = CliRunner().invoke(
        app,
        [
            *("benchmark", "heart-disease", "--data-dir", str(DATA), "--seeds", "1"),
            *("--method", "fedavg", "--epsilon", "1", "--delta", "1e-3", "--json", str(out)),
        ],
    )
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert result["settings"]["privacy"]["dp"] is True
    assert result["settings"]["privacy"]["epsilon"] == 1.0
    assert set(result["measured"]) >= {"fedavg", "pooled"}
    assert "DP-SGD at every centre" in done.output
    half = CliRunner().invoke(
        app, ["benchmark", "heart-disease", "--data-dir", str(DATA), "--epsilon", "1"]
    )
    assert half.exit_code == 2
    assert "--epsilon and --delta together" in half.output
