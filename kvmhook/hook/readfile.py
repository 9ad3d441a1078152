"""Reading a file the hook did not write: without blocking, regular files only, bounded.

The hook runs as root while libvirtd waits for it, and reads paths that
someone else may have prepared: a FIFO there would block it forever, a link
to /dev/zero would fill its memory. So a file is opened without blocking,
must be a regular file, and is read up to a limit; anything else is refused
with the reason in words, and the caller falls back to its default.
"""

import os
import stat

# The largest domain XML the hook takes, on stdin or as a script's rewrite:
# virsh's own limit on an XML file it reads (VSH_MAX_XML_FILE, 10 MiB). An
# XML that went through libvirt's API is smaller still (REMOTE_STRING_MAX, 4 MiB).
DOMAIN_XML_MAX = 10 * 1024 * 1024
# O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
# O_NOCTTY: a terminal opened by root must not become its controlling terminal.
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_CHUNK = 64 * 1024


class RefusedFile(OSError):
    """A file the hook will not read; `strerror` says why, in words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(None, reason, path)


def too_large(path: str, limit: int) -> RefusedFile:
    """The refusal of `path` (a file, or `stdin`) for holding more than `limit` bytes."""
    return RefusedFile(path, f"larger than {limit} bytes")


def read(path: str, limit: int) -> bytes:
    """The bytes of the regular file at `path` (links followed), at most `limit` of them.

    Raises FileNotFoundError when there is none, IsADirectoryError for a
    directory, RefusedFile when it is not a regular file otherwise or holds
    more than `limit` bytes, OSError when it cannot be read.
    """
    fd = os.open(path, _FLAGS)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):  # said as open() would say it
            import errno  # only now: the hook pays for each import on every guest start

            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(path, "not a regular file")
        if st.st_size > limit:
            raise too_large(path, limit)
        chunks: list[bytes] = []
        total = 0
        want = st.st_size + 1  # one more than expected, to see the end in one read
        while total <= limit:
            chunk = os.read(fd, min(want, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            want = _CHUNK  # it grew while being read (or is in /proc, size 0)
        raise too_large(path, limit)
    finally:
        os.close(fd)
