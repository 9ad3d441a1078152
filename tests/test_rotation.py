"""`kvmhook cert renew` and `kvmhook cert rollback` on a sandbox host: the real command, real files.

The host's set is made by the real keystore tools with libvirtd.conf present,
so libvirt's and QEMU's TLS files are part of it; no daemon runs in the
sandbox (its admin socket is absent), so nothing is reloaded here: the
reload and the served serial are proved on a real libvirtd in
tests/e2e/test_rotation_e2e.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import signer
import testca
from cryptography import x509
from fakecontroller import EXPIRY_ALERT_PERIOD, FakeController
from test_controller import https_files, write_conf

from keystore import content
from kvmhook.certs import pki

RENEWAL_RECORD = "cert-renewal.json"
BIN = Path(sys.executable).parent
PASSPHRASE = "rotation-secret"
TLS = (
    "etc/pki/CA/cacert.pem",
    "etc/pki/libvirt/servercert.pem",
    "etc/pki/libvirt/private/serverkey.pem",
    "etc/pki/libvirt/clientcert.pem",
    "etc/pki/libvirt/private/clientkey.pem",
    "etc/pki/qemu/ca-cert.pem",
    "etc/pki/qemu/server-cert.pem",
    "etc/pki/qemu/server-key.pem",
    "etc/pki/qemu/client-cert.pem",
    "etc/pki/qemu/client-key.pem",
    "etc/pki/libvirt-vnc/ca-cert.pem",
    "etc/pki/libvirt-vnc/server-cert.pem",
    "etc/pki/libvirt-vnc/server-key.pem",
)
AGENT = ("cloud.crt", "cloud.key", "cloud.ca.crt", "cloud.jks")


class Host:
    """The sandbox: its root, agent dir, the CA that signed its set, and a signer for that CA."""

    def __init__(self, root: Path, agent: Path, ca: testca.Authority, ca_dir: Path) -> None:
        self.root = root
        self.agent = agent
        self.ca = ca
        self.ca_dir = ca_dir

    def set_files(self) -> list[Path]:
        """Every file a renewal replaces."""
        return [self.agent / name for name in AGENT] + [self.root / path for path in TLS]

    def cert(self, name: str = "cloud.crt") -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.agent / name).read_bytes())

    def signer(self, days: int = 30, mode: str = "good") -> str:
        return signer.command(self.ca_dir, days, mode)


@pytest.fixture
def host(tmp_path, monkeypatch) -> Host:
    """A set valid for 10 days from a root + intermediate test CA, installed by the tools."""
    root = tmp_path / "root"
    agent = root / "etc/cloudstack/agent"
    agent.mkdir(parents=True)
    (root / "etc/libvirt").mkdir(parents=True)
    (root / "etc/libvirt/libvirtd.conf").write_text("listen_tls = 1\n")
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    pki = testca.shared()
    props, keystore = agent / "agent.properties", agent / "cloud.jks"
    csr = subprocess.run(
        [BIN / "keystore-setup", props, keystore, PASSPHRASE, "30", agent / "cloud.csr"],
        capture_output=True,
        check=True,
    ).stdout
    leaf = pki.intermediate.sign_csr(csr, not_after=testca.now() + 10 * testca.DAY)
    subprocess.run(
        [
            BIN / "keystore-cert-import",
            props,
            keystore,
            "agent",
            agent / "cloud.crt",
            content.encode(testca.pem(leaf)),
            agent / "cloud.ca.crt",
            content.encode(pki.bundle),
            agent / "cloud.key",
        ],
        capture_output=True,
        check=True,
    )
    ca_dir = signer.write_ca(tmp_path / "ca", pki.intermediate.key, pki.intermediate.path())
    return Host(root, agent, pki.intermediate, ca_dir)


def kvmhook(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kvmhook"), *args],
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        timeout=120,
        check=False,
    )


def state(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the root but the renewal lock under run/ and the renewal record:
    bytes and mode."""
    return {
        str(path): (path.read_bytes(), path.stat().st_mode)
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.relative_to(root).parts[0] != "run"
        and path.name != RENEWAL_RECORD  # the metrics' record of each renewal's outcome
    }


def test_not_due_changes_nothing_and_exits_0(host):
    """A certificate expiring later than --if-expiring-within: one line saying so, exit 0."""
    before = state(host.root)
    result = kvmhook("cert", "renew", "--if-expiring-within", "7", "--signer", host.signer())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("not due: CN="), result.stdout
    assert "(9 days left)" in result.stdout and "renewal starts 7 days before" in result.stdout
    assert state(host.root) == before


def test_due_renews_every_file_and_keeps_the_previous_set(host):
    """Due: a new key and certificate in every file of the set (the CA files hold the same CA),
    each file's previous content kept as FILE.prev with its mode."""
    before = {path: path.read_bytes() for path in host.set_files()}
    modes = {path: path.stat().st_mode for path in host.set_files()}
    old = host.cert()
    result = kvmhook("cert", "renew", "--if-expiring-within", "15", "--signer", host.signer(90))
    assert result.returncode == 0, result.stderr
    new = host.cert()
    assert new.serial_number != old.serial_number
    assert f"serial {old.serial_number:X} -> serial {new.serial_number:X}" in result.stdout
    assert "libvirtd is not running: it loads the new files when it starts" in result.stdout
    for path, data in before.items():
        assert Path(f"{path}.prev").read_bytes() == data, path
        assert Path(f"{path}.prev").stat().st_mode == modes[path], path
        same_ca = path.name in ("cloud.ca.crt", "cacert.pem", "ca-cert.pem")
        assert (path.read_bytes() == data) == same_ca, path
        assert path.stat().st_mode == modes[path], path
    served = x509.load_pem_x509_certificate((host.root / TLS[1]).read_bytes())
    assert served == new
    assert kvmhook("cert", "status").returncode == 0


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("garbage", "holds no PEM certificate"),
        ("other-key", "does not match the given private key"),
        ("other-ca", "chains to the root 'CN=kvmhook test impostor root CA', which this host"),
    ],
)
def test_a_bad_signer_changes_nothing(host, mode, said):
    """Garbage, a certificate for another key, one from another CA: exit 1, one line, no change."""
    before = state(host.root)
    result = kvmhook("cert", "renew", "--signer", host.signer(mode=mode))
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert said in result.stderr, result.stderr
    assert state(host.root) == before


def test_dry_run_neither_signs_nor_changes(host, tmp_path):
    """--dry-run names the signer and every file it would replace; the signer never runs."""
    marker = tmp_path / "signer-ran"
    before = state(host.root)
    result = kvmhook("cert", "renew", "--dry-run", "--signer", f"touch {marker}")
    assert result.returncode == 0, result.stderr
    assert f"signed by the signer `touch {marker}`" in result.stdout
    for path in host.set_files():
        assert str(path) in result.stdout
    assert "nothing to reload: libvirtd is not running" in result.stdout
    assert not marker.exists()
    assert state(host.root) == before


def test_rollback_swaps_with_the_previous_set(host):
    """rollback restores every .prev byte for byte; rolling back again returns to the new set."""
    old = {path: path.read_bytes() for path in host.set_files()}
    assert kvmhook("cert", "renew", "--signer", host.signer()).returncode == 0
    new = {path: path.read_bytes() for path in host.set_files()}
    result = kvmhook("cert", "rollback")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rolled back to CN="), result.stdout
    for path in host.set_files():
        assert path.read_bytes() == old[path], path
        assert Path(f"{path}.prev").read_bytes() == new[path], path
    assert kvmhook("cert", "status", "--warn-days", "5").returncode == 0
    assert kvmhook("cert", "rollback").returncode == 0
    assert {path: path.read_bytes() for path in host.set_files()} == new


def test_a_host_imported_before_consoles_gets_them_and_can_roll_back(host):
    """A set installed before the console files existed: the renewal installs them, and a
    rollback gives them the previous identity (QEMU's previous server files)."""
    vnc = host.root / "etc/pki/libvirt-vnc"
    shutil.rmtree(vnc)
    old = {
        name: (host.root / "etc/pki/qemu" / name).read_bytes()
        for name in os.listdir(vnc.parent / "qemu")
    }
    assert kvmhook("cert", "renew", "--signer", host.signer()).returncode == 0
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        assert (vnc / name).read_bytes() == (host.root / "etc/pki/qemu" / name).read_bytes()
        assert not (vnc / f"{name}.prev").exists()
    result = kvmhook("cert", "rollback")
    assert result.returncode == 0, result.stderr
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        assert (vnc / name).read_bytes() == old[name], name
    assert kvmhook("cert", "status", "--warn-days", "5").returncode == 0


def test_rollback_without_a_previous_set_changes_nothing(host):
    """No .prev files: exit 1, the missing file named, nothing changed."""
    before = state(host.root)
    result = kvmhook("cert", "rollback")
    assert result.returncode == 1
    assert "no previous set to roll back to:" in result.stderr
    assert f"{host.agent / 'cloud.crt.prev'} does not exist" in result.stderr
    assert state(host.root) == before


def test_rollback_refuses_a_previous_key_that_does_not_match(host):
    """A .prev key that is not the .prev certificate's: refused, nothing changed."""
    assert kvmhook("cert", "renew", "--signer", host.signer()).returncode == 0
    key, _ = host.ca.leaf()
    (host.agent / "cloud.key.prev").write_bytes(testca.key_pem(key))
    before = state(host.root)
    result = kvmhook("cert", "rollback")
    assert result.returncode == 1
    assert "the previous set cannot be restored:" in result.stderr
    assert "cloud.key.prev does not match" in result.stderr
    assert state(host.root) == before


def test_a_second_renewal_waits_for_the_first_then_finds_nothing_due(host, tmp_path):
    """Two at once: the second waits on the lock, naming the first's pid, then is not due."""
    slow = f"sleep 2; {host.signer(90)}"
    first = subprocess.Popen(
        [BIN / "kvmhook", "cert", "renew", "--if-expiring-within", "15", "--signer", slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = host.root / "run/kvmhook/cert-renew.lock"
    deadline = time.monotonic() + 10
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert time.monotonic() < deadline, "the first renewal never took the lock"
        time.sleep(0.05)
    marker = tmp_path / "second-signed"
    second = kvmhook("cert", "renew", "--if-expiring-within", "15", "--signer", f"touch {marker}")
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    waited = (
        f"waiting for the certificate renewal, rollback or keystore tool running as pid {first.pid}"
    )
    assert waited in second.stderr
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("not due:"), second.stdout
    assert not marker.exists()
    assert out.startswith("renewed:")


def test_cannot_reload_online_refuses_before_changing_anything(host):
    """A running daemon (its admin socket) but no virt-admin: refused up front, nothing changed."""
    sock = host.root / "run/libvirt/libvirt-admin-sock"
    sock.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        before = state(host.root)
        result = kvmhook(
            "cert", "renew", "--signer", host.signer(), env={**os.environ, "PATH": "/nonexistent"}
        )
    assert result.returncode == 1
    assert "virt-admin is not installed" in result.stderr
    assert "run again with --allow-restart to restart libvirtd instead" in result.stderr
    assert {k: v for k, v in state(host.root).items() if "admin-sock" not in k} == before


def test_signer_and_controller_exclude_each_other(host):
    """--signer with --controller is a usage error (exit 2) naming both."""
    result = kvmhook("cert", "renew", "--signer", "true", "--controller")
    assert result.returncode == 2
    assert "--signer and --controller exclude each other" in result.stderr


def test_days_must_be_a_number_or_auto(host):
    """--if-expiring-within soon: a usage error naming the value."""
    result = kvmhook("cert", "renew", "--if-expiring-within", "soon", "--signer", "true")
    assert result.returncode == 2
    assert "'soon' is neither a whole number of days nor auto" in result.stderr


@pytest.fixture
def controller(host):
    """The loopback stand-in knowing this host, its CA the host's; controller.conf written."""
    with FakeController() as fake:
        fake.add_host("kvm1.example.org")
        fake.ca = host.ca
        (host.root / "etc/kvmhook").mkdir()
        write_conf(host.root, [fake.url])
        yield fake


def test_controller_signs_the_csr_with_issue_certificate(host, controller):
    """--controller: the new key's CSR goes up in issueCertificate, its answer is installed."""
    old = host.cert()
    result = kvmhook("cert", "renew", "--controller", "--if-expiring-within", "auto")
    assert result.returncode == 0, result.stderr
    assert "issueCertificate" in controller.commands
    (csr_pem,) = controller.csrs
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    new = host.cert()
    assert new.public_key().public_numbers() == csr.public_key().public_numbers()
    assert new.serial_number != old.serial_number
    assert (pki.not_after(new) - pki.utcnow()).days >= 364  # the stand-in's 365 days


def test_controller_is_the_default_signer_when_configured(host, controller):
    """No --signer, no --controller, controller.conf present: the controller signs."""
    result = kvmhook("cert", "renew")
    assert result.returncode == 0, result.stderr
    assert controller.commands.count("issueCertificate") == 1


def test_auto_days_come_from_the_controllers_cluster_setting(host, controller):
    """auto: the cluster's ca.framework.cert.expiry.alert.period decides (9 days left)."""
    cluster = controller.cluster["id"]
    controller.cluster_configurations[(cluster, EXPIRY_ALERT_PERIOD)] = "5"
    result = kvmhook("cert", "renew", "--if-expiring-within", "auto")
    assert result.returncode == 0, result.stderr
    assert "renewal starts 5 days before" in result.stdout
    assert "issueCertificate" not in controller.commands
    controller.cluster_configurations[(cluster, EXPIRY_ALERT_PERIOD)] = "12"
    result = kvmhook("cert", "renew", "--if-expiring-within", "auto")
    assert result.stdout.startswith("renewed:"), result.stdout + result.stderr


def test_auto_days_default_to_15_without_a_controller(host):
    """auto, standalone: 15 days, so a certificate with 9 days left is renewed."""
    result = kvmhook("cert", "renew", "--if-expiring-within", "auto", "--signer", host.signer())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("renewed:")


def test_a_controller_refusal_changes_nothing(host, controller):
    """The controller's job fails (no CA provider): exit 1, its reason, nothing changed."""
    controller.ca = None
    before = state(host.root)
    result = kvmhook("cert", "renew", "--controller")
    assert result.returncode == 1
    assert "Failed to issue client certificate with given provider" in result.stderr
    assert state(host.root) == before


def test_no_signer_and_no_controller_is_a_clear_error(host):
    """Due, no --signer, no controller.conf: exit 1 saying how to give one."""
    result = kvmhook("cert", "renew")
    assert result.returncode == 1
    assert "nobody to sign the new certificate: give --signer CMD" in result.stderr


def test_agent_dir_holds_the_ca_that_verifies_the_controller(host, tmp_path):
    """--agent-dir moves the CA file controller.conf's default `verify` names, as it moves
    every other agent file: an HTTPS controller is verified with that directory's cloud.ca.crt."""
    moved = tmp_path / "agent"
    shutil.move(str(host.agent), str(moved))
    with FakeController(tls=https_files(tmp_path)) as fake:
        fake.add_host("kvm1.example.org")
        fake.ca = host.ca
        (host.root / "etc/kvmhook").mkdir()
        write_conf(host.root, [fake.url])
        old = x509.load_pem_x509_certificate((moved / "cloud.crt").read_bytes())
        result = kvmhook("cert", "renew", "--agent-dir", str(moved), "--controller")
    assert result.returncode == 0, result.stderr
    assert "issueCertificate" in fake.commands
    new = x509.load_pem_x509_certificate((moved / "cloud.crt").read_bytes())
    assert new.serial_number != old.serial_number


# -- the consoles after a renewal or rollback ---------------------------------------------


def test_the_consoles_line_and_exit_5_when_some_could_not_reload(capsys):
    """Each console that kept its certificate is named with why, on stderr; exit status 5.
    (The reload itself runs against a real libvirtd and QEMU in tests/e2e.)"""
    import importlib

    from kvmhook.certs import rotation

    cert = importlib.import_module("kvmhook.cli.cert")  # the package names the group `cert`
    done = rotation.Consoles(True, {"vm1": None, "vm2": "its QEMU has no display-reload"})
    with pytest.raises(SystemExit) as stopped:
        cert._with_consoles("renewed: ...", done)
    assert stopped.value.code == 5
    out, err = capsys.readouterr()
    assert out == (
        "renewed: ...\nconsoles: 1 running guest with a TLS console re-read the files"
        " (display-reload)\n"
    )
    assert err == (
        "console not reloaded, it serves the certificate it had until its guest restarts:"
        " vm2: its QEMU has no display-reload\n"
    )
    unlisted = rotation.Consoles(True, error="cannot connect to qemu:///system")
    with pytest.raises(SystemExit):
        cert._with_consoles("renewed: ...", unlisted)
    assert "the running guests could not be listed: cannot connect" in capsys.readouterr().err
    assert cert._with_consoles("x", rotation.Consoles(False)) == "x"
    assert cert._with_consoles("x", rotation.Consoles(True, {})).endswith(
        "0 running guests with a TLS console re-read the files (display-reload)"
    )


@pytest.mark.parametrize(
    ("reply", "tls"),
    [
        ([{"id": "default", "auth": "vencrypt", "vencrypt": "x509-none", "server": []}], True),
        ([{"id": "default", "auth": "none", "server": [{"auth": "vencrypt"}]}], True),
        ([{"id": "default", "auth": "none", "server": [{"auth": "none"}]}], False),
        ([], False),
        ({"unexpected": True}, False),
        (["junk"], False),
    ],
)
def test_a_console_uses_tls_when_qemu_says_vencrypt(reply, tls):
    from kvmhook.host import virt

    assert virt._uses_tls(reply) is tls
