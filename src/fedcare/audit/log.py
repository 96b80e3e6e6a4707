"""Audit logs on disk: append, verify, export, sign heads, and set aside a torn tail.

This is the I/O edge around :mod:`fedcare.audit.chain` (the chain's rules) and
:mod:`fedcare.audit.heads` (signatures). The file is JSON Lines, one entry a line.

Appending takes an exclusive ``flock`` on the file, checks every byte written
since this process last looked (so it never extends a chain it has not
verified), and writes the whole line with one ``os.write`` to a descriptor
opened with ``O_APPEND``, then ``fsync``: when :meth:`AuditLog.append` returns,
the entry is on disk, and a process killed mid-append leaves either the whole
line or none of it. Readers take a shared lock just long enough to read the
file's size, so they see whole lines only. Locks are advisory and assume a
local file system.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from fedcare.audit.chain import (
    GENESIS,
    MAX_LINE_BYTES,
    AuditEntry,
    ChainCheck,
    ChainState,
    JsonInput,
    check_chain,
    check_event,
    check_party,
    format_time,
    make_entry,
    sha256_hex,
    to_json_value,
)
from fedcare.audit.errors import AuditChainError, AuditError, HeadError
from fedcare.audit.heads import SignedHead, SigningKey, VerifyingKey, check_signature, sign

FILE_MODE = 0o600
"""New logs are readable by their owner only: events name studies, sites and budgets."""

_MAX_HEAD_BYTES = 16 * 1024

READ_LOCK_TIMEOUT_S = 10.0
"""How long a reader waits for an append in progress before giving up."""


# --- locks and reading ------------------------------------------------------------


def _lock_shared(fd: int, path: Path) -> None:
    """A shared lock, waiting a bounded time: a reader must not hang on a stuck writer."""
    deadline = time.monotonic() + READ_LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AuditError(
                    f"{path}: locked by another process for over {READ_LOCK_TIMEOUT_S:.0f} s"
                ) from None
            time.sleep(0.01)
        else:
            return


def _lines(handle: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of ``handle`` from its position up to byte ``end``, each at most
    ``MAX_LINE_BYTES + 1`` bytes (a longer line shows as one over-long piece)."""
    remaining = end - handle.tell()
    while remaining > 0:
        line = handle.readline(min(MAX_LINE_BYTES + 1, remaining))
        if not line:  # the file shrank while being read
            return
        remaining -= len(line)
        yield line


def _check_file(path: Path, *, allow_partial: bool = False, keep: bool = False) -> ChainCheck:
    """Check the whole file, up to its size when no append was in progress."""
    with open(path, "rb") as handle:
        _lock_shared(handle.fileno(), path)
        try:
            size = os.fstat(handle.fileno()).st_size
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        # Bytes below `size` are whole lines that appends never touch again.
        return check_chain(_lines(handle, size), allow_partial=allow_partial, keep=keep)


def _fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable (a file's own fsync does not cover its name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file (refusing to replace one) and make it durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)


# --- reports --------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`.

    ``first_bad`` is the seq at which the log first goes wrong (None when the log is
    fine, or when the fault is in the signed head rather than the log); ``reason``
    says why. ``head`` is the hash of the last verified entry.
    """

    ok: bool
    n_entries: int
    first_bad: int | None
    reason: str | None
    party: str | None
    first_seq: int | None
    last_seq: int
    head: str
    line_no: int | None = None
    partial: bool = False
    prev_of_first: str | None = None
    checked_head: SignedHead | None = None

    def summary(self) -> str:
        """One line for people: ``ok: N entries, head <hash>`` or what is wrong."""
        if self.ok:
            text = f"ok: {self.n_entries} entries, head {self.head}"
            if self.partial:
                text += (
                    f" (partial: seq {self.first_seq}..{self.last_seq}, "
                    f"continuing from prev {self.prev_of_first})"
                )
            if self.checked_head is not None:
                text += (
                    f"; contains the head signed at {self.checked_head.signed_at} "
                    f"(seq {self.checked_head.seq})"
                )
            return text
        where = f"seq {self.first_bad}" if self.first_bad is not None else "signed head"
        line = f", line {self.line_no}" if self.line_no is not None else ""
        return f"FAILED at {where}{line}: {self.reason}"


def _report(
    check: ChainCheck,
    *,
    first_bad: int | None = None,
    reason: str | None = None,
    line_no: int | None = None,
    checked_head: SignedHead | None = None,
) -> VerifyReport:
    prev_of_first = None
    if check.partial and check.entries:
        prev_of_first = check.entries[0].prev
    failed = reason is not None
    return VerifyReport(
        ok=not failed,
        n_entries=check.n_entries,
        first_bad=first_bad,
        reason=reason,
        party=check.last.party,
        first_seq=check.first_seq,
        last_seq=check.last.seq,
        head=check.last.hash,
        line_no=line_no,
        partial=check.partial,
        prev_of_first=prev_of_first,
        checked_head=None if failed else checked_head,
    )


# --- the writer ------------------------------------------------------------------


class AuditLog:
    """One party's append-only audit log.

    Opening creates the file if it is missing and verifies the whole chain; a
    broken or torn log is refused (:class:`AuditChainError`), never repaired
    silently: see ``fedcare audit verify`` and ``fedcare audit recover``. Any
    number of processes and threads may append to one log; appends serialise.
    The object holds no open file between calls, so it survives ``fork``.

    Example::

        log = AuditLog(Path("site-audit.jsonl"), "hospital-a")
        log.append("update.sent", study=study_hash, round=4, to="coordinator", bytes=18244)

    ``clock`` (default: now, UTC) stamps entries; pass one for reproducible logs.
    ``trusted_head`` (a signed head kept elsewhere, and the signer's public key) makes
    opening refuse a log that does not hold the head's entry unchanged: an edited last
    entry whose hash was recomputed, or a tail cut off, while the writer was stopped.
    """

    def __init__(
        self,
        path: Path,
        party: str,
        *,
        clock: Callable[[], datetime] | None = None,
        trusted_head: tuple[SignedHead, VerifyingKey] | None = None,
    ) -> None:
        self.path = Path(path)
        self.party = check_party(party)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._mutex = threading.Lock()  # the cached state below, between threads
        fd = self._open(create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            stat = os.fstat(fd)
            with open(fd, "rb", closefd=False) as handle:
                check = check_chain(_lines(handle, stat.st_size))
        finally:
            os.close(fd)
        if not check.ok:
            report = _report(
                check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no
            )
            raise AuditChainError(
                f"{self.path}: refusing to use a broken audit log ({report.summary()}); "
                "it has not been changed. Inspect it with 'fedcare audit verify'.",
                report,
            )
        if check.last.party not in (None, self.party):
            raise AuditError(
                f"{self.path} is the audit log of {check.last.party!r}, not of {self.party!r}"
            )
        if trusted_head is not None:
            # A chain is consistent with itself: an edited last entry with its hash
            # recomputed passes check_chain. A head signed elsewhere pins it.
            pinned = verify(self.path, *trusted_head)
            if not pinned.ok:
                raise AuditChainError(
                    f"{self.path}: refusing to append to a log that does not match its signed "
                    f"head ({pinned.summary()}); it has not been changed",
                    pinned,
                )
        self._ident = (stat.st_dev, stat.st_ino)
        self._size = stat.st_size
        self._state = check.last

    def _open(self, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            # Only the constructor creates: a log deleted under a running writer must
            # not quietly restart at seq 1.
            if not create:
                raise AuditChainError(f"{self.path}: the audit log has disappeared") from None
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:  # another process created it first
            return os.open(self.path, flags)
        _fsync_dir(self.path.parent)
        return fd

    def append(self, event: str, /, **details: JsonInput) -> AuditEntry:
        """Add an entry and return it once it is on disk.

        ``details`` must be JSON values (no NaN, no bytes, string keys); anything else
        raises :class:`~fedcare.audit.errors.AuditValueError` and nothing is written.
        Raises :class:`AuditChainError` if the log was damaged, cut or replaced since
        it was last read: the chain is never extended past something unverified.
        """
        # Refuse unfit input before touching the file.
        check_event(event)
        to_json_value(details)
        with self._mutex:
            fd = self._open(create=False)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                size = self._catch_up(fd)
                # Stamped under the lock, so times follow the file's order.
                entry = make_entry(
                    self._state.seq + 1,
                    format_time(self._clock()),
                    self.party,
                    event,
                    details,
                    self._state.hash,
                )
                line = entry.line()
                written = os.write(fd, line)
                if written != len(line):
                    # A short write (disk full): take back our own partial line, which
                    # we know ends the file, rather than leave a torn entry.
                    os.ftruncate(fd, size)
                    raise AuditError(
                        f"{self.path}: short write ({written} of {len(line)} bytes); "
                        "nothing was logged"
                    )
                os.fsync(fd)
                self._size = size + written
                self._state = ChainState(entry.seq, entry.hash, entry.party)
            finally:
                os.close(fd)
            return entry

    def _catch_up(self, fd: int) -> int:
        """Verify what other writers appended since we last looked; return the size."""
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) != self._ident:
            raise AuditChainError(f"{self.path}: the audit log was replaced since it was opened")
        if stat.st_size < self._size:
            raise AuditChainError(
                f"{self.path}: the audit log shrank from {self._size} to {stat.st_size} bytes "
                "since it was last read: entries were removed"
            )
        if stat.st_size > self._size:
            with open(fd, "rb", closefd=False) as handle:
                handle.seek(self._size)
                check = check_chain(
                    _lines(handle, stat.st_size),
                    start=self._state,
                    first_line_no=self._state.seq + 1,
                )
            if not check.ok:
                raise AuditChainError(
                    f"{self.path}: refusing to append: seq {check.first_bad} "
                    f"(line {check.line_no}): {check.reason}",
                    _report(
                        check,
                        first_bad=check.first_bad,
                        reason=check.reason,
                        line_no=check.line_no,
                    ),
                )
            self._state = check.last
            self._size = stat.st_size
        return stat.st_size

    def entries(self) -> list[AuditEntry]:
        """Every entry, after verifying the chain (:class:`AuditChainError` if broken)."""
        return read_entries(self.path)

    @property
    def last(self) -> ChainState:
        """The last entry this object has verified or written (seq 0 when empty)."""
        with self._mutex:
            return self._state


# --- readers ----------------------------------------------------------------------


def read_verified(
    path: Path, *, allow_partial: bool = False
) -> tuple[list[AuditEntry], VerifyReport]:
    """The entries before the first fault (all of them if none) and the report."""
    check = _check_file(Path(path), allow_partial=allow_partial, keep=True)
    report = _report(check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no)
    return list(check.entries), report


def read_entries(path: Path, *, allow_partial: bool = False) -> list[AuditEntry]:
    """Every entry of the log at ``path``, verified; :class:`AuditChainError` if broken."""
    check = _check_file(Path(path), allow_partial=allow_partial, keep=True)
    if not check.ok:
        report = _report(
            check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no
        )
        raise AuditChainError(f"{path}: {report.summary()}", report)
    return list(check.entries)


def verify(
    path: Path,
    trusted_head: SignedHead | None = None,
    public_key: VerifyingKey | None = None,
    *,
    allow_partial: bool = False,
) -> VerifyReport:
    """Check the log at ``path`` and name its first bad entry.

    Detected: an edited entry (its hash), a deleted, inserted or reordered entry (the
    seq and prev links), a torn or unterminated last line, and, against a signed head
    (whose signature is checked with ``public_key``), a cut-off tail or a rewritten
    history. ``allow_partial`` accepts a log that starts after entry 1 (an export
    ``--since``); without it such a log fails, so deleting the oldest entries shows.
    """
    if trusted_head is not None and public_key is None:
        raise HeadError("checking a signed head needs the signer's public key")
    check = _check_file(Path(path), allow_partial=allow_partial)
    if trusted_head is None or public_key is None:
        return _report(check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no)
    head = trusted_head
    forged = check_signature(head, public_key)
    if forged is not None:
        return _report(check, reason=forged)
    if check.last.party is not None and check.last.party != head.party:
        return _report(
            check,
            reason=f"the head is {head.party!r}'s but the log is {check.last.party!r}'s",
        )
    seen = check.hash_of(head.seq)
    if seen is not None and seen != head.hash:
        # Entries up to the first chain fault are self-consistent, yet differ from
        # what was signed: the history was rewritten at or before this entry.
        return _report(
            check,
            first_bad=head.seq,
            reason=(
                f"entry {head.seq} differs from the signed head of {head.signed_at}: "
                "the log was rewritten at or before it"
            ),
        )
    if not check.ok:
        return _report(check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no)
    if head.seq > check.last.seq:
        return _report(
            check,
            first_bad=check.last.seq + 1,
            reason=(
                f"the log ends at seq {check.last.seq} but the head signed at "
                f"{head.signed_at} covers seq {head.seq}: the tail was cut off"
            ),
        )
    if seen is None:  # a partial log that starts after the head's entry
        return _report(
            check,
            reason=f"the signed head (seq {head.seq}) is before this log's first entry",
        )
    return _report(check, checked_head=head)


# --- signed heads -----------------------------------------------------------------


def sign_head(path: Path, private_key: SigningKey, *, now: datetime | None = None) -> SignedHead:
    """Sign the current last entry of the log at ``path`` with the party's key.

    The whole chain is verified first (a broken log is never signed). Keep the head
    away from the log's host (send it to the coordinator, the officer, a reviewer):
    a head stored next to the log can be rewritten along with it.
    """
    check = _check_file(Path(path))
    if not check.ok:
        raise AuditChainError(
            f"{path}: refusing to sign a broken log: seq {check.first_bad}: {check.reason}",
            _report(check, first_bad=check.first_bad, reason=check.reason, line_no=check.line_no),
        )
    if check.last.party is None:
        raise AuditError(f"{path}: the log is empty; there is no head to sign")
    moment = format_time(now or datetime.now(UTC))
    return sign(check.last.party, check.last.seq, check.last.hash, moment, private_key)


def write_head(head: SignedHead, out: Path) -> None:
    """Write ``head`` as JSON to a new file (an existing file is never replaced)."""
    if Path(out).exists():  # also caught atomically below; this says why
        raise AuditError(f"{out} exists: a signed head is evidence and is never replaced")
    text = json.dumps(head.to_json(), indent=2, sort_keys=True) + "\n"
    _write_new(Path(out), text.encode("ascii"), 0o644)


def read_head(path: Path) -> SignedHead:
    """Read a head written by :func:`write_head`; :class:`HeadError` if malformed."""
    with open(path, "rb") as handle:
        data = handle.read(_MAX_HEAD_BYTES + 1)
    if len(data) > _MAX_HEAD_BYTES:
        raise HeadError(f"{path}: too large to be a signed head")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadError(f"{path}: not a JSON signed head ({exc})") from None
    try:
        return SignedHead.from_json(obj)
    except HeadError as exc:
        raise HeadError(f"{path}: {exc}") from None


# --- export ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_jsonl` wrote."""

    out: Path
    n_entries: int
    first_seq: int | None
    last_seq: int | None
    head: str
    partial: bool


def export_jsonl(path: Path, out: Path, *, since: int | None = None) -> ExportResult:
    """Copy the verified entries with ``seq >= since`` (all by default) to a new file.

    The copy is itself an audit log: it verifies on its own, with ``allow_partial``
    when it starts after entry 1; its first ``prev`` ties it to the entry before.
    A broken log is not exported (:class:`AuditChainError`); ``out`` must not exist.
    """
    path, out = Path(path), Path(out)
    if since is not None and since < 1:
        raise AuditError("--since must be a seq of 1 or more")
    if out.exists():  # also caught atomically below; this says why
        raise AuditError(f"{out} exists: an export never replaces a file")
    entries = read_entries(path)
    chosen = [e for e in entries if since is None or e.seq >= since]
    _write_new(out, b"".join(e.line() for e in chosen), FILE_MODE)
    return ExportResult(
        out=out,
        n_entries=len(chosen),
        first_seq=chosen[0].seq if chosen else None,
        last_seq=chosen[-1].seq if chosen else None,
        head=chosen[-1].hash if chosen else GENESIS,
        partial=bool(chosen) and chosen[0].seq > 1,
    )


# --- recovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class TornTail:
    """An unterminated last line that :func:`recover_torn_tail` set aside."""

    saved_to: Path
    n_bytes: int
    sha256: str
    logged: AuditEntry | None


def recover_torn_tail(path: Path) -> TornTail | None:
    """Move an unterminated last line (a torn write) out of the log, and log that.

    The only repair there is, and never automatic: it refuses unless every complete
    line verifies, keeps the removed bytes in ``<log>.torn-<time>``, and appends an
    ``audit.torn_tail_removed`` entry with their size and SHA-256. Returns None when
    the last line is complete. Stop the log's writers first: a running writer then
    refuses to append (the file shrank) until it is restarted.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        with open(fd, "rb", closefd=False) as handle:
            tail_start = _last_line_start(handle, size)
            if tail_start is None:
                return None
            handle.seek(0)
            check = check_chain(_lines(handle, tail_start))
            if not check.ok:
                raise AuditChainError(
                    f"{path}: the log is broken before its last line (seq {check.first_bad}: "
                    f"{check.reason}); recover only sets aside a torn last line"
                )
            handle.seek(tail_start)
            torn = handle.read(size - tail_start)
        stamp = format_time(datetime.now(UTC)).replace(":", "")
        saved = path.with_name(f"{path.name}.torn-{stamp}")
        _write_new(saved, torn, FILE_MODE)
        os.ftruncate(fd, tail_start)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock before the append below takes it again
    logged = None
    if check.last.party is not None:
        logged = AuditLog(path, check.last.party).append(
            "audit.torn_tail_removed",
            bytes=len(torn),
            sha256=sha256_hex(torn),
            saved_to=saved.name,
        )
    return TornTail(saved, len(torn), sha256_hex(torn), logged)


def _last_line_start(handle: BinaryIO, size: int) -> int | None:
    """Where an unterminated last line starts, or None if the file ends with a newline."""
    if size == 0:
        return None
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return None
    end = size - 1
    while end > 0:
        begin = max(0, end - 65536)
        handle.seek(begin)
        chunk = handle.read(end - begin)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return begin + cut + 1
        end = begin
    return 0
