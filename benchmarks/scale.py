"""fedcare's simulation against Flower's as the number of sites grows, in one run, with
the floor: the same SGD steps in a bare PyTorch loop.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/scale.py [--json FILE] [--only fedcare] [--workloads 4x20,100x50]

Workloads (sites x rounds; default ``4x20,10x50,100x50,1000x10``): the workload of
``benchmarks/vs_flower.py`` (logistic regression on 13 features, 200 records per site
of which 150 train, FedAvg, 1 local epoch of SGD, batch 32, no baselines) with that many
sites. Each side runs as a whole process (start-up and imports included), measured by
``vs_flower.measure``: wall time, peak RSS of the process tree, CPU time, and the share of
the machine other processes used (a warning above 10 %). Flower 1.42 runs on Ray (2 CPUs,
1 per client) from its own venv, ``benchmarks/.venv-flower`` (created on first use). The
floor (``benchmarks/_floor.py``) is a bare PyTorch loop over the same sites' rows with the
same number of SGD steps, one thread, as a whole process too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_flower as vs

FLOOR = vs.BENCH_DIR / "_floor.py"
SPEEDUP_GOALS = {"100x50": 10.0, "1000x10": 20.0}
"""The issue's goals: this many times faster than Flower."""


def parse_workloads(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        sites, rounds = item.lower().split("x")
        out.append((int(sites), int(rounds)))
    return out


def run_workload(sites: int, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir / f"{sites}x{rounds}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data_dir, study_path, sites_path = vs.write_workload(work, rounds, n_sites=sites)
    interval = args.sample_ms / 1000.0
    common = [
        "--rounds",
        str(rounds),
        "--epochs",
        str(vs.EPOCHS),
        "--batch-size",
        str(vs.BATCH_SIZE),
        "--lr",
        str(vs.LEARNING_RATE),
        "--holdout-fraction",
        str(vs.HOLDOUT_FRACTION),
    ]
    runs: dict[str, vs.RunResult] = {}
    vs.wait_for_idle(args.wait_idle)
    runs["fedcare"] = vs.measure(
        "fedcare",
        [
            str(vs.FEDCARE_CLI),
            "simulate",
            "--study",
            str(study_path),
            "--sites",
            str(sites_path),
            "--out",
            str(work / "fedcare-out"),
            "--no-baselines",
        ],
        work / "fedcare.log",
        args.timeout,
        interval,
        vs._child_env({}),
    )
    runs["floor"] = vs.measure(
        "floor",
        [str(vs.FEDCARE_CLI.parent / "python"), str(FLOOR), "--data-dir", str(data_dir), *common],
        work / "floor.log",
        args.timeout,
        interval,
        vs._child_env({"OMP_NUM_THREADS": "1"}),
    )
    if args.only != "fedcare":
        vs.wait_for_idle(args.wait_idle)
        runs["flower"] = vs.measure(
            "flower",
            [
                str(vs._flower_python()),
                str(vs.FLOWER_APP),
                "--data-dir",
                str(data_dir),
                "--result",
                str(work / "flower-result.json"),
                *common,
                "--seed",
                str(vs.SEED),
                "--num-cpus",
                "2",
                "--cpus-per-client",
                "1",
            ],
            work / "flower.log",
            args.timeout,
            interval,
            vs._child_env(vs.FLOWER_ENV),
        )
    return {name: run.as_json() for name, run in runs.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="4x20,10x50,100x50,1000x10")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["fedcare"], help="skip Flower (no ratios to it)")
    parser.add_argument("--work-dir", type=Path, default=vs.BENCH_DIR / ".work" / "scale")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--sample-ms", type=float, default=25.0)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--skip-install", action="store_true")
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()
    flwr = None if args.only else vs.ensure_flower_venv(args.skip_install)
    vs._warm_up(vs.FEDCARE_CLI.parent / "python", "torch, numpy, pandas, fedcare")
    if not args.only:
        vs._warm_up(vs._flower_python(), "torch, numpy, ray, flwr.simulation")
    results: dict[str, Any] = {"flwr": flwr, "workloads": {}}
    for sites, rounds in parse_workloads(args.workloads):
        results["workloads"][f"{sites}x{rounds}"] = run_workload(sites, rounds, args)
    columns = ("fedcare s", "MB", "Flower s", "MB", "faster", "memory", "floor s", "vs floor")
    widths = (10, 7, 10, 7, 8, 8, 9, 9)
    header = "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    print(f"{'sites x rounds':<15}{header}  load")
    for name, runs in results["workloads"].items():
        f, fl, floor = runs["fedcare"], runs.get("flower", {}), runs["floor"]
        speed = ratio(fl.get("wall_s"), f["wall_s"])
        memory = ratio(f["peak_rss_mb"], fl.get("peak_rss_mb"))
        over_floor = ratio(f["wall_s"], floor["wall_s"])
        loaded = max(r.get("other_load") or 0.0 for r in runs.values())

        def cell(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        print(
            f"{name:<15}{cell(f['wall_s'], '.1f'):>10}{cell(f['peak_rss_mb'], '.0f'):>7}"
            f"{cell(fl.get('wall_s'), '.1f'):>10}{cell(fl.get('peak_rss_mb'), '.0f'):>7}"
            f"{cell(speed, '.1f') + 'x':>8}{cell(memory, '.2f') + 'x':>8}"
            f"{cell(floor['wall_s'], '.1f'):>9}{cell(over_floor, '.1f') + 'x':>9}"
            f"  {'WARNING busy' if loaded > vs.BUSY_WARNING else 'ok'} ({loaded:.0%})"
        )
        runs["ratios"] = {"speedup": speed, "memory_ratio": memory, "over_floor": over_floor}
        goal = SPEEDUP_GOALS.get(name)
        if goal is not None and speed is not None:
            verdict = "met" if speed >= goal else "NOT reached"
            print(f"    goal >= {goal:g}x faster than Flower: {verdict}")
        if name == "1000x10" and over_floor is not None:
            print(f"    goal within 3x of the floor: {'met' if over_floor <= 3 else 'NOT reached'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
