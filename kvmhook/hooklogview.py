"""Reading the hook's log back: script runs from its records, across rotated files.

`hooklog` writes the format; `parse()` here reads it back (kept out of
`hooklog`, which the hook imports on every call). This module joins a script's
`start:` record with its `end:` record into one run, reads logrotate's
siblings oldest first, filters, and follows the live file.

Whatever is in the log directory is read as hostile: a file that is not a
regular file (a FIFO would block the reader), a link, a truncated `.gz`, a line
that is not a record or carries impossible values is reported through the
caller's `report` and skipped, never an exception; lines are read a bounded
piece at a time. Every value printed for a terminal goes through `printable()`.
"""

from __future__ import annotations

import datetime
import errno
import functools
import gzip
import itertools
import json
import math
import os
import re
import stat
import time
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Callable

Report = Callable[[str], None]

_END = re.compile(
    r"(?P<timeout>timed out after [^,]*, process group stopped; )?"
    r"(?:exit (?P<exit>\d+)|killed by (?P<signal>\S+)|(?P<other>.*?))"
    r" after (?P<duration>\d+(?:\.\d+)?)s"
)
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# --since goes back at most this far: 100 years is older than any log, and
# keeps the arithmetic far from datetime's limits.
MAX_AGO_DAYS = 36500
# Linux pids fit in 7 digits, exit statuses in 3: more digits is a forged or
# corrupt record (and int() refuses over 4300 digits anyway).
_MAX_DIGITS = 10
# A line is kept up to this many bytes and the rest of it is dropped, so a file
# without newlines cannot fill memory. Every record the viewer shows (start,
# end, ignored, hook-level) is far shorter; longer lines are script output.
MAX_LINE = 64 * 1024
# Line and paragraph separators, and the bidi controls that reorder what a
# terminal shows (Trojan Source): invisible, so shown as escapes.
_INVISIBLE = r"\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
# Lone surrogates cannot be encoded as UTF-8: printed, they would stop the output
# with UnicodeEncodeError, or make `--json` invalid UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Unlike `hooklog.clean()`, tab too: it would break the table's columns.
_UNPRINTABLE = re.compile(rf"[\x00-\x1f\x7f-\x9f{_INVISIBLE}\ud800-\udfff]")
# json.dumps escapes C0 controls itself; these it would print raw.
_JSON_UNSAFE = re.compile(rf"[\x7f-\x9f{_INVISIBLE}]")


class BadRecord(ValueError):
    """A line of the log that is not a record, or a record with impossible values."""


def printable(text: str) -> str:
    """`text` safe for a terminal: controls, line separators, bidi controls, surrogates escaped."""
    return _UNPRINTABLE.sub(_escape, text)


def without_surrogates(text: str) -> str:
    """`text` with lone surrogates (from bytes that were not UTF-8) as `\\xNN` / `\\uNNNN` text."""
    return _SURROGATE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # os.fsdecode() turns a byte that is not UTF-8 into U+DC80..U+DCFF: show
        # the byte, as the log shows such bytes in a script's output.
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class Record:
    """One parsed log record; field values unquoted, `text` as written (escapes kept)."""

    __slots__ = ("domain", "operation", "pid", "script", "subop", "text", "time", "when")

    def __init__(
        self,
        time: str,
        when: datetime.datetime,
        pid: int,
        domain: str,
        operation: str,
        subop: str,
        script: str,
        text: str,
    ) -> None:
        self.time = time  # "2026-11-24 13:45:01.123 +0000", as written
        self.when = when  # the same, timezone-aware
        self.pid = pid
        self.domain = domain
        self.operation = operation
        self.subop = subop
        self.script = script
        self.text = text

    @property
    def kind(self) -> str:
        """The record's kind (`start`, `end`, `stdout`, `refused`, ...), or "" when it has none."""
        head, sep, _ = self.text.partition(": ")
        return head if sep and head.isalpha() and head.islower() else ""

    @property
    def body(self) -> str:
        """`text` without its `kind: ` prefix."""
        kind = self.kind
        return self.text[len(kind) + 2 :] if kind else self.text

    def __repr__(self) -> str:
        return f"Record({self.time!r}, {self.pid}, {self.domain!r}, {self.script!r}, {self.text!r})"


_VALUE = r'("(?:[^"\\]|\\.)*"|[^ "]+)'
_RECORD = re.compile(
    r"((\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{3}) ([+-])(\d\d)(\d\d)) pid=(\d+)"
    rf" domain={_VALUE} op={_VALUE} subop={_VALUE} script={_VALUE} (.*)",
    re.DOTALL,
)


def parse(line: str) -> Record:
    """The record on `line` (the inverse of the format `HookLog` writes).

    Raises BadRecord, saying why, if `line` is not a record or its time or pid
    is impossible.
    """
    match = _RECORD.fullmatch(line.rstrip("\n"))
    if match is None:
        raise BadRecord("not a log record")
    time, *moment, pid, domain, operation, subop, script, text = match.groups()
    if len(pid) > _MAX_DIGITS:
        raise BadRecord(f"pid has {len(pid)} digits")
    return Record(
        time,
        _moment(*moment),
        int(pid),
        unquote(domain),
        unquote(operation),
        unquote(subop),
        unquote(script),
        text,
    )


def _moment(*fields: str) -> datetime.datetime:
    year, month, day, hour, minute, second, millis, sign, zone_hours, zone_minutes = fields
    try:
        return datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int(millis) * 1000,
            _zone(sign, int(zone_hours), int(zone_minutes)),
        )
    except ValueError as error:  # a month 99, a UTC offset of 25 hours...
        raise BadRecord(f"impossible time: {error}") from None


@functools.lru_cache(maxsize=64)
def _zone(sign: str, hours: int, minutes: int) -> datetime.timezone:
    if minutes >= 60:
        raise ValueError(f"UTC offset minute {minutes}")
    offset = datetime.timedelta(hours=hours, minutes=minutes)
    return datetime.timezone(-offset if sign == "-" else offset)


def unquote(value: str) -> str:
    """A field value as `quote()` wrote it, back to the original (lone surrogates as text)."""
    if not (len(value) >= 2 and value[0] == '"' and value[-1] == '"'):
        return value
    out: list[str] = []
    body, i, n = value[1:-1], 0, len(value) - 2
    while i < n:
        c = body[i]
        if c != "\\" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        escape = body[i + 1]
        width = {"x": 2, "u": 4}.get(escape, 0)
        digits = body[i + 2 : i + 2 + width]
        if width and len(digits) == width and all(d in "0123456789abcdef" for d in digits):
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            out.append(escape)
            i += 2
    return without_surrogates("".join(out))


class Run:
    """One row: a script's run (start joined with end), or a hook-level/ignored record."""

    def __init__(self, record: Record, result: str) -> None:
        self.record = record  # the start record (or the lone record)
        self.result = result
        self.exit: int | None = None
        self.signal: str | None = None
        self.timed_out: bool | None = None
        self.duration_s: float | None = None

    @property
    def when(self) -> datetime.datetime:
        return self.record.when

    def as_json(self) -> dict[str, object]:
        """The run as one JSON object; exit/signal/timed_out/duration_s only when known."""
        r = self.record
        data: dict[str, object] = {
            "time": r.time,
            "pid": r.pid,
            "domain": r.domain,
            "operation": r.operation,
            "subop": r.subop,
            "script": r.script,
            "result": self.result,
        }
        for key in ("exit", "signal", "timed_out", "duration_s"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data


def parse_since(text: str, now: float | None = None) -> datetime.datetime:
    """`10m`/`2h`/`3d`/`30s` ago, or an ISO date/time (local time unless it has an offset).

    Raises ValueError saying what is accepted when `text` is neither, or is
    out of range (more than MAX_AGO_DAYS ago, or a date datetime cannot hold).
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        # Digits counted first: int() of thousands of them raises.
        seconds = int(amount) * _UNITS[unit] if len(amount) <= 12 else math.inf
        if seconds > MAX_AGO_DAYS * 86400:
            raise ValueError(f"out of range: at most {MAX_AGO_DAYS}d (100 years) ago")
        base = time.time() if now is None else now
        moment = datetime.datetime.fromtimestamp(base, datetime.timezone.utc)
        return moment - datetime.timedelta(seconds=seconds)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not a date/time or 10m/2h/3d") from None
    try:
        return moment if moment.tzinfo else moment.astimezone()
    except (ValueError, OverflowError, OSError):  # local time of a year 1 or 9999 date
        raise ValueError("out of range: a date from 0001-01-02 to 9999-12-30") from None


class Joiner:
    """Turns records, in log order, into rows: a run is emitted when its end arrives."""

    # Starts still waiting for their end. A real log has a few (hooks running, or
    # killed); a forged one could have millions: past this many, the oldest is
    # given up as unfinished, so memory stays bounded.
    MAX_OPEN = 4096

    def __init__(self) -> None:
        self._started: dict[tuple[int, str], Record] = {}

    def feed(self, record: Record) -> tuple[Run, ...]:
        """The rows `record` completes. Raises BadRecord for an end with impossible numbers."""
        kind = record.kind
        key = (record.pid, record.script)
        if record.script != "-" and kind == "start":
            self._started[key] = record
            if len(self._started) > self.MAX_OPEN:
                oldest = next(iter(self._started))
                return (Run(self._started.pop(oldest), "no end record"),)
        elif record.script != "-" and kind == "end":
            # The start is dropped only once the end is good: with a bad end,
            # the run shows as unfinished.
            run = _ended(self._started.get(key, record), record.body)
            self._started.pop(key, None)
            return (run,)
        elif kind == "ignored" or (record.script == "-" and kind != "config"):
            return (Run(record, record.text),)
        return ()

    def unfinished(self) -> Iterator[Run]:
        """Runs whose end is not (yet) in the log: still running, or the hook was killed."""
        for record in self._started.values():
            yield Run(record, "no end record")
        self._started.clear()


def _ended(start: Record, text: str) -> Run:
    match = _END.fullmatch(text)
    if match is None:  # `cannot execute: ...`
        return Run(start, text)
    run = Run(start, "")
    run.timed_out = bool(match.group("timeout"))
    run.duration_s = float(match.group("duration"))
    if not math.isfinite(run.duration_s):  # JSON has no Infinity
        raise BadRecord(f"duration of {len(match.group('duration'))} digits")
    if match.group("exit") is not None:
        if len(match.group("exit")) > _MAX_DIGITS:
            raise BadRecord(f"exit status of {len(match.group('exit'))} digits")
        run.exit = int(match.group("exit"))
        run.result = f"exit {run.exit}"
    elif match.group("signal"):
        run.signal = match.group("signal")
        run.result = f"killed by {run.signal}"
    else:
        run.result = match.group("other")
    if run.timed_out:
        run.result = f"timed out; {run.result}"
    return run


def log_files(path: str, report: Report = lambda message: None) -> list[str]:
    """`path` and its rotated siblings (`.1`, `.2.gz`, ...), oldest first.

    Anything with such a name is listed, whatever it is: reading it decides.
    """
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.(\d+)(\.gz)?")
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        names = []
    except OSError as error:
        report(f"cannot list {directory}: {_reason(error)}; rotated logs skipped")
        names = []
    rotated = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            # Compared as digit strings, longest first: int() of a forged name
            # with thousands of digits would raise.
            number = match.group(1).lstrip("0")
            rotated.append((len(number), number, os.path.join(directory, name)))
    files = [name for *_, name in sorted(rotated, reverse=True)]
    if os.path.lexists(path):
        files.append(path)
    return files


_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def _open_regular(path: str) -> BinaryIO:
    """`path` open for reading. Raises OSError, its strerror in words, unless a regular file.

    Looked at before it is opened: opening a FIFO or a device can block, or act
    on it (a tape rewinds). A link is not followed: the hook never writes its
    log through one, so one there was put by someone else. O_NOFOLLOW and
    O_NONBLOCK cover a file swapped in between.
    """
    refused = _refusal(os.lstat(path).st_mode)
    if refused is None:
        fd = os.open(path, _READ_FLAGS)
        refused = _refusal(os.fstat(fd).st_mode)
        if refused is None:
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise OSError(errno.EINVAL, refused, path)


def _refusal(mode: int) -> str | None:
    """Why a file of `mode` is not read, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link, not followed"
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    else:
        kind = "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"{kind}, not a regular file"


def _reason(error: BaseException) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error) or repr(error)


class _Lines:
    """The lines of a binary stream, read a bounded piece at a time, newline removed.

    A line longer than MAX_LINE is cut there (the rest is read and dropped). A
    last line without its newline is held, so a file still being written can be
    read again later; `last()` gives it up once the file is finished.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.number = 0  # lines given so far
        self._head = b""
        self._cut = False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            piece = self.stream.readline(MAX_LINE)
            if not piece:
                return
            ended = piece.endswith(b"\n")
            if not self._cut:
                self._head += piece[:-1] if ended else piece
                if len(self._head) >= MAX_LINE:
                    self._head, self._cut = self._head[:MAX_LINE], True
            if ended:
                yield self._take()

    def last(self) -> Iterator[bytes]:
        if self._head:
            yield self._take()

    def _take(self) -> bytes:
        line, self._head, self._cut = self._head, b"", False
        self.number += 1
        return line


class _LogFile:
    """One log file read into records; what is wrong with it goes to `report`.

    A read error is reported once and ends the file. Of the lines that are not
    records, the first is reported with its number and why, the others counted
    and reported together when the file is closed.
    """

    def __init__(self, path: str, report: Report) -> None:
        self.path = path
        self.failed = False
        self._report = report
        self._streams: list[BinaryIO] = []
        self._lines: _Lines | None = None
        self._skipped = 0

    def open(self, at_end: bool = False) -> None:
        """Open the file, at its end if `at_end`. Raises OSError, as `_open_regular`."""
        raw = _open_regular(self.path)
        if at_end:
            raw.seek(0, os.SEEK_END)
        self._streams = [raw]
        if self.path.endswith(".gz"):  # GzipFile leaves the file it reads open
            self._streams.append(gzip.GzipFile(fileobj=raw))  # type: ignore[arg-type]
        self._lines = _Lines(self._streams[-1])

    def records(self, finished: bool) -> Iterator[Record]:
        """Records on the lines read now; with `finished`, on a last unended line too."""
        lines = self._lines
        if lines is None or self.failed:
            return
        try:
            for line in itertools.chain(lines, lines.last()) if finished else lines:
                try:
                    record = parse(line.decode("utf-8", "backslashreplace"))
                except BadRecord as error:
                    self.skip(error)
                    continue
                yield record
        except (OSError, EOFError, zlib.error) as error:  # a cut or corrupt .gz, EIO
            self.failed = True
            self._report(
                f"{self.path}: unreadable after line {lines.number}: {_reason(error)}; "
                "the rest of it is skipped"
            )

    def skip(self, error: BadRecord) -> None:
        """Count the line last read as not a record, reporting the first."""
        self._skipped += 1
        if self._skipped == 1 and self._lines is not None:
            self._report(f"{self.path}: line {self._lines.number} skipped: {error}")

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self._streams[0].fileno())
        return st.st_dev, st.st_ino

    def position(self) -> int:
        return self._streams[0].tell()

    def rewind(self) -> None:
        """Read again from the start (the file was truncated in place)."""
        self._streams[0].seek(0)
        self._lines = _Lines(self._streams[0])
        self.failed = False

    def close(self) -> None:
        more = self._skipped - 1
        if more > 0:
            lines = "line" if more == 1 else "lines"
            self._report(f"{self.path}: {more} more {lines} skipped, not valid records")
        self._skipped = 0
        for stream in reversed(self._streams):
            stream.close()
        self._streams, self._lines = [], None


class Filter:
    """Which rows to show."""

    def __init__(
        self,
        domain: str | None = None,
        operation: str | None = None,
        since: datetime.datetime | None = None,
    ) -> None:
        # Matched as records show it: a byte that is not UTF-8 as `\xNN`.
        self.domain = None if domain is None else without_surrogates(domain)
        self.operation, self.since = operation, since

    def __call__(self, run: Run) -> bool:
        r = run.record
        return (
            (self.domain is None or r.domain == self.domain)
            and (self.operation is None or r.operation == self.operation)
            and (self.since is None or run.when >= self.since)
        )


Keep = Callable[[Run], bool]


def _rows(log: _LogFile, joiner: Joiner, keep: Keep, finished: bool) -> Iterator[Run]:
    for record in log.records(finished):
        try:
            rows = joiner.feed(record)
        except BadRecord as error:
            log.skip(error)
            continue
        yield from filter(keep, rows)


def _file_rows(path: str, joiner: Joiner, keep: Keep, report: Report) -> Iterator[Run]:
    log = _LogFile(path, report)
    try:
        log.open()
    except FileNotFoundError:
        return  # rotated away since it was listed
    except OSError as error:
        report(f"{path}: {_reason(error)}; skipped")
        return
    try:
        yield from _rows(log, joiner, keep, finished=True)
    finally:
        log.close()


def runs(
    path: str, keep: Keep = lambda run: True, report: Report = lambda message: None
) -> Iterator[Run]:
    """Every row in the log and its rotated siblings, unfinished runs last.

    A file or line that cannot be used is skipped and reported through `report`.
    """
    joiner = Joiner()
    for name in log_files(path, report):
        yield from _file_rows(name, joiner, keep, report)
    yield from filter(keep, joiner.unfinished())


class _LiveLog:
    """The live log as it grows, is rotated (another file at `path`) or truncated in place."""

    def __init__(self, path: str, report: Report, from_start: bool) -> None:
        self.path = path
        self._report = report
        self._from_start = from_start
        self._log: _LogFile | None = None
        self._refused = ""  # why the file at `path` cannot be read, said once

    def rows(self, joiner: Joiner, keep: Keep) -> Iterator[Run]:
        """Rows of the records appended since the last call (none while there is no file)."""
        log = self._log or self._open()
        if log is None:
            return
        yield from _rows(log, joiner, keep, finished=False)
        if self._replaced(log):  # drained once more: the hook may have appended before the rename
            yield from _rows(log, joiner, keep, finished=True)
            log.close()
            self._log = None

    def _open(self) -> _LogFile | None:
        log = _LogFile(self.path, self._report)
        try:
            log.open(at_end=not self._from_start)
        except FileNotFoundError:
            return None
        except OSError as error:
            if _reason(error) != self._refused:
                self._refused = _reason(error)
                self._report(f"{self.path}: {self._refused}; waiting for a regular file")
            return None
        self._refused = ""
        self._from_start = True  # a file appearing later, or rotated in, is read from its start
        self._log = log
        return log

    def _replaced(self, log: _LogFile) -> bool:
        try:
            current = os.lstat(self.path)
        except OSError:
            return False  # rotated away, nothing in its place yet: the old file may still grow
        if (current.st_dev, current.st_ino) != log.identity():
            return True
        if current.st_size < log.position():
            log.rewind()
        return False


def follow(
    path: str,
    keep: Keep = lambda run: True,
    interval: float = 0.5,
    history: bool = True,
    report: Report = lambda message: None,
) -> Iterator[Run]:
    """Rows from the log (history first, if asked), then from records as they are appended.

    Polls for growth; a new inode at `path` (rotation) is read from its start
    once the old file is drained; a file that shrank (copytruncate) is reread.
    Something other than a regular file at `path` is reported once and waited
    out. Runs forever: the caller stops it (Ctrl-C).
    """
    joiner = Joiner()
    if history:
        for name in log_files(path, report):
            if name != path:
                yield from _file_rows(name, joiner, keep, report)
    live = _LiveLog(path, report, from_start=history)
    while True:
        yield from live.rows(joiner, keep)
        time.sleep(interval)


def table_row(run: Run) -> str:
    """One table line: time, domain, operation, script, result, duration (all printable)."""
    r = run.record
    operation = r.operation if r.subop == "-" else f"{r.operation}/{r.subop}"
    duration = f"{run.duration_s:.3f}s" if run.duration_s is not None else "-"
    return (
        f"{r.time[:23]}  {printable(r.domain):<16} {printable(operation):<16} "
        f"{printable(r.script):<24} {printable(run.result):<24} {duration}"
    ).rstrip()


def json_line(run: Run) -> str:
    """The run as one line of JSON, UTF-8-encodable, with nothing a terminal would act on."""
    return _JSON_UNSAFE.sub(_json_escape, json.dumps(run.as_json(), ensure_ascii=False))


TABLE_HEADER = (
    f"{'TIME':<23}  {'DOMAIN':<16} {'OPERATION':<16} {'SCRIPT':<24} {'RESULT':<24} DURATION"
)
