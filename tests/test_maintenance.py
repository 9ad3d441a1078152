"""Host maintenance: the state machine, the standalone drain, controller mode, the command.

libvirt and the controller are fakes here (FakeHosts, FakeController),
each standing in for exactly what kvmhook.host.maintenance asks of them; the
state file is the real one under a temporary KVMHOOK_ROOT. Real drains are
tests/e2e/test_maintenance.py's job.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import libvirt
import pytest
from sandbox import cli_runner

from kvmhook.cli.maintenance import maintenance as maintenance_command
from kvmhook.errors import (
    ControllerError,
    DrainCancelledError,
    IllegalTransitionError,
    MaintenanceAbortedError,
    MaintenanceFailedError,
    MigrationAbortedError,
    MigrationError,
    MigrationTimedOutError,
    NotSecuredError,
    PeersRequiredError,
    StateFileError,
    VirtError,
)
from kvmhook.host import hoststate, virt
from kvmhook.host import maintenance as host_maintenance
from kvmhook.host import migrate as migration

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
# The reference's five states, written out rather than imported from the code under test.
ENABLED = "Enabled"
PREPARE = "PrepareForMaintenance"
ERROR_IN_PREPARE = "ErrorInPrepareForMaintenance"
MAINTENANCE = "Maintenance"
ERROR_IN_MAINTENANCE = "ErrorInMaintenance"
STATES = (ENABLED, PREPARE, ERROR_IN_PREPARE, MAINTENANCE, ERROR_IN_MAINTENANCE)
# The and CloudStack's ResourceState transitions between them that a host makes.
LEGAL = {
    (ENABLED, PREPARE),  # enter (AdminAskMaintenance)
    (PREPARE, MAINTENANCE),  # every guest moved (InternalEnterMaintenance)
    (PREPARE, ERROR_IN_PREPARE),  # a guest cannot move (UnableToMigrate)
    (PREPARE, ENABLED),  # cancel while preparing (AdminCancelMaintenance)
    (ERROR_IN_PREPARE, PREPARE),  # enter again: retry (ErrorsCorrected)
    (ERROR_IN_PREPARE, ENABLED),  # cancel
    (MAINTENANCE, ENABLED),  # cancel
    (ERROR_IN_MAINTENANCE, PREPARE),  # enter again (AdminAskMaintenance)
    (ERROR_IN_MAINTENANCE, ENABLED),  # cancel
}
ILLEGAL = sorted({(a, b) for a in STATES for b in STATES} - LEGAL)


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch) -> Path:
    """A host root of its own, where the state file lives; the controller polled at once."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    monkeypatch.setattr(host_maintenance, "POLL_SECONDS", 0.01)
    return tmp_path


def state_file(root: Path) -> Path:
    return root / "var/lib/kvmhook/maintenance"


def guest(name: str, gib: float = 1) -> virt.GuestSize:
    return virt.GuestSize(name=name, vcpus=1, memory=int(gib * GIB))


class FakeHosts:
    """This host's running guests; its peers' physical memory (`free`: with no kvmhook.conf,
    factor 1 and nothing reserved, all of it is capacity) and the guests running there
    (`peer_guests`); migrations that succeed (the guest leaves the list), fail with the
    given error, or run `during` first; each takes `seconds` (in its own thread), and the
    most migrations under way at once is counted."""

    def __init__(self, guests=(), free=None, failures=None, during=None, peer_guests=None):
        self.guests = guests if isinstance(guests, Exception) else list(guests)
        self.free = dict(free or {})
        self.peer_guests = dict(peer_guests or {})
        self.failures = dict(failures or {})
        self.during = during
        self.seconds = 0.0
        self.migrations: list[tuple[str, str, float | None]] = []
        self.options: list[dict] = []
        self.states_seen: list[str] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def running_guests(self):
        if isinstance(self.guests, Exception):
            raise self.guests
        return list(self.guests)

    def peer_memory(self, peer: str):
        found = self.free[peer]
        if isinstance(found, Exception):
            raise found
        return found, list(self.peer_guests.get(peer, []))

    def migrate(self, name: str, peer: str, timeout, **options) -> None:
        with self.lock:
            self.migrations.append((name, peer, timeout))
            self.options.append(options)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.states_seen.append(hoststate.read()[0])
            if self.during is not None:
                self.during()
            time.sleep(self.seconds)
            if name in self.failures:
                raise self.failures[name]
            with self.lock:
                self.guests = [g for g in self.guests if g.name != name]
        finally:
            with self.lock:
                self.in_flight -= 1


class FakeController:
    """kvmhook.host.controller.Controller's maintenance calls; `states` are what resource_state
    answers in turn (the last one for ever), `error` what every call raises."""

    def __init__(self, states=(PREPARE,), name="kvm1", error=None):
        self.states = list(states)
        self.name = name
        self.error = error
        self.calls: list[tuple[str, float | None]] = []

    def _answer(self, call: str, timeout=None):
        self.calls.append((call, timeout))
        if self.error is not None:
            raise self.error

    def host(self) -> dict:
        self._answer("host")
        return {"id": "0f1e", "name": self.name, "resourcestate": self.states[0]}

    def resource_state(self) -> str:
        self._answer("resource_state")
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def prepare_maintenance(self, timeout: float = 600) -> dict:
        self._answer("prepare_maintenance", timeout)
        return {}

    def cancel_maintenance(self, timeout: float = 600) -> dict:
        self._answer("cancel_maintenance", timeout)
        return {}


def enter(hosts, peers=("kvm2",), timeout=None, lines=None, **options):
    """A standalone enter; `options` for DrainOptions (parallel 1 unless given)."""
    report = lines.append if lines is not None else (lambda _line: None)
    drain = host_maintenance.DrainOptions(**options)
    return host_maintenance.enter_standalone(hosts, list(peers), timeout, report, drain)


# --- the state machine --------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), sorted(LEGAL))
def test_every_legal_transition_is_recorded(root, source, target):
    """Each move of the reference's list is allowed and lands in the state file."""
    hoststate.write(source)
    assert host_maintenance.move(target, "why") == source
    assert hoststate.read() == (target, "why")


@pytest.mark.parametrize(("source", "target"), ILLEGAL)
def test_every_illegal_transition_is_refused_naming_both_states(root, source, target):
    """Every other move (staying put included) is refused with both states named; the file
    is not touched."""
    hoststate.write(source, "before")
    before = state_file(root).read_bytes()
    with pytest.raises(IllegalTransitionError) as refused:
        host_maintenance.move(target)
    assert f"illegal transition {source} -> {target}: a host in {source} may go only to" in str(
        refused.value
    )
    assert state_file(root).read_bytes() == before


def test_no_state_file_is_enabled_and_may_only_enter(root):
    """A host that never entered maintenance can enter, and cannot be cancelled."""
    with pytest.raises(IllegalTransitionError, match="Enabled -> Enabled"):
        host_maintenance.cancel_standalone()
    assert not state_file(root).exists()
    host_maintenance.move(PREPARE)
    assert hoststate.read() == (PREPARE, "")


def test_state_file_keeps_its_old_content_when_the_rename_fails(root, monkeypatch):
    """The atomic replace failing at its last step (the rename): the old state is intact,
    no temporary file is left beside it, and the error names the file."""
    hoststate.write(MAINTENANCE, "drained")
    before = state_file(root).read_bytes()

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StateFileError, match=r"cannot record Enabled in .*: No space left"):
        host_maintenance.cancel_standalone()
    assert state_file(root).read_bytes() == before
    assert os.listdir(state_file(root).parent) == ["maintenance"]


# Writes two states with a long reason, over and over, until killed.
WRITER = """
import sys
from kvmhook.host import hoststate
reason = "guest-left " * 400
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    hoststate.write("PrepareForMaintenance", reason)
    hoststate.write("Maintenance", reason)
"""


@pytest.mark.slow
def test_state_file_is_old_or_new_never_partial_when_the_writer_is_killed(root):
    """A writer killed with SIGKILL at random moments: what the hook reads while it writes,
    and what is left after, is always a whole state file, never a torn or empty one."""
    reason = " ".join(["guest-left"] * 400)
    whole = {
        f"{ENABLED}\n".encode(),
        f"{PREPARE}\n{reason}\n".encode(),
        f"{MAINTENANCE}\n{reason}\n".encode(),
    }
    hoststate.write(ENABLED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER], stdout=subprocess.PIPE, env=env, text=True
        )
        assert writer.stdout.readline() == "ready\n"
        until = time.monotonic() + random.uniform(0.05, 0.3)
        while time.monotonic() < until:
            assert state_file(root).read_bytes() in whole
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        assert state_file(root).read_bytes() in whole
        assert hoststate.read()[0] in (ENABLED, PREPARE, MAINTENANCE)


# --- standalone: the drain ----------------------------------------------------------------


def test_drain_moves_each_guest_to_the_peer_with_most_free_memory(root):
    """Capacity asked once per peer, booked as guests go: 2 GiB `big` to kvm3 (3 GiB free,
    1 left), then 1 GiB `small` to kvm2 (2 GiB free beats 1). An unreachable peer is skipped
    and said so; the host ends in Maintenance."""
    hosts = FakeHosts(
        guests=[guest("small", 1), guest("big", 2)],
        free={"kvm2": 2 * GIB, "kvm3": 3 * GIB, "kvm4": VirtError("cannot connect to kvm4")},
    )
    lines: list[str] = []
    moved = enter(hosts, peers=("kvm4", "kvm2", "kvm3"), lines=lines)
    assert moved == ["big", "small"]
    assert [(name, peer) for name, peer, _ in hosts.migrations] == [
        ("big", "kvm3"),
        ("small", "kvm2"),
    ]
    assert hoststate.read() == (MAINTENANCE, "")
    assert lines == [
        "skipping kvm4: cannot connect to kvm4",
        "kvm2: 2048 MiB free of 2048 MiB ((2048 MiB - 0 MiB reserved) x 1, 0 guest(s) there)",
        "kvm3: 3072 MiB free of 3072 MiB ((3072 MiB - 0 MiB reserved) x 1, 0 guest(s) there)",
        "moving big (2048 MiB) to kvm3 (3072 MiB free)",
        "moved big to kvm3",
        "moving small (1024 MiB) to kvm2 (2048 MiB free)",
        "moved small to kvm2",
    ]


def test_equal_free_memory_goes_to_the_first_peer_named(root):
    """A tie is broken by the order of --to."""
    hosts = FakeHosts(guests=[guest("vm1")], free={"kvm3": GIB, "kvm2": GIB})
    enter(hosts, peers=("kvm3", "kvm2"))
    assert hosts.migrations[0][1] == "kvm3"


def test_the_hook_refuses_guests_while_the_drain_runs(root):
    """PrepareForMaintenance is recorded before the first migration: arrivals are refused."""
    hosts = FakeHosts(guests=[guest("vm1"), guest("vm2")], free={"kvm2": 8 * GIB})
    enter(hosts)
    assert hosts.states_seen == [PREPARE, PREPARE]


def test_an_empty_host_needs_no_peer_and_goes_to_maintenance(root):
    """No guest running: no --to needed, Enabled -> PrepareForMaintenance -> Maintenance."""
    hosts = FakeHosts()
    assert enter(hosts, peers=()) == []
    assert hoststate.read() == (MAINTENANCE, "")


def test_guests_running_and_no_peer_changes_nothing(root):
    """Guests running and no --to: refused before the state changes, the guests named."""
    with pytest.raises(PeersRequiredError, match=r"guests are running here \(vm1, vm2\)"):
        enter(FakeHosts(guests=[guest("vm1"), guest("vm2")]), peers=())
    assert not state_file(root).exists()


def test_a_guest_that_cannot_move_leaves_error_in_prepare_with_the_reason(root):
    """One guest's migration fails: the others still move, the host is left in
    ErrorInPrepareForMaintenance with the guest's name and error as the reason."""
    hosts = FakeHosts(
        guests=[guest("vm1"), guest("vm2"), guest("vm3")],
        free={"kvm2": 8 * GIB},
        failures={"vm2": VirtError("migration of vm2 failed: unsupported configuration")},
    )
    lines: list[str] = []
    with pytest.raises(MaintenanceFailedError) as failed:
        enter(hosts, lines=lines)
    reason = "vm2: migration of vm2 failed: unsupported configuration"
    assert str(failed.value) == f"1 guest(s) not moved, the host is in {ERROR_IN_PREPARE}: {reason}"
    assert hoststate.read() == (ERROR_IN_PREPARE, reason)
    assert [name for name, _, _ in hosts.migrations] == ["vm1", "vm2", "vm3"]
    assert "vm2 stays: migration of vm2 failed: unsupported configuration" in lines


def test_a_refusal_to_migrate_insecurely_is_a_guest_that_cannot_move(root):
    """kvmhook migrate's refusals (here: not secured) count as the guest's reason too."""
    refusal = NotSecuredError("refusing to migrate: this host is not secured (no TLS)")
    hosts = FakeHosts(guests=[guest("vm1")], free={"kvm2": GIB}, failures={"vm1": refusal})
    with pytest.raises(MaintenanceFailedError):
        enter(hosts)
    assert hoststate.read() == (ERROR_IN_PREPARE, f"vm1: {refusal}")


def test_no_reachable_peer_leaves_every_guest_with_the_peers_reasons(root):
    """Every peer unreachable: nothing is migrated, each guest's reason says why."""
    hosts = FakeHosts(
        guests=[guest("vm1"), guest("vm2")], free={"kvm2": VirtError("connection refused")}
    )
    with pytest.raises(MaintenanceFailedError):
        enter(hosts)
    assert hosts.migrations == []
    why = "no peer can take it (kvm2: connection refused)"
    assert hoststate.read() == (ERROR_IN_PREPARE, f"vm1: {why}; vm2: {why}")


def test_retrying_after_an_error_finishes_the_drain(root):
    """enter again from ErrorInPrepareForMaintenance, the problem fixed: Maintenance."""
    hosts = FakeHosts(
        guests=[guest("vm1")], free={"kvm2": GIB}, failures={"vm1": VirtError("boom")}
    )
    with pytest.raises(MaintenanceFailedError):
        enter(hosts)
    hosts.failures = {}
    assert enter(hosts) == ["vm1"]
    assert hoststate.read() == (MAINTENANCE, "")


def test_an_aborted_migration_stops_the_drain(root):
    """The time running out (or Ctrl-C) during a migration: that guest stays, the rest are
    not tried, ErrorInPrepareForMaintenance says so; MaintenanceAbortedError."""
    aborted = MigrationAbortedError("migration of vm1 timed out after 5 s: aborted")
    hosts = FakeHosts(
        guests=[guest("vm1"), guest("vm2")], free={"kvm2": 8 * GIB}, failures={"vm1": aborted}
    )
    with pytest.raises(MaintenanceAbortedError):
        enter(hosts, timeout=5)
    assert [name for name, _, _ in hosts.migrations] == ["vm1"]
    assert hoststate.read() == (
        ERROR_IN_PREPARE,
        f"vm1: {aborted}; vm2: not attempted: --timeout reached or interrupted",
    )


def test_each_migration_gets_the_time_left(root):
    """--timeout is for the whole drain: each migration is given what is left of it."""
    hosts = FakeHosts(guests=[guest("vm1"), guest("vm2")], free={"kvm2": 8 * GIB})
    enter(hosts, timeout=100)
    first, second = (timeout for _, _, timeout in hosts.migrations)
    assert 99 < first <= 100 and second <= first


def test_a_cancel_during_the_drain_stops_it_and_stays_enabled(root):
    """`cancel` run while the drain migrates: no further guest is moved, the host stays
    Enabled (no error state written over the cancel)."""
    hosts = FakeHosts(
        guests=[guest("vm1"), guest("vm2")],
        free={"kvm2": 8 * GIB},
        during=host_maintenance.cancel_standalone,
    )
    with pytest.raises(DrainCancelledError, match="cancelled during the drain"):
        enter(hosts)
    assert [name for name, _, _ in hosts.migrations] == ["vm1"]
    assert hoststate.read() == (ENABLED, "")


def test_ctrl_c_outside_a_migration_leaves_error_in_prepare(root):
    """Interrupted between migrations: never left preparing with nobody draining."""

    def interrupt():
        raise KeyboardInterrupt

    hosts = FakeHosts(guests=[guest("vm1")], free={"kvm2": GIB}, during=interrupt)
    with pytest.raises(KeyboardInterrupt):
        enter(hosts)
    assert hoststate.read() == (ERROR_IN_PREPARE, "the drain stopped: interrupted")


def test_a_guest_left_running_after_the_drain_is_an_error(root):
    """The final listing is the truth: a guest still there is named even without a failure."""
    hosts = FakeHosts(guests=[guest("vm1")], free={"kvm2": GIB})
    hosts.migrate = lambda name, peer, timeout, **options: None  # "succeeds", the guest stays
    with pytest.raises(MaintenanceFailedError):
        enter(hosts)
    assert hoststate.read() == (ERROR_IN_PREPARE, "vm1: still running after the drain")


def test_enter_is_refused_from_maintenance_before_libvirt_is_asked(root):
    """An illegal enter changes nothing and asks nothing."""
    hoststate.write(MAINTENANCE)
    hosts = FakeHosts(guests=VirtError("must not be asked"))
    with pytest.raises(IllegalTransitionError, match="Maintenance -> PrepareForMaintenance"):
        enter(hosts)


# --- the parallel drain: placement, capacity, concurrency ----------------------------------


def write_kvmhook_conf(root: Path, text: str) -> None:
    path = root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def booked(hosts: FakeHosts, guests) -> dict[str, int]:
    """Bytes sent to each peer, from the migrations made."""
    sizes = {g.name: g.memory for g in guests}
    sent: dict[str, int] = {}
    for name, peer, _ in hosts.migrations:
        sent[peer] = sent.get(peer, 0) + sizes[name]
    return sent


def test_largest_guest_first_whatever_the_listing_order(root):
    """Guests are sent largest memory first (a tie by name), not in libvirt's order."""
    guests = [guest("a", 1), guest("b", 4), guest("c", 2), guest("d", 4), guest("e", 0.5)]
    hosts = FakeHosts(guests=guests, free={"kvm2": 64 * GIB})
    enter(hosts)
    assert [name for name, _, _ in hosts.migrations] == ["b", "d", "c", "a", "e"]


def test_capacity_is_physical_less_reserved_times_this_hosts_factor_less_its_guests(root):
    """The peer's capacity uses this host's memory factor and reserved memory (kvmhook.conf):
    (4 GiB - 1 GiB) x 1.5 = 4.5 GiB, less its 2 GiB guest: 2.5 GiB free. A 2 GiB guest goes;
    the next 1 GiB does not fit (0.5 GiB left) and stays, named."""
    write_kvmhook_conf(root, "[capacity]\nmem_factor = 1.5\nreserved_memory_mib = 1024\n")
    hosts = FakeHosts(
        guests=[guest("big", 2), guest("small", 1)],
        free={"kvm2": 4 * GIB},
        peer_guests={"kvm2": [guest("there", 2)]},
    )
    lines: list[str] = []
    with pytest.raises(MaintenanceFailedError) as failed:
        enter(hosts, lines=lines)
    assert lines[0] == (
        "kvm2: 2560 MiB free of 4608 MiB ((4096 MiB - 1024 MiB reserved) x 1.5, 1 guest(s) there)"
    )
    assert [name for name, _, _ in hosts.migrations] == ["big"]
    why = "fits on no peer: it needs 1024 MiB, free capacity: kvm2 512 MiB"
    assert hoststate.read() == (ERROR_IN_PREPARE, f"small: {why}")
    assert f"small stays: {why}" in lines
    assert "1 guest(s) not moved" in str(failed.value)


def test_reserved_memory_from_agent_properties_counts_too(root):
    """Without kvmhook.conf, host.reserved.mem.mb in agent.properties is the reserve."""
    properties = root / "etc/cloudstack/agent/agent.properties"
    properties.parent.mkdir(parents=True)
    properties.write_text("host.reserved.mem.mb=3072\n")
    hosts = FakeHosts(guests=[guest("vm1", 2)], free={"kvm2": 4 * GIB})
    with pytest.raises(MaintenanceFailedError):
        enter(hosts)
    assert (
        hoststate.read()[1]
        == "vm1: fits on no peer: it needs 2048 MiB, free capacity: kvm2 1024 MiB"
    )


def test_each_guest_goes_to_the_peer_with_most_free_capacity_never_past_it(root):
    """Six guests over three peers of unequal capacity, three at once: each is sent to the
    peer with the most free capacity at that moment, no peer gets more than its capacity,
    and what fits nowhere stays with the reason."""
    guests = [guest(f"vm{i}", size) for i, size in enumerate([3, 3, 2, 2, 2, 1])]
    hosts = FakeHosts(guests=guests, free={"kvm2": 5 * GIB, "kvm3": 4 * GIB, "kvm4": 2 * GIB})
    hosts.seconds = 0.05
    with pytest.raises(MaintenanceFailedError):
        enter(hosts, peers=("kvm2", "kvm3", "kvm4"), parallel=3)
    # vm0 (3) -> kvm2 (5 free), vm1 (3) -> kvm3 (4), vm2 (2) -> kvm2 or kvm4 (2 each: kvm2 is
    # named first), vm3 (2) -> kvm4, vm4 (2): kvm3 has 1 left, fits nowhere, vm5 (1) -> kvm3.
    assert [(name, peer) for name, peer, _ in hosts.migrations] == [
        ("vm0", "kvm2"),
        ("vm1", "kvm3"),
        ("vm2", "kvm2"),
        ("vm3", "kvm4"),
        ("vm5", "kvm3"),
    ]
    sent = booked(hosts, guests)
    assert sent["kvm2"] <= 5 * GIB and sent["kvm3"] <= 4 * GIB and sent["kvm4"] <= 2 * GIB
    state, reason = hoststate.read()
    assert (state, reason.split(":")[0]) == (ERROR_IN_PREPARE, "vm4")
    assert reason.startswith("vm4: fits on no peer: it needs 2048 MiB")


@pytest.mark.parametrize("parallel", [1, 2, 3])
def test_never_more_than_parallel_migrations_at_once(root, parallel):
    """Migrations that take 0.1 s each: exactly `parallel` run at once, never more."""
    hosts = FakeHosts(guests=[guest(f"vm{i}") for i in range(6)], free={"kvm2": 64 * GIB})
    hosts.seconds = 0.1
    began = time.monotonic()
    assert len(enter(hosts, parallel=parallel)) == 6
    took = time.monotonic() - began
    assert hosts.most_in_flight == parallel
    assert took < 0.1 * (6 / parallel) + 1.0
    assert hoststate.read() == (MAINTENANCE, "")


def test_a_failing_guest_does_not_stop_the_others_in_parallel(root):
    """Two at once; vm2 fails at once: every other guest still moves; the host is left in
    ErrorInPrepareForMaintenance naming vm2 (exit 1, as before)."""
    guests = [guest(f"vm{i}") for i in range(5)]
    hosts = FakeHosts(
        guests=guests, free={"kvm2": 64 * GIB}, failures={"vm2": VirtError("unsupported")}
    )
    hosts.seconds = 0.05
    with pytest.raises(MaintenanceFailedError):
        enter(hosts, parallel=2)
    assert sorted(name for name, _, _ in hosts.migrations) == [g.name for g in guests]
    assert [g.name for g in hosts.guests] == ["vm2"]
    assert hoststate.read() == (ERROR_IN_PREPARE, "vm2: unsupported")


def test_a_guest_timeout_abort_is_that_guests_failure_only(root):
    """--guest-timeout reached with --on-timeout abort (MigrationTimedOutError): that guest
    stays, the others move, exit 1 (MaintenanceFailedError), not an aborted drain."""
    timed_out = MigrationTimedOutError("migration of vm0 timed out after 5 s: aborted")
    hosts = FakeHosts(
        guests=[guest("vm0", 2), guest("vm1"), guest("vm2")],
        free={"kvm2": 64 * GIB},
        failures={"vm0": timed_out},
    )
    with pytest.raises(MaintenanceFailedError):
        enter(hosts, parallel=2, guest_timeout=5, on_timeout="abort")
    assert sorted(name for name, _, _ in hosts.migrations) == ["vm0", "vm1", "vm2"]
    assert hoststate.read() == (ERROR_IN_PREPARE, f"vm0: {timed_out}")
    assert all(
        options == {"guest_timeout": 5, "on_timeout": "abort", "stop": options["stop"]}
        for options in hosts.options
    )


def test_the_options_reach_each_migration(root):
    """--guest-timeout and --on-timeout are each migration's; --timeout's remainder too."""
    hosts = FakeHosts(guests=[guest("vm1")], free={"kvm2": 8 * GIB})
    enter(hosts, timeout=100, guest_timeout=30, on_timeout="postcopy")
    ((_name, _peer, timeout),) = hosts.migrations
    assert 99 < timeout <= 100
    assert hosts.options[0]["guest_timeout"] == 30
    assert hosts.options[0]["on_timeout"] == "postcopy"
    assert isinstance(hosts.options[0]["stop"], threading.Event)


def test_room_given_back_by_a_failed_migration_is_used(root):
    """Room for one 2 GiB guest at a time: the second waits while the first is under way;
    the first fails, giving the room back, and the second goes."""
    hosts = FakeHosts(
        guests=[guest("first", 2), guest("second", 2)],
        free={"kvm2": 3 * GIB},
        failures={"first": VirtError("boom")},
    )
    hosts.seconds = 0.1
    with pytest.raises(MaintenanceFailedError):
        enter(hosts, parallel=2)
    assert [name for name, _, _ in hosts.migrations] == ["first", "second"]
    assert hosts.most_in_flight == 1
    assert hoststate.read() == (ERROR_IN_PREPARE, "first: boom")


def test_ctrl_c_during_a_parallel_drain_aborts_those_under_way(root):
    """Ctrl-C (SIGINT to the drain's main thread) while two migrate: both are told to stop
    (their stop event) and abort, the rest are not attempted: MaintenanceAbortedError."""
    hosts = FakeHosts(guests=[guest(f"vm{i}") for i in range(4)], free={"kvm2": 64 * GIB})
    started = threading.Barrier(2)

    def migrate(name, peer, timeout, **options):
        hosts.migrations.append((name, peer, timeout))
        if started.wait() == 0:
            os.kill(os.getpid(), signal.SIGINT)
        if options["stop"].wait(10):
            raise MigrationAbortedError(f"migration of {name} interrupted: aborted")
        raise AssertionError("the stop event was never set")

    hosts.migrate = migrate
    with pytest.raises(MaintenanceAbortedError):
        enter(hosts, parallel=2)
    assert sorted(name for name, _, _ in hosts.migrations) == ["vm0", "vm1"]
    state, reason = hoststate.read()
    assert state == ERROR_IN_PREPARE
    assert "vm0: migration of vm0 interrupted: aborted" in reason
    assert "vm2: not attempted: --timeout reached or interrupted" in reason


def test_an_aborted_drain_migration_stops_the_sending_in_parallel(root):
    """The drain's --timeout reached in one migration (MigrationAbortedError): the guests not
    yet sent wait; those under way end by themselves."""
    aborted = MigrationAbortedError("migration of vm0 timed out after 5 s: aborted")
    hosts = FakeHosts(
        guests=[guest("vm0", 2), guest("vm1"), guest("vm2"), guest("vm3")],
        free={"kvm2": 64 * GIB},
        failures={"vm0": aborted},
    )
    with pytest.raises(MaintenanceAbortedError):
        enter(hosts, timeout=5, parallel=2)
    assert sorted(name for name, _, _ in hosts.migrations) == ["vm0", "vm1"]
    assert "vm3: not attempted" in hoststate.read()[1]


def test_board_on_a_terminal_shows_one_line_per_guest_in_flight():
    """Two guests in flight: two lines redrawn in place below the lines said; a guest's line
    goes when its migration ends."""
    stream = io.StringIO()
    board = migration.Board(stream, tty=True, columns=lambda: 120)
    one = board.line("vm1", "kvm2")
    two = board.line("vm2", "kvm3")
    one.update(virt.JobProgress(1 * 2**20, 3 * 2**20, 2**20))
    board.note("moved vm0 to kvm2")
    one.finish()
    out = stream.getvalue()
    frames = out.split("\x1b[J")
    assert frames[0] == "\rvm1 -> kvm2: starting\x1b[K\n"
    assert frames[1] == "\x1b[1Fvm1 -> kvm2: starting\x1b[K\nvm2 -> kvm3: starting\x1b[K\n"
    assert frames[2] == (
        "\x1b[2F"
        "vm1 -> kvm2 [#####---------------]  25% 1.0 MiB sent, 3.0 MiB left, 1.0 MiB/s\x1b[K\n"
        "vm2 -> kvm3: starting\x1b[K\n"
    )
    assert frames[3].startswith("\x1b[2Fmoved vm0 to kvm2\x1b[K\nvm1 -> kvm2 [")
    assert frames[4] == "\x1b[2Fvm2 -> kvm3: starting\x1b[K\n"
    two.finish()
    assert stream.getvalue().endswith("\x1b[1F\x1b[J")


def test_board_rows_are_cut_to_the_terminal_width():
    """A row longer than the terminal would wrap and break the redraw: cut to width - 1;
    the lines said above the table are kept whole."""
    stream = io.StringIO()
    board = migration.Board(stream, tty=True, columns=lambda: 30)
    board.line("a-guest-with-a-very-long-name", "kvm2.example.org")
    board.note("moving a-guest-with-a-very-long-name (1024 MiB) to kvm2.example.org")
    frames = stream.getvalue().split("\x1b[J")
    assert frames[0] == "\ra-guest-with-a-very-long-name\x1b[K\n"
    assert frames[1] == (
        "\x1b[1Fmoving a-guest-with-a-very-long-name (1024 MiB) to kvm2.example.org\x1b[K\n"
        "a-guest-with-a-very-long-name\x1b[K\n"
    )


def test_board_without_a_terminal_prints_plain_lines():
    """Not a terminal: notes as they are, progress as `progress: GUEST: ...` lines, every
    few seconds per guest; no escape sequences."""
    now = [0.0]
    stream = io.StringIO()
    board = migration.Board(stream, tty=False, every=5, clock=lambda: now[0])
    one, two = board.line("vm1", "kvm2"), board.line("vm2", "kvm2")
    for now[0] in (0, 1, 6):
        one.update(virt.JobProgress(2**20, 2**20, 0))
    two.update(virt.JobProgress(2**20, 3 * 2**20, 0))
    board.note("moved vm1 to kvm2")
    one.finish()
    assert stream.getvalue().splitlines() == [
        "progress: vm1:  50% 1.0 MiB sent, 1.0 MiB left, 0.0 MiB/s",
        "progress: vm1:  50% 1.0 MiB sent, 1.0 MiB left, 0.0 MiB/s",
        "progress: vm2:  25% 1.0 MiB sent, 3.0 MiB left, 0.0 MiB/s",
        "moved vm1 to kvm2",
    ]


def test_parse_peers_splits_strips_and_drops_repeats():
    assert host_maintenance.parse_peers(" kvm2, kvm3,,kvm2 ") == ["kvm2", "kvm3"]
    assert host_maintenance.parse_peers(None) == []
    with pytest.raises(MigrationError, match="not a host name"):
        host_maintenance.parse_peers("kvm2,kvm3/x")


def test_libvirt_migrates_as_kvmhook_migrate_and_asks_peers_over_tls(monkeypatch):
    """The real seam: the migration is kvmhook migrate's TLS plan with its secured checks,
    --guest-timeout its timeout, the drain's time left and its stop event its limits, its
    progress a line of the drain's board; a peer's memory is asked over its qemu+tls URI."""
    calls = []
    monkeypatch.setattr(migration, "migrate", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(virt, "host_memory", lambda uri: calls.append(uri) or (5, []))
    board = migration.Board(io.StringIO(), tty=False)
    hosts = host_maintenance.Hosts("qemu:///system", board)
    assert hosts.peer_memory("kvm2") == (5, [])
    stop = threading.Event()
    hosts.migrate("vm1", "kvm2", 30.0, guest_timeout=10, on_timeout="postcopy", stop=stop)
    hosts.migrate("vm2", "kvm2", None)
    assert calls[0] == "qemu+tls://kvm2/system"
    (args, kwargs), (args2, kwargs2) = calls[1], calls[2]
    assert args[:2] == ("vm1", migration.make_plan("kvm2", postcopy=True))
    assert args2[:2] == ("vm2", migration.make_plan("kvm2"))
    assert args[1].flags & libvirt.VIR_MIGRATE_POSTCOPY
    assert isinstance(args[2], migration.Progress)
    assert kwargs == {
        "source_uri": "qemu:///system",
        "timeout": 10,
        "local_check": migration.local_tls_problem,
        "dest_check": migration.dest_tls_problem,
        "limits": migration.Limits(hard_timeout=30.0, stop=stop),
    }
    assert (kwargs2["timeout"], kwargs2["limits"]) == (None, migration.Limits(None, None))


def test_peer_memory_and_running_guests_from_the_test_driver():
    """virt.host_memory reads the node's memory (getInfo: the test driver has no node memory
    stats) and its guests' maximum memory; an unreachable libvirt is a VirtError."""
    physical, guests = virt.host_memory("test:///default")
    assert physical == 3072 * 2**20  # the test driver's node: 3 GiB
    assert [(g.name, g.memory) for g in guests] == [("test", 8 * GIB)]
    running = host_maintenance.Hosts("test:///default", None).running_guests()
    assert [g.name for g in running] == ["test"]
    with pytest.raises(
        VirtError, match=re.escape("cannot connect to qemu+tls://127.0.0.1:1/system")
    ):
        virt.host_memory("qemu+tls://127.0.0.1:1/system")


# --- with a controller --------------------------------------------------------------------


def enter_controller(controller, hosts=None, wait=False, timeout=None, lines=None):
    report = lines.append if lines is not None else (lambda _line: None)
    return host_maintenance.enter_with_controller(
        controller, hosts or FakeHosts(), wait, timeout, report
    )


def test_controller_enter_asks_and_records_the_state_for_the_hook(root):
    """Without --wait: the controller is asked once, its state recorded, the hook refuses."""
    controller = FakeController(states=[PREPARE])
    assert enter_controller(controller) == PREPARE
    assert controller.calls == [("prepare_maintenance", 600.0), ("resource_state", None)]
    assert hoststate.read() == (PREPARE, "")
    assert hoststate.read()[0] in hoststate.REFUSING  # the hook refuses arriving guests


def test_controller_wait_follows_to_maintenance_showing_guests_left(root):
    """--wait polls until Maintenance, a line each time the state or the guest count changes."""
    controller = FakeController(states=[PREPARE, PREPARE, PREPARE, MAINTENANCE])
    hosts = FakeHosts(guests=[guest("vm1"), guest("vm2")])
    counts = iter([[guest("vm1"), guest("vm2")], [guest("vm2")], [guest("vm2")]])
    hosts.running_guests = lambda: next(counts)
    lines: list[str] = []
    assert enter_controller(controller, hosts, wait=True, timeout=30, lines=lines) == MAINTENANCE
    assert lines == [f"{PREPARE}: guests left: 2", f"{PREPARE}: guests left: 1"]
    assert hoststate.read() == (MAINTENANCE, "")
    assert controller.calls[0] == ("prepare_maintenance", 30)


@pytest.mark.parametrize("error_state", [ERROR_IN_PREPARE, ERROR_IN_MAINTENANCE])
def test_controller_error_states_are_reported_and_recorded(root, error_state):
    controller = FakeController(states=[PREPARE, error_state])
    with pytest.raises(MaintenanceFailedError, match=f"the controller reports {error_state}"):
        enter_controller(controller, wait=True)
    assert hoststate.read() == (error_state, "")


def test_controller_wait_times_out_and_the_host_keeps_preparing(root):
    controller = FakeController(states=[PREPARE])
    with pytest.raises(MaintenanceAbortedError, match="--timeout reached: the host is still in"):
        enter_controller(controller, FakeHosts(guests=VirtError("down")), wait=True, timeout=0.05)
    assert hoststate.read() == (PREPARE, "")


def test_controller_cancel_during_the_wait_is_reported(root):
    controller = FakeController(states=[PREPARE, ENABLED])
    with pytest.raises(DrainCancelledError, match="the controller reports Enabled"):
        enter_controller(controller, wait=True)
    assert hoststate.read() == (ENABLED, "")


def test_controller_cancel_asks_and_records_enabled(root):
    hoststate.write(MAINTENANCE)
    controller = FakeController(states=[ENABLED])
    assert host_maintenance.cancel_with_controller(controller) == ENABLED
    assert controller.calls[0][0] == "cancel_maintenance"
    assert hoststate.read() == (ENABLED, "")


def test_controller_states_are_recorded_as_they_are_outside_the_table(root):
    """The controller is the authority: Enabled -> Maintenance (not in the table) is recorded;
    a state outside the five is recorded as Enabled with the controller's word."""
    host_maintenance.follow(FakeController(states=[MAINTENANCE]))
    assert hoststate.read() == (MAINTENANCE, "")
    host_maintenance.follow(FakeController(states=["Disabled"]))
    assert hoststate.read() == (ENABLED, "controller reports Disabled")


def test_no_controller_conf_means_standalone(root):
    """The real loader: no controller.conf under the root, no controller."""
    assert host_maintenance.load_controller() is None


# --- status -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "guests", "removable"),
    [
        (MAINTENANCE, [], True),
        (MAINTENANCE, [guest("vm1")], False),
        (PREPARE, [], False),
        (ERROR_IN_MAINTENANCE, [], False),
        (ENABLED, [], False),
    ],
)
def test_removable_only_in_maintenance_with_no_guest(root, state, guests, removable):
    hoststate.write(state)
    found = host_maintenance.status(None, FakeHosts(guests=guests))
    assert found.removable is removable
    assert found.advice().startswith("yes: stop the agent service" if removable else "no: ")


def test_status_without_libvirt_cannot_say_removable(root):
    hoststate.write(MAINTENANCE)
    found = host_maintenance.status(None, FakeHosts(guests=VirtError("cannot connect")))
    assert not found.removable
    assert found.advice() == "no: cannot tell whether guests run here (cannot connect)"


def test_status_with_a_controller_shows_and_records_its_state(root):
    found = host_maintenance.status(FakeController(states=[MAINTENANCE]), FakeHosts())
    assert (found.mode, found.state, found.controller_host) == ("controller", MAINTENANCE, "kvm1")
    assert found.removable
    assert hoststate.read() == (MAINTENANCE, "")


# --- the command --------------------------------------------------------------------------


@pytest.fixture
def wired(monkeypatch):
    """The command with a FakeHosts and no controller (standalone); set .controller."""

    class Wiring:
        hosts = FakeHosts(free={"kvm2": 8 * GIB})
        controller = None

    monkeypatch.setattr(host_maintenance, "Hosts", lambda uri, progress: Wiring.hosts)
    monkeypatch.setattr(host_maintenance, "load_controller", lambda: Wiring.controller)
    return Wiring


def invoke(*args: str):
    return cli_runner().invoke(maintenance_command, list(args), catch_exceptions=False)


def test_cli_enter_exit_0_in_maintenance(root, wired):
    wired.hosts.guests = [guest("vm1")]
    result = invoke("enter", "--to", "kvm2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "Maintenance: 1 guest(s) moved off this host"
    assert hoststate.read()[0] == MAINTENANCE


def test_cli_enter_migrates_two_at_once_by_default(root, wired):
    """No --parallel: two at once; --parallel 1 is one after the other, as before."""
    wired.hosts.guests = [guest(f"vm{i}") for i in range(4)]
    wired.hosts.seconds = 0.1
    assert invoke("enter", "--to", "kvm2").exit_code == 0
    assert wired.hosts.most_in_flight == 2
    invoke("cancel")
    wired.hosts.guests = [guest(f"vm{i}") for i in range(4)]
    wired.hosts.most_in_flight = 0
    assert invoke("enter", "--to", "kvm2", "--parallel", "1").exit_code == 0
    assert wired.hosts.most_in_flight == 1


def test_cli_enter_passes_guest_timeout_and_on_timeout(root, wired):
    wired.hosts.guests = [guest("vm1")]
    args = ("--guest-timeout", "60", "--on-timeout", "postcopy", "--timeout", "600")
    result = invoke("enter", "--to", "kvm2", *args)
    assert result.exit_code == 0, result.stderr
    assert (wired.hosts.options[0]["guest_timeout"], wired.hosts.options[0]["on_timeout"]) == (
        60,
        "postcopy",
    )
    assert wired.hosts.migrations[0][2] <= 600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallel", "0"], "must be a whole number from 1 to 64"),
        (["--parallel", "65"], "must be a whole number from 1 to 64"),
        (["--guest-timeout", "0"], "must be a whole number from 1 to 604800"),
        (["--on-timeout", "postcopy"], "--on-timeout postcopy needs --guest-timeout"),
        (["--on-timeout", "retry"], "Invalid value for '--on-timeout'"),
    ],
)
def test_cli_enter_drain_options_usage_errors(root, wired, args, message):
    wired.hosts.guests = [guest("vm1")]
    result = invoke("enter", "--to", "kvm2", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not state_file(root).exists()


def test_cli_with_a_controller_refuses_drain_options(root, wired):
    wired.controller = FakeController()
    result = invoke("enter", "--parallel", "4")
    assert result.exit_code == 2
    assert "are for a host without a controller" in result.stderr
    assert wired.controller.calls == []


def test_cli_enter_exit_1_when_a_guest_cannot_move(root, wired):
    wired.hosts.guests = [guest("vm1")]
    wired.hosts.failures = {"vm1": VirtError("boom")}
    result = invoke("enter", "--to", "kvm2")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: 1 guest(s) not moved, the host is in {ERROR_IN_PREPARE}: vm1: boom\n"
    )


@pytest.mark.parametrize("args", [["enter"], ["enter", "--to", "kvm2/x"], ["enter", "--to"]])
def test_cli_enter_exit_2_for_usage_errors(root, wired, args):
    """No --to while guests run, a bad host, a missing value: usage errors; nothing changed."""
    wired.hosts.guests = [guest("vm1")]
    assert invoke(*args).exit_code == 2
    assert not state_file(root).exists()


def test_cli_enter_exit_3_when_illegal(root, wired):
    hoststate.write(MAINTENANCE)
    result = invoke("enter")
    assert result.exit_code == 3
    assert result.stderr == (
        "Error: illegal transition Maintenance -> PrepareForMaintenance:"
        " a host in Maintenance may go only to Enabled\n"
    )


def test_cli_enter_exit_4_when_aborted(root, wired):
    wired.hosts.guests = [guest("vm1")]
    wired.hosts.failures = {"vm1": MigrationAbortedError("timed out after 1 s")}
    result = invoke("enter", "--to", "kvm2", "--timeout", "1")
    assert result.exit_code == 4
    assert hoststate.read()[0] == ERROR_IN_PREPARE


def test_cli_a_second_enter_during_a_drain_is_refused_at_once(root, wired):
    """While an enter drains the host, a second `kvmhook maintenance enter` (another process)
    exits 3 at once saying the first (its pid) is running, and changes nothing; the first
    finishes, and then the lock is free."""
    seconds = []

    def second_enter() -> None:
        seconds.append(
            subprocess.run(
                [str(Path(sys.executable).parent / "kvmhook"), "maintenance", "enter"],
                capture_output=True,
                text=True,
                env={**os.environ, "KVMHOOK_ROOT": str(root)},
                timeout=60,
            )
        )

    wired.hosts.guests = [guest("vm1")]
    wired.hosts.during = second_enter
    assert invoke("enter", "--to", "kvm2").exit_code == 0
    (second,) = seconds
    assert second.returncode == 3, second.stderr
    assert second.stderr == (
        f"Error: another `kvmhook maintenance enter` (pid {os.getpid()}) holds"
        f" {root / 'run/kvmhook/maintenance.lock'}: it is still running"
        " (see `kvmhook maintenance status`)\n"
    )
    assert hoststate.read()[0] == MAINTENANCE
    with host_maintenance.entering():
        pass


def test_cli_cancel_exit_0_then_3(root, wired):
    hoststate.write(ERROR_IN_PREPARE, "vm1: boom")
    result = invoke("cancel")
    assert result.exit_code == 0
    assert result.stdout == f"{ERROR_IN_PREPARE} -> Enabled: this host accepts guests again\n"
    assert invoke("cancel").exit_code == 3


def test_cli_status_text_and_json(root, wired):
    hoststate.write(MAINTENANCE)
    result = invoke("status")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "state      Maintenance",
        "reason     -",
        "mode       standalone",
        "guests     0 running",
        "removable  yes: stop the agent service (cloudstack-agent) first, then remove or"
        " re-install the host",
    ]
    shown = json.loads(invoke("status", "--json").stdout)
    assert shown == {
        "mode": "standalone",
        "state": MAINTENANCE,
        "reason": "",
        "controller_host": None,
        "guests": [],
        "guests_error": None,
        "removable": True,
        "advice": "yes: stop the agent service (cloudstack-agent) first, then remove or"
        " re-install the host",
    }


def test_cli_with_a_controller_enter_wait_and_cancel(root, wired):
    wired.controller = FakeController(states=[PREPARE, PREPARE, MAINTENANCE, ENABLED])
    result = invoke("enter", "--wait")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{PREPARE}: guests left: 0",
        f"the controller has the host in {MAINTENANCE}",
    ]
    result = invoke("cancel")
    assert (result.exit_code, result.stdout) == (0, "the controller has the host in Enabled\n")
    assert hoststate.read() == (ENABLED, "")


def test_cli_with_a_controller_refuses_to(root, wired):
    wired.controller = FakeController()
    assert invoke("enter", "--to", "kvm2").exit_code == 2
    assert wired.controller.calls == []


@pytest.mark.parametrize("command", ["enter", "cancel", "status"])
def test_cli_exit_1_when_the_controller_fails(root, wired, command):
    wired.controller = FakeController(error=ControllerError("no management server answered"))
    result = invoke(command)
    assert result.exit_code == 1
    assert result.stderr == "Error: no management server answered\n"


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        ("enter", ["0  in Maintenance", "1  failed", "2  usage", "3  refused", "4  aborted"]),
        ("cancel", ["0  cancelled", "1  failed", "3  refused"]),
        ("status", ["0  shown", "1  failed"]),
    ],
)
def test_cli_help_documents_the_exit_codes(command, codes):
    result = cli_runner().invoke(maintenance_command, [command, "--help"])
    for line in codes:
        assert line in result.stdout
