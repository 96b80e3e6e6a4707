"""The coordinator's durable state in SQL (SQLAlchemy 2; SQLite with WAL by default).

Every state change is one transaction, so after ``kill -9`` the coordinator
resumes from the last committed change: a round is either closed with its
model recorded, or still open with the submissions it had. Model files live on
disk beside the database; the database holds their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class StoreError(RuntimeError):
    """Persisted state that is missing, inconsistent or corrupted."""


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec_json: Mapped[str] = mapped_column(Text)
    sites_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="running")
    last_round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class RoundRow(Base):
    __tablename__ = "rounds"

    study_hash: Mapped[str] = mapped_column(ForeignKey("studies.hash"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(20))
    selected_json: Mapped[str] = mapped_column(Text)
    min_sites: Mapped[int] = mapped_column(Integer)
    deadline: Mapped[float] = mapped_column(Float)
    extensions_left: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class SubmissionRow(Base):
    __tablename__ = "submissions"

    study_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    n_samples: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    __tablename__ = "models"

    study_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class StoredRound:
    number: int
    status: str
    selected: tuple[str, ...]
    min_sites: int
    deadline: float
    extensions_left: int
    reason: str
    submissions: dict[str, bytes]


@dataclass(frozen=True)
class StoredModel:
    round: int
    path: Path
    sha256: str


def sqlite_pragmas(engine: Engine) -> None:
    """WAL, synchronous=FULL and foreign keys on every new SQLite connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # WAL: readers never block the writer; synchronous=FULL: a committed
        # transaction survives power loss, not only a process kill.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class SqlStore:
    """Studies, rounds, submissions and model records in one SQL database."""

    def __init__(self, url: str, storage: Path) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            sqlite_pragmas(self.engine)
        Base.metadata.create_all(self.engine)
        self.storage = storage

    def close(self) -> None:
        self.engine.dispose()

    def register_study(self, study_hash: str, name: str, spec_json: str, sites: list[str]) -> bool:
        """Record a study the first time (returns True then); refuse a changed site list."""
        with Session(self.engine) as session, session.begin():
            row = session.get(StudyRow, study_hash)
            if row is None:
                session.add(
                    StudyRow(
                        hash=study_hash,
                        name=name,
                        spec_json=spec_json,
                        sites_json=json.dumps(sorted(sites)),
                        status="running",
                        last_round=0,
                        created_at=time.time(),
                    )
                )
                return True
            if json.loads(row.sites_json) != sorted(sites):
                raise StoreError(
                    f"study {study_hash[:12]} was started with sites {json.loads(row.sites_json)}; "
                    f"the config now lists {sorted(sites)}"
                )
            return False

    def study_progress(self, study_hash: str) -> tuple[str, int]:
        """(status, last finished round)."""
        with Session(self.engine) as session:
            row = session.get(StudyRow, study_hash)
            if row is None:
                raise StoreError(f"unknown study {study_hash[:12]}")
            return row.status, row.last_round

    def latest_model(self, study_hash: str) -> StoredModel | None:
        with Session(self.engine) as session:
            row = session.scalars(
                select(ModelRow)
                .where(ModelRow.study_hash == study_hash)
                .order_by(ModelRow.round.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
            return StoredModel(round=row.round, path=Path(row.path), sha256=row.sha256)

    def read_model(self, model: StoredModel) -> bytes:
        """The model file's bytes, checked against the recorded checksum."""
        try:
            data = model.path.read_bytes()
        except OSError as exc:
            raise StoreError(f"model file {model.path} is unreadable: {exc.strerror}") from exc
        if sha256_hex(data) != model.sha256:
            raise StoreError(f"model file {model.path} does not match its recorded checksum")
        return data

    def open_round(self, study_hash: str) -> StoredRound | None:
        """The round that is open or collecting, with its submissions, if any."""
        with Session(self.engine) as session:
            row = session.scalars(
                select(RoundRow).where(
                    RoundRow.study_hash == study_hash,
                    RoundRow.status.in_(("open", "collecting")),
                )
            ).first()
            if row is None:
                return None
            subs = session.scalars(
                select(SubmissionRow).where(
                    SubmissionRow.study_hash == study_hash, SubmissionRow.round == row.number
                )
            ).all()
            for sub in subs:
                if sha256_hex(sub.payload) != sub.sha256:
                    raise StoreError(
                        f"stored update of {sub.site} for round {sub.round} is corrupt"
                    )
            return StoredRound(
                number=row.number,
                status=row.status,
                selected=tuple(json.loads(row.selected_json)),
                min_sites=row.min_sites,
                deadline=row.deadline,
                extensions_left=row.extensions_left,
                reason=row.reason,
                submissions={s.site: s.payload for s in subs},
            )

    def save_opened_round(
        self,
        study_hash: str,
        number: int,
        selected: tuple[str, ...],
        min_sites: int,
        deadline: float,
        extensions_left: int,
    ) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(
                RoundRow(
                    study_hash=study_hash,
                    number=number,
                    status="open",
                    selected_json=json.dumps(list(selected)),
                    min_sites=min_sites,
                    deadline=deadline,
                    extensions_left=extensions_left,
                    reason="",
                    opened_at=time.time(),
                )
            )

    def save_submission(
        self, study_hash: str, number: int, site: str, n_samples: int, payload: bytes
    ) -> None:
        """Persist an accepted update and move the round to collecting, atomically."""
        with Session(self.engine) as session, session.begin():
            session.add(
                SubmissionRow(
                    study_hash=study_hash,
                    round=number,
                    site=site,
                    n_samples=n_samples,
                    sha256=sha256_hex(payload),
                    payload=payload,
                    received_at=time.time(),
                )
            )
            row = session.get(RoundRow, (study_hash, number))
            if row is None:
                raise StoreError(f"round {number} was never opened")
            row.status = "collecting"
        # IntegrityError (a second row for the same site) propagates: the
        # in-memory round refuses duplicates first, so this is a real conflict.

    def save_extended(self, study_hash: str, number: int, deadline: float, left: int) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(RoundRow, (study_hash, number))
            if row is None:
                raise StoreError(f"round {number} was never opened")
            row.deadline = deadline
            row.extensions_left = left

    def save_finished_round(
        self,
        study_hash: str,
        number: int,
        status: str,
        reason: str,
        model_bytes: bytes | None,
        study_finished: bool,
    ) -> None:
        """Close or fail a round; with a new model, write its file first, then commit.

        A crash between the file and the commit leaves the round open; on restart
        it is aggregated again from the same submissions and the file rewritten.
        """
        model_path = self.storage / study_hash[:16] / f"round-{number:05d}.safetensors"
        if model_bytes is not None:
            write_file_atomically(model_path, model_bytes)
        with Session(self.engine) as session, session.begin():
            row = session.get(RoundRow, (study_hash, number))
            study = session.get(StudyRow, study_hash)
            if row is None or study is None:
                raise StoreError(f"round {number} of study {study_hash[:12]} is not recorded")
            row.status = status
            row.reason = reason
            row.closed_at = time.time()
            study.last_round = number
            if study_finished:
                study.status = "finished"
            if model_bytes is not None:
                session.add(
                    ModelRow(
                        study_hash=study_hash,
                        round=number,
                        path=str(model_path),
                        sha256=sha256_hex(model_bytes),
                        created_at=time.time(),
                    )
                )

    def round_history(self, study_hash: str) -> list[dict[str, object]]:
        """Every round of a study, oldest first, for status pages."""
        with Session(self.engine) as session:
            rows = session.scalars(
                select(RoundRow).where(RoundRow.study_hash == study_hash).order_by(RoundRow.number)
            ).all()
            counts: dict[int, list[str]] = {}
            for sub in session.scalars(
                select(SubmissionRow).where(SubmissionRow.study_hash == study_hash)
            ).all():
                counts.setdefault(sub.round, []).append(sub.site)
            return [
                {
                    "number": r.number,
                    "status": r.status,
                    "selected": json.loads(r.selected_json),
                    "reported": sorted(counts.get(r.number, [])),
                    "reason": r.reason,
                    "opened_at": r.opened_at,
                    "closed_at": r.closed_at,
                }
                for r in rows
            ]


__all__ = ["IntegrityError", "SqlStore", "StoreError", "StoredModel", "StoredRound"]
