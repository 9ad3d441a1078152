"""`kvmhook network list`: the guest-network bridges of this host."""

from __future__ import annotations

import json

import click

from kvmhook import events, exitcodes, paths
from kvmhook.cli.options import connect_option, failure, with_exit_codes
from kvmhook.errors import ConfigError, KvmhookError, VirtError
from kvmhook.net import inventory, provision

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
tap names, said once on stderr). MADE: kvmhook made the bridge ([network]
provision, at prepare begin), as remembered in /run/kvmhook/bridges/."""

_GC = """\b
A bridge kvmhook made goes at the release end of the last guest using
it. This command is for those a lost release left (libvirtd or the hook
killed): each remembered bridge goes, with its VXLAN or VLAN device and
the multicast route kvmhook added, when no port is left on it and no
guest libvirt runs claims it (when libvirt does not answer, every claim
counts, and a warning says so). Bridges named in [network] keep stay;
bridges kvmhook did not make are never touched; a remembered bridge
that no longer exists is forgotten."""


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


@network.command(
    "gc",
    epilog=with_exit_codes("kvmhook network gc", _GC, "Example: kvmhook network gc --dry-run"),
)
@click.option("--dry-run", is_flag=True, help="Say which bridges would go; remove none.")
@connect_option
def gc(dry_run: bool, source_uri: str) -> None:
    """Remove the bridges kvmhook made that no guest uses any more."""
    # Imported here: loading libvirt-python costs every other command ~50 ms.
    from kvmhook.hook import hookconf
    from kvmhook.host import virt

    try:
        active: list[str] | None = [guest.name for guest in virt.running_guests(source_uri)]
    except VirtError as error:
        click.echo(f"warning: every claim counts: {error}", err=True)
        active = None
    try:
        conf = hookconf.read()
    except OSError as error:
        why = f"cannot read {paths.kvmhook_conf()}: {error.strerror}"
        raise failure(why, exitcodes.FAILED) from None
    try:
        keep = hookconf.words(conf, "network", "keep", _config_problem)
        removed, failed = provision.gc(keep, active, dry_run, click.echo)
    except KvmhookError as error:
        raise failure(str(error), exitcodes.FAILED) from None
    for name in removed if dry_run else []:
        click.echo(f"would remove bridge {name}")
    for name in [] if dry_run else removed:
        events.emit("bridge.removed", bridge=name)
    if failed:
        problem = "; ".join(failed)
        events.failed("network.gc_failed", KvmhookError(problem), removed=len(removed))
        raise failure(problem, exitcodes.FAILED)
    events.emit("network.gc", removed=len(removed), dry_run=dry_run)


def _config_problem(problem: str) -> None:
    raise ConfigError(problem)


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
