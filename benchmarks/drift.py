"""Drift monitor: detection rate per scenario, false alarms without drift, label-free
AUROC against measured AUROC, and the time of ``fedcare site monitor`` on 10,000 rows.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/drift.py [--hospital ashby-general] [--rows 1000]
        [--seeds 100] [--rounds 20] [--big-rows 10000] [--no-dp] [--json FILE]

Workload
    The demo study (MLP, secure aggregation, DP-SGD at epsilon 4) is trained on the five
    built-in hospitals for ``--rounds`` rounds. At ``--hospital`` the final model is
    validated on the hospital's held-out patients and its reference profile frozen,
    exactly as a site agent does when a release is promoted (``site.profiles``). Then,
    for each of ``--seeds`` seeds, ``--rows`` later admissions are drawn at the hospital
    for every scenario of ``fedcare.data.drift`` at its declared strength, and the
    monitor (``site.monitor.monitor_table``, the command's own path) runs on them with
    their labels.

What is measured
    detected: share of seeds whose overall verdict (Benjamini-Hochberg at the study's
        FDR 0.05) is drift; for "none" this is the false-alarm rate.
    AUROC error: |label-free CBPE estimate - measured AUROC| per seed: mean, 90th
        percentile and the share of seeds within 0.03; the mean signed error (bias); and
        the share of seeds whose estimate lies inside the measured AUROC's own 95 %
        bootstrap interval (the measured AUROC on 1,000 patients is itself uncertain).
    command time: wall time of ``fedcare site monitor --no-send`` as a process on
        ``--big-rows`` later admissions (labels included), median of three runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from fedcare.data import demo_study
from fedcare.data.drift import DEFAULT_STRENGTH, DriftScenario, hospital_profile, later_admissions
from fedcare.data.synthetic import generate_cohorts
from fedcare.simulation.drift_demo import freeze_reference
from fedcare.simulation.runner import run_federation
from fedcare.simulation.sites import builtin_sites
from fedcare.site.monitor import frame_digest, monitor_table
from fedcare.site.profiles import ProfileStore
from fedcare.study import Study


def freeze(study: Study, hospital: str, state_dir: Path, seed: int) -> None:
    sites, _ = builtin_sites(study, seed)
    run = run_federation(study, sites)
    data = next(s for s in sites if s.name == hospital)
    freeze_reference(study, data, run.params, len(run.rounds), state_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospital", default="ashby-general")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--big-rows", type=int, default=10_000)
    parser.add_argument(
        "--no-dp",
        action="store_true",
        help="Train without DP: the profile's inputs then describe all of the site's rows.",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    base = demo_study()
    study = base.replace(rounds={**base.canonical()["rounds"], "count": args.rounds})
    if args.no_dp:
        study = study.replace(privacy={"dp": False})
    hospital_profile(args.hospital)
    mapping = next(c.mapping for c in generate_cohorts(2026, 0.05) if c.name == args.hospital)
    out: dict[str, object] = {"hospital": args.hospital, "rows": args.rows, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = folder / "state"
        started = time.perf_counter()
        freeze(study, args.hospital, state, study.seed)
        print(f"trained and froze the reference in {time.perf_counter() - started:.1f} s")
        store = ProfileStore(state, study.content_hash)
        profile, _ = store.load()
        print(
            f"reference: {profile.n} held-out patients at {args.hospital} (prevalence "
            f"{profile.prevalence:.3f}); inputs from {profile.input_rows} rows "
            f"({profile.inputs_from})"
        )
        scenarios: dict[str, dict[str, float]] = {}
        for scenario in DriftScenario:
            detected, errors, signed, inside, times = 0, [], [], 0, []
            for seed in range(args.seeds):
                frame = later_admissions(args.hospital, args.rows, seed, scenario).frame
                t0 = time.perf_counter()
                digest = frame_digest(frame)
                result = monitor_table(study, mapping, None, store, frame, digest)
                times.append(time.perf_counter() - t0)
                detected += result.checks.drift
                est = result.checks.estimates.estimated_auroc
                measured = result.checks.estimates.measured_auroc
                if est is not None and measured is not None:
                    errors.append(abs(est - measured))
                    signed.append(est - measured)
                    overall = result.report.overall if result.report is not None else None
                    ci = getattr(overall, "auroc", None)
                    if ci is not None and ci.ci_low is not None and ci.ci_high is not None:
                        inside += ci.ci_low <= est <= ci.ci_high
            row = {
                "strength": DEFAULT_STRENGTH[scenario],
                "detected": detected / args.seeds,
                "auroc_error_mean": float(np.mean(errors)),
                "auroc_error_p90": float(np.percentile(errors, 90)),
                "within_0.03": float(np.mean(np.asarray(errors) <= 0.03)),
                "auroc_bias": float(np.mean(signed)),
                "inside_measured_ci": inside / args.seeds,
                "monitor_s": statistics.median(times),
            }
            scenarios[scenario.value] = row
            print(
                f"{scenario.value:<13} strength {row['strength']:<5g} detected "
                f"{100 * row['detected']:5.1f} %   |est-measured AUROC| mean "
                f"{row['auroc_error_mean']:.4f} p90 {row['auroc_error_p90']:.4f} "
                f"within 0.03 {100 * row['within_0.03']:.0f} % bias {row['auroc_bias']:+.4f} "
                f"in measured 95 % CI {100 * row['inside_measured_ci']:.0f} %   "
                f"monitor {1000 * row['monitor_s']:.0f} ms",
                flush=True,
            )
        out["scenarios"] = scenarios

        big = later_admissions(args.hospital, args.big_rows, 99_999).frame
        data_file = folder / "new.csv"
        big.to_csv(data_file, index=False)
        (folder / "mapping.yaml").write_text(yaml.safe_dump(mapping.model_dump(mode="json")))
        study_file = folder / "study.yaml"
        study_file.write_text(yaml.safe_dump(study.canonical(), sort_keys=False))
        config = folder / "site.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "site": args.hospital,
                    "coordinator": "https://127.0.0.1:9/",
                    "tls": {"cert": "none.crt", "key": "none.key", "ca": "none.crt"},
                    "study": str(study_file),
                    "mapping": str(folder / "mapping.yaml"),
                    "state_dir": str(state),
                }
            )
        )
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedcare",
                    "site",
                    "monitor",
                    "--config",
                    str(config),
                    "--data",
                    str(data_file),
                    "--no-send",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            walls.append(time.perf_counter() - t0)
            if done.returncode not in (0, 1):
                raise SystemExit(done.stdout + done.stderr)
        out["command_s"] = statistics.median(walls)
        print(
            f"fedcare site monitor on {args.big_rows:,} rows: {statistics.median(walls):.2f} s "
            f"(median of 3; runs {', '.join(f'{w:.2f}' for w in walls)} s)"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
