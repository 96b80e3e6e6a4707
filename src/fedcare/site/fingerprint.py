"""A fingerprint of the data a site trains a study on, kept per study at the site.

A site that restarts on a changed data file (an export re-run, rows dropped) would
otherwise train on it without anyone noticing. The agent compares the file with the
fingerprint it kept and, when they differ, warns and writes the change (digests and
row counts, never the data) to the site's audit trail.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedcare.audit import AuditLog
from fedcare.durable import write_file_atomically
from fedcare.ids import SHA256_HEX
from fedcare.sources.spec import FhirSource, Source, TableSource


class DataFingerprint(BaseModel):
    """What identifies a data file: its digest and its row counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=SHA256_HEX)
    rows: int = Field(ge=0)
    n_train: int = Field(ge=0)


def data_digest(path: Path) -> str:
    """SHA-256 of a data file, streamed; of an image folder, over every file's relative
    path and content in path order (a changed, added or removed image changes it)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_digest(source: Source, frame: pd.DataFrame) -> str:
    """SHA-256 of a table file or FHIR export folder as stored; of an OMOP database, over
    the extracted table (a database's files say nothing about one study's rows)."""
    if isinstance(source, TableSource | FhirSource):
        return data_digest(source.path)
    digest = hashlib.sha256(",".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def source_label(source: Source) -> str:
    """How a source is named in the site's log: its path, or its URL without a password."""
    if isinstance(source, TableSource | FhirSource):
        return str(source.path)
    from sqlalchemy.engine import make_url

    return make_url(source.url).render_as_string(hide_password=True)


def fingerprint_path(state_dir: Path, study_hash: str) -> Path:
    return state_dir / f"data-{study_hash[:16]}.json"


def check_data_fingerprint(
    state_dir: Path, study_hash: str, current: DataFingerprint, audit: AuditLog
) -> DataFingerprint | None:
    """Keep ``current`` as the study's fingerprint; return the previous one when it
    differs (the caller warns). The first fingerprint and every change are audited."""
    path = fingerprint_path(state_dir, study_hash)
    previous = DataFingerprint.model_validate_json(path.read_bytes()) if path.is_file() else None
    if previous == current:
        return None
    if previous is None:
        audit.append("data.fingerprint", study=study_hash, **current.model_dump())
    else:
        audit.append(
            "data.changed",
            study=study_hash,
            **current.model_dump(),
            was={"sha256": previous.sha256, "rows": previous.rows, "n_train": previous.n_train},
        )
    write_file_atomically(path, current.model_dump_json().encode())
    return previous
