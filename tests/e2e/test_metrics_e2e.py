"""`kvmhook metrics --textfile` scraped by a real node_exporter, on a real libvirt host (issue 16).

One host of twohost.py (its own namespaces, libvirtd, private /etc and
/var/log/libvirt and /var/lib/kvmhook): the real keystore-setup and keystore-cert-import install a
two-day certificate of a test CA (agent, libvirt, QEMU and VNC files), `tls
enable`, then `libvirtd --listen`. `kvmhook metrics --textfile DIR` runs
inside the host, so it reads that host's certificates, hook log, maintenance
state and libvirt; DIR is a directory of the machine that the host sees too.

Debian's prometheus-node-exporter, started by the test on a free loopback
port with only its textfile collector reading DIR, as the package's user
(`prometheus`, as its service runs it), is scraped over HTTP; what it serves
is read with prometheus_client's parser. What the values must be comes from
elsewhere: openssl's -enddate of each file, the operations libvirt ran the
hook for, `kvmhook capacity --json`, `maintenance status`.

The tests share the host, each checking its own starting point (counters are
compared with a scrape taken at its start), so each also passes alone. Root
only; without the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from harness import GUEST_PREFIX, version
from signer import command, write_ca
from twohost import AGENT_DIR, KVMHOOK, Host, TestCA, guest_xml, missing_prerequisites

NODE_EXPORTER = "prometheus-node-exporter"
EXPORTER_USER = "prometheus"  # the Debian package's user, which its service runs as
TEXTFILE = "kvmhook.prom"
CUSTOM = "/etc/libvirt/hooks/custom"
GUEST_MIB = 64  # guest_xml's default
# Every certificate file of the host's set, as the host names them (certificates.py's sets:
# the agent's, libvirt's and QEMU's server and client, VNC's; their CA files).
CERTIFICATES = (
    f"{AGENT_DIR}/cloud.crt",
    f"{AGENT_DIR}/cloud.ca.crt",
    "/etc/pki/CA/cacert.pem",
    "/etc/pki/libvirt/servercert.pem",
    "/etc/pki/libvirt/clientcert.pem",
    "/etc/pki/qemu/ca-cert.pem",
    "/etc/pki/qemu/server-cert.pem",
    "/etc/pki/qemu/client-cert.pem",
    "/etc/pki/libvirt-vnc/ca-cert.pem",
    "/etc/pki/libvirt-vnc/server-cert.pem",
)
STATES = (
    "Enabled",
    "PrepareForMaintenance",
    "ErrorInPrepareForMaintenance",
    "Maintenance",
    "ErrorInMaintenance",
)
REFUSAL = "host is in maintenance mode; not accepting new guests"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A loopback port nothing listens on now (node_exporter binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NodeExporter:
    """Debian's node_exporter, textfile collector only, on 127.0.0.1:PORT; stopped by pid."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.directory = directory
        self.log = log
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> None:
        """Started as the package's user (setpriv execs it: the pid is node_exporter's, and it
        gets SIGTERM if this process dies); a few tries in case the port is taken meanwhile."""
        for _ in range(3):
            self.port = free_port()
            with self.log.open("ab") as out:
                self.process = subprocess.Popen(
                    ["setpriv", f"--reuid={EXPORTER_USER}", f"--regid={EXPORTER_USER}",
                     "--init-groups", "--pdeathsig=TERM", NODE_EXPORTER,
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--collector.disable-defaults", "--collector.textfile",
                     f"--collector.textfile.directory={self.directory}"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            if self._answering():
                return
            if "address already in use" not in self.log.read_text(errors="replace"):
                break
        raise AssertionError(f"node_exporter did not answer on {self.url}:\n{self.tail()}")

    def _answering(self, within: float = 30) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            assert response.status == 200
            return response.read().decode()

    def stop(self) -> None:
        """SIGTERM to its pid, SIGKILL to that pid after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} as prometheus_client's parser reads a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named `name`: {sorted labels: value}."""
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples named `name`, by the value of their one label `label`."""
    found = {}
    for labels, value in series(samples, name).items():
        assert [key for key, _ in labels] == [label], (name, labels)
        found[labels[0][1]] = value
    return found


def scripts(samples: Samples) -> dict[tuple[str, str], float]:
    """kvmhook_hook_scripts_total by (operation, result)."""
    found = {}
    for labels, value in series(samples, "kvmhook_hook_scripts_total").items():
        named = dict(labels)
        assert set(named) == {"operation", "result"}, labels
        found[(named["operation"], named["result"])] = value
    return found


def grown(before: dict, after: dict) -> dict:
    """What went up between two scrapes of a counter family; a counter never goes down."""
    for key, value in before.items():
        assert after.get(key, 0) >= value, f"counter {key} went down: {value} -> {after.get(key)}"
    return {
        key: value - before.get(key, 0)
        for key, value in after.items()
        if value != before.get(key, 0)
    }


def gauge(samples: Samples, name: str) -> float:
    assert (name, ()) in samples, f"{name} not scraped: {sorted({s for s, _ in samples})}"
    return samples[(name, ())]


class MetricsHost:
    """The host, the textfile directory node_exporter reads, the exporter."""

    def __init__(self, host: Host, ca: TestCA, ca_dir: Path, textfile: Path, exporter) -> None:
        self.host = host
        self.ca = ca
        self.ca_dir = ca_dir
        self.textfile = textfile
        self.exporter = exporter
        self.inodes: list[int] = []  # of kvmhook.prom after each write

    def kvmhook(self, *args: str):
        return self.host.run(str(KVMHOOK), *args, check=False, timeout=300)

    def write(self) -> None:
        """`kvmhook metrics --textfile DIR` inside the host: exit 0, every source read (nothing
        said to be left out), DIR holding kvmhook.prom alone (no temp file left beside it)."""
        result = self.kvmhook("metrics", "--textfile", str(self.textfile))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "", result.stdout
        for complaint in ("not exposed", "left out", "not counted", "counting the whole log"):
            assert complaint not in result.stderr, result.stderr
        assert sorted(os.listdir(self.textfile)) == [TEXTFILE]
        self.inodes.append(os.stat(self.textfile / TEXTFILE).st_ino)

    def scrape(self) -> Samples:
        """node_exporter's /metrics, parsed: it read kvmhook.prom, and that file only, without
        an error."""
        samples = parse(self.exporter.scrape())
        assert gauge(samples, "node_textfile_scrape_error") == 0, self.exporter.tail()
        read = labelled(samples, "node_textfile_mtime_seconds", "file")
        assert list(read) == [str(self.textfile / TEXTFILE)], read
        return samples

    def written(self) -> Samples:
        self.write()
        return self.scrape()

    def enddate(self, inside: str) -> float:
        """openssl's -enddate of a certificate file of the host, run inside it, as unix time."""
        out = self.host.run("openssl", "x509", "-noout", "-enddate", "-in", inside).stdout
        stamp = out.strip().split("=", 1)[1]  # notAfter=Dec  7 00:07:39 2026 GMT
        when = datetime.datetime.strptime(stamp, "%b %d %H:%M:%S %Y GMT")
        return float(calendar.timegm(when.timetuple()))

    def custom(self, name: str, body: str) -> Path:
        path = self.host.path(f"{CUSTOM}/{name}")
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    def clear_custom(self) -> None:
        for path in self.host.path(CUSTOM).iterdir():
            path.unlink()

    def capacity(self) -> dict:
        result = self.kvmhook("capacity", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def maintenance_state(self) -> str:
        result = self.kvmhook("maintenance", "status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["state"]

    def hook_records(self, guest: str) -> list[str]:
        return [line for line in self.host.hook_log().splitlines() if f"domain={guest} " in line]


def check_prerequisites() -> None:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    missing = [tool for tool in (NODE_EXPORTER, "setpriv", "openssl") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (bash scripts/test.sh installs them)")
    try:
        import prometheus_client.parser  # noqa: F401
    except ImportError:
        pytest.skip("prometheus_client is not installed (pip install -e .)")
    if subprocess.run(["id", EXPORTER_USER], capture_output=True, check=False).returncode != 0:
        pytest.skip(f"no user {EXPORTER_USER} (prometheus-node-exporter's package makes it)")


@pytest.fixture(scope="module")
def metrics_host(tmp_path_factory):
    """The host set up (see the module's docstring), node_exporter reading its textfile
    directory; all stopped (by pid) and removed after (kept with KVMHOOK_E2E_KEEP=1)."""
    check_prerequisites()
    root = Path(tempfile.mkdtemp(prefix="kvmhook-metrics-"))
    # node_exporter runs as its own user: the directory it reads must be reachable.
    textfile = Path(tempfile.mkdtemp(prefix="kvmhook-textfile-"))
    textfile.chmod(0o755)
    exporter = NodeExporter(textfile, root / "node-exporter.log")
    host = Host("metrics", "10.250.0.1", root / "host")
    ca = TestCA("metrics")
    try:
        host.prepare(peers=[host])
        # The copy of the machine's /etc may hold another test's settings and scripts.
        host.write_kvmhook_conf(None)
        host.path("/etc/kvmhook/controller.conf").unlink(missing_ok=True)
        host.start()
        host.keystore_setup()
        host.import_certificate(ca)  # two days, as TestCA signs
        host.run(str(KVMHOOK), "tls", "enable")
        host.start_libvirtd()
        ca_dir = write_ca(root / "ca", ca.key, [ca.cert])
        exporter.start()
        setup = MetricsHost(host, ca, ca_dir, textfile, exporter)
        setup.clear_custom()
        yield setup
    finally:
        try:
            exporter.stop()
            host.stop()
        finally:
            if os.environ.get("KVMHOOK_E2E_KEEP") != "1":
                shutil.rmtree(root, ignore_errors=True)
                shutil.rmtree(textfile, ignore_errors=True)


@pytest.fixture
def guest(metrics_host):
    """A defined (not started) guest of the host, and no custom scripts; both gone after."""
    name = f"{GUEST_PREFIX}metrics-{time.monotonic_ns() % 10**8}"
    metrics_host.host.define_guest(name, guest_xml(name))
    yield name
    metrics_host.host.virsh("destroy", name, check=False)
    metrics_host.host.virsh("undefine", name, check=False)
    metrics_host.clear_custom()
    metrics_host.host.write_kvmhook_conf(None)


def test_certificates_expire_when_openssl_says(metrics_host):
    """Every certificate file of the host's set is scraped under the path the host names it,
    at the time openssl's -enddate gives for that file; never renewed: both renewal times 0;
    kvmhook_info names this version."""
    samples = metrics_host.written()
    expiry = labelled(samples, "kvmhook_certificate_not_after_timestamp_seconds", "path")
    assert sorted(expiry) == sorted(CERTIFICATES), expiry
    for inside in CERTIFICATES:
        assert expiry[inside] == metrics_host.enddate(inside), inside
    agent = expiry[f"{AGENT_DIR}/cloud.crt"]
    assert 0 < agent - time.time() <= 2 * 86400 + 60  # TestCA's two days
    assert gauge(samples, "kvmhook_certificate_renewal_last_success_timestamp_seconds") == 0
    assert gauge(samples, "kvmhook_certificate_renewal_last_failure_timestamp_seconds") == 0
    assert series(samples, "kvmhook_info") == {(("version", version()),): 1.0}


def test_hook_counters_follow_a_guests_life_through_libvirtd(metrics_host, guest):
    """all_10-ok (exit 0) and started_20-fail (exit 1) in the custom dir; the guest started
    then destroyed by the real libvirtd: the scrape counts one ok run for each operation
    libvirt ran the hook for and the started script's failure, reading on from the last run
    (nothing counted twice); no veto. While the guest runs, libvirt is up and the guest and
    its vCPU and memory are counted, as `kvmhook capacity --json` says."""
    before = metrics_host.written()
    assert gauge(before, "kvmhook_guests_running") == 0
    metrics_host.custom("all_10-ok", "exit 0\n")
    metrics_host.custom("started_20-fail", "echo 'started: nothing to do here' >&2\nexit 1\n")
    metrics_host.host.virsh("start", guest)

    running = metrics_host.written()
    assert gauge(running, "kvmhook_libvirt_up") == 1
    assert gauge(running, "kvmhook_guests_running") == 1
    capacity = metrics_host.capacity()
    assert [entry["name"] for entry in capacity["guests"]] == [guest], capacity["guests"]
    figures = {
        "kvmhook_cpu_cores": capacity["cpu"]["cores"],
        "kvmhook_cpu_overprovisioning_factor": capacity["cpu"]["factor"],
        "kvmhook_cpu_capacity_vcpus": capacity["cpu"]["capacity"],
        "kvmhook_cpu_used_vcpus": 1,
        "kvmhook_memory_physical_bytes": capacity["memory"]["physical"],
        "kvmhook_memory_overprovisioning_factor": capacity["memory"]["factor"],
        "kvmhook_memory_capacity_bytes": capacity["memory"]["capacity"],
        "kvmhook_memory_used_bytes": GUEST_MIB * 1024 * 1024,
    }
    assert {name: gauge(running, name) for name in figures} == figures
    assert capacity["cpu"]["used"] == 1 and capacity["memory"]["used"] == GUEST_MIB * 1024**2
    started = {
        ("prepare", "ok"): 1,
        ("start", "ok"): 1,
        ("started", "ok"): 1,
        ("started", "failed"): 1,
    }
    assert grown(scripts(before), scripts(running)) == started, metrics_host.hook_records(guest)

    metrics_host.host.virsh("destroy", guest)
    after = metrics_host.written()
    assert gauge(after, "kvmhook_guests_running") == 0
    assert gauge(after, "kvmhook_libvirt_up") == 1
    assert gauge(after, "kvmhook_memory_used_bytes") == 0
    lived = {**started, ("stopped", "ok"): 1, ("release", "ok"): 1}
    assert grown(scripts(before), scripts(after)) == lived, metrics_host.hook_records(guest)
    # What libvirt ran, as the hook logged it: one end record for each count above.
    records = metrics_host.hook_records(guest)
    ends = [r for r in records if " end: " in r]
    assert len(ends) == sum(lived.values()), records
    assert any("script=started_20-fail end: exit 1" in r for r in ends), ends
    vetoes = labelled(after, "kvmhook_hook_vetoes_total", "operation")
    assert grown(labelled(before, "kvmhook_hook_vetoes_total", "operation"), vetoes) == {}


def test_a_veto_is_counted(metrics_host, guest):
    """on_failure = abort for start, a start script that fails: libvirt refuses the start;
    the scrape counts the failed run and one veto of start, nothing else."""
    before = metrics_host.written()
    metrics_host.host.write_kvmhook_conf("[hooks]\non_failure = abort\nabort_on = start\n")
    metrics_host.custom("start_deny", "echo 'no licence for this guest here' >&2\nexit 1\n")
    refused = metrics_host.host.virsh("start", guest, check=False)
    assert refused.returncode != 0 and "no licence for this guest here" in refused.stderr
    after = metrics_host.written()
    assert grown(scripts(before), scripts(after)) == {("start", "failed"): 1}
    vetoes = labelled(after, "kvmhook_hook_vetoes_total", "operation")
    assert grown(labelled(before, "kvmhook_hook_vetoes_total", "operation"), vetoes) == {
        "start": 1
    }, metrics_host.hook_records(guest)
    assert gauge(after, "kvmhook_guests_running") == 0


def test_maintenance_state_follows_enter_and_cancel(metrics_host, guest):
    """Enabled; `maintenance enter` with no guest running: Maintenance, since it was entered,
    and a guest started then is refused by the hook (counted); `maintenance cancel`:
    Enabled again."""
    assert metrics_host.maintenance_state() == "Enabled"
    before = metrics_host.written()
    assert labelled(before, "kvmhook_maintenance_state", "state") == {
        state: float(state == "Enabled") for state in STATES
    }
    entering = time.time()
    entered = metrics_host.kvmhook("maintenance", "enter")
    try:
        assert entered.returncode == 0, entered.stdout + entered.stderr
        assert metrics_host.maintenance_state() == "Maintenance"
        refused = metrics_host.host.virsh("start", guest, check=False)
        assert refused.returncode != 0 and REFUSAL in refused.stderr, refused.stderr
        during = metrics_host.written()
        assert labelled(during, "kvmhook_maintenance_state", "state") == {
            state: float(state == "Maintenance") for state in STATES
        }
        since = gauge(during, "kvmhook_maintenance_state_since_timestamp_seconds")
        assert entering - 2 <= since <= time.time() + 1, (entering, since)
        refusals = labelled(during, "kvmhook_hook_guests_refused_total", "operation")
        assert grown(
            labelled(before, "kvmhook_hook_guests_refused_total", "operation"), refusals
        ) == {"prepare": 1}, metrics_host.hook_records(guest)
    finally:
        cancelled = metrics_host.kvmhook("maintenance", "cancel")
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    after = metrics_host.written()
    assert labelled(after, "kvmhook_maintenance_state", "state") == {
        state: float(state == "Enabled") for state in STATES
    }


def test_renewals_are_timed_and_the_new_certificate_scraped(metrics_host):
    """`cert renew` with a signer: its success time, and the new cloud.crt's expiry as openssl
    gives it; a renewal whose signer prints no certificate: its failure time, the success
    kept."""
    agent = f"{AGENT_DIR}/cloud.crt"
    old = metrics_host.enddate(agent)
    began = time.time()
    renewed = metrics_host.kvmhook("cert", "renew", "--signer", command(metrics_host.ca_dir, 30))
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    ended = time.time()
    samples = metrics_host.written()
    success = gauge(samples, "kvmhook_certificate_renewal_last_success_timestamp_seconds")
    assert began - 1 <= success <= ended + 1, (began, success, ended)
    assert gauge(samples, "kvmhook_certificate_renewal_last_failure_timestamp_seconds") == 0
    expiry = labelled(samples, "kvmhook_certificate_not_after_timestamp_seconds", "path")
    assert expiry[agent] == metrics_host.enddate(agent) != old
    assert expiry[agent] - time.time() > 29 * 86400

    failing = command(metrics_host.ca_dir, 30, "garbage")
    began = time.time()
    failed = metrics_host.kvmhook("cert", "renew", "--signer", failing)
    assert failed.returncode not in (0, 5), failed.stdout + failed.stderr
    ended = time.time()
    samples = metrics_host.written()
    failure = gauge(samples, "kvmhook_certificate_renewal_last_failure_timestamp_seconds")
    assert began - 1 <= failure <= ended + 1, (began, failure, ended)
    assert gauge(samples, "kvmhook_certificate_renewal_last_success_timestamp_seconds") == success


def test_the_textfile_is_replaced_whole_on_every_run(metrics_host):
    """Each run renames a new file over kvmhook.prom (a new inode each time, never rewritten in
    place), leaves no kvmhook.prom.* temp file beside it (write() checks the directory), and
    the file is readable by node_exporter's user."""
    metrics_host.write()
    metrics_host.write()
    inodes = metrics_host.inodes  # of every write of the module so far
    assert all(one != next_one for one, next_one in zip(inodes, inodes[1:])), inodes
    assert sorted(os.listdir(metrics_host.textfile)) == [TEXTFILE]
    assert series(metrics_host.scrape(), "kvmhook_info")
