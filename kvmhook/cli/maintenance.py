"""`kvmhook maintenance`: take this host out of service and back, alone or via the controller."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from kvmhook.cli.options import SECONDS, connect_option
from kvmhook.errors import (
    IllegalTransitionError,
    KvmhookError,
    MaintenanceAbortedError,
    MaintenanceBusyError,
    MigrationError,
    PeersRequiredError,
)

if TYPE_CHECKING:  # the core loads libvirt-python: imported by the commands that use it
    from kvmhook.maintenance import Libvirt

EXIT_FAILED = 1
EXIT_REFUSED = 3
EXIT_ABORTED = 4

_ENTER_EPILOG = """\b
Exit codes:
  0  in Maintenance (with a controller and no --wait: asked, the host is preparing)
  1  failed: a guest could not move (the host is left in ErrorInPrepareForMaintenance,
     the reason in kvmhook maintenance status), the controller reports an error state,
     or libvirt, the controller or the state file failed
  2  usage error; standalone, also: guests are running and no --to was given
  3  refused: not a legal transition from the current state, or another enter is
     running; nothing changed
  4  aborted: --timeout reached or Ctrl-C (standalone: ErrorInPrepareForMaintenance)

\b
Example: kvmhook maintenance enter --to kvm2.example.org,kvm3.example.org --timeout 3600"""

_CANCEL_EPILOG = """\b
Exit codes:
  0  cancelled: the host accepts guests again
  1  failed: the controller or the state file
  3  refused: not a legal transition from the current state (e.g. already Enabled)"""

_STATUS_EPILOG = """\b
Exit codes:
  0  shown (removable or not: see the "removable" line or key)
  1  failed: the controller could not be asked, or the state file not written

\b
Example, before re-installing: kvmhook maintenance status --json | jq -e .removable"""


@click.group()
def maintenance() -> None:
    """Take this host out of service for maintenance, its guests moved away, and back.

    With a controller configured (/etc/kvmhook/controller.conf), the controller
    does it and this host follows; without one, the host drains itself. Either
    way the qemu hook refuses arriving guests in PrepareForMaintenance,
    ErrorInPrepareForMaintenance and Maintenance."""


@maintenance.command(epilog=_ENTER_EPILOG)
@click.option(
    "--to",
    "to",
    metavar="HOST[,HOST...]",
    help="Standalone: the hosts to move running guests to (required when guests run).",
)
@click.option(
    "--wait", is_flag=True, help="With a controller: wait until the host is in Maintenance."
)
@click.option(
    "--timeout",
    type=SECONDS,
    metavar="S",
    help=f"Give up after S seconds ({SECONDS.span}; standalone: the migration under way "
    "is aborted).",
)
@connect_option
def enter(to: str | None, wait: bool, timeout: int | None, source_uri: str) -> None:
    """Put this host in maintenance.

    Standalone: the host goes to PrepareForMaintenance (no guest may arrive),
    each running guest is live-migrated over TLS, as by kvmhook migrate, to the
    --to host with the most free memory, then the host is in Maintenance. It
    always waits for the drain. A guest that cannot move leaves the host in
    ErrorInPrepareForMaintenance; enter again to retry, or cancel.

    With a controller: asks it to prepare the host (it picks the destinations)
    and records its answer for the hook; --wait follows it to Maintenance,
    showing the guests still running here."""
    from kvmhook import maintenance as host_maintenance

    libvirt = _libvirt(source_uri)
    try:
        with host_maintenance.entering():
            controller = host_maintenance.load_controller()
            if controller is None:
                moved = host_maintenance.enter_standalone(libvirt, _peers(to), timeout, click.echo)
                outcome = (
                    f"{host_maintenance.MAINTENANCE}: {len(moved)} guest(s) moved off this host"
                )
            else:
                if to is not None:
                    raise click.UsageError("--to is for a host without a controller")
                state = host_maintenance.enter_with_controller(
                    controller, libvirt, wait, timeout, click.echo
                )
                outcome = f"the controller has the host in {state}"
    except KvmhookError as error:
        raise _failure(error) from None
    except KeyboardInterrupt:
        raise _exit("interrupted: see kvmhook maintenance status", EXIT_ABORTED) from None
    click.echo(outcome)


@maintenance.command(epilog=_CANCEL_EPILOG)
def cancel() -> None:
    """Take this host out of maintenance: Enabled, accepting guests again.

    Standalone: from any maintenance state; a drain under way stops before its
    next guest. With a controller: asks it to cancel, and records its answer."""
    from kvmhook import maintenance as host_maintenance

    try:
        controller = host_maintenance.load_controller()
        if controller is None:
            left = host_maintenance.cancel_standalone()
            outcome = f"{left} -> {host_maintenance.ENABLED}: this host accepts guests again"
        else:
            state = host_maintenance.cancel_with_controller(controller)
            outcome = f"the controller has the host in {state}"
    except KvmhookError as error:
        raise _failure(error) from None
    click.echo(outcome)


@maintenance.command(epilog=_STATUS_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@connect_option
def status(as_json: bool, source_uri: str) -> None:
    """Show the maintenance state (the controller's, when there is one), why,
    the guests running here, and whether the host may now be removed or
    re-installed: only in Maintenance with no guest left, and for KVM with the
    agent service stopped first."""
    from kvmhook import maintenance as host_maintenance

    try:
        found = host_maintenance.status(host_maintenance.load_controller(), _libvirt(source_uri))
    except KvmhookError as error:
        raise _failure(error) from None
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2))
        return
    mode = (
        found.mode
        if found.controller_host is None
        else f"controller (host {found.controller_host})"
    )
    click.echo(f"state      {found.state}")
    click.echo(f"reason     {found.reason or '-'}")
    click.echo(f"mode       {mode}")
    click.echo(f"guests     {_guests(found.guests, found.guests_error)}")
    click.echo(f"removable  {found.advice()}")


def _libvirt(source_uri: str) -> Libvirt:
    from kvmhook import maintenance as host_maintenance
    from kvmhook import migrate as migration

    return host_maintenance.Libvirt(source_uri, migration.Progress(sys.stdout, sys.stdout.isatty()))


def _peers(to: str | None) -> list[str]:
    from kvmhook import maintenance as host_maintenance

    try:
        return host_maintenance.parse_peers(to)
    except MigrationError as error:
        raise click.BadParameter(str(error), param_hint="--to") from None


def _guests(names: list[str] | None, problem: str) -> str:
    if names is None:
        return f"unknown ({problem})"
    return f"{len(names)} running" + (f": {', '.join(names)}" if names else "")


def _failure(error: KvmhookError) -> click.ClickException:
    """The error as click shows it, with the exit code the epilogs promise."""
    if isinstance(error, PeersRequiredError):
        return click.UsageError(str(error))
    if isinstance(error, (IllegalTransitionError, MaintenanceBusyError)):
        return _exit(str(error), EXIT_REFUSED)
    if isinstance(error, MaintenanceAbortedError):
        return _exit(str(error), EXIT_ABORTED)
    return _exit(str(error), EXIT_FAILED)


def _exit(message: str, code: int) -> click.ClickException:
    failure = click.ClickException(message)
    failure.exit_code = code
    return failure
