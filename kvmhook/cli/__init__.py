"""The `kvmhook` command: thin click adapters over the core modules."""

from __future__ import annotations

import click

from kvmhook.cli.hooks import hooks


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmhook")
def main() -> None:
    """Operate the kvmhook agent package on a KVM host."""


main.add_command(hooks)

__all__ = ["main"]
