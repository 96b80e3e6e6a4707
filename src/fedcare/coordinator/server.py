"""Start the coordinator: load its config and studies, then serve over mutual TLS."""

from __future__ import annotations

import logging
import ssl
import threading
from types import FrameType

import uvicorn

from fedcare.audit import AuditLog, load_trusted_head
from fedcare.config import CoordinatorConfig, check_tls_files, tls_files_error
from fedcare.coordinator.app import create_app
from fedcare.coordinator.tls import CertificateBook, PeerIdentityProtocol, Revocations
from fedcare.federation.service import StudyService
from fedcare.federation.state.sql import SqlState
from fedcare.pki import load_certificate
from fedcare.privacy.secagg.keys import IdentityVerifier
from fedcare.releases.registry import ReleaseRegistry
from fedcare.study import load_study


def build_coordinators(
    config: CoordinatorConfig, state: SqlState, checks: Revocations | None = None
) -> dict[str, StudyService]:
    """One study service per configured study, resumed from the state; the release
    registry shares the state's database. Secure-aggregation key advertisements are
    checked against the consortium CA and the revocation list ``checks`` enforces."""
    head = (
        None if config.audit_head is None else load_trusted_head(config.audit_head, config.tls.cert)
    )
    audit = AuditLog(config.audit_log, "coordinator", trusted_head=head)
    identities = IdentityVerifier(
        load_certificate(config.tls.ca), revoked=frozenset if checks is None else checks.serials
    )
    registry = ReleaseRegistry(state.engine, state.storage / "releases")
    coordinators: dict[str, StudyService] = {}
    for membership in config.studies:
        study = load_study(membership.file)
        state.claim(study.content_hash)
        coordinators[study.content_hash] = StudyService(
            study,
            membership.sites,
            state,
            max_update_bytes=config.max_body_bytes,
            audit=audit,
            registry=registry,
            identities=identities,
        )
    return coordinators


def server_context(config: CoordinatorConfig) -> ssl.SSLContext:
    """The coordinator's TLS context: its certificate, and client certificates required
    from the consortium CA only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    check_tls_files(config.tls)
    try:
        context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
        context.load_verify_locations(cafile=str(config.tls.ca))
    except ssl.SSLError as exc:
        raise tls_files_error(config.tls, exc) from exc
    return context


def revocations(config: CoordinatorConfig) -> Revocations | None:
    """The revocation list the coordinator enforces, if its config names one."""
    if config.tls.crl is None:
        return None
    if not config.tls.crl.is_file():
        raise FileNotFoundError(
            f"revocation list {config.tls.crl} does not exist; copy crl.pem from the CA folder"
        )
    return Revocations(config.tls.crl, config.tls.ca, lambda: server_context(config))


class _TlsConfig(uvicorn.Config):
    """uvicorn with fedcare's TLS context; under a revocation list, every handshake
    switches to the context that holds the newest one (:class:`Revocations`)."""

    def __init__(
        self,
        app: object,
        config: CoordinatorConfig,
        checks: Revocations | None,
        book: CertificateBook | None,
    ) -> None:
        class CheckedPeerProtocol(PeerIdentityProtocol):
            certificates = book

        protocol = CheckedPeerProtocol
        super().__init__(
            app,  # type: ignore[arg-type]  # uvicorn types the app loosely
            host=config.host,
            port=config.port,
            ssl_certfile=str(config.tls.cert),
            ssl_keyfile=str(config.tls.key),
            ssl_ca_certs=str(config.tls.ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
            http=protocol,
            log_level="info",
            timeout_graceful_shutdown=5,
        )
        self.fedcare = config
        self.checks = checks

    def load(self) -> None:
        super().load()
        context = server_context(self.fedcare) if self.checks is None else self.checks.refresh()
        if self.checks is not None:
            context.sni_callback = self.checks.select
        self.ssl = context


def uvicorn_config(
    config: CoordinatorConfig,
    app: object,
    checks: Revocations | None = None,
    book: CertificateBook | None = None,
) -> uvicorn.Config:
    """uvicorn over TLS that requires a client certificate from the consortium CA."""
    for path in (config.tls.cert, config.tls.key, config.tls.ca):
        if not path.is_file():
            raise FileNotFoundError(f"TLS file {path} does not exist; run 'fedcare provision'")
    return _TlsConfig(app, config, checks, book)


class _Server(uvicorn.Server):
    """uvicorn that, on SIGTERM or Ctrl-C, first tells the app to end its long-polls, so
    a stop takes a moment instead of the longest poll, and no request is cancelled
    mid-way (which uvicorn logs as a traceback per open poll)."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


def serve(config: CoordinatorConfig) -> None:
    """Run until stopped. State is committed as it changes; kill -9 loses nothing."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config.storage.mkdir(parents=True, exist_ok=True)
    store = SqlState(config.database, config.storage)
    stopping = threading.Event()
    try:
        check_tls_files(config.tls)
        checks = revocations(config)
        book = CertificateBook()
        coordinators = build_coordinators(config, store, checks)
        app = create_app(
            coordinators,
            config.max_body_bytes,
            config.poll_wait_s,
            stopping=stopping,
            audit_log=config.audit_log,
            revocations=checks,
            certificates=(book, store.save_certificate),
            body_timeout_s=config.body_timeout_s,
        )
        _Server(uvicorn_config(config, app, checks, book), stopping).run()
    finally:
        store.close()
