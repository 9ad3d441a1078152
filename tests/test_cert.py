"""`kvmhook cert status` and `kvmhook cert renew`, run as the real command on real files."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keystore import content
from kvmhook.certs import agentkeystore, agentproperties, pki

KVMHOOK = Path(sys.executable).parent / "kvmhook"
PASSPHRASE = "s3cret-pass"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class MiniCA:
    """A one-level EC test CA that signs CSRs for a chosen number of days."""

    def __init__(self, common_name: str = "kvmhook test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.utcnow()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def sign(self, csr_pem: bytes, days: int = 365) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        now = datetime.datetime.utcnow()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(self.key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def signer_script(self, directory: Path, days: int = 365) -> str:
        """A --signer command that signs stdin's CSR with this CA."""
        key = directory / "signer-key.pem"
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / "signer-ca.pem").write_bytes(self.pem)
        script = directory / "signer.py"
        script.write_text(
            "import sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_cert import sign_with_files\n"
            f"sys.stdout.buffer.write(sign_with_files({str(directory)!r}, sys.stdin.buffer.read(),"
            f" {days}))\n"
        )
        return f"{sys.executable} {script}"


def sign_with_files(directory: str, csr_pem: bytes, days: int) -> bytes:
    """Used by the signer script: sign with the CA key and cert kept in `directory`."""
    ca = MiniCA.__new__(MiniCA)
    ca.key = serialization.load_pem_private_key(
        Path(directory, "signer-key.pem").read_bytes(), password=None
    )
    ca.cert = x509.load_pem_x509_certificate(Path(directory, "signer-ca.pem").read_bytes())
    return ca.sign(csr_pem, days) + ca.pem


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A sandbox root whose agent dir holds a set made by the real keystore tools."""
    root = tmp_path / "root"
    directory = root / "etc/cloudstack/agent"
    directory.mkdir(parents=True)
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    ca = MiniCA()
    bin_dir = Path(sys.executable).parent
    props, keystore = directory / "agent.properties", directory / "cloud.jks"
    setup = subprocess.run(
        [bin_dir / "keystore-setup", props, keystore, PASSPHRASE, "30", directory / "cloud.csr"],
        capture_output=True,
        check=True,
    )
    signed = ca.sign(setup.stdout)
    subprocess.run(
        [
            bin_dir / "keystore-cert-import",
            props,
            keystore,
            "agent",
            directory / "cloud.crt",
            content.encode(signed),
            directory / "cloud.ca.crt",
            content.encode(ca.pem),
            directory / "cloud.key",
        ],
        capture_output=True,
        check=True,
    )
    return root, directory, ca


def kvmhook(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KVMHOOK), *args], capture_output=True, text=True, env=os.environ.copy(), check=False
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mode, but under run/ (the renewal lock: runtime state) and the
    renewal record."""
    return {
        str(path): (path.read_bytes(), path.stat().st_mode)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and path.relative_to(directory).parts[0] != "run"
        and path.name != "cert-renewal.json"  # the metrics' record of each renewal's outcome
    }


def test_status_of_a_fresh_set_is_ok_and_exits_0(agent):
    """A set the tools just installed: key matches, chain verifies, exit 0, JSON says the same."""
    result = kvmhook("cert", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    (finding,) = json.loads(result.stdout)
    assert finding["name"] == "agent" and finding["problems"] == []
    assert finding["key_matches"] is True and finding["chain_verifies"] is True
    assert finding["issuer"] == "CN=kvmhook test CA"
    assert 28 <= finding["days_left"] <= 365


def test_status_warns_before_expiry(agent):
    """A certificate expiring within --warn-days is a problem: exit 1, the days named."""
    _root, directory, ca = agent
    csr = (directory / "cloud.csr").read_bytes()
    (directory / "cloud.crt").write_bytes(ca.sign(csr, days=10))
    result = kvmhook("cert", "status", "--warn-days", "30")
    assert result.returncode == 1
    assert "expires in 9 days" in result.stdout or "expires in 10 days" in result.stdout
    assert kvmhook("cert", "status", "--warn-days", "5").returncode == 1  # keystore differs now
    assert "holds another certificate than cloud.crt" in kvmhook("cert", "status").stdout


def test_status_reports_a_key_that_does_not_match(agent):
    """Replacing cloud.key with another key is reported as a mismatch."""
    _, directory, _ = agent
    other = ec.generate_private_key(ec.SECP256R1())
    (directory / "cloud.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = kvmhook("cert", "status", "--json")
    assert result.returncode == 1
    (finding,) = json.loads(result.stdout)
    assert finding["key_matches"] is False
    assert any("does not match the certificate" in problem for problem in finding["problems"])


def test_status_refuses_a_self_signed_certificate_and_an_unrelated_ca(agent):
    """A self-signed cloud.crt for cloud.key, beside an unrelated CA, is no chain (openssl
    verify refuses it too): exit 1, the certificate named."""
    _, directory, _ = agent
    key = serialization.load_pem_private_key((directory / "cloud.key").read_bytes(), None)
    now = datetime.datetime.utcnow()
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(_name("self-signed host"))
        .issuer_name(_name("self-signed host"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=300))
        .sign(key, hashes.SHA256())
    )
    (directory / "cloud.crt").write_bytes(self_signed.public_bytes(serialization.Encoding.PEM))
    result = kvmhook("cert", "status", "--json")
    assert result.returncode == 1
    (finding,) = json.loads(result.stdout)
    assert finding["key_matches"] is True and finding["chain_verifies"] is False
    assert (
        "certificate 'CN=self-signed host' is self-signed and is not one of the given CA"
        " certificates" in finding["problems"]
    )


def test_status_checks_libvirt_copies_when_libvirtd_is_configured(agent):
    """With libvirtd.conf present, missing or differing libvirt/QEMU copies are problems."""
    root, directory, ca = agent
    (root / "etc/libvirt").mkdir(parents=True)
    (root / "etc/libvirt/libvirtd.conf").write_text("")
    result = kvmhook("cert", "status", "--json")
    assert result.returncode == 1
    found = {finding["name"]: finding for finding in json.loads(result.stdout)}
    assert list(found) == [
        "agent",
        "libvirt server",
        "libvirt client",
        "qemu server",
        "qemu client",
        "vnc server",
    ]
    # The consoles' set is optional (hosts imported before it had none): absent, no problem.
    assert (found["vnc server"]["installed"], found["vnc server"]["problems"]) == (False, [])
    text = kvmhook("cert", "status").stdout
    assert "vnc server: not installed" in text
    # Importing again installs the copies; then everything agrees.
    subprocess.run(
        [
            Path(sys.executable).parent / "keystore-cert-import",
            directory / "agent.properties",
            directory / "cloud.jks",
            "agent",
            directory / "cloud.crt",
            "",
            directory / "cloud.ca.crt",
            "",
            directory / "cloud.key",
        ],
        capture_output=True,
        check=True,
    )
    assert kvmhook("cert", "status").returncode == 0
    vnc = next(
        f
        for f in json.loads(kvmhook("cert", "status", "--json").stdout)
        if f["name"] == "vnc server"
    )
    assert vnc["installed"] and vnc["key_matches"] and vnc["chain_verifies"]
    assert vnc["days_left"] > 0
    served = root / "etc/pki/libvirt/servercert.pem"
    served.write_bytes(ca.sign((directory / "cloud.csr").read_bytes()))
    result = kvmhook("cert", "status", "--json")
    assert result.returncode == 1
    server = next(f for f in json.loads(result.stdout) if f["name"] == "libvirt server")
    assert "certificate differs from the agent's cloud.crt" in server["problems"]


def test_renew_installs_a_new_key_and_certificate(agent, tmp_path):
    """renew: a new key, signed by --signer, imported into the keystore and PEM files."""
    _, directory, ca = agent
    old_key = (directory / "cloud.key").read_bytes()
    signer = ca.signer_script(tmp_path, days=90)
    result = kvmhook("cert", "renew", "--signer", signer)
    assert result.returncode == 0, result.stderr
    assert (directory / "cloud.key").read_bytes() != old_key
    passphrase = agentproperties.passphrase((directory / "agent.properties").read_text())
    assert passphrase == PASSPHRASE
    _key, cert, _cas = agentkeystore.load(str(directory / "cloud.jks"), passphrase)
    assert cert.public_bytes(serialization.Encoding.PEM) == (directory / "cloud.crt").read_bytes()
    assert 88 <= (pki.not_after(cert) - datetime.datetime.utcnow()).days <= 90
    assert kvmhook("cert", "status").returncode == 0


@pytest.mark.parametrize(
    "signer",
    ["echo the CA is down >&2; exit 3", "cat > /dev/null; echo not a certificate", "sleep 0"],
    ids=["fails", "garbage", "prints-nothing"],
)
def test_renew_with_a_bad_signer_changes_nothing(agent, signer):
    """A signer that fails or prints no certificate: one clear error, every file as it was."""
    root, _, _ = agent
    before = snapshot(root)
    result = kvmhook("cert", "renew", "--signer", signer)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(root) == before
