"""Bridges made where used and removed when unused (issue 14, item 2): kvmhook.net.provision.

The decisions run on sysfs trees built under KVMHOOK_ROOT. Making and
removing run for real: the hook runs inside a network namespace of the
test's own (`ip netns add`; `ip netns exec` mounts that namespace's sysfs on
/sys, and <root>/sys links to it), where the kernel makes the VXLAN devices
and bridges and refuses 802.1q (this machine's kernel has none) with its own
words.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sandbox import Host
from test_bridges import agent, net_tree

from kvmhook.net import provision

VXLAN = "brvx-5000"


def domain(name: str, *bridges: str) -> bytes:
    interfaces = "".join(
        f"<interface type='bridge'><mac address='52:54:00:00:00:{i:02x}'/>"
        f"<source bridge='{bridge}'/><model type='virtio'/></interface>"
        for i, bridge in enumerate(bridges)
    )
    return (
        f"<domain type='kvm'><name>{name}</name><devices>{interfaces}</devices></domain>".encode()
    )


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "device", "number"),
    [
        ("brvx-5000", "vxlan", "vxlan5000", 5000),
        ("brvx-0", "vxlan", "vxlan0", 0),
        ("brvx-16777215", "vxlan", "vxlan16777215", 16777215),
        ("brenp1s0-100", "vlan", "enp1s0.100", 100),
        ("brbond0-4094", "vlan", "bond0.4094", 4094),
        ("breth_1-1", "vlan", "eth_1.1", 1),
    ],
)
def test_cloudstacks_names_are_made_as_cloudstack_makes_them(name, kind, device, number):
    made = provision.spec(name)
    assert (made.kind, made.device, made.number) == (kind, device, number)


@pytest.mark.parametrize(
    "name",
    [
        "brvx-16777216",  # past 24 bits
        "brvx-05000",  # not as CloudStack writes it: vxlan05000 would be another device
        "brvx-",
        "brenp1s0-0",
        "brenp1s0-4095",
        "brenp1s0-0100",
        "br-100",
        "brenp1s0.5-100",  # \w only, as CloudStack's br(\w+)-(\d+)
        "brenp1s0-100-2",
        "cloudbr0",
        "virbr0",
        "cloudVirBr100",  # its PIF is not in its name: renamed at migrate begin, never made
        "brénp1s0-100",
    ],
)
def test_any_other_name_is_never_made(name):
    assert provision.spec(name) is None


def test_each_kind_only_when_provisioned():
    assert provision.spec("brvx-5000", ["vlan"]) is None
    assert provision.spec("brenp1s0-100", ["vxlan"]) is None


@pytest.mark.parametrize(
    ("vni", "group"),
    [(5000, "239.0.19.136"), (1, "239.0.0.1"), (16777215, "239.255.255.255"), (65536, "239.1.0.0")],
)
def test_the_multicast_group_is_cloudstacks(vni, group):
    assert provision.spec(f"brvx-{vni}").group == group


def test_bridge_names_from_the_bytes():
    xml = (
        b"<domain><devices>"
        b"<interface type='bridge'><source bridge='brvx-5000'/></interface>"
        b'<interface type="bridge"><source  bridge = "brenp1s0-100" /></interface>'
        b"<interface type='network'><source network='default' bridge='virbr0'/></interface>"
        b"<interface type='bridge'><source bridge='brvx-5000'/></interface>"
        b"<interface type='user'/><interface type='bridge'><source/></interface>"
        b"<disk><source file='/x' xbridge='no'/></disk><sourcex bridge='no'/>"
        b"</devices></domain>"
    )
    assert provision.bridge_names(xml) == ["brvx-5000", "brenp1s0-100", "virbr0"]


# -- decisions on sysfs trees ------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    net_tree(tmp_path, {"lo": None, "enp1s0": None, "cloudbr0": ["enp1s0"]})
    return tmp_path


def remember(root, bridge: str, *guests: str) -> None:
    memory = root / "run/kvmhook/bridges" / bridge
    memory.mkdir(parents=True)
    for guest in guests:
        (memory / f"guest.{guest}").touch()


def test_a_bridge_the_operator_made_is_never_claimed_or_locked(tree):
    net_tree(tree, {VXLAN: []})
    said = []
    assert provision.at_prepare("vm1", domain("vm1", VXLAN), ["vxlan"], said.append) is None
    assert not (tree / "run/kvmhook").exists()  # no memory, no lock: nothing of kvmhook's
    provision.at_release("vm1", domain("vm1", VXLAN), [], said.append)
    assert said == []


def test_a_made_bridge_that_exists_is_claimed_by_each_guest(tree):
    net_tree(tree, {VXLAN: ["vxlan5000"]})
    remember(tree, VXLAN)
    for guest in ("vm1", "vm2"):
        assert provision.at_prepare(guest, domain(guest, VXLAN), ["vxlan"], print) is None
    assert sorted(provision._claims(VXLAN).values()) == ["vm1", "vm2"]


def test_release_keeps_a_bridge_another_guest_claims_or_uses_or_keep_names(tree):
    net_tree(tree, {VXLAN: ["vxlan5000", "vnet7"], "brvx-6000": ["vxlan6000"]})
    remember(tree, VXLAN, "vm1", "vm2")
    remember(tree, "brvx-6000", "vm1")
    said = []
    provision.at_release("vm1", domain("vm1", VXLAN, "brvx-6000"), ["brvx-6000"], said.append)
    assert said == [
        "bridge brvx-5000 kept: used by vm2",
        "bridge brvx-6000 kept: [network] keep names it",
    ]
    assert list(provision._claims(VXLAN).values()) == ["vm2"]
    assert provision._claims("brvx-6000") == {}
    said.clear()
    provision.at_release("vm2", domain("vm2", VXLAN), [], said.append)
    assert said == ["bridge brvx-5000 kept: ports vnet7"]


def test_a_made_bridge_removed_by_hand_is_forgotten_at_release(tree):
    remember(tree, VXLAN, "vm1")
    provision.at_release("vm1", domain("vm1", VXLAN), [], print)
    assert provision.remembered() == []


def test_odd_guest_names_claim_and_release(tree):
    net_tree(tree, {VXLAN: ["vxlan5000"]})
    remember(tree, VXLAN)
    names = ["a/b", "..", "vm with spaces", "é" * 150, "\udcff"]
    for name in names:
        assert provision.at_prepare(name, domain("x", VXLAN), ["vxlan"], print) is None
    assert len(provision._claims(VXLAN)) == len(names)
    assert "vm with spaces" in provision._claims(VXLAN).values()
    for name in names:
        provision.at_release(name, domain("x", VXLAN), [VXLAN], print)
    assert provision._claims(VXLAN) == {}


def test_a_symlink_planted_as_memory_is_not_memory(tree):
    (tree / "run/kvmhook/bridges").mkdir(parents=True)
    os.symlink("/etc", tree / "run/kvmhook/bridges" / VXLAN)
    assert provision.remembered() == []


# -- the kernel's, in a network namespace of the test's -----------------------------------


def _need_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip (iproute2) for a network namespace of the test's own")


class Netns:
    """A host root whose network is a namespace of its own: cloudbr0 10.9.0.1/24 (the guest
    network device, its port the veth enp1s0), kvmhook.conf provisioning both kinds."""

    def __init__(self, root, name: str) -> None:
        self.host = Host(root)
        self.name = name
        self.launcher = self.host.launcher()
        (root / "sys").symlink_to("/sys")  # in `ip netns exec`, /sys is the namespace's
        agent(root, "guest.network.device=cloudbr0\n")
        self.conf("[network]\nprovision = vxlan, vlan\n")
        subprocess.run(["ip", "netns", "add", name], check=True)
        for command in (
            "link set lo up",
            "link add enp1s0 type veth peer name peer0",
            "link add cloudbr0 type bridge",
            "link set enp1s0 master cloudbr0",
            "address add 10.9.0.1/24 dev cloudbr0",
            "link set enp1s0 up",
            "link set peer0 up",
            "link set cloudbr0 up",
        ):
            self.ip(*command.split())

    def conf(self, text: str) -> None:
        path = self.host.root / "etc/kvmhook/kvmhook.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def ip(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, timeout=30
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result.stdout

    def hook(self, guest: str, operation: str, subop: str, *bridges: str):
        command = ["ip", "netns", "exec", self.name, str(self.launcher)]
        return subprocess.run(
            [*command, guest, operation, subop, "-"],
            input=domain(guest, *bridges),
            capture_output=True,
            env=self.host.env(),
            timeout=120,
            check=False,
        )

    def cli(self, *args: str, uri: str = "test:///default"):
        """`kvmhook ARGS --connect URI` in the namespace (test:///default runs guest `test`)."""
        kvmhook = Path(sys.executable).parent / "kvmhook"
        command = ["ip", "netns", "exec", self.name, str(kvmhook), *args, "--connect", uri]
        return subprocess.run(
            command, capture_output=True, text=True, env=self.host.env(), timeout=120, check=False
        )

    def remember(self, bridge: str, *guests: str) -> None:
        """A bridge kvmhook made whose guests' release was lost: made by prepare, for real."""
        for guest in guests:
            self.start(guest, bridge)

    def start(self, guest: str, *bridges: str) -> None:
        result = self.hook(guest, "prepare", "begin", *bridges)
        assert result.returncode == 0, (result.stderr, self.host.records()[-5:])

    def stop(self, guest: str, *bridges: str) -> None:
        result = self.hook(guest, "release", "end", *bridges)
        assert result.returncode == 0, result.stderr

    def has(self, device: str) -> bool:
        return (
            subprocess.run(
                ["ip", "-n", self.name, "link", "show", device], capture_output=True, check=False
            ).returncode
            == 0
        )

    def details(self, device: str) -> str:
        return self.ip("-d", "link", "show", device)

    def network_said(self) -> list[str]:
        return [record for record in self.host.records() if " network: " in record]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns(tmp_path):
    _need_namespaces()
    made = Netns(tmp_path / "root", f"kvmhook-t-{uuid.uuid4().hex[:8]}")
    try:
        yield made
    finally:
        made.close()


def test_a_vxlan_bridge_is_made_at_prepare_and_removed_at_release(netns):
    netns.start("vm1", VXLAN)
    vxlan = netns.details("vxlan5000")
    for word in ("vxlan id 5000", "group 239.0.19.136", "dev cloudbr0", "dstport 8472", "ttl 10"):
        assert word in vxlan
    assert "master brvx-5000" in vxlan and ",UP" in vxlan
    bridge = netns.details(VXLAN)
    assert "forward_delay 0" in bridge and ",UP" in bridge
    assert "239.0.19.136 dev cloudbr0" in netns.ip("route", "show", "239.0.19.136/32")
    assert provision.bridge_names(domain("x", VXLAN))  # sanity: the XML names it
    [made] = netns.network_said()
    assert "made bridge brvx-5000 with vxlan5000 (VNI 5000, group 239.0.19.136, UDP 8472" in made
    assert "<domain" not in "\n".join(netns.host.records())  # never the XML

    netns.stop("vm1", VXLAN)
    assert not netns.has(VXLAN) and not netns.has("vxlan5000")
    assert netns.ip("route", "show", "239.0.19.136/32") == ""
    assert not os.listdir(netns.host.root / "run/kvmhook/bridges")
    assert "removed bridge brvx-5000 and vxlan5000: no guest uses it" in netns.network_said()[-1]


def test_a_group_routed_through_the_underlay_already_gets_no_route_and_keeps_it(netns):
    netns.ip("route", "add", "239.0.0.0/8", "dev", "cloudbr0")
    netns.start("vm1", VXLAN)
    netns.stop("vm1", VXLAN)
    assert "239.0.0.0/8 dev cloudbr0" in netns.ip("route", "show")
    assert not netns.has(VXLAN)


def test_the_operators_bridge_survives_its_guests_stop(netns):
    netns.ip("link", "add", VXLAN, "type", "bridge")
    netns.start("vm1", VXLAN)
    netns.stop("vm1", VXLAN)
    assert netns.has(VXLAN) and not netns.has("vxlan5000")
    assert netns.network_said() == []


def test_keep_names_a_made_bridge_never_removed(netns):
    netns.conf("[network]\nprovision = vxlan\nkeep = brvx-6000, brvx-5000\n")
    netns.start("vm1", VXLAN)
    netns.stop("vm1", VXLAN)
    assert netns.has(VXLAN) and netns.has("vxlan5000")
    assert "bridge brvx-5000 kept: [network] keep names it" in netns.network_said()[-1]


def test_without_provision_nothing_is_made(netns):
    netns.conf("[network]\nrename_bridges = yes\n")
    netns.start("vm1", VXLAN)
    assert not netns.has(VXLAN)


def test_vlan_on_this_kernel_is_made_or_refused_with_the_kernels_words(netns):
    """802.1q where the kernel has it; else one clear line, and nothing left behind."""
    probe = subprocess.run(
        ["ip", "-n", netns.name, "link", "add", "link", "peer0", "name", "probe.5",
         "type", "vlan", "id", "5"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    result = netns.hook("vm1", "prepare", "begin", "brenp1s0-100")
    if probe.returncode == 0:
        assert result.returncode == 0, result.stderr
        assert "vlan protocol 802.1Q id 100" in netns.details("enp1s0.100")
        assert "master brenp1s0-100" in netns.details("enp1s0.100")
        netns.stop("vm1", "brenp1s0-100")
        assert not netns.has("brenp1s0-100") and not netns.has("enp1s0.100")
        return
    assert result.returncode == 1
    line = result.stderr.decode().strip()
    assert "\n" not in line
    assert line.startswith("kvmhook: cannot make bridge brenp1s0-100: ")
    assert probe.stderr.strip().splitlines()[0] in line  # the kernel's own answer
    assert not netns.has("brenp1s0-100") and not netns.has("enp1s0.100")
    assert not os.path.exists(netns.host.root / "run/kvmhook/bridges/brenp1s0-100")
    assert f"refused: {line}; no scripts run" in netns.host.records()[-1]


@pytest.mark.parametrize(
    ("setup", "bridge", "words"),
    [
        ("address flush dev cloudbr0", VXLAN, "no IPv4 address on cloudbr0"),
        ("link set enp1s0 name enp9s9", "brenp1s0-100", "no device enp1s0 on this host"),
        ("link set enp1s0 name enp1s0abcdefgh", "brenp1s0abcdefgh-100", "longer than 15"),
    ],
)
def test_prepare_fails_with_one_line_naming_the_bridge(netns, setup, bridge, words):
    if "name" in setup:
        netns.ip("link", "set", "enp1s0", "down")
    netns.ip(*setup.split())
    result = netns.hook("vm1", "prepare", "begin", bridge)
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith(f"kvmhook: cannot make bridge {bridge}: ") and words in line


def test_no_underlay_property_fails_clearly(netns):
    agent(netns.host.root, "host=10.0.0.1\n")
    result = netns.hook("vm1", "prepare", "begin", VXLAN)
    assert result.returncode == 1
    assert "no underlay for the VXLAN" in result.stderr.decode()
    assert "sets no guest.network.device" in result.stderr.decode()


def test_ten_guests_at_once_make_the_bridge_once_and_share_it(netns):
    guests = [f"vm{i}" for i in range(10)]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda g: netns.hook(g, "prepare", "begin", VXLAN), guests))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert len([s for s in netns.network_said() if "made bridge" in s]) == 1
    assert provision_claims(netns) == sorted(guests)
    # nine leave at once: the last one keeps it
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda g: netns.stop(g, VXLAN), guests[:9]))
    assert netns.has(VXLAN) and provision_claims(netns) == ["vm9"]
    netns.stop("vm9", VXLAN)
    assert not netns.has(VXLAN)


def test_a_start_racing_the_last_stop_never_loses_its_bridge(netns):
    """Each round the last guest leaves while a new one arrives: whichever runs first, the
    new guest ends with its bridge, and nothing else holds it."""
    netns.start("vm0", VXLAN)
    for round_ in range(1, 11):
        leaving, arriving = f"vm{round_ - 1}", f"vm{round_}"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            stop = pool.submit(netns.stop, leaving, VXLAN)
            start = pool.submit(netns.start, arriving, VXLAN)
            stop.result(), start.result()
        assert netns.has(VXLAN) and netns.has("vxlan5000"), f"round {round_}"
        assert provision_claims(netns) == [arriving]
    netns.stop("vm10", VXLAN)
    assert not netns.has(VXLAN)


def provision_claims(netns) -> list[str]:
    memory = netns.host.root / "run/kvmhook/bridges" / VXLAN
    return sorted(e[len("guest.") :] for e in os.listdir(memory) if e.startswith("guest."))


# -- kvmhook network gc ------------------------------------------------------------------


def test_gc_removes_made_bridges_whose_guests_libvirt_does_not_run(netns):
    netns.remember(VXLAN, "gone1", "gone2")  # their release was lost
    netns.remember("brvx-6000", "test")  # test:///default runs `test`
    netns.ip("link", "add", "brvx-7000", "type", "bridge")  # the operator's
    netns.start("vm1", "brvx-7000")

    dry = netns.cli("network", "gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove bridge brvx-5000" in dry.stdout
    assert "bridge brvx-6000 kept: used by test" in dry.stdout
    assert "brvx-7000" not in dry.stdout
    assert netns.has(VXLAN)

    result = netns.cli("network", "gc")
    assert result.returncode == 0, result.stderr
    assert "removed bridge brvx-5000 and vxlan5000: no guest uses it" in result.stdout
    assert not netns.has(VXLAN) and not netns.has("vxlan5000")
    assert netns.ip("route", "show", "239.0.19.136/32") == ""
    assert netns.has("brvx-6000") and netns.has("brvx-7000")


def test_gc_counts_every_claim_when_libvirt_does_not_answer(netns):
    netns.remember(VXLAN, "gone1")
    result = netns.cli("network", "gc", uri="bogus:///nowhere")
    assert result.returncode == 0
    assert "warning: every claim counts" in result.stderr
    assert "bridge brvx-5000 kept: used by gone1" in result.stdout
    assert netns.has(VXLAN)


def test_gc_keeps_ports_and_keep_and_forgets_what_is_gone(netns):
    netns.conf("[network]\nprovision = vxlan\nkeep = brvx-6000\n")
    netns.remember(VXLAN, "gone1")
    netns.remember("brvx-6000", "gone1")
    netns.remember("brvx-6001", "gone1")
    netns.ip("link", "add", "tap9", "type", "veth", "peer", "name", "tap9p")
    netns.ip("link", "set", "tap9", "master", VXLAN)
    netns.ip("link", "del", "brvx-6001")
    result = netns.cli("network", "gc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "bridge brvx-5000 kept: ports tap9",
        "bridge brvx-6000 kept: [network] keep names it",
        "bridge brvx-6001 is gone already: forgotten",
    ]
    assert netns.cli("network", "gc").stdout.count("kept") == 2


def test_gc_with_nothing_made_says_so(netns):
    result = netns.cli("network", "gc")
    assert (result.returncode, result.stdout) == (
        0,
        "kvmhook remembers no bridge it made: nothing to remove\n",
    )


def test_gc_that_cannot_remove_exits_1_naming_the_bridge(netns):
    netns.remember(VXLAN, "gone1")
    route = netns.host.root / "run/kvmhook/bridges" / VXLAN / "route"
    route.write_text("239.9.9.9/32 dev cloudbr0\n")  # a route nobody added
    result = netns.cli("network", "gc")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: bridge brvx-5000 not removed: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("made", [True, False], ids=["made by kvmhook", "the operator's"])
@pytest.mark.parametrize("operation", ["prepare", "release"])
def test_bridges_present_cost_no_parser(tree, made, operation):
    """With provisioning on and the bridge present, neither prepare nor release imports
    configparser or ElementTree (5 to 10 ms each): the names come from the XML's bytes,
    `provision` and `keep` from the file's lines."""
    net_tree(tree, {VXLAN: ["vxlan5000"]})
    if made:
        remember(tree, VXLAN, "other")
    conf = tree / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[network]\nprovision = vxlan, vlan\nkeep = brvx-1\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KVMHOOK_ROOT": str(tree)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmhook.qemu", "vm1", operation, "begin", "-"],
        input=domain("vm1", VXLAN),
        capture_output=True,
        env=env,
        timeout=60,
        check=True,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines()}
    assert "kvmhook.net.provision" in modules or not made  # the path under test ran
    assert not {"configparser", "xml.etree.ElementTree"} & modules, sorted(modules)
    assert (tree / "sys/class/net" / VXLAN).is_dir()
    if made:
        assert sorted(provision._claims(VXLAN).values()) == sorted(
            ["other", "vm1"] if operation == "prepare" else ["other"]
        )
