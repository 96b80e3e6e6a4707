"""The audit trail's exceptions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcare.audit.log import VerifyReport


class AuditError(Exception):
    """Base class: an audit log that cannot be written, read or trusted."""


class AuditValueError(AuditError, ValueError):
    """An event, party or detail that cannot go into an entry (nothing was written)."""


class AuditChainError(AuditError):
    """The log's chain is broken (edited, truncated, torn or replaced): refuse to use it.

    ``report`` names the first bad entry and why.
    """

    def __init__(self, message: str, report: VerifyReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class HeadError(AuditError):
    """A signed-head file or key that cannot be read or used."""
