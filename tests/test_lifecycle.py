"""A consortium after day one: enrolment through a CSR (the key never leaves the site),
signing, revocation and renewal, each recorded in the CA's audit trail.

Attacks: a tampered request, a request for an operator's certificate or with a foreign
subject, a weak or wrong key type, a reserved or duplicate name; a revocation list
signed by another CA, or an older one served to a site."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedcare import pki
from fedcare.audit import read_entries, verify
from fedcare.cli import app
from fedcare.lifecycle import add_site, enrol, open_ca, renew, revoke, revoked, sign
from fedcare.provision import CA_AUDIT, CRL_FILE, ProvisionError, provision
from fedcare.site.revocation import PeerRevocations

runner = CliRunner()


@pytest.fixture
def consortium(tmp_path: Path) -> Path:
    out = tmp_path / "consortium"
    provision("Test Consortium", ["alpha", "beta", "gamma"], out, port=8443)
    return out


def _csr(tmp_path: Path, key: object, subject: x509.Name, name: str = "delta") -> Path:
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    path = tmp_path / f"{name}.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_a_site_enrols_with_a_csr_and_its_key_never_leaves(
    consortium: Path, tmp_path: Path
) -> None:
    at_site = tmp_path / "delta-site"
    enrolment = enrol("delta", at_site)
    assert stat.S_IMODE(os.stat(enrolment.key).st_mode) == 0o600
    assert [e.event for e in read_entries(at_site / "audit.jsonl")] == ["certificate.requested"]
    issued = sign(open_ca(consortium), enrolment.csr)
    folder = consortium / "sites" / "delta"
    assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "delta.crt", "site.yaml"]
    cert = pki.load_certificate(issued.cert_path)
    ca = pki.load_certificate(consortium / "ca.crt")
    cert.verify_directly_issued_by(ca)
    assert pki.site_identity(cert) == "delta"
    assert pki.key_matches(cert, pki.load_private_key(enrolment.key))
    assert "O=Test Consortium" in cert.subject.rfc4514_string()
    assert "https://127.0.0.1:8443" in (folder / "site.yaml").read_text()
    trail = consortium / CA_AUDIT
    assert verify(trail).ok
    entries = [e for e in read_entries(trail) if e.event == "certificate.issued"]
    assert entries[-1].details["site"] == "delta"
    assert entries[-1].details["public_key_sha256"] == enrolment.key_sha256
    # The same name cannot get a second live certificate.
    with pytest.raises(ProvisionError, match="already has a live certificate"):
        sign(open_ca(consortium), enrol("delta", tmp_path / "again").csr)


def test_the_ca_refuses_requests_it_must_not_sign(consortium: Path, tmp_path: Path) -> None:
    folder = open_ca(consortium)
    key = pki.new_key()
    p384 = ec.generate_private_key(ec.SECP384R1())
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def named(cn: str, ou: str | None = "site", org: str | None = None) -> x509.Name:
        attributes = []
        if org is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        if ou is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        return x509.Name(attributes)

    cases = {
        "operator certificate": _csr(tmp_path, key, named("eve", "operator"), "op"),
        "is not one of": _csr(tmp_path, key, named("eve", "admin"), "admin"),
        "reserved": _csr(tmp_path, key, named("coordinator"), "coord"),
        "invalid site name": _csr(tmp_path, key, named("../../etc"), "path"),
        "ECDSA P-256": _csr(tmp_path, p384, named("p384"), "p384"),
        "RSAPublicKey": _csr(tmp_path, weak, named("rsa"), "rsa"),
        "does not sign": _csr(
            tmp_path,
            key,
            x509.Name([*named("mail"), x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@b.c")]),
            "mail",
        ),
        "already has a live certificate": _csr(tmp_path, key, named("alpha"), "alpha"),
    }
    tampered = _csr(tmp_path, key, named("mallory"), "mallory")
    pem = tampered.read_bytes()
    body = pem.splitlines()
    body[3] = body[3][:10] + (b"A" if body[3][10:11] != b"A" else b"B") + body[3][11:]
    tampered.write_bytes(b"\n".join(body))
    cases["signature does not verify|not a PEM"] = tampered
    for expected, path in cases.items():
        with pytest.raises(ProvisionError, match=expected):
            sign(folder, path)
    # A request that claims another consortium gets the CA's own subject, not its own.
    foreign = _csr(tmp_path, key, named("omega", org="Someone Else"), "omega")
    cert = pki.load_certificate(sign(folder, foreign).cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "Test Consortium"
    )
    refused = runner.invoke(
        app, ["provision", "sign", str(cases["reserved"]), "--ca-dir", str(consortium)]
    )
    assert refused.exit_code == 2
    assert "reserved" in refused.output
    assert "Traceback" not in refused.output


def test_revocation_lists_every_certificate_of_the_site_and_renewal_keeps_the_key(
    consortium: Path,
) -> None:
    folder = open_ca(consortium)
    before = pki.load_certificate(folder.site_cert("beta"))
    renewed = renew(folder, "beta", now=datetime.now(UTC) + timedelta(days=1))
    after = pki.load_certificate(renewed.cert_path)
    assert after.public_key() == before.public_key()
    assert after.serial_number != before.serial_number
    assert after.not_valid_after_utc > before.not_valid_after_utc
    assert revoked(folder) == []
    serials = revoke(folder, "beta", "left the consortium")
    # The renewed and the original certificate are both revoked.
    assert set(serials) == {before.serial_number, after.serial_number}
    crl = pki.load_crl(consortium / CRL_FILE, folder.ca.cert)
    assert pki.revoked_serials(crl) == frozenset(serials)
    assert pki.crl_number(crl) == 2  # provisioning wrote list 1, empty
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke(folder, "beta", "again")
    with pytest.raises(ProvisionError, match="no live certificate"):
        renew(folder, "beta")
    with pytest.raises(ProvisionError, match="give a reason"):
        revoke(folder, "alpha", " ")
    events = [e.event for e in read_entries(consortium / CA_AUDIT)]
    assert events.count("certificate.renewed") == 1
    assert events[-1] == "certificate.revoked"
    # After revocation the name may enrol again.
    assert add_site(folder, "beta").name == "beta"


def test_a_revocation_list_from_another_ca_or_an_older_one_is_refused(
    consortium: Path, tmp_path: Path
) -> None:
    folder = open_ca(consortium)
    ca = folder.ca.cert
    rogue = pki.make_ca("Rogue")
    forged = pki.make_crl(rogue, [pki.Revoked(1, datetime.now(UTC))], 99)
    with pytest.raises(pki.PkiError, match="not signed by the consortium CA"):
        pki.parse_crl(forged.public_bytes(serialization.Encoding.PEM), ca)
    revoke(folder, "gamma", "compromised key")
    current = (consortium / CRL_FILE).read_bytes()
    older = pki.make_crl(folder.ca, [], 1).public_bytes(serialization.Encoding.PEM)
    served = [current, older, forged.public_bytes(serialization.Encoding.PEM), None]
    clock = [0.0]
    peers = PeerRevocations(lambda: served.pop(0), ca, refresh_s=1.0, clock=lambda: clock[0])
    gamma = pki.load_certificate(folder.site_cert("gamma")).serial_number
    assert gamma in peers()
    for _ in range(3):  # an older list, a forged one, none: the revocation stands
        clock[0] += 1.0
        assert gamma in peers()
    assert peers.number == 2


def test_a_site_refuses_a_revoked_secure_aggregation_peer(consortium: Path) -> None:
    from fedcare.privacy.secagg.keys import IdentityVerifier, SecAggError

    folder = open_ca(consortium)
    cert = pki.load_certificate(folder.site_cert("gamma"))
    key = pki.load_private_key(consortium / "sites" / "gamma" / "gamma.key")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    data = b"gamma's key advertisement"
    signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    gone: set[int] = set()
    verifier = IdentityVerifier(folder.ca.cert, revoked=lambda: gone)
    verifier.verify("gamma", pem, data, signature)  # accepted, and its key remembered
    gone.add(cert.serial_number)
    with pytest.raises(SecAggError, match="revoked"):
        verifier.verify("gamma", pem, data, signature)


def test_the_commands_enrol_sign_add_revoke_and_renew(consortium: Path, tmp_path: Path) -> None:
    ca = ["--ca-dir", str(consortium)]
    enrolled = runner.invoke(app, ["site", "enrol", "--name", "delta", "--out", str(tmp_path)])
    assert enrolled.exit_code == 0, enrolled.output
    assert "public key sha256" in enrolled.output
    signed = runner.invoke(app, ["provision", "sign", str(tmp_path / "delta.csr"), *ca])
    assert signed.exit_code == 0, signed.output
    assert "signed delta" in signed.output
    added = runner.invoke(app, ["provision", "add-site", "epsilon", *ca])
    assert added.exit_code == 0, added.output
    assert (consortium / "sites" / "epsilon" / "epsilon.key").exists()
    renewed = runner.invoke(app, ["provision", "renew", "epsilon", *ca])
    assert renewed.exit_code == 0, renewed.output
    revoked_now = runner.invoke(app, ["provision", "revoke", "epsilon", "--reason", "test", *ca])
    assert revoked_now.exit_code == 0, revoked_now.output
    again = runner.invoke(app, ["provision", "revoke", "epsilon", "--reason", "test", *ca])
    assert again.exit_code == 2
    assert "already revoked" in again.output
    bare = runner.invoke(app, ["provision", "--sites", "a"])
    assert bare.exit_code == 2
    assert "give --consortium, --out" in bare.output
    missing = runner.invoke(app, ["provision", "sign", str(tmp_path / "none.csr"), *ca])
    assert missing.exit_code == 2
    assert "cannot read the request" in missing.output
    assert verify(consortium / CA_AUDIT).ok
