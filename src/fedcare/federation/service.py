"""The study service: the one driver of every study, in simulation and over the network.

:class:`StudyService` wraps :class:`~fedcare.federation.engine.Federation` with a
:class:`~fedcare.federation.state.StudyState` (in memory for a simulation, SQL
for the networked coordinator), so every transition is recorded before it is
acted on. It knows nothing about HTTP or processes: the coordinator's web layer
calls it for each request, the simulation calls it for each in-process message,
and both call :meth:`StudyService.tick` to enforce deadlines.

In asynchronous mode (``participation.mode: async``) each round is one buffer
flush: a site takes the current model whenever it is ready, and the round closes
once ``participation.buffer`` updates are in, each no more than
``max_staleness`` versions old. Under secure aggregation a site that has trained
says it is ready (:meth:`~StudyService.ready`); once enough are, the flush is one
SecAgg+ session among exactly them.

It also keeps each site's standing. A site that says it cannot take part
(:meth:`~StudyService.withdraw`), that missed ``rounds.inactive_after`` selected
rounds in a row, or that the operator dropped is not selected again, and an
open round stops waiting for it; a round whose remaining selected sites have
all reported closes at once.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from fedcare.aggregation import make_server_optimizer
from fedcare.audit import AuditLog, JsonInput, read_entries
from fedcare.clock import SteadyClock, rebase_deadline
from fedcare.drift.alignment import drifting_sites
from fedcare.drift.summary import DriftSummary
from fedcare.durable import sha256_hex
from fedcare.federation.engine import Federation, RoundOutcome
from fedcare.federation.messages import (
    Flush,
    Ready,
    RoundAlignment,
    SiteUpdate,
    Task,
    TaskReply,
    TaskState,
    Withdrawal,
    decode_model,
    decode_update,
    encode_model,
    encode_task,
)
from fedcare.federation.rounds import Round, RoundError, RoundStatus
from fedcare.federation.secure_relay import ClosedSession, SecureRelay
from fedcare.federation.state import (
    FinishedRound,
    OpenedRound,
    SiteRecord,
    SiteState,
    StateError,
    StoredRound,
    StudyState,
)
from fedcare.federation.status import (
    GONE,
    OpenRoundView,
    StudyStatus,
    round_views,
    site_views,
)
from fedcare.models.initial import round_zero_parameters
from fedcare.models.size import study_parameter_count
from fedcare.models.wire import PayloadError
from fedcare.pki import check_site_name
from fedcare.privacy.secagg.keys import IdentityVerifier
from fedcare.privacy.secagg.protocol import COLLECTING, Stage, stage_after, stage_named
from fedcare.releases.desk import NotYoursError, ReleaseDesk, ValidationRefusedError
from fedcare.releases.registry import RegistryError, ReleaseRegistry
from fedcare.study import MonitoringSpec, Study, TrainingDriftSpec
from fedcare.validation.gates import Verdict
from fedcare.validation.release import ReleaseState

_SiteMessage = TypeVar("_SiteMessage", Ready, Withdrawal, RoundAlignment, DriftSummary)

SEEN_EVERY_S = 5.0
"""How often a site's last contact is written to the state (it is kept in memory between)."""


class ForbiddenError(PermissionError):
    """A caller acting outside its identity or its study membership."""


class ConflictError(RoundError):
    """An update for a round that is not open: late, replayed or premature."""


def set_standing(
    state: StudyState,
    study_hash: str,
    site: str,
    standing: SiteState,
    reason: str,
    now: float,
    audit: AuditLog | None = None,
) -> SiteRecord:
    """The operator's drop or admit, from any process: recorded in the state (a running
    service applies it at its next tick) and then in the audit trail."""
    if standing not in (SiteState.DROPPED, SiteState.ACTIVE):
        raise ValueError("the operator drops a site or admits it again")
    state.study(study_hash)  # an unknown study is refused before anything is written
    record = state.save_standing(
        study_hash, site, standing, reason, now, reset_missed=standing is SiteState.ACTIVE
    )
    if audit is not None:
        event = "site.dropped" if standing is SiteState.DROPPED else "site.admitted"
        audit.append(event, study=study_hash, site=site, reason=reason, by="operator")
    return record


def add_site(
    state: StudyState,
    study_hash: str,
    site: str,
    reason: str,
    now: float,
    audit: AuditLog | None = None,
) -> bool:
    """The operator adds a site to a running study that allows it (``rounds.open_enrolment``);
    a running service takes it up at its next round boundary. False if it is a member."""
    record = state.study(study_hash)
    spec = json.loads(record.spec_json)
    if not spec.get("rounds", {}).get("open_enrolment", False):
        raise StateError(
            f"study {record.name} ({study_hash[:12]}) does not let sites join while it runs "
            "(rounds.open_enrolment is false); start a new study with the new site"
        )
    if record.status != "running":
        raise StateError(f"study {record.name} has {record.status}: no site can join it")
    secure = spec.get("secure_aggregation", {})
    if secure.get("enabled") and len(record.sites) + 1 > int(secure.get("max_sites", 0)):
        raise StateError(
            f"study {record.name} has {len(record.sites)} sites, secure_aggregation.max_sites "
            f"is {secure['max_sites']}: no site can join"
        )
    added = state.add_site(study_hash, check_site_name(site), reason, now)
    if added and audit is not None:
        audit.append("site.added", study=study_hash, site=site, reason=reason, by="operator")
    return added


@dataclass(frozen=True)
class RoundReport:
    """What an observer (the simulation) learns when a round ends."""

    outcome: RoundOutcome
    params: NDArray[np.float32]
    elapsed_s: float = 0.0
    """Seconds on the service's clock since the study was registered."""


_STANDING = tuple(f.name for f in fields(SiteRecord) if f.name != "last_seen")


def _same_standing(a: SiteRecord, b: SiteRecord) -> bool:
    """Whether two records of a site agree on everything but when it was last seen."""
    return all(getattr(a, name) == getattr(b, name) for name in _STANDING)


class StudyService:
    """The durable coordinator of one study. Thread-safe: every call holds one lock."""

    def __init__(
        self,
        study: Study,
        sites: list[str],
        state: StudyState,
        clock: Callable[[], float] | None = None,
        max_update_bytes: int = 64 * 1024 * 1024,
        audit: AuditLog | None = None,
        registry: ReleaseRegistry | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        identities: IdentityVerifier | None = None,
    ) -> None:
        """``identities`` checks secure-aggregation key advertisements against the
        consortium CA (required when the study aggregates securely). ``clock`` defaults
        to a :class:`SteadyClock`, so a stepped wall clock moves no deadline."""
        if study.secure_aggregation.enabled and identities is None:
            raise ValueError(
                f"study {study.name} aggregates securely: the coordinator needs the "
                "consortium CA to check key advertisements"
            )
        self.identities = identities
        self.study = study
        self.hash = study.content_hash
        self.state = state
        self.clock = SteadyClock() if clock is None else clock
        self.max_update_bytes = max_update_bytes
        self._lock = threading.RLock()
        self.audit = audit
        self.on_round = on_round
        self.n_params = study_parameter_count(study)
        spec = study.model_dump_json(by_alias=True)
        known = next((r for r in state.studies() if r.hash == self.hash), None)
        if known is not None and study.rounds.open_enrolment and set(sites) <= set(known.sites):
            sites = list(known.sites)  # the configured sites and those that joined since
        if state.register_study(self.hash, study.name, spec, sites, self.clock()):
            self._audit("study.registered", name=study.name, sites=sorted(sites))
        last_round = state.study(self.hash).last_round
        opt_state: dict[str, NDArray[np.float32]] = {}
        stored = state.latest_model(self.hash)
        if stored is not None:
            _, params, opt_state = decode_model(
                stored.data, self.n_params, make_server_optimizer(study.aggregation).state_names
            )
        else:
            params = round_zero_parameters(study)
        self.federation = Federation(study, sites, params, round_number=last_round)
        self.federation.optimizer.load_state(opt_state)
        self._sites: dict[str, SiteRecord] = dict(state.sites(self.hash))
        self._seen_written: dict[str, float] = {}
        self.releases: ReleaseDesk | None = None
        if study.validates_releases:
            if registry is None:
                raise ValueError(f"study {study.name} validates releases: it needs a registry")
            self.releases = ReleaseDesk(study, sites, registry, audit=self._audit)
            if stored is not None and self.releases.is_candidate_round(stored.round):
                # Idempotent: recreates the candidate only if a crash came between
                # committing the round and recording its release.
                self.releases.open_candidate(stored.round, params, self.clock())
            self.releases.rebase(self.clock())
        self.round: Round | None = None
        self.secure: SecureRelay | None = None
        self._closed_secure: ClosedSession | None = None
        """The last round's secure session, if it succeeded: who posted what in it."""
        self.asynchronous = study.participation.is_async
        self._ready: dict[str, int] = {}
        """Asynchronous secure aggregation: sites holding an update, in the order they said
        so, with the round each was trained for. Kept in memory only: after a restart the
        sites say so again."""
        self._flush = b""
        self._flush_rounds: dict[str, int] = {}
        self.stale: dict[str, int] = {}
        """Updates (or ready messages) refused as too stale, per site, since this started."""
        self._task: Task | None = None
        self._task_bytes = b""
        self.halted = ""
        """Why no round can open (too few active sites), or empty."""
        # The first round opens once min_sites sites have asked for work, so a
        # deadline never runs out while the hospitals are still starting up.
        self._present: set[str] = set()
        open_round = state.open_round(self.hash)
        self._repair_trail(open_round)
        if open_round is not None:
            self._restore_round(open_round)
        elif not self.federation.done and last_round > 0:
            self._open_next()

    # --- state of the study -------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.federation.done and self.round is None

    @property
    def checked_in(self) -> tuple[str, ...]:
        """The sites that have asked for work since this service started."""
        return tuple(sorted(self._present))

    @property
    def waiting_for_sites(self) -> bool:
        """True before the first round, until min_sites sites have checked in."""
        return self.round is None and self.federation.round_number == 0 and not self.halted

    @property
    def settled(self) -> bool:
        """Finished, with every candidate release decided."""
        return self.finished and (
            self.releases is None or not self.releases.registry.candidates(self.hash)
        )

    def standing(self, site: str) -> SiteRecord:
        return self._sites.get(site, SiteRecord(site))

    def next_deadline(self) -> float | None:
        """The earliest moment at which time alone changes something: a round's or a
        secure stage's deadline, or a candidate release's."""
        with self._lock:
            times = []
            round_ = self.round
            if round_ is not None and not round_.finished:
                # While a secure session runs, its stage deadlines govern the round.
                secure = self.secure is not None and round_.summed is None
                times.append(self.secure.deadline if self.secure and secure else round_.deadline)
            if self.releases is not None:
                release = self.releases.next_deadline()
                if release is not None:
                    times.append(release)
            return min(times, default=None)

    # --- rounds -------------------------------------------------------------------

    def _eligible(self) -> list[str]:
        return [s for s in self.federation.sites if self.standing(s).state is SiteState.ACTIVE]

    def _repair_trail(self, open_round: StoredRound | None) -> None:
        """Entries are appended after their commit, so a kill -9 between the two leaves
        the database ahead of the trail. Append what the database holds and the trail
        lacks (round openings and closings, the open round's updates, the study's end),
        each marked
        ``recovered``, so the trail never has a silent hole."""
        if self.audit is None:
            return
        logged = {
            (e.event, e.details.get("round"), e.details.get("site"))
            for e in read_entries(self.audit.path)
            if e.details.get("study") == self.hash
        }
        recovered = "from the coordinator database at start-up"
        for stored in self.state.rounds(self.hash):
            if ("round.opened", stored.number, None) not in logged:
                self._audit(
                    "round.opened",
                    round=stored.number,
                    selected=list(stored.selected),
                    deadline=stored.deadline,
                    recovered=recovered,
                )
            if open_round is not None and stored.number == open_round.number:
                for site, payload in sorted(open_round.submissions.items()):
                    if ("update.received", stored.number, site) in logged:
                        continue
                    header = decode_update(payload, self.n_params).header
                    self._audit(
                        "update.received",
                        round=stored.number,
                        site=site,
                        bytes=len(payload),
                        sha256=sha256_hex(payload),
                        n_samples=header.n_samples,
                        trained_for=header.round,
                        recovered=recovered,
                    )
            finished = stored.status in (RoundStatus.CLOSED, RoundStatus.FAILED)
            if finished and (f"round.{stored.status}", stored.number, None) not in logged:
                self._audit(
                    f"round.{stored.status}",
                    round=stored.number,
                    participants=list(stored.participants),
                    reason=stored.reason,
                    recovered=recovered,
                )
        record = self.state.study(self.hash)
        if record.status == "finished" and ("study.finished", None, None) not in logged:
            self._audit("study.finished", rounds=record.last_round, recovered=recovered)

    def _restore_round(self, stored: StoredRound) -> None:
        self.round, self._task = self.federation.open_round(now=self.clock())
        if self.round.number != stored.number:
            raise RoundError(
                f"stored open round {stored.number} does not follow the last finished round "
                f"{self.federation.round_number}"
            )
        self.round.selected = stored.selected
        self.round.deadline = rebase_deadline(
            stored.deadline, self.clock(), self.study.rounds.deadline_s
        )
        self.round.extensions_left = stored.extensions_left
        if self.round.deadline != stored.deadline:
            self.state.save_extended(
                self.hash, stored.number, self.round.deadline, stored.extensions_left
            )
        for payload in stored.submissions.values():
            self.round.submit(decode_update(payload, self.n_params))
        self._task_bytes = encode_task(self._task)
        self._excuse_gone()
        self._start_secure()

    def _start_secure(self) -> None:
        """A fresh SecAgg+ relay for the open round when the study aggregates securely (in
        asynchronous mode, once enough sites are ready: :meth:`_fill_flush`)."""
        self.secure = None
        self._flush = b""
        self._flush_rounds = {}
        if not self.study.secure_aggregation.enabled or self.round is None:
            return
        if self.asynchronous:
            self._drop_stale_ready(self.round)
            return
        self.secure = SecureRelay(
            self.study,
            self.round,
            self.n_params,
            sha256_hex(self._task_bytes),
            self.clock(),
            self.max_update_bytes,
            self._identities(),
        )

    def _identities(self) -> IdentityVerifier:
        assert self.identities is not None  # required for secure studies at construction
        return self.identities

    def _drop_stale_ready(self, round_: Round) -> None:
        """Forget ready sites that can no longer join (too stale, gone): they train anew."""
        for site, trained_for in list(self._ready.items()):
            too_old = round_.number - trained_for > round_.max_staleness
            if too_old or site not in round_.selected or site in round_.excused:
                del self._ready[site]

    def _fill_flush(self, now: float) -> None:
        """Asynchronous secure aggregation: start the open flush's session once ``buffer``
        sites are ready, or at the deadline with at least ``min_sites``, or when every site
        the flush still waits for is ready."""
        round_ = self.round
        if not self.asynchronous or self.secure is not None or self._flush_rounds:
            return
        if round_ is None or round_.finished or not self.study.secure_aggregation.enabled:
            return
        self._drop_stale_ready(round_)
        ready = list(self._ready)
        buffer = round_.buffer or len(round_.selected)
        everyone = set(round_.waiting_for) <= set(ready)
        enough = len(ready) >= round_.min_sites and (now >= round_.deadline or everyone)
        if len(ready) < buffer and not enough:
            return
        sites = tuple(sorted(ready[:buffer]))
        self._flush_rounds = {site: self._ready.pop(site) for site in sites}
        flush = Flush(
            study_hash=self.hash, round=round_.number, sites=sites, nonce=secrets.token_hex(16)
        )
        self._flush = flush.model_dump_json().encode()
        self.secure = SecureRelay(
            self.study,
            round_,
            self.n_params,
            sha256_hex(self._flush),
            now,
            self.max_update_bytes,
            self._identities(),
            participants=sites,
        )
        self._audit(
            "flush.started",
            round=round_.number,
            sites=list(sites),
            trained_for={site: self._flush_rounds[site] for site in sites},
        )

    def _audit(self, event: str, **details: JsonInput) -> None:
        """Record an event that has been committed (so the trail never claims more)."""
        if self.audit is not None:
            self.audit.append(event, study=self.hash, **details)

    def _open_next(self) -> None:
        eligible = self._eligible()
        needed = self.study.rounds.min_sites
        if len(eligible) < needed:
            reason = (
                f"only {len(eligible)} active site(s), the study needs {needed}: admit a "
                "site (fedcare coordinator site admit) or wait for an inactive one"
            )
            if reason != self.halted:
                self._audit("study.halted", round=self.federation.round_number + 1, reason=reason)
            self.halted = reason
            self.round = None
            self.secure = None
            return
        self.halted = ""
        now = self.clock()
        self.round, self._task = self.federation.open_round(now=now, eligible=eligible)
        self.state.save_opened_round(
            self.hash,
            OpenedRound(
                self.round.number,
                self.round.selected,
                self.round.min_sites,
                self.round.deadline,
                self.round.extensions_left,
                now,
            ),
        )
        self._task_bytes = encode_task(self._task)
        self._start_secure()
        self._audit(
            "round.opened",
            round=self.round.number,
            selected=list(self.round.selected),
            deadline=self.round.deadline,
        )

    def _seen(self, site: str) -> None:
        """Note a contact; an inactive site that asks for work is active again."""
        now = self.clock()
        record = self.standing(site)
        if record.state is SiteState.INACTIVE:
            record = self.state.save_standing(
                self.hash, site, SiteState.ACTIVE, "asked for work again", now, reset_missed=True
            )
            self._audit("site.active", site=site, reason=record.reason)
        self._sites[site] = replace(record, last_seen=now)
        if now - self._seen_written.get(site, -SEEN_EVERY_S) >= SEEN_EVERY_S:
            self.state.save_seen(self.hash, site, now)
            self._seen_written[site] = now

    def task_for(self, site: str) -> TaskReply:
        """The current task if ``site`` is selected, still taking part, and has not yet
        reported."""
        self._check_member(site)
        with self._lock:
            self._seen(site)
            self._present.add(site)
            if self.waiting_for_sites and len(self._present) >= self.study.rounds.min_sites:
                self._open_next()
            if self.finished:
                return TaskReply(TaskState.FINISHED, round=self.federation.round_number)
            round_ = self.round
            if (
                round_ is None
                or site not in round_.selected
                or site in round_.updates
                or site in round_.excused
            ):
                return TaskReply(TaskState.WAIT)
            if self.asynchronous and self.study.secure_aggregation.enabled:
                return self._flush_task_for(site, round_)
            if self.secure is None:
                return TaskReply(TaskState.READY, self._task_bytes, round_.number)
            if not self.secure.wants_task(site):
                return TaskReply(TaskState.WAIT)
            return TaskReply(
                TaskState.READY, self._task_bytes, round_.number, self.secure.participants
            )

    def _flush_task_for(self, site: str, round_: Round) -> TaskReply:
        """Join the flush's session, wait for one, or train on the current model."""
        secure = self.secure
        if secure is not None and site in secure.participants:
            if secure.wants_task(site):
                return TaskReply(TaskState.JOIN, self._flush, round_.number)
            return TaskReply(TaskState.WAIT)
        if site in self._ready or site in self._flush_rounds:
            return TaskReply(TaskState.WAIT)
        return TaskReply(TaskState.READY, self._task_bytes, round_.number)

    def _site_message(
        self, identity: str, body: bytes, kind: type[_SiteMessage], what: str
    ) -> _SiteMessage:
        """Parse a small message a member site sends about itself in this study: it must
        name the site its certificate identifies and this study's hash."""
        self._check_member(identity)
        try:
            message = kind.model_validate_json(body)
        except ValidationError as exc:
            raise PayloadError(f"not a {what}: {exc.errors()[0]['msg']}") from exc
        if message.site != identity:
            raise ForbiddenError(
                f"the client certificate identifies site '{identity}', "
                f"but the {what} claims to come from '{message.site}'"
            )
        if message.study_hash != self.hash:
            raise ConflictError(f"the {what} is for study {message.study_hash[:12]}")
        return message

    def ready(self, identity: str, body: bytes) -> bool:
        """Asynchronous secure aggregation: ``identity`` holds an update trained for the
        round its message names and can join a flush. True when newly recorded."""
        message = self._site_message(identity, body, Ready, "ready message")
        if not (self.asynchronous and self.study.secure_aggregation.enabled):
            raise ConflictError(
                f"study {self.hash[:12]} is not asynchronous with secure aggregation: "
                "sites send their updates instead"
            )
        with self._lock:
            self._seen(identity)
            round_ = self.round
            if round_ is None or round_.finished:
                raise ConflictError("no flush is open; ask for the next task")
            if identity not in round_.selected or identity in round_.excused:
                raise ConflictError(
                    f"site '{identity}' does not take part in round {round_.number}"
                )
            if identity in self._flush_rounds or self._ready.get(identity) == message.round:
                return False
            self._check_fresh(identity, message.round, round_)
            self._ready[identity] = message.round
            self._advance(self.clock())
            return True

    def _check_fresh(self, site: str, trained_for: int, round_: Round) -> None:
        """Refuse an update (or its ready message) from a later round, a replay of one
        already aggregated, or one staler than the study accepts."""
        if trained_for > round_.number:
            raise ConflictError(
                f"round {trained_for} is not open yet (the open round is {round_.number})"
            )
        last = self.standing(site).trained_for
        if trained_for <= last:
            raise ConflictError(
                f"site '{site}' already had an update trained for round {last} aggregated; "
                f"an update trained for round {trained_for} is a replay and is refused"
            )
        staleness = round_.number - trained_for
        if staleness > round_.max_staleness:
            self.stale[site] = self.stale.get(site, 0) + 1
            self._audit("update.stale", round=round_.number, site=site, trained_for=trained_for)
            raise ConflictError(
                f"stale: the update was trained for round {trained_for}, {staleness} model "
                f"version(s) ago; the study accepts at most {round_.max_staleness} "
                "(participation.max_staleness): train on the current model"
            )

    def _check_member(self, site: str) -> None:
        if not self.federation.is_member(site):
            raise ForbiddenError(f"site '{site}' is not a member of study {self.hash[:12]}")

    def submit(self, identity: str, round_number: int, body: bytes) -> bool:
        """Accept a site's update. Returns False for an exact resubmission.

        ``identity`` is the authenticated site (its certificate's subject); an
        update that claims any other site is refused.
        """
        self._check_member(identity)
        self.refuse_plain_updates()
        update: SiteUpdate = decode_update(body, self.n_params, self.max_update_bytes)
        header = update.header
        if header.site != identity:
            raise ForbiddenError(
                f"the client certificate identifies site '{identity}', "
                f"but the update claims to come from '{header.site}'"
            )
        if header.study_hash != self.hash:
            raise ConflictError(
                f"the update is for study {header.study_hash[:12]}, not {self.hash[:12]}"
            )
        if header.round != round_number:
            raise ConflictError(
                f"the update says round {header.round} but was sent to round {round_number}"
            )
        with self._lock:
            self._seen(identity)
            round_ = self.round
            if round_ is None or (not self.asynchronous and round_.number != round_number):
                current = "none" if round_ is None else str(round_.number)
                raise ConflictError(
                    f"round {round_number} is not open (the open round is {current}); "
                    "late or replayed updates are refused"
                )
            if self.asynchronous and identity not in round_.updates:
                self._check_fresh(identity, round_number, round_)
            accepted = round_.submit(update)
            if accepted:
                try:
                    self.state.save_submission(
                        self.hash,
                        round_.number,
                        identity,
                        header.n_samples,
                        body,
                        self.clock(),
                        trained_for=round_number,
                    )
                except Exception:
                    # Not durable means not accepted: the site will retry.
                    del round_.updates[identity]
                    raise
                record = self.standing(identity)
                self._sites[identity] = replace(
                    record, trained_for=max(record.trained_for, round_number)
                )
                self._audit(
                    "update.received",
                    round=round_.number,
                    site=identity,
                    bytes=len(body),
                    sha256=sha256_hex(body),
                    n_samples=header.n_samples,
                    trained_for=round_number,
                )
            self._advance(self.clock())
            return accepted

    def refuse_plain_updates(self) -> None:
        """Under secure aggregation an individual update is refused before it is read."""
        if self.study.secure_aggregation.enabled:
            raise ForbiddenError(
                f"study {self.hash[:12]} uses secure aggregation: individual updates are "
                "refused; sites send masked inputs to the secagg endpoints"
            )

    # --- standings ----------------------------------------------------------------

    def withdraw(self, identity: str, body: bytes) -> bool:
        """A site says it cannot take part any more. True when newly recorded.

        The message carries a reason category only (:class:`Withdrawal`); the site
        is not selected again and the open round stops waiting for it.
        """
        message = self._site_message(identity, body, Withdrawal, "withdrawal")
        with self._lock:
            self._seen(identity)
            record = self.standing(identity)
            if record.state in GONE:
                return False
            now = self.clock()
            reason = message.reason.value
            self._sites[identity] = self.state.save_standing(
                self.hash, identity, SiteState.WITHDRAWN, reason, now
            )
            self._audit("site.withdrawn", site=identity, reason=reason)
            self._excuse_gone()
            self._advance(now)
            return True

    def _join(self, site: str) -> None:
        """Take up a site the operator added (``add_site``): selectable from the next
        round that opens; the open one was selected without it."""
        if self.study.rounds.open_enrolment and not self.federation.is_member(site):
            self.federation.add_site(site)
            if self.releases is not None:
                self.releases.add_site(site)
            joins = self.federation.round_number + (2 if self.round is not None else 1)
            self._audit("site.joined", site=site, from_round=joins)

    def _refresh_sites(self) -> None:
        """Pick up standings another process recorded (the operator's drop or admit)."""
        stored = self.state.sites(self.hash)
        for site, record in stored.items():
            if not self.federation.is_member(site):
                self._join(site)
            mine = self._sites.get(site)
            seen = max((t for t in (record.last_seen, mine and mine.last_seen) if t), default=None)
            if mine is not None and seen == mine.last_seen and _same_standing(mine, record):
                continue  # as it was: a thousand sites each tick need no new record
            self._sites[site] = replace(record, last_seen=seen)

    def _excuse_gone(self) -> None:
        round_ = self.round
        if round_ is None or round_.finished:
            return
        for site in round_.selected:
            if self.standing(site).state in GONE:
                round_.excuse(site)

    def _standings_after(self, round_: Round, outcome: RoundOutcome) -> list[SiteRecord]:
        """Each selected site's counters after a finished round; inactive after too many
        misses. A site that advertised keys in a secure session was there, even if the
        session failed later."""
        present = set(outcome.participants)
        if self.secure is not None:
            present |= set(self.secure.session.posted(Stage.ADVERTISE))
        if self.asynchronous:
            # Each site contributes at its own pace: a flush it was not in is no miss.
            present |= set(round_.selected)
        limit = self.study.rounds.inactive_after
        now = self.clock()
        records = []
        for site in round_.selected:
            record = self.standing(site)
            if site in present:
                gained = (
                    1
                    if site in outcome.participants and outcome.status is RoundStatus.CLOSED
                    else 0
                )
                trained_for = max(record.trained_for, self._flush_rounds.get(site, 0))
                record = replace(
                    record,
                    missed=0,
                    contributed=record.contributed + gained,
                    trained_for=trained_for if gained else record.trained_for,
                )
            elif site not in round_.excused:
                record = replace(record, missed=record.missed + 1)
                if record.missed >= limit and record.state is SiteState.ACTIVE:
                    record = replace(
                        record,
                        state=SiteState.INACTIVE,
                        reason=f"missed {record.missed} selected round(s) in a row",
                        changed_at=now,
                    )
            records.append(record)
        return records

    # --- secure aggregation -------------------------------------------------------

    def _secure_round(self, identity: str, round_number: int) -> SecureRelay:
        self._check_member(identity)
        round_ = self.round
        if self.secure is None or round_ is None or round_.number != round_number:
            current = "none" if round_ is None else str(round_.number)
            raise ConflictError(
                f"no secure aggregation for round {round_number} (the open round is {current})"
            )
        return self.secure

    def secure_post(
        self, identity: str, round_number: int, stage: str, body: bytes
    ) -> Hashable | None:
        """A SecAgg+ message from ``identity`` (its certificate's site) for the open round,
        or a retry of one it posted in the last round, which has closed since (the reply
        was lost): a repeat, which changes nothing.

        Returns :meth:`secure_version` as it was after the post if the stage still
        collects (so no next relay is ready while the version stays), else None."""
        with self._lock:
            closed = self._closed_secure
            if (
                closed is not None
                and closed.round_number == round_number
                and (self.round is None or self.round.number != round_number)
            ):
                self._check_member(identity)
                closed.repeat(identity, stage)
                return None
            relay = self._secure_round(identity, round_number)
            self._seen(identity)
            relay.post(identity, stage, body)
            self._advance(self.clock())
            server = relay.session.server
            if self.secure is relay and server.stage is COLLECTING[stage_named(stage)]:
                return self.secure_version()
            return None

    def secure_fetch(self, identity: str, round_number: int, stage: str) -> bytes | None:
        """What ``identity`` needs for its next SecAgg+ step; None until that stage opens."""
        with self._lock:
            self._advance(self.clock())
            relay = self._secure_round(identity, round_number)
            self._seen(identity)
            return relay.fetch(identity, stage)

    def secure_next(self, identity: str, round_number: int, stage: str) -> bytes | None:
        """Once ``identity`` has posted ``stage``: the relay of the stage after it if that
        has opened, else None (and None after the last stage)."""
        following = stage_after(stage_named(stage))
        if following is None:
            return None
        return self.secure_fetch(identity, round_number, following.value)

    def secure_version(self) -> Hashable:
        """Changes whenever an answer of :meth:`secure_fetch` may: a stage closes, the
        session fails, the round closes or another opens (a site's own post changes only
        its own next answer, and it fetches after posting). Read without the lock by the
        server's long-polls; under the GIL a read sees each assignment whole."""
        round_, secure = self.round, self.secure
        if round_ is None or secure is None:
            return None if round_ is None else round_.number
        return (round_.number, round_.finished, secure.setup.session, secure.session.server.stage)

    # --- releases -----------------------------------------------------------------

    def validation_task_for(self, site: str) -> tuple[int, bytes] | None:
        """(release id, validation task) this site still owes, or None."""
        self._check_member(site)
        if self.releases is None:
            return None
        with self._lock:
            return self.releases.task_for(site)

    def receive_verdict(self, identity: str, release_id: int, body: bytes) -> tuple[bool, Verdict]:
        """Check and store a site's validation reply (see :class:`ReleaseDesk`)."""
        self._check_member(identity)
        if self.releases is None:
            raise ConflictError(f"study {self.hash[:12]} does not validate releases")
        with self._lock:
            return self.releases.receive(identity, release_id, body, self.clock())

    # --- time ---------------------------------------------------------------------

    def tick(self) -> None:
        """Apply standings recorded elsewhere, close the open round if it is due, open the
        next one, settle due releases."""
        with self._lock:
            self._refresh_sites()
            self._excuse_gone()
            if self.halted and not self.federation.done:
                self._open_next()
            self._advance(self.clock())
            if self.releases is not None:
                self.releases.settle(self.clock())

    def _advance(self, now: float) -> None:
        round_ = self.round
        if round_ is None:
            return
        self._fill_flush(now)
        secure = self.secure
        running = secure is not None and not round_.finished and round_.summed is None
        if running and secure is not None and not secure.advance(now, round_):
            return
        if not (round_.finished or round_.due(now)):
            return
        outcome = self.federation.finish_round(round_, now)
        if outcome.status in (RoundStatus.OPEN, RoundStatus.COLLECTING):
            self.state.save_extended(
                self.hash, round_.number, round_.deadline, round_.extensions_left
            )
            self._audit("round.extended", round=round_.number, deadline=round_.deadline)
            return
        model = None
        if outcome.status is RoundStatus.CLOSED:
            model = encode_model(
                self.hash,
                round_.number,
                self.federation.params,
                self.federation.optimizer.state(),
            )
        standings = self._standings_after(round_, outcome)
        self.state.save_finished_round(
            self.hash,
            FinishedRound(
                round_.number,
                outcome.status.value,
                outcome.reason,
                outcome.participants,
                model,
                study_finished=self.federation.done,
                sites=standings,
                closed_at=now,
            ),
        )
        for record in standings:
            previous = self.standing(record.site)
            self._sites[record.site] = replace(record, last_seen=previous.last_seen)
            if record.state is not previous.state:
                self._audit("site.inactive", site=record.site, reason=record.reason)
        self._audit(
            f"round.{outcome.status.value}",
            round=round_.number,
            participants=list(outcome.participants),
            reason=outcome.reason,
        )
        if (
            model is not None
            and self.releases is not None
            and self.releases.is_candidate_round(round_.number)
        ):
            self.releases.open_candidate(round_.number, self.federation.params, now)
        if self.federation.done:
            self._audit("study.finished", rounds=self.federation.round_number)
        self._closed_secure = None if self.secure is None else self.secure.closed()
        self.round = None
        self.secure = None
        if self.on_round is not None:
            started = self.state.study(self.hash).created_at
            self.on_round(RoundReport(outcome, self.federation.params, now - started))
        if not self.federation.done:
            self._open_next()

    # --- what anyone may read -----------------------------------------------------

    def model_bytes(self) -> bytes:
        """The current global model (parameters only) as a checked payload."""
        with self._lock:
            return encode_model(self.hash, self.federation.round_number, self.federation.params)

    def _monitoring(self) -> MonitoringSpec:
        if self.study.monitoring is None:
            raise ConflictError(
                f"study {self.hash[:12]} declares no monitoring: drift reports are not taken"
            )
        return self.study.monitoring

    def receive_drift(self, identity: str, body: bytes) -> bool:
        """Keep a site's drift summary of a promoted release; suspend the release at that
        site when its live performance failed the site's gates and the study says so.
        True when newly kept."""
        message = self._site_message(identity, body, DriftSummary, "drift summary")
        spec = self._monitoring()
        if self.releases is None:
            raise ConflictError(f"study {self.hash[:12]} makes no releases to monitor")
        registry = self.releases.registry
        try:
            release = registry.get(message.release)
        except RegistryError as exc:
            raise ConflictError(f"release {message.release}: {exc}") from exc
        if release.study_hash != self.hash or release.state is not ReleaseState.PROMOTED:
            raise ConflictError(
                f"release {message.release} is not a promoted release of this study"
            )
        with self._lock:
            now = self.clock()
            kept = self.state.save_report(
                self.hash, identity, "drift", message.release, message.model_dump_json(), now
            )
            if not kept:
                return False
            flagged = [f"{c.name}:{c.kind.value}" for c in message.checks if c.flagged]
            self._audit(
                "drift.received",
                site=identity,
                release=message.release,
                drift=message.drift,
                flagged=flagged,
                performance_passed=message.performance_passed,
            )
            if spec.suspend_on_gate_failure and message.performance_passed is False:
                reason = "live performance failed the site's gates: " + "; ".join(
                    message.reasons or ["(no reason given)"]
                )
                if registry.suspend(message.release, identity, reason, now):
                    self._audit(
                        "release.suspended", site=identity, release=message.release, reason=reason
                    )
            return True

    def receive_alignment(self, identity: str, body: bytes) -> bool:
        """Keep a site's alignment with the consortium for one round; flag the site as
        drifting once it stays below ``monitoring.training.min_cosine`` for
        ``monitoring.training.rounds`` reported rounds in a row. True when newly kept."""
        message = self._site_message(identity, body, RoundAlignment, "round alignment")
        spec = self._monitoring().training
        with self._lock:
            record = self.state.study(self.hash)
            if message.round > record.last_round:
                raise ConflictError(
                    f"round {message.round} has not been aggregated yet (last: {record.last_round})"
                )
            before = self.drifting()
            if not self.state.save_report(
                self.hash,
                identity,
                "alignment",
                message.round,
                message.model_dump_json(),
                self.clock(),
            ):
                return False
            if identity in self.drifting(spec) and identity not in before:
                self._audit(
                    "site.drifting",
                    site=identity,
                    round=message.round,
                    min_cosine=spec.min_cosine,
                    rounds=spec.rounds,
                )
            return True

    def alignments(self) -> dict[str, list[RoundAlignment]]:
        """Each site's reported alignment, by round."""
        out: dict[str, dict[int, RoundAlignment]] = {}
        for report in self.state.reports(self.hash, "alignment"):
            out.setdefault(report.site, {})[report.ref] = RoundAlignment.model_validate_json(
                report.body
            )
        return {site: [by[r] for r in sorted(by)] for site, by in sorted(out.items())}

    def drifting(self, spec: TrainingDriftSpec | None = None) -> dict[str, int]:
        """Sites pulling away from the consortium: site -> the round that flagged it."""
        if spec is None:
            if self.study.monitoring is None:
                return {}
            spec = self.study.monitoring.training
        cosines = {
            site: [(a.round, a.cosine) for a in rows] for site, rows in self.alignments().items()
        }
        return drifting_sites(cosines, spec.min_cosine, spec.rounds)

    def drift_summaries(self) -> list[DriftSummary]:
        """Every drift summary the sites sent, oldest first."""
        return [
            DriftSummary.model_validate_json(r.body) for r in self.state.reports(self.hash, "drift")
        ]

    def drop_revoked(self, site: str) -> bool:
        """Drop a member site whose certificate the consortium CA revoked, as an operator
        would (``site drop``); True when it was dropped now."""
        with self._lock:
            if not self.federation.is_member(site):
                return False
            if self.standing(site).state is SiteState.DROPPED:
                return False
            set_standing(
                self.state,
                self.hash,
                site,
                SiteState.DROPPED,
                "certificate revoked by the consortium CA",
                self.clock(),
            )
            self._audit(
                "site.revoked", site=site, reason="certificate revoked by the consortium CA"
            )
            return True

    def release_states(self, identity: str) -> dict[int, str]:
        """Each release's state (candidate, promoted, rejected) for a member site: how a
        site learns which of the candidates it validated became releases."""
        self._check_member(identity)
        if self.releases is None:
            return {}
        return {i: s.value for i, s in self.releases.registry.states(self.hash).items()}

    def status(self, site: str | None = None) -> StudyStatus:
        """The study's progress; for a ``site``, with its own standing only."""
        with self._lock:
            round_ = self.round
            record = self.state.study(self.hash)
            status = record.status
            if status == "running" and self.halted:
                status = f"halted: {self.halted}"
            elif status == "running" and self.waiting_for_sites:
                status = (
                    f"waiting for sites ({len(self._present)} of "
                    f"{self.study.rounds.min_sites} needed have checked in)"
                )
            shown = [self.standing(s) for s in self.federation.sites if site in (None, s)]
            return StudyStatus(
                study_hash=self.hash,
                name=self.study.name,
                status=status,
                rounds_total=self.study.rounds.count,
                last_round=record.last_round,
                sites=self.federation.sites,
                open_round=None
                if round_ is None
                else OpenRoundView(
                    number=round_.number,
                    status=round_.status.value,
                    selected=list(round_.selected),
                    reported=sorted(round_.updates)
                    if self.secure is None
                    else list(self.secure.submitted),
                    waiting_for=list(round_.waiting_for),
                    deadline=round_.deadline,
                ),
                history=round_views(self.state.rounds(self.hash)),
                standings=site_views(shown),
                drifting={s: n for s, n in self.drifting().items() if site in (None, s)},
            )


REFUSALS: dict[type[Exception], int] = {
    ForbiddenError: 403,
    NotYoursError: 403,
    RoundError: 409,
    RegistryError: 409,
    ValidationRefusedError: 400,
    PayloadError: 400,
}
"""The refusals a caller can act on, with the HTTP status the coordinator answers them
with (the in-process transport reports the same status)."""


def refusal_status(exc: Exception) -> int | None:
    """The status for a refusal of the service, or None for anything else (a fault)."""
    for kind, status in REFUSALS.items():
        if isinstance(exc, kind):
            return status
    return None
