"""Peer comparison: the same federated workload in fedcare's simulation and in Flower.

Run with the project's venv, from the repository root::

    .venv/bin/python benchmarks/vs_flower.py [--json results.json] [--rounds 20]

Workload (identical on both sides)
    4 sites, 200 synthetic records each with 13 continuous features x1..x13 and a
    0/1 label y (numpy, fixed seed: a logistic ground truth, each site with its own
    shift of the feature means and of the intercept). Each site holds out 25% of
    its rows (150 train / 50 evaluation). Model: torch ``Linear(13, 1)`` with
    ``BCEWithLogitsLoss``; 1 local epoch of SGD per round, lr 0.05, batch size 32;
    FedAvg weighted by training samples; 20 rounds. The data, the fedcare study,
    the site list and the site mappings are written to ``--work-dir``
    (default ``benchmarks/.work/vs_flower/``).

fedcare side
    ``.venv/bin/fedcare simulate --study study.yaml --sites sites.yaml --out OUT
    --no-baselines``, as a subprocess.

Flower side
    ``benchmarks/_flower_app/flower_sim.py`` run as a subprocess with the Python of
    a separate venv, ``benchmarks/.venv-flower`` (created on first use: CPU torch
    first, then ``flwr[simulation]`` at the pinned version; Flower is never a
    fedcare dependency). It drives Flower through its Python simulation API,
    ``flwr.simulation.run_simulation`` with a ``ServerApp`` (message-API ``FedAvg``)
    and a ``ClientApp`` on the Ray backend; Ray gets 2 CPUs, 1 per client.
    Telemetry and Ray usage stats are switched off.

What is measured, and how
    wall_s: from starting the subprocess to its exit, so interpreter start,
        imports, framework start-up (Ray included) and shutdown all count: it is
        the time a user waits for the run.
    peak_rss_mb: every ``--sample-ms`` (25 ms) the harness reads ``/proc`` and sums
        the resident set size of the subprocess and of every process descending
        from it or sharing its session (Ray's GCS, raylet and worker processes
        included); the peak of that sum is reported. Shared pages (libraries, the
        Ray object store) count once per process that maps them, as RSS does.
    CPU (s): user + system time of the tree's processes, as last sampled.
    other load: the share of the machine's CPU that went to anything else during
        the run (from /proc/stat, less the tree and this harness). Above 10% the
        run is flagged as unreliable; ``--wait-idle SECONDS`` waits for a quiet
        machine before each run.
    Before timing, each venv imports its heavy modules once, untimed, so that
    neither side pays for a cold file cache the other does not.
    speedup = flower wall / fedcare wall; memory_ratio = fedcare peak / Flower
    peak. The goal is speedup >= 10 and memory_ratio <= 0.25; the script prints
    whether each is met.

Each run is bounded by ``--timeout`` (900 s); on timeout its process group is
killed and the run is reported as timed out. After each run every process of its
tree that is still alive is terminated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_WORK_DIR = BENCH_DIR / ".work" / "vs_flower"
FLOWER_VENV = BENCH_DIR / ".venv-flower"
FLOWER_APP = BENCH_DIR / "_flower_app" / "flower_sim.py"
FEDCARE_CLI = REPO_ROOT / ".venv" / "bin" / "fedcare"

# The versions the Flower venv is built with. torch must be installed first and
# exactly at this version: pip then takes the CPU wheel from local disk.
TORCH_VERSION = "2.13.0"
FLWR_VERSION = "1.42.0"

N_SITES = 4
N_FEATURES = 13
RECORDS_PER_SITE = 200
HOLDOUT_FRACTION = 0.25
EPOCHS = 1
BATCH_SIZE = 32
LEARNING_RATE = 0.05
SEED = 2026

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
"""Flower's and Ray's environment for a measured run: no telemetry, no warnings."""

SPEEDUP_GOAL = 10.0
MEMORY_RATIO_GOAL = 0.25

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_COUNT = os.cpu_count() or 1
BUSY_WARNING = 0.10  # share of the machine's CPU used by others that makes a run suspect


def log(message: str) -> None:
    print(f"[vs_flower] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def feature_names() -> list[str]:
    return [f"x{i}" for i in range(1, N_FEATURES + 1)]


def write_workload(
    work_dir: Path, rounds: int, seed: int = SEED, n_sites: int = N_SITES
) -> tuple[Path, Path, Path]:
    """Write site CSVs, mappings, ``sites.yaml`` and ``study.yaml``; return (data, study, sites)."""
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = feature_names()
    weights = rng.normal(0.0, 1.0, N_FEATURES) * (2.0 / math.sqrt(N_FEATURES))
    intercept = -0.3
    sites = []
    for index in range(1, n_sites + 1):
        site = f"site-{index}"
        mean_shift = rng.normal(0.0, 0.5, N_FEATURES)
        intercept_shift = rng.normal(0.0, 0.5)
        x = rng.normal(mean_shift, 1.0, size=(RECORDS_PER_SITE, N_FEATURES))
        logits = x @ weights + intercept + intercept_shift
        y = (rng.random(RECORDS_PER_SITE) < 1.0 / (1.0 + np.exp(-logits))).astype(int)
        lines = [",".join([*names, "y"])]
        lines += [
            ",".join([*(f"{v:.6f}" for v in row), str(label)])
            for row, label in zip(x, y, strict=True)
        ]
        (data_dir / f"{site}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        mapping = {"site": site, "features": {n: n for n in names}, "label": "y"}
        (data_dir / f"{site}.mapping.yaml").write_text(
            yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8"
        )
        sites.append({"name": site, "data": f"{site}.csv", "mapping": f"{site}.mapping.yaml"})
    sites_path = data_dir / "sites.yaml"
    sites_path.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False), encoding="utf-8")

    study = {
        "name": "vs-flower-logreg",
        "description": "Benchmark workload shared with Flower (benchmarks/vs_flower.py).",
        "schema": {
            "label": {"name": "y"},
            "features": [{"name": n, "missing": {"rule": "refuse"}} for n in names],
        },
        "model": {"kind": "logistic_regression"},
        "training": {
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "optimizer": "sgd",
            "learning_rate": LEARNING_RATE,
        },
        "aggregation": {"strategy": "fedavg", "weighting": "samples"},
        "preprocessing": {"scaling": "none", "holdout_fraction": HOLDOUT_FRACTION},
        "rounds": {"count": rounds, "min_sites": n_sites},
        "seed": seed,
    }
    study_path = work_dir / "study.yaml"
    study_path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return data_dir, study_path, sites_path


# ------------------------------------------------------------------ measurement


class ProcStat(NamedTuple):
    ppid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, it names one process
    cpu_ticks: int  # user + system time so far


def _stat(pid: int) -> ProcStat | None:
    """The fields of ``/proc/PID/stat`` the sampler needs, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = text[text.rindex(b")") + 2 :].split()
    return ProcStat(
        int(fields[1]), int(fields[3]), int(fields[19]), int(fields[11]) + int(fields[12])
    )


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def _busy_ticks() -> int:
    """CPU time spent by the whole machine, all cores, in clock ticks (not idle, not iowait)."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


@dataclass
class TreeSampler:
    """Samples the summed RSS (and the CPU time) of a process tree in a background thread."""

    root: int
    interval_s: float
    peak_bytes: int = 0
    peak_processes: int = 0
    samples: int = 0
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time
    cpu: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, start) -> ticks
    _cache: dict[int, ProcStat] = field(default_factory=dict)
    _members: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def members(self) -> list[int]:
        """The root, its descendants and any process in its session."""
        # /proc/PID/stat is read once per process and cached while the pid lives;
        # only members are re-read (a parent may change when a process is orphaned).
        live = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for pid in self._cache.keys() - live:
            del self._cache[pid]
        for pid in live - self._cache.keys() | self._members:
            info = _stat(pid)
            if info is None:
                self._cache.pop(pid, None)
            else:
                self._cache[pid] = info
        children: dict[int, list[int]] = {}
        for pid, info in self._cache.items():
            children.setdefault(info.ppid, []).append(pid)
        found = {pid for pid, info in self._cache.items() if info.sid == self.root}
        stack = [self.root] if self.root in self._cache else []
        while stack:
            pid = stack.pop()
            found.add(pid)
            stack.extend(children.get(pid, []))
        for pid in found:
            info = self._cache[pid]
            self.seen.setdefault(pid, info.start)
            self.cpu[pid, info.start] = info.cpu_ticks
        self._members = found
        return sorted(found)

    @property
    def cpu_s(self) -> float:
        """CPU time of the tree, as last seen for each of its processes."""
        return sum(self.cpu.values()) / CLK_TCK

    def sample(self) -> None:
        pids = self.members()
        total = sum(_rss_bytes(pid) for pid in pids)
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def survivors(self) -> list[int]:
        """Processes seen in the tree that are still alive (same pid and start time)."""
        self.members()
        alive = []
        for pid, started in self.seen.items():
            info = _stat(pid)
            if info is not None and info.start == started:
                alive.append(pid)
        return sorted(alive)


@dataclass
class RunResult:
    name: str
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    returncode: int | None = None
    timed_out: bool = False
    error: str | None = None
    peak_processes: int = 0
    samples: int = 0
    leftovers_killed: int = 0
    cpu_s: float = 0.0
    other_load: float = 0.0
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s is not None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "cpu_s": round(self.cpu_s, 2),
            "other_load": round(self.other_load, 3),
        }
        if self.error is not None:
            data["error"] = self.error
        return data


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in argv[:2])[:80]


def _signal_pids(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _clean_up(sampler: TreeSampler) -> int:
    """Terminate, then kill, every process of the run that is still alive."""
    survivors = sampler.survivors()
    if not survivors:
        return 0
    names = ", ".join(f"{pid} {_command_name(pid)}" for pid in survivors)
    log(f"ending what is left of the run: {names}")
    _signal_pids(survivors, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and sampler.survivors():
        time.sleep(0.1)
    remaining = sampler.survivors()
    _signal_pids(remaining, signal.SIGKILL)
    return len(survivors)


def measure(
    name: str,
    command: list[str],
    log_path: Path,
    timeout_s: float,
    interval_s: float,
    env: dict[str, str],
) -> RunResult:
    """Run ``command`` in its own session; time it and sample its tree's RSS."""
    result = RunResult(name=name, log_path=log_path)
    log(f"{name}: running {' '.join(command)}")
    log(f"{name}: output goes to {log_path}")
    with log_path.open("wb") as output:
        busy_before, own_before = _busy_ticks(), time.process_time()
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
        )
        sampler = TreeSampler(root=process.pid, interval_s=interval_s)
        sampler.sample()
        sampler.start()
        try:
            result.returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            log(f"{name}: timed out after {timeout_s:.0f} s, killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        wall = time.perf_counter() - started
        sampler.stop()
        machine_cpu_s = (_busy_ticks() - busy_before) / CLK_TCK
        own_cpu_s = time.process_time() - own_before
    result.leftovers_killed = _clean_up(sampler)
    if result.leftovers_killed:
        log(f"{name}: {result.leftovers_killed} process(es) outlived the run and were ended")
    result.samples = sampler.samples
    result.peak_processes = sampler.peak_processes
    result.peak_rss_mb = sampler.peak_bytes / 2**20
    result.cpu_s = sampler.cpu_s
    # CPU the machine spent on anything but this run and this harness: other
    # people's work competing for the same cores.
    other_s = max(0.0, machine_cpu_s - sampler.cpu_s - own_cpu_s)
    result.other_load = other_s / (wall * CPU_COUNT)
    if result.other_load > BUSY_WARNING:
        log(
            f"{name}: WARNING: other processes used {result.other_load:.0%} of the machine's "
            f"CPU during this run; its figures are not reliable (run on an idle machine)"
        )
    if result.timed_out:
        result.error = f"timed out after {timeout_s:.0f} s"
    elif result.returncode != 0:
        result.error = f"exited with status {result.returncode}"
    else:
        result.wall_s = wall
    if result.error is not None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        log(f"{name}: {result.error}; last lines of its output:")
        for line in tail:
            print(f"    {line}", file=sys.stderr)
    else:
        log(
            f"{name}: {wall:.2f} s, peak {result.peak_rss_mb:.1f} MB over up to "
            f"{sampler.peak_processes} process(es), {sampler.samples} samples, "
            f"{result.cpu_s:.1f} CPU-s"
        )
    return result


# ---------------------------------------------------------------- Flower venv


def _flower_python() -> Path:
    return FLOWER_VENV / "bin" / "python"


def _flower_versions() -> tuple[str, str] | None:
    """(flwr, torch) versions in the Flower venv, or None if it does not work."""
    python = _flower_python()
    if not python.exists():
        return None
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import flwr, ray, torch; print(flwr.__version__); print(torch.__version__)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = probe.stdout.split()
    if probe.returncode != 0 or len(lines) != 2:
        return None
    return lines[0], lines[1]


def ensure_flower_venv(skip_install: bool) -> str:
    """Make sure the Flower venv exists with the pinned versions; return flwr's version."""
    versions = _flower_versions()
    wanted = (FLWR_VERSION, TORCH_VERSION)
    if (
        versions is not None
        and versions[0] == FLWR_VERSION
        and versions[1].startswith(TORCH_VERSION + "+cpu")
    ):
        log(f"Flower venv {FLOWER_VENV} works (flwr {versions[0]}, torch {versions[1]})")
        return versions[0]
    if skip_install:
        found = "missing or broken" if versions is None else f"has flwr/torch {versions}"
        raise SystemExit(
            f"--skip-install: the Flower venv {FLOWER_VENV} is {found}; "
            f"it needs flwr {wanted[0]} and CPU torch {wanted[1]}"
        )
    if not _flower_python().exists():
        log(f"creating the Flower venv at {FLOWER_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    pip = [str(_flower_python()), "-m", "pip", "install", "--quiet"]
    # torch first and exactly pinned, so pip takes the CPU build, not a CUDA one.
    log(f"installing torch=={TORCH_VERSION} into the Flower venv")
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    log(f"installing flwr[simulation]=={FLWR_VERSION} into the Flower venv (a few minutes)")
    subprocess.run([*pip, f"flwr[simulation]=={FLWR_VERSION}"], check=True)
    versions = _flower_versions()
    if versions is None or versions[0] != FLWR_VERSION:
        raise SystemExit(f"the Flower venv at {FLOWER_VENV} still does not work: {versions}")
    return versions[0]


# ------------------------------------------------------------------------ main


def wait_for_idle(limit_s: float, threshold: float = BUSY_WARNING) -> None:
    """Wait, at most ``limit_s``, until the machine's CPU is mostly idle for a second."""
    if limit_s <= 0:
        return
    deadline = time.monotonic() + limit_s
    announced = False
    while True:
        before = _busy_ticks()
        time.sleep(1.0)
        busy = (_busy_ticks() - before) / CLK_TCK / CPU_COUNT
        if busy <= threshold:
            return
        if time.monotonic() >= deadline:
            log(f"the machine is still {busy:.0%} busy after {limit_s:.0f} s; measuring anyway")
            return
        if not announced:
            log(f"the machine is {busy:.0%} busy with other work; waiting for it to quiet down")
            announced = True


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env.update(extra)
    return env


def _warm_up(python: Path, modules: str) -> None:
    """Import heavy modules once, untimed, so file-cache state is alike for both sides."""
    subprocess.run(
        [str(python), "-c", f"import {modules}"],
        check=False,
        capture_output=True,
        timeout=300,
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_table(fedcare: RunResult, flower: RunResult, flwr_version: str | None) -> None:
    speedup = _ratio(flower.wall_s, fedcare.wall_s)
    memory_ratio = _ratio(fedcare.peak_rss_mb, flower.peak_rss_mb)
    label = f"Flower {flwr_version}" if flwr_version else "Flower"
    print()
    header = f"{'':<16}{'wall (s)':>10}{'peak RSS (MB)':>15}{'processes':>11}{'CPU (s)':>9}"
    print(f"{header}{'other load':>12}  status")
    for name, run in (("fedcare", fedcare), (label, flower)):
        status = "ok" if run.ok else (run.error or "not run")
        measured = run.samples > 0
        print(
            f"{name:<16}{_fmt(run.wall_s, '.2f'):>10}"
            f"{_fmt(run.peak_rss_mb if measured else None, '.1f'):>15}"
            f"{run.peak_processes if measured else 'n/a':>11}"
            f"{_fmt(run.cpu_s if measured else None, '.1f'):>9}"
            f"{_fmt(100 * run.other_load if measured else None, '.0f', '%'):>12}  {status}"
        )
    busy = [run.name for run in (fedcare, flower) if run.other_load > BUSY_WARNING]
    if busy:
        print(
            f"WARNING: other processes loaded the machine during: {', '.join(busy)} "
            f"(over {BUSY_WARNING:.0%} of its CPU); rerun on an idle machine."
        )
    print()
    speedup_met = speedup is not None and speedup >= SPEEDUP_GOAL
    memory_met = memory_ratio is not None and memory_ratio <= MEMORY_RATIO_GOAL
    print(
        f"speedup (Flower wall / fedcare wall):       {_fmt(speedup, '.1f', 'x'):>8}   "
        f"goal >= {SPEEDUP_GOAL:.0f}x: {_verdict(speedup, speedup_met)}"
    )
    print(
        f"memory ratio (fedcare peak / Flower peak):  {_fmt(memory_ratio, '.3f'):>8}   "
        f"goal <= {MEMORY_RATIO_GOAL}: {_verdict(memory_ratio, memory_met)}"
    )


def _verdict(value: float | None, met: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if met else "NOT met"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run one federated workload in fedcare and in Flower; compare wall time "
        "and peak memory of each run's whole process tree.",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="where data, study and outputs go (default benchmarks/.work/vs_flower)",
    )
    parser.add_argument(
        "--skip-install",
        action="store_true",
        help="never create or change the Flower venv; fail if it is missing or broken",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed per run (default 900)"
    )
    parser.add_argument(
        "--sample-ms", type=float, default=25.0, help="RSS sampling interval (default 25 ms)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to leave the CPU idle",
    )
    parser.add_argument(
        "--only",
        choices=["fedcare", "flower"],
        help="run one side only (no ratios); for checking a half of the benchmark",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir: Path = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir, study_path, sites_path = write_workload(work_dir, args.rounds)
    log(
        f"workload: {N_SITES} sites x {RECORDS_PER_SITE} records, {N_FEATURES} features, "
        f"{args.rounds} rounds; files in {work_dir}"
    )
    interval = args.sample_ms / 1000.0
    fedcare = RunResult(name="fedcare")
    flower = RunResult(name="flower")
    flwr_version: str | None = None

    if args.only != "fedcare":
        flwr_version = ensure_flower_venv(args.skip_install)
    if args.only != "flower" and not FEDCARE_CLI.exists():
        raise SystemExit(f"the fedcare CLI is missing: {FEDCARE_CLI} (install the project venv)")

    log("warming the file cache (untimed imports in both venvs)")
    if args.only != "flower":
        _warm_up(FEDCARE_CLI.parent / "python", "torch, numpy, pandas, fedcare")
    if args.only != "fedcare":
        _warm_up(_flower_python(), "torch, numpy, ray, flwr.simulation")

    if args.only != "flower":
        out_dir = work_dir / "fedcare-out"
        shutil.rmtree(out_dir, ignore_errors=True)
        wait_for_idle(args.wait_idle)
        fedcare = measure(
            "fedcare",
            [
                str(FEDCARE_CLI),
                "simulate",
                "--study",
                str(study_path),
                "--sites",
                str(sites_path),
                "--out",
                str(out_dir),
                "--no-baselines",
            ],
            work_dir / "fedcare.log",
            args.timeout,
            interval,
            _child_env({}),
        )

    if args.only != "fedcare":
        result_path = work_dir / "flower-result.json"
        result_path.unlink(missing_ok=True)
        wait_for_idle(args.wait_idle)
        flower = measure(
            "flower",
            [
                str(_flower_python()),
                str(FLOWER_APP),
                "--data-dir",
                str(data_dir),
                "--result",
                str(result_path),
                "--rounds",
                str(args.rounds),
                "--epochs",
                str(EPOCHS),
                "--batch-size",
                str(BATCH_SIZE),
                "--lr",
                str(LEARNING_RATE),
                "--holdout-fraction",
                str(HOLDOUT_FRACTION),
                "--seed",
                str(SEED),
                "--num-cpus",
                "2",
                "--cpus-per-client",
                "1",
            ],
            work_dir / "flower.log",
            args.timeout,
            interval,
            _child_env(FLOWER_ENV),
        )
        if flower.ok and result_path.exists():
            summary = json.loads(result_path.read_text(encoding="utf-8"))
            log(f"flower: final federated evaluation {summary.get('final_eval')}")

    print_table(fedcare, flower, flwr_version)
    speedup = _ratio(flower.wall_s, fedcare.wall_s)
    memory_ratio = _ratio(fedcare.peak_rss_mb, flower.peak_rss_mb)
    if args.json is not None:
        report = {
            "fedcare": fedcare.as_json(),
            "flower": flower.as_json(),
            "speedup": None if speedup is None else round(speedup, 3),
            "memory_ratio": None if memory_ratio is None else round(memory_ratio, 4),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"results written to {args.json}")
    ran = [run for run in (fedcare, flower) if args.only in (None, run.name)]
    return 0 if all(run.ok for run in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
