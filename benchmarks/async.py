"""Synchronous rounds against buffered asynchronous aggregation, with two slow hospitals.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/async.py [--slow-factor 10] [--availability 0.7]
        [--offline-s 600] [--train-s 60] [--buffer 4] [--min-sites 3] [--flushes 60]
        [--heart-buffer 3] [--heart-min-sites 2] [--heart-flushes 20]
        [--max-staleness 20] [--async-deadline-s S] [--seeds 1]
        [--skip-builtin] [--skip-heart] [--json FILE]

Workload
    builtin: the demo study (``fedcare demo``: MLP, secure aggregation, DP-SGD at
        epsilon 4 with each hospital's real ledger and budget, release validation) on the
        five built-in hospitals. The two small ones (kestrel-renal, fellside-cottage) train
        ``--slow-factor`` times slower and are online ``--availability`` of the time
        (offline spells of ``--offline-s`` s on average); every hospital's local update
        takes ``--train-s`` virtual seconds at speed 1. Sync: the study as it is, its
        deadline raised to cover the slow sites' training (so each round waits for
        them: the synchronous share is kept). Async: the same study with
        ``participation: {mode: async, buffer: K, max_staleness: S, staleness:
        polynomial 0.5}``, min_sites ``--min-sites``, for ``--flushes`` model versions
        (DP planned for that many); the flush deadline is the synchronous one unless
        ``--async-deadline-s``.
    heart: the heart-disease benchmark's study and centres, the two smallest
        (Switzerland, VA Long Beach) slow and intermittent in the same way, plain FedAvg
        (no DP, no secure aggregation, as the published protocol), ``--seeds`` seeds;
        async versions need ``--heart-buffer`` updates, or ``--heart-min-sites`` at the
        deadline, for ``--heart-flushes`` versions.

What is measured, on one virtual clock per run
    sync time: virtual seconds until the last synchronous round closed; the target is
        the synchronous final model's held-out AUROC at every site.
    async time to target: virtual seconds until the first asynchronous version whose
        AUROC at every site is at least the synchronous final one (not reached: said so).
    share: each site's share of all accepted updates, sync and async; the slow sites'
        async share as a fraction of their sync share.
    final AUROC per site, sync and async; updates refused as stale per site.
    heart: Avg accuracy (mean over the four centres of test accuracy at 0.5) of the
        last async version, mean over seeds, beside the synchronous one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedcare.data
from fedcare.data.heart_disease import heart_disease_study, load_heart_disease
from fedcare.simulation.heart_benchmark import accuracies
from fedcare.simulation.pace import Pacing, SitePace
from fedcare.simulation.results import RoundRecord
from fedcare.simulation.runner import SimulationOptions, run_federation, run_simulation
from fedcare.simulation.sites import builtin_rules, builtin_sites
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study, load_study

REPO_ROOT = Path(__file__).resolve().parent.parent
HEART_DATA = REPO_ROOT.parent / "shared" / "data" / "heart-disease"
DEMO_STUDY = Path(fedcare.data.__file__).parent / "studies" / "early_warning.yaml"
SLOW_BUILTIN = ("kestrel-renal", "fellside-cottage")
SLOW_HEART = ("Switzerland", "VA")


@dataclass(frozen=True)
class Run:
    kind: str
    rounds: list[RoundRecord]
    elapsed_s: float
    stale: dict[str, int]
    wall_s: float


def pacing(slow: Sequence[str], args: argparse.Namespace) -> Pacing:
    pace = SitePace(
        speed=1.0 / args.slow_factor, availability=args.availability, offline_s=args.offline_s
    )
    return Pacing(reference_train_s=args.train_s, sites=dict.fromkeys(slow, pace))


def synchronous(study: Study, args: argparse.Namespace) -> Study:
    """Each round waits for the slow sites' training (the deadline covers it twice)."""
    deadline = max(study.rounds.deadline_s, 2 * args.train_s * args.slow_factor)
    return study.replace(rounds={**study.rounds.model_dump(), "deadline_s": deadline})


def asynchronous(
    study: Study, args: argparse.Namespace, buffer: int, min_sites: int, flushes: int
) -> Study:
    """The synchronous study in async mode: a version needs ``buffer`` updates, or
    ``min_sites`` at the deadline (the synchronous one unless ``--async-deadline-s``)."""
    rounds = synchronous(study, args).rounds.model_dump()
    if args.async_deadline_s is not None:
        rounds["deadline_s"] = args.async_deadline_s
    return study.replace(
        participation={
            "mode": "async",
            "buffer": buffer,
            "max_staleness": args.max_staleness,
            "staleness": {"kind": "polynomial", "exponent": 0.5},
        },
        rounds={**rounds, "count": flushes, "min_sites": min_sites},
    )


def shares(rounds: Sequence[RoundRecord], sites: Sequence[str]) -> dict[str, float]:
    counts = dict.fromkeys(sites, 0)
    for record in rounds:
        if record.status == "closed":
            for site in record.participants:
                counts[site] += 1
    total = sum(counts.values()) or 1
    return {s: counts[s] / total for s in sites}


def auroc(record: RoundRecord, site: str) -> float:
    value = record.metrics[site].auroc
    return float("nan") if value is None else value


def time_to_target(rounds: Sequence[RoundRecord], target: dict[str, float]) -> float | None:
    """Virtual seconds until a version's AUROC at every site reaches ``target``."""
    for record in rounds:
        if all(auroc(record, s) >= target[s] for s in target):
            assert record.elapsed_s is not None
            return record.elapsed_s
    return None


def compare(sync: Run, async_: Run, sites: Sequence[str], slow: Sequence[str]) -> dict[str, Any]:
    target = {s: auroc(sync.rounds[-1], s) for s in sites}
    reached = time_to_target(async_.rounds, target)
    sync_share, async_share = shares(sync.rounds, sites), shares(async_.rounds, sites)
    return {
        "sync_virtual_s": sync.elapsed_s,
        "async_virtual_s": async_.elapsed_s,
        "async_time_to_sync_final_s": reached,
        "time_ratio": None if reached is None else reached / sync.elapsed_s,
        "sync_rounds_closed": sum(r.status == "closed" for r in sync.rounds),
        "async_versions_closed": sum(r.status == "closed" for r in async_.rounds),
        "target_auroc": target,
        "sync_final_auroc": target,
        "async_final_auroc": {s: auroc(async_.rounds[-1], s) for s in sites},
        "sync_share": sync_share,
        "async_share": async_share,
        "slow_share_ratio": {
            s: (async_share[s] / sync_share[s]) if sync_share[s] else None for s in slow
        },
        "stale_refused": async_.stale,
        "wall_s": {"sync": sync.wall_s, "async": async_.wall_s},
    }


def builtin(args: argparse.Namespace) -> dict[str, Any]:
    base = load_study(DEMO_STUDY)
    sites, _ = builtin_sites(base, seed=2026)
    names = [s.name for s in sites]
    paced = pacing(SLOW_BUILTIN, args)
    runs = []
    for kind, study in (
        ("sync", synchronous(base, args)),
        ("async", asynchronous(base, args, args.buffer, args.min_sites, args.flushes)),
    ):
        started = time.perf_counter()
        options = SimulationOptions(baselines=False, site_rules=builtin_rules(names), pacing=paced)
        result = run_simulation(study, sites, options)
        assert result.virtual_s is not None
        runs.append(
            Run(
                kind,
                result.rounds,
                result.virtual_s,
                result.stale_refused,
                time.perf_counter() - started,
            )
        )
        wall = time.perf_counter() - started
        print(f"builtin {kind}: {result.virtual_s:.0f} virtual s, {wall:.1f} s wall", flush=True)
    return compare(runs[0], runs[1], names, SLOW_BUILTIN)


def heart_run(
    kind: str, study: Study, sites: list[SiteDataset], paced: Pacing
) -> tuple[Run, float]:
    started = time.perf_counter()
    run = run_federation(study, sites, pacing=paced)
    accuracy = accuracies(study, run.params, sites)
    record = Run(kind, run.rounds, run.elapsed_s, run.stale, time.perf_counter() - started)
    return record, statistics.fmean(accuracy.values())


def heart(args: argparse.Namespace) -> dict[str, Any]:
    base = heart_disease_study()
    sites = load_heart_disease(args.heart_data, base)
    names = [s.name for s in sites]
    paced = pacing(SLOW_HEART, args)
    per_seed = []
    for i in range(args.seeds):
        seeded = base.replace(seed=base.seed + i)
        sync, sync_avg = heart_run("sync", synchronous(seeded, args), sites, paced)
        async_, async_avg = heart_run(
            "async",
            asynchronous(seeded, args, args.heart_buffer, args.heart_min_sites, args.heart_flushes),
            sites,
            paced,
        )
        row = compare(sync, async_, names, SLOW_HEART)
        row["sync_avg_accuracy"], row["async_avg_accuracy"] = sync_avg, async_avg
        per_seed.append(row)
        print(
            f"heart seed {seeded.seed}: sync Avg {sync_avg:.3f}, async Avg {async_avg:.3f}",
            flush=True,
        )
    return {
        "sync_avg_accuracy": statistics.fmean(r["sync_avg_accuracy"] for r in per_seed),
        "async_avg_accuracy": statistics.fmean(r["async_avg_accuracy"] for r in per_seed),
        "per_seed": per_seed,
    }


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "not reached" if value is None else format(value, spec)


def report(name: str, row: dict[str, Any], slow: Sequence[str]) -> None:
    print(f"\n== {name} ==")
    closed, virtual = row["sync_rounds_closed"], row["sync_virtual_s"]
    print(f"sync: {closed} rounds closed in {virtual:.0f} virtual s")
    reached = _fmt(row["async_time_to_sync_final_s"], ".0f")
    print(
        f"async: {row['async_versions_closed']} versions in {row['async_virtual_s']:.0f} "
        f"virtual s; reached the sync final AUROC at every site after {reached} s "
        f"(ratio to sync {_fmt(row['time_ratio'])}; goal <= 0.333)"
    )
    columns = ("sync AUROC", "async AUROC", "sync share", "async share", "stale")
    print(f"{'site':<18}" + "".join(f"{c:>12}" for c in columns))
    for site, target in row["target_auroc"].items():
        print(
            f"{site:<18}{target:>12.3f}{row['async_final_auroc'][site]:>12.3f}"
            f"{row['sync_share'][site]:>12.3f}{row['async_share'][site]:>12.3f}"
            f"{row['stale_refused'].get(site, 0):>12d}"
        )
    for site in slow:
        ratio = _fmt(row["slow_share_ratio"][site])
        print(f"{site}: async share / sync share = {ratio} (goal >= 0.5)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow-factor", type=float, default=10.0)
    parser.add_argument("--availability", type=float, default=0.7)
    parser.add_argument("--offline-s", type=float, default=600.0)
    parser.add_argument("--train-s", type=float, default=60.0)
    parser.add_argument("--buffer", type=int, default=4)
    parser.add_argument("--min-sites", type=int, default=3)
    parser.add_argument("--flushes", type=int, default=60)
    parser.add_argument("--heart-buffer", type=int, default=3)
    parser.add_argument("--heart-min-sites", type=int, default=2)
    parser.add_argument("--heart-flushes", type=int, default=20)
    parser.add_argument("--max-staleness", type=int, default=20)
    parser.add_argument("--async-deadline-s", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--heart-data", type=Path, default=HEART_DATA)
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--skip-heart", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_builtin:
        out["builtin"] = builtin(args)
        report(
            "built-in hospitals (demo study: secure aggregation, DP)", out["builtin"], SLOW_BUILTIN
        )
    if not args.skip_heart:
        out["heart"] = heart(args)
        for i, row in enumerate(out["heart"]["per_seed"]):
            report(f"heart disease, seed {i}", row, SLOW_HEART)
        print(
            f"\nheart Avg accuracy: sync {out['heart']['sync_avg_accuracy']:.3f}, "
            f"async {out['heart']['async_avg_accuracy']:.3f} (goal >= 0.73)"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
