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

(b) and (c) run on a second pair of the same shape whose kvmhook.conf says
`[network] provision = vxlan` (the `overlay` fixture), so (a)'s hosts never
provision.

(b) VXLAN. A guest on brvx-5000 starts on a: a's hook makes vxlan5000 (VNI
5000, group 239.0.19.136, UDP 8472, ttl 10, through cloudbr0, with a /32
route for the group) and the bridge, the guest's tap a port of it. The guest
migrates to b with `kvmhook migrate`: b's hook made them at `prepare begin`
and a's removed them at `release end`. A second guest on a makes them there
again, and a datagram between test addresses on the two brvx-5000 crosses
the overlay (multicast VXLAN over the veth, the VTEP learnt). Stopping a
guest that is not the last keeps the bridge; stopping the last removes it,
its vxlan device and its route. A bridge the operator made (brvx-6000)
survives its guest's stop, while the made brvx-5000 the same guest used goes.

(c) VLAN, `provision = vlan`: the kernel inside a host is probed for 802.1q.
Without it (this machine) `virsh start` of a guest on brenp1s0-200 fails with
the hook's line naming the bridge and the kernel's own words, and nothing is
left behind; with it, enp1s0.200 and brenp1s0-200 are made, the guest runs
on the bridge, and both go at `virsh destroy`. Either way, for real: no skip.

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


# -- (b) VXLAN and (c) VLAN bridges made where used, removed when unused --------------------

VNI = 5000
VXLAN_BRIDGE, VXLAN_DEVICE = f"brvx-{VNI}", f"vxlan{VNI}"
GROUP = "239.0.19.136"  # 239.<VNI>>16>.<VNI>>8 & 255>.<VNI & 255>, as CloudStack derives it
VXLAN_CONF = "[network]\nprovision = vxlan\n"
VLAN_CONF = "[network]\nprovision = vlan\n"
# What the hook logs (kvmhook.net.provision), after the record's "network: ".
MADE_VXLAN = (
    f"network: made bridge {VXLAN_BRIDGE} with {VXLAN_DEVICE} "
    f"(VNI {VNI}, group {GROUP}, UDP 8472 via {GUEST_BRIDGE}) in "
)
REMOVED_VXLAN = f"network: removed bridge {VXLAN_BRIDGE} and {VXLAN_DEVICE}: no guest uses it"
OVERLAY = ("10.251.0.1", "10.251.0.2")  # test addresses on a's and b's brvx-5000
OPERATORS = "brvx-6000"  # a bridge the test makes, as an operator would
VLAN_BRIDGE, VLAN_DEVICE = f"br{NICS[0]}-200", f"{NICS[0]}.200"  # on a: brenp1s0-200


def fresh(label: str) -> str:
    return f"{GUEST_PREFIX}{label}-{time.monotonic_ns() % 10**8}"


@pytest.fixture(scope="module")
def overlay():
    """A second pair of the same shape as `pair` whose hooks provision VXLAN bridges
    (`[network] provision = vxlan` in both kvmhook.conf); all gone after."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with TwoHosts(nics=NICS) as hosts:
        for host in hosts.hosts:
            host.write_kvmhook_conf(VXLAN_CONF)
        yield hosts


def tap(host: Host, name: str) -> str:
    """The tap of the running guest's one NIC on `host`."""
    (nic,) = host.interfaces(name)
    return nic.tap


def words_after(line: str, keys: tuple[str, ...]) -> dict[str, str]:
    """{key: the word after it} in `line` of `ip -d link show`: its values by name."""
    words = line.split()
    return {key: words[words.index(key) + 1] for key in keys if key in words[:-1]}


def is_up(details: str | None) -> bool:
    """Whether the flags of `ip link show` (`<BROADCAST,MULTICAST,UP,LOWER_UP>`) say UP."""
    flags = (details or "").partition("<")[2].partition(">")[0]
    return "UP" in flags.split(",")


def group_route(host: Host) -> str:
    return host.run("ip", "route", "show", f"{GROUP}/32").stdout.strip()


def assert_overlay(host: Host, taps: list[str]) -> None:
    """`host` has vxlan5000 as CloudStack makes it (VNI, group, UDP port, ttl, through
    cloudbr0), up and enslaved in brvx-5000 (forward delay 0, up), whose other ports are
    exactly `taps`; the group is routed through cloudbr0; the hook remembers the bridge."""
    device = host.link_details(VXLAN_DEVICE)
    assert device is not None, f"no {VXLAN_DEVICE} on {host.short}: {host.links()}"
    (line,) = [line for line in device.splitlines() if line.split()[:2] == ["vxlan", "id"]]
    found = words_after(line, ("id", "group", "dstport", "ttl", "dev"))
    wanted = {"id": str(VNI), "group": GROUP, "dstport": "8472", "ttl": "10", "dev": GUEST_BRIDGE}
    assert found == wanted, device
    assert f" master {VXLAN_BRIDGE} " in device and is_up(device), device
    bridge = host.link_details(VXLAN_BRIDGE)
    assert bridge is not None, f"no {VXLAN_BRIDGE} on {host.short}: {host.links()}"
    assert " forward_delay 0 " in bridge and is_up(bridge), bridge
    assert sorted(host.bridge_ports(VXLAN_BRIDGE)) == sorted([VXLAN_DEVICE, *taps])
    assert f" dev {GUEST_BRIDGE} " in f" {group_route(host)} ", group_route(host)
    assert VXLAN_BRIDGE in host.made_bridges(), host.made_bridges()


def assert_no_overlay(host: Host) -> None:
    """Neither brvx-5000 nor vxlan5000 on `host`, no route for the group, nothing
    remembered."""
    links = host.links()
    assert VXLAN_BRIDGE not in links and VXLAN_DEVICE not in links, (host.short, links)
    assert group_route(host) == "", (host.short, group_route(host))
    assert VXLAN_BRIDGE not in host.made_bridges(), (host.short, host.made_bridges())


def records_saying(host: Host, name: str, text: str) -> list[str]:
    """The host's hook log records about the guest `name` that contain `text`."""
    return [record for record in hook_records(host, name) if text in record]


@pytest.fixture(scope="module")
def vx_guest(overlay):
    """g1: a guest started on a on brvx-5000 (a's hook makes it): its name."""
    name = fresh("vx1")
    start_guest(overlay.a, name, VXLAN_BRIDGE)
    yield name
    remove_guest(overlay, name)


@pytest.fixture(scope="module")
def vx_migrated(overlay, vx_guest):
    """g1 `kvmhook migrate`d from a to b: the result."""
    return migrate(overlay, vx_guest)


@pytest.fixture(scope="module")
def vx_second(overlay, vx_migrated):
    """g2: a second guest on brvx-5000, started on a once g1 has left it: its name."""
    name = fresh("vx2")
    start_guest(overlay.a, name, VXLAN_BRIDGE)
    yield name
    remove_guest(overlay, name)


def test_a_vxlan_guest_s_start_makes_its_bridge_on_a(overlay, vx_guest):
    """a's hook made vxlan5000 and brvx-5000 at `prepare begin`, the guest's tap is a port
    of it, and it said so; b, where no guest uses it, has neither."""
    assert_overlay(overlay.a, [tap(overlay.a, vx_guest)])
    made = records_saying(overlay.a, vx_guest, MADE_VXLAN)
    assert len(made) == 1 and " op=prepare subop=begin " in made[0], hook_records(
        overlay.a, vx_guest
    )
    assert_no_overlay(overlay.b)


def test_the_vxlan_bridge_follows_its_guest_to_b(overlay, vx_guest, vx_migrated):
    """After `kvmhook migrate`: b's hook made vxlan5000 and brvx-5000 (its `prepare begin`
    runs on the destination) and the guest's tap is a port there; a's removed them, and the
    route it added, at the source's `release end`."""
    result = vx_migrated
    assert result.returncode == 0, (
        f"kvmhook migrate failed:\n{result.stdout}\n{result.stderr}\n"
        f"b's libvirtd log:\n{overlay.b.libvirtd_log()}"
    )
    assert overlay.b.state(vx_guest) == "running"
    assert vx_guest not in overlay.a.guests()
    assert_on_bridge(overlay.b, vx_guest, VXLAN_BRIDGE)
    assert_overlay(overlay.b, [tap(overlay.b, vx_guest)])
    made = records_saying(overlay.b, vx_guest, MADE_VXLAN)
    assert len(made) == 1 and " op=prepare subop=begin " in made[0], hook_records(
        overlay.b, vx_guest
    )
    assert_no_overlay(overlay.a)
    removed = records_saying(overlay.a, vx_guest, REMOVED_VXLAN)
    assert len(removed) == 1 and " op=release subop=end " in removed[0], hook_records(
        overlay.a, vx_guest
    )


def test_a_datagram_crosses_the_overlay_between_the_hosts(overlay, vx_guest, vx_second):
    """With g1 on b and g2 started on a (a's hook made the bridge again), both hosts have
    brvx-5000: a datagram between addresses given to the two bridges arrives, each way, and
    each host's vxlan5000 learnt the other's address (the frames went through the VXLAN,
    over the veth)."""
    a, b = overlay.hosts
    assert b.state(vx_guest) == "running", "the migration test failed first"
    assert_overlay(a, [tap(a, vx_second)])
    assert_overlay(b, [tap(b, vx_guest)])
    assert len(records_saying(a, vx_second, MADE_VXLAN)) == 1, hook_records(a, vx_second)
    for host, address in zip(overlay.hosts, OVERLAY):
        host.run("ip", "addr", "add", f"{address}/24", "dev", VXLAN_BRIDGE)
    for host, address in zip(overlay.hosts, OVERLAY[::-1]):
        route = host.run("ip", "route", "get", address).stdout
        assert f" dev {VXLAN_BRIDGE} " in route, route  # no other way there
    assert udp_datagram(a, b, OVERLAY[1], source=OVERLAY[0]) == OVERLAY[0]
    assert udp_datagram(b, a, OVERLAY[0], source=OVERLAY[1]) == OVERLAY[1]
    for host, peer in ((a, b), (b, a)):
        learnt = host.run("bridge", "fdb", "show", "dev", VXLAN_DEVICE).stdout
        assert f" dst {peer.address} " in learnt, (host.short, learnt)


def test_stopping_the_last_guest_removes_the_bridge(overlay, vx_guest, vx_second):
    """On b a third guest joins g1 on brvx-5000: g1's stop keeps the bridge (g3 uses it), g3's
    removes it with vxlan5000 and the group's route. On a, g2's stop, the last, removes
    them too."""
    a, b = overlay.hosts
    assert b.state(vx_guest) == "running", "the migration test failed first"
    assert a.state(vx_second) == "running", "the datagram test failed first"
    third = fresh("vx3")
    try:
        start_guest(b, third, VXLAN_BRIDGE)
        assert not records_saying(b, third, "made bridge"), hook_records(b, third)
        b.virsh("destroy", vx_guest)
        assert_overlay(b, [tap(b, third)])
        kept = records_saying(b, vx_guest, f"network: bridge {VXLAN_BRIDGE} kept: used by {third}")
        assert kept, hook_records(b, vx_guest)
        b.virsh("destroy", third)
        assert_no_overlay(b)
        assert records_saying(b, third, REMOVED_VXLAN), hook_records(b, third)
    finally:
        remove_guest(overlay, third)
    a.virsh("destroy", vx_second)
    assert_no_overlay(a)
    assert records_saying(a, vx_second, REMOVED_VXLAN), hook_records(a, vx_second)


def test_a_bridge_the_operator_made_survives_its_guest_s_stop(overlay):
    """On b, a guest with a NIC on brvx-6000, which the test made (as an operator would), and
    one on brvx-5000: the hook makes brvx-5000 only; at the guest's stop brvx-5000 goes and
    brvx-6000 stays, untouched (no vxlan6000 made, never remembered)."""
    b = overlay.b
    name = fresh("vxop")
    b.add_bridge(OPERATORS)
    try:
        b.define_guest(name, guest_xml(name, bridges=[OPERATORS, VXLAN_BRIDGE]))
        b.virsh("start", name)
        nics = b.interfaces(name)
        assert [nic.source for nic in nics] == [OPERATORS, VXLAN_BRIDGE], nics
        assert b.bridge_ports(OPERATORS) == [nics[0].tap]
        assert_overlay(b, [nics[1].tap])
        assert "vxlan6000" not in b.links() and OPERATORS not in b.made_bridges()
        assert not records_saying(b, name, f"made bridge {OPERATORS}"), hook_records(b, name)
        b.virsh("destroy", name)
        assert OPERATORS in b.links() and b.bridge_ports(OPERATORS) == []
        assert is_up(b.link_details(OPERATORS)), b.link_details(OPERATORS)
        assert_no_overlay(b)
        assert not records_saying(b, name, OPERATORS), hook_records(b, name)
    finally:
        remove_guest(overlay, name)
        if OPERATORS in b.links():  # else the test failed for it: say that, not this
            b.delete_link(OPERATORS)


def test_a_vlan_bridge_is_made_or_refused_with_the_kernel_s_words(overlay):
    """With `provision = vlan` on a: where a's kernel has 802.1q, a guest on brenp1s0-200
    starts on the enp1s0.200 and bridge the hook made, and both go at its stop; where it has
    not (this machine: "Unknown device type"), `virsh start` fails with the hook's line,
    which names the bridge and holds the kernel's own answer, and nothing is left behind."""
    a = overlay.a
    probe = a.run(
        "ip", "link", "add", "link", NICS[0], "name", "probe.5", "type", "vlan", "id", "5",
        check=False,
    )  # fmt: skip
    if probe.returncode == 0:
        a.delete_link("probe.5")
    name = fresh("vlan")
    a.write_kvmhook_conf(VLAN_CONF)
    try:
        a.define_guest(name, guest_xml(name, bridges=[VLAN_BRIDGE]))
        started = a.virsh("start", name, check=False)
        if probe.returncode == 0:
            assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
            assert_on_bridge(a, name, VLAN_BRIDGE)
            device = a.link_details(VLAN_DEVICE) or ""
            assert "vlan protocol 802.1Q id 200 " in device, device
            assert f" master {VLAN_BRIDGE} " in device and is_up(device), device
            assert sorted(a.bridge_ports(VLAN_BRIDGE)) == sorted([VLAN_DEVICE, tap(a, name)])
            assert VLAN_BRIDGE in a.made_bridges()
            assert records_saying(a, name, f"network: made bridge {VLAN_BRIDGE} with ")
            a.virsh("destroy", name)
            gone = f"network: removed bridge {VLAN_BRIDGE} and {VLAN_DEVICE}: no guest uses it"
            assert records_saying(a, name, gone), hook_records(a, name)
        else:
            kernel = probe.stderr.strip().splitlines()[0]  # "Error: Unknown device type."
            said = started.stdout + started.stderr
            assert started.returncode != 0, said
            assert f"kvmhook: cannot make bridge {VLAN_BRIDGE}: {kernel}" in said, said
            assert a.state(name) == "shut off"
            refused = records_saying(a, name, f"refused: kvmhook: cannot make bridge {VLAN_BRIDGE}")
            assert refused and " op=prepare subop=begin " in refused[0], hook_records(a, name)
        links = a.links()
        assert VLAN_BRIDGE not in links and VLAN_DEVICE not in links, links
        assert VLAN_BRIDGE not in a.made_bridges(), a.made_bridges()
    finally:
        a.write_kvmhook_conf(VXLAN_CONF)
        remove_guest(overlay, name)
