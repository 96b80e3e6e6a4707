"""The coordinator's dashboard: page weight, time to first render on loopback, and the
memory it adds to the coordinator.

Run from the repository root with the project's venv (needs chromium and
chromium-driver)::

    .venv/bin/python benchmarks/dashboard.py [--rounds 10] [--viewers 1] [--json FILE]

Workload
    The demo study (five built-in hospitals, MLP, secure aggregation, DP-SGD) for
    ``--rounds`` rounds, over real processes on loopback with mutual TLS, run twice in
    this process: once with nobody watching (the baseline), once with ``--viewers``
    headless Chromium pages open on the operator's dashboard from the second round to
    the end. The browsers reach the coordinator through the test suite's certificate
    proxy (tests/tls_proxy.py), one loopback hop that presents the operator's
    certificate, as a browser holding operator.p12 would.

What is measured
    page weight: bytes of the page, of the first state (JSON) and of every figure, as
        fetched directly over mutual TLS at the end of the watched run (no compression).
    time to first render: in the browser, from navigation start to the first paint
        (first-contentful-paint) and to the first state drawn (the page's own marker),
        median over the viewers; and, directly over mutual TLS, the wall time of
        GET /ui plus GET /ui/state, median of 20.
    added memory: the coordinator process's peak RSS (sampled every 0.2 s) in the
        watched run minus the baseline run's, and its RSS at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium  # noqa: E402
from tests.tls_proxy import certificate_proxy  # noqa: E402

from fedcare.data import demo_study  # noqa: E402  (after the path set-up above)
from fedcare.data.synthetic import generate_cohorts  # noqa: E402
from fedcare.simulation.loopback import (  # noqa: E402
    _rss_mb,
    free_port,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)


def _operator(folder: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
    context.load_cert_chain(
        str(folder / "operator" / "operator.crt"), str(folder / "operator" / "operator.key")
    )
    return context


def _first_render(driver: Any, url: str) -> tuple[float, float]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/ui")
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.body.dataset.firstRender")
    )
    drawn = float(driver.execute_script("return document.body.dataset.firstRender"))
    paint = driver.execute_script(
        "const p = performance.getEntriesByName('first-contentful-paint')[0];"
        "return p ? p.startTime : null"
    )
    return float(paint or 0.0), drawn


def run(rounds: int, viewers: int, watched: bool) -> dict[str, Any]:
    study = demo_study()
    study = study.replace(rounds={**study.canonical()["rounds"], "count": rounds})
    cohorts = generate_cohorts(seed=7, scale=1.0)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        deployment = prepare_deployment(folder, study, cohorts, free_port())
        coordinator = start_coordinator(deployment)
        result: dict[str, Any] = {}
        try:
            wait_until_serving(deployment, cohorts[0].name)
            sites = [start_site(deployment, c.name) for c in cohorts]
            operator = _operator(folder)
            direct = stack.enter_context(
                httpx.Client(base_url=deployment.url, verify=operator, timeout=60)
            )
            renders: list[tuple[float, float]] = []
            opened = False
            until = time.monotonic() + 1800
            while any(p.popen.poll() is None for p in sites):
                coordinator.sample()
                if watched and not opened:
                    state = direct.get("/ui/state").json()
                    if state["studies"] and state["studies"][0]["last_round"] >= 1:
                        url = stack.enter_context(certificate_proxy(deployment.url, operator))
                        for _ in range(viewers):
                            renders.append(_first_render(stack.enter_context(chromium()), url))
                        opened = True
                if time.monotonic() > until:
                    raise RuntimeError("the study did not finish in 30 minutes")
                time.sleep(0.2)
            coordinator.sample()
            result["peak_rss_mb"] = coordinator.peak_mb
            result["end_rss_mb"] = _rss_mb(coordinator.popen.pid)
            if watched:
                page = direct.get("/ui").content
                state = direct.get("/ui/state")
                h = state.json()["studies"][0]["study_hash"]
                names = ["rounds", "auroc"] + [
                    f"subgroups-{v['site']}"
                    for r in state.json()["studies"][0]["releases"][-1:]
                    for v in r["verdicts"]
                ]
                figures = {
                    n: len(direct.get(f"/ui/studies/{h}/plots/{n}.svg").content) for n in names
                }
                timings = []
                for _ in range(20):
                    started = time.perf_counter()
                    direct.get("/ui")
                    direct.get("/ui/state")
                    timings.append(time.perf_counter() - started)
                result.update(
                    page_bytes=len(page),
                    state_bytes=len(state.content),
                    figure_bytes=figures,
                    total_bytes=len(page) + len(state.content) + sum(figures.values()),
                    first_paint_ms=statistics.median(r[0] for r in renders),
                    first_state_drawn_ms=statistics.median(r[1] for r in renders),
                    direct_page_and_state_ms=1000 * statistics.median(timings),
                    releases=len(state.json()["studies"][0]["releases"]),
                )
        finally:
            stack.close()
            for proc in reversed(deployment.procs):
                stop(proc)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--viewers", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    baseline = run(args.rounds, args.viewers, watched=False)
    watched = run(args.rounds, args.viewers, watched=True)
    added = watched["peak_rss_mb"] - baseline["peak_rss_mb"]
    print(f"demo study, 5 hospitals, {args.rounds} rounds, {args.viewers} viewer(s)")
    print(f"  page {watched['page_bytes']} B, first state {watched['state_bytes']} B")
    print(f"  figures {watched['figure_bytes']}")
    print(f"  total page weight {watched['total_bytes']} B")
    print(
        f"  first paint {watched['first_paint_ms']:.0f} ms, first state drawn "
        f"{watched['first_state_drawn_ms']:.0f} ms (browser, via the certificate proxy)"
    )
    direct = watched["direct_page_and_state_ms"]
    print(f"  GET /ui + GET /ui/state over mutual TLS: {direct:.1f} ms")
    print(
        f"  coordinator peak RSS {baseline['peak_rss_mb']:.0f} MB unwatched, "
        f"{watched['peak_rss_mb']:.0f} MB watched: +{added:.0f} MB "
        f"(end {baseline['end_rss_mb']:.0f} vs {watched['end_rss_mb']:.0f} MB)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"baseline": baseline, "watched": watched, "added_mb": added}, indent=2)
        )


if __name__ == "__main__":
    main()
