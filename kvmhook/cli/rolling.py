"""`kvmhook maintenance rolling` and `kvmhook maintenance stage`: CloudStack's KVM
rolling-maintenance stages on this host (kvmhook.host.rolling); they join the
`maintenance` group at the end of kvmhook.cli.maintenance."""

from __future__ import annotations

import json
import shlex
import sys
from typing import TextIO

import click

from kvmhook import events, exitcodes
from kvmhook.cli.options import SECONDS, connect_option, failure, with_exit_codes
from kvmhook.errors import KvmhookError, MigrationError, PeersRequiredError
from kvmhook.host.rolling import DRAIN_TIMEOUT, STAGE_TIMEOUT, STAGES, StageRun

payload_option = click.option(
    "--payload",
    metavar="ARGS",
    default="",
    help="Arguments for every stage script, split into words as a shell splits them (quotes "
    "group, nothing is expanded), as startRollingMaintenance's payload.",
)


@click.command(
    epilog=with_exit_codes(
        "kvmhook maintenance rolling",
        "\b\nExample: kvmhook maintenance rolling --to kvm2.example.org --payload 'kernel=6.1'",
    )
)
@click.option(
    "--to",
    "to",
    metavar="HOST[,HOST...]",
    help="Standalone: the hosts to move running guests to (required when guests run).",
)
@payload_option
@click.option(
    "--stage-timeout",
    type=SECONDS,
    default=STAGE_TIMEOUT,
    metavar="S",
    help=f"Kill a stage still running after S seconds ({SECONDS.span}; default "
    f"{STAGE_TIMEOUT}, CloudStack's kvm.rolling.maintenance.stage.timeout).",
)
@click.option(
    "--drain-timeout",
    type=SECONDS,
    default=DRAIN_TIMEOUT,
    metavar="S",
    help=f"Give up the drain to Maintenance after S seconds ({SECONDS.span}; default "
    f"{DRAIN_TIMEOUT}, CloudStack's kvm.rolling.maintenance.wait.maintenance.timeout).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the stages and this host's result as JSON (progress goes to stderr).",
)
@connect_option
def rolling(
    to: str | None,
    payload: str,
    stage_timeout: int,
    drain_timeout: int,
    as_json: bool,
    source_uri: str,
) -> None:
    """Run CloudStack's rolling-maintenance stages on this host, around a drain.

    The scripts are in the directory rolling.maintenance.hooks.dir names in
    agent.properties: PreFlight (a failure: nothing is done), PreMaintenance,
    then, unless either exited 70 ("no maintenance needed") or there is no
    Maintenance script, the drain to Maintenance (as kvmhook maintenance
    enter), Maintenance (a failure cancels maintenance), cancel (back to
    Enabled) and PostMaintenance. A stage without a script is skipped. The host
    must be Enabled; a second enter or rolling is refused while this one runs."""
    import kvmhook.host.maintenance
    from kvmhook.host import rolling as core
    from kvmhook.host.migrate import Progress

    args = _args(payload)
    out = sys.stderr if as_json else sys.stdout

    def report(line: str) -> None:
        click.echo(line, file=out)

    def shown(stage: StageRun) -> None:
        _show(stage, out, with_output=not as_json)

    try:
        hooks = core.load_hooks(_complain)
        with kvmhook.host.maintenance.entering():
            controller = kvmhook.host.maintenance.load_controller()
            if controller is not None and to is not None:
                raise click.UsageError("--to is for a host without a controller")
            hosts = kvmhook.host.maintenance.Hosts(source_uri, Progress(out, out.isatty()))
            host = core.Maintenance(controller, hosts, _peers(to), drain_timeout, report)
            done = core.roll(hooks, host, args, stage_timeout, shown)
    except KvmhookError as error:
        raise _failure(error) from None
    except KeyboardInterrupt:
        raise failure(
            "interrupted: see kvmhook maintenance status (a stage under way is not stopped)",
            exitcodes.ABORTED,
        ) from None
    if done.error is None:
        events.emit(
            "rolling.done",
            host=done.hostname,
            updated=done.updated is not None,
            reason=done.skipped,
        )
    else:
        events.failed("rolling.failed", done.error, host=done.hostname)
    if as_json:
        click.echo(json.dumps(done.as_dict(), indent=2))
    elif done.updated is not None and done.error is None:
        click.echo(
            f"updated: {done.hostname} was in maintenance from {done.updated['startdate']}"
            f" to {done.updated['enddate']}; every stage succeeded"
        )
    elif done.error is None:
        click.echo(f"skipped: {done.hostname}: {done.skipped}")
    if done.error is not None:
        raise _failure(done.error)


@click.command(
    epilog=with_exit_codes(
        "kvmhook maintenance stage",
        "\b\nExample: kvmhook maintenance stage PreFlight --payload 'kernel=6.1' --json",
    )
)
@click.argument("name", metavar="STAGE", type=click.Choice(STAGES))
@payload_option
@click.option(
    "--timeout",
    type=SECONDS,
    default=STAGE_TIMEOUT,
    metavar="S",
    help=f"Kill the stage if still running after S seconds ({SECONDS.span}; default "
    f"{STAGE_TIMEOUT}, CloudStack's kvm.rolling.maintenance.stage.timeout).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stage's run as JSON.")
def stage(name: str, payload: str, timeout: int, as_json: bool) -> None:
    """Run one rolling-maintenance stage's script on this host, for a controller that
    orchestrates the cluster itself.

    STAGE is PreFlight, PreMaintenance, Maintenance or PostMaintenance; its
    script is found and run as kvmhook maintenance rolling runs it, and nothing
    else is done: no drain, no state change. A stage without a script is
    skipped (exit 0); a script's exit 70 ("no maintenance needed") exits 3."""
    from kvmhook.host import rolling as core

    args = _args(payload)
    try:
        ran = core.run_stage(core.load_hooks(_complain), name, args, timeout)
    except KvmhookError as error:
        raise _failure(error) from None
    except KeyboardInterrupt:
        raise failure("interrupted (a stage under way is not stopped)", exitcodes.ABORTED) from None
    if as_json:
        click.echo(json.dumps(ran.as_dict(), indent=2))
    else:
        _show(ran, sys.stdout, with_output=True)
    if ran.outcome == core.NO_MAINTENANCE:
        click.get_current_context().exit(exitcodes.NO_MAINTENANCE_NEEDED)
    if not ran.ok:
        raise _failure(ran.error("nothing else was done"))


def _show(stage: StageRun, out: TextIO, with_output: bool) -> None:
    """A stage's line (`PreFlight: exit 0 after 0.012s (/path)`), then its output indented."""
    where = f" ({stage.script})" if stage.script is not None else ""
    click.echo(f"{stage.name}: {stage.ending()}{where}", file=out)
    if with_output:
        for line in stage.output.splitlines():
            click.echo(f"    {line}", file=out)
        if stage.dropped:
            click.echo(f"    [{stage.dropped} more bytes of output not kept]", file=out)


def _args(payload: str) -> list[str]:
    try:
        return shlex.split(payload)
    except ValueError as error:
        raise click.BadParameter(
            f"cannot split it into words: {error}", param_hint="--payload"
        ) from None


def _peers(to: str | None) -> list[str]:
    import kvmhook.host.maintenance

    try:
        return kvmhook.host.maintenance.parse_peers(to)
    except MigrationError as error:
        raise click.BadParameter(str(error), param_hint="--to") from None


def _complain(line: str) -> None:
    click.echo(f"warning: {line}", err=True)


def _failure(error: KvmhookError) -> click.ClickException:
    """The error as click shows it, with the exit code the epilogs promise."""
    if isinstance(error, PeersRequiredError):
        return click.UsageError(str(error))
    return failure(str(error), exitcodes.of(error))
