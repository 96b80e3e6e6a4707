"""Asynchronous studies between real processes over mutual TLS: a coordinator killed with a
partly filled buffer, and secure flushes among five site processes, two of them behind a
slow link."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import HttpUrl

from fedcare.aggregation import make_server_optimizer, staleness_factor
from fedcare.audit import read_entries
from fedcare.data.synthetic import HospitalCohort
from fedcare.federation.messages import (
    SiteUpdate,
    Task,
    TaskHeader,
    UpdateHeader,
    decode_model,
    encode_task,
    encode_update,
)
from fedcare.ids import derive_seed
from fedcare.models.builders import initial_parameters
from fedcare.policy import load_policy, save_policy
from fedcare.privacy.secagg.quantize import clip_l2, quantize_weight
from fedcare.privacy.secagg.study import quantization_for, site_weight
from fedcare.simulation.loopback import (
    free_port,
    kill_and_restart_coordinator,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)
from fedcare.site.client import CoordinatorError
from fedcare.site.dataset import prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

from .conftest import toy_frame, toy_mapping
from .test_network import (
    N_PARAMS,
    SITES,
    check_in,
    client_for,
    deploy,
    network_study,
    play_round,
    reference_model,
    wait_for_round,
    workers,
)
from .test_secagg_network import _found, _windows

pytestmark = pytest.mark.slow


def _async(study: Study, buffer: int, max_staleness: int) -> Study:
    return study.replace(
        participation={"mode": "async", "buffer": buffer, "max_staleness": max_staleness}
    )


def test_coordinator_killed_with_a_partly_filled_buffer_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    study = _async(network_study(rounds=3, min_sites=3, deadline_s=3600), 3, 2)
    deployment = deploy(tmp_path, study)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        assert play_round(deployment, study, SITES) == 1
        wait_for_round(deployment, study, 1)
        # Version 2's buffer: alpha's update is in, then the coordinator dies.
        alpha = client_for(deployment, "alpha")
        try:
            task = alpha.task(study.content_hash)
            upload = workers(study)["alpha"].handle(task.payload)
            assert alpha.submit(study.content_hash, task.round, upload)
        finally:
            alpha.close()
        kill_and_restart_coordinator(deployment, SITES[0])
        alpha = client_for(deployment, "alpha")
        try:
            status = alpha.status(study.content_hash)
            assert (status["last_round"], status["open_round"]["number"]) == (1, 2)
            assert status["open_round"]["reported"] == ["alpha"]
            # The retry after the crash is a duplicate; the model version did not move.
            assert not alpha.submit(study.content_hash, 2, upload)
            with pytest.raises(CoordinatorError) as refused:
                alpha.submit(study.content_hash, 1, upload)
            assert refused.value.status == 409
        finally:
            alpha.close()
        assert play_round(deployment, study, ("beta", "gamma")) == 2
        wait_for_round(deployment, study, 2)
        assert play_round(deployment, study, SITES) == 3
        wait_for_round(deployment, study, 3)
        gamma = client_for(deployment, "gamma")
        try:
            header, params, _ = decode_model(gamma.model(study.content_hash), N_PARAMS, ())
        finally:
            gamma.close()
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    assert header.round == 3
    np.testing.assert_allclose(params, reference_model(study), atol=1e-6)


# --- five processes, three behind a slow link ----------------------------------------------

FIVE = ("alpha", "beta", "gamma", "delta", "epsilon")
THROTTLED = ("gamma", "delta", "epsilon")
"""Three of five: a site holds one ready update at a time, so with a buffer of three no flush
can be filled by the two fast sites alone, however slow the machine."""
DELAY_S = 0.15
"""Added to every chunk a throttled site's connection carries, each way."""


class SlowLink:
    """A TCP relay on loopback that holds every chunk for ``delay_s``: a hospital's slow,
    high-latency network in front of a real site process (TLS passes through it)."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                inbound, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port))
            self._spawn(self._pump, inbound, outbound)
            self._spawn(self._pump, outbound, inbound)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.5)
        try:
            while not self.stopping.is_set():
                try:
                    chunk = source.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                time.sleep(self.delay_s)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stopping.set()
        self.server.close()


def _five_cohorts() -> list[HospitalCohort]:
    return [
        HospitalCohort(name, "toy", toy_frame(i, 120 + 30 * i, 0.15 * i), toy_mapping(name))
        for i, name in enumerate(FIVE)
    ]


def test_five_processes_three_throttled_secure_async_flushes_are_exact_and_private(
    tmp_path: Path,
) -> None:
    rounds = 6
    secure = {"enabled": True, "clip_norm": 10.0, "max_sites": 10, "max_records": 1000}
    study = _async(
        network_study(rounds=rounds, min_sites=3, deadline_s=60).replace(secure_aggregation=secure),
        buffer=3,
        max_staleness=rounds,
    )
    cohorts = _five_cohorts()
    deployment = prepare_deployment(tmp_path, study, cohorts, free_port())
    port = int(deployment.url.rsplit(":", 1)[1].strip("/"))
    links = {site: SlowLink(port, DELAY_S) for site in THROTTLED}
    for site, link in links.items():
        config_path = deployment.site_configs[site]
        config = yaml.safe_load(config_path.read_text())
        config["coordinator"] = f"https://127.0.0.1:{link.port}"
        config_path.write_text(yaml.safe_dump(config))
        # The site's policy names the coordinator it may talk to: now through the relay.
        policy_path = config_path.parent / "policy.yaml"
        policy = load_policy(policy_path)
        relayed = (*policy.coordinators, HttpUrl(config["coordinator"]))
        save_policy(policy.model_copy(update={"coordinators": relayed}), policy_path)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, FIVE[0])
        procs = {site: start_site(deployment, site) for site in FIVE}
        for site, proc in procs.items():
            assert proc.popen.wait(timeout=300) == 0, f"{site}: {proc.log.read_text()[-3000:]}"
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
        for link in links.values():
            link.close()

    folder = deployment.folder
    entries = read_entries(folder / "audit.jsonl")
    flushes = {e.details["round"]: e.details for e in entries if e.event == "flush.started"}
    closed = [e.details for e in entries if e.event == "round.closed"]
    assert len(closed) >= rounds - 1, [e.event for e in entries]
    assert all(len(c["participants"]) <= 3 for c in closed)
    # Every flush's sum is the sum of exactly its sites' weighted, staleness-scaled updates.
    state_names = make_server_optimizer(study.aggregation).state_names
    versions = {0: initial_parameters(study.model, study.feature_schema.input_shape, study.seed)}
    for number in range(1, rounds + 1):
        found = list((folder / "models").rglob(f"round-{number:05d}.safetensors"))
        versions[number] = (
            decode_model(found[0].read_bytes(), N_PARAMS, state_names)[1]
            if found
            else versions[number - 1]
        )
    local = {
        c.name: SiteWorker(study, prepare_site_data(c.frame, c.mapping, study), N_PARAMS)
        for c in cohorts
    }
    plan = quantization_for(study)
    updates: dict[tuple[str, int], np.ndarray] = {}
    needles: dict[str, set[bytes]] = {}
    for site in FIVE:
        for trained_for in range(1, rounds + 1):
            header = TaskHeader(
                study_hash=study.content_hash,
                round=trained_for,
                seed=derive_seed(study.seed, "round", trained_for),
                nonce="0" * 32,
            )
            task = encode_task(Task(header=header, params=versions[trained_for - 1]))
            _, update = local[site].train(task)
            updates[(site, trained_for)] = update.delta
            needles[f"{site} trained for {trained_for}"] = _windows(
                update.delta.astype("<f4").tobytes()
            ) | _windows(update.delta.astype("<f8").tobytes())
    for record in closed:
        number, sites = record["round"], record["participants"]
        bases = flushes[number]["trained_for"]
        weighted, weight_sum = np.zeros(N_PARAMS), 0.0
        for site in sites:
            delta = updates[(site, bases[site])]
            factor = staleness_factor(number - bases[site], study.participation.staleness)
            weight = site_weight(study, local[site].reported_count()) * factor
            w = quantize_weight(weight, plan) / plan.weight_scale
            weighted += w * clip_l2(delta, plan.clip_norm)
            weight_sum += w
        np.testing.assert_allclose(
            versions[number] - versions[number - 1], weighted / weight_sum, atol=1e-5
        )
    assert all(set(c["participants"]) & set(THROTTLED) for c in closed), closed
    # The coordinator holds no individual update: not in its database, files or log. The
    # search works: a plain upload of any of these updates would be found.
    for (site, trained_for), delta in updates.items():
        header = UpdateHeader(
            study_hash=study.content_hash, round=trained_for, site=site, n_samples=100
        )
        assert _found(encode_update(SiteUpdate(header, delta)), needles)
    coordinator_files = [
        p for p in folder.rglob("*") if p.is_file() and "sites" not in p.relative_to(folder).parts
    ]
    assert folder / "coordinator.db" in coordinator_files
    for path in coordinator_files:
        assert _found(path.read_bytes(), needles) == [], path
    with sqlite3.connect(folder / "coordinator.db") as db:
        assert db.execute("select count(*) from submissions").fetchone() == (0,)
