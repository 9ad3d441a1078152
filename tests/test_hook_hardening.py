"""The hook in a hostile environment (issue 12): closed fds, FIFOs, links, huge files,
forged records, a missing TMPDIR, and a chained pre-kvmhook hook printing the XML.

Every test runs the real hook as a process, as libvirtd does. The domain XML
holds a VNC password, which must never reach the log.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmhook.hook.hooklog import HookLog

# Written out rather than imported, so that a change in kvmhook is caught here:
# the chained hook's name (the packages make that link), virsh's limit on an XML
# file, and kvmhook.conf's.
PREVIOUS_HOOK = "all_00-previous-qemu-hook"
DOMAIN_XML_MAX = 10 * 1024 * 1024
CONF_MAX = 1024 * 1024
SECRET = "s3cr3t-vnc"
UUID = "7f3d2a9e-0000-4000-8000-000000000001"
XML = (
    f"<domain><name>vm1</name><uuid>{UUID}</uuid>"
    f"<devices><graphics type='vnc' passwd='{SECRET}'/>"
    "<interface type='bridge'><source bridge='br0'/></interface></devices></domain>"
).encode()
REWRITTEN = XML.replace(b"br0", b"br1")
ABORT = "[hooks]\non_failure = abort\n"
VALUE = r'(?:[A-Za-z0-9_.:+@,/%-]+|"(?:[^"\\]|\\.)*")'
RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4} pid=\d+ "
    rf"domain=(?P<domain>{VALUE}) op={VALUE} subop={VALUE} script=(?P<script>{VALUE}) (?P<text>.*)$"
)
CLI = [sys.executable, "-c", "import sys; from kvmhook.cli import main; sys.exit(main())"]


def unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    return re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)",
        lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) > 1 else m.group(1),
        value[1:-1],
    )


def log_lines(host) -> list[str]:
    """The log's lines, split on newline only (a record never holds one)."""
    data = host.log.read_bytes()
    assert data.endswith(b"\n")
    return data.decode("utf-8").split("\n")[:-1]


def assert_records(host, domain: str = "vm1") -> list[re.Match]:
    """Every line of the log is one record of `domain`, with no line break of any kind inside."""
    found = []
    for line in log_lines(host):
        match = RECORD.match(line)
        assert match, f"not a record: {line!r}"
        assert unquote(match["domain"]) == domain, line
        assert len(line.splitlines()) == 1, line
        found.append(match)
    return found


def texts(host, script: str | None = None) -> list[str]:
    return [m["text"] for m in assert_records(host) if script in (None, unquote(m["script"]))]


def conf(host, text: str) -> None:
    path = host.root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def state_file(host) -> Path:
    path = host.root / "var/lib/kvmhook/maintenance"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def recorder(host, name: str) -> None:
    host.script(name, f'basename "$0" >> "{host.root}/ran"\ncat > /dev/null\n')


def ran(host) -> list[str]:
    path = host.root / "ran"
    return path.read_text().split() if path.exists() else []


def bridge_rewriter(host, name: str = "migrate_10-rw") -> None:
    host.script(name, 'sed s/br0/br1/ > "$KVMHOOK_XML_OUT"\n')


def assert_no_secret(host) -> None:
    if host.log.is_file():
        assert SECRET.encode() not in host.log.read_bytes()


# --- 0: the chained previous hook's stdout on migrate and restore ----------------------


def previous_hook(host, body: str) -> None:
    """The pre-kvmhook hook as the packages chain it: a link to a file outside the custom dir."""
    kept = host.root / "etc/libvirt/hooks/qemu.pre-kvmhook"
    host.script(kept.name, body, directory=kept.parent)
    (host.custom / PREVIOUS_HOOK).symlink_to(kept)


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_previous_hook_stdout_is_its_rewrite_and_never_logged(host, operation):
    """The chained hook's stdout is taken as its rewrite (checked, passed on, printed for
    libvirt) and only its size is logged, never the XML."""
    previous_hook(host, "sed s/br0/br1/\necho 'old hook says hi' >&2\n")
    host.script("migrate_20-read", f'cat > "{host.root}/got"\n')
    host.script("restore_20-read", f'cat > "{host.root}/got"\n')
    result = host.hook("vm1", operation, "begin", "-", xml=XML)
    assert (result.returncode, result.stdout, result.stderr) == (0, REWRITTEN, b"")
    assert (host.root / "got").read_bytes() == REWRITTEN
    assert_no_secret(host)
    mine = texts(host, PREVIOUS_HOOK)
    assert f"stdout: {len(REWRITTEN)} bytes of domain XML, not logged: its rewrite" in mine
    assert "stderr: old hook says hi" in mine
    assert any(text.startswith("xml: rewritten") for text in mine)


def test_previous_hook_empty_stdout_is_no_rewrite(host):
    """A chained hook that prints nothing leaves the XML as it was: the hook prints nothing."""
    previous_hook(host, "cat > /dev/null\n")
    result = host.hook("vm1", "migrate", "begin", "-", xml=XML)
    assert (result.returncode, result.stdout) == (0, b"")
    assert not [t for t in texts(host) if t.startswith(("stdout:", "xml:"))]


def test_previous_hook_bad_stdout_is_a_bad_rewrite_and_vetoes_under_abort(host):
    """What the chained hook prints goes through the usual checks: a renamed guest is a bad
    rewrite, discarded (not logged), and under the veto policy it aborts the migration."""
    previous_hook(host, "sed s/vm1/vm2/\n")
    result = host.hook("vm1", "migrate", "begin", "-", xml=XML)
    assert (result.returncode, result.stdout) == (0, b"")
    assert "xml: rewrite discarded: <name> changed from 'vm1' to 'vm2'" in texts(host)
    conf(host, ABORT)
    result = host.hook("vm1", "migrate", "begin", "-", xml=XML)
    assert (result.returncode, result.stdout) == (1, b"")
    assert b"wrote a bad domain XML" in result.stderr
    assert_no_secret(host)


def test_previous_hook_stdout_is_still_logged_for_other_operations(host):
    """For an operation libvirt takes no XML from, the chained hook's stdout is logged as
    any script's is."""
    previous_hook(host, "echo hello\n")
    assert host.hook("vm1", "start", "begin", "-", xml=XML).returncode == 0
    assert "stdout: hello" in texts(host, PREVIOUS_HOOK)


# --- 1 and 2: closed fds 0, 1 and 2 --------------------------------------------------------


def closed_run(host, args: tuple[str, ...], closed: tuple[int, ...], **env: str):
    """Run the hook with the fds `closed` closed, as a careless parent may start it."""
    redirections = " ".join(f"{fd}<&-" if fd == 0 else f"{fd}>&-" for fd in closed)
    command = ["/bin/sh", "-c", f'exec "$@" {redirections}', "sh", sys.executable, "-m"]
    return subprocess.run(
        [*command, "kvmhook.qemu", *args],
        input=None if 0 in closed else XML,
        stdin=subprocess.DEVNULL if 0 in closed else None,
        capture_output=True,
        env=host.env(**env),
        timeout=60,
        check=False,
    )


def test_closed_stdout_never_puts_the_xml_in_the_log(host):
    """With stdout closed, the log does not take fd 1: the rewritten XML, secrets included,
    never lands in it (issue 12's reproduction)."""
    host.script("migrate_05-x", "exit 0\n", mode=0o644)
    bridge_rewriter(host)
    result = closed_run(host, ("vm1", "migrate", "begin", "-"), (1,))
    assert result.returncode == 0
    assert_no_secret(host)
    assert assert_records(host)


def _plain(host):
    recorder(host, "all_x")
    return ("vm1", "start", "begin", "-"), 0, ["all_x"]


def _log_unwritable_start(host):
    host.log.mkdir(parents=True)
    recorder(host, "all_x")
    return ("vm1", "start", "begin", "-"), 0, ["all_x"]


def _log_unwritable_stopped(host):
    host.log.mkdir(parents=True)
    recorder(host, "all_x")
    return ("vm1", "stopped", "end", "-"), 0, ["all_x"]


def _veto(host):
    conf(host, ABORT)
    recorder(host, "all_10")
    host.script("all_20", "echo no >&2\nexit 3\n")
    recorder(host, "all_30")
    return ("vm1", "start", "begin", "-"), 1, ["all_10"]


def _maintenance(host):
    state_file(host).write_text("PrepareForMaintenance\n")
    recorder(host, "all_x")
    return ("vm1", "prepare", "begin", "-"), 1, []


def _rewrite(host):
    bridge_rewriter(host)
    return ("vm1", "migrate", "begin", "-"), 0, []


SCENARIOS = [_plain, _log_unwritable_start, _log_unwritable_stopped, _veto, _maintenance, _rewrite]
FD_SETS = [c for n in range(4) for c in itertools.combinations((0, 1, 2), n)]


@pytest.mark.parametrize("closed", FD_SETS, ids=lambda c: "closed-" + "".join(map(str, c)))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_exit_status_is_the_documented_one_whatever_fds_are_closed(host, scenario, closed):
    """Every path (scripts run, unwritable log, veto, maintenance refusal, XML rewrite) ends
    in its documented exit status with any of fds 0, 1, 2 closed, and the XML never reaches
    the log."""
    args, status, expected = scenario(host)
    result = closed_run(host, args, closed)
    assert result.returncode == status, result.stderr
    assert ran(host) == expected
    assert_no_secret(host)
    if 2 not in closed:
        assert b"internal error" not in result.stderr


def test_launcher_without_kvmhook_exits_0_with_stderr_closed(host):
    """The launcher's fallback (kvmhook not importable) exits 0 with no stderr to explain on."""
    launcher = host.launcher()
    text = launcher.read_text().replace("from kvmhook.qemu import", "from kvmhook_gone.qemu import")
    launcher.write_text(text)
    result = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", str(launcher), "vm1", "start", "begin", "-"],
        input=XML,
        capture_output=True,
        env=host.env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0


# --- 3: one line is one record, whatever reaches it ----------------------------------------

FORGED = "2026-01-01 00:00:00.000 +0000 pid=1 domain=forged op=start subop=begin script=x"


def test_a_domain_name_in_the_admission_refusal_cannot_forge_a_record(host):
    """A guest name holding a newline and a fake record, quoted in admission's refusal text,
    stays inside one record of the real guest."""
    conf(host, "[capacity]\nadmission = enforce\n")
    domain = f"vm\n{FORGED} start: /bin/true"
    xml = b"<domain><name>x</name><vcpu>100000</vcpu><memory>1024</memory></domain>"
    result = host.hook(domain, "prepare", "begin", "-", xml=xml)
    assert result.returncode == 1
    [refused] = [m for m in assert_records(host, domain) if "refused: admission" in m["text"]]
    assert "\\x0a2026-01-01" in refused["text"]


def test_a_multi_line_abort_on_value_stays_one_record(host):
    """An `abort_on` continued over several lines is quoted in its config record as one line."""
    conf(host, f"[hooks]\non_failure = abort\nabort_on = start\n  {FORGED} end: exit 0\n")
    recorder(host, "all_x")
    assert host.hook("vm1", "start", "begin", "-", xml=XML).returncode == 0
    assert any(t.startswith("config: ") and "\\x0a" in t for t in texts(host))


def test_a_per_guest_link_target_with_a_newline_stays_one_record(host):
    """A per-guest dir linked to a refused directory whose name holds a fake record is
    logged as one record of the guest."""
    target = host.root / f"guests\n{FORGED} end: exit 0"
    target.mkdir()
    os.chmod(target, 0o777)
    (host.custom / "vm1").symlink_to(target)
    recorder(host, "all_x")
    assert host.hook("vm1", "start", "begin", "-", xml=XML).returncode == 0
    assert any("per-guest scripts of guest vm1 not run" in t for t in texts(host))


_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(domain=_ANY_TEXT, script=_ANY_TEXT, lines=st.lists(_ANY_TEXT, max_size=5))
def test_any_text_domain_or_script_name_makes_exactly_one_line_per_record(domain, script, lines):
    """Whatever the domain, script name and texts, HookLog writes one line per record, and
    each line parses back to that domain and script."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "hook.log"
        log = HookLog(str(path), domain, "start", "begin")
        log.block(script, lines)
        log.record(script, "one more")
        log.close()
        written = path.read_bytes().decode("utf-8")
    records = written.split("\n")[:-1]
    assert len(records) == len(lines) + 1
    assert len(written.splitlines()) == len(records)  # no Unicode line break inside either
    for record in records:
        match = RECORD.match(record)
        assert match, record
        assert (unquote(match["domain"]), unquote(match["script"])) == (domain, script)


# --- 4: nothing the hook reads can block it or fill its memory -------------------------------


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def test_a_fifo_as_kvmhook_conf_neither_blocks_the_hook_nor_the_cli(host):
    """A FIFO in kvmhook.conf's place is refused at once, logged, and the defaults apply."""
    path = fifo(host.root / "etc/kvmhook/kvmhook.conf")
    recorder(host, "all_x")
    result = host.hook("vm1", "start", "begin", "-", xml=XML, timeout=20)
    assert (result.returncode, ran(host)) == (0, ["all_x"])
    assert f"config: cannot read {path}: not a regular file; defaults apply" in texts(host)
    listed = subprocess.run(
        [*CLI, "hooks", "list", "start"], capture_output=True, env=host.env(), timeout=20
    )
    assert listed.returncode == 0 and b"not a regular file" in listed.stderr


def test_a_fifo_as_the_maintenance_state_neither_blocks_prepare_nor_status(host):
    """A FIFO in the maintenance state's place counts as Enabled, logged, at once."""
    path = fifo(state_file(host))
    recorder(host, "all_x")
    result = host.hook("vm1", "prepare", "begin", "-", xml=XML, timeout=20)
    assert (result.returncode, ran(host)) == (0, ["all_x"])
    expected = f"maintenance: cannot read {path}: not a regular file; counted as Enabled"
    assert expected in texts(host)
    status = subprocess.run(
        [*CLI, "maintenance", "status"], capture_output=True, env=host.env(), timeout=20
    )
    assert status.returncode == 0 and b"Enabled" in status.stdout


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "with-reader"])
def test_a_fifo_as_the_log_is_refused_and_scripts_still_run(host, reader):
    """A FIFO in the log's place never blocks the hook and gets no record, read or not."""
    fifo(host.log)
    reading = os.open(host.log, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        recorder(host, "all_x")
        result = host.hook("vm1", "start", "begin", "-", xml=XML, timeout=20)
        assert (result.returncode, ran(host)) == (0, ["all_x"])
        assert f"cannot write the log {host.log}: not a regular file" in result.stderr.decode()
        if reading is not None:
            assert os.read(reading, 100) == b""
    finally:
        if reading is not None:
            os.close(reading)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('mkfifo "$KVMHOOK_XML_OUT"\n', "not a regular file"),
        ('ln -s /dev/zero "$KVMHOOK_XML_OUT"\n', "not a regular file"),
        (f'truncate -s {DOMAIN_XML_MAX + 1} "$KVMHOOK_XML_OUT"\n', f"larger than {DOMAIN_XML_MAX}"),
    ],
    ids=["fifo", "dev-zero", "too-large"],
)
def test_a_rewrite_file_that_is_no_domain_xml_is_a_bad_rewrite_at_once(host, body, reason):
    """$KVMHOOK_XML_OUT made a FIFO, a link to /dev/zero or a file past the bound is refused
    without reading it (no hang past the script's timeout, no unbounded read)."""
    host.script("migrate_10-odd", body)
    result = host.hook(
        "vm1", "migrate", "begin", "-", xml=XML, env=host.env(KVMHOOK_TIMEOUT="2"), timeout=20
    )
    assert (result.returncode, result.stdout) == (0, b"")
    assert f"xml: rewrite discarded: cannot read $KVMHOOK_XML_OUT: {reason}" in " ".join(
        texts(host, "migrate_10-odd")
    )


def padded(size: int) -> bytes:
    """The test XML padded with a comment to exactly `size` bytes."""
    head, tail = XML[: -len(b"</domain>")] + b"<!--", b"--></domain>"
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-bound", "one-byte-over"])
def test_rewrite_and_stdin_share_the_domain_xml_bound(host, extra):
    """A domain XML of DOMAIN_XML_MAX bytes passes, on stdin and as a rewrite; one byte more
    is refused: on stdin the scripts get no XML, as a rewrite it is discarded."""
    big = host.root / "big.xml"
    big.write_bytes(padded(DOMAIN_XML_MAX + extra))
    host.script("migrate_10-size", f'wc -c\ncat "{big}" > "$KVMHOOK_XML_OUT"\n')
    result = host.hook("vm1", "migrate", "begin", "-", xml=big.read_bytes(), timeout=60)
    assert result.returncode == 0
    mine = texts(host, "migrate_10-size")
    if extra:
        refused = f"larger than {DOMAIN_XML_MAX} bytes"
        assert f"cannot read the domain XML from stdin: {refused}; scripts get none" in texts(host)
        assert "stdout: 0" in mine
        assert f"xml: rewrite discarded: cannot read $KVMHOOK_XML_OUT: {refused}" in mine
    else:
        assert f"stdout: {DOMAIN_XML_MAX}" in mine
        assert f"xml: rewritten ({DOMAIN_XML_MAX} bytes); later scripts get it on stdin" in mine


def test_a_stdin_past_the_bound_is_not_admitted_by_halves(host):
    """With admission on, a domain XML on stdin past the bound admits the guest unchecked and
    the scripts get none, not what was left of the stream."""
    conf(host, "[capacity]\nadmission = enforce\n")
    host.script("all_size", "wc -c\n")
    result = host.hook("vm1", "prepare", "begin", "-", xml=padded(DOMAIN_XML_MAX + 1))
    assert result.returncode == 0
    assert "stdout: 0" in texts(host, "all_size")
    assert any("larger than" in t and "admitted unchecked" in t for t in texts(host))


def test_kvmhook_conf_and_status_files_past_their_bound_are_refused(host):
    """A huge kvmhook.conf falls back to the defaults and a huge status file is not counted:
    both logged, never read whole, the guest admitted."""
    conf(host, "[capacity]\nadmission = enforce\n")
    recorder(host, "all_x")
    status = host.root / "run/libvirt/qemu/big.xml"
    status.parent.mkdir(parents=True)
    with status.open("wb") as sparse:
        sparse.truncate(DOMAIN_XML_MAX + 1)
    domain = b"<domain><name>vm1</name><memory>1024</memory></domain>"
    assert host.hook("vm1", "prepare", "begin", "-", xml=domain).returncode == 0
    assert f"admission: {status} not counted: larger than {DOMAIN_XML_MAX} bytes" in texts(host)
    with (host.root / "etc/kvmhook/kvmhook.conf").open("ab") as grown:
        grown.truncate(CONF_MAX + 1)
    assert host.hook("vm1", "prepare", "begin", "-", xml=domain).returncode == 0
    assert any(f"larger than {CONF_MAX} bytes; defaults apply" in t for t in texts(host))
    assert ran(host) == ["all_x", "all_x"]


# --- 5: the log is never reached through a link, nor in a directory others can write -----


def test_a_link_as_the_log_is_refused_and_its_target_untouched(host):
    """A symlink in the log's place gets no record (its target stays as it was), stderr says
    why, and the scripts still run."""
    target = host.root / "etc/passwd"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("root:x:0:0:root:/root:/bin/sh\n")
    host.log.parent.mkdir(parents=True)
    host.log.symlink_to(target)
    recorder(host, "all_x")
    result = host.hook("vm1", "start", "begin", "-", xml=XML)
    assert (result.returncode, ran(host)) == (0, ["all_x"])
    assert target.read_text() == "root:x:0:0:root:/root:/bin/sh\n"
    assert f"cannot write the log {host.log}: it is a symbolic link" in result.stderr.decode()


def test_a_dangling_link_as_the_log_creates_nothing(host):
    """A dangling symlink in the log's place does not make the hook create its target."""
    host.log.parent.mkdir(parents=True)
    host.log.symlink_to(host.root / "created-by-the-hook")
    recorder(host, "all_x")
    result = host.hook("vm1", "start", "begin", "-", xml=XML)
    assert (result.returncode, ran(host)) == (0, ["all_x"])
    assert not (host.root / "created-by-the-hook").exists()
    assert b"it is a symbolic link" in result.stderr


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757])
def test_a_log_directory_others_can_write_is_refused(host, mode):
    """A log directory writable by others (sticky or not) is refused, with the reason on
    stderr; the scripts run and the veto's exit status stands."""
    host.log.parent.mkdir(parents=True)
    os.chmod(host.log.parent, mode)
    conf(host, ABORT)
    host.script("all_x", "exit 3\n")
    result = host.hook("vm1", "start", "begin", "-", xml=XML)
    assert result.returncode == 1
    assert not host.log.exists()
    assert f"its directory {host.log.parent} is writable by others" in result.stderr.decode()
    assert "custom script all_x: exit 3" in result.stderr.decode()


# --- 6: a missing TMPDIR --------------------------------------------------------------------


def test_a_missing_tmpdir_falls_back_to_tmp_and_keeps_the_veto(host):
    """With TMPDIR missing the rewrite file is made under /tmp: scripts run, the rewrite
    reaches libvirt, and the veto policy still applies."""
    bridge_rewriter(host)
    env = host.env(TMPDIR=str(host.root / "nonexistent"))
    result = host.hook("vm1", "migrate", "begin", "-", xml=XML, env=env)
    assert (result.returncode, result.stdout) == (0, REWRITTEN)
    conf(host, ABORT)
    host.script("migrate_20-fail", "exit 4\n")
    result = host.hook("vm1", "migrate", "begin", "-", xml=XML, env=env)
    assert (result.returncode, result.stdout) == (1, b"")
    assert not [t for t in texts(host) if "internal error" in t]


def _can_remount_tmp() -> bool:
    probe = "mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp"
    command = ["unshare", "--mount", "sh", "-c", probe]
    try:
        return subprocess.run(command, capture_output=True, check=False).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_remount_tmp(), reason="needs unshare --mount (root) for a ro /tmp")
def test_without_any_private_directory_scripts_run_without_the_rewrite_file(host):
    """With TMPDIR missing and /tmp read-only, the scripts run without $KVMHOOK_XML_OUT and
    the log says why, naming both places."""
    host.script("migrate_10-look", 'echo "out=${KVMHOOK_XML_OUT-unset}"\n')
    logs = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        log = logs / "hook.log"
        remount = 'mount --bind /tmp /tmp && mount -o remount,ro,bind /tmp && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", remount, "sh", sys.executable, "-m"]
        env = host.env(TMPDIR="/nonexistent", KVMHOOK_LOG_FILE=str(log))
        result = subprocess.run(
            [*command, "kvmhook.qemu", "vm1", "migrate", "begin", "-"],
            input=XML,
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stdout) == (0, b"")
        written = log.read_text()
    finally:
        for child in logs.iterdir():
            child.unlink()
        logs.rmdir()
    assert "stdout: out=unset" in written
    assert "xml: scripts run without $KVMHOOK_XML_OUT" in written
    assert "/nonexistent: No such file or directory; /tmp: Read-only file system" in written
    assert stat.S_ISDIR(os.stat("/tmp").st_mode)


# --- the log's lock: someone who can open the log must not hold every hook --------------


def test_a_log_locked_for_ever_delays_the_hook_once_never_blocks_it(host):
    """A process holding the log's flock for ever costs the hook one LOCK_WAIT, not a hang."""
    from kvmhook.hook.hooklog import LOCK_WAIT

    recorder(host, "all_10-a")
    recorder(host, "all_20-b")
    host.log.parent.mkdir(parents=True, exist_ok=True)
    host.log.touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('locked', flush=True); time.sleep(600)",
            str(host.log),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        result = host.hook("vm1", "start", "begin", "-", timeout=4 * LOCK_WAIT)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0
    assert ran(host) == ["all_10-a", "all_20-b"]
    assert LOCK_WAIT <= took < 2 * LOCK_WAIT, took  # one wait, not one per record
    assert b"stayed locked" in result.stderr
    assert any(t.startswith("end: exit 0") for t in texts(host, "all_20-b"))
