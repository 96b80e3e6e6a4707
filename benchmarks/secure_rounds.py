"""Where a secure round's time goes over the network, per stage, as the sites grow.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/secure_rounds.py [--sites 5] [--no-dp] [--rounds 8] [--json FILE]

Workload
    The demo study on N sites (``--sites``, default 5; repeat for several): the five
    built-in hospitals, then copies of them from further data seeds under new names.
    DP-SGD at every site as in the demo; copies have no privacy budget in the demo
    deployment, so more than five sites needs ``--no-dp`` (training time is subtracted
    from the figure either way). ``--rounds`` rounds, real processes on loopback over
    mutual TLS, once with secure aggregation (SecAgg+) and once without, per N.

What is measured
    Per round, the coordinator's overhead: the round's wall time (opened to closed, from
    the coordinator's state) minus the slowest site's training that round (from the
    sites' logs); median over rounds 2.. (round 1 includes the sites' start-up). Per
    secure stage, from the coordinator's log: how long the stage stayed open (the sites'
    pace plus the round trips; the masked stage holds the training) and what closing it
    cost the coordinator (the unmask stage reconstructs and removes the masks); medians
    over rounds 2... The 2-core machine runs every site process too. And the requests
    the sites made about the study (the coordinator's access log) per site and round,
    the whole study long (its release validations included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from fedcare.data import demo_study
from fedcare.data.synthetic import HospitalCohort, generate_cohorts
from fedcare.simulation.loopback import run_network_demo

REQUEST_LINE = re.compile(r'"(GET|POST) /v1/studies/[0-9a-f]{64}[^ ]* HTTP')
"""A site's request about the study in the coordinator's access log."""
STAGE_LINE = re.compile(
    r"secure round (\d+) stage (\w+) closed: open ([\d.]+) s, close ([\d.]+) s, (\d+) posted"
)


def cohorts(n: int) -> list[HospitalCohort]:
    """``n`` sites: the built-in hospitals of data seed 7, then of seeds 8, 9, ... renamed."""
    out: list[HospitalCohort] = []
    seed = 7
    while len(out) < n:
        suffix = "" if seed == 7 else f"-{seed}"
        for cohort in generate_cohorts(seed=seed, scale=1.0):
            name = f"{cohort.name}{suffix}"
            mapping = cohort.mapping.model_copy(update={"site": name})
            out.append(dataclasses.replace(cohort, name=name, mapping=mapping))
        seed += 1
    return out[:n]


def stage_medians(log: Path) -> dict[str, dict[str, float]]:
    """Median open and close time per stage over rounds 2.., from the coordinator's log."""
    found: dict[str, dict[str, list[float]]] = {}
    for number, stage, opened, closed, _ in STAGE_LINE.findall(log.read_text()):
        if int(number) < 2:
            continue
        times = found.setdefault(stage, {"open_s": [], "close_s": []})
        times["open_s"].append(float(opened))
        times["close_s"].append(float(closed))
    return {
        stage: {name: statistics.median(values) for name, values in times.items()}
        for stage, times in found.items()
    }


def run(n: int, rounds: int, secure: bool, dp: bool) -> dict[str, object]:
    study = demo_study()
    study = study.replace(
        rounds={**study.canonical()["rounds"], "count": rounds},
        secure_aggregation={
            **study.canonical()["secure_aggregation"],
            "enabled": secure,
            "max_sites": max(n, study.secure_aggregation.max_sites),
        },
    )
    if not dp:
        study = study.replace(privacy={"dp": False})
    with tempfile.TemporaryDirectory() as tmp:
        result = run_network_demo(
            Path(tmp), study, 7, 1.0, lambda *_: None, timeout_s=1800, cohorts=cohorts(n)
        )
        text = (Path(tmp) / "coordinator.log").read_text()
        stages = stage_medians(Path(tmp) / "coordinator.log")
    requests = len(REQUEST_LINE.findall(text)) / (n * rounds)
    overhead = result.coordinator_overhead_s[1:]
    return {
        "sites": len(result.sites),
        "secure": secure,
        "dp": dp,
        "overhead_median_s": statistics.median(overhead),
        "overhead_s": overhead,
        "requests_per_site_round": requests,
        "first_round_s": result.round_durations_s[0],
        "wall_s": result.network_wall_s,
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[5])
    parser.add_argument("--no-dp", action="store_true", help="no DP-SGD (needed past 5 sites)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if max(args.sites) > 5 and not args.no_dp:
        parser.error("past the five built-in hospitals the copies have no privacy budget: --no-dp")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run; figures may be inflated")
    results = []
    for n in args.sites:
        for secure in (True, False):
            row = run(n, args.rounds, secure, not args.no_dp)
            results.append(row)
            print(
                f"{row['sites']} sites, secure {'on ' if secure else 'off'}: coordinator "
                f"overhead per round, median {row['overhead_median_s']:.3f} s; first round "
                f"{row['first_round_s']:.1f} s; study wall {row['wall_s']:.1f} s; "
                f"{row['requests_per_site_round']:.1f} requests per site and round"
            )
            stages = row["stages"]
            assert isinstance(stages, dict)
            for stage, times in stages.items():
                print(
                    f"      stage {stage:<9} open {times['open_s']:.3f} s, "
                    f"close {times['close_s'] * 1000:.1f} ms"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
