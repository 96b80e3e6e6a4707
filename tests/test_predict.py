"""fedcare predict: an exported release scores a site's patients exactly as validation did,
and refuses what it cannot trust."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import Result
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.releases.bundle import (
    BundleError,
    load_bundle,
    load_site_preprocessing,
    save_site_preprocessing,
)
from fedcare.releases.card import export_release
from fedcare.releases.registry import ReleaseRegistry
from fedcare.schema.mapping import DataValidationError, SiteMapping
from fedcare.schema.split import keyed_holdout
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.predict import preprocessing_for, score_table
from fedcare.study import Study
from fedcare.training import predict_proba
from fedcare.validation.release import ReleaseState

from .conftest import toy_frame, toy_mapping


def _export(study: Study, tmp_path: Path, seed: int = 0) -> Path:
    """A promoted release of ``study`` with some trained-looking parameters, exported."""
    from fedcare.models.size import study_parameter_count

    rng = np.random.default_rng(seed)
    params = rng.normal(size=study_parameter_count(study)).astype(np.float32)
    registry = ReleaseRegistry.open(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "models")
    try:
        release = registry.add_candidate(study, 4, params, ["alpha"], None, deadline=0.0)
        registry.override(release.id, ReleaseState.PROMOTED, "Dr Lead", "test release")
        export_release(registry, release.id, tmp_path / "release")
    finally:
        registry.close()
    return tmp_path / "release"


def _held_out_rows(frame: pd.DataFrame, mapping: SiteMapping, study: Study) -> np.ndarray:
    from fedcare.schema.mapping import apply_mapping

    mapped = apply_mapping(frame, mapping, study.feature_schema).frame
    key = study.seed if study.preprocessing.split_seed is None else study.preprocessing.split_seed
    return np.flatnonzero(keyed_holdout(mapped, study.preprocessing.holdout_fraction, key))


def _validation_scores(study: Study, data: SiteDataset, params: np.ndarray) -> np.ndarray:
    return predict_proba(study.model, params, data.x_test)


def test_scores_equal_the_validation_path_for_the_same_rows(
    toy_study: Study, tmp_path: Path
) -> None:
    bundle = load_bundle(_export(toy_study, tmp_path))
    frame = toy_frame(0, 400)
    frame.loc[3, "C"] = np.nan  # a missing value the study fills: the same fill at prediction
    mapping = toy_mapping("alpha")
    data = prepare_site_data(frame, mapping, toy_study)
    prep = preprocessing_for(bundle, None)  # the study declares all of it
    scores, notices = score_table(bundle, frame.drop(columns=["Y"]), mapping, prep)
    assert notices == ()
    rows = _held_out_rows(frame, mapping, toy_study)
    expected = _validation_scores(toy_study, data, bundle.params)
    np.testing.assert_array_equal(scores["score"].to_numpy()[rows], expected)
    assert scores["row"].tolist() == list(range(400))
    threshold = toy_study.validation.threshold
    assert (scores["flagged"] == (scores["score"] >= threshold)).all()


def test_a_site_fitted_study_needs_the_site_s_own_preprocessing(
    toy_study: Study, tmp_path: Path
) -> None:
    study = toy_study.replace(
        preprocessing={"scaling": "site"},
        schema={
            **toy_study.canonical()["schema"],
            "features": [
                {"name": "a"},
                {"name": "b", "missing": {"rule": "median"}},
                {"name": "c", "missing": {"rule": "median"}},
            ],
        },
    )
    bundle = load_bundle(_export(study, tmp_path))
    assert bundle.manifest.reference_preprocessing is None
    assert bundle.manifest.site_fitted == ["a", "b", "c"]
    with pytest.raises(BundleError, match=r"fits imputation or scaling at each site \(a, b, c\)"):
        preprocessing_for(bundle, None)
    frame = toy_frame(1, 300)
    mapping = toy_mapping("alpha")
    data = prepare_site_data(frame, mapping, study)
    kept = save_site_preprocessing(
        tmp_path / "state", "alpha", study.content_hash, data.preprocessor
    )
    prep = preprocessing_for(bundle, load_site_preprocessing(kept, bundle.manifest))
    scores, _ = score_table(bundle, frame, mapping, prep)
    rows = _held_out_rows(frame, mapping, study)
    np.testing.assert_array_equal(
        scores["score"].to_numpy()[rows], _validation_scores(study, data, bundle.params)
    )
    # Another study's fitted file is refused rather than silently applied.
    other = save_site_preprocessing(tmp_path / "other", "alpha", "0" * 64, data.preprocessor)
    with pytest.raises(BundleError, match="fitted for study 000000000000"):
        load_site_preprocessing(other, bundle.manifest)


@pytest.mark.parametrize("name", ["model.safetensors", "study.json", "release.json"])
def test_an_altered_release_file_is_refused(toy_study: Study, tmp_path: Path, name: str) -> None:
    folder = _export(toy_study, tmp_path)
    path = folder / name
    if name == "model.safetensors":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif name == "study.json":
        path.write_text(path.read_text().replace('"seed": 11', '"seed": 12'))
    else:
        path.write_text(path.read_text().replace('"threshold": 0.5', '"threshold": 0.01'))
    with pytest.raises(BundleError, match=r"does not match|not a valid"):
        load_bundle(folder)


def _predict_cli(
    folder: Path, frame: pd.DataFrame, tmp_path: Path, *extra: str
) -> tuple[Result, Path]:
    """Run `fedcare predict` on ``frame`` with alpha's mapping; the result and the out path."""
    data = tmp_path / "new.csv"
    frame.to_csv(data, index=False)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("site: alpha\nfeatures: {a: A, b: B, c: C}\nlabel: Y\n")
    out = tmp_path / "scores.csv"
    args = ["--release", str(folder), "--data", str(data), "--mapping", str(mapping)]
    return CliRunner().invoke(app, ["predict", *args, "--out", str(out), *extra]), out


def test_data_that_breaks_the_schema_is_refused_and_nothing_is_written(
    toy_study: Study, tmp_path: Path
) -> None:
    folder = _export(toy_study, tmp_path)
    frame = toy_frame(0, 50).astype(object)
    frame.loc[0, "A"] = "high"
    result, out = _predict_cli(folder, frame, tmp_path)
    assert result.exit_code == 2
    assert "column 'A': not a number: 'high'" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(DataValidationError):
        score_table(
            load_bundle(folder),
            frame,
            toy_mapping("alpha"),
            preprocessing_for(load_bundle(folder), None),
        )


def test_the_command_writes_scores_with_kept_columns_and_no_label_needed(
    toy_study: Study, tmp_path: Path
) -> None:
    folder = _export(toy_study, tmp_path)
    frame = toy_frame(2, 30).drop(columns=["Y"])
    frame.insert(0, "mrn", [f"P{i:03d}" for i in range(30)])
    result, out = _predict_cli(folder, frame, tmp_path, "--keep", "mrn")
    assert result.exit_code == 0, result.output
    assert "scored 30 rows" in result.output
    scores = pd.read_csv(out)
    assert list(scores.columns) == ["row", "mrn", "score", "flagged"]
    assert scores["mrn"].tolist() == frame["mrn"].tolist()
    assert ((scores["score"] > 0) & (scores["score"] < 1)).all()
