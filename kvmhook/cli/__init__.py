"""The `kvmhook` command: thin click adapters over the core modules."""

from __future__ import annotations

from importlib.metadata import version

import click

from kvmhook import events
from kvmhook.cli.capacity import capacity
from kvmhook.cli.cert import cert
from kvmhook.cli.hooks import hooks
from kvmhook.cli.maintenance import maintenance
from kvmhook.cli.metrics import metrics
from kvmhook.cli.migrate import migrate
from kvmhook.cli.network import network
from kvmhook.cli.tls import tls


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# version= rather than package_name=: RHEL 9 ships click 7.1, which lacks the latter.
@click.version_option(version=version("kvmhook"), prog_name="kvmhook")
@click.option(
    "--log-format",
    type=click.Choice(events.FORMATS),
    default="auto",
    show_default=True,
    envvar="KVMHOOK_LOG_FORMAT",
    help="The long operations' events on stderr: key=value text, or one JSON object per "
    "line (auto: JSON when systemd runs the command, JOURNAL_STREAM set; else text).",
)
def main(log_format: str) -> None:
    """Operate the kvmhook agent package on a KVM host."""
    events.set_format(log_format)


main.add_command(hooks)
main.add_command(cert)
main.add_command(tls)
main.add_command(migrate)
main.add_command(capacity)
main.add_command(maintenance)
main.add_command(network)
main.add_command(metrics)

__all__ = ["main"]
