"""The maintenance state file and the hook refusing arriving guests while in maintenance."""

from __future__ import annotations

import os

import pytest

from kvmhook.host import hoststate

ARRIVING = ("prepare", "migrate")
NEVER_BLOCKED = ("start", "started", "stopped", "release", "restore", "reconnect", "attach")


@pytest.fixture
def root(host, monkeypatch):
    monkeypatch.setenv("KVMHOOK_ROOT", str(host.root))
    return host


def test_no_state_file_means_enabled(root):
    """A host that never entered maintenance is Enabled and refuses nothing."""
    assert hoststate.read() == (hoststate.ENABLED, "")
    assert hoststate.read()[0] not in hoststate.REFUSING


@pytest.mark.parametrize("state", hoststate.STATES)
def test_written_state_reads_back(root, state):
    """Every state round-trips through the file, with its reason."""
    hoststate.write(state, "drained to\nkvm2")
    assert hoststate.read() == (state, "drained to kvm2")
    path = root.root / "var/lib/kvmhook/maintenance"
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_unknown_or_garbled_state_never_blocks(root):
    """A state file the hook cannot make sense of counts as Enabled: guests are not blocked."""
    path = root.root / "var/lib/kvmhook/maintenance"
    path.parent.mkdir(parents=True)
    for content in (b"Maintenanc\n", b"\xff\xfe", b""):
        path.write_bytes(content)
        assert hoststate.read()[0] not in hoststate.REFUSING


def test_write_refuses_an_unknown_state(root):
    """Only the reference's five states can be recorded."""
    with pytest.raises(ValueError, match="unknown maintenance state"):
        hoststate.write("Disabled")


@pytest.mark.parametrize("state", sorted(hoststate.REFUSING))
@pytest.mark.parametrize("operation", ARRIVING)
def test_hook_refuses_arriving_guests_in_maintenance(root, state, operation):
    """prepare and migrate exit 1 with the message on stderr, before any custom script runs."""
    root.script("all_marker", f'touch "{root.root}/ran"\n')
    hoststate.write(state)
    result = root.hook("vm1", operation, "begin", "-")
    assert result.returncode == 1
    assert result.stderr == b"host is in maintenance mode; not accepting new guests\n"
    assert result.stdout == b""
    assert not (root.root / "ran").exists()
    assert any("refused: host is in maintenance mode" in r for r in root.records())


@pytest.mark.parametrize("operation", NEVER_BLOCKED)
def test_other_operations_run_in_maintenance(root, operation):
    """Every other operation, reconnect above all, runs its scripts and exits 0 in maintenance."""
    root.script("all_marker", f'touch "{root.root}/ran"\n')
    hoststate.write(hoststate.MAINTENANCE)
    result = root.hook("vm1", operation, "begin", "-")
    assert (result.returncode, result.stdout) == (0, b"")
    assert (root.root / "ran").exists()


@pytest.mark.parametrize("state", [hoststate.ENABLED, hoststate.ERROR_IN_MAINTENANCE])
def test_guests_arrive_when_not_refusing(root, state):
    """Enabled and ErrorInMaintenance accept guests: prepare runs its scripts, exit 0."""
    root.script("all_marker", f'touch "{root.root}/ran"\n')
    hoststate.write(state)
    assert root.hook("vm1", "prepare", "begin", "-").returncode == 0
    assert (root.root / "ran").exists()
    os.unlink(root.root / "ran")


def test_a_huge_reason_is_cut_so_the_state_still_refuses(root):
    """A reason of megabytes is cut on write: the state file stays readable, still refusing."""
    hoststate.write(hoststate.MAINTENANCE, "guest-stuck " * 500_000)
    state, reason = hoststate.read()
    assert state == hoststate.MAINTENANCE
    assert reason.startswith("guest-stuck guest-stuck") and reason.endswith("…")
    assert len(reason) <= 64 * 1024
