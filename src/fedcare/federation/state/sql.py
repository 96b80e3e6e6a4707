"""The study state in SQL (SQLAlchemy 2; SQLite with WAL by default): the networked
coordinator's store.

Every change is one transaction, so after ``kill -9`` the coordinator resumes
from the last committed change: a round is either closed with its model
recorded, or still open with the submissions it had. Model files live on disk
beside the database; the database holds their checksums.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sqlalchemy import (
    Connection,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    func,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedcare.durable import sha256_hex, sqlite_pragmas, write_file_atomically
from fedcare.federation.state.base import (
    FinishedRound,
    OpenedRound,
    SiteRecord,
    SiteState,
    StateError,
    StoredModel,
    StoredReport,
    StoredRound,
    StudyRecord,
)

SCHEMA_VERSION = 3


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    __tablename__ = "state_meta"

    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


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
    participants_json: Mapped[str] = mapped_column(Text, default="[]")
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


class SiteRow(Base):
    __tablename__ = "study_sites"

    study_hash: Mapped[str] = mapped_column(ForeignKey("studies.hash"), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    changed_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    missed: Mapped[int] = mapped_column(Integer, default=0)
    contributed: Mapped[int] = mapped_column(Integer, default=0)
    trained_for: Mapped[int] = mapped_column(Integer, default=0)


class ReportRow(Base):
    __tablename__ = "site_reports"

    study_hash: Mapped[str] = mapped_column(ForeignKey("studies.hash"), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    ref: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float] = mapped_column(Float)


class CertificateRow(Base):
    __tablename__ = "peer_certificates"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(20), primary_key=True)
    serial: Mapped[str] = mapped_column(String(64))
    not_after: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class SeenCertificate:
    """The certificate a peer last connected with: for expiry warnings."""

    name: str
    role: str
    serial: int
    not_after: float
    seen_at: float


def _record(row: SiteRow) -> SiteRecord:
    return SiteRecord(
        site=row.site,
        state=SiteState(row.state),
        reason=row.reason,
        changed_at=row.changed_at,
        last_seen=row.last_seen,
        missed=row.missed,
        contributed=row.contributed,
        trained_for=row.trained_for,
    )


def _study(row: StudyRow) -> StudyRecord:
    sites = tuple(json.loads(row.sites_json))
    return StudyRecord(
        row.hash, row.name, row.status, row.last_round, sites, row.created_at, row.spec_json
    )


def _round(row: RoundRow, submissions: dict[str, bytes]) -> StoredRound:
    return StoredRound(
        number=row.number,
        status=row.status,
        selected=tuple(json.loads(row.selected_json)),
        min_sites=row.min_sites,
        deadline=row.deadline,
        extensions_left=row.extensions_left,
        reason=row.reason,
        submissions=submissions,
        opened_at=row.opened_at,
        closed_at=row.closed_at,
        participants=tuple(json.loads(row.participants_json)),
    )


class SqlState:
    """:class:`~fedcare.federation.state.base.StudyState` in one SQL database."""

    def __init__(self, url: str, storage: Path) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            sqlite_pragmas(self.engine)
        self._check_version()
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            if session.get(MetaRow, "schema_version") is None:
                session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
        self.storage = storage
        self._claims: dict[str, Connection | TextIO] = {}

    def _check_version(self) -> None:
        tables = set(inspect(self.engine).get_table_names())
        if "studies" not in tables:
            return
        version = None
        if "state_meta" in tables:
            with Session(self.engine) as session:
                row = session.get(MetaRow, "schema_version")
                version = None if row is None else row.value
        if version != str(SCHEMA_VERSION):
            raise StateError(
                f"{self.engine.url}: the coordinator database was written by another fedcare "
                f"version (state schema {version or 1}, this one reads {SCHEMA_VERSION}); "
                "point database: at a new file"
            )

    def save_certificate(self, seen: SeenCertificate) -> None:
        """Record the certificate a peer connected with (the latest one per name and role)."""
        with Session(self.engine) as session, session.begin():
            row = session.get(CertificateRow, (seen.name, seen.role))
            if row is None:
                row = CertificateRow(name=seen.name, role=seen.role)
                session.add(row)
            row.serial, row.not_after, row.seen_at = (
                f"{seen.serial:x}",
                seen.not_after,
                seen.seen_at,
            )

    def certificates(self) -> list[SeenCertificate]:
        """Every peer's latest certificate, soonest to expire first."""
        with Session(self.engine) as session:
            rows = session.scalars(select(CertificateRow).order_by(CertificateRow.not_after))
            return [
                SeenCertificate(r.name, r.role, int(r.serial, 16), r.not_after, r.seen_at)
                for r in rows
            ]

    def claim(self, study_hash: str) -> None:
        """Serve ``study_hash`` from this database alone: a second coordinator that
        claims it while this one runs is refused with :class:`StateError`. Held until
        :meth:`close` or the process ends (``kill -9`` included): a PostgreSQL
        session-level advisory lock, or for SQLite a lock on a file beside the database."""
        if study_hash in self._claims:
            return
        url = self.engine.url
        if url.get_backend_name() == "postgresql":
            key = int.from_bytes(
                hashlib.sha256(f"fedcare:{study_hash}".encode()).digest()[:8], "big", signed=True
            )
            connection = self.engine.connect()
            taken = connection.execute(select(func.pg_try_advisory_lock(key))).scalar()
            connection.commit()
            if not taken:
                connection.close()
                raise self._claimed_elsewhere(study_hash)
            self._claims[study_hash] = connection
            return
        database = url.database
        if not database or database == ":memory:":
            return
        lock = Path(f"{database}.{study_hash[:16]}.lock")
        handle = lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise self._claimed_elsewhere(study_hash) from None
        self._claims[study_hash] = handle

    def _claimed_elsewhere(self, study_hash: str) -> StateError:
        return StateError(
            f"study {study_hash[:12]} is already served by another coordinator on "
            f"{self.engine.url.render_as_string(hide_password=True)}; stop that one first "
            "(two coordinators on one study would each close its rounds)"
        )

    def close(self) -> None:
        for claim in self._claims.values():
            claim.close()
        self._claims.clear()
        self.engine.dispose()

    def register_study(
        self, study_hash: str, name: str, spec_json: str, sites: Sequence[str], now: float
    ) -> bool:
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
                        created_at=now,
                    )
                )
                return True
            if json.loads(row.sites_json) != sorted(sites):
                raise StateError(
                    f"study {study_hash[:12]} was started with sites {json.loads(row.sites_json)}; "
                    f"the config now lists {sorted(sites)}"
                )
            return False

    def studies(self) -> list[StudyRecord]:
        with Session(self.engine) as session:
            rows = session.scalars(select(StudyRow).order_by(StudyRow.created_at)).all()
            return [_study(r) for r in rows]

    def study(self, study_hash: str) -> StudyRecord:
        with Session(self.engine) as session:
            row = session.get(StudyRow, study_hash)
            if row is None:
                raise StateError(f"unknown study {study_hash[:12]}")
            return _study(row)

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
            path, checksum, number = Path(row.path), row.sha256, row.round
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"model file {path} is unreadable: {exc.strerror}") from exc
        if sha256_hex(data) != checksum:
            raise StateError(f"model file {path} does not match its recorded checksum")
        return StoredModel(number, data)

    def open_round(self, study_hash: str) -> StoredRound | None:
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
                    raise StateError(
                        f"stored update of {sub.site} for round {sub.round} is corrupt"
                    )
            return _round(row, {s.site: s.payload for s in subs})

    def save_opened_round(self, study_hash: str, opened: OpenedRound) -> None:
        with Session(self.engine) as session, session.begin():
            if session.get(RoundRow, (study_hash, opened.number)) is not None:
                raise StateError(
                    f"round {opened.number} of study {study_hash[:12]} was opened already"
                )
            session.add(
                RoundRow(
                    study_hash=study_hash,
                    number=opened.number,
                    status="open",
                    selected_json=json.dumps(list(opened.selected)),
                    participants_json="[]",
                    min_sites=opened.min_sites,
                    deadline=opened.deadline,
                    extensions_left=opened.extensions_left,
                    reason="",
                    opened_at=opened.opened_at,
                )
            )

    def save_submission(
        self,
        study_hash: str,
        number: int,
        site: str,
        n_samples: int,
        payload: bytes,
        now: float,
        trained_for: int,
    ) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(RoundRow, (study_hash, number))
            if row is None:
                raise StateError(f"round {number} was never opened")
            if session.get(SubmissionRow, (study_hash, number, site)) is not None:
                raise StateError(f"round {number} already holds an update from {site}")
            session.add(
                SubmissionRow(
                    study_hash=study_hash,
                    round=number,
                    site=site,
                    n_samples=n_samples,
                    sha256=sha256_hex(payload),
                    payload=payload,
                    received_at=now,
                )
            )
            row.status = "collecting"
            site_row = self._site_row(session, study_hash, site)
            site_row.trained_for = max(site_row.trained_for, trained_for)

    def save_extended(self, study_hash: str, number: int, deadline: float, left: int) -> None:
        with Session(self.engine) as session, session.begin():
            row = session.get(RoundRow, (study_hash, number))
            if row is None:
                raise StateError(f"round {number} was never opened")
            row.deadline = deadline
            row.extensions_left = left

    def save_finished_round(self, study_hash: str, finished: FinishedRound) -> None:
        """A crash between the model file and the commit leaves the round open; on restart
        it is aggregated again from the same submissions and the file rewritten."""
        number, model = finished.number, finished.model_bytes
        model_path = self.storage / study_hash[:16] / f"round-{number:05d}.safetensors"
        if model is not None:
            write_file_atomically(model_path, model)
        with Session(self.engine) as session, session.begin():
            row = session.get(RoundRow, (study_hash, number))
            study = session.get(StudyRow, study_hash)
            if row is None or study is None:
                raise StateError(f"round {number} of study {study_hash[:12]} is not recorded")
            row.status = finished.status
            row.reason = finished.reason
            row.closed_at = finished.closed_at
            row.participants_json = json.dumps(list(finished.participants))
            study.last_round = number
            if finished.study_finished:
                study.status = "finished"
            if model is not None:
                session.add(
                    ModelRow(
                        study_hash=study_hash,
                        round=number,
                        path=str(model_path),
                        sha256=sha256_hex(model),
                        created_at=finished.closed_at,
                    )
                )
            for record in finished.sites:
                self._put_site(session, study_hash, record)

    def rounds(self, study_hash: str) -> list[StoredRound]:
        with Session(self.engine) as session:
            rows = session.scalars(
                select(RoundRow).where(RoundRow.study_hash == study_hash).order_by(RoundRow.number)
            ).all()
            return [_round(r, {}) for r in rows]

    def sites(self, study_hash: str) -> Mapping[str, SiteRecord]:
        with Session(self.engine) as session:
            study = session.get(StudyRow, study_hash)
            if study is None:
                raise StateError(f"unknown study {study_hash[:12]}")
            rows = {
                r.site: _record(r)
                for r in session.scalars(
                    select(SiteRow).where(SiteRow.study_hash == study_hash)
                ).all()
            }
            return {s: rows.get(s, SiteRecord(s)) for s in json.loads(study.sites_json)}

    @staticmethod
    def _site_row(session: Session, study_hash: str, site: str) -> SiteRow:
        study = session.get(StudyRow, study_hash)
        if study is None or site not in json.loads(study.sites_json):
            raise StateError(f"site '{site}' is not a member of study {study_hash[:12]}")
        row = session.get(SiteRow, (study_hash, site))
        if row is None:
            row = SiteRow(
                study_hash=study_hash,
                site=site,
                state=SiteState.ACTIVE.value,
                reason="",
                changed_at=0.0,
                last_seen=None,
                missed=0,
                contributed=0,
                trained_for=0,
            )
            session.add(row)
        return row

    def save_standing(
        self,
        study_hash: str,
        site: str,
        state: SiteState,
        reason: str,
        now: float,
        reset_missed: bool = False,
    ) -> SiteRecord:
        with Session(self.engine) as session, session.begin():
            row = self._site_row(session, study_hash, site)
            row.state = state.value
            row.reason = reason
            row.changed_at = now
            if reset_missed:
                row.missed = 0
            return _record(row)

    def add_site(self, study_hash: str, site: str, reason: str, now: float) -> bool:
        with Session(self.engine) as session, session.begin():
            row = session.get(StudyRow, study_hash, with_for_update=True)
            if row is None:
                raise StateError(f"unknown study {study_hash[:12]}")
            sites = json.loads(row.sites_json)
            if site in sites:
                return False
            row.sites_json = json.dumps(sorted([*sites, site]))
            self._put_site(session, study_hash, SiteRecord(site, SiteState.ACTIVE, reason, now))
            return True

    def save_seen(self, study_hash: str, site: str, now: float) -> None:
        with Session(self.engine) as session, session.begin():
            self._site_row(session, study_hash, site).last_seen = now

    @staticmethod
    def _put_site(session: Session, study_hash: str, record: SiteRecord) -> None:
        row = session.get(SiteRow, (study_hash, record.site))
        if row is None:
            row = SiteRow(study_hash=study_hash, site=record.site)
            session.add(row)
        row.state = record.state.value
        row.reason = record.reason
        row.changed_at = record.changed_at
        row.last_seen = record.last_seen
        row.missed = record.missed
        row.contributed = record.contributed
        row.trained_for = record.trained_for

    def save_report(
        self, study_hash: str, site: str, kind: str, ref: int, body: str, now: float
    ) -> bool:
        digest = sha256_hex(body.encode("utf-8"))
        with Session(self.engine) as session, session.begin():
            if session.get(StudyRow, study_hash) is None:
                raise StateError(f"unknown study {study_hash[:12]}")
            if session.get(ReportRow, (study_hash, site, kind, ref, digest)) is not None:
                return False
            session.add(
                ReportRow(
                    study_hash=study_hash,
                    site=site,
                    kind=kind,
                    ref=ref,
                    sha256=digest,
                    body=body,
                    received_at=now,
                )
            )
            return True

    def reports(self, study_hash: str, kind: str) -> list[StoredReport]:
        query = (
            select(ReportRow)
            .where(ReportRow.study_hash == study_hash, ReportRow.kind == kind)
            .order_by(ReportRow.received_at, ReportRow.site, ReportRow.ref)
        )
        with Session(self.engine) as session:
            if session.get(StudyRow, study_hash) is None:
                raise StateError(f"unknown study {study_hash[:12]}")
            return [
                StoredReport(r.site, r.kind, r.ref, r.body, r.received_at)
                for r in session.scalars(query)
            ]
