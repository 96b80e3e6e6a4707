"""How tasks reach sites and updates come back. The simulation's transport is a function call.

The bytes are the same encoded payloads the network carries, so the
simulation exercises the wire format and its checks too.
"""

from __future__ import annotations

from typing import Protocol

from fedcare.privacy.dp.budget import BudgetExceededError
from fedcare.site.worker import SiteWorker


class Transport(Protocol):
    def exchange(self, site: str, task: bytes) -> bytes | None:
        """Deliver ``task`` to ``site``; its encoded update, or None if it did not answer."""
        ...

    def validate(self, site: str, task: bytes) -> bytes | None:
        """Deliver a validation task; the site's encoded reply, or None if it did not answer."""
        ...


class InProcessTransport:
    """Calls each site's worker directly. ``offline`` sites never answer."""

    def __init__(self, workers: dict[str, SiteWorker], offline: frozenset[str] = frozenset()):
        self.workers = workers
        self.offline = offline

    def exchange(self, site: str, task: bytes) -> bytes | None:
        if site in self.offline:
            return None
        try:
            return self.workers[site].handle(task)
        except BudgetExceededError:
            # The site's ledger refused the round: it sends nothing, the study goes on.
            return None

    def validate(self, site: str, task: bytes) -> bytes | None:
        if site in self.offline:
            return None
        return self.workers[site].validate(task)
