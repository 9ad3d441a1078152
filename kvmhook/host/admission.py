"""Admission control: `prepare` refuses a guest that would push the host past its capacity.

Off unless `/etc/kvmhook/kvmhook.conf` says so (any value but `enforce` is off;
one other than `off` is logged as a `config:` record):

    [capacity]
    admission = enforce
    cpu_factor = 2
    mem_factor = 1

Capacity is `kvmhook capacity`'s, by the same formula (kvmhook.host.overprovision):
logical CPUs x cpu_factor against vCPUs, physical memory x mem_factor against
the guests' maximum memory (`<memory>`, not the balloon's `<currentMemory>`),
each factor 1 when unset. The factors
come from kvmhook.conf only: the hook runs while libvirtd waits for it and
must not wait on a controller over the network, so a host whose factors are
set per cluster in the controller needs the same figures in kvmhook.conf.

Where the running guests come from. The hook must not ask libvirt (libvirtd
is waiting for it: a call back deadlocks), so it reads what libvirt itself
keeps on disk: the QEMU driver's status files, `/run/libvirt/qemu/<name>.xml`
(`<domstatus><domain>...</domain>...</domstatus>`), one per running guest,
written by libvirtd (virtqemud with modular daemons) when the guest starts,
kept up to date while it runs (vCPU and memory hot-plug included) and removed
when it stops; libvirtd reads them back to reconnect after a restart. They
are the truth libvirt acts on, cost nothing to keep, and go away with a
reboot as the guests do. The arriving guest's own file (left by a crash, or
written early during its start) is skipped by name, so it is not counted
twice.

The alternative, a ledger the hook keeps itself (add on `prepare`, remove on
`release`), was not chosen: it drifts from the truth whenever a hook call is
missed (the package installed while guests run, a hook that failed or was
killed, libvirtd restarted without a `release`, a guest resized by
`virsh setvcpus`/`attach-device`), and a wrong ledger refuses guests for
capacity that is in fact free. It would also need locking and cleanup of its
own. Its one advantage, independence from libvirt's file layout, matters
less: the layout has been the same for a decade, and a file this module
cannot read is skipped (logged), never a reason to refuse.

Limits: hooks of different guests run concurrently, and a guest's status
file appears only once its start is under way, so two guests starting at the
same moment can both be admitted. This is a guard against over-committing by
mistake, not a reservation system.

A broken kvmhook.conf, an unreadable XML or any error here never blocks a
guest: it is logged and the guest is admitted. Standard library only;
xml.etree and kvmhook.host.overprovision are imported only when admission is enforced.
"""

from __future__ import annotations

import os

from kvmhook import paths
from kvmhook.hook import readfile

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

    from kvmhook.hook.hookconf import HookConf
    from kvmhook.hook.hooklog import HookLog

ENFORCE = "enforce"
OFF = "off"
MIB = 1024 * 1024
# libvirt's memory units (docs: formatdomain "Memory Allocation"), in bytes.
_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 10**3,
    "k": 2**10,
    "kib": 2**10,
    "mb": 10**6,
    "m": 2**20,
    "mib": 2**20,
    "gb": 10**9,
    "g": 2**30,
    "gib": 2**30,
    "tb": 10**12,
    "t": 2**40,
    "tib": 2**40,
    "pb": 10**15,
    "p": 2**50,
    "pib": 2**50,
    "eb": 10**18,
    "e": 2**60,
    "eib": 2**60,
}


class Admission:
    """The outcome of the check: the refusal, if any, and the domain XML to replay.

    `stdin_fd` is where the custom scripts' copy of the XML now comes from (a
    memory file holding what was read from the hook's stdin, or the original
    fd when nothing was read); the caller closes it with `close()`.
    """

    __slots__ = ("_owned", "refusal", "stdin_fd")

    def __init__(self, refusal: str | None, stdin_fd: int | None, owned: bool) -> None:
        self.refusal = refusal
        self.stdin_fd = stdin_fd
        self._owned = owned

    def close(self) -> None:
        if self._owned and self.stdin_fd is not None:
            os.close(self.stdin_fd)


def check(domain: str, conf: HookConf, stdin_fd: int | None, log: HookLog) -> Admission:
    """Whether `domain`, arriving with its XML on `stdin_fd`, fits; never raises.

    Call only when kvmhook.conf (`conf`) exists: the hook pays nothing more
    on hosts without one.
    """
    try:
        factors = _enforced_factors(conf, log)
    except Exception as error:  # whatever is wrong with the file, guests still start
        log.record("-", f"config: {error}; admission control off")
        return Admission(None, stdin_fd, owned=False)
    if factors is None:
        return Admission(None, stdin_fd, owned=False)
    if stdin_fd is None:
        log.record("-", f"admission: no domain XML for {domain} on stdin; admitted unchecked")
        return Admission(None, None, owned=False)
    try:
        xml, replay_fd = _read_and_keep(stdin_fd)
    except OSError as error:
        # Part of it may be read already: the scripts get none rather than the rest.
        log.record(
            "-",
            f"admission: cannot read the domain XML from stdin: {error.strerror}; "
            "admitted unchecked, scripts get none",
        )
        return Admission(None, None, owned=False)
    try:
        refusal = _refusal(domain, xml, factors, log)
    except Exception as error:  # a bug or a strange XML must not block a guest
        log.record("-", f"admission: cannot check {domain}: {error!r}; admitted unchecked")
        refusal = None
    return Admission(refusal, replay_fd, owned=True)


def _enforced_factors(conf: HookConf, log: HookLog) -> tuple[float, float, int] | None:
    """(cpu_factor, mem_factor, reserved memory bytes) when `[capacity] admission = enforce`;
    else None.

    Raises (ConfigError and the like) for a file that cannot be used.
    """
    if not conf.may_set("admission", OFF):
        return None  # off, without paying ~10 ms for importing configparser
    from kvmhook import config

    settings = conf.parsed()
    value = settings.get("capacity", "admission", fallback=OFF).strip()
    if value.lower() != ENFORCE:
        if value.lower() != OFF:
            log.record(
                "-",
                f"config: {settings.path}: [capacity] admission = {value}: "
                f"neither {ENFORCE} nor {OFF}; admission control off",
            )
        return None
    # config checks each factor's range (ConfigError), as for `kvmhook capacity`.
    cpu_factor, mem_factor = config.cpu_factor(settings), config.mem_factor(settings)
    reserved, _ = config.reserved_memory(settings)
    return (
        1.0 if cpu_factor is None else cpu_factor,
        1.0 if mem_factor is None else mem_factor,
        reserved,
    )


def _read_and_keep(fd: int) -> tuple[bytes, int]:
    """All of `fd` (the hook's stdin, read once), and a new descriptor replaying it from 0."""
    from kvmhook.hook import process

    stdin = process.Stdin(fd)
    try:
        return stdin.read(), stdin.open()
    finally:
        stdin.close()  # the replaying descriptor keeps the memory file alive


def _refusal(
    domain: str, xml: bytes, factors: tuple[float, float, int], log: HookLog
) -> str | None:
    """The message refusing `domain`, or None when it fits."""
    from xml.etree import ElementTree

    from kvmhook.host import overprovision

    element = ElementTree.fromstring(xml)
    vcpus, memory = size(element)
    used_vcpus, used_memory = _running(domain, log)
    cpu_factor, mem_factor, reserved = factors
    if mem_factor > 1 and not any(
        balloon.get("model", "").startswith("virtio")
        for balloon in element.iterfind("./devices/memballoon")
    ):
        # The admin guide's requirement for over-provisioning; the decision stays on capacity.
        log.record(
            "-",
            f"admission: warning: guest {domain} has no virtio memory balloon, which memory"
            f" factor {mem_factor:g} needs to reclaim its memory",
        )
    # The physical figures from os, as psutil reads them for `kvmhook capacity`: psutil
    # would cost the hook ~15 ms of imports.
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = overprovision.Resource(os.cpu_count() or 0, cpu_factor, used_vcpus)
    mem = overprovision.Resource(physical, mem_factor, used_memory, whole=True, reserved=reserved)
    if cpu.fits(vcpus) and mem.fits(memory):
        return None
    return (
        f"admission: guest {domain} needs {_vcpus(vcpus)} and {_mib(memory)} MiB;"
        f" this host has {_vcpus(cpu.free)} and {_mib(mem.free)} MiB free"
        f" of {_vcpus(cpu.capacity)} and {_mib(mem.capacity)} MiB"
        f" (cpu factor {cpu_factor:g}, memory factor {mem_factor:g}"
        + (f", {_mib(reserved)} MiB reserved for the host)" if reserved else ")")
    )


def size(domain: Element) -> tuple[int, int]:
    """(vCPUs, memory in bytes) of a `<domain>` element.

    vCPUs: `<vcpu current=N>` when set (the ones the guest has now), else
    `<vcpu>`'s count, 1 without one (libvirt's default). Memory: `<memory>`,
    the guest's maximum, in its unit (KiB by default).
    """
    vcpu = domain.find("vcpu")
    vcpus = 1
    if vcpu is not None:
        vcpus = int(vcpu.get("current") or (vcpu.text or "1").strip())
    memory = domain.find("memory")
    if memory is None or not (memory.text or "").strip():
        raise ValueError("no <memory> in the domain XML")
    unit = _UNITS[(memory.get("unit") or "KiB").lower()]
    return vcpus, int(memory.text.strip()) * unit


def _running(arriving: str, log: HookLog) -> tuple[int, int]:
    """(vCPUs, memory bytes) held by the running guests but `arriving`, from their status files."""
    from xml.etree import ElementTree

    directory = paths.qemu_status_dir()
    try:
        entries = [entry for entry in os.scandir(directory) if entry.name.endswith(".xml")]
    except FileNotFoundError:
        return 0, 0  # libvirtd has no guest running (or never ran)
    vcpus = memory = 0
    for entry in entries:
        if entry.name == arriving + ".xml" or not entry.is_file():
            continue
        try:
            # A guest's XML and libvirt's bookkeeping: the bound of a domain XML will do.
            root = ElementTree.fromstring(readfile.read(entry.path, readfile.DOMAIN_XML_MAX))
            domain = root.find("domain") if root.tag == "domstatus" else None
            if domain is None:
                raise ValueError("not a libvirt <domstatus> file")
            if domain.findtext("name") == arriving:
                continue
            guest_vcpus, guest_memory = size(domain)
        except OSError as error:
            log.record("-", f"admission: {entry.path} not counted: {error.strerror}")
            continue
        except (ValueError, KeyError, ElementTree.ParseError) as error:
            log.record("-", f"admission: {entry.path} not counted: {error}")
            continue
        vcpus += guest_vcpus
        memory += guest_memory
    return vcpus, memory


def _vcpus(count: float) -> str:
    return f"{count:g} vCPU" + ("" if count == 1 else "s")


def _mib(count: int) -> str:
    """Bytes as MiB: whole when they are, else two decimals."""
    return str(count // MIB) if count % MIB == 0 else f"{count / MIB:.2f}"
