"""`kvmhook tls status/enable/disable` on sandbox roots holding Debian 12's shipped files.

Certificates come from tests/testca.py and are installed by keystore-cert-import's
own code. The handshake checks run against a real TLS listener on 127.0.0.1.
"""

from __future__ import annotations

import difflib
import errno
import functools
import json
import os
import re
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import testca
from click.testing import CliRunner
from cryptography import x509

from kvmhook.certs import certimport, startup, tls
from kvmhook.certs.libvirtconf import ConfFile
from kvmhook.cli.tls import tls as tls_command
from kvmhook.errors import TlsError
from kvmhook.hostname import fqdn

DATA = Path(__file__).parent / "data" / "debian12"
LIBVIRTD_CONF = "etc/libvirt/libvirtd.conf"
QEMU_CONF = "etc/libvirt/qemu.conf"
DEFAULTS = "etc/default/libvirtd"
CA_FILE = "etc/pki/CA/cacert.pem"
# What enable adds to Debian 12's files, where nothing of it is set yet: the
# paths are the host's own, never the sandbox root's.
ENABLED_LINES = {
    LIBVIRTD_CONF: [
        "listen_tls = 1",
        "listen_tcp = 0",
        'tls_port = "16514"',
        'auth_tls = "none"',
        'key_file = "/etc/pki/libvirt/private/serverkey.pem"',
        'cert_file = "/etc/pki/libvirt/servercert.pem"',
        'ca_file = "/etc/pki/CA/cacert.pem"',
    ],
    QEMU_CONF: [
        'default_tls_x509_cert_dir = "/etc/pki/qemu"',
        "migrate_tls_x509_verify = 1",
        "migrate_tls_force = 1",
        "vnc_tls = 1",
        'vnc_tls_x509_cert_dir = "/etc/pki/libvirt-vnc"',
    ],
    DEFAULTS: ['LIBVIRTD_ARGS="--listen"'],
}
_ASSIGNMENT = re.compile(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A host root with Debian 12's libvirtd.conf, qemu.conf (0600, as shipped), default file."""
    root = tmp_path / "root"
    (root / "etc/libvirt").mkdir(parents=True)
    (root / "etc/default").mkdir()
    shutil.copy(DATA / "libvirtd.conf", root / LIBVIRTD_CONF)
    shutil.copy(DATA / "qemu.conf", root / QEMU_CONF)
    (root / QEMU_CONF).chmod(0o600)
    shutil.copy(DATA / "default-libvirtd", root / DEFAULTS)
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    return root


@functools.cache
def host_identity(authority: testca.Authority) -> tuple[bytes, bytes]:
    """A key and a certificate for this host's FQDN from `authority` (PEM), one per CA."""
    key = testca.new_key("ec")
    cert = authority.issue(key.public_key(), fqdn(), [x509.DNSName(fqdn())])
    return testca.key_pem(key), testca.pem(cert)


def install_certificates(root: Path) -> None:
    """The host's certificate installed as keystore-cert-import does (agent, libvirt, QEMU)."""
    authority = testca.shared().intermediate
    key, cert = host_identity(authority)
    agent = root / "etc/cloudstack/agent"
    agent.mkdir(parents=True, exist_ok=True)
    certimport.check(
        str(agent / "agent.properties"),
        str(agent / "cloud.jks"),
        str(agent / "cloud.crt"),
        cert,
        str(agent / "cloud.ca.crt"),
        authority.bundle(),
        str(agent / "cloud.key"),
        key,
        new_passphrase="tls-test-pass",
    ).install()


@pytest.fixture
def secured(root) -> Path:
    """The Debian root with certificates installed and TLS enabled; nothing listens on its port."""
    install_certificates(root)
    tls.enable()
    set_conf(root / LIBVIRTD_CONF, "tls_port", f'"{closed_port()}"')
    return root


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_conf(path: Path, key: str, value: str | None) -> None:
    """`key = value` in the file; with None, `key` commented out (libvirt's default applies)."""
    if value is None:
        path.write_text(re.sub(rf"^(\s*{key}\s*=)", r"#\1", path.read_text(), flags=re.M))
        return
    conf = ConfFile(path.read_text())
    conf.set(key, value)
    path.write_text(conf.text())


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int] | str]:
    """Every file's bytes, mode and inode (a rewrite makes a new one), every link's target and
    directory under `root`."""
    found: dict[str, tuple[bytes, int, int] | str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = os.readlink(path)
        elif path.is_dir():
            found[str(path)] = "directory"
        else:
            status = path.stat()
            found[str(path)] = (path.read_bytes(), stat.S_IMODE(status.st_mode), status.st_ino)
    return found


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def invoke(*args: str):
    return CliRunner().invoke(tls_command, list(args))


def failing_items(result: tls.Report) -> set[str]:
    return {item.name for item in result.items if not item.ok}


# enable and disable on Debian 12's files


def test_enable_adds_only_the_tls_settings_to_debians_files(root):
    """enable: every shipped line stays in place; only the TLS keys' lines are added."""
    install_certificates(root)
    before = {name: lines(root / name) for name in ENABLED_LINES}
    tls.enable()
    for name, wanted in ENABLED_LINES.items():
        after = lines(root / name)
        added = []
        matcher = difflib.SequenceMatcher(a=before[name], b=after, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            assert tag in ("equal", "insert"), (name, before[name][i1:i2])
            if tag == "insert":
                added += after[j1:j2]
        assert sorted(added) == sorted(wanted), name
        for line in added:  # each right after its commented-out default
            key = _ASSIGNMENT.match(line).group(1)
            assert _ASSIGNMENT.match(after[after.index(line) - 1]).group(1) == key


def test_enable_keeps_the_operators_auth_tls_and_rewrites_other_active_keys_in_place(root):
    """Active operator settings: auth_tls "sasl" stays; listen_tls 0 and tls_port become ours."""
    install_certificates(root)
    conf = root / LIBVIRTD_CONF
    conf.write_text('listen_tls = 0 # off for now\nauth_tls = "sasl"\n' + conf.read_text())
    conf.write_text(conf.read_text() + 'tls_port = "16515"\n')
    tls.enable()
    after = lines(conf)
    assert after[:2] == ["listen_tls = 1", 'auth_tls = "sasl"']
    assert after[-1] == 'tls_port = "16514"'
    assert after.count('auth_tls = "sasl"') == 1 and 'auth_tls = "none"' not in after


def test_a_second_enable_changes_nothing(root):
    """enable twice: the second run reports nothing to change and rewrites no file."""
    install_certificates(root)
    tls.enable()
    before = snapshot(root)
    change = tls.enable()
    assert not change.changed and change.files == []
    assert snapshot(root) == before
    result = invoke("enable")
    assert result.exit_code == 0
    assert "nothing to change: TLS is already on" in result.output
    assert snapshot(root) == before


def test_the_bak_files_hold_the_previous_content_with_its_mode(root):
    """Each .bak equals the file before the change (mode kept): after enable, then after disable."""
    install_certificates(root)
    shipped = {name: (root / name).read_bytes() for name in ENABLED_LINES}
    change = tls.enable()
    assert sorted(file.path for file in change.files) == sorted(
        str(root / name) for name in ENABLED_LINES
    )
    for name, data in shipped.items():
        assert (root / f"{name}.bak").read_bytes() == data
    assert stat.S_IMODE((root / f"{QEMU_CONF}.bak").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / QEMU_CONF).stat().st_mode) == 0o600
    enabled = {name: (root / name).read_bytes() for name in ENABLED_LINES}
    tls.disable()
    for name, data in enabled.items():
        assert (root / f"{name}.bak").read_bytes() == data


def test_disable_leaves_libvirts_tls_off(root):
    """disable: listen_tls = 0, LIBVIRTD_ARGS as shipped, migrate_tls_force = 0; not secured."""
    install_certificates(root)
    tls.enable()
    tls.disable()
    assert ConfFile((root / LIBVIRTD_CONF).read_text()).get("listen_tls") == "0"
    assert (root / DEFAULTS).read_bytes() == (DATA / "default-libvirtd").read_bytes()
    assert ConfFile((root / QEMU_CONF).read_text()).get("migrate_tls_force") == "0"
    result = tls.status(handshake=False)
    assert not result.secured
    assert failing_items(result) == {"libvirtd.conf", "startup", "qemu.conf"}
    before = snapshot(root)
    assert not tls.disable().changed
    assert snapshot(root) == before


@pytest.mark.parametrize("style", ["monolithic", "socket", "modular"])
def test_disable_of_a_never_enabled_host_changes_nothing(root, style):
    """Shipped files, no TLS listener at start-up: disable writes no file and no .bak, says
    nothing changed and exits 0; so does a second run."""
    if style == "socket":
        enable_units(root, {"sockets.target.wants/libvirtd.socket": "/l/libvirtd.socket"}, [])
    elif style == "modular":
        enable_units(root, {"sockets.target.wants/virtqemud.socket": "/l/virtqemud.socket"}, [])
        shutil.copy(DATA / "libvirtd.conf", root / "etc/libvirt/virtproxyd.conf")
    before = snapshot(root)
    for _ in range(2):
        result = invoke("disable")
        assert result.exit_code == 0, result.output
        assert "changed" not in result.output and "to apply" not in result.output
        assert result.output.strip().splitlines()[-1] == "nothing to change: TLS is already off"
        assert snapshot(root) == before


def test_disable_switches_listen_tls_off_where_the_start_up_listens(root):
    """No listen_tls line but --listen at start-up (libvirt's default 1 serves TLS): disable
    writes listen_tls = 0 and takes --listen out."""
    (root / DEFAULTS).write_text('LIBVIRTD_ARGS="--listen"\n')
    before = lines(root / LIBVIRTD_CONF)
    change = tls.disable()
    assert sorted((file.path, tuple(file.keys)) for file in change.files) == [
        (str(root / DEFAULTS), ("LIBVIRTD_ARGS",)),
        (str(root / LIBVIRTD_CONF), ("listen_tls",)),
    ]
    after = lines(root / LIBVIRTD_CONF)
    assert [line for line in after if line not in before] == ["listen_tls = 0"]
    assert not startup.has_listen((root / DEFAULTS).read_text())


def test_disable_sets_an_active_listen_tls_1_to_0_without_a_listener(root):
    """An explicit listen_tls = 1 is the switch itself: disable sets it to 0 even with no
    listener at start-up."""
    set_conf(root / LIBVIRTD_CONF, "listen_tls", "1")
    change = tls.disable()
    assert [(file.path, file.keys) for file in change.files] == [
        (str(root / LIBVIRTD_CONF), ["listen_tls"])
    ]
    assert ConfFile((root / LIBVIRTD_CONF).read_text()).get("listen_tls") == "0"


@pytest.mark.parametrize("failing", ["staging", "renaming"])
def test_a_write_failure_leaves_every_file_byte_identical(root, monkeypatch, failing):
    """A failure while staging the last file, or at the first rename: nothing changes at all."""
    install_certificates(root)
    before = snapshot(root)
    calls = []
    real = os.fsync if failing == "staging" else os.replace

    def fail_once(*args):
        calls.append(args)
        # Six files are staged (three and their .bak), then renamed: fail the last staging.
        if len(calls) == (6 if failing == "staging" else 1):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync" if failing == "staging" else "replace", fail_once)
        with pytest.raises(TlsError, match="No space left on device"):
            tls.enable()
    assert snapshot(root) == before


# the guests' consoles (VNC)

VNC_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def qemu_conf(root: Path) -> ConfFile:
    return ConfFile((root / QEMU_CONF).read_text())


def test_enable_sets_the_consoles_tls_but_never_their_client_verification(root):
    install_certificates(root)
    result = invoke("enable")
    assert result.exit_code == 0, result.output
    conf = qemu_conf(root)
    assert (conf.get("vnc_tls"), conf.get("vnc_tls_x509_cert_dir")) == (
        "1",
        '"/etc/pki/libvirt-vnc"',
    )
    assert conf.get("vnc_tls_x509_verify") is None
    assert "keep their console as it was until they restart" in result.output


def test_a_host_imported_before_consoles_keeps_them_as_they_are_and_is_told_how(root):
    """No libvirt-vnc files: a cert dir without them would stop libvirtd, so no vnc_tls; the
    rest is enabled, and the output says how to get the files."""
    install_certificates(root)
    for name in VNC_FILES[1:]:
        (root / "etc/pki/libvirt-vnc" / name).unlink()
    result = invoke("enable")
    assert result.exit_code == 0, result.output
    conf = qemu_conf(root)
    assert conf.get("vnc_tls") is None and conf.get("vnc_tls_x509_cert_dir") is None
    assert conf.get("migrate_tls_force") == "1"
    assert "consoles: the consoles' settings left as they are:" in result.output
    assert "kvmhook cert renew" in result.output


def test_no_vnc_leaves_the_consoles_alone_both_ways(root):
    install_certificates(root)
    set_conf(root / QEMU_CONF, "vnc_tls", "1")
    assert invoke("enable", "--no-vnc").exit_code == 0
    assert qemu_conf(root).get("vnc_tls_x509_cert_dir") is None
    assert invoke("disable", "--no-vnc").exit_code == 0
    assert qemu_conf(root).get("vnc_tls") == "1"
    assert invoke("disable").exit_code == 0
    assert qemu_conf(root).get("vnc_tls") == "0"


def test_disable_turns_the_consoles_tls_off_and_only_where_on(root):
    install_certificates(root)
    tls.enable()
    tls.disable()
    assert qemu_conf(root).get("vnc_tls") == "0"
    (root / QEMU_CONF).write_bytes((DATA / "qemu.conf").read_bytes())  # vnc_tls never set
    tls.disable()
    assert qemu_conf(root).get("vnc_tls") is None


def test_status_reports_the_consoles_files(root):
    install_certificates(root)
    report = tls.status(handshake=False)
    [vnc] = [item for item in report.items if item.name == "vnc server certificate"]
    assert vnc.ok and "valid until" in vnc.detail
    for name in VNC_FILES:
        (root / "etc/pki/libvirt-vnc" / name).unlink()
    report = tls.status(handshake=False)
    [vnc] = [item for item in report.items if item.name == "vnc server certificate"]
    assert vnc.ok and vnc.detail.startswith("not installed: the consoles have no certificate")


def test_a_console_key_that_does_not_match_fails_its_item(root):
    install_certificates(root)
    other = testca.key_pem(testca.new_key("ec"))
    (root / "etc/pki/libvirt-vnc/server-key.pem").write_bytes(other)
    report = tls.status(handshake=False)
    assert "vnc server certificate" in failing_items(report)


def test_expiring_certificates_are_warnings_never_failures(root):
    """Within the alert period: one warning per certificate (the CA's too), naming it; the
    items and "secured" are what they are without the period."""
    install_certificates(root)
    near = tls.status(handshake=False, alert_days=100000)
    far = tls.status(handshake=False, alert_days=0)
    assert [item.ok for item in near.items] == [item.ok for item in far.items]
    assert far.warnings == []
    named = "\n".join(near.warnings)
    for name in ("agent", "libvirt server", "libvirt client", "qemu server", "qemu client"):
        assert f"the {name} certificate (" in named
    assert "the vnc server certificate (" in named and "the CA " in named
    assert all(" expires in " in warning for warning in near.warnings)


def test_enable_refuses_without_certificates_and_changes_nothing(root):
    """No certificate files: one error line naming them, exit 1, every file as it was."""
    before = snapshot(root)
    result = invoke("enable")
    assert result.exit_code == 1
    assert result.output.startswith("Error: the TLS certificate files are not installed")
    assert f"{root}/{CA_FILE}" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(root) == before


def test_enable_refuses_when_one_certificate_file_is_missing(root):
    """A single missing file (QEMU's client key) is enough to refuse, and it is named."""
    install_certificates(root)
    (root / "etc/pki/qemu/client-key.pem").unlink()
    before = snapshot(root)
    with pytest.raises(TlsError, match=f"{root}/etc/pki/qemu/client-key.pem"):
        tls.enable()
    assert snapshot(root) == before


# how libvirt is started


def enable_units(root: Path, links: dict[str, str], units: list[str]) -> None:
    """Fake systemd state: `links` (wants/unit → unit file), `units` installed unit files."""
    for link, target in links.items():
        path = root / "etc/systemd/system" / link
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    for unit in units:
        (root / unit).parent.mkdir(parents=True, exist_ok=True)
        (root / unit).write_text("[Install]\nWantedBy=sockets.target\n")


def test_monolithic_libvirtd_gets_listen_in_etc_default(root):
    """No systemd socket links: --listen goes into /etc/default/libvirtd, after its examples."""
    install_certificates(root)
    result = invoke("enable")
    assert result.exit_code == 0, result.output
    assert f"monolithic libvirtd (LIBVIRTD_ARGS in {root}/{DEFAULTS})" in result.output
    text = lines(root / DEFAULTS)
    assert text[text.index('LIBVIRTD_ARGS="--listen"') - 1] == '#LIBVIRTD_ARGS="--listen"'
    assert "to apply: systemctl restart libvirtd.service" in result.output


def test_monolithic_libvirtd_keeps_its_other_arguments_in_etc_sysconfig(root):
    """RHEL's /etc/sysconfig/libvirtd with arguments: --listen joins them; disable takes it out."""
    install_certificates(root)
    (root / DEFAULTS).unlink()
    sysconfig = root / "etc/sysconfig/libvirtd"
    sysconfig.parent.mkdir()
    sysconfig.write_text("# options\nLIBVIRTD_ARGS='--timeout 120' # idle exit\nKRB5=x\n")
    tls.enable()
    assert lines(sysconfig) == ["# options", 'LIBVIRTD_ARGS="--timeout 120 --listen"', "KRB5=x"]
    assert startup.detect().defaults == str(sysconfig)
    tls.disable()
    assert lines(sysconfig) == ["# options", 'LIBVIRTD_ARGS="--timeout 120"', "KRB5=x"]


def test_monolithic_libvirtd_without_a_defaults_file_gets_one(root):
    """Neither file exists (libvirt-daemon without -system): /etc/default/libvirtd is created."""
    install_certificates(root)
    (root / DEFAULTS).unlink()
    change = tls.enable()
    assert (root / DEFAULTS).read_text() == 'LIBVIRTD_ARGS="--listen"\n'
    assert stat.S_IMODE((root / DEFAULTS).stat().st_mode) == 0o644
    assert [file.backup for file in change.files if file.path.endswith("libvirtd")] == [None]
    assert not (root / f"{DEFAULTS}.bak").exists()


def test_socket_activated_libvirtd_gets_its_tls_socket_enabled(root):
    """libvirtd.socket enabled: enable links libvirtd-tls.socket, leaves LIBVIRTD_ARGS alone."""
    install_certificates(root)
    enable_units(
        root,
        {"sockets.target.wants/libvirtd.socket": "/lib/systemd/system/libvirtd.socket"},
        ["lib/systemd/system/libvirtd.socket", "lib/systemd/system/libvirtd-tls.socket"],
    )
    shipped_defaults = (root / DEFAULTS).read_bytes()
    result = invoke("enable")
    assert result.exit_code == 0, result.output
    assert "socket-activated libvirtd (libvirtd-tls.socket)" in result.output
    assert "enabled libvirtd-tls.socket" in result.output
    link = root / "etc/systemd/system/sockets.target.wants/libvirtd-tls.socket"
    assert os.readlink(link) == "/lib/systemd/system/libvirtd-tls.socket"
    assert (root / DEFAULTS).read_bytes() == shipped_defaults  # libvirtd refuses --listen here
    assert tls.status(handshake=False).secured
    assert "nothing to change" in invoke("enable").output
    assert invoke("disable").exit_code == 0
    assert not os.path.lexists(link)


def test_modular_daemons_get_virtproxyd_tls_socket_and_virtproxyd_conf(root):
    """virtqemud enabled: virtproxyd.conf gets the settings, virtproxyd-tls.socket is linked."""
    install_certificates(root)
    enable_units(
        root,
        {"sockets.target.wants/virtqemud.socket": "/usr/lib/systemd/system/virtqemud.socket"},
        ["usr/lib/systemd/system/virtproxyd-tls.socket"],
    )
    # virtproxyd.conf ships the same network settings as libvirtd.conf.
    shutil.copy(DATA / "libvirtd.conf", root / "etc/libvirt/virtproxyd.conf")
    libvirtd_conf = (root / LIBVIRTD_CONF).read_bytes()
    change = tls.enable()
    assert change.startup.style == startup.MODULAR and change.socket
    link = root / "etc/systemd/system/sockets.target.wants/virtproxyd-tls.socket"
    assert os.readlink(link) == "/usr/lib/systemd/system/virtproxyd-tls.socket"
    assert ConfFile((root / "etc/libvirt/virtproxyd.conf").read_text()).get("listen_tls") == "1"
    assert (root / LIBVIRTD_CONF).read_bytes() == libvirtd_conf
    result = tls.status(handshake=False)
    assert result.secured, [item.as_dict() for item in result.items]
    assert "virtproxyd.conf" in {item.name for item in result.items}


def test_a_missing_socket_unit_refuses_and_changes_nothing(root):
    """libvirtd.socket enabled but libvirtd-tls.socket not installed: an error, no file changed."""
    install_certificates(root)
    enable_units(root, {"sockets.target.wants/libvirtd.socket": "/x/libvirtd.socket"}, [])
    before = snapshot(root)
    with pytest.raises(TlsError, match=r"libvirtd-tls.socket is not installed"):
        tls.enable()
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("text", "listening"),
    [
        ('LIBVIRTD_ARGS="-l"\n', True),
        ("export LIBVIRTD_ARGS='--timeout 120 --listen'\n", True),
        ('LIBVIRTD_ARGS="--listen"\nLIBVIRTD_ARGS="--timeout 120"\n', False),  # the last counts
        ('#LIBVIRTD_ARGS="--listen"\n', False),
        ("", False),
    ],
)
def test_listen_is_read_as_the_shell_would(text, listening):
    """--listen or -l in the last LIBVIRTD_ARGS assignment, quoted or not, commented lines aside."""
    assert startup.has_listen(text) is listening
    assert startup.has_listen(startup.with_listen(text, True))
    assert not startup.has_listen(startup.with_listen(text, False))


def test_restart_without_systemd_says_how_and_fails(root):
    """--restart under a sandbox root: settings written, then one error saying what to run."""
    install_certificates(root)
    result = invoke("enable", "--restart")
    assert result.exit_code == 1
    assert f"changed {root}/{LIBVIRTD_CONF}" in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: not restarted (KVMHOOK_ROOT is {root}, not this host): "
        "systemctl restart libvirtd.service "
        "(without systemd: stop libvirtd, start it again; SIGHUP is not enough)"
    )
    assert tls.status(handshake=False).secured


@pytest.fixture
def systemctl(tmp_path, monkeypatch) -> Path:
    """A fake systemctl on PATH that logs its arguments, with systemd taken as running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(startup, "_systemd_runs_root", lambda: True)
    return log


def test_socket_activation_under_systemd_enables_and_restarts_through_systemctl(root, systemctl):
    """Under systemd: systemctl enables the socket; --restart stops libvirtd, starts both."""
    install_certificates(root)
    enable_units(root, {"sockets.target.wants/libvirtd.socket": "/l/libvirtd.socket"}, [])
    result = invoke("enable", "--restart")
    assert result.exit_code == 0, result.output
    assert lines(systemctl) == [
        "enable libvirtd-tls.socket",
        "stop libvirtd.service",
        "start libvirtd-tls.socket",
        "start libvirtd.service",
    ]
    assert "ran: systemctl start libvirtd-tls.socket" in result.output


def test_modular_disable_under_systemd_stops_the_tls_socket_and_restarts_virtqemud(root, systemctl):
    """Modular, under systemd: the TLS socket disabled and stopped, virtqemud restarted."""
    enable_units(
        root,
        {
            "sockets.target.wants/virtproxyd.socket": "/l/virtproxyd.socket",
            "sockets.target.wants/virtproxyd-tls.socket": "/l/virtproxyd-tls.socket",
        },
        [],
    )
    shutil.copy(DATA / "libvirtd.conf", root / "etc/libvirt/virtproxyd.conf")
    result = invoke("disable", "--restart")
    assert result.exit_code == 0, result.output
    assert lines(systemctl) == [
        "disable virtproxyd-tls.socket",
        "stop virtproxyd.service",
        "stop virtproxyd-tls.socket",
        "start virtproxyd.service",
        "restart virtqemud.service",
    ]


def test_a_failing_systemctl_enable_changes_no_file(root, systemctl):
    """systemctl enable failing: one error with its exit, and no configuration file changed."""
    install_certificates(root)
    enable_units(root, {"sockets.target.wants/libvirtd.socket": "/l/libvirtd.socket"}, [])
    fake = systemctl.parent / "bin/systemctl"
    fake.write_text("#!/bin/sh\necho 'unit masked' >&2\nexit 1\n")
    before = snapshot(root)
    result = invoke("enable")
    assert result.exit_code == 1
    assert result.output == "Error: systemctl enable libvirtd-tls.socket failed: unit masked\n"
    assert snapshot(root) == before


# status


@pytest.mark.parametrize(
    ("breaks", "item"),
    [
        ("a missing certificate", "qemu client certificate"),
        ("listen_tls off", "libvirtd.conf"),
        ("auth_tls polkit", "libvirtd.conf"),
        ("cert_file elsewhere", "libvirtd.conf"),
        ("qemu.conf without migrate verify", "qemu.conf"),
        ("qemu.conf without migrate force", "qemu.conf"),
        ("no --listen", "startup"),
    ],
)
def test_each_status_item_fails_on_its_own(secured, breaks, item):
    """Breaking one thing makes exactly its item fail, with a reason, and the host not secured."""
    assert tls.status(handshake=False).secured
    conf, qemu = secured / LIBVIRTD_CONF, secured / QEMU_CONF
    if breaks == "a missing certificate":
        (secured / "etc/pki/qemu/client-cert.pem").unlink()
    elif breaks == "listen_tls off":
        set_conf(conf, "listen_tls", "0")
    elif breaks == "auth_tls polkit":
        set_conf(conf, "auth_tls", '"polkit"')
    elif breaks == "cert_file elsewhere":
        set_conf(conf, "cert_file", '"/etc/ssl/other.pem"')
    elif breaks == "qemu.conf without migrate verify":
        set_conf(qemu, "migrate_tls_x509_verify", None)
    elif breaks == "qemu.conf without migrate force":
        set_conf(qemu, "migrate_tls_force", "0")
    else:
        defaults = secured / DEFAULTS
        defaults.write_text(startup.with_listen(defaults.read_text(), False))
    result = tls.status(handshake=False)
    assert not result.secured
    assert failing_items(result) == {item}
    detail = next(found.detail for found in result.items if found.name == item)
    assert detail


def test_status_json_lists_every_item_and_exits_1_when_not_secured(secured):
    """--json: secured false, one entry per item, the handshake failing (nothing listens)."""
    result = invoke("status", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["secured"] is False
    assert [item["name"] for item in report["items"]] == [
        "agent certificate",
        "libvirt server certificate",
        "libvirt client certificate",
        "qemu server certificate",
        "qemu client certificate",
        "vnc server certificate",
        "libvirtd.conf",
        "startup",
        "tls handshake",
        "qemu.conf",
    ]
    assert report["warnings"] == []  # valid for longer than the alert period (15 days)
    failed = [item for item in report["items"] if not item["ok"]]
    assert [item["name"] for item in failed] == ["tls handshake"]
    assert "Connection refused" in failed[0]["detail"]


class TlsServer:
    """A TLS listener on 127.0.0.1 in a thread that, like libvirtd, demands a client certificate."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            connection.settimeout(5)
            try:
                with self.context.wrap_socket(connection, server_side=True) as session:
                    session.recv(1)  # libvirtd waits for the client to speak
            except OSError:
                pass  # the client's certificate refused, or the client left
            finally:
                connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def serve(secured, tmp_path):
    """Start a TlsServer with the given files on the port libvirtd.conf names."""
    servers = []

    def start(cert: Path, key: Path, ca: Path) -> TlsServer:
        server = TlsServer(cert, key, ca)
        servers.append(server)
        set_conf(secured / LIBVIRTD_CONF, "tls_port", f'"{server.port}"')
        return server

    yield start
    for server in servers:
        server.stop()


def server_files(root: Path) -> tuple[Path, Path, Path]:
    """The installed libvirt server certificate, its key and the CA file."""
    libvirt = root / "etc/pki/libvirt"
    return libvirt / "servercert.pem", libvirt / "private/serverkey.pem", root / CA_FILE


def handshake(result: tls.Report) -> tls.Check:
    return next(item for item in result.items if item.name == "tls handshake")


def test_status_is_secured_and_exits_0_when_everything_holds(secured, serve):
    """Certificates installed, TLS enabled, a listener with the server cert: secured, exit 0."""
    serve(*server_files(secured))
    result = invoke("status")
    assert result.exit_code == 0, result.output
    output = result.output.splitlines()
    assert output[-1] == "secured"
    assert all(line.startswith("ok ") for line in output[:-1]), result.output
    assert len(output) == 11


def test_handshake_succeeds_with_the_installed_client_certificate(secured, serve):
    """The handshake item holds against a server with our CA's certificate for this host's name."""
    server = serve(*server_files(secured))
    item = handshake(tls.status())
    assert item.ok, item.detail
    assert f"127.0.0.1 port {server.port} as {fqdn()}" in item.detail


def test_handshake_fails_with_a_server_certificate_from_another_ca(secured, serve, tmp_path):
    """A server whose certificate another CA signed fails verification: not secured."""
    key, cert = host_identity(testca.shared().other)
    (tmp_path / "other-key.pem").write_bytes(key)
    (tmp_path / "other-cert.pem").write_bytes(cert)
    serve(tmp_path / "other-cert.pem", tmp_path / "other-key.pem", server_files(secured)[2])
    result = tls.status()
    item = handshake(result)
    assert not item.ok and not result.secured
    assert "the server's certificate does not verify" in item.detail


def test_handshake_fails_when_the_server_refuses_our_client_certificate(secured, serve, tmp_path):
    """A server trusting only another CA rejects our client certificate: the item fails."""
    (tmp_path / "other-ca.pem").write_bytes(testca.shared().other.bundle())
    cert, key, _ca = server_files(secured)
    serve(cert, key, tmp_path / "other-ca.pem")
    item = handshake(tls.status())
    assert not item.ok, item.detail
