"""`kvmhook hooks log` on hostile logs: never a traceback, never a terminal escape.

Bad files and records (a cut or corrupt .gz, a FIFO, a directory, a link, an
impossible date or number) are reported once on stderr and skipped; output is
valid UTF-8 with nothing a terminal would act on; --since out of range is a
usage error; memory stays bounded whatever the size of a line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sandbox import cli_runner

from kvmhook.cli import main
from kvmhook.hook import hooklog, hooklogview
from kvmhook.hook.hooklog import quote

# What a terminal would act on: C0 controls but newline, DEL, C1 controls, line
# and paragraph separators, bidi controls.
UNSAFE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
FORGED = "2026-11-24 13:45:01.123 +0000 pid=666 domain=forged op=start subop=- script=- owned"


def record(
    text: str, domain: str = "vm1", pid: str = "7", script: str = "-", when: str = ""
) -> str:
    """One log line as HookLog formats it (now, unless `when`)."""
    when = when or time.strftime("%Y-%m-%d %H:%M:%S.000 %z")
    return (
        f"{when} pid={pid} domain={quote(domain)} op=start subop=- script={quote(script)} {text}\n"
    )


def run_pair(domain: str, script: str, end: str, pid: str = "7") -> str:
    """A script's start record and its end record with text `end`."""
    start = record(f"start: /x/{script} (timeout 600s)", domain, pid, script)
    return start + record(f"end: {end}", domain, pid, script)


def invoke(host, *args: str):
    """`kvmhook hooks log ARGS` in-process (CliRunner, stderr apart): exit code and streams."""
    env = {"KVMHOOK_ROOT": str(host.root), "KVMHOOK_LOG_FILE": None}
    return cli_runner().invoke(main, ["hooks", "log", *args], env=env)


def command(host, *args: str, timeout: float = 30, **popen) -> subprocess.CompletedProcess:
    """The real `kvmhook hooks log ARGS` process, under a strict UTF-8 stdout and stderr."""
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root), "PYTHONIOENCODING": "utf-8:strict"}
    env.pop("KVMHOOK_LOG_FILE", None)
    return subprocess.run(
        [sys.executable, "-c", "from kvmhook.cli import main; main()", "hooks", "log", *args],
        capture_output=True,
        env=env,
        timeout=timeout,
        check=False,
        **popen,
    )


def domains(stdout: bytes) -> list[str]:
    """The domains of the `--json` rows in `stdout`, which must be strict UTF-8 JSON lines."""
    return [json.loads(line)["domain"] for line in stdout.decode("utf-8").splitlines()]


def warnings(stderr: str) -> list[str]:
    """The `warning:` lines on stderr."""
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def write_log(host, name: str, text: str) -> Path:
    """`text` as the log file `name` (qemu-hook.log, .1, ...) of the sandbox."""
    path = host.log.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def gzipped(lines: int, domain: str) -> bytes:
    """A gzip file of `lines` hook-level records for `domain`, as logrotate makes them."""
    return gzip.compress(record("no scripts for start", domain).encode() * lines)


# --- item 13: bad files and records are skipped and reported -----------------


@pytest.mark.parametrize("damage", ["cut", "corrupt", "not gzip"])
def test_damaged_gz_is_reported_and_every_other_file_still_shows(host, damage):
    """A cut, corrupt or non-gzip .gz is reported once; the other files' runs all show, exit 0."""
    data = gzipped(3000, "packed")
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "corrupt":
        data = data[:30] + bytes(b ^ 0xFF for b in data[30:60]) + data[60:]
    else:
        data = b"plain text, not gzip\n"
    write_log(host, "qemu-hook.log.3.gz", "").write_bytes(data)
    write_log(host, "qemu-hook.log.2.gz", "").write_bytes(gzipped(1, "older"))
    write_log(host, "qemu-hook.log.1", record("no scripts for start", "old"))
    write_log(host, "qemu-hook.log", record("no scripts for start", "live"))
    result = invoke(host, "--json")
    assert result.exit_code == 0, (result.exception, result.stderr)
    shown = domains(result.stdout_bytes)
    assert shown[-3:] == ["older", "old", "live"] and set(shown[:-3]) <= {"packed"}
    assert ("packed" in shown) == (damage == "cut")  # what came before the cut still shows
    (warning,) = warnings(result.stderr)
    assert "qemu-hook.log.3.gz" in warning and "skipped" in warning


def test_invalid_utf8_in_a_logged_name_prints_under_strict_utf8(host):
    """A guest name that was not UTF-8 shows as \\xNN in the table and --json, exit 0."""
    host.script("start_10-ok", "exit 0\n")
    assert host.hook(b"bad\xffname", "start", "begin", "-").returncode == 0
    # The line as the writer at cab735b wrote such a name (os.fsdecode, backslashreplace).
    write_log(
        host,
        "qemu-hook.log.1",
        '2026-11-24 13:45:01.123 +0000 pid=1 domain="a\\udcffb"'
        " op=start subop=- script=- no scripts for start\n",
    )
    table = command(host)
    assert table.returncode == 0, table.stderr
    assert "a\\xffb" in table.stdout.decode("utf-8")
    as_json = command(host, "--json")
    assert as_json.returncode == 0, as_json.stderr
    first, *hook_rows = domains(as_json.stdout)
    assert first == "a\\xffb" and hook_rows and all("bad" in d for d in hook_rows)
    chosen = command(host, "--json", "--domain", os.fsdecode(b"a\xffb"))
    assert domains(chosen.stdout) == ["a\\xffb"]


@pytest.mark.parametrize(
    ("bad", "unfinished"),
    [
        (record("no scripts", "baddate", when="2026-99-99 13:45:01.123 +0000"), []),
        (record("no scripts", "badzone", when="2026-11-24 13:45:01.123 +2599"), []),
        (record("no scripts", "hugepid", pid="9" * 5000), []),
        # The start is a good record: with its end skipped, the run shows unfinished.
        (run_pair("hugeexit", "start_10-x", f"exit {'9' * 5000} after 0.1s"), ["hugeexit"]),
        (run_pair("infinite", "start_10-x", f"exit 0 after {'9' * 400}.5s"), ["infinite"]),
    ],
    ids=["date 2026-99-99", "offset +2599", "pid 5000 digits", "exit 5000 digits", "duration inf"],
)
def test_impossible_record_is_reported_and_skipped(host, bad, unfinished):
    """A record with an impossible time, pid, exit or duration is skipped, with one warning."""
    good = record("no scripts for start", "before"), record("no scripts for start", "after")
    write_log(host, "qemu-hook.log", good[0] + bad * 3 + good[1])
    for args in (["--json"], ["--json", "--since", "1h"]):
        result = invoke(host, *args)
        assert result.exit_code == 0, (result.exception, result.stderr)
        assert domains(result.stdout_bytes) == ["before", "after", *unfinished]
        first, more = warnings(result.stderr)
        assert re.search(r"qemu-hook\.log: line \d+ skipped: ", first), first
        assert "2 more lines skipped" in more


@pytest.mark.parametrize(
    "since", ["99999999999999d", "1" + "0" * 5000 + "d", "36501d", "0001-01-01"]
)
def test_since_out_of_range_is_a_usage_error_naming_the_range(host, since):
    """--since over 100 years ago, or a date datetime cannot hold, exits 2 naming the range."""
    result = invoke(host, "--since", since)
    assert result.exit_code == 2, (result.exception, result.stderr)
    assert "--since" in result.stderr and "out of range" in result.stderr
    assert "36500d" in result.stderr or "0001-01-02" in result.stderr
    assert len(result.stderr) < 500
    assert invoke(host, "--since", "36500d").exit_code == 0


# --- hostile files: never hang, never follow, never a traceback ---------------


def plant(path: Path, kind: str) -> None:
    """Something other than a regular file at `path`: a FIFO, a directory, or links."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        target = path.parent.parent / "elsewhere.log"
        target.write_text(record("no scripts for start", "linked"))
        path.symlink_to(target)
    else:
        path.symlink_to(path.parent / "nowhere")


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "dangling symlink"])
@pytest.mark.parametrize("name", ["qemu-hook.log", "qemu-hook.log.1"])
def test_non_regular_log_file_is_reported_and_skipped(host, kind, name):
    """A FIFO, directory or link as the log or a rotated file: one warning, the rest shows."""
    write_log(host, "qemu-hook.log.2", record("no scripts for start", "old"))
    if name != "qemu-hook.log":
        write_log(host, "qemu-hook.log", record("no scripts for start", "live"))
    plant(host.log.parent / name, kind)
    result = command(host, "--json", timeout=20)
    assert result.returncode == 0, result.stderr
    assert domains(result.stdout) == ["old", "live"][: 2 if name != "qemu-hook.log" else 1]
    (warning,) = warnings(result.stderr.decode())
    assert f"{name}: " in warning and warning.endswith("; skipped"), warning


def test_a_fifo_is_never_opened(host):
    """A FIFO in a log's place is looked at, not opened: a writer waiting on it stays blocked."""
    write_log(host, "qemu-hook.log", record("no scripts for start", "live"))
    fifo = host.log.parent / "qemu-hook.log.1"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"echo '{FORGED}' > {fifo}"])
    try:
        result = command(host, "--json", timeout=20)
        time.sleep(0.5)
        assert writer.poll() is None, "the viewer opened the FIFO"
    finally:
        writer.kill()
        writer.wait()
    assert domains(result.stdout) == ["live"]
    assert "qemu-hook.log.1: a FIFO, not a regular file; skipped" in result.stderr.decode()


def test_unreadable_rotated_file_is_reported_and_skipped(host):
    """A rotated file the user cannot read is one warning; the live log still shows."""
    top = Path(tempfile.mkdtemp())  # outside pytest's 0700 tmp dir: another user must reach it
    try:
        os.chmod(top, 0o755)
        shutil.copytree(host.root, top / "root")
        logs = top / "root" / host.log.relative_to(host.root).parent
        logs.mkdir(parents=True)
        (logs / "qemu-hook.log").write_text(record("no scripts for start", "live"))
        (logs / "qemu-hook.log.1").write_text(record("no scripts for start", "secret"))
        os.chmod(logs / "qemu-hook.log.1", 0)
        host.root = top / "root"
        # root reads anything: the command runs as nobody then.
        as_nobody = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
        result = command(host, "--json", **as_nobody)
    finally:
        shutil.rmtree(top)
    assert result.returncode == 0, result.stderr
    assert domains(result.stdout) == ["live"]
    (warning,) = warnings(result.stderr.decode())
    assert "qemu-hook.log.1: Permission denied; skipped" in warning


def test_closed_stdout_is_one_clear_error(host):
    """With fd 1 closed, the command says so in one line on stderr and exits 1, no traceback."""
    write_log(host, "qemu-hook.log", record("no scripts for start", "live"))
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root)}
    env.pop("KVMHOOK_LOG_FILE", None)
    python = f"{sys.executable} -c 'from kvmhook.cli import main; main()'"
    result = subprocess.run(
        ["sh", "-c", f"exec >&-; exec {python} hooks log"],
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "Error: no standard output to show the runs on (fd 1 is closed)\n"
    )


def peak_rss_kib(argv: list[str], env: dict[str, str]) -> int:
    """The peak resident memory of the command `argv`, in KiB."""
    probe = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *argv], env=env, capture_output=True, timeout=120, check=True
    )
    return int(out.stdout)


def test_a_huge_line_is_read_in_bounded_memory(host):
    """A 256 MiB log line (no newline) is read in bounded memory, and the lines after it show."""
    write_log(host, "qemu-hook.log.1", "")
    with open(host.log.parent / "qemu-hook.log.1", "r+b") as huge:
        huge.truncate(256 * 1024 * 1024)  # sparse: costs no disk
        huge.seek(0, os.SEEK_END)
        huge.write(b"\n" + record("no scripts for start", "after").encode())
    write_log(host, "qemu-hook.log", record("no scripts for start", "live"))
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root)}
    env.pop("KVMHOOK_LOG_FILE", None)
    argv = [sys.executable, "-c", "from kvmhook.cli import main; main()", "hooks", "log"]
    assert peak_rss_kib(argv, env) < 100 * 1024
    result = command(host, "--json")
    assert domains(result.stdout) == ["after", "live"]
    (warning,) = warnings(result.stderr.decode())
    assert "qemu-hook.log.1: line 1 skipped: not a log record" in warning


# --- --follow on hostile files ----------------------------------------------


class Follower:
    """A running `kvmhook hooks log --follow --json` whose output is read without blocking."""

    def __init__(self, host) -> None:
        env = {**os.environ, "KVMHOOK_ROOT": str(host.root), "PYTHONIOENCODING": "utf-8:strict"}
        env.pop("KVMHOOK_LOG_FILE", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from kvmhook.cli import main; main()",
                "hooks",
                "log",
                "--follow",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.selector = selectors.DefaultSelector()
        self.seen = {"stdout": b"", "stderr": b""}
        for name in self.seen:
            self.selector.register(getattr(self.process, name), selectors.EVENT_READ, name)

    def wait_for(self, stream: str, text: bytes, timeout: float = 20) -> bytes:
        """What `stream` carried until it held `text` (fails after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[stream]:
            assert time.monotonic() < deadline, f"{text!r} never came: {self.seen}"
            for key, _ in self.selector.select(timeout=0.2):
                data = os.read(key.fileobj.fileno(), 65536)
                assert data, f"follow exited: {self.seen}"
                self.seen[key.data] += data
        return self.seen[stream]

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()


def test_follow_waits_out_a_fifo_in_the_logs_place(host):
    """--follow with a FIFO as the live log warns once, does not hang, reads the file after it."""
    write_log(host, "qemu-hook.log.1", record("no scripts for start", "old"))
    os.mkfifo(host.log)
    follower = Follower(host)
    try:
        follower.wait_for("stdout", b'"old"')
        follower.wait_for("stderr", b"a FIFO, not a regular file")
        host.log.unlink()
        host.log.write_text(record("no scripts for start", "new"))
        follower.wait_for("stdout", b'"new"')
        assert follower.seen["stderr"].count(b"warning: ") == 1
    finally:
        follower.stop()


def test_follow_reads_a_huge_live_log_in_bounded_memory(host):
    """--follow on a 256 MiB live log without newlines keeps memory bounded and shows later runs."""
    write_log(host, "qemu-hook.log", "")
    with open(host.log, "r+b") as huge:
        huge.truncate(256 * 1024 * 1024)
    follower = Follower(host)
    try:
        with open(host.log, "ab") as log:
            log.write(b"\n" + record("no scripts for start", "appended").encode())
        follower.wait_for("stdout", b'"appended"')
        assert follower.peak_rss_kib() < 100 * 1024
    finally:
        follower.stop()


# --- item 3 (viewer side): nothing reaches the terminal ----------------------

HOSTILE = "vm\x1b]0;owned\x07\x1b[2J\x9b31m\u202etxt.exe\u2028\ttab\x7f"


def test_escapes_in_any_field_or_text_never_reach_the_terminal(host):
    """Controls, C1, bidi and separators in fields and texts print escaped; --json keeps values."""
    raw_text = "no scripts\x1b[31m red\r" + FORGED
    write_log(
        host,
        "qemu-hook.log",
        record(raw_text, HOSTILE)
        + run_pair(HOSTILE, "start_10\x1b[5m", "killed by SIG\x1b[2J\u202e after 0.5s")
        + record("ignored: start_20\x1b]8;;x\x07: not executable", "vm2", script="start_20"),
    )
    fire_hook = host.hook(HOSTILE, "stopped", "end", "-")
    assert fire_hook.returncode == 0
    table = command(host)
    as_json = command(host, "--json")
    for result in (table, as_json):
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode("utf-8")
        assert not UNSAFE.search(text), UNSAFE.findall(text)
    assert "\\x1b]0;owned\\x07" in table.stdout.decode() and "\\u202e" in table.stdout.decode()
    rows = [json.loads(line) for line in as_json.stdout.decode().splitlines()]
    assert [row["domain"] for row in rows] == [HOSTILE, HOSTILE, "vm2", HOSTILE]
    assert rows[1]["signal"] == "SIG\x1b[2J\u202e" and rows[0]["result"] == raw_text


@pytest.mark.parametrize("separator", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_one_physical_line_is_at_most_one_record(host, separator):
    """A line with a forged record after a line separator other than \\n is one row, never two."""
    write_log(
        host,
        "qemu-hook.log",
        record(f"no scripts{separator}{FORGED}", "real") + f"junk {FORGED}\n",
    )
    for args in ([], ["--json"]):
        result = command(host, *args)
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode("utf-8")
        assert not UNSAFE.search(text)
        assert len(text.splitlines()) == (1 if args else 2)
    assert domains(command(host, "--json").stdout) == ["real"]


@given(st.binary(max_size=300), st.text(max_size=40))
def test_any_line_parses_to_a_printable_row_or_bad_record(junk, name):
    """parse() of any bytes raises nothing but BadRecord; every row it yields prints safely."""
    lines = [junk.decode("utf-8", "backslashreplace"), record(name, name).rstrip("\n")]
    for line in lines:
        try:
            parsed = hooklog.parse(line)
        except hooklog.BadRecord:
            continue
        row = hooklogview.LogRow(parsed, parsed.text)
        shown = hooklogview.table_row(row) + hooklogview.json_line(row)
        assert not UNSAFE.search(shown)
        shown.encode("utf-8")
