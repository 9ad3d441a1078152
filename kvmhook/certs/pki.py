"""Certificate checks shared by the keystore tools, `kvmhook cert` and TLS set-up.

Written for the cryptography the distributions ship (RHEL 9: 36, Debian 12:
38), which has no chain verification of its own: a chain is checked link by
link here, as `openssl verify` checks it (see chain()).
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

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
    """Whether `issuer` signed `cert`: names match, key identifiers (when both carry one)
    match, and the signature verifies."""
    if cert.issuer != issuer.subject or not _identifiers_match(cert, issuer):
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


def _identifiers_match(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """OpenSSL looks for an issuer by these too: a mismatch means another issuer."""
    authority = _extension(cert, x509.AuthorityKeyIdentifier)
    if authority is None:
        return True
    subject = _extension(issuer, x509.SubjectKeyIdentifier)
    key_id = authority.key_identifier
    if key_id is not None and subject is not None and key_id != subject.digest:
        return False
    serial = authority.authority_cert_serial_number
    return serial is None or serial == issuer.serial_number


def chain(
    cert: x509.Certificate,
    cas: list[x509.Certificate],
    untrusted: list[x509.Certificate] | None = None,
    now: datetime.datetime | None = None,
) -> list[x509.Certificate]:
    """`cert` followed by the certificates that certify it, up to a self-signed root that is
    one of `cas` (`untrusted` ones may be intermediates, never the root).

    Raises PkiError, naming the certificate at fault, for whatever `openssl
    verify -CAfile CAS` refuses: no path to one of `cas` (a self-signed `cert`
    that is not one of them included), a CA certificate that may not sign
    certificates, is not valid at `now` or is more intermediates away than its
    path length allows, a critical extension OpenSSL does not handle. Name
    constraints and policy constraints are not evaluated, so a chain using them
    is refused too. `cert`'s own dates are check_validity's.
    """
    now = now or utcnow()
    candidates = cas + (untrusted or [])
    path = [cert]
    while not (path[-1].issuer == path[-1].subject and issued_by(path[-1], path[-1])):
        issuers = [ca for ca in candidates if ca not in path and issued_by(path[-1], ca)]
        if not issuers:
            raise PkiError(
                f"certificate {describe(path[-1])} is not signed by any of the given CA "
                f"certificates (it names its issuer {path[-1].issuer.rfc4514_string()})"
            )
        # Like OpenSSL, prefer an issuer valid now (a renewed CA certificate, same key).
        valid = [ca for ca in issuers if not_before(ca) <= now <= not_after(ca)]
        path.append((valid or issuers)[0])
    if path[-1] not in cas:
        raise PkiError(
            f"certificate {describe(path[-1])} is self-signed and is not one of the given CA"
            " certificates"
        )
    for below, ca in enumerate(path[1:]):
        _check_issuer(ca, below, ca is path[-1], now)
    for each in path:
        _check_extensions(each)
    return path


def _check_issuer(ca: x509.Certificate, below: int, root: bool, now: datetime.datetime) -> None:
    """PkiError unless `ca` may sign the `below` intermediates and the certificate under it."""
    usage = _extension(ca, x509.KeyUsage)
    constraints = _extension(ca, x509.BasicConstraints)
    if usage is not None and not usage.key_cert_sign:
        raise PkiError(f"CA certificate {describe(ca)} may not sign certificates (keyUsage)")
    if constraints is None and not (root and usage is not None):
        raise PkiError(f"CA certificate {describe(ca)} is not a CA (no basicConstraints)")
    if constraints is not None and not constraints.ca:
        raise PkiError(f"CA certificate {describe(ca)} is not a CA (basicConstraints CA:FALSE)")
    limit = None if constraints is None else constraints.path_length
    if limit is not None and below > limit:
        raise PkiError(
            f"CA certificate {describe(ca)} allows {limit} intermediate(s)"
            f" below it, the chain has {below}"
        )
    check_validity(ca, "CA certificate", now)


# Extensions OpenSSL handles when critical (X509_supported_extension), less the ones
# checked nowhere here, which _UNCHECKED refuses outright.
_HANDLED = {
    ExtensionOID.KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.OCSP_NO_CHECK,
    x509.ObjectIdentifier("2.16.840.1.113730.1.1"),  # Netscape certificate type
}
_UNCHECKED = {
    ExtensionOID.NAME_CONSTRAINTS: "name constraints",
    ExtensionOID.POLICY_CONSTRAINTS: "policy constraints",
    ExtensionOID.POLICY_MAPPINGS: "policy mappings",
    ExtensionOID.INHIBIT_ANY_POLICY: "inhibitAnyPolicy",
}


def _check_extensions(cert: x509.Certificate) -> None:
    for extension in _extensions(cert):
        if extension.oid in _UNCHECKED:
            raise PkiError(
                f"certificate {describe(cert)} carries {_UNCHECKED[extension.oid]}, which this"
                " tool does not evaluate"
            )
        if extension.critical and extension.oid not in _HANDLED:
            raise PkiError(
                f"certificate {describe(cert)} has a critical extension that is not understood"
                f" ({extension.oid.dotted_string})"
            )


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except ValueError as error:  # a duplicate or malformed extension
        raise PkiError(f"certificate {describe(cert)} has unreadable extensions: {error}") from None


def _extension(cert: x509.Certificate, kind: type) -> Any:
    """The value of `cert`'s extension of `kind`, or None."""
    try:
        return _extensions(cert).get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


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


def serial(cert: x509.Certificate) -> str:
    """A certificate's serial number as openssl prints it (hexadecimal), for messages."""
    return format(cert.serial_number, "X")


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
