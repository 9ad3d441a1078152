"""The veto policy and the XML rewrite chain with the installed hook and a real libvirtd.

The hook runs with libvirtd's cleared environment, so it reads the real
/etc/kvmhook/kvmhook.conf: the test writes it and puts it back afterwards.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET

import pytest
from harness import GUEST_PREFIX, define_guest, log_records, run

DESCRIPTION = "restored by kvmhook on this host"
# Adds a <description> after the uuid: the guests of the harness have none.
REWRITE = f"""\
sed 's|</uuid>|</uuid><description>{DESCRIPTION}</description>|' > "$KVMHOOK_XML_OUT"
"""


@pytest.fixture
def guest(installed, scratch):
    name = f"feat{os.getpid()}-{time.monotonic_ns() % 10**6}"
    define_guest(name)
    yield GUEST_PREFIX + name
    run("virsh", "managedsave-remove", GUEST_PREFIX + name, check=False)
    run("virsh", "destroy", GUEST_PREFIX + name, check=False)
    run("virsh", "undefine", "--managed-save", GUEST_PREFIX + name, check=False)


def description(name: str) -> str | None:
    return ET.fromstring(run("virsh", "dumpxml", name).stdout).findtext("description")


def test_restore_hook_rewrites_the_description(guest, scratch, custom):
    """`virsh save` + `virsh restore`: the restore script's rewrite is what the restored guest
    runs with; the hook logged the rewrite, not the XML."""
    run("virsh", "start", guest)
    image = scratch / "guest.save"
    run("virsh", "save", guest, str(image))
    custom("restore_describe", REWRITE)
    run("virsh", "restore", str(image))
    assert run("virsh", "domstate", guest).stdout.strip() == "running"
    assert description(guest) == DESCRIPTION
    records = [r for r in log_records() if f"domain={guest} op=restore" in r]
    assert any("script=restore_describe xml: rewritten" in r for r in records), records
    assert any("xml: new domain XML" in r and "printed for libvirt" in r for r in records)
    assert not any(DESCRIPTION in r for r in records)


def test_managedsave_and_start_go_through_the_restore_rewrite(guest, custom):
    """`virsh managedsave` + `virsh start` restores the image: the same rewrite applies."""
    run("virsh", "start", guest)
    run("virsh", "managedsave", guest)
    custom("restore_describe", REWRITE)
    run("virsh", "start", guest)
    assert description(guest) == DESCRIPTION


def test_a_bad_rewrite_leaves_the_restore_alone(guest, scratch, custom):
    """A rewrite that renames the guest is discarded: the guest restores unchanged."""
    run("virsh", "start", guest)
    image = scratch / "guest.save"
    run("virsh", "save", guest, str(image))
    custom("restore_rename", "sed 's|<name>|<name>x|' > \"$KVMHOOK_XML_OUT\"\n")
    run("virsh", "restore", str(image))
    assert run("virsh", "domstate", guest).stdout.strip() == "running"
    assert description(guest) is None
    assert any(
        "script=restore_rename xml: rewrite discarded: <name> changed" in r for r in log_records()
    )


def test_veto_refuses_the_start_and_virsh_says_why(guest, custom, real_conf):
    """on_failure = abort: a failing start script stops the guest from starting and virsh shows
    its stderr; with the policy off the same script no longer blocks."""
    real_conf.write_text("[hooks]\non_failure = abort\nabort_on = prepare, start\n")
    custom("start_deny", "echo 'no licence for this guest on this host' >&2\nexit 1\n")
    result = run("virsh", "start", guest, check=False)
    assert result.returncode != 0
    assert "no licence for this guest on this host" in result.stderr
    assert "custom script start_deny: exit 1" in result.stderr
    assert run("virsh", "domstate", guest).stdout.strip() == "shut off"
    real_conf.write_text("[hooks]\non_failure = ignore\n")
    run("virsh", "start", guest)
    assert run("virsh", "domstate", guest).stdout.strip() == "running"
