"""What the coordinator's dashboard shows, and to whom.

An operator's certificate sees every study on the coordinator and every site's rows;
a site's certificate sees only the studies it is a member of and, in them, only its
own rows: its standing, its verdicts, its drift flag, whether it took part in a round.
Counts (sites selected, sites that took part) are shown to both; names of other sites,
their reports and the release decisions' reasons (which quote other sites' results)
are not. Built from the running study services and the release registry; read-only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from fedcare.audit import verify
from fedcare.federation.service import StudyService
from fedcare.federation.status import SiteView, StudyStatus
from fedcare.pki import Peer
from fedcare.releases.registry import Release
from fedcare.validation.cells import CellReport, ValidationReport
from fedcare.validation.gates import evaluate_gates
from fedcare.validation_spec import GateKind, GateSpec

SITE_POLICY = "(site policy)"
"""How a site marks the failures of its own, private gates in its verdict."""


class RoundRow(BaseModel):
    number: int
    status: str
    opened_at: float
    closed_at: float | None
    duration_s: float | None
    selected: int
    took_part: int
    stragglers: list[str]
    """Selected sites that sent nothing; for a site viewer, at most itself."""
    reason: str


class SiteRow(SiteView):
    drifting_since: int | None


class GateRow(BaseModel):
    gate: str
    passed: bool
    detail: str


class SubgroupRow(BaseModel):
    group: str
    suppressed: bool
    n: int | None = None
    positives: int | None = None
    auroc: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class VerdictRow(BaseModel):
    site: str
    passed: bool
    received_at: float
    gates: list[GateRow]
    notes: list[str]
    overall: SubgroupRow
    subgroups: list[SubgroupRow]


class ReleaseRow(BaseModel):
    id: int
    round: int
    state: str
    reason: str
    """The decision's reason, for operators; it quotes sites' results, so a site sees
    only the state."""
    created_at: float
    decided_at: float | None
    awaiting: list[str]
    verdicts: list[VerdictRow]
    suspended_at: dict[str, str]


class StudyRow(BaseModel):
    study_hash: str
    name: str
    status: str
    rounds_total: int
    last_round: int
    open_round: int | None
    waiting_for: list[str]
    deadline: float | None
    """When the open round closes without the sites it waits for (Unix time)."""
    rounds: list[RoundRow]
    sites: list[SiteRow]
    releases: list[ReleaseRow]
    version: str
    """Changes whenever anything shown for the study does: plots are refetched then."""


class AuditRow(BaseModel):
    path: str
    ok: bool
    entries: int
    head_seq: int
    head: str
    detail: str


class Dashboard(BaseModel):
    """Everything one viewer's dashboard shows."""

    viewer: str
    role: str
    generated_at: float
    studies: list[StudyRow]
    audit: AuditRow | None


def describe_gate(gate: GateSpec) -> str:
    """A gate as one short phrase: 'auroc >= 0.7 overall'."""
    metric = gate.metric.value
    if gate.kind is GateKind.OVERALL:
        return f"{metric} {gate.op} {gate.threshold:g} overall"
    if gate.kind is GateKind.EVERY_SUBGROUP:
        scope = f"every {gate.attribute} group" if gate.attribute else "every subgroup"
        return f"{metric} {gate.op} {gate.threshold:g} in {scope}"
    if gate.kind is GateKind.SUBGROUP_GAP:
        return f"{metric} gap across {gate.attribute} <= {gate.threshold:g}"
    return f"{metric} no worse than the last release by more than {gate.tolerance:g}"


def _cell(cell: object, group: str) -> SubgroupRow:
    if not isinstance(cell, CellReport):
        return SubgroupRow(group=group, suppressed=True)
    return SubgroupRow(
        group=cell.group,
        suppressed=False,
        n=cell.n,
        positives=cell.positives,
        auroc=cell.auroc.value,
        ci_low=cell.auroc.ci_low,
        ci_high=cell.auroc.ci_high,
    )


def _subgroups(report: ValidationReport) -> list[SubgroupRow]:
    return [_cell(c, c.group) for cells in report.subgroups.values() for c in cells]


def _gates(
    gates: Sequence[GateSpec],
    report: ValidationReport,
    previous: ValidationReport | None,
    site: str,
    reasons: Sequence[str],
) -> list[GateRow]:
    """Each consortium gate checked again on the site's report, and the site's own gates
    as one row (they are private: only their failures came back, as reasons)."""
    rows = []
    for gate in gates:
        verdict = evaluate_gates(report, [gate], previous, site=site)
        detail = "; ".join(verdict.reasons) or "; ".join(verdict.notes)
        rows.append(GateRow(gate=describe_gate(gate), passed=verdict.passed, detail=detail))
    own = [r.removesuffix(f" {SITE_POLICY}") for r in reasons if r.endswith(SITE_POLICY)]
    rows.append(GateRow(gate="the site's own gates", passed=not own, detail="; ".join(own)))
    return rows


def _verdicts(
    release: Release, gates: Sequence[GateSpec], previous: Release | None, shown: set[str]
) -> list[VerdictRow]:
    rows = []
    for verdict in release.verdicts:
        if verdict.site not in shown:
            continue
        earlier = previous.verdict_of(verdict.site) if previous is not None else None
        report = verdict.report
        rows.append(
            VerdictRow(
                site=verdict.site,
                passed=verdict.verdict.passed,
                received_at=verdict.received_at,
                gates=_gates(
                    gates,
                    report,
                    earlier.report if earlier else None,
                    verdict.site,
                    verdict.verdict.reasons,
                ),
                notes=list(verdict.verdict.notes),
                overall=_cell(report.overall, "all"),
                subgroups=_subgroups(report),
            )
        )
    return rows


def _releases(service: StudyService, shown: set[str], operator: bool) -> list[ReleaseRow]:
    desk = service.releases
    if desk is None:
        return []
    history = desk.registry.releases(service.hash)
    by_id = {r.id: r for r in history}
    gates = service.study.validation.gates if service.study.validation else ()
    rows = []
    for release in history:
        answered = {v.site for v in release.verdicts}
        awaiting = (
            []
            if release.state.value != "candidate"
            else sorted(s for s in release.required if s not in answered and s in shown)
        )
        rows.append(
            ReleaseRow(
                id=release.id,
                round=release.round,
                state=release.state.value,
                reason=release.reason if operator else "",
                created_at=release.created_at,
                decided_at=release.decided_at,
                awaiting=awaiting,
                verdicts=_verdicts(
                    release,
                    gates,
                    by_id.get(release.parent) if release.parent else None,
                    shown,
                ),
                suspended_at={x.site: x.reason for x in release.suspended if x.site in shown},
            )
        )
    return rows


def _rounds(status: StudyStatus, shown: set[str]) -> list[RoundRow]:
    rows = []
    for r in status.history:
        took_part = set(r.participants)
        stragglers = [s for s in r.selected if s not in took_part and s in shown]
        duration = None if r.closed_at is None else max(0.0, r.closed_at - r.opened_at)
        rows.append(
            RoundRow(
                number=r.number,
                status=r.status,
                opened_at=r.opened_at,
                closed_at=r.closed_at,
                duration_s=duration,
                selected=len(r.selected),
                took_part=len(took_part),
                stragglers=stragglers,
                reason=r.reason,
            )
        )
    return rows


def _digest(*parts: BaseModel | Sequence[BaseModel]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        items = part if isinstance(part, Sequence) else [part]
        for item in items:
            hasher.update(item.model_dump_json().encode())
    return hasher.hexdigest()[:16]


def study_row(service: StudyService, peer: Peer) -> StudyRow:
    """One study as ``peer`` may see it."""
    operator = not peer.is_site
    status = service.status(None if operator else peer.name)
    shown = set(status.sites) if operator else {peer.name}
    drifting = service.drifting()
    sites = [
        SiteRow(**s.model_dump(), drifting_since=drifting.get(s.site))
        for s in status.standings
        if s.site in shown
    ]
    rounds = _rounds(status, shown)
    releases = _releases(service, shown, operator)
    open_round = status.open_round
    return StudyRow(
        study_hash=status.study_hash,
        name=status.name,
        status=status.status,
        rounds_total=status.rounds_total,
        last_round=status.last_round,
        open_round=None if open_round is None else open_round.number,
        waiting_for=[] if open_round is None else [s for s in open_round.waiting_for if s in shown],
        deadline=None if open_round is None else open_round.deadline,
        rounds=rounds,
        sites=sites,
        releases=releases,
        version=_digest(rounds, sites, releases),
    )


def visible(services: Mapping[str, StudyService], peer: Peer) -> list[StudyService]:
    """The studies ``peer`` may see: all for an operator, its own for a site."""
    return [s for s in services.values() if not peer.is_site or s.federation.is_member(peer.name)]


@dataclass
class AuditCheck:
    """The coordinator's audit trail, verified again only when the file changed (a
    full check reads every entry)."""

    path: Path | None
    _seen: tuple[int, int] | None = None
    _row: AuditRow | None = None

    def row(self) -> AuditRow | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return AuditRow(
                path=str(self.path), ok=True, entries=0, head_seq=0, head="", detail="no entries"
            )
        key = (stat.st_size, stat.st_mtime_ns)
        if self._row is None or key != self._seen:
            report = verify(self.path)
            self._row = AuditRow(
                path=str(self.path),
                ok=report.ok,
                entries=report.n_entries,
                head_seq=report.last_seq,
                head=report.head,
                detail=report.summary(),
            )
            self._seen = key
        return self._row


def dashboard(services: Mapping[str, StudyService], peer: Peer, audit: AuditCheck) -> Dashboard:
    """The whole dashboard for ``peer``."""
    return Dashboard(
        viewer=peer.name,
        role=peer.role,
        generated_at=time.time(),
        studies=[study_row(s, peer) for s in visible(services, peer)],
        audit=audit.row(),
    )


def plot(service: StudyService, peer: Peer, name: str) -> str | None:
    """Figure ``name`` of ``service`` as ``peer`` may see it, as SVG; None when there is
    no such figure for this viewer. Names: ``rounds`` (timeline), ``auroc`` (AUROC and
    loss by round), ``subgroups-<site>`` (that site's latest release by subgroup)."""
    from fedcare import plots  # matplotlib loads when a figure is first asked for

    row = study_row(service, peer)
    if name == "rounds":
        return plots.round_timeline(
            [
                (r.number, r.duration_s, r.took_part, r.selected, r.status != "failed")
                for r in row.rounds
                if r.closed_at is not None
            ]
        )
    if name == "auroc":
        return _auroc_plot(service, row)
    site = name.removeprefix("subgroups-")
    latest = next((r for r in reversed(row.releases) if r.verdicts), None)
    verdict = None if latest is None else next((v for v in latest.verdicts if v.site == site), None)
    if name == site or latest is None or verdict is None:
        return None
    return plots.subgroup_forest(
        site,
        [verdict.overall, *verdict.subgroups],
        model=f"Release {latest.id} (round {latest.round})",
    )


def _auroc_plot(service: StudyService, row: StudyRow) -> str:
    from fedcare import plots

    shown = {s.site for s in row.sites}
    auroc: dict[str, list[tuple[int, float | None]]] = {}
    intervals: dict[str, list[tuple[int, float, float]]] = {}
    for release in row.releases:
        for verdict in release.verdicts:
            auroc.setdefault(verdict.site, []).append((release.round, verdict.overall.auroc))
            low, high = verdict.overall.ci_low, verdict.overall.ci_high
            if low is not None and high is not None:
                intervals.setdefault(verdict.site, []).append((release.round, low, high))
    loss = {
        site: [(a.round, a.loss) for a in rows]
        for site, rows in service.alignments().items()
        if site in shown
    }
    return plots.by_round(
        dict(sorted(auroc.items())),
        loss,
        auroc_label="AUROC on the site's held-out patients",
        auroc_title="Candidate releases: AUROC (95 % interval)",
        loss_label="New model's loss on held-out rows (BCE)",
        loss_title="Held-out loss by round",
        intervals=intervals,
        rounds=row.rounds_total,
    )


def state_json(board: Dashboard) -> str:
    """The dashboard as compact JSON (what the page and the event stream carry)."""
    return json.dumps(board.model_dump(mode="json"), separators=(",", ":"))


def changed_since(board: Dashboard) -> str:
    """A digest of what the viewer would see, without the time it was made: the event
    stream sends a new state only when this changes."""
    return _digest(board.studies, *([board.audit] if board.audit else []))
