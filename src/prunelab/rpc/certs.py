"""A private CA and one certificate per service, for TLS and mTLS between prunelab's
processes: what compose's one-shot `certs` job and `prunelab certs` write.

Each name gets a folder in cert-manager's layout (tls.crt, tls.key, ca.crt), so the
same folder is a PRUNELAB_TLS_DIR and `kubectl create secret generic NAME --from-file=DIR`
makes a Kubernetes Secret of it. Every certificate serves (serverAuth) and identifies
a client (clientAuth), and names the service, localhost and the loopback addresses
(containers' healthchecks dial 127.0.0.1). Written with `cryptography`; the CA's key
stays in `ca/`, outside the services' folders, so rerunning adds names to the same CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from prunelab.errors import InvalidArgument
from prunelab.rpc.security import CA_FILE, CERT_FILE, KEY_FILE

CA_FOLDER = "ca"
CA_KEY_FILE = "ca.key"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True)
class Issued:
    name: str
    folder: Path
    created: bool  # False: a valid certificate of the same CA was kept


def issue_certificates(out: Path, names: list[str], hosts: list[str], days: int) -> list[Issued]:
    """The CA in `out/ca` (made if absent) and a certificate for each name in `out/<name>`,
    valid `days` days for the name, `hosts` and loopback. An existing certificate
    that the CA signed and that names the same hosts is kept, so a job that reruns
    on every `compose up` does not change what running services trust."""
    for name in names:
        if not name or set(name) - NAME_CHARS or name == CA_FOLDER:
            raise InvalidArgument(f"certificate name {name!r}: use lower-case letters, digits, '-' and '.' (not {CA_FOLDER!r})", field="name")
    if days < 1:
        raise InvalidArgument(f"days must be at least 1, not {days}", field="days")
    ca_key, ca_cert = _certificate_authority(out / CA_FOLDER, days)
    issued = []
    for name in names:
        folder = out / name
        wanted = sorted({name, *hosts, *LOOPBACK})
        if _current(folder, ca_cert, wanted):
            issued.append(Issued(name, folder, created=False))
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign(_builder(name, key, days).add_extension(_alternative_names(wanted), critical=False)
                     .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                     .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False),
                     ca_key, ca_cert.subject)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / KEY_FILE, _key_pem(key), private=True)
        _write(folder / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        _write(folder / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
        issued.append(Issued(name, folder, created=True))
    return issued


def _certificate_authority(folder: Path, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if (folder / CA_KEY_FILE).is_file():
        key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate((folder / CA_FILE).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder("prunelab CA", key, max(days, 3650)).add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    cert = _sign(builder.add_extension(
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False),
        critical=True), key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prunelab CA")]))
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / CA_KEY_FILE, _key_pem(key), private=True)
    _write(folder / CA_FILE, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _current(folder: Path, ca_cert: x509.Certificate, hosts: list[str]) -> bool:
    """Whether `folder` holds a certificate `ca_cert` signed, for `hosts`, valid for another day."""
    try:
        cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    listed = sorted([*names.get_values_for_type(x509.DNSName), *map(str, names.get_values_for_type(x509.IPAddress))])
    tomorrow = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    return listed == sorted(_alternative_values(hosts)) and cert.not_valid_after_utc > tomorrow and (folder / KEY_FILE).is_file()


def _alternative_values(hosts: list[str]) -> list[str]:
    return [str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts]


def _alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts])


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _builder(common_name: str, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + datetime.timedelta(days=days)))


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.Certificate:
    return builder.issuer_name(issuer).sign(key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write `path` whole or not at all (a reader never sees half a key), owner-only if private."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
