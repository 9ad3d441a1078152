"""Live migration to another KVM host: what libvirt is asked to do, and when to refuse.

A secured host migrates only over TLS, both channels: the control channel
goes over `qemu+tls://DEST/system` (port 16514) and VIR_MIGRATE_TLS has QEMU
encrypt the memory stream as well (the reference agent leaves the latter in
clear text). The migration is peer to peer: this host's libvirtd connects to
the destination's with its own client certificate, so a migration does not
depend on the machine or user running this command.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Optional, TextIO

from kvmhook import events
from kvmhook.certs import tls
from kvmhook.errors import (
    MigrationAbortedError,
    MigrationError,
    MigrationTimedOutError,
    NotSecuredError,
    VirtError,
)
from kvmhook.host import virt

POLL_SECONDS = 0.5
# --on-timeout: what a migration does when its --timeout (the drain's --guest-timeout) is
# reached: abort it (the guest stays here), or switch it to post-copy (it finishes there).
ABORT = "abort"
POSTCOPY = "postcopy"
ON_TIMEOUT = (ABORT, POSTCOPY)
POSTCOPY_RISK = (
    "post-copy: the guest now runs on the destination while its memory is still being"
    " fetched from this host; if the network between them fails before it ends, the guest"
    " is lost"
)
PLAIN_EVERY_SECONDS = 5.0
INSECURE_WARNING = (
    "WARNING: --allow-insecure: migrating over qemu+tcp without TLS. The guest's memory"
    " (keys, passwords, everything in its RAM) crosses the network in CLEAR TEXT."
)

# Why this host is not secured, or None when it is.
LocalCheck = Callable[[], Optional[str]]
# Why the destination (given its qemu+tls URI) is not secured, or None when it is.
DestinationCheck = Callable[[str], Optional[str]]

# A host name, IPv4 address or bracketed IPv6 address, with an optional port.
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$")


@dataclass(frozen=True)
class Plan:
    """What libvirt will be asked: where to, with which flags and parameters."""

    dest_host: str
    dest_uri: str
    flags: int
    params: dict[str, int]
    live: bool
    secure: bool
    postcopy: bool = False  # may switch to post-copy (--on-timeout postcopy)


def make_plan(
    dest_host: str,
    live: bool = True,
    bandwidth: int | None = None,
    allow_insecure: bool = False,
    postcopy: bool = False,
) -> Plan:
    """The migration to `dest_host`; `bandwidth` in MiB/s; `postcopy`: started so that it
    can switch to post-copy. Raises MigrationError for a bad host, or post-copy offline."""
    host = _uri_host(dest_host)
    if postcopy and not live:
        raise MigrationError("post-copy is for a live migration, not --offline")
    scheme = "qemu+tcp" if allow_insecure else "qemu+tls"
    return Plan(
        dest_host=dest_host,
        dest_uri=f"{scheme}://{host}/system",
        flags=flags(live, secure=not allow_insecure, postcopy=postcopy),
        params={} if bandwidth is None else {virt.PARAM_BANDWIDTH: bandwidth},
        live=live,
        secure=not allow_insecure,
        postcopy=postcopy,
    )


def flags(live: bool, secure: bool, postcopy: bool = False) -> int:
    """libvirt's migration flags: live (or offline) and, when `secure`, QEMU's stream over TLS;
    `postcopy` adds VIR_MIGRATE_POSTCOPY (the switch itself is migrateStartPostCopy)."""
    # Peer to peer is what makes migrateToURI3 take a libvirt URI for the destination.
    common = virt.MIGRATE_PEER2PEER | virt.MIGRATE_PERSIST_DEST | virt.MIGRATE_UNDEFINE_SOURCE
    # A shut-off guest has no memory to send, so nothing to converge. Auto-converge stays on
    # with post-copy: it throttles the guest until the switch, which may then never be needed.
    mode = virt.MIGRATE_LIVE | virt.MIGRATE_AUTO_CONVERGE if live else virt.MIGRATE_OFFLINE
    extra = virt.MIGRATE_POSTCOPY if postcopy and live else 0
    return common | mode | extra | (virt.MIGRATE_TLS if secure else 0)


def _uri_host(host: str) -> str:
    if host.count(":") > 1 and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address: a URI needs it bracketed
    if not _HOST.match(host):
        raise MigrationError(f"not a host name or address: {host!r}")
    return host


def migrate(
    name: str,
    plan: Plan,
    progress: Progress,
    *,
    source_uri: str,
    timeout: float | None,
    local_check: LocalCheck,
    dest_check: DestinationCheck,
    limits: Limits | None = None,
) -> None:
    """Migrate the guest `name` from `source_uri` as planned, refusing insecure ends first;
    at `timeout` it is aborted, or switched to post-copy when the plan allows it (see run)."""
    with virt.connect(source_uri) as conn:
        guest = virt.lookup(conn, name)
        check_state(guest, plan)
        if plan.secure:
            refuse_unless_secured(plan, local_check, dest_check)
        run(guest, plan, progress, timeout, limits=limits)
    persist_live_bridges(name, plan.dest_uri, progress)


def persist_live_bridges(name: str, dest_uri: str, progress: Progress) -> None:
    """Give the guest's persistent definition at `dest_uri` the bridges of its live one.

    The destination's hook renames bridges at `migrate begin` (kvmhook.net.bridges)
    in the live definition only; PERSIST_DEST stores the source's definition
    as it was, so without this the guest's next cold start there asks for a
    bridge that host does not have. The migration has happened whatever this
    finds: a failure is said on `progress`, never raised.
    """
    from xml.etree import ElementTree

    try:
        with virt.connect(dest_uri) as conn:
            _redefine_with_live_bridges(conn, name, progress)
    except (VirtError, ElementTree.ParseError) as error:
        progress.note(
            f"WARNING: {name} migrated, but its persistent definition on the destination may "
            f"name bridges that host lacks ({error}): check `virsh dumpxml --inactive {name}` there"
        )


def check_state(guest: virt.Guest, plan: Plan) -> None:
    """Raise MigrationError when the guest's state does not fit a live or offline migration."""
    active = guest.is_active()
    if plan.live and not active:
        raise MigrationError(f"{guest.name} is not running: use --offline to move a shut-off guest")
    if not plan.live and active:
        # An offline migration moves only the definition: the running guest would
        # stay here, undefined, while the destination could start a second copy.
        raise MigrationError(f"{guest.name} is running: --offline is for a shut-off guest")


def refuse_unless_secured(
    plan: Plan, local_check: LocalCheck, dest_check: DestinationCheck
) -> None:
    """Raise NotSecuredError naming the side that is not secured and why."""
    problem = local_check()
    if problem is not None:
        raise NotSecuredError(
            f"refusing to migrate: this host is not secured ({problem});"
            " see kvmhook tls status, or pass --allow-insecure"
        )
    problem = dest_check(plan.dest_uri)
    if problem is not None:
        raise NotSecuredError(
            f"refusing to migrate: destination {plan.dest_host} is not secured ({problem});"
            " pass --allow-insecure to migrate in clear text"
        )


def local_tls_problem() -> str | None:
    """Why this host is not secured, from `kvmhook tls status` with a real handshake."""
    status = tls.status(handshake=True)
    if status.secured:
        return None
    return "; ".join(f"{item.name}: {item.detail}" for item in status.items if not item.ok)


def dest_tls_problem(dest_uri: str) -> str | None:
    """Why a TLS connection to `dest_uri` with our CA and client certificate fails, or None."""
    try:
        virt.check_connection(dest_uri)
    except VirtError as error:
        return str(error)
    return None


@dataclass(frozen=True)
class Limits:
    """What bounds a migration besides its own timeout (the drain's): `hard_timeout`
    seconds after which it is aborted whatever --on-timeout says (the drain's --timeout),
    and `stop`, an event that aborts it when set (the drain interrupted)."""

    hard_timeout: float | None = None
    stop: threading.Event | None = None


def run(
    guest: virt.Guest,
    plan: Plan,
    progress: Progress,
    timeout: float | None,
    poll: float = POLL_SECONDS,
    limits: Limits | None = None,
) -> None:
    """Migrate `guest` as planned, showing progress.

    At `timeout` s the job is aborted (MigrationTimedOutError) or, for a plan
    made with `postcopy`, switched to post-copy with migrateStartPostCopy and
    waited for until it ends. Ctrl-C (or `limits.stop`) and `limits.hard_timeout`
    abort it (MigrationAbortedError) while it is still pre-copy; once switched,
    nothing can abort it: the guest already runs on the destination.
    """
    limits = limits or Limits()
    # migrateToURI3 blocks until the end: it runs in a worker while this thread
    # reads the job's progress and keeps the power to abort it.
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(guest.migrate, plan.dest_uri, plan.params, plan.flags)
        watch = _Watch(job, guest, plan, progress, timeout, limits)
        reason = watch.wait(poll)
        if reason is not None:
            _abort(job, guest, plan, reason, timed_out=watch.own_timeout)
        try:
            job.result()
        except VirtError as error:
            if watch.switched:
                raise VirtError(
                    f"{error}; it had switched to post-copy: check where {guest.name} runs"
                    " (virsh list on both hosts), it may be paused or lost"
                ) from None
            raise


class _Watch:
    """Waits for a migration job, showing its progress; decides when to abort or switch."""

    def __init__(
        self,
        job: futures.Future[None],
        guest: virt.Guest,
        plan: Plan,
        progress: Progress,
        timeout: float | None,
        limits: Limits,
    ) -> None:
        self.job, self.guest, self.plan, self.progress = job, guest, plan, progress
        self.timeout, self.limits = timeout, limits
        began = time.monotonic()
        self.switch_at = None if timeout is None else began + timeout
        hard = limits.hard_timeout
        self.hard_at = None if hard is None else began + hard
        self.timed_out = "" if timeout is None else f"timed out after {timeout:g} s"
        self.hard_out = "" if hard is None else f"timed out after {hard:g} s"
        self.switched = False
        self.own_timeout = False  # the reason to abort is `timeout`, not the drain's limits
        self._switch_error = ""

    def wait(self, poll: float) -> str | None:
        """The reason to abort the job, or None once it ended."""
        try:
            while True:
                try:
                    if futures.wait([self.job], timeout=poll).done:
                        return None
                    reason = self._check()
                    if reason is not None:
                        return reason
                    self.progress.update(self.guest.progress())
                except KeyboardInterrupt:
                    if not self.switched:
                        return "interrupted"
                    self.progress.note(
                        f"{self.guest.name}: in post-copy, which cannot be interrupted:"
                        " waiting for it to end"
                    )
        finally:
            self.progress.finish()

    def _check(self) -> str | None:
        if self.switched:
            return None
        now = time.monotonic()
        if self.limits.stop is not None and self.limits.stop.is_set():
            return "interrupted"
        if self.hard_at is not None and now >= self.hard_at:
            return self.hard_out
        if self.switch_at is None or now < self.switch_at:
            return None
        if not self.plan.postcopy:
            self.own_timeout = True
            return self.timed_out
        self._switch()
        return None

    def _switch(self) -> None:
        """migrateStartPostCopy; refused (the job not yet under way) it is tried at each poll."""
        try:
            self.guest.start_postcopy()
        except VirtError as error:
            if str(error) != self._switch_error:
                self._switch_error = str(error)
                self.progress.note(f"{error}: trying again")
            return
        self.switched = True
        events.emit(
            "migration.postcopy",
            guest=self.guest.name,
            host=self.plan.dest_host,
            after_s=self.timeout,
        )
        self.progress.note(f"{self.guest.name}: {self.timed_out}, switched to {POSTCOPY_RISK}")


def _abort(
    job: futures.Future[None], guest: virt.Guest, plan: Plan, reason: str, timed_out: bool
) -> None:
    """Abort the job and wait for it; raise MigrationAbortedError (MigrationTimedOutError for
    the migration's own timeout) unless it had succeeded anyway."""
    try:
        guest.abort()
    except VirtError:
        pass  # the job may have ended since the last poll: its own outcome says what happened
    error = job.exception()
    if error is None:
        return
    where = "keeps running on this host" if plan.live else "stays defined on this host"
    kind = MigrationTimedOutError if timed_out else MigrationAbortedError
    raise kind(f"migration of {guest.name} {reason}: aborted, the guest {where} ({error})")


def _redefine_with_live_bridges(
    conn: virt.libvirt.virConnect, name: str, progress: Progress
) -> None:
    from kvmhook.net import bridges

    guest = virt.lookup(conn, name)
    fixed = bridges.with_live_bridges(guest.persistent_xml(), guest.live_xml())
    if fixed is not None:
        guest.redefine(fixed)
        progress.note(f"{name}: its persistent definition there now names its live bridges")


class Progress:
    """A migration's progress: a bar redrawn in place on a terminal, else a line now and then."""

    def __init__(
        self,
        stream: TextIO,
        tty: bool,
        every: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._every = every
        self._clock = clock
        self._last_line: float | None = None
        self._bar_shown = False

    def update(self, job: virt.JobProgress | None) -> None:
        if job is None:
            return
        if self._tty:
            # \r returns to the start of the line, ESC[K clears what a longer bar left.
            self._stream.write(f"\r{bar(job)} {describe(job)}\x1b[K")
            self._bar_shown = True
        elif self._last_line is None or self._clock() - self._last_line >= self._every:
            self._last_line = self._clock()
            self._stream.write(f"progress: {describe(job)}\n")
        self._stream.flush()

    def note(self, line: str) -> None:
        """A line of its own, after the bar or the progress lines."""
        self.finish()
        self._stream.write(f"{line}\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the bar's line, so that what follows starts on a line of its own."""
        if self._bar_shown:
            self._stream.write("\n")
            self._stream.flush()
            self._bar_shown = False


class Board:
    """The progress of several migrations at once (a parallel drain), and the lines said
    around them: on a terminal one line per guest in flight, redrawn in place below the
    lines already said; otherwise plain lines (`progress: GUEST: ...` every few seconds
    per guest). Thread-safe: each migration updates its own line from its own thread."""

    def __init__(
        self,
        stream: TextIO,
        tty: bool,
        every: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._every = every
        self._clock = clock
        self._columns = columns or (lambda: shutil.get_terminal_size().columns)
        self._lock = threading.Lock()
        self._rows: dict[str, str] = {}  # guest -> its line, in the order they were sent
        self._last_line: dict[str, float] = {}
        self._drawn = 0  # lines of the table on the terminal, the cursor below them

    def line(self, guest: str, peer: str) -> Progress:
        """The progress of `guest`'s migration to `peer`: its line until it finishes."""
        with self._lock:
            self._rows[guest] = f"{guest} -> {peer}: starting"
            self._draw()
        return _BoardLine(self, guest, peer)

    def note(self, line: str) -> None:
        """A line of its own, above the guests in flight."""
        with self._lock:
            self._draw([line])

    def _update(self, guest: str, peer: str, job: virt.JobProgress) -> None:
        with self._lock:
            if self._tty:
                if guest in self._rows:
                    self._rows[guest] = f"{guest} -> {peer} {bar(job, 20)} {describe(job)}"
                    self._draw()
                return
            last = self._last_line.get(guest)
            if last is None or self._clock() - last >= self._every:
                self._last_line[guest] = self._clock()
                self._draw([f"progress: {guest}: {describe(job)}"])

    def _remove(self, guest: str) -> None:
        with self._lock:
            if self._rows.pop(guest, None) is not None:
                self._draw()

    def _draw(self, lines: list[str] | None = None) -> None:
        """Write `lines`; on a terminal, the table of guests in flight redrawn below them."""
        if not self._tty:
            self._stream.write("".join(f"{line}\n" for line in lines or ()))
            self._stream.flush()
            return
        # Up to the table's first line (ESC[nF), each line cleared to its end (ESC[K), and
        # whatever a longer table left below cleared (ESC[J).
        text = f"\x1b[{self._drawn}F" if self._drawn else "\r"
        # A table row that wrapped would take two lines and the redraw would climb too few:
        # rows are cut to the terminal's width (the lines said above it are not redrawn).
        width = max(self._columns() - 1, 20)
        rows = [*(lines or ()), *(row[:width] for row in self._rows.values())]
        text += "".join(f"{row}\x1b[K\n" for row in rows) + "\x1b[J"
        self._stream.write(text)
        self._stream.flush()
        self._drawn = len(self._rows)


class _BoardLine(Progress):
    """One guest's line of a Board, with the calls kvmhook.host.migrate.run makes."""

    def __init__(self, board: Board, guest: str, peer: str) -> None:
        self._board = board
        self._guest = guest
        self._peer = peer

    def update(self, job: virt.JobProgress | None) -> None:
        if job is not None:
            self._board._update(self._guest, self._peer, job)

    def note(self, line: str) -> None:
        self._board.note(line)

    def finish(self) -> None:
        """The migration ended: its line leaves the table."""
        self._board._remove(self._guest)


def describe(job: virt.JobProgress) -> str:
    """`42% 512.0 MiB sent, 700.5 MiB left, 110.3 MiB/s`."""
    return (
        f"{_percent(job):3d}% {_mib(job.processed)} sent, {_mib(job.remaining)} left,"
        f" {_mib(job.bytes_per_second)}/s"
    )


def bar(job: virt.JobProgress, width: int = 30) -> str:
    """`[############------------------]`: the share sent so far."""
    done = width * _percent(job) // 100
    return f"[{'#' * done}{'-' * (width - done)}]"


def _percent(job: virt.JobProgress) -> int:
    # Remaining grows when the guest dirties memory, so the share can go down too.
    total = job.processed + job.remaining
    return 100 * job.processed // total if total else 0


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
