"""Behaviour of the real hook, run as a process the way libvirtd runs it.

Covers the issue's rules 1-5, 11 and 12 and the installed launcher. Scripts
record that they ran by appending their own file name to `<root>/ran`.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from sandbox import LAUNCHER_TEMPLATE, LEFTOVERS, OPERATIONS, field

ARGS = ("vm1", "start", "begin", "-")
VALUE = r'(?:[A-Za-z0-9_.:+@,/%-]+|"(?:[^"\\]|\\.)*")'
RECORD = re.compile(
    r"^(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}) pid=(?P<pid>\d+) "
    rf"domain=(?P<domain>{VALUE}) op=(?P<op>{VALUE}) subop=(?P<subop>{VALUE}) "
    rf"script=(?P<script>{VALUE}) (?P<text>.*)$"
)


def recorder(host, name, **kwargs):
    """A script that appends its own file name to `<root>/ran`."""
    return host.script(name, f'basename "$0" >> "{host.root}/ran"\n', **kwargs)


def ran(host) -> list[bytes]:
    """File names of the scripts that ran, in the order they ran."""
    path = host.root / "ran"
    return path.read_bytes().splitlines() if path.exists() else []


def lines(host) -> list[str]:
    """The log's lines, decoded as UTF-8 and split on newline only."""
    data = host.log.read_bytes()
    assert data.endswith(b"\n")
    return data.decode("utf-8").split("\n")[:-1]


def parsed(record: str) -> re.Match:
    match = RECORD.match(record)
    assert match, f"not a record: {record!r}"
    return match


def unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    return re.sub(
        r"\\(x[0-9a-f]{2}|.)",
        lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3 else m.group(1),
        value[1:-1],
    )


def texts(host, script: str | None = None) -> list[str]:
    """The text part of every record (of `script` only, if given)."""
    found = [parsed(record) for record in lines(host)]
    return [m["text"] for m in found if script is None or unquote(m["script"]) == script]


def assert_quiet_success(result):
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""


# --- rule 1: arguments and operations ------------------------------------------


@pytest.mark.parametrize("operation", ["foo", "Start", "all", "", "start "])
def test_unknown_operation_logged_nothing_runs(host, operation):
    """An unknown operation is logged with the arguments, runs no script and exits 0."""
    recorder(host, "all_x")
    recorder(host, "start_x")
    result = host.hook("vm1", operation, "begin", "-")
    assert_quiet_success(result)
    assert ran(host) == []
    (text,) = texts(host)
    assert f"unknown operation {operation!r}" in text
    assert f"'vm1' {operation!r} 'begin' '-'" in text


@pytest.mark.parametrize(
    "args",
    [(), ("vm1",), ("vm1", "start", "begin"), ("vm1", "start", "begin", "-", "extra")],
    ids=["0", "1", "3", "5"],
)
def test_wrong_argument_count_logged_nothing_runs(host, args):
    """A call without exactly 4 arguments is logged with them, runs nothing and exits 0."""
    recorder(host, "all_x")
    recorder(host, "start_x")
    result = host.hook(*args)
    assert_quiet_success(result)
    assert ran(host) == []
    (text,) = texts(host)
    assert f"wrong number of arguments ({len(args)}, expected 4)" in text
    for arg in args:
        assert repr(arg) in text


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_runs_its_own_and_all_scripts(host, operation):
    """Each valid operation runs `<op>_x` and `all_x`, and no other operation's script."""
    for other in OPERATIONS:
        recorder(host, f"{other}_x")
    recorder(host, "all_x")
    result = host.hook("vm1", operation, "begin", "-")
    assert_quiet_success(result)
    assert ran(host) == [b"all_x", f"{operation}_x".encode()]


# --- rule 2: discovery ----------------------------------------------------------


def test_only_qualifying_names_run(host):
    """Only `start_<rest>`/`all_<rest>` with non-empty rest run for start."""
    for name in ("start_", "all_", "startx", "foo_bar", "started_x", "stopped_x", "x_start"):
        recorder(host, name)
    recorder(host, "start_ok")
    recorder(host, "all_ok")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_ok", b"start_ok"]


def test_leftovers_never_run(host):
    """Editor and package-manager leftovers never run, even with qualifying names."""
    for suffix in LEFTOVERS:
        recorder(host, "all_a" + suffix)
        recorder(host, "start_b" + suffix)
    recorder(host, "all_z")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_z"]


def test_symlink_to_regular_file_runs(host):
    """A symlink in the custom dir to a safe regular file elsewhere runs."""
    library = host.root / "lib"
    library.mkdir(mode=0o755)
    os.chmod(library, 0o755)
    target = recorder(host, "real-script", directory=library)
    (host.custom / "all_link").symlink_to(target)
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_link"]  # $0 is the link


def test_non_regular_entries_skipped_broken_link_logged(host, monkeypatch):
    """A directory, broken link, fifo and socket never run; the broken link is logged."""
    (host.custom / "all_dir").mkdir(mode=0o755)
    os.chmod(host.custom / "all_dir", 0o755)
    (host.custom / "all_broken").symlink_to(host.root / "missing")
    os.mkfifo(host.custom / "all_fifo", 0o755)
    monkeypatch.chdir(host.custom)  # keeps the socket path under AF_UNIX's length limit
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("all_sock")
        os.chmod("all_sock", 0o755)
        recorder(host, "all_z")
        assert_quiet_success(host.hook(*ARGS, timeout=20))
    finally:
        sock.close()
    assert ran(host) == [b"all_z"]
    assert texts(host, "all_broken") == ["ignored: broken symbolic link"]
    for name in ("all_dir", "all_fifo", "all_sock", "all_broken"):
        assert not [text for text in texts(host, name) if text.startswith(("start:", "end:"))]


# --- rule 3: order --------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "operation", "order"),
    [
        (["all_cde.sh", "migrate_abc.py"], "migrate", [b"migrate_abc.py", b"all_cde.sh"]),
        (["start_x", "all_x"], "start", [b"all_x", b"start_x"]),
        (["all_a", "all__x", "all_B"], "start", [b"all_B", b"all__x", b"all_a"]),
    ],
)
def test_order_examples_from_the_issue(host, files, operation, order):
    """The issue's ordering examples hold for the real hook."""
    for name in files:
        recorder(host, name)
    assert_quiet_success(host.hook("vm1", operation, "begin", "-"))
    assert ran(host) == order


# U+E000 (EE 80 80) sorts before the undecodable FF as bytes, after it as decoded text.
UNICODE_ORDER = [
    b"all_ leading space",
    b"all_Z",
    b"all_a",
    b"all_a b c",
    b"all_z",
    "all_é".encode(),
    "all_ü".encode(),
    "all_\ue000".encode(),
    b"all_\xff",
]


@pytest.mark.parametrize(
    "locale_env",
    [
        {"LC_ALL": "C"},
        {"LC_ALL": "C.UTF-8"},
        {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
        {"LANG": "C.UTF-8", "PYTHONUTF8": "1"},
    ],
    ids=["C", "C.UTF-8", "C-ascii-fs", "utf8-mode"],
)
def test_unicode_names_run_in_byte_order_in_any_locale(host, locale_env):
    """Names with spaces, unicode or undecodable bytes run in byte order whatever the locale."""
    for name in reversed(UNICODE_ORDER):
        recorder(host, os.fsdecode(name))
    env = host.env(**locale_env)
    if "LC_ALL" not in locale_env:
        del env["LC_ALL"]
    assert_quiet_success(host.hook(*ARGS, env=env))
    assert ran(host) == UNICODE_ORDER


# --- rule 4: executability --------------------------------------------------------


def test_non_executable_script_logged_and_not_run(host):
    """A qualifying script without execute permission is logged as ignored and not run."""
    recorder(host, "all_noexec", mode=0o644)
    recorder(host, "all_yes")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_yes"]
    (text,) = texts(host, "all_noexec")
    assert text.startswith("ignored: ") and "not executable" in text and "0644" in text


# --- rule 5: security ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_script_writable_by_group_or_others_refused(host, mode):
    """A script writable by group or others is refused with the reason and not run."""
    recorder(host, "all_bad", mode=mode)
    recorder(host, "all_good")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_good"]
    (text,) = texts(host, "all_bad")
    assert text.startswith("ignored: refused: ")
    assert f"writable by group or others (mode {mode:04o})" in text


def test_script_owned_by_another_user_refused(host):
    """A script owned by uid 65534 is refused with the reason and not run."""
    os.chown(recorder(host, "all_theirs"), 65534, 65534)
    recorder(host, "all_ours")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_ours"]
    (text,) = texts(host, "all_theirs")
    assert "refused" in text and "owned by uid 65534" in text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda host: os.chmod(host.custom, 0o777), "writable by group or others (mode 0777)"),
        (lambda host: os.chmod(host.custom, 0o775), "writable by group or others (mode 0775)"),
        (lambda host: os.chown(host.custom, 65534, 0), "owned by uid 65534"),
        (lambda host: os.chmod(host.custom.parent, 0o757), "writable by group or others"),
    ],
    ids=["dir-0777", "dir-0775", "dir-uid-65534", "parent-0757"],
)
def test_unsafe_custom_dir_runs_nothing(host, change, words):
    """A custom dir (or its parent) that others could change runs nothing and says why."""
    recorder(host, "all_x")
    change(host)
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == []
    (text,) = texts(host)
    assert text.startswith("no scripts run: refused custom dir")
    assert words in text


@pytest.mark.parametrize(
    ("mode", "runs"),
    [(0o777, False), (0o757, False), (0o1777, True)],
    ids=["0777", "0757", "1777-sticky"],
)
def test_symlink_target_in_writable_directory(host, mode, runs):
    """A linked script in a world-writable non-sticky dir is refused; a sticky one is fine."""
    shared = host.root / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    target = recorder(host, "target", directory=shared)
    (host.custom / "all_link").symlink_to(target)
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == ([b"all_link"] if runs else [])
    if not runs:
        (text,) = texts(host, "all_link")
        assert "refused" in text and f"{shared} is writable by group or others" in text


def test_symlink_through_link_in_writable_directory_refused(host):
    """A script reached via a link in a world-writable dir is refused: others can swap it."""
    safe = host.root / "safe"
    safe.mkdir()
    os.chmod(safe, 0o755)
    target = recorder(host, "target", directory=safe)
    world = host.root / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    (world / "hop").symlink_to(target)  # anyone may replace this link
    (host.custom / "all_link").symlink_to(world / "hop")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == []
    assert any("refused" in text for text in texts(host, "all_link"))


# --- rule 11: the log ------------------------------------------------------------------


def test_every_record_carries_time_pid_domain_op_subop_script(host):
    """Every record of a run has ms timestamp, the hook's pid, domain, op, subop and script."""
    host.script(
        "all_talk",
        "for i in 1 2 3 4 5; do echo out $i; echo err $i >&2; done\n",
    )
    host.script("all_noexec", "true\n", mode=0o644)
    before = datetime.datetime.now(datetime.timezone.utc)
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmhook.qemu", "vm1", "started", "begin", "-"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=host.env(KVMHOOK_TERM_GRACE="nope"),
    )
    stdout, stderr = process.communicate(timeout=60)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert (process.returncode, stdout) == (0, b""), stderr
    records = lines(host)
    assert len(records) >= 14  # config + ignored + start + 10 output lines + end
    for record in records:
        match = parsed(record)
        stamp = datetime.datetime.strptime(match["date"], "%Y-%m-%d %H:%M:%S.%f %z")
        assert before - datetime.timedelta(seconds=1) <= stamp <= after
        assert int(match["pid"]) == process.pid
        assert (field(record, "domain"), field(record, "op"), field(record, "subop")) == (
            "vm1",
            "started",
            "begin",
        )
        assert field(record, "script") in ("-", "all_talk", "all_noexec")
    talk = texts(host, "all_talk")
    assert talk[0].startswith("start: ") and talk[-1].startswith("end: exit 0")
    # Two pipes: each stream keeps its order; how they interleave depends on timing.
    assert [t for t in talk if t.startswith("stdout: ")] == [
        f"stdout: out {i}" for i in range(1, 6)
    ]
    assert [t for t in talk if t.startswith("stderr: ")] == [
        f"stderr: err {i}" for i in range(1, 6)
    ]
    assert len(talk) == 12
    assert any("config: KVMHOOK_TERM_GRACE='nope'" in text for text in texts(host, "-"))


@pytest.mark.parametrize(
    "domain",
    ["my vm", 'vm "quoted"', "vmé-ü", "back\\slash", "new\nline", "tab\tvm", "", "a=b script=x"],
)
def test_odd_domain_names_are_quoted_and_keep_one_line_per_record(host, domain):
    """A domain with spaces, quotes, unicode or controls is quoted; each record stays one line."""
    host.script("all_x", "echo hello\n")
    assert_quiet_success(host.hook(domain, "start", "begin", "-"))
    records = lines(host)
    assert len(records) == 3  # start, stdout, end
    for record in records:
        match = parsed(record)
        assert unquote(match["domain"]) == domain
        assert match["script"] == "all_x"
    assert parsed(records[1])["text"] == "stdout: hello"


CHATTY = """#!{python} -I
import random, sys, time
domain = sys.argv[1]
for i in range(200):
    stream = sys.stdout if i % 3 else sys.stderr
    stream.write(f"{{domain}} line {{i:03d}} " + "x" * 1200 + "\\n")
    stream.flush()
    if random.random() < 0.1:
        time.sleep(random.random() / 200)
"""


def test_concurrent_hooks_keep_each_block_contiguous(host):
    """50 hooks at once: each script's output and end line form one uninterrupted block."""
    # ~250 KB per block: several write pieces, so only the lock keeps a block whole.
    host.script("all_chatty", CHATTY.format(python=sys.executable))
    domains = [f"vm{i:02d}" for i in range(50)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "kvmhook.qemu", domain, "start", "begin", "-"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=host.env(),
        )
        for domain in domains
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert (process.returncode, stdout, stderr) == (0, b"", b"")
    records = [parsed(record) for record in lines(host)]
    assert len(records) == 50 * 202
    owners = [m["domain"] for m in records]
    for domain in domains:
        mine = [i for i, owner in enumerate(owners) if owner == domain]
        assert len(mine) == 202
        output = [i for i in mine if records[i]["text"].startswith(("stdout: ", "stderr: "))]
        (end,) = [i for i in mine if records[i]["text"].startswith("end: ")]
        assert len(output) == 200 and output[-1] < end
        block = records[output[0] : end + 1]
        assert [m["domain"] for m in block] == [domain] * 201, f"{domain}'s block is interleaved"
        assert all(m["text"].split(": ", 1)[1].startswith(domain) for m in block[:-1])


def test_log_directory_created_when_missing(host):
    """The hook creates the missing log directory (and parents) and writes its records."""
    assert not (host.root / "var").exists()
    recorder(host, "all_x")
    assert_quiet_success(host.hook(*ARGS))
    assert host.log.parent.is_dir()
    assert ran(host) == [b"all_x"]
    assert texts(host, "all_x")[-1].startswith("end: exit 0")


def _log_is_a_directory(host):
    host.log.mkdir(parents=True)


def _var_log_is_a_file(host):
    (host.root / "var").mkdir()
    (host.root / "var/log").write_text("not a directory\n")


@pytest.mark.parametrize(
    ("breakage", "why"),
    [(_log_is_a_directory, "Is a directory"), (_var_log_is_a_file, "Not a directory")],
    ids=["log-is-dir", "var-log-is-file"],
)
def test_unwritable_log_scripts_still_run_and_stderr_says_why(host, breakage, why):
    """With an unwritable log, scripts still run, exit is 0, stderr says why once."""
    breakage(host)
    recorder(host, "all_a")
    recorder(host, "all_b")
    result = host.hook(*ARGS)
    assert_quiet_success(result)
    assert ran(host) == [b"all_a", b"all_b"]
    message = result.stderr.decode()
    assert message.count("cannot write the log") == 1
    assert str(host.log) in message and why in message


def test_hook_honours_custom_dir_and_log_file_overrides(host, tmp_path):
    """KVMHOOK_CUSTOM_DIR and KVMHOOK_LOG_FILE replace the root-derived paths."""
    other = tmp_path / "scripts"
    other.mkdir(mode=0o755)
    os.chmod(other, 0o755)
    recorder(host, "all_default")
    recorder(host, "all_other", directory=other)
    log = tmp_path / "logs" / "hook.log"
    env = host.env(KVMHOOK_CUSTOM_DIR=str(other), KVMHOOK_LOG_FILE=str(log))
    assert_quiet_success(host.hook(*ARGS, env=env))
    assert ran(host) == [b"all_other"]
    assert not host.log.exists()
    assert "script=all_other" in log.read_text()


# --- rule 12: missing custom dir --------------------------------------------------


def test_missing_custom_dir_runs_nothing_and_is_not_created(host):
    """Without a custom dir nothing runs, exit is 0, and the hook does not create it."""
    host.custom.rmdir()
    result = host.hook(*ARGS)
    assert_quiet_success(result)
    assert not host.custom.exists()
    (text,) = texts(host)
    assert text.startswith("no scripts run: custom dir") and "No such file" in text


def test_missing_hooks_tree_is_not_created(host):
    """Without any of etc/libvirt/hooks, the hook creates none of it."""
    host.custom.rmdir()
    host.custom.parent.rmdir()
    assert_quiet_success(host.hook(*ARGS))
    assert not host.custom.parent.exists()


# --- the launcher ------------------------------------------------------------------


def test_launcher_template_starts_with_the_timeout_line():
    """The launcher is a python3 script whose first lines hold `timeoutSeconds = 10 * 60`."""
    head = LAUNCHER_TEMPLATE.read_text().splitlines()[:5]
    assert head[0].startswith("#!/usr/bin/python3")
    assert "timeoutSeconds = 10 * 60" in [line.strip() for line in head]


def test_launcher_runs_the_hook_end_to_end(host):
    """The installed launcher runs the custom scripts and logs them, quietly, exit 0."""
    recorder(host, "all_x")
    assert_quiet_success(host.hook(*ARGS, launcher=host.launcher()))
    assert ran(host) == [b"all_x"]
    start = texts(host, "all_x")[0]
    assert start.endswith("(timeout 600s)")


def test_launcher_timeout_edit_applies_and_variable_overrides_it(host):
    """Editing timeoutSeconds changes the timeout; KVMHOOK_TIMEOUT overrides the edit."""
    host.script("all_slow", "sleep 30\n")
    launcher = host.launcher("0.3")
    began = time.monotonic()
    assert_quiet_success(host.hook(*ARGS, launcher=launcher))
    assert time.monotonic() - began < 10
    assert "timed out after 0.3s" in texts(host, "all_slow")[-1]
    host.log.unlink()
    env = host.env(KVMHOOK_TIMEOUT="0.2")
    assert_quiet_success(host.hook(*ARGS, launcher=launcher, env=env))
    assert "timed out after 0.2s" in texts(host, "all_slow")[-1]


def test_launcher_without_kvmhook_exits_0_and_says_so(host):
    """If kvmhook cannot be imported the launcher exits 0, runs nothing, explains on stderr."""
    launcher = host.launcher()
    text = launcher.read_text()
    assert "from kvmhook.qemu import main" in text
    launcher.write_text(
        text.replace("from kvmhook.qemu import", "from kvmhook_missing.qemu import")
    )
    recorder(host, "all_x")
    result = host.hook(*ARGS, launcher=launcher)
    assert_quiet_success(result)
    assert "kvmhook_missing" in result.stderr.decode()
    assert "no custom scripts run" in result.stderr.decode()
    assert ran(host) == []


def test_custom_dir_reached_through_link_in_writable_directory_refused(host):
    """A custom dir reached via a link that anyone could repoint runs nothing."""
    world = host.root / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    recorder(host, "all_x")
    (world / "custom").symlink_to(host.custom)
    env = host.env(KVMHOOK_CUSTOM_DIR=str(world / "custom"))
    assert_quiet_success(host.hook(*ARGS, env=env))
    assert ran(host) == []
    (text,) = texts(host)
    assert "refused custom dir" in text and "writable by group or others" in text


def test_link_loop_is_refused_not_followed_forever(host):
    """A script that is a link loop is skipped with a reason, and later scripts still run."""
    (host.custom / "all_a").symlink_to(host.custom / "all_b")
    (host.custom / "all_b").symlink_to(host.custom / "all_a")
    recorder(host, "all_c")
    assert_quiet_success(host.hook(*ARGS))
    assert ran(host) == [b"all_c"]
    assert texts(host, "all_a") and texts(host, "all_b")
