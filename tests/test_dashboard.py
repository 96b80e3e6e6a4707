"""The coordinator's dashboard over real mutual TLS: a real coordinator process, its
sites played round by round from the test, an operator's and a site's certificate,
and headless Chromium watching the page update as rounds close.

Attacks: no certificate (refused in the handshake); an operator's certificate used as
a site, also when it bears a site's name (403, and refused as a secure-aggregation
peer); a certificate with a role no one defined (401); a site reading another site's
rows, figures or verdicts (absent, or 404)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedcare import pki
from fedcare.data.synthetic import HospitalCohort
from fedcare.ids import ROLE_OPERATOR
from fedcare.privacy.secagg.keys import IdentityVerifier, SecAggError
from fedcare.schema.mapping import SiteMapping
from fedcare.simulation.loopback import (
    _Deployment,
    free_port,
    prepare_deployment,
    start_coordinator,
    stop,
    wait_until_serving,
)
from fedcare.site.client import CoordinatorClient, tls_context
from fedcare.site.dataset import prepare_site_data
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, parse_study

from .browser import chromium, screenshot_path
from .conftest import toy_frame
from .test_network import site_tls
from .tls_proxy import certificate_proxy

pytestmark = pytest.mark.slow

SITES = ("alpha", "beta", "gamma")
ROUNDS = 4
N_PARAMS = 5


def dashboard_study() -> Study:
    return parse_study(f"""
name: dashboard-toy
schema:
  label: {{name: y}}
  features:
    - {{name: a}}
    - {{name: b}}
    - {{name: c, missing: {{rule: median, indicator: true}}}}
  attributes:
    - {{name: ward, categories: [medical, surgical, rare]}}
training: {{epochs: 1, batch_size: 16, learning_rate: 0.1}}
rounds: {{count: {ROUNDS}, min_sites: 3, deadline_s: 600}}
disclosure:
  min_cohort_size: 11
  coordinator_region: US
  artefacts: [model_updates, metrics]
validation:
  threshold: 0.5
  every: 2
  subgroups: [ward]
  n_bootstrap: 50
  gates:
    - {{kind: overall, metric: auroc, op: ">=", threshold: 0.6}}
    - {{kind: every_subgroup, metric: sensitivity, op: ">=", threshold: 0.2, attribute: ward}}
seed: 5
""")


def cohorts() -> list[HospitalCohort]:
    made = []
    for i, name in enumerate(SITES):
        frame = toy_frame(i, 200 + 40 * i, 0.2 * i)
        # A ward with four patients: its validation cell is suppressed everywhere.
        frame["W"] = np.where(np.arange(len(frame)) % 2 == 0, "medical", "surgical")
        frame.loc[frame.index[:4], "W"] = "rare"
        mapping = SiteMapping(
            site=name,
            features={"a": "A", "b": "B", "c": "C"},
            label="Y",
            attributes={"ward": "W"},
        )
        made.append(HospitalCohort(name, "toy", pd.DataFrame(frame), mapping))
    return made


def _workers(study: Study) -> dict[str, SiteWorker]:
    return {
        c.name: SiteWorker(study, prepare_site_data(c.frame, c.mapping, study), N_PARAMS)
        for c in cohorts()
    }


def _client(deployment: _Deployment, site: str) -> CoordinatorClient:
    return CoordinatorClient(deployment.url, site_tls(deployment, site), poll_wait_s=2.0)


def _play(deployment: _Deployment, study: Study, workers: dict[str, SiteWorker]) -> None:
    """Every site trains the open round, then validates any candidate it is sent."""
    for site in SITES:
        client = _client(deployment, site)
        try:
            task = client.task(study.content_hash)
            assert client.submit(study.content_hash, task.round, workers[site].handle(task.payload))
        finally:
            client.close()


def _validate(deployment: _Deployment, study: Study, workers: dict[str, SiteWorker]) -> int:
    release = 0
    for site in SITES:
        client = _client(deployment, site)
        try:
            task = client.validation_task(study.content_hash)
            assert task is not None, f"{site} has no candidate to validate"
            release, payload = task
            client.send_verdict(study.content_hash, release, workers[site].validate(payload))
        finally:
            client.close()
    return release


def _operator_context(folder: Path) -> ssl.SSLContext:
    operator = folder / "operator"
    return tls_context_from(operator / "operator.crt", operator / "operator.key", folder / "ca.crt")


def tls_context_from(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def _issue(folder: Path, tmp: Path, name: str, role: str) -> ssl.SSLContext:
    """A certificate the consortium CA really signed, for ``name`` in ``role``."""
    ca = pki.Issued(
        pki.load_certificate(folder / "ca.crt"), pki.load_private_key(folder / "ca.key")
    )
    subject = pki._subject(name, "fedcare-demo", role)
    issued = pki._issue(ca, subject, ExtendedKeyUsageOID.CLIENT_AUTH, 30, None)
    cert, key = tmp / f"{name}-{role}.crt", tmp / f"{name}-{role}.key"
    pki.write_certificate(issued.cert, cert)
    pki.write_private_key(issued.key, key)
    return tls_context_from(cert, key, folder / "ca.crt")


def _check_who_may_do_what(deployment: _Deployment, study: Study, tmp: Path) -> None:
    url, folder, h = deployment.url, deployment.folder, study.content_hash
    bare = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    with pytest.raises(httpx.HTTPError), httpx.Client(base_url=url, verify=bare) as anonymous:
        anonymous.get("/ui/state")
    with httpx.Client(base_url=url, verify=_operator_context(folder), timeout=30) as operator:
        assert operator.get("/v1/whoami").json() == {"role": "operator", "name": "operator"}
        refused = operator.get(f"/v1/studies/{h}/task")
        assert refused.status_code == 403
        assert "cannot act as a site" in refused.json()["detail"]
        assert operator.post(f"/v1/studies/{h}/rounds/1/update", content=b"x").status_code == 403
        page = operator.get("/ui")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert operator.get(f"/ui/studies/{'0' * 64}/plots/rounds.svg").status_code == 404
    # An operator's certificate that bears a site's name is still no site.
    impostor = _issue(folder, tmp, "alpha", ROLE_OPERATOR)
    with httpx.Client(base_url=url, verify=impostor, timeout=30) as client:
        assert client.get("/v1/whoami").json() == {"role": "operator", "name": "alpha"}
        assert client.get(f"/v1/studies/{h}/task").status_code == 403
        assert client.post(f"/v1/studies/{h}/withdraw", content=b"{}").status_code == 403
    # A role nobody defined authenticates nobody.
    with httpx.Client(base_url=url, verify=_issue(folder, tmp, "beta", "admin")) as client:
        assert client.get("/ui/state").status_code == 401
        assert client.get("/v1/whoami").status_code == 401


def test_an_operators_certificate_is_no_secure_aggregation_peer() -> None:
    ca = pki.make_ca("c")
    data = b"key advertisement of alpha"
    for issued, refused in (
        (pki.issue_client_cert(ca, "c", "alpha"), False),
        (pki.issue_operator_cert(ca, "c", "alpha"), True),
    ):
        pem = issued.cert.public_bytes(serialization.Encoding.PEM).decode()
        signature = issued.key.sign(data, ec.ECDSA(hashes.SHA256()))
        verifier = IdentityVerifier(ca.cert)
        if refused:
            with pytest.raises(SecAggError, match="not a site's"):
                verifier.verify("alpha", pem, data, signature)
        else:
            verifier.verify("alpha", pem, data, signature)
    operator = pki.issue_operator_cert(ca, "c", "alpha")
    with pytest.raises(pki.PkiError, match="operator's, not a site's"):
        pki.site_identity(operator.cert)
    assert pki.peer(operator.cert) == pki.Peer("alpha", "operator")


def _site_sees_only_itself(deployment: _Deployment, study: Study, release: int) -> None:
    h = study.content_hash
    with httpx.Client(
        base_url=deployment.url, verify=tls_context(site_tls(deployment, "beta")), timeout=30
    ) as beta:
        state = beta.get("/ui/state").json()
        assert state["role"] == "site"
        (shown,) = state["studies"]
        assert [s["site"] for s in shown["sites"]] == ["beta"]
        (candidate,) = [r for r in shown["releases"] if r["id"] == release]
        assert [v["site"] for v in candidate["verdicts"]] == ["beta"]
        assert candidate["reason"] == ""
        text = json.dumps(state)
        for figure in ("rounds", "auroc", "subgroups-beta"):
            answer = beta.get(f"/ui/studies/{h}/plots/{figure}.svg")
            assert answer.status_code == 200, figure
            text += answer.text
        for other in ("alpha", "gamma"):
            assert other not in text, other
        assert beta.get(f"/ui/studies/{h}/plots/subgroups-alpha.svg").status_code == 404


def test_the_dashboard_shows_a_running_study_and_updates_as_rounds_close(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = dashboard_study()
    deployment = prepare_deployment(tmp_path, study, cohorts(), free_port())
    workers = _workers(study)
    start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        _check_who_may_do_what(deployment, study, tmp_path)
        for site in SITES:  # every site checks in: round 1 opens
            client = _client(deployment, site)
            try:
                client.task(study.content_hash)
            finally:
                client.close()
        operator = _operator_context(deployment.folder)
        with certificate_proxy(deployment.url, operator) as url, chromium() as driver:
            driver.get(url + "/ui")
            wait = WebDriverWait(driver, 30)

            # The page redraws its sections on every event: read them in one script, so
            # no element goes stale between finding it and reading it.
            def last_round() -> str:
                return str(
                    driver.execute_script(
                        "const e = document.querySelector('.study .last-round');"
                        "return e ? e.textContent : ''"
                    )
                )

            wait.until(lambda _: last_round() == "0")
            origin = driver.execute_script("return performance.timeOrigin")
            body = driver.find_element(By.TAG_NAME, "body")
            assert "round 1 open, waiting for alpha, beta, gamma" in body.text
            _play(deployment, study, workers)
            wait.until(lambda _: last_round() == "1")
            _play(deployment, study, workers)
            wait.until(lambda _: last_round() == "2")
            release = _validate(deployment, study, workers)
            wait.until(lambda _: "promoted" in driver.find_element(By.ID, "studies").text)
            # Every change arrived over the event stream: the page never reloaded.
            assert driver.execute_script("return performance.timeOrigin") == origin
            assert int(body.get_attribute("data-updates") or 0) >= 3
            # Opened as a person would; the next redraw keeps it open.
            driver.execute_script(
                f"document.querySelector(\"details[data-release='{release}']\").open = true"
            )
            text = driver.find_element(By.TAG_NAME, "body").text
            for seen in (
                "Signed in as operator",
                "Audit trail verifies",
                "auroc >= 0.6 overall",
                "sensitivity >= 0.2 in every ward group",
                "the site's own gates",
                "ward=rare",
                "suppressed",
                "3 pass / 3",
                "3 of 3",
                *SITES,
            ):
                assert seen in text, seen
            drawn = (
                "const all = [...document.querySelectorAll('img[data-plot]')];"
                "return all.every(i => i.complete && i.naturalWidth > 0)"
                " ? all.map(i => i.dataset.plot) : null"
            )
            figures = set(wait.until(lambda _: driver.execute_script(drawn)))
            assert figures == {"rounds", "auroc", *(f"subgroups-{s}" for s in SITES)}
            driver.save_screenshot(str(screenshot_path(tmp_path, "dashboard.png")))
        beta = tls_context(site_tls(deployment, "beta"))
        with certificate_proxy(deployment.url, beta) as url, chromium() as driver:
            driver.get(url + "/ui")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda _: "promoted" in driver.find_element(By.ID, "studies").text)
            text = driver.find_element(By.TAG_NAME, "body").text
            assert "Signed in as beta" in text
            for other in ("alpha", "gamma"):
                assert other not in text, other
        _site_sees_only_itself(deployment, study, release)
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
