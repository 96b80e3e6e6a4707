"""One engine: the same scripted study, simulated and over the network, round for round.

Each scenario runs twice: in process (the study service over in-memory state, every
site's Participant calling it directly, the clock jumping to deadlines) and over the
network (``fedcare coordinator serve`` as a real process on SQL state, each site's
Participant in a thread of this process talking HTTPS with mutual TLS). Every
round's status, selection, participants and reason must agree, and so must the final
model where no secret noise is drawn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedcare.config import SiteConfig, load_config
from fedcare.data.synthetic import HospitalCohort
from fedcare.federation.state import StoredRound
from fedcare.federation.state.sql import SqlState
from fedcare.privacy.dp.accountant import epsilon
from fedcare.privacy.dp.budget import Budget
from fedcare.privacy.dp.guard import PrivacyGuard
from fedcare.privacy.dp.ledger import PrivacyLedger
from fedcare.privacy.dp.plan import plan_site
from fedcare.simulation.inprocess import SiteGoneError, run_in_process
from fedcare.simulation.loopback import (
    free_port,
    prepare_deployment,
    start_coordinator,
    stop,
    wait_until_serving,
)
from fedcare.site.client import CoordinatorClient
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.site.participant import CoordinatorLink, Participant, Step
from fedcare.site.secagg import secure_site
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, parse_study

from .conftest import DropBefore, toy_frame, toy_mapping

pytestmark = pytest.mark.slow

Wrap = Callable[[str, CoordinatorLink], CoordinatorLink]


def _study(extra: str) -> Study:
    return parse_study(f"""
name: one-engine
schema:
  label: {{name: y}}
  features:
    - {{name: a, reference: [0, 1]}}
    - {{name: b, reference: [0, 1]}}
    - {{name: c, reference: [0, 1], missing: {{rule: value, fill: 0, indicator: true}}}}
training: {{epochs: 1, batch_size: 16, learning_rate: 0.1}}
preprocessing: {{scaling: reference}}
disclosure: {{min_cohort_size: 11, coordinator_region: US}}
seed: 5
{extra}""")


def _cohorts(names: list[str]) -> list[HospitalCohort]:
    return [
        HospitalCohort(name, "toy", toy_frame(i, 160 + 40 * i, 0.2 * i), toy_mapping(name))
        for i, name in enumerate(names)
    ]


def _datasets(study: Study, cohorts: list[HospitalCohort]) -> dict[str, SiteDataset]:
    return {c.name: prepare_site_data(c.frame, c.mapping, study) for c in cohorts}


Workers = Callable[[Path], dict[str, SiteWorker]]


def _outcomes(rounds: list[StoredRound]) -> list[tuple[object, ...]]:
    return [
        (r.number, r.status, r.selected, r.participants, r.reason)
        for r in rounds
        if r.closed_at is not None
    ]


def _simulate(study: Study, workers: dict[str, SiteWorker], silent: set[str], wrap: Wrap):
    service = run_in_process(study, workers, frozenset(silent), wrap=wrap)  # type: ignore[arg-type]
    return _outcomes(service.state.rounds(study.content_hash)), service.halted, service


def _network(
    tmp_path: Path,
    study: Study,
    cohorts: list[HospitalCohort],
    workers: dict[str, SiteWorker],
    silent: set[str],
    wrap: Wrap,
) -> tuple[list[tuple[object, ...]], str, np.ndarray]:
    deployment = prepare_deployment(tmp_path, study, cohorts, free_port())
    coordinator = start_coordinator(deployment)
    stop_sites = threading.Event()
    errors: list[BaseException] = []
    clients: list[CoordinatorClient] = []

    def run(name: str) -> None:
        config = load_config(deployment.site_configs[name], SiteConfig)
        client = CoordinatorClient(deployment.url, config.tls, poll_wait_s=1.0)
        clients.append(client)
        secure = None
        if study.secure_aggregation.enabled:
            from fedcare.site.secagg import MemorySessionRecord

            secure = secure_site(config, workers[name], MemorySessionRecord())
        participant = Participant(workers[name], wrap(name, client), secure=secure)
        try:
            while not stop_sites.is_set():
                if participant.step() is Step.FINISHED:
                    return
        except SiteGoneError:
            return
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    threads = []
    try:
        wait_until_serving(deployment, cohorts[0].name)
        for cohort in cohorts:
            if cohort.name not in silent:
                thread = threading.Thread(target=run, args=(cohort.name,), daemon=True)
                thread.start()
                threads.append(thread)
        state = SqlState(f"sqlite:///{tmp_path / 'coordinator.db'}", tmp_path / "models")
        until = time.monotonic() + 240
        halted = ""
        while time.monotonic() < until and not errors:
            if all(not t.is_alive() for t in threads):
                break
            statuses = [c.status(study.content_hash) for c in clients[:1]]
            if statuses and statuses[0]["status"].startswith("halted: "):
                halted = statuses[0]["status"].removeprefix("halted: ")
                break
            time.sleep(0.5)
        assert not errors, errors
        outcomes = _outcomes(state.rounds(study.content_hash))
        model = state.latest_model(study.content_hash)
        state.close()
    finally:
        stop_sites.set()
        for thread in threads:
            thread.join(timeout=30)
        for client in clients:
            client.close()
        stop(coordinator)
    from fedcare.federation.messages import decode_model

    assert model is not None
    _, params, _ = decode_model(model.data, workers[cohorts[0].name].n_params, ())
    return outcomes, halted, params


def _guarded_workers(
    study: Study, datasets: dict[str, SiteDataset], folder: Path, budgets: dict[str, float]
) -> dict[str, SiteWorker]:
    folder.mkdir(parents=True, exist_ok=True)
    n_params = study.feature_schema.n_inputs + 1
    workers = {}
    for name, data in datasets.items():
        ledger = PrivacyLedger(folder / f"{name}.sqlite")
        guard = PrivacyGuard(ledger, "icu", Budget(budgets.get(name, 1000.0), 1e-4))
        workers[name] = SiteWorker(study, data, n_params, privacy=guard)
    return workers


def test_extensions_a_silent_site_and_a_refusing_site_go_the_same_way(tmp_path: Path) -> None:
    """delta never answers; gamma's budget affords one round. Round 1 closes at its deadline
    without delta. In round 2 gamma refuses and withdraws, alpha and beta are too few
    while delta may still answer: the round is extended once, then fails. delta has
    missed two rounds and is inactive; two active sites are fewer than min_sites, and
    the study halts."""
    names = ["alpha", "beta", "gamma", "delta"]
    study = _study(
        "rounds: {count: 4, min_sites: 3, deadline_s: 4, extensions: 1, inactive_after: 2}\n"
        "privacy: {dp: true, epsilon: 6, delta: 1.0e-4, max_grad_norm: 1.0}"
    )
    cohorts = _cohorts(names)
    datasets = _datasets(study, cohorts)
    plan = plan_site(study, datasets["gamma"].n_train)
    one, two = (epsilon([*plan.count, *[plan.round_mechanism] * k], 1e-4) for k in (1, 2))
    budgets = {"gamma": (one + two) / 2}

    def same(name: str, link: CoordinatorLink) -> CoordinatorLink:
        return link

    simulated, sim_halted, _ = _simulate(
        study, _guarded_workers(study, datasets, tmp_path / "sim", budgets), {"delta"}, same
    )
    networked, net_halted, _ = _network(
        tmp_path / "net",
        study,
        cohorts,
        _guarded_workers(study, datasets, tmp_path / "net-ledgers", budgets),
        {"delta"},
        same,
    )
    assert simulated == networked
    assert [(r[0], r[1], r[3]) for r in simulated] == [
        (1, "closed", ("alpha", "beta", "gamma")),
        (2, "failed", ("alpha", "beta")),
    ]
    assert "only 2 of 4 site(s) reported by the deadline" in str(simulated[1][4])
    assert sim_halted == net_halted
    assert "only 2 active site(s)" in sim_halted


def test_a_secure_round_with_a_dropout_goes_the_same_way(tmp_path: Path) -> None:
    """beta loses power before masking in round 2: the others' shares remove its masks
    and the round closes with alpha and gamma; in round 3 it is silent from the start.
    Without DP nothing secret is drawn, so the final models agree to the bit."""
    names = ["alpha", "beta", "gamma"]
    study = _study(
        "rounds: {count: 3, min_sites: 2, deadline_s: 4}\n"
        "secure_aggregation: {enabled: true, clip_norm: 10.0, max_sites: 10, max_records: 1000}"
    )
    cohorts = _cohorts(names)
    datasets = _datasets(study, cohorts)
    n_params = study.feature_schema.n_inputs + 1

    def workers() -> dict[str, SiteWorker]:
        return {n: SiteWorker(study, d, n_params) for n, d in datasets.items()}

    def drop_beta(name: str, link: CoordinatorLink) -> CoordinatorLink:
        return DropBefore(link, "masked", from_round=2) if name == "beta" else link  # type: ignore[return-value]

    simulated, _, service = _simulate(study, workers(), set(), drop_beta)
    networked, _, params = _network(tmp_path, study, cohorts, workers(), set(), drop_beta)
    assert simulated == networked
    assert [(r[0], r[1], r[3]) for r in simulated] == [
        (1, "closed", ("alpha", "beta", "gamma")),
        (2, "closed", ("alpha", "gamma")),
        (3, "closed", ("alpha", "gamma")),
    ]
    np.testing.assert_array_equal(params, service.federation.params)
