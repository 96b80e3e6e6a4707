"""``fedcare provision``: the consortium CA, certificates, keys and configs, and real mutual TLS."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedcare import pki
from fedcare.cli import app
from fedcare.config import CoordinatorConfig, SiteConfig, load_config
from fedcare.provision import coordinator_url, provision, split_names

runner = CliRunner()

CONSORTIUM = "Nordic Sepsis"
# "123" and "yes" would be an int and a bool in unquoted YAML: the configs must keep them strings.
SITES = ["north", "south-2", "123", "yes"]
EXTRA_HOST = "fedcare.example.org"


@dataclass(frozen=True)
class Provisioned:
    out: Path
    output: str


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """One consortium, provisioned through the command line."""
    out = tmp_path_factory.mktemp("pki") / "consortium"
    args = ["provision", "--consortium", CONSORTIUM, "--sites", ",".join(SITES[:3])]
    args += ["--sites", SITES[3], "--out", str(out), "--port", "9443"]
    args += ["--coordinator-host", EXTRA_HOST]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return Provisioned(out, result.output)


@pytest.fixture(scope="module")
def other_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second consortium with its own CA, through the Python API."""
    out = tmp_path_factory.mktemp("pki") / "other"
    provision("Other Network", ["north"], out)
    return out


def site_files(out: Path, site: str) -> tuple[Path, Path]:
    folder = out / "sites" / site
    return folder / f"{site}.crt", folder / f"{site}.key"


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- files, certificates, keys -------------------------------------------------------


def test_every_file_exists_and_every_key_is_0600(consortium: Provisioned) -> None:
    out = consortium.out
    keys = [out / "ca.key", out / "coordinator.key"] + [site_files(out, s)[1] for s in SITES]
    public = [out / "ca.crt", out / "coordinator.crt", out / "coordinator.yaml"]
    for site in SITES:
        folder = out / "sites" / site
        public += [folder / f"{site}.crt", folder / "ca.crt", folder / "site.yaml"]
    for path in keys:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    for path in public:
        assert path.is_file(), path
    for site in SITES:  # the site folder ships alone: it carries the CA
        assert (out / "sites" / site / "ca.crt").read_bytes() == (out / "ca.crt").read_bytes()


def test_ca_certificate(consortium: Provisioned) -> None:
    ca = pki.load_certificate(consortium.out / "ca.crt")
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert pki.common_name(ca) == f"{CONSORTIUM} CA"
    org = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in org] == [CONSORTIUM]


def test_site_certificates_verify_and_name_their_site(consortium: Provisioned) -> None:
    ca = pki.load_certificate(consortium.out / "ca.crt")
    for site in SITES:
        cert = pki.load_certificate(site_files(consortium.out, site)[0])
        cert.verify_directly_issued_by(ca)
        assert pki.site_identity(cert) == site
        assert eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
        org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        assert [a.value for a in org] == [CONSORTIUM]


def test_coordinator_certificate_is_a_server_certificate(consortium: Provisioned) -> None:
    ca = pki.load_certificate(consortium.out / "ca.crt")
    cert = pki.load_certificate(consortium.out / "coordinator.crt")
    cert.verify_directly_issued_by(ca)
    assert pki.common_name(cert) == "coordinator"
    assert eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= ips
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", EXTRA_HOST}
    with pytest.raises(pki.PkiError, match="reserved"):  # it cannot pass for a site
        pki.site_identity(cert)


def test_keys_match_their_certificates(consortium: Provisioned) -> None:
    out = consortium.out
    pairs = [(out / "ca.crt", out / "ca.key"), (out / "coordinator.crt", out / "coordinator.key")]
    pairs += [site_files(out, s) for s in SITES]
    keys = []
    for cert_path, key_path in pairs:
        key = pki.load_private_key(key_path)
        assert pki.key_matches(pki.load_certificate(cert_path), key), cert_path
        assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
        keys.append(key)
    assert not pki.key_matches(pki.load_certificate(pairs[0][0]), keys[1])


def test_configs_load_and_point_at_the_files(consortium: Provisioned) -> None:
    out = consortium.out
    coordinator = load_config(out / "coordinator.yaml", CoordinatorConfig)
    assert coordinator.consortium == CONSORTIUM
    assert (coordinator.host, coordinator.port) == ("127.0.0.1", 9443)
    assert coordinator.studies == []
    assert coordinator.database == f"sqlite:///{out.resolve() / 'coordinator.db'}"
    assert coordinator.tls.cert.samefile(out / "coordinator.crt")
    assert coordinator.tls.key.samefile(out / "coordinator.key")
    assert coordinator.tls.ca.samefile(out / "ca.crt")
    text = (out / "coordinator.yaml").read_text()
    assert "# studies:" in text  # the comment on how to add a study survives
    for site in SITES:
        config = load_config(out / "sites" / site / "site.yaml", SiteConfig)
        assert config.site == site
        assert str(config.coordinator) == f"https://{EXTRA_HOST}:9443/"
        assert config.tls.cert.samefile(site_files(out, site)[0])
        assert config.tls.key.samefile(site_files(out, site)[1])
        assert config.tls.ca.samefile(out / "sites" / site / "ca.crt")
        assert config.study is None
        assert config.data is None


def test_output_shows_fingerprints_and_no_key_material(consortium: Provisioned) -> None:
    assert "PRIVATE KEY" not in consortium.output
    assert "BEGIN" not in consortium.output
    for site in SITES:
        cert = pki.load_certificate(site_files(consortium.out, site)[0])
        assert pki.fingerprint(cert) in consortium.output
        assert f"CN={site}" in consortium.output
    assert pki.fingerprint(pki.load_certificate(consortium.out / "ca.crt")) in consortium.output


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sites",
    ["bad name", "-north", "a/b", "x" * 65, "coordinator", "Coordinator", "ca", "a,,b", "ümlaut"],
)
def test_refuses_bad_site_names(tmp_path: Path, sites: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["provision", "--consortium", "C", "--sites", sites, "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "error" in result.output
    assert not out.exists()  # nothing is written before everything validates


def test_refuses_duplicate_site_names(tmp_path: Path) -> None:
    args = ["provision", "--consortium", "C", "--sites", "a,b", "--sites", "A"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "duplicate site name 'A'" in result.output


def test_refuses_bad_coordinator_host_and_consortium(tmp_path: Path) -> None:
    base = ["provision", "--sites", "a", "--out", str(tmp_path / "out")]
    bad_host = runner.invoke(app, [*base, "--consortium", "C", "--coordinator-host", "a b"])
    assert bad_host.exit_code == 2
    assert "coordinator host" in bad_host.output
    bad_name = runner.invoke(app, [*base, "--consortium", "C" * 70])
    assert bad_name.exit_code == 2
    assert "consortium name" in bad_name.output


def test_refuses_to_overwrite_a_ca_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["provision", "--consortium", "C", "--sites", "a,b", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    first = (out / "ca.crt").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "already contains a consortium CA" in again.output
    assert "--force" in again.output
    assert (out / "ca.crt").read_bytes() == first
    forced = runner.invoke(app, [*args[:4], "a", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.crt").read_bytes() != first
    assert stat.S_IMODE(os.stat(out / "ca.key").st_mode) == 0o600
    assert "sites/b is left from an earlier run" in forced.output.replace(os.sep, "/")
    new_ca = pki.load_certificate(out / "ca.crt")
    pki.load_certificate(site_files(out, "a")[0]).verify_directly_issued_by(new_ca)


def test_passphrase_env_encrypts_the_ca_key_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    args = ["provision", "--consortium", "C", "--sites", "a", "--out", str(out)]
    args += ["--passphrase-env", "FEDCARE_TEST_CA_PASS"]
    monkeypatch.delenv("FEDCARE_TEST_CA_PASS", raising=False)
    unset = runner.invoke(app, args)
    assert unset.exit_code == 2
    assert "FEDCARE_TEST_CA_PASS" in unset.output
    monkeypatch.setenv("FEDCARE_TEST_CA_PASS", "correct horse")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "correct horse" not in result.output
    with pytest.raises(pki.PkiError):
        pki.load_private_key(out / "ca.key")
    ca_key = pki.load_private_key(out / "ca.key", b"correct horse")
    assert pki.key_matches(pki.load_certificate(out / "ca.crt"), ca_key)
    pki.load_private_key(site_files(out, "a")[1])  # runtime keys stay unencrypted


def test_private_keys_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("existing")
    with pytest.raises(FileExistsError):
        pki.write_private_key(pki.new_key(), path)
    assert path.read_text() == "existing"


def test_name_helpers() -> None:
    assert split_names(["a, b", "c"]) == ["a", "b", "c"]
    assert coordinator_url(8443) == "https://127.0.0.1:8443"
    assert coordinator_url(443, ["::1"]) == "https://[::1]:443"
    assert (
        pki.site_identity_from_peercert(
            {"subject": ((("organizationName", "C"),), (("commonName", "north"),))}
        )
        == "north"
    )
    with pytest.raises(pki.PkiError):
        pki.site_identity_from_peercert({})


# --- real mutual TLS on loopback ----------------------------------------------------------


@dataclass
class Handshake:
    """What each end of one loopback TLS connection saw."""

    server_error: BaseException | None = None
    peercert: dict[str, object] | None = None
    peer_der: bytes | None = None
    client_error: BaseException | None = None
    reply: bytes = b""


def handshake(
    server: tuple[Path, Path],
    server_ca: Path,
    client_ca: Path,
    client: tuple[Path, Path] | None = None,
    server_hostname: str = "127.0.0.1",
) -> Handshake:
    """Connect once: a server requiring client certificates from ``server_ca``."""
    seen = Handshake()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*server)
    server_ctx.load_verify_locations(cafile=server_ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=client_ca)
    if client is not None:
        client_ctx.load_cert_chain(*client)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.peercert = dict(tls.getpeercert() or {})
                    seen.peer_der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen.server_error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname()[:2], timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                while len(seen.reply) < 2 and (chunk := tls.recv(2)):
                    seen.reply += chunk
        except (ssl.SSLError, OSError) as exc:
            seen.client_error = exc
        thread.join(5)
        assert not thread.is_alive()
    return seen


def coordinator_pair(out: Path) -> tuple[Path, Path]:
    return out / "coordinator.crt", out / "coordinator.key"


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_mutual_tls_accepts_a_site_and_names_it(consortium: Provisioned, hostname: str) -> None:
    out = consortium.out
    site = "south-2"
    seen = handshake(
        coordinator_pair(out),
        out / "ca.crt",
        out / "sites" / site / "ca.crt",  # what a site ships with
        site_files(out, site),
        server_hostname=hostname,
    )
    assert seen.server_error is None
    assert seen.client_error is None
    assert seen.reply == b"ok"
    assert seen.peercert is not None
    assert pki.site_identity_from_peercert(seen.peercert) == site
    assert seen.peer_der is not None
    assert pki.site_identity(x509.load_der_x509_certificate(seen.peer_der)) == site


def test_mutual_tls_refuses_a_client_without_certificate(consortium: Provisioned) -> None:
    out = consortium.out
    seen = handshake(coordinator_pair(out), out / "ca.crt", out / "ca.crt", client=None)
    assert isinstance(seen.server_error, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(seen.server_error)
    assert isinstance(seen.client_error, ssl.SSLError)  # TLS 1.3: the alert arrives on read
    assert seen.peercert is None
    assert seen.reply == b""


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    consortium: Provisioned, other_consortium: Path
) -> None:
    out = consortium.out
    # Same site name, right shape, wrong consortium: refused by the signature check.
    seen = handshake(
        coordinator_pair(out), out / "ca.crt", out / "ca.crt", site_files(other_consortium, "north")
    )
    assert isinstance(seen.server_error, ssl.SSLError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(seen.server_error)
    assert seen.peercert is None
    assert seen.reply == b""


def test_coordinator_certificate_cannot_act_as_a_site(consortium: Provisioned) -> None:
    out = consortium.out
    seen = handshake(coordinator_pair(out), out / "ca.crt", out / "ca.crt", coordinator_pair(out))
    assert isinstance(seen.server_error, ssl.SSLCertVerificationError)  # no CLIENT_AUTH usage
    assert "unsuitable certificate purpose" in str(seen.server_error)
    assert seen.peercert is None


def test_site_certificate_cannot_act_as_the_coordinator(consortium: Provisioned) -> None:
    out = consortium.out
    seen = handshake(
        site_files(out, "north"), out / "ca.crt", out / "ca.crt", site_files(out, "yes")
    )
    assert isinstance(seen.client_error, ssl.SSLCertVerificationError)  # no SERVER_AUTH usage
    assert "unsuitable certificate purpose" in str(seen.client_error)
    assert seen.peercert is None
