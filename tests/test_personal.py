"""Personalisation (issue 19, point 3; first part): finetune and Ditto at each site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcare.federation.messages import Task, TaskHeader, decode_update, encode_task
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, StudyError, parse_study
from fedcare.training.local import train_local
from fedcare.training.personal import personal_training, train_personal

from .conftest import TOY_STUDY


def _task(study: Study, round_number: int, params: np.ndarray) -> bytes:
    header = TaskHeader(
        study_hash=study.content_hash, round=round_number, seed=round_number, nonce="ab" * 16
    )
    return encode_task(Task(header=header, params=params.astype(np.float32)))


def test_the_updates_that_leave_are_the_same_with_and_without_ditto(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    """The attack a coordinator would make on a personal model: read it from what the
    site sends. Under Ditto the update is, value for value, the update without it, and
    the personal model (which differs from the global one) appears nowhere in it."""
    ditto = toy_study.replace(personalization={"method": "ditto", "epochs": 3, "lam": 0.01})
    n = toy_study.feature_schema.n_inputs + 1
    plain_worker = SiteWorker(toy_study, toy_sites[0], n)
    ditto_worker = SiteWorker(ditto, toy_sites[0], n)
    params = np.zeros(n, dtype=np.float32)
    for number in (1, 2, 3):
        sent_plain = decode_update(plain_worker.handle(_task(toy_study, number, params)), n)
        sent_ditto = decode_update(ditto_worker.handle(_task(ditto, number, params)), n)
        np.testing.assert_array_equal(sent_plain.delta, sent_ditto.delta)
        assert sent_ditto.header.model_dump().keys() == sent_plain.header.model_dump().keys()
        params = params + sent_plain.delta
    personal = ditto_worker.personal_model(params)
    assert personal is not None
    assert np.abs(personal - params).max() > 1e-3
    assert plain_worker.personal_model(params) is None


def test_ditto_is_pulled_towards_the_global_model(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    site = toy_sites[0]
    n = toy_study.feature_schema.n_inputs + 1
    start = np.zeros(n, dtype=np.float32)
    far = np.full(n, 3.0, dtype=np.float32)
    distances = []
    for lam in (0.001, 1.0, 10.0):
        study = toy_study.replace(personalization={"method": "ditto", "epochs": 2, "lam": lam})
        spec = study.personalization
        assert spec is not None
        personal = train_personal(
            study, spec, start, site.x_train, site.y_train, seed=1, anchor=far
        )
        distances.append(float(np.linalg.norm(personal - far)))
    assert distances[0] > distances[1] > distances[2]


def test_an_anchor_at_the_start_is_fedprox(toy_study: Study, toy_sites: list[SiteDataset]) -> None:
    site = toy_sites[1]
    n = toy_study.feature_schema.n_inputs + 1
    start = np.linspace(-1, 1, n).astype(np.float32)
    training = toy_study.training.model_copy(update={"proximal_mu": 0.5})
    default = train_local(toy_study.model, training, start, site.x_train, site.y_train, 3)
    anchored = train_local(
        toy_study.model, training, start, site.x_train, site.y_train, 3, anchor=start
    )
    np.testing.assert_array_equal(default.params, anchored.params)
    with pytest.raises(ValueError, match="parameter vector has shape"):
        train_local(
            toy_study.model, training, start, site.x_train, site.y_train, 3, anchor=start[:2]
        )


def test_finetune_uses_the_personalisation_epochs_and_no_pull(toy_study: Study) -> None:
    study = toy_study.replace(personalization={"method": "finetune", "epochs": 7})
    assert study.personalization is not None
    training = personal_training(study, study.personalization)
    assert (training.epochs, training.steps, training.proximal_mu) == (7, None, 0.0)


def test_the_simulation_reports_each_sites_personal_model(
    toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = toy_study.replace(personalization={"method": "finetune", "epochs": 5})
    result = run_simulation(study, toy_sites, SimulationOptions(baselines=True))
    for row in result.comparison:
        assert row.personalized is not None
        assert 0.0 <= row.personalized <= 1.0
    plain = run_simulation(toy_study, toy_sites, SimulationOptions(baselines=False))
    assert all(row.personalized is None for row in plain.comparison)


def test_an_unknown_method_is_refused_by_name() -> None:
    with pytest.raises(StudyError, match=r"personalization\.method"):
        parse_study(TOY_STUDY + "personalization: {method: fedprox}\n")
    with pytest.raises(StudyError, match="'fedbn' keeps normalisation layers at each site"):
        parse_study(TOY_STUDY + "personalization: {method: fedbn}\n")
    with pytest.raises(StudyError, match=r"personalization\.lam"):
        parse_study(TOY_STUDY + "personalization: {method: ditto, lam: 0}\n")


@pytest.mark.slow
def test_over_the_network_each_site_keeps_its_ditto_model_and_never_sends_it(
    tmp_path: Path,
) -> None:
    """Real coordinator and site processes over mutual TLS. Each site saves a personal
    model that differs from the global one; none of its bytes is anywhere in the
    coordinator's database, model files or audit trail."""
    from fedcare.audit import read_entries
    from fedcare.federation.messages import decode_model

    from .test_network import N_PARAMS, SITES, deploy, network_study, run_to_end

    study = network_study(
        rounds=2, min_sites=3, deadline_s=120, extra="personalization: {method: ditto, lam: 0.1}"
    )
    deployment = deploy(tmp_path, study)
    run_to_end(deployment)
    stored = [
        *deployment.folder.glob("coordinator.db*"),
        deployment.folder / "audit.jsonl",
        *(deployment.folder / "models").rglob("*"),
    ]
    coordinator_files = b"".join(f.read_bytes() for f in stored if f.is_file())
    for name in SITES:
        folder = deployment.site_configs[name].parent
        (global_file,) = (folder / "state").glob("model-*.safetensors")
        (personal_file,) = (folder / "state").glob("personal-*.safetensors")
        _, final, _ = decode_model(global_file.read_bytes(), N_PARAMS)
        header, personal, _ = decode_model(personal_file.read_bytes(), N_PARAMS)
        assert header.round == 2
        assert np.abs(personal - final).max() > 1e-4
        # The search can find a model: the global one is in the coordinator's files.
        assert final.tobytes() in coordinator_files
        assert personal.tobytes() not in coordinator_files
        assert personal[:2].tobytes() not in coordinator_files
        events = [
            e for e in read_entries(folder / "audit.jsonl") if e.event == "model.personalized"
        ]
        assert [e.details["method"] for e in events] == ["ditto"]
