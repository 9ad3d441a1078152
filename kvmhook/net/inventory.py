"""The guest-network bridges of this host, read from sysfs: `kvmhook network list`.

sysfs shows which devices are bridges (`<dev>/bridge/`) and their ports
(`<dev>/brif/<port>`), and a VLAN or VXLAN device's underlay as its
`lower_<dev>` link, but not a VXLAN's VNI (netlink only). So kind and number
come from CloudStack's names, the port's first:

    port vxlan<VNI>, or bridge brvx-<VNI>                  -> vxlan, VNI
    port <PIF>.<VLAN>, or bridge br<PIF>-<VLAN>, cloudVirBr<VLAN> -> vlan, VLAN
    anything else                                          -> other

A bridge is `made` when paths.made_bridges_dir() holds a file of its name:
the provisioning at `prepare begin` writes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from kvmhook import paths
from kvmhook.errors import KvmhookError

_VXLAN_PORT = re.compile(r"vxlan(\d+)")
_VXLAN_BRIDGE = re.compile(r"brvx-(\d+)")
_VLAN_PORT = re.compile(r"(\w+)\.(\d+)")
_VLAN_BRIDGE = re.compile(r"br(\w+)-(\d+)")
_OLD_VLAN_BRIDGE = re.compile(r"cloudVirBr(\d+)")


class SysfsError(KvmhookError):
    """The network devices of this host cannot be read."""


@dataclass
class Bridge:
    """One bridge; the keys of as_dict() are the stable keys of `--json`."""

    name: str
    kind: str  # vxlan, vlan or other
    id: int | None  # the VNI or the VLAN
    underlay: str | None  # the device the VXLAN or VLAN device sends through
    ports: list[str] = field(default_factory=list)  # every port but that device
    made: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def bridges() -> list[Bridge]:
    """Every bridge of this host, sorted by name, ports as their device names.

    Raises SysfsError when the devices cannot be listed.
    """
    net = paths.sys_class_net()
    try:
        names = sorted(os.listdir(net))
    except OSError as error:
        raise SysfsError(f"cannot list the network devices in {net}: {error.strerror}") from None
    return [
        _bridge(net, name) for name in names if os.path.isdir(os.path.join(net, name, "bridge"))
    ]


def _bridge(net: str, name: str) -> Bridge:
    ports = _ports(net, name)
    kind, number, device = _kind(name, ports)
    underlay = None if device is None else _underlay(net, device, kind)
    return Bridge(
        name=name,
        kind=kind,
        id=number,
        underlay=underlay,
        ports=[port for port in ports if port != device],
        made=os.path.exists(os.path.join(paths.made_bridges_dir(), name)),
    )


def _ports(net: str, bridge: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(net, bridge, "brif")))
    except OSError as error:
        raise SysfsError(f"cannot list the ports of bridge {bridge}: {error.strerror}") from None


def _kind(name: str, ports: list[str]) -> tuple[str, int | None, str | None]:
    """(kind, VNI or VLAN, the port that is the VXLAN or VLAN device, or None)."""
    for port in ports:
        vxlan, vlan = _VXLAN_PORT.fullmatch(port), _VLAN_PORT.fullmatch(port)
        if vxlan is not None:
            return "vxlan", int(vxlan.group(1)), port
        if vlan is not None:
            return "vlan", int(vlan.group(2)), port
    vxlan = _VXLAN_BRIDGE.fullmatch(name)
    if vxlan is not None:
        return "vxlan", int(vxlan.group(1)), None
    vlan = _VLAN_BRIDGE.fullmatch(name) or _OLD_VLAN_BRIDGE.fullmatch(name)
    if vlan is not None:
        return "vlan", int(vlan.group(vlan.lastindex or 1)), None
    return "other", None, None


def _underlay(net: str, device: str, kind: str) -> str | None:
    """The `lower_<dev>` link of `device`; for a VLAN device without one, its name's PIF."""
    try:
        lowers = [
            entry for entry in os.listdir(os.path.join(net, device)) if entry.startswith("lower_")
        ]
    except OSError:
        lowers = []  # a port whose device directory cannot be read: named by its name only
    if lowers:
        return sorted(lowers)[0][len("lower_") :]
    vlan = _VLAN_PORT.fullmatch(device)
    return vlan.group(1) if kind == "vlan" and vlan is not None else None


def with_guest_names(found: list[Bridge], guests: dict[str, str]) -> list[Bridge]:
    """`found` with each port that is a guest's tap shown as that guest's name."""
    for bridge in found:
        bridge.ports = [guests.get(port, port) for port in bridge.ports]
    return found
