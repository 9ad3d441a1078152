"""`kvmhook migrate`: move a guest to another KVM host, over TLS unless told otherwise."""

from __future__ import annotations

import sys

import click

from kvmhook.cli.options import BANDWIDTH, SECONDS, connect_option
from kvmhook.errors import KvmhookError, MigrationAbortedError, MigrationError, NotSecuredError

EXIT_FAILED = 1
EXIT_REFUSED = 3
EXIT_ABORTED = 4

_EPILOG = """\b
Exit codes:
  0  migrated
  1  failed: a libvirt error, no such guest, or a guest not in a state to migrate
  2  usage error
  3  refused: this host or the destination is not secured (see kvmhook tls status)
  4  aborted (--timeout reached, or Ctrl-C): the guest stays on this host

Example: kvmhook migrate vm1 kvm2.example.org --bandwidth 500 --timeout 900"""


@click.command(epilog=_EPILOG)
@click.argument("domain")
@click.argument("dest_host")
@click.option(
    "--live/--offline",
    default=True,
    help="Live-migrate a running guest (default), or move a shut-off guest's definition.",
)
@click.option(
    "--bandwidth",
    type=BANDWIDTH,
    metavar="MiB/s",
    help=f"Cap the transfer rate ({BANDWIDTH.span}).",
)
@click.option(
    "--timeout",
    type=SECONDS,
    metavar="S",
    help=f"Abort the migration after S seconds ({SECONDS.span}); the guest stays on this host.",
)
@click.option(
    "--allow-insecure",
    is_flag=True,
    help="Skip the secured checks and migrate over qemu+tcp: memory in clear text.",
)
@connect_option
def migrate(
    domain: str,
    dest_host: str,
    live: bool,
    bandwidth: int | None,
    timeout: int | None,
    allow_insecure: bool,
    source_uri: str,
) -> None:
    """Migrate the guest DOMAIN to DEST_HOST, peer to peer, over
    qemu+tls://DEST_HOST/system with QEMU's memory stream encrypted too
    (VIR_MIGRATE_TLS). Refuses when this host or the destination is not
    secured. Shows the progress while the migration runs."""
    # Imported here: loading libvirt-python costs every other command ~50 ms.
    from kvmhook import migrate as migration

    try:
        plan = migration.make_plan(dest_host, live, bandwidth, allow_insecure)
    except MigrationError as error:
        raise click.BadParameter(str(error), param_hint="DEST_HOST") from None
    if not plan.secure:
        click.echo(migration.INSECURE_WARNING, err=True)
    try:
        migration.migrate(
            domain,
            plan,
            migration.Progress(sys.stdout, tty=sys.stdout.isatty()),
            source_uri=source_uri,
            timeout=timeout,
            local_check=migration.local_tls_problem,
            dest_check=migration.dest_tls_problem,
        )
    except KvmhookError as error:
        failure = click.ClickException(str(error))
        failure.exit_code = _exit_code(error)
        raise failure from None
    stream = "memory stream encrypted" if plan.secure else "CLEAR TEXT"
    click.echo(f"migrated {domain} to {dest_host} ({plan.dest_uri}, {stream})")


def _exit_code(error: KvmhookError) -> int:
    if isinstance(error, NotSecuredError):
        return EXIT_REFUSED
    if isinstance(error, MigrationAbortedError):
        return EXIT_ABORTED
    return EXIT_FAILED
