"""Host maintenance: the reference's state machine, and a drain of its own or the controller's.

The states are CloudStack's resource states; kvmhook.host.hoststate keeps the
current one where the hook reads it. Without a controller (standalone), `enter`
drains the host itself: PrepareForMaintenance first, so that the hook refuses
arriving guests at once, then each running guest is live-migrated over TLS
(kvmhook.host.migrate's plan, as `kvmhook migrate`) to the named peer with the most
free memory, then Maintenance. With a controller, the controller decides and
drains: this module asks it, waits, and records what it says in the state file
so that the hook enforces the controller's state as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from kvmhook import events, locks, paths
from kvmhook.errors import (
    DrainCancelledError,
    IllegalTransitionError,
    KvmhookError,
    MaintenanceAbortedError,
    MaintenanceBusyError,
    MaintenanceError,
    MaintenanceFailedError,
    MigrationAbortedError,
    PeersRequiredError,
    StateFileError,
    VirtError,
)
from kvmhook.host import hoststate, migrate, virt
from kvmhook.host.hoststate import (
    ENABLED,
    ERROR_IN_MAINTENANCE,
    ERROR_IN_PREPARE,
    MAINTENANCE,
    PREPARE,
)

# Where each state may go: CloudStack's ResourceState machine (ResourceState.java) cut down
# to its maintenance states and to the moves this host makes itself. Left out: an empty
# host's Enabled -> Maintenance (here it passes through PrepareForMaintenance, so the hook
# refuses guests while the drain looks), and the moves to ErrorInMaintenance, which only a
# controller makes (its states are recorded as they are, see _mirror).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    ENABLED: (PREPARE,),  # enter (AdminAskMaintenance)
    # drained (InternalEnterMaintenance), a guest cannot move (UnableToMigrate), cancel
    PREPARE: (MAINTENANCE, ERROR_IN_PREPARE, ENABLED),
    ERROR_IN_PREPARE: (PREPARE, ENABLED),  # enter again (ErrorsCorrected), cancel
    MAINTENANCE: (ENABLED,),  # cancel (AdminCancelMaintenance)
    ERROR_IN_MAINTENANCE: (PREPARE, ENABLED),  # enter again (AdminAskMaintenance), cancel
}
POLL_SECONDS = 2.0
# The controller client's own default for one of its asynchronous calls.
CONTROLLER_TIMEOUT = 600.0
AGENT_SERVICE = "cloudstack-agent"

Report = Callable[[str], None]


# --- the state machine --------------------------------------------------------------------


def check(target: str) -> str:
    """The current state, when the table allows going from it to `target`; else raises."""
    current, _ = hoststate.read()
    if target not in TRANSITIONS[current]:
        allowed = " or ".join(TRANSITIONS[current])
        raise IllegalTransitionError(
            f"illegal transition {current} -> {target}: a host in {current} may go only to"
            f" {allowed}"
        )
    return current


def entering() -> contextlib.AbstractContextManager[None]:
    """The lock an `enter` holds for its whole run (a drain can take an hour): a second
    `enter` meanwhile is refused at once with MaintenanceBusyError, changing nothing.

    `cancel` takes no lock: it must be able to stop a drain under way.
    """
    return locks.held(
        paths.maintenance_lock(),
        "another `kvmhook maintenance enter`",
        0,
        lambda message: MaintenanceBusyError(
            f"{message}: it is still running (see `kvmhook maintenance status`)"
        ),
    )


def move(target: str, reason: str = "") -> str:
    """Record `target` (and why) when the table allows it; returns the state left.

    Two `enter`s are serialised by entering(); a `cancel` may move the state
    between an enter's reads, which the drain checks for (_stop_if_cancelled).
    """
    current = check(target)
    _record(target, reason)
    return current


def _record(state: str, reason: str = "") -> None:
    try:
        hoststate.write(state, reason)
    except OSError as error:
        raise StateFileError(
            f"cannot record {state} in {paths.maintenance_state()}: {error.strerror}"
        ) from None
    events.emit("maintenance.state", state=state, reason=reason)


# --- this host and its peers, as maintenance reaches them through libvirt -----------------


class Hosts:
    """The guests running here, the peers' free memory, and migrations from here to them.

    Through kvmhook.host.virt and kvmhook.host.migrate; tests hand in a fake.
    """

    def __init__(self, uri: str, progress: migrate.Progress) -> None:
        self.uri = uri
        self._progress = progress

    def running_guests(self) -> list[virt.GuestSize]:
        return virt.running_guests(self.uri)

    def free_memory(self, peer: str) -> int:
        """The peer's free memory, asked over the qemu+tls connection a migration would use."""
        return virt.free_memory(migrate.make_plan(peer).dest_uri)

    def migrate(self, guest: str, peer: str, timeout: float | None) -> None:
        """Live-migrate `guest` to `peer` exactly as `kvmhook migrate GUEST PEER` does."""
        migrate.migrate(
            guest,
            migrate.make_plan(peer),
            self._progress,
            source_uri=self.uri,
            timeout=timeout,
            local_check=migrate.local_tls_problem,
            dest_check=migrate.dest_tls_problem,
        )


# --- standalone: this host drains itself --------------------------------------------------


def parse_peers(text: str | None) -> list[str]:
    """`--to HOST[,HOST...]` as a list without repeats; MigrationError for a bad host."""
    peers: list[str] = []
    for name in (part.strip() for part in (text or "").split(",")):
        if name and name not in peers:
            migrate.make_plan(name)  # refuses what cannot be a migration destination
            peers.append(name)
    return peers


def enter_standalone(
    hosts: Hosts, peers: Sequence[str], timeout: float | None, report: Report
) -> list[str]:
    """Move every running guest to `peers` and put the host in Maintenance; returns the
    guests moved.

    Nothing changes when the move is illegal (IllegalTransitionError) or when
    guests run and no peer is named (PeersRequiredError). A guest that cannot
    move leaves the host in ErrorInPrepareForMaintenance, the reason naming it
    (MaintenanceFailedError; MaintenanceAbortedError when the time ran out or
    a migration was interrupted).
    """
    check(PREPARE)
    guests = hosts.running_guests()
    if guests and not peers:
        names = ", ".join(guest.name for guest in guests)
        raise PeersRequiredError(
            f"guests are running here ({names}): name the hosts to move them to with --to"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    move(PREPARE)  # from now on the hook refuses arriving guests
    try:
        drained = _drain(hosts, peers, deadline, report)
        left = hosts.running_guests()
    except (KvmhookError, KeyboardInterrupt) as error:
        _give_up(f"the drain stopped: {str(error) or 'interrupted'}")
        raise
    if left:
        raise _left_behind(drained, left)
    move(MAINTENANCE)
    return drained.moved


@dataclass
class _Drained:
    """What a drain did: the guests it moved, and why each of the others stayed."""

    moved: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    aborted: bool = False  # the time ran out or a migration was interrupted: the rest waited


def _drain(hosts: Hosts, peers: Sequence[str], deadline: float | None, report: Report) -> _Drained:
    free, unreachable = _free_memory(hosts, peers, report)
    drained = _Drained()
    for guest in hosts.running_guests():
        _stop_if_cancelled()
        drained.aborted = drained.aborted or _remaining(deadline) == 0
        if drained.aborted:
            drained.failed[guest.name] = "not attempted: --timeout reached or interrupted"
        elif not free:
            drained.failed[guest.name] = f"no peer can take it ({'; '.join(unreachable)})"
        else:
            _move_guest(hosts, guest, free, deadline, drained, report)
    _stop_if_cancelled()
    return drained


def _free_memory(
    hosts: Hosts, peers: Sequence[str], report: Report
) -> tuple[dict[str, int], list[str]]:
    """Each peer's free memory, asked once: the drain books what it sends to each peer
    itself, since a peer's figure lags behind (a new guest touches its memory slowly).
    Peers that cannot be asked are left out; the second item says why each was."""
    free: dict[str, int] = {}
    unreachable: list[str] = []
    for peer in peers:
        try:
            free[peer] = hosts.free_memory(peer)
        except VirtError as error:
            unreachable.append(f"{peer}: {error}")
            report(f"skipping {peer}: {error}")
    return free, unreachable


def _move_guest(
    hosts: Hosts,
    guest: virt.GuestSize,
    free: dict[str, int],
    deadline: float | None,
    drained: _Drained,
    report: Report,
) -> None:
    peer = max(free, key=free.__getitem__)  # on a tie, the first one named in --to
    report(f"moving {guest.name} ({_mib(guest.memory)}) to {peer} ({_mib(free[peer])} free)")
    began = time.monotonic()
    try:
        hosts.migrate(guest.name, peer, _remaining(deadline))
    except KvmhookError as error:
        drained.failed[guest.name] = str(error)
        # Time out or Ctrl-C: the guests after this one wait for the next enter.
        drained.aborted = isinstance(error, MigrationAbortedError)
        report(f"{guest.name} stays: {error}")
        took = round(time.monotonic() - began, 3)
        events.emit(
            "maintenance.guest_stays",
            guest=guest.name,
            host=peer,
            error=str(error),
            duration_s=took,
        )
        return
    free[peer] -= guest.memory
    drained.moved.append(guest.name)
    report(f"moved {guest.name} to {peer}")
    took = round(time.monotonic() - began, 3)
    events.emit(
        "maintenance.guest_moved",
        guest=guest.name,
        host=peer,
        memory_bytes=guest.memory,
        duration_s=took,
    )


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (0 once past), None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _stop_if_cancelled() -> None:
    """A `cancel` while draining took the host out of PrepareForMaintenance: stop moving guests."""
    state, _ = hoststate.read()
    if state != PREPARE:
        raise DrainCancelledError(
            f"maintenance was cancelled during the drain (the host is {state}):"
            " no more guests are moved"
        )


def _give_up(reason: str) -> None:
    """PrepareForMaintenance -> ErrorInPrepareForMaintenance, unless the host already left it
    (cancelled): a host must never stay preparing with nobody draining it."""
    if hoststate.read()[0] == PREPARE:
        move(ERROR_IN_PREPARE, reason)


def _left_behind(drained: _Drained, left: list[virt.GuestSize]) -> MaintenanceError:
    """Record ErrorInPrepareForMaintenance with each guest left and why; the error to raise."""
    reason = "; ".join(
        f"{guest.name}: {drained.failed.get(guest.name, 'still running after the drain')}"
        for guest in left
    )
    move(ERROR_IN_PREPARE, reason)
    kind = MaintenanceAbortedError if drained.aborted else MaintenanceFailedError
    return kind(f"{len(left)} guest(s) not moved, the host is in {ERROR_IN_PREPARE}: {reason}")


def cancel_standalone() -> str:
    """Back to Enabled; returns the state left."""
    return move(ENABLED)


def _mib(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


# --- with a controller: it drains, this host follows ---------------------------------------


class ControllerCalls(Protocol):
    """What maintenance uses of the controller client (kvmhook.host.controller); its failures
    are ControllerError."""

    def host(self) -> dict[str, Any]: ...

    def resource_state(self) -> str: ...

    def prepare_maintenance(self, timeout: float = CONTROLLER_TIMEOUT) -> dict[str, Any]: ...

    def cancel_maintenance(self, timeout: float = CONTROLLER_TIMEOUT) -> dict[str, Any]: ...


def load_controller() -> ControllerCalls | None:
    """The configured controller's client, or None when none is configured (standalone)."""
    # Imported here: only hosts run by a controller need its client.
    from kvmhook.host import controller

    return controller.load()


def enter_with_controller(
    controller: ControllerCalls,
    hosts: Hosts,
    wait: bool,
    timeout: float | None,
    report: Report,
) -> str:
    """Ask the controller to prepare this host for maintenance and record its state; with
    `wait`, follow it to Maintenance (MaintenanceFailedError for an error state,
    MaintenanceAbortedError past `timeout`). Returns the state reached."""
    deadline = None if timeout is None else time.monotonic() + timeout
    controller.prepare_maintenance(timeout=timeout or CONTROLLER_TIMEOUT)
    state = follow(controller)
    if not wait:
        _raise_unless_preparing(state)
        return state
    return _wait(controller, hosts, state, deadline, report)


def cancel_with_controller(controller: ControllerCalls) -> str:
    """Ask the controller to cancel maintenance; returns (and records) the state it reports."""
    controller.cancel_maintenance()
    return follow(controller)


def follow(controller: ControllerCalls) -> str:
    """The controller's resource state for this host, recorded for the hook."""
    state = controller.resource_state()
    _mirror(state)
    return state


def _mirror(state: str) -> None:
    """Record the controller's state, as it is: the controller is the authority, so its
    moves are not checked against TRANSITIONS. A state outside the five (Disabled,
    Degraded...) is no maintenance: recorded as Enabled, with the controller's word.
    Written only when it changes, so a status run by another user reads without writing."""
    wanted = (state, "") if state in hoststate.STATES else (ENABLED, f"controller reports {state}")
    if hoststate.read() != wanted:
        _record(*wanted)


def _wait(
    controller: ControllerCalls,
    hosts: Hosts,
    state: str,
    deadline: float | None,
    report: Report,
) -> str:
    shown = ""
    while True:
        _raise_unless_preparing(state)
        if state == MAINTENANCE:
            return state
        left = _guests_left(hosts)
        line = f"{state}: guests left: {left}"
        if line != shown:
            report(line)
            shown = line
        if _remaining(deadline) == 0:
            raise MaintenanceAbortedError(
                f"--timeout reached: the host is still in {state} (guests left: {left});"
                " the controller goes on draining it"
            )
        time.sleep(POLL_SECONDS)
        state = follow(controller)


def _raise_unless_preparing(state: str) -> None:
    """Maintenance and PrepareForMaintenance pass; error states and a cancel raise."""
    if state in (ERROR_IN_PREPARE, ERROR_IN_MAINTENANCE):
        raise MaintenanceFailedError(
            f"the controller reports {state}: see this host's events there"
        )
    if state not in (PREPARE, MAINTENANCE):
        raise DrainCancelledError(f"the controller reports {state}: maintenance was cancelled")


def _guests_left(hosts: Hosts) -> str:
    try:
        return str(len(hosts.running_guests()))
    except VirtError as error:
        return f"unknown ({error})"


# --- status -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaintenanceStatus:
    """Where the host stands, and whether it may be taken away."""

    mode: str  # "standalone" or "controller"
    state: str
    reason: str
    controller_host: str | None  # this host's name at the controller
    guests: list[str] | None  # running guests; None when libvirt could not tell
    guests_error: str

    @property
    def removable(self) -> bool:
        """The guide: a host is removed or re-installed only in Maintenance, no guests left."""
        return self.state == MAINTENANCE and self.guests == []

    def advice(self) -> str:
        if self.removable:
            return (
                f"yes: stop the agent service ({AGENT_SERVICE}) first, then remove or"
                " re-install the host"
            )
        if self.state != MAINTENANCE:
            return f"no: the host is in {self.state}, not {MAINTENANCE}"
        if self.guests is None:
            return f"no: cannot tell whether guests run here ({self.guests_error})"
        return f"no: {len(self.guests)} guest(s) still running here: {', '.join(self.guests)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "state": self.state,
            "reason": self.reason,
            "controller_host": self.controller_host,
            "guests": self.guests,
            "guests_error": self.guests_error or None,
            "removable": self.removable,
            "advice": self.advice(),
        }


def status(controller: ControllerCalls | None, hosts: Hosts) -> MaintenanceStatus:
    """The state (the controller's when there is one, recorded for the hook) and the guests."""
    if controller is None:
        mode, name = "standalone", None
        state, reason = hoststate.read()
    else:
        mode, name = "controller", str(controller.host().get("name", ""))
        state, reason = follow(controller), hoststate.read()[1]
    try:
        guests, problem = [guest.name for guest in hosts.running_guests()], ""
    except VirtError as error:
        guests, problem = None, str(error)
    return MaintenanceStatus(mode, state, reason, name, guests, problem)
