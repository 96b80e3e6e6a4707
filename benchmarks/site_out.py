"""One site out: a study whose one site's privacy budget runs out part-way through.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/site_out.py [--rounds 30] [--spent-at 18] [--deadline 15]
        [--min-sites 2] [--extensions 0] [--skip-network] [--skip-simulation] [--json FILE]

Workload
    Four of the built-in hospitals (northgate, riverside, ashby-general,
    kestrel-renal), a DP study of ``--rounds`` rounds (epsilon 20 per site, delta
    1e-5, secure aggregation off, min_sites ``--min-sites`` (2), deadline
    ``--deadline`` s, ``--extensions`` (0)). Every site's budget affords the whole study except
    kestrel-renal's, which is set so that its ledger refuses round
    ``--spent-at`` (it affords exactly ``spent-at - 1`` rounds after its count).

What is measured
    simulated: ``run_simulation`` in this process, no baselines: wall seconds and
        rounds completed (closed with an aggregate).
    network: ``fedcare coordinator serve`` and one ``fedcare site run`` per site as
        processes over mutual TLS on 127.0.0.1: wall seconds from starting the
        coordinator until every site has exited, and rounds closed, from the
        coordinator's database.

The deadline stands in for a deployment's (the reported one was 600 s); every
round a site that stays selected does not answer costs one deadline.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import yaml

import fedcare.data
from fedcare.data.synthetic import generate_cohorts
from fedcare.policy import DatasetBudget, load_policy, save_policy
from fedcare.privacy.dp.budget import Budget
from fedcare.privacy.dp.plan import plan_site
from fedcare.simulation.loopback import (
    free_port,
    prepare_deployment,
    start_coordinator,
    start_site,
    stop,
    wait_until_serving,
)
from fedcare.simulation.rules import SiteRules
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.site.dataset import prepare_site_data
from fedcare.study import Study, parse_study

SITES = ("northgate", "riverside", "ashby-general", "kestrel-renal")
SPENDER = "kestrel-renal"
DELTA = 1e-5
BUILTIN = Path(fedcare.data.__file__).parent / "studies" / "early_warning.yaml"


def study(rounds: int, deadline_s: float, min_sites: int = 2, extensions: int = 0) -> Study:
    """The built-in demo study, with these rounds and deadline, DP and no secure aggregation."""
    spec = yaml.safe_load(BUILTIN.read_text(encoding="utf-8"))
    spec["name"] = "site-out"
    spec["rounds"] = {
        "count": rounds,
        "min_sites": min_sites,
        "deadline_s": deadline_s,
        "extensions": extensions,
    }
    spec["privacy"] = {"dp": True, "epsilon": 20, "delta": DELTA, "max_grad_norm": 5}
    spec["secure_aggregation"] = {"enabled": False}
    spec.pop("validation", None)
    return parse_study(yaml.safe_dump(spec))


def budget_refusing_at(plan_epsilon: list[float], spent_at: int) -> float:
    """An epsilon between the spend after ``spent_at - 1`` rounds and after ``spent_at``."""
    below, above = plan_epsilon[spent_at - 1], plan_epsilon[spent_at]
    return (below + above) / 2


def budgets(the_study: Study, spent_at: int) -> dict[str, float]:
    cohorts = {c.name: c for c in generate_cohorts(seed=7) if c.name in SITES}
    out = {}
    for name, cohort in cohorts.items():
        data = prepare_site_data(cohort.frame, cohort.mapping, the_study)
        plan = plan_site(the_study, data.n_train)
        if name == SPENDER:
            spend = [plan.epsilon_after(k) for k in range(spent_at + 1)]
            out[name] = budget_refusing_at(spend, spent_at)
        else:
            out[name] = plan.study_epsilon + 1.0
    return out


def simulated(the_study: Study, eps: dict[str, float]) -> dict[str, float]:
    cohorts = [c for c in generate_cohorts(seed=7) if c.name in SITES]
    sites = [prepare_site_data(c.frame, c.mapping, the_study) for c in cohorts]
    rules = {n: SiteRules(budget=Budget(e, DELTA)) for n, e in eps.items()}
    started = time.perf_counter()
    result = run_simulation(the_study, sites, SimulationOptions(baselines=False, site_rules=rules))
    wall = time.perf_counter() - started
    closed = sum(r.status == "closed" for r in result.rounds)
    return {"wall_s": round(wall, 2), "rounds_closed": closed, "rounds": len(result.rounds)}


def network(the_study: Study, eps: dict[str, float], folder: Path) -> dict[str, float]:
    cohorts = [c for c in generate_cohorts(seed=7) if c.name in SITES]
    deployment = prepare_deployment(folder, the_study, cohorts, free_port())
    for name in SITES:
        path = deployment.site_configs[name].parent / "policy.yaml"
        budget = {"data": DatasetBudget(epsilon=eps[name], delta=DELTA)}
        save_policy(load_policy(path).model_copy(update={"privacy_budget": budget}), path)
    started = time.perf_counter()
    coordinator = start_coordinator(deployment)
    try:
        wait_until_serving(deployment, SITES[0])
        procs = [start_site(deployment, name) for name in SITES]
        until = time.monotonic() + 3600
        halted = False
        while any(p.popen.poll() is None for p in procs):
            if coordinator.popen.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"the network run did not finish; see {folder}")
            # A halted study (too few active sites) waits for the operator: stop there.
            audit = folder / "audit.jsonl"
            if audit.exists() and '"study.halted"' in audit.read_text(encoding="utf-8"):
                halted = True
                break
            time.sleep(0.2)
        wall = time.perf_counter() - started
    finally:
        for proc in reversed(deployment.procs):
            stop(proc)
    with sqlite3.connect(folder / "coordinator.db") as db:
        statuses = [s for (s,) in db.execute("select status from rounds")]
    return {
        "wall_s": round(wall, 2),
        "rounds_closed": statuses.count("closed"),
        "rounds": len(statuses),
        "site_exit_codes": [p.popen.returncode for p in procs],  # type: ignore[dict-item]
        "halted": halted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--spent-at", type=int, default=18)
    parser.add_argument("--deadline", type=float, default=15.0)
    parser.add_argument("--min-sites", type=int, default=2)
    parser.add_argument("--extensions", type=int, default=0)
    parser.add_argument("--skip-network", action="store_true")
    parser.add_argument(
        "--skip-simulation", action="store_true", help="(a version whose simulation hangs)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    the_study = study(args.rounds, args.deadline, args.min_sites, args.extensions)
    eps = budgets(the_study, args.spent_at)
    print(f"budgets: {json.dumps({k: round(v, 3) for k, v in eps.items()})}")
    figures: dict[str, object] = {"rounds": args.rounds, "spent_at": args.spent_at}
    if not args.skip_simulation:
        figures["simulated"] = simulated(the_study, eps)
        print(f"simulated: {figures['simulated']}")
    if not args.skip_network:
        with tempfile.TemporaryDirectory(prefix="site-out-") as scratch:
            figures["network"] = network(the_study, eps, Path(scratch))
        print(f"network (deadline {args.deadline:g} s): {figures['network']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
