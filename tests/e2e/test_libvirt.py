"""The installed hook as libvirtd runs it: real guests, real lifecycle events."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import time
import xml.etree.ElementTree as ET

import pytest
from harness import (
    GUEST_PREFIX,
    HOOK,
    define_guest,
    log_records,
    run,
)

# Records argv, the sha256 of stdin and the time; keeps the XML it was given.
TRACE = """\
name=$(basename "$0")
xml=/run/kvmhook-e2e/xml.$2.$name
sum=$(tee "$xml" | sha256sum | cut -d' ' -f1)
printf '%s|%s|%s|%s|%s|%s|%s\\n' "$name" "$1" "$2" "$3" "$4" "$sum" "$(date +%s.%N)" \\
    >> /run/kvmhook-e2e/trace
"""
LIFECYCLE = [
    ("prepare", "begin"),
    ("start", "begin"),
    ("started", "begin"),
    ("stopped", "end"),
    ("release", "end"),
]


@pytest.fixture
def guest(installed, scratch):
    """A defined (not started) guest; destroyed and undefined afterwards."""
    name = f"g{os.getpid()}-{time.monotonic_ns() % 10**6}"
    uuid = define_guest(name)
    yield GUEST_PREFIX + name, uuid
    run("virsh", "destroy", GUEST_PREFIX + name, check=False)
    run("virsh", "undefine", GUEST_PREFIX + name, check=False)


def traces(scratch) -> list[list[str]]:
    path = scratch / "trace"
    return [line.split("|") for line in path.read_text().splitlines()] if path.exists() else []


def domstate(name: str) -> str:
    return run("virsh", "domstate", name).stdout.strip()


def test_lifecycle_runs_every_phase_with_the_exact_xml(guest, scratch, custom):
    """start/suspend/resume/destroy run the installed hook for each phase in order, one XML each."""
    name, uuid = guest
    for script in ("all_trace", "prepare_trace", "release_trace"):
        custom(script, TRACE)
    for command in ("start", "suspend", "resume", "destroy"):
        run("virsh", command, name)
    records = [r for r in traces(scratch) if r[1] == name]
    assert [(r[2], r[3]) for r in records if r[0] == "all_trace"] == LIFECYCLE
    assert [r[2] for r in records if r[0] == "prepare_trace"] == ["prepare"]
    assert [r[2] for r in records if r[0] == "release_trace"] == ["release"]
    # Same rest ("trace"), so the full name breaks the tie: all_ before prepare_/release_.
    assert [r[0] for r in records if r[2] == "prepare"] == ["all_trace", "prepare_trace"]
    assert [r[0] for r in records if r[2] == "release"] == ["all_trace", "release_trace"]
    assert all(r[4] == "-" for r in records)
    times = [float(r[6]) for r in records]
    assert times == sorted(times)
    for operation in ("prepare", "release"):
        sums = {r[5] for r in records if r[2] == operation}
        assert len(sums) == 1, f"scripts of {operation} saw different XML: {sums}"
        data = (scratch / f"xml.{operation}.all_trace").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sums.pop()
        domain = ET.fromstring(data)
        assert domain.tag == "domain"
        assert domain.findtext("name") == name and domain.findtext("uuid") == uuid
    ends = [r for r in log_records() if f"domain={name} " in r and " end: " in r]
    for operation, _subop in LIFECYCLE:
        assert any(f"op={operation} " in r and "script=all_trace end: exit 0" in r for r in ends)


def test_failing_and_hanging_scripts_never_stop_a_start(guest, scratch, custom):
    """A start_ script exiting 1 and one past the edited 2 s timeout: the guest starts anyway."""
    name, _ = guest
    original = HOOK.read_text()
    HOOK.write_text(original.replace("timeoutSeconds = 10 * 60", "timeoutSeconds = 2", 1))
    try:
        custom("start_fail", "echo failing on purpose >&2\nexit 1\n")
        custom("start_slow", "echo sleeping\nsleep 60\n")
        began = time.monotonic()
        run("virsh", "start", name, timeout=60)
        took = time.monotonic() - began
    finally:
        HOOK.write_text(original)
    assert 2 <= took <= 2 + 5 + 2
    assert domstate(name) == "running"
    mine = [r for r in log_records() if f"domain={name} " in r]
    assert any("script=start_fail stderr: failing on purpose" in r for r in mine)
    assert any("script=start_fail end: exit 1" in r for r in mine)
    assert any("script=start_slow end: timed out after 2s" in r for r in mine)


def test_background_process_holding_stdout_does_not_hang_virsh(guest, scratch, custom):
    """A script leaving `sleep 300 &` with its stdout open: `virsh start` still returns promptly."""
    name, _ = guest
    custom("start_leave_behind", "sleep 300 &\necho $! > /run/kvmhook-e2e/leftover\n")
    try:
        began = time.monotonic()
        run("virsh", "start", name, timeout=60)
        took = time.monotonic() - began
        assert took < 5, f"virsh start took {took:.1f}s"
        assert domstate(name) == "running"
    finally:
        leftover = scratch / "leftover"
        if leftover.exists():
            os.kill(int(leftover.read_text()), signal.SIGKILL)


def test_parallel_starts_log_each_run_as_one_block(installed, scratch, custom):
    """Five guests started at once: each hook run's output and end form one block in the log."""
    names = [GUEST_PREFIX + f"par{i}-{os.getpid()}" for i in range(5)]
    for name in names:
        define_guest(name[len(GUEST_PREFIX) :])
    custom("all_chatty", 'for i in $(seq 1 300); do echo "$1 line $i"; done\n')
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            list(pool.map(lambda name: run("virsh", "start", name, timeout=120), names))
        assert all(domstate(name) == "running" for name in names)
    finally:
        for name in names:
            run("virsh", "destroy", name, check=False)
            run("virsh", "undefine", name, check=False)
    records = log_records()
    for name in names:
        for operation in ("prepare", "start", "started"):
            block = [
                i
                for i, r in enumerate(records)
                if f"domain={name} op={operation} " in r
                and "script=all_chatty " in r
                and " start: " not in r
            ]
            assert len(block) == 301, (name, operation, len(block))
            assert block == list(range(block[0], block[0] + 301)), f"{name} {operation} interleaved"
            assert "end: exit 0" in records[block[-1]]


def test_reconnect_runs_and_the_guest_survives_a_daemon_restart(installed, guest, scratch, custom):
    """Restarting libvirtd while a guest runs runs the reconnect chain; the guest keeps running."""
    name, _ = guest
    run("virsh", "start", name)
    custom("reconnect_trace", TRACE)
    installed.restart()
    assert domstate(name) == "running"
    records = [r for r in traces(scratch) if r[1] == name]
    assert [(r[0], r[2], r[3]) for r in records] == [("reconnect_trace", "reconnect", "begin")]
    assert any(
        f"domain={name} op=reconnect " in r and "script=reconnect_trace end: exit 0" in r
        for r in log_records()
    )
