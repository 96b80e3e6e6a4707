"""Robust aggregation against one misbehaving hospital of five.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/robust.py [--rounds 20] [--attacker ashby-general]
        [--scale 100] [--noise 1.0] [--json FILE]

Workload
    The demo study (``fedcare demo``: MLP, 20 rounds, sample weighting) in plain mode
    (robust aggregation needs every update, so secure aggregation and DP are off;
    release validation runs as in the demo), on the five built-in hospitals. One hospital
    (``--attacker``) trains honestly and then sends, every round:
      none      its honest update;
      scaled    its update times ``--scale``;
      sign-flip its update times -``--scale`` (pushed the other way, as hard);
      random    Gaussian noise with standard deviation ``--noise`` per parameter.
    It claims its true record count (the study's max_records bounds any larger claim).
    Aggregators: FedAvg (the weighted mean), coordinate-wise median, trimmed mean
    (beta 0.2, one of five trimmed at each end), Multi-Krum (f = 1, m = 4), norm
    bounding (the round's median norm), each with the study's sample weighting
    (Krum selects without weights and averages the selected with them).

What is measured
    Held-out AUROC of the final model at each hospital, per aggregator and attack.
    Failed rounds (a round whose result would not be finite fails and the model stays).
    Cost per round: the aggregation itself (Round.close on the round's real updates,
    median of the rounds, microseconds) and the whole round's wall time, each
    aggregator beside FedAvg in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedcare.data
from fedcare.federation import rounds as rounds_module
from fedcare.federation.messages import SiteUpdate, encode_update
from fedcare.models.size import study_parameter_count
from fedcare.simulation.runner import evaluate, run_federation
from fedcare.simulation.sites import builtin_sites
from fedcare.site.worker import SiteWorker
from fedcare.study import Study, load_study

DEMO_STUDY = Path(fedcare.data.__file__).parent / "studies" / "early_warning.yaml"
AGGREGATORS: dict[str, dict[str, Any] | None] = {
    "fedavg": None,
    "median": {"kind": "median"},
    "trimmed_mean": {"kind": "trimmed_mean", "beta": 0.2},
    "krum": {"kind": "krum", "byzantine": 1, "select": 4},
    "norm_bound": {"kind": "norm_bound"},
}
ATTACKS = ("none", "scaled", "sign-flip", "random")


class Attacker(SiteWorker):
    """A real site worker whose update is replaced before it leaves."""

    attack = "none"
    scale = 100.0
    noise = 1.0

    def handle(self, task_bytes: bytes) -> bytes:
        _, update = self.train(task_bytes)
        delta = update.delta.astype(np.float64)
        if self.attack == "scaled":
            delta = delta * self.scale
        elif self.attack == "sign-flip":
            delta = delta * -self.scale
        elif self.attack == "random":
            seed = int.from_bytes(task_bytes[-8:], "little")
            delta = np.random.default_rng(seed).normal(0.0, self.noise, delta.shape)
        return encode_update(SiteUpdate(update.header, delta.astype(np.float32)))


def plain(study: Study, robust: dict[str, Any] | None) -> Study:
    aggregation = study.aggregation.model_dump(mode="json")
    aggregation["robust"] = robust
    return study.replace(
        secure_aggregation={"enabled": False},
        privacy={"dp": False},
        aggregation=aggregation,
    )


class CloseTimer:
    """Times every Round.close that aggregates individual updates, while in use."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._original = rounds_module.Round.close

    def __enter__(self) -> CloseTimer:
        original, seconds = self._original, self.seconds

        def close(self: rounds_module.Round, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                if self.updates:
                    seconds.append(time.perf_counter() - started)

        rounds_module.Round.close = close  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        rounds_module.Round.close = self._original  # type: ignore[method-assign]


def run_cell(base: Study, aggregator: str, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    study = plain(base, AGGREGATORS[aggregator])
    study = study.replace(rounds={**study.rounds.model_dump(), "count": args.rounds})
    sites, _ = builtin_sites(study, seed=2026)
    n_params = study_parameter_count(study)
    workers: dict[str, SiteWorker] = {}
    for site in sites:
        if site.name == args.attacker:
            worker = Attacker(study, site, n_params)
            worker.attack, worker.scale, worker.noise = attack, args.scale, args.noise
            workers[site.name] = worker
        else:
            workers[site.name] = SiteWorker(study, site, n_params)
    started = time.perf_counter()
    with CloseTimer() as timer:
        run = run_federation(study, sites, workers=workers)
    wall = time.perf_counter() - started
    metrics = evaluate(study, run.params, sites)
    return {
        "aggregator": aggregator,
        "attack": attack,
        "auroc": {name: m.auroc for name, m in metrics.items()},
        "failed_rounds": [r.number for r in run.rounds if r.status == "failed"],
        "aggregate_us": statistics.median(timer.seconds) * 1e6 if timer.seconds else None,
        "round_ms": wall / max(1, len(run.rounds)) * 1e3,
        "finite": bool(np.all(np.isfinite(run.params))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--attacker", default="ashby-general")
    parser.add_argument("--scale", type=float, default=100.0)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = load_study(DEMO_STUDY)
    cells = []
    for attack in ATTACKS:
        for aggregator in AGGREGATORS:
            cell = run_cell(base, aggregator, attack, args)
            cells.append(cell)
            print(f"  {attack:>9} {aggregator:>12}: done", flush=True)
    sites = list(cells[0]["auroc"])
    short = [s.split("-")[0] for s in sites]
    print(
        f"\nattacker: {args.attacker}; {args.rounds} rounds; scale {args.scale}, noise {args.noise}"
    )
    print("per-site held-out AUROC of the final model (failed rounds in brackets)\n")
    print(f"| attack | aggregator | {' | '.join(short)} | mean | failed |")
    print("|---|---|" + "---|" * (len(sites) + 2))
    for cell in cells:
        values = [cell["auroc"][s] for s in sites]
        shown = " | ".join("n/a" if v is None else f"{v:.3f}" for v in values)
        known = [v for v in values if v is not None]
        mean = f"{statistics.fmean(known):.3f}" if known else "n/a"
        failed = len(cell["failed_rounds"])
        print(f"| {cell['attack']} | {cell['aggregator']} | {shown} | {mean} | {failed} |")
    print("\ncost per round, no attack, beside FedAvg in this run\n")
    print("| aggregator | aggregation (us) | vs FedAvg | round (ms) | vs FedAvg |")
    print("|---|---|---|---|---|")
    clean = {c["aggregator"]: c for c in cells if c["attack"] == "none"}
    base_agg, base_round = clean["fedavg"]["aggregate_us"], clean["fedavg"]["round_ms"]
    for name, cell in clean.items():
        print(
            f"| {name} | {cell['aggregate_us']:.0f} | {cell['aggregate_us'] / base_agg:.2f} | "
            f"{cell['round_ms']:.1f} | {cell['round_ms'] / base_round:.2f} |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "cells": cells}, indent=2)
        )


if __name__ == "__main__":
    main()
