"""The coordinator and site agents as real processes, over real sockets with mutual TLS."""

from __future__ import annotations

import json
import os
import signal
import ssl
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from fedcare.audit import read_entries, verify
from fedcare.cli import app
from fedcare.config import TlsFiles
from fedcare.data.synthetic import HospitalCohort
from fedcare.federation.messages import (
    SiteUpdate,
    TaskState,
    UpdateHeader,
    decode_model,
    decode_task,
    encode_update,
)
from fedcare.policy import load_policy, save_policy
from fedcare.provision import provision
from fedcare.releases.registry import ReleaseRegistry
from fedcare.simulation.loopback import (
    _Deployment,
    free_port,
    kill_and_restart_coordinator,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)
from fedcare.simulation.runner import run_federation
from fedcare.site.client import CoordinatorClient, CoordinatorError, tls_context
from fedcare.site.dataset import prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, parse_study
from fedcare.validation_spec import GateKind, GateSpec, Metric

from .conftest import toy_frame, toy_mapping

SITES = ("alpha", "beta", "gamma")
N_PARAMS = 5  # 3 features + 1 missing indicator + bias

pytestmark = pytest.mark.slow


def network_study(rounds: int, min_sites: int, deadline_s: float, extra: str = "") -> Study:
    return parse_study(f"""
name: network-toy
schema:
  label: {{name: y}}
  features:
    - {{name: a}}
    - {{name: b}}
    - {{name: c, missing: {{rule: median, indicator: true}}}}
training: {{epochs: 1, batch_size: 16, learning_rate: 0.1}}
rounds: {{count: {rounds}, min_sites: {min_sites}, deadline_s: {deadline_s}}}
disclosure: {{min_cohort_size: 11, coordinator_region: US}}
seed: 5
{extra}""")


def cohorts() -> list[HospitalCohort]:
    return [
        HospitalCohort(name, "toy", toy_frame(i, 160 + 40 * i, 0.2 * i), toy_mapping(name))
        for i, name in enumerate(SITES)
    ]


def deploy(folder: Path, study: Study, database: str | None = None) -> _Deployment:
    if database is None:
        return prepare_deployment(folder, study, cohorts(), free_port())
    return prepare_deployment(folder, study, cohorts(), free_port(), database)


def run_to_end(
    deployment: _Deployment, names: Sequence[str] = SITES, timeout_s: float = 300.0
) -> None:
    """Start the coordinator and every named site, wait until each site has finished the
    study (exit status 0, or fail with the tail of its log), and stop every process."""
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, names[0])
        sites = [start_site(deployment, name) for name in names]
        for proc in sites:
            assert proc.popen.wait(timeout=timeout_s) == 0, proc.log.read_text()[-3000:]
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)


def site_tls(deployment: _Deployment, site: str) -> TlsFiles:
    folder = deployment.site_configs[site].parent
    return TlsFiles(cert=folder / f"{site}.crt", key=folder / f"{site}.key", ca=folder / "ca.crt")


def client_for(deployment: _Deployment, site: str) -> CoordinatorClient:
    return CoordinatorClient(deployment.url, site_tls(deployment, site), poll_wait_s=2.0)


def workers(study: Study) -> dict[str, SiteWorker]:
    return {
        c.name: SiteWorker(study, prepare_site_data(c.frame, c.mapping, study), N_PARAMS)
        for c in cohorts()
    }


def reference_model(study: Study) -> np.ndarray:
    prepared = [prepare_site_data(c.frame, c.mapping, study) for c in cohorts()]
    return run_federation(study, prepared, workers=workers(study)).params


def play_round(deployment: _Deployment, study: Study, sites: tuple[str, ...]) -> int:
    """Act as ``sites`` for the open round, in this process; returns the round number."""
    local = workers(study)
    number = 0
    for site in sites:
        client = client_for(deployment, site)
        try:
            task = client.task(study.content_hash)
            assert task.state is TaskState.READY, f"{site} got {task.state}"
            number = task.round
            assert client.submit(study.content_hash, task.round, local[site].handle(task.payload))
        finally:
            client.close()
    return number


def check_in(deployment: _Deployment, study: Study) -> None:
    """Every site asks for work once: the first round opens when min_sites have."""
    for site in SITES:
        client = client_for(deployment, site)
        try:
            client.task(study.content_hash)
        finally:
            client.close()


def wait_for_round(deployment: _Deployment, study: Study, last_round: int, timeout: float = 60):
    client = client_for(deployment, SITES[0])
    try:
        until = time.monotonic() + timeout
        while True:
            status = client.status(study.content_hash)
            if status["last_round"] >= last_round:
                return status
            assert time.monotonic() < until, f"round {last_round} did not finish: {status}"
            time.sleep(0.2)
    finally:
        client.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Deployment, Study]]:
    """One coordinator for the input and identity checks; its rounds never close by deadline."""
    study = network_study(rounds=50, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path_factory.mktemp("live"), study)
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        yield deployment, study
    finally:
        stop(coordinator)


def raw_client(deployment: _Deployment, site: str) -> httpx.Client:
    return httpx.Client(
        base_url=deployment.url, verify=tls_context(site_tls(deployment, site)), timeout=30
    )


def test_site_without_certificate_is_refused_in_the_handshake(live) -> None:
    deployment, _ = live
    context = ssl.create_default_context(cafile=str(deployment.folder / "ca.crt"))
    with (
        httpx.Client(base_url=deployment.url, verify=context) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.get("/v1/health")


def test_certificate_from_another_ca_is_refused_in_the_handshake(live, tmp_path: Path) -> None:
    deployment, _ = live
    other = tmp_path / "other"
    provision("rogue", ["alpha"], other, port=9)
    rogue = ssl.create_default_context(cafile=str(deployment.folder / "ca.crt"))
    site = other / "sites" / "alpha"
    rogue.load_cert_chain(str(site / "alpha.crt"), str(site / "alpha.key"))
    with (
        httpx.Client(base_url=deployment.url, verify=rogue) as client,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        client.get("/v1/health")


def test_identity_comes_from_the_certificate(live) -> None:
    deployment, _ = live
    for site in SITES:
        client = client_for(deployment, site)
        try:
            assert client.whoami() == site
        finally:
            client.close()


def test_site_a_cannot_submit_as_site_b(live) -> None:
    deployment, study = live
    alpha = client_for(deployment, "alpha")
    try:
        task = alpha.task(study.content_hash)
        assert task.state is TaskState.READY
        forged = workers(study)["beta"].handle(task.payload)  # beta's update, sent by alpha
        with pytest.raises(CoordinatorError) as refused:
            alpha.submit(study.content_hash, task.round, forged)
        assert refused.value.status == 403
        assert "identifies site 'alpha'" in refused.value.detail
        assert "'beta'" in refused.value.detail
        status = alpha.status(study.content_hash)
        assert status["open_round"]["reported"] == []
    finally:
        alpha.close()


def test_site_a_cannot_withdraw_site_b_nor_say_more_than_a_category(live) -> None:
    deployment, study = live
    alpha = client_for(deployment, "alpha")
    try:
        for body, status, reason in [
            ({"site": "beta", "reason": "budget"}, 403, "claims to come from 'beta'"),
            ({"site": "alpha", "reason": "budget", "spent": 7.9}, 400, "not a withdrawal"),
            ({"site": "alpha", "reason": "my budget is 7.9 of 8"}, 400, "not a withdrawal"),
        ]:
            message = json.dumps({"study_hash": study.content_hash, **body}).encode()
            with pytest.raises(CoordinatorError) as refused:
                alpha.withdraw(study.content_hash, message)
            assert refused.value.status == status
            assert reason in refused.value.detail
        standings = alpha.status(study.content_hash)["standings"]
        assert [(s["site"], s["state"]) for s in standings] == [("alpha", "active")]
    finally:
        alpha.close()


def _update(study: Study, task_payload: bytes, site: str, delta: np.ndarray, **header) -> bytes:
    task = decode_task(task_payload, N_PARAMS)
    fields = {
        "study_hash": study.content_hash,
        "round": task.header.round,
        "site": site,
        "n_samples": 10,
        "loss": 0.5,
        **header,
    }
    return encode_update(SiteUpdate(UpdateHeader(**fields), delta.astype(np.float32)))


def _raw_header(header: bytes) -> bytes:
    """A safetensors envelope around an arbitrary header and no tensors."""
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"not a safetensors file at all", 400, "payload"),
        (b"", 400, "too short"),
        ("nan", 400, "NaN or infinite"),
        ("wrong-length", 400, "expected (5,)"),
        ("oversized", 413, "exceeds the limit"),
        ("wrong-round", 409, "update says round"),
        # Issue 21, point 2: one site claiming 2^62 (or 2^70, past any SQL integer)
        # records would outweigh every other site; the study bounds the claim.
        ("records-2^62", 409, "allows at most 1000000"),
        ("records-2^70", 409, "allows at most 1000000"),
        # Issue 21, point 5: a 4 KB header nested 2,000 deep was a 500 (RecursionError).
        ("nested-2000", 400, "nests 2001 levels deep"),
        ("header-array", 400, "payload"),
        ("header-1MiB", 400, "the limit is 1048576"),
    ],
)
def test_bad_payloads_get_a_clear_4xx(live, body, status: int, reason: str) -> None:
    deployment, study = live
    alpha = client_for(deployment, "alpha")
    try:
        task = alpha.task(study.content_hash)
        assert task.state is TaskState.READY
        if body == "nan":
            body = _update(study, task.payload, "alpha", np.array([0, np.nan, 0, 0, 0]))
        elif body == "wrong-length":
            body = _update(study, task.payload, "alpha", np.zeros(7))
        elif body == "oversized":
            body = b"\0" * (64 * 1024 * 1024 + 1)
        elif body == "wrong-round":
            body = _update(study, task.payload, "alpha", np.zeros(5), round=task.round + 1)
        elif isinstance(body, str) and body.startswith("records-2^"):
            huge = np.full(5, np.finfo(np.float32).max)
            body = _update(study, task.payload, "alpha", huge, n_samples=2 ** int(body[10:]))
        elif body == "nested-2000":
            body = _raw_header(b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}")
        elif body == "header-array":
            body = _raw_header(b"[]")
        elif body == "header-1MiB":
            body = _raw_header(b'{"a": "' + b"x" * (1024 * 1024) + b'"}')
        with pytest.raises(CoordinatorError) as refused:
            alpha.submit(study.content_hash, task.round, body)
        assert refused.value.status == status
        assert reason in refused.value.detail
        assert alpha.status(study.content_hash)["open_round"]["reported"] == []
    finally:
        alpha.close()


def test_unknown_study_and_bad_identifiers(live) -> None:
    deployment, study = live
    with raw_client(deployment, "alpha") as client:
        assert client.get(f"/v1/studies/{'0' * 64}").status_code == 404
        bad_hash = client.get("/v1/studies/not-a-hash/task")
        assert bad_hash.status_code == 422
        assert (
            client.post(
                f"/v1/studies/{study.content_hash}/rounds/0/update", content=b"x"
            ).status_code
            == 422
        )
        assert client.get("/openapi.json").status_code == 200


def test_duplicate_upload_is_not_counted_twice_and_replays_are_refused(live) -> None:
    deployment, study = live
    local = workers(study)
    first_round = 0
    for site in SITES:
        client = client_for(deployment, site)
        try:
            task = client.task(study.content_hash)
            first_round = task.round
            update = local[site].handle(task.payload)
            assert client.submit(study.content_hash, task.round, update) is True
            if site == "alpha":
                # A retried upload (the site never saw the reply) is harmless.
                assert client.submit(study.content_hash, task.round, update) is False
        finally:
            client.close()
    status = wait_for_round(deployment, study, first_round)
    history = {r["number"]: r for r in status["history"]}
    assert history[first_round]["participants"] == sorted(SITES)
    # Replaying the old round's update is refused now that the round is closed.
    alpha = client_for(deployment, "alpha")
    try:
        task = alpha.task(study.content_hash)
        replay = _update(study, task.payload, "alpha", np.zeros(5), round=first_round)
        with pytest.raises(CoordinatorError) as refused:
            alpha.submit(study.content_hash, first_round, replay)
        assert refused.value.status == 409
        assert "not open" in refused.value.detail
    finally:
        alpha.close()


def test_full_study_over_mutual_tls_matches_the_simulation(
    tmp_path: Path, database_url: str
) -> None:
    study = network_study(rounds=3, min_sites=3, deadline_s=120)
    deployment = deploy(tmp_path, study, database_url)
    run_to_end(deployment)
    expected = reference_model(study)
    for name in SITES:
        model_file = deployment.site_configs[name].parent / "state"
        (path,) = model_file.glob("model-*.safetensors")
        header, params, _ = decode_model(path.read_bytes(), N_PARAMS, ())
        assert header.round == 3
        np.testing.assert_allclose(params, expected, atol=1e-6)
    # Both sides' audit trails verify, and agree on every byte that left each site.
    coordinator_log = deployment.folder / "audit.jsonl"
    assert verify(coordinator_log).ok
    received = {
        (e.details["site"], e.details["round"]): e.details["sha256"]
        for e in read_entries(coordinator_log)
        if e.event == "update.received"
    }
    events = [e.event for e in read_entries(coordinator_log)]
    assert events.count("round.closed") == 3
    assert events[-1] == "study.finished"
    for name in SITES:
        site_log = deployment.site_configs[name].parent / "audit.jsonl"
        assert verify(site_log).ok
        entries = read_entries(site_log)
        assert [e.event for e in entries][:2] == ["study.approved", "study.admitted"]
        sent = {
            (name, e.details["round"]): e.details["sha256"]
            for e in entries
            if e.event == "update.sent"
        }
        assert len(sent) == 3
        assert all(received[key] == digest for key, digest in sent.items())
        assert entries[-1].event == "model.received"


def test_coordinator_killed_mid_round_resumes_without_loss_or_double_counting(
    tmp_path: Path, database_url: str
) -> None:
    study = network_study(rounds=3, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path, study, database_url)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        assert play_round(deployment, study, SITES) == 1
        wait_for_round(deployment, study, 1)
        # Round 2: one site reports, then the coordinator dies without warning.
        assert play_round(deployment, study, ("alpha",)) == 2
        kill_and_restart_coordinator(deployment, SITES[0])
        alpha = client_for(deployment, "alpha")
        try:
            status = alpha.status(study.content_hash)
            assert status["last_round"] == 1
            assert status["open_round"]["number"] == 2
            assert status["open_round"]["reported"] == ["alpha"]
            # alpha already reported round 2: it gets no task until round 3.
            assert alpha.task(study.content_hash).state is TaskState.WAIT
        finally:
            alpha.close()
        assert play_round(deployment, study, ("beta", "gamma")) == 2
        wait_for_round(deployment, study, 2)
        assert play_round(deployment, study, SITES) == 3
        wait_for_round(deployment, study, 3)
        gamma = client_for(deployment, "gamma")
        try:
            assert gamma.task(study.content_hash).state is TaskState.FINISHED
            header, params, _ = decode_model(gamma.model(study.content_hash), N_PARAMS, ())
        finally:
            gamma.close()
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    assert header.round == 3
    np.testing.assert_allclose(params, reference_model(study), atol=1e-6)


def test_site_killed_mid_study_round_closes_at_deadline_and_site_resumes(tmp_path: Path) -> None:
    # Rounds with every site take tens of milliseconds, so several can close between
    # seeing round 1 and the kill landing; enough rounds are left for two after it.
    # Only the rounds without gamma wait for the deadline, so the count costs little.
    study = network_study(rounds=30, min_sites=2, deadline_s=10)
    deployment = deploy(tmp_path, study)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        sites = {name: start_site(deployment, name) for name in SITES}
        wait_for_round(deployment, study, 1, timeout=120)
        gamma = sites["gamma"]
        os.killpg(gamma.popen.pid, signal.SIGKILL)
        gamma.popen.wait()
        # gamma may have finished another round before it died; the round after the
        # next one certainly opened without it.
        killed_at = wait_for_round(deployment, study, 1)["last_round"]
        assert killed_at + 2 <= study.rounds.count, killed_at
        status = wait_for_round(deployment, study, killed_at + 2, timeout=120)
        later = next(r for r in status["history"] if r["number"] == killed_at + 2)
        assert later["status"] == "closed", later
        assert later["participants"] == ["alpha", "beta"], later
        assert "closed without gamma" in later["reason"]
        # gamma comes back on a data file that lost rows meanwhile (an export re-run),
        # and finishes the study with the others: warned and audited, not silent.
        data = deployment.site_configs["gamma"].parent / "data.csv"
        lines = data.read_text().splitlines(keepends=True)
        data.write_text("".join(lines[:201]))
        restarted = start_site(deployment, "gamma")
        for proc in (sites["alpha"], sites["beta"], restarted):
            assert proc.popen.wait(timeout=180) == 0, proc.log.read_text()[-3000:]
        assert "240 -> 200 rows" in restarted.log.read_text()
        trail = read_entries(data.parent / "audit.jsonl")
        first = [e for e in trail if e.event == "data.fingerprint"]
        changed = [e for e in trail if e.event == "data.changed"]
        assert [e.details["rows"] for e in first] == [240]
        assert [(e.details["was"]["rows"], e.details["rows"]) for e in changed] == [(240, 200)]
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)


def test_mutated_uploads_never_cause_a_server_error(live) -> None:
    """Every byte-level corruption of a valid upload gets a 4xx, never a 5xx."""
    deployment, study = live
    rng = np.random.default_rng(0)
    with raw_client(deployment, "beta") as client:
        url = f"/v1/studies/{study.content_hash}/task"
        task = client.get(url)
        assert task.status_code == 200
        round_number = int(task.headers["X-Fedcare-Round"])
        valid = workers(study)["beta"].handle(task.content)
        submit = f"/v1/studies/{study.content_hash}/rounds/{round_number}/update"
        for trial in range(40):
            body = bytearray(valid)
            if trial % 3 == 0:
                body = body[: rng.integers(0, len(body))]
            else:
                for _ in range(rng.integers(1, 6)):
                    body[rng.integers(0, len(body))] = rng.integers(0, 256)
            response = client.post(submit, content=bytes(body))
            if response.status_code in (200, 201):
                # A flip inside the float data can still be a valid update; stop there.
                break
            assert 400 <= response.status_code < 500, (trial, response.status_code, response.text)
            assert response.json()["detail"]


VALIDATED = """
validation:
  every: 2
  n_bootstrap: 20
  gates: [{kind: overall, metric: auroc, op: ">=", threshold: 0.5}]
"""


def test_sites_validate_releases_and_the_registry_survives_a_restart(tmp_path: Path) -> None:
    study = network_study(rounds=3, min_sites=3, deadline_s=120, extra=VALIDATED)
    # Validation reports are metrics: the study must say so, and the sites' policies allow it.
    study = study.replace(
        disclosure={**study.canonical()["disclosure"], "artefacts": ["model_updates", "metrics"]}
    )
    deployment = deploy(tmp_path, study)
    # gamma's own policy demands more than the consortium does: it fails every release.
    policy_path = deployment.site_configs["gamma"].parent / "policy.yaml"
    strict = GateSpec(kind=GateKind.OVERALL, metric=Metric.AUROC, op=">=", threshold=0.999)
    save_policy(
        load_policy(policy_path).model_copy(update={"validation_gates": (strict,)}), policy_path
    )
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        sites = [start_site(deployment, name) for name in SITES]
        for proc in sites:
            assert proc.popen.wait(timeout=300) == 0, proc.log.read_text()[-3000:]
        # Restart the coordinator: the releases, verdicts and reports are all still there.
        coordinator = next(p for p in deployment.procs if p.name == "coordinator")
        stop(coordinator)
        deployment.procs.remove(coordinator)
        start_coordinator(deployment)
        wait_until_serving(deployment, SITES[0])
        path = f"/v1/studies/{study.content_hash}/releases"
        seen = {}
        for name in ("alpha", "gamma"):
            client = client_for(deployment, name)
            try:
                seen[name] = client.http.get(path).json()
                assert client.validation_task(study.content_hash) is None
            finally:
                client.close()
        operator = TlsFiles(
            cert=deployment.folder / "operator" / "operator.crt",
            key=deployment.folder / "operator" / "operator.key",
            ca=deployment.folder / "ca.crt",
        )
        with httpx.Client(base_url=deployment.url, verify=tls_context(operator)) as client:
            listed = client.get(path).json()
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    # The operator sees every verdict and the decision's reasons.
    assert [(r["round"], r["state"]) for r in listed] == [(2, "rejected"), (3, "rejected")]
    for release in listed:
        assert "site gamma: auroc" in release["reason"]
        assert "below 0.999 (site policy)" in release["reason"]
        assert "site alpha" not in release["reason"]
        assert [v["site"] for v in release["verdicts"]] == list(SITES)
    # Issue 21, point 3: a site sees the outcome and its own verdict, never another's.
    for name, releases in seen.items():
        assert [(r["round"], r["state"]) for r in releases] == [(2, "rejected"), (3, "rejected")]
        for release in releases:
            assert release["reason"] == ""
            (own,) = release["verdicts"]
            assert own["site"] == name
            assert own["passed"] is (name != "gamma")
            assert own["report"]["overall"]["n"] > 0  # its own numbers, in full
            text = json.dumps(release)
            others = [s for s in SITES if s != name]
            assert not any(other in text for other in others), text[:500]
    (gamma_release, _) = seen["gamma"]
    assert any("below 0.999 (site policy)" in r for r in gamma_release["verdicts"][0]["reasons"])
    database = f"sqlite:///{deployment.folder / 'coordinator.db'}"
    registry = ReleaseRegistry.open(database, deployment.folder / "models" / "releases")
    try:
        (first, second) = registry.releases(study.content_hash)
        assert {v.site for v in second.verdicts} == set(SITES)
        assert second.verdict_of("alpha").verdict.passed  # type: ignore[union-attr]
        assert not second.verdict_of("gamma").verdict.passed  # type: ignore[union-attr]
        assert second.parent is None  # nothing was promoted before it
        registry.model(first)  # the model file is intact and matches its checksum
    finally:
        registry.close()
    # The operator overrides on the coordinator's own database; the trail records it.
    config = str(deployment.folder / "coordinator.yaml")
    reason = "gamma's threshold is under review"
    done = CliRunner().invoke(
        app, ["release", "promote", "--config", config, "2", "--by", "Ops", "--reason", reason]
    )
    assert done.exit_code == 0, done.output
    assert verify(deployment.folder / "audit.jsonl").ok
    override = read_entries(deployment.folder / "audit.jsonl")[-1]
    assert override.event == "release.override"
    assert override.details["by"] == "Ops"
    assert override.details["reason"] == reason
    events = [e.event for e in read_entries(deployment.folder / "audit.jsonl")]
    assert events.count("release.candidate") == 2
    assert events.count("release.verdict") == 6
    assert events.count("release.rejected") == 2
    for name in SITES:
        site_events = [
            e.event for e in read_entries(deployment.site_configs[name].parent / "audit.jsonl")
        ]
        assert site_events.count("validation.sent") == 2
        assert site_events[-1] == "model.received"


def test_dp_study_over_the_network_site_refuses_when_its_budget_is_spent(
    tmp_path: Path,
) -> None:
    """gamma's policy allows one DP round: it sends round 1, refuses round 2 (recorded in
    its audit trail, nothing sent), and the study finishes with alpha and beta."""
    from fedcare.policy import DatasetBudget, load_policy, save_policy
    from fedcare.privacy.dp.accountant import epsilon
    from fedcare.privacy.dp.ledger import Budget, PrivacyLedger
    from fedcare.privacy.dp.plan import plan_site

    base = network_study(rounds=3, min_sites=2, deadline_s=4)
    # DP-safe preprocessing: no scaling and a declared fill value, nothing fitted on rows.
    schema = base.canonical()["schema"]
    for feature in schema["features"]:
        if feature["missing"]["rule"] == "median":
            feature["missing"] = {"rule": "value", "fill": 0.0, "indicator": True}
    study = base.replace(
        schema=schema,
        preprocessing={"scaling": "none"},
        privacy={"dp": True, "noise_multiplier": 1.0, "delta": 1e-4},
    )
    deployment = deploy(tmp_path, study)
    gamma = next(c for c in cohorts() if c.name == "gamma")
    plan = plan_site(study, prepare_site_data(gamma.frame, gamma.mapping, study).n_train)
    one, two = (epsilon([*plan.count, *[plan.round_mechanism] * k], 1e-4) for k in (1, 2))
    for name in SITES:
        policy_path = deployment.site_configs[name].parent / "policy.yaml"
        policy = load_policy(policy_path)
        allowed = (one + two) / 2 if name == "gamma" else 100.0
        budget = {"data": DatasetBudget(epsilon=allowed, delta=1e-4)}
        save_policy(policy.model_copy(update={"privacy_budget": budget}), policy_path)
    run_to_end(deployment)
    received = [
        (e.details["site"], e.details["round"])
        for e in read_entries(deployment.folder / "audit.jsonl")
        if e.event == "update.received"
    ]
    assert sorted(r for s, r in received if s == "gamma") == [1]
    assert sorted(r for s, r in received if s == "alpha") == [1, 2, 3]
    # gamma told the coordinator, by category only, and the study stopped waiting for it.
    withdrawn = [
        e.details
        for e in read_entries(deployment.folder / "audit.jsonl")
        if e.event == "site.withdrawn"
    ]
    assert withdrawn == [{"study": study.content_hash, "site": "gamma", "reason": "budget"}]
    gamma_dir = deployment.site_configs["gamma"].parent
    events = [(e.event, e.details.get("round")) for e in read_entries(gamma_dir / "audit.jsonl")]
    assert ("update.sent", 1) in events
    assert ("update.refused", 2) in events
    assert ("study.withdrawn", None) in events
    assert ("update.sent", 2) not in events
    assert events[-1][0] == "model.received"
    ledger = PrivacyLedger(gamma_dir / "state" / "privacy-ledger.sqlite")
    assert ledger.mechanisms("data") == [*plan.count, plan.round_mechanism]
    assert ledger.spent("data", Budget((one + two) / 2, 1e-4)) <= (one + two) / 2


def test_sigterm_stops_the_coordinator_quickly_without_tracebacks_for_open_long_polls_and_streams(
    tmp_path: Path,
) -> None:
    # Reported: on SIGTERM the coordinator logged a traceback per open long-poll and
    # took about 20 s (the longest poll) to stop.
    import threading

    study = network_study(rounds=2, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path, study)
    coordinator = start_coordinator(deployment)
    answers: list[int] = []
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        assert play_round(deployment, study, ("alpha",)) == 1  # alpha now waits for round 2

        def poll() -> None:
            with raw_client(deployment, "alpha") as client:
                reply = client.get(f"/v1/studies/{study.content_hash}/task", params={"wait": 20})
                answers.append(reply.status_code)

        def watch() -> None:
            # The operator's dashboard holds an event stream open; it ends on SIGTERM too.
            operator = deployment.folder / "operator"
            context = ssl.create_default_context(cafile=str(operator / "ca.crt"))
            context.load_cert_chain(operator / "operator.crt", operator / "operator.key")
            with (
                httpx.Client(base_url=deployment.url, verify=context, timeout=30) as client,
                client.stream("GET", "/ui/events") as stream,
            ):
                events.extend(line for line in stream.iter_lines() if line.startswith("event:"))
            events.append("ended")

        events: list[str] = []
        pollers = [threading.Thread(target=poll) for _ in range(3)]
        pollers.append(threading.Thread(target=watch))
        for thread in pollers:
            thread.start()
        time.sleep(1.0)  # the polls are open on the server
        started = time.monotonic()
        os.killpg(coordinator.popen.pid, signal.SIGTERM)
        coordinator.popen.wait(timeout=15)
        stopped_in = time.monotonic() - started
        for thread in pollers:
            thread.join(timeout=15)
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    log = coordinator.log.read_text()
    assert "Traceback" not in log
    # uvicorn re-raises the signal once it has shut down cleanly, so the parent sees it.
    assert coordinator.popen.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in log
    assert answers == [204, 204, 204]  # each poll told to come back, none cut off
    assert events[0] == "event: state"
    assert events[-1] == "ended"
    assert stopped_in < 10.0, f"took {stopped_in:.1f} s to stop with open long-polls"


def test_a_site_whose_data_no_longer_fits_withdraws_and_the_study_goes_on(
    tmp_path: Path,
) -> None:
    """gamma's new extract breaks the schema: its agent says so to the coordinator (the
    category only) and stops with the data error; alpha and beta finish without waiting
    out gamma's 600 s deadline."""
    import pandas as pd

    study = network_study(rounds=2, min_sites=2, deadline_s=600)
    deployment = deploy(tmp_path, study)
    data = deployment.site_configs["gamma"].parent / "data.csv"
    frame = pd.read_csv(data)
    frame.loc[0, "Y"] = 7
    frame.to_csv(data, index=False)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        gamma = start_site(deployment, "gamma")
        assert gamma.popen.wait(timeout=120) == 2
        log = gamma.log.read_text()
        assert "does not fit study" in log
        assert "told the coordinator this site withdraws" in log
        others = [start_site(deployment, name) for name in ("alpha", "beta")]
        for proc in others:
            assert proc.popen.wait(timeout=120) == 0, proc.log.read_text()[-3000:]
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    entries = read_entries(deployment.folder / "audit.jsonl")
    withdrawn = [e.details for e in entries if e.event == "site.withdrawn"]
    assert withdrawn == [{"study": study.content_hash, "site": "gamma", "reason": "data"}]
    opened = [e.details["selected"] for e in entries if e.event == "round.opened"]
    assert opened == [["alpha", "beta"], ["alpha", "beta"]]


def test_a_second_coordinator_on_the_same_database_refuses_the_study(
    tmp_path: Path, database_url: str
) -> None:
    import subprocess
    import sys

    from fedcare.config import CoordinatorConfig, load_config, write_config

    study = network_study(rounds=2, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path, study, database_url)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        config = load_config(deployment.coordinator_config, CoordinatorConfig)
        second = deployment.folder / "second.yaml"
        write_config(
            config.model_copy(
                update={"port": free_port(), "audit_log": deployment.folder / "second.jsonl"}
            ),
            second,
        )
        refused = subprocess.run(
            [sys.executable, "-m", "fedcare", "coordinator", "serve", "--config", str(second)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert refused.returncode != 0
        assert "already served by another coordinator" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        # The first one was not disturbed: its study goes on.
        check_in(deployment, study)
        assert play_round(deployment, study, SITES) == 1
        wait_for_round(deployment, study, 1)
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
        deployment.procs.clear()
    # Once the first has stopped, the study may be served again from the same database.
    restarted = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
    finally:
        stop(restarted)


def test_studies_on_one_coordinator_are_kept_apart(tmp_path: Path) -> None:
    import yaml

    from fedcare.config import CoordinatorConfig, StudyMembership, load_config, write_config

    first = network_study(rounds=2, min_sites=3, deadline_s=3600)
    second = network_study(rounds=2, min_sites=2, deadline_s=3600).replace(name="toy-two")
    deployment = deploy(tmp_path, first)
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(second.canonical()), encoding="utf-8")
    config = load_config(deployment.coordinator_config, CoordinatorConfig)
    studies = [
        *config.studies,
        StudyMembership(file=tmp_path / "second.yaml", sites=["alpha", "beta"]),
    ]
    write_config(config.model_copy(update={"studies": studies}), deployment.coordinator_config)
    coordinator = start_coordinator(deployment)
    h = second.content_hash
    try:
        wait_until_serving(deployment, SITES[0])
        with raw_client(deployment, "gamma") as gamma:
            listed = [s["study_hash"] for s in gamma.get("/v1/studies").json()]
            assert listed == [first.content_hash]
            for path in (
                f"/v1/studies/{h}",
                f"/v1/studies/{h}/task",
                f"/v1/studies/{h}/model",
                f"/v1/studies/{h}/releases",
                f"/v1/studies/{h}/validation",
                f"/v1/studies/{h}/rounds/1/secagg/advertise",
            ):
                answer = gamma.get(path)
                assert answer.status_code == 404, (path, answer.status_code)
            assert gamma.post(f"/v1/studies/{h}/rounds/1/update", content=b"x").status_code == 404
            assert gamma.post(f"/v1/studies/{h}/drift", content=b"{}").status_code == 404
            assert gamma.get(f"/ui/studies/{h}/plots/rounds.svg").status_code == 404
            shown = gamma.get("/ui/state").json()["studies"]
            assert [s["study_hash"] for s in shown] == [first.content_hash]
        with raw_client(deployment, "alpha") as alpha:
            assert alpha.get(f"/v1/studies/{h}/task").status_code in (200, 204)
            listed = sorted(s["study_hash"] for s in alpha.get("/v1/studies").json())
            assert listed == sorted([first.content_hash, h])
    finally:
        stop(coordinator)
