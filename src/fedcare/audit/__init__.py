"""Tamper-evident, append-only, hash-chained audit trails.

One log at the coordinator (studies, rounds, participants, releases, overrides)
and one at each site (approvals, what left and to whom, privacy spent, refusals)::

    log = AuditLog(path, "hospital-a")        # creates, or verifies and continues
    log.append("update.sent", round=3, to="coordinator", bytes=18244, sha256=digest)
    report = verify(path)                     # report.ok, report.first_bad, report.reason
    head = sign_head(path, private_key)       # ship it off the host; verify against it later

Layout: :mod:`~fedcare.audit.chain` holds the chain's rules (pure functions),
:mod:`~fedcare.audit.heads` the signed heads, :mod:`~fedcare.audit.log` the file I/O.
The format and its guarantees are in ``docs/audit.md``.
"""

from fedcare.audit.chain import GENESIS, AuditEntry, JsonInput, JsonValue
from fedcare.audit.errors import AuditChainError, AuditError, AuditValueError, HeadError
from fedcare.audit.heads import SignedHead, SigningKey, VerifyingKey
from fedcare.audit.keys import certificate_key, load_signing_key, load_trusted_head
from fedcare.audit.log import (
    AuditLog,
    ExportResult,
    TornTail,
    VerifyReport,
    export_jsonl,
    read_entries,
    read_head,
    read_verified,
    recover_torn_tail,
    sign_head,
    verify,
    write_head,
)

__all__ = [
    "GENESIS",
    "AuditChainError",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditValueError",
    "ExportResult",
    "HeadError",
    "JsonInput",
    "JsonValue",
    "SignedHead",
    "SigningKey",
    "TornTail",
    "VerifyReport",
    "VerifyingKey",
    "certificate_key",
    "export_jsonl",
    "load_signing_key",
    "load_trusted_head",
    "read_entries",
    "read_head",
    "read_verified",
    "recover_torn_tail",
    "sign_head",
    "verify",
    "write_head",
]
