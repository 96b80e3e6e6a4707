"""Local, global and personalised models on the demo cohorts, the imaging cohort and
heart disease, in one run.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/personalization.py [--heart-data ../shared/data/heart-disease]
        [--seeds 5] [--json FILE]

Workloads
    demo      the built-in early-warning study (MLP, 20 rounds, SecAgg+) on the five
              built-in hospitals; finetune (10 epochs) and Ditto (lam 0.1, 5 epochs per
              round). FedBN does not apply: the MLP has no normalisation layers.
    imaging   the built-in lesion-detection study (CNN with BatchNorm, 20 rounds, SecAgg+)
              on the five imaging hospitals; FedBN, finetune (5 epochs) and Ditto
              (lam 0.1, 1 epoch per round). Its wall time is the whole `fedcare simulate`
              run: federation, local and pooled baselines, validation, personal models.
    heart     Fed-Heart-Disease (FLamby protocol, logistic regression, 10 rounds, 5 seeds):
              FedAvg, and FedAvg with each centre's personal model (finetune 5 epochs,
              Ditto lam 0.1 with 1 epoch per round); accuracy, as FLamby reports it.

What is printed
    Per site: the local model (trained there alone), the federated (global) model, the
    pooled model (demo and imaging), and each method's personal model, each on that
    site's own held-out rows (AUROC with its 95 % bootstrap interval for demo and
    imaging); whether each personal model passed the study's and the site's gates; and
    the issue's goals, each as measured and reached or not reached.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedcare.data import demo_study, imaging_study
from fedcare.data.heart_disease import heart_disease_study, load_heart_disease
from fedcare.simulation.heart_benchmark import run_benchmark
from fedcare.simulation.results import SimulationResult
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.simulation.sites import builtin_rules, builtin_sites
from fedcare.study import PersonalizationSpec, Study

DEMO_METHODS = (
    PersonalizationSpec(method="finetune", epochs=10),
    PersonalizationSpec(method="ditto", lam=0.1, epochs=5),
)
IMAGING_METHODS = (
    PersonalizationSpec(method="fedbn"),
    PersonalizationSpec(method="finetune", epochs=5),
    PersonalizationSpec(method="ditto", lam=0.1, epochs=1),
)
HEART_METHODS = (
    PersonalizationSpec(method="finetune", epochs=5),
    PersonalizationSpec(method="ditto", lam=0.1, epochs=1),
)


def _load() -> float:
    return os.getloadavg()[0]


def _cell(value: float | None, ci: tuple[float, float] | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + ("" if ci is None else f" [{ci[0]:.2f}-{ci[1]:.2f}]")


def cohort_table(
    name: str, study: Study, methods: tuple[PersonalizationSpec, ...]
) -> dict[str, Any]:
    """One cohort: the plain run (local, federated, pooled), then each method's run."""
    sites, descriptions = builtin_sites(study, seed=2026)
    rules = builtin_rules([s.name for s in sites], study)
    options = SimulationOptions(True, descriptions, site_rules=rules)
    started = time.perf_counter()
    plain = run_simulation(study.replace(personalization=None), sites, options)
    plain_s = time.perf_counter() - started
    rows: dict[str, dict[str, Any]] = {
        row.site: {
            "local": (row.local, row.local_ci),
            "federated": (row.federated, row.federated_ci),
            "pooled": (row.pooled, row.pooled_ci),
        }
        for row in plain.comparison
    }
    walls = {"plain (with baselines)": plain_s}
    for spec in methods:
        started = time.perf_counter()
        personal: SimulationResult = run_simulation(
            study.replace(personalization=spec),
            sites,
            SimulationOptions(False, descriptions, site_rules=rules),
        )
        walls[spec.method.value] = time.perf_counter() - started
        for row in personal.comparison:
            rows[row.site][spec.method.value] = (row.personalized, row.personalized_ci)
            rows[row.site][f"{spec.method.value} released"] = row.personal_released
    columns = ["local", "federated", "pooled", *(m.method.value for m in methods)]
    print(f"\n{name}: AUROC on each site's held-out rows [95 % bootstrap interval]")
    print("| site | " + " | ".join(columns) + " | best personal >= max(local, federated) |")
    print("|---" * (len(columns) + 2) + "|")
    goals: dict[str, bool] = {}
    for site, row in rows.items():
        best = max(row[m.method.value][0] for m in methods)
        floor = max(v for v in (row["local"][0], row["federated"][0]) if v is not None)
        goals[site] = best >= floor
        cells = [
            _cell(*row[c]) + ("" if row.get(f"{c} released", True) else " (held)") for c in columns
        ]
        print(f"| {site} | " + " | ".join(cells) + f" | {'yes' if goals[site] else 'no'} |")
    print("wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()))
    return {"rows": rows, "walls_s": walls, "goal_per_site": goals}


def heart_table(data: Path, seeds: int) -> dict[str, Any]:
    study = heart_disease_study()
    sites = load_heart_disease(data, study)
    started = time.perf_counter()
    result = run_benchmark(
        sites, study, n_seeds=seeds, methods=["fedavg"], personalization=HEART_METHODS
    )
    wall = time.perf_counter() - started
    print(f"\nheart disease: test accuracy, mean over {seeds} seeds (Avg: mean of centres)")
    names = list(result.measured)
    centres = list(result.measured["fedavg"].centers)
    print("| model | Avg | " + " | ".join(centres) + " |")
    print("|---" * (len(centres) + 2) + "|")
    for name in names:
        scores = result.measured[name]
        print(
            f"| {name} | {scores.avg:.3f} | "
            + " | ".join(f"{scores.centers[c]:.3f}" for c in centres)
            + " |"
        )
    print(f"wall seconds: {wall:.1f}")
    return {"measured": {k: v.model_dump() for k, v in result.measured.items()}, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heart-data", type=Path, default=Path("../shared/data/heart-disease"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the CLI does: small models train faster on one thread
    load = _load()
    if load > 1.0:
        print(f"warning: machine load {load:.1f} before the run; times may be inflated")
    out: dict[str, Any] = {}
    out["demo"] = cohort_table("demo cohorts", demo_study(), DEMO_METHODS)
    out["imaging"] = cohort_table("imaging cohort", imaging_study(), IMAGING_METHODS)
    out["heart"] = heart_table(args.heart_data, args.seeds)

    print("\ngoals")
    demo = out["demo"]
    kestrel = max(demo["rows"]["kestrel-renal"][m.method.value][0] for m in DEMO_METHODS)
    print(
        f"- demo: every site's best personal >= max(local, federated): "
        f"{'reached' if all(demo['goal_per_site'].values()) else 'NOT reached'}"
    )
    print(
        f"- demo: kestrel-renal best personal {kestrel:.3f} >= 0.82: "
        f"{'reached' if kestrel >= 0.82 else 'NOT reached'}"
    )
    heart = out["heart"]["measured"]
    best = max(v["avg"] for k, v in heart.items() if k.startswith("fedavg+"))
    print(
        f"- heart disease: best personal Avg {best:.3f} >= 0.76: "
        f"{'reached' if best >= 0.76 else 'NOT reached'}"
    )
    imaging = out["imaging"]["rows"]
    beats = {s: r["fedbn"][0] > r["federated"][0] for s, r in imaging.items()}
    print(
        "- imaging: FedBN beats FedAvg at every hospital: "
        + ("reached" if all(beats.values()) else "NOT reached")
        + " ("
        + ", ".join(
            f"{s} {r['fedbn'][0]:.3f} vs {r['federated'][0]:.3f}" for s, r in imaging.items()
        )
        + ")"
    )
    fedbn_s = out["imaging"]["walls_s"]["fedbn"]
    print(
        f"- imaging: 5 hospitals x 20 rounds with FedBN in {fedbn_s:.1f} s (< 300 s): "
        f"{'reached' if fedbn_s < 300 else 'NOT reached'}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
