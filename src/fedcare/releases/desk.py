"""The validation round trip for one study, shared by the simulation and the coordinator.

:class:`ReleaseDesk` turns the global model after a candidate round into a
candidate release, hands each site its validation task, checks what comes back,
and settles the release by the rules of :mod:`fedcare.validation.release`. Like
:class:`fedcare.federation.engine.Federation` it knows nothing about how bytes
move: the simulation calls it directly, the coordinator from HTTP handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from fedcare.audit import JsonInput
from fedcare.clock import rebase_deadline
from fedcare.models.wire import PayloadError
from fedcare.releases.registry import RegistryError, Release, ReleaseRegistry
from fedcare.study import Study
from fedcare.validation.cells import CellReport, ValidationReport, few_events
from fedcare.validation.gates import Verdict, evaluate_gates
from fedcare.validation.messages import (
    ValidationReply,
    ValidationTaskHeader,
    decode_validation_reply,
    encode_validation_task,
)
from fedcare.validation.release import ReleaseState, decide, required_passes

Audit = Callable[..., None]
"""Called as ``audit(event, **details)`` after a change is committed."""


class ValidationRefusedError(ValueError):
    """A validation reply the coordinator does not accept, with the reason."""


class NotYoursError(PermissionError):
    """A reply that claims to come from another site than the one that sent it."""


def _no_audit(event: str, **details: JsonInput) -> None:
    del event, details


def check_report(report: ValidationReport, study: Study) -> None:
    """Refuse a report that breaks the study's rules (threshold, subgroups, small cells)."""
    spec = study.validation
    if report.threshold != spec.threshold:
        raise ValidationRefusedError(
            f"the report uses threshold {report.threshold}, the study's is {spec.threshold}"
        )
    if report.min_cohort < study.disclosure.min_cohort_size:
        raise ValidationRefusedError(
            f"the report's minimum cohort {report.min_cohort} is below the study's "
            f"{study.disclosure.min_cohort_size}"
        )
    if report.min_events < study.disclosure.min_cell_events:
        raise ValidationRefusedError(
            f"the report's minimum events {report.min_events} is below the study's "
            f"{study.disclosure.min_cell_events}"
        )
    if sorted(report.subgroups) != sorted(spec.subgroups):
        raise ValidationRefusedError(
            f"the report breaks down by {sorted(report.subgroups)}, "
            f"the study asks for {sorted(spec.subgroups)}"
        )
    cells = [report.overall, *(c for cells in report.subgroups.values() for c in cells)]
    for cell in cells:
        if isinstance(cell, CellReport) and cell.n < report.min_cohort:
            raise ValidationRefusedError(
                f"cell {cell.group} describes {cell.n} patients, below the minimum cohort "
                f"{report.min_cohort}; it should have been suppressed"
            )
        if isinstance(cell, CellReport) and few_events(cell.positives, cell.n, report.min_events):
            raise ValidationRefusedError(
                f"cell {cell.group} has {cell.positives} of {cell.n} positive, below the "
                f"minimum events {report.min_events}; it should have been suppressed"
            )
        if isinstance(cell, CellReport) and not 0 <= cell.positives <= cell.n:
            raise ValidationRefusedError(
                f"cell {cell.group} has {cell.positives} of {cell.n} positive"
            )


class ReleaseDesk:
    """Candidate releases of one study: who validates, what they said, the decision."""

    def __init__(
        self,
        study: Study,
        sites: Sequence[str],
        registry: ReleaseRegistry,
        audit: Audit = _no_audit,
    ) -> None:
        self.study = study
        self.hash = study.content_hash
        self.sites = sorted(sites)
        required_passes(self.sites, study.validation.quorum)
        self.registry = registry
        self.audit = audit

    def add_site(self, site: str) -> None:
        """A site that joined: it validates the candidates opened from now on."""
        if site not in self.sites:
            self.sites = sorted([*self.sites, site])

    def is_candidate_round(self, number: int) -> bool:
        return self.study.validation.is_candidate_round(number, self.study.rounds.count)

    def open_candidate(self, round_number: int, params: NDArray[np.float32], now: float) -> Release:
        """Record the model after ``round_number`` as a candidate (idempotent per round)."""
        before = self.registry.states(self.hash)
        release = self.registry.add_candidate(
            self.study,
            round_number,
            params,
            self.sites,
            self.study.validation.quorum,
            now + self.study.validation.deadline_s,
        )
        if release.id not in before:
            self.audit(
                "release.candidate",
                release=release.id,
                round=round_number,
                parent=release.parent,
                sha256=release.model_sha256,
            )
        return release

    def pending_for(self, site: str) -> Release | None:
        """The oldest candidate this site has not yet validated."""
        for release in self.registry.candidates(self.hash):
            if site in release.required and release.verdict_of(site) is None:
                return release
        return None

    def _previous_report(self, release: Release, site: str) -> ValidationReport | None:
        if release.parent is None:
            return None
        verdict = self.registry.get(release.parent).verdict_of(site)
        return None if verdict is None else verdict.report

    def task_for(self, site: str) -> tuple[int, bytes] | None:
        """(release id, encoded validation task) for ``site``, or None if nothing is due."""
        release = self.pending_for(site)
        if release is None:
            return None
        _, params = self.registry.model(release)
        header = ValidationTaskHeader(
            study_hash=self.hash,
            release=release.id,
            round=release.round,
            previous=self._previous_report(release, site),
        )
        return release.id, encode_validation_task(header, params)

    def receive(
        self, identity: str, release_id: int, body: bytes, now: float
    ) -> tuple[bool, Verdict]:
        """Check and store a site's reply; returns (newly recorded, the verdict as stored).

        The coordinator re-checks the study's gates on the report itself, so a
        site cannot pass a release its own numbers fail; the site's policy gates
        are private to the site, and its verdict on them is taken as given.
        """
        try:
            reply: ValidationReply = decode_validation_reply(body)
        except PayloadError as exc:
            raise ValidationRefusedError(str(exc)) from exc
        if reply.site != identity or reply.verdict.site != identity:
            raise NotYoursError(
                f"the client certificate identifies site '{identity}', "
                f"but the validation reply claims to come from '{reply.site}'"
            )
        if reply.study_hash != self.hash:
            raise ValidationRefusedError(
                f"the reply is for study {reply.study_hash[:12]}, not {self.hash[:12]}"
            )
        if reply.release != release_id:
            raise ValidationRefusedError(
                f"the reply says release {reply.release} but was sent to release {release_id}"
            )
        try:
            release = self.registry.get(release_id)
        except RegistryError as exc:
            raise ValidationRefusedError(str(exc)) from exc
        if release.study_hash != self.hash or identity not in release.required:
            raise ValidationRefusedError(
                f"site '{identity}' does not validate release {release_id}"
            )
        stored = release.verdict_of(identity)
        if release.state is not ReleaseState.CANDIDATE and stored is None:
            raise ValidationRefusedError(
                f"release {release_id} is already {release.state.value}; it takes no more verdicts"
            )
        check_report(reply.report, self.study)
        consortium = evaluate_gates(
            reply.report,
            self.study.validation.gates,
            self._previous_report(release, identity),
            site=identity,
        )
        extra = [r for r in reply.verdict.reasons if r not in consortium.reasons]
        verdict = Verdict(
            site=identity,
            passed=consortium.passed and reply.verdict.passed,
            reasons=consortium.reasons + extra,
            notes=reply.verdict.notes,
        )
        try:
            recorded = self.registry.record_verdict(release_id, identity, verdict, reply.report)
        except RegistryError as exc:
            raise ValidationRefusedError(str(exc)) from exc
        if recorded:
            self.audit(
                "release.verdict",
                release=release_id,
                site=identity,
                passed=verdict.passed,
                reasons=verdict.reasons,
            )
        self.settle(now)
        return recorded, verdict

    def next_deadline(self) -> float | None:
        """When the earliest open candidate is settled with whatever verdicts are in."""
        return min((r.deadline for r in self.registry.candidates(self.hash)), default=None)

    def rebase(self, now: float) -> None:
        """After a restart: bound every open candidate's deadline by the study's
        validation deadline from ``now`` (:func:`fedcare.clock.rebase_deadline`)."""
        full = self.study.validation.deadline_s
        for release in self.registry.candidates(self.hash):
            deadline = rebase_deadline(release.deadline, now, full)
            if deadline != release.deadline:
                self.registry.set_deadline(release.id, deadline)

    def settle(self, now: float) -> list[Release]:
        """Decide every candidate whose verdicts are all in or whose deadline has passed."""
        decided = []
        for release in self.registry.candidates(self.hash):
            verdicts = {v.site: v.verdict for v in release.verdicts}
            decision = decide(
                release.required, verdicts, release.quorum, deadline_passed=now >= release.deadline
            )
            if decision is None:
                continue
            settled = self.registry.decide(release.id, decision.state, decision.reason)
            self.audit(
                f"release.{decision.state.value}",
                release=release.id,
                round=release.round,
                reason=decision.reason,
            )
            decided.append(settled)
        return decided
