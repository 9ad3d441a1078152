"""`kvmhook network list`: the guest-network bridges of this host."""

from __future__ import annotations

import json

import click

from kvmhook import exitcodes
from kvmhook.cli.options import connect_option, failure, with_exit_codes
from kvmhook.errors import VirtError
from kvmhook.net import inventory

_COLUMNS = ("NAME", "KIND", "ID", "UNDERLAY", "MADE", "PORTS")

_HOW = """\b
Read from /sys/class/net. sysfs does not hold a VXLAN's VNI, so kind and
number come from CloudStack's names, the bridge's port first:
  port vxlan<VNI>, or bridge brvx-<VNI>             vxlan, VNI
  port <PIF>.<VLAN>, or bridge br<PIF>-<VLAN>,
    or cloudVirBr<VLAN>                             vlan, VLAN
  anything else                                     other
UNDERLAY is the lower_* link of that VXLAN or VLAN port in sysfs (for a
VLAN port without one, the PIF of its name); PORTS are the other ports,
each guest tap shown as its guest's name when libvirt answers (else the
tap names, said once on stderr). MADE: kvmhook made the bridge, as
remembered in /run/kvmhook/bridges/ by [network] provision at prepare
begin (until that provisioning is installed, every bridge says no)."""


@click.group()
def network() -> None:
    """The guest networks' bridges on this host."""


@network.command(
    "list",
    epilog=with_exit_codes(
        "kvmhook network list",
        _HOW,
        "Example: kvmhook network list --json | jq '.[] | select(.kind == \"vxlan\")'",
    ),
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a list of objects: name, kind, id, underlay, ports, made.",
)
@connect_option
def list_(as_json: bool, source_uri: str) -> None:
    """Show each bridge: name, kind (vxlan, vlan, other), VNI or VLAN, underlay
    device, ports, and whether kvmhook made it."""
    try:
        found = inventory.bridges()
    except inventory.SysfsError as error:
        raise failure(str(error), exitcodes.FAILED) from None
    found = inventory.with_guest_names(found, _guests_by_tap(source_uri))
    if as_json:
        click.echo(json.dumps([bridge.as_dict() for bridge in found], indent=2))
        return
    rows = [_COLUMNS, *map(_row, found)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _guests_by_tap(source_uri: str) -> dict[str, str]:
    """{tap: guest name} from libvirt; {} and one warning on stderr when it does not answer."""
    # Imported here: loading libvirt-python costs every other command ~50 ms.
    from kvmhook.host import virt

    try:
        return virt.guests_by_tap(source_uri)
    except VirtError as error:
        click.echo(f"warning: ports show tap names: {error}", err=True)
        return {}


def _row(bridge: inventory.Bridge) -> tuple[str, ...]:
    return (
        bridge.name,
        bridge.kind,
        "-" if bridge.id is None else str(bridge.id),
        bridge.underlay or "-",
        "yes" if bridge.made else "no",
        ", ".join(bridge.ports) or "-",
    )
