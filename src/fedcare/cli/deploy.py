"""``fedcare provision`` and ``fedcare coordinator serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedcare.cli.common import console, guarded, say

coordinator_app = typer.Typer(help="Run the consortium's coordinator.", no_args_is_help=True)


@coordinator_app.command("serve")
def coordinator_serve(
    config: Annotated[Path, typer.Option(help="coordinator.yaml (see 'fedcare provision').")],
) -> None:
    """Serve the configured studies over mutual TLS until stopped."""
    from fedcare.config import CoordinatorConfig, load_config
    from fedcare.coordinator.server import serve

    parsed = guarded(lambda: load_config(config, CoordinatorConfig))
    guarded(lambda: serve(parsed))


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

    result = guarded(run)

    say(f"provisioned consortium {result.consortium!r} in {result.out}")
    for cert in result.certificates:
        protection = "encrypted" if cert.key_encrypted else "unencrypted"
        say(f"{cert.role}: {cert.cert_path}")
        say(f"  subject      {cert.subject}")
        say(f"  sha256       {cert.fingerprint}")
        say(f"  valid until  {cert.not_after:%Y-%m-%d}")
        say(f"  private key  {cert.key_path} (mode 0600, {protection})")
    say(f"CA copies: {', '.join(str(p) for p in result.ca_copies)}")
    say(f"configs: {', '.join(str(p) for p in result.configs)}")
    say(f"sites connect to {result.coordinator_url}")
    for folder in result.stale_sites:
        say(f"warning: {folder} is left from an earlier run; its certificate is from the old CA")
    console.print(
        "next: move ca.key offline; ship each sites/<name>/ folder to its site over a trusted "
        "channel; compare fingerprints out of band (see docs/deployment.md).",
        style="dim",
        highlight=False,
    )
