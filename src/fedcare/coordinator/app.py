"""The coordinator's HTTP API (FastAPI), served over mutual TLS.

Sites only ever call in (hospital firewalls allow outbound HTTPS): they
long-poll for a task, post an update, and fetch the model. A site's identity is
its client certificate's subject, read from the TLS connection, never from
anything it sends. Bad input gets a 4xx with a reason, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Annotated, TypeVar

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from fedcare.coordinator.changes import Changes, NotifyOnWrite
from fedcare.coordinator.tls import PEER_KEY, CertificateBook, Revocations
from fedcare.coordinator.ui import add_dashboard
from fedcare.drift.summary import DriftSummary
from fedcare.federation.messages import Ready, RoundAlignment, TaskReply, TaskState, Withdrawal
from fedcare.federation.service import REFUSALS, StudyService
from fedcare.federation.state import StateError
from fedcare.federation.state.sql import SeenCertificate
from fedcare.federation.status import StudyStatus
from fedcare.ids import SHA256_HEX
from fedcare.pki import Peer
from fedcare.privacy.secagg.protocol import STAGES, stage_after, stage_named
from fedcare.releases.registry import Release
from fedcare.validation.cells import ValidationReport
from fedcare.validation.messages import MAX_REPLY_BYTES, ValidationReply

MAX_REPORT_BYTES = 256 * 1024
"""A drift summary: a few hundred tests at most."""
MAX_NOTICE_BYTES = 4096
"""Largest withdrawal or ready message (a few short fields)."""
STORAGE_RETRY_S = 5
"""Seconds a site is asked to wait (``Retry-After``) when the coordinator's storage fails."""
MIN_BODY_RATE = 64 * 1024
"""Bytes per second a request body must keep up after the first ``body_timeout_s``."""

log = logging.getLogger("fedcare.coordinator")

T = TypeVar("T")

PAYLOAD = "application/octet-stream"
StudyHash = Annotated[str, Path(pattern=SHA256_HEX, description="The study's content hash.")]
RoundNumber = Annotated[int, Path(ge=1, le=100_000)]
ReleaseId = Annotated[int, Path(ge=1, le=2**31 - 1)]
SecureStage = Annotated[
    str, Path(pattern=f"^({'|'.join(STAGES)})$", description="SecAgg+ stage (protocol.STAGES).")
]


BINARY = {"schema": {"type": "string", "format": "binary"}}


def _inline(node: object, defs: dict[str, object]) -> object:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(value, defs) for value in node]
    return node


def _body(content: dict[str, object]) -> dict[str, object]:
    """An endpoint's declared request body. The handlers read bodies themselves (size,
    depth and time limits first), so FastAPI cannot infer these; declaring them lets the
    schema fuzzer send what a site would."""
    return {"requestBody": {"content": content, "required": True}}


def _json_body(model: type[BaseModel]) -> dict[str, object]:
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return _body({"application/json": {"schema": _inline(schema, defs)}})


class RecordedReply(BaseModel):
    """The answer to a withdrawal or a ready message."""

    recorded: bool
    duplicate: bool


class SubmitReply(BaseModel):
    accepted: bool
    duplicate: bool
    round: int


class Problem(BaseModel):
    detail: str


class VerdictReply(BaseModel):
    """What the coordinator recorded for a site's validation of a release."""

    recorded: bool
    duplicate: bool
    release: int
    passed: bool
    reasons: list[str]


class VerdictView(BaseModel):
    """One site's verdict on a release and the report it rests on."""

    site: str
    passed: bool
    reasons: list[str]
    report: ValidationReport


class ReleaseSummary(BaseModel):
    """A release and how it was settled. A site sees the outcome and its own verdict;
    the decision's reasons (which quote every failing site's results) and the other
    sites' verdicts are the operator's only."""

    id: int
    round: int
    parent: int | None
    state: str
    reason: str = Field(description="Why it was settled so: empty for a site's view.")
    verdicts: list[VerdictView] = Field(
        description="A site's own verdict (if it sent one); every verdict for the operator."
    )


def release_summary(release: Release, peer: Peer) -> ReleaseSummary:
    """What ``peer`` may see of ``release`` (docs/validation.md, "Who sees what")."""
    shown = [v for v in release.verdicts if not peer.is_site or v.site == peer.name]
    return ReleaseSummary(
        id=release.id,
        round=release.round,
        parent=release.parent,
        state=release.state.value,
        reason="" if peer.is_site else release.reason,
        verdicts=[
            VerdictView(
                site=v.site, passed=v.verdict.passed, reasons=v.verdict.reasons, report=v.report
            )
            for v in shown
        ],
    )


def _refusal(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


STOP_CHECK_S = 1.0
"""Longest a long-poll waits without a change before it looks at ``stopping`` again (the
ticker's notifications usually wake it sooner)."""


async def _long_poll(
    fetch: Callable[[], T | None],
    wait_s: float,
    stopping: threading.Event,
    changes: Changes,
    version: Callable[[], Hashable] | None = None,
    since: Hashable | None = None,
) -> T | None:
    """Call ``fetch`` (in a worker thread) until it has something, ``wait_s`` has passed,
    or the server is stopping (the site is told to come back, and shutdown waits for
    no long-poll); between calls, wait for a change (:class:`Changes`), not a timer.

    ``version``, read on the event loop, changes whenever ``fetch``'s answer may: a
    change that leaves it alone does not call ``fetch`` again. Without it, every write
    wakes every waiter into a worker thread, n sites times n posts per secure stage.
    ``since``: a version at which ``fetch`` is known to have nothing (the post this poll
    follows left its stage collecting); while it holds, the first call is skipped too. A
    wait that times out asks again whatever the version says."""
    until = time.monotonic() + wait_s
    known_empty = version is not None and since is not None and version() == since
    while True:
        seen = changes.generation
        # Read before asking: a change that lands while ``fetch`` runs shows as a new version.
        mark = None if version is None else version()
        result = None if known_empty else await run_in_threadpool(fetch)
        known_empty = False
        if result is not None or time.monotonic() >= until or stopping.is_set():
            return result
        while True:
            await changes.wait(seen, min(until - time.monotonic(), STOP_CHECK_S))
            moved = version is None or changes.generation == seen or version() != mark
            if moved or time.monotonic() >= until or stopping.is_set():
                break
            seen = changes.generation


def _ready(reply: TaskReply) -> TaskReply | None:
    """A task reply worth answering now (ready or finished); None while the site must wait."""
    return None if reply.state is TaskState.WAIT else reply


def viewer(request: Request) -> Peer:
    """The verified peer of this request's connection (a site or an operator)."""
    peer = getattr(request.state, PEER_KEY, None)
    if not isinstance(peer, Peer):
        raise HTTPException(401, "no verified client certificate on this connection")
    return peer


def _identity(request: Request) -> str:
    peer = viewer(request)
    if not peer.is_site:
        raise HTTPException(
            403, f"'{peer.name}' holds an {peer.role} certificate, which cannot act as a site"
        )
    return peer.name


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` and with 408
    when it arrives slower than ``timeout_s`` plus one second per ``MIN_BODY_RATE`` bytes
    (a sender trickling bytes would otherwise hold a connection and a worker forever)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}")
    expected = 0 if declared is None else int(declared)
    chunks: list[bytes] = []
    size = 0
    started = time.monotonic()
    stream = request.stream().__aiter__()
    while True:
        allowed = timeout_s + max(expected, size) / MIN_BODY_RATE
        remaining = started + allowed - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise HTTPException(
                408,
                f"request body not received within {allowed:.1f} s; send at least "
                f"{MIN_BODY_RATE // 1024} KiB/s",
            ) from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)


def create_app(
    coordinators: dict[str, StudyService],
    max_body_bytes: int = 64 * 1024 * 1024,
    poll_wait_s: float = 20.0,
    tick_s: float = 0.25,
    body_timeout_s: float = 30.0,
    stopping: threading.Event | None = None,
    audit_log: pathlib.Path | None = None,
    revocations: Revocations | None = None,
    certificates: tuple[CertificateBook, Callable[[SeenCertificate], None]] | None = None,
) -> FastAPI:
    """The ASGI app for a set of studies, keyed by content hash, with the dashboard at
    ``/ui`` (it verifies ``audit_log``). Setting ``stopping`` ends every open long-poll
    and event stream at once (the server sets it on SIGTERM)."""
    stopping = stopping or threading.Event()
    changes = Changes()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            # Deadlines are enforced here, so no round waits for a site forever.
            while True:
                serials: dict[str, int] = {}
                if certificates is not None:
                    book, save = certificates
                    for seen in book.take_new():
                        try:
                            await run_in_threadpool(save, seen)
                        except StateError:
                            log.exception("recording %s's certificate failed", seen.name)
                    serials = book.site_serials()
                revoked = [] if revocations is None else revocations.revoked_sites(serials)
                for coordinator in coordinators.values():
                    try:
                        for site in revoked:
                            await run_in_threadpool(coordinator.drop_revoked, site)
                        await run_in_threadpool(coordinator.tick)
                    except Exception:
                        log.exception("closing a round of %s failed", coordinator.hash[:12])
                # A deadline may have closed a stage or a round: waiting polls look again.
                changes.notify()
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        title="fedcare coordinator",
        version="1",
        lifespan=lifespan,
        responses={
            400: {"model": Problem},
            403: {"model": Problem},
            404: {"model": Problem},
            409: {"model": Problem},
            408: {"model": Problem, "description": "The request body arrived too slowly"},
            413: {"model": Problem},
            503: {"model": Problem, "description": "Storage unavailable; retry after Retry-After"},
        },
    )

    def study_for(study_hash: str, site: str) -> StudyService:
        coordinator = coordinators.get(study_hash)
        if coordinator is None or not coordinator.federation.is_member(site):
            # The same answer for "no such study" and "not yours": no probing.
            raise HTTPException(404, f"no study {study_hash[:12]} for site '{site}'")
        return coordinator

    # Refusals a caller can act on: the reason goes back with a 4xx, never a 500.
    for kind, status in REFUSALS.items():
        app.add_exception_handler(kind, _refusal(status))

    async def _store(_: Request, exc: Exception) -> JSONResponse:
        # A locked or full database, a full disk: nothing was recorded, so the site
        # sends the same request again later and loses nothing.
        log.error("storage problem: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            {"detail": "coordinator storage unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": str(STORAGE_RETRY_S)},
        )

    for fault in (StateError, SQLAlchemyError, OSError):
        app.add_exception_handler(fault, _store)

    add_dashboard(app, coordinators, viewer, audit_log, stopping)
    app.add_middleware(NotifyOnWrite, changes=changes)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/crl", responses={200: {"content": {"application/pkix-crl": {}}}, 204: {}})
    async def crl(request: Request) -> Response:
        """The consortium CA's revocation list (PEM), as this coordinator enforces it: sites
        check their secure-aggregation peers against it (it is the CA's signature that
        counts, not the coordinator's word)."""
        viewer(request)
        if revocations is None:
            return Response(status_code=204)
        data = await run_in_threadpool(revocations.crl.read_bytes)
        return Response(data, media_type="application/pkix-crl")

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        """Who this connection's certificate proves: its role, its name, and for a site
        the site it speaks for."""
        peer = viewer(request)
        proven = {"role": peer.role, "name": peer.name}
        return {**proven, "site": peer.name} if peer.is_site else proven

    @app.get("/v1/studies")
    async def studies(request: Request) -> list[StudyStatus]:
        site = _identity(request)
        return [
            await run_in_threadpool(c.status, site)
            for c in coordinators.values()
            if c.federation.is_member(site)
        ]

    @app.get("/v1/studies/{study_hash}")
    async def study_status(request: Request, study_hash: StudyHash) -> StudyStatus:
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        return await run_in_threadpool(coordinator.status, site)

    def notice(
        path: str, already: str, message: type[BaseModel]
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """The route of a small JSON message a site sends about itself: 201 when newly
        recorded, 200 for an exact repeat."""
        return app.post(
            path,
            status_code=201,
            response_model=RecordedReply,
            responses={200: {"model": RecordedReply, "description": already}},
            openapi_extra=_json_body(message),
        )

    async def record(
        request: Request,
        study_hash: str,
        limit: int,
        receive: Callable[[StudyService, str, bytes], bool],
    ) -> Response:
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        body = await _read_body(request, limit, body_timeout_s)
        recorded = await run_in_threadpool(receive, coordinator, site, body)
        reply = RecordedReply(recorded=recorded, duplicate=not recorded)
        return JSONResponse(reply.model_dump(), status_code=201 if recorded else 200)

    @notice("/v1/studies/{study_hash}/withdraw", "Already withdrawn", Withdrawal)
    async def withdraw(request: Request, study_hash: StudyHash) -> Response:
        """This site cannot take part any more (a reason category, nothing about its data):
        it is not selected again and the open round stops waiting for it."""
        return await record(request, study_hash, MAX_NOTICE_BYTES, StudyService.withdraw)

    @notice("/v1/studies/{study_hash}/drift", "Already kept", DriftSummary)
    async def drift(request: Request, study_hash: StudyHash) -> Response:
        """A site's drift summary of a promoted release (flags, p-values, PSI, AUROC):
        kept over time; a failed live gate suspends the release at that site."""
        return await record(request, study_hash, MAX_REPORT_BYTES, StudyService.receive_drift)

    @notice("/v1/studies/{study_hash}/alignment", "Already kept", RoundAlignment)
    async def alignment(request: Request, study_hash: StudyHash) -> Response:
        """A site's alignment with the consortium's step for one aggregated round."""
        return await record(request, study_hash, MAX_NOTICE_BYTES, StudyService.receive_alignment)

    @notice("/v1/studies/{study_hash}/ready", "Already ready", Ready)
    async def ready(request: Request, study_hash: StudyHash) -> Response:
        """Asynchronous secure aggregation: this site holds an update trained for the
        round named and can join a flush (the update itself never comes here)."""
        return await record(request, study_hash, MAX_NOTICE_BYTES, StudyService.ready)

    @app.get(
        "/v1/studies/{study_hash}/task",
        responses={200: {"content": {PAYLOAD: {}}}, 204: {}, 410: {"model": Problem}},
    )
    async def task(
        request: Request,
        study_hash: StudyHash,
        wait: Annotated[float, Query(ge=0, le=60)] = 0.0,
    ) -> Response:
        """The current round's task for this site (long-polls up to ``wait`` seconds)."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        reply = await _long_poll(
            lambda: _ready(coordinator.task_for(site)), min(wait, poll_wait_s), stopping, changes
        )
        if reply is None:
            return Response(status_code=204, headers={"Retry-After": "1"})
        if reply.state is TaskState.FINISHED:
            return JSONResponse(
                {"detail": f"study finished after round {reply.round}"}, status_code=410
            )
        if reply.state is TaskState.JOIN:
            return Response(
                reply.payload,
                media_type="application/json",
                headers={"X-Fedcare-Round": str(reply.round), "X-Fedcare-Kind": "flush"},
            )
        headers = {"X-Fedcare-Round": str(reply.round)}
        if reply.sites:
            # Site names hold no comma (fedcare.ids.SITE_NAME).
            headers["X-Fedcare-Sites"] = ",".join(reply.sites)
        return Response(reply.payload, media_type=PAYLOAD, headers=headers)

    @app.post(
        "/v1/studies/{study_hash}/rounds/{round_number}/update",
        status_code=201,
        response_model=SubmitReply,
        responses={200: {"model": SubmitReply, "description": "Duplicate of an accepted upload"}},
        openapi_extra=_body({PAYLOAD: BINARY}),
    )
    async def submit(
        request: Request, study_hash: StudyHash, round_number: RoundNumber
    ) -> Response:
        """Upload this site's update for a round. Retrying the same upload is harmless."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        coordinator.refuse_plain_updates()
        body = await _read_body(request, max_body_bytes, body_timeout_s)
        accepted = await run_in_threadpool(coordinator.submit, site, round_number, body)
        reply = SubmitReply(accepted=accepted, duplicate=not accepted, round=round_number)
        return JSONResponse(reply.model_dump(), status_code=201 if accepted else 200)

    @app.get(
        "/v1/studies/{study_hash}/validation",
        responses={200: {"content": {PAYLOAD: {}}}, 204: {}},
    )
    async def validation_task(request: Request, study_hash: StudyHash) -> Response:
        """The candidate release this site has still to validate, if any."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        task = await run_in_threadpool(coordinator.validation_task_for, site)
        if task is None:
            return Response(status_code=204)
        release, payload = task
        return Response(payload, media_type=PAYLOAD, headers={"X-Fedcare-Release": str(release)})

    @app.post(
        "/v1/studies/{study_hash}/releases/{release_id}/verdict",
        status_code=201,
        response_model=VerdictReply,
        responses={200: {"model": VerdictReply, "description": "Duplicate of a recorded reply"}},
        openapi_extra=_json_body(ValidationReply),
    )
    async def verdict(request: Request, study_hash: StudyHash, release_id: ReleaseId) -> Response:
        """This site's validation report and verdict on a candidate release."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        body = await _read_body(request, MAX_REPLY_BYTES, body_timeout_s)
        recorded, stored = await run_in_threadpool(
            coordinator.receive_verdict, site, release_id, body
        )
        reply = VerdictReply(
            recorded=recorded,
            duplicate=not recorded,
            release=release_id,
            passed=stored.passed,
            reasons=stored.reasons,
        )
        return JSONResponse(reply.model_dump(), status_code=201 if recorded else 200)

    @app.get("/v1/studies/{study_hash}/releases")
    async def releases(request: Request, study_hash: StudyHash) -> list[ReleaseSummary]:
        """Every release of the study and how it was settled: for a site, the outcome
        and its own verdict and report; for the operator, every verdict and reason."""
        peer = viewer(request)
        if peer.is_site:
            coordinator = study_for(study_hash, peer.name)
        elif (found := coordinators.get(study_hash)) is not None:
            coordinator = found
        else:
            raise HTTPException(404, f"no study {study_hash[:12]}")
        desk = coordinator.releases
        if desk is None:
            return []
        history = await run_in_threadpool(desk.registry.releases, study_hash)
        return [release_summary(r, peer) for r in history]

    @app.post(
        "/v1/studies/{study_hash}/rounds/{round_number}/secagg/{stage}",
        status_code=204,
        responses={200: {"content": {"application/json": {}}}, 204: {}},
        # Signed JSON for keys and shares, a safetensors payload for the masked input.
        openapi_extra=_body({"application/json": {"schema": {"type": "object"}}, PAYLOAD: BINARY}),
    )
    async def secure_post(
        request: Request,
        study_hash: StudyHash,
        round_number: RoundNumber,
        stage: SecureStage,
        wait: Annotated[float, Query(ge=0, le=60)] = 0.0,
    ) -> Response:
        """A secure-aggregation message: signed keys, sealed shares, masked input, shares.
        Answers with the next stage's relay (200) if it opens within ``wait`` seconds,
        else 204: the site fetches it then, one request less per stage otherwise."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        body = await _read_body(request, max_body_bytes, body_timeout_s)
        collecting = await run_in_threadpool(
            coordinator.secure_post, site, round_number, stage, body
        )
        if stage_after(stage_named(stage)) is None:
            return Response(status_code=204)  # the last stage: nothing follows to wait for
        # This post may be what closes the stage: the other sites' waits wake on it.
        changes.notify()
        data = await _long_poll(
            lambda: coordinator.secure_next(site, round_number, stage),
            min(wait, poll_wait_s),
            stopping,
            changes,
            coordinator.secure_version,
            since=collecting,
        )
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="application/json")

    @app.get(
        "/v1/studies/{study_hash}/rounds/{round_number}/secagg/{stage}",
        responses={200: {"content": {"application/json": {}}}, 204: {}},
    )
    async def secure_fetch(
        request: Request,
        study_hash: StudyHash,
        round_number: RoundNumber,
        stage: SecureStage,
        wait: Annotated[float, Query(ge=0, le=60)] = 0.0,
    ) -> Response:
        """What this site needs for its next secure step (long-polls up to ``wait`` seconds)."""
        site = _identity(request)
        coordinator = study_for(study_hash, site)
        data = await _long_poll(
            lambda: coordinator.secure_fetch(site, round_number, stage),
            min(wait, poll_wait_s),
            stopping,
            changes,
            coordinator.secure_version,
        )
        if data is None:
            return Response(status_code=204, headers={"Retry-After": "1"})
        return Response(data, media_type="application/json")

    @app.get("/v1/studies/{study_hash}/model", responses={200: {"content": {PAYLOAD: {}}}})
    async def model(request: Request, study_hash: StudyHash) -> Response:
        """The current global model as a checked safetensors payload."""
        coordinator = study_for(study_hash, _identity(request))
        return Response(await run_in_threadpool(coordinator.model_bytes), media_type=PAYLOAD)

    return app
