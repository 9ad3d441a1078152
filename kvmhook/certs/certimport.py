"""What keystore-cert-import installs, and a renewal too: the CA-signed certificate into the
keystore and beside it.

Everything is checked before anything is written: the certificate matches the
key, chains to the given CA certificates, and is valid now. Then the PEM
files, the libvirt, QEMU and console (VNC) TLS files (when this host runs
libvirtd) and, last, the keystore are replaced atomically.
"""

from __future__ import annotations

import grp
import os

from cryptography import x509

from kvmhook import paths
from kvmhook.certs import agentkeystore, agentproperties, pki
from kvmhook.errors import KeystoreError
from kvmhook.files import Transaction

MODES = ("ssh", "agent")
# Group that QEMU runs as, by distribution: it must read the TLS keys.
_QEMU_GROUPS = ("qemu", "libvirt-qemu")


class Material:
    """What one import installs: the key, its chain (certificate first) and the CA bundle."""

    def __init__(self, key: pki.PrivateKey, chain: list[x509.Certificate], cas: bytes) -> None:
        self.key = key
        self.chain = chain
        self.cas = cas


class Installation:
    """A checked import: what it installs and every file it writes, in order (keystore last)."""

    def __init__(
        self, material: Material, writes: list[tuple[str, bytes, int, int | None, int | None]]
    ) -> None:
        self.material = material
        self.writes = writes  # (path, data, mode, group, mode of a missing parent directory)

    @property
    def paths(self) -> list[str]:
        return [write[0] for write in self.writes]

    def install(self) -> Material:
        """Write every file in one transaction (nothing changes on error); what was installed."""
        with Transaction() as files:
            self.stage(files)
        return self.material

    def stage(self, files: Transaction) -> None:
        """Stage every file, in order."""
        for path, data, mode, group, parent_mode in self.writes:
            files.write(path, data, mode, group, parent_mode=parent_mode)


def check(
    properties_file: str,
    keystore_file: str,
    cert_file: str,
    cert_pem: bytes | None,
    ca_file: str,
    ca_pem: bytes | None,
    key_file: str,
    key_pem: bytes | None = None,
    new_passphrase: str | None = None,
) -> Installation:
    """Everything keystore-cert-import checks before it writes; the files it would write.

    A PEM left None is read from its file (the key: from the keystore).
    """
    text = agentproperties.read(properties_file)
    if text is None:
        if new_passphrase is None:
            raise KeystoreError(f"properties file {properties_file} does not exist")
        text = ""
    passphrase = agentproperties.passphrase(text) or new_passphrase
    if passphrase is None:
        raise KeystoreError(f"properties file {properties_file} holds no keystore.passphrase")
    cert = pki.load_certificates(_pem(cert_pem, cert_file, "certificate"), "certificate")[0]
    cas = pki.load_certificates(_pem(ca_pem, ca_file, "CA certificate"), "CA certificate")
    if key_pem is not None:
        key = pki.load_private_key(key_pem, "private key")
    else:
        key = agentkeystore.load(keystore_file, passphrase)[0]
    if not pki.key_matches(key, cert):
        source = "the given private key" if key_pem is not None else f"the key in {keystore_file}"
        raise KeystoreError(f"certificate {pki.describe(cert)} does not match {source}")
    chain = pki.chain(cert, cas)
    pki.check_validity(cert, "certificate")
    material = Material(key, chain, pki.certificate_pem(cas))
    writes: list[tuple[str, bytes, int, int | None, int | None]] = [
        (path, data, mode, group, _directory_mode(path))
        for path, data, mode, group in _pem_files(
            material, keystore_file, cert_file, ca_file, key_file
        )
    ]
    if agentproperties.passphrase(text) is None:
        data = agentproperties.with_passphrase(text, passphrase).encode(agentproperties.ENCODING)
        writes.append((properties_file, data, 0o600, None, None))
    writes.append((keystore_file, agentkeystore.dump(key, chain, passphrase), 0o600, None, None))
    return Installation(material, writes)


def _pem(given: bytes | None, path: str, what: str) -> bytes:
    """The PEM given, or the file as it is when none was."""
    if given is not None:
        return given
    try:
        with open(path, "rb") as source:
            return source.read()
    except OSError as error:
        raise KeystoreError(
            f"no {what} content given and cannot read {path}: {error.strerror}"
        ) from None


def target_paths(keystore_file: str, cert_file: str, ca_file: str, key_file: str) -> list[str]:
    """Every file an import replaces (the properties file aside), the keystore last."""
    targets = _pem_targets(keystore_file, cert_file, ca_file, key_file)
    return [path for path, _, _, _ in targets] + [keystore_file]


def _pem_files(
    material: Material, keystore_file: str, cert_file: str, ca_file: str, key_file: str
) -> list[tuple[str, bytes, int, int | None]]:
    """Every PEM file to write: (path, data, mode, group), each path once."""
    data = {
        "leaf": pki.certificate_pem(material.chain[:1]),
        "served": pki.certificate_pem(material.chain[:-1] or material.chain),  # + intermediates
        "cas": material.cas,
        "key": pki.key_pem(material.key),
    }
    return [
        (path, data[what], mode, group)
        for path, what, mode, group in _pem_targets(keystore_file, cert_file, ca_file, key_file)
    ]


def _pem_targets(
    keystore_file: str, cert_file: str, ca_file: str, key_file: str
) -> list[tuple[str, str, int, int | None]]:
    """Every PEM file an import writes: (path, what it holds, mode, group), each path once."""
    beside = paths.agent_files(os.path.dirname(os.path.abspath(keystore_file)))
    files = [
        (cert_file, "leaf", 0o644, None),
        (ca_file, "cas", 0o644, None),
        (key_file, "key", 0o600, None),
        (beside.cert, "leaf", 0o644, None),
        (beside.ca, "cas", 0o644, None),
        (beside.key, "key", 0o600, None),
    ]
    if os.path.exists(paths.libvirtd_conf()):
        qemu_group = _qemu_group()
        for role, path in {**paths.tls_files(), **paths.vnc_tls_files()}.items():
            if role.endswith(" ca"):
                files.append((path, "cas", 0o644, None))
            elif role.endswith(" cert"):
                files.append((path, "served", 0o644, None))
            else:
                files.append((path, "key", 0o640 if qemu_group is not None else 0o600, qemu_group))
    unique: dict[str, tuple[str, str, int, int | None]] = {}
    for entry in files:
        unique.setdefault(os.path.realpath(entry[0]), entry)
    return list(unique.values())


def _qemu_group() -> int | None:
    for name in _QEMU_GROUPS:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


def _directory_mode(path: str) -> int:
    """Mode for a missing parent: private key directories for root and QEMU's group only."""
    return 0o750 if os.path.basename(os.path.dirname(path)) == "private" else 0o755
