"""A consortium's life in one run: three hospitals start a study, a fourth enrols through
a certificate signing request and joins at a round boundary, one is revoked later, and
the study finishes with the others.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/lifecycle.py [--rounds 12] [--join-after 4]
        [--revoke-after 9] [--json FILE]

Workload
    The demo study (built-in hospitals, MLP, secure aggregation, DP-SGD), with
    ``rounds.open_enrolment: true``, as real processes on loopback over mutual TLS.
    ashby-general, fellside-cottage and kestrel-renal start. When round
    Before it starts, northgate runs ``fedcare site enrol`` (its key stays in its folder)
    and the CA's holder ``fedcare provision sign`` on the request. When round
    ``--join-after`` has closed, the operator adds northgate to the study (what
    ``fedcare coordinator site add`` does) and its agent starts. When round
    ``--revoke-after`` has closed, the CA's holder revokes fellside-cottage (what
    ``fedcare provision revoke`` does); the coordinator re-reads the list at its next
    tick.

What is printed
    What each party saw: the coordinator's audit trail (who was added, joined from
    which round, was revoked) and each round's participants; each site's own trail
    (rounds it sent an update for, whether it received the final model, how its agent
    ended). Then the final model's AUROC on every site's held-out patients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fedcare.audit import AuditLog, read_entries
from fedcare.data import demo_study
from fedcare.data.synthetic import generate_cohorts
from fedcare.federation.messages import decode_model
from fedcare.federation.service import add_site
from fedcare.federation.state.sql import SqlState
from fedcare.lifecycle import open_ca, revoke
from fedcare.models.size import study_parameter_count
from fedcare.simulation.loopback import (
    free_port,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
    write_site_folder,
)
from fedcare.site.dataset import prepare_site_data
from fedcare.training.local import predict_proba

STARTERS = ("ashby-general", "fellside-cottage", "kestrel-renal")
JOINER = "northgate"
REVOKED = "fellside-cottage"


def _fedcare(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedcare", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"fedcare {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


def _last_round(folder: Path, study_hash: str) -> int:
    state = SqlState(f"sqlite:///{folder / 'coordinator.db'}", folder / "models")
    try:
        return state.study(study_hash).last_round if state.studies() else 0
    finally:
        state.close()


def _wait_for(folder: Path, study_hash: str, number: int, timeout_s: float = 900) -> None:
    until = time.monotonic() + timeout_s
    while _last_round(folder, study_hash) < number:
        if time.monotonic() > until:
            raise RuntimeError(f"round {number} did not close within {timeout_s:.0f} s")
        time.sleep(0.02)


def run(rounds: int, join_after: int, revoke_after: int) -> dict[str, Any]:
    study = demo_study()
    study = study.replace(
        rounds={**study.canonical()["rounds"], "count": rounds, "open_enrolment": True}
    )
    cohorts = {c.name: c for c in generate_cohorts(seed=7, scale=1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        deployment = prepare_deployment(folder, study, [cohorts[n] for n in STARTERS], free_port())
        procs = []
        start_coordinator(deployment)
        try:
            # The new hospital enrols while the study runs: its key never leaves it.
            site_dir = folder / "sites" / JOINER
            _fedcare("site", "enrol", "--name", JOINER, "--out", str(site_dir))
            deployment.site_configs[JOINER] = write_site_folder(
                site_dir, study, cohorts[JOINER], deployment.url
            )
            _fedcare("provision", "sign", str(site_dir / f"{JOINER}.csr"), "--ca-dir", str(folder))
            wait_until_serving(deployment, STARTERS[0])
            procs = {name: start_site(deployment, name) for name in STARTERS}
            # Rounds take about a second: the operator's and the CA's steps are made in
            # process at the round boundary (the commands themselves cost ~2 s to start).
            _wait_for(folder, study.content_hash, join_after)
            state = SqlState(f"sqlite:///{folder / 'coordinator.db'}", folder / "models")
            try:
                audit = AuditLog(folder / "audit.jsonl", "coordinator")
                reason = "new hospital, approved by the steering committee"
                add_site(state, study.content_hash, JOINER, reason, time.time(), audit)
            finally:
                state.close()
            procs[JOINER] = start_site(deployment, JOINER)
            _wait_for(folder, study.content_hash, revoke_after)
            revoke(open_ca(folder), REVOKED, "left the consortium")
            _wait_for(folder, study.content_hash, rounds)
            ended: dict[str, str] = {}
            for name, proc in procs.items():
                if name == REVOKED:
                    continue
                code = proc.popen.wait(timeout=600)
                ended[name] = f"exit {code}"
            ended[REVOKED] = (
                "still retrying (stopped by the script)"
                if procs[REVOKED].popen.poll() is None
                else f"exit {procs[REVOKED].popen.returncode}"
            )
        finally:
            for proc in reversed(deployment.procs):
                stop(proc)
        return _report(folder, study, cohorts, ended)


def _report(
    folder: Path, study: Any, cohorts: dict[str, Any], ended: dict[str, str]
) -> dict[str, Any]:
    events = read_entries(folder / "audit.jsonl")
    coordinator = [
        {
            "event": e.event,
            **{k: v for k, v in e.details.items() if k in ("site", "from_round", "reason")},
        }
        for e in events
        if e.event in ("site.added", "site.joined", "site.revoked")
    ]
    state = SqlState(f"sqlite:///{folder / 'coordinator.db'}", folder / "models")
    try:
        rounds = [
            {"round": r.number, "status": r.status, "participants": list(r.participants)}
            for r in state.rounds(study.content_hash)
        ]
        stored = state.latest_model(study.content_hash)
        assert stored is not None
        _, params, _ = decode_model(stored.data, study_parameter_count(study))
    finally:
        state.close()
    sites: dict[str, Any] = {}
    for name in [*STARTERS, JOINER]:
        trail = read_entries(folder / "sites" / name / "audit.jsonl")
        sent = [
            int(str(e.details["round"]))
            for e in trail
            if e.event in ("update.sent", "secagg.masked_sent")
        ]
        data = prepare_site_data(cohorts[name].frame, cohorts[name].mapping, study)
        scores = predict_proba(study.model, params, data.x_test)
        sites[name] = {
            "rounds_sent": sorted(set(sent)),
            "final_model_received": any(e.event == "model.received" for e in trail),
            "agent": ended.get(name, ""),
            "auroc": float(roc_auc_score(data.y_test, scores)),
            "held_out": int(data.n_test),
            "events": sorted({e.event for e in trail}),
        }
    ca = [e.event for e in read_entries(folder / "ca-audit.jsonl")]
    return {"coordinator": coordinator, "rounds": rounds, "sites": sites, "ca_events": ca,
            "mean_auroc": float(np.mean([s["auroc"] for s in sites.values()]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--join-after", type=int, default=4)
    parser.add_argument("--revoke-after", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.rounds, args.join_after, args.revoke_after)
    print("coordinator's audit trail:")
    for entry in result["coordinator"]:
        print(f"  {entry}")
    print("rounds (participants):")
    for r in result["rounds"]:
        print(f"  {r['round']:>2} {r['status']:<7} {', '.join(r['participants'])}")
    print(f"CA's audit trail: {result['ca_events']}")
    print("sites:")
    for name, site in result["sites"].items():
        sent = site["rounds_sent"]
        span = f"{sent[0]}-{sent[-1]} ({len(sent)} rounds)" if sent else "none"
        print(
            f"  {name:<17} sent rounds {span}; final model received: "
            f"{site['final_model_received']}; agent: {site['agent']}; "
            f"final model AUROC {site['auroc']:.3f} on {site['held_out']} held-out"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
