"""The previous qemu hook at install: CloudStack's is kept aside only, a hand-made one chained.

The file runs as the packages' maintainer scripts run it: `python3 -I FILE PREVIOUS CHAIN
REFERENCE`, here with -S too, so it proves it needs nothing but the standard library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmhook.hook.previoushook import is_cloudstack_hook

MODULE = Path(__file__).resolve().parents[1] / "kvmhook" / "hook" / "previoushook.py"
# The shape of CloudStack's hook (its markers, its custom/all_* loop), not its code.
CLOUDSTACK_LIKE = b"""#!/usr/bin/python3
import os, subprocess, sys
customDir = "/etc/libvirt/hooks/custom"
validQemuActions = ['prepare', 'start', 'started', 'stopped', 'release', 'migrate']

def handleMigrateBegin():
    from cloudutils.networkConfig import networkConfig

def executeCustomScripts(args):
    for name in sorted(os.listdir(customDir)):
        if name.startswith(('all_', args[1] + '_')):
            subprocess.call([os.path.join(customDir, name)] + args)

if __name__ == '__main__':
    executeCustomScripts(sys.argv[1:])
"""
# Releases before custom scripts: the bridge rename alone, for python2.
CLOUDSTACK_OLD_LIKE = b"""#!/usr/bin/python
import sys
from cloudutils.networkConfig import networkConfig
def handleMigrateBegin():
    print(sys.stdin.read())
if __name__ == '__main__' and sys.argv[2:4] == ['migrate', 'begin']:
    handleMigrateBegin()
"""
HAND_MADE = b"""#!/bin/sh
# runs custom/all_* too
for s in /etc/libvirt/hooks/custom/all_*; do "$s" "$@"; done
"""


@pytest.fixture
def hooks(tmp_path):
    """PREVIOUS, CHAIN (in an existing custom dir) and REFERENCE (absent) under tmp_path."""
    (tmp_path / "custom").mkdir()
    chain = tmp_path / "custom/all_00-previous-qemu-hook"
    return tmp_path / "qemu.pre-kvmhook", chain, tmp_path / "libvirtqemuhook"


def settle(previous, chain, reference) -> subprocess.CompletedProcess:
    """Run the file as the maintainer scripts do; a hang fails the test after 10 s."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(MODULE), str(previous), str(chain), str(reference)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@pytest.mark.parametrize("content", [CLOUDSTACK_LIKE, CLOUDSTACK_OLD_LIKE])
def test_cloudstack_hook_is_recognised_by_its_markers(tmp_path, content):
    """A hook with CloudStack's markers is CloudStack's, whichever release it looks like."""
    hook = tmp_path / "qemu"
    hook.write_bytes(content)
    assert is_cloudstack_hook(str(hook), str(tmp_path / "absent"))


def test_a_byte_identical_copy_of_cloudstack_agents_file_is_recognised(tmp_path):
    """Without any marker, a copy of the reference file byte for byte is CloudStack's hook;
    one byte more is not."""
    reference, hook = tmp_path / "libvirtqemuhook", tmp_path / "qemu"
    reference.write_bytes(HAND_MADE)
    hook.write_bytes(HAND_MADE)
    assert is_cloudstack_hook(str(hook), str(reference))
    hook.write_bytes(HAND_MADE + b"\n")
    assert not is_cloudstack_hook(str(hook), str(reference))


def test_a_hand_made_hook_is_not_recognised(tmp_path):
    """A hand-made hook, even one with a single CloudStack marker, is not CloudStack's."""
    hook = tmp_path / "qemu"
    for content in (HAND_MADE, HAND_MADE + b"# def handleMigrateBegin(\n", b""):
        hook.write_bytes(content)
        assert not is_cloudstack_hook(str(hook), str(tmp_path / "absent")), content


def test_install_over_cloudstacks_hook_keeps_it_aside_unchained(hooks):
    """CloudStack's hook is not linked into custom/, and the installer says why in one line."""
    previous, chain, reference = hooks
    previous.write_bytes(CLOUDSTACK_LIKE)
    result = settle(previous, chain, reference)
    assert result.returncode == 0
    assert not chain.is_symlink() and previous.read_bytes() == CLOUDSTACK_LIKE
    said = result.stderr.splitlines()
    assert len(said) == 1 and "CloudStack's qemu hook: kept aside, not chained" in said[0]
    assert "run itself through custom/all_*" in said[0]


def test_upgrade_removes_the_chain_link_to_cloudstacks_hook(hooks):
    """A link an earlier kvmhook made to CloudStack's hook is removed, with one line saying so."""
    previous, chain, reference = hooks
    reference.write_bytes(HAND_MADE)
    previous.write_bytes(HAND_MADE)
    chain.symlink_to(previous)
    result = settle(previous, chain, reference)
    assert result.returncode == 0
    assert not chain.is_symlink() and previous.read_bytes() == HAND_MADE
    said = result.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith(f"kvmhook: removed {chain}: ")


def test_a_hand_made_hook_is_chained_once(hooks):
    """A hand-made hook is linked as the first custom script and said so; a rerun changes
    and says nothing."""
    previous, chain, reference = hooks
    previous.write_bytes(HAND_MADE)
    first = settle(previous, chain, reference)
    said = f"kvmhook: {previous} runs on every call, first, as {chain}.\n"
    assert (first.returncode, first.stderr) == (0, said)
    assert os.readlink(chain) == str(previous)
    assert (settle(previous, chain, reference).returncode, os.readlink(chain)) == (0, str(previous))
    assert settle(previous, chain, reference).stderr == ""


def test_an_operators_own_file_at_the_chain_path_is_kept(hooks, tmp_path):
    """Only a link to the previous hook is removed: an operator's file or other link stays."""
    previous, chain, reference = hooks
    previous.write_bytes(CLOUDSTACK_LIKE)
    chain.symlink_to(tmp_path / "elsewhere")
    assert settle(previous, chain, reference).returncode == 0
    assert os.readlink(chain) == str(tmp_path / "elsewhere")
    chain.unlink()
    chain.write_text("#!/bin/sh\n")
    assert settle(previous, chain, reference).returncode == 0
    assert chain.read_text() == "#!/bin/sh\n"


def test_a_fifo_device_directory_or_dangling_link_never_hangs_nor_fails(hooks, tmp_path):
    """A FIFO without a writer, a device, a directory or a dangling link, as the previous hook
    or as the reference, is not CloudStack's hook, and settling returns 0 at once."""
    previous, chain, _ = hooks
    fifo, directory = tmp_path / "fifo", tmp_path / "directory"
    os.mkfifo(fifo)
    directory.mkdir()
    odd = (fifo, Path("/dev/zero"), directory, tmp_path / "gone", tmp_path / "fifo/below")
    for path in odd:
        assert not is_cloudstack_hook(str(path), str(fifo)), path
        assert not is_cloudstack_hook(str(path), "/dev/zero"), path
    previous.symlink_to(tmp_path / "gone")
    result = settle(previous, chain, fifo)
    assert (result.returncode, result.stderr) == (0, "")
    assert not chain.is_symlink()
    previous.unlink()
    os.mkfifo(previous)
    assert settle(previous, chain, fifo).returncode == 0


def test_a_file_beyond_the_read_limit_is_not_cloudstacks_hook(tmp_path):
    """A file over 1 MiB is not read, so never taken for CloudStack's hook, markers or not."""
    hook = tmp_path / "qemu"
    hook.write_bytes(CLOUDSTACK_LIKE + b"#" * (1024 * 1024))
    assert not is_cloudstack_hook(str(hook), str(hook))


def test_a_chain_that_cannot_be_made_is_one_line_and_exit_1(hooks, tmp_path):
    """Without the custom dir the link cannot be made: one line naming it, exit 1."""
    previous, _, reference = hooks
    previous.write_bytes(HAND_MADE)
    chain = tmp_path / "missing/all_00-previous-qemu-hook"
    result = settle(previous, chain, reference)
    assert result.returncode == 1
    assert result.stderr == (
        f"kvmhook: cannot change {chain} for {previous}: No such file or directory\n"
    )


def test_wrong_arguments_are_a_usage_line_and_exit_2(tmp_path):
    """The maintainer scripts' call is three paths; anything else is refused in one line."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(MODULE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert (result.returncode, result.stderr.count("\n")) == (2, 1)
    assert result.stderr.startswith("usage: previoushook.py ")
