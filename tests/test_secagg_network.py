"""Secure aggregation between real processes: the coordinator never sees an update.

The coordinator runs as its own process; the three site agents run in this
process (in threads) so that every request body they send, which is everything
the coordinator receives, can be recorded. Afterwards the coordinator's
database, files, log and those bodies are searched for each site's update in
every form it takes before masking.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedcare.aggregation import make_server_optimizer
from fedcare.audit import read_entries
from fedcare.config import SiteConfig, load_config
from fedcare.federation.messages import (
    SiteUpdate,
    Task,
    TaskHeader,
    decode_model,
    encode_task,
    encode_update,
)
from fedcare.ids import derive_seed
from fedcare.models.builders import initial_parameters
from fedcare.privacy.secagg.quantize import clip_l2, encode, quantize_weight
from fedcare.privacy.secagg.study import quantization_for, site_weight
from fedcare.simulation.loopback import start_coordinator, stop, wait_until_serving
from fedcare.site.agent import run_site
from fedcare.study import Study

from .test_network import (
    N_PARAMS,
    SITES,
    client_for,
    deploy,
    network_study,
    reference_model,
    workers,
)

pytestmark = pytest.mark.slow
ROUNDS = 2


def secure_study(participation: str = "sync") -> Study:
    secure = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}
    study = network_study(rounds=ROUNDS, min_sites=3, deadline_s=120).replace(
        secure_aggregation=secure
    )
    if participation == "async":
        # Every flush among all three sites: the same sums as the synchronous rounds,
        # through the ready-and-join path.
        study = study.replace(participation={"mode": "async", "buffer": 3, "max_staleness": 2})
    return study


def _windows(data: bytes, width: int = 8) -> set[bytes]:
    return {data[i : i + width] for i in range(0, len(data) - width + 1, 4)}


def _needles(study: Study, deployment_models: Path) -> tuple[dict[str, set[bytes]], list]:
    """Every site's update of every round, as raw float32/float64, quantised, and as text."""
    state_names = make_server_optimizer(study.aggregation).state_names
    params = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    local = workers(study)
    plan = quantization_for(study)
    needles: dict[str, set[bytes]] = {}
    updates: list[SiteUpdate] = []
    for number in range(1, ROUNDS + 1):
        header = TaskHeader(
            study_hash=study.content_hash,
            round=number,
            seed=derive_seed(study.seed, "round", number),
            nonce="0" * 32,
        )
        task = encode_task(Task(header=header, params=params))
        weighted = np.zeros(N_PARAMS)
        weight_sum = 0.0
        for site in SITES:
            _, update = local[site].train(task)
            updates.append(update)
            delta = update.delta
            weight = site_weight(study, update.header.n_samples)
            rng = np.random.default_rng(derive_seed(header.seed, site, "secagg-rounding"))
            quantised = encode(delta, weight, plan, rng)
            forms = (
                _windows(delta.astype("<f4").tobytes())
                | _windows(delta.astype("<f8").tobytes())
                | _windows(quantised[:-1].tobytes())
                | {f"{v:.6g}".encode() for v in delta.tolist() if abs(v) > 1e-4}
            )
            needles[f"{site} round {number}"] = forms
            w = quantize_weight(weight, plan) / plan.weight_scale
            weighted += w * clip_l2(delta, plan.clip_norm)
            weight_sum += w
        (model_file,) = deployment_models.rglob(f"round-{number:05d}.safetensors")
        _, after, _ = decode_model(model_file.read_bytes(), N_PARAMS, state_names)
        # These are the updates the sites really sent: FedAvg moved the model by their mean.
        np.testing.assert_allclose(after - params, weighted / weight_sum, atol=1e-5)
        params = after
    return needles, updates


def _found(haystack: bytes, needles: dict[str, set[bytes]]) -> list[str]:
    return [name for name, forms in needles.items() if any(f in haystack for f in forms)]


@pytest.mark.parametrize("participation", ["sync", "async"])
def test_coordinator_never_holds_an_individual_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, participation: str
) -> None:
    study = secure_study(participation)
    deployment = deploy(tmp_path, study)
    bodies: list[bytes] = []
    lock = threading.Lock()
    original = httpx.Client

    def record(request: httpx.Request) -> None:
        with lock:
            bodies.append(request.url.raw_path + b"\n" + request.read())

    class RecordingClient(original):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["event_hooks"] = {"request": [record]}
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(httpx, "Client", RecordingClient)
    coordinator = start_coordinator(deployment)
    errors: list[BaseException] = []

    def run(site: str) -> None:
        try:
            run_site(load_config(deployment.site_configs[site], SiteConfig))
        except BaseException as exc:  # reported below, with the coordinator's log
            errors.append(exc)

    try:
        wait_until_serving(deployment, SITES[0])
        threads = [threading.Thread(target=run, args=(s,)) for s in SITES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert not errors, f"{errors}\n{coordinator.log.read_text()[-3000:]}"
        # A plain upload is refused before it is read, even now.
        alpha = client_for(deployment, "alpha")
        try:
            response = alpha.http.post(
                f"/v1/studies/{study.content_hash}/rounds/1/update", content=b"x" * 64
            )
            assert response.status_code == 403
            assert "secure aggregation" in response.json()["detail"]
        finally:
            alpha.close()
    finally:
        stop(coordinator)

    folder = deployment.folder
    needles, updates = _needles(study, folder / "models")
    # The network's secure rounds give exactly the simulation's model.
    (last,) = (folder / "models").rglob(f"round-{ROUNDS:05d}.safetensors")
    state_names = make_server_optimizer(study.aggregation).state_names
    _, final, _ = decode_model(last.read_bytes(), N_PARAMS, state_names)
    np.testing.assert_array_equal(final, reference_model(study))
    # The search works: a plain upload of any of these updates would be found.
    assert all(_found(encode_update(u), needles) for u in updates)
    assert len(bodies) > 10
    assert any(b"/secagg/masked" in b for b in bodies)
    assert any(b"/ready" in b for b in bodies) == (participation == "async")
    for body in bodies:
        assert _found(body, needles) == [], body[:200]
    coordinator_files = [
        p for p in folder.rglob("*") if p.is_file() and "sites" not in p.relative_to(folder).parts
    ]
    assert folder / "coordinator.db" in coordinator_files
    assert folder / "coordinator.log" in coordinator_files
    for path in coordinator_files:
        assert _found(path.read_bytes(), needles) == [], path
    with sqlite3.connect(folder / "coordinator.db") as db:
        assert db.execute("select count(*) from submissions").fetchone() == (0,)
        statuses = db.execute("select status from rounds order by number").fetchall()
        spans = db.execute("select closed_at - opened_at from rounds order by number").fetchall()
    assert statuses == [("closed",)] * ROUNDS
    # Posts bring back the next stage's relay, so fetches are the exception; and no post
    # is held for its whole wait (the last stage's would stall every next round by 20 s).
    posts = [b for b in bodies if b"/secagg/" in b.split(b"\n", 1)[0] and b.split(b"\n", 1)[1]]
    fetches = [
        b for b in bodies if b"/secagg/" in b.split(b"\n", 1)[0] and not b.split(b"\n", 1)[1]
    ]
    assert len(fetches) < len(posts) / 2, (len(fetches), len(posts))
    assert max(span for (span,) in spans[1:]) < 10.0, spans
    events = [e.event for e in read_entries(folder / "audit.jsonl")]
    assert "update.received" not in events
    assert events.count("round.closed") == ROUNDS
    # Each site's own trail records what it sent: masked inputs only.
    for site in SITES:
        sent = [
            e
            for e in read_entries(deployment.site_configs[site].parent / "audit.jsonl")
            if e.event == "update.sent"
        ]
        assert len(sent) == ROUNDS
        assert all("masked" in e.details["to"] for e in sent)


def test_a_site_joins_a_running_secure_study_at_a_round_boundary(tmp_path: Path) -> None:
    import time

    count = 20

    from fedcare.audit import AuditLog
    from fedcare.config import CoordinatorConfig, StudyMembership, write_config
    from fedcare.federation.service import add_site
    from fedcare.federation.state.sql import SqlState
    from fedcare.simulation.loopback import start_site

    study = secure_study().replace(
        rounds={"count": count, "min_sites": 2, "deadline_s": 120, "open_enrolment": True}
    )
    deployment = deploy(tmp_path, study)
    config = load_config(deployment.coordinator_config, CoordinatorConfig)
    first = [StudyMembership(file=config.studies[0].file, sites=["alpha", "beta"])]
    write_config(config.model_copy(update={"studies": first}), deployment.coordinator_config)
    database = f"sqlite:///{tmp_path / 'coordinator.db'}"
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, "alpha")
        pair = [start_site(deployment, name) for name in ("alpha", "beta")]
        state = SqlState(database, tmp_path / "models")
        try:
            until = time.monotonic() + 120
            while state.study(study.content_hash).last_round < 2:
                assert time.monotonic() < until, "round 2 did not close"
                time.sleep(0.02)
            audit = AuditLog(tmp_path / "audit.jsonl", "coordinator")
            assert add_site(state, study.content_hash, "gamma", "new site", time.time(), audit)
        finally:
            state.close()
        gamma = start_site(deployment, "gamma")
        for proc in [*pair, gamma]:
            assert proc.popen.wait(timeout=300) == 0, proc.log.read_text()[-3000:]
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    (joined,) = [e for e in read_entries(tmp_path / "audit.jsonl") if e.event == "site.joined"]
    start = int(str(joined.details["from_round"]))
    # Added once round 2 had closed. The coordinator takes it up on its next tick (every
    # 0.25 s), and the pair keeps closing rounds meanwhile: several of them when a
    # two-site secure round takes a tenth of a second. Whichever round it is, gamma must
    # have joined before the study ended, and take part in every round from it on.
    assert 3 <= start <= count
    state = SqlState(database, tmp_path / "models")
    try:
        rounds = state.rounds(study.content_hash)
    finally:
        state.close()
    assert [r.status for r in rounds] == ["closed"] * count
    for r in rounds:
        expected = ("alpha", "beta", "gamma") if r.number >= start else ("alpha", "beta")
        assert r.participants == expected, (r.number, r.participants)
    # gamma's own trail: it took part from the round it joined, through the secure
    # sessions computed for three sites, and received the final model.
    trail = read_entries(tmp_path / "sites" / "gamma" / "audit.jsonl")
    sent = sorted(int(str(e.details["round"])) for e in trail if e.event == "update.sent")
    assert sent == list(range(start, count + 1))
    assert trail[-1].event == "model.received"


GARBAGE_PEM = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----"


def test_one_site_with_bad_advertisements_fails_no_round(tmp_path: Path) -> None:
    """Issue 21, point 1: gamma holds a valid certificate and sends, every round, a key
    advertisement with a garbage certificate and an empty signature, then one signed
    over a low-order key. The coordinator refuses each with a 4xx naming why and relays
    none; alpha and beta close every round between them and the model moves."""
    import hashlib
    import secrets
    import time

    from fedcare import pki
    from fedcare.privacy.secagg.keys import EcdsaSigner
    from fedcare.privacy.secagg.messages import KeyAdvertisement
    from fedcare.privacy.secagg.study import setup_for
    from fedcare.simulation.loopback import start_site
    from fedcare.site.client import CoordinatorError, TaskState

    rounds = 3
    study = secure_study().replace(rounds={"count": rounds, "min_sites": 2, "deadline_s": 60})
    deployment = deploy(tmp_path, study)
    h = study.content_hash
    tls = deployment.site_configs["gamma"].parent
    signer = EcdsaSigner(
        pki.load_private_key(tls / "gamma.key"), pki.load_certificate(tls / "gamma.crt")
    )
    start_coordinator(deployment)
    refusals: list[tuple[int, int, str]] = []
    try:
        wait_until_serving(deployment, "alpha")
        gamma = client_for(deployment, "gamma")
        try:
            gamma.task(h)  # checks in, so the first round opens with all three selected
            honest = [start_site(deployment, name) for name in ("alpha", "beta")]
            attacked = 0
            until = time.monotonic() + 180
            while attacked < rounds and time.monotonic() < until:
                task = gamma.task(h)
                if task.state is not TaskState.READY or task.round <= attacked:
                    time.sleep(0.05)
                    continue
                attacked = task.round
                selected = list(task.sites)
                setup = setup_for(
                    study, task.round, selected, N_PARAMS, hashlib.sha256(task.payload).hexdigest()
                )
                garbage = KeyAdvertisement(
                    study_hash=h,
                    round=task.round,
                    session=setup.session,
                    site="gamma",
                    encryption_key=secrets.token_bytes(32),
                    mask_key=secrets.token_bytes(32),
                    certificate=GARBAGE_PEM,
                    signature=b"",
                )
                low = garbage.model_copy(
                    update={"certificate": signer.certificate_pem, "mask_key": bytes(32)}
                )
                low = low.model_copy(update={"signature": signer.sign(low.signed_bytes())})
                # Once one advertisement of gamma's is refused, the stage stops waiting
                # for it and may close before a second arrives; each round's first post
                # is checked for certain, so the two forgeries take turns being first.
                for adv in (garbage, low) if task.round % 2 else (low, garbage):
                    try:
                        gamma.secure_post(
                            h,
                            task.round,
                            "advertise",
                            adv.model_dump_json().encode(),
                            "application/json",
                        )
                    except CoordinatorError as exc:
                        refusals.append((task.round, exc.status, str(exc)))
                    else:
                        refusals.append((task.round, 204, "accepted"))
            for proc in honest:
                assert proc.popen.wait(timeout=240) == 0, proc.log.read_text()[-3000:]
        finally:
            gamma.close()
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    assert all(400 <= status < 500 for _, status, _ in refusals), refusals
    # Each round's session waits for gamma (selected, checked in) until its first post:
    # round 1's first forgery is the garbage certificate, round 2's the low-order key.
    firsts = {number: why for number, _, why in reversed(refusals)}
    assert "not issued by the CA" in firsts[1], refusals
    assert "not a usable key" in firsts[2], refusals
    # Later rounds may close their advertising before gamma's post arrives (it is no
    # longer waited for): then the post is refused for its stage, still never relayed.
    for _, _, why in refusals:
        assert any(r in why for r in ("not issued", "usable key", "stage", "not part")), why
    from fedcare.federation.state.sql import SqlState

    state = SqlState(f"sqlite:///{tmp_path / 'coordinator.db'}", tmp_path / "models")
    try:
        closed = state.rounds(h)
    finally:
        state.close()
    assert [(r.status, r.participants) for r in closed] == [("closed", ("alpha", "beta"))] * rounds
    state_names = make_server_optimizer(study.aggregation).state_names
    (last,) = (tmp_path / "models").rglob(f"round-{rounds:05d}.safetensors")
    _, final, _ = decode_model(last.read_bytes(), N_PARAMS, state_names)
    initial = initial_parameters(study.model, study.feature_schema.input_shape, study.seed)
    assert np.abs(final - initial).max() > 1e-3
