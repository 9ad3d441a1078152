"""Options several commands share, defined once."""

import click

# The libvirt of this host: the value lands in the command's `source_uri` argument.
connect_option = click.option(
    "--connect",
    "source_uri",
    envvar="KVMHOOK_LIBVIRT_URI",
    default="qemu:///system",
    show_default=True,
    help="libvirt URI of this host (or KVMHOOK_LIBVIRT_URI).",
)

agent_dir_option = click.option(
    "--agent-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="The agent's directory (default <root>/etc/cloudstack/agent).",
)
