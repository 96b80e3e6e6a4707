"""Drift over the network: real coordinator and site processes over mutual TLS. Sites
freeze the promoted release, report their alignment each round, and ``fedcare site
monitor`` (its own process) sends a drift summary that suspends the release at that site
only. A site posting a summary as another is refused in the request."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from fedcare.audit import AuditLog, read_entries, verify
from fedcare.drift.summary import DriftSummary
from fedcare.federation.state.sql import SqlState
from fedcare.releases.registry import ReleaseRegistry
from fedcare.simulation.loopback import (
    free_port,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)
from fedcare.site.client import CoordinatorError
from fedcare.site.profiles import ProfileStore

from .browser import chromium, screenshot_path
from .conftest import toy_frame
from .test_network import SITES, client_for, deploy, network_study

pytestmark = pytest.mark.slow

MONITORED = """
validation:
  threshold: 0.5
  every: 3
  subgroups: []
  n_bootstrap: 50
  gates: [{kind: overall, metric: auroc, op: ">=", threshold: 0.6}]
"""


def test_monitor_over_mutual_tls_suspends_the_release_at_that_site_only(tmp_path: Path) -> None:
    study = network_study(rounds=3, min_sites=3, deadline_s=60, extra=MONITORED)
    study = study.replace(
        disclosure={
            **study.canonical()["disclosure"],
            "artefacts": ["model_updates", "metrics", "drift_summaries"],
        },
        monitoring={"training": {"min_cosine": 0.0, "rounds": 2}},
    )
    deployment = deploy(tmp_path, study)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        for proc in [start_site(deployment, name) for name in SITES]:
            assert proc.popen.wait(timeout=300) == 0, proc.log.read_text()[-3000:]
        config = deployment.site_configs["alpha"]
        store = ProfileStore(config.parent / "state", study.content_hash)
        assert store.frozen() == [1]
        assert store.pending() == []
        # New patients at alpha whose outcomes the model now gets backwards.
        later = toy_frame(40, 400)
        later["Y"] = 1 - later["Y"]
        data = tmp_path / "later.csv"
        later.to_csv(data, index=False)
        done = _monitor(config, data)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "drift summary sent to https://" in done.stdout
        assert "gates with labels: FAIL" in done.stdout
        kept_local = _monitor(config, data, "--no-send")
        assert "not sent (--no-send)" in kept_local.stdout, kept_local.stdout + kept_local.stderr
        # beta's certificate cannot speak for alpha.
        forged = (
            DriftSummary(
                study_hash=study.content_hash,
                site="alpha",
                release=1,
                monitored_at=datetime.now(UTC),
                n=400,
                labelled=True,
                alpha=0.05,
                drift=True,
                checks=[],
                performance_passed=False,
                reasons=["forged"],
            )
            .model_dump_json()
            .encode()
        )
        beta = client_for(deployment, "beta")
        try:
            with pytest.raises(CoordinatorError) as refused:
                beta.send_drift(study.content_hash, forged)
            assert refused.value.status == 403
        finally:
            beta.close()
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    database = f"sqlite:///{deployment.folder / 'coordinator.db'}"
    registry = ReleaseRegistry.open(database, deployment.folder / "models" / "releases")
    try:
        release = registry.get(1)
        assert release.state.value == "promoted"
        assert [s.site for s in release.suspended] == ["alpha"]
        assert "auroc" in release.suspended[0].reason
    finally:
        registry.close()
    state = SqlState(database, deployment.folder / "models")
    try:
        kept = state.reports(study.content_hash, "drift")
        assert [r.site for r in kept] == ["alpha"]
        alignments = state.reports(study.content_hash, "alignment")
        assert {(r.site, r.ref) for r in alignments} == {(s, n) for s in SITES for n in (1, 2)}
    finally:
        state.close()
    trail = deployment.folder / "audit.jsonl"
    assert verify(trail).ok
    events = [e.event for e in read_entries(trail)]
    assert events.count("drift.received") == 1
    assert events.count("release.suspended") == 1
    site_trail = read_entries(deployment.site_configs["alpha"].parent / "audit.jsonl")
    sent = [e for e in site_trail if e.event == "drift.sent"]
    assert len(sent) == 1
    assert sent[0].details["sha256"] == hashlib.sha256(kept[0].body.encode()).hexdigest()
    assert [e.event for e in site_trail].count("alignment.sent") == 2
    assert "profile.frozen" in [e.event for e in site_trail]
    _check_the_site_portal(
        deployment.site_configs["alpha"], study.content_hash, kept[0].body, tmp_path
    )


def _monitor(config: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``fedcare site monitor`` as its own process, as a site's staff would run it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcare",
            "site",
            "monitor",
            "--config",
            str(config),
            "--data",
            str(data),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _check_the_site_portal(
    config: Path, study_hash: str, summary_body: str, tmp_path: Path
) -> None:
    """``fedcare site ui`` as its own process on 127.0.0.1: what left alpha, its approval,
    its frozen release and both monitor runs, read from alpha's own files."""
    port = free_port()
    portal = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcare",
            "site",
            "ui",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        until = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(url + "/", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < until, "the portal did not start"
                time.sleep(0.3)
        assert page.status_code == 200
        assert "Site portal: alpha" in page.text
        data = httpx.get(url + "/api/portal", timeout=10).json()
        assert data["audit_ok"]
        events = [o["event"] for o in data["outflows"]]
        assert events.count("update.sent") == 3
        assert events.count("alignment.sent") == 2
        assert events.count("validation.sent") == 1
        (drift,) = [o for o in data["outflows"] if o["event"] == "drift.sent"]
        assert drift["sha256"] == hashlib.sha256(summary_body.encode()).hexdigest()
        assert drift["recipient"].startswith("https://127.0.0.1:")
        assert [a["hash"] for a in data["approvals"]] == [study_hash]
        assert [(v["release"], v["state"]) for v in data["validations"]] == [(1, "promoted")]
        assert len(data["monitors"]) == 2
        assert all(m["drift"] or m["performance_passed"] is False for m in data["monitors"])
        shown = httpx.get(url + "/monitor/" + data["monitors"][0]["page"], timeout=10)
        assert shown.status_code == 200
        assert "Drift monitor" in shown.text
        assert httpx.get(url + "/monitor/..%2Fsite.yaml", timeout=10).status_code == 404
        _look_at_the_portal(url, config, len(data["outflows"]), tmp_path)
    finally:
        os.killpg(portal.pid, signal.SIGTERM)
        portal.wait(timeout=20)


def _look_at_the_portal(url: str, config: Path, outflows: int, tmp_path: Path) -> None:
    """In a real browser: what a person sees, and that it updates without a reload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 20)

        def rows() -> int:
            return len(driver.find_elements(By.CSS_SELECTOR, "#outflows tr")) - 1

        wait.until(lambda _: rows() == outflows)
        text = driver.find_element(By.TAG_NAME, "body").text
        for seen in (
            "What left the building",
            "Audit trail verifies",
            "drift.sent",
            "update.sent",
            "Privacy budget",
            "Approvals",
            "promoted",
            "FAIL",
        ):
            assert seen in text, seen
        driver.save_screenshot(str(screenshot_path(tmp_path, "site-portal.png")))
        # Something new leaves: the open page shows it at its next refresh, no reload.
        AuditLog(config.parent / "audit.jsonl", "alpha").append(
            "update.sent",
            study="f" * 64,
            round=9,
            to="https://127.0.0.1:1/",
            bytes=7,
            sha256="e" * 64,
        )
        wait.until(lambda _: rows() == outflows + 1)
        assert "round 9" in driver.find_element(By.ID, "outflows").text
