"""Two libvirt "hosts" on one machine, each in namespaces of its own, joined by a veth pair.

Follows shared/notes/two-host-harness.md. Each `Host` is a PID 1 of its own
(`setsid unshare --mount --uts --net --pid --fork --mount-proc`, running
INIT below) that bind-mounts a private copy of /etc over /etc, a tmpfs over
/run and private directories over /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt and /var/lib/kvmhook, sets its own hostname and brings `lo` up. Everything the
harness runs inside goes through `nsenter -t <that PID 1> -m -u -n -p --`, so
libvirtd, QEMU, keystore-setup and keystore-cert-import see the host's own
name, addresses and files; the machine's real /etc is never written. Each
host mounts a sysfs of its own over /sys/class/net (and the directory its
entries point into), so kvmhook and libvirtd there see the host's own network
devices, not the machine's.

`TwoHosts` builds the pair as a CloudStack controller would secure them:
keystore-setup inside each host, its CSR signed by a test CA made here,
keystore-cert-import inside the host (which installs libvirt's and QEMU's
TLS files into the private /etc/pki), the TLS settings, the kvmhook qemu hook,
then `libvirtd --listen`. The addresses (10.250.0.1/30 and 10.250.0.2/30)
exist only inside the two network namespaces: no traffic leaves them.

Stopping: libvirtd by its pid, then PID 1 through a stop file it polls (PID 1
of a PID namespace ignores signals from outside that it has no handler for);
when it exits the kernel ends every process left in the namespace and the
namespaces go. A pipe from the harness is its lifeline too: if the harness
dies, PID 1 sees EOF and stops the same way, so nothing outlives a crash.

`TwoHosts(nics=...)` adds a CloudStack-like guest network (the veth renamed
as a NIC, in bridge cloudbr0, named in agent.properties); add_bridge,
guest_xml's bridges and udp_datagram let a test attach guests to bridges and
send traffic across them; link_details and made_bridges show what a host's
hook made of them.

Used by tests/e2e/test_migration.py, test_maintenance_mode.py,
test_rotation_e2e.py, test_guest_networks.py, test_console_tls.py (one Host
alone, guests with a VNC console: guest_xml's `vnc`), test_metrics_e2e.py (one
Host alone, its metrics scraped by node_exporter) and benchmarks/migration.py;
root only.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import CONTAINER_QEMU_CONF, GUEST_PREFIX, REPO

from kvmhook.certs.libvirtconf import ConfFile

VENV_BIN = Path(sys.executable).parent  # the project's console scripts (installed editable)
KVMHOOK = VENV_BIN / "kvmhook"
TOOLS = ("setsid", "unshare", "nsenter", "mount", "ip", "libvirtd", "virsh", "virt-admin")
QEMU = "/usr/bin/qemu-system-x86_64"
DOMAIN_SUFFIX = "kvmhook-e2e.test"
NETWORK = ipaddress.ip_network("10.250.0.0/30")  # private, only inside the test's namespaces
TLS_PORT = 16514
PASSPHRASE = "e2e-twohost-secret"
AGENT_DIR = "/etc/cloudstack/agent"  # inside a host: where the controller keeps the agent's files
AGENT_PROPERTIES = f"{AGENT_DIR}/agent.properties"
HOOK_LOG = "/var/log/libvirt/qemu-hook.log"
KVMHOOK_CONF = "/etc/kvmhook/kvmhook.conf"  # inside a host: what its qemu hook reads
# The guest network (TwoHosts(nics=...)): the veth renamed as a NIC, in a bridge holding the
# host's address, named in agent.properties as CloudStack's agent has it.
GUEST_BRIDGE = "cloudbr0"
GUEST_NETWORK_PROPERTY = "guest.network.device"
# Private trees: path inside the host -> directory under the host's work dir.
PRIVATE = {
    "/etc": "etc",
    "/var/lib/libvirt": "var-lib-libvirt",
    "/var/cache/libvirt": "var-cache-libvirt",
    "/var/log/libvirt": "var-log-libvirt",
    # kvmhook's state: maintenance state, renewal record, the metrics' position.
    "/var/lib/kvmhook": "var-lib-kvmhook",
}

# PID 1 of a host. argv: work dir, hostname, lifeline fd. Never returns before told to stop.
INIT = r"""
import os, select, signal, subprocess, sys, time

directory, hostname, lifeline = sys.argv[1], sys.argv[2], int(sys.argv[3])
private = dict(PRIVATE)


def sh(*argv):
    subprocess.run(argv, check=True)


for target, source in private.items():
    os.makedirs(target, exist_ok=True)  # /var/lib/kvmhook may not exist on the machine yet
    sh("mount", "--bind", os.path.join(directory, source), target)
sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
for path in ("/run/libvirt", "/run/lock"):
    os.makedirs(path)
# /sys/class/net shows the devices of the network namespace sysfs was mounted in: a fresh
# sysfs, mounted from this one, and its two net directories bound over the machine's (not all
# of /sys, which would hide /sys/fs/cgroup from libvirtd). kvmhook and libvirtd then see this
# host's own devices there (shared/notes/guest-networks.md).
sysfs = os.path.join(directory, "sysfs")
os.makedirs(sysfs)
sh("mount", "-t", "sysfs", "sysfs", sysfs)
for inside in ("class/net", "devices/virtual/net"):
    sh("mount", "--bind", os.path.join(sysfs, inside), os.path.join("/sys", inside))
sh("hostname", hostname)
sh("ip", "link", "set", "lo", "up")

stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
stop_file = os.path.join(directory, "stop")
with open(os.path.join(directory, "ready"), "w") as ready:
    ready.write(str(os.getpid()))


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


while not stopping and not os.path.exists(stop_file):
    reap()  # orphans of this namespace (QEMU daemonizes) end up here
    if select.select([lifeline], [], [], 0.1)[0] and not os.read(lifeline, 1):
        break  # the harness is gone

# Whatever is left of this namespace (all of it started by the harness): TERM, then KILL.
try:
    os.kill(-1, signal.SIGTERM)
except ProcessLookupError:
    pass
deadline = time.monotonic() + 5
while reap() and time.monotonic() < deadline:
    time.sleep(0.05)
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
while reap():
    time.sleep(0.05)
""".replace("dict(PRIVATE)", repr(PRIVATE))


class HarnessError(AssertionError):
    """The two-host set-up failed; the message carries what the tools said."""


class Interface(NamedTuple):
    """One line of `virsh domiflist`."""

    tap: str  # the host's device for it (vnetN); `-` in a persistent definition
    type: str
    source: str  # the bridge, for type bridge
    model: str
    mac: str


def missing_prerequisites() -> str | None:
    """Why the two-host harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "the two-host harness makes namespaces and runs libvirtd: it needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not os.access(QEMU, os.X_OK):
        missing.append(QEMU)
    for script in ("keystore-setup", "keystore-cert-import", "kvmhook"):
        if not (VENV_BIN / script).is_file():
            missing.append(f"{VENV_BIN / script} (pip install -e .)")
    if missing:
        return f"not installed: {', '.join(missing)}"
    return None


def tail(path: Path, size: int = 3000) -> str:
    """The end of a log file, for error messages."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return f"({path}: {error.strerror})"
    return data[-size:].decode(errors="replace")


class Host:
    """One libvirt host in its own mount/UTS/net/PID namespaces; see the module docstring."""

    def __init__(self, short: str, address: str, workdir: Path) -> None:
        self.short = short
        self.hostname = f"{short}.{DOMAIN_SUFFIX}"
        self.address = address
        self.workdir = workdir
        self.host_uuid = str(uuid.uuid4())
        self.pid: int | None = None  # PID 1 of the namespaces, as seen from outside
        self.veth: str | None = None  # this host's end of the pair, by its current name
        self.guest_bridge: str | None = None  # the bridge holding the veth, once guest_network
        self.csr: bytes | None = None
        self._unshare: subprocess.Popen | None = None
        self._lifeline: int | None = None
        self._libvirtd: subprocess.Popen | None = None

    # -- files -------------------------------------------------------------------------------

    def path(self, inside: str) -> Path:
        """Where a file under one of the private trees lives, seen from outside."""
        for prefix, directory in PRIVATE.items():
            if inside == prefix or inside.startswith(prefix + "/"):
                return self.workdir / directory / inside[len(prefix) :].lstrip("/")
        raise ValueError(f"{inside} is not under a private tree of {self.hostname}")

    def edit_conf(self, inside: str, settings: dict[str, str]) -> None:
        """Set `key = value` lines (values as written) in a libvirt config file of this host."""
        path = self.path(inside)
        conf = ConfFile(path.read_text() if path.exists() else "")
        for key, value in settings.items():
            conf.set(key, value)
        path.write_text(conf.text())

    def hook_log(self) -> str:
        """This host's kvmhook log (/var/log/libvirt/qemu-hook.log inside)."""
        path = self.path(HOOK_LOG)
        return path.read_text(errors="replace") if path.exists() else ""

    def libvirtd_log(self) -> str:
        return tail(self.workdir / "libvirtd.log")

    def prepare(self, peers: list[Host]) -> None:
        """The private trees, written before the namespaces exist: /etc copied, identity, hook."""
        self.workdir.mkdir(parents=True)
        subprocess.run(["cp", "-a", "/etc", str(self.path("/etc"))], check=True)
        subprocess.run(
            ["cp", "-a", "/var/cache/libvirt", str(self.path("/var/cache/libvirt"))], check=True
        )  # saves QEMU capability probing
        for inside in ("/var/lib/libvirt", "/var/log/libvirt", "/var/lib/kvmhook"):
            self.path(inside).mkdir()
        self.path("/var/log/libvirt/qemu").mkdir()
        hosts = self.path("/etc/hosts")
        names = "".join(f"{peer.address} {peer.hostname} {peer.short}\n" for peer in peers)
        hosts.write_text(hosts.read_text() + "\n# kvmhook two-host harness\n" + names)
        self.path("/etc/hostname").write_text(self.hostname + "\n")
        self.path(AGENT_DIR).mkdir(parents=True, mode=0o755)  # as the agent's package makes it
        # The container settings of libvirt-facts.md, whatever the real qemu.conf holds.
        self.path("/etc/libvirt/qemu.conf").write_text(CONTAINER_QEMU_CONF)
        conf = f"# libvirtd.conf of {self.hostname} (kvmhook two-host harness)\n"
        self.path("/etc/libvirt/libvirtd.conf").write_text(conf)
        self.edit_conf("/etc/libvirt/libvirtd.conf", {"host_uuid": f'"{self.host_uuid}"'})
        self.install_hook()

    def install_hook(self) -> None:
        """The kvmhook qemu hook launcher, bound to this venv's python, and an empty custom dir.

        Must be in place before libvirtd starts: libvirtd looks for the hook at start-up.
        """
        template = (REPO / "kvmhook" / "data" / "qemu-hook").read_text()
        hook = self.path("/etc/libvirt/hooks/qemu")
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(template.replace("#!/usr/bin/python3", f"#!{sys.executable}", 1))
        hook.chmod(0o755)
        self.path("/etc/libvirt/hooks/custom").mkdir(exist_ok=True)

    # -- namespaces --------------------------------------------------------------------------

    def start(self) -> None:
        """Make the namespaces: PID 1 runs INIT; returns once its mounts and hostname are set."""
        init = self.workdir / "init.py"
        init.write_text(INIT)
        read_end, self._lifeline = os.pipe()  # both non-inheritable; read end passed on below
        with (self.workdir / "init.log").open("wb") as log:
            self._unshare = subprocess.Popen(
                ["setsid", "unshare", "--mount", "--uts", "--net", "--pid", "--fork",
                 "--mount-proc", sys.executable, "-I", str(init), str(self.workdir),
                 self.hostname, str(read_end)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(read_end,),
            )  # fmt: skip
        os.close(read_end)
        deadline = time.monotonic() + 30
        while not (self.workdir / "ready").exists():
            if self._unshare.poll() is not None:
                raise HarnessError(
                    f"{self.hostname}: namespace init exited {self._unshare.returncode}:\n"
                    + tail(self.workdir / "init.log")
                )
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.hostname}: namespace init not ready within 30 s")
            time.sleep(0.02)
        self.pid = self._init_pid()

    def _init_pid(self) -> int:
        """The outside pid of the namespace's PID 1: the descendant of unshare whose NSpid ends
        in 1 (setsid does not fork here, but nothing below relies on that)."""
        assert self._unshare is not None
        pending = [self._unshare.pid]
        while pending:
            pid = pending.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
            if nspid and len(nspid[0]) > 1 and nspid[0][-1] == "1":
                return pid
            pending.extend(int(child) for child in children)
        raise HarnessError(f"{self.hostname}: no PID 1 found below unshare {self._unshare.pid}")

    def argv(self, *argv: str) -> list[str]:
        """`argv` as run inside this host's namespaces."""
        assert self.pid is not None, f"{self.hostname} is not started"
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-n", "-p", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 120):
        """Run a command inside this host; text output captured; `check` raises with it."""
        env = {key: value for key, value in os.environ.items() if key != "KVMHOOK_ROOT"}
        result = subprocess.run(
            self.argv(*argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"[{self.short}] {' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def virsh(self, *args: str, check: bool = True, timeout: float = 120):
        """virsh against this host's own libvirtd (qemu:///system inside its namespaces)."""
        return self.run("virsh", "-c", "qemu:///system", *args, check=check, timeout=timeout)

    # -- libvirtd ----------------------------------------------------------------------------

    def start_libvirtd(self) -> None:
        """`libvirtd --listen` inside; returns once it answers on its UNIX socket."""
        assert self._libvirtd is None or self._libvirtd.poll() is not None, "already running"
        with (self.workdir / "libvirtd.log").open("ab") as log:
            self._libvirtd = subprocess.Popen(
                self.argv("libvirtd", "--listen"),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while self.virsh("version", check=False, timeout=30).returncode != 0:
            if self._libvirtd.poll() is not None:
                raise HarnessError(f"{self.hostname}: libvirtd died:\n{self.libvirtd_log()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.hostname}: libvirtd not answering within 30 s")
            time.sleep(0.1)

    def _libvirtd_pid(self) -> int | None:
        """libvirtd's outside pid: the child nsenter forked into the PID namespace."""
        if self._libvirtd is None or self._libvirtd.poll() is not None:
            return None
        nsenter = self._libvirtd.pid
        try:
            children = Path(f"/proc/{nsenter}/task/{nsenter}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def stop_libvirtd(self) -> None:
        """SIGTERM to libvirtd's pid; running guests (QEMU) stay, as on a real host."""
        if self._libvirtd is None:
            return
        pid = self._libvirtd_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        try:
            self._libvirtd.wait(timeout=20)  # nsenter returns when libvirtd has exited
        except subprocess.TimeoutExpired:
            pid = self._libvirtd_pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            self._libvirtd.wait(timeout=10)
        self._libvirtd = None

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    # -- certificates and TLS ----------------------------------------------------------------

    def keystore_setup(self) -> bytes:
        """The real keystore-setup inside this host: key, keystore, and a CSR with its FQDN and
        non-loopback addresses (so the veth address). Returns the CSR."""
        self.run(
            str(VENV_BIN / "keystore-setup"), f"{AGENT_DIR}/agent.properties",
            f"{AGENT_DIR}/cloud.jks", PASSPHRASE, "365", f"{AGENT_DIR}/cloud.csr",
        )  # fmt: skip
        self.csr = self.path(f"{AGENT_DIR}/cloud.csr").read_bytes()
        return self.csr

    def import_certificate(self, ca: TestCA, restart: bool = False) -> x509.Certificate:
        """This host's CSR signed by `ca`, installed with the real keystore-cert-import inside
        (libvirtd.conf exists, so libvirt's and QEMU's TLS files too); `restart` passes
        --restart (virt-admin server-update-tls: the running libvirtd loads them)."""
        assert self.csr is not None, "keystore_setup first"
        cert = ca.sign_csr(self.csr, self.hostname, self.address)
        self.run(
            str(VENV_BIN / "keystore-cert-import"), *(["--restart"] if restart else []),
            f"{AGENT_DIR}/agent.properties", f"{AGENT_DIR}/cloud.jks", "ssh",
            f"{AGENT_DIR}/cloud.crt", encode(pem(cert)),
            f"{AGENT_DIR}/cloud.ca.crt", encode(ca.bundle()),
            f"{AGENT_DIR}/cloud.key",
        )  # fmt: skip
        return cert

    def enable_tls(self) -> None:
        """`kvmhook tls enable` inside the host. No --restart: these namespaces have no
        systemd; the harness (re)starts libvirtd --listen itself."""
        self.run(str(KVMHOOK), "tls", "enable")

    def allow_clear_text(self) -> None:
        """For the benchmark only: qemu+tcp with no auth, and migrations without --tls allowed
        (`kvmhook tls enable` sets migrate_tls_force = 1). libvirtd must be restarted."""
        self.edit_conf("/etc/libvirt/libvirtd.conf", {"listen_tcp": "1", "auth_tcp": '"none"'})
        self.edit_conf("/etc/libvirt/qemu.conf", {"migrate_tls_force": "0"})

    # -- network -----------------------------------------------------------------------------

    def links(self) -> list[str]:
        """The network devices of this host: its own /sys/class/net (INIT mounts it)."""
        return self.run("ls", "-1", "/sys/class/net").stdout.split()

    def bridge_ports(self, bridge: str) -> list[str]:
        """The ports of `bridge` as this host's sysfs lists them (/sys/class/net/B/brif/)."""
        return self.run("ls", "-1", f"/sys/class/net/{bridge}/brif").stdout.split()

    def add_bridge(self, name: str) -> None:
        """A plain bridge `name`, forward delay 0 (as CloudStack makes guest bridges), up."""
        self.run("ip", "link", "add", name, "type", "bridge", "forward_delay", "0")
        self.run("ip", "link", "set", name, "up")

    def delete_link(self, name: str) -> None:
        """`ip link del NAME` (a bridge goes with it; its ports stay, unenslaved)."""
        self.run("ip", "link", "del", name)

    def link_details(self, name: str) -> str | None:
        """`ip -d link show NAME` (kind, VNI, group, port, master...), or None when this host
        has no such device."""
        result = self.run("ip", "-d", "link", "show", name, check=False)
        return result.stdout if result.returncode == 0 else None

    def made_bridges(self) -> list[str]:
        """The bridges this host's kvmhook remembers making (/run/kvmhook/bridges/ inside)."""
        listed = self.run("ls", "-1", "/run/kvmhook/bridges", check=False)
        return listed.stdout.split() if listed.returncode == 0 else []

    def guest_network(self, nic: str, bridge: str = GUEST_BRIDGE) -> None:
        """This host's veth renamed `nic` (as if it were the host's NIC), enslaved in a new
        bridge `bridge` that takes over the host's address, and `guest.network.device=bridge`
        in agent.properties: the shape of a CloudStack KVM host's guest network."""
        assert self.veth is not None, f"{self.hostname} is not connected"
        address = f"{self.address}/{NETWORK.prefixlen}"
        self.run("ip", "link", "set", self.veth, "down")  # a veth is renamed only when down
        self.run("ip", "link", "set", self.veth, "name", nic)
        self.veth = nic
        self.add_bridge(bridge)
        self.run("ip", "link", "set", nic, "master", bridge)
        self.run("ip", "addr", "del", address, "dev", nic)
        self.run("ip", "addr", "add", address, "dev", bridge)
        self.run("ip", "link", "set", nic, "up")
        self.guest_bridge = bridge
        self.set_agent_property(GUEST_NETWORK_PROPERTY, bridge)

    def set_agent_property(self, key: str, value: str) -> None:
        """`key=value` in this host's agent.properties: lines setting `key` give way to one at
        the end, every other line is kept (keystore-setup's included)."""
        path = self.path(AGENT_PROPERTIES)
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line.split("=", 1)[0].strip() != key]
        path.write_text("".join(f"{line}\n" for line in (*kept, f"{key}={value}")))

    def write_kvmhook_conf(self, text: str | None) -> None:
        """This host's kvmhook.conf (its hook reads it on every call): `text`, or none."""
        path = self.path(KVMHOOK_CONF)
        if text is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)

    # -- guests ------------------------------------------------------------------------------

    def define_guest(self, name: str, xml: str) -> None:
        path = self.workdir / f"{name}.xml"
        path.write_text(xml)
        self.virsh("define", str(path))

    def guests(self) -> list[str]:
        """Names of every guest this host's libvirtd knows (running or defined)."""
        return self.virsh("list", "--all", "--name").stdout.split()

    def state(self, name: str) -> str | None:
        """`virsh domstate`, or None when this host does not know the guest."""
        result = self.virsh("domstate", name, check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    def interfaces(self, name: str, inactive: bool = False) -> list[Interface]:
        """`virsh domiflist` of the guest (`inactive`: of its persistent definition, whose
        taps are `-`): one Interface per line."""
        listed = self.virsh("domiflist", *(["--inactive"] if inactive else []), name).stdout
        lines = listed.splitlines()
        rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
        return [Interface(*line.split()) for line in lines[rule + 1 :] if line.strip()]

    # -- teardown ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Guests destroyed, libvirtd stopped by pid, PID 1 told to stop (stop file), waited
        for; if it does not go within 20 s, SIGKILL to its pid (which ends the namespace)."""
        if self._unshare is None:
            return
        try:
            if self._libvirtd is not None and self._libvirtd.poll() is None:
                for name in self.virsh("list", "--name", check=False, timeout=30).stdout.split():
                    self.virsh("destroy", name, check=False, timeout=30)
                self.stop_libvirtd()
        finally:
            (self.workdir / "stop").touch()
            try:
                self._unshare.wait(timeout=20)
            except subprocess.TimeoutExpired:
                if self.pid is not None:
                    os.kill(self.pid, signal.SIGKILL)
                self._unshare.wait(timeout=10)
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
            self._unshare = None
            if self.pid is not None and Path(f"/proc/{self.pid}").exists():
                raise HarnessError(f"{self.hostname}: PID 1 {self.pid} still there after stop")


# -- certificates ---------------------------------------------------------------------------


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def encode(data: bytes) -> str:
    """The keystore tools' content-argument encoding: newlines as ^, spaces as ~."""
    return data.decode("ascii").replace("\n", "^").replace(" ", "~")


class TestCA:
    """A one-level test CA (CA:TRUE, keyUsage keyCertSign+cRLSign) that signs host CSRs."""

    __test__ = False  # not a pytest test class

    def __init__(self, label: str) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvmhook e2e {label} CA")])
        now = utcnow()
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def bundle(self) -> bytes:
        return pem(self.cert)

    def sign_csr(self, csr_pem: bytes, hostname: str, address: str) -> x509.Certificate:
        """A host certificate for the CSR's key and subject: its SANs plus DNS:`hostname` and
        IP:`address` if missing, keyUsage digitalSignature+keyEncipherment, extendedKeyUsage
        serverAuth+clientAuth (one certificate serves libvirt and QEMU, server and client)."""
        csr = x509.load_pem_x509_csr(csr_pem)
        try:
            names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            names = []
        for wanted in (x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address(address))):
            if wanted not in names:
                names.append(wanted)
        now = utcnow()
        usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        return (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


# -- the pair -------------------------------------------------------------------------------


def connect(a: Host, b: Host) -> None:
    """A veth pair from a's network namespace to b's, an address of the private /30 on each."""
    a.veth, b.veth = f"veth-{a.short}", f"veth-{b.short}"
    # Only a's network namespace entered: `netns PID` names b by its pid as seen from here.
    subprocess.run(
        ["nsenter", "-t", str(a.pid), "-n", "--",
         "ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth, "netns", str(b.pid)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    prefix = NETWORK.prefixlen
    for host in (a, b):
        host.run("ip", "addr", "add", f"{host.address}/{prefix}", "dev", host.veth)
        host.run("ip", "link", "set", host.veth, "up")
    if shutil.which("ping"):
        a.run("ping", "-c", "1", "-W", "5", b.address)


# A VNC console on the host's loopback, port chosen by libvirt (5900 + n; `virsh vncdisplay`).
VNC_GRAPHICS = "<graphics type='vnc' listen='127.0.0.1' port='-1' autoport='yes'/>"


def guest_xml(
    name: str,
    memory_mib: int = 64,
    kernel: Path | None = None,
    bridges: Sequence[str] = (),
    vnc: bool = False,
) -> str:
    """A diskless TCG guest (libvirt-facts.md); `kernel` boots that image with -kernel; one
    virtio NIC on each of `bridges` (libvirt makes a vnetN tap in it), MACs from guest_mac;
    `vnc` adds a VNC console on 127.0.0.1 (TLS when qemu.conf has vnc_tls = 1)."""
    boot = f"<kernel>{kernel}</kernel>" if kernel is not None else ""
    nics = "".join(
        interface_xml(bridge, guest_mac(name, index)) for index, bridge in enumerate(bridges)
    )
    graphics = VNC_GRAPHICS if vnc else ""
    return (
        f"<domain type='qemu'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>"
        f"<devices><emulator>{QEMU}</emulator>{nics}<console type='pty'/>{graphics}"
        "</devices></domain>"
    )


def interface_xml(bridge: str, mac: str) -> str:
    """A virtio NIC on `bridge`, as CloudStack defines a guest's. No option ROM: the guest
    has nothing to network-boot, and QEMU then needs no iPXE image."""
    return (
        f"<interface type='bridge'><source bridge='{bridge}'/><mac address='{mac}'/>"
        "<model type='virtio'/><rom enabled='no'/></interface>"
    )


def guest_mac(name: str, index: int = 0) -> str:
    """The MAC of the guest `name`'s NIC number `index`: fixed per guest, in QEMU's
    locally administered 52:54:00 range."""
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


# -- datagrams between the hosts ------------------------------------------------------------
# No ping on a fresh machine: a python receiver and sender, each inside its host.
UDP_RECEIVE = r"""
import socket, sys
address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind((address, port))
    sock.settimeout(timeout)
    print("ready", flush=True)
    try:
        data, peer = sock.recvfrom(65536)
    except socket.timeout:
        sys.exit(f"no datagram to {address}:{port} within {timeout} s")
    print(peer[0], data.hex(), flush=True)
"""
UDP_SEND = r"""
import socket, sys, time
address, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[4]
payload = bytes.fromhex(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    if source:
        sock.bind((source, 0))
    for _ in range(10):  # a few, in case the first is lost while the neighbour is resolved
        sock.sendto(payload, (address, port))
        time.sleep(0.1)
"""


def udp_datagram(
    sender: Host,
    receiver: Host,
    address: str,
    port: int = 47000,
    source: str = "",
    timeout: float = 10,
) -> str:
    """A UDP datagram from `sender` (from `source`, if given) to `address`:`port`, where a
    receiver in `receiver` listens: the address it came from. HarnessError when none arrives
    within `timeout` seconds. Every address is one the test gave a device of its hosts."""
    payload = os.urandom(8).hex()
    listening = subprocess.Popen(
        receiver.argv("python3", "-c", UDP_RECEIVE, address, str(port), str(timeout)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listening.stdout is not None
        if listening.stdout.readline().strip() != "ready":
            listening.wait(timeout=10)
            raise HarnessError(f"[{receiver.short}] UDP receiver failed: {listening.stderr.read()}")
        sender.run("python3", "-c", UDP_SEND, address, str(port), payload, source, timeout=30)
        out, err = listening.communicate(timeout=timeout + 10)
    finally:
        if listening.poll() is None:
            listening.kill()  # nsenter; the receiver inside ends at its own timeout
            listening.wait()
    if listening.returncode != 0:
        raise HarnessError(
            f"no datagram from {sender.short} to {address}:{port} on {receiver.short}: {err}"
        )
    came_from, data = out.split()
    if data != payload:
        raise HarnessError(f"{receiver.short} got {data}, not the {payload} that was sent")
    return came_from


# -- the migration drivers -----------------------------------------------------------------
# libvirt's own flags that `kvmhook migrate` uses (issue 5): LIVE | PEER2PEER | PERSIST_DEST |
# UNDEFINE_SOURCE | AUTO_CONVERGE, plus TLS for QEMU's stream.
VIRSH_FLAGS = ("--live", "--p2p", "--persistent", "--undefinesource", "--auto-converge")


def virsh_migrate_argv(domain: str, dest: Host, tls_stream: bool = True, scheme: str = "tls"):
    """`virsh migrate` with kvmhook's flags: to qemu+`scheme`://dest, `--tls` for the stream."""
    flags = (*VIRSH_FLAGS, "--tls") if tls_stream else VIRSH_FLAGS
    return ["virsh", "-c", "qemu:///system", "migrate", *flags, domain,
            f"qemu+{scheme}://{dest.hostname}/system"]  # fmt: skip


def kvmhook_migrate_argv(domain: str, dest: Host) -> list[str]:
    """`kvmhook migrate DOMAIN DEST_HOST`: TLS for libvirt's channel and QEMU's stream."""
    return [str(KVMHOOK), "migrate", domain, dest.hostname]


def migrate_argv(domain: str, dest: Host) -> list[str]:
    """`kvmhook migrate DOMAIN DEST_HOST`, run inside the source host."""
    return kvmhook_migrate_argv(domain, dest)


class TwoHosts:
    """Hosts a (10.250.0.1) and b (10.250.0.2), secured with certificates of `ca`, libvirtd
    listening on TLS. A context manager: everything goes on exit (the work dir stays with
    keep=True or KVMHOOK_E2E_KEEP=1, for a look at the logs).

    `nics=(A, B)`: a guest network on each host (Host.guest_network), the veth named A on a
    and B on b, in a bridge cloudbr0 holding the host's address, before libvirtd starts."""

    def __init__(self, keep: bool = False, nics: tuple[str, str] | None = None) -> None:
        self.keep = keep or os.environ.get("KVMHOOK_E2E_KEEP") == "1"
        self.nics = nics
        self.root = Path(tempfile.mkdtemp(prefix="kvmhook-twohost-"))
        first, second = list(NETWORK.hosts())
        self.a = Host("hosta", str(first), self.root / "a")
        self.b = Host("hostb", str(second), self.root / "b")
        self.ca = TestCA("two-host")
        self.timings: dict[str, float] = {}

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def __enter__(self) -> TwoHosts:
        try:
            self.set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timed(self, label: str, began: float) -> float:
        now = time.monotonic()
        self.timings[label] = now - began
        return now

    def set_up(self) -> None:
        began = time.monotonic()
        for host in self.hosts:
            host.prepare(peers=list(self.hosts))
            host.start()
        connect(self.a, self.b)
        began = self._timed("namespaces", began)
        for host in self.hosts:
            host.keystore_setup()
            host.import_certificate(self.ca)
            host.enable_tls()
        began = self._timed("certificates", began)
        if self.nics is not None:
            for host, nic in zip(self.hosts, self.nics):
                host.guest_network(nic)
            began = self._timed("guest network", began)
        for host in self.hosts:
            host.start_libvirtd()
        self._timed("libvirtd", began)
        self.check_tls()

    def guest_network(self, nics: tuple[str, str], bridge: str = GUEST_BRIDGE) -> None:
        """A guest network on hosts already set up (see the class's docstring), then each
        still reaches the other over TLS."""
        for host, nic in zip(self.hosts, nics):
            host.guest_network(nic, bridge)
        self.nics = nics
        self.check_tls()

    def check_tls(self) -> None:
        """Each host's libvirtd answers the other over qemu+tls, by its hostname."""
        for source, dest in ((self.a, self.b), (self.b, self.a)):
            result = source.run(
                "virsh", "-c", f"qemu+tls://{dest.hostname}/system", "hostname", check=False
            )
            if result.returncode != 0 or result.stdout.strip() != dest.hostname:
                raise HarnessError(
                    f"{source.short} cannot reach {dest.hostname} over TLS:\n{result.stderr}\n"
                    f"{dest.short}'s libvirtd log:\n{dest.libvirtd_log()}"
                )

    def close(self) -> None:
        """Stop both hosts (by pid), then remove their work dirs unless kept."""
        errors = []
        for host in self.hosts:
            try:
                host.stop()
            except Exception as error:  # stop the other one all the same
                errors.append(error)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]


__all__ = [
    "GUEST_PREFIX",
    "HarnessError",
    "Host",
    "Interface",
    "TestCA",
    "TwoHosts",
    "guest_mac",
    "guest_xml",
    "kvmhook_migrate_argv",
    "migrate_argv",
    "missing_prerequisites",
    "udp_datagram",
    "virsh_migrate_argv",
]
