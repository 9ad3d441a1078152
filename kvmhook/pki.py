"""Certificate checks shared by the keystore tools, `kvmhook cert` and TLS set-up.

Written for the cryptography the distributions ship (RHEL 9: 36, Debian 12:
38), which has no chain verification of its own: a chain is checked link by
link here, issuer name and signature.
"""

from __future__ import annotations

import datetime
import re
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from kvmhook.errors import KvmhookError

# The key types the tools create and accept.
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----[ \t]*\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class PkiError(KvmhookError):
    """A certificate or key is unreadable, does not match, does not chain, or is not valid now."""


def load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; PkiError when there is none or one is bad."""
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise PkiError(f"{what} holds no PEM certificate")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as error:
        raise PkiError(f"{what} holds a malformed certificate: {error}") from None


def load_private_key(pem: bytes, what: str) -> PrivateKey:
    """A PEM private key (unencrypted); PkiError when it is not one."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise PkiError(f"{what} is not an unencrypted PEM private key: {error}") from None


def key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, as the agent and libvirt read it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether `cert` certifies the public half of `key`."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (names match and the signature verifies)."""
    if cert.issuer != issuer.subject:
        return False
    public = issuer.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        elif isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def chain(cert: x509.Certificate, cas: list[x509.Certificate]) -> list[x509.Certificate]:
    """`cert` followed by the CA certificates that certify it, up to a self-signed root.

    Raises PkiError when `cas` do not lead from `cert` to a root.
    """
    path = [cert]
    while not (path[-1].issuer == path[-1].subject and issued_by(path[-1], path[-1])):
        issuer = next((ca for ca in cas if ca not in path and issued_by(path[-1], ca)), None)
        if issuer is None:
            raise PkiError(
                f"certificate {describe(path[-1])} is not signed by any of the given CA "
                f"certificates (it names its issuer {path[-1].issuer.rfc4514_string()})"
            )
        path.append(issuer)
    return path


def check_validity(cert: x509.Certificate, what: str, now: datetime.datetime | None = None) -> None:
    """PkiError unless `cert` is valid at `now` (default: this moment)."""
    now = now or utcnow()
    if now < not_before(cert):
        raise PkiError(f"{what} {describe(cert)} is not valid before {not_before(cert)} UTC")
    if now > not_after(cert):
        raise PkiError(f"{what} {describe(cert)} expired on {not_after(cert)} UTC")


def describe(cert: x509.Certificate) -> str:
    """A certificate's subject, for messages."""
    return f"'{cert.subject.rfc4514_string()}'"


def not_before(cert: x509.Certificate) -> datetime.datetime:
    """Start of validity, naive UTC, without the deprecation warning of cryptography >= 42."""
    aware = getattr(cert, "not_valid_before_utc", None)
    return cert.not_valid_before if aware is None else aware.replace(tzinfo=None)


def not_after(cert: x509.Certificate) -> datetime.datetime:
    """End of validity, naive UTC, without the deprecation warning of cryptography >= 42."""
    aware = getattr(cert, "not_valid_after_utc", None)
    return cert.not_valid_after if aware is None else aware.replace(tzinfo=None)


def utcnow() -> datetime.datetime:
    """Now, naive UTC, as cryptography < 42 reports certificate dates."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
