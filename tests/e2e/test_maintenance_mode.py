"""`kvmhook maintenance` against real libvirt daemons: the hook's refusal, and a real drain.

One host: the e2e libvirtd and the hook installed by the .deb. That hook runs
with libvirtd's cleared environment, so it reads the real state file,
/var/lib/kvmhook/maintenance: these tests write it through the command and
remove it afterwards.

Two hosts (twohost.py, secured with TLS): a running guest on host a is
drained to host b; four filled guests (fillguest.py) drained two at a time;
a guest that keeps rewriting its memory over a slow link, whose migration
never converges, aborted or switched to post-copy at its timeout. The
harness gives each host a /var/lib/kvmhook of its own: entering maintenance
on a must not turn b away.

Root only; without the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import fillguest
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


# --- two hosts: parallel drains and post-copy (issue 17) ----------------------------------

MARK_SCRIPT = "all_00-e2e-mark"
# Busy guests: a link this slow never carries what they rewrite (hundreds of MiB/s in TCG).
SLOW_MIB_PER_S = "4"
GUEST_TIMEOUT = 8


@pytest.fixture
def marked(pair):
    """A custom script on both hosts that runs for every operation, so that the hook logs a
    timed record of each (`start:`); removed afterwards."""
    scripts = [host.path(f"/etc/libvirt/hooks/custom/{MARK_SCRIPT}") for host in pair.hosts]
    for script in scripts:
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
    yield pair
    for script in scripts:
        script.unlink(missing_ok=True)


@pytest.fixture
def fill_guests(pair):
    """Start filled guests on a: fill_guests({name: MiB}, keep_writing=False); every guest
    destroyed and undefined on both hosts afterwards, a's maintenance cancelled."""
    started: list[str] = []

    def start(sizes: dict[str, int], keep_writing: bool = False) -> None:
        for name, mib in sizes.items():
            kernel = pair.root / f"{name}.kernel"
            kernel.write_bytes(fillguest.fill_kernel(mib, keep_writing))
            pair.a.define_guest(name, guest_xml(name, mib, kernel))
            pair.a.virsh("start", name)
            started.append(name)
        for name in sizes:
            fillguest.wait_for_fill(pair.a, name, timeout=120)

    yield start
    if host_state(pair.a) and host_state(pair.a)[0] != "Enabled":
        pair.a.run(*kvmhook_maintenance_argv("cancel"), check=False)
    for host in pair.hosts:
        for name in started:
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)


def hook_times(host, operation: str) -> dict[str, datetime.datetime]:
    """The first time the host's hook logged each guest's `operation` ("migrate subop=begin",
    "release subop=end"), from the records of the mark script's runs."""
    times: dict[str, datetime.datetime] = {}
    for record in host.hook_log().splitlines():
        if f" op={operation} " not in record or f"script={MARK_SCRIPT} start:" not in record:
            continue
        domain = record.split(" domain=", 1)[1].split(" ", 1)[0]
        when = datetime.datetime.strptime(record[:23], "%Y-%m-%d %H:%M:%S.%f")
        times.setdefault(domain, when)
    return times


def test_parallel_drain_moves_four_guests_two_at_a_time(marked, fill_guests):
    """Four filled guests on a; `enter --to b --parallel 2`: the largest are sent first, all
    four run on b, a is in Maintenance; b's hook logs a second guest's `migrate begin`
    before a's hook logs the first guest's `release end` (the end of its migration): two
    migrations overlapped."""
    a, b = marked.a, marked.b
    tag = time.monotonic_ns() % 10**6
    sizes = {f"{GUEST_PREFIX}par{index}-{tag}": mib for index, mib in enumerate([96, 160, 96, 160])}
    fill_guests(sizes)
    entered = a.run(
        *kvmhook_maintenance_argv("enter", "--to", b.hostname, "--parallel", "2"),
        check=False,
        timeout=600,
    )
    assert entered.returncode == 0, (
        f"{entered.stdout}\n{entered.stderr}\nb's libvirtd log:\n{b.libvirtd_log()}"
    )
    moving = [line.split()[1] for line in entered.stdout.splitlines() if line.startswith("moving ")]
    assert [sizes[name] for name in moving] == [160, 160, 96, 96], entered.stdout
    for name in sizes:
        assert b.state(name) == "running", name
    assert a.guests() == []
    assert host_state(a) == ["Maintenance"]
    begins = hook_times(b, "migrate subop=begin")
    ends = hook_times(a, "release subop=end")
    assert set(begins) >= set(sizes) and set(ends) >= set(sizes), (begins, ends)
    first = min(sizes, key=lambda name: ends[name])
    overlapping = [name for name in sizes if name != first and begins[name] < ends[first]]
    assert overlapping, (
        f"no migrate begin on b before {first}'s release end on a ({ends[first]}): {begins}"
    )


def test_a_busy_guest_aborted_at_the_guest_timeout_stays_on_a(pair, fill_guests):
    """A guest that rewrites its memory faster than its migration bandwidth (virsh
    migrate-setspeed: the drain's migrations use the guest's own limit) never converges:
    with --guest-timeout and --on-timeout abort its migration is aborted then, the guest
    keeps running on a, and a is left in ErrorInPrepareForMaintenance naming it (exit 1)."""
    a, b = pair.a, pair.b
    name = f"{GUEST_PREFIX}busy-{time.monotonic_ns() % 10**6}"
    fill_guests({name: 128}, keep_writing=True)
    a.virsh("migrate-setspeed", name, SLOW_MIB_PER_S)
    began = time.monotonic()
    entered = a.run(
        *kvmhook_maintenance_argv(
            "enter", "--to", b.hostname, "--guest-timeout", str(GUEST_TIMEOUT)
        ),
        check=False,
        timeout=300,
    )
    took = time.monotonic() - began
    assert entered.returncode == 1, f"{entered.stdout}\n{entered.stderr}"
    assert GUEST_TIMEOUT <= took < GUEST_TIMEOUT + 60
    state, reason = host_state(a)
    assert state == "ErrorInPrepareForMaintenance"
    assert reason.startswith(f"{name}: migration of {name} timed out after {GUEST_TIMEOUT} s")
    assert a.state(name) == "running"
    assert b.state(name) is None


def test_a_busy_guest_switched_to_postcopy_completes_on_b(pair, fill_guests):
    """The same guest with --on-timeout postcopy: at --guest-timeout the drain switches its
    migration to post-copy, which completes: the guest runs on b, a is in Maintenance."""
    a, b = pair.a, pair.b
    name = f"{GUEST_PREFIX}busypc-{time.monotonic_ns() % 10**6}"
    fill_guests({name: 128}, keep_writing=True)
    a.virsh("migrate-setspeed", name, SLOW_MIB_PER_S)
    entered = a.run(
        *kvmhook_maintenance_argv(
            "enter",
            "--to",
            b.hostname,
            "--guest-timeout",
            str(GUEST_TIMEOUT),
            "--on-timeout",
            "postcopy",
        ),
        check=False,
        timeout=300,
    )
    assert entered.returncode == 0, (
        f"{entered.stdout}\n{entered.stderr}\nb's libvirtd log:\n{b.libvirtd_log()}"
    )
    assert f"{name}: timed out after {GUEST_TIMEOUT} s, switched to post-copy" in entered.stdout
    assert b.state(name) == "running"
    assert a.state(name) is None
    assert host_state(a) == ["Maintenance"]
    assert fillguest.filled(b, name)  # its memory came along: the marker is there


def test_kvmhook_migrate_on_timeout_abort_then_postcopy(pair, fill_guests):
    """`kvmhook migrate --bandwidth 4 --timeout 8` of a busy guest: --on-timeout abort exits
    4 with the guest still on a; --on-timeout postcopy moves it to b (exit 0)."""
    a, b = pair.a, pair.b
    name = f"{GUEST_PREFIX}busymig-{time.monotonic_ns() % 10**6}"
    fill_guests({name: 128}, keep_writing=True)
    argv = [
        str(KVMHOOK), "migrate", name, b.hostname,
        "--bandwidth", SLOW_MIB_PER_S, "--timeout", str(GUEST_TIMEOUT),
    ]  # fmt: skip
    aborted = a.run(*argv, "--on-timeout", "abort", check=False, timeout=300)
    assert aborted.returncode == 4, f"{aborted.stdout}\n{aborted.stderr}"
    assert f"timed out after {GUEST_TIMEOUT} s: aborted" in aborted.stderr
    assert (a.state(name), b.state(name)) == ("running", None)
    switched = a.run(*argv, "--on-timeout", "postcopy", check=False, timeout=300)
    assert switched.returncode == 0, (
        f"{switched.stdout}\n{switched.stderr}\nb's libvirtd log:\n{b.libvirtd_log()}"
    )
    assert (a.state(name), b.state(name)) == (None, "running")
