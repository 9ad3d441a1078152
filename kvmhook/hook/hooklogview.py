"""Reading the hook's log back: script runs from its records, across rotated files.

`hooklog` writes the records and parses them back; this module joins a
script's `start:` record with its `end:` record into one row, reads
logrotate's siblings oldest first, filters, follows the live file and prints.

Whatever is in the log directory is read as hostile: a file that is not a
regular file (a FIFO would block the reader), a link, a truncated `.gz`, a line
that is not a record or carries impossible values is reported through the
caller's `report` and skipped, never an exception; lines are read a bounded
piece at a time. Every value printed for a terminal goes through `printable()`.
"""

from __future__ import annotations

import datetime
import errno
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

from kvmhook.hook.hooklog import END, START, BadRecord, Record, parse, parse_end, without_surrogates

Report = Callable[[str], None]

_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# --since goes back at most this far: 100 years is older than any log, and
# keeps the arithmetic far from datetime's limits.
MAX_AGO_DAYS = 36500
# A line is kept up to this many bytes and the rest of it is dropped, so a file
# without newlines cannot fill memory. Every record the viewer shows (start,
# end, ignored, hook-level) is far shorter; longer lines are script output.
MAX_LINE = 64 * 1024
# Line and paragraph separators, and the bidi controls that reorder what a
# terminal shows (Trojan Source): invisible, so shown as escapes.
_INVISIBLE = r"\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
# Unlike `hooklog.clean()`, tab too: it would break the table's columns.
_UNPRINTABLE = re.compile(rf"[\x00-\x1f\x7f-\x9f{_INVISIBLE}]")
# json.dumps escapes C0 controls itself; these it would print raw.
_JSON_UNSAFE = re.compile(rf"[\x7f-\x9f{_INVISIBLE}]")


def printable(text: str) -> str:
    """`text` safe for a terminal: controls, line separators, bidi controls, surrogates escaped."""
    return _UNPRINTABLE.sub(_escape, without_surrogates(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class LogRow:
    """One row of `kvmhook hooks log`: a script's run (its start joined with its end), or a
    hook-level or ignored record."""

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

    def feed(self, record: Record) -> tuple[LogRow, ...]:
        """The rows `record` completes. Raises BadRecord for an end with impossible numbers."""
        kind = record.kind
        key = (record.pid, record.script)
        if record.script != "-" and kind == START:
            self._started[key] = record
            if len(self._started) > self.MAX_OPEN:
                oldest = next(iter(self._started))
                return (LogRow(self._started.pop(oldest), "no end record"),)
        elif record.script != "-" and kind == END:
            # The start is dropped only once the end is good: with a bad end,
            # the run shows as unfinished.
            row = _ended(self._started.get(key, record), record.body)
            self._started.pop(key, None)
            return (row,)
        elif kind == "ignored" or (record.script == "-" and kind != "config"):
            return (LogRow(record, record.text),)
        return ()

    def unfinished(self) -> Iterator[LogRow]:
        """Runs whose end is not (yet) in the log: still running, or the hook was killed."""
        for record in self._started.values():
            yield LogRow(record, "no end record")
        self._started.clear()


def _ended(start: Record, text: str) -> LogRow:
    ending = parse_end(text)
    if ending is None:  # `cannot execute: ...`
        return LogRow(start, text)
    row = LogRow(start, f"timed out; {ending.how}" if ending.timed_out else ending.how)
    row.timed_out = ending.timed_out
    row.duration_s = ending.duration
    row.exit = ending.exit
    row.signal = ending.signal
    return row


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


def open_regular(path: str) -> BinaryIO:
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
        """Open the file, at its end if `at_end`. Raises OSError, as `open_regular`."""
        raw = open_regular(self.path)
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

    def __call__(self, row: LogRow) -> bool:
        r = row.record
        return (
            (self.domain is None or r.domain == self.domain)
            and (self.operation is None or r.operation == self.operation)
            and (self.since is None or row.when >= self.since)
        )


Keep = Callable[[LogRow], bool]


def _rows(log: _LogFile, joiner: Joiner, keep: Keep, finished: bool) -> Iterator[LogRow]:
    for record in log.records(finished):
        try:
            rows = joiner.feed(record)
        except BadRecord as error:
            log.skip(error)
            continue
        yield from filter(keep, rows)


def _file_rows(path: str, joiner: Joiner, keep: Keep, report: Report) -> Iterator[LogRow]:
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
    path: str, keep: Keep = lambda row: True, report: Report = lambda message: None
) -> Iterator[LogRow]:
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

    def rows(self, joiner: Joiner, keep: Keep) -> Iterator[LogRow]:
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
    keep: Keep = lambda row: True,
    interval: float = 0.5,
    history: bool = True,
    report: Report = lambda message: None,
) -> Iterator[LogRow]:
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


def table_row(row: LogRow) -> str:
    """One table line: time, domain, operation, script, result, duration (all printable)."""
    r = row.record
    operation = r.operation if r.subop == "-" else f"{r.operation}/{r.subop}"
    duration = f"{row.duration_s:.3f}s" if row.duration_s is not None else "-"
    return (
        f"{r.time[:23]}  {printable(r.domain):<16} {printable(operation):<16} "
        f"{printable(r.script):<24} {printable(row.result):<24} {duration}"
    ).rstrip()


def json_line(row: LogRow) -> str:
    """The run as one line of JSON, UTF-8-encodable, with nothing a terminal would act on."""
    return _JSON_UNSAFE.sub(_json_escape, json.dumps(row.as_json(), ensure_ascii=False))


TABLE_HEADER = (
    f"{'TIME':<23}  {'DOMAIN':<16} {'OPERATION':<16} {'SCRIPT':<24} {'RESULT':<24} DURATION"
)
