"""`kvmhook migrate`: plan, refusal rules, progress, abort, exit codes.

Against libvirt's test driver (`test:///default`, a running guest named
`test`) wherever it can serve. It cannot migrate (it refuses peer to peer:
"p2p migration is not supported by the source host") and has no job stats
or job abort; test_test_driver_cannot_migrate_report_or_abort pins that
down, and `FakeDomain` stands in for those calls. Real migrations are the
two-host end-to-end test's job.
"""

from __future__ import annotations

import io
import threading
import time
import types

import libvirt
import pytest
from sandbox import cli_runner

from kvmhook.certs import tls
from kvmhook.cli.migrate import migrate as migrate_command
from kvmhook.errors import (
    DomainNotFoundError,
    MigrationAbortedError,
    MigrationError,
    MigrationTimedOutError,
    NotSecuredError,
    VirtError,
)
from kvmhook.host import migrate as migration
from kvmhook.host import virt

TEST_URI = "test:///default"
# Nothing listens on port 1: a TLS connection there fails whatever /etc/pki holds.
UNREACHABLE = "127.0.0.1:1"
LIVE_TLS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_TLS
    | libvirt.VIR_MIGRATE_AUTO_CONVERGE
)
OFFLINE_TLS = (
    libvirt.VIR_MIGRATE_OFFLINE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_TLS
)
MIB = 2**20


def libvirt_error(message: str) -> libvirt.libvirtError:
    """A libvirtError saying `message` (it would take this thread's last libvirt error)."""
    libvirt.virResetLastError()
    return libvirt.libvirtError(message)


def job(processed_mib: int, remaining_mib: int, mib_per_s: int = 0) -> dict:
    """Job stats as libvirt's jobStats() returns them for a running migration."""
    return {
        "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
        libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED: processed_mib * MIB,
        libvirt.VIR_DOMAIN_JOB_DATA_REMAINING: remaining_mib * MIB,
        libvirt.VIR_DOMAIN_JOB_MEMORY_BPS: mib_per_s * MIB,
    }


class FakeDomain:
    """The libvirt domain methods virt.Guest calls, for what the test driver cannot do.

    The test driver refuses peer-to-peer migration and has neither jobStats nor
    abortJob, so a migration that takes time, reports progress and can be
    aborted exists only here. migrateToURI3 runs in the worker thread, the rest
    in the main thread, as with libvirt.
    """

    def __init__(
        self,
        seconds: float = 0.0,
        stats: tuple = (),
        abort_fails: bool = False,
        postcopy_refusals: int = 0,
        postcopy_fails: bool = False,
    ):
        self.seconds = seconds
        self.stats = list(stats)
        self.abort_fails = abort_fails
        self.aborted = threading.Event()
        self.postcopy = threading.Event()  # migrateStartPostCopy accepted: ends soon after
        self.postcopy_refusals = postcopy_refusals  # refused that many times first
        self.postcopy_fails = postcopy_fails  # the post-copy phase then fails
        self.postcopy_calls: list[float] = []
        self.postcopy_seconds = 0.05  # the rest of the pages, fetched by the destination
        self.calls: list[tuple] = []

    def name(self) -> str:
        return "vm1"

    def isActive(self) -> int:
        return 1

    def migrateToURI3(self, uri: str, params: dict, flags: int) -> int:
        self.calls.append((uri, params, flags))
        until = time.monotonic() + self.seconds
        while time.monotonic() < until:
            if self.aborted.wait(0.01):
                raise libvirt_error("operation aborted: migration out job: canceled by client")
            if self.postcopy.is_set():
                time.sleep(self.postcopy_seconds)
                if self.postcopy_fails:
                    raise libvirt_error("operation failed: migration out job: unexpectedly failed")
                return 0
        return 0

    def migrateStartPostCopy(self, flags: int = 0) -> int:
        self.postcopy_calls.append(time.monotonic())
        if len(self.postcopy_calls) <= self.postcopy_refusals:
            raise libvirt_error("Requested operation is not valid: post-copy not yet possible")
        self.postcopy.set()
        return 0

    def jobStats(self) -> dict:
        if not self.stats:
            return {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        item = self.stats.pop(0) if len(self.stats) > 1 else self.stats[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def abortJob(self) -> int:
        if self.abort_fails:
            raise libvirt_error("Requested operation is not valid: no job is active")
        self.aborted.set()
        return 0


@pytest.fixture
def test_guest():
    """The test driver's running guest `test`, on its own connection."""
    with virt.connect(TEST_URI) as conn:
        yield virt.lookup(conn, "test")


@pytest.fixture
def shut_off_guest():
    """A shut-off guest defined on the test driver for the test, undefined after it."""
    xml = (
        "<domain type='test'><name>kvmhook-off</name><memory>8192</memory>"
        "<os><type>hvm</type></os></domain>"
    )
    with virt.connect(TEST_URI) as conn:
        domain = conn.defineXML(xml)
        try:
            yield virt.lookup(conn, "kvmhook-off")
        finally:
            domain.undefine()


def secured() -> None:
    """A local check for a secured host."""


def secured_dest(_uri: str) -> None:
    """A destination check for a secured destination."""


def must_not_check(*_args: object) -> None:
    raise AssertionError("a secured check ran where none should")


def migrate_test_guest(plan: migration.Plan, local_check=secured, dest_check=secured_dest) -> None:
    migration.migrate(
        "test",
        plan,
        migration.Progress(io.StringIO(), tty=False),
        source_uri=TEST_URI,
        timeout=None,
        local_check=local_check,
        dest_check=dest_check,
    )


# --- the plan: URI, flags, parameters --------------------------------------------------------


def test_live_plan_is_tls_peer_to_peer_with_auto_converge():
    """Default: qemu+tls://HOST/system; live, peer to peer, persistent, TLS, auto-converge."""
    plan = migration.make_plan("kvm2.example.org")
    assert plan.dest_uri == "qemu+tls://kvm2.example.org/system"
    assert plan.flags == LIVE_TLS
    assert plan.params == {}
    assert plan.secure and plan.live


def test_offline_plan_replaces_live_and_auto_converge_with_offline():
    """--offline: OFFLINE instead of LIVE, no AUTO_CONVERGE, still peer to peer over TLS."""
    plan = migration.make_plan("kvm2", live=False)
    assert plan.dest_uri == "qemu+tls://kvm2/system"
    assert plan.flags == OFFLINE_TLS


@pytest.mark.parametrize("live", [True, False])
def test_insecure_plan_uses_qemu_tcp_without_the_tls_flag(live):
    """--allow-insecure: qemu+tcp://HOST/system and the same flags minus VIR_MIGRATE_TLS."""
    plan = migration.make_plan("kvm2", live=live, allow_insecure=True)
    assert plan.dest_uri == "qemu+tcp://kvm2/system"
    assert plan.flags == (LIVE_TLS if live else OFFLINE_TLS) & ~libvirt.VIR_MIGRATE_TLS
    assert not plan.secure


def test_postcopy_plan_adds_the_postcopy_flag_and_keeps_auto_converge():
    """--on-timeout postcopy: VIR_MIGRATE_POSTCOPY on top of the live flags (auto-converge
    stays on); refused for an offline migration."""
    plan = migration.make_plan("kvm2", postcopy=True)
    assert plan.flags == LIVE_TLS | libvirt.VIR_MIGRATE_POSTCOPY
    assert plan.flags & libvirt.VIR_MIGRATE_AUTO_CONVERGE
    assert plan.postcopy
    with pytest.raises(MigrationError, match="post-copy is for a live migration"):
        migration.make_plan("kvm2", live=False, postcopy=True)


def test_bandwidth_becomes_the_bandwidth_parameter_in_mib_per_second():
    """--bandwidth 500 is passed as VIR_MIGRATE_PARAM_BANDWIDTH = 500."""
    plan = migration.make_plan("kvm2", bandwidth=500)
    assert plan.params == {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 500}


@pytest.mark.parametrize(
    ("host", "uri"),
    [
        ("10.0.0.2", "qemu+tls://10.0.0.2/system"),
        ("kvm2:16514", "qemu+tls://kvm2:16514/system"),
        ("fd00::2", "qemu+tls://[fd00::2]/system"),
        ("[fd00::2]:16514", "qemu+tls://[fd00::2]:16514/system"),
    ],
)
def test_destination_forms_make_valid_uris(host, uri):
    """Names, IPv4, IPv6 (bracketed for the URI) and an explicit port all give a usable URI."""
    assert migration.make_plan(host).dest_uri == uri


@pytest.mark.parametrize("host", ["", "kvm2/system", "root@kvm2", "kvm2?x=1", "kvm 2", "kvm2#"])
def test_destination_that_would_bend_the_uri_is_rejected(host):
    """A destination with URI syntax in it (path, user, query, spaces) is refused."""
    with pytest.raises(MigrationError, match="not a host name or address"):
        migration.make_plan(host)


# --- the test driver: lookup, state, and what it cannot do ------------------------------------


def test_lookup_finds_the_test_drivers_running_guest(test_guest):
    """virt.lookup returns the guest by name, running."""
    assert test_guest.name == "test"
    assert test_guest.is_active()


def test_unknown_guest_is_domain_not_found_naming_guest_and_uri():
    """Looking up a missing guest raises DomainNotFoundError naming the guest and the URI."""
    with virt.connect(TEST_URI) as conn, pytest.raises(DomainNotFoundError) as caught:
        virt.lookup(conn, "no-such-guest")
    assert str(caught.value) == f"no guest named 'no-such-guest' on {TEST_URI}"


def test_connection_failure_is_a_virt_error_with_libvirts_reason(tmp_path):
    """A URI libvirt cannot open raises VirtError naming the URI, with libvirt's message."""
    uri = f"test://{tmp_path}/missing.xml"
    with pytest.raises(VirtError, match=f"^cannot connect to {uri}: .+"), virt.connect(uri):
        pass


def test_test_driver_cannot_migrate_report_or_abort(test_guest):
    """The test driver refuses p2p migration and has no job stats or abort: hence FakeDomain."""
    with pytest.raises(VirtError, match="p2p migration is not supported"):
        test_guest.migrate("qemu+tls://kvm2/system", {}, LIVE_TLS)
    assert test_guest.progress() is None
    with pytest.raises(VirtError, match="not supported"):
        test_guest.abort()
    with pytest.raises(VirtError, match=r"cannot switch test to post-copy: .*not supported"):
        test_guest.start_postcopy()


def test_live_migration_of_a_shut_off_guest_is_refused(shut_off_guest):
    """Live-migrating a guest that is not running stops before libvirt, pointing at --offline."""
    with pytest.raises(MigrationError, match="kvmhook-off is not running: use --offline"):
        migration.check_state(shut_off_guest, migration.make_plan("kvm2"))


def test_offline_migration_of_a_running_guest_is_refused(test_guest):
    """--offline on a running guest is refused: it would leave the guest running here, undefined."""
    with pytest.raises(MigrationError, match="test is running: --offline is for a shut-off guest"):
        migration.check_state(test_guest, migration.make_plan("kvm2", live=False))


def test_states_that_fit_pass(test_guest, shut_off_guest):
    """Live for a running guest and offline for a shut-off one pass the state check."""
    migration.check_state(test_guest, migration.make_plan("kvm2"))
    migration.check_state(shut_off_guest, migration.make_plan("kvm2", live=False))


# --- refusal rules -------------------------------------------------------------------------


def test_refused_when_this_host_is_not_secured():
    """This host not secured: NotSecuredError naming this host and why; destination unchecked."""
    with pytest.raises(NotSecuredError) as caught:
        migrate_test_guest(
            migration.make_plan("kvm2"),
            local_check=lambda: "libvirtd.conf: listen_tls is 0",
            dest_check=must_not_check,
        )
    message = str(caught.value)
    assert message.startswith("refusing to migrate: this host is not secured (libvirtd.conf:")
    assert "kvmhook tls status" in message


def test_refused_when_the_destination_is_not_secured():
    """Destination not secured: NotSecuredError naming the destination and its reason."""
    checked = []

    def dest_check(uri):
        checked.append(uri)
        return "cannot connect to it: certificate from an unknown CA"

    with pytest.raises(NotSecuredError) as caught:
        migrate_test_guest(migration.make_plan("kvm2"), dest_check=dest_check)
    assert checked == ["qemu+tls://kvm2/system"]
    assert str(caught.value).startswith(
        "refusing to migrate: destination kvm2 is not secured (cannot connect to it: certificate"
    )


def test_both_sides_secured_goes_on_to_libvirts_migration():
    """With both sides secured the migration reaches libvirt (the test driver then refuses it)."""
    with pytest.raises(VirtError, match="p2p migration is not supported"):
        migrate_test_guest(migration.make_plan("kvm2"))


def test_allow_insecure_skips_the_checks_and_migrates_over_tcp():
    """--allow-insecure runs no secured check and asks libvirt for qemu+tcp://."""
    plan = migration.make_plan("kvm2", allow_insecure=True)
    with pytest.raises(VirtError, match=r"to qemu\+tcp://kvm2/system failed: .*p2p"):
        migrate_test_guest(plan, local_check=must_not_check, dest_check=must_not_check)


def test_destination_check_reports_libvirts_tls_failure():
    """The real destination check opens qemu+tls:// and returns libvirt's reason when it fails."""
    uri = f"qemu+tls://{UNREACHABLE}/system"
    problem = migration.dest_tls_problem(uri)
    assert problem is not None
    assert problem.startswith(f"cannot connect to {uri}: ")
    assert len(problem) > len(f"cannot connect to {uri}: ")


@pytest.mark.parametrize(
    ("secured_", "expected"),
    [(True, None), (False, "libvirtd.conf: listen_tls is 0; tls handshake: connection refused")],
)
def test_local_check_reads_tls_status_and_lists_what_failed(monkeypatch, secured_, expected):
    """This host's check is tls.status(handshake=True): None when secured, else the failed items."""
    items = [
        types.SimpleNamespace(name="agent certificate", ok=True, detail="valid"),
        types.SimpleNamespace(name="libvirtd.conf", ok=False, detail="listen_tls is 0"),
        types.SimpleNamespace(name="tls handshake", ok=False, detail="connection refused"),
    ]
    handshakes = []

    def status(agent_dir=None, handshake=True):
        handshakes.append(handshake)
        return types.SimpleNamespace(secured=secured_, items=items)

    monkeypatch.setattr(tls, "status", status)
    assert migration.local_tls_problem() == expected
    assert handshakes == [True]


def test_local_check_refuses_a_bare_host(monkeypatch, tmp_path):
    """With the real tls.status, a host root holding nothing is not secured, with reasons."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    problem = migration.local_tls_problem()
    assert problem is not None
    assert str(tmp_path) in problem


# --- running: progress, timeout, abort -----------------------------------------------------


def run_fake(
    domain: FakeDomain, timeout: float | None, stream=None, plan=None, limits=None
) -> None:
    progress = migration.Progress(stream or io.StringIO(), tty=False, every=0)
    migration.run(
        virt.Guest(domain),
        plan or migration.make_plan("kvm2"),
        progress,
        timeout,
        0.05,
        limits=limits,
    )


def test_run_passes_uri_params_and_flags_to_migrate_to_uri3():
    """The plan's URI, parameters and flags are exactly what migrateToURI3 receives."""
    domain = FakeDomain()
    plan = migration.make_plan("kvm2", bandwidth=100)
    run_fake(domain, None, plan=plan)
    assert domain.calls == [("qemu+tls://kvm2/system", {"bandwidth": 100}, LIVE_TLS)]


def test_timeout_aborts_the_job_and_the_guest_stays():
    """At the timeout the job is aborted, run waits for it and says the guest keeps running here."""
    domain = FakeDomain(seconds=30)
    started = time.monotonic()
    with pytest.raises(MigrationAbortedError) as caught:
        run_fake(domain, timeout=0.3)
    assert time.monotonic() - started < 5
    assert domain.aborted.is_set()
    assert str(caught.value) == (
        "migration of vm1 timed out after 0.3 s: aborted, the guest keeps running on this host"
        " (migration of vm1 to qemu+tls://kvm2/system failed:"
        " operation aborted: migration out job: canceled by client)"
    )


def test_the_migrations_own_timeout_is_a_timed_out_error():
    """At its own timeout with --on-timeout abort: MigrationTimedOutError (a drain moves the
    other guests on); the drain's limit (hard_timeout) is a plain MigrationAbortedError."""
    with pytest.raises(MigrationTimedOutError):
        run_fake(FakeDomain(seconds=30), timeout=0.1)
    with pytest.raises(MigrationAbortedError) as caught:
        run_fake(FakeDomain(seconds=30), timeout=5, limits=migration.Limits(hard_timeout=0.1))
    assert not isinstance(caught.value, MigrationTimedOutError)
    assert "timed out after 0.1 s: aborted" in str(caught.value)


def test_postcopy_switches_at_the_timeout_instead_of_aborting():
    """--on-timeout postcopy: at the timeout migrateStartPostCopy is called (once), the job is
    not aborted, and it completes; the switch and its risk are said."""
    domain = FakeDomain(seconds=30)
    stream = io.StringIO()
    began = time.monotonic()
    run_fake(domain, timeout=0.3, stream=stream, plan=migration.make_plan("kvm2", postcopy=True))
    assert len(domain.postcopy_calls) == 1
    assert domain.postcopy_calls[0] - began >= 0.3
    assert time.monotonic() - began < 5
    assert not domain.aborted.is_set()
    assert domain.calls[0][2] & libvirt.VIR_MIGRATE_POSTCOPY
    assert "vm1: timed out after 0.3 s, switched to post-copy: the guest now runs on the" in (
        stream.getvalue()
    )
    assert "if the network between them fails before it ends, the guest is lost" in (
        stream.getvalue()
    )


def test_postcopy_refused_at_first_is_tried_again_at_each_poll():
    """The switch refused (the job not yet under way) is retried until accepted, said once."""
    domain = FakeDomain(seconds=30, postcopy_refusals=3)
    stream = io.StringIO()
    run_fake(domain, timeout=0.1, stream=stream, plan=migration.make_plan("kvm2", postcopy=True))
    assert len(domain.postcopy_calls) == 4
    assert not domain.aborted.is_set()
    assert stream.getvalue().count("post-copy not yet possible: trying again") == 1


def test_without_the_postcopy_plan_the_timeout_aborts():
    """Default (--on-timeout abort): no migrateStartPostCopy, the job is aborted."""
    domain = FakeDomain(seconds=30)
    with pytest.raises(MigrationTimedOutError):
        run_fake(domain, timeout=0.1)
    assert domain.postcopy_calls == [] and domain.aborted.is_set()


def test_the_drains_limits_abort_before_the_switch_but_not_after():
    """The drain's hard timeout (or its stop event) aborts a migration still in pre-copy even
    with postcopy; once switched, nothing aborts it."""
    plan = migration.make_plan("kvm2", postcopy=True)
    domain = FakeDomain(seconds=30)
    with pytest.raises(MigrationAbortedError, match=r"timed out after 0\.1 s"):
        run_fake(domain, timeout=5, plan=plan, limits=migration.Limits(hard_timeout=0.1))
    assert domain.postcopy_calls == [] and domain.aborted.is_set()
    stop = threading.Event()
    stop.set()
    domain = FakeDomain(seconds=30)
    with pytest.raises(MigrationAbortedError, match="interrupted: aborted"):
        run_fake(domain, timeout=5, plan=plan, limits=migration.Limits(stop=stop))
    # Switched at 0.1 s, the hard limit at 0.2 s passes while the pages still come: no abort.
    domain = FakeDomain(seconds=30)
    original = domain.migrateStartPostCopy

    def slow_postcopy(flags: int = 0) -> int:
        original(flags)
        time.sleep(0.3)
        return 0

    domain.migrateStartPostCopy = slow_postcopy
    run_fake(domain, timeout=0.1, plan=plan, limits=migration.Limits(hard_timeout=0.2))
    assert not domain.aborted.is_set()


def test_ctrl_c_after_the_switch_waits_for_post_copy_to_end():
    """Ctrl-C once in post-copy cannot abort (the guest runs there): said, and waited for."""
    domain = FakeDomain(seconds=30)
    original = domain.migrateStartPostCopy
    state = {"switched": False}

    def switch(flags: int = 0) -> int:
        state["switched"] = True
        domain.stats = [KeyboardInterrupt(), job(1, 1)]
        return original(flags)

    domain.migrateStartPostCopy = switch
    domain.postcopy_seconds = 0.5  # polls in post-copy read the stats that raise Ctrl-C
    stream = io.StringIO()
    plan = migration.make_plan("kvm2", postcopy=True)
    run_fake(domain, timeout=0.1, stream=stream, plan=plan)
    assert state["switched"] and not domain.aborted.is_set()
    assert "vm1: in post-copy, which cannot be interrupted: waiting for it to end" in (
        stream.getvalue()
    )


def test_a_failure_after_the_switch_says_the_guest_may_be_lost():
    """The post-copy phase failing: a VirtError saying where to look, not an abort."""
    domain = FakeDomain(seconds=30, postcopy_fails=True)
    with pytest.raises(VirtError, match="it had switched to post-copy: check where vm1 runs"):
        run_fake(domain, timeout=0.1, plan=migration.make_plan("kvm2", postcopy=True))


def test_offline_timeout_says_the_guest_stays_defined_here():
    """An aborted offline migration says the guest stays defined on this host."""
    domain = FakeDomain(seconds=30)
    with pytest.raises(MigrationAbortedError, match="the guest stays defined on this host"):
        run_fake(domain, timeout=0.1, plan=migration.make_plan("kvm2", live=False))


def test_ctrl_c_aborts_the_job():
    """Ctrl-C while waiting aborts the job rather than leaving it running behind the user."""
    domain = FakeDomain(seconds=5, stats=(KeyboardInterrupt(),))
    try:
        with pytest.raises(MigrationAbortedError, match=r"^migration of vm1 interrupted: aborted"):
            run_fake(domain, timeout=None)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped run() and left the migration running")
    assert domain.aborted.is_set()


def test_a_job_that_ends_before_the_abort_counts_as_migrated():
    """If the abort comes too late (libvirt refuses it) and the migration succeeds, run succeeds."""
    domain = FakeDomain(seconds=0.4, abort_fails=True)
    run_fake(domain, timeout=0.1)
    assert domain.calls and not domain.aborted.is_set()


def test_run_prints_plain_progress_lines_from_the_job_stats():
    """Without a terminal, run prints plain `progress:` lines from the job's stats, no bar."""
    domain = FakeDomain(seconds=0.3, stats=(job(1, 3, 2),))
    stream = io.StringIO()
    run_fake(domain, None, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines, "no progress shown"
    assert set(lines) == {"progress:  25% 1.0 MiB sent, 3.0 MiB left, 2.0 MiB/s"}


def test_plain_progress_prints_a_line_every_few_seconds():
    """Without a terminal: the first figures at once, then at most one line per `every` seconds."""
    now = [0.0]
    stream = io.StringIO()
    progress = migration.Progress(stream, tty=False, every=5, clock=lambda: now[0])
    for now[0], processed in [(0, 1), (1, 2), (4.9, 3), (5, 4), (6, 5), (10.5, 6)]:
        progress.update(virt.JobProgress(processed * MIB, 10 * MIB, MIB))
    progress.update(None)
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "progress:   9% 1.0 MiB sent, 10.0 MiB left, 1.0 MiB/s",
        "progress:  28% 4.0 MiB sent, 10.0 MiB left, 1.0 MiB/s",
        "progress:  37% 6.0 MiB sent, 10.0 MiB left, 1.0 MiB/s",
    ]


def test_terminal_progress_redraws_one_bar_and_ends_its_line():
    """On a terminal, each update redraws the bar in place and finish() ends the line once."""
    stream = io.StringIO()
    progress = migration.Progress(stream, tty=True)
    progress.update(virt.JobProgress(1 * MIB, 3 * MIB, 0))
    progress.update(virt.JobProgress(3 * MIB, 1 * MIB, 0))
    progress.finish()
    progress.finish()
    assert stream.getvalue() == (
        "\r[#######-----------------------]  25% 1.0 MiB sent, 3.0 MiB left, 0.0 MiB/s\x1b[K"
        "\r[######################--------]  75% 3.0 MiB sent, 1.0 MiB left, 0.0 MiB/s\x1b[K"
        "\n"
    )


def test_no_job_figures_print_nothing():
    """Before the job has figures (or without stats), nothing is printed, not even on a terminal."""
    stream = io.StringIO()
    progress = migration.Progress(stream, tty=True)
    progress.update(None)
    progress.finish()
    assert stream.getvalue() == ""


# --- the command: exit codes -----------------------------------------------------------------


def invoke(*args: str, **env: str):
    environment = {"KVMHOOK_LIBVIRT_URI": TEST_URI, **env}
    return cli_runner().invoke(migrate_command, list(args), env=environment, catch_exceptions=False)


@pytest.fixture
def secured_ends(monkeypatch):
    """Both secured checks pass (the real ones need kvmhook.certs.tls and a TLS destination)."""
    monkeypatch.setattr(migration, "local_tls_problem", secured)
    monkeypatch.setattr(migration, "dest_tls_problem", secured_dest)


@pytest.fixture
def fake_guest(monkeypatch):
    """Every lookup returns a FakeDomain (the test driver cannot migrate); set its seconds."""
    domain = FakeDomain(seconds=0.0, stats=(job(1, 3, 2),))
    monkeypatch.setattr(virt, "lookup", lambda _conn, _name: virt.Guest(domain))
    return domain


def test_cli_exit_0_when_migrated(secured_ends, fake_guest):
    """A migration that succeeds exits 0 and says where the guest went and how."""
    result = invoke("vm1", "kvm2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "migrated vm1 to kvm2 (qemu+tls://kvm2/system, memory stream encrypted)"
    )
    assert fake_guest.calls == [("qemu+tls://kvm2/system", {}, LIVE_TLS)]


def test_cli_shows_plain_progress_lines_when_not_on_a_terminal(secured_ends, fake_guest):
    """Under CliRunner (not a terminal) the command prints plain progress lines, no bar."""
    fake_guest.seconds = 0.7  # one poll at 0.5 s
    result = invoke("vm1", "kvm2")
    assert result.exit_code == 0, result.stderr
    assert "progress:  25% 1.0 MiB sent, 3.0 MiB left, 2.0 MiB/s\n" in result.stdout
    assert "\r" not in result.stdout


def test_cli_exit_1_for_an_unknown_guest(secured_ends):
    """An unknown guest exits 1 with one line naming it."""
    result = invoke("no-such-guest", "kvm2")
    assert result.exit_code == 1
    assert result.stderr == f"Error: no guest named 'no-such-guest' on {TEST_URI}\n"


def test_cli_exit_1_when_libvirt_fails_the_migration(secured_ends):
    """libvirt failing the migration (here the test driver's refusal) exits 1 with its message."""
    result = invoke("test", "kvm2")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: migration of test to qemu+tls://kvm2/system failed: ")
    assert "p2p migration is not supported" in result.stderr


def test_cli_allow_insecure_warns_loudly_on_stderr(monkeypatch):
    """--allow-insecure warns on stderr that memory crosses in clear text, then uses qemu+tcp."""
    monkeypatch.setattr(migration, "local_tls_problem", must_not_check)
    monkeypatch.setattr(migration, "dest_tls_problem", must_not_check)
    result = invoke("test", "kvm2", "--allow-insecure")
    assert result.stderr.splitlines()[0] == migration.INSECURE_WARNING
    assert "CLEAR TEXT" in migration.INSECURE_WARNING
    assert "qemu+tcp://kvm2/system failed" in result.stderr
    assert result.exit_code == 1  # the test driver cannot migrate


def test_cli_exit_1_for_offline_on_a_running_guest(secured_ends):
    """--offline on the test driver's running guest exits 1 before any migration is attempted."""
    result = invoke("test", "kvm2", "--offline")
    assert result.exit_code == 1
    assert result.stderr == "Error: test is running: --offline is for a shut-off guest\n"


@pytest.mark.parametrize(
    "args", [["test", "kvm2/x"], ["test", "kvm2", "--bandwidth", "0"], ["test"]]
)
def test_cli_exit_2_for_usage_errors(args):
    """A bad destination, a zero bandwidth or a missing argument exits 2 (usage)."""
    assert invoke(*args).exit_code == 2


def test_cli_exit_3_when_this_host_is_not_secured(monkeypatch, tmp_path):
    """This host not secured (the real check, a bare host root) exits 3 with one line and why."""
    monkeypatch.setattr(migration, "dest_tls_problem", must_not_check)
    result = invoke("test", "kvm2", KVMHOOK_ROOT=str(tmp_path))
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: refusing to migrate: this host is not secured (")
    assert f"{tmp_path}/etc/libvirt/libvirtd.conf" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_cli_exit_3_when_the_destination_is_not_secured(monkeypatch):
    """A destination with no TLS libvirtd (the real check) exits 3 with libvirt's reason."""
    monkeypatch.setattr(migration, "local_tls_problem", secured)
    result = invoke("test", UNREACHABLE)
    assert result.exit_code == 3
    assert result.stderr.startswith(
        f"Error: refusing to migrate: destination {UNREACHABLE} is not secured"
        f" (cannot connect to qemu+tls://{UNREACHABLE}/system: "
    )
    assert len(result.stderr.splitlines()) == 1


def test_cli_exit_4_when_timed_out(secured_ends, fake_guest):
    """--timeout reached exits 4, the job aborted and the guest said to keep running here."""
    fake_guest.seconds = 30
    result = invoke("vm1", "kvm2", "--timeout", "1")
    assert result.exit_code == 4
    assert fake_guest.aborted.is_set()
    assert "timed out after 1 s: aborted, the guest keeps running on this host" in result.stderr


def test_cli_on_timeout_postcopy_switches_at_the_timeout(secured_ends, fake_guest):
    """--timeout 1 --on-timeout postcopy: the migration starts with VIR_MIGRATE_POSTCOPY,
    switches at 1 s, completes: exit 0."""
    fake_guest.seconds = 30
    result = invoke("vm1", "kvm2", "--timeout", "1", "--on-timeout", "postcopy")
    assert result.exit_code == 0, result.stderr
    assert fake_guest.calls[0][2] == LIVE_TLS | libvirt.VIR_MIGRATE_POSTCOPY
    assert len(fake_guest.postcopy_calls) == 1 and not fake_guest.aborted.is_set()
    assert "vm1: timed out after 1 s, switched to post-copy" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--on-timeout", "postcopy"], "--on-timeout postcopy needs --timeout"),
        (
            ["--on-timeout", "postcopy", "--timeout", "5", "--offline"],
            "--on-timeout postcopy is for a live migration",
        ),
        (["--on-timeout", "later"], "Invalid value for '--on-timeout'"),
    ],
)
def test_cli_on_timeout_usage_errors(args, message):
    result = invoke("test", "kvm2", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_cli_on_timeout_choices_are_the_cores():
    """options.ON_TIMEOUT (the CLI, which must not load libvirt) names the core's choices."""
    from kvmhook.cli import options

    assert options.ON_TIMEOUT == migration.ON_TIMEOUT == (migration.ABORT, migration.POSTCOPY)


def test_cli_help_documents_the_exit_codes():
    """--help lists every exit code the command uses."""
    result = cli_runner().invoke(migrate_command, ["--help"])
    for line in ["0  migrated", "1  failed", "2  usage", "3  refused", "4  aborted"]:
        assert line in result.stdout


# --- after PERSIST_DEST: the persistent definition takes the live bridges ------------------


UUID14 = "7f3d2a9e-0000-4000-8000-000000000014"


def bridged(name: str, bridge: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{UUID14}</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os>"
        "<devices><interface type='bridge'><mac address='52:54:00:14:00:01'/>"
        f"<source bridge='{bridge}'/></interface></devices></domain>"
    )


def source_bridge(domain: libvirt.virDomain, flags: int) -> str:
    return domain.XMLDesc(flags).split("<source bridge='", 1)[1].split("'", 1)[0]


@pytest.fixture
def renamed_guest():
    """A running test-driver guest on brenp2s0-100 (its live definition, as the destination's
    hook renamed it) whose persistent definition still names the source's brenp1s0-100."""
    with virt.connect(TEST_URI) as conn:  # held open: test:///default lives while it is
        domain = conn.defineXML(bridged("vm14", "brenp2s0-100"))
        domain.create()
        conn.defineXML(bridged("vm14", "brenp1s0-100"))
        yield domain
        domain.destroy()
        domain.undefine()


def test_the_destinations_persistent_definition_takes_the_live_bridges(renamed_guest):
    """After the migration the persistent definition names the live bridge, so the guest's
    next cold start there finds it; the live one is untouched and the change is said."""
    assert source_bridge(renamed_guest, libvirt.VIR_DOMAIN_XML_INACTIVE) == "brenp1s0-100"
    stream = io.StringIO()
    migration.persist_live_bridges("vm14", TEST_URI, migration.Progress(stream, tty=False))
    assert source_bridge(renamed_guest, libvirt.VIR_DOMAIN_XML_INACTIVE) == "brenp2s0-100"
    assert source_bridge(renamed_guest, 0) == "brenp2s0-100"
    assert stream.getvalue() == "vm14: its persistent definition there now names its live bridges\n"
    stream.truncate(0)
    migration.persist_live_bridges("vm14", TEST_URI, migration.Progress(stream, tty=False))
    assert stream.getvalue() == ""  # already agreeing: not redefined again


def test_a_destination_that_cannot_be_asked_is_a_warning_not_a_failure():
    """The guest has migrated: an unknown guest (or host) there is a warning line, not an error."""
    stream = io.StringIO()
    migration.persist_live_bridges("no-such-guest", TEST_URI, migration.Progress(stream, tty=False))
    assert stream.getvalue().startswith("WARNING: no-such-guest migrated, but its persistent")
