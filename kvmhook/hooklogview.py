"""Reading the hook's log back: script runs from its records, across rotated files.

`hooklog` writes the format; `parse()` here reads it back (kept out of
`hooklog`, which the hook imports on every call). This module joins a script's
`start:` record with its `end:` record into one run, reads logrotate's
siblings oldest first, filters, and follows the live file.
"""

from __future__ import annotations

import datetime
import gzip
import os
import re
import time
from collections.abc import Iterable, Iterator
from typing import Callable

from kvmhook.hooklog import clean

_END = re.compile(
    r"(?P<timeout>timed out after [^,]*, process group stopped; )?"
    r"(?:exit (?P<exit>\d+)|killed by (?P<signal>\S+)|(?P<other>.*?))"
    r" after (?P<duration>\d+(?:\.\d+)?)s"
)
_RELATIVE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Record:
    """One parsed log record; field values unquoted, `text` as written (escapes kept)."""

    __slots__ = ("domain", "operation", "pid", "script", "subop", "text", "time")

    def __init__(
        self,
        time: str,
        pid: int,
        domain: str,
        operation: str,
        subop: str,
        script: str,
        text: str,
    ) -> None:
        self.time = time  # "2026-11-24 13:45:01.123 +0000", as written
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
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}) pid=(\d+)"
    rf" domain={_VALUE} op={_VALUE} subop={_VALUE} script={_VALUE} (.*)",
    re.DOTALL,
)


def parse(line: str) -> Record | None:
    """The record on `line` (the inverse of the format `HookLog` writes), None if not one."""
    match = _RECORD.fullmatch(line.rstrip("\n"))
    if match is None:
        return None
    time, pid, domain, operation, subop, script, text = match.groups()
    return Record(
        time, int(pid), unquote(domain), unquote(operation), unquote(subop), unquote(script), text
    )


def unquote(value: str) -> str:
    """A field value as `quote()` wrote it, back to the original string."""
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
    return "".join(out)


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
        return record_time(self.record)

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


def record_time(record: Record) -> datetime.datetime:
    """The record's time, timezone-aware."""
    return datetime.datetime.strptime(record.time, "%Y-%m-%d %H:%M:%S.%f %z")


def parse_since(text: str, now: float | None = None) -> datetime.datetime:
    """`10m`/`2h`/`3d`/`30s` ago, or an ISO date/time (local time unless it has an offset)."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        seconds = int(relative.group(1)) * _UNITS[relative.group(2)]
        base = time.time() if now is None else now
        return datetime.datetime.fromtimestamp(base - seconds).astimezone()
    moment = datetime.datetime.fromisoformat(text.strip())
    return moment if moment.tzinfo else moment.astimezone()


class Joiner:
    """Turns records, in log order, into rows: a run is emitted when its end arrives."""

    def __init__(self) -> None:
        self._started: dict[tuple[int, str], Record] = {}

    def feed(self, record: Record) -> Iterator[Run]:
        kind = record.kind
        key = (record.pid, record.script)
        if record.script != "-" and kind == "start":
            self._started[key] = record
        elif record.script != "-" and kind == "end":
            yield _ended(self._started.pop(key, record), record.body)
        elif kind == "ignored" or (record.script == "-" and kind != "config"):
            yield Run(record, record.text)

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
    if match.group("exit") is not None:
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


def log_files(path: str) -> list[str]:
    """`path` and its rotated siblings (`.1`, `.2.gz`, ...), oldest first."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.(\d+)(\.gz)?")
    rotated = []
    try:
        names = os.listdir(directory or ".")
    except OSError:
        names = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            rotated.append((-int(match.group(1)), os.path.join(directory, name)))
    files = [name for _, name in sorted(rotated)]
    if os.path.exists(path):
        files.append(path)
    return files


def _lines(path: str) -> Iterator[str]:
    opener: Callable[..., object] = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as stream:  # type: ignore[attr-defined]
        for raw in stream:  # type: ignore[attr-defined]
            yield raw.decode("utf-8", "backslashreplace")


def _records(lines: Iterable[str]) -> Iterator[Record]:
    for line in lines:
        record = parse(line)
        if record is not None:
            yield record


class Filter:
    """Which rows to show."""

    def __init__(
        self,
        domain: str | None = None,
        operation: str | None = None,
        since: datetime.datetime | None = None,
    ) -> None:
        self.domain, self.operation, self.since = domain, operation, since

    def __call__(self, run: Run) -> bool:
        r = run.record
        return (
            (self.domain is None or r.domain == self.domain)
            and (self.operation is None or r.operation == self.operation)
            and (self.since is None or run.when >= self.since)
        )


def runs(path: str, keep: Callable[[Run], bool] = lambda run: True) -> Iterator[Run]:
    """Every row in the log and its rotated siblings, unfinished runs last."""
    joiner = Joiner()
    for name in log_files(path):
        for record in _records(_lines(name)):
            yield from filter(keep, joiner.feed(record))
    yield from filter(keep, joiner.unfinished())


def follow(
    path: str,
    keep: Callable[[Run], bool] = lambda run: True,
    interval: float = 0.5,
    history: bool = True,
) -> Iterator[Run]:
    """Rows from the log (history first, if asked), then from records as they are appended.

    Polls for growth; a new inode at `path` (rotation) is read from its start
    once the old file is drained; a file that shrank (copytruncate) is reread.
    Runs forever: the caller stops it (Ctrl-C).
    """
    joiner = Joiner()
    if history:
        for name in log_files(path)[:-1]:
            for record in _records(_lines(name)):
                yield from filter(keep, joiner.feed(record))
    stream = None
    partial = b""
    while True:
        if stream is None:
            try:
                stream = open(path, "rb")  # noqa: SIM115 - kept open across polls
            except FileNotFoundError:
                time.sleep(interval)
                continue
            if not history and not partial:
                stream.seek(0, os.SEEK_END)
            history = True  # a file appearing later, or rotated in, is read from its start
        chunk = stream.read()
        if chunk:
            data = partial + chunk
            *lines, partial = data.split(b"\n")
            for record in _records(line.decode("utf-8", "backslashreplace") for line in lines):
                yield from filter(keep, joiner.feed(record))
            continue
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        position = stream.tell()
        if current is None or current.st_ino != os.fstat(stream.fileno()).st_ino:
            if current is not None:  # rotated: the old file is drained, read the new one
                stream.close()
                stream, partial = None, b""
                continue
        elif current.st_size < position:  # truncated in place
            stream.seek(0)
            partial = b""
            continue
        time.sleep(interval)


def table_row(run: Run) -> str:
    """One table line: time, domain, operation, script, result, duration."""
    r = run.record
    operation = r.operation if r.subop == "-" else f"{r.operation}/{r.subop}"
    duration = f"{run.duration_s:.3f}s" if run.duration_s is not None else "-"
    return (
        f"{r.time[:23]}  {clean(r.domain):<16} {clean(operation):<16} {clean(r.script):<24} "
        f"{run.result:<24} {duration}"
    ).rstrip()


TABLE_HEADER = (
    f"{'TIME':<23}  {'DOMAIN':<16} {'OPERATION':<16} {'SCRIPT':<24} {'RESULT':<24} DURATION"
)
