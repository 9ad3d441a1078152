"""`kvmhook maintenance` against real libvirt daemons: the hook's refusal, and a real drain.

One host: the e2e libvirtd and the hook installed by the .deb. That hook runs
with libvirtd's cleared environment, so it reads the real state file,
/var/lib/kvmhook/maintenance: these tests write it through the command and
remove it afterwards.

Two hosts (twohost.py, secured with TLS): a running guest on host a is
drained to host b. The harness gives each host a /var/lib/kvmhook of its own:
entering maintenance on a must not turn b away.

Root only; without the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from harness import GUEST_PREFIX, define_guest, log_records, run
from twohost import KVMHOOK, TwoHosts, guest_xml, migrate_argv, missing_prerequisites

STATE = Path("/var/lib/kvmhook/maintenance")
REFUSAL = "host is in maintenance mode; not accepting new guests"
# Nothing listens on port 1: a peer that can never take a guest.
UNREACHABLE_PEER = "127.0.0.1:1"


def kvmhook_maintenance_argv(*args: str) -> list[str]:
    """`kvmhook maintenance ARGS` with the installed-in-venv console script."""
    return [str(KVMHOOK), "maintenance", *args]


def maintenance(*args: str) -> subprocess.CompletedProcess:
    """`kvmhook maintenance ARGS` on this machine, on the real root (no KVMHOOK_ROOT)."""
    env = {key: value for key, value in os.environ.items() if key != "KVMHOOK_ROOT"}
    return subprocess.run(
        kvmhook_maintenance_argv(*args),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def domstate(name: str) -> str:
    return run("virsh", "domstate", name).stdout.strip()


def domid(name: str) -> str:
    """The running guest's libvirt id: the same QEMU process keeps the same id."""
    return run("virsh", "domid", name).stdout.strip()


@pytest.fixture
def real_state():
    """The real state file, absent at the start and removed at the end (with /var/lib/kvmhook
    when this test made it): the machine is left accepting guests."""
    made = not STATE.parent.exists()
    STATE.unlink(missing_ok=True)
    yield STATE
    STATE.unlink(missing_ok=True)
    if made and STATE.parent.exists():
        STATE.parent.rmdir()


@pytest.fixture
def two_guests(installed, scratch):
    """Two defined (not started) guests; destroyed and undefined afterwards."""
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
    for short in (f"stay{tag}", f"new{tag}"):
        define_guest(short)
    names = [f"{GUEST_PREFIX}stay{tag}", f"{GUEST_PREFIX}new{tag}"]
    yield names
    for name in names:
        run("virsh", "destroy", name, check=False)
        run("virsh", "undefine", name, check=False)


def assert_start_refused(name: str) -> None:
    started = run("virsh", "start", name, check=False)
    assert started.returncode != 0, f"{name} started in maintenance"
    assert REFUSAL in started.stderr, started.stderr
    assert domstate(name) == "shut off"


def test_an_empty_host_enters_maintenance_refuses_starts_and_starts_again_after_cancel(
    two_guests, real_state
):
    """No guest running: `enter` needs no --to and ends in Maintenance; `virsh start` fails
    with the hook's one line; status says the host may be removed; `cancel`, and the same
    guest starts."""
    name = two_guests[1]
    entered = maintenance("enter")
    assert entered.returncode == 0, entered.stdout + entered.stderr
    assert entered.stdout.splitlines()[-1] == "Maintenance: 0 guest(s) moved off this host"
    assert real_state.read_text() == "Maintenance\n"
    assert_start_refused(name)
    shown = json.loads(maintenance("status", "--json").stdout)
    assert (shown["state"], shown["guests"], shown["removable"]) == ("Maintenance", [], True)
    cancelled = maintenance("cancel")
    assert cancelled.returncode == 0, cancelled.stderr
    run("virsh", "start", name)
    assert domstate(name) == "running"


def test_a_running_guest_is_untouched_while_new_ones_are_refused(installed, two_guests, real_state):
    """A guest runs; `enter` refuses new starts; the running guest keeps running, through a
    libvirtd restart (reconnect is never blocked); `cancel`, and starts work again.

    Why ErrorInPrepareForMaintenance rather than Maintenance: on one host a standalone
    `enter` moves every running guest away, so a guest still runs under maintenance only
    when it cannot move. The test names a peer that can never take it (nothing listens on
    127.0.0.1:1): the drain leaves the guest where it is and the host in
    ErrorInPrepareForMaintenance, the state a real host is in while a guest will not leave,
    and one in which the hook refuses arrivals exactly as in Maintenance. The real command
    writes the state, no hand-made file. Maintenance itself is the test above.
    """
    staying, newcomer = two_guests
    run("virsh", "start", staying)
    before = domid(staying)
    entered = maintenance("enter", "--to", UNREACHABLE_PEER)
    assert entered.returncode == 1, entered.stdout + entered.stderr
    state, reason = real_state.read_text().splitlines()
    assert state == "ErrorInPrepareForMaintenance"
    assert reason.startswith(f"{staying}: no peer can take it ({UNREACHABLE_PEER}: ")
    assert_start_refused(newcomer)
    assert (domstate(staying), domid(staying)) == ("running", before)
    installed.restart()
    assert (domstate(staying), domid(staying)) == ("running", before)
    records = [r for r in log_records() if f"domain={staying} op=reconnect " in r]
    assert records and not any("refused" in r for r in records), records
    cancelled = maintenance("cancel")
    assert cancelled.stdout == (
        "ErrorInPrepareForMaintenance -> Enabled: this host accepts guests again\n"
    )
    run("virsh", "start", newcomer)
    assert domstate(newcomer) == "running"


# --- two hosts: drain a to b ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """Hosts a and b, secured, each with a /var/lib/kvmhook of its own; all gone after."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with TwoHosts() as hosts:  # each host has a /var/lib/kvmhook of its own (twohost.PRIVATE)
        yield hosts


def host_state(host) -> list[str]:
    """The lines of a host's own state file ([] when it has none: Enabled)."""
    path = host.workdir / "var-lib-kvmhook" / STATE.name
    return path.read_text().splitlines() if path.exists() else []


def test_drain_a_to_b_leaves_a_in_maintenance_with_no_guests(pair):
    """A running TCG guest on a; `kvmhook maintenance enter --to b` run on a live-migrates it
    over TLS: it runs on b, a has no guest left and is in Maintenance (removable), b stays
    Enabled. a's hook now refuses the guest's migration back, until `cancel`."""
    a, b = pair.a, pair.b
    name = f"{GUEST_PREFIX}drain-{time.monotonic_ns() % 10**8}"
    a.define_guest(name, guest_xml(name))
    a.virsh("start", name)
    try:
        entered = a.run(*kvmhook_maintenance_argv("enter", "--to", b.hostname), check=False)
        assert entered.returncode == 0, (
            f"{entered.stdout}\n{entered.stderr}\nb's libvirtd log:\n{b.libvirtd_log()}"
        )
        assert f"moved {name} to {b.hostname}" in entered.stdout.splitlines()
        assert b.state(name) == "running"
        assert a.guests() == []
        assert host_state(a) == ["Maintenance"]
        assert host_state(b) == []
        shown = json.loads(a.run(*kvmhook_maintenance_argv("status", "--json")).stdout)
        assert (shown["state"], shown["guests"], shown["removable"]) == ("Maintenance", [], True)
        back = b.run(*migrate_argv(name, a), check=False)
        assert back.returncode != 0 and REFUSAL in back.stderr, back.stderr
        assert b.state(name) == "running"
        a.run(*kvmhook_maintenance_argv("cancel"))
        assert host_state(a) == ["Enabled"]
    finally:
        for host in pair.hosts:
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)
