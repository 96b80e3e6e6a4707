"""Revocation against a running coordinator: the CA revokes a site while a study runs;
the next handshake with its certificate fails, it is dropped from the study, and the
study goes on with the others, all without a restart. A list signed by another CA
changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fedcare import pki
from fedcare.audit import read_entries
from fedcare.cli import app
from fedcare.federation.state import SiteState
from fedcare.federation.state.sql import SqlState
from fedcare.lifecycle import open_ca
from fedcare.provision import CRL_FILE
from fedcare.simulation.loopback import start_coordinator, stop, wait_until_serving
from fedcare.site.revocation import PeerRevocations

from .test_network import (
    SITES,
    check_in,
    client_for,
    deploy,
    network_study,
    play_round,
    raw_client,
    wait_for_round,
)

pytestmark = pytest.mark.slow


def _refused(deployment: object, site: str) -> bool:
    try:
        with raw_client(deployment, site) as client:  # type: ignore[arg-type]
            client.get("/v1/whoami")
    except httpx.HTTPError:
        return True
    return False


def test_a_revoked_site_is_refused_in_the_handshake_and_dropped_without_a_restart(
    tmp_path: Path,
) -> None:
    study = network_study(rounds=3, min_sites=2, deadline_s=3600)
    deployment = deploy(tmp_path, study)
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        assert play_round(deployment, study, SITES) == 1
        wait_for_round(deployment, study, 1)
        assert not _refused(deployment, "gamma")
        done = CliRunner().invoke(
            app,
            ["provision", "revoke", "gamma", "--reason", "key lost", "--ca-dir", str(tmp_path)],
        )
        assert done.exit_code == 0, done.output
        until = time.monotonic() + 20
        while not _refused(deployment, "gamma"):
            assert time.monotonic() < until, "the revoked certificate still gets in"
            time.sleep(0.2)
        assert not _refused(deployment, "alpha")
        alpha = client_for(deployment, "alpha")
        try:
            # The site side: alpha fetches the CA's list through the coordinator.
            gamma = pki.load_certificate(tmp_path / "sites" / "gamma" / "gamma.crt")
            peers = PeerRevocations(alpha.crl, pki.load_certificate(tmp_path / "ca.crt"))
            assert gamma.serial_number in peers()
        finally:
            alpha.close()
        # A list signed by another CA, put in its place, is refused; the old one holds.
        rogue = pki.make_ca("Rogue")
        pki.write_crl(pki.make_crl(rogue, [], 7), tmp_path / CRL_FILE)
        time.sleep(1.0)
        assert _refused(deployment, "gamma")
        # Round 2 goes on with alpha and beta; gamma is not waited for.
        assert play_round(deployment, study, ("alpha", "beta")) == 2
        wait_for_round(deployment, study, 2, timeout=30)
        # beta comes back with a certificate renewed for ten days only: status warns.
        folder = open_ca(tmp_path)
        path = folder.site_cert("beta")
        short = pki.reissue(folder.ca, pki.load_certificate(path), days=10)
        path.unlink()
        pki.write_certificate(short, path)
        assert not _refused(deployment, "beta")
        config = str(tmp_path / "coordinator.yaml")
        until = time.monotonic() + 20
        while True:
            status = CliRunner().invoke(app, ["coordinator", "status", "--config", config])
            assert status.exit_code == 0, status.output
            if "warning: site beta expires within 30 days" in status.output:
                break
            assert time.monotonic() < until, status.output
            time.sleep(0.3)
        assert "warning: site alpha" not in status.output
        assert "site alpha" in status.output
    finally:
        stop(coordinator)
    events = read_entries(tmp_path / "audit.jsonl")
    revoked = [e for e in events if e.event == "site.revoked"]
    assert [e.details["site"] for e in revoked] == ["gamma"]
    log = (tmp_path / "coordinator.log").read_text()
    assert "not signed by the consortium CA" in log
    assert "Traceback" not in log
    closed = [e for e in events if e.event == "round.closed"]
    assert len(closed) == 2
    state = SqlState(f"sqlite:///{tmp_path / 'coordinator.db'}", tmp_path / "models")
    try:
        gamma = state.sites(study.content_hash)["gamma"]
        assert gamma.state is SiteState.DROPPED
        assert gamma.reason == "certificate revoked by the consortium CA"
        assert state.rounds(study.content_hash)[1].participants == ("alpha", "beta")
    finally:
        state.close()
