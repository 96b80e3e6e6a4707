"""``fedcare site ui``: the hospital's own portal, on 127.0.0.1 only.

It shows what left the building (every update, validation, alignment and drift summary
the site's audit trail recorded, with size, recipient and hash, and whether the trail
verifies), the privacy budget per data set and per study (from the ledger), the
policy's approvals with their hashes, the site's validation reports of each release
(from its reference profiles) and its drift monitor results. Read-only: it reads the
site's files on each request and changes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel

from fedcare.audit import read_entries, verify
from fedcare.config import SiteConfig
from fedcare.drift.profile import ReferenceProfile
from fedcare.policy import load_policy
from fedcare.policy.approval import site_audit_path
from fedcare.site.budget import budget_summary
from fedcare.validation.cells import CellReport

LOOPBACK = "127.0.0.1"

OUTFLOW_EVENTS = ("update.sent", "validation.sent", "alignment.sent", "drift.sent")
"""Audit events that record something leaving the site."""


class OutflowRow(BaseModel):
    time: str
    event: str
    study: str
    about: str
    bytes: int | None
    recipient: str
    sha256: str


class BudgetRow(BaseModel):
    dataset: str
    budget: float | None
    delta: float | None
    accountant: str | None
    spent: float | None
    remaining: float | None


class StudySpendRow(BaseModel):
    dataset: str
    study: str
    study_hash: str
    rounds: int
    steps: int
    epsilon: float


class ApprovalRow(BaseModel):
    study: str
    hash: str
    approved_by: str
    approved_at: datetime
    note: str


class ValidationRow(BaseModel):
    study_hash: str
    release: int
    round: int
    state: str
    n: int
    positives: int | None
    auroc: float | None


class MonitorRow(BaseModel):
    file: str
    page: str
    release: int
    monitored_at: str
    rows: int
    drift: bool
    flagged: list[str]
    performance_passed: bool | None


class PortalData(BaseModel):
    """Everything the portal shows, read from the site's own files."""

    site: str
    audit_ok: bool
    audit_detail: str
    outflows: list[OutflowRow]
    budgets: list[BudgetRow]
    spends: list[StudySpendRow]
    approvals: list[ApprovalRow]
    validations: list[ValidationRow]
    monitors: list[MonitorRow]


def _outflows(trail: Path) -> tuple[bool, str, list[OutflowRow]]:
    if not trail.exists():
        return True, "no audit trail yet", []
    report = verify(trail)
    if not report.ok:
        return False, str(report.reason), []
    rows = []
    for entry in read_entries(trail):
        if entry.event not in OUTFLOW_EVENTS:
            continue
        details: dict[str, Any] = dict(entry.details)
        about = next((f"{k} {details[k]}" for k in ("round", "release") if k in details), "")
        rows.append(
            OutflowRow(
                time=entry.time,
                event=entry.event,
                study=str(details.get("study", ""))[:12],
                about=about,
                bytes=details.get("bytes"),
                recipient=str(details.get("recipient", details.get("to", ""))),
                sha256=str(details.get("sha256", "")),
            )
        )
    return True, f"{report.n_entries} entries verified", rows


def _validations(state_dir: Path) -> list[ValidationRow]:
    rows = []
    for path in sorted((state_dir / "profiles").glob("*/*.json")):
        state = "promoted" if path.name.startswith("release-") else "pending"
        try:
            profile = ReferenceProfile.model_validate_json(path.read_bytes())
        except ValueError:
            continue
        overall = profile.report.overall
        cell = overall if isinstance(overall, CellReport) else None
        rows.append(
            ValidationRow(
                study_hash=profile.study_hash[:12],
                release=profile.release,
                round=profile.round,
                state=state,
                n=profile.n,
                positives=cell.positives if cell else None,
                auroc=cell.auroc.value if cell else None,
            )
        )
    return rows


def _monitors(folder: Path) -> list[MonitorRow]:
    rows = []
    for path in sorted(folder.glob("monitor-*.json"), reverse=True):
        try:
            result = json.loads(path.read_text("utf-8"))
            checks = result["checks"]
            rows.append(
                MonitorRow(
                    file=path.name,
                    page=path.with_suffix(".html").name,
                    release=int(result["release"]),
                    monitored_at=str(result["monitored_at"]),
                    rows=int(checks["n"]),
                    drift=bool(checks["drift"]),
                    flagged=[
                        f"{c['name']} ({c['kind']})" for c in checks["checks"] if c["flagged"]
                    ],
                    performance_passed=result.get("performance_passed"),
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return rows


def portal_data(config: SiteConfig) -> PortalData:
    """Read the site's audit trail, ledger, policy, profiles and monitor results."""
    outflows: list[OutflowRow] = []
    audit_ok, detail = True, "no policy configured, so no audit trail"
    budgets: list[BudgetRow] = []
    spends: list[StudySpendRow] = []
    approvals: list[ApprovalRow] = []
    if config.policy is not None:
        policy = load_policy(config.policy)
        audit_ok, detail, outflows = _outflows(site_audit_path(config.policy))
        totals, studies = budget_summary(policy, config.ledger_path)
        budgets = [
            BudgetRow(
                dataset=t.dataset,
                budget=t.budget.epsilon if t.budget else None,
                delta=t.budget.delta if t.budget else None,
                accountant=t.budget.accountant.value if t.budget else None,
                spent=t.spent,
                remaining=t.remaining,
            )
            for t in totals
        ]
        spends = [
            StudySpendRow(
                dataset=s.dataset,
                study=s.study_name,
                study_hash=s.study_hash[:12],
                rounds=s.rounds,
                steps=s.steps,
                epsilon=s.epsilon,
            )
            for s in studies
        ]
        approvals = [
            ApprovalRow(
                study=a.name,
                hash=a.hash,
                approved_by=a.approved_by,
                approved_at=a.approved_at,
                note=a.note,
            )
            for a in policy.approved_studies
        ]
    return PortalData(
        site=config.site,
        audit_ok=audit_ok,
        audit_detail=detail,
        outflows=outflows,
        budgets=budgets,
        spends=spends,
        approvals=approvals,
        validations=_validations(config.state_dir),
        monitors=_monitors(config.state_dir / "monitor"),
    )


def create_portal(config: SiteConfig) -> FastAPI:
    """The portal's app: the page, its data as JSON, and the monitor pages."""
    app = FastAPI(title=f"fedcare site portal: {config.site}", docs_url=None, redoc_url=None)
    page = files("fedcare.site").joinpath("templates/portal.html").read_text("utf-8")
    monitor_dir = config.state_dir / "monitor"

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page.replace("{{SITE}}", config.site)

    @app.get("/api/portal")
    def data() -> PortalData:
        return portal_data(config)

    @app.get("/monitor/{name}")
    def monitor_page(name: str) -> FileResponse:
        path = monitor_dir / name
        if not (name.startswith("monitor-") and name.endswith(".html")) or "/" in name:
            raise HTTPException(404, "no such monitor page")
        if not path.is_file():
            raise HTTPException(404, "no such monitor page")
        return FileResponse(path, media_type="text/html")

    return app


def serve_portal(config: SiteConfig, port: int) -> None:
    """Serve the portal on 127.0.0.1:``port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_portal(config), host=LOOPBACK, port=port, log_level="warning")
