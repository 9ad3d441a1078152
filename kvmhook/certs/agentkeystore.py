"""The agent's keystore: a PKCS#12 file Java's keytool reads as is.

It holds one key entry, alias `cloud`: the host's private key with its
certificate chain (the certificate, then its CA certificates up to the root).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

from kvmhook.certs.pki import PrivateKey
from kvmhook.errors import KeystoreError

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


def check_passphrase(passphrase: str) -> None:
    """KeystoreError unless Java can open a keystore with `passphrase`: printable ASCII only.

    Java's PKCS#12 keystore refuses any other character ("Password is not
    ASCII"), so the agent could not open it; a control character would also
    break the command line and the properties file it travels through.
    """
    for position, char in enumerate(passphrase, 1):
        if " " <= char <= "~":
            continue
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # how Python keeps a byte that is not UTF-8
            what = f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8,"
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            what = f"the control character U+{code:04X}"
        else:
            what = f"the non-ASCII character U+{code:04X}"
        raise KeystoreError(
            f"the passphrase holds {what} at position {position}: Java opens a keystore"
            " only with printable ASCII passphrases"
        )


def dump(key: PrivateKey, chain: list[x509.Certificate], passphrase: str) -> bytes:
    """A keystore holding `key` under the alias `cloud` with `chain`."""
    return pkcs12.serialize_key_and_certificates(
        ALIAS.encode(),
        key,
        chain[0],
        chain[1:] or None,
        BestAvailableEncryption(passphrase.encode()),
    )
