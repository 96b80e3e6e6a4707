"""The imaging cohort, the image-folder reader, the CNN and FedBN (issue 19, points 2-3)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data import imaging_study, imaging_study_path
from fedcare.data.imaging import ImagingSite, write_imaging_cohorts
from fedcare.federation.messages import Task, TaskHeader, decode_update, encode_task
from fedcare.models.builders import build_model, initial_parameters
from fedcare.models.params import norm_mask, state_names
from fedcare.models.size import study_parameter_count
from fedcare.schema.images import MANIFEST
from fedcare.schema.mapping import DataValidationError
from fedcare.schema.readers import read_table
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, StudyError
from fedcare.training.personal import local_positions

SMALL = ("northgate", "riverside", "kestrel-renal")


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[ImagingSite]:
    return write_imaging_cohorts(tmp_path_factory.mktemp("imaging"), seed=5, scale=0.25)


@pytest.fixture(scope="module")
def small_study() -> Study:
    study = imaging_study()
    return study.replace(
        rounds={"count": 3, "min_sites": 2},
        validation={**study.canonical()["validation"], "every": 3},
    )


@pytest.fixture(scope="module")
def sites(cohort: list[ImagingSite], small_study: Study) -> list[SiteDataset]:
    chosen = [c for c in cohort if c.name in SMALL]
    return [prepare_site_data(read_table(c.folder), c.mapping, small_study) for c in chosen]


def test_the_cohort_is_deterministic_for_a_seed(tmp_path: Path, cohort: list[ImagingSite]) -> None:
    again = write_imaging_cohorts(tmp_path / "again", seed=5, scale=0.25)
    other = write_imaging_cohorts(tmp_path / "other", seed=6, scale=0.25)
    for first, second, third in zip(cohort, again, other, strict=True):
        assert _tree_digest(first.folder) == _tree_digest(second.folder)
        assert _tree_digest(first.folder) != _tree_digest(third.folder)


def test_hospitals_differ_in_contrast_noise_resolution_and_prevalence(
    cohort: list[ImagingSite], small_study: Study
) -> None:
    data = {c.name: prepare_site_data(read_table(c.folder), c.mapping, small_study) for c in cohort}
    means = {name: float(d.x_train.mean()) for name, d in data.items()}
    assert max(means.values()) - min(means.values()) > 0.3  # contrast
    prevalence = {name: float(d.y_train.mean()) for name, d in data.items()}
    assert max(prevalence.values()) - min(prevalence.values()) > 0.15

    # Noise: the spread of pixel-to-pixel differences in the flat background corner.
    def roughness(name: str) -> float:
        corner = data[name].x_train[:, 0, :6, :6]
        return float(np.diff(corner, axis=2).std())

    assert roughness("fellside-cottage") > 2 * roughness("kestrel-renal")


def test_sites_read_their_image_folders_into_the_schema(sites: list[SiteDataset]) -> None:
    for site in sites:
        assert site.x_train.shape[1:] == (1, 64, 64)
        assert site.x_train.dtype == np.float32
        assert site.x_train.min() >= 0.0
        assert site.x_train.max() <= 1.0
        assert set(np.unique(site.y_train)) == {0.0, 1.0}
        assert set(site.test_frame["sex"]) <= {"F", "M"}


def _broken_folder(source: ImagingSite, folder: Path) -> Path:
    """A copy of a hospital's folder with one image of each kind of fault."""
    import shutil

    shutil.copytree(source.folder, folder)
    rows = list(csv.DictReader((folder / MANIFEST).open()))
    column = source.mapping.column("scan").column
    Image.fromarray(np.zeros((48, 48), np.uint8), mode="L").save(folder / rows[0][column])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8), mode="RGB").save(folder / rows[1][column])
    (folder / rows[2][column]).write_bytes(b"not a png")
    (folder / rows[3][column]).unlink()
    rows[4][column] = "../../etc/passwd"
    with (folder / MANIFEST).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_bad_images_are_refused_together_and_never_resized(
    cohort: list[ImagingSite], small_study: Study, tmp_path: Path
) -> None:
    site = cohort[0]
    folder = _broken_folder(site, tmp_path / "broken")
    with pytest.raises(DataValidationError) as caught:
        prepare_site_data(read_table(folder), site.mapping, small_study)
    text = str(caught.value)
    for reason in (
        "is 48x48 pixels, the schema's shape is 64x64",
        "not a single-channel 8-bit image (mode RGB)",
        "not a readable image",
        "no such image file",
        "not a path inside the image folder: '../../etc/passwd'",
    ):
        assert reason in text


def test_data_check_names_bad_images_in_one_report(
    cohort: list[ImagingSite], tmp_path: Path
) -> None:
    import yaml

    site = cohort[0]
    folder = _broken_folder(site, tmp_path / "broken")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(site.mapping.model_dump(mode="json")))
    result = CliRunner().invoke(
        app,
        [
            "data",
            "check",
            str(folder),
            "--study",
            str(imaging_study_path()),
            "--mapping",
            str(mapping),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "is 48x48 pixels" in result.output
    assert "Traceback" not in result.output


def test_image_paths_outside_a_folder_are_refused(
    cohort: list[ImagingSite], small_study: Study
) -> None:
    """A manifest read as a plain CSV has no folder its paths are relative to."""
    frame = read_table(cohort[0].folder / MANIFEST)
    with pytest.raises(DataValidationError, match="image paths need an image folder"):
        prepare_site_data(frame, cohort[0].mapping, small_study)


def test_the_schema_and_model_must_agree_on_images() -> None:
    study = imaging_study()
    with pytest.raises(StudyError, match="needs model kind 'cnn' or 'module'"):
        study.replace(model={"kind": "mlp", "hidden": [8]})
    dp = {"dp": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    with pytest.raises(StudyError, match="BatchNorm mixes the patients"):
        study.replace(privacy=dp, personalization=None)
    with pytest.raises(StudyError, match="a logistic_regression has none"):
        study.replace(
            model={"kind": "logistic_regression"},
            schema={"label": {"name": "y"}, "features": [{"name": "a"}]},
        )


def test_the_cnn_s_state_includes_batch_norm_statistics(small_study: Study) -> None:
    model = build_model(small_study.model, (1, 64, 64))
    names = state_names(model)
    assert {"1.running_mean", "1.running_var"} <= set(names)
    assert study_parameter_count(small_study) == len(
        initial_parameters(small_study.model, (1, 64, 64), 0)
    )
    mask = local_positions(small_study)
    assert mask.sum() == norm_mask(model, (type(model[1]),)).sum() == 4 * (8 + 16 + 32)


def _task(study: Study, number: int, params: np.ndarray) -> bytes:
    header = TaskHeader(study_hash=study.content_hash, round=number, seed=number, nonce="cd" * 16)
    return encode_task(Task(header=header, params=params.astype(np.float32)))


def test_fedbn_sends_nothing_of_the_normalisation_layers(
    small_study: Study, sites: list[SiteDataset]
) -> None:
    """The attack: read a site's normalisation layers (its scanner's statistics) from the
    updates it sends. Under FedBN every update is exactly zero there, round after round,
    while the site's own layers move; without FedBN (the control) they are sent."""
    assert small_study.personalization is not None
    plain = small_study.replace(personalization=None)
    n = study_parameter_count(small_study)
    mask = local_positions(small_study)
    params = initial_parameters(small_study.model, (1, 64, 64), small_study.seed)
    fedbn_worker = SiteWorker(small_study, sites[1], n)
    plain_worker = SiteWorker(plain, sites[1], n)
    for number in (1, 2):
        sent = decode_update(fedbn_worker.handle(_task(small_study, number, params)), n)
        control = decode_update(plain_worker.handle(_task(plain, number, params)), n)
        assert not sent.delta[mask].any()
        assert np.abs(control.delta[mask]).max() > 1e-3
        assert np.abs(sent.delta[~mask]).max() > 1e-4
        params = params + sent.delta
    personal = fedbn_worker.personal_model(params)
    assert personal is not None
    assert np.abs(personal[mask] - params[mask]).max() > 1e-2
    np.testing.assert_array_equal(personal[~mask], params[~mask])


def test_the_imaging_study_runs_in_a_simulation_with_fedbn(
    small_study: Study, sites: list[SiteDataset]
) -> None:
    result = run_simulation(small_study, sites, SimulationOptions(baselines=False))
    assert len(result.rounds) == 3
    for row in result.comparison:
        assert row.personalized is not None
        assert row.personalized_ci is not None
        assert row.personal_released is not None
    assert [r.state for r in result.releases]


def test_dp_trains_the_cnn_with_group_norm_through_opacus(
    small_study: Study, sites: list[SiteDataset]
) -> None:
    study = small_study.replace(
        model={"kind": "cnn", "channels": [4, 8], "norm": "group"},
        privacy={"dp": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        personalization=None,
        rounds={"count": 1, "min_sites": 2},
        validation={**small_study.canonical()["validation"], "every": 1},
    )
    result = run_simulation(study, sites[:2], SimulationOptions(baselines=False))
    assert result.rounds[0].status == "closed"


@pytest.mark.slow
def test_over_the_network_with_secure_aggregation_fedbn_layers_never_leave(
    tmp_path: Path, cohort: list[ImagingSite], small_study: Study, sites: list[SiteDataset]
) -> None:
    """The imaging study over mutual TLS between real processes, with SecAgg+ and FedBN.
    Every site ends with the in-process simulation's global model; the coordinator's
    global model still holds the initial normalisation layers (nothing of any site's
    reached it), while each site's personal model holds its own, validated and released
    or held at the site."""
    import json

    from fedcare.audit import read_entries
    from fedcare.federation.messages import decode_model
    from fedcare.simulation.loopback import (
        free_port,
        prepare_deployment,
    )
    from fedcare.simulation.runner import run_federation

    from .test_network import run_to_end

    study = small_study.replace(rounds={"count": 2, "min_sites": 3, "deadline_s": 240})
    assert study.secure_aggregation.enabled
    chosen = [c for c in cohort if c.name in SMALL]
    deployment = prepare_deployment(tmp_path, study, chosen, free_port())
    run_to_end(deployment, SMALL, timeout_s=400)
    n = study_parameter_count(study)
    mask = local_positions(study)
    initial = initial_parameters(study.model, (1, 64, 64), study.seed)
    reference = run_federation(study, sites).params
    for name in SMALL:
        state = deployment.site_configs[name].parent / "state"
        (global_file,) = state.glob("model-*.safetensors")
        (personal_file,) = state.glob("personal-*.safetensors")
        _, final, _ = decode_model(global_file.read_bytes(), n)
        _, personal, _ = decode_model(personal_file.read_bytes(), n)
        np.testing.assert_allclose(final, reference, atol=1e-5)
        np.testing.assert_array_equal(final[mask], initial[mask])
        assert np.abs(personal[mask] - initial[mask]).max() > 1e-2
        release = json.loads(next(state.glob("personal-*.json")).read_text())
        assert release["method"] == "fedbn"
        assert release["released"] is (not release["verdict"]["reasons"])
        assert release["personal"]["overall"]["n"] == release["global_model"]["overall"]["n"]
        events = [
            e
            for e in read_entries(deployment.site_configs[name].parent / "audit.jsonl")
            if e.event == "model.personalized"
        ]
        assert [e.details["released"] for e in events] == [release["released"]]


def test_the_site_fingerprint_covers_every_image(cohort: list[ImagingSite], tmp_path: Path) -> None:
    import shutil

    from fedcare.site.fingerprint import data_digest

    folder = tmp_path / "copy"
    shutil.copytree(cohort[0].folder, folder)
    before = data_digest(folder)
    assert data_digest(folder) == before
    scan = sorted((folder / "scans").iterdir())[0]
    pixels = np.asarray(Image.open(scan)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels, mode="L").save(scan)
    changed = data_digest(folder)
    assert changed != before
    scan.unlink()
    assert data_digest(folder) not in (before, changed)


def test_the_split_does_not_depend_on_where_the_folder_is(
    cohort: list[ImagingSite], small_study: Study, tmp_path: Path
) -> None:
    """Keyed on each scan's pixels, not its path: a moved folder, or a manifest whose
    files were renamed, splits the same patients the same way."""
    import shutil

    site = cohort[1]
    here = prepare_site_data(read_table(site.folder), site.mapping, small_study)
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(site.folder, moved)
    column = site.mapping.column("scan").column
    rows = list(csv.DictReader((moved / MANIFEST).open()))
    for row in rows:
        renamed = row[column].replace(".png", "-renamed.png")
        (moved / row[column]).rename(moved / renamed)
        row[column] = renamed
    with (moved / MANIFEST).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    there = prepare_site_data(read_table(moved), site.mapping, small_study)
    np.testing.assert_array_equal(here.x_test, there.x_test)
    np.testing.assert_array_equal(here.y_train, there.y_train)
