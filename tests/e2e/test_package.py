"""The .deb's life on a host: install, upgrade, remove, purge, and a hook that was there before."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import systemdunits
from harness import (
    CLOUDSTACK_STANDIN,
    CUSTOM,
    GUEST_PREFIX,
    HOOK,
    LOG,
    REPO,
    apt,
    apt_install,
    cloudstack_agent_deb,
    define_guest,
    package_state,
    run,
    version,
)

PREVIOUS = Path("/etc/libvirt/hooks/qemu.pre-kvmhook")
CHAIN = CUSTOM / "all_00-previous-qemu-hook"
LOGROTATE = Path("/etc/logrotate.d/kvmhook")
XML = b"<domain><name>pkgtest</name></domain>"
UNITDIR = Path("/lib/systemd/system")
RENEW_SETTINGS = Path("/etc/default/kvmhook-cert-renew")
TIMER_WANTS = Path("/etc/systemd/system/timers.target.wants", systemdunits.TIMER)
METRICS_TIMER_WANTS = TIMER_WANTS.with_name(systemdunits.METRICS_TIMER)
TEXTFILE = Path(systemdunits.TEXTFILE_DIR, "kvmhook.prom")
CLOUDSTACK_AGENT_HOOK = Path("/usr/share/cloudstack-agent/lib/libvirtqemuhook")


@pytest.fixture
def clean_host(prerequisites):
    """No kvmhook package, no qemu hook: the state of a host before the first install."""
    if package_state() != "not-installed":
        apt("purge", "kvmhook")
    for leftover in (HOOK, PREVIOUS):
        leftover.unlink(missing_ok=True)
    yield
    if package_state() != "not-installed":
        apt("purge", "kvmhook")


def call_hook(*args: str) -> subprocess.CompletedProcess:
    """Run the installed hook as libvirtd would: cleared environment, XML on stdin."""
    return subprocess.run(
        [str(HOOK), *args],
        input=XML,
        capture_output=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        timeout=60,
        check=False,
    )


def scripts_in_pyproject() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([\w-]+) = ", section, re.MULTILINE)


def test_package_installs_hook_custom_dir_logrotate_and_commands(clean_host, debs):
    """The installed files: conffile launcher, root 0755 custom dir, logrotate, working commands."""
    apt_install(debs[1])
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "kvmhook").stdout
    assert str(HOOK) in conffiles and str(LOGROTATE) in conffiles
    assert HOOK.read_bytes() == (REPO / "kvmhook/data/qemu-hook").read_bytes()
    assert stat.S_IMODE(HOOK.stat().st_mode) == 0o755
    info = CUSTOM.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o755)
    assert "/var/log/libvirt/qemu-hook.log" in LOGROTATE.read_text()
    run("logrotate", "--debug", str(LOGROTATE))
    for command in scripts_in_pyproject():
        assert Path("/usr/bin", command).is_file(), command
    assert version() in run("/usr/bin/kvmhook", "--version").stdout
    # The system python3 imports the package from dist-packages, with Debian's click.
    assert "no scripts run for start" in run("/usr/bin/kvmhook", "hooks", "list", "start").stdout
    result = call_hook("pkgtest", "start", "begin", "-")
    assert (result.returncode, result.stdout) == (0, b"")
    assert "domain=pkgtest op=start subop=begin" in LOG.read_text()
    # The operator's guide, uncompressed so its links between pages work.
    doc = Path("/usr/share/doc/kvmhook")
    assert (doc / "README.md").is_file() and (doc / "docs/hook.md").is_file()
    # Every hook module the launcher needs is installed (the folders are packages too).
    for package in ("hook", "certs", "host", "net", "cli"):
        assert Path(f"/usr/lib/python3/dist-packages/kvmhook/{package}/__init__.py").is_file()


def test_installed_keystore_tools_run_on_the_distribution_libraries(clean_host, debs, tmp_path):
    """The packaged tools work with Debian's cryptography and psutil: a key, keystore and CSR."""
    apt_install(debs[1])
    agent = tmp_path / "agent"
    agent.mkdir()
    props, keystore, csr = agent / "agent.properties", agent / "cloud.jks", agent / "cloud.csr"
    made = run("/usr/bin/keystore-setup", str(props), str(keystore), "pass-phrase", "30", str(csr))
    assert made.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert csr.read_text() == made.stdout
    listing = run("keytool", "-list", "-keystore", str(keystore), "-storepass", "pass-phrase")
    assert "cloud, " in listing.stdout and "PrivateKeyEntry" in listing.stdout
    status = run("/usr/bin/kvmhook", "cert", "status", "--agent-dir", str(agent), check=False)
    assert status.returncode == 1 and "cloud.crt: No such file or directory" in status.stdout


def test_upgrade_keeps_the_edited_timeout_and_remove_keeps_scripts_and_log(clean_host, debs):
    """An edited timeoutSeconds survives an upgrade; remove keeps custom scripts, log and hook."""
    apt_install(debs[1])
    HOOK.write_text(HOOK.read_text().replace("timeoutSeconds = 10 * 60", "timeoutSeconds = 42"))
    script = CUSTOM / "all_operator"
    script.write_text("#!/bin/sh\necho operator script ran\n")
    script.chmod(0o755)
    try:
        assert call_hook("pkgtest", "start", "begin", "-").returncode == 0
        assert "(timeout 42s)" in LOG.read_text()
        apt_install(debs[2])
        installed = run("dpkg-query", "-W", "-f=${Version}", "kvmhook").stdout
        assert installed == f"{version()}-2"
        assert "timeoutSeconds = 42\n" in HOOK.read_text()
        apt("remove", "kvmhook")
        assert package_state() == "config-files"
        assert script.is_file() and LOG.is_file()
        # The kept launcher finds no kvmhook package: it exits 0 and says so.
        result = call_hook("pkgtest", "start", "begin", "-")
        assert (result.returncode, result.stdout) == (0, b"")
        assert b"no custom scripts run" in result.stderr
        apt("purge", "kvmhook")
        assert script.is_file(), "purge must keep the operator's custom scripts"
        assert not HOOK.exists() and not LOGROTATE.exists()
    finally:
        script.unlink(missing_ok=True)


def test_an_existing_hook_is_kept_chained_and_restored_on_purge(clean_host, debs, scratch):
    """A hand-made qemu hook survives install (and runs first), remove, and comes back on purge."""
    foreign = '#!/bin/sh\necho "$* $(sha256sum | cut -d" " -f1)" >> /run/kvmhook-e2e/foreign\n'
    HOOK.parent.mkdir(parents=True, exist_ok=True)
    HOOK.write_text(foreign)
    HOOK.chmod(0o755)
    result = apt_install(debs[1])
    assert f"kept as {PREVIOUS}" in result.stderr + result.stdout
    assert PREVIOUS.read_text() == foreign
    assert os.readlink(CHAIN) == str(PREVIOUS)
    assert "kvmhook.qemu" in HOOK.read_text()
    digest = run("sh", "-c", f"printf '%s' '{XML.decode()}' | sha256sum").stdout.split()[0]
    assert call_hook("pkgtest", "prepare", "begin", "-").returncode == 0
    assert (scratch / "foreign").read_text() == f"pkgtest prepare begin - {digest}\n"
    apt("remove", "kvmhook")
    # Removed, not purged: the kept launcher hands the call to the previous hook.
    assert call_hook("pkgtest", "release", "end", "-").returncode == 0
    assert (scratch / "foreign").read_text().endswith(f"pkgtest release end - {digest}\n")
    apt("purge", "kvmhook")
    assert HOOK.read_text() == foreign
    assert not PREVIOUS.exists() and not CHAIN.exists() and not CHAIN.is_symlink()
    assert run("dpkg-divert", "--listpackage", str(HOOK)).stdout.strip() == ""


def without_previous_hook(libvirtd) -> None:
    """Purged, the hook purge put back removed, and libvirtd restarted, since it knew that hook:
    a stand-in for CloudStack's hook must not run in the tests after."""
    if package_state() != "not-installed":
        apt("purge", "kvmhook")
    HOOK.unlink(missing_ok=True)
    libvirtd.restart()


def test_cloudstacks_hook_is_kept_aside_unchained_and_guests_start_in_normal_time(
    clean_host, debs, libvirtd, scratch
):
    """Over CloudStack's hook (a stand-in running custom/all_* as it does), a guest starts in
    seconds, not after the timeout: the hook is kept aside, never chained; remove hands calls
    to it, and purge restores it."""
    HOOK.parent.mkdir(parents=True, exist_ok=True)
    HOOK.write_text(CLOUDSTACK_STANDIN)
    HOOK.chmod(0o755)
    name = f"cs{os.getpid()}"
    try:
        installed = apt_install(debs[1])
        # Short enough that a chained stand-in (one timeout per call) fails in about a minute.
        HOOK.write_text(HOOK.read_text().replace("timeoutSeconds = 10 * 60", "timeoutSeconds = 20"))
        libvirtd.restart()  # the launcher and its timeout, for sure
        define_guest(name)
        began = time.monotonic()
        run("virsh", "start", GUEST_PREFIX + name, timeout=300)
        took = time.monotonic() - began
        assert took < 15, (
            f"the guest took {took:.0f} s to start: a hook call waited for its timeout"
        )
        assert not (scratch / "cloudstack-hook").exists(), "the stand-in ran"
        assert f"{PREVIOUS} is CloudStack's qemu hook: kept aside, not chained" in (
            installed.stderr + installed.stdout
        )
        assert PREVIOUS.read_text() == CLOUDSTACK_STANDIN and not CHAIN.is_symlink()
        run("virsh", "destroy", GUEST_PREFIX + name)
        apt("remove", "kvmhook")
        # The kept launcher hands the call to CloudStack's hook, which runs custom/ once.
        began = time.monotonic()
        assert call_hook("pkgtest", "prepare", "begin", "-").returncode == 0
        assert time.monotonic() - began < 10
        assert (scratch / "cloudstack-hook").read_text() == "0 pkgtest prepare begin -\n"
        apt("purge", "kvmhook")
        assert HOOK.read_text() == CLOUDSTACK_STANDIN
        assert not PREVIOUS.exists() and not CHAIN.is_symlink()
    finally:
        run("virsh", "destroy", GUEST_PREFIX + name, check=False)
        run("virsh", "undefine", GUEST_PREFIX + name, check=False)
        without_previous_hook(libvirtd)


def test_upgrade_unchains_a_byte_identical_copy_of_cloudstack_agents_hook(
    clean_host, debs, libvirtd
):
    """A copy of cloudstack-agent's own file, without any marker, is not chained on install,
    and an upgrade removes the link an earlier kvmhook made to it, saying so in one line."""
    made = not CLOUDSTACK_AGENT_HOOK.parents[1].exists()
    copy = '#!/bin/sh\nfor s in /etc/libvirt/hooks/custom/all_*; do "$s" "$@"; done\n'
    CLOUDSTACK_AGENT_HOOK.parent.mkdir(parents=True, exist_ok=True)
    CLOUDSTACK_AGENT_HOOK.write_text(copy)
    HOOK.parent.mkdir(parents=True, exist_ok=True)
    HOOK.write_text(copy)
    HOOK.chmod(0o755)
    try:
        installed = apt_install(debs[1])
        assert f"{PREVIOUS} is CloudStack's qemu hook" in installed.stderr + installed.stdout
        assert not CHAIN.is_symlink()
        CHAIN.symlink_to(PREVIOUS)  # as kvmhook did before it knew CloudStack's hook
        upgraded = apt_install(debs[2])
        output = (upgraded.stderr + upgraded.stdout).splitlines()
        said = [line for line in output if str(CHAIN) in line]
        assert len(said) == 1 and said[0].startswith(f"kvmhook: removed {CHAIN}: "), said
        assert not CHAIN.is_symlink() and PREVIOUS.read_text() == copy
        apt("purge", "kvmhook")
        assert HOOK.read_text() == copy and not PREVIOUS.exists()
    finally:
        without_previous_hook(libvirtd)
        if made:
            shutil.rmtree(CLOUDSTACK_AGENT_HOOK.parents[1], ignore_errors=True)


def test_install_and_purge_reload_a_running_libvirtd(clean_host, debs, libvirtd, scratch):
    """A hookless libvirtd runs the hook right after install, and starts guests after purge."""
    libvirtd.restart()  # now it knows there is no hook
    name = f"pkg{os.getpid()}"
    define_guest(name)
    marker = CUSTOM / "prepare_mark"
    try:
        apt_install(debs[1])
        marker.write_text('#!/bin/sh\necho "$1" >> /run/kvmhook-e2e/marks\n')
        marker.chmod(0o755)
        run("virsh", "start", GUEST_PREFIX + name)
        assert (scratch / "marks").read_text() == f"{GUEST_PREFIX}{name}\n"
        run("virsh", "destroy", GUEST_PREFIX + name)
        marker.unlink()
        apt("purge", "kvmhook")
        time.sleep(0.5)  # the reload is asynchronous in the daemon
        # libvirtd knew a hook existed; without the reload this start would fail.
        run("virsh", "start", GUEST_PREFIX + name)
    finally:
        marker.unlink(missing_ok=True)
        run("virsh", "destroy", GUEST_PREFIX + name, check=False)
        run("virsh", "undefine", GUEST_PREFIX + name, check=False)


def test_package_installs_man_pages_and_bash_completions(clean_host, debs):
    """Each command has a gzipped section 1 man page and a bash completion that registers it."""
    apt_install(debs[1])
    for command in scripts_in_pyproject():
        page = Path("/usr/share/man/man1", f"{command}.1.gz")
        text = run("zcat", str(page)).stdout
        assert ".SH NAME" in text and command.replace("-", "\\-") + " \\- " in text
        completion = Path("/usr/share/bash-completion/completions", command)
        registered = run("bash", "-c", f"source {completion} && complete -p {command}").stdout
        assert f" {command}" in registered
    kvmhook_page = run("zcat", "/usr/share/man/man1/kvmhook.1.gz").stdout
    for subcommand in ("capacity", "cert renew", "hooks list", "maintenance enter", "tls status"):
        assert f"kvmhook {subcommand}" in kvmhook_page, subcommand
    completed = run(
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/kvmhook; "
        'COMP_WORDS=(kvmhook cert ""); COMP_CWORD=2; _kvmhook; echo "${COMPREPLY[*]}"',
    ).stdout
    assert completed.split() == ["renew", "rollback", "status"]


def timer_state(unit: str = systemdunits.TIMER) -> str:
    """`systemctl is-enabled` of a unit (the renewal timer by default), read from the unit
    files (no PID 1 needed)."""
    return run("systemctl", "is-enabled", unit, check=False).stdout.strip()


def test_renewal_units_are_installed_verified_and_not_enabled(clean_host, debs):
    """The timer and service land in /lib/systemd/system, pass systemd-analyze verify,
    and neither install nor upgrade enables the timer."""
    apt_install(debs[1])
    listing = run("dpkg", "-L", "kvmhook").stdout.splitlines()
    for name in systemdunits.UNITS:
        assert str(UNITDIR / name) in listing, name
        assert (UNITDIR / name).read_bytes() == (systemdunits.SOURCE / name).read_bytes()
    systemdunits.check_contract(
        (UNITDIR / systemdunits.SERVICE).read_text(), (UNITDIR / systemdunits.TIMER).read_text()
    )
    assert str(RENEW_SETTINGS) in run("dpkg-query", "-W", "-f=${Conffiles}", "kvmhook").stdout
    assert RENEW_SETTINGS.read_bytes() == systemdunits.SETTINGS.read_bytes()
    assert not TIMER_WANTS.is_symlink() and timer_state() == "disabled"
    apt_install(debs[2])
    assert not TIMER_WANTS.is_symlink() and timer_state() == "disabled"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    assert systemdunits.verify(*(UNITDIR / name for name in systemdunits.UNITS)) == ""


def test_an_enabled_timer_survives_upgrade_and_remove_and_purge_forgets_it(clean_host, debs):
    """The operator's `systemctl enable` holds over an upgrade and a remove; purge disables."""
    apt_install(debs[1])
    try:
        run("systemctl", "enable", systemdunits.TIMER)
        assert TIMER_WANTS.is_symlink() and timer_state() == "enabled"
        apt_install(debs[2])
        assert TIMER_WANTS.is_symlink() and timer_state() == "enabled"
        apt("remove", "kvmhook")
        apt_install(debs[2])
        assert TIMER_WANTS.is_symlink() and timer_state() == "enabled"
        apt("purge", "kvmhook")
        assert not TIMER_WANTS.is_symlink()
        apt_install(debs[1])
        assert not TIMER_WANTS.is_symlink() and timer_state() == "disabled"
    finally:
        TIMER_WANTS.unlink(missing_ok=True)


def test_renewal_service_command_line_parses_with_the_installed_kvmhook(clean_host, debs):
    """The service's command line, as shipped and with the settings file's examples
    uncommented, is one the installed `kvmhook cert renew` accepts."""
    apt_install(debs[1])
    service = (UNITDIR / systemdunits.SERVICE).read_text()
    examples = systemdunits.examples(RENEW_SETTINGS.read_text())
    for argv in (systemdunits.exec_argv(service), systemdunits.exec_argv(service, examples)):
        shown = run(*argv, "--help")
        assert "--if-expiring-within" in shown.stdout, argv


def test_renewal_service_run_when_not_due_says_one_line_and_exits_0(clean_host, debs, tmp_path):
    """What a timer run logs on a host whose certificate is far from expiry: one line, exit 0."""
    apt_install(debs[1])
    agent = tmp_path / "agent"
    agent.mkdir()
    run(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "300",
        "-subj", "/CN=kvmhook-e2e", "-keyout", str(agent / "cloud.key"),
        "-out", str(agent / "cloud.crt"),
    )  # fmt: skip
    before = {path.name: path.read_bytes() for path in agent.iterdir()}
    argv = systemdunits.exec_argv((UNITDIR / systemdunits.SERVICE).read_text())
    lock_dir = Path("/run/kvmhook")  # the renewal's lock is taken even when nothing is due
    made = not lock_dir.exists()
    try:
        result = run(*argv, "--agent-dir", str(agent), check=False)
    finally:
        if made:
            shutil.rmtree(lock_dir, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr
    said = (result.stdout + result.stderr).strip().splitlines()
    assert len(said) == 1, said
    assert {path.name: path.read_bytes() for path in agent.iterdir()} == before


def test_metrics_units_and_alert_rules_are_installed_verified_and_the_timer_enabled(
    clean_host, debs
):
    """The metrics timer and service land in /lib/systemd/system and pass systemd-analyze
    verify; install enables the timer (the service is static: the timer starts it); the
    alert rules are in /usr/share/kvmhook/prometheus."""
    apt_install(debs[1])
    listing = run("dpkg", "-L", "kvmhook").stdout.splitlines()
    for name in systemdunits.METRICS_UNITS:
        assert str(UNITDIR / name) in listing, name
        assert (UNITDIR / name).read_bytes() == (systemdunits.SOURCE / name).read_bytes()
    systemdunits.check_metrics_contract(
        (UNITDIR / systemdunits.METRICS_SERVICE).read_text(),
        (UNITDIR / systemdunits.METRICS_TIMER).read_text(),
    )
    rules = Path(systemdunits.INSTALLED_ALERT_RULES)
    assert str(rules) in listing
    assert rules.read_bytes() == systemdunits.ALERT_RULES.read_bytes()
    assert stat.S_IMODE(rules.stat().st_mode) == 0o644
    assert METRICS_TIMER_WANTS.is_symlink() and timer_state(systemdunits.METRICS_TIMER) == "enabled"
    assert timer_state(systemdunits.METRICS_SERVICE) == "static"
    # The package depends on the library `kvmhook metrics` writes with.
    depends = run("dpkg-query", "-W", "-f=${Depends}", "kvmhook").stdout
    assert "python3-prometheus-client" in depends
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    units = [UNITDIR / name for name in systemdunits.METRICS_UNITS]
    assert systemdunits.verify(*units) == ""


def test_a_disabled_metrics_timer_stays_off_over_upgrade_and_remove_drops_its_file(
    clean_host, debs
):
    """The operator's `systemctl disable` holds over an upgrade and a remove and reinstall;
    remove deletes the last kvmhook.prom (node_exporter would serve it for ever); purge
    forgets the choice, so a new install enables the timer again."""
    # The top of what this test makes for the file, if anything: removed at the end; a
    # kvmhook.prom already there is put back.
    made = next((path for path in reversed(TEXTFILE.parents) if not path.exists()), None)
    saved = TEXTFILE.read_bytes() if TEXTFILE.exists() else None
    apt_install(debs[1])
    try:
        run("systemctl", "disable", systemdunits.METRICS_TIMER)
        assert not METRICS_TIMER_WANTS.is_symlink()
        apt_install(debs[2])
        assert timer_state(systemdunits.METRICS_TIMER) == "disabled"
        TEXTFILE.parent.mkdir(parents=True, exist_ok=True)
        TEXTFILE.write_text("kvmhook_info 1\n")
        partial = TEXTFILE.with_name(TEXTFILE.name + ".1234.5678")
        partial.write_text("kvmhook_")
        apt("remove", "kvmhook")
        assert not TEXTFILE.exists() and not partial.exists()
        apt_install(debs[2])
        assert timer_state(systemdunits.METRICS_TIMER) == "disabled"
        apt("purge", "kvmhook")
        apt_install(debs[1])
        assert METRICS_TIMER_WANTS.is_symlink()
        assert timer_state(systemdunits.METRICS_TIMER) == "enabled"
    finally:
        METRICS_TIMER_WANTS.unlink(missing_ok=True)
        TEXTFILE.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif saved is not None:
            TEXTFILE.write_bytes(saved)


# --- living beside cloudstack-agent: its postinst copies its hook over the launcher ---------

LAUNCHER = (REPO / "kvmhook/data/qemu-hook").read_bytes()
NOT_LAUNCHER = "is not kvmhook's launcher"


@pytest.fixture
def cloudstack_agent(clean_host, debs, tmp_path):
    """The stand-in cloudstack-agent .deb, revisions 1 and 2; purged afterwards with what
    its postinst copied, and kvmhook's dependencies installed (`dpkg -i` resolves none)."""
    apt_install(debs[1])
    apt("purge", "kvmhook")
    for leftover in (HOOK, PREVIOUS):
        leftover.unlink(missing_ok=True)
    yield {1: cloudstack_agent_deb(tmp_path, "4.19.0"), 2: cloudstack_agent_deb(tmp_path, "4.19.1")}
    if package_state() != "not-installed":
        apt("purge", "kvmhook")
    run("dpkg", "--purge", "cloudstack-agent")
    for leftover in (HOOK, PREVIOUS):
        leftover.unlink(missing_ok=True)


def assert_launcher_back() -> None:
    """The end of every order: the launcher at HOOK, CloudStack's hook aside and unchained,
    dpkg settled, and `hooks list` without the warning."""
    assert HOOK.read_bytes() == LAUNCHER
    assert PREVIOUS.read_text() == CLOUDSTACK_STANDIN and not CHAIN.is_symlink()
    status = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "kvmhook", "cloudstack-agent")
    assert status.stdout.split() == ["ii", "ii"], status.stdout
    listing = run("/usr/bin/kvmhook", "hooks", "list", "start")
    assert NOT_LAUNCHER not in listing.stderr


def test_the_trigger_on_cloudstack_agents_hook_is_registered(cloudstack_agent, debs):
    """kvmhook's file trigger on cloudstack-agent's hook, noawait, is known to dpkg."""
    run("dpkg", "-i", str(debs[1]))
    interests = Path("/var/lib/dpkg/triggers/File").read_text().splitlines()
    assert f"{CLOUDSTACK_AGENT_HOOK} kvmhook/noawait" in interests


@pytest.mark.parametrize(
    "order",
    [
        "both in one dpkg -i",
        "cloudstack-agent after kvmhook, then upgraded",
        "cloudstack-agent unpacked, then dpkg --configure -a",
        "kvmhook after cloudstack-agent, then cloudstack-agent reinstalled",
    ],
)
def test_the_launcher_is_back_after_cloudstack_agents_postinst_in_every_order(
    cloudstack_agent, debs, order
):
    """Whatever order dpkg runs kvmhook's trigger and cloudstack-agent's configure in, the
    launcher is back at the end of the run and CloudStack's hook is kept aside, unchained."""
    kvmhook, agent = str(debs[1]), str(cloudstack_agent[1])
    if order == "both in one dpkg -i":
        run("dpkg", "-i", kvmhook, agent)
    elif order.startswith("cloudstack-agent after"):
        run("dpkg", "-i", kvmhook)
        run("dpkg", "-i", agent)
        assert_launcher_back()
        run("dpkg", "-i", str(cloudstack_agent[2]))
    elif order.startswith("cloudstack-agent unpacked"):
        run("dpkg", "-i", kvmhook)
        run("dpkg", "--unpack", agent)
        run("dpkg", "--configure", "-a")
    else:
        run("dpkg", "-i", agent)
        assert HOOK.read_text() == CLOUDSTACK_STANDIN  # its postinst copied it
        run("dpkg", "-i", kvmhook)
        assert_launcher_back()
        run("dpkg", "-i", agent)
    assert_launcher_back()
    run("dpkg", "--purge", "kvmhook")
    assert HOOK.read_text() == CLOUDSTACK_STANDIN and not PREVIOUS.exists()


def test_hooks_list_warns_when_cloudstacks_hook_is_copied_over_and_reinstall_repairs(
    cloudstack_agent, debs
):
    """A copy made outside dpkg (no trigger, no run end) is named by `hooks list`; reinstalling
    kvmhook puts the launcher back, as the warning says."""
    run("dpkg", "-i", str(debs[1]), str(cloudstack_agent[1]))
    shutil.copy2(CLOUDSTACK_AGENT_HOOK, HOOK)
    listing = run("/usr/bin/kvmhook", "hooks", "list", "start")
    assert f"warning: {HOOK} {NOT_LAUNCHER}: it is another program" in listing.stderr
    run("dpkg", "-i", str(debs[1]))
    assert_launcher_back()
