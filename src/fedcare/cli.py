"""The ``fedcare`` command line."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedcare.schema.mapping import DataValidationError, MappingError
from fedcare.schema.readers import DataFileError
from fedcare.simulation.results import SimulationResult
from fedcare.site.dataset import SiteDataError
from fedcare.study import Strategy, Study, StudyError, Weighting, load_study

app = typer.Typer(
    help="fedcare: federated learning between hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
study_app = typer.Typer(help="Inspect and check study files.", no_args_is_help=True)
data_app = typer.Typer(help="Check a site's data against a study.", no_args_is_help=True)


@app.callback()
def _main(
    threads: Annotated[
        int, typer.Option(min=1, envvar="FEDCARE_THREADS", help="CPU threads for PyTorch.")
    ] = 1,
) -> None:
    """fedcare: federated learning between hospitals."""
    import torch

    # Site models are small: with several threads, per-batch synchronisation
    # costs more than the arithmetic (measured 4x slower on 2 cores).
    torch.set_num_threads(threads)


app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")
coordinator_app = typer.Typer(help="Run the consortium's coordinator.", no_args_is_help=True)
site_app = typer.Typer(help="Run a hospital's site agent.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(site_app, name="site")

console = Console()
errors = Console(stderr=True)

T = TypeVar("T")

# Errors a user can fix: shown as one clear message, exit status 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    StudyError,
    MappingError,
    DataValidationError,
    DataFileError,
    SiteDataError,
)


def _user_errors() -> tuple[type[Exception], ...]:
    from fedcare.config import ConfigError
    from fedcare.coordinator.store import StoreError
    from fedcare.simulation.sites import SitesFileError
    from fedcare.site.agent import SiteAgentError
    from fedcare.site.client import CoordinatorError

    return (
        *USER_ERRORS,
        SitesFileError,
        ConfigError,
        SiteAgentError,
        CoordinatorError,
        StoreError,
        FileNotFoundError,
    )


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error becomes a message and exit status 2."""
    try:
        return fn()
    except _user_errors() as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=errors, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_comparison(result: SimulationResult) -> None:
    """The per-site table: local vs federated vs pooled, and cross-site generalisation."""
    table = Table(title=f"AUROC on each site's held-out data ({result.study_name})")
    for header in ("site", "local", "federated", "pooled", "local→others", "federated→others"):
        table.add_column(header, justify="left" if header == "site" else "right")
    for row in result.comparison:
        table.add_row(
            row.site,
            _fmt(row.local),
            _fmt(row.federated),
            _fmt(row.pooled),
            _fmt(row.local_on_other_sites),
            _fmt(row.federated_on_other_sites),
        )
    console.print(table)
    console.print(
        "local→others: each site's local model scored on the other sites' held-out data; "
        "federated→others: the federated model on the same data (mean AUROC).",
        style="dim",
    )


def _override(
    study: Study,
    rounds: int | None = None,
    strategy: Strategy | None = None,
    weighting: Weighting | None = None,
    cap: float | None = None,
    seed: int | None = None,
    server_lr: float | None = None,
    proximal_mu: float | None = None,
) -> Study:
    """The study with command-line overrides applied (its hash changes accordingly)."""
    aggregation = study.canonical()["aggregation"]
    if strategy is not None and strategy is not study.aggregation.strategy:
        aggregation["strategy"] = strategy.value
        # A learning rate chosen for another strategy is meaningless for this one.
        aggregation["server_learning_rate"] = None
    if server_lr is not None:
        aggregation["server_learning_rate"] = server_lr
    if weighting is not None:
        aggregation["weighting"] = weighting.value
        aggregation["cap"] = cap if weighting is Weighting.CAPPED else None
    changes: dict[str, object] = {"aggregation": aggregation}
    if proximal_mu is not None:
        changes["training"] = {**study.canonical()["training"], "proximal_mu": proximal_mu}
    if rounds is not None:
        changes["rounds"] = {**study.canonical()["rounds"], "count": rounds}
    if seed is not None:
        changes["seed"] = seed
    return study.replace(**changes)


def _simulate(
    study: Study,
    sites_file: Path | None,
    out: Path | None,
    baselines: bool,
    scale: float,
    data_seed: int,
) -> SimulationResult:
    from fedcare.report import write_results
    from fedcare.simulation.runner import SimulationOptions, run_simulation
    from fedcare.simulation.sites import builtin_sites, sites_from_file

    started = time.perf_counter()
    if sites_file is None:
        sites, descriptions = builtin_sites(study, seed=data_seed, scale=scale)
    else:
        sites, descriptions = sites_from_file(sites_file, study)
    errors.print(
        f"study [bold]{study.name}[/] ({study.content_hash[:12]}), {len(sites)} sites, "
        f"{sum(s.n_train for s in sites)} training rows, {study.rounds.count} rounds",
        highlight=False,
    )
    with _progress() as progress:
        result = run_simulation(
            study, sites, SimulationOptions(baselines, descriptions), progress=progress
        )
    result = result.model_copy(update={"wall_s": time.perf_counter() - started})
    if out is not None:
        json_path, html_path = write_results(result, out)
        errors.print(f"wrote {json_path} and {html_path}", highlight=False)
    return result


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for results.json and report.html.")] = Path(
        "fedcare-demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed for the synthetic hospitals.")] = 2026,
    scale: Annotated[float, typer.Option(min=0.01, max=10.0, help="Hospital size factor.")] = 1.0,
    rounds: Annotated[int | None, typer.Option(min=1, help="Override the study's rounds.")] = None,
    network: Annotated[
        bool,
        typer.Option(
            "--network",
            help="Run a coordinator and one process per hospital on loopback over mutual TLS, "
            "and compare the model with the in-process simulation.",
        ),
    ] = False,
) -> None:
    """Train the built-in early-warning study across five synthetic hospitals, with baselines."""
    from fedcare.data import demo_study

    if network:
        _network_demo(_override(demo_study(), rounds=rounds), out / "network", seed, scale)
        return

    def run() -> SimulationResult:
        study = _override(demo_study(), rounds=rounds)
        return _simulate(study, None, out, baselines=True, scale=scale, data_seed=seed)

    result = guarded(run)
    print_comparison(result)
    console.print(f"done in {result.wall_s:.1f} s; open {out / 'report.html'}")


def _network_demo(study: Study, folder: Path, seed: int, scale: float) -> None:
    from fedcare.simulation.loopback import LoopbackError, run_network_demo

    errors.print(
        f"network demo: study {study.name} ({study.content_hash[:12]}) in {folder}; "
        "coordinator and sites run as separate processes on 127.0.0.1 with mutual TLS",
        highlight=False,
    )
    with _progress() as progress:
        try:
            result = guarded(
                lambda: run_network_demo(
                    folder,
                    study,
                    seed,
                    scale,
                    progress,
                    on_started=lambda url: errors.print(f"coordinator serving at {url}"),
                )
            )
        except LoopbackError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
    table = Table(title="Network demo")
    table.add_column("process")
    table.add_column("peak RSS (MB)", justify="right")
    for proc in result.processes:
        table.add_row(proc.name, f"{proc.peak_rss_mb:.0f}")
    console.print(table)
    steady = sorted(result.coordinator_overhead_s[1:]) or result.coordinator_overhead_s
    console.print(
        f"{result.rounds} rounds over the network in {result.network_wall_s:.1f} s "
        f"(process start-up included); in-process: {result.in_process_wall_s:.1f} s\n"
        f"coordinator overhead per round (round time not spent training, median of rounds 2+): "
        f"{steady[len(steady) // 2]:.3f} s\n"
        f"largest parameter difference from the in-process simulation: {result.max_abs_diff:.2e}"
    )
    (folder / "network-result.json").write_text(result.model_dump_json(indent=2))


@app.command()
def simulate(
    study_file: Annotated[
        Path | None, typer.Option("--study", help="study.yaml (default: the demo study).")
    ] = None,
    sites_file: Annotated[
        Path | None,
        typer.Option(
            "--sites",
            help="sites.yaml listing data and mapping per site (default: the built-in hospitals).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for results.json and report.html.")
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also train local-only and pooled models.")
    ] = True,
    strategy: Annotated[Strategy | None, typer.Option(help="Override the strategy.")] = None,
    weighting: Annotated[Weighting | None, typer.Option(help="Override client weighting.")] = None,
    cap: Annotated[
        float | None, typer.Option(help="Largest weight share with --weighting capped.")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Override the number of rounds.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the study seed.")] = None,
    server_lr: Annotated[
        float | None, typer.Option(min=0.0, help="Override the server learning rate.")
    ] = None,
    proximal_mu: Annotated[
        float | None, typer.Option(min=0.0, help="FedProx proximal term mu (0 = off).")
    ] = None,
    data_seed: Annotated[int, typer.Option(help="Seed for the built-in hospitals.")] = 2026,
    scale: Annotated[float, typer.Option(min=0.01, max=10.0, help="Built-in size factor.")] = 1.0,
) -> None:
    """Run a study's federation on one machine, through the coordinator's round logic."""

    def run() -> SimulationResult:
        from fedcare.data import demo_study

        base = load_study(study_file) if study_file else demo_study()
        study = _override(
            base,
            rounds,
            strategy,
            weighting,
            cap,
            seed,
            server_lr=server_lr,
            proximal_mu=proximal_mu,
        )
        return _simulate(study, sites_file, out, baselines, scale, data_seed)

    result = guarded(run)
    print_comparison(result)


@study_app.command("check")
def study_check(path: Path) -> None:
    """Validate a study file and print its content hash."""
    study = guarded(lambda: load_study(path))
    schema = study.feature_schema
    console.print(f"[green]valid[/] study '{study.name}'")
    console.print(f"hash     {study.content_hash}")
    console.print(f"features {len(schema.features)} ({schema.n_inputs} model inputs)")
    console.print(f"model    {study.model.kind.value} {list(study.model.hidden) or ''}")
    console.print(
        f"training {study.aggregation.strategy.value}, {study.rounds.count} rounds, "
        f"weighting {study.aggregation.weighting.value}"
    )


@data_app.command("check")
def data_check(
    data: Path,
    study_file: Annotated[Path, typer.Option("--study", help="study.yaml")],
    mapping_file: Annotated[Path, typer.Option("--mapping", help="the site's mapping.yaml")],
) -> None:
    """Check a site's data file against the study schema through its mapping; nothing is sent."""
    from fedcare.schema.mapping import apply_mapping, load_mapping
    from fedcare.schema.readers import read_table

    def run() -> int:
        study = load_study(study_file)
        mapping = load_mapping(mapping_file)
        frame = read_table(data)
        mapped = apply_mapping(frame, mapping, study.feature_schema)
        return len(mapped)

    rows = guarded(run)
    console.print(f"[green]ok[/] {rows} rows fit the schema of the study")


@coordinator_app.command("serve")
def coordinator_serve(
    config: Annotated[Path, typer.Option(help="coordinator.yaml (see 'fedcare provision').")],
) -> None:
    """Serve the configured studies over mutual TLS until stopped."""
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.coordinator.server import serve

    parsed = guarded(lambda: load_config(config, CoordinatorConfig))
    guarded(lambda: serve(parsed))


@site_app.command("run")
def site_run(
    config: Annotated[Path, typer.Option(help="This site's site.yaml.")],
) -> None:
    """Take part in the configured study until it finishes (outbound connections only)."""
    import logging

    from fedcare.config import SiteConfig, load_config
    from fedcare.site.agent import run_site

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parsed = guarded(lambda: load_config(config, SiteConfig))
    summary = guarded(lambda: run_site(parsed))
    console.print(
        f"site {summary.site}: trained {summary.rounds_trained} round(s); study finished at "
        f"round {summary.final_round}; model in {summary.model_path}"
    )


# --- site review / approve: the officer's check of a study against policy.yaml -------


@site_app.command("review")
def site_review(
    study_file: Annotated[Path, typer.Argument(help="The study.yaml to review.")],
    policy_file: Annotated[Path, typer.Option("--policy", help="This site's policy.yaml.")],
    mapping_file: Annotated[
        Path | None, typer.Option("--mapping", help="This site's mapping, to show local columns.")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option("--coordinator", help="The coordinator URL to check.")
    ] = None,
) -> None:
    """Review a study against the site policy; exit 1 if the policy refuses it."""
    from fedcare.policy import StudyReview, load_policy, review_study
    from fedcare.policy.render import print_review
    from fedcare.schema.mapping import load_mapping

    def run() -> StudyReview:
        mapping = load_mapping(mapping_file) if mapping_file is not None else None
        return review_study(
            load_study(study_file), load_policy(policy_file), mapping, coordinator_url=coordinator
        )

    review = guarded(run)
    print_review(review, console)
    if not review.approvable:
        raise typer.Exit(code=1)


@site_app.command("approve")
def site_approve(
    study_file: Annotated[Path, typer.Argument(help="The study.yaml to approve.")],
    policy_file: Annotated[Path, typer.Option("--policy", help="This site's policy.yaml.")],
    by: Annotated[str, typer.Option("--by", help="Who approves (recorded in the policy).")],
    note: Annotated[str, typer.Option("--note", help="Why; required with --force.")] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Approve although rules refuse it (give --note).")
    ] = False,
) -> None:
    """Approve the study's exact content hash in policy.yaml (written atomically)."""
    from rich.markup import escape as escape_markup

    from fedcare.policy import SitePolicy, StudyRefusedError, approve, is_approved, load_policy
    from fedcare.policy.render import print_findings

    study = guarded(lambda: load_study(study_file))
    before = guarded(lambda: load_policy(policy_file))

    def run() -> SitePolicy | StudyRefusedError:
        try:
            return approve(policy_file, study, by, note, force=force)
        except StudyRefusedError as exc:
            return exc  # a refusal is a verdict (exit 1), not a usage error (exit 2)

    outcome = guarded(run)
    if isinstance(outcome, StudyRefusedError):
        name = escape_markup(study.name)
        errors.print(f"[bold red]refused[/]: study '{name}' is not approved", highlight=False)
        print_findings(outcome.findings, errors)
        errors.print("to approve it anyway: --force --note REASON", style="dim")
        raise typer.Exit(code=1)
    entry = outcome.approval(study.content_hash)
    assert entry is not None
    state = "already approved" if is_approved(before, study.content_hash) else "approved"
    console.print(
        f"{state} study '{study.name}' in {policy_file}\n"
        f"hash {entry.hash}\nby {entry.approved_by} at {entry.approved_at:%Y-%m-%d %H:%M} UTC"
        + (f"\nnote {entry.note}" if entry.note else ""),
        markup=False,
        highlight=False,
    )


@app.command()
def provision(
    consortium: Annotated[
        str, typer.Option(help="The consortium's name; goes into every certificate.")
    ],
    sites: Annotated[
        list[str],
        typer.Option(
            "--sites",
            help="Site names, comma-separated or repeated; each becomes a certificate's CN.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the CA, certificates, keys and configs.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="The coordinator's port.")] = 8443,
    coordinator_host: Annotated[
        list[str] | None,
        typer.Option(
            "--coordinator-host",
            help="Extra DNS name or IP address for the coordinator's certificate "
            "(comma-separated or repeated); the first one is the address sites connect to.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing CA and certificates in --out.")
    ] = False,
    passphrase_env: Annotated[
        str | None,
        typer.Option(
            "--passphrase-env",
            metavar="VAR",
            help="Encrypt ca.key with the passphrase held in this environment variable.",
        ),
    ] = None,
) -> None:
    """Create a consortium CA, coordinator and site certificates for mutual TLS, and configs."""
    import os
    from typing import NoReturn

    from rich.markup import escape

    from fedcare.provision import ProvisionError, ProvisionResult, split_names
    from fedcare.provision import provision as write_consortium

    def run() -> ProvisionResult:
        passphrase: bytes | None = None
        if passphrase_env is not None:
            passphrase = os.environ.get(passphrase_env, "").encode() or None
            if passphrase is None:
                raise ProvisionError(f"environment variable {passphrase_env} is unset or empty")
        return write_consortium(
            consortium,
            split_names(sites),
            out,
            port=port,
            coordinator_hosts=split_names(coordinator_host or []),
            force=force,
            ca_passphrase=passphrase,
        )

    def fail(reason: str) -> NoReturn:
        errors.print(
            f"[bold red]error:[/] {escape(reason)}", highlight=False, soft_wrap=True, emoji=False
        )
        raise typer.Exit(code=2) from None

    try:
        result = run()
    except ProvisionError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {exc.filename}: {exc.strerror}")

    def show(text: str) -> None:
        console.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)

    show(f"provisioned consortium {result.consortium!r} in {result.out}")
    for cert in result.certificates:
        protection = "encrypted" if cert.key_encrypted else "unencrypted"
        show(f"{cert.role}: {cert.cert_path}")
        show(f"  subject      {cert.subject}")
        show(f"  sha256       {cert.fingerprint}")
        show(f"  valid until  {cert.not_after:%Y-%m-%d}")
        show(f"  private key  {cert.key_path} (mode 0600, {protection})")
    show(f"CA copies: {', '.join(str(p) for p in result.ca_copies)}")
    show(f"configs: {', '.join(str(p) for p in result.configs)}")
    show(f"sites connect to {result.coordinator_url}")
    for folder in result.stale_sites:
        show(f"warning: {folder} is left from an earlier run; its certificate is from the old CA")
    console.print(
        "next: move ca.key offline; ship each sites/<name>/ folder to its site over a trusted "
        "channel; compare fingerprints out of band (see docs/deployment.md).",
        style="dim",
        highlight=False,
    )


# --- audit: tamper-evident audit trails (see docs/audit.md) -------------------

audit_app = typer.Typer(
    help="Verify, export, sign and show hash-chained audit logs.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")


def _audit_guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; an audit, key or file error becomes one message and exit status 2."""
    from rich.markup import escape

    from fedcare.audit import AuditError

    try:
        return fn()
    except AuditError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _audit_say(text: str) -> None:
    # Log contents are untrusted: never let them be read as Rich markup.
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)


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

    report = _audit_guarded(run)
    _audit_say(report.summary())
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

    result = _audit_guarded(lambda: export_jsonl(log, out, since=since))
    span = f"seq {result.first_seq}..{result.last_seq}, " if result.n_entries else ""
    _audit_say(f"wrote {result.n_entries} entries ({span}head {result.head}) to {result.out}")
    if result.partial:
        _audit_say(
            f"it starts after entry 1: check it with 'fedcare audit verify {result.out} --partial'"
        )


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

    signed = _audit_guarded(run)
    _audit_say(
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

    entries, report = _audit_guarded(lambda: read_verified(log, allow_partial=partial))
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
    _audit_say(report.summary())
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

    torn = _audit_guarded(lambda: recover_torn_tail(log))
    if torn is None:
        _audit_say(f"{log} ends with a complete line: nothing to recover")
        return
    _audit_say(
        f"moved a torn last line ({torn.n_bytes} bytes, sha256 {torn.sha256}) to {torn.saved_to}"
    )
    if torn.logged is not None:
        _audit_say(f"logged as entry {torn.logged.seq} ({torn.logged.event})")


# --- benchmark: published benchmarks on real hospital data --------------------

benchmark_app = typer.Typer(
    help="Reproduce published federated benchmarks on real hospital data.", no_args_is_help=True
)
app.add_typer(benchmark_app, name="benchmark")


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.0%}" if percent else f"{value:.3f}"


@benchmark_app.command("heart-disease")
def benchmark_heart_disease(
    data_dir: Annotated[
        Path, typer.Option(help="Folder holding the four processed.*.data files (UCI set 45).")
    ],
    seeds: Annotated[int, typer.Option(min=1, help="Training seeds per method.")] = 5,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the full result as JSON.")
    ] = None,
) -> None:
    """Fed-Heart-Disease (four real centres): pooled, local and every strategy vs FLamby."""
    from fedcare.data.heart_disease import CENTER_NAMES, load_heart_disease
    from fedcare.simulation.heart_benchmark import BenchmarkResult, run_benchmark, table_rows

    def run() -> BenchmarkResult:
        sites = load_heart_disease(data_dir)
        errors.print(
            f"Fed-Heart-Disease: {len(sites)} centres, "
            f"{sum(s.n_train for s in sites)} training and {sum(s.n_test for s in sites)} "
            f"test rows; {seeds} seed(s) per method",
            highlight=False,
        )
        with _progress() as progress:
            return run_benchmark(sites, n_seeds=seeds, progress=progress)

    result = guarded(run)
    table = Table(title="Fed-Heart-Disease: test accuracy (mean over seeds)")
    for header in ("method", "Avg", *CENTER_NAMES, "lift"):
        table.add_column(header, justify="left" if header == "method" else "right")
    # Each method's row, then the published numbers (dim) right under it.
    for row in table_rows(result):
        pairs = row.pairs(CENTER_NAMES)
        if row.measured is not None:
            lift = "" if row.is_local else _cell(row.lift, percent=True)
            table.add_row(row.label, *(_cell(ours) for ours, _ in pairs), lift)
        if row.published is not None:
            label = "  published" if row.measured is not None else f"{row.label} (published only)"
            lift = "" if row.is_local else _cell(row.published_lift, percent=True)
            table.add_row(label, *(_cell(pub) for _, pub in pairs), lift, style="dim")
    console.print(table)
    settings = result.settings
    console.print(
        "lift: median over centres of the gain over each centre's local model on the other "
        f"three centres' test sets. Seeds {settings.seeds}, split seed {settings.split_seed}, "
        f"{settings.rounds} rounds; {result.wall_s:.0f} s.",
        style="dim",
    )
    if json_file is not None:
        json_file.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        errors.print(f"wrote {json_file}", highlight=False)


if __name__ == "__main__":
    app()
