"""CloudStack's bridge rename at `migrate begin`: a guest's VLAN bridges named for this host.

Hosts name their NICs differently, and CloudStack names a VLAN bridge after
the NIC (`brenp1s0-100`), so a guest arriving from a host whose NIC is
enp1s0 would ask for a bridge this host does not have, and libvirt would
fail with "Cannot get interface MTU". CloudStack's own qemu hook renames,
and so does kvmhook, with the same table:

    cloudVirBr<V>                              -> br<P>-<V>
    br<D>-<V> (not brvx-), device <D> here     -> unchanged
    br<D>-<V> (not brvx-), no device <D> here  -> br<P>-<V>
    anything else, or no bridge                -> unchanged

P is the guest network's physical device (physical_device). Imported by the
hook only when the XML holds a name the table may change (may_rename).
"""

from __future__ import annotations

import os

from kvmhook import paths
from kvmhook.errors import KvmhookError

# re and ElementTree are imported where used: the hook imports this module on every
# migrate begin, and most of those have no name to rename (may_rename).
TYPE_CHECKING = False  # typing costs import time the hook pays on every migration
if TYPE_CHECKING:
    import re
    from collections.abc import Callable

    from kvmhook.hook.hookconf import HookConf

PROPERTY = "guest.network.device"
# The raw bytes a domain XML holds when the table may change one of its bridges.
_MARKS = (b"cloudVirBr", b"bridge='br", b'bridge="br')
_OLD_STYLE = r"cloudVirBr(\d+)"
_NEW_STYLE = r"br(\w+)-(\d+)"
# Ports of a guest bridge that are guests' taps, never the physical device.
_TAPS = ("vnet", "vif")


class NoPhysicalDevice(KvmhookError):
    """P cannot be found: the message says why."""


def may_rename(xml: bytes) -> bool:
    """Whether `xml` holds a bridge name the table may change: a cheap look at the bytes,
    so a host whose guests use none (VXLAN's brvx- bridges included) pays no parse."""
    if _MARKS[0] in xml:
        return True
    for mark in _MARKS[1:]:
        at = xml.find(mark)
        while at >= 0:
            if not xml.startswith(b"vx-", at + len(mark)):
                return True
            at = xml.find(mark, at + 1)
    return False


def vlan_to_rename(bridge: str, exists: Callable[[str], bool]) -> str | None:
    """The VLAN of `bridge` when it must become `br<P>-<VLAN>` here; None when it stays.

    `exists(name)` says whether this host has the network device `name`.
    """
    import re

    old = re.fullmatch(_OLD_STYLE, bridge)
    if old is not None:
        return old.group(1)
    new = re.fullmatch(_NEW_STYLE, bridge)
    if new is None or bridge.startswith("brvx-") or exists(new.group(1)):
        return None
    return new.group(2)


def renames(xml: bytes, exists: Callable[[str], bool]) -> dict[str, str]:
    """{bridge: VLAN} for each interface bridge of the domain `xml` the table renames.

    Raises ElementTree.ParseError when `xml` is not XML.
    """
    from xml.etree import ElementTree

    found = {}
    for source in ElementTree.fromstring(xml).iterfind("./devices/interface/source"):
        bridge = source.get("bridge")
        vlan = None if bridge is None else vlan_to_rename(bridge, exists)
        if bridge is not None and vlan is not None:
            found[bridge] = vlan
    return found


def renamed(xml: bytes, new_names: dict[str, str]) -> bytes:
    """`xml` with each `<source bridge=OLD>` naming new_names[OLD]; every other byte kept
    (an edit in place, not a re-serialization: libvirt gets back what it gave, but the names)."""
    import re

    def rename(match: re.Match[bytes]) -> bytes:
        old = match.group(3).decode()
        if old not in new_names:
            return match.group(0)
        return match.group(1) + match.group(2) + new_names[old].encode() + match.group(2)

    # Bridge names are \w, - and digits: no entity in them to decode.
    return re.sub(rb"(<source\b[^>]*?\sbridge\s*=\s*)(['\"])([^'\"]*)\2", rename, xml)


def physical_device() -> tuple[str, str]:
    """(P, how it was found): `guest.network.device` from agent.properties, or, when that is a
    bridge, its port that is not a guest tap, with a `.<vlan>` suffix cut.

    Raises NoPhysicalDevice saying why.
    """
    device = guest_network_device()
    net = paths.sys_class_net()
    if not os.path.isdir(os.path.join(net, device, "bridge")):
        found = device, f"{PROPERTY}={device}"
    else:
        found = _port(net, device), f"{PROPERTY}={device}, its port"
    import re

    if not re.fullmatch(r"\w{1,15}", found[0], re.ASCII):
        # It goes into the XML as it is, and CloudStack's names are br<\w+>-<vlan>.
        raise NoPhysicalDevice(f"{found[1]}: {found[0]!r} is not a plain interface name")
    return found


def guest_network_device() -> str:
    """`guest.network.device` from agent.properties, a device of this host.

    Raises NoPhysicalDevice saying why not.
    """
    from kvmhook.certs import agentproperties
    from kvmhook.errors import KeystoreError

    try:
        path, text = agentproperties.read_host()
    except KeystoreError as error:
        raise NoPhysicalDevice(str(error)) from None
    device = None if text is None else agentproperties.value(text, PROPERTY)
    if device is None:
        why = "does not exist" if text is None else f"sets no {PROPERTY}"
        raise NoPhysicalDevice(f"{path} {why}")
    net = paths.sys_class_net()
    if not device_exists(device):
        raise NoPhysicalDevice(f"{PROPERTY}={device}: no such device in {net}")
    return device


def _port(net: str, bridge: str) -> str:
    """The port of `bridge` that is not a guest tap, its `.<vlan>` suffix cut."""
    import re

    try:
        ports = sorted(os.listdir(os.path.join(net, bridge, "brif")))
    except OSError as error:
        why = f"cannot list the ports of bridge {bridge}: {error.strerror}"
        raise NoPhysicalDevice(why) from None
    for port in ports:
        if not port.startswith(_TAPS):
            return re.sub(r"\.\d+$", "", port)
    raise NoPhysicalDevice(f"bridge {PROPERTY}={bridge} has no port but guest taps")


def device_exists(name: str) -> bool:
    """Whether this host has the network device `name` (sysfs, under KVMHOOK_ROOT)."""
    return os.path.lexists(os.path.join(paths.sys_class_net(), name))


def for_destination(xml: bytes, say: Callable[[str], None]) -> bytes:
    """`xml` with its bridges named for this host; `xml` itself when nothing changes or P
    cannot be found. Each rename and each problem goes to `say`, never the XML."""
    if not may_rename(xml):
        return xml
    from xml.etree import ElementTree

    try:
        vlans = renames(xml, device_exists)
    except ElementTree.ParseError as error:
        say(f"network: bridges not renamed: the domain XML does not parse ({error})")
        return xml
    if not vlans:
        return xml
    try:
        physical, how = physical_device()
    except NoPhysicalDevice as error:
        say(f"network: bridges {', '.join(sorted(vlans))} not renamed: {error}")
        return xml
    new_names = {old: f"br{physical}-{vlan}" for old, vlan in vlans.items()}
    for old, new in sorted(new_names.items()):
        say(f"network: bridge {old} renamed {new} ({how}: {physical})")
    return renamed(xml, new_names)


def at_migrate_begin(xml: bytes, conf: HookConf | None, say: Callable[[str], None]) -> bytes:
    """What `migrate begin` does to `xml` before any script reads it, for the hook and for
    `kvmhook hooks run` alike: its bridges named for this host (for_destination) unless
    kvmhook.conf (`conf`, None: no file) says `[network] rename_bridges = no`. Each rename,
    each problem and each complaint about the file goes to `say`, never the XML."""
    from kvmhook.hook import hookconf

    if not hookconf.renames_bridges(conf, lambda problem: say(f"config: {problem}")):
        return xml
    return for_destination(xml, say)


def with_live_bridges(persistent: bytes, live: bytes) -> bytes | None:
    """The `persistent` definition with the bridges of the `live` one, interface by interface
    (matched by MAC address); None when they already agree.

    libvirt passes only the live definition through the hook at `migrate begin`:
    with VIR_MIGRATE_PERSIST_DEST the persistent one arrives unchanged, on the
    source's bridge names, and the guest's next cold start here would fail.
    Raises ElementTree.ParseError when either is not XML.
    """
    live_bridges = _bridges_by_mac(live)
    new_names = {
        old: live_bridges[mac]
        for mac, old in _bridges_by_mac(persistent).items()
        if mac in live_bridges and live_bridges[mac] != old
    }
    return renamed(persistent, new_names) if new_names else None


def _bridges_by_mac(xml: bytes) -> dict[str, str]:
    """{MAC address: bridge} of the interfaces of domain `xml` that have both."""
    from xml.etree import ElementTree

    found = {}
    for interface in ElementTree.fromstring(xml).iterfind("./devices/interface"):
        mac, source = interface.find("mac"), interface.find("source")
        bridge = None if source is None else source.get("bridge")
        address = None if mac is None else mac.get("address")
        if bridge is not None and address is not None:
            found[address.lower()] = bridge
    return found
