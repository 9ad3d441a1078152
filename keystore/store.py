"""The agent's keystore: a PKCS#12 file Java's keytool reads as is.

It holds one key entry, alias `cloud`: the host's private key with its
certificate chain (the certificate, then its CA certificates up to the root).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from kvmhook.errors import KeystoreError
from kvmhook.pki import PrivateKey

ALIAS = "cloud"


def load(path: str, passphrase: str) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """The key, certificate and CA certificates of the keystore at `path`."""
    try:
        with open(path, "rb") as source:
            data = source.read()
    except OSError as error:
        raise KeystoreError(f"cannot read keystore {path}: {error.strerror}") from None
    try:
        key, cert, cas = pkcs12.load_key_and_certificates(data, passphrase.encode())
    except ValueError:
        raise KeystoreError(
            f"cannot open keystore {path}: wrong passphrase, or not a PKCS#12 keystore"
        ) from None
    if key is None or cert is None:
        raise KeystoreError(f"keystore {path} holds no key entry")
    return key, cert, list(cas)


def dump(key: PrivateKey, chain: list[x509.Certificate], passphrase: str) -> bytes:
    """A keystore holding `key` under the alias `cloud` with `chain`."""
    return pkcs12.serialize_key_and_certificates(
        ALIAS.encode(),
        key,
        chain[0],
        chain[1:] or None,
        BestAvailableEncryption(passphrase.encode()),
    )
