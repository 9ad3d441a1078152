"""Guests' consoles (VNC) on the host's certificate, renewed live on running guests (issue 15).

One host of twohost.py (its own namespaces, libvirtd and private /etc): the
real keystore-setup and keystore-cert-import install a two-day certificate of
a test CA, libvirt-vnc's files with it; `kvmhook tls enable` sets vnc_tls in
qemu.conf before libvirtd starts. TCG guests with a VNC console on the host's
127.0.0.1 serve that certificate; what a console serves is read by a real
VeNCrypt handshake (vencrypt.py, run inside the host), not by kvmhook's code.

The tests share the one host, in file order, each checking its own starting
point (each also passes alone): the console on the two-day certificate, its
status; a renewal reloaded live on the running console (same QEMU, same
libvirtd) and served by a guest started after it; a renewal libvirt refuses,
rolled back, leaving every console as it was; a renewal then `kvmhook cert
rollback`, both reloaded live; last, a console that verifies viewers
(default_tls_x509_verify = 1, qemu.conf put back after). Root only; without
the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from harness import GUEST_PREFIX
from signer import command, write_ca
from twohost import (
    AGENT_DIR,
    KVMHOOK,
    Host,
    TestCA,
    guest_xml,
    missing_prerequisites,
)

from kvmhook.certs.libvirtconf import ConfFile

VENCRYPT = Path(__file__).with_name("vencrypt.py")
VNC_DIR = "/etc/pki/libvirt-vnc"
VNC_CERT = f"{VNC_DIR}/server-cert.pem"
AGENT_CERT = f"{AGENT_DIR}/cloud.crt"
ALERT_DAYS = 15  # tls status's alert period without a controller
TAINT = "is tainted: custom-monitor"
RELOADED = "re-read the files (display-reload)"


def leaf_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def days_left(path: Path) -> float:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def consoles_line(count: int) -> str:
    """The line of `cert renew`/`rollback` saying how many consoles re-read their files."""
    guests = "guest" if count == 1 else "guests"
    return f"consoles: {count} running {guests} with a TLS console {RELOADED}"


class ConsoleHost:
    """The host, its CA (and a signer directory for it), its guests with a VNC console."""

    def __init__(self, host: Host, ca: TestCA, ca_dir: Path, enabled: str) -> None:
        self.host = host
        self.ca = ca
        self.ca_dir = ca_dir
        self.enabled = enabled  # what `kvmhook tls enable` said
        self.guests: list[str] = []

    # -- guests ------------------------------------------------------------------------------

    def start_guest(self) -> str:
        name = f"{GUEST_PREFIX}console-{len(self.guests) + 1}"
        self.host.define_guest(name, guest_xml(name, vnc=True))
        self.host.virsh("start", name)
        self.guests.append(name)
        return name

    def running(self, count: int) -> list[str]:
        """At least `count` running guests with a VNC console (started as needed): the first
        `count` of them."""
        while len(self.guests) < count:
            self.start_guest()
        return self.guests[:count]

    def port(self, guest: str) -> int:
        """The guest's VNC port: 5900 + the display `virsh vncdisplay` says (`127.0.0.1:N`)."""
        display = self.host.virsh("vncdisplay", guest).stdout.strip()
        return 5900 + int(display.rsplit(":", 1)[1])

    def connect(self, guest: str, client_cert: bool = True) -> dict[str, str]:
        """A new VeNCrypt connection to the guest's console (vencrypt.py inside the host), the
        served certificate checked against the CA for the host's name; `client_cert` presents
        the host's own certificate when QEMU asks for one. vencrypt.py's fields: serial,
        subtype, result (ok: QEMU accepted this client)."""
        args = ["--ca", f"{VNC_DIR}/ca-cert.pem", "--servername", self.host.hostname]
        if client_cert:
            args += ["--cert", AGENT_CERT, "--key", f"{AGENT_DIR}/cloud.key"]
        result = self.host.run(
            sys.executable, str(VENCRYPT), str(self.port(guest)), *args, check=False, timeout=60
        )
        assert result.returncode == 0, f"{guest}: {result.stderr}"
        return dict(field.split("=", 1) for field in result.stdout.split())

    def served(self, guest: str, client_cert: bool = True) -> int:
        """The serial of the certificate the guest's console serves to a new connection,
        which QEMU accepted."""
        fields = self.connect(guest, client_cert)
        assert fields["result"] == "ok", f"{guest}: QEMU did not accept the client: {fields}"
        return int(fields["serial"], 16)

    def served_by(self, guests: list[str]) -> dict[str, int]:
        return {guest: self.served(guest) for guest in guests}

    def qemu_pid(self, guest: str) -> str:
        return self.host.run("cat", f"/run/libvirt/qemu/{guest}.pid").stdout.strip()

    def pids(self, guests: list[str]) -> dict[str, str]:
        """libvirtd's pid and each guest's QEMU pid, inside the host's PID namespace."""
        found = {"libvirtd": self.host.run("pidof", "libvirtd").stdout.strip()}
        found.update({guest: self.qemu_pid(guest) for guest in guests})
        return found

    def guest_log(self, guest: str) -> str:
        return self.host.path(f"/var/log/libvirt/qemu/{guest}.log").read_text(errors="replace")

    # -- certificates ------------------------------------------------------------------------

    def installed(self) -> int:
        """The serial of the installed console certificate, which is the agent's."""
        serial = leaf_serial(self.host.path(VNC_CERT))
        assert serial == leaf_serial(self.host.path(AGENT_CERT))
        return serial

    def kvmhook(self, *args: str):
        return self.host.run(str(KVMHOOK), *args, check=False, timeout=300)

    def renew(self, *args: str, mode: str = "good"):
        return self.kvmhook("cert", "renew", "--signer", command(self.ca_dir, 30, mode), *args)


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
    """The host set up (see the module's docstring) with one guest running; all stopped and
    removed after (kept with KVMHOOK_E2E_KEEP=1)."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="kvmhook-consoles-"))
    host = Host("consoles", "10.250.0.1", root / "host")
    ca = TestCA("consoles")
    try:
        host.prepare(peers=[host])
        host.start()
        host.keystore_setup()
        host.import_certificate(ca)  # two days, as TestCA signs
        enabled = host.run(str(KVMHOOK), "tls", "enable").stdout
        host.start_libvirtd()  # after tls enable: it reads qemu.conf as it starts
        ca_dir = write_ca(tmp_path_factory.mktemp("consoles-ca"), ca.key, [ca.cert])
        console_host = ConsoleHost(host, ca, ca_dir, enabled)
        console_host.start_guest()
        yield console_host
    finally:
        try:
            host.stop()
        finally:
            if os.environ.get("KVMHOOK_E2E_KEEP") != "1":
                shutil.rmtree(root, ignore_errors=True)


def test_tls_enable_puts_the_consoles_on_the_installed_files(consoles):
    """keystore-cert-import installed libvirt-vnc's three files; `tls enable` set vnc_tls and
    its cert dir (never vnc_tls_x509_verify); the guest's QEMU got TLS credentials from there."""
    host = consoles.host
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        assert host.path(f"{VNC_DIR}/{name}").is_file(), name
    assert host.path(f"{VNC_DIR}/server-key.pem").stat().st_mode & 0o077 == 0o040
    conf = ConfFile(host.path("/etc/libvirt/qemu.conf").read_text())
    assert conf.get("vnc_tls") == "1", consoles.enabled
    assert conf.get("vnc_tls_x509_cert_dir") == f'"{VNC_DIR}"'
    assert conf.get("vnc_tls_x509_verify") is None
    assert conf.get("default_tls_x509_verify") is None  # so QEMU asks viewers for no cert
    log = consoles.guest_log(consoles.guests[0])
    creds = f'"qom-type":"tls-creds-x509","id":"vnc-tls-creds0","dir":"{VNC_DIR}"'
    assert creds in log, log
    assert '"endpoint":"server","verify-peer":false' in log, log
    assert "tls-creds=vnc-tls-creds0" in log, log


def test_a_console_serves_the_installed_certificate(consoles):
    """A VeNCrypt client (X509None) gets the installed certificate, chaining to the CA and
    naming the host; a viewer with no client certificate (a console proxy) gets it too."""
    guest = consoles.guests[0]
    installed = consoles.installed()
    assert consoles.served(guest) == installed
    assert consoles.served(guest, client_cert=False) == installed


def test_status_reports_the_console_set_and_warns_of_expiry(consoles):
    """`tls status --json`: the "vnc server certificate" item ok, secured, and a warning naming
    each certificate expiring within the alert period (the two-day ones, the CA's); `cert
    status` shows the "vnc server" set."""
    result = consoles.kvmhook("tls", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["secured"] is True, status
    items = {item["name"]: item for item in status["items"]}
    assert items["vnc server certificate"]["ok"] is True, items
    assert consoles.host.hostname in items["vnc server certificate"]["detail"]
    warnings = status["warnings"]
    for inside in (VNC_CERT, AGENT_CERT, f"{VNC_DIR}/ca-cert.pem"):
        due = days_left(consoles.host.path(inside)) < ALERT_DAYS
        named = [warning for warning in warnings if f"({inside})" in warning]
        assert bool(named) == due, (inside, warnings)
    assert days_left(consoles.host.path(f"{VNC_DIR}/ca-cert.pem")) < ALERT_DAYS  # TestCA's
    shown = consoles.kvmhook("cert", "status", "--json", "--warn-days", "0")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    found = {finding["name"]: finding for finding in json.loads(shown.stdout)}
    vnc = found["vnc server"]
    assert vnc["installed"] and vnc["key_matches"] and vnc["chain_verifies"], vnc
    assert vnc["files"]["cert"] == VNC_CERT and vnc["problems"] == [], vnc


def test_a_renewal_is_served_by_the_running_console_without_restarting_it(consoles):
    """The two-day certificate renewed within 7 days: exit 0, one console reloaded; a new
    console connection gets the new serial from the same QEMU, libvirtd never restarted; the
    guest is tainted custom-monitor (libvirt's mark for monitor passthrough). A guest started
    afterwards serves the new certificate too, untainted."""
    guest = consoles.guests[0]
    old = consoles.installed()
    assert consoles.served(guest) == old
    assert days_left(consoles.host.path(AGENT_CERT)) < 7, "the renewal must be due"
    assert TAINT not in consoles.guest_log(guest)
    pids = consoles.pids([guest])
    result = consoles.renew("--if-expiring-within", "7")
    assert result.returncode == 0, result.stdout + result.stderr
    new = consoles.installed()
    assert new != old
    served = consoles.served(guest)
    assert served == new, (
        f"the running console serves {served:X} (the old one: {old:X}), not {new:X}"
    )
    assert consoles_line(1) in result.stdout, result.stdout
    assert consoles.pids([guest]) == pids
    assert consoles.host.state(guest) == "running"
    assert TAINT in consoles.guest_log(guest)
    later = consoles.start_guest()
    assert consoles.served(later) == new
    assert TAINT not in consoles.guest_log(later)


def test_a_renewal_that_rolls_back_leaves_every_console_as_it_was(consoles):
    """A certificate libvirtd refuses at reload (critical keyUsage without keyEncipherment):
    exit 3, rolled back; every console still serves the installed serial, no console reloaded,
    nothing restarted."""
    guests = consoles.running(2)
    installed = consoles.installed()
    assert consoles.served_by(guests) == dict.fromkeys(guests, installed)
    pids = consoles.pids(guests)
    result = consoles.renew(mode="no-key-encipherment")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "rolled back: the previous files are back" in result.stderr, result.stderr
    assert "consoles:" not in result.stdout, result.stdout
    assert consoles.installed() == installed
    assert consoles.served_by(guests) == dict.fromkeys(guests, installed)
    assert consoles.pids(guests) == pids


def test_cert_rollback_serves_the_previous_certificate_on_the_running_consoles(consoles):
    """renew, then `kvmhook cert rollback`: both running consoles serve the new serial, then
    the previous one again, each reloaded live (same QEMUs, same libvirtd)."""
    guests = consoles.running(2)
    before = consoles.installed()
    assert consoles.served_by(guests) == dict.fromkeys(guests, before)
    pids = consoles.pids(guests)
    renewed = consoles.renew()
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    new = consoles.installed()
    assert new != before
    assert consoles.served_by(guests) == dict.fromkeys(guests, new)
    assert consoles_line(2) in renewed.stdout, renewed.stdout
    result = consoles.kvmhook("cert", "rollback")
    assert result.returncode == 0, result.stdout + result.stderr
    assert consoles.installed() == before
    assert consoles.served_by(guests) == dict.fromkeys(guests, before)
    assert consoles_line(2) in result.stdout, result.stdout
    assert consoles.pids(guests) == pids
    for guest in guests:
        assert TAINT in consoles.guest_log(guest), guest


def test_a_console_verifying_viewers_wants_a_client_certificate_and_is_reloaded_too(consoles):
    """The operator's default_tls_x509_verify = 1 (vnc_tls_x509_verify inherits it; tls enable
    never sets either): a guest started then refuses a viewer with no certificate (a console
    proxy would be locked out) and accepts the host's; a renewal reloads it as the others."""
    conf = consoles.host.path("/etc/libvirt/qemu.conf")
    saved = conf.read_text()
    consoles.host.edit_conf("/etc/libvirt/qemu.conf", {"default_tls_x509_verify": "1"})
    consoles.host.restart_libvirtd()  # running guests stay, as on a real host
    try:
        earlier = consoles.running(2)
        verifying = consoles.start_guest()
        assert '"endpoint":"server","verify-peer":true' in consoles.guest_log(verifying)
        installed = consoles.installed()
        assert consoles.connect(verifying, client_cert=False)["result"] == "failed"
        assert consoles.served(verifying) == installed
        assert consoles.served(earlier[0], client_cert=False) == installed  # as it started
        guests = [*earlier, verifying]
        pids = consoles.pids(guests)
        result = consoles.renew()
        assert result.returncode == 0, result.stdout + result.stderr
        new = consoles.installed()
        assert new != installed
        assert consoles.served_by(guests) == dict.fromkeys(guests, new)
        assert consoles_line(3) in result.stdout, result.stdout
        assert consoles.pids(guests)[verifying] == pids[verifying]
    finally:
        conf.write_text(saved)
        consoles.host.restart_libvirtd()
