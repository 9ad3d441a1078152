"""`kvmhook maintenance`: take this host out of service and back, alone or via the controller."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from kvmhook import exitcodes
from kvmhook.cli.options import (
    PARALLEL,
    SECONDS,
    connect_option,
    failure,
    on_timeout_option,
    with_exit_codes,
)
from kvmhook.errors import KvmhookError, MigrationError, PeersRequiredError

if TYPE_CHECKING:  # the core loads libvirt-python: imported by the commands that use it
    from kvmhook.host.maintenance import Hosts
    from kvmhook.host.migrate import Board

# --parallel when not given (1: one guest after the other, as before issue 17).
DEFAULT_PARALLEL = 2


@click.group()
def maintenance() -> None:
    """Take this host out of service for maintenance, its guests moved away, and back.

    With a controller configured (/etc/kvmhook/controller.conf), the controller
    does it and this host follows; without one, the host drains itself. Either
    way the qemu hook refuses arriving guests in PrepareForMaintenance,
    ErrorInPrepareForMaintenance and Maintenance."""


@maintenance.command(
    epilog=with_exit_codes(
        "kvmhook maintenance enter",
        "\b\nExample: kvmhook maintenance enter --to kvm2.example.org,kvm3.example.org"
        " --timeout 3600",
        "\b\nBusy guests: kvmhook maintenance enter --to kvm2.example.org --parallel 4"
        " --guest-timeout 600 --on-timeout postcopy",
    )
)
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
    help=f"Give up after S seconds ({SECONDS.span}; standalone: the whole drain, the"
    " migrations under way are aborted unless in post-copy).",
)
@click.option(
    "--parallel",
    type=PARALLEL,
    metavar="N",
    help=f"Standalone: migrate up to N guests at once ({PARALLEL.span}; default 2, 1 = one"
    " after the other).",
)
@click.option(
    "--guest-timeout",
    type=SECONDS,
    metavar="S",
    help=f"Standalone: each migration's own timeout ({SECONDS.span}); what happens at it:"
    " --on-timeout.",
)
@on_timeout_option("--guest-timeout")
@connect_option
def enter(
    to: str | None,
    wait: bool,
    timeout: int | None,
    parallel: int | None,
    guest_timeout: int | None,
    on_timeout: str,
    source_uri: str,
) -> None:
    """Put this host in maintenance.

    Standalone: the host goes to PrepareForMaintenance (no guest may arrive),
    the running guests are live-migrated over TLS, as by kvmhook migrate, up to
    --parallel at once, largest first, each to the --to host with the most free
    memory capacity ((physical - reserved) x this host's memory factor, less
    its guests), never past it; then the host is in Maintenance. It always
    waits for the drain. A guest that cannot move (or fits on no peer) leaves
    the host in ErrorInPrepareForMaintenance, the others move all the same;
    enter again to retry, or cancel.

    With a controller: asks it to prepare the host (it picks the destinations)
    and records its answer for the hook; --wait follows it to Maintenance,
    showing the guests still running here."""
    import kvmhook.host.maintenance

    if on_timeout == "postcopy" and guest_timeout is None:
        raise click.UsageError("--on-timeout postcopy needs --guest-timeout: when to switch")
    board = _board()
    hosts = _hosts(source_uri, board)
    options = kvmhook.host.maintenance.DrainOptions(
        parallel=DEFAULT_PARALLEL if parallel is None else parallel,
        guest_timeout=guest_timeout,
        on_timeout=on_timeout,
    )
    try:
        with kvmhook.host.maintenance.entering():
            controller = kvmhook.host.maintenance.load_controller()
            if controller is None:
                moved = kvmhook.host.maintenance.enter_standalone(
                    hosts, _peers(to), timeout, board.note, options
                )
                state = kvmhook.host.maintenance.MAINTENANCE
                outcome = f"{state}: {len(moved)} guest(s) moved off this host"
            else:
                if to is not None:
                    raise click.UsageError("--to is for a host without a controller")
                if (parallel, guest_timeout, on_timeout) != (None, None, "abort"):
                    raise click.UsageError(
                        "--parallel, --guest-timeout and --on-timeout are for a host without"
                        " a controller (the controller drains)"
                    )
                state = kvmhook.host.maintenance.enter_with_controller(
                    controller, hosts, wait, timeout, click.echo
                )
                outcome = f"the controller has the host in {state}"
    except KvmhookError as error:
        raise _failure(error) from None
    except KeyboardInterrupt:
        raise failure("interrupted: see kvmhook maintenance status", exitcodes.ABORTED) from None
    click.echo(outcome)


@maintenance.command(epilog=with_exit_codes("kvmhook maintenance cancel"))
def cancel() -> None:
    """Take this host out of maintenance: Enabled, accepting guests again.

    Standalone: from any maintenance state; a drain under way stops before its
    next guest. With a controller: asks it to cancel, and records its answer."""
    import kvmhook.host.maintenance

    try:
        controller = kvmhook.host.maintenance.load_controller()
        if controller is None:
            left = kvmhook.host.maintenance.cancel_standalone()
            outcome = (
                f"{left} -> {kvmhook.host.maintenance.ENABLED}: this host accepts guests again"
            )
        else:
            state = kvmhook.host.maintenance.cancel_with_controller(controller)
            outcome = f"the controller has the host in {state}"
    except KvmhookError as error:
        raise _failure(error) from None
    click.echo(outcome)


@maintenance.command(
    epilog=with_exit_codes(
        "kvmhook maintenance status",
        "\b\nExample, before re-installing: kvmhook maintenance status --json | jq -e .removable",
    )
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@connect_option
def status(as_json: bool, source_uri: str) -> None:
    """Show the maintenance state (the controller's, when there is one), why,
    the guests running here, and whether the host may now be removed or
    re-installed: only in Maintenance with no guest left, and for KVM with the
    agent service stopped first."""
    import kvmhook.host.maintenance

    try:
        found = kvmhook.host.maintenance.status(
            kvmhook.host.maintenance.load_controller(), _hosts(source_uri)
        )
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


def _board() -> Board:
    import kvmhook.host.migrate

    return kvmhook.host.migrate.Board(sys.stdout, sys.stdout.isatty())


def _hosts(source_uri: str, board: Board | None = None) -> Hosts:
    import kvmhook.host.maintenance

    return kvmhook.host.maintenance.Hosts(source_uri, board or _board())


def _peers(to: str | None) -> list[str]:
    import kvmhook.host.maintenance

    try:
        return kvmhook.host.maintenance.parse_peers(to)
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
    return failure(str(error), exitcodes.of(error))


# The rolling-maintenance commands live in their own module (kvmhook.cli.rolling), which
# does not import this one; they join the group here.
from kvmhook.cli.rolling import rolling, stage  # noqa: E402

maintenance.add_command(rolling)
maintenance.add_command(stage)
