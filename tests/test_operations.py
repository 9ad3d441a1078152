"""The one table of libvirt's qemu hook operations, and the event passed along."""

from __future__ import annotations

import pytest
from sandbox import OPERATIONS

from kvmhook.hook import operations
from kvmhook.hook.operations import Event

NAMES = {operation.name: operation for operation in operations.TABLE}


def test_the_table_lists_libvirts_operations_in_a_guests_order():
    """Every operation libvirt passes, once each, in the order of a guest's life."""
    assert operations.OPERATIONS == OPERATIONS
    assert tuple(NAMES) == OPERATIONS
    assert operations.BY_NAME == NAMES


def test_only_operations_libvirt_stops_for_may_abort():
    """prepare, start, started, migrate and restore may abort; every other says why not."""
    assert operations.ABORTABLE == ("prepare", "start", "started", "migrate", "restore")
    for name, operation in NAMES.items():
        assert operation.may_abort is (name in operations.ABORTABLE)
        assert (operation.never_aborts is None) is operation.may_abort
    assert "kill" in NAMES["reconnect"].never_aborts


def test_migrate_and_restore_rewrite_prepare_and_migrate_arrive():
    """libvirt reads new XML on migrate and restore; a guest arrives by prepare or migrate."""
    assert [op.name for op in operations.TABLE if op.rewrites] == ["migrate", "restore"]
    assert [op.name for op in operations.TABLE if op.arrival] == ["prepare", "migrate"]


def test_event_argv_defaults_subop_and_extra_to_dash():
    """An event's argv is the hook's four arguments, `-` standing for a missing one."""
    assert Event("vm1", "start").argv == ["vm1", "start", "-", "-"]
    assert Event("vm1", "start", "begin", "x").argv == ["vm1", "start", "begin", "x"]


def test_event_never_changes():
    """An event is frozen: what libvirt passed cannot be changed on the way down."""
    event = Event("vm1", "start", "begin", "-")
    with pytest.raises(AttributeError, match="does not change"):
        event.domain = "vm2"
    with pytest.raises(AttributeError, match="does not change"):
        del event.operation
    with pytest.raises(AttributeError):
        event.other = 1
    assert (event.domain, event.operation, event.subop, event.extra) == (
        "vm1",
        "start",
        "begin",
        "-",
    )
