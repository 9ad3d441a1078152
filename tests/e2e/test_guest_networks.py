"""Guest networks that follow the guest between two hosts (issue 14, end to end).

Two hosts made by twohost.py with a CloudStack-like guest network: the veth
between them is renamed as each host's NIC, enp1s0 on a and enp2s0 on b, and
enslaved in bridge cloudbr0, which holds the host's address;
agent.properties says `guest.network.device=cloudbr0`. Each host mounts a
sysfs of its own, so the hook libvirtd runs there sees that host's devices.

(a) The bridge rename at `migrate begin`. CloudStack names a VLAN bridge
after the NIC: `brenp1s0-100` on a, `brenp2s0-100` on b. This machine's kernel
has no 802.1q, so plain bridges made here stand in for the VLAN bridges (the
rename looks at names only). A guest on a's brenp1s0-100 migrates to b with
`kvmhook migrate` and runs there on brenp2s0-100, its tap a port of that
bridge in b's sysfs; after `virsh destroy` it starts again on b from its
persistent definition, which `kvmhook migrate` gave the renamed bridge. With
`rename_bridges = no` in b's kvmhook.conf the same migration fails with
libvirt's "Cannot get interface MTU" and the guest keeps running on a: the
failure the rename exists to prevent, so the test can tell.

Root only; without the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from twohost import (
    AGENT_PROPERTIES,
    GUEST_BRIDGE,
    GUEST_PREFIX,
    Host,
    Interface,
    TwoHosts,
    guest_mac,
    guest_xml,
    migrate_argv,
    missing_prerequisites,
    udp_datagram,
)

NICS = ("enp1s0", "enp2s0")  # a's and b's "NIC": the two ends of the veth pair
VLAN = 100
ON_A, ON_B = (f"br{nic}-{VLAN}" for nic in NICS)  # brenp1s0-100, brenp2s0-100
# What b's hook logs for the rename (kvmhook.net.bridges): P is cloudbr0's port, enp2s0.
RENAMED = f"network: bridge {ON_A} renamed {ON_B} (guest.network.device={GUEST_BRIDGE}, its port:"
MTU_ERROR = "Cannot get interface MTU"
RENAME_OFF = "[network]\nrename_bridges = no\n"


@pytest.fixture(scope="module")
def pair():
    """Hosts a and b with their guest network (enp1s0 / enp2s0 in cloudbr0) and the stand-in
    VLAN bridges brenp1s0-100 on a and brenp2s0-100 on b; all gone after."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with TwoHosts(nics=NICS) as hosts:
        hosts.a.add_bridge(ON_A)
        hosts.b.add_bridge(ON_B)
        for host in hosts.hosts:
            # The private /etc is a copy of the machine's: whatever kvmhook.conf it held goes,
            # so the rename is on, as by default.
            host.write_kvmhook_conf(None)
        yield hosts


def start_guest(host: Host, name: str, bridge: str) -> None:
    """A running diskless TCG guest `name` on `host`, its one NIC on `bridge`."""
    host.define_guest(name, guest_xml(name, bridges=[bridge]))
    host.virsh("start", name)
    assert host.state(name) == "running"
    assert_on_bridge(host, name, bridge)


def remove_guest(pair: TwoHosts, name: str) -> None:
    for host in pair.hosts:
        host.virsh("destroy", name, check=False)
        host.virsh("undefine", name, check=False)


def migrate(pair: TwoHosts, name: str) -> subprocess.CompletedProcess:
    """`kvmhook migrate NAME hostb`, run on a."""
    return pair.a.run(*migrate_argv(name, pair.b), check=False, timeout=120)


def assert_on_bridge(host: Host, name: str, bridge: str) -> None:
    """The running guest's one NIC is on `bridge` (libvirt's live definition) and its tap is
    a port of that bridge in the host's own sysfs (the kernel's view)."""
    (nic,) = host.interfaces(name)
    assert (nic.type, nic.source, nic.mac) == ("bridge", bridge, guest_mac(name)), nic
    assert nic.tap.startswith("vnet"), nic
    assert nic.tap in host.bridge_ports(bridge), (nic.tap, host.bridge_ports(bridge))


def hook_records(host: Host, name: str) -> list[str]:
    """The host's hook log records about the guest `name`."""
    return [line for line in host.hook_log().splitlines() if f" domain={name} " in line]


@pytest.fixture(scope="module")
def migrated(pair):
    """A guest started on a on brenp1s0-100, then `kvmhook migrate`d to b:
    (name, result, seconds)."""
    name = f"{GUEST_PREFIX}rename-{time.monotonic_ns() % 10**8}"
    start_guest(pair.a, name, ON_A)
    began = time.monotonic()
    result = migrate(pair, name)
    seconds = time.monotonic() - began
    yield name, result, seconds
    remove_guest(pair, name)


def test_each_host_has_its_own_guest_network(pair):
    """Each host sees its own devices in /sys/class/net (not the machine's): its NIC enslaved
    in cloudbr0, which holds its address; agent.properties names cloudbr0 and keeps what
    keystore-setup wrote; a datagram crosses from a's cloudbr0 to b's."""
    machines_own = set(os.listdir("/sys/class/net")) - {"lo"}
    for host, nic, other, vlan_bridge in ((pair.a, *NICS, ON_A), (pair.b, *NICS[::-1], ON_B)):
        links = set(host.links())
        assert {"lo", nic, GUEST_BRIDGE, vlan_bridge} <= links, links
        assert other not in links and not links & machines_own, (links, machines_own)
        assert host.bridge_ports(GUEST_BRIDGE) == [nic]
        shown = host.run("ip", "-4", "-o", "addr", "show", "dev", GUEST_BRIDGE).stdout
        assert f" {host.address}/" in shown, shown
        properties = host.path(AGENT_PROPERTIES).read_text().splitlines()
        assert properties[-1] == f"guest.network.device={GUEST_BRIDGE}", properties
        assert any(line.startswith("keystore.passphrase=") for line in properties), properties
    assert udp_datagram(pair.a, pair.b, pair.b.address) == pair.a.address


def test_guest_runs_on_b_on_b_s_bridge(pair, migrated):
    """The guest left a's brenp1s0-100 and runs on b on brenp2s0-100, its tap a port of that
    bridge; its persistent definition on b names brenp2s0-100 too; a no longer knows it."""
    name, result, seconds = migrated
    assert result.returncode == 0, (
        f"kvmhook migrate failed:\n{result.stdout}\n{result.stderr}\n"
        f"b's libvirtd log:\n{pair.b.libvirtd_log()}"
    )
    assert pair.b.state(name) == "running"
    assert name not in pair.a.guests()
    assert_on_bridge(pair.b, name, ON_B)
    assert pair.b.interfaces(name, inactive=True) == [
        Interface("-", "bridge", ON_B, "virtio", guest_mac(name))
    ]
    assert seconds < 30, f"kvmhook migrate took {seconds:.1f} s for a 64 MiB guest"


def test_b_s_hook_log_says_the_bridge_was_renamed(pair, migrated):
    """b's hook logged the rename at `migrate begin`, with P found through cloudbr0."""
    name = migrated[0]
    records = hook_records(pair.b, name)
    renames = [record for record in records if RENAMED in record]
    assert renames, f"no rename logged for {name} on b:\n" + "\n".join(records)
    assert " op=migrate subop=begin " in renames[0], renames
    assert renames[0].endswith(f"its port: {NICS[1]})"), renames


def test_guest_starts_again_on_b_from_its_persistent_definition(pair, migrated):
    """After `virsh destroy` on b the guest cold-starts there (`virsh start`, the stored
    definition) on brenp2s0-100."""
    name = migrated[0]
    assert pair.b.state(name) == "running", "the migration test failed first"
    pair.b.virsh("destroy", name)
    assert pair.b.state(name) == "shut off"
    started = pair.b.virsh("start", name, check=False)
    assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
    assert pair.b.state(name) == "running"
    assert_on_bridge(pair.b, name, ON_B)


def test_without_the_rename_the_migration_fails_and_the_guest_stays_on_a(pair):
    """With `[network] rename_bridges = no` in b's kvmhook.conf, the same migration of a fresh
    guest fails with libvirt's "Cannot get interface MTU" (b has no brenp1s0-100) and the
    guest keeps running on a, on its bridge; b's hook renamed nothing."""
    name = f"{GUEST_PREFIX}norename-{time.monotonic_ns() % 10**8}"
    pair.b.write_kvmhook_conf(RENAME_OFF)
    try:
        start_guest(pair.a, name, ON_A)
        result = migrate(pair, name)
        said = result.stdout + result.stderr
        assert result.returncode != 0, f"kvmhook migrate succeeded:\n{said}"
        assert MTU_ERROR in said and ON_A in said, said
        assert pair.a.state(name) == "running"
        assert pair.b.state(name) is None, pair.b.guests()
        assert_on_bridge(pair.a, name, ON_A)
        records = hook_records(pair.b, name)
        assert any(" op=migrate subop=begin " in record for record in records), records
        assert not any("renamed" in record for record in records), records
    finally:
        pair.b.write_kvmhook_conf(None)
        remove_guest(pair, name)
