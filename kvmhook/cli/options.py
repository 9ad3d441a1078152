"""What several commands share, defined once: options, value types, the exit-code
epilog and the error that exits with a given code."""

from __future__ import annotations

import textwrap
from typing import Any

import click

from kvmhook import exitcodes, limits

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


class Bounded(click.ParamType):
    """A whole number from `low` to `high`; anything else is a usage error (exit 2).

    Not click.IntRange: click 8 adds the range to --help and 7.1 (RHEL 9)
    does not, so help texts say `span` themselves, the same under both.
    """

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self.span = f"{low} to {high}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = limits.whole_number(str(value), self.low, self.high)
        if number is None:
            self.fail(f"must be a whole number from {self.span}", param, ctx)
        return number


DAYS = Bounded(1, limits.MAX_DAYS)
DAYS_FROM_0 = Bounded(0, limits.MAX_DAYS)
SECONDS = Bounded(1, limits.MAX_SECONDS)
BANDWIDTH = Bounded(1, limits.MAX_BANDWIDTH)
PARALLEL = Bounded(1, limits.MAX_PARALLEL)

# --on-timeout, for `kvmhook migrate` and the drain (kvmhook.host.migrate.ABORT, POSTCOPY).
ON_TIMEOUT = ("abort", "postcopy")


def on_timeout_option(timeout_flag: str) -> Any:
    """--on-timeout abort|postcopy: what a migration does when `timeout_flag` is reached."""
    return click.option(
        "--on-timeout",
        type=click.Choice(ON_TIMEOUT),
        default="abort",
        show_default=True,
        help=f"At {timeout_flag}: abort the migration (the guest stays here), or switch it to"
        " post-copy (it then finishes on the destination; a network failure during post-copy"
        f" loses the guest). postcopy needs {timeout_flag}.",
    )


def with_exit_codes(command: str, *paragraphs: str) -> str:
    """A --help epilog: `paragraphs`, then `command`'s rows of kvmhook.exitcodes.TABLE."""
    rows = ["\b", "Exit codes:"]
    for code, meaning in sorted(exitcodes.TABLE[command].items()):
        # Not at hyphens: "post-copy" split over two lines would read "post- copy".
        rows += textwrap.wrap(
            meaning,
            76,
            initial_indent=f"  {code}  ",
            subsequent_indent="     ",
            break_on_hyphens=False,
        )
    return "\n\n".join([*paragraphs, "\n".join(rows)])


def failure(message: str, code: int) -> click.ClickException:
    """`Error: message` on stderr, as click shows its own errors, and exit `code`."""
    error = click.ClickException(message)
    error.exit_code = code
    return error
