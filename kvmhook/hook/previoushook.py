"""The qemu hook found before kvmhook was installed: chained, or only kept aside.

The packages move a qemu hook that is not theirs to qemu.pre-kvmhook before
they install the launcher; then their maintainer scripts (the deb's postinst,
the rpm's %post) run this file as

    python3 -I previoushook.py PREVIOUS CHAIN REFERENCE

with the standard library only, since it runs whatever state the rest of the
package is in. A hand-made hook is linked as CHAIN
(custom/all_00-previous-qemu-hook), so it runs first on every call.
CloudStack's hook never is: it runs every custom/all_* script itself, so
chained it would run itself, again and again, until the timeout; and kvmhook
runs the custom scripts as it did. A link to it that an earlier kvmhook made
is removed.

Nothing here may hang or fail an install: only a regular file is read (a
FIFO, a device or a dangling link is not CloudStack's hook), and a failure is
one line on stderr.

cloudstack-agent's postinst copies its hook over /etc/libvirt/hooks/qemu on
every configure. The packages' triggers (and their own configure) then run

    python3 -I previoushook.py --restore HOOK LAUNCHER PREVIOUS CHAIN REFERENCE

which puts kvmhook's launcher back when HOOK is CloudStack's hook, keeping
that hook aside as PREVIOUS (unless PREVIOUS is a hand-made hook, which stays
chained: CloudStack's copy is then dropped, the package still holds it as
REFERENCE), and settles PREVIOUS as above. Anything else at HOOK is left
alone, so running it again, or before CloudStack's copy, changes nothing.
LAUNCHER is the pristine launcher the package ships: an operator's edited
timeoutSeconds was lost with the file CloudStack copied over, so the default
comes back, and the line printed says so.
"""

from __future__ import annotations

import os
import stat
import sys

# In every release of CloudStack's hook (agent/bindir/libvirtqemuhook.in, for
# python2 and python3, with custom scripts or before them): the migrate-begin
# bridge rename and the cloudutils module it calls.
CLOUDSTACK_MARKERS = (b"def handleMigrateBegin(", b"cloudutils.networkConfig")
# CloudStack's hook is a few kilobytes: a larger file is someone else's.
READ_LIMIT = 1024 * 1024
WHY = (
    "kvmhook runs the custom scripts as that hook did, and chained it would run itself"
    " through custom/all_* until the timeout"
)


def read_regular(path: str) -> bytes | None:
    """The bytes of `path` if it is a regular file of at most READ_LIMIT bytes, else None.

    Opened non-blocking and checked before any read, so a FIFO answers at once.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as source:
            data = source.read(READ_LIMIT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= READ_LIMIT else None


def is_cloudstack_hook(path: str, reference: str) -> bool:
    """Whether `path` is CloudStack's qemu hook: it has CloudStack's markers, or it is
    byte-identical to `reference` (the hook as cloudstack-agent ships it)."""
    content = read_regular(path)
    if not content:
        return False
    if all(marker in content for marker in CLOUDSTACK_MARKERS):
        return True
    return content == read_regular(reference)


def settle(previous: str, chain: str, reference: str) -> str | None:
    """Link `previous` as `chain`, or not when it is CloudStack's hook; returns the line
    telling the operator what was done, or None when nothing needs saying.

    Raises OSError when `chain` cannot be made or removed.
    """
    if is_cloudstack_hook(previous, reference):
        if _links_to(chain, previous):
            os.unlink(chain)
            return (
                f"kvmhook: removed {chain}: {previous} is CloudStack's qemu hook,"
                f" kept aside only ({WHY})."
            )
        return f"kvmhook: {previous} is CloudStack's qemu hook: kept aside, not chained ({WHY})."
    if os.path.exists(previous) and not os.path.lexists(chain):
        os.symlink(previous, chain)
        return f"kvmhook: {previous} runs on every call, first, as {chain}."
    return None


def restore(hook: str, launcher: str, previous: str, reference: str) -> str | None:
    """Put `launcher` back at `hook` when CloudStack's hook is there, CloudStack's kept as
    `previous` unless a hand-made hook is kept there; returns the line telling the operator
    what was done, or None when `hook` is not CloudStack's.

    Raises OSError when a file cannot be read or written.
    """
    if not is_cloudstack_hook(hook, reference):
        return None
    pristine = read_regular(launcher)
    if not pristine:
        raise OSError(0, "missing, empty or not a regular file", launcher)
    kept = ""
    if not os.path.lexists(previous) or is_cloudstack_hook(previous, reference):
        _replace(previous, read_regular(hook) or b"")
        kept = f", CloudStack's kept aside as {previous}"
    _replace(hook, pristine)
    return (
        f"kvmhook: {hook} was CloudStack's qemu hook (copied by cloudstack-agent): kvmhook's"
        f" launcher is back{kept}, never chained ({WHY}); timeoutSeconds is the default."
    )


def _replace(path: str, content: bytes) -> None:
    """`path` holds `content`, mode 0755, at once: libvirtd never sees half a hook."""
    temporary = f"{path}.kvmhook-new"
    if os.path.lexists(temporary):
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    try:
        with os.fdopen(fd, "wb", closefd=False) as sink:
            sink.write(content)
        os.fchmod(fd, 0o755)  # the umask may have taken bits away
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _links_to(link: str, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except OSError:
        return False


def main(argv: list[str]) -> int:
    """The maintainer scripts' entry: 0 when settled, 1 when a file could not be changed."""
    if len(argv) == 6 and argv[0] == "--restore":
        hook, launcher, previous, chain, reference = argv[1:]
        try:
            said = [restore(hook, launcher, previous, reference)]
        except OSError as error:
            sys.stderr.write(
                f"kvmhook: cannot put the launcher back at {hook}:"
                f" {error.filename}: {error.strerror}\n"
            )
            return 1
    elif len(argv) == 3:
        previous, chain, reference = argv
        said = []
    else:
        sys.stderr.write(
            "usage: previoushook.py PREVIOUS CHAIN REFERENCE"
            " | --restore HOOK LAUNCHER PREVIOUS CHAIN REFERENCE\n"
        )
        return 2
    try:
        said.append(settle(previous, chain, reference))
    except OSError as error:
        sys.stderr.write(f"kvmhook: cannot change {chain} for {previous}: {error.strerror}\n")
        return 1
    for line in said:
        if line:
            sys.stderr.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
