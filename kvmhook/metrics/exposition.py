"""`kvmhook metrics`: this host's state as Prometheus metrics, for node_exporter's textfile
collector (one file, replaced atomically) or stdout.

Only local sources, never the controller (hundreds of hosts run this every
minute): the certificate files, the renewal record, the hook log, the
maintenance state file, kvmhook.conf and libvirt on this host. Every family
comes from one collector over a snapshot taken once per run, through
prometheus_client's own registry and writers (no hand-written exposition, and
no `_created` series changing on every run).

    kvmhook_certificate_not_after_timestamp_seconds{path}   each certificate file of the set
        (a CA file: its certificate that expires first)
    kvmhook_certificate_renewal_last_success_timestamp_seconds, ..._last_failure_... (0: never)
    kvmhook_hook_scripts_total{operation,result}, kvmhook_hook_vetoes_total{operation},
    kvmhook_hook_guests_refused_total{operation}
    kvmhook_maintenance_state{state} (1 for the current one),
    kvmhook_maintenance_state_since_timestamp_seconds
    kvmhook_cpu_cores, kvmhook_cpu_overprovisioning_factor, kvmhook_cpu_capacity_vcpus,
    kvmhook_cpu_used_vcpus, kvmhook_memory_physical_bytes, kvmhook_memory_overprovisioning_factor,
    kvmhook_memory_capacity_bytes, kvmhook_memory_used_bytes, kvmhook_guests_running,
    kvmhook_libvirt_up (0: the used figures are missing)
    kvmhook_info{version} 1
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvmhook import paths
from kvmhook.host import hoststate
from kvmhook.metrics import hookcounts

TEXTFILE = "kvmhook.prom"
LOCK_WAIT = 30.0  # a run takes well under a second; the timer runs every minute
Say = Callable[[str], None]


class Snapshot:
    """Everything one run exposes, read once."""

    def __init__(self) -> None:
        self.certificates: dict[str, float] = {}
        self.renewal: dict[str, float] = {}
        self.hooks = hookcounts.Counts()
        self.state = hoststate.ENABLED
        self.since = 0.0
        self.capacity: dict | None = None
        self.version = ""


def take(agent_dir: str, uri: str, persist: bool, say: Say) -> Snapshot:
    """Read every source; what cannot be read is said to `say` and left out. With `persist`,
    the hook log's position and counts are saved for the next run."""
    from importlib.metadata import version

    from kvmhook.certs import renewalrecord

    snapshot = Snapshot()
    snapshot.certificates = _certificates(agent_dir, say)
    snapshot.renewal = renewalrecord.read()
    snapshot.hooks = _hook_counts(persist, say)
    snapshot.state, _ = hoststate.read(say)
    try:
        snapshot.since = os.stat(paths.maintenance_state()).st_mtime
    except OSError:
        snapshot.since = 0.0
    snapshot.capacity = _capacity(uri, say)
    snapshot.version = version("kvmhook")
    return snapshot


def _hook_counts(persist: bool, say: Say) -> hookcounts.Counts:
    """The hook's counters; with `persist`, the position and counts saved for the next run,
    under a lock: two runs at once (the timer and an operator) take turns, each reading on
    from where the other stopped, so that no counter ever goes back.

    Raises LockError when another run holds the lock for LOCK_WAIT seconds.
    """
    if not persist:
        return hookcounts.count(say)[0]
    from kvmhook import locks
    from kvmhook.errors import LockError

    holder = "another `kvmhook metrics --textfile`"
    with locks.held(paths.metrics_lock(), holder, LOCK_WAIT, LockError, say):
        counts, start, reached = hookcounts.count(say)
        if reached is not None and (start is None or vars(start) != vars(reached)):
            try:
                hookcounts.save(counts, reached)
            except OSError as error:
                why = error.strerror
                say(f"cannot save the hook log position in {paths.metrics_state()}: {why}")
    return counts


def _certificates(agent_dir: str, say: Say) -> dict[str, float]:
    """{host path: not_after as unix time} of each certificate file of the set that exists."""
    import calendar

    from kvmhook.certs import certificates, pki
    from kvmhook.errors import KvmhookError

    sets = certificates.certificate_sets(agent_dir)
    cas = {ca for _name, _cert, _key, ca in sets}
    found = {}
    for path in dict.fromkeys(path for _, cert, _, ca in sets for path in (cert, ca)):
        try:
            with open(path, "rb") as source:
                certs = pki.load_certificates(source.read(), path)
        except FileNotFoundError:
            continue
        except (OSError, KvmhookError) as error:
            say(f"{path}: {getattr(error, 'strerror', None) or error}; not exposed")
            continue
        # A CA bundle: the certificate that expires first is the one that breaks first.
        first = certs if path in cas else certs[:1]
        ends = min(pki.not_after(cert) for cert in first)
        found[paths.on_host(path)] = float(calendar.timegm(ends.utctimetuple()))
    return found


def _capacity(uri: str, say: Say) -> dict | None:
    """`kvmhook capacity --json`'s figures, factors from kvmhook.conf (never the controller);
    None, said, when the host's figures or factors cannot be read."""
    from kvmhook.errors import KvmhookError
    from kvmhook.host import capacity, virt

    try:
        factors = capacity.choose_factors(None, None, lambda: None)
        host = capacity.host_figures()
    except KvmhookError as error:
        say(f"capacity: {error}; not exposed")
        return None
    try:
        guests = virt.running_guests(uri)
        up = True
    except KvmhookError as error:
        say(f"capacity: {error}; the used figures are left out")
        guests, up = [], False
    figures = capacity.Report(host, factors, guests).as_dict()
    figures["libvirt_up"] = up
    return figures


class _Collector:
    """prometheus_client's custom collector over one Snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        certs = GaugeMetricFamily(
            "kvmhook_certificate_not_after_timestamp_seconds",
            "When each certificate file of the host's set expires (a CA file: its first to).",
            labels=["path"],
        )
        for path, when in sorted(s.certificates.items()):
            certs.add_metric([path], when)
        yield certs
        for key, what in (("last_success", "renewed"), ("last_failure", "failed to renew")):
            yield GaugeMetricFamily(
                f"kvmhook_certificate_renewal_{key}_timestamp_seconds",
                f"When `kvmhook cert renew` last {what} (0: never).",
                value=s.renewal.get(key, 0.0),
            )
        yield from self._hooks()
        state = GaugeMetricFamily(
            "kvmhook_maintenance_state",
            "The host's maintenance state: 1 for the current one.",
            labels=["state"],
        )
        for name in hoststate.STATES:
            state.add_metric([name], 1.0 if name == s.state else 0.0)
        yield state
        yield GaugeMetricFamily(
            "kvmhook_maintenance_state_since_timestamp_seconds",
            "When the current maintenance state was recorded (0: never left Enabled).",
            value=s.since,
        )
        yield from self._capacity()
        info = GaugeMetricFamily("kvmhook_info", "kvmhook's version.", labels=["version"])
        info.add_metric([s.version], 1.0)
        yield info

    def _hooks(self) -> Iterator[Metric]:
        hooks = self.snapshot.hooks
        scripts = CounterMetricFamily(
            "kvmhook_hook_scripts",
            "Custom script runs by the qemu hook, by operation and result (from its log).",
            labels=["operation", "result"],
        )
        for (operation, result), n in sorted(hooks.scripts.items()):
            scripts.add_metric([operation, result], n)
        yield scripts
        for name, table, what in (
            ("kvmhook_hook_vetoes", hooks.vetoes, "Operations a failing script aborted"),
            ("kvmhook_hook_guests_refused", hooks.refusals, "Guests the hook refused"),
        ):
            family = CounterMetricFamily(name, f"{what}, by operation.", labels=["operation"])
            for operation, n in sorted(table.items()):
                family.add_metric([operation], n)
            yield family

    def _capacity(self) -> Iterator[Metric]:
        figures = self.snapshot.capacity
        if figures is None:
            return
        cpu, memory = figures["cpu"], figures["memory"]
        up = figures["libvirt_up"]
        for name, value, what, used in (
            ("kvmhook_cpu_cores", cpu["cores"], "Logical CPUs of the host.", False),
            ("kvmhook_cpu_overprovisioning_factor", cpu["factor"], "CPU factor.", False),
            ("kvmhook_cpu_capacity_vcpus", cpu["capacity"], "vCPUs the host offers.", False),
            ("kvmhook_cpu_used_vcpus", cpu["used"], "vCPUs of running guests.", True),
            ("kvmhook_memory_physical_bytes", memory["physical"], "Host memory.", False),
            ("kvmhook_memory_overprovisioning_factor", memory["factor"], "Memory factor.", False),
            ("kvmhook_memory_capacity_bytes", memory["capacity"], "Memory offered.", False),
            ("kvmhook_memory_used_bytes", memory["used"], "Memory of running guests.", True),
            ("kvmhook_guests_running", len(figures["guests"]), "Running guests.", True),
        ):
            if up or not used:
                yield GaugeMetricFamily(name, what, value=float(value))
        yield GaugeMetricFamily(
            "kvmhook_libvirt_up", "1 when libvirt on this host answered.", value=float(up)
        )


def registry(snapshot: Snapshot) -> CollectorRegistry:
    """A registry of its own (not the process's default) holding only the snapshot."""
    found = CollectorRegistry(auto_describe=False)
    found.register(_Collector(snapshot))  # type: ignore[arg-type]
    return found


def exposition(snapshot: Snapshot) -> bytes:
    return generate_latest(registry(snapshot))


def write(directory: str, snapshot: Snapshot) -> str:
    """DIR/kvmhook.prom, replaced atomically (prometheus_client writes beside and renames).

    Raises OSError when DIR is missing or cannot be written.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(2, "no such directory", directory)
    path = os.path.join(directory, TEXTFILE)
    try:
        write_to_textfile(path, registry(snapshot))
    except OSError:
        # prometheus_client writes PATH.<pid>.<thread> beside and renames it; some releases
        # (Debian 12's 0.16) leave it behind when the write fails (a full disk).
        prefix = f"{TEXTFILE}.{os.getpid()}."
        for name in os.listdir(directory):
            if name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        raise
    return path
