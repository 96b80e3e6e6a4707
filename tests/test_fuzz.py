"""Schema fuzzing: schemathesis sends what the coordinator's OpenAPI schema allows (and
bodies it declares) to a real coordinator over mutual TLS. Every answer must be below
500; the counts are printed in pytest's summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from fedcare.simulation.loopback import _Deployment, start_coordinator, stop, wait_until_serving
from fedcare.site.client import tls_context
from fedcare.study import Study

from .test_network import SITES, check_in, deploy, network_study, site_tls

pytestmark = pytest.mark.slow

EXAMPLES = 60
"""Cases per operation: bounded, so the run takes seconds, not minutes."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Deployment, Study]]:
    study = network_study(rounds=50, min_sites=3, deadline_s=3600)
    deployment = deploy(tmp_path_factory.mktemp("fuzz"), study)
    config = yaml.safe_load(deployment.coordinator_config.read_text())
    # Long-polls answer at once: the fuzzer asks for waits of up to a minute.
    config["poll_wait_s"] = 0.2
    deployment.coordinator_config.write_text(yaml.safe_dump(config))
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        check_in(deployment, study)
        yield deployment, study
    finally:
        stop(coordinator)


def test_no_request_the_schema_allows_gets_a_5xx(live, record_property) -> None:
    deployment, study = live
    tls = site_tls(deployment, SITES[0])
    with httpx.Client(base_url=deployment.url, verify=tls_context(tls), timeout=30) as http:
        document = http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    session = requests.Session()
    client_cert = (str(tls.cert), str(tls.key))
    sent: dict[str, int] = {}
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def fuzz(operation: schemathesis.APIOperation) -> None:
        label = f"{operation.method.upper()} {operation.path}"
        sent[label] = 0

        # Three cases in four name the real study, so they get past the 404 for an
        # unknown hash into the handlers' own checks.
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def send(case: schemathesis.Case) -> None:
            if sent[label] % 4 and case.path_parameters and "study_hash" in case.path_parameters:
                case.path_parameters["study_hash"] = study.content_hash
            response = case.call(
                base_url=deployment.url,
                session=session,
                timeout=30,
                verify=str(tls.ca),
                cert=client_cert,
            )
            sent[label] += 1
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(f"{label}: {response.status_code} {response.text[:200]}")

        send()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    total = sum(sent.values())
    answers = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
    record_property(
        "fuzz",
        f"{total} requests over {len(sent)} operations, {len(failures)} 5xx ({answers})",
    )
    assert len(sent) >= 15, sorted(sent)
    assert all(n > 0 for n in sent.values()), sent
    assert failures == []
    log = (deployment.folder / "coordinator.log").read_text()
    assert '" 500 ' not in log
