"""CloudStack's KVM rolling maintenance, on this host: the four stage scripts around a drain.

The operator's scripts live in the directory that `rolling.maintenance.hooks.dir`
in agent.properties names (CloudStack has no default). A stage runs the first of
`<Stage>`, `<Stage>.sh`, `<Stage>.py` that is a file there, as CloudStack's agent
finds it (RollingMaintenanceExecutorBase.getStageScriptFile); a stage without a
script is skipped, as the agent answers "Skipped stage". The script gets the
payload's words as its arguments and KVMHOOK_STAGE in its environment. Exit 0 is
success, 70 success with "no maintenance needed" (exitValueAvoidMaintenance),
anything else, a signal or the timeout a failure.

How a stage runs: with systemd as PID 1 and
`rolling.maintenance.service.executor.disabled` not true, in a transient unit of
its own (systemd-run), as CloudStack's RollingMaintenanceServiceExecutor runs it in
a unit, so that it outlives the process that started it; its timeout is the unit's
RuntimeMaxSec, and its output goes to a file kvmhook reads when the unit ends.
Otherwise directly, as the agent's RollingMaintenanceAgentExecutor does, through
the hook's one child runner (kvmhook.hook.process.run: own session, stdin
/dev/null, SIGTERM then SIGKILL to the whole process group at the timeout, output
capped).

`roll` is the sequence CloudStack's management server drives for one host
(RollingMaintenanceManagerImpl): the host must be Enabled; PreFlight; no
Maintenance script: the host is skipped; PreMaintenance; unless PreFlight or
PreMaintenance exited 70, the drain to Maintenance (as `kvmhook maintenance enter`),
Maintenance, cancel (back to Enabled), PostMaintenance. A failed Maintenance stage
cancels maintenance, as CloudStack does. The result is shaped like
startRollingMaintenance's response for this one host.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kvmhook import events, hostname, paths
from kvmhook.certs import agentproperties
from kvmhook.errors import (
    IllegalTransitionError,
    KvmhookError,
    PeersRequiredError,
    RollingError,
    StageTimedOutError,
)
from kvmhook.hook import discovery, hookconf, process
from kvmhook.host import hoststate

if TYPE_CHECKING:
    from kvmhook.host.maintenance import ControllerCalls, Hosts

# CloudStack's stage names (RollingMaintenanceManager.Stage), in the order they run.
STAGES = ("PreFlight", "PreMaintenance", "Maintenance", "PostMaintenance")
PRE_FLIGHT, PRE_MAINTENANCE, MAINTENANCE, POST_MAINTENANCE = STAGES
SUFFIXES = ("", ".sh", ".py")  # tried in this order; the first that is a file is the script
HOOKS_DIR = "rolling.maintenance.hooks.dir"
EXECUTOR_DISABLED = "rolling.maintenance.service.executor.disabled"
AVOID_MAINTENANCE = 70  # a stage's "no maintenance needed"
# CloudStack's defaults: kvm.rolling.maintenance.stage.timeout (per stage) and
# kvm.rolling.maintenance.wait.maintenance.timeout (for the host to reach Maintenance).
STAGE_TIMEOUT = 1800
DRAIN_TIMEOUT = 1800
UNIT_PREFIX = "kvmhook-rolling-"
# How long systemd-run may take beyond the unit's own RuntimeMaxSec and stop before kvmhook
# gives up waiting for it and stops the unit itself.
UNIT_SLACK = 30.0
SYSTEMD_RUN_OUTPUT = 64 * 1024  # systemd-run's own messages
# CloudStack's API dates (startdate, enddate): DateUtil's yyyy-MM-dd'T'HH:mm:ssZ.
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

# A stage's outcome.
SUCCESS = "success"
NO_MAINTENANCE = "no-maintenance-needed"
FAILED = "failed"
TIMED_OUT = "timed-out"
SKIPPED = "skipped"

# systemd-run --wait's own line on how the unit ended (not printed when it could not start).
_RESULT = re.compile(r"^Finished with result: (\S+)$", re.MULTILINE)

Report = Callable[[str], None]


# --- where the scripts are and how they run -----------------------------------------------


@dataclass(frozen=True)
class Hooks:
    """The stage scripts' directory and how each runs: in a systemd unit or directly, with
    the hook's SIGTERM-to-SIGKILL grace and output cap (KVMHOOK_TERM_GRACE,
    KVMHOOK_MAX_OUTPUT)."""

    directory: str
    in_units: bool
    grace: float = hookconf.DEFAULT_GRACE
    max_output: int = hookconf.DEFAULT_MAX_OUTPUT

    def script(self, stage: str) -> str | None:
        """The stage's script, as CloudStack's agent picks it: the first of `<Stage>`,
        `<Stage>.sh`, `<Stage>.py` that is a file (a link to one counts); None without one."""
        for suffix in SUFFIXES:
            path = os.path.join(self.directory, stage + suffix)
            if os.path.isfile(path):
                return path
        return None


def load_hooks(complain: Report) -> Hooks:
    """The settings in agent.properties, read as the agent reads them.

    RollingError when no stage can run: rolling.maintenance.hooks.dir unset (the
    agent has no default either), not absolute, or not a directory. A bad
    KVMHOOK_TERM_GRACE or KVMHOOK_MAX_OUTPUT is said to `complain`, its default used.
    """
    properties, text = agentproperties.read_host()
    value = None if text is None else agentproperties.value(text, HOOKS_DIR)
    where = f"{HOOKS_DIR} in {properties}"
    if text is None or value is None:
        missing = "" if text is not None else " (no such file)"
        raise RollingError(
            f"no stage runs: {where}{missing} is not set; CloudStack has no default: set it"
            " to the directory of the PreFlight, PreMaintenance, Maintenance and"
            " PostMaintenance scripts"
        )
    if not value.startswith("/"):
        raise RollingError(f"no stage runs: {where} is {value}, not an absolute path")
    directory = paths.under_root(value)
    if not os.path.isdir(directory):
        raise RollingError(f"no stage runs: {where} is {value}: no such directory")
    # Java's Boolean.parseBoolean: "true" in any case is true, anything else false.
    disabled = (agentproperties.value(text, EXECUTOR_DISABLED) or "").lower() == "true"
    limits = hookconf.limits(None, complain)
    return Hooks(directory, systemd_runs() and not disabled, limits.grace, limits.max_output)


def systemd_runs() -> bool:
    """systemd is PID 1 here (sd_booted(): /run/systemd/system exists) and KVMHOOK_ROOT is
    this host's root: under another root, a unit would run on this machine, not that root's."""
    return paths.root() == "/" and os.path.isdir("/run/systemd/system")


def refusal(path: str) -> str | None:
    """Why the stage script at `path` may not run, or None: it must be executable and as
    safe as a custom script of the hook (no one but root may change it or a directory
    above it)."""
    try:
        mode = os.stat(path).st_mode
        if not mode & 0o111:
            return f"{path} is not executable (mode {stat.S_IMODE(mode):04o})"
        return discovery.distrust(path, "stage script")
    except OSError as error:
        return f"cannot check {path}: {error.strerror or error}"


# --- one stage ----------------------------------------------------------------------------


@dataclass
class StageRun:
    """One stage: its script, how it ran and ended, what it wrote."""

    name: str
    script: str | None = None  # None: no script for the stage, skipped
    executor: str | None = None  # "systemd" or "direct"; None when nothing ran
    unit: str | None = None  # the transient unit's name, when in one
    status: int | None = None  # exit status; minus the signal number that ended it
    timed_out: bool = False
    output: str = ""  # stdout and stderr as written, up to the cap
    dropped: int = 0  # output bytes beyond the cap
    started: float | None = None  # epoch seconds
    ended: float | None = None
    problem: str = ""  # why it did not run, or ended without an exit status

    @property
    def outcome(self) -> str:
        if self.script is None:
            return SKIPPED
        if self.timed_out:
            return TIMED_OUT
        if self.status == 0:
            return SUCCESS
        if self.status == AVOID_MAINTENANCE:
            return NO_MAINTENANCE
        return FAILED

    @property
    def ok(self) -> bool:
        """Succeeded: exit 0, exit 70, or no script."""
        return self.outcome in (SUCCESS, NO_MAINTENANCE, SKIPPED)

    @property
    def duration(self) -> float:
        if self.started is None or self.ended is None:
            return 0.0
        return round(self.ended - self.started, 3)

    def ending(self) -> str:
        """How it ended, in words: `exit 0 after 0.012s`, `no script: skipped`..."""
        if self.script is None:
            return f"no script ({self.name}, {self.name}.sh or {self.name}.py): skipped"
        took = f" after {self.duration:.3f}s"
        if self.timed_out:
            return f"timed out{took}: killed" + (f" ({self.problem})" if self.problem else "")
        if self.status is None:
            return self.problem
        if self.status < 0:
            return f"killed by {process.signal_name(-self.status)}{took}"
        if self.status == AVOID_MAINTENANCE:
            return f"exit 70 (no maintenance needed){took}"
        return f"exit {self.status}{took}"

    def error(self, where: str) -> RollingError:
        """The error a failed stage is, `where` saying what became of the host."""
        said = " ".join(self.output.split())
        said = f": {said[:200]}{'...' if len(said) > 200 else ''}" if said else ""
        ending = self.ending()
        script = "" if self.script is None or self.script in ending else f" ({self.script})"
        kind = StageTimedOutError if self.timed_out else RollingError
        return kind(f"{self.name} failed: {ending}{script}{said}; {where}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "script": self.script,
            "executor": self.executor,
            "unit": self.unit,
            "exitstatus": self.status,
            "outcome": self.outcome,
            "ending": self.ending(),
            "output": self.output,
            "outputdropped": self.dropped,
            "start": date(self.started),
            "end": date(self.ended),
            "duration": self.duration,
        }


def run_stage(hooks: Hooks, stage: str, args: Sequence[str], timeout: float) -> StageRun:
    """Run `stage`'s script, if there is one, with `args`, for at most `timeout` seconds."""
    found = StageRun(stage, hooks.script(stage))
    if found.script is None:
        return found
    found.started = time.time()
    reason = refusal(found.script)
    if reason is not None:
        found.problem = f"refused: {reason}"
    elif hooks.in_units:
        _in_unit(found, hooks, args, timeout)
    else:
        _directly(found, hooks, args, timeout)
    found.ended = time.time()
    events.emit(
        "rolling.stage",
        stage=stage,
        script=found.script,
        executor=found.executor,
        outcome=found.outcome,
        status=found.status,
        duration_s=found.duration,
        output_bytes=len(found.output.encode()) + found.dropped,
    )
    return found


def _directly(found: StageRun, hooks: Hooks, args: Sequence[str], timeout: float) -> None:
    """In a session of its own under kvmhook, as the hook runs a custom script."""
    assert found.script is not None
    found.executor = "direct"
    try:
        with open(os.devnull, "rb") as nothing:
            outcome = process.run(
                [found.script, *args],
                nothing.fileno(),
                timeout,
                hooks.grace,
                hooks.max_output,
                {"KVMHOOK_STAGE": found.name},
            )
    except OSError as error:
        found.problem = f"cannot start {found.script}: {error.strerror or error}"
        return
    found.status = outcome.status
    found.timed_out = outcome.timed_out
    found.output = b"".join(data for _stream, data in outcome.segments).decode(errors="replace")
    found.dropped = outcome.dropped
    if outcome.status is None:
        found.problem = outcome.ending


def unit_name(stage: str) -> str:
    """The stage's transient unit: one name per stage, so that systemd refuses to start a
    stage while the same stage still runs from an earlier, interrupted run."""
    return f"{UNIT_PREFIX}{stage}.service"


def systemd_command(
    stage: str, script: str, args: Sequence[str], timeout: float, grace: float, output: str
) -> list[str]:
    """The systemd-run command line that runs `script` as the stage's transient unit.

    --wait returns the script's exit status and says how the unit ended; the output
    goes to a file (made empty by the caller; stderr with it) rather than back through
    systemd-run (--pipe), so that the stage does not die writing to a pipe nobody
    reads if kvmhook goes away; RuntimeMaxSec is
    the stage's timeout, enforced by systemd (SIGTERM to the unit's whole control
    group, SIGKILL after TimeoutStopSec) even without kvmhook; --collect unloads the
    unit however it ended. systemd expands $VAR in a unit's arguments: `$` is doubled.
    """
    return [
        "systemd-run",
        f"--unit={unit_name(stage)}",
        f"--description=kvmhook rolling maintenance: {stage}",
        "--service-type=exec",
        "--wait",
        "--collect",
        "--no-ask-password",
        f"--property=RuntimeMaxSec={_seconds(timeout)}",
        f"--property=TimeoutStopSec={_seconds(max(grace, 0.001))}",
        "--property=KillMode=control-group",
        f"--property=StandardOutput=file:{output}",
        "--property=StandardError=inherit",
        f"--setenv=KVMHOOK_STAGE={stage}",
        "--",
        script,
        *(arg.replace("$", "$$") for arg in args),
    ]


def _seconds(value: float) -> str:
    """A time span as systemd reads it: `1800s`, `0.5s` (never 0, which can mean infinity)."""
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def _in_unit(found: StageRun, hooks: Hooks, args: Sequence[str], timeout: float) -> None:
    """In a transient systemd unit of its own, waited for with systemd-run --wait."""
    assert found.script is not None
    found.executor = "systemd"
    found.unit = unit_name(found.name)
    directory = paths.rolling_output_dir()
    output = os.path.join(directory, f"{found.name}.{os.getpid()}.out")
    argv = systemd_command(found.name, found.script, args, timeout, hooks.grace, output)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Made here, empty and for root only (a stage may print secrets): file: then writes
        # from its start, as systemd 236 and later do, where truncate: needs 248.
        os.close(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        ran = process.run_tool(argv, timeout + hooks.grace + UNIT_SLACK, SYSTEMD_RUN_OUTPUT)
    except OSError as error:
        found.problem = f"cannot run systemd-run: {error.strerror or error}"
        return
    found.output, found.dropped = _read_output(output, hooks.max_output)
    said = b"".join(data for stream, data in ran.segments if stream == "stderr").decode(
        errors="replace"
    )
    result = _RESULT.search(said)
    if ran.timed_out:
        # systemd-run itself did not come back: the unit must not run on unwatched.
        process.run_tool(["systemctl", "stop", found.unit], 60)
        found.timed_out = True
        found.problem = "systemd-run did not return; the unit was stopped"
    elif result is None:
        found.problem = f"systemd-run could not start {found.unit}: {ran.said() or ran.ending}"
    elif result.group(1) == "timeout":
        found.timed_out = True
    elif result.group(1) == "success":
        found.status = 0
    elif result.group(1) == "exit-code":
        found.status = ran.status
    else:  # signal, core-dump, oom-kill, ...
        found.problem = f"{found.unit} ended with result {result.group(1)}"


def _read_output(path: str, cap: int) -> tuple[str, int]:
    """The unit's output file, up to `cap` bytes, and the bytes beyond; the file removed."""
    try:
        with open(path, "rb") as file:
            kept = file.read(cap)
            dropped = max(0, os.fstat(file.fileno()).st_size - len(kept))
        os.unlink(path)
    except FileNotFoundError:
        return "", 0
    return kept.decode(errors="replace"), dropped


def date(epoch: float | None) -> str | None:
    """`epoch` as CloudStack's API writes dates (local time, with its offset)."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch).astimezone().strftime(DATE_FORMAT)


# --- the whole sequence -------------------------------------------------------------------


class Maintenance:
    """This host's way into Maintenance and back, exactly as `kvmhook maintenance enter` and
    `cancel` take it: standalone (the host drains itself to `peers`) or through the
    controller (it drains; `enter --wait`)."""

    def __init__(
        self,
        controller: ControllerCalls | None,
        hosts: Hosts,
        peers: Sequence[str],
        timeout: float | None,
        report: Report,
    ) -> None:
        self.controller = controller
        self.hosts = hosts
        self.peers = list(peers)
        self.timeout = timeout
        self.report = report

    def identity(self) -> tuple[str | None, str]:
        """This host's id and name as startRollingMaintenance reports them: the controller's,
        else no id and this host's FQDN."""
        if self.controller is None:
            return None, hostname.fqdn()
        found = self.controller.host()
        return str(found.get("id", "")) or None, str(found.get("name", "")) or hostname.fqdn()

    def state(self) -> str:
        """The maintenance state now: the controller's when there is one (recorded)."""
        if self.controller is None:
            return hoststate.read()[0]
        from kvmhook.host import maintenance

        return maintenance.follow(self.controller)

    def check_peers(self) -> None:
        """PeersRequiredError when the drain could not start (standalone, guests running,
        no --to): said before any stage runs rather than after PreMaintenance."""
        if self.controller is None and not self.peers:
            guests = self.hosts.running_guests()
            if guests:
                names = ", ".join(guest.name for guest in guests)
                raise PeersRequiredError(
                    f"guests are running here ({names}): name the hosts to move them to with --to"
                )

    def drain(self) -> str:
        """Into Maintenance as `kvmhook maintenance enter` takes the host there (the one call
        of the drain); returns the state reached. Its errors are enter's."""
        from kvmhook.host import maintenance

        if self.controller is None:
            maintenance.enter_standalone(self.hosts, self.peers, self.timeout, self.report)
            return maintenance.MAINTENANCE
        return maintenance.enter_with_controller(
            self.controller, self.hosts, True, self.timeout, self.report
        )

    def cancel(self) -> str:
        """Back to Enabled as `kvmhook maintenance cancel` does; returns the state reached."""
        from kvmhook.host import maintenance

        if self.controller is None:
            maintenance.cancel_standalone()
            return maintenance.ENABLED
        return maintenance.cancel_with_controller(self.controller)


@dataclass
class Rolling:
    """What `roll` did on this host, shaped like startRollingMaintenance's response."""

    hostid: str | None
    hostname: str
    stages: list[StageRun] = field(default_factory=list)
    updated: dict[str, Any] | None = None  # startdate, enddate, output of a hostsupdated entry
    skipped: str | None = None  # the reason of a hostsskipped entry
    error: KvmhookError | None = None  # None: succeeded

    def fail(self, stage: StageRun, skipped: str, where: str) -> Rolling:
        """Record `stage`'s failure: skipped as CloudStack's forced run words it, and the error."""
        self.skipped = f"{skipped}: {stage.ending()}"
        self.error = stage.error(where)
        return self

    def as_dict(self) -> dict[str, Any]:
        host = {"hostid": self.hostid, "hostname": self.hostname}
        return {
            "success": self.error is None,
            "details": "OK" if self.error is None else str(self.error),
            "hostsupdated": [] if self.updated is None else [{**host, **self.updated}],
            "hostsskipped": [] if self.skipped is None else [{**host, "reason": self.skipped}],
            "stages": [stage.as_dict() for stage in self.stages],
        }


def check_scripts(hooks: Hooks) -> None:
    """RollingError naming the first stage script that would be refused: found before
    anything runs, rather than after the host was drained."""
    for stage in STAGES:
        script = hooks.script(stage)
        reason = None if script is None else refusal(script)
        if reason is not None:
            raise RollingError(f"{stage} refused: {reason}; nothing was done")


def roll(
    hooks: Hooks,
    host: Maintenance,
    args: Sequence[str],
    timeout: float,
    shown: Callable[[StageRun], None],
) -> Rolling:
    """The rolling maintenance of this host; each stage handed to `shown` when it ends.

    Raises, with nothing run: IllegalTransitionError when the host is not Enabled,
    PeersRequiredError, RollingError for a refused script, and the controller's
    errors. Every later failure is in the result's `error`, the host left as its
    message says.
    """
    hostid, name = host.identity()
    done = Rolling(hostid, name)
    state = host.state()
    if state != hoststate.ENABLED:
        raise IllegalTransitionError(
            f"the host is in {state}: a rolling maintenance starts only from"
            f" {hoststate.ENABLED}; nothing was done"
        )
    check_scripts(hooks)
    host.check_peers()

    def stage(name: str) -> StageRun:
        ran = run_stage(hooks, name, args, timeout)
        done.stages.append(ran)
        shown(ran)
        return ran

    preflight = stage(PRE_FLIGHT)
    if not preflight.ok:
        return done.fail(preflight, "Pre-flight script failed", "nothing was done")
    avoid = (
        "Pre-flight stage set to avoid maintenance" if preflight.outcome == NO_MAINTENANCE else None
    )
    if hooks.script(MAINTENANCE) is None:
        done.skipped = "There is no maintenance script on the host"
        return done
    premaintenance = stage(PRE_MAINTENANCE)
    if not premaintenance.ok:
        return done.fail(premaintenance, "Pre-maintenance script failed", "nothing was done")
    if premaintenance.outcome == NO_MAINTENANCE and avoid is None:
        avoid = "Pre-maintenance stage set to avoid maintenance"
    if avoid is not None:
        done.skipped = avoid
        return done

    start = time.time()
    host.report("entering maintenance")
    try:
        host.drain()
    except KvmhookError as error:
        done.skipped = f"Could not enter maintenance: {error}"
        done.error = type(error)(
            f"the drain to {hoststate.MAINTENANCE} failed, Maintenance and PostMaintenance"
            f" not run: {error}"
        )
        return done
    maintenance_stage = stage(MAINTENANCE)
    if not maintenance_stage.ok:
        return done.fail(maintenance_stage, "Maintenance script failed", _cancelled(host))
    host.report("cancelling maintenance")
    try:
        host.cancel()
    except KvmhookError as error:
        done.error = type(error)(
            f"the Maintenance stage succeeded but cancelling maintenance failed, PostMaintenance"
            f" not run: {error}"
        )
        done.skipped = f"Could not cancel maintenance: {error}"
        return done
    done.updated = {
        "startdate": date(start),
        "enddate": date(time.time()),
        "output": maintenance_stage.output,
    }
    postmaintenance = stage(POST_MAINTENANCE)
    if not postmaintenance.ok:
        return done.fail(
            postmaintenance,
            "Post-maintenance script failed",
            f"the host was updated and is {hoststate.ENABLED}",
        )
    return done


def _cancelled(host: Maintenance) -> str:
    """Cancel maintenance after a failed Maintenance stage, as CloudStack does; what became
    of the host, in words."""
    host.report("cancelling maintenance")
    try:
        state = host.cancel()
    except KvmhookError as error:
        return f"cancelling maintenance failed too ({error}); PostMaintenance not run"
    return f"maintenance cancelled, the host is {state}; PostMaintenance not run"
