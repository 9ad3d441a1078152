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
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Optional, TextIO

from kvmhook.certs import tls
from kvmhook.errors import MigrationAbortedError, MigrationError, NotSecuredError, VirtError
from kvmhook.host import virt

POLL_SECONDS = 0.5
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


def make_plan(
    dest_host: str, live: bool = True, bandwidth: int | None = None, allow_insecure: bool = False
) -> Plan:
    """The migration to `dest_host`; `bandwidth` in MiB/s. Raises MigrationError for a bad host."""
    host = _uri_host(dest_host)
    scheme = "qemu+tcp" if allow_insecure else "qemu+tls"
    return Plan(
        dest_host=dest_host,
        dest_uri=f"{scheme}://{host}/system",
        flags=flags(live, secure=not allow_insecure),
        params={} if bandwidth is None else {virt.PARAM_BANDWIDTH: bandwidth},
        live=live,
        secure=not allow_insecure,
    )


def flags(live: bool, secure: bool) -> int:
    """libvirt's migration flags: live (or offline) and, when `secure`, QEMU's stream over TLS."""
    # Peer to peer is what makes migrateToURI3 take a libvirt URI for the destination.
    common = virt.MIGRATE_PEER2PEER | virt.MIGRATE_PERSIST_DEST | virt.MIGRATE_UNDEFINE_SOURCE
    # A shut-off guest has no memory to send, so nothing to converge.
    mode = virt.MIGRATE_LIVE | virt.MIGRATE_AUTO_CONVERGE if live else virt.MIGRATE_OFFLINE
    return common | mode | (virt.MIGRATE_TLS if secure else 0)


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
) -> None:
    """Migrate the guest `name` from `source_uri` as planned, refusing insecure ends first."""
    with virt.connect(source_uri) as conn:
        guest = virt.lookup(conn, name)
        check_state(guest, plan)
        if plan.secure:
            refuse_unless_secured(plan, local_check, dest_check)
        run(guest, plan, progress, timeout)
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


def run(
    guest: virt.Guest,
    plan: Plan,
    progress: Progress,
    timeout: float | None,
    poll: float = POLL_SECONDS,
) -> None:
    """Migrate `guest` as planned, showing progress; abort after `timeout` s or on Ctrl-C."""
    # migrateToURI3 blocks until the end: it runs in a worker while this thread
    # reads the job's progress and keeps the power to abort it.
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(guest.migrate, plan.dest_uri, plan.params, plan.flags)
        reason = _watch(job, guest, progress, timeout, poll)
        if reason is not None:
            _abort(job, guest, plan, reason)
        job.result()


def _watch(
    job: futures.Future[None],
    guest: virt.Guest,
    progress: Progress,
    timeout: float | None,
    poll: float,
) -> str | None:
    """Wait for the job while showing progress; the reason to abort it, or None once it ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not futures.wait([job], timeout=poll).done:
            if deadline is not None and time.monotonic() >= deadline:
                return f"timed out after {timeout:g} s"
            progress.update(guest.progress())
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        progress.finish()
    return None


def _abort(job: futures.Future[None], guest: virt.Guest, plan: Plan, reason: str) -> None:
    """Abort the job and wait for it; raise MigrationAbortedError unless it had succeeded anyway."""
    try:
        guest.abort()
    except VirtError:
        pass  # the job may have ended since the last poll: its own outcome says what happened
    error = job.exception()
    if error is None:
        return
    where = "keeps running on this host" if plan.live else "stays defined on this host"
    raise MigrationAbortedError(
        f"migration of {guest.name} {reason}: aborted, the guest {where} ({error})"
    )


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
