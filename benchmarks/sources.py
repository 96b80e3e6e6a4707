"""How fast a site reads its rows from a FHIR export and an OMOP database, against a CSV
of the same rows in the same run, and the peak memory of reading a 1 GB FHIR export.

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/sources.py [--rows 20000] [--gb 1.0]
        [--postgres postgresql+psycopg://fedcare@127.0.0.1:PORT/postgres] [--json FILE]

Workload
    The built-in ``northgate`` hospital (vitals and labs at admission, an unmapped body
    weight per patient) with ``--rows`` admissions, written once as CSV, as a FHIR R4 bulk
    export (NDJSON: a Patient, an Encounter, ten Observations and sometimes a Condition
    per admission) and as an OMOP CDM 5.4 database on SQLite and, with ``--postgres``,
    on a fresh PostgreSQL database. Files go to ``--work-dir`` (benchmarks/.work/sources).

What is measured
    Throughput: the wall time of reading each source through its mapping into the
    study schema (``read_source`` then the schema checks, ``apply_mapping``), best of
    ``--repeat`` runs in this process after a warm-up read; rows per second and the ratio
    to the CSV. Memory: a FHIR export of about ``--gb`` GB (the same hospital, more
    admissions) and the OMOP SQLite database of the same rows are each read in a fresh
    process; its peak RSS comes from the kernel (``wait4``), with the export's size and
    the read's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedcare.data import demo_study
from fedcare.data.exports import fhir_mapping, omop_mapping, write_fhir_export, write_omop_database
from fedcare.data.synthetic import HospitalCohort, generate_cohorts
from fedcare.schema.mapping import apply_mapping
from fedcare.sources.load import read_source
from fedcare.sources.spec import FhirSource, OmopSource, Source, TableSource

sys.path.insert(0, str(Path(__file__).resolve().parent))

from postgres import drop_database, fresh_database

NORTHGATE_ROWS = 20_000  # northgate's size at scale 1
BYTES_PER_ADMISSION = 4_100  # measured: an admission's resources as NDJSON


def northgate(rows: int) -> HospitalCohort:
    cohort = generate_cohorts(seed=2026, scale=rows / NORTHGATE_ROWS)[0]
    assert cohort.name == "northgate"
    return cohort


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_sources(
    cohort: HospitalCohort, folder: Path, postgres: str | None
) -> dict[str, tuple[Source, Path]]:
    """Each source with its mapping file."""
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "northgate.csv"
    cohort.frame.to_csv(csv, index=False)
    table_mapping = folder / "table.mapping.yaml"
    table_mapping.write_text(yaml.safe_dump(cohort.mapping.model_dump(mode="json")))
    fhir_map = folder / "fhir.mapping.yaml"
    fhir_map.write_text(yaml.safe_dump(fhir_mapping(cohort)))
    omop_map = folder / "omop.mapping.yaml"
    omop_map.write_text(yaml.safe_dump(omop_mapping(cohort)))
    write_fhir_export(cohort, folder / "fhir")
    sqlite = folder / "omop.sqlite"
    sqlite.unlink(missing_ok=True)
    write_omop_database(cohort, f"sqlite:///{sqlite}")
    sources: dict[str, tuple[Source, Path]] = {
        "csv": (TableSource(path=csv), table_mapping),
        "fhir": (FhirSource(kind="fhir", path=folder / "fhir"), fhir_map),
        "omop-sqlite": (OmopSource(kind="omop", url=f"sqlite:///{sqlite}"), omop_map),
    }
    if postgres is not None:
        write_omop_database(cohort, postgres)
        sources["omop-postgresql"] = (OmopSource(kind="omop", url=postgres), omop_map)
    return sources


def read_once(source: Source, mapping: Path) -> int:
    schema = demo_study().feature_schema
    table = read_source(source, mapping, schema)
    return len(apply_mapping(table.frame, table.mapping, schema).frame)


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = run()
        times.append(time.perf_counter() - started)
    return min(times), rows


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def child_read(kind: str, where: str, mapping: str) -> None:
    """In the measured process: read one source and print its rows and wall time."""
    path = Path(where)
    source: Source = (
        FhirSource(kind="fhir", path=path) if kind == "fhir" else OmopSource(kind="omop", url=where)
    )
    started = time.perf_counter()
    rows = read_once(source, Path(mapping))
    print(rows, time.perf_counter() - started)


def peak_read(kind: str, where: str, mapping: Path) -> dict[str, float]:
    """Read a source in a fresh process; its peak RSS (kernel's count), rows and wall."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--read", kind, where, str(mapping)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"reading {where} failed (exit {proc.returncode})")
    rows, wall = output.split()
    return {"rows": int(rows), "wall_s": float(wall), "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    if sys.argv[1:2] == ["--read"]:
        child_read(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="admissions for throughput")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--gb", type=float, default=1.0, help="FHIR export size for memory (0: skip)"
    )
    parser.add_argument("--postgres", help="PostgreSQL maintenance URL (a database is made)")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.work/sources"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"rows": args.rows, "throughput": {}, "memory": {}}

    pg_name = pg_url = None
    if args.postgres:
        pg_name, pg_url = fresh_database(args.postgres)
    try:
        note(f"writing {args.rows:,} admissions as CSV, FHIR and OMOP ...")
        sources = write_sources(northgate(args.rows), args.work_dir / "throughput", pg_url)
        for name, (source, mapping) in sources.items():
            read_once(source, mapping)  # warm-up: imports, caches
            wall, rows = best_of(args.repeat, lambda s=source, m=mapping: read_once(s, m))
            where = source.path if isinstance(source, TableSource | FhirSource) else None
            results["throughput"][name] = {
                "rows": rows,
                "wall_s": wall,
                "rows_per_s": rows / wall,
                "bytes": None if where is None else size_of(where),
            }
            note(f"  {name}: {rows / wall:,.0f} rows/s")
    finally:
        if pg_name is not None:
            drop_database(args.postgres, pg_name)

    if args.gb > 0:
        big_rows = round(args.gb * 1e9 / BYTES_PER_ADMISSION)
        note(f"writing a FHIR export of {big_rows:,} admissions (~{args.gb:g} GB) and OMOP ...")
        folder = args.work_dir / "memory"
        folder.mkdir(parents=True, exist_ok=True)
        cohort = northgate(big_rows)
        export = write_fhir_export(cohort, folder / "fhir")
        (folder / "fhir.mapping.yaml").write_text(yaml.safe_dump(fhir_mapping(cohort)))
        sqlite = folder / "omop.sqlite"
        sqlite.unlink(missing_ok=True)
        write_omop_database(cohort, f"sqlite:///{sqlite}")
        (folder / "omop.mapping.yaml").write_text(yaml.safe_dump(omop_mapping(cohort)))
        del cohort
        note("reading each in a fresh process ...")
        fhir = peak_read("fhir", str(export), folder / "fhir.mapping.yaml")
        fhir["bytes"] = size_of(export)
        omop = peak_read("omop", f"sqlite:///{sqlite}", folder / "omop.mapping.yaml")
        omop["bytes"] = size_of(sqlite)
        results["memory"] = {"fhir": fhir, "omop-sqlite": omop}

    csv_rate = results["throughput"]["csv"]["rows_per_s"]
    print(f"read into the study schema, {args.rows:,} admissions (best of {args.repeat})")
    print(f"{'source':<17}{'rows/s':>12}{'MB/s':>9}{'vs CSV':>9}")
    for name, row in results["throughput"].items():
        mb = "" if row["bytes"] is None else f"{row['bytes'] / 1e6 / row['wall_s']:.1f}"
        print(f"{name:<17}{row['rows_per_s']:>12,.0f}{mb:>9}{row['rows_per_s'] / csv_rate:>8.2f}x")
    if results["memory"]:
        print("\npeak memory reading one large source in a fresh process")
        print(f"{'source':<17}{'size MB':>9}{'rows':>10}{'wall s':>9}{'peak RSS MB':>13}")
        for name, row in results["memory"].items():
            size, peak = row["bytes"] / 1e6, row["peak_rss_mb"]
            print(f"{name:<17}{size:>9,.0f}{row['rows']:>10,}{row['wall_s']:>9.1f}{peak:>13,.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
