"""The hash chain's maths: canonical JSON, entry hashes, and checking a run of lines.

Everything here is a pure function of its arguments (no files, no clock), so the
rules an auditor relies on can be read, and tested, in one place:

* an entry is ``{"seq", "time", "party", "event", "details", "prev", "hash"}``;
* ``hash`` is the SHA-256 (hex) of the canonical JSON of the six other fields;
* canonical JSON is ``json.dumps(sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)``: one byte string per value, ASCII only,
  so it cannot contain a raw newline;
* entry ``n`` has ``seq == n`` (from 1) and ``prev`` equal to entry ``n - 1``'s
  ``hash`` (:data:`GENESIS` for entry 1), and every entry names the same party.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeAlias

from fedcare.audit.errors import AuditValueError

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
"""A value as it reads back from JSON."""

JsonInput: TypeAlias = (
    bool | int | float | str | Sequence["JsonInput"] | Mapping[str, "JsonInput"] | None
)
"""What :func:`to_json_value` accepts: tuples and read-only mappings too (read back as
lists and dicts). Typed covariantly so a ``dict[str, int]`` is accepted as a detail."""

GENESIS = "0" * 64
"""The ``prev`` of the first entry."""

MAX_LINE_BYTES = 64 * 1024
"""Largest entry line. Entries record digests and counts, not payloads; the bound
keeps each append one small write and stops a tampered file from exhausting memory."""

MAX_DEPTH = 32
"""Deepest nesting of lists and objects in ``details``."""

PARTY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""The rule for site names (``fedcare.federation.messages.SITE_NAME``), so a party is a
site's name or ``coordinator``: the common name of the certificate that signs its heads."""

EVENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
"""Event names such as ``round.opened`` or ``update.sent``: no spaces or markup."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# What the writer produces: microseconds, UTC, "Z".
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_FIELDS = ("seq", "time", "party", "event", "details", "prev", "hash")


def canonical_json(value: JsonValue) -> bytes:
    """The one byte string for ``value`` that is hashed and signed.

    Raises ``ValueError`` for NaN or infinity and ``TypeError`` for anything that is
    not JSON; :func:`to_json_value` turns both into clear errors before this runs.
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def to_json_value(value: object, where: str = "details", depth: int = 0) -> JsonValue:
    """``value`` as plain JSON types, or :class:`AuditValueError` naming where it fails.

    Refused: NaN and infinities, non-string keys, bytes, and every other type (numpy
    integers, datetimes, paths...): convert them first, so what is hashed is exactly
    what a reader sees. Subclasses of ``int``/``float``/``str`` (enums, numpy float64)
    become the plain type, as ``json`` would write them. Tuples become lists.
    """
    if depth > MAX_DEPTH:
        raise AuditValueError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditValueError(f"{where}: {value!r} is not allowed (JSON has no NaN/inf)")
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise AuditValueError(f"{where}: key {key!r} is not a string")
        # Sorted, so that an entry's line reads the same whatever order keys came in.
        return {
            str.__str__(key): to_json_value(value[key], f"{where}.{key}", depth + 1)
            for key in sorted(value)
        }
    if isinstance(value, list | tuple):
        return [to_json_value(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    hint = " (log a digest or base64 text)" if isinstance(value, bytes | bytearray) else ""
    raise AuditValueError(
        f"{where}: a {type(value).__name__} is not a JSON value{hint}; "
        "convert it to str, int, float, bool, list or dict"
    )


def check_party(party: str) -> str:
    """``party`` if it is a valid party name, else :class:`AuditValueError`."""
    if not isinstance(party, str) or not PARTY_NAME.fullmatch(party):
        raise AuditValueError(
            f"invalid party {party!r}: use the site's name or 'coordinator' "
            "(1-64 letters, digits, '.', '_' or '-')"
        )
    return party


def check_event(event: str) -> str:
    """``event`` if it is a valid event name, else :class:`AuditValueError`."""
    if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
        raise AuditValueError(
            f"invalid event name {event!r}: use 1-100 letters, digits, '.', '_', ':' or '-' "
            "(for example 'update.sent')"
        )
    return event


@dataclass(frozen=True)
class AuditEntry:
    """One line of an audit log."""

    seq: int
    time: str
    party: str
    event: str
    details: dict[str, JsonValue]
    prev: str
    hash: str

    def body(self) -> dict[str, JsonValue]:
        """The fields the hash covers (all but ``hash``)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "party": self.party,
            "event": self.event,
            "details": self.details,
            "prev": self.prev,
        }

    def to_json(self) -> dict[str, JsonValue]:
        """The entry as a JSON object."""
        return {**self.body(), "hash": self.hash}

    def line(self) -> bytes:
        """The entry as one JSON line, newline included: fields in the documented order
        (seq first, hash last, for people reading the file), compact, ASCII only."""
        text = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return text.encode("ascii") + b"\n"


def entry_hash(body: Mapping[str, JsonValue]) -> str:
    """The hash of an entry: SHA-256 over the canonical JSON of its other fields."""
    return sha256_hex(canonical_json({k: v for k, v in body.items() if k != "hash"}))


def make_entry(
    seq: int, time: str, party: str, event: str, details: Mapping[str, JsonInput], prev: str
) -> AuditEntry:
    """A new, hashed entry; :class:`AuditValueError` if any field is unfit."""
    clean = to_json_value(details)
    if not isinstance(clean, dict):
        raise AuditValueError("details must be a mapping of names to values")
    body: dict[str, JsonValue] = {
        "seq": seq,
        "time": time,
        "party": check_party(party),
        "event": check_event(event),
        "details": clean,
        "prev": prev,
    }
    entry = AuditEntry(seq, time, party, event, clean, prev, entry_hash(body))
    size = len(entry.line())
    if size > MAX_LINE_BYTES:
        raise AuditValueError(
            f"the entry would be {size} bytes, over the {MAX_LINE_BYTES}-byte limit: "
            "log digests and counts, not payloads"
        )
    return entry


class EntryFormatError(ValueError):
    """A line that is not a well-formed entry (reported by :func:`check_chain`)."""


def _no_duplicate_keys(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    # json keeps the last of duplicate keys silently; a reader showing the first
    # would then see something other than what was hashed.
    out: dict[str, JsonValue] = {}
    for key, value in pairs:
        if key in out:
            raise EntryFormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> JsonValue:
    raise EntryFormatError(f"{name} is not allowed")


def parse_entry(line: bytes) -> AuditEntry:
    """Parse one line (newline optional) into an entry, checking its shape and its hash.

    :class:`EntryFormatError` says what is wrong. The chain links (``seq``, ``prev``)
    are :func:`check_chain`'s business.
    """
    try:
        obj = json.loads(
            line.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EntryFormatError(f"not valid JSON ({type(exc).__name__})") from None
    except ValueError as exc:  # EntryFormatError, or an integer too long to convert
        raise EntryFormatError(str(exc)) from None
    if not isinstance(obj, dict):
        raise EntryFormatError("not a JSON object")
    keys = set(obj)
    if keys != set(_FIELDS):
        missing = sorted(set(_FIELDS) - keys)
        extra = sorted(keys - set(_FIELDS))
        raise EntryFormatError(f"wrong fields (missing {missing}, unexpected {extra})")
    seq, time, party, event = obj["seq"], obj["time"], obj["party"], obj["event"]
    details, prev, digest = obj["details"], obj["prev"], obj["hash"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise EntryFormatError("seq is not a positive integer")
    if not isinstance(time, str) or not is_timestamp(time):
        raise EntryFormatError("time is not an ISO 8601 UTC timestamp")
    if not isinstance(party, str) or not PARTY_NAME.fullmatch(party):
        raise EntryFormatError("party is not a valid party name")
    if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
        raise EntryFormatError("event is not a valid event name")
    if not isinstance(details, dict):
        raise EntryFormatError("details is not an object")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise EntryFormatError("prev is not 64 lower-case hex digits")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise EntryFormatError("hash is not 64 lower-case hex digits")
    try:
        expected = entry_hash(obj)
    except ValueError:  # a float that overflowed to inf when parsed, e.g. 1e400
        raise EntryFormatError("details hold a number JSON cannot represent") from None
    if expected != digest:
        raise EntryFormatError("hash does not match the entry's contents: the entry was edited")
    return AuditEntry(seq, time, party, event, details, prev, digest)


def format_time(moment: datetime) -> str:
    """``moment`` as the log writes times: ISO 8601, UTC, microseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("the time must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_timestamp(text: object) -> bool:
    """Whether ``text`` is a time as :func:`format_time` writes it."""
    if not isinstance(text, str) or not _TIME.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13
        return False
    return True


@dataclass(frozen=True)
class ChainState:
    """Where a verified chain ends: the last entry's seq and hash (0 and GENESIS if none)."""

    seq: int = 0
    hash: str = GENESIS
    party: str | None = None


@dataclass(frozen=True)
class ChainCheck:
    """The outcome of :func:`check_chain`.

    ``first_bad`` is the sequence number at which the chain first goes wrong: the seq
    the entry at that place should have had (so a deleted entry is named, not its
    successor), or the seq of a forked (inserted) entry. ``line_no`` is the 1-based line.
    """

    ok: bool
    n_entries: int
    first_seq: int | None
    last: ChainState
    first_bad: int | None = None
    line_no: int | None = None
    reason: str | None = None
    entries: tuple[AuditEntry, ...] = ()
    hashes: tuple[str, ...] = field(default=(), repr=False)

    @property
    def partial(self) -> bool:
        """Whether the checked lines start after entry 1 (an export ``--since``)."""
        return self.first_seq is not None and self.first_seq > 1

    def hash_of(self, seq: int) -> str | None:
        """The hash of verified entry ``seq``, if it was among the checked lines."""
        if self.first_seq is None or not self.first_seq <= seq <= self.last.seq:
            return None
        return self.hashes[seq - self.first_seq]


def check_chain(
    lines: Iterable[bytes],
    *,
    start: ChainState | None = None,
    allow_partial: bool = False,
    keep: bool = False,
    first_line_no: int = 1,
) -> ChainCheck:
    """Check that ``lines`` (each with its newline, as iterating a binary file yields
    them) form an unbroken chain, stopping at the first fault.

    Without ``start`` the lines must begin with entry 1, unless ``allow_partial``
    (an export that starts later: its first ``prev`` is then taken on trust and
    reported). With ``start`` (the state of an already verified prefix) they must
    continue it. ``keep`` returns the verified entries too.
    """
    state = start or ChainState()
    first_seq: int | None = None
    kept: list[AuditEntry] = []
    hashes: list[str] = []  # by position: tells a fork (inserted entry) from a gap

    def done(
        bad: int | None = None, line_no: int | None = None, why: str | None = None
    ) -> ChainCheck:
        return ChainCheck(
            ok=why is None,
            n_entries=len(hashes),
            first_seq=first_seq,
            last=state,
            first_bad=bad,
            line_no=line_no,
            reason=why,
            entries=tuple(kept),
            hashes=tuple(hashes),
        )

    line_no = first_line_no - 1
    for line in lines:
        line_no += 1
        expected = state.seq + 1
        if len(line) > MAX_LINE_BYTES:
            return done(expected, line_no, f"line longer than {MAX_LINE_BYTES} bytes")
        if not line.endswith(b"\n"):
            return done(
                expected, line_no, "unterminated last line: a torn write, or the file was cut"
            )
        if not line.strip():
            return done(expected, line_no, "blank line")
        try:
            entry = parse_entry(line)
        except EntryFormatError as exc:
            return done(expected, line_no, f"malformed entry: {exc}")
        if state.party is not None and entry.party != state.party:
            return done(
                expected, line_no, f"party {entry.party!r} differs from the log's {state.party!r}"
            )
        fault = _link_fault(entry, state, hashes, first_seq, start, allow_partial)
        if fault is not None:
            bad, why = fault
            return done(bad, line_no, why)
        if first_seq is None:
            first_seq = entry.seq
        state = ChainState(entry.seq, entry.hash, entry.party)
        hashes.append(entry.hash)
        if keep:
            kept.append(entry)
    return done()


def _link_fault(
    entry: AuditEntry,
    state: ChainState,
    hashes: Sequence[str],
    first_seq: int | None,
    start: ChainState | None,
    allow_partial: bool,
) -> tuple[int, str] | None:
    """Why ``entry`` cannot follow ``state`` (first bad seq and reason), or None."""
    expected = state.seq + 1
    opening = start is None and first_seq is None
    if opening and allow_partial and entry.seq > 1:
        return None  # an export from a later seq: its prev links to entries not here
    if entry.seq == expected:
        if entry.prev == state.hash:
            return None
        if expected == 1:
            return expected, "the first entry's prev is not the genesis value"
        return expected, (
            f"prev does not match the hash of entry {expected - 1}: "
            f"entry {expected - 1} was altered, or this entry was not written after it"
        )
    if opening:
        return 1, f"the log starts at seq {entry.seq}: entries 1..{entry.seq - 1} are missing"
    if entry.seq > expected:
        return expected, (
            f"entry {expected} is missing (found seq {entry.seq}): "
            "entries were deleted or reordered"
        )
    # seq went backwards: a replayed entry, or a fork where an entry was inserted.
    base = first_seq if first_seq is not None else expected
    seen = hashes[entry.seq - base] if base <= entry.seq < expected else None
    if seen == entry.hash:
        return expected, f"entry {entry.seq} appears a second time (replayed or reordered)"
    before = GENESIS if entry.seq == 1 else None
    if base <= entry.seq - 1 < expected:
        before = hashes[entry.seq - 1 - base]
    if before is not None and entry.prev == before:
        return entry.seq, (
            f"two different entries {entry.seq} follow entry {entry.seq - 1}: "
            "one of them was inserted"
        )
    return expected, f"seq {entry.seq} where {expected} was expected: entries reordered"
