"""`kvmhook metrics`: this host's state as Prometheus metrics."""

from __future__ import annotations

import functools
import os
import time

import click

from kvmhook import events, exitcodes, paths
from kvmhook.cli.options import agent_dir_option, connect_option, failure, with_exit_codes
from kvmhook.errors import LockError

_HOW = """\b
Only local sources, never the controller: the certificate files, the
renewal record, the hook log (read on from the last run's position,
kept in /var/lib/kvmhook/metrics-hooklog.json, across logrotate), the
maintenance state, kvmhook.conf's factors and libvirt (read-only).
The kvmhook-metrics.timer runs it every minute with
--textfile /var/lib/prometheus/node-exporter, the directory
prometheus-node-exporter's textfile collector reads."""


@click.command(
    epilog=with_exit_codes(
        "kvmhook metrics",
        _HOW,
        "Example: kvmhook metrics | grep kvmhook_certificate_not_after",
    )
)
@click.option(
    "--textfile",
    "directory",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Write DIR/kvmhook.prom atomically instead of printing (DIR must exist).",
)
@agent_dir_option
@connect_option
def metrics(directory: str | None, agent_dir: str | None, source_uri: str) -> None:
    """Print this host's metrics in Prometheus' text format, or write them for
    node_exporter's textfile collector: certificates' expiry, the last
    renewal, the hook's script results and vetoes, the maintenance state,
    capacity and over-provisioning factors."""
    from kvmhook.metrics import exposition

    say = functools.partial(click.echo, err=True)
    if directory is not None and not os.path.isdir(directory):
        # Not made here: node_exporter's package owns it, and a typo must not pass silently.
        why = f"cannot write {directory}/{exposition.TEXTFILE}: no such directory"
        raise failure(why, exitcodes.FAILED)
    began = time.monotonic()
    try:
        snapshot = exposition.take(
            agent_dir or paths.agent_dir(), source_uri, persist=directory is not None, say=say
        )
    except LockError as error:
        raise failure(str(error), exitcodes.FAILED) from None
    if directory is None:
        click.echo(exposition.exposition(snapshot).decode(), nl=False)
        events.emit("metrics.printed", duration_s=round(time.monotonic() - began, 3))
        return
    try:
        path = exposition.write(directory, snapshot)
    except OSError as error:
        why = f"cannot write {directory}/{exposition.TEXTFILE}: {error.strerror}"
        raise failure(why, exitcodes.FAILED) from None
    events.emit("metrics.written", path=path, duration_s=round(time.monotonic() - began, 3))
