"""Helpers for the end-to-end tests: packages, a libvirtd of our own, guests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOOK = Path("/etc/libvirt/hooks/qemu")
CUSTOM = Path("/etc/libvirt/hooks/custom")
LOG = Path("/var/log/libvirt/qemu-hook.log")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
SCRATCH = Path("/run/kvmhook-e2e")
GUEST_PREFIX = "kvmhook-e2e-"
CONTAINER_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
remember_owner = 0
stdio_handler = "file"
"""
TOOLS = ("libvirtd", "virsh", "qemu-system-x86_64", "dpkg-buildpackage", "apt-get", "make")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, text output captured; a failure shows its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in pyproject.toml")


def apt(*args: str) -> subprocess.CompletedProcess:
    """apt-get -y ARGS, non-interactive; a failure shows apt's output."""
    result = subprocess.run(
        ["apt-get", "-y", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=APT_ENV,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def apt_install(deb: Path) -> subprocess.CompletedProcess:
    """Install a .deb with apt (dependencies from the archive); output kept."""
    return apt("install", "--allow-downgrades", str(deb))


def package_state() -> str:
    """dpkg's status of kvmhook: 'installed', 'config-files' or 'not-installed'."""
    result = run("dpkg-query", "-W", "-f=${db:Status-Status}", "kvmhook", check=False)
    return result.stdout.strip() or "not-installed"


class Libvirtd:
    """A libvirtd of our own, started by hand as in libvirt-facts.md."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, listen: bool = False) -> None:
        """Start it; `listen` adds --listen (the TCP/TLS sockets libvirtd.conf enables)."""
        argv = ["libvirtd", "--listen"] if listen else ["libvirtd"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while run("virsh", "-c", "qemu:///system", "version", check=False).returncode != 0:
            assert self.process.poll() is None, f"libvirtd died: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "libvirtd did not answer within 30 s"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def restart(self, listen: bool = False) -> None:
        self.stop()
        self.start(listen)


def running_libvirtd() -> list[str]:
    return run("pidof", "libvirtd", "virtqemud", check=False).stdout.split()


def guests() -> list[str]:
    names = run("virsh", "list", "--all", "--name", check=False).stdout.split()
    return [name for name in names if name.startswith(GUEST_PREFIX)]


def define_guest(name: str) -> str:
    """Define a tiny diskless TCG guest; returns its UUID."""
    xml = (
        f"<domain type='qemu'><name>{GUEST_PREFIX}{name}</name>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<console type='pty'/></devices></domain>"
    )
    path = SCRATCH / f"{name}.xml"
    path.write_text(xml)
    run("virsh", "define", str(path))
    return run("virsh", "domuuid", GUEST_PREFIX + name).stdout.strip()


def log_records() -> list[str]:
    return LOG.read_text(errors="replace").splitlines() if LOG.exists() else []


# A stand-in for CloudStack's qemu hook (cloudstack-agent's libvirtqemuhook): its markers and
# its loop over custom/all_* and custom/<operation>_*, not its code. Each call appends its
# depth and arguments to /run/kvmhook-e2e/cloudstack-hook. Where the real one, chained,
# would go on running itself until the timeout, the stand-in waits instead, at depth 3: a
# chained stand-in costs one timeout per call, not a fork bomb.
CLOUDSTACK_STANDIN = """\
#!/usr/bin/python3
import os
import subprocess
import sys
import time

customDir = "/etc/libvirt/hooks/custom"
validQemuActions = ["prepare", "start", "started", "stopped", "release", "migrate", "restore"]
depth = int(os.environ.get("STANDIN_DEPTH", "0"))


def handleMigrateBegin():
    from cloudutils.networkConfig import networkConfig  # noqa: F401


def executeCustomScripts(args):
    if not os.path.isdir(customDir):
        return
    names = [n for n in os.listdir(customDir) if n.startswith(("all_", args[1] + "_"))]
    for name in sorted(names):
        deeper = {**os.environ, "STANDIN_DEPTH": str(depth + 1)}
        subprocess.call([os.path.join(customDir, name), *args], env=deeper)


if __name__ == "__main__":
    with open("/run/kvmhook-e2e/cloudstack-hook", "a") as calls:
        calls.write(f"{depth} {' '.join(sys.argv[1:])}\\n")
    if depth >= 3:
        time.sleep(3600)
    if sys.argv[2:4] == ["migrate", "begin"]:
        handleMigrateBegin()
    executeCustomScripts(sys.argv[1:])
"""


CLOUDSTACK_AGENT_FILE = Path("/usr/share/cloudstack-agent/lib/libvirtqemuhook")
# What cloudstack-agent's postinst does with its hook on every configure (packaging/debian/
# cloudstack-agent.postinst in apache/cloudstack).
CLOUDSTACK_AGENT_POSTINST = f"""\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    mkdir -p {HOOK.parent}
    cp -a {CLOUDSTACK_AGENT_FILE} {HOOK}
fi
"""


def cloudstack_agent_deb(directory: Path, version: str = "4.19.0") -> Path:
    """A stand-in `cloudstack-agent` .deb built with dpkg-deb: it ships CloudStack's hook (the
    stand-in above) at CLOUDSTACK_AGENT_FILE and copies it over the qemu hook in its postinst."""
    tree = directory / f"cloudstack-agent-{version}"
    shipped = tree / CLOUDSTACK_AGENT_FILE.relative_to("/")
    shipped.parent.mkdir(parents=True)
    shipped.write_text(CLOUDSTACK_STANDIN)
    shipped.chmod(0o755)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        f"Package: cloudstack-agent\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: kvmhook tests <root@localhost>\n"
        "Description: stand-in for CloudStack's agent: ships and copies its qemu hook\n"
    )
    postinst = tree / "DEBIAN/postinst"
    postinst.write_text(CLOUDSTACK_AGENT_POSTINST)
    postinst.chmod(0o755)
    deb = directory / f"cloudstack-agent_{version}_all.deb"
    run("dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb))
    return deb
