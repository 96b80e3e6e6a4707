"""The coordinator's per-round overhead with its store on PostgreSQL against SQLite, in
one run.

Run from the repository root with the project's venv and a PostgreSQL server (``.ci/run``
starts one; give its maintenance URL)::

    .venv/bin/python benchmarks/postgres.py --postgres postgresql+psycopg://fedcare@127.0.0.1:PORT/postgres
        [--rounds 20] [--secure] [--json FILE]

Workload
    The demo study on the five built-in hospitals (DP-SGD as in the demo, so the sites'
    privacy budgets apply; secure aggregation off unless ``--secure``), ``--rounds``
    rounds, real processes on loopback over mutual TLS, the same run once with
    ``sqlite:///coordinator.db`` and once with a fresh PostgreSQL database, alternating
    twice (SQLite, PostgreSQL, SQLite, PostgreSQL) so drift in the machine's load hits
    both.

What is measured
    Per round, the coordinator's overhead: the round's wall time (opened to closed, from
    the coordinator's state) minus the slowest site's training time that round (from
    the sites' own logs): the cost of the store, the protocol and the network. Median
    and mean over rounds 2.. (round 1 includes the sites' start-up), per backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

from fedcare.data import demo_study
from fedcare.simulation.loopback import run_network_demo


def fresh_database(admin_url: str) -> tuple[str, str]:
    """A new, empty database on the server: (its name, its URL)."""
    name = f"fedcare_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop a database :func:`fresh_database` made."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", required=True, help="PostgreSQL maintenance URL")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--secure", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    study = demo_study()
    study = study.replace(
        rounds={**study.canonical()["rounds"], "count": args.rounds},
        secure_aggregation={**study.canonical()["secure_aggregation"], "enabled": args.secure},
    )
    overheads: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    walls: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    for backend in ("sqlite", "postgresql", "sqlite", "postgresql"):
        with tempfile.TemporaryDirectory() as tmp:
            name = None
            database = "sqlite:///coordinator.db"
            if backend == "postgresql":
                name, database = fresh_database(args.postgres)
            try:
                result = run_network_demo(
                    Path(tmp), study, 7, 1.0, lambda *_: None, timeout_s=900, database=database
                )
            finally:
                if name is not None:
                    drop_database(args.postgres, name)
        overheads[backend] += result.coordinator_overhead_s[1:]
        walls[backend].append(result.network_wall_s)
    print(
        f"demo study, 5 hospitals, {args.rounds} rounds, "
        f"secure aggregation {'on' if args.secure else 'off'}, DP-SGD on; two runs per backend"
    )
    summary = {}
    for backend, values in overheads.items():
        summary[backend] = {
            "median_s": statistics.median(values),
            "mean_s": statistics.fmean(values),
            "rounds": len(values),
            "wall_s": walls[backend],
        }
        print(
            f"  {backend:<10} coordinator overhead per round: median "
            f"{summary[backend]['median_s'] * 1000:.0f} ms, mean "
            f"{summary[backend]['mean_s'] * 1000:.0f} ms over {len(values)} rounds; "
            f"study wall {', '.join(f'{w:.1f}' for w in walls[backend])} s"
        )
    ratio = summary["postgresql"]["median_s"] / summary["sqlite"]["median_s"]
    print(f"  PostgreSQL / SQLite (median): {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
