"""Faults from outside, against a real coordinator process: a locked database and a
sender trickling its request body. Each gets a status the site can act on (503 with
Retry-After, 408), never a 500, and nothing is lost or counted twice."""

from __future__ import annotations

import contextlib
import resource
import socket
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from fedcare.audit import read_entries
from fedcare.coordinator.app import STORAGE_RETRY_S
from fedcare.federation.messages import TaskState
from fedcare.simulation.loopback import _Deployment, start_coordinator, stop, wait_until_serving
from fedcare.site.client import tls_context
from fedcare.study import Study

from .test_network import SITES, check_in, client_for, deploy, network_study, site_tls, workers

pytestmark = pytest.mark.slow

BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Deployment, Study]]:
    study = network_study(rounds=5, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path_factory.mktemp("faults"), study)
    config = yaml.safe_load(deployment.coordinator_config.read_text())
    config["body_timeout_s"] = BODY_TIMEOUT_S
    deployment.coordinator_config.write_text(yaml.safe_dump(config))
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        yield deployment, study
    finally:
        stop(coordinator)


def raw_client(deployment: _Deployment, site: str) -> httpx.Client:
    return httpx.Client(
        base_url=deployment.url, verify=tls_context(site_tls(deployment, site)), timeout=60
    )


def received(deployment: _Deployment, site: str, round_number: int) -> int:
    entries = read_entries(deployment.folder / "audit.jsonl")
    return sum(
        1
        for e in entries
        if e.event == "update.received"
        and e.details.get("site") == site
        and e.details.get("round") == round_number
    )


def _pending_update(deployment: _Deployment, study: Study, site: str) -> tuple[str, bytes, int]:
    """The open round's upload path, ``site``'s honest update for it, and its number."""
    client = client_for(deployment, site)
    try:
        task = client.task(study.content_hash)
    finally:
        client.close()
    assert task.state is TaskState.READY
    body = workers(study)[site].handle(task.payload)
    return f"/v1/studies/{study.content_hash}/rounds/{task.round}/update", body, task.round


def test_a_locked_database_is_503_with_retry_after_and_the_retry_lands_once(live) -> None:
    deployment, study = live
    site = SITES[0]
    path, body, round_number = _pending_update(deployment, study, site)
    headers = {"content-type": "application/octet-stream"}
    # Another process holds the write lock, as a backup tool or a stuck migration would.
    lock = sqlite3.connect(deployment.folder / "coordinator.db", isolation_level=None, timeout=30)
    try:
        lock.execute("BEGIN IMMEDIATE")
        with raw_client(deployment, site) as http:
            refused = http.post(path, content=body, headers=headers)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == str(STORAGE_RETRY_S)
        assert "storage unavailable" in refused.json()["detail"]
    finally:
        lock.rollback()
        lock.close()
    assert received(deployment, site, round_number) == 0
    with raw_client(deployment, site) as http:
        accepted = http.post(path, content=body, headers=headers)
        again = http.post(path, content=body, headers=headers)
    assert accepted.status_code == 201, accepted.text
    assert again.status_code == 200, again.text
    assert received(deployment, site, round_number) == 1


def test_a_full_disk_is_503_and_the_retry_lands_once(live) -> None:
    """No file of the coordinator may grow (RLIMIT_FSIZE on the running process: a
    write past the limit fails as on a full disk, with EFBIG for ENOSPC; Python ignores
    SIGXFSZ). The update gets 503 with Retry-After and nothing is recorded; once the
    disk has room, the same update is accepted once."""
    deployment, study = live
    site = SITES[1]
    coordinator = next(p for p in deployment.procs if p.name == "coordinator")
    path, body, round_number = _pending_update(deployment, study, site)
    headers = {"content-type": "application/octet-stream"}
    soft, hard = resource.prlimit(coordinator.popen.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(coordinator.popen.pid, resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with raw_client(deployment, site) as http:
            refused = http.post(path, content=body, headers=headers)
    finally:
        resource.prlimit(coordinator.popen.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == str(STORAGE_RETRY_S)
    assert received(deployment, site, round_number) == 0
    with raw_client(deployment, site) as http:
        accepted = http.post(path, content=body, headers=headers)
    assert accepted.status_code == 201, accepted.text
    assert received(deployment, site, round_number) == 1


def test_a_body_trickled_byte_by_byte_is_cut_off_with_408(live) -> None:
    deployment, study = live
    host, port = deployment.url.removeprefix("https://").split(":")
    context = tls_context(site_tls(deployment, SITES[1]))
    head = (
        f"POST /v1/studies/{study.content_hash}/rounds/1/update HTTP/1.1\r\n"
        f"Host: {host}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    reply = b""
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(head)
        tls.settimeout(1.0)
        # Bounded: ten bytes, one a second, far below the 1000 declared.
        for _ in range(10):
            try:
                tls.sendall(b"x")
            except OSError:
                break
            try:
                chunk = tls.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            reply += chunk
            break
        # The server closes the connection after its reply: read to the end of it.
        with contextlib.suppress(OSError):
            while chunk := tls.recv(4096):
                reply += chunk
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"send at least" in reply
    assert elapsed < BODY_TIMEOUT_S + 4, elapsed


def test_a_body_at_a_normal_pace_is_not_cut_off(live) -> None:
    deployment, study = live
    site = SITES[2]

    def slowly() -> Iterator[bytes]:
        # Chunked, over three seconds: longer than the grace, but each chunk keeps the
        # sender above the minimum rate the grace grows with.
        for _ in range(3):
            time.sleep(1.0)
            yield b"x" * 200_000

    with raw_client(deployment, site) as http:
        response = http.post(
            f"/v1/studies/{study.content_hash}/rounds/1/update",
            content=slowly(),
            headers={"content-type": "application/octet-stream"},
        )
    # Past the body timeout: the payload is read whole and refused for what it is.
    assert response.status_code == 400, response.text


def test_nothing_above_was_a_500(live) -> None:
    deployment, _ = live
    log = (deployment.folder / "coordinator.log").read_text()
    assert '" 503 ' in log
    assert '" 408 ' in log
    assert '" 500 ' not in log
