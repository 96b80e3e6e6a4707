"""The audit trail: the chain, its tamper detection, signed heads, concurrency, crashes, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from fedcare.audit import (
    GENESIS,
    AuditChainError,
    AuditError,
    AuditLog,
    AuditValueError,
    HeadError,
    JsonValue,
    SigningKey,
    export_jsonl,
    read_entries,
    read_head,
    recover_torn_tail,
    sign_head,
    verify,
    write_head,
)
from fedcare.audit.chain import entry_hash, parse_entry

PARTY = "hospital-a"
runner = CliRunner()


def new_key() -> SigningKey:
    """A party's key as provisioned: ``fedcare.pki.new_key`` (ECDSA P-256).

    Imported here, not at the top, so the spawned writer processes below start fast.
    """
    from fedcare.pki import new_key as provisioned_key

    return provisioned_key()


def make_log(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(path, PARTY)
    for i in range(1, n + 1):
        log.append("update.sent", round=i, to="coordinator", bytes=1000 + i, eps=0.25)
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def forged_line(seq: int, prev: str, event: str = "update.sent") -> bytes:
    """An entry an attacker made with the right seq, prev and a correct hash."""
    body: dict[str, JsonValue] = {
        "seq": seq,
        "time": "2026-01-01T00:00:00.000000Z",
        "party": PARTY,
        "event": event,
        "details": {"bytes": 0},
        "prev": prev,
    }
    return json.dumps({**body, "hash": entry_hash(body)}).encode() + b"\n"


def rechain(lines: list[bytes]) -> list[bytes]:
    """Recompute every seq, prev and hash: what someone who can rewrite the file can do."""
    out, prev = [], GENESIS
    for seq, line in enumerate(lines, start=1):
        obj = json.loads(line)
        body = {**{k: v for k, v in obj.items() if k != "hash"}, "seq": seq, "prev": prev}
        prev = entry_hash(body)
        out.append(json.dumps({**body, "hash": prev}).encode() + b"\n")
    return out


# --- the chain ---------------------------------------------------------------------


def test_append_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 3)
    entries = log.entries()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(entries))
    report = verify(path)
    assert report.ok
    assert (report.n_entries, report.last_seq, report.head) == (3, 3, entries[-1].hash)
    assert report.summary() == f"ok: 3 entries, head {entries[-1].hash}"


def test_entry_hash_is_sha256_of_canonical_json(tmp_path: Path) -> None:
    """An outside reviewer can recompute a hash from the documented rule alone."""
    path = tmp_path / "audit.jsonl"
    entry = AuditLog(path, PARTY).append("x", b=[1, 2.5, None], a={"z": True, "k": "é"})
    obj = json.loads(path.read_bytes())
    assert list(obj) == ["seq", "time", "party", "event", "details", "prev", "hash"]
    body = {k: v for k, v in obj.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert hashlib.sha256(canonical.encode()).hexdigest() == obj["hash"] == entry.hash
    assert entry.details == {"a": {"k": "é", "z": True}, "b": [1, 2.5, None]}
    assert obj["time"].endswith("Z")


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = make_log(path, 2)
    last_hash = first.entries()[-1].hash
    again = AuditLog(path, PARTY)
    entry = again.append("round.opened", round=3)
    assert entry.seq == 3
    assert entry.prev == last_hash
    # The first object sees the other's entry and continues after it.
    assert first.append("round.closed", round=3).seq == 4
    assert verify(path).ok
    assert verify(path).n_entries == 4


def test_threads_in_one_process_serialise(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path, PARTY) for _ in range(2)]

    def work(i: int) -> None:
        for k in range(20):
            logs[i % 2].append("tick", thread=i, k=k)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    report = verify(path)
    assert report.ok
    assert report.n_entries == 80


def test_other_partys_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 1)
    with pytest.raises(AuditError, match="audit log of 'hospital-a'"):
        AuditLog(path, "hospital-b")
    with pytest.raises(AuditValueError, match="invalid party"):
        AuditLog(tmp_path / "other.jsonl", "not a name")


# --- tampering ----------------------------------------------------------------------


def _edit_detail(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"bytes":1003', b'"bytes":1')
    return lines


def _edit_and_rehash(lines: list[bytes]) -> list[bytes]:
    obj = json.loads(lines[2])
    obj["details"]["bytes"] = 1
    obj["hash"] = entry_hash(obj)
    lines[2] = json.dumps(obj).encode() + b"\n"
    return lines


def _delete_middle(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _delete_first(lines: list[bytes]) -> list[bytes]:
    return lines[1:]


def _insert_consistent(lines: list[bytes]) -> list[bytes]:
    # A forged entry 3 that links correctly to entry 2, slipped in before the real 3.
    prev = json.loads(lines[1])["hash"]
    return [*lines[:2], forged_line(3, prev), *lines[2:]]


def _insert_naive(lines: list[bytes]) -> list[bytes]:
    return [*lines[:2], lines[2].replace(b"update.sent", b"update.held"), *lines[2:]]


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def _replay(lines: list[bytes]) -> list[bytes]:
    return [*lines, lines[1]]


def _unterminated(lines: list[bytes]) -> list[bytes]:
    lines[-1] = lines[-1].rstrip(b"\n")
    return lines


def _torn(lines: list[bytes]) -> list[bytes]:
    return [*lines, lines[-1][:40]]


def _other_party(lines: list[bytes]) -> list[bytes]:
    obj = json.loads(lines[2])
    obj["party"] = "hospital-b"
    obj["hash"] = entry_hash(obj)
    lines[2] = json.dumps(obj).encode() + b"\n"
    return lines


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (_edit_detail, 3, "hash does not match"),
        (_edit_and_rehash, 4, "prev does not match the hash of entry 3"),
        (_delete_middle, 3, "entry 3 is missing"),
        (_delete_first, 1, "entries 1..1 are missing"),
        (_insert_consistent, 3, "one of them was inserted"),
        (_insert_naive, 3, "hash does not match"),
        (_swap, 3, "entry 3 is missing (found seq 4)"),
        (_replay, 7, "entry 2 appears a second time"),
        (_unterminated, 6, "unterminated last line"),
        (_torn, 7, "unterminated last line"),
        (_other_party, 3, "differs from the log's"),
    ],
)
def test_tampering_names_the_first_bad_entry(
    tmp_path: Path, tamper: Callable[[list[bytes]], list[bytes]], first_bad: int, reason: str
) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 6)
    rewrite(path, tamper(lines_of(path)))
    report = verify(path)
    assert not report.ok
    assert report.first_bad == first_bad
    assert reason in (report.reason or "")
    assert report.summary().startswith(f"FAILED at seq {first_bad}")
    # Opening it to write refuses, and leaves the file as it was.
    before = path.read_bytes()
    with pytest.raises(AuditChainError, match="refusing to use a broken audit log"):
        AuditLog(path, PARTY)
    assert path.read_bytes() == before


def test_append_refuses_a_chain_broken_while_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 3)
    with path.open("ab") as handle:  # a writer that does not follow the rules
        handle.write(forged_line(4, "f" * 64))
    before = path.read_bytes()
    with pytest.raises(AuditChainError, match="refusing to append: seq 4"):
        log.append("x")
    assert path.read_bytes() == before


def test_append_refuses_a_log_cut_or_replaced_while_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 3)
    rewrite(path, lines_of(path)[:2])  # truncated in place
    with pytest.raises(AuditChainError, match="shrank"):
        log.append("x")
    log = AuditLog(path, PARTY)
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(path.read_bytes())
    os.replace(replacement, path)
    with pytest.raises(AuditChainError, match="replaced"):
        log.append("x")
    path.unlink()
    with pytest.raises(AuditChainError, match="disappeared"):
        log.append("x")
    assert not path.exists()  # never silently restarted at seq 1


def test_rewritten_whole_file_passes_the_chain_but_not_a_signed_head(tmp_path: Path) -> None:
    """The documented limit: a consistent rebuild needs a signed head to be caught."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 6)
    key = new_key()
    head = sign_head(path, key)
    lines = lines_of(path)
    del lines[1]
    rewrite(path, rechain([*lines, lines[-1]]))  # same length, history changed
    assert verify(path).ok
    report = verify(path, head, key.public_key())
    assert not report.ok
    assert report.first_bad == 6
    assert "differs from the signed head" in (report.reason or "")


def test_the_writer_refuses_an_edited_last_entry_when_it_holds_a_signed_head(
    tmp_path: Path,
) -> None:
    """The tail-edit attack: while the writer is stopped, the last entry is edited and
    its hash recomputed. The chain alone cannot tell (the documented limit); a writer
    opened with the head signed at that entry refuses to append."""
    path = tmp_path / "audit.jsonl"
    make_log(path, 6).append("budget.spent", eps=0.5)
    key = new_key()
    head = sign_head(path, key)
    lines = lines_of(path)
    obj = json.loads(lines[-1])
    obj["details"]["eps"] = 0.05
    obj["hash"] = entry_hash({k: v for k, v in obj.items() if k != "hash"})
    lines[-1] = json.dumps(obj).encode() + b"\n"
    rewrite(path, lines)
    edited = path.read_bytes()
    assert AuditLog(path, PARTY).entries()[-1].details["eps"] == 0.05  # the limit
    with pytest.raises(AuditChainError, match="does not match its signed head"):
        AuditLog(path, PARTY, trusted_head=(head, key.public_key()))
    assert path.read_bytes() == edited
    rewrite(path, lines_of(path)[:-1])  # cutting the entry off is refused too
    with pytest.raises(AuditChainError, match="the tail was cut off"):
        AuditLog(path, PARTY, trusted_head=(head, key.public_key()))


def test_the_writer_appends_after_the_signed_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 3)
    key = new_key()
    head = sign_head(path, key)
    AuditLog(path, PARTY, trusted_head=(head, key.public_key())).append("later")
    assert verify(path, head, key.public_key()).ok
    other = new_key()
    with pytest.raises(AuditChainError, match="another signing key"):
        AuditLog(path, PARTY, trusted_head=(head, other.public_key()))


# --- signed heads -----------------------------------------------------------------


@pytest.mark.parametrize("make_key", [new_key, ed25519.Ed25519PrivateKey.generate])
def test_signed_head_detects_a_cut_tail(tmp_path: Path, make_key: Callable[[], SigningKey]) -> None:
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 6)
    key = make_key()
    head = sign_head(path, key)
    assert (head.party, head.seq, head.hash) == (PARTY, 6, log.entries()[-1].hash)
    write_head(head, tmp_path / "head.json")
    head = read_head(tmp_path / "head.json")
    assert verify(path, head, key.public_key()).ok
    log.append("later")  # a log that grew after the head still contains it
    assert verify(path, head, key.public_key()).ok
    rewrite(path, lines_of(path)[:4])
    assert verify(path).ok  # a shorter chain is still a chain...
    report = verify(path, head, key.public_key())
    assert not report.ok
    assert report.first_bad == 5
    assert "the tail was cut off" in (report.reason or "")


def test_forged_heads_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 4)
    key = new_key()
    head = sign_head(path, key)
    lines = lines_of(path)
    forged = dataclasses.replace(head, seq=2, hash=json.loads(lines[1])["hash"])
    report = verify(path, forged, key.public_key())
    assert not report.ok
    assert report.first_bad is None
    assert "signature does not verify" in (report.reason or "")
    assert report.summary().startswith("FAILED at signed head")
    # A head signed by someone else's key does not pass with the party's key.
    other = sign_head(path, new_key())
    report = verify(path, other, key.public_key())
    assert not report.ok
    assert "another signing key" in (report.reason or "")
    with pytest.raises(HeadError, match="public key"):
        verify(path, head)


def test_heads_are_not_signed_for_broken_or_empty_logs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, PARTY)
    with pytest.raises(AuditError, match="empty"):
        sign_head(path, new_key())
    make_log(path, 3)
    rewrite(path, _edit_detail(lines_of(path)))
    with pytest.raises(AuditChainError, match="refusing to sign"):
        sign_head(path, new_key())


# --- input checks, export, recovery -------------------------------------------------


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ({"eps": float("nan")}, r"details\.eps: nan is not allowed"),
        ({"eps": [1.0, float("inf")]}, r"details\.eps\[1\]: inf"),
        ({"when": object()}, "is not a JSON value"),
        ({"payload": b"raw"}, "log a digest"),
        ({"counts": {1: 2}}, "key 1 is not a string"),
        ({"blob": "x" * 70_000}, "over the 65536-byte limit"),
    ],
)
def test_append_refuses_unfit_details_and_writes_nothing(
    tmp_path: Path, details: dict[str, Any], message: str
) -> None:
    path = tmp_path / "audit.jsonl"
    log = make_log(path, 2)
    before = path.read_bytes()
    with pytest.raises(AuditValueError, match=message):
        log.append("privacy.spent", **details)
    assert path.read_bytes() == before
    assert log.append("ok").seq == 3


def test_bad_event_name_is_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", PARTY)
    with pytest.raises(AuditValueError, match="invalid event name"):
        log.append("two words")


def test_export_verifies_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    full = export_jsonl(path, tmp_path / "full.jsonl")
    assert (full.n_entries, full.partial) == (5, False)
    assert verify(tmp_path / "full.jsonl").head == verify(path).head
    since = export_jsonl(path, tmp_path / "since3.jsonl", since=3)
    assert (since.n_entries, since.first_seq, since.partial) == (3, 3, True)
    assert verify(tmp_path / "since3.jsonl", allow_partial=True).ok
    # Without --partial a log that starts late fails: deleting the oldest entries shows.
    assert verify(tmp_path / "since3.jsonl").first_bad == 1
    with pytest.raises(AuditError, match="never replaces"):
        export_jsonl(path, tmp_path / "full.jsonl")
    rewrite(path, _edit_detail(lines_of(path)))
    with pytest.raises(AuditChainError):
        export_jsonl(path, tmp_path / "broken.jsonl")
    assert not (tmp_path / "broken.jsonl").exists()


def test_recover_sets_a_torn_tail_aside_and_logs_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 3)
    torn = lines_of(path)[-1][:50]
    with path.open("ab") as handle:
        handle.write(torn)
    with pytest.raises(AuditChainError):
        AuditLog(path, PARTY)
    result = recover_torn_tail(path)
    assert result is not None
    assert result.saved_to.read_bytes() == torn
    assert result.logged is not None
    assert result.logged.seq == 4
    assert result.logged.details["sha256"] == hashlib.sha256(torn).hexdigest()
    assert verify(path).ok
    assert recover_torn_tail(path) is None
    AuditLog(path, PARTY).append("resumed")


# --- processes: concurrency and kill -9 ------------------------------------------------


def _append_many(path: str, writer: int, n: int, barrier: Barrier) -> None:
    log = AuditLog(Path(path), PARTY)
    barrier.wait(timeout=30)
    for k in range(n):
        log.append("tick", writer=writer, k=k)


def test_two_processes_append_to_one_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, PARTY)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 100
    procs = [ctx.Process(target=_append_many, args=(str(path), w, n, barrier)) for w in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        assert proc.exitcode == 0
    report = verify(path)
    assert report.ok
    assert report.n_entries == 2 * n
    seen = {(e.details["writer"], e.details["k"]) for e in read_entries(path)}
    assert seen == {(w, k) for w in (0, 1) for k in range(n)}


_WRITER = """
import sys
from pathlib import Path
from fedcare.audit import AuditLog
log = AuditLog(Path(sys.argv[1]), "hospital-a")
for i in range(1_000_000):
    log.append("tick", i=i, pad="x" * (i * 37 % 500))
"""


def test_kill_9_leaves_no_torn_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)])
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and path.stat().st_size > 0):
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never appended"
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert data.endswith(b"\n")
    for line in data.splitlines(keepends=True):
        parse_entry(line)
    report = verify(path)
    assert report.ok
    assert report.n_entries >= 1
    AuditLog(path, PARTY).append("restarted")  # the chain simply continues


# --- the command line -------------------------------------------------------------


@pytest.fixture
def provisioned(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA, and the party's certificate and private key as 'fedcare provision' makes them."""
    from fedcare.pki import issue_client_cert, make_ca, write_certificate, write_private_key

    ca = make_ca("Test Consortium")
    site = issue_client_cert(ca, "Test Consortium", PARTY)
    write_certificate(ca.cert, tmp_path / "ca.pem")
    write_certificate(site.cert, tmp_path / "site.pem")
    write_private_key(site.key, tmp_path / "site.key")
    return tmp_path / "ca.pem", tmp_path / "site.pem", tmp_path / "site.key"


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    from fedcare.cli import app

    path = tmp_path / "audit.jsonl"
    make_log(path, 4)
    done = runner.invoke(app, ["audit", "verify", str(path)])
    assert done.exit_code == 0, done.output
    assert f"ok: 4 entries, head {verify(path).head}" in done.stdout
    rewrite(path, _delete_middle(lines_of(path)))
    done = runner.invoke(app, ["audit", "verify", str(path)])
    assert done.exit_code == 1
    assert "FAILED at seq 3, line 3: entry 3 is missing" in done.stdout
    done = runner.invoke(app, ["audit", "verify", str(tmp_path / "missing.jsonl")])
    assert done.exit_code == 2
    assert "missing.jsonl" in done.stderr


def test_cli_sign_head_and_verify_against_it(
    tmp_path: Path, provisioned: tuple[Path, Path, Path]
) -> None:
    from fedcare.cli import app

    ca, cert, key = provisioned
    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    head = tmp_path / "head.json"
    done = runner.invoke(
        app, ["audit", "sign-head", str(path), "--key", str(key), "--out", str(head)]
    )
    assert done.exit_code == 0, done.output
    assert "seq 5" in done.stdout
    check = ["audit", "verify", str(path), "--head", str(head), "--cert", str(cert)]
    done = runner.invoke(app, [*check, "--ca", str(ca)])
    assert done.exit_code == 0, done.output
    assert "contains the head signed at" in done.stdout
    rewrite(path, lines_of(path)[:3])
    done = runner.invoke(app, check)
    assert done.exit_code == 1
    assert "FAILED at seq 4" in done.stdout
    assert "cut off" in done.stdout
    done = runner.invoke(app, ["audit", "verify", str(path), "--head", str(head)])
    assert done.exit_code == 2
    assert "--head and --cert go together" in done.stderr
    from fedcare.pki import make_ca, write_certificate

    stranger = make_ca("Other Consortium")
    write_certificate(stranger.cert, tmp_path / "other-ca.pem")
    done = runner.invoke(app, [*check, "--ca", str(tmp_path / "other-ca.pem")])
    assert done.exit_code == 2
    assert "was not issued by" in done.stderr


def test_cli_export_and_show(tmp_path: Path) -> None:
    from fedcare.cli import app

    path = tmp_path / "audit.jsonl"
    make_log(path, 5)
    out = tmp_path / "review.jsonl"
    done = runner.invoke(app, ["audit", "export", str(path), "--out", str(out), "--since", "2"])
    assert done.exit_code == 0, done.output
    assert "wrote 4 entries (seq 2..5" in done.stdout
    assert "--partial" in done.stdout
    assert runner.invoke(app, ["audit", "verify", str(out), "--partial"]).exit_code == 0
    assert runner.invoke(app, ["audit", "verify", str(out)]).exit_code == 1
    done = runner.invoke(app, ["audit", "show", str(path), "--last", "2"])
    assert done.exit_code == 0, done.output
    assert "update.sent" in done.stdout
    assert "ok: 5 entries" in done.stdout
    rewrite(path, _edit_detail(lines_of(path)))
    done = runner.invoke(app, ["audit", "show", str(path)])
    assert done.exit_code == 1
    assert "FAILED at seq 3" in done.stdout
