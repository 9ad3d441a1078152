"""`kvmhook hooks log`: runs read back from logs the real hook wrote; the qemu.d warning."""

from __future__ import annotations

import gzip
import json
import os
import selectors
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from kvmhook.cli import main
from kvmhook.hook.hooklog import BadRecord, parse, quote

TIMEOUTS = {"KVMHOOK_TIMEOUT": "0.5", "KVMHOOK_TERM_GRACE": "0.2"}


def invoke(host, *args: str):
    """Run `kvmhook hooks ARGS` in-process against the sandbox."""
    environment = {"KVMHOOK_ROOT": str(host.root), "KVMHOOK_CUSTOM_DIR": None}
    environment["KVMHOOK_LOG_FILE"] = None
    return CliRunner().invoke(main, ["hooks", *args], env=environment, catch_exceptions=False)


def fire(host, domain: str = "vm1", operation: str = "start") -> None:
    """Run the real hook once for `domain` and `operation`."""
    host.hook(domain, operation, "begin", "-", env=host.env(**TIMEOUTS))


def json_runs(host, *args: str) -> list[dict]:
    """The JSON objects `hooks log --json ARGS` prints."""
    result = invoke(host, "log", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def four_scripts(host) -> None:
    """Scripts for start that exit 0, exit 3, time out, and cannot be executed."""
    host.script("start_10-ok", "echo fine\nexit 0\n")
    host.script("start_20-fail", "exit 3\n")
    host.script("start_30-slow", "sleep 30\n")
    host.script("start_40-broken", "#!/nonexistent/interpreter\n")


def test_parse_inverts_the_record_format(host):
    """parse() gives back the quoted fields HookLog wrote, a domain with a space and a quote too."""
    host.script("start_10-ok", "exit 0\n")
    fire(host, 'my "odd" vm\x1b')
    records = [parse(line) for line in host.records()]
    assert [r.kind for r in records] == ["start", "end"]
    assert {r.domain for r in records} == {'my "odd" vm\x1b'}
    assert records[1].script == "start_10-ok" and records[1].body.startswith("exit 0 after ")
    with pytest.raises(BadRecord, match="not a log record"):
        parse("not a record")


def test_each_outcome_is_one_run_with_its_result_and_duration(host):
    """Exit 0, exit 3, a timeout and an exec failure each become one run with the right result."""
    four_scripts(host)
    fire(host)
    runs = {run["script"]: run for run in json_runs(host)}
    assert set(runs) == {"start_10-ok", "start_20-fail", "start_30-slow", "start_40-broken"}
    ok, fail, slow, broken = (runs[name] for name in sorted(runs))
    assert (ok["result"], ok["exit"], ok["timed_out"]) == ("exit 0", 0, False)
    assert (fail["result"], fail["exit"]) == ("exit 3", 3)
    assert slow["timed_out"] is True and slow["result"].startswith("timed out; killed by SIG")
    assert 0.5 <= slow["duration_s"] < 5
    assert 0 <= ok["duration_s"] < slow["duration_s"]
    assert broken["result"].startswith("cannot execute: ") and "duration_s" not in broken
    assert {run["domain"] for run in runs.values()} == {"vm1"}
    assert {(run["operation"], run["subop"]) for run in runs.values()} == {("start", "begin")}
    assert len({run["pid"] for run in runs.values()}) == 1


def test_table_shows_results_and_durations(host):
    """The table has a header and one line per run with its result and duration."""
    four_scripts(host)
    fire(host)
    lines = invoke(host, "log").stdout.splitlines()
    assert lines[0].split() == ["TIME", "DOMAIN", "OPERATION", "SCRIPT", "RESULT", "DURATION"]
    rows = {line.split()[4]: line for line in lines[1:]}
    assert set(rows) == {"start_10-ok", "start_20-fail", "start_30-slow", "start_40-broken"}
    assert " exit 3 " in rows["start_20-fail"] and rows["start_20-fail"].endswith("s")
    assert "start/begin" in rows["start_10-ok"]
    assert "timed out; killed by SIG" in rows["start_30-slow"]
    assert "cannot execute:" in rows["start_40-broken"] and rows["start_40-broken"].endswith(" -")


def test_hook_level_records_are_rows(host):
    """A hook call with no scripts shows as one row for script `-` with the hook's text."""
    fire(host, "vm1", "stopped")
    (run,) = json_runs(host)
    assert run["script"] == "-" and run["result"].startswith("no scripts for stopped in ")
    assert "exit" not in run


def test_filters_by_quoted_domain_operation_and_since(host):
    """--domain (a name with a space), --operation and --since each narrow the runs."""
    host.script("all_10-ok", "exit 0\n")
    fire(host, "my vm", "start")
    fire(host, "vm1", "start")
    fire(host, "my vm", "stopped")
    assert 'domain="my vm"' in host.log.read_text()
    mine = json_runs(host, "--domain", "my vm")
    assert [(r["domain"], r["operation"]) for r in mine] == [
        ("my vm", "start"),
        ("my vm", "stopped"),
    ]
    assert [r["domain"] for r in json_runs(host, "--operation", "start")] == ["my vm", "vm1"]
    assert len(json_runs(host, "--domain", "my vm", "--operation", "stopped")) == 1
    offset = time.strftime("%z", time.localtime(time.mktime((2020, 6, 1, 12, 0, 0, 0, 0, -1))))
    old = f"2020-06-01 12:00:00.000 {offset} pid=1 domain=old op=start subop=- script=- no scripts"
    host.log.write_text(old + "\n" + host.log.read_text())
    assert len(json_runs(host)) == 4
    assert len(json_runs(host, "--since", "2020-06-01")) == 4
    assert len(json_runs(host, "--since", "2020-06-01 13:00")) == 3
    assert len(json_runs(host, "--since", "1h")) == 3
    assert invoke(host, "log", "--since", "yesterday").exit_code == 2


def test_rotated_and_gzipped_siblings_are_read_oldest_first(host):
    """qemu-hook.log.2.gz, then .1, then the live file: runs come out in that order."""
    host.script("all_10-ok", "exit 0\n")
    fire(host, "oldest")
    with gzip.open(f"{host.log}.2.gz", "wb") as packed:
        packed.write(host.log.read_bytes())
    host.log.unlink()
    fire(host, "middle")
    host.log.rename(f"{host.log}.1")
    fire(host, "newest")
    assert [r["domain"] for r in json_runs(host)] == ["oldest", "middle", "newest"]


def read_until(process, selector, text: str, deadline: float) -> str:
    """What `process` prints on stdout until it contains `text` (fails at `deadline`).

    Raw reads of the pipe, not readline(): a buffered reader can hold the
    next line already read from the pipe while select() waits for more.
    """
    seen = ""
    while text not in seen:
        assert time.monotonic() < deadline, f"{text!r} never came; got {seen!r}"
        if selector.select(timeout=0.2):
            data = os.read(process.stdout.fileno(), 65536)
            assert data, f"follow exited; got {seen!r}"
            seen += data.decode()
    return seen


def test_follow_prints_runs_appended_later_and_after_rotation(host):
    """--follow shows the history, then a run logged after it started, then one after rotation."""
    host.script("all_10-ok", "exit 0\n")
    fire(host, "before")
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root)}
    env.pop("KVMHOOK_LOG_FILE", None)
    process = subprocess.Popen(
        [sys.executable, "-c", "from kvmhook.cli import main; main()", "hooks", "log", "-f"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        read_until(process, selector, " before ", deadline)
        fire(host, "after")
        assert " after " in read_until(process, selector, " after ", deadline)
        host.log.rename(f"{host.log}.1")
        fire(host, "rotated")
        assert " rotated " in read_until(process, selector, " rotated ", deadline)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_list_warns_about_executables_in_qemu_d(host):
    """`hooks list` warns once on stderr when qemu.d holds executables, and not when it does not."""
    qemu_d = host.root / "etc/libvirt/hooks/qemu.d"
    qemu_d.mkdir()
    host.script("plain.txt", "not run\n", mode=0o644, directory=qemu_d)
    assert "qemu.d" not in invoke(host, "list", "start").stderr
    host.script("other-hook", "exit 0\n", directory=qemu_d)
    result = invoke(host, "list", "start")
    warnings = [line for line in result.stderr.splitlines() if "qemu.d" in line]
    assert len(warnings) == 1 and "other-hook" in warnings[0] and "plain.txt" not in warnings[0]
    assert "qemu.d" not in result.stdout


def test_quote_round_trip_through_parse():
    """parse() unquotes every quoted value quote() can write back to the original."""
    for value in ["vm1", "my vm", 'a"b\\c', "tab\there", "\u2028\x00\x9f", ""]:
        line = (
            f"2026-11-24 13:45:01.123 +0000 pid=7 domain={quote(value)} op=start subop=- script=- x"
        )
        record = parse(line)
        assert record is not None and record.domain == value and record.text == "x"
