"""Unit tests of the log record format: quoting, output lines, timestamps, HookLog writes."""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmhook.hook import hooklog
from kvmhook.hook.hooklog import HookLog, clean, output_lines, quote

SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+@,/%"


def unquote(value: str) -> str:
    """Invert quote(): a bare value as is, a quoted one with its escapes undone."""
    if not value.startswith('"'):
        return value
    assert value.endswith('"') and len(value) >= 2, value

    def undo(match: re.Match) -> str:
        escape = match.group(1)
        if escape[0] in "xu" and len(escape) > 1:
            return chr(int(escape[1:], 16))
        return escape

    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", undo, value[1:-1])


def controls(text: str) -> list[str]:
    """Control characters (Unicode category Cc) in `text`, tab excepted."""
    return [c for c in text if unicodedata.category(c) == "Cc" and c != "\t"]


# --- quote -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["vm1", "a-b_c.d:e+f@g,h/i%j", "-", SAFE])
def test_quote_leaves_safe_values_bare(value):
    """A value made only of safe characters appears in the record as is."""
    assert quote(value) == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("", '""'),
        ("my vm", '"my vm"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak", '"line\\x0abreak"'),
        ("cr\rhere", '"cr\\x0dhere"'),
        ("esc\x1b[31m", '"esc\\x1b[31m"'),
        ("del\x7f", '"del\\x7f"'),
        ("tab\there", '"tab\there"'),
        ("vmé", '"vmé"'),
        ("a=b", '"a=b"'),
    ],
)
def test_quote_quotes_and_escapes_unsafe_values(value, shown):
    """An empty or unsafe value is double-quoted with backslash, quote and controls escaped."""
    assert quote(value) == shown


@given(st.text())
def test_quote_is_one_field_and_reversible(value):
    """Any value becomes one space-free-or-quoted, newline-free field that unquotes back."""
    shown = quote(value)
    assert "\n" not in shown and "\r" not in shown
    assert not [c for c in shown if ord(c) < 32 and c != "\t"]
    if shown.startswith('"'):
        assert shown.endswith('"')
    else:
        assert shown and all(c in SAFE for c in shown)
    assert unquote(shown) == value


def test_clean_escapes_c0_controls_and_del_but_keeps_tab():
    """clean() turns every C0 control but tab, and DEL, into a visible \\xNN escape."""
    text = "".join(chr(c) for c in range(32)) + "\x7f"
    cleaned = clean(text)
    assert cleaned == "".join(f"\\x{c:02x}" if c != 9 else "\t" for c in range(32)) + "\\x7f"


# --- output_lines ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "records"),
    [
        (b"a\nb\n", ["stdout: a", "stdout: b"]),
        (b"a\nb", ["stdout: a", "stdout: b"]),
        (b"a\n\nb\n", ["stdout: a", "stdout: ", "stdout: b"]),
        (b"\n", ["stdout: "]),
        (b"\n\n", ["stdout: ", "stdout: "]),
        (b"", []),
        (b"no newline", ["stdout: no newline"]),
    ],
)
def test_output_lines_one_record_per_line(data, records):
    """Each output line is one record; a final newline ends a line, it does not start one."""
    assert list(output_lines([("stdout", data)])) == records


def test_output_lines_tags_each_segment_with_its_stream():
    """Records keep arrival order and say which stream each line came from."""
    segments = [("stdout", b"o1\n"), ("stderr", b"e1\ne2\n"), ("stdout", b"o2")]
    assert list(output_lines(segments)) == [
        "stdout: o1",
        "stderr: e1",
        "stderr: e2",
        "stdout: o2",
    ]


def test_output_lines_shows_invalid_utf8_as_backslash_escapes():
    """Bytes that are not UTF-8 appear as \\xNN escapes, valid UTF-8 as text."""
    assert list(output_lines([("stdout", b"a\xffb \xc3\xa9 \xc3\n")])) == [
        "stdout: a\\xffb é \\xc3"
    ]


def logged(texts: list[str]) -> list[str]:
    """The texts of the records HookLog writes for `texts`, read back from a real file."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "hook.log")
        log = HookLog(path, "vm1", "start", "begin")
        log.block("all_x", texts)
        log.close()
        with open(path, encoding="utf-8", newline="") as written:
            lines = written.read().split("\n")
    assert lines[-1] == ""
    return [line.split(" script=all_x ", 1)[1] for line in lines[:-1]]


def test_output_lines_escapes_control_characters_as_logged():
    """Carriage returns, escape sequences and other C0 controls are escaped, tabs kept."""
    assert logged(list(output_lines([("stderr", b"a\rb\x1b[31mred\x00\x7f\tt\n")]))) == [
        "stderr: a\\x0db\\x1b[31mred\\x00\\x7f\tt"
    ]


@given(st.binary(max_size=200))
def test_output_lines_one_record_per_output_line_for_any_bytes(data):
    """For any output, records = lines, and no logged record holds a newline or C0 control."""
    records = logged(list(output_lines([("stdout", data)])))
    expected = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    assert len(records) == expected
    for record in records:
        assert record.startswith("stdout: ")
        assert not [c for c in record if ord(c) < 32 and c != "\t"]
        assert "\x7f" not in record


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\u2028", "\u2029"])
def test_output_lines_escapes_unicode_line_breaks_and_c1_controls(char):
    """A script line holding NEL, CSI or U+2028/9 stays one record with no control left."""
    data = f"before{char}after\n".encode()
    records = logged(list(output_lines([("stdout", data)])))
    assert len(records) == 1
    assert len(records[0].splitlines()) == 1
    assert controls(records[0]) == []


# --- timestamp and HookLog ---------------------------------------------------


def test_timestamp_has_milliseconds_and_utc_offset(monkeypatch):
    """The record time is `YYYY-MM-DD HH:MM:SS.mmm +hhmm` in local time."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        monkeypatch.setattr(hooklog.time, "time", lambda: 1700000000.25)
        assert hooklog._timestamp() == "2023-11-14 22:13:20.250 +0000"
    finally:
        monkeypatch.undo()
        time.tzset()


RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4} pid=(\d+) domain=(\S+|\".*?\") "
    r"op=(\S+) subop=(\S+) script=(\S+) (.*)$"
)


def test_hooklog_record_carries_context_and_creates_directory(tmp_path):
    """A record names time, pid, domain, op, subop and script; a missing log dir is created."""
    path = tmp_path / "missing" / "dir" / "hook.log"
    log = HookLog(str(path), "my vm", "start", "begin")
    log.record("all_x", "hello")
    log.close()
    (line,) = path.read_text().splitlines()
    match = RECORD.match(line)
    assert match, line
    assert match.groups() == (str(os.getpid()), '"my vm"', "start", "begin", "all_x", "hello")


def test_hooklog_appends_and_echoes_the_same_lines(tmp_path):
    """Records are appended after existing content and echoed verbatim to `echo`."""
    path = tmp_path / "hook.log"
    path.write_text("old line\n")
    echo = io.StringIO()
    log = HookLog(str(path), "vm1", "stopped", "end", echo=echo)
    log.block("all_a", ["one", "two"])
    log.record("-", "three")
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "old line"
    assert [line.split(" ", 8)[-1] for line in lines[1:]] == ["one", "two", "three"]
    assert echo.getvalue().splitlines() == lines[1:]


def test_hooklog_block_larger_than_a_write_piece_is_complete(tmp_path):
    """A block bigger than one write piece lands whole and in order."""
    path = tmp_path / "hook.log"
    log = HookLog(str(path), "vm1", "start", "begin")
    texts = [f"stdout: {i:05d} " + "x" * 200 for i in range(2000)]
    log.block("all_big", texts)
    log.close()
    lines = path.read_text().splitlines()
    assert [line.split(" script=all_big ", 1)[1] for line in lines] == texts


def test_hooklog_block_survives_short_writes(tmp_path, monkeypatch):
    """A write the kernel cuts short (a signal, a full disk) is carried on to the end."""
    path = tmp_path / "hook.log"
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    log = HookLog(str(path), "vm1", "start", "begin")
    log.block("all_x", ["stdout: one", "stdout: two"])
    log.close()
    lines = path.read_text().splitlines()
    assert [line.split(" script=all_x ", 1)[1] for line in lines] == ["stdout: one", "stdout: two"]


def test_hooklog_unwritable_says_why_once_on_stderr(tmp_path, capsys):
    """When the log cannot be opened the reason goes to stderr once; records do not raise."""
    path = tmp_path / "hook.log"
    path.mkdir()
    log = HookLog(str(path), "vm1", "start", "begin")
    log.record("-", "first")
    log.block("all_x", ["a", "b"])
    log.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("cannot write the log") == 1
    assert str(path) in captured.err
    assert "Is a directory" in captured.err


# --- the format read back --------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "timed_out_after", "exit", "signal"),
    [
        ("exit 0", None, 0, None),
        ("exit 7", None, 7, None),
        ("killed by SIGSEGV", None, None, "SIGSEGV"),
        ("killed by SIGTERM", 1.5, None, "SIGTERM"),
        ("still alive after SIGKILL, left behind", 600.0, None, None),
    ],
)
def test_end_text_reads_back_as_written(how, timed_out_after, exit, signal):
    """parse_end() gives back what end_text() wrote: how, duration, timeout, exit, signal."""
    text = hooklog.end_text(how, 2.5, timed_out_after)
    kind, _, body = text.partition(": ")
    assert kind == hooklog.END
    ending = hooklog.parse_end(body)
    assert ending is not None
    assert (ending.how, ending.duration, ending.timed_out) == (how, 2.5, bool(timed_out_after))
    assert (ending.exit, ending.signal) == (exit, signal)


def test_end_text_of_a_script_that_never_started_is_not_an_ending():
    """A script that could not start has an `end:` record that says why, and no numbers."""
    text = hooklog.end_text("cannot execute: Permission denied")
    assert text == "end: cannot execute: Permission denied"
    assert hooklog.parse_end(text.partition(": ")[2]) is None


def test_start_and_end_records_parse_back_as_records(tmp_path):
    """A record HookLog wrote parses back to its fields, the kind first in its text."""
    path = tmp_path / "hook.log"
    log = HookLog(str(path), "my vm", "start", "begin")
    log.record("all_x", hooklog.start_text(["/c/all_x", "my vm", "start"], 600.0))
    log.record("all_x", hooklog.end_text("exit 0", 0.5))
    log.close()
    start, end = (hooklog.parse(line) for line in path.read_text().splitlines())
    assert (start.domain, start.operation, start.subop, start.script) == (
        "my vm",
        "start",
        "begin",
        "all_x",
    )
    assert (start.kind, end.kind) == (hooklog.START, hooklog.END)
    assert start.body == '/c/all_x "my vm" start (timeout 600s)'
    assert hooklog.parse_end(end.body).exit == 0
