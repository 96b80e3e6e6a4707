"""The coordinator's dashboard routes: ``/ui`` (the page), ``/ui/state`` (its data),
``/ui/events`` (server-sent events: a new state whenever what the viewer sees changes)
and ``/ui/studies/{hash}/plots/{name}.svg`` (its figures).

Served by the same app, over the same mutual TLS, as the sites' API: an operator's
certificate sees everything, a site's its own rows only (:mod:`.dashboard`). The page
and its script and styles ship in the package; it loads nothing from anywhere else,
and its Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from fedcare.coordinator.dashboard import (
    AuditCheck,
    Dashboard,
    changed_since,
    dashboard,
    plot,
    state_json,
)
from fedcare.federation.service import StudyService
from fedcare.ids import SHA256_HEX
from fedcare.pki import Peer

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
KEEPALIVE_S = 15.0
"""An idle event stream sends a comment this often, so proxies keep it open."""

PlotName = Annotated[str, PathParam(pattern=r"^(rounds|auroc|subgroups-[A-Za-z0-9._-]{1,64})$")]
StudyHash = Annotated[str, PathParam(pattern=SHA256_HEX)]

_figures = threading.Lock()
"""matplotlib's style context is process-wide: one figure is drawn at a time."""


def add_dashboard(
    app: FastAPI,
    coordinators: Mapping[str, StudyService],
    viewer: Callable[[Request], Peer],
    audit_log: Path | None,
    stopping: threading.Event,
    refresh_s: float = 1.0,
) -> None:
    """Add the dashboard's routes to ``app``; ``viewer(request)`` names the peer."""
    audit = AuditCheck(audit_log)
    page = files("fedcare.coordinator").joinpath("templates/dashboard.html").read_text("utf-8")

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def ui(request: Request) -> HTMLResponse:
        viewer(request)
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/ui/state")
    async def ui_state(request: Request) -> Dashboard:
        """What this certificate's holder may see, now."""
        peer = viewer(request)
        return await run_in_threadpool(dashboard, coordinators, peer, audit)

    @app.get("/ui/events", include_in_schema=False)
    async def ui_events(request: Request) -> StreamingResponse:
        peer = viewer(request)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            last = ""
            quiet_since = time.monotonic()
            while not stopping.is_set() and not await request.is_disconnected():
                board = await run_in_threadpool(dashboard, coordinators, peer, audit)
                digest = changed_since(board)
                if digest != last:
                    last = digest
                    quiet_since = time.monotonic()
                    yield f"event: state\ndata: {state_json(board)}\n\n"
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                await asyncio.sleep(refresh_s)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get("/ui/studies/{study_hash}/plots/{name}.svg", include_in_schema=False)
    async def ui_plot(request: Request, study_hash: StudyHash, name: PlotName) -> Response:
        peer = viewer(request)
        service = coordinators.get(study_hash)
        if service is None or (peer.is_site and not service.federation.is_member(peer.name)):
            raise HTTPException(404, f"no study {study_hash[:12]} for '{peer.name}'")

        def draw() -> str | None:
            with _figures:
                return plot(service, peer, name)

        svg = await run_in_threadpool(draw)
        if svg is None:
            raise HTTPException(404, f"no figure '{name}' for '{peer.name}'")
        return Response(
            svg,
            media_type="image/svg+xml",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )
