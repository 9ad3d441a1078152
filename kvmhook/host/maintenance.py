"""Host maintenance: the reference's state machine, and a drain of its own or the controller's.

The states are CloudStack's resource states; kvmhook.host.hoststate keeps the
current one where the hook reads it. Without a controller (standalone), `enter`
drains the host itself: PrepareForMaintenance first, so that the hook refuses
arriving guests at once, then the running guests are live-migrated over TLS
(kvmhook.host.migrate's plan, as `kvmhook migrate`), up to --parallel at once,
largest first, each to the named peer with the most free memory capacity
(this host's factor and reserved memory applied to the peer's physical
memory, less its guests), then Maintenance. With a controller, the controller decides and
drains: this module asks it, waits, and records what it says in the state file
so that the hook enforces the controller's state as well.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent import futures
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
    MigrationTimedOutError,
    PeersRequiredError,
    StateFileError,
    VirtError,
)
from kvmhook.host import hoststate, migrate, overprovision, virt
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
    """The guests running here, the peers' memory and guests, and migrations from here to them.

    Through kvmhook.host.virt and kvmhook.host.migrate; tests hand in a fake.
    """

    def __init__(self, uri: str, board: migrate.Board) -> None:
        self.uri = uri
        self._board = board

    def running_guests(self) -> list[virt.GuestSize]:
        return virt.running_guests(self.uri)

    def peer_memory(self, peer: str) -> tuple[int, list[virt.GuestSize]]:
        """The peer's physical memory (bytes) and the guests running there, asked over a
        read-only connection to the qemu+tls URI a migration would use (the node's memory
        stats, listAllDomains and each guest's maximum memory)."""
        return virt.host_memory(migrate.make_plan(peer).dest_uri)

    def migrate(
        self,
        guest: str,
        peer: str,
        timeout: float | None,
        guest_timeout: float | None = None,
        on_timeout: str = migrate.ABORT,
        stop: threading.Event | None = None,
    ) -> None:
        """Live-migrate `guest` to `peer` exactly as `kvmhook migrate GUEST PEER --timeout
        GUEST_TIMEOUT --on-timeout ON_TIMEOUT` does; aborted after `timeout` s (what is left of
        the drain's --timeout) or when `stop` is set, unless switched to post-copy."""
        migrate.migrate(
            guest,
            migrate.make_plan(peer, postcopy=on_timeout == migrate.POSTCOPY),
            self._board.line(guest, peer),
            source_uri=self.uri,
            timeout=guest_timeout,
            local_check=migrate.local_tls_problem,
            dest_check=migrate.dest_tls_problem,
            limits=migrate.Limits(hard_timeout=timeout, stop=stop),
        )


# --- standalone: this host drains itself --------------------------------------------------


@dataclass(frozen=True)
class DrainOptions:
    """How a standalone drain moves guests: up to `parallel` at once; each migration's own
    timeout and what happens at it (kvmhook migrate's --timeout and --on-timeout)."""

    parallel: int = 1
    guest_timeout: float | None = None
    on_timeout: str = migrate.ABORT


def parse_peers(text: str | None) -> list[str]:
    """`--to HOST[,HOST...]` as a list without repeats; MigrationError for a bad host."""
    peers: list[str] = []
    for name in (part.strip() for part in (text or "").split(",")):
        if name and name not in peers:
            migrate.make_plan(name)  # refuses what cannot be a migration destination
            peers.append(name)
    return peers


def enter_standalone(
    hosts: Hosts,
    peers: Sequence[str],
    timeout: float | None,
    report: Report,
    options: DrainOptions = DrainOptions(),
) -> list[str]:
    """Move every running guest to `peers` and put the host in Maintenance; returns the
    guests moved.

    Nothing changes when the move is illegal (IllegalTransitionError), when
    guests run and no peer is named (PeersRequiredError), or when this host's
    memory factor or reserved memory cannot be read (ConfigError). A guest that
    cannot move (its migration fails or reaches --guest-timeout, or it fits on
    no peer) leaves the host in ErrorInPrepareForMaintenance, the reason naming
    it (MaintenanceFailedError; MaintenanceAbortedError when the drain's time
    ran out or it was interrupted); the other guests move all the same.
    """
    check(PREPARE)
    guests = hosts.running_guests()
    if guests and not peers:
        names = ", ".join(guest.name for guest in guests)
        raise PeersRequiredError(
            f"guests are running here ({names}): name the hosts to move them to with --to"
        )
    sizing = _local_sizing() if guests else (1.0, 0)
    deadline = None if timeout is None else time.monotonic() + timeout
    move(PREPARE)  # from now on the hook refuses arriving guests
    try:
        drained = _Drain(hosts, options, deadline, report).run(peers, sizing)
        left = hosts.running_guests()
    except (KvmhookError, KeyboardInterrupt) as error:
        _give_up(f"the drain stopped: {str(error) or 'interrupted'}")
        raise
    if left:
        raise _left_behind(drained, left)
    move(MAINTENANCE)
    return drained.moved


def _local_sizing() -> tuple[float, int]:
    """This host's memory factor and reserved memory (bytes), as `kvmhook capacity` reads
    them without a controller: the peers' are taken to be the same (CloudStack sets factors
    per cluster). ConfigError for a broken kvmhook.conf or agent.properties."""
    from kvmhook.host import capacity

    factors = capacity.choose_factors(None, None, lambda: None)
    return factors.memory.value, factors.reserved


@dataclass
class _Drained:
    """What a drain did: the guests it moved, and why each of the others stayed."""

    moved: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    aborted: bool = False  # the time ran out or a migration was interrupted: the rest waited


@dataclass
class _Peer:
    """A peer's memory capacity, (physical - reserved) x factor, and what takes it: the guests
    running there when the drain began and those the drain sent (booked at once, since a
    guest arriving there is listed late and fills its memory slowly), by name."""

    name: str
    capacity: int
    used: dict[str, int]

    @property
    def free(self) -> int:
        return self.capacity - sum(self.used.values())


@dataclass
class _Flight:
    guest: virt.GuestSize
    peer: str
    began: float


class _Drain:
    """Up to `options.parallel` migrations at once, largest guest first, each to the peer with
    the most free capacity when it is sent, never past a peer's capacity."""

    def __init__(
        self, hosts: Hosts, options: DrainOptions, deadline: float | None, report: Report
    ) -> None:
        self.hosts = hosts
        self.options = options
        self.deadline = deadline
        self.report = report
        self.drained = _Drained()
        self.stop = threading.Event()  # set: migrations under way abort (Ctrl-C)
        self.flights: dict[futures.Future[None], _Flight] = {}
        self.crash: BaseException | None = None  # not a KvmhookError: raised at the end
        self.cancelled = False

    def run(self, peers: Sequence[str], sizing: tuple[float, int]) -> _Drained:
        room, unreachable = _peers(self.hosts, peers, sizing, self.report)
        queue = sorted(self.hosts.running_guests(), key=lambda guest: (-guest.memory, guest.name))
        with futures.ThreadPoolExecutor(max_workers=self.options.parallel) as pool:
            while queue or self.flights:
                try:
                    self._send(pool, queue, room, unreachable)
                    if not self.flights:
                        if self._stopping():
                            break
                        continue
                    done, _ = futures.wait(self.flights, return_when=futures.FIRST_COMPLETED)
                    for job in done:
                        self._landed(job, self.flights.pop(job), room)
                except KeyboardInterrupt:
                    # Ctrl-C: the migrations under way abort (stop), the rest wait.
                    self.drained.aborted = True
                    self.stop.set()
        for guest in queue:
            self.drained.failed[guest.name] = "not attempted: --timeout reached or interrupted"
        if self.crash is not None:
            raise self.crash
        _stop_if_cancelled()  # a cancel stopped the sending: DrainCancelledError
        return self.drained

    def _stopping(self) -> bool:
        return self.drained.aborted or self.cancelled or self.crash is not None

    def _send(
        self,
        pool: futures.ThreadPoolExecutor,
        queue: list[virt.GuestSize],
        room: dict[str, _Peer],
        unreachable: list[str],
    ) -> None:
        """Start migrations from the head of `queue` while fewer than `parallel` run."""
        while queue and len(self.flights) < self.options.parallel and not self._stopping():
            if hoststate.read()[0] != PREPARE:
                self.cancelled = True  # cancel: no more guests are sent
                return
            if _remaining(self.deadline) == 0:
                self.drained.aborted = True
                return
            guest = queue[0]
            peer = _place(guest, room)
            if peer is None:
                if self.flights:
                    return  # one under way may fail and give its room back: wait for it
                queue.pop(0)
                self._stays(guest, None, _fits_nowhere(guest, room, unreachable), 0.0)
                continue
            queue.pop(0)
            free = room[peer].free
            room[peer].used[guest.name] = guest.memory
            self.report(f"moving {guest.name} ({_mib(guest.memory)}) to {peer} ({_mib(free)} free)")
            job = pool.submit(
                self.hosts.migrate,
                guest.name,
                peer,
                _remaining(self.deadline),
                guest_timeout=self.options.guest_timeout,
                on_timeout=self.options.on_timeout,
                stop=self.stop,
            )
            self.flights[job] = _Flight(guest, peer, time.monotonic())

    def _landed(self, job: futures.Future[None], flight: _Flight, room: dict[str, _Peer]) -> None:
        """A migration ended: the guest moved, or it stays (its room given back)."""
        guest, peer = flight.guest, flight.peer
        took = round(time.monotonic() - flight.began, 3)
        error = job.exception()
        if error is None:
            self.drained.moved.append(guest.name)
            self.report(f"moved {guest.name} to {peer}")
            events.emit(
                "maintenance.guest_moved",
                guest=guest.name,
                host=peer,
                memory_bytes=guest.memory,
                duration_s=took,
            )
            return
        room[peer].used.pop(guest.name, None)
        if not isinstance(error, KvmhookError):
            # Not a migration's failure (a bug, Ctrl-C in a fake): the others abort, then it
            # is raised.
            self.crash = self.crash or error
            self.stop.set()
            return
        # The drain's time out or Ctrl-C (not --guest-timeout): the guests after it wait.
        if isinstance(error, MigrationAbortedError) and not isinstance(
            error, MigrationTimedOutError
        ):
            self.drained.aborted = True
        self._stays(guest, peer, str(error), took)

    def _stays(self, guest: virt.GuestSize, peer: str | None, why: str, took: float) -> None:
        self.drained.failed[guest.name] = why
        self.report(f"{guest.name} stays: {why}")
        events.emit(
            "maintenance.guest_stays", guest=guest.name, host=peer, error=why, duration_s=took
        )


def _peers(
    hosts: Hosts, peers: Sequence[str], sizing: tuple[float, int], report: Report
) -> tuple[dict[str, _Peer], list[str]]:
    """Each peer's capacity and the guests running there, asked once (in --to order). Peers
    that cannot be asked are left out; the second item says why each was."""
    factor, reserved = sizing
    room: dict[str, _Peer] = {}
    unreachable: list[str] = []
    for peer in peers:
        try:
            physical, guests = hosts.peer_memory(peer)
        except VirtError as error:
            unreachable.append(f"{peer}: {error}")
            report(f"skipping {peer}: {error}")
            continue
        used = {guest.name: guest.memory for guest in guests}
        capacity = overprovision.Resource(physical, factor, 0, whole=True, reserved=reserved)
        room[peer] = _Peer(peer, int(capacity.capacity), used)
        report(
            f"{peer}: {_mib(room[peer].free)} free of {_mib(room[peer].capacity)}"
            f" (({_mib(physical)} - {_mib(reserved)} reserved) x {factor:g},"
            f" {len(used)} guest(s) there)"
        )
    return room, unreachable


def _place(guest: virt.GuestSize, room: dict[str, _Peer]) -> str | None:
    """The peer with the most free capacity that `guest` fits in (on a tie, the first named
    in --to), or None."""
    fitting = [peer for peer in room.values() if peer.free >= guest.memory]
    return max(fitting, key=lambda peer: peer.free).name if fitting else None


def _fits_nowhere(guest: virt.GuestSize, room: dict[str, _Peer], unreachable: list[str]) -> str:
    if not room:
        return f"no peer can take it ({'; '.join(unreachable)})"
    frees = ", ".join(f"{peer.name} {_mib(peer.free)}" for peer in room.values())
    return f"fits on no peer: it needs {_mib(guest.memory)}, free capacity: {frees}"


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
