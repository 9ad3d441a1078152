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


# --- --restore: the launcher back after cloudstack-agent copied its hook over it ---------

LAUNCHER = (Path(__file__).resolve().parents[1] / "kvmhook" / "data" / "qemu-hook").read_bytes()


@pytest.fixture
def restoring(hooks, tmp_path):
    """HOOK (CloudStack's copy over the launcher), the packaged LAUNCHER, PREVIOUS, CHAIN and
    REFERENCE (cloudstack-agent's file), as after cloudstack-agent's postinst."""
    previous, chain, reference = hooks
    hook, launcher = tmp_path / "qemu", tmp_path / "qemu-hook"
    launcher.write_bytes(LAUNCHER)
    reference.write_bytes(CLOUDSTACK_LIKE)
    hook.write_bytes(CLOUDSTACK_LIKE)
    return hook, launcher, previous, chain, reference


def restore(hook, launcher, previous, chain, reference) -> subprocess.CompletedProcess:
    """Run the file as the packages' triggers do."""
    paths = [str(path) for path in (hook, launcher, previous, chain, reference)]
    return subprocess.run(
        [sys.executable, "-I", "-S", str(MODULE), "--restore", *paths],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_restore_puts_the_launcher_back_and_keeps_cloudstacks_hook_aside(restoring):
    """CloudStack's copy over the launcher: the launcher is back (0755), CloudStack's hook is
    kept as PREVIOUS, unchained, in one line; a rerun changes and says nothing."""
    hook, _, previous, chain, _ = restoring
    os.chmod(hook, 0o700)
    result = restore(*restoring)
    assert result.returncode == 0, result.stderr
    assert hook.read_bytes() == LAUNCHER and (hook.stat().st_mode & 0o7777) == 0o755
    assert previous.read_bytes() == CLOUDSTACK_LIKE and not chain.is_symlink()
    said = result.stderr.splitlines()
    assert said[0].startswith(f"kvmhook: {hook} was CloudStack's qemu hook")
    assert f"launcher is back, CloudStack's kept aside as {previous}, never chained" in said[0]
    assert "timeoutSeconds is the default" in said[0]
    assert not list(hook.parent.glob("*.kvmhook-new"))
    again = restore(*restoring)
    assert again.returncode == 0 and hook.read_bytes() == LAUNCHER
    assert previous.read_bytes() == CLOUDSTACK_LIKE and "launcher is back" not in again.stderr


def test_restore_replaces_an_older_cloudstack_hook_kept_aside(restoring):
    """An older CloudStack hook kept aside is replaced by the one just copied: the newest."""
    hook, _, previous, _, _ = restoring
    previous.write_bytes(CLOUDSTACK_OLD_LIKE)
    assert restore(*restoring).returncode == 0
    assert previous.read_bytes() == CLOUDSTACK_LIKE and hook.read_bytes() == LAUNCHER


def test_restore_keeps_a_hand_made_previous_hook_chained(restoring):
    """A hand-made hook kept aside stays, chained; CloudStack's copy is only dropped (the
    package still holds it) and the launcher is back."""
    hook, _, previous, chain, _ = restoring
    previous.write_bytes(HAND_MADE)
    result = restore(*restoring)
    assert result.returncode == 0, result.stderr
    assert hook.read_bytes() == LAUNCHER and previous.read_bytes() == HAND_MADE
    assert os.readlink(chain) == str(previous)
    assert "kept aside" not in result.stderr.splitlines()[0]


@pytest.mark.parametrize("content", [LAUNCHER, HAND_MADE, b""])
def test_restore_leaves_anything_but_cloudstacks_hook_alone(restoring, content):
    """The launcher (with an operator's timeout), a hand-made hook or an empty file at HOOK is
    never touched: the trigger may run before cloudstack-agent copies its hook, or twice."""
    hook, _, previous, chain, _ = restoring
    hook.write_bytes(content.replace(b"10 * 60", b"5"))
    result = restore(*restoring)
    assert (result.returncode, result.stderr) == (0, "")
    assert hook.read_bytes() == content.replace(b"10 * 60", b"5")
    assert not previous.exists() and not chain.is_symlink()


def test_restore_without_a_launcher_to_copy_is_one_line_and_exit_1(restoring, tmp_path):
    """A missing packaged launcher leaves CloudStack's hook in place: one line, exit 1."""
    hook, _, previous, chain, reference = restoring
    result = restore(hook, tmp_path / "gone", previous, chain, reference)
    assert result.returncode == 1
    assert result.stderr == (
        f"kvmhook: cannot put the launcher back at {hook}: {tmp_path / 'gone'}:"
        " missing, empty or not a regular file\n"
    )
    assert hook.read_bytes() == CLOUDSTACK_LIKE
