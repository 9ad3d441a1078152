"""`kvmhook migrate`: move a guest to another KVM host, over TLS unless told otherwise."""

from __future__ import annotations

import sys
import time

import click

from kvmhook import events, exitcodes
from kvmhook.cli.options import (
    BANDWIDTH,
    SECONDS,
    connect_option,
    failure,
    on_timeout_option,
    with_exit_codes,
)
from kvmhook.errors import KvmhookError, MigrationError


@click.command(
    epilog=with_exit_codes(
        "kvmhook migrate",
        "Example: kvmhook migrate vm1 kvm2.example.org --bandwidth 500 --timeout 900",
        "\b\nA guest that dirties memory faster than the link never converges:"
        " kvmhook migrate vm1 kvm2.example.org --timeout 300 --on-timeout postcopy",
    )
)
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
    help=f"Abort the migration after S seconds ({SECONDS.span}); the guest stays on this host"
    " (see --on-timeout).",
)
@on_timeout_option("--timeout")
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
    on_timeout: str,
    allow_insecure: bool,
    source_uri: str,
) -> None:
    """Migrate the guest DOMAIN to DEST_HOST, peer to peer, over
    qemu+tls://DEST_HOST/system with QEMU's memory stream encrypted too
    (VIR_MIGRATE_TLS). Refuses when this host or the destination is not
    secured. Shows the progress while the migration runs."""
    # Imported here: loading libvirt-python costs every other command ~50 ms.
    import kvmhook.host.migrate

    postcopy = on_timeout == kvmhook.host.migrate.POSTCOPY
    if postcopy and timeout is None:
        raise click.UsageError("--on-timeout postcopy needs --timeout: when to switch")
    if postcopy and not live:
        raise click.UsageError("--on-timeout postcopy is for a live migration, not --offline")
    try:
        plan = kvmhook.host.migrate.make_plan(dest_host, live, bandwidth, allow_insecure, postcopy)
    except MigrationError as error:
        raise click.BadParameter(str(error), param_hint="DEST_HOST") from None
    if not plan.secure:
        click.echo(kvmhook.host.migrate.INSECURE_WARNING, err=True)
    began = time.monotonic()
    events.emit(
        "migration.start",
        guest=domain,
        host=dest_host,
        encrypted=plan.secure,
        on_timeout=on_timeout,
    )
    try:
        kvmhook.host.migrate.migrate(
            domain,
            plan,
            kvmhook.host.migrate.Progress(sys.stdout, tty=sys.stdout.isatty()),
            source_uri=source_uri,
            timeout=timeout,
            local_check=kvmhook.host.migrate.local_tls_problem,
            dest_check=kvmhook.host.migrate.dest_tls_problem,
        )
    except KvmhookError as error:
        took = round(time.monotonic() - began, 3)
        events.failed("migration.failed", error, guest=domain, host=dest_host, duration_s=took)
        raise failure(str(error), exitcodes.of(error)) from None
    took = round(time.monotonic() - began, 3)
    events.emit("migration.done", guest=domain, host=dest_host, duration_s=took)
    stream = "memory stream encrypted" if plan.secure else "CLEAR TEXT"
    click.echo(f"migrated {domain} to {dest_host} ({plan.dest_uri}, {stream})")
