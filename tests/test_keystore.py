"""keystore-setup and keystore-cert-import, run as the real console scripts (and a few
in-process calls), checked with keytool and openssl against a test CA.

Every test that imports sets KVMHOOK_ROOT to a temporary root, so the real
/etc/pki is never touched.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import testca
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keystore import cli, content
from kvmhook import files, hostname, paths
from kvmhook.certs import agentkeystore, agentproperties, keysetup, pki

BIN = Path(sys.executable).parent
SETUP = BIN / "keystore-setup"
IMPORT = BIN / "keystore-cert-import"
PASSPHRASE = "s3cret-Pass_1"
PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----\r?\n", re.S)
# Where the import puts libvirt's and QEMU's TLS files, relative to the root, by kind.
TLS_CA = ["etc/pki/CA/cacert.pem", "etc/pki/qemu/ca-cert.pem", "etc/pki/libvirt-vnc/ca-cert.pem"]
TLS_CERTS = [
    "etc/pki/libvirt/servercert.pem",
    "etc/pki/libvirt/clientcert.pem",
    "etc/pki/qemu/server-cert.pem",
    "etc/pki/qemu/client-cert.pem",
    "etc/pki/libvirt-vnc/server-cert.pem",
]
TLS_KEYS = [
    "etc/pki/libvirt/private/serverkey.pem",
    "etc/pki/libvirt/private/clientkey.pem",
    "etc/pki/qemu/server-key.pem",
    "etc/pki/qemu/client-key.pem",
    "etc/pki/libvirt-vnc/server-key.pem",
]


def need(tool: str) -> str:
    """The path of `tool`, or skip the test saying it is missing."""
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed (install default-jre-headless / openssl)")
    return found


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def qemu_group() -> int | None:
    """The gid QEMU's TLS keys get: group qemu or libvirt-qemu, whichever exists first."""
    for name in ("qemu", "libvirt-qemu"):
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


class Agent:
    """An agent's directory (properties, keystore, PEM files) and a host root for KVMHOOK_ROOT."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "agent"
        self.root = base / "root"
        self.properties = self.dir / "agent.properties"
        self.keystore = self.dir / "cloud.jks"
        self.csr = self.dir / "cloud.csr"
        self.cert = self.dir / "cloud.crt"
        self.ca = self.dir / "cloud.ca.crt"
        self.key = self.dir / "cloud.key"

    @classmethod
    def create(cls, base: Path, libvirtd: bool = False) -> Agent:
        agent = cls(base)
        agent.dir.mkdir(parents=True)
        agent.root.mkdir()
        if libvirtd:
            conf = agent.root / "etc/libvirt/libvirtd.conf"
            conf.parent.mkdir(parents=True)
            conf.write_text("listen_tls = 1\n")
        return agent

    def env(self) -> dict[str, str]:
        return {**os.environ, "KVMHOOK_ROOT": str(self.root)}

    def run(self, tool: Path, *args: str | bytes) -> subprocess.CompletedProcess:
        if not tool.exists():
            pytest.skip(f"console script {tool} is not installed next to {sys.executable}")
        return subprocess.run(
            [str(tool), *args],
            capture_output=True,
            env=self.env(),
            timeout=60,
            check=False,
            umask=0o022,  # root's usual umask, whatever the test runner's
        )

    def setup(
        self, *options: str, passphrase: str = PASSPHRASE, days: str = "365"
    ) -> subprocess.CompletedProcess:
        """Run keystore-setup with the standard file names."""
        return self.run(
            SETUP,
            *options,
            str(self.properties),
            str(self.keystore),
            passphrase,
            days,
            str(self.csr),
        )

    def import_args(
        self, cert: bytes | str, ca: bytes | str, key: bytes | str | None = None, mode: str = "ssh"
    ) -> list[str]:
        """The import's arguments; bytes are PEM to encode, str is passed as it is."""

        def arg(value: bytes | str) -> str:
            return content.encode(value) if isinstance(value, bytes) else value

        args = [str(self.properties), str(self.keystore), mode, str(self.cert), arg(cert)]
        args += [str(self.ca), arg(ca), str(self.key)]
        return args + ([arg(key)] if key is not None else [])

    def import_cert(
        self,
        cert: bytes | str,
        ca: bytes | str,
        key: bytes | str | None = None,
        mode: str = "ssh",
    ) -> subprocess.CompletedProcess:
        """Run keystore-cert-import as the controller does (content on the command line)."""
        return self.run(IMPORT, *self.import_args(cert, ca, key, mode))

    def passphrase(self) -> str:
        found = agentproperties.passphrase(self.properties.read_text())
        assert found is not None
        return found

    def load(self, passphrase: str | None = None):
        """The keystore's key, certificate and CA certificates."""
        return agentkeystore.load(str(self.keystore), passphrase or self.passphrase())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def keytool(agent: Agent, *flags: str, passphrase: str = PASSPHRASE) -> str:
    """`keytool -list FLAGS` of the agent's keystore; its output (English)."""
    result = subprocess.run(
        [
            need("keytool"),
            "-list",
            *flags,
            "-keystore",
            str(agent.keystore),
            "-storepass",
            passphrase,
        ],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return result.stdout.decode()


def keytool_chain(listing: str) -> list[str]:
    """The SHA-256 fingerprints of the certificates in a `keytool -list -v` listing, in order."""
    return re.findall(r"^\s*SHA256: ([0-9A-F:]+)$", listing, re.M)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("openssl"), *args], capture_output=True, timeout=60, check=False)


def check_installed(agent: Agent, chain: list[x509.Certificate], cas: bytes | None = None) -> None:
    """What every successful import leaves: keytool's `cloud` key entry with `chain` (leaf
    first), the PEM files and their modes, openssl's checks. `cas`: cloud.ca.crt (default:
    chain[1:])."""
    leaf = chain[0]
    cas = testca.pem(*chain[1:]) if cas is None else cas
    listing = keytool(agent, "-v", passphrase=agent.passphrase())
    assert "Your keystore contains 1 entry" in listing
    assert "Alias name: cloud\n" in listing
    assert "Entry type: PrivateKeyEntry\n" in listing
    assert f"Certificate chain length: {len(chain)}\n" in listing
    assert keytool_chain(listing) == [fingerprint(cert) for cert in chain]
    assert agent.cert.read_bytes() == testca.pem(leaf)
    assert agent.ca.read_bytes() == cas
    for path in (agent.key, agent.keystore, agent.properties):
        assert mode_of(path) == 0o600, path
    for path in (agent.cert, agent.ca):
        assert mode_of(path) == 0o644, path
    verified = openssl("verify", "-CAfile", str(agent.ca), str(agent.cert))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.decode().strip() == f"{agent.cert}: OK"
    from_key = openssl("pkey", "-in", str(agent.key), "-pubout")
    from_cert = openssl("x509", "-in", str(agent.cert), "-pubkey", "-noout")
    assert from_key.returncode == 0 and from_cert.returncode == 0
    assert from_key.stdout.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert from_key.stdout == from_cert.stdout
    key, cert, _ = agent.load()
    assert cert == leaf
    assert testca.public_der(key) == testca.public_der(leaf)
    assert agent.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert testca.public_der(x509_key(agent.key)) == testca.public_der(leaf)
    assert not [name for name in os.listdir(agent.dir) if name.startswith(".")]


def x509_key(path: Path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def snapshot(*directories: Path) -> dict[str, tuple]:
    """Every file and directory under `directories`: type, mode, owner and bytes; the
    tools' lock under run/kvmhook aside (it holds the last holder's pid)."""
    seen: dict[str, tuple] = {}
    for top in directories:
        for directory, names, regular in os.walk(top):
            if directory.endswith(os.path.join("", "run", "kvmhook")):
                continue
            for name in names + regular:
                path = os.path.join(directory, name)
                info = os.lstat(path)
                data = None
                if stat.S_ISREG(info.st_mode):
                    with open(path, "rb") as source:
                        data = source.read()
                seen[path] = (
                    stat.S_IFMT(info.st_mode),
                    info.st_mode,
                    info.st_uid,
                    info.st_gid,
                    data,
                )
    return seen


def assert_refused(
    result: subprocess.CompletedProcess, before: dict, after: dict, *words: str, prog: str
) -> str:
    """Non-zero exit, exactly one stderr line naming the problem, nothing on disk changed."""
    assert result.returncode != 0
    lines = result.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == b""
    changed = sorted(set(before) ^ set(after) | {k for k in before if before[k] != after.get(k)})
    assert after == before, f"changed on disk: {changed}"
    return lines[0]


@pytest.fixture(scope="module")
def ca() -> testca.Pki:
    return testca.shared()


class Installed(Agent):
    """An agent after a successful setup and import (libvirtd present), ready to be broken."""

    leaf: x509.Certificate
    public: bytes

    def snapshot(self) -> dict[str, tuple]:
        return snapshot(self.base)


@pytest.fixture(scope="module")
def installed_template(tmp_path_factory, ca) -> Installed:
    """One setup + import with TLS files, copied by `installed` for every bad-input test."""
    agent = Installed.create(tmp_path_factory.mktemp("installed"), libvirtd=True)
    ok(agent.setup())
    agent.leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(agent.leaf), ca.bundle))
    agent.public = testca.public_der(agent.leaf)
    return agent


@pytest.fixture
def installed(tmp_path, installed_template) -> Installed:
    """A private copy of the installed agent and root (every file, modes kept)."""
    shutil.copytree(installed_template.base, tmp_path / "host", symlinks=True)
    agent = Installed(tmp_path / "host")
    agent.leaf = installed_template.leaf
    agent.public = installed_template.public
    assert (agent.root / TLS_KEYS[0]).exists()
    return agent


@pytest.fixture
def read_only(request):
    """Make a directory a read-only bind mount (root ignores modes) until the test ends."""

    def make(path: Path) -> None:
        mount = shutil.which("mount")
        if mount is None:
            pytest.skip("mount is not installed: cannot make a read-only bind mount")
        done = subprocess.run([mount, "--bind", str(path), str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"bind mount not permitted here: {done.stderr.decode().strip()}")
        request.addfinalizer(lambda: subprocess.run(["umount", str(path)], check=True))
        done = subprocess.run(
            [mount, "-o", "remount,bind,ro", str(path), str(path)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"read-only remount not permitted here: {done.stderr.decode().strip()}")
        with pytest.raises(OSError, match="Read-only file system"):
            (path / ".probe").write_bytes(b"")

    return make


# --- keystore-setup ------------------------------------------------------------------


def test_setup_creates_key_keystore_and_csr_for_this_host(tmp_path):
    """keystore-setup writes a 0600 keystore with an RSA 2048 key and placeholder, the passphrase
    (0600) and a CSR (also on stdout) whose CN is the FQDN and SANs the FQDN plus every
    non-loopback, non-link-local address."""
    agent = Agent.create(tmp_path)
    result = ok(agent.setup(days="30"))
    csr_pem = agent.csr.read_bytes()
    assert result.stdout == csr_pem
    assert csr_pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----\n")
    assert result.stderr == b""
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    fqdn, addresses = keysetup.host_identity()
    assert fqdn == hostname.fqdn()
    hostname_f = subprocess.run(["hostname", "-f"], capture_output=True, check=False)
    if shutil.which("hostname") and hostname_f.returncode == 0:
        assert fqdn == hostname_f.stdout.decode().strip()
    assert [a.value for a in csr.subject] == [fqdn]
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [fqdn]
    ips = sans.get_values_for_type(x509.IPAddress)
    assert ips == addresses
    every = {
        ipaddress.ip_address(entry.address.split("%")[0])
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family in (socket.AF_INET, socket.AF_INET6)
    }
    assert set(ips) == {a for a in every if not (a.is_loopback or a.is_link_local)}
    assert not any(a.is_loopback or a.is_link_local for a in ips)
    assert agent.properties.read_text() == f"keystore.passphrase={PASSPHRASE}\n"
    assert mode_of(agent.properties) == 0o600
    assert mode_of(agent.keystore) == 0o600
    assert mode_of(agent.csr) == 0o644
    key, placeholder, cas = agent.load(PASSPHRASE)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert testca.public_der(csr) == testca.public_der(key)
    assert placeholder.subject == placeholder.issuer == csr.subject
    days = pki.not_after(placeholder) - testca.now()
    assert 29.9 < days.total_seconds() / 86400 <= 30
    assert cas == []
    listing = keytool(agent, "-v")
    assert "Alias name: cloud\n" in listing and "Entry type: PrivateKeyEntry\n" in listing
    assert "Certificate chain length: 1\n" in listing


def test_setup_ec_key_type_makes_a_p256_key(tmp_path):
    """`--key-type ec` makes an EC P-256 key in the keystore and in the CSR."""
    agent = Agent.create(tmp_path)
    ok(agent.setup("--key-type", "ec"))
    key, _, _ = agent.load()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(agent.csr.read_bytes())
    assert testca.public_der(csr) == testca.public_der(key)
    assert "Entry type: PrivateKeyEntry\n" in keytool(agent, "-v")


def test_setup_keeps_every_properties_line_and_tightens_the_mode(tmp_path):
    """A world-readable properties file keeps its comments and lines in order, gains the
    passphrase, and becomes 0600."""
    agent = Agent.create(tmp_path)
    original = "# CloudStack agent\n#Tue Nov 24 2026\nguid=abc-def\n\nhost=10.0.0.1\nport = 8250\n"
    agent.properties.write_text(original)
    os.chmod(agent.properties, 0o644)
    ok(agent.setup())
    assert agent.properties.read_text() == original + f"keystore.passphrase={PASSPHRASE}\n"
    assert mode_of(agent.properties) == 0o600


def test_setup_reuses_the_passphrase_already_in_the_properties(tmp_path):
    """A passphrase already in the properties file is kept, the file is unchanged, and the
    keystore opens with it, not with the argument."""
    agent = Agent.create(tmp_path)
    original = "a=b\nkeystore.passphrase=from-the-file\nc=d\n"
    agent.properties.write_text(original)
    ok(agent.setup(passphrase="from-the-argument"))
    assert agent.properties.read_text() == original
    assert "Entry type: PrivateKeyEntry\n" in keytool(agent, "-v", passphrase="from-the-file")
    with pytest.raises(Exception, match="wrong passphrase"):
        agent.load("from-the-argument")


def test_setup_again_makes_a_new_key(tmp_path):
    """Running keystore-setup on an existing keystore replaces its key with a new one."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    first = testca.public_der(agent.load()[0])
    ok(agent.setup(passphrase="ignored"))
    assert testca.public_der(agent.load()[0]) != first
    assert agent.passphrase() == PASSPHRASE


@pytest.mark.parametrize("days", ["0", "36501", "99999999", "9" * 5000, "-1", "1e3", "x"])
def test_setup_in_process_refuses_validity_days_out_of_range(tmp_path, monkeypatch, capsys, days):
    """setup_main with validity days outside 1 to 36500 (or not a number) is a usage error: exit
    2, one line naming the argument and the range, nothing written."""
    agent = Agent.create(tmp_path)
    monkeypatch.setenv("KVMHOOK_ROOT", str(agent.root))
    args = [str(agent.properties), str(agent.keystore), PASSPHRASE, days, str(agent.csr)]
    assert cli.setup_main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("keystore-setup: Invalid value for ")
    assert "VALIDITY_DAYS" in captured.err and "from 1 to 36500" in captured.err
    assert os.listdir(agent.dir) == []


def test_setup_accepts_the_longest_validity(tmp_path):
    """36500 days, the top of the range, makes a placeholder valid that long."""
    agent = Agent.create(tmp_path)
    ok(agent.setup(days="36500"))
    placeholder = agent.load()[1]
    assert (pki.not_after(placeholder) - testca.now()).days == 36499


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ssh", "agent"])
@pytest.mark.parametrize("with_key", [False, True], ids=["keystore-key", "given-key"])
def test_round_trip_with_two_level_ca(tmp_path, ca, mode, with_key):
    """setup → CA signs the CSR (or a given key's cert) → import: keytool shows `cloud` with the
    chain leaf, intermediate, root; openssl verifies the cert and matches it to cloud.key."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    setup_key = agent.load()[0]
    if with_key:
        key, leaf = ca.intermediate.leaf()
        result = ok(agent.import_cert(testca.pem(leaf), ca.bundle, testca.key_pem(key), mode))
    else:
        key, leaf = setup_key, ca.intermediate.sign_csr(agent.csr.read_bytes())
        result = ok(agent.import_cert(testca.pem(leaf), ca.bundle, mode=mode))
    assert result.stdout == b""
    message = result.stderr.decode()
    assert message.count("\n") == 1 and message.startswith("imported CN=")
    assert "chain of 3" in message and f"[{mode}]" in message
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])
    assert testca.public_der(agent.load()[0]) == testca.public_der(key)
    replaced = testca.public_der(agent.load()[0]) != testca.public_der(setup_key)
    assert replaced is with_key
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(testca.pem(ca.root.cert))
    strict = openssl(
        "verify", "-CAfile", str(root_file), "-untrusted", str(agent.ca), str(agent.cert)
    )
    assert strict.returncode == 0, strict.stdout + strict.stderr
    assert os.listdir(agent.root) == ["run"]  # the lock; no libvirtd.conf: no TLS files


def test_round_trip_ec_key_and_ec_chain(tmp_path, ca):
    """An EC P-256 key from `--key-type ec`, signed by an EC intermediate, imports and verifies."""
    agent = Agent.create(tmp_path)
    ok(agent.setup("--key-type", "ec"))
    leaf = ca.ec_intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(leaf), ca.ec_intermediate.bundle(), mode="agent"))
    check_installed(agent, [leaf, ca.ec_intermediate.cert, ca.ec_root.cert])


def test_round_trip_with_a_root_signed_certificate(tmp_path, ca):
    """A certificate signed by the root itself gives a chain of 2."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.root.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(leaf), ca.root.bundle()))
    check_installed(agent, [leaf, ca.root.cert])


def test_bundle_order_does_not_matter(tmp_path, ca):
    """A bundle given root first still yields the chain leaf, intermediate, root; cloud.ca.crt
    keeps the bundle as given."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    reversed_bundle = testca.pem(ca.root.cert, ca.intermediate.cert)
    ok(agent.import_cert(testca.pem(leaf), reversed_bundle))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert], reversed_bundle)


def test_renewal_replaces_everything(tmp_path, ca):
    """A second setup + import (renewal) puts the new key and certificate in every place."""
    agent = Agent.create(tmp_path, libvirtd=True)
    ok(agent.setup())
    first = ca.intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(first), ca.bundle))
    ok(agent.setup())
    second = ca.intermediate.sign_csr(agent.csr.read_bytes())
    assert testca.public_der(second) != testca.public_der(first)
    ok(agent.import_cert(testca.pem(second), ca.bundle, mode="agent"))
    check_installed(agent, [second, ca.intermediate.cert, ca.root.cert])
    for name in TLS_KEYS:
        assert (agent.root / name).read_bytes() == agent.key.read_bytes()
    for name in TLS_CERTS:
        assert (agent.root / name).read_bytes() == testca.pem(second, ca.intermediate.cert)


def test_empty_contents_use_the_files_as_they_are(tmp_path, ca):
    """With "" as cert and CA content, the files already at those paths are imported."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    agent.cert.write_bytes(testca.pem(leaf))
    agent.ca.write_bytes(ca.bundle)
    ok(agent.import_cert("", "", mode="agent"))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])


def test_empty_content_with_a_missing_file_is_refused(tmp_path, ca):
    """ "" content when the file does not exist is one clear error, nothing written."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    before = snapshot(tmp_path)
    result = agent.import_cert(testca.pem(leaf), "")
    assert_refused(
        result,
        before,
        snapshot(tmp_path),
        "no CA certificate content given and cannot read",
        str(agent.ca),
        prog="keystore-cert-import",
    )


def test_files_named_elsewhere_are_written_there_and_beside_the_keystore(tmp_path, ca):
    """Cert, CA and key files named outside the keystore's directory are written, and cloud.crt,
    cloud.key, cloud.ca.crt beside the keystore too."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = agent.import_args(testca.pem(leaf), ca.bundle)
    args[3], args[5], args[7] = (str(elsewhere / n) for n in ("host.crt", "ca.crt", "host.key"))
    ok(agent.run(IMPORT, *args))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])
    assert (elsewhere / "host.crt").read_bytes() == agent.cert.read_bytes()
    assert (elsewhere / "ca.crt").read_bytes() == agent.ca.read_bytes()
    assert (elsewhere / "host.key").read_bytes() == agent.key.read_bytes()
    assert mode_of(elsewhere / "host.key") == 0o600


def test_content_beginning_with_dashes_is_an_argument_in_process(tmp_path, ca, monkeypatch, capsys):
    """Cert, CA and key content starting with -----BEGIN are taken as arguments, not options."""
    agent = Agent.create(tmp_path)
    monkeypatch.setenv("KVMHOOK_ROOT", str(agent.root))
    ok(agent.setup())
    key, leaf = ca.intermediate.leaf()
    args = agent.import_args(testca.pem(leaf), ca.bundle, testca.key_pem(key))
    assert all(arg.startswith("-----BEGIN~") for arg in (args[4], args[6], args[8]))
    assert cli.import_main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"imported {leaf.subject.rfc4514_string()} (valid until ")
    assert testca.public_der(agent.load()[0]) == testca.public_der(key)
    assert agent.cert.read_bytes() == testca.pem(leaf)


def test_keystore_is_renamed_into_place_last_in_process(tmp_path, ca, monkeypatch, capsys):
    """Both tools rename every other file first and the keystore last."""
    agent = Agent.create(tmp_path, libvirtd=True)
    monkeypatch.setenv("KVMHOOK_ROOT", str(agent.root))
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(source, target):
        renamed.append(os.path.abspath(target))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", recording_replace)
    args = [str(agent.properties), str(agent.keystore), PASSPHRASE, "365", str(agent.csr)]
    assert cli.setup_main(args) == 0
    assert renamed == [str(agent.csr), str(agent.properties), str(agent.keystore)]
    renamed.clear()
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    assert cli.import_main(agent.import_args(testca.pem(leaf), ca.bundle)) == 0
    assert len(renamed) == 3 + len(TLS_CA + TLS_CERTS + TLS_KEYS) + 1
    assert renamed[-1] == str(agent.keystore)
    assert set(renamed[:-1]) == {str(path) for path in (agent.cert, agent.ca, agent.key)} | {
        str(agent.root / name) for name in TLS_CA + TLS_CERTS + TLS_KEYS
    }
    capsys.readouterr()
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])


@pytest.mark.parametrize(
    "spaces",
    [
        "base64-lines",
        "every-line",
    ],
)
def test_content_with_trailing_spaces_imports(tmp_path, ca, spaces):
    """PEM content whose lines end in spaces (encoded as ~) passes through and imports."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())

    def spaced(pem: bytes) -> bytes:
        return b"".join(
            line + b"  \n"
            if spaces == "every-line" or not line.startswith(b"-----")
            else line + b"\n"
            for line in pem.splitlines()
        )

    cert_arg = content.encode(spaced(testca.pem(leaf)))
    assert "~~^" in cert_arg
    ok(agent.import_cert(cert_arg, content.encode(spaced(ca.bundle))))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])


# --- libvirt and QEMU TLS files ------------------------------------------------------


def test_tls_files_installed_when_libvirtd_conf_exists(tmp_path, ca):
    """With <root>/etc/libvirt/libvirtd.conf the CA, certs (cert + intermediate) and keys go to
    libvirt's, QEMU's and the consoles' (libvirt-vnc) places; keys 0640 to QEMU's group (or
    0600 without one)."""
    agent = Agent.create(tmp_path, libvirtd=True)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(leaf), ca.bundle))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])
    expected = {os.path.relpath(path, agent.root) for path in _tls_paths(agent.root)}
    assert expected == set(TLS_CA + TLS_CERTS + TLS_KEYS)
    for name in TLS_CA:
        assert (agent.root / name).read_bytes() == ca.bundle, name
        assert mode_of(agent.root / name) == 0o644, name
    for name in TLS_CERTS:
        assert (agent.root / name).read_bytes() == testca.pem(leaf, ca.intermediate.cert), name
        assert mode_of(agent.root / name) == 0o644, name
    group = qemu_group()
    for name in TLS_KEYS:
        path = agent.root / name
        assert path.read_bytes() == agent.key.read_bytes(), name
        if group is None:
            assert mode_of(path) == 0o600, name
        else:
            assert (mode_of(path), path.stat().st_gid) == (0o640, group), name
    for directory in ("etc/pki/CA", "etc/pki/libvirt", "etc/pki/qemu", "etc/pki/libvirt-vnc"):
        assert mode_of(agent.root / directory) == 0o755, directory
    assert mode_of(agent.root / "etc/pki/libvirt/private") == 0o750
    served = agent.root / "etc/pki/libvirt/servercert.pem"
    verified = openssl("verify", "-CAfile", str(agent.root / TLS_CA[0]), str(served))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    files = sorted(
        os.path.relpath(os.path.join(d, f), agent.root)
        for d, _, names in os.walk(agent.root)
        for f in names
        if not d.endswith("run/kvmhook")
    )
    assert files == sorted(["etc/libvirt/libvirtd.conf", *TLS_CA, *TLS_CERTS, *TLS_KEYS])


def _tls_paths(root: Path) -> list[str]:
    old = os.environ.get("KVMHOOK_ROOT")
    os.environ["KVMHOOK_ROOT"] = str(root)
    try:
        return [*paths.tls_files().values(), *paths.vnc_tls_files().values()]
    finally:
        if old is None:
            del os.environ["KVMHOOK_ROOT"]
        else:
            os.environ["KVMHOOK_ROOT"] = old


def test_no_tls_files_without_libvirtd_conf(tmp_path, ca):
    """Without <root>/etc/libvirt/libvirtd.conf nothing is written under the root but the
    tools' lock."""
    agent = Agent.create(tmp_path)
    (agent.root / "etc/libvirt").mkdir(parents=True)
    (agent.root / "etc/libvirt/qemu.conf").write_text("")
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(leaf), ca.bundle))
    check_installed(agent, [leaf, ca.intermediate.cert, ca.root.cert])
    assert sorted(str(p.relative_to(agent.root)) for p in agent.root.rglob("*")) == [
        "etc",
        "etc/libvirt",
        "etc/libvirt/qemu.conf",
        "run",
        "run/kvmhook",
        "run/kvmhook/cert-renew.lock",
    ]


# --- bad input: exit non-zero, one line, nothing changed ----------------------------


@pytest.mark.parametrize(
    ("count", "words"),
    [(4, "Missing argument 'CSR_FILE'"), (6, "unexpected extra argument (extra)"), (0, "Missing")],
)
def test_setup_wrong_argument_count(installed, count, words):
    """keystore-setup with too few or too many arguments: usage error, nothing changed."""
    args = [str(installed.properties), str(installed.keystore), "pw", "365", str(installed.csr)]
    args = [*args, "extra"][:count]
    before = installed.snapshot()
    result = installed.run(SETUP, *args)
    assert result.returncode == 2
    assert_refused(result, before, installed.snapshot(), words, prog="keystore-setup")


@pytest.mark.parametrize(
    ("count", "words"),
    [
        (7, "Missing argument 'KEY_FILE'"),
        (10, "unexpected extra argument (extra)"),
        (3, "Missing argument 'CERT_FILE'"),
    ],
)
def test_import_wrong_argument_count(installed, ca, count, words):
    """keystore-cert-import with too few or too many arguments: usage error, nothing changed."""
    key, leaf = ca.intermediate.leaf()
    args = [*installed.import_args(testca.pem(leaf), ca.bundle, testca.key_pem(key)), "extra"]
    before = installed.snapshot()
    result = installed.run(IMPORT, *args[:count])
    assert result.returncode == 2
    assert_refused(result, before, installed.snapshot(), words, prog="keystore-cert-import")


def test_import_unknown_mode(installed, ca):
    """A mode other than ssh or agent is a usage error, nothing changed."""
    before = installed.snapshot()
    result = installed.run(
        IMPORT, *installed.import_args(testca.pem(installed.leaf), ca.bundle, mode="scp")
    )
    assert_refused(
        result, before, installed.snapshot(), "scp", "ssh", "agent", prog="keystore-cert-import"
    )


@pytest.mark.parametrize("which", ["cert", "ca", "key"])
@pytest.mark.parametrize("text", ["é", b"\xff"], ids=["non-ascii", "not-utf8"])
def test_import_non_ascii_content(installed, ca, which, text):
    """Content with non-ASCII characters is refused as not ^/~-encoded, nothing changed."""
    key, leaf = ca.intermediate.leaf()
    good = {"cert": testca.pem(leaf), "ca": ca.bundle, "key": testca.key_pem(key)}
    args: list = installed.import_args(good["cert"], good["ca"], good["key"])
    index = {"cert": 4, "ca": 6, "key": 8}[which]
    args[index] = args[index].encode() + (text.encode() if isinstance(text, str) else text)
    what = {"cert": "certificate", "ca": "CA certificate", "key": "private key"}[which]
    before = installed.snapshot()
    result = installed.run(IMPORT, *args)
    assert_refused(
        result,
        before,
        installed.snapshot(),
        f"{what} content is not ^/~-encoded PEM (non-ASCII characters)",
        prog="keystore-cert-import",
    )


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("cert", "certificate holds no PEM certificate"),
        ("ca", "CA certificate holds no PEM certificate"),
        ("key", "private key is not an unencrypted PEM private key"),
    ],
)
def test_import_content_that_is_not_pem(installed, ca, which, words):
    """Content that decodes but is not PEM is refused naming which argument, nothing changed."""
    key, leaf = ca.intermediate.leaf()
    args = installed.import_args(testca.pem(leaf), ca.bundle, testca.key_pem(key))
    args[{"cert": 4, "ca": 6, "key": 8}[which]] = "this~is~not~PEM^"
    before = installed.snapshot()
    result = installed.run(IMPORT, *args)
    assert_refused(result, before, installed.snapshot(), words, prog="keystore-cert-import")


def test_import_cert_not_matching_the_keystore_key(installed, ca):
    """A CA-signed certificate for another key is refused against the keystore's key."""
    _, other = ca.intermediate.leaf()
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(other), ca.bundle)
    assert_refused(
        result,
        before,
        installed.snapshot(),
        "does not match the key in",
        str(installed.keystore),
        prog="keystore-cert-import",
    )


def test_import_cert_not_matching_the_given_key(installed, ca):
    """A certificate that does not certify the given private key is refused."""
    key, _ = ca.intermediate.leaf()
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(installed.leaf), ca.bundle, testca.key_pem(key))
    assert_refused(
        result,
        before,
        installed.snapshot(),
        "does not match the given private key",
        prog="keystore-cert-import",
    )


@pytest.mark.parametrize("case", ["cert-from-other-ca", "bundle-of-other-ca", "no-root"])
def test_import_cert_from_another_ca(installed, ca, case):
    """A certificate that does not chain to the given CA certificates up to a root is refused."""
    if case == "cert-from-other-ca":
        cert, bundle = ca.other.issue(installed.leaf.public_key()), ca.bundle
    elif case == "bundle-of-other-ca":
        cert, bundle = installed.leaf, ca.other.bundle()
    else:
        cert, bundle = installed.leaf, testca.pem(ca.intermediate.cert)
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(cert), bundle)
    assert_refused(
        result,
        before,
        installed.snapshot(),
        "is not signed by any of the given CA certificates",
        prog="keystore-cert-import",
    )


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_import_cert_outside_its_validity(installed, ca, when):
    """An expired (or not yet valid) certificate for the right key and CA is refused."""
    now = testca.now()
    if when == "expired":
        dates = {"not_before": now - 30 * testca.DAY, "not_after": now - testca.DAY}
        words = "expired on"
    else:
        dates = {"not_before": now + testca.DAY, "not_after": now + 30 * testca.DAY}
        words = "is not valid before"
    cert = ca.intermediate.issue(installed.leaf.public_key(), **dates)
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(cert), ca.bundle)
    assert_refused(result, before, installed.snapshot(), words, prog="keystore-cert-import")


@pytest.mark.parametrize(
    ("broken", "words"),
    [
        ("directory", "cannot read keystore"),
        ("garbage", "cannot open keystore"),
        ("empty", "cannot open keystore"),
        ("missing", "cannot read keystore"),
    ],
)
def test_import_unreadable_keystore(installed, ca, broken, words):
    """A keystore that is a directory, garbage, empty or missing is refused, nothing changed."""
    installed.keystore.unlink()
    if broken == "directory":
        installed.keystore.mkdir()
    elif broken == "garbage":
        installed.keystore.write_bytes(os.urandom(2000))
    elif broken == "empty":
        installed.keystore.write_bytes(b"")
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(installed.leaf), ca.bundle)
    assert_refused(
        result,
        before,
        installed.snapshot(),
        words,
        str(installed.keystore),
        prog="keystore-cert-import",
    )


def test_import_keystore_directory_with_a_given_key(installed, ca):
    """With a private key given, a keystore path that is a directory is still refused with nothing
    changed."""
    key, leaf = ca.intermediate.leaf()
    installed.keystore.unlink()
    installed.keystore.mkdir()
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(leaf), ca.bundle, testca.key_pem(key))
    after = installed.snapshot()
    assert result.returncode != 0
    assert (
        sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
        == []
    )
    assert_refused(result, before, after, str(installed.keystore), prog="keystore-cert-import")


def test_import_wrong_passphrase(installed, ca):
    """A properties passphrase that does not open the keystore is refused, nothing changed."""
    installed.properties.write_text("keystore.passphrase=not-the-one\n")
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(installed.leaf), ca.bundle)
    assert_refused(
        result, before, installed.snapshot(), "wrong passphrase", prog="keystore-cert-import"
    )


@pytest.mark.parametrize("properties_text", [None, "a=b\n"], ids=["missing", "no-passphrase"])
def test_import_without_a_passphrase(installed, ca, properties_text):
    """A missing properties file, or one without keystore.passphrase, is refused."""
    installed.properties.unlink()
    if properties_text is not None:
        installed.properties.write_text(properties_text)
    before = installed.snapshot()
    result = installed.import_cert(testca.pem(installed.leaf), ca.bundle)
    assert_refused(
        result, before, installed.snapshot(), "properties file", prog="keystore-cert-import"
    )


@pytest.mark.parametrize("target", ["agent-dir", "qemu-tls-dir"])
def test_import_read_only_target_dir(installed, ca, read_only, target):
    """A read-only directory to write in (the agent's, or QEMU's TLS dir after others were
    staged) is refused with one line and nothing changed anywhere."""
    key, leaf = ca.intermediate.leaf()
    directory = installed.dir if target == "agent-dir" else installed.root / "etc/pki/qemu"
    before = installed.snapshot()
    read_only(directory)
    result = installed.import_cert(testca.pem(leaf), ca.bundle, testca.key_pem(key))
    assert_refused(
        result,
        before,
        installed.snapshot(),
        "Read-only file system",
        str(directory),
        prog="keystore-cert-import",
    )


def test_import_failing_after_making_tls_dirs_removes_them(tmp_path, ca):
    """When a TLS file cannot be placed (etc/pki/qemu is a file), the directories the import
    made for the others are removed again and nothing else changes."""
    agent = Agent.create(tmp_path, libvirtd=True)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    (agent.root / "etc/pki").mkdir()
    (agent.root / "etc/pki/qemu").write_text("not a directory\n")
    before = snapshot(tmp_path)
    result = agent.import_cert(testca.pem(leaf), ca.bundle)
    assert_refused(
        result,
        before,
        snapshot(tmp_path),
        str(agent.root / "etc/pki/qemu"),
        prog="keystore-cert-import",
    )


def test_setup_read_only_target_dir(installed, read_only):
    """keystore-setup in a read-only directory is refused with one line and nothing changed."""
    before = installed.snapshot()
    read_only(installed.dir)
    result = installed.setup()
    assert_refused(
        result,
        before,
        installed.snapshot(),
        "Read-only file system",
        str(installed.dir),
        prog="keystore-setup",
    )
