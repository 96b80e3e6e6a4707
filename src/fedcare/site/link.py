"""What a site and its coordinator say to each other, whatever carries it: the payload
type and the coordinator's refusals. Kept apart from the HTTPS client so the simulation,
which calls the study service directly, never imports an HTTP library."""

from __future__ import annotations

PAYLOAD = "application/octet-stream"


class CoordinatorError(RuntimeError):
    """The coordinator refused a request (4xx) and said why."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"coordinator answered {status}: {detail}")


class RetryableError(Exception):
    """A failure worth retrying: the network, or the coordinator temporarily unavailable."""
