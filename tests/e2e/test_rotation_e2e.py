"""Certificate rotation on a real libvirtd serving TLS, and across two hosts (issue 8).

One host: the session's libvirtd, restarted with --listen, serves a
two-day certificate from a test CA (root and intermediate) that the real
keystore tools installed, as tests/e2e/test_tls.py sets it up (its helpers
are reused; /etc/libvirt/libvirtd.conf, /etc/pki and /etc/hosts are put back
afterwards). A TCG guest runs throughout. Each test starts from that
original set, served. What is served is read with the real `openssl
s_client`, not with kvmhook's own handshake.

Two hosts: twohost.py's pair; host b's certificate is renewed while a guest
runs on a, then the guest migrates a -> b with TLS on both channels.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from harness import GUEST_PREFIX, run
from signer import write_ca
from test_tls import (
    CLIENT_CERT,
    CLIENT_KEY,
    ETC_HOSTS,
    INSTALLED,
    LIBVIRTD_CONF,
    PASSPHRASE,
    TLS_CONF,
    TLS_PORT,
    TOOLS,
    Authority,
    Saved,
    encode,
    pem,
    resolves,
    tool,
    virsh_tls,
)
from twohost import guest_xml, migrate_argv

from kvmhook.hostname import fqdn

SIGNER = Path(__file__).resolve().parents[1] / "signer.py"
LOCK = Path("/run/kvmhook/cert-renew.lock")
AGENT_FILES = ("cloud.crt", "cloud.key", "cloud.ca.crt", "cloud.jks", "agent.properties")


def signer(ca_dir: Path, mode: str = "good", days: int = 30) -> str:
    return f"{sys.executable} {SIGNER} {ca_dir} --days {days} --mode {mode}"


def served_serial(address: str, name: str, prefix: tuple[str, ...] = ()) -> int:
    """The serial of the certificate `address`:16514 presents, as openssl s_client reads it."""
    script = (
        f"openssl s_client -connect {address}:{TLS_PORT} -servername {name}"
        f" -cert {CLIENT_CERT} -key {CLIENT_KEY} </dev/null 2>/dev/null"
        " | openssl x509 -noout -serial"
    )
    result = subprocess.run(
        [*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.stdout.startswith("serial="), result.stdout + result.stderr
    return int(result.stdout.strip().split("=", 1)[1], 16)


def leaf_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


class RotationHost:
    """The set-up host: its name, agent dir, signer CA, guest, and the original set's bytes."""

    def __init__(self, host: str, agent: Path, ca_dir: Path, daemon, guest: str) -> None:
        self.host = host
        self.agent = agent
        self.ca_dir = ca_dir
        self.daemon = daemon
        self.guest = guest
        self.files = [agent / name for name in AGENT_FILES] + list(INSTALLED)
        self.original = {path: path.read_bytes() for path in self.files}

    def set_state(self) -> dict[Path, bytes | None]:
        """Every file of the set and its .prev: bytes, or None when absent."""
        found: dict[Path, bytes | None] = {}
        for path in self.files:
            for each in (path, path.with_name(path.name + ".prev")):
                found[each] = each.read_bytes() if each.exists() else None
        return found

    def served(self) -> int:
        return served_serial("127.0.0.1", self.host)

    def renew(self, *args: str) -> subprocess.CompletedProcess:
        return kvmhook("cert", "renew", "--agent-dir", str(self.agent), *args)

    def qemu_pid(self) -> str:
        return Path(f"/run/libvirt/qemu/{self.guest}.pid").read_text().strip()


def kvmhook(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "KVMHOOK_ROOT"}
    env.update(extra_env)
    return subprocess.run(
        [str(TOOLS / "kvmhook"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def rotation_host(libvirtd, tmp_path_factory):
    """A two-day certificate served by libvirtd --listen, a TCG guest running; all put back."""
    host = fqdn()
    prevs = [path.with_name(path.name + ".prev") for path in INSTALLED]
    saved = Saved([LIBVIRTD_CONF, ETC_HOSTS, *INSTALLED, *prevs, LOCK])
    work = tmp_path_factory.mktemp("rotation")
    guest = f"{GUEST_PREFIX}rotation"
    try:
        if not resolves(host):
            with ETC_HOSTS.open("a") as hosts:
                hosts.write(f"\n127.0.0.1 {host}\n")
        agent = work / "agent"
        agent.mkdir()
        props, keystore, csr_file = agent / "agent.properties", agent / "cloud.jks", agent / "csr"
        tool("keystore-setup", str(props), str(keystore), PASSPHRASE, "365", str(csr_file))
        csr = x509.load_pem_x509_csr(csr_file.read_bytes())
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ca = Authority("rotation", intermediate=True)
        signed = ca.sign(csr.subject, csr.public_key(), sans, "constrained")  # two days
        LIBVIRTD_CONF.write_text(TLS_CONF)
        tool(
            "keystore-cert-import", str(props), str(keystore), "ssh",
            str(agent / "cloud.crt"), encode(pem(signed)),
            str(agent / "cloud.ca.crt"), encode(ca.bundle()),
            str(agent / "cloud.key"),
        )  # fmt: skip
        libvirtd.restart(listen=True)
        xml = work / "guest.xml"
        xml.write_text(guest_xml(guest))
        run("virsh", "define", str(xml))
        run("virsh", "start", guest)
        ca_dir = write_ca(work / "ca", ca.key, ca.chain)
        yield RotationHost(host, agent, ca_dir, libvirtd, guest)
    finally:
        run("virsh", "destroy", guest, check=False)
        run("virsh", "undefine", guest, check=False)
        try:
            saved.restore()
        finally:
            libvirtd.restart()  # as the session fixture started it: no --listen


@pytest.fixture
def fresh(rotation_host):
    """The original two-day set in place and served, no .prev files: each test's start."""
    for path, data in rotation_host.original.items():
        path.write_bytes(data)
    for path in rotation_host.files:
        path.with_name(path.name + ".prev").unlink(missing_ok=True)
    run("virt-admin", "-c", "libvirtd:///system", "server-update-tls", "libvirtd")
    original = leaf_serial(rotation_host.agent / "cloud.crt")
    assert rotation_host.served() == original
    return rotation_host


def test_renewal_is_served_without_restarting_anything(fresh):
    """Due within 7 days: the served serial changes to the new one; libvirtd's pid, the guest
    and its QEMU stay; a qemu+tls client connects with the new chain."""
    before_serial = fresh.served()
    pid, qemu = fresh.daemon.process.pid, fresh.qemu_pid()
    result = fresh.renew("--if-expiring-within", "7", "--signer", signer(fresh.ca_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    new = leaf_serial(fresh.agent / "cloud.crt")
    assert new != before_serial
    assert fresh.served() == new
    assert f"presents serial {new:X}" in result.stdout, result.stdout
    assert "libvirtd reloaded its TLS files (no restart)" in result.stdout
    assert fresh.daemon.process.poll() is None and fresh.daemon.process.pid == pid
    assert run("pidof", "libvirtd").stdout.split() == [str(pid)]
    assert run("virsh", "domstate", fresh.guest).stdout.strip() == "running"
    assert fresh.qemu_pid() == qemu
    client = virsh_tls(fresh.host)
    assert client.returncode == 0, client.stderr
    assert leaf_serial(Path("/etc/pki/libvirt/clientcert.pem")) == new
    prev = Path("/etc/pki/libvirt/servercert.pem.prev")
    assert leaf_serial(prev) == before_serial


def test_not_due_changes_nothing(fresh):
    """Expiring in two days, asked to renew within one: exit 0, nothing changed or reloaded."""
    before, served = fresh.set_state(), fresh.served()
    result = fresh.renew("--if-expiring-within", "1", "--signer", signer(fresh.ca_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("not due:"), result.stdout
    assert fresh.set_state() == before
    assert fresh.served() == served


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("garbage", "holds no PEM certificate"),
        ("other-key", "does not match the given private key"),
        ("other-ca", "which this host does not trust"),
    ],
)
def test_a_bad_signer_changes_nothing_and_the_old_certificate_stays_served(fresh, mode, said):
    """Garbage, another key's certificate, another CA's: exit 1, one clear line, nothing
    changed, the old serial still served."""
    before, served = fresh.set_state(), fresh.served()
    result = fresh.renew("--if-expiring-within", "7", "--signer", signer(fresh.ca_dir, mode))
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert said in result.stderr, result.stderr
    assert fresh.set_state() == before
    assert fresh.served() == served


def test_a_reload_failure_after_the_swap_rolls_back(fresh):
    """A certificate keystore-cert-import's checks accept but libvirt refuses at reload
    (critical keyUsage without keyEncipherment): exit 3, every file (and .prev) byte for byte
    as before, the old serial served, libvirtd's pid unchanged."""
    before, served, pid = fresh.set_state(), fresh.served(), fresh.daemon.process.pid
    mode = "no-key-encipherment"
    result = fresh.renew("--if-expiring-within", "7", "--signer", signer(fresh.ca_dir, mode))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "rolled back: the previous files are back" in result.stderr, result.stderr
    assert fresh.set_state() == before
    assert fresh.served() == served
    assert fresh.daemon.process.pid == pid and fresh.daemon.process.poll() is None


def test_sigterm_during_the_swap_lets_the_rollback_finish(fresh, tmp_path):
    """SIGTERM (the timer's TimeoutStartSec, say) arriving while the daemon is told to reload a
    certificate it will refuse: the renewal still puts the previous set back and has it served,
    and only then dies of the signal. Killed at once, it would leave files libvirt does not
    serve."""
    real = shutil.which("virt-admin")
    wrapper = tmp_path / "bin/virt-admin"
    wrapper.parent.mkdir()
    # Signals the renewal (virt-admin's parent) on the reload only, not on `version`.
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" server-update-tls "*) kill -TERM "$PPID";; esac\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    before, served = fresh.set_state(), fresh.served()
    result = kvmhook(
        "cert",
        "renew",
        "--agent-dir",
        str(fresh.agent),
        "--signer",
        signer(fresh.ca_dir, "no-key-encipherment"),
        PATH=f"{wrapper.parent}:{os.environ['PATH']}",
    )
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert "putting the previous set back" in result.stderr, result.stderr
    assert fresh.set_state() == before
    assert fresh.served() == served


def test_rollback_serves_the_previous_set_again(fresh):
    """renew, then `kvmhook cert rollback`: the old files are back and their serial served."""
    old = fresh.set_state()
    old_serial = fresh.served()
    assert fresh.renew("--signer", signer(fresh.ca_dir)).returncode == 0
    renewed = fresh.set_state()
    result = kvmhook("cert", "rollback", "--agent-dir", str(fresh.agent))
    assert result.returncode == 0, result.stderr
    assert fresh.served() == old_serial
    for path in fresh.files:
        assert path.read_bytes() == old[path], path
        if path.name != "agent.properties":  # it kept its passphrase: never replaced
            assert path.with_name(path.name + ".prev").read_bytes() == renewed[path], path


def test_migrating_to_a_host_whose_certificate_was_just_renewed(pair, tmp_path):
    """b's certificate renewed (reloaded online) while a guest runs on a; then a -> b over TLS
    on both channels works with b's new certificate."""
    name = f"{GUEST_PREFIX}rot-{time.monotonic_ns() % 10**8}"
    pair.a.define_guest(name, guest_xml(name))
    pair.a.virsh("start", name)
    try:
        ca_dir = write_ca(tmp_path / "ca", pair.ca.key, [pair.ca.cert])
        old = leaf_serial(pair.b.path("/etc/cloudstack/agent/cloud.crt"))
        pid = pair.b.run("pidof", "libvirtd").stdout.split()
        renewed = pair.b.run(
            str(TOOLS / "kvmhook"), "cert", "renew", "--if-expiring-within", "7",
            "--signer", signer(ca_dir), check=False,
        )  # fmt: skip
        assert renewed.returncode == 0, renewed.stdout + renewed.stderr
        new = leaf_serial(pair.b.path("/etc/cloudstack/agent/cloud.crt"))
        assert new != old
        assert leaf_serial(pair.b.path("/etc/pki/qemu/server-cert.pem")) == new
        assert pair.b.run("pidof", "libvirtd").stdout.split() == pid
        seen_from_a = served_serial(pair.b.address, pair.b.hostname, tuple(pair.a.argv()))
        assert seen_from_a == new
        assert pair.a.state(name) == "running"
        result = pair.a.run(*migrate_argv(name, pair.b), check=False, timeout=120)
        assert result.returncode == 0, (
            f"{result.stdout}\n{result.stderr}\nb's libvirtd log:\n{pair.b.libvirtd_log()}"
        )
        assert pair.b.state(name) == "running"
        assert pair.a.state(name) is None
    finally:
        for host in pair.hosts:
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)
