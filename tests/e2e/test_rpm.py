"""The RPM: `make rpm` builds it from this tree; its files, flags, requirements and scriptlets.

Building needs rpmbuild (Debian's `rpm` package), not root; nothing is installed.
The scriptlets run in a sandbox root with rpm, systemctl and pidof stubbed: they
never touch this machine's /etc/libvirt or signal its libvirtd.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import systemdunits
from harness import CLOUDSTACK_STANDIN

REPO = Path(__file__).resolve().parents[2]
HOOKDIR = "/etc/libvirt/hooks"
LAUNCHER = f"{HOOKDIR}/qemu"
CUSTOM = f"{HOOKDIR}/custom"
LOGROTATE = "/etc/logrotate.d/kvmhook"
UNITDIR = "/usr/lib/systemd/system"
RENEW_SETTINGS = "/etc/sysconfig/kvmhook-cert-renew"
CLOUDSTACK_AGENT_HOOK = "/usr/share/cloudstack-agent/lib/libvirtqemuhook"
TEXTFILE_DIR = systemdunits.TEXTFILE_DIR
SITELIB = r"/usr/lib(64)?/python3[.\d]*/(site|dist)-packages"
REQUIREMENTS = (
    "python3",
    "python3-libvirt",
    "python3-prometheus_client",
    "python3-psutil",
    "python3-structlog",
    "python3-click",
    "python3-cryptography",
    "python3-cs",
    "python3-requests",
)


def pyproject() -> str:
    return (REPO / "pyproject.toml").read_text()


def version() -> str:
    match = re.search(r'^version = "([^"]+)"$', pyproject(), re.MULTILINE)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def console_scripts() -> list[str]:
    section = pyproject().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    names = re.findall(r"^([\w.-]+)\s*=", section, re.MULTILINE)
    assert names, "no [project.scripts] in pyproject.toml"
    return names


def run(*argv: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, text output captured; a failure shows its output."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module")
def rpm_file() -> Path:
    """dist/kvmhook-<version>-1.noarch.rpm, freshly built by `make rpm`."""
    missing = [tool for tool in ("make", "rpmbuild", "rpm2archive") if shutil.which(tool) is None]
    if "rpmbuild" in missing:
        pytest.skip("rpmbuild not installed")
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    dist = run("rpm", "--eval", "%{?dist}").stdout.strip()
    package = REPO / "dist" / f"kvmhook-{version()}-1{dist}.noarch.rpm"
    package.unlink(missing_ok=True)
    run("make", "-C", str(REPO), "rpm", timeout=600)
    assert package.is_file(), f"make rpm did not leave {package}"
    return package


def query(package: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, str(package)).stdout


def files(package: Path) -> dict[str, str]:
    """Each packaged path: 'flags perms user group' as rpm records them."""
    out = query(
        package,
        "--qf",
        "[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILEUSERNAME}|%{FILEGROUPNAME}|%{FILENAMES}\n]",
    )
    table = {}
    for line in out.splitlines():
        flags, perms, user, group, path = line.split("|")
        table[path] = f"{flags} {perms} {user} {group}"
    return table


@pytest.fixture(scope="module")
def payload(rpm_file, tmp_path_factory) -> Path:
    """The package's payload unpacked into a directory, modes kept."""
    root = tmp_path_factory.mktemp("payload")
    archive = subprocess.run(
        ["rpm2archive", "-n", "-"],
        stdin=rpm_file.open("rb"),
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root)
    return root


def sitelib_of(listing: list[str]) -> str:
    for path in listing:
        match = re.fullmatch(SITELIB + "/kvmhook/qemu.py", path)
        if match:
            return path[: -len("/kvmhook/qemu.py")]
    raise AssertionError(f"no kvmhook/qemu.py under a python3 sitelib in {listing}")


def test_file_list_matches_the_deb(rpm_file):
    """The rpm holds the launcher, custom dir, logrotate, each console script, both packages."""
    listing = query(rpm_file, "-l").splitlines()
    for path in (LAUNCHER, CUSTOM, LOGROTATE):
        assert path in listing, path
    for command in console_scripts():
        assert f"/usr/bin/{command}" in listing, command
    sitelib = sitelib_of(listing)
    for module in ("kvmhook/qemu.py", "kvmhook/hook/dispatch.py", "keystore/__init__.py"):
        assert f"{sitelib}/{module}" in listing, module
    dist_info = [
        path for path in listing if re.fullmatch(SITELIB + r"/kvmhook-[^/]+\.dist-info", path)
    ]
    assert dist_info, "no kvmhook-*.dist-info directory"


def test_file_list_has_man_pages_and_bash_completions(rpm_file):
    """The rpm holds a section 1 man page and a bash completion for each console script."""
    listing = query(rpm_file, "-l").splitlines()
    for command in console_scripts():
        assert any(re.fullmatch(rf"/usr/share/man/man1/{command}\.1(\.gz)?", p) for p in listing)
        assert f"/usr/share/bash-completion/completions/{command}" in listing, command


def test_launcher_and_logrotate_are_config_noreplace_and_custom_dir_is_root_0755(rpm_file):
    """Launcher and logrotate policy are %config(noreplace); the custom dir is root:root 0755."""
    table = files(rpm_file)
    assert table[LAUNCHER] == "cn -rwxr-xr-x root root"
    assert table[LOGROTATE] == "cn -rw-r--r-- root root"
    assert table[CUSTOM] == " drwxr-xr-x root root"


def test_requires_the_rhel_names(rpm_file):
    """`rpm --requires` lists python3 and the libraries by their RHEL/Fedora names."""
    requires = {line.split()[0] for line in query(rpm_file, "--requires").splitlines()}
    missing = [name for name in REQUIREMENTS if name not in requires]
    assert not missing, f"missing {missing} in {sorted(requires)}"


def test_version_and_release_come_from_pyproject(rpm_file):
    """The package is kvmhook, noarch, with pyproject's version and release 1."""
    out = query(rpm_file, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}")
    name, rpm_version, release, arch = out.split()
    dist = run("rpm", "--eval", "%{?dist}").stdout.strip()
    assert (name, rpm_version, release, arch) == ("kvmhook", version(), f"1{dist}", "noarch")


def test_packaged_launcher_is_the_source_launcher_mode_0755(payload):
    """The launcher in the payload is byte-identical to kvmhook/data/qemu-hook, mode 0755."""
    launcher = payload / LAUNCHER.lstrip("/")
    assert launcher.read_bytes() == (REPO / "kvmhook/data/qemu-hook").read_bytes()
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755


def test_logrotate_policy_is_the_debs(payload):
    """The rpm's logrotate policy is the deb's kvmhook.logrotate, byte for byte."""
    policy = payload / LOGROTATE.lstrip("/")
    assert policy.read_bytes() == (REPO / "packaging/deb/debian/kvmhook.logrotate").read_bytes()


def test_dist_info_gives_importlib_metadata_the_version_and_scripts(rpm_file, payload):
    """importlib.metadata reads pyproject's version and scripts from the packaged dist-info."""
    sitelib = payload / sitelib_of(query(rpm_file, "-l").splitlines()).lstrip("/")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import importlib.metadata as m; "
        "d = m.distribution('kvmhook'); print(d.version); "
        "print(' '.join(sorted(e.name for e in d.entry_points if e.group == 'console_scripts')))"
    )
    out = run(sys.executable, "-I", "-c", probe, str(sitelib)).stdout.splitlines()
    assert out == [version(), " ".join(sorted(console_scripts()))]


class Sandbox:
    """A host root for the scriptlets, with rpm, systemctl and pidof stubbed on PATH; the
    Python files they run are the payload's."""

    def __init__(self, root: Path, package: Path, payload: Path, owner: str = "") -> None:
        self.root = root
        self.package = package
        self.sitelib = sitelib_of(query(package, "-l").splitlines())
        self.payload_sitelib = payload / self.sitelib.lstrip("/")
        self.cloudstack_agent_hook = root / CLOUDSTACK_AGENT_HOOK.lstrip("/")
        self.hook = root / LAUNCHER.lstrip("/")
        self.previous = root / (LAUNCHER + ".pre-kvmhook").lstrip("/")
        self.custom = root / CUSTOM.lstrip("/")
        self.chain = self.custom / "all_00-previous-qemu-hook"
        self.log = root / "var/log/libvirt/qemu-hook.log"
        self.textfile = root / TEXTFILE_DIR.lstrip("/") / "kvmhook.prom"
        self.hook.parent.mkdir(parents=True)
        self.log.parent.mkdir(parents=True)
        stubs = root / "stubs"
        stubs.mkdir()
        # `rpm -qf` prints the owner, or fails as for an unowned file.
        rpm_stub = f"echo {owner}" if owner else "echo 'file is not owned by any package'; exit 1"
        # systemctl records its calls: `systemctl is-active` says no to everything.
        self.systemctl_calls = root / "systemctl.calls"
        systemctl_stub = f'echo "$*" >> {self.systemctl_calls}; exit 3'
        for name, body in (("rpm", rpm_stub), ("systemctl", systemctl_stub), ("pidof", "exit 1")):
            (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
            (stubs / name).chmod(0o755)
        self.env = {"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

    def scriptlet(self, tag: str, arg: int) -> subprocess.CompletedProcess:
        """Run the scriptlet `tag` (PREIN, POSTIN, PREUN, POSTUN) with $1 = arg, in the sandbox."""
        body = query(self.package, "--qf", f"%{{{tag}}}")
        assert body and body != "(none)", f"the rpm has no {tag} scriptlet"
        return self.run_script(tag, body, arg)

    def run_script(self, tag: str, body: str, arg: int) -> subprocess.CompletedProcess:
        """Run a scriptlet's `body` with $1 = arg, its paths moved into the sandbox."""
        body = body.replace(HOOKDIR, f"{self.root}{HOOKDIR}")
        body = body.replace("/var/log/libvirt", f"{self.root}/var/log/libvirt")
        body = body.replace(f"{self.sitelib}/", f"{self.payload_sitelib}/")
        body = body.replace(CLOUDSTACK_AGENT_HOOK, str(self.cloudstack_agent_hook))
        body = body.replace(TEXTFILE_DIR, f"{self.root}{TEXTFILE_DIR}")
        for real in ("/etc/libvirt", "/var/log/libvirt", TEXTFILE_DIR):
            outside = body.replace(f"{self.root}{real}", "")
            assert real not in outside, f"{tag} would touch the real {real}"
        script = self.root / f"{tag}.sh"
        script.write_text(body)
        return run("/bin/sh", str(script), str(arg), env=self.env)

    def systemctl(self) -> list[str]:
        """The systemctl calls so far, one string each; forgets them."""
        if not self.systemctl_calls.exists():
            return []
        calls = self.systemctl_calls.read_text().splitlines()
        self.systemctl_calls.unlink()
        return calls

    def install_files(self) -> None:
        """What rpm itself does between %pre and %post: the launcher and the custom dir."""
        self.hook.write_bytes((REPO / "kvmhook/data/qemu-hook").read_bytes())
        self.hook.chmod(0o755)
        self.custom.mkdir(exist_ok=True)


def test_scriptlets_keep_a_foreign_hook_running_and_give_it_back_on_erase(
    rpm_file, payload, tmp_path
):
    """Install keeps a foreign hook as qemu.pre-kvmhook, chained; erase puts it back."""
    box = Sandbox(tmp_path, rpm_file, payload)
    foreign = "#!/bin/sh\necho the operator's own hook\n"
    box.hook.write_text(foreign)
    box.hook.chmod(0o755)

    pre = box.scriptlet("PREIN", 1)
    assert not box.hook.exists()
    assert box.previous.read_text() == foreign
    assert "qemu.pre-kvmhook" in pre.stderr

    box.install_files()
    box.scriptlet("POSTIN", 1)
    assert os.readlink(box.chain) == str(box.previous)

    operator = box.custom / "start_operator"
    operator.write_text("#!/bin/sh\n")
    for log in (box.log, Path(f"{box.log}.1"), Path(f"{box.log}.2.gz")):
        log.write_text("record\n")
    box.hook.unlink()  # rpm erases the launcher before %postun
    post = box.scriptlet("POSTUN", 0)
    assert box.hook.read_text() == foreign
    assert not box.previous.exists() and not box.chain.is_symlink()
    assert operator.is_file()
    assert sorted(box.log.parent.iterdir()) == []
    assert "restored" in post.stderr


def test_scriptlets_keep_cloudstacks_hook_aside_unchained_and_give_it_back_on_erase(
    rpm_file, payload, tmp_path
):
    """CloudStack's hook (a stand-in with its markers) is kept as qemu.pre-kvmhook but not
    chained, with one line saying why; erase puts it back."""
    box = Sandbox(tmp_path, rpm_file, payload)
    box.hook.write_text(CLOUDSTACK_STANDIN)
    box.hook.chmod(0o755)

    box.scriptlet("PREIN", 1)
    box.install_files()
    post = box.scriptlet("POSTIN", 1)
    assert box.previous.read_text() == CLOUDSTACK_STANDIN
    assert not box.chain.is_symlink()
    said = [line for line in post.stderr.splitlines() if "CloudStack" in line]
    assert said == [
        f"kvmhook: {box.previous} is CloudStack's qemu hook: kept aside, not chained (kvmhook"
        " runs the custom scripts as that hook did, and chained it would run itself through"
        " custom/all_* until the timeout)."
    ]

    box.hook.unlink()  # rpm erases the launcher before %postun
    box.scriptlet("POSTUN", 0)
    assert box.hook.read_text() == CLOUDSTACK_STANDIN and not box.previous.exists()


def test_an_upgrade_unchains_a_copy_of_cloudstack_agents_hook(rpm_file, payload, tmp_path):
    """%post on upgrade removes the link an earlier kvmhook made to a byte-identical copy of
    cloudstack-agent's hook, in one line; a hand-made hook's link stays."""
    box = Sandbox(tmp_path, rpm_file, payload)
    copy = '#!/bin/sh\nfor s in /etc/libvirt/hooks/custom/all_*; do "$s" "$@"; done\n'
    box.cloudstack_agent_hook.parent.mkdir(parents=True)
    box.cloudstack_agent_hook.write_text(copy)
    box.install_files()
    box.previous.write_text(copy)
    box.chain.symlink_to(box.previous)
    post = box.scriptlet("POSTIN", 2)
    assert not box.chain.is_symlink() and box.previous.read_text() == copy
    said = [line for line in post.stderr.splitlines() if str(box.chain) in line]
    assert len(said) == 1 and said[0].startswith(f"kvmhook: removed {box.chain}: "), said

    box.previous.write_text(copy + "# edited by hand\n")
    box.chain.symlink_to(box.previous)
    box.scriptlet("POSTIN", 2)
    assert os.readlink(box.chain) == str(box.previous)


def test_scriptlets_never_move_our_own_launcher_on_upgrade(rpm_file, payload, tmp_path):
    """An upgrade never moves the edited launcher aside nor drops the log, even if rpm -qf fails."""
    box = Sandbox(tmp_path, rpm_file, payload)
    box.install_files()
    edited = box.hook.read_text().replace("timeoutSeconds = 10 * 60", "timeoutSeconds = 42")
    box.hook.write_text(edited)
    box.log.write_text("record\n")

    box.scriptlet("PREIN", 2)
    box.scriptlet("POSTIN", 2)
    box.scriptlet("POSTUN", 1)
    assert box.hook.read_text() == edited
    assert not box.previous.exists() and not box.chain.is_symlink()
    assert box.log.read_text() == "record\n"


def test_install_keeps_a_hook_owned_by_kvmhook(rpm_file, payload, tmp_path):
    """%pre on install moves nothing when `rpm -qf` says kvmhook owns the hook already."""
    box = Sandbox(tmp_path, rpm_file, payload, owner="kvmhook")
    box.install_files()
    box.scriptlet("PREIN", 1)
    assert box.hook.is_file() and not box.previous.exists()


def test_renewal_units_and_settings_are_packaged(rpm_file, payload):
    """The timer and service are in the unit dir as packaging/systemd has them; the
    settings file is /etc/sysconfig/kvmhook-cert-renew, %config(noreplace)."""
    table = files(rpm_file)
    for name in systemdunits.UNITS:
        path = f"{UNITDIR}/{name}"
        assert table[path] == " -rw-r--r-- root root", path
        packaged = (payload / path.lstrip("/")).read_bytes()
        assert packaged == (systemdunits.SOURCE / name).read_bytes(), path
    assert table[RENEW_SETTINGS] == "cn -rw-r--r-- root root"
    settings = payload / RENEW_SETTINGS.lstrip("/")
    assert settings.read_bytes() == systemdunits.SETTINGS.read_bytes()
    assert systemdunits.settings(settings.read_text()) == {}, "the defaults live in the unit"
    unitdir = payload / UNITDIR.lstrip("/")
    systemdunits.check_contract(
        (unitdir / systemdunits.SERVICE).read_text(), (unitdir / systemdunits.TIMER).read_text()
    )


def test_renewal_units_pass_systemd_analyze_verify(payload, tmp_path):
    """`systemd-analyze verify` has nothing to say about the packaged units (with
    ExecStart pointed at the payload's kvmhook, as nothing is installed)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    unitdir = payload / UNITDIR.lstrip("/")
    kvmhook = payload / "usr/bin/kvmhook"
    assert os.access(kvmhook, os.X_OK)
    for name in systemdunits.UNITS:
        text = (unitdir / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/bin/kvmhook ", f"{kvmhook} "))
    assert systemdunits.verify(*(tmp_path / name for name in systemdunits.UNITS)) == ""


def test_scriptlets_never_enable_or_start_the_renewal_units(rpm_file, payload, tmp_path):
    """Install and upgrade enable, preset and start no renewal unit; erase disables and
    stops an operator-enabled timer; an upgrade leaves it be."""
    scripts = query(rpm_file, "--scripts")
    assert "kvmhook-cert-renew.timer" in scripts
    renewal = "\n".join(line for line in scripts.splitlines() if "kvmhook-cert-renew" in line)
    verbs = re.findall(r"systemctl\s+(?:--\S+\s+)*([a-z-]+)", renewal)
    assert not {"enable", "preset", "start", "restart", "reenable"} & set(verbs), verbs

    box = Sandbox(tmp_path, rpm_file, payload)
    box.scriptlet("PREIN", 1)
    box.install_files()
    box.scriptlet("POSTIN", 1)
    assert not [call for call in box.systemctl() if "kvmhook-cert-renew" in call]
    for tag, arg in (("PREIN", 2), ("POSTIN", 2), ("PREUN", 1), ("POSTUN", 1)):
        box.scriptlet(tag, arg)
    assert not [call for call in box.systemctl() if "kvmhook-cert-renew" in call]
    box.scriptlet("PREUN", 0)
    calls = box.systemctl()
    assert any({"disable", "kvmhook-cert-renew.timer"} <= set(c.split()) for c in calls), calls


def test_the_trigger_on_cloudstack_agent_puts_the_launcher_back(rpm_file, payload, tmp_path):
    """`rpm -q --triggers`: a %triggerin on cloudstack-agent, which, run after its %post copied
    CloudStack's hook over the launcher, puts the launcher back with CloudStack's hook aside and
    unchained, and changes nothing when run again or before the copy."""
    triggers = query(rpm_file, "--triggers")
    header, _, body = triggers.partition("\n")
    assert header == "triggerin scriptlet (using /bin/sh) -- cloudstack-agent", triggers
    assert "previoushook.py --restore" in body
    box = Sandbox(tmp_path, rpm_file, payload)
    box.install_files()
    launcher = box.hook.read_bytes()
    box.run_script("TRIGGERIN", body, 1)  # kvmhook installed, cloudstack-agent not copied yet
    assert box.hook.read_bytes() == launcher and not box.previous.exists()
    box.cloudstack_agent_hook.parent.mkdir(parents=True)
    box.cloudstack_agent_hook.write_text(CLOUDSTACK_STANDIN)
    shutil.copy2(box.cloudstack_agent_hook, box.hook)  # cloudstack-agent's %post
    said = box.run_script("TRIGGERIN", body, 1).stderr
    assert box.hook.read_bytes() == launcher and stat.S_IMODE(box.hook.stat().st_mode) == 0o755
    assert box.previous.read_text() == CLOUDSTACK_STANDIN and not box.chain.is_symlink()
    assert f"kvmhook: {box.hook} was CloudStack's qemu hook" in said
    box.run_script("TRIGGERIN", body, 2)
    assert box.hook.read_bytes() == launcher and box.previous.read_text() == CLOUDSTACK_STANDIN


def test_post_puts_the_launcher_back_over_cloudstacks_copy(rpm_file, payload, tmp_path):
    """A reinstall repairs a host: %post puts the launcher back over CloudStack's copy."""
    box = Sandbox(tmp_path, rpm_file, payload)
    box.install_files()
    launcher = box.hook.read_bytes()
    box.hook.write_text(CLOUDSTACK_STANDIN)
    box.scriptlet("POSTIN", 2)
    assert box.hook.read_bytes() == launcher and box.previous.read_text() == CLOUDSTACK_STANDIN


def test_metrics_units_and_alert_rules_are_packaged(rpm_file, payload):
    """The metrics timer and service are in the unit dir as packaging/systemd has them, and
    the alert rules in /usr/share/kvmhook/prometheus, as the deb has them."""
    table = files(rpm_file)
    for name in systemdunits.METRICS_UNITS:
        path = f"{UNITDIR}/{name}"
        assert table[path] == " -rw-r--r-- root root", path
        packaged = (payload / path.lstrip("/")).read_bytes()
        assert packaged == (systemdunits.SOURCE / name).read_bytes(), path
    unitdir = payload / UNITDIR.lstrip("/")
    systemdunits.check_metrics_contract(
        (unitdir / systemdunits.METRICS_SERVICE).read_text(),
        (unitdir / systemdunits.METRICS_TIMER).read_text(),
    )
    rules = systemdunits.INSTALLED_ALERT_RULES
    assert table[rules] == " -rw-r--r-- root root"
    assert (payload / rules.lstrip("/")).read_bytes() == systemdunits.ALERT_RULES.read_bytes()
    # The directories are the package's, removed with it.
    for directory in ("/usr/share/kvmhook", "/usr/share/kvmhook/prometheus"):
        assert table[directory] == " drwxr-xr-x root root", directory


def test_metrics_units_pass_systemd_analyze_verify(payload, tmp_path):
    """`systemd-analyze verify` has nothing to say about the packaged metrics units (with
    ExecStart pointed at the payload's kvmhook, as nothing is installed)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    unitdir = payload / UNITDIR.lstrip("/")
    kvmhook = payload / "usr/bin/kvmhook"
    assert os.access(kvmhook, os.X_OK)
    for name in systemdunits.METRICS_UNITS:
        text = (unitdir / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/bin/kvmhook ", f"{kvmhook} "))
    assert systemdunits.verify(*(tmp_path / name for name in systemdunits.METRICS_UNITS)) == ""


def metrics_calls(calls: list[str], *verbs: str) -> list[str]:
    """The systemctl calls among `calls` that name the metrics timer with one of `verbs`."""
    return [
        call
        for call in calls
        if systemdunits.METRICS_TIMER in call.split() and set(verbs) & set(call.split())
    ]


def test_scriptlets_enable_the_metrics_timer_on_install_only_and_erase_drops_its_file(
    rpm_file, payload, tmp_path
):
    """A first install enables (and, with systemd running, starts) the metrics timer, as
    the deb does, since RHEL's presets would not; an upgrade neither enables nor starts it
    (an operator's disable holds); erase disables and stops it and removes the last
    kvmhook.prom, which node_exporter would serve for ever."""
    scripts = query(rpm_file, "--scripts")
    assert "systemctl disable --now kvmhook-metrics.timer" in scripts, "how to turn it off"
    box = Sandbox(tmp_path, rpm_file, payload)
    box.scriptlet("PREIN", 1)
    box.install_files()
    box.scriptlet("POSTIN", 1)
    calls = box.systemctl()
    assert metrics_calls(calls, "enable"), calls
    assert not [call for call in calls if "kvmhook-metrics.service" in call], calls
    for tag, arg in (("PREIN", 2), ("POSTIN", 2), ("PREUN", 1), ("POSTUN", 1)):
        box.scriptlet(tag, arg)
    calls = box.systemctl()
    assert not metrics_calls(calls, "enable", "start", "restart", "preset", "reenable"), calls
    box.scriptlet("PREUN", 0)
    calls = box.systemctl()
    assert metrics_calls(calls, "disable"), calls
    box.textfile.parent.mkdir(parents=True)
    box.textfile.write_text("kvmhook_info 1\n")
    partial = box.textfile.with_name("kvmhook.prom.1234.5678")
    partial.write_text("kvmhook_")
    box.hook.unlink()  # rpm erases the launcher before %postun
    box.scriptlet("POSTUN", 0)
    assert not box.textfile.exists() and not partial.exists()
