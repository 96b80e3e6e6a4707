"""The site's PrivacyLedger: every DP release from each data set, across studies and rounds.

Kept at the site in SQLite (SQLAlchemy 2) with ``synchronous=FULL``: a reservation
that :meth:`PrivacyLedger.reserve` returned is on disk before the update it
covers is computed, let alone sent. A crash between the two leaves a spend that
was never used, so the ledger can over-count, never under-count.

What a data set has spent is the composition, by the policy's accountant at the
policy's delta, of every mechanism recorded against it. ``reserve`` composes the
new round with everything before it and refuses, naming the numbers, when the
result would exceed the policy's budget; the check and the insert are one
``BEGIN IMMEDIATE`` transaction, so two processes cannot both take the last of a
budget.

A release is recorded once per task and per data fingerprint: a site that
retrains the same task on the same rows with the same preprocessing (after a
restart) gets the same secret seed back and produces the same update, which
releases nothing new. A different task for the same round (the coordinator
issued it again), or the same task over rows or preprocessing that changed in
any way, is a new release, charged in full with a fresh seed: the same noise
never meets different data.

The ledger also records each task a masked input was sent for under secure
aggregation, so that a site never takes part in two sessions over one update.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedcare.privacy.dp.accountant import Mechanism, epsilon
from fedcare.privacy.dp.budget import Budget, BudgetExceededError
from fedcare.privacy.dp.release import Release


class _Base(DeclarativeBase):
    pass


class SpendRow(_Base):
    __tablename__ = "spends"
    __table_args__ = (
        UniqueConstraint("dataset", "study_hash", "round", "task_sha256", "fingerprint"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(String(128), index=True)
    study_hash: Mapped[str] = mapped_column(String(64))
    study_name: Mapped[str] = mapped_column(String(200))
    round: Mapped[int] = mapped_column(Integer)
    task_sha256: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    """SHA-256 of the training rows after mapping and preprocessing, and of its parameters."""
    preprocessing: Mapped[str] = mapped_column(Text, default="")
    """The preprocessing parameters (fill values, centres, spreads) as JSON."""
    sampling_rate: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    secret_seed: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[float] = mapped_column(Float)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.sampling_rate, self.noise_multiplier, self.steps)


class MaskedSendRow(_Base):
    __tablename__ = "masked_sends"
    __table_args__ = (UniqueConstraint("study_hash", "task_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_hash: Mapped[str] = mapped_column(String(64))
    task_sha256: Mapped[str] = mapped_column(String(64))
    session: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Reservation:
    """A recorded spend: train with ``secret_seed``; ``spent`` includes this round."""

    secret_seed: int
    spent: float
    budget: Budget
    repeated: bool
    """True when this exact task was reserved before (nothing new was charged)."""


@dataclass(frozen=True)
class StudySpend:
    dataset: str
    study_hash: str
    study_name: str
    rounds: int
    steps: int
    epsilon: float
    """This study's releases alone, at the data set's delta."""


def _engine(path: Path) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The secret seeds are in this file: readable by the site's account only. SQLite
    # gives its -wal and -shm files the database file's permissions.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed spend survives power loss, not only kill -9.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        # Take the write lock before reading what was spent: check and insert are atomic.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    _Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Ledgers written before fingerprints were recorded gain the columns, keeping every
    spend (their rows match no new release, so each new one is charged in full)."""
    have = {c["name"] for c in inspect(engine).get_columns("spends")}
    with engine.begin() as connection:
        for name in ("fingerprint", "preprocessing"):
            if name not in have:
                connection.exec_driver_sql(
                    f"ALTER TABLE spends ADD COLUMN {name} TEXT NOT NULL DEFAULT ''"
                )


class PrivacyLedger:
    """The privacy spend of a site's data sets, in a SQLite file at the site."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine = _engine(path)

    def close(self) -> None:
        self._engine.dispose()

    def reserve(
        self, dataset: str, budget: Budget, release: Release, mechanism: Mechanism
    ) -> Reservation:
        """Record this release's spend before training, or refuse it.

        The same task over the same fingerprint returns the recorded seed and
        charges nothing; anything else is a new release. Raises
        :class:`BudgetExceededError` (and records nothing) when the data set's
        spend after it would be above ``budget.epsilon``.
        """
        round_number, study_name = release.round, release.study_name
        with Session(self._engine) as session, session.begin():
            rows = session.scalars(select(SpendRow).where(SpendRow.dataset == dataset)).all()
            previous = [r.mechanism for r in rows]
            key = (release.study_hash, round_number, release.task_sha256, release.fingerprint)
            for row in rows:
                if (row.study_hash, row.round, row.task_sha256, row.fingerprint) == key:
                    if row.mechanism != mechanism:
                        raise BudgetExceededError(
                            f"round {round_number} of study {release.study_hash[:12]} was "
                            f"recorded for '{dataset}' with other DP settings; refusing to "
                            "release it again"
                        )
                    spent = epsilon(previous, budget.delta, budget.accountant)
                    return Reservation(row.secret_seed, spent, budget, repeated=True)
            after = epsilon([*previous, mechanism], budget.delta, budget.accountant)
            if after > budget.epsilon:
                before = epsilon(previous, budget.delta, budget.accountant)
                raise BudgetExceededError(
                    f"privacy budget of data set '{dataset}' would be exceeded: spent epsilon "
                    f"{before:.4g}, after round {round_number} of study '{study_name}' it would be "
                    f"{after:.4g}, budget {budget.epsilon:g} at delta {budget.delta:g} "
                    f"({budget.accountant.value}); the update is not sent"
                )
            seed = secrets.randbits(63)
            session.add(
                SpendRow(
                    dataset=dataset,
                    study_hash=release.study_hash,
                    study_name=study_name,
                    round=round_number,
                    task_sha256=release.task_sha256,
                    fingerprint=release.fingerprint,
                    preprocessing=release.preprocessing,
                    sampling_rate=mechanism.sampling_rate,
                    noise_multiplier=mechanism.noise_multiplier,
                    steps=mechanism.steps,
                    secret_seed=seed,
                    recorded_at=time.time(),
                )
            )
        return Reservation(seed, after, budget, repeated=False)

    def masked_sent(self, study_hash: str, task_sha256: str) -> bool:
        """True if a masked input for this task has already left the site."""
        with Session(self._engine) as session, session.begin():
            found = session.scalars(
                select(MaskedSendRow.id).where(
                    MaskedSendRow.study_hash == study_hash,
                    MaskedSendRow.task_sha256 == task_sha256,
                )
            ).first()
            return found is not None

    def record_masked(self, study_hash: str, task_sha256: str, session_digest: str) -> bool:
        """Record, durably and before it leaves, that a masked input for this task is sent.
        False (and nothing recorded) if one already was."""
        try:
            with Session(self._engine) as session, session.begin():
                session.add(
                    MaskedSendRow(
                        study_hash=study_hash,
                        task_sha256=task_sha256,
                        session=session_digest,
                        recorded_at=time.time(),
                    )
                )
        except IntegrityError:
            return False
        return True

    def mechanisms(self, dataset: str) -> list[Mechanism]:
        """Every mechanism recorded against ``dataset``, in the order recorded."""
        with Session(self._engine) as session, session.begin():
            rows = session.scalars(
                select(SpendRow).where(SpendRow.dataset == dataset).order_by(SpendRow.id)
            ).all()
            return [r.mechanism for r in rows]

    def spent(self, dataset: str, budget: Budget) -> float:
        """Epsilon spent on ``dataset`` at the budget's delta, by its accountant."""
        return epsilon(self.mechanisms(dataset), budget.delta, budget.accountant)

    def datasets(self) -> list[str]:
        with Session(self._engine) as session, session.begin():
            return sorted(set(session.scalars(select(SpendRow.dataset)).all()))

    def by_study(self, dataset: str, budget: Budget) -> list[StudySpend]:
        """What each study spent from ``dataset`` on its own."""
        with Session(self._engine) as session, session.begin():
            rows = session.scalars(
                select(SpendRow).where(SpendRow.dataset == dataset).order_by(SpendRow.id)
            ).all()
            grouped: dict[str, list[SpendRow]] = {}
            for row in rows:
                grouped.setdefault(row.study_hash, []).append(row)
            return [_study_spend(dataset, group, budget) for group in grouped.values()]


def _study_spend(dataset: str, rows: Sequence[SpendRow], budget: Budget) -> StudySpend:
    return StudySpend(
        dataset=dataset,
        study_hash=rows[0].study_hash,
        study_name=rows[0].study_name,
        rounds=len({r.round for r in rows}),
        steps=sum(r.steps for r in rows),
        epsilon=epsilon([r.mechanism for r in rows], budget.delta, budget.accountant),
    )


__all__ = [
    "Budget",
    "BudgetExceededError",
    "PrivacyLedger",
    "Release",
    "Reservation",
    "StudySpend",
]
