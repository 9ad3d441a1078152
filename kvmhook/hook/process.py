"""The one place that runs child processes. Be careful changing it.

A child runs in its own session (so it and everything it forks share one
process group), with stdin from a replayable copy of the hook's input and
stdout/stderr on pipes that are drained as the child writes. At the
deadline the whole group gets SIGTERM, and SIGKILL when the grace period
ends; the group is always signalled before its leader is reaped, so the
group id cannot have been reused by then.

Only the standard library's cheapest modules are used: this runs on every
guest start. `_signal` is the C module behind `signal`; the public module
imports `enum`, which alone would cost more than the rest of the hook.
"""

from __future__ import annotations

import _signal
import os
import select
import time

from kvmhook.hook.readfile import DOMAIN_XML_MAX, too_large

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Mapping

_READ_SIZE = 256 * 1024
# After the child exits, how long to keep reading output that its
# descendants may still be writing before moving on without them.
_LINGER = 0.25
# After SIGKILL, how long to wait for the leader to die (it can be stuck in
# the kernel) before moving on and leaving it to init.
_KILL_WAIT = 0.5
# How often to look for the child's exit where pidfds are not available.
_TICK = 0.01
# Each change between stdout and stderr starts a new segment; past this many,
# output from the other stream is dropped, so that tiny interleaved writes
# cannot make the bookkeeping outgrow the cap.
_MAX_SEGMENTS = 1024
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, only named in Python >= 3.10
_STDOUT, _STDERR = "stdout", "stderr"
# The signals a child starts with at their default action (none can set SIGKILL or SIGSTOP).
_DEFAULTED = _signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP}


class Outcome:
    """What happened to one child.

    `status` is the exit code, or minus the signal number that ended it, or
    None when the child could not be reaped (stuck after SIGKILL).
    `segments` is the kept output as (stream name, bytes) in arrival order;
    `dropped` counts the output bytes beyond the cap.
    """

    __slots__ = ("dropped", "duration", "segments", "status", "timed_out")

    def __init__(
        self,
        status: int | None,
        timed_out: bool,
        duration: float,
        segments: list[tuple[str, bytearray]],
        dropped: int,
    ) -> None:
        self.status = status
        self.timed_out = timed_out
        self.duration = duration
        self.segments = segments
        self.dropped = dropped

    def said(self, stream: str | None = None) -> str:
        """The kept output (of `stream` only, if given) as one line of words, for messages."""
        data = b" ".join(data for name, data in self.segments if stream in (None, name))
        return " ".join(data.decode(errors="replace").split())

    @property
    def ending(self) -> str:
        """How the child ended, in words: `exit 0`, `killed by SIGKILL`."""
        if self.status is None:
            return "still alive after SIGKILL, left behind"
        if self.status < 0:
            return f"killed by {signal_name(-self.status)}"
        return f"exit {self.status}"


class Stdin:
    """The hook's stdin, read once and replayed to every child.

    The bytes live in an anonymous memory file; each child gets its own
    open file description on it (own offset), so a child that reads
    nothing, or a descendant still reading, never disturbs the next one,
    and no writer has to wait for a child to read.
    """

    def __init__(self, source_fd: int | None) -> None:
        """Read all of `source_fd` (None: nothing).

        Raises OSError; readfile.RefusedFile past DOMAIN_XML_MAX bytes, the most
        the hook takes for a domain XML, so that an endless stream cannot fill memory.
        """
        self._fd = os.memfd_create("kvmhook-stdin")
        size = 0
        try:
            while source_fd is not None:
                chunk = os.read(source_fd, _READ_SIZE)
                if not chunk:
                    break
                size += len(chunk)
                if size > DOMAIN_XML_MAX:
                    raise too_large("stdin", DOMAIN_XML_MAX)
                write_all(self._fd, chunk)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def holding(cls, data: bytes) -> Stdin:
        """A Stdin replaying `data` (a custom script's rewrite of the domain XML)."""
        stdin = cls(None)
        write_all(stdin._fd, data)
        return stdin

    def open(self) -> int:
        """A new read-only descriptor on the bytes, positioned at the start."""
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> bytes:
        """All the bytes (for callers that need to inspect them)."""
        return os.pread(self._fd, os.fstat(self._fd).st_size, 0)

    def close(self) -> None:
        os.close(self._fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Output:
    """Output kept up to a byte cap, in arrival order; the rest only counted."""

    def __init__(self, cap: int) -> None:
        self.segments: list[tuple[str, bytearray]] = []
        self.room = cap
        self.dropped = 0

    def add(self, stream: str, data: bytes) -> None:
        keep = min(len(data), self.room)
        if keep and not (self.segments and self.segments[-1][0] == stream):
            if len(self.segments) < _MAX_SEGMENTS:
                self.segments.append((stream, bytearray()))
            else:
                keep = 0
        if keep:
            self.segments[-1][1].extend(data[:keep])
            self.room -= keep
        self.dropped += len(data) - keep


def run_tool(argv: list[str], timeout: float, cap: int = 64 * 1024) -> Outcome:
    """Run a command looked up on PATH, stdin from /dev/null (the CLI's helpers, not the hook).

    Raises FileNotFoundError when argv[0] is not on PATH, OSError when it cannot start.
    """
    import shutil

    tool = shutil.which(argv[0])
    if tool is None:
        raise FileNotFoundError(2, "not found on PATH", argv[0])
    with open(os.devnull, "rb") as nothing:
        return run([tool, *argv[1:]], nothing.fileno(), timeout, 5, cap)


def signal_name(number: int) -> str:
    """`SIGKILL` for 9, and so on."""
    for name in dir(_signal):
        if name.startswith("SIG") and "_" not in name and getattr(_signal, name) == number:
            return name
    return f"signal {number}"


def run(
    argv: list[str],
    stdin_fd: int,
    timeout: float,
    grace: float,
    cap: int,
    extra_env: Mapping[str, str] | None = None,
) -> Outcome:
    """Run `argv` to completion or to its deadline, `timeout` seconds from now.

    The child gets the hook's environment, plus `extra_env`.

    Raises OSError when the child cannot be started (not executable, no such
    file, bad interpreter); the error's strerror says why.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            _environment() if extra_env is None else {**_environment(), **extra_env},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            setsid=True,
            # Every signal at its default, as libvirt starts the hook itself: Python
            # ignores SIGPIPE and SIGXFSZ, and `kvmhook hooks run` may be started by nohup
            # (SIGHUP ignored); and no signal blocked (a caller may be deferring SIGTERM),
            # so that a timeout's SIGTERM reaches it.
            setsigdef=_DEFAULTED,
            setsigmask=(),
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return _supervise(pid, {out_r: _STDOUT, err_r: _STDERR}, timeout, grace, _Output(cap))


def _supervise(
    pid: int, pipes: dict[int, str], timeout: float, grace: float, output: _Output
) -> Outcome:
    start = time.monotonic()
    poller = select.poll()
    for fd in pipes:
        _widen(fd)
        poller.register(fd, select.POLLIN)
    pidfd = _pidfd(pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = start + timeout  # next escalation: TERM, then KILL, then give up
    stage = 0  # 0 running, 1 TERM sent, 2 KILL sent
    exited_at = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and _has_exited(pid):
                exited_at = now
            if exited_at is not None:
                if not pipes or now >= exited_at + _LINGER:
                    break
                wait = exited_at + _LINGER - now
            elif now >= deadline:
                if stage == 2:
                    break  # the leader survived SIGKILL (stuck in the kernel)
                stage += 1
                _killpg(pid, _signal.SIGTERM if stage == 1 else _signal.SIGKILL)
                deadline = now + (grace if stage == 1 else _KILL_WAIT)
                continue
            else:
                wait = deadline - now
                if pidfd is None:
                    wait = min(wait, _TICK)
            if pidfd is not None and exited_at is not None:
                poller.unregister(pidfd)
                os.close(pidfd)
                pidfd = None
            for fd, _event in poller.poll(int(min(wait, 60.0) * 1000) + 1):
                if fd in pipes:
                    _read(fd, pipes, poller, output)
        if stage:
            # Whatever is left of the timed-out group goes, before the leader
            # is reaped and its group id freed for reuse.
            _killpg(pid, _signal.SIGKILL)
        status = _reap(pid, exited_at is not None)
    finally:
        for fd in pipes:
            os.close(fd)
        if pidfd is not None:
            os.close(pidfd)
    return Outcome(
        status,
        stage > 0,
        time.monotonic() - start,
        output.segments,
        output.dropped,
    )


def _read(fd: int, pipes: dict[int, str], poller: select.poll, output: _Output) -> None:
    data = os.read(fd, _READ_SIZE)
    if data:
        output.add(pipes[fd], data)
    else:
        poller.unregister(fd)
        os.close(fd)
        del pipes[fd]


def _environment() -> Mapping[str, str]:
    """The hook's environment as it started, for its children.

    With no locale set, Python's start-up locale coercion (PEP 538) adds
    LC_CTYPE=C.UTF-8 to os.environ, and not even -I stops it. libvirt sets
    LC_ALL=C, which prevents it; a hook run by hand needs it undone.
    """
    if "LC_CTYPE" not in os.environ:
        return os.environ
    with open("/proc/self/environ", "rb") as startup:
        variables = startup.read().split(b"\0")
    if any(variable.startswith(b"LC_CTYPE=") for variable in variables):
        return os.environ
    return {name: value for name, value in os.environ.items() if name != "LC_CTYPE"}


def _widen(fd: int) -> None:
    """Ask for a larger pipe buffer: fewer wake-ups for chatty children."""
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1024 * 1024)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for unprivileged users: keep the default


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # kernel before 5.3 or a seccomp filter: poll with a tick instead


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie, which keeps its pid and group id taken.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _killpg(pgid: int, signal: int) -> None:
    try:
        os.killpg(pgid, signal)
    except ProcessLookupError:
        pass  # the whole group is gone already


def _reap(pid: int, exited: bool) -> int | None:
    reaped, status = os.waitpid(pid, 0 if exited else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if reaped else None
