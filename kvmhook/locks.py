"""Exclusive locks under /run/kvmhook that serialize commands changing the same things.

flock, not a pid file: the kernel drops the lock when its holder dies, so
there is never a stale lock to clean up. The holder writes its pid into the
file, for the message a second command shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Callable

from kvmhook import paths
from kvmhook.errors import KvmhookError, LockError

_POLL = 0.1
# How long a certificate change waits for another: longer than one can take
# (a renewal's signer gets 120 s, then the controller's job, a reload or a restart).
CERTIFICATES_WAIT = 600.0


def certificates(
    busy: Callable[[str], KvmhookError], say: Callable[[str], None] = lambda line: None
) -> contextlib.AbstractContextManager[None]:
    """The lock of this host's key and certificates: `kvmhook cert renew` and `rollback`,
    keystore-setup and keystore-cert-import each hold it while they read and replace them.

    A second one waits rather than fails: it is a timer's run, an operator's or
    the controller's, and each reads the files only once it holds the lock.
    """
    return held(
        paths.cert_renew_lock(),
        "the certificate renewal, rollback or keystore tool",
        CERTIFICATES_WAIT,
        busy,
        say,
    )


@contextlib.contextmanager
def held(
    path: str,
    holder: str,
    wait: float,
    busy: Callable[[str], KvmhookError],
    say: Callable[[str], None] = lambda line: None,
) -> Iterator[None]:
    """Hold the lock at `path`, waiting up to `wait` seconds for `holder` (what holds it,
    for messages) to let go; `busy(message)` is raised when it does not in time.

    With `wait` above 0, `say` is told once that this one waits and for whom.
    """
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise LockError(f"cannot open the lock {path}: {error.strerror}") from None
    try:
        _take(fd, path, holder, wait, busy, say)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _take(
    fd: int,
    path: str,
    holder: str,
    wait: float,
    busy: Callable[[str], KvmhookError],
    say: Callable[[str], None],
) -> None:
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if time.monotonic() >= deadline:
                held = f"has held {path} for more than {wait:g} s" if wait else f"holds {path}"
                raise busy(f"{holder} (pid {pid}) {held}") from None
            if not waiting:
                say(f"waiting for {holder} running as pid {pid} ({path})")
                waiting = True
            time.sleep(_POLL)
