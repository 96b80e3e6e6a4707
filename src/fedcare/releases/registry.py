"""The model registry: releases with lineage, their state, and every site's verdict, in SQL.

A release is the global model after one round of one study. It starts as a
*candidate*, and becomes *promoted* or *rejected* once the sites have validated
it (or an operator overrides the decision, which is recorded with who and why).
Its model file lives beside the database, written atomically, with its SHA-256
in the database and checked on every read. Every change is one transaction, so
the registry survives a coordinator restart or ``kill -9`` as committed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel
from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedcare.durable import sha256_hex, sqlite_pragmas, write_file_atomically
from fedcare.models.wire import decode, encode
from fedcare.releases.bundle import ModelHeader as ReleaseModelHeader
from fedcare.study import Study
from fedcare.validation.cells import ValidationReport
from fedcare.validation.gates import Verdict
from fedcare.validation.release import ReleaseState


class RegistryError(ValueError):
    """A release that does not exist, or a change its state does not allow."""


class _Base(DeclarativeBase):
    pass


class ReleaseRow(_Base):
    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_hash: Mapped[str] = mapped_column(String(64), index=True)
    study_name: Mapped[str] = mapped_column(String(200))
    study_json: Mapped[str] = mapped_column(Text)
    round: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text, default="")
    required_json: Mapped[str] = mapped_column(Text)
    quorum: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deadline: Mapped[float] = mapped_column(Float)
    model_file: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    override_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class VerdictRow(_Base):
    __tablename__ = "release_verdicts"

    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    passed: Mapped[bool] = mapped_column(Boolean)
    verdict_json: Mapped[str] = mapped_column(Text)
    report_json: Mapped[str] = mapped_column(Text)
    received_at: Mapped[float] = mapped_column(Float)


class SuspensionRow(_Base):
    __tablename__ = "release_suspensions"

    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    suspended_at: Mapped[float] = mapped_column(Float)


class Suspension(BaseModel):
    """A promoted release suspended at one site: its live performance there failed the
    site's gates (docs/drift.md)."""

    site: str
    reason: str
    suspended_at: float


class SiteVerdict(BaseModel):
    """One site's verdict on a release, with the report it rests on."""

    site: str
    verdict: Verdict
    report: ValidationReport
    received_at: float


class Override(BaseModel):
    by: str
    reason: str


class Release(BaseModel):
    """A release as the registry holds it."""

    id: int
    study_hash: str
    study_name: str
    round: int
    parent: int | None
    state: ReleaseState
    reason: str
    required: list[str]
    quorum: int | None
    deadline: float
    model_sha256: str
    created_at: float
    decided_at: float | None
    override: Override | None
    verdicts: list[SiteVerdict]
    suspended: list[Suspension] = []

    def verdict_of(self, site: str) -> SiteVerdict | None:
        return next((v for v in self.verdicts if v.site == site), None)


def _view(
    row: ReleaseRow, verdicts: list[VerdictRow], suspensions: Sequence[SuspensionRow] = ()
) -> Release:
    override = None
    if row.override_by is not None:
        override = Override(by=row.override_by, reason=row.override_reason or "")
    return Release(
        id=row.id,
        study_hash=row.study_hash,
        study_name=row.study_name,
        round=row.round,
        parent=row.parent_id,
        state=ReleaseState(row.state),
        reason=row.reason,
        required=json.loads(row.required_json),
        quorum=row.quorum,
        deadline=row.deadline,
        model_sha256=row.model_sha256,
        created_at=row.created_at,
        decided_at=row.decided_at,
        override=override,
        verdicts=[
            SiteVerdict(
                site=v.site,
                verdict=Verdict.model_validate_json(v.verdict_json),
                report=ValidationReport.model_validate_json(v.report_json),
                received_at=v.received_at,
            )
            for v in sorted(verdicts, key=lambda v: v.site)
        ],
        suspended=[
            Suspension(site=x.site, reason=x.reason, suspended_at=x.suspended_at)
            for x in sorted(suspensions, key=lambda x: x.site)
        ],
    )


class ReleaseRegistry:
    """Releases of every study in one SQL database, model files in ``storage``."""

    def __init__(self, engine: Engine, storage: Path) -> None:
        self.engine = engine
        self.storage = storage
        try:
            _Base.metadata.create_all(engine)
            with Session(engine) as session:
                session.scalars(select(ReleaseRow).limit(1)).first()
                session.scalars(select(VerdictRow).limit(1)).first()
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc
            raise RegistryError(
                f"{engine.url}: not a fedcare release registry this version can read "
                f"({type(cause).__name__}: {cause})"
            ) from exc

    @classmethod
    def open(cls, url: str, storage: Path) -> ReleaseRegistry:
        """A registry on its own database (the simulation, the command line)."""
        engine = create_engine(url)
        if url.startswith("sqlite"):
            sqlite_pragmas(engine)
        return cls(engine, storage)

    def close(self) -> None:
        self.engine.dispose()

    def _load(self, session: Session, release_id: int) -> ReleaseRow:
        row = session.get(ReleaseRow, release_id)
        if row is None:
            raise RegistryError(f"there is no release {release_id}")
        return row

    def _full(self, session: Session, row: ReleaseRow) -> Release:
        suspensions = session.scalars(
            select(SuspensionRow).where(SuspensionRow.release_id == row.id)
        ).all()
        return _view(row, self._verdicts(session, row.id), suspensions)

    def _verdicts(self, session: Session, release_id: int) -> list[VerdictRow]:
        return list(session.scalars(select(VerdictRow).where(VerdictRow.release_id == release_id)))

    def add_candidate(
        self,
        study: Study,
        round_number: int,
        params: NDArray[np.float32],
        required: list[str],
        quorum: int | None,
        deadline: float,
    ) -> Release:
        """Record the global model after ``round_number`` as a candidate release.

        Its parent is the study's last promoted release. Adding the same round
        twice (a coordinator that restarted between the round and this call)
        returns the existing candidate.
        """
        study_hash = study.content_hash
        payload = encode(
            {"params": params}, ReleaseModelHeader(study_hash=study_hash, round=round_number)
        )
        digest = sha256_hex(payload)
        with Session(self.engine) as session, session.begin():
            existing = session.scalars(
                select(ReleaseRow).where(
                    ReleaseRow.study_hash == study_hash, ReleaseRow.round == round_number
                )
            ).first()
            if existing is not None:
                if existing.model_sha256 != digest:
                    raise RegistryError(
                        f"round {round_number} of study {study_hash[:12]} already has a release "
                        "with a different model"
                    )
                return self._full(session, existing)
            path = self.storage / f"release-{study_hash[:16]}-r{round_number}.safetensors"
            write_file_atomically(path, payload)
            parent = self._last_promoted_row(session, study_hash)
            row = ReleaseRow(
                study_hash=study_hash,
                study_name=study.name,
                study_json=study.model_dump_json(by_alias=True),
                round=round_number,
                parent_id=None if parent is None else parent.id,
                state=ReleaseState.CANDIDATE.value,
                reason="",
                required_json=json.dumps(sorted(required)),
                quorum=quorum,
                deadline=deadline,
                model_file=str(path),
                model_sha256=digest,
                created_at=time.time(),
            )
            session.add(row)
            session.flush()
            return _view(row, [])

    def record_verdict(
        self, release_id: int, site: str, verdict: Verdict, report: ValidationReport
    ) -> bool:
        """Store a site's verdict. False for an identical repeat; a different one is refused."""
        verdict_json = verdict.model_dump_json()
        report_json = report.model_dump_json()
        with Session(self.engine) as session, session.begin():
            row = self._load(session, release_id)
            if site not in json.loads(row.required_json):
                raise RegistryError(f"site '{site}' does not validate release {release_id}")
            previous = session.get(VerdictRow, (release_id, site))
            if previous is not None:
                if previous.verdict_json == verdict_json and previous.report_json == report_json:
                    return False
                raise RegistryError(
                    f"site '{site}' already returned a different verdict on release {release_id}"
                )
            session.add(
                VerdictRow(
                    release_id=release_id,
                    site=site,
                    passed=verdict.passed,
                    verdict_json=verdict_json,
                    report_json=report_json,
                    received_at=time.time(),
                )
            )
            return True

    def suspend(self, release_id: int, site: str, reason: str, now: float) -> bool:
        """Mark a promoted release suspended at ``site``; False if it already is."""
        with Session(self.engine) as session, session.begin():
            row = self._load(session, release_id)
            if row.state != ReleaseState.PROMOTED.value:
                raise RegistryError(
                    f"release {release_id} is {row.state}: only a promoted release is suspended"
                )
            if session.get(SuspensionRow, (release_id, site)) is not None:
                return False
            session.add(
                SuspensionRow(release_id=release_id, site=site, reason=reason, suspended_at=now)
            )
            return True

    def set_deadline(self, release_id: int, deadline: float) -> None:
        """Move an open candidate's validation deadline (re-based after a restart)."""
        with Session(self.engine) as session, session.begin():
            row = self._load(session, release_id)
            if row.state != ReleaseState.CANDIDATE.value:
                raise RegistryError(f"release {release_id} is already {row.state}")
            row.deadline = deadline

    def decide(self, release_id: int, state: ReleaseState, reason: str) -> Release:
        """Settle a candidate by the validation rules."""
        if state is ReleaseState.CANDIDATE:
            raise RegistryError("a decision promotes or rejects")
        with Session(self.engine) as session, session.begin():
            row = self._load(session, release_id)
            if row.state != ReleaseState.CANDIDATE.value:
                raise RegistryError(f"release {release_id} is already {row.state}")
            row.state = state.value
            row.reason = reason
            row.decided_at = time.time()
            return self._full(session, row)

    def override(self, release_id: int, state: ReleaseState, by: str, reason: str) -> Release:
        """An operator's decision against (or ahead of) the gates, recorded with who and why."""
        if not by.strip() or not reason.strip():
            raise RegistryError("an override needs who decided it and why")
        if state is ReleaseState.CANDIDATE:
            raise RegistryError("an override promotes or rejects")
        with Session(self.engine) as session, session.begin():
            row = self._load(session, release_id)
            if row.state == state.value:
                raise RegistryError(f"release {release_id} is already {row.state}")
            before = row.state
            row.state = state.value
            row.reason = f"overridden by {by} (was {before}): {reason}" + (
                f"; validation said: {row.reason}" if row.reason else ""
            )
            row.decided_at = time.time()
            row.override_by = by
            row.override_reason = reason
            return self._full(session, row)

    def study_of(self, release: Release) -> Study:
        """The study the release was trained under, as it was then."""
        with Session(self.engine) as session:
            text = self._load(session, release.id).study_json
        return Study.model_validate_json(text)

    def get(self, release_id: int) -> Release:
        with Session(self.engine) as session:
            row = self._load(session, release_id)
            return self._full(session, row)

    def releases(self, study_hash: str | None = None) -> list[Release]:
        """Every release (of one study), oldest first."""
        with Session(self.engine) as session:
            query = select(ReleaseRow).order_by(ReleaseRow.id)
            if study_hash is not None:
                query = query.where(ReleaseRow.study_hash == study_hash)
            return [self._full(session, row) for row in session.scalars(query)]

    def states(self, study_hash: str) -> dict[int, ReleaseState]:
        """Each release of the study and its state, without their verdicts: what a site
        polls every round (loading every release whole grows with the rounds)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(ReleaseRow.id, ReleaseRow.state)
                .where(ReleaseRow.study_hash == study_hash)
                .order_by(ReleaseRow.id)
            )
            return {int(i): ReleaseState(state) for i, state in rows}

    def candidates(self, study_hash: str) -> list[Release]:
        """Releases of the study still waiting for their decision, oldest first."""
        with Session(self.engine) as session:
            query = (
                select(ReleaseRow)
                .where(
                    ReleaseRow.study_hash == study_hash,
                    ReleaseRow.state == ReleaseState.CANDIDATE.value,
                )
                .order_by(ReleaseRow.id)
            )
            return [self._full(session, row) for row in session.scalars(query)]

    def _last_promoted_row(self, session: Session, study_hash: str) -> ReleaseRow | None:
        return session.scalars(
            select(ReleaseRow)
            .where(
                ReleaseRow.study_hash == study_hash,
                ReleaseRow.state == ReleaseState.PROMOTED.value,
            )
            .order_by(ReleaseRow.round.desc())
            .limit(1)
        ).first()

    def last_promoted(self, study_hash: str) -> Release | None:
        with Session(self.engine) as session:
            row = self._last_promoted_row(session, study_hash)
            return None if row is None else self._full(session, row)

    def model(
        self, release: Release, n_params: int | None = None
    ) -> tuple[bytes, NDArray[np.float32]]:
        """The release's model file and its parameters, checked against the recorded SHA-256."""
        with Session(self.engine) as session:
            path = Path(self._load(session, release.id).model_file)
        try:
            payload = path.read_bytes()
        except OSError as exc:
            raise RegistryError(
                f"release {release.id}: cannot read {path}: {exc.strerror}"
            ) from exc
        if sha256_hex(payload) != release.model_sha256:
            raise RegistryError(f"release {release.id}: {path} does not match its recorded SHA-256")
        length = n_params if n_params is not None else _declared_length(payload)
        header, vectors = decode(payload, ReleaseModelHeader, {"params": length}, len(payload))
        if header.study_hash != release.study_hash or header.round != release.round:
            raise RegistryError(f"release {release.id}: the model file is for another release")
        return payload, vectors["params"]


def _declared_length(payload: bytes) -> int:
    # Called after the checksum matched the one recorded when the registry wrote
    # the file, so the file's own shape can be trusted; decode checks the rest.
    size = int.from_bytes(payload[:8], "little")
    shape = json.loads(payload[8 : 8 + size])["params"]["shape"]
    return int(shape[0])
