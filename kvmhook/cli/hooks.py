"""`kvmhook hooks`: show and run the custom scripts of the libvirt qemu hook."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable

import click

from kvmhook import config, paths
from kvmhook.cli.options import with_exit_codes
from kvmhook.errors import ConfigError, CustomDirError
from kvmhook.hook import dispatch, hookconf
from kvmhook.hook.discovery import discover, find
from kvmhook.hook.hooklog import HookLog
from kvmhook.hook.operations import BY_NAME, OPERATIONS, Event

_operation_argument = click.argument(
    "operation", type=click.Choice(OPERATIONS), metavar="OPERATION"
)


@click.group()
def hooks() -> None:
    """Show and run the qemu hook's custom scripts (KVMHOOK_* variables apply)."""


@hooks.command(
    "list",
    epilog=with_exit_codes("kvmhook hooks list", "Example: kvmhook hooks list start --domain vm1"),
)
@_operation_argument
@click.option(
    "--domain",
    metavar="NAME",
    help="Merge in the per-guest scripts of guest NAME (custom/NAME/), as the hook would.",
)
def list_(operation: str, domain: str | None) -> None:
    """Show, in order, the scripts that would run for OPERATION, and every file
    that would not, with the reason (like run-parts --test), what a failing
    script does under kvmhook.conf's [hooks] policy, and how long each may run."""
    _warn_qemu_d()
    _warn_not_launcher()
    settings = _limits(lambda problem: click.echo(f"warning: {problem}", err=True))
    directory = paths.custom_dir()
    try:
        scripts, ignored = discover(directory, operation, domain)
    except CustomDirError as error:
        click.echo(f"nothing runs: {error}")
        return
    for script in scripts:
        click.echo(f"run      {script.path}")
    for item in ignored:
        click.echo(f"ignored  {os.path.join(directory, item.name)}: {item.reason}")
    if not scripts:
        click.echo(f"no scripts run for {operation} in {directory}")
    policy = "abort" if _aborts(operation) else "ignore"
    click.echo(f"timeout: {settings.timeout:g}s for each script ({_timeout_source(settings)})")
    click.echo(f"on failure: {policy} for {operation} ({_policy_source(operation)})")


@hooks.command(
    "run",
    epilog=with_exit_codes(
        "kvmhook hooks run",
        "Example: kvmhook hooks run vm1 start begin - --xml /etc/libvirt/qemu/vm1.xml",
    ),
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
    would, logging to the hook's log and echoing each record on stderr, under
    kvmhook.conf's [hooks] policy and the installed hook's timeoutSeconds
    (KVMHOOK_TIMEOUT overrides it). At migrate begin the guest's bridges are
    first renamed for this host, as the hook does (kvmhook.conf's [network]
    rename_bridges). For migrate and restore, a renamed or rewritten domain
    XML is printed on stdout, as the hook gives it to libvirt.
    Exits 1 if a script failed, timed out or could not start."""
    event = Event(domain, operation, subop, extra)
    abort = _aborts(operation)
    log = HookLog(paths.log_file(), domain, operation, subop, echo=sys.stderr)
    try:
        settings = _limits(lambda problem: log.record("-", f"config: {problem}"))
        read = _renamed(xml.read(), log) if xml and (operation, subop) == _RENAMES else None
        found = find(paths.custom_dir(), event, log, abort)
        stdin_fd = xml.fileno() if xml and read is None else None
        chain = dispatch.run_hook(event, found, log, settings, stdin_fd, abort, read)
        new_xml = chain.xml
        if not chain.runs and chain.veto is None and read is not None and read[1] != read[0]:
            # No script ran, yet the rename changed the XML: the hook prints it too.
            log.record("-", f"xml: new domain XML ({len(read[1])} bytes) printed for libvirt")
            new_xml = read[1]
    finally:
        log.close()
    if new_xml is not None:
        # sys.stdout's bytes: click.get_binary_stream is deprecated (a warning, an error in tests)
        sys.stdout.flush()
        sys.stdout.buffer.write(new_xml)
        sys.stdout.buffer.flush()
    if chain.veto is not None:
        raise click.ClickException("\n".join(chain.veto))
    failed = [item.script.name for item in chain.runs if item.failed]
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(chain.runs)} scripts failed: {', '.join(failed)}"
        )


# The call at which the hook renames the guest's bridges before any script runs.
_RENAMES = ("migrate", "begin")


def _renamed(xml: bytes, log: HookLog) -> tuple[bytes, bytes]:
    """`xml` and what the hook makes of it at `migrate begin` (bridges.at_migrate_begin),
    under kvmhook.conf and logged as the hook does."""
    from kvmhook.net import bridges

    try:
        conf = hookconf.read()
    except OSError as error:
        log.record(
            "-", f"config: cannot read {paths.kvmhook_conf()}: {error.strerror}; defaults apply"
        )
        conf = None
    return xml, bridges.at_migrate_begin(xml, conf, lambda line: log.record("-", line))


def _aborts(operation: str) -> bool:
    """Whether kvmhook.conf makes a failing script abort `operation`; a broken file is
    reported and, as in the hook, the default (ignore) applies."""
    try:
        return operation in config.abort_on(config.load())
    except ConfigError as error:
        click.echo(f"warning: {error}; on_failure = ignore applies, as in the hook", err=True)
        return False


def _policy_source(operation: str) -> str:
    path = paths.kvmhook_conf()
    if not BY_NAME[operation].may_abort:
        return f"{operation} can never abort"
    return f"[hooks] in {path}" if os.path.exists(path) else f"default, no {path}"


def _limits(complain: Callable[[str], None]) -> hookconf.Limits:
    """The limits the hook would apply: the installed launcher's timeoutSeconds, read as
    text, then the KVMHOOK_* variables; what is wrong with either goes to `complain`."""
    launcher = hookconf.launcher_timeout(paths.hook_launcher(), complain)
    return hookconf.limits(launcher, complain)


def _timeout_source(settings: hookconf.Limits) -> str:
    if settings.timeout_from == "timeoutSeconds":
        return f"timeoutSeconds in {paths.hook_launcher()}"
    return settings.timeout_from  # KVMHOOK_TIMEOUT, or default


# The line only kvmhook's launcher (kvmhook/data/qemu-hook) has, whatever its timeoutSeconds.
_LAUNCHER_MARK = b"from kvmhook.qemu import main"
# The launcher is under 2 KiB; CloudStack's hook a few: enough to tell them apart.
_LAUNCHER_READ_LIMIT = 64 * 1024


def _warn_not_launcher() -> None:
    """One line on stderr if the installed qemu hook is not kvmhook's launcher
    (cloudstack-agent's postinst copies its own over it): libvirt runs that one, and none
    of this applies. Read as bytes, never executed; no file at all (a sandbox, or a host
    without the package) says nothing."""
    from kvmhook.hook import readfile

    path = paths.hook_launcher()
    try:
        content = readfile.read(path, _LAUNCHER_READ_LIMIT)
    except FileNotFoundError:
        return
    except OSError as error:
        problem = f"it cannot be read ({error.strerror})"
    else:
        if _LAUNCHER_MARK in content:
            return
        problem = "it is another program (CloudStack's hook, copied by cloudstack-agent?)"
    click.echo(
        f"warning: {path} is not kvmhook's launcher: {problem}; libvirt runs it, not kvmhook."
        " Reinstalling kvmhook puts the launcher back",
        err=True,
    )


def _warn_qemu_d() -> None:
    """One line on stderr if libvirt's own qemu.d holds executables: they run for every guest."""
    directory = paths.qemu_hook_dir()
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_file() and os.access(entry.path, os.X_OK)
        )
    except OSError:
        return
    if names:
        click.echo(
            f"warning: {directory} holds executables ({', '.join(names)}); "
            "libvirt >= 6.5 runs them too, for every guest",
            err=True,
        )


@hooks.command(
    "log",
    epilog=with_exit_codes(
        "kvmhook hooks log", "Example: kvmhook hooks log --domain vm1 --since 2h"
    ),
)
@click.option("--domain", metavar="NAME", help="Only runs for guest NAME.")
@click.option("--operation", type=click.Choice(OPERATIONS), help="Only runs for this operation.")
@click.option(
    "--since",
    metavar="TIME",
    help="Only runs since TIME: 2026-11-24, '2026-11-24 13:00', or 10m / 2h / 3d ago "
    "(at most 36500d).",
)
@click.option("--follow", "-f", is_flag=True, help="Keep reading the live log (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run, one per line.")
def log(
    domain: str | None, operation: str | None, since: str | None, follow: bool, as_json: bool
) -> None:
    """Show script runs from the hook's log and its rotated siblings (oldest first):
    time, guest, operation, script, result and duration. A file or line that
    cannot be read is reported on stderr and skipped."""
    from kvmhook.hook import hooklogview

    keep = hooklogview.Filter(domain, operation, _since(since) if since else None)
    # Bytes, UTF-8 whatever the locale says: every string is printable() or JSON.
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        raise click.ClickException("no standard output to show the runs on (fd 1 is closed)")

    def report(message: str) -> None:
        out.flush()  # the rows read before the problem come before it
        click.echo(f"warning: {hooklogview.printable(message)}", err=True)

    path = paths.log_file()
    if follow:
        rows = hooklogview.follow(path, keep, report=report)
    else:
        rows = hooklogview.runs(path, keep, report=report)
    if not as_json:
        out.write(hooklogview.TABLE_HEADER.encode() + b"\n")
    line = hooklogview.json_line if as_json else hooklogview.table_row
    try:
        for row in rows:
            out.write(line(row).encode() + b"\n")
            if follow:
                out.flush()
    except KeyboardInterrupt:
        pass
    out.flush()


def _since(text: str) -> datetime.datetime:
    """--since as a time, or a usage error (exit 2) saying what is accepted."""
    from kvmhook.hook import hooklogview

    try:
        return hooklogview.parse_since(text)
    except ValueError as error:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise click.BadParameter(
            f"{hooklogview.printable(repr(shown))} is {error}", param_hint="--since"
        ) from None
