"""The veto policy (`[hooks] on_failure = abort` in kvmhook.conf), in the real hook process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sandbox import cli_runner

from kvmhook import config
from kvmhook.errors import ConfigError

ABORTABLE = ("prepare", "start", "started", "migrate", "restore")
NEVER = ("stopped", "release", "reconnect")
ABORT = "[hooks]\non_failure = abort\n"
XML = b"<domain><name>vm1</name><uuid>7f3d2a9e-0000-4000-8000-000000000001</uuid></domain>"


def conf(host, text: str | bytes) -> None:
    path = host.root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def chain(host, failing: str = "echo 'quota exceeded for vm1' >&2\nexit 3\n") -> None:
    """all_10 records it ran, all_20 fails as told, all_30 records it ran."""
    host.script("all_10first", f'echo "$2" >> "{host.root}/first"\n')
    host.script("all_20check", failing)
    host.script("all_30later", f'echo "$2" >> "{host.root}/later"\n')


def ran(host, name: str) -> list[str]:
    path = host.root / name
    return path.read_text().split() if path.exists() else []


def hook(host, operation: str, **env: str) -> subprocess.CompletedProcess:
    return host.hook("vm1", operation, "begin", "-", xml=XML, env=host.env(**env))


@pytest.mark.parametrize("operation", ABORTABLE)
def test_abort_stops_the_chain_exits_1_and_says_why(host, operation):
    """With on_failure = abort, the first failing script stops the chain for every operation
    libvirt honours; the hook exits 1 with the script's stderr on its own, stdout empty."""
    conf(host, ABORT)
    chain(host)
    result = hook(host, operation)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"kvmhook: {operation} of guest vm1 aborted: custom script all_20check: exit 3",
        "kvmhook: all_20check: quota exceeded for vm1",
    ]
    assert (ran(host, "first"), ran(host, "later")) == ([operation], [])
    [abort] = [r for r in host.records() if " abort: " in r]
    assert "script=all_20check abort: exit 3; 1 later scripts not run" in abort


@pytest.mark.parametrize("operation", ABORTABLE)
def test_ignore_is_the_default_and_runs_every_script(host, operation):
    """Without the file, and with on_failure = ignore, a failing script changes nothing."""
    chain(host)
    assert (hook(host, operation).returncode, ran(host, "later")) == (0, [operation])
    conf(host, "[hooks]\non_failure = ignore\nabort_on = start\n")
    assert (hook(host, operation).returncode, ran(host, "later")) == (0, [operation] * 2)


@pytest.mark.parametrize("operation", NEVER)
def test_operations_that_cannot_abort_never_do(host, operation):
    """reconnect, stopped and release exit 0 under on_failure = abort: a failing reconnect
    would kill a running guest."""
    conf(host, ABORT)
    chain(host)
    result = hook(host, operation)
    assert (result.returncode, result.stderr, ran(host, "later")) == (0, b"", [operation])


def test_abort_on_limits_the_operations(host):
    """abort_on = prepare, start: started keeps ignoring failures."""
    conf(host, ABORT + "abort_on = prepare, start\n")
    chain(host)
    assert hook(host, "start").returncode == 1
    assert hook(host, "started").returncode == 0
    assert ran(host, "later") == ["started"]


@pytest.mark.parametrize(
    ("failing", "problem"),
    [
        ("kill -9 $$\n", "killed by SIGKILL"),
        ("sleep 30\n", "timed out (killed by SIGTERM)"),
        ("#!/nonexistent/interpreter\n", "cannot be executed: No such file or directory"),
    ],
    ids=["signal", "timeout", "bad interpreter"],
)
def test_every_kind_of_failure_aborts(host, failing, problem):
    """A script fails when it dies by a signal, times out or cannot be executed."""
    conf(host, ABORT)
    chain(host, failing)
    result = hook(host, "start", KVMHOOK_TIMEOUT="0.5")
    assert result.returncode == 1
    first = result.stderr.decode().splitlines()[0]
    assert first.startswith(
        f"kvmhook: start of guest vm1 aborted: custom script all_20check: {problem}"
    )
    assert ran(host, "later") == []


def test_a_script_the_hook_refuses_to_run_aborts_before_any_runs(host):
    """A broken link (or an unsafe file) named to run cannot be executed: under abort nothing
    runs and the hook exits 1; a script without the execute bit is switched off, not a failure."""
    conf(host, ABORT)
    chain(host, "exit 0\n")
    os.symlink(host.root / "missing", host.custom / "all_15gone")
    result = hook(host, "start")
    assert result.returncode == 1
    assert b"custom script all_15gone: broken symbolic link" in result.stderr
    assert (ran(host, "first"), ran(host, "later")) == ([], [])
    os.unlink(host.custom / "all_15gone")
    host.script("all_15off", "exit 1\n", mode=0o644)
    assert hook(host, "start").returncode == 0
    assert ran(host, "later") == ["start"]


def test_stderr_shown_is_bounded_and_never_xml(host):
    """Only the last 10 stderr lines, each cut to 300 characters; lines that look like XML
    (the domain XML echoed, secrets included for migrate) and stdout are never shown."""
    conf(host, ABORT)
    chain(
        host,
        'cat >&2\necho\necho "stdout line"\n'
        'for i in $(seq 1 30); do echo "line $i" >&2; done\n'
        "printf 'x%.0s' $(seq 1 1000) >&2\necho >&2\nexit 2\n",
    )
    result = hook(host, "migrate")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1
    assert len(lines) == 11
    assert lines[1:10] == [f"kvmhook: all_20check: line {i}" for i in range(22, 31)]
    assert lines[10] == "kvmhook: all_20check: " + "x" * 300
    assert b"<domain" not in result.stderr
    assert b"stdout line" not in result.stderr
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        (ABORT + "abort_on = start, reconnect\n", "reconnect can never abort"),
        (ABORT + "abort_on = stopped\n", "stopped can never abort"),
        (ABORT + "abort_on = release\n", "release can never abort"),
        (ABORT + "abort_on = begin\n", "begin is not an operation"),
        ("[hooks]\non_failure = maybe\n", "on_failure = maybe: neither ignore nor abort"),
        ("on_failure = abort\n", "line 1: a setting before any [section]"),
        (b"[hooks]\non_failure = abort\n# \xff\n", "not UTF-8 text"),
    ],
    ids=["reconnect", "stopped", "release", "unknown", "bad value", "syntax", "not utf-8"],
)
def test_a_broken_config_never_blocks_a_guest(host, text, logged):
    """A config the loader refuses is logged and the default (ignore) applies: exit 0."""
    conf(host, text)
    chain(host)
    result = hook(host, "start")
    assert (result.returncode, result.stderr) == (0, b"")
    assert ran(host, "later") == ["start"]
    [record] = [r for r in host.records() if " config: " in r]
    assert logged in record
    assert record.endswith("[hooks] on_failure = ignore applies")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", frozenset()),
        ("[hooks]\n", frozenset()),
        ("[hooks]\non_failure = ignore\nabort_on = start\n", frozenset()),
        (ABORT, frozenset(ABORTABLE)),
        (
            "[hooks]\non_failure = ABORT\nabort_on = Prepare,start  migrate\n",
            {"prepare", "start", "migrate"},
        ),
    ],
)
def test_loader(tmp_path, monkeypatch, text, expected):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    path = tmp_path / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert config.abort_on(config.load()) == expected


@pytest.mark.parametrize("operation", [*NEVER, "attach"])
def test_loader_refuses_operations_that_must_not_abort(tmp_path, monkeypatch, operation):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    path = tmp_path / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True)
    path.write_text(f"{ABORT}abort_on = start, {operation}\n")
    with pytest.raises(
        ConfigError,
        match=f"{path}: \\[hooks\\] abort_on = start, {operation}: {operation} can never abort",
    ):
        config.abort_on(config.load())


CHECK_IMPORTS = """
import sys
from kvmhook import qemu
status = qemu.main(sys.argv[1:])
print(status, sorted(m for m in ("configparser", "kvmhook.config") if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        (None, False),
        ("[capacity]\ncpu_factor = 4\n", False),
        ("[hooks]\non_failure = ignore\n# on_failure = abort\n", False),
        (ABORT, True),
    ],
    ids=["no file", "other sections", "ignore", "abort"],
)
def test_the_hook_parses_the_file_only_when_the_policy_may_be_on(host, text, parsed):
    """configparser costs ~10 ms per guest start: only a file that may say abort pays it."""
    if text is not None:
        conf(host, text)
    chain(host, "exit 0\n")
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS, "vm1", "start", "begin", "-"],
        input=XML,
        capture_output=True,
        env=host.env(),
        check=True,
    )
    modules = ["configparser", "kvmhook.config"] if parsed else []
    assert result.stdout.decode().strip() == f"0 {modules}"


def test_cli_list_shows_the_policy_and_run_vetoes(host):
    """`hooks list` says what a failure does; `hooks run` stops at the failing script, shows
    the same reason as the hook and exits 1."""
    from kvmhook.cli import main

    conf(host, ABORT + "abort_on = start\n")
    chain(host)
    runner = cli_runner()
    listing = runner.invoke(main, ["hooks", "list", "start"], env=host.env())
    assert listing.output.splitlines()[-1] == (
        f"on failure: abort for start ([hooks] in {host.root}/etc/kvmhook/kvmhook.conf)"
    )
    result = runner.invoke(main, ["hooks", "run", "vm1", "start"], env=host.env())
    assert result.exit_code == 1
    assert "kvmhook: start of guest vm1 aborted: custom script all_20check: exit 3" in result.stderr
    assert ran(host, "later") == []


def test_an_unreadable_config_never_blocks_a_guest(host):
    """kvmhook.conf that cannot be read at all (here a directory): logged, defaults apply."""
    (host.root / "etc/kvmhook/kvmhook.conf").mkdir(parents=True)
    chain(host)
    result = hook(host, "start")
    assert (result.returncode, result.stderr, ran(host, "later")) == (0, b"", ["start"])
    [record] = [r for r in host.records() if " config: " in r]
    assert record.endswith("kvmhook.conf: Is a directory; defaults apply")
