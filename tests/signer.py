"""A `kvmhook cert renew --signer` command for the tests: a CA signer, and ways one goes wrong.

    python signer.py CA_DIR [--days N] [--mode MODE]

Reads a CSR on stdin and prints the certificate, then the CA chain (issuing
CA first, root last), as a CA's signing command would. CA_DIR holds
`ca-key.pem` (the issuing CA's key) and `ca-chain.pem` (its certificate,
then its parents up to the root); `write_ca` makes it. The certificate has
the CSR's subject and names and the profile libvirt checks (keyUsage
digitalSignature and keyEncipherment, extendedKeyUsage serverAuth and
clientAuth). Modes:

- `good`: as above;
- `garbage`: prints words, no certificate;
- `other-key`: a certificate for a fresh key, not the CSR's;
- `other-ca`: signed by a root CA made on the spot, printed with that root;
- `no-key-encipherment`: keyUsage (critical) without keyEncipherment, as a
  CA profile for ECDSA keys issues it: keystore-cert-import's checks pass,
  libvirt refuses the certificate when it loads it.

Standalone (the cryptography package only): e2e tests run it by path.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MODES = ("good", "garbage", "other-key", "other-ca", "no-key-encipherment")


def write_ca(directory: Path, key, chain: list[x509.Certificate]) -> Path:
    """Keep an issuing CA's key and chain (issuing CA first) in `directory` for the signer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca-chain.pem").write_bytes(_pem(chain))
    return directory


def command(directory: Path, days: int = 30, mode: str = "good") -> str:
    """The --signer command line for the CA kept in `directory`."""
    return f"{sys.executable} {Path(__file__)} {directory} --days {days} --mode {mode}"


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _chain(data: bytes) -> list[x509.Certificate]:
    end = b"-----END CERTIFICATE-----"
    blocks = [block + end for block in data.split(end) if b"-----BEGIN" in block]
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def _root(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign(csr_pem: bytes, ca_key, chain: list[x509.Certificate], days: int, mode: str) -> bytes:
    """What the signer prints for `csr_pem` in `mode`."""
    if mode == "garbage":
        return b"the CA says: try again later\n"
    csr = x509.load_pem_x509_csr(csr_pem)
    public = csr.public_key()
    if mode == "other-key":
        public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    if mode == "other-ca":
        ca_key, root = _root("kvmhook test impostor root CA")
        chain = [root]
    encipherment = mode != "no-key-encipherment"
    usage = x509.KeyUsage(True, False, encipherment, False, False, False, False, False, False)
    purposes = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(chain[0].subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(names, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pem([cert, *chain])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--mode", choices=MODES, default="good")
    args = parser.parse_args()
    ca_key = serialization.load_pem_private_key(
        (args.directory / "ca-key.pem").read_bytes(), password=None
    )
    chain = _chain((args.directory / "ca-chain.pem").read_bytes())
    sys.stdout.buffer.write(sign(sys.stdin.buffer.read(), ca_key, chain, args.days, args.mode))


if __name__ == "__main__":
    main()
