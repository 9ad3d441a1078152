"""`kvmhook capacity`: this host's CPU and memory, over-provisioned, used by guests, free."""

from __future__ import annotations

import json
from typing import Any

import click

from kvmhook import exitcodes, limits
from kvmhook.cli.options import connect_option, failure, with_exit_codes
from kvmhook.errors import FactorError, KvmhookError

GIB = 2**30

_FACTORS = f"""\b
Factors, each from the first that sets it:
  the flag;
  the controller's settings for this host's cluster, when controller.conf
    exists (a controller that cannot be asked is a warning, and skipped);
  [capacity] cpu_factor / mem_factor in /etc/kvmhook/kvmhook.conf;
  1.
Each must be {limits.FACTOR_RANGE}; one above 4 (the admin guide's
limit for XenServer) is a warning."""


def _factor(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A factor flag out of limits.FACTOR_RANGE is a usage error (exit 2), not a failure."""
    if value is None:
        return None
    import kvmhook.host.capacity

    try:
        return kvmhook.host.capacity.check_factor(value, "the factor")
    except FactorError as error:
        raise click.BadParameter(str(error), param=param) from None


@click.command(
    epilog=with_exit_codes(
        "kvmhook capacity",
        _FACTORS,
        "Example, for monitoring: kvmhook capacity --json | jq .memory.free",
    )
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--cpu-factor",
    type=float,
    callback=_factor,
    metavar="F",
    help=f"CPU over-provisioning factor ({limits.FACTOR_RANGE}).",
)
@click.option(
    "--mem-factor",
    type=float,
    callback=_factor,
    metavar="F",
    help=f"Memory over-provisioning factor ({limits.FACTOR_RANGE}).",
)
@connect_option
def capacity(
    as_json: bool, cpu_factor: float | None, mem_factor: float | None, source_uri: str
) -> None:
    """Show this host's CPU (cores, MHz, cores x MHz) and memory: physical,
    after over-provisioning ((physical - reserved) x factor; reserved memory
    from [capacity] reserved_memory_mib in kvmhook.conf, else
    host.reserved.mem.mb in agent.properties), used by the running guests
    (their vCPUs and maximum memory, read from libvirt) and free."""
    # Imported here: loading libvirt-python costs every other command ~50 ms.
    import kvmhook.host.capacity

    try:
        result = kvmhook.host.capacity.report(
            source_uri, cpu_factor, mem_factor, controller=kvmhook.host.capacity.controller_ratios
        )
    except KvmhookError as error:
        raise failure(str(error), exitcodes.of(error)) from None
    for warning in result.factors.warnings:
        click.echo(f"warning: {warning}", err=True)
    figures = result.as_dict()
    click.echo(json.dumps(figures, indent=2) if as_json else "\n".join(_table(figures)))


def _table(figures: dict[str, Any]) -> list[str]:
    cpu, memory = figures["cpu"], figures["memory"]
    return [
        f"cpu     {_clock(cpu)}",
        f"memory  {_gib(memory['physical'])}{_reserved(memory)}",
        "",
        _row("", "factor", "from", "capacity", "used", "free"),
        _row(
            "cpu",
            f"{cpu['factor']:g}",
            cpu["factor_source"],
            *(f"{cpu[key]:g}" for key in ("capacity", "used", "free")),
        ),
        _row(
            "memory",
            f"{memory['factor']:g}",
            memory["factor_source"],
            *(_gib(memory[key]) for key in ("capacity", "used", "free")),
        ),
        "",
        *_guest_lines(figures["guests"]),
        *_balloon_lines(figures),
    ]


def _balloon_lines(figures: dict[str, Any]) -> list[str]:
    """With a memory factor above 1, the guests over-committing memory needs a balloon in."""
    without = [guest["name"] for guest in figures["guests"] if not guest["balloon"]]
    if figures["memory"]["factor"] <= 1 or not without:
        return []
    return [
        "",
        f"without a virtio memory balloon (needed with a memory factor above 1): "
        f"{', '.join(without)}",
    ]


def _reserved(memory: dict[str, Any]) -> str:
    if not memory["reserved"]:
        return ""
    return f", {_gib(memory['reserved'])} reserved for the host (from {memory['reserved_source']})"


def _clock(cpu: dict[str, Any]) -> str:
    if not cpu["mhz"]:
        return f"{cpu['cores']} cores, clock unknown (neither psutil nor /proc/cpuinfo gives it)"
    return (
        f"{cpu['cores']} cores x {cpu['mhz']:.0f} MHz = {cpu['mhz_total']:.0f} MHz"
        f" (clock from {cpu['mhz_source']})"
    )


def _row(name: str, factor: str, source: str, capacity: str, used: str, free: str) -> str:
    return f"{name:<8}{factor:>6}  {source:<14}{capacity:>12}{used:>12}{free:>12}"


def _guest_lines(guests: list[dict[str, Any]]) -> list[str]:
    if not guests:
        return ["no running guests"]
    width = max(len("guest"), *(len(guest["name"]) for guest in guests))
    lines = [f"{'guest':<{width}}  {'vcpus':>5}  {'memory':>10}"]
    for guest in guests:
        lines.append(f"{guest['name']:<{width}}  {guest['vcpus']:>5}  {_gib(guest['memory']):>10}")
    return lines


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"
