"""Waking the coordinator's long-polls when its state may have changed, instead of
re-asking the study service on a timer.

Every request that can change state (anything but GET, HEAD and OPTIONS) and every tick
of the deadline ticker notifies; a waiting long-poll then asks again at once. A poll
reads the generation before it asks, so a change that lands while it is asking is never
missed: the wait returns immediately.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Receive, Scope, Send

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class Changes:
    """A generation counter and the waiters it wakes. Used from the server's event loop
    only; each waiter's future belongs to the loop it waits in (an app can outlive one)."""

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Something may have changed: wake every waiter."""
        self.generation += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seen: int, timeout_s: float) -> None:
        """Return when the generation is past ``seen``, or after ``timeout_s``."""
        if self.generation != seen or timeout_s <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            # A timeout on this task, not wait_for's task per wait: every post of a secure
            # stage wakes every site's waiting request, and most wait again at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await waiter
        finally:
            self._waiters.discard(waiter)


class NotifyOnWrite:
    """ASGI middleware: after each request that may have changed state, notify."""

    def __init__(self, app: ASGIApp, changes: Changes) -> None:
        self.app = app
        self.changes = changes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["method"] not in READS:
                self.changes.notify()
