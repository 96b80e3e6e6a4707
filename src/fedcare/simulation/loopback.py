"""A whole deployment on loopback: a coordinator process and one process per site.

``fedcare demo --network`` provisions a consortium, writes each built-in
hospital's data and config into its own folder, starts ``fedcare coordinator
serve`` and one ``fedcare site run`` per hospital as separate processes talking
HTTPS with mutual TLS over 127.0.0.1, and checks the final model against the
in-process simulation of the same study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel

from fedcare.config import (
    CoordinatorConfig,
    SiteConfig,
    StudyMembership,
    TlsFiles,
    load_config,
    write_config,
)
from fedcare.data.imaging import ImagingSite
from fedcare.federation.messages import decode_model
from fedcare.federation.state.sql import SqlState
from fedcare.models.size import study_parameter_count
from fedcare.policy import SitePolicy, approve, save_policy
from fedcare.provision import provision
from fedcare.simulation.runner import Progress, run_federation
from fedcare.simulation.sites import (
    BUILTIN_BUDGETS,
    Cohort,
    builtin_cohorts,
    builtin_gates,
    prepare_cohort,
)
from fedcare.site.client import CoordinatorClient, RetryableError
from fedcare.study import Study


class LoopbackError(RuntimeError):
    """A process of the loopback deployment failed; its log is named."""


class ProcessStats(BaseModel):
    name: str
    peak_rss_mb: float
    exit_code: int | None


class NetworkDemoResult(BaseModel):
    study_hash: str
    sites: list[str]
    rounds: int
    network_wall_s: float
    in_process_wall_s: float
    max_abs_diff: float | None
    """None under DP: every site's noise is secret and fresh, so no two runs agree."""
    round_durations_s: list[float]
    coordinator_overhead_s: list[float]
    processes: list[ProcessStats]
    folder: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    peak_mb: float = 0.0

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, _rss_mb(self.popen.pid))


@dataclass
class _Deployment:
    folder: Path
    study_file: Path
    coordinator_config: Path
    site_configs: dict[str, Path]
    url: str
    procs: list[_Proc] = field(default_factory=list)


def _write_study(study: Study, path: Path) -> None:
    path.write_text(yaml.safe_dump(study.canonical(), sort_keys=False), encoding="utf-8")


def prepare_deployment(
    folder: Path,
    study: Study,
    cohorts: Sequence[Cohort],
    port: int,
    database: str = "sqlite:///coordinator.db",
) -> _Deployment:
    """Provision the consortium and write every party's files, as operators would; the
    coordinator keeps its state in ``database`` (an SQLAlchemy URL)."""
    names = [c.name for c in cohorts]
    provision("fedcare-demo", names, folder, port=port, force=True)
    study_file = folder / "study.yaml"
    _write_study(study, study_file)
    coordinator_config = folder / "coordinator.yaml"
    write_config(
        CoordinatorConfig(
            consortium="fedcare-demo",
            port=port,
            tls=TlsFiles(
                cert=Path("coordinator.crt"),
                key=Path("coordinator.key"),
                ca=Path("ca.crt"),
                crl=Path("crl.pem"),
            ),
            studies=[StudyMembership(file=Path("study.yaml"), sites=names)],
            database=database,
        ),
        coordinator_config,
    )
    url = f"https://127.0.0.1:{port}"
    site_configs = {
        cohort.name: write_site_folder(folder / "sites" / cohort.name, study, cohort, url)
        for cohort in cohorts
    }
    return _Deployment(folder, study_file, coordinator_config, site_configs, url)


def write_site_folder(site_dir: Path, study: Study, cohort: Cohort, url: str) -> Path:
    """A site's data, mapping, study, policy (approving ``study``) and ``site.yaml``, as
    its staff would write them; returns the config's path. The certificate and key are
    the provisioning's or the enrolment's business."""
    site_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(cohort, ImagingSite):
        data = "data"
        shutil.copytree(cohort.folder, site_dir / data, dirs_exist_ok=True)
    else:
        data = "data.csv"
        cohort.frame.to_csv(site_dir / data, index=False)
    (site_dir / "mapping.yaml").write_text(
        yaml.safe_dump(cohort.mapping.model_dump(mode="json"), sort_keys=False)
    )
    _write_study(study, site_dir / "study.yaml")
    # The site's privacy officer writes the policy and approves this exact study.
    policy_path = site_dir / "policy.yaml"
    save_policy(
        SitePolicy.model_validate(
            {
                "site": cohort.name,
                "jurisdiction": "hipaa",
                "region": "US",
                "min_cohort_size": 11,
                "coordinators": [url],
                # This demo officer allows what the demo studies send; drift summaries
                # only when the study declares them.
                "allowed_artefacts": ["model_updates", "metrics", "counts"]
                + (["drift_summaries"] if study.monitoring is not None else []),
                "validation_gates": [
                    g.model_dump(mode="json", exclude_none=True)
                    for g in builtin_gates(cohort.name, study)
                ],
                # A budget in epsilon bounds DP studies; this officer lets the built-in
                # studies without DP (the imaging one) run on the hospital's data too.
                "privacy_budget": _budget(cohort.name) if study.privacy.dp else {},
            }
        ),
        policy_path,
    )
    approve(policy_path, study, by="demo privacy officer", note="fedcare demo --network")
    config_path = site_dir / "site.yaml"
    write_config(
        SiteConfig.model_validate(
            {
                "site": cohort.name,
                "coordinator": url,
                "tls": {
                    "cert": f"{cohort.name}.crt",
                    "key": f"{cohort.name}.key",
                    "ca": "ca.crt",
                },
                "study": "study.yaml",
                "data": data,
                "mapping": "mapping.yaml",
                "policy": "policy.yaml",
                "state_dir": "state",
                "retry_max_s": 120,
            }
        ),
        config_path,
    )
    return config_path


def _start(name: str, args: list[str], log: Path) -> _Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as handle:
        # The child keeps its own copy of the descriptor; ours can close.
        popen = subprocess.Popen(
            [sys.executable, "-m", "fedcare", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    return _Proc(name, popen, log)


def start_coordinator(deployment: _Deployment) -> _Proc:
    proc = _start(
        "coordinator",
        ["coordinator", "serve", "--config", str(deployment.coordinator_config)],
        deployment.folder / "coordinator.log",
    )
    deployment.procs.append(proc)
    return proc


def kill_and_restart_coordinator(deployment: _Deployment, site: str) -> _Proc:
    """Kill the coordinator with SIGKILL (no chance to tidy up), start it again on the same
    state and wait until it answers ``site``: the crash a fault test needs."""
    old = next(p for p in deployment.procs if p.name == "coordinator")
    os.killpg(old.popen.pid, signal.SIGKILL)
    old.popen.wait()
    deployment.procs.remove(old)
    proc = start_coordinator(deployment)
    wait_until_serving(deployment, site)
    return proc


def start_site(deployment: _Deployment, site: str) -> _Proc:
    config = deployment.site_configs[site]
    proc = _start(site, ["site", "run", "--config", str(config)], config.parent / "site.log")
    deployment.procs.append(proc)
    return proc


def wait_until_serving(deployment: _Deployment, site: str, timeout_s: float = 120.0) -> None:
    """Block until the coordinator answers a site over mutual TLS."""
    site_dir = deployment.site_configs[site].parent
    tls = TlsFiles(
        cert=site_dir / f"{site}.crt", key=site_dir / f"{site}.key", ca=site_dir / "ca.crt"
    )
    client = CoordinatorClient(deployment.url, tls)
    until = time.monotonic() + timeout_s
    try:
        while True:
            coordinator = next(p for p in deployment.procs if p.name == "coordinator")
            if coordinator.popen.poll() is not None:
                raise LoopbackError(f"the coordinator exited; see {coordinator.log}")
            try:
                client.whoami()
                return
            except RetryableError:
                if time.monotonic() > until:
                    raise LoopbackError(
                        f"the coordinator did not answer within {timeout_s:.0f} s; "
                        f"see {coordinator.log}"
                    ) from None
                time.sleep(0.2)
    finally:
        client.close()


def stop(proc: _Proc, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL: nothing is left running."""
    if proc.popen.poll() is None:
        os.killpg(proc.popen.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()


def _round_times(config: Path, study_hash: str) -> list[tuple[float, float]]:
    """(opened, closed) wall-clock times of every finished round, from the coordinator's store."""
    coordinator = load_config(config, CoordinatorConfig)
    state = SqlState(coordinator.database, coordinator.storage)
    try:
        history = state.rounds(study_hash)
    finally:
        state.close()
    return [(r.opened_at, r.closed_at) for r in history if r.closed_at is not None]


def _train_times(site_dirs: list[Path]) -> dict[int, float]:
    """The slowest site's training seconds per round, from the sites' own logs."""
    slowest: dict[int, float] = {}
    for site_dir in site_dirs:
        for line in (site_dir / "state" / "rounds.jsonl").read_text().splitlines():
            entry = json.loads(line)
            slowest[entry["round"]] = max(slowest.get(entry["round"], 0.0), entry["train_s"])
    return slowest


def _budget(site: str) -> dict[str, dict[str, float]]:
    """The built-in hospital's privacy budget for its data set ("data", after data.csv)."""
    budget = BUILTIN_BUDGETS.get(site)
    if budget is None:
        return {}
    return {"data": {"epsilon": budget.epsilon, "delta": budget.delta}}


def run_network_demo(
    folder: Path,
    study: Study,
    data_seed: int,
    scale: float,
    progress: Progress,
    timeout_s: float = 1800.0,
    on_started: Callable[[str], None] = lambda _: None,
    database: str = "sqlite:///coordinator.db",
    cohorts: Sequence[Cohort] | None = None,
) -> NetworkDemoResult:
    """Run the study through real processes on loopback, then the same study in-process;
    the coordinator keeps its state in ``database``. The sites are ``cohorts``, or the
    built-in hospitals (``data_seed``, ``scale``)."""
    if cohorts is None:
        cohorts = builtin_cohorts(study, data_seed, scale, folder / "cohorts")
    port = free_port()
    deployment = prepare_deployment(folder, study, cohorts, port, database)
    names = [c.name for c in cohorts]
    started = time.perf_counter()
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, names[0])
        on_started(deployment.url)
        sites = [start_site(deployment, name) for name in names]
        until = time.monotonic() + timeout_s
        while any(p.popen.poll() is None for p in sites):
            for proc in deployment.procs:
                proc.sample()
            progress("sites finished", sum(p.popen.poll() is not None for p in sites), len(sites))
            if coordinator.popen.poll() is not None:
                raise LoopbackError(f"the coordinator exited early; see {coordinator.log}")
            if time.monotonic() > until:
                raise LoopbackError(f"the study did not finish within {timeout_s:.0f} s")
            time.sleep(0.2)
        progress("sites finished", len(sites), len(sites))
        network_wall = time.perf_counter() - started
        failed = [p for p in sites if p.popen.returncode != 0]
        if failed:
            raise LoopbackError(
                "site(s) failed: " + ", ".join(f"{p.name} (see {p.log})" for p in failed)
            )
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)

    models = []
    for name in names:
        model_file = (
            deployment.site_configs[name].parent
            / "state"
            / (f"model-{study.content_hash[:16]}.safetensors")
        )
        _, params, _ = decode_model(model_file.read_bytes(), study_parameter_count(study))
        models.append(params)

    reference_started = time.perf_counter()
    prepared = [prepare_cohort(c, study) for c in cohorts]
    reference = run_federation(study, prepared).params
    in_process_wall = time.perf_counter() - reference_started
    difference = None
    if not study.privacy.dp:
        difference = float(max(np.max(np.abs(m - reference)) for m in models))

    times = _round_times(deployment.coordinator_config, study.content_hash)
    slowest = _train_times([deployment.site_configs[n].parent for n in names])
    durations = [closed - opened for opened, closed in times]
    overhead = [d - slowest.get(i + 1, 0.0) for i, d in enumerate(durations)]
    return NetworkDemoResult(
        study_hash=study.content_hash,
        sites=names,
        rounds=len(times),
        network_wall_s=network_wall,
        in_process_wall_s=in_process_wall,
        max_abs_diff=difference,
        round_durations_s=durations,
        coordinator_overhead_s=overhead,
        processes=[
            ProcessStats(name=p.name, peak_rss_mb=p.peak_mb, exit_code=p.popen.returncode)
            for p in deployment.procs
        ],
        folder=str(folder),
    )
