"""`kvmhook network list`: the bridges of sysfs trees built under KVMHOOK_ROOT, laid out as
the kernel lays them out (class/net/<dev> a link into devices/virtual/net), and guest names
from libvirt's test driver (`test:///default`: guest `test` runs with tap `testnet0`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from sandbox import cli_runner

from kvmhook.cli import main
from kvmhook.host import virt

TEST_URI = "test:///default"
NO_LIBVIRT = "bogus:///nowhere"


class Sysfs:
    """A /sys/class/net under a host root."""

    def __init__(self, root) -> None:
        self.devices = root / "sys/devices/virtual/net"
        self.net = root / "sys/class/net"
        self.net.mkdir(parents=True)

    def device(self, name: str, lower: str | None = None) -> None:
        (self.devices / name).mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../devices/virtual/net/{name}", self.net / name)
        if lower is not None:
            os.symlink(f"../{lower}", self.devices / name / f"lower_{lower}")

    def bridge(self, name: str, *ports: str) -> None:
        self.device(name)
        (self.devices / name / "bridge").mkdir()
        (self.devices / name / "brif").mkdir()
        for port in ports:
            os.symlink(f"../../{port}/brport", self.devices / name / "brif" / port)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture
def sysfs(root) -> Sysfs:
    return Sysfs(root)


def made(root, name: str) -> None:
    directory = root / "run/kvmhook/bridges"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).touch()


def invoke(*args: str):
    return cli_runner().invoke(main, ["network", "list", *args], catch_exceptions=False)


def listed(*args: str, uri: str = TEST_URI) -> dict[str, dict]:
    result = invoke("--json", "--connect", uri, *args)
    assert result.exit_code == 0, result.stderr
    return {bridge["name"]: bridge for bridge in json.loads(result.stdout)}


def test_vxlan_bridge_made_by_kvmhook_with_a_guest(root, sysfs):
    """The VNI from the port's name, the underlay from its lower_ link, the tap as its guest."""
    sysfs.device("cloudbr0")
    sysfs.device("vxlan5000", lower="cloudbr0")
    sysfs.device("testnet0")
    sysfs.bridge("brvx-5000", "vxlan5000", "testnet0")
    made(root, "brvx-5000")
    assert list(json.loads(invoke("--json", "--connect", TEST_URI).stdout)) == [
        {
            "name": "brvx-5000",
            "kind": "vxlan",
            "id": 5000,
            "underlay": "cloudbr0",
            "ports": ["test"],
            "made": True,
        }
    ]


def test_vlan_bridges_by_port_and_by_name(root, sysfs):
    """A VLAN port gives VLAN and underlay (its lower_ link, else its name's PIF); a bridge
    without one is known by CloudStack's bridge names."""
    sysfs.device("bond0")
    sysfs.device("bond0.300", lower="bond0")
    sysfs.device("enp1s0.100")
    sysfs.bridge("brbond0-300", "bond0.300")
    sysfs.bridge("brenp1s0-100", "enp1s0.100", "vnet3")
    sysfs.bridge("brenp2s0-200")
    sysfs.bridge("cloudVirBr400")
    found = listed()
    assert {name: (b["kind"], b["id"], b["underlay"], b["ports"]) for name, b in found.items()} == {
        "brbond0-300": ("vlan", 300, "bond0", []),
        "brenp1s0-100": ("vlan", 100, "enp1s0", ["vnet3"]),
        "brenp2s0-200": ("vlan", 200, None, []),
        "cloudVirBr400": ("vlan", 400, None, []),
    }
    assert not any(bridge["made"] for bridge in found.values())


def test_other_bridges_and_plain_devices(root, sysfs):
    """A bridge CloudStack's names do not explain is `other`; a device that is no bridge is
    not listed; a VXLAN bridge without its device is known by its name."""
    sysfs.device("enp1s0")
    sysfs.bridge("cloudbr0", "enp1s0")
    sysfs.bridge("brvx-7")
    found = listed()
    assert found["cloudbr0"] == {
        "name": "cloudbr0",
        "kind": "other",
        "id": None,
        "underlay": None,
        "ports": ["enp1s0"],
        "made": False,
    }
    assert (found["brvx-7"]["kind"], found["brvx-7"]["id"]) == ("vxlan", 7)
    assert sorted(found) == ["brvx-7", "cloudbr0"]


def test_table_by_default(root, sysfs):
    sysfs.device("vxlan5000")
    sysfs.bridge("brvx-5000", "vxlan5000", "testnet0", "vnet9")
    sysfs.bridge("cloudbr0")
    made(root, "brvx-5000")
    result = invoke("--connect", TEST_URI)
    assert result.exit_code == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAME", "KIND", "ID", "UNDERLAY", "MADE", "PORTS"],
        ["brvx-5000", "vxlan", "5000", "-", "yes", "test,", "vnet9"],
        ["cloudbr0", "other", "-", "-", "no", "-"],
    ]
    assert result.stderr == ""


def test_libvirt_not_answering_shows_taps_and_says_so_once(root, sysfs):
    sysfs.bridge("brvx-1", "testnet0")
    sysfs.bridge("brvx-2", "vnet1")
    result = invoke("--json", "--connect", NO_LIBVIRT)
    assert result.exit_code == 0
    assert [bridge["ports"] for bridge in json.loads(result.stdout)] == [["testnet0"], ["vnet1"]]
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(
        f"warning: ports show tap names: cannot connect to {NO_LIBVIRT}"
    )


def test_default_uri_is_the_system_qemu(root, sysfs, monkeypatch):
    monkeypatch.delenv("KVMHOOK_LIBVIRT_URI", raising=False)
    asked = []
    monkeypatch.setattr(virt, "guests_by_tap", lambda uri: asked.append(uri) or {})
    assert invoke().exit_code == 0
    assert asked == ["qemu:///system"]


def test_unreadable_sysfs_exits_1(root):
    """No /sys/class/net under the root: one line naming it, exit 1."""
    result = invoke("--connect", TEST_URI)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot list the network devices in ")
    assert len(result.stderr.splitlines()) == 1


def test_guests_by_tap_reads_libvirt():
    """Each running guest's interface target, from the real test driver."""
    assert virt.guests_by_tap(TEST_URI) == {"testnet0": "test"}


# The devices CloudStack's script makes for VNI 5000, in a network namespace of their own,
# and that namespace's sysfs mounted as the host root's: what the kernel really shows.
_KERNEL_VXLAN = """
set -e
ip link add enp1s0 type veth peer name enp1s0-peer
ip addr add 192.0.2.1/24 dev enp1s0
ip link set enp1s0 up
ip link add vxlan5000 type vxlan id 5000 group 239.0.19.136 ttl 10 dev enp1s0 dstport 8472
ip link add brvx-5000 type bridge
ip link set vxlan5000 master brvx-5000
mkdir -p "$KVMHOOK_ROOT/sys"
mount -t sysfs sysfs "$KVMHOOK_ROOT/sys"
exec "$@"
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip for a network namespace with real devices",
)
def test_a_real_kernel_vxlan_bridge(root):
    """The kernel's own sysfs: the VNI from the device's name, the underlay its lower_ link."""
    command = ["unshare", "--net", "--mount", "sh", "-c", _KERNEL_VXLAN, "sh"]
    command += [sys.executable, "-c", "from kvmhook.cli import main; main()", "network", "list"]
    command += ["--json"]
    command += ["--connect", NO_LIBVIRT]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {
            "name": "brvx-5000",
            "kind": "vxlan",
            "id": 5000,
            "underlay": "enp1s0",
            "ports": [],
            "made": False,
        }
    ]
