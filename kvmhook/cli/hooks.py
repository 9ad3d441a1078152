"""`kvmhook hooks`: show and run the custom scripts of the libvirt qemu hook."""

from __future__ import annotations

import os
import sys

import click

from kvmhook import dispatch, paths
from kvmhook.errors import CustomDirError
from kvmhook.hooklog import HookLog

_operation_argument = click.argument(
    "operation", type=click.Choice(dispatch.OPERATIONS), metavar="OPERATION"
)


@click.group()
def hooks() -> None:
    """Show and run the qemu hook's custom scripts (KVMHOOK_* variables apply)."""


@hooks.command("list", epilog="Example: kvmhook hooks list start")
@_operation_argument
def list_(operation: str) -> None:
    """Show, in order, the scripts that would run for OPERATION, and every file
    that would not, with the reason (like run-parts --test)."""
    directory = paths.custom_dir()
    try:
        scripts, ignored = dispatch.discover(directory, operation)
    except CustomDirError as error:
        click.echo(f"nothing runs: {error}")
        return
    for script in scripts:
        click.echo(f"run      {script.path}")
    for item in ignored:
        click.echo(f"ignored  {os.path.join(directory, item.name)}: {item.reason}")
    if not scripts:
        click.echo(f"no scripts run for {operation} in {directory}")


@hooks.command(
    "run",
    epilog="Example: kvmhook hooks run vm1 start begin - --xml /etc/libvirt/qemu/vm1.xml",
)
@click.argument("domain", metavar="OBJECT")
@_operation_argument
@click.argument("subop", default="-")
@click.argument("extra", default="-")
@click.option(
    "--xml",
    "xml",
    type=click.File("rb"),
    help="Domain XML the scripts get on stdin ('-': this command's stdin). Default: none.",
)
def run(domain: str, operation: str, subop: str, extra: str, xml: object) -> None:
    """Run the custom scripts for OBJECT OPERATION [SUBOP] [EXTRA] as the hook
    would, logging to the hook's log and echoing each record on stderr.
    Exits 1 if a script failed, timed out or could not start."""
    event = dispatch.Event(domain, operation, subop, extra)
    log = HookLog(paths.log_file(), domain, operation, subop, echo=sys.stderr)
    try:
        runs = dispatch.run_hook(event, log, None, xml.fileno() if xml else None)
    finally:
        log.close()
    failed = [item.script.name for item in runs if item.failed]
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(runs)} scripts failed: {', '.join(failed)}"
        )
