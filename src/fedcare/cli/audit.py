"""``fedcare audit ...``: tamper-evident audit trails (see docs/audit.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcare.cli.common import console, guarded, say

audit_app = typer.Typer(
    help="Verify, export, sign and show hash-chained audit logs.", no_args_is_help=True
)


@audit_app.command("verify")
def audit_verify(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    head: Annotated[
        Path | None,
        typer.Option("--head", help="A signed head (from 'sign-head') the log must contain."),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option("--cert", help="The signing party's certificate (PEM); needed with --head."),
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="Also require --cert to be issued by this CA.")
    ] = None,
    partial: Annotated[
        bool,
        typer.Option("--partial", help="Accept a log that starts after entry 1 (export --since)."),
    ] = False,
) -> None:
    """Check a log's hash chain, and that it contains a signed head; exit 1 if it does not.

    Prints 'ok: N entries, head <hash>', or the first bad entry's seq and what is wrong.
    """
    from fedcare.audit import HeadError, VerifyReport, certificate_key, read_head, verify

    def run() -> VerifyReport:
        if (head is None) != (cert is None) or (ca is not None and cert is None):
            raise HeadError(
                "--head and --cert go together (a head is checked with its signer's key); "
                "--ca checks --cert"
            )
        if head is None or cert is None:
            return verify(log, allow_partial=partial)
        trusted = read_head(head)
        key = certificate_key(cert, party=trusted.party, ca_path=ca)
        return verify(log, trusted, key, allow_partial=partial)

    report = guarded(run)
    say(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@audit_app.command("export")
def audit_export(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    out: Annotated[Path, typer.Option("--out", help="New JSON Lines file for the reviewer.")],
    since: Annotated[
        int | None, typer.Option("--since", min=1, help="Only entries with this seq or later.")
    ] = None,
) -> None:
    """Copy a verified log (or its entries from --since on) for an external reviewer."""
    from fedcare.audit import export_jsonl

    result = guarded(lambda: export_jsonl(log, out, since=since))
    span = f"seq {result.first_seq}..{result.last_seq}, " if result.n_entries else ""
    say(f"wrote {result.n_entries} entries ({span}head {result.head}) to {result.out}")
    if result.partial:
        say(f"it starts after entry 1: check it with 'fedcare audit verify {result.out} --partial'")


@audit_app.command("sign-head")
def audit_sign_head(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    key: Annotated[Path, typer.Option("--key", help="The party's private key (PEM).")],
    out: Annotated[Path, typer.Option("--out", help="New file for the signed head (JSON).")],
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            "--passphrase-env", metavar="VAR", help="The key's passphrase is in this variable."
        ),
    ] = None,
) -> None:
    """Sign the log's last entry with the party's key; keep the head away from the log."""
    import os

    from fedcare.audit import HeadError, SignedHead, load_signing_key, sign_head, write_head

    def run() -> SignedHead:
        passphrase = None
        if passphrase_env is not None:
            passphrase = os.environ.get(passphrase_env, "").encode() or None
            if passphrase is None:
                raise HeadError(f"environment variable {passphrase_env} is unset or empty")
        signed = sign_head(log, load_signing_key(key, passphrase))
        write_head(signed, out)
        return signed

    signed = guarded(run)
    say(
        f"signed {signed.party}'s head: seq {signed.seq}, hash {signed.hash} ({signed.algorithm}) "
        f"-> {out}"
    )


@audit_app.command("show")
def audit_show(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
    last: Annotated[
        int | None, typer.Option("--last", min=1, help="Only the last N entries.")
    ] = None,
    partial: Annotated[
        bool,
        typer.Option("--partial", help="Accept a log that starts after entry 1 (export --since)."),
    ] = False,
) -> None:
    """Print a log's verified entries as a table; exit 1 if the chain is broken."""
    import json

    from rich.text import Text

    from fedcare.audit import read_verified

    entries, report = guarded(lambda: read_verified(log, allow_partial=partial))
    shown = entries[-last:] if last else entries
    table = Table(title=Text(f"{log} ({report.party or 'empty'})"))
    for header in ("seq", "time (UTC)", "event", "details", "hash"):
        table.add_column(header, justify="right" if header == "seq" else "left")
    for entry in shown:
        details = json.dumps(entry.details, sort_keys=True, ensure_ascii=True)
        table.add_row(
            Text(str(entry.seq)),
            Text(entry.time.replace("T", " ").rstrip("Z")),
            Text(entry.event),
            Text(details if len(details) <= 120 else details[:119] + "…"),
            Text(entry.hash[:12]),
        )
    console.print(table)
    say(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@audit_app.command("recover")
def audit_recover(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON Lines).")],
) -> None:
    """Set aside a torn (unterminated) last line, keeping its bytes, and log that.

    Stop the log's writers first. Refuses if anything before the last line is broken.
    """
    from fedcare.audit import recover_torn_tail

    torn = guarded(lambda: recover_torn_tail(log))
    if torn is None:
        say(f"{log} ends with a complete line: nothing to recover")
        return
    say(f"moved a torn last line ({torn.n_bytes} bytes, sha256 {torn.sha256}) to {torn.saved_to}")
    if torn.logged is not None:
        say(f"logged as entry {torn.logged.seq} ({torn.logged.event})")
