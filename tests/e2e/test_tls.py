"""libvirtd serving TLS with the files keystore-cert-import installed: a real daemon, real virsh.

The certificate comes the way the controller makes it: keystore-setup writes a
CSR, a test CA (root and intermediate, made here) signs it, keystore-cert-import
installs it. libvirtd reads fixed paths, so this writes the real
/etc/libvirt/libvirtd.conf and /etc/pki/{CA,libvirt,qemu} (and /etc/hosts only
when the host's name does not resolve), and puts every one of them back as it
was afterwards, then restarts the session's libvirtd as the other tests know it
(no --listen).
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import run

from kvmhook.hostname import fqdn

LIBVIRTD_CONF = Path("/etc/libvirt/libvirtd.conf")
ETC_HOSTS = Path("/etc/hosts")
TLS_PORT = 16514
TLS_CONF = f'listen_tls = 1\nlisten_tcp = 0\nauth_tls = "none"\ntls_port = "{TLS_PORT}"\n'
CA_FILE = Path("/etc/pki/CA/cacert.pem")
SERVER_CERT = Path("/etc/pki/libvirt/servercert.pem")
CLIENT_CERT = Path("/etc/pki/libvirt/clientcert.pem")
CLIENT_KEY = Path("/etc/pki/libvirt/private/clientkey.pem")
# Everything keystore-cert-import installs when libvirtd.conf exists (issue 4).
INSTALLED = (
    CA_FILE,
    SERVER_CERT,
    Path("/etc/pki/libvirt/private/serverkey.pem"),
    CLIENT_CERT,
    CLIENT_KEY,
    Path("/etc/pki/qemu/ca-cert.pem"),
    Path("/etc/pki/qemu/server-cert.pem"),
    Path("/etc/pki/qemu/server-key.pem"),
    Path("/etc/pki/qemu/client-cert.pem"),
    Path("/etc/pki/qemu/client-key.pem"),
)
TOOLS = Path(sys.executable).parent  # the venv's console scripts (project installed editable)
PASSPHRASE = "e2e-tls-secret"


class Saved:
    """Files as they were (bytes, mode, owner, or absent; symlinks as links), and the
    directories above them that did not exist; restore() puts all of that back."""

    def __init__(self, files: list[Path]) -> None:
        self.files: dict[Path, tuple | None] = {}
        for path in files:
            if path.is_symlink():
                self.files[path] = ("link", os.readlink(path))
            elif path.exists():
                info = path.stat()
                self.files[path] = (
                    "file",
                    path.read_bytes(),
                    info.st_mode,
                    info.st_uid,
                    info.st_gid,
                )
            else:
                self.files[path] = None
        missing = {d for path in files for d in path.parents if not d.exists()}
        # Outermost first: removing it removes what the tools created inside.
        self.missing_dirs = sorted(missing, key=lambda d: len(d.parts))

    def restore(self) -> None:
        """Put everything back, as far as possible; then raise the first error, if any."""
        errors = []
        for path, saved in self.files.items():
            try:
                self._restore(path, saved)
            except OSError as error:
                errors.append(error)
        for directory in self.missing_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        if errors:
            raise errors[0]

    @staticmethod
    def _restore(path: Path, saved: tuple | None) -> None:
        if saved is None:
            if path.is_symlink() or path.exists():
                path.unlink()
        elif saved[0] == "link":
            if path.is_symlink() and os.readlink(path) == saved[1]:
                return
            if path.is_symlink() or path.exists():
                path.unlink()
            path.symlink_to(saved[1])
        else:
            _, data, mode, uid, gid = saved
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                info = path.stat()
                if (info.st_mode, info.st_uid, info.st_gid) == (mode, uid, gid) and (
                    path.read_bytes() == data
                ):
                    return  # untouched (/etc/hosts, mostly): leave it alone
            # Written in place: /etc/hosts may be a bind mount that cannot be renamed over.
            with path.open("wb") as target:
                target.write(data)
            os.chown(path, uid, gid)
            path.chmod(stat.S_IMODE(mode))


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def certificate(
    subject: x509.Name,
    public_key,
    issuer: x509.Certificate | None,
    issuer_key,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """A certificate valid from an hour ago for two days, as CloudStack's CertUtils builds it:
    AKI (when issued by a CA) and SKI, then the given extensions."""
    now = utcnow()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),
            critical=False,
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


class Authority:
    """A test CA: a root, optionally an intermediate that signs, and the bundle of both."""

    def __init__(self, label: str, intermediate: bool, root_name: x509.Name | None = None) -> None:
        self.root_key = new_key()
        self.root = certificate(
            root_name or name(f"kvmhook e2e {label} root CA"), self.root_key.public_key(), None,
            self.root_key, self.ca_extensions(),
        )  # fmt: skip
        self.key, self.cert, self.chain = self.root_key, self.root, [self.root]
        if intermediate:
            self.key = new_key()
            self.cert = certificate(
                name(f"kvmhook e2e {label} intermediate CA"), self.key.public_key(), self.root,
                self.root_key, self.ca_extensions(),
            )  # fmt: skip
            self.chain = [self.cert, self.root]

    @staticmethod
    def ca_extensions() -> list[tuple[x509.ExtensionType, bool]]:
        # CloudStack's CA certificate: basicConstraints CA:TRUE and keyUsage
        # keyCertSign+cRLSign, both critical. libvirt refuses a CA without basicConstraints.
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return [(x509.BasicConstraints(ca=True, path_length=None), True), (usage, True)]

    def bundle(self) -> bytes:
        return pem(*self.chain)

    def sign(self, subject: x509.Name, public_key, sans, profile: str) -> x509.Certificate:
        return certificate(subject, public_key, self.cert, self.key, leaf_extensions(sans, profile))


def leaf_extensions(sans: x509.SubjectAlternativeName, profile: str) -> list:
    """The host certificate's extensions by signing profile.

    `certutils`: what CloudStack's CertUtils.generateV3Certificate adds to a host
    certificate besides the key identifiers: the SANs only. `constrained`:
    basicConstraints CA:FALSE, keyUsage digitalSignature+keyEncipherment (both
    critical) and extendedKeyUsage serverAuth+clientAuth, what libvirt checks
    when they are present.
    """
    extensions: list[tuple[x509.ExtensionType, bool]] = [(sans, False)]
    if profile == "constrained":
        usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        extensions += [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (usage, True),
            (x509.ExtendedKeyUsage(purposes), False),
        ]
    return extensions


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (cryptography 38 has no load_pem_x509_certificates)."""
    end = b"-----END CERTIFICATE-----"
    blocks = [block + end for block in data.split(end) if b"-----BEGIN" in block]
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def encode(data: bytes) -> str:
    """The tools' content-argument encoding: newlines as ^, spaces as ~."""
    return data.decode("ascii").replace("\n", "^").replace(" ", "~")


def tool(command: str, *args: str) -> subprocess.CompletedProcess:
    """Run one of the project's console scripts against the real paths (no KVMHOOK_ROOT)."""
    env = {key: value for key, value in os.environ.items() if key != "KVMHOOK_ROOT"}
    result = subprocess.run(
        [str(TOOLS / command), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr}"
    return result


def virsh_tls(host: str, pkipath: Path | None = None) -> subprocess.CompletedProcess:
    uri = f"qemu+tls://{host}/system" + (f"?pkipath={pkipath}" if pkipath else "")
    return run("virsh", "-c", uri, "version", timeout=60, check=False)


def resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, TLS_PORT, type=socket.SOCK_STREAM))
    except socket.gaierror:
        return False


def log_since(log: Path, offset: int, wanted: str, wait: float = 5) -> str:
    """libvirtd's log written after `offset`, once it holds `wanted` (or after `wait` s)."""
    deadline = time.monotonic() + wait
    while True:
        with log.open("rb") as source:
            source.seek(offset)
            text = source.read().decode(errors="replace")
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


class TlsHost:
    """What the fixture set up: the name to connect to, the CA, the agent dir, the daemon."""

    def __init__(self, host: str, ca: Authority, agent: Path, daemon, profile: str) -> None:
        self.host = host
        self.ca = ca
        self.agent = agent
        self.daemon = daemon
        self.profile = profile


@pytest.fixture(scope="module", params=["certutils", "constrained"])
def tls_host(request, libvirtd, tmp_path_factory):
    """The host's key and CSR from keystore-setup, signed by a two-level test CA (one signing
    profile per param), installed by keystore-cert-import; libvirtd restarted with --listen."""
    for command in ("keystore-setup", "keystore-cert-import"):
        assert (TOOLS / command).is_file(), f"{TOOLS / command} missing: pip install -e ."
    profile = request.param
    host = fqdn()
    saved = Saved([LIBVIRTD_CONF, ETC_HOSTS, *INSTALLED])
    try:
        if not resolves(host):
            with ETC_HOSTS.open("a") as hosts:
                hosts.write(f"\n127.0.0.1 {host}\n")
        agent = tmp_path_factory.mktemp(f"agent-{profile}")
        props, keystore, csr_file = agent / "agent.properties", agent / "cloud.jks", agent / "csr"
        tool("keystore-setup", str(props), str(keystore), PASSPHRASE, "365", str(csr_file))
        csr = x509.load_pem_x509_csr(csr_file.read_bytes())
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in sans.get_values_for_type(x509.DNSName), (host, sans)
        ca = Authority(profile, intermediate=True)
        signed = ca.sign(csr.subject, csr.public_key(), sans, profile)
        # The tool installs libvirt's files only where libvirtd.conf exists.
        LIBVIRTD_CONF.write_text(TLS_CONF)
        tool(
            "keystore-cert-import", str(props), str(keystore), "ssh",
            str(agent / "cloud.crt"), encode(pem(signed)),
            str(agent / "cloud.ca.crt"), encode(ca.bundle()),
            str(agent / "cloud.key"),
        )  # fmt: skip
        libvirtd.restart(listen=True)
        try:
            socket.create_connection((host, TLS_PORT), timeout=5).close()
        except OSError as error:
            pytest.fail(f"{host} resolves to no address libvirtd's TLS port answers on: {error}")
        yield TlsHost(host, ca, agent, libvirtd, profile)
    finally:
        try:
            saved.restore()
        finally:
            libvirtd.restart()  # as the session fixture started it: no --listen


def test_import_installs_the_signed_certificate_where_libvirt_and_qemu_read_it(tls_host):
    """keystore-cert-import wrote the CA bundle, the served chain and the key to every TLS path."""
    for path in INSTALLED:
        assert path.is_file(), path
    assert CA_FILE.read_bytes() == tls_host.ca.bundle()
    served = certificates(SERVER_CERT.read_bytes())
    leaf = x509.load_pem_x509_certificate((tls_host.agent / "cloud.crt").read_bytes())
    assert served == [leaf, tls_host.ca.cert]  # leaf and intermediate, root left to the CA file
    assert CLIENT_CERT.read_bytes() == SERVER_CERT.read_bytes()
    assert CLIENT_KEY.read_bytes() == (tls_host.agent / "cloud.key").read_bytes()


def test_virsh_connects_over_tls_with_the_installed_client_certificate(tls_host):
    """`virsh -c qemu+tls://<fqdn>/system version` succeeds with /etc/pki's installed files."""
    result = virsh_tls(tls_host.host)
    assert result.returncode == 0, result.stderr
    assert "Running hypervisor: QEMU" in result.stdout, result.stdout


def client_dirs(tls_host, tmp_path: Path, other: Authority) -> tuple[Path, Path]:
    """Two pkipath dirs trusting both CAs, so neither client rejects libvirtd's certificate or
    its own: `ours` with the installed client cert and key, `theirs` with a cert and key for the
    same name, signed by `other` with the same profile."""
    key = new_key()
    sans = x509.SubjectAlternativeName([x509.DNSName(tls_host.host)])
    foreign = other.sign(name(tls_host.host), key.public_key(), sans, tls_host.profile)
    trusted = tls_host.ca.bundle() + other.bundle()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for directory, cert, private in (
        (ours, CLIENT_CERT.read_bytes(), CLIENT_KEY.read_bytes()),
        (theirs, pem(foreign), key_pem(key)),
    ):
        directory.mkdir()
        (directory / "cacert.pem").write_bytes(trusted)
        (directory / "clientcert.pem").write_bytes(cert)
        (directory / "clientkey.pem").write_bytes(private)
        (directory / "clientkey.pem").chmod(0o600)
    return ours, theirs


def refused_by_server(tls_host, ours: Path, theirs: Path) -> str:
    """Connect with `ours` (must work), then `theirs` (must fail in the server's certificate
    check); returns what libvirtd logged about the refusal."""
    accepted = virsh_tls(tls_host.host, ours)
    assert accepted.returncode == 0, accepted.stderr
    offset = tls_host.daemon.log.stat().st_size
    refused = virsh_tls(tls_host.host, theirs)
    assert refused.returncode != 0, refused.stdout
    # The handshake completed and the server then said no (its check byte never came).
    assert "Unable to read TLS confirmation" in refused.stderr, refused.stderr
    said = log_since(tls_host.daemon.log, offset, "Failed to verify peer's certificate")
    assert "authentication failed: Failed to verify peer's certificate" in said, said
    return said


def test_server_refuses_a_client_certificate_from_another_ca(tls_host, tmp_path):
    """A client cert from an unrelated CA gets no connection, while ours passes the same way."""
    other = Authority(f"{tls_host.profile} other", intermediate=False)
    said = refused_by_server(tls_host, *client_dirs(tls_host, tmp_path, other))
    # GnuTLS only presents a client certificate issued by a CA the server names in its
    # request, so libvirtd sees none at all.
    assert "No certificate was found" in said, said


def test_server_refuses_a_client_certificate_from_an_impostor_ca(tls_host, tmp_path):
    """A client cert from a CA named like ours but with another key is refused on its signature."""
    # Same subject as the CA that signed the host's certificate, its own key: the client
    # presents the cert (the issuer name is one the server asks for), the server verifies it.
    impostor = Authority("impostor", intermediate=False, root_name=tls_host.ca.cert.subject)
    said = refused_by_server(tls_host, *client_dirs(tls_host, tmp_path, impostor))
    assert "Certificate failed validation" in said, said
