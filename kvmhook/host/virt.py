"""The one module that calls libvirt (libvirt-python).

Everything else goes through these few functions, so the rest of the project
sees only `VirtError` (never `libvirt.libvirtError`) and plain values. The
qemu hook must never import this module: libvirtd waits for the hook, and a
call back into it deadlocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt

from kvmhook.errors import DomainNotFoundError, VirtError

# Re-exported so that the migration policy builds its flags without importing libvirt.
MIGRATE_LIVE = libvirt.VIR_MIGRATE_LIVE
MIGRATE_OFFLINE = libvirt.VIR_MIGRATE_OFFLINE
MIGRATE_PEER2PEER = libvirt.VIR_MIGRATE_PEER2PEER
MIGRATE_PERSIST_DEST = libvirt.VIR_MIGRATE_PERSIST_DEST
MIGRATE_UNDEFINE_SOURCE = libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
MIGRATE_TLS = libvirt.VIR_MIGRATE_TLS
MIGRATE_AUTO_CONVERGE = libvirt.VIR_MIGRATE_AUTO_CONVERGE
MIGRATE_POSTCOPY = libvirt.VIR_MIGRATE_POSTCOPY
PARAM_BANDWIDTH = libvirt.VIR_MIGRATE_PARAM_BANDWIDTH  # MiB/s


def _silence(_context: object, _error: object) -> None:
    """libvirt's default handler prints every error on stderr ("libvirt: ... error : ...")."""


# Errors reach the operator once, as the message of a VirtError, not twice.
libvirt.registerErrorHandler(_silence, None)


@dataclass(frozen=True)
class JobProgress:
    """A running job's figures from libvirt's job stats."""

    processed: int  # bytes sent so far
    remaining: int  # bytes still to send (grows when the guest dirties memory)
    bytes_per_second: int  # QEMU's current transfer rate; 0 when not reported


@contextlib.contextmanager
def connect(uri: str, read_only: bool = False) -> Iterator[libvirt.virConnect]:
    """A connection to `uri`, closed on exit."""
    try:
        conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise VirtError(f"cannot connect to {uri}: {error}") from None
    try:
        yield conn
    finally:
        conn.close()


def check_connection(uri: str) -> None:
    """Open and close a read-only connection to `uri`; raises VirtError with libvirt's reason.

    For `qemu+tls://HOST/system` this is a full TLS handshake with this host's
    CA and client certificate (/etc/pki/CA, /etc/pki/libvirt), the same files
    the local libvirtd presents when it connects peer to peer.
    """
    with connect(uri, read_only=True):
        pass


def library_version() -> int:
    """libvirt's version as one number (major * 1,000,000 + minor * 1,000 + micro)."""
    return libvirt.getVersion()


def lookup(conn: libvirt.virConnect, name: str) -> Guest:
    """The guest called `name` on `conn`."""
    try:
        return Guest(conn.lookupByName(name))
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainNotFoundError(f"no guest named {name!r} on {conn.getURI()}") from None
        raise VirtError(f"cannot look up guest {name!r}: {error}") from None


class Guest:
    """One libvirt domain, with the calls a migration needs."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self._domain = domain
        self.name: str = domain.name()

    def is_active(self) -> bool:
        try:
            return bool(self._domain.isActive())
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot read the state of {self.name}: {error}") from None

    def migrate(self, dest_uri: str, params: dict[str, int], flags: int) -> None:
        """Migrate peer to peer to `dest_uri`; blocks until libvirt has finished or failed."""
        try:
            self._domain.migrateToURI3(dest_uri, params, flags)
        except libvirt.libvirtError as error:
            raise VirtError(f"migration of {self.name} to {dest_uri} failed: {error}") from None

    def progress(self) -> JobProgress | None:
        """The current job's progress, or None when there is none to show.

        Stats only decorate the wait: a job that is starting or has just ended,
        or a driver without job stats, must not disturb the migration itself.
        """
        try:
            stats = self._domain.jobStats()
        except libvirt.libvirtError:
            return None
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        return JobProgress(
            processed=stats.get(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED, 0),
            remaining=stats.get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING, 0),
            bytes_per_second=stats.get(libvirt.VIR_DOMAIN_JOB_MEMORY_BPS, 0),
        )

    def live_xml(self) -> bytes:
        """The running definition, without secrets."""
        try:
            return self._domain.XMLDesc(0).encode()
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot read the definition of {self.name}: {error}") from None

    def persistent_xml(self) -> bytes:
        """The stored definition with its secrets (VNC passwords...): what a redefinition
        must keep."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        try:
            return self._domain.XMLDesc(flags).encode()
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot read the stored definition of {self.name}: {error}") from None

    def redefine(self, xml: bytes) -> None:
        """Store `xml` as the guest's persistent definition (the running guest is untouched)."""
        try:
            self._domain.connect().defineXML(xml.decode())
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot store the definition of {self.name}: {error}") from None

    def start_postcopy(self) -> None:
        """Switch the running migration (started with MIGRATE_POSTCOPY) to post-copy: the
        guest runs on the destination from now on, its pages fetched as it touches them."""
        try:
            self._domain.migrateStartPostCopy(0)
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot switch {self.name} to post-copy: {error}") from None

    def abort(self) -> None:
        """Abort the running job (the migration); the guest resumes on this host."""
        try:
            self._domain.abortJob()
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot abort the job of {self.name}: {error}") from None


@dataclass(frozen=True)
class GuestSize:
    """What a running guest takes of its host, as capacity counts it."""

    name: str
    vcpus: int  # the vCPUs it has now (hot-plugging more is an explicit act)
    # Bytes: its maximum memory, not the balloon's current size. The balloon is the
    # host's lever for over-committing memory; counting it would apply the factor twice.
    memory: int
    # A virtio memory balloon: what over-committing memory needs (admin guide, "Requirements
    # for Over-Provisioning"); `<memballoon model='none'/>` has none.
    balloon: bool = True


def running_guests(uri: str) -> list[GuestSize]:
    """The guests running on `uri`, sorted by name, read over a read-only connection."""
    with connect(uri, read_only=True) as conn:
        return _running(conn, uri)


def _running(conn: libvirt.virConnect, uri: str) -> list[GuestSize]:
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as error:
        raise VirtError(f"cannot list the guests on {uri}: {error}") from None
    sizes = [size for size in map(guest_size, domains) if size is not None]
    return sorted(sizes, key=lambda size: size.name)


def guest_size(domain: libvirt.virDomain) -> GuestSize | None:
    """The guest's size, or None when it went away since it was listed."""
    try:
        _state, max_kib, _kib, vcpus, _cpu_time = domain.info()
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError(f"cannot read the size of {domain.name()}: {error}") from None
    xml = _live_xml_or_none(domain)
    if xml is None:
        return None
    return GuestSize(
        name=domain.name(), vcpus=vcpus, memory=max_kib * 1024, balloon=has_balloon(xml)
    )


def has_balloon(xml: str | bytes) -> bool:
    """Whether the domain `xml` has a virtio memory balloon (libvirt adds one unless told
    `<memballoon model='none'/>`)."""
    from xml.etree import ElementTree

    models = [
        element.get("model", "")
        for element in ElementTree.fromstring(xml).iterfind("./devices/memballoon")
    ]
    return any(model.startswith("virtio") for model in models)


def host_memory(uri: str) -> tuple[int, list[GuestSize]]:
    """The physical memory (bytes) of the host behind `uri` and the guests running there,
    over one read-only connection: what a drain needs to know of a peer's capacity."""
    with connect(uri, read_only=True) as conn:
        return _physical_memory(conn, uri), _running(conn, uri)


def _physical_memory(conn: libvirt.virConnect, uri: str) -> int:
    """The node's memory stats' `total` (MemTotal, what psutil reports for this host), else
    getInfo's MiB for a driver without node memory stats (the test driver)."""
    try:
        return int(conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"]) * 1024
    except (libvirt.libvirtError, KeyError):
        pass
    try:
        return int(conn.getInfo()[1]) * 1024 * 1024
    except libvirt.libvirtError as error:
        raise VirtError(f"cannot read the memory of {uri}: {error}") from None


# Where a guest interface names its tap device in the live definition.
_TAPS = "./devices/interface/target"


def guests_by_tap(uri: str) -> dict[str, str]:
    """{tap device: guest name} for the interfaces of the guests running on `uri`, read over
    a read-only connection; a guest gone since it was listed is left out."""
    from xml.etree import ElementTree

    with connect(uri, read_only=True) as conn:
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot list the guests on {uri}: {error}") from None
        found = {}
        for domain in domains:
            xml = _live_xml_or_none(domain)
            targets = [] if xml is None else ElementTree.fromstring(xml).iterfind(_TAPS)
            found.update({target.get("dev", ""): domain.name() for target in targets})
    found.pop("", None)
    return found


def _live_xml_or_none(domain: libvirt.virDomain) -> str | None:
    """The live definition of `domain`, or None when it went away since it was listed."""
    try:
        return domain.XMLDesc(0)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError(f"cannot read the definition of {domain.name()}: {error}") from None


# QMP, through libvirt's monitor passthrough: the only way libvirt offers to reach a running
# QEMU's display-reload. libvirt marks each guest it is used on "tainted: custom-monitor".
_QUERY_VNC = {"execute": "query-vnc-servers"}
_RELOAD_VNC = {"execute": "display-reload", "arguments": {"type": "vnc", "tls-certs": True}}


def reload_consoles(uri: str) -> dict[str, str | None]:
    """Make each running guest on `uri` whose VNC console uses TLS re-read its certificate
    files: {guest: None when reloaded, else why not}. Guests without a VNC console are not
    asked anything; those whose VNC has no TLS are left out after asking."""
    with connect(uri) as conn:
        try:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as error:
            raise VirtError(f"cannot list the guests on {uri}: {error}") from None
        done: dict[str, str | None] = {}
        for domain in domains:
            xml = _live_xml_or_none(domain)
            if xml is None or not any(f"<graphics type={q}vnc{q}" in xml for q in "'\""):
                continue
            try:
                if _uses_tls(_monitor(domain, _QUERY_VNC)):
                    _monitor(domain, _RELOAD_VNC)
                    done[domain.name()] = None
            except VirtError as error:
                done[domain.name()] = str(error)
    return done


def _uses_tls(servers: object) -> bool:
    """Whether query-vnc-servers' answer has a VNC server authenticating with VeNCrypt (TLS)."""
    entries = (
        [server for server in servers if isinstance(server, dict)]
        if isinstance(servers, list)
        else []
    )
    listeners = [entry for server in entries for entry in [server, *server.get("server", [])]]
    return any(isinstance(entry, dict) and entry.get("auth") == "vencrypt" for entry in listeners)


def _monitor(domain: libvirt.virDomain, command: dict) -> object:
    """The `return` of one QMP command; VirtError saying why when QEMU or libvirt refuses."""
    import json

    import libvirt_qemu

    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps(command), 0))
    except libvirt.libvirtError as error:
        if error.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise VirtError("the guest went away") from None
        raise VirtError(str(error)) from None
    problem = reply.get("error") if isinstance(reply, dict) else {"desc": "no JSON object"}
    if problem is None:
        return reply.get("return")
    if problem.get("class") == "CommandNotFound":
        raise VirtError(f"its QEMU has no {command['execute']} (QEMU 6.0 or later has)")
    raise VirtError(f"QEMU refused {command['execute']}: {problem.get('desc')}")
