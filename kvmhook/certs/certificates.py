"""The installed certificate sets, checked: what `kvmhook cert status` reports, and what a
renewal or rollback must find before it changes them.

A set is a certificate with its key and CA bundle: the agent's (beside its
keystore), libvirt's server and client, QEMU's server and client, and the
consoles' (VNC; optional: hosts imported before it have none). Each is
checked for presence, key match, chain and validity; all copies must hold
the same certificate and key. A renewal's new chain must end at a root the
installed CA bundle holds (check_trusted); a rollback's kept set must hold
together (check_set).
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kvmhook import paths
from kvmhook.certs import agentkeystore, agentproperties, pki
from kvmhook.errors import KvmhookError

DEFAULT_WARN_DAYS = 30
# Sets a host may lack without anything being wrong: imported before they existed.
OPTIONAL = ("vnc server",)


class Finding:
    """One certificate set as found on disk, and what is wrong with it."""

    def __init__(self, name: str, cert: str, key: str, ca: str) -> None:
        self.name = name
        self.files = {"cert": cert, "key": key, "ca": ca}
        self.problems: list[str] = []
        self.subject = self.issuer = self.not_after = None
        self.sans: list[str] = []
        self.days_left: int | None = None
        self.key_matches: bool | None = None
        self.chain_verifies: bool | None = None
        self.fingerprint: str | None = None
        self.key_fingerprint: str | None = None
        self.installed = True  # False only for an OPTIONAL set none of whose files exists
        self.expires: datetime.datetime | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "installed": self.installed,
            "files": self.files,
            "subject": self.subject,
            "sans": self.sans,
            "issuer": self.issuer,
            "not_after": self.not_after,
            "days_left": self.days_left,
            "key_matches": self.key_matches,
            "chain_verifies": self.chain_verifies,
            "problems": self.problems,
        }


def certificate_sets(agent_dir: str) -> list[tuple[str, str, str, str]]:
    """(name, cert, key, ca) of every set this host should have."""
    agent = paths.agent_files(agent_dir)
    sets = [("agent", agent.cert, agent.key, agent.ca)]
    if os.path.exists(paths.libvirtd_conf()):
        tls = paths.tls_files()
        for side in ("libvirt server", "libvirt client", "qemu server", "qemu client"):
            daemon = side.split()[0]
            sets.append((side, tls[f"{side} cert"], tls[f"{side} key"], tls[f"{daemon} ca"]))
        vnc = paths.vnc_tls_files()
        sets.append(("vnc server", vnc["vnc server cert"], vnc["vnc server key"], vnc["vnc ca"]))
    return sets


def inspect(agent_dir: str, warn_days: int, now: datetime.datetime | None = None) -> list[Finding]:
    """Every set checked; copies that disagree with the agent's are problems of that copy."""
    now = now or pki.utcnow()
    findings = [_inspect(Finding(*entry), warn_days, now) for entry in certificate_sets(agent_dir)]
    reference = findings[0]
    _check_keystore(reference, agent_dir)
    for finding in findings[1:]:
        if (
            reference.fingerprint
            and finding.fingerprint
            and finding.fingerprint != reference.fingerprint
        ):
            finding.problems.append("certificate differs from the agent's cloud.crt")
        if (
            reference.key_fingerprint
            and finding.key_fingerprint
            and finding.key_fingerprint != reference.key_fingerprint
        ):
            finding.problems.append("key differs from the agent's cloud.key")
    return findings


def _inspect(finding: Finding, warn_days: int, now: datetime.datetime) -> Finding:
    if finding.name in OPTIONAL and not any(map(os.path.lexists, finding.files.values())):
        finding.installed = False
        return finding
    try:
        certs = pki.load_certificates(_read(finding.files["cert"]), finding.files["cert"])
        cert = certs[0]
        _describe(finding, cert, now, warn_days)
        key = pki.load_private_key(_read(finding.files["key"]), finding.files["key"])
        finding.key_matches = pki.key_matches(key, cert)
        finding.key_fingerprint = _key_id(key)
        if not finding.key_matches:
            finding.problems.append(f"{finding.files['key']} does not match the certificate")
        cas = pki.load_certificates(_read(finding.files["ca"]), finding.files["ca"])
        try:
            pki.chain(cert, cas, untrusted=certs[1:], now=now)
            finding.chain_verifies = True
        except pki.PkiError as error:
            finding.chain_verifies = False
            finding.problems.append(str(error))
    except KvmhookError as error:
        finding.problems.append(str(error))
    return finding


def _describe(finding: Finding, cert: x509.Certificate, now: datetime.datetime, warn: int) -> None:
    finding.subject = cert.subject.rfc4514_string()
    finding.issuer = cert.issuer.rfc4514_string()
    finding.expires = pki.not_after(cert)
    finding.not_after = finding.expires.isoformat() + "Z"
    finding.fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    finding.days_left = (pki.not_after(cert) - now).days
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        finding.sans = [str(name.value) for name in names]
    except x509.ExtensionNotFound:
        pass
    if now > pki.not_after(cert):
        finding.problems.append(f"expired on {pki.not_after(cert)} UTC")
    elif finding.days_left < warn:
        finding.problems.append(f"expires in {finding.days_left} days (warning at {warn})")
    if now < pki.not_before(cert):
        finding.problems.append(f"not valid before {pki.not_before(cert)} UTC")


def expiring(
    findings: list[Finding], within_days: int, now: datetime.datetime | None = None
) -> list[str]:
    """One warning per certificate of the sets, and per CA certificate of their CA files,
    that expires within `within_days` (or has expired): what and when."""
    now = now or pki.utcnow()
    limit = now + datetime.timedelta(days=within_days)
    warnings = []
    for finding in findings:
        if finding.expires is not None and finding.expires <= limit:
            warnings.append(
                f"the {finding.name} certificate ({finding.files['cert']}) "
                f"{_when(finding.expires, now)}"
            )
    for ca_file in dict.fromkeys(finding.files["ca"] for finding in findings if finding.installed):
        try:
            cas = pki.load_certificates(_read(ca_file), ca_file)
        except KvmhookError:
            continue  # unreadable: its set's problems say so
        for ca in cas:
            if pki.not_after(ca) <= limit:
                warnings.append(
                    f"the CA {pki.describe(ca)} ({ca_file}) {_when(pki.not_after(ca), now)}"
                )
    return warnings


def _when(not_after: datetime.datetime, now: datetime.datetime) -> str:
    if not_after <= now:
        return f"expired on {not_after.isoformat()}Z"
    days = (not_after - now).days
    left = "less than a day" if days < 1 else "1 day" if days == 1 else f"{days} days"
    return f"expires in {left}, on {not_after.isoformat()}Z"


def _key_id(key: pki.PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        .hex()
    )


def _public(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_keystore(agent: Finding, agent_dir: str) -> None:
    """The keystore must hold the same certificate as cloud.crt (when both exist)."""
    files = paths.agent_files(agent_dir)
    keystore = files.keystore
    agent.files["keystore"] = keystore
    if not os.path.exists(keystore):
        agent.problems.append(f"{keystore}: no keystore")
        return
    try:
        passphrase = agentproperties.passphrase(agentproperties.read(files.properties) or "")
        if passphrase is None:
            raise pki.PkiError("agent.properties holds no keystore.passphrase")
        cert = agentkeystore.load(keystore, passphrase)[1]
    except KvmhookError as error:
        agent.problems.append(str(error))
        return
    if agent.fingerprint and cert.fingerprint(hashes.SHA256()).hex() != agent.fingerprint:
        agent.problems.append(f"{keystore} holds another certificate than cloud.crt")


def check_trusted(ca_file: str, chain: list[x509.Certificate]) -> None:
    """PkiError unless `chain` ends at a root the CA bundle `ca_file` holds (when there is one).

    A certificate from another CA is refused by every peer still trusting
    this one: migrations to and from this host would stop. Changing CA is a
    keystore-cert-import of its own, not a renewal.
    """
    try:
        with open(ca_file, "rb") as source:
            trusted = pki.load_certificates(source.read(), ca_file)
    except FileNotFoundError:
        return  # nothing trusted yet: the first certificate sets it
    except OSError as error:
        raise pki.PkiError(f"cannot read {ca_file}: {error.strerror}") from None
    root = chain[-1]
    if not any(ca.subject == root.subject and _public(ca) == _public(root) for ca in trusted):
        names = "; ".join(ca.subject.rfc4514_string() for ca in trusted)
        raise pki.PkiError(
            f"the new certificate chains to the root {pki.describe(root)}, which this host does"
            f" not trust ({ca_file} holds {names}): its peers would refuse it"
        )


def check_set(cert_file: str, key_file: str, ca_file: str, what: str) -> x509.Certificate:
    """The set's certificate, after the checks keystore-cert-import makes: PkiError when its
    key does not match, its chain does not verify or it is not valid now."""
    cert = pki.load_certificates(_read(cert_file), cert_file)[0]
    key = pki.load_private_key(_read(key_file), key_file)
    if not pki.key_matches(key, cert):
        raise pki.PkiError(f"{key_file} does not match {cert_file}")
    pki.chain(cert, pki.load_certificates(_read(ca_file), ca_file))
    pki.check_validity(cert, what)
    return cert


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as source:
            return source.read()
    except OSError as error:
        raise pki.PkiError(f"{path}: {error.strerror}") from None
