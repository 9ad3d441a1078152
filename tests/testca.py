"""A test certificate authority made with `cryptography`: roots, intermediates, leaves.

Not a conftest: test modules import it. Dates are naive UTC, as cryptography
< 42 reports them. Keys are RSA 2048 (fast enough: ~0.1 s each) or EC P-256.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

Key = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]
DAY = datetime.timedelta(days=1)


def now() -> datetime.datetime:
    """This moment, naive UTC."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def new_key(kind: str = "rsa") -> Key:
    """A fresh RSA 2048 or EC P-256 private key."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def pem(*certs: x509.Certificate) -> bytes:
    """The certificates as one PEM bundle, in the order given."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_pem(key: Key) -> bytes:
    """The key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_der(key_or_cert) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key, public key or certificate."""
    public = key_or_cert.public_key() if hasattr(key_or_cert, "public_key") else key_or_cert
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Authority:
    """A CA: its key and certificate; a root when `parent` is None, else signed by `parent`."""

    def __init__(
        self,
        common_name: str,
        parent: Authority | None = None,
        key_type: str = "rsa",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> None:
        self.key = new_key(key_type)
        self.parent = parent
        signer = parent or self
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(signer.name if parent else name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now() - DAY)
            .not_valid_after(not_after or now() + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
        )
        self.cert = builder.sign(signer.key, hashes.SHA256())

    @property
    def name(self) -> x509.Name:
        return self.cert.subject

    def intermediate(self, common_name: str, key_type: str = "rsa") -> Authority:
        """A CA signed by this one."""
        return Authority(common_name, parent=self, key_type=key_type)

    def path(self) -> list[x509.Certificate]:
        """This CA's certificate and its parents' up to the root."""
        return [self.cert] + (self.parent.path() if self.parent else [])

    def bundle(self) -> bytes:
        """The PEM bundle a host is given: this CA, then its parents up to the root."""
        return pem(*self.path())

    def issue(
        self,
        public_key,
        common_name: str = "host.example",
        sans: list[x509.GeneralName] | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        signing_key: Key | None = None,
    ) -> x509.Certificate:
        """A TLS server/client certificate for `public_key`, signed by this CA.

        `signing_key` signs instead of the CA's key (a forged signature under
        this CA's name).
        """
        sans = sans if sans is not None else [x509.DNSName(common_name)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now() - DAY)
            .not_valid_after(not_after or now() + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
                    ]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signing_key or self.key, hashes.SHA256())

    def sign_csr(self, csr_pem: bytes, **dates: datetime.datetime) -> x509.Certificate:
        """Sign a PEM CSR as the controller's CA does: its subject CN and SANs, its key."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid, "CSR signature does not verify"
        common_name = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        return self.issue(csr.public_key(), str(common_name), sans, **dates)

    def leaf(
        self, key_type: str = "rsa", **dates: datetime.datetime
    ) -> tuple[Key, x509.Certificate]:
        """A fresh key and a certificate for it from this CA."""
        key = new_key(key_type)
        return key, self.issue(key.public_key(), **dates)


class Pki:
    """The test PKI: root → intermediate, an unrelated root, and EC root → EC intermediate."""

    def __init__(self) -> None:
        self.root = Authority("Test Root CA")
        self.intermediate = self.root.intermediate("Test Intermediate CA")
        self.other = Authority("Other Root CA")
        self.ec_root = Authority("Test EC Root CA", key_type="ec")
        self.ec_intermediate = self.ec_root.intermediate("Test EC Intermediate CA", key_type="ec")

    @property
    def bundle(self) -> bytes:
        """intermediate + root, the CA bundle a host receives."""
        return self.intermediate.bundle()


@functools.cache
def shared() -> Pki:
    """One PKI per test process (key generation is the slow part)."""
    return Pki()


def ip(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(text))
