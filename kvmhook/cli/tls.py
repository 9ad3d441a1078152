"""`kvmhook tls`: libvirt's TLS switched on or off, and the secured host checked."""

from __future__ import annotations

import json
from typing import Callable

import click

import kvmhook.certs.tls
from kvmhook import exitcodes
from kvmhook.certs import startup
from kvmhook.cli.options import agent_dir_option, with_exit_codes
from kvmhook.errors import KvmhookError

_restart_option = click.option(
    "--restart",
    is_flag=True,
    help="Restart, through systemd, what must read the new settings "
    "(libvirtd, or the daemon and its TLS socket).",
)


_no_vnc_option = click.option(
    "--no-vnc", is_flag=True, help="Leave the guests' consoles (vnc_tls in qemu.conf) alone."
)


@click.group()
def tls() -> None:
    """Secure this host: libvirt serving TLS on port 16514, migrations encrypted."""


@tls.command(
    epilog=with_exit_codes(
        "kvmhook tls status",
        "Example, before migrating: kvmhook tls status || kvmhook tls enable --restart",
    )
)
@agent_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the items as JSON.")
def status(agent_dir: str | None, as_json: bool) -> None:
    """Check whether this host is secured.

    Item by item: the agent's, libvirt's, QEMU's and the consoles' (VNC)
    certificates; libvirtd.conf (listen_tls, certificate paths, auth_tls);
    libvirt's start-up listening for TLS; a TLS handshake on the TLS port with
    our CA and client certificate; qemu.conf's migration TLS. Exits 0 only
    when secured, 1 otherwise.

    Warns (a `warning:` line; `warnings` in --json) about each certificate of
    the set, the CA's included, expiring within the alert period: the
    controller's ca.framework.cert.expiry.alert.period when one is
    configured, else 15 days. A warning changes neither "secured" nor the
    exit status: a host near expiry must still be drainable."""
    from kvmhook.certs import rotation

    period = rotation.alert_period(agent_dir, lambda line: click.echo(f"note: {line}", err=True))
    result = kvmhook.certs.tls.status(agent_dir, alert_days=period)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for item in result.items:
            click.echo(f"{'ok' if item.ok else 'NOT OK':<6}  {item.name}: {item.detail}")
        for warning in result.warnings:
            click.echo(f"warning: {warning} (alert period {period} days)")
        click.echo("secured" if result.secured else "not secured")
    if not result.secured:
        raise SystemExit(exitcodes.FAILED)


@tls.command(
    epilog=with_exit_codes(
        "kvmhook tls enable", "Example: kvmhook tls enable --restart && kvmhook tls status"
    )
)
@_restart_option
@_no_vnc_option
def enable(restart: bool, no_vnc: bool) -> None:
    """Switch TLS on.

    Sets listen_tls, listen_tcp = 0, tls_port, the certificate paths and
    auth_tls in libvirtd.conf (virtproxyd.conf with modular daemons), QEMU's
    migration TLS in qemu.conf, and --listen or the TLS socket unit, as this
    host starts libvirt. The guests' consoles too: vnc_tls = 1 and
    vnc_tls_x509_cert_dir = "/etc/pki/libvirt-vnc" in qemu.conf, when that
    directory holds its three files (else they are left as they are, and
    the output says how to get the files); never vnc_tls_x509_verify, which
    inherits default_tls_x509_verify. Guests started before libvirt reads
    qemu.conf again keep their console as it was until they restart.
    Changes only what differs (a second run changes nothing); each changed
    file keeps its previous content in FILE.bak. Refuses, changing nothing,
    when the certificate files are not installed."""
    _switch(lambda: kvmhook.certs.tls.enable(vnc=not no_vnc), restart, listen=True)


@tls.command(
    epilog=with_exit_codes("kvmhook tls disable", "Example: kvmhook tls disable --restart")
)
@_restart_option
@_no_vnc_option
def disable(restart: bool, no_vnc: bool) -> None:
    """Switch TLS off.

    Sets listen_tls = 0, takes --listen out or disables the TLS socket unit,
    and sets migrate_tls_force = 0 and vnc_tls = 0 (each when set). Each
    changed file keeps its previous content in FILE.bak."""
    _switch(lambda: kvmhook.certs.tls.disable(vnc=not no_vnc), restart, listen=False)


def _switch(action: Callable[[], kvmhook.certs.tls.Change], restart: bool, listen: bool) -> None:
    try:
        change = action()
        _show(change, listen)
        if restart:
            for command in startup.restart(change.startup, listen):
                click.echo(f"ran: {command}")
        elif change.changed:
            hint = startup.restart_hint(change.startup, listen)
            click.echo(f"to apply: {hint}, or run again with --restart")
    except KvmhookError as error:
        raise click.ClickException(str(error)) from None


def _show(change: kvmhook.certs.tls.Change, listen: bool) -> None:
    click.echo(f"libvirt starts as: {change.startup.describe()}")
    for file in change.files:
        kept = f"; previous content in {file.backup}" if file.backup else " (new file)"
        click.echo(f"changed {file.path}: {', '.join(file.keys)}{kept}")
    if change.socket:
        click.echo(f"{'enabled' if listen else 'disabled'} {change.startup.socket}")
    if change.consoles is not None:
        click.echo(f"consoles: {change.consoles}")
    elif any("vnc_tls" in file.keys for file in change.files):
        click.echo(
            "consoles: guests started before libvirt reads qemu.conf again keep their console"
            " as it was until they restart"
        )
    if not change.changed:
        click.echo(f"nothing to change: TLS is already {'on' if listen else 'off'}")
