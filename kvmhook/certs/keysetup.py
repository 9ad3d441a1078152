"""What keystore-setup makes, and a renewal too: a new host key, its keystore, and a CSR for
the controller's CA."""

from __future__ import annotations

import datetime
import ipaddress
import socket

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kvmhook import limits
from kvmhook.certs import agentkeystore, agentproperties
from kvmhook.certs.pki import PrivateKey, utcnow
from kvmhook.errors import KeystoreError
from kvmhook.files import Transaction
from kvmhook.hostname import fqdn

MAX_VALIDITY_DAYS = limits.MAX_DAYS


def setup(
    properties_file: str,
    keystore_file: str,
    passphrase: str,
    validity_days: int,
    csr_file: str,
    key_type: str = "rsa",
) -> bytes:
    """Create the key, keystore and CSR; returns the CSR (PEM). Nothing changes on error."""
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        raise KeystoreError(
            f"validity days must be from 1 to {MAX_VALIDITY_DAYS}, not {validity_days}"
        )
    text = agentproperties.read(properties_file) or ""
    passphrase = agentproperties.passphrase(text) or passphrase
    if not passphrase:
        raise KeystoreError("the passphrase is empty and the properties file holds none")
    key = _new_key(key_type)
    fqdn, addresses = host_identity()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)])
    names = x509.SubjectAlternativeName(
        [x509.DNSName(fqdn), *(x509.IPAddress(address) for address in addresses)]
    )
    placeholder = _self_signed(key, subject, names, validity_days)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    with Transaction() as files:
        files.write(csr_file, csr_pem, mode=0o644)
        files.write(
            properties_file,
            agentproperties.with_passphrase(text, passphrase).encode(agentproperties.ENCODING),
        )
        files.write(keystore_file, agentkeystore.dump(key, [placeholder], passphrase))
    return csr_pem


def host_identity() -> tuple[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """This host's FQDN and its addresses, loopback and link-local left out."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(entry.address.split("%", 1)[0])
            if not (address.is_loopback or address.is_link_local) and address not in found:
                found.append(address)
    return fqdn(), sorted(found, key=lambda a: (a.version, a.packed))


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _self_signed(
    key: PrivateKey, subject: x509.Name, names: x509.SubjectAlternativeName, days: int
) -> x509.Certificate:
    """A placeholder until the CA's certificate is imported; valid for `days`."""
    now = utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )
