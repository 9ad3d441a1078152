"""The hook's log: the record format, written and read back here, and locked, append-only writes.

One record is one line:

    2026-11-24 13:45:01.123 +0000 pid=812 domain=vm1 op=start subop=begin script=all_a stdout: hi

The text after `script=` starts with the record's kind (`start:`, `end:`,
`stdout:`, ...). `parse()` reads a line back into a Record and `parse_end()`
a script's `end:` text, next to what writes them, so the two cannot drift
apart; `hooklogview` does the rest of `kvmhook hooks log`. The parsers import
`re` and `datetime` only when called: the hook never parses, and must not pay
for them on every guest start.

A script's output and its end are written as one block under an exclusive
`flock`, so 50 hooks for different guests running at once never interleave
inside each other's blocks. Records are written straight to the file
descriptor: nothing is buffered in the process, so nothing is lost if the
hook is killed between two records. Every text is escaped here, where records
are written, so whatever a caller passes (a guest's name, a path, a script's
output) one line is always one record.

The log is opened as root in a directory others may reach: it must be a
regular file, not a link (which would make the hook append to, or create,
whatever file it points to) nor a FIFO (which would block the hook), in a
directory that others cannot write to.
"""

import os
import stat
import sys
import time

# The hot path must not pay for importing typing or collections.abc.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime
    import re
    from collections.abc import Iterable, Iterator

# Flush the block to the file in pieces of about this size, so a script's
# capped output never needs a second, formatted copy in memory.
_WRITE_PIECE = 64 * 1024
# The longest the hook waits for the log's lock before writing without it.
LOCK_WAIT = 5.0
_SAFE_VALUE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+@,/%"
)
# Control characters and Unicode line breaks would split a record (for
# readers that honour them) or drive the reader's terminal.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), *range(127, 160)) if c != 9}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# O_NOFOLLOW: a link in the log's place would have the hook append to, or create,
# the file it names. O_NONBLOCK: a FIFO there fails to open (no reader) or is
# refused once open, instead of blocking the hook until someone reads it.
_LOG_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_CLOEXEC
    | os.O_NOFOLLOW
    | os.O_NONBLOCK
    | os.O_NOCTTY
)


def quote(value: str) -> str:
    """A field value as it appears in a record: bare when safe, else double-quoted."""
    if value and all(c in _SAFE_VALUE_CHARS for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').translate(_ESCAPES)
    return f'"{escaped}"'


def clean(text: str) -> str:
    """`text` with control characters escaped, safe to put in one record."""
    return text.translate(_ESCAPES)


# The kinds of record `kvmhook hooks log` joins into one row: a script's start and its end.
START, END = "start", "end"


def start_text(argv: "list[str]", timeout: float) -> str:
    """The text of a script's `start:` record: its command line and its timeout."""
    return f"{START}: {' '.join(quote(arg) for arg in argv)} (timeout {timeout:g}s)"


def end_text(
    how: str, duration: "float | None" = None, timed_out_after: "float | None" = None
) -> str:
    """The text of a script's `end:` record; parse_end() reads it back.

    `how` it ended (process.Outcome.ending: `exit 0`, `killed by SIGTERM`), and
    after `duration` seconds; if it was stopped at its deadline,
    `timed_out_after` that many seconds. Without `duration`, `how` says why it
    could not start.
    """
    if duration is None:
        return f"{END}: {how}"
    if timed_out_after is not None:
        how = f"timed out after {timed_out_after:g}s, process group stopped; {how}"
    return f"{END}: {how} after {duration:.3f}s"


def output_lines(segments: "Iterable[tuple[str, bytes | bytearray]]") -> "Iterator[str]":
    """Record texts for a script's captured output: one per line, tagged by stream."""
    for stream, data in segments:
        # One line at a time: a megabyte of short lines must not become a
        # list of a few hundred thousand strings.
        start, end = 0, len(data)
        while start < end:
            stop = data.find(b"\n", start)
            if stop < 0:
                stop = end
            yield f"{stream}: {data[start:stop].decode('utf-8', 'backslashreplace')}"
            start = stop + 1


class HookLog:
    """Appends records about one hook call to the log file.

    If the file cannot be written, the hook carries on: the reason goes to
    stderr once and later records are dropped (optionally still echoed).
    """

    def __init__(
        self, path: str, domain: str, operation: str, subop: str, echo: object = None
    ) -> None:
        self.path = path
        self._context = (
            f"pid={os.getpid()} domain={quote(domain)} op={quote(operation)} subop={quote(subop)}"
        )
        self._echo = echo  # a text stream that also receives every record (CLI use)
        self._fd: int | None = None
        self._broken = False
        self._unlocked = False  # the lock was held too long by someone else: write without it

    def record(self, script: str, text: str) -> None:
        """Append one record about `script` (`-` for the hook itself)."""
        self.block(script, (text,))

    def block(self, script: str, texts: "Iterable[str]") -> None:
        """Append records about `script` as one contiguous block."""
        prefix = f"{_timestamp()} {self._context} script={quote(script)} "
        pieces: list[str] = []
        size = 0
        fd = self._open()
        if fd is not None:
            self._lock(fd)
        try:
            for text in texts:
                line = prefix + clean(text) + "\n"
                if self._echo is not None:
                    self._echo.write(line)
                pieces.append(line)
                size += len(line)
                if size >= _WRITE_PIECE:
                    self._write(fd, pieces)
                    pieces, size = [], 0
            self._write(fd, pieces)
        finally:
            if fd is not None:
                self._unlock(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> "int | None":
        if self._fd is None and not self._broken:
            try:
                self._fd = _open_log(self.path)
            except OSError as error:
                self._fail(error)
        return self._fd

    def _write(self, fd: "int | None", pieces: list[str]) -> None:
        if fd is None or self._broken or not pieces:
            return
        data = "".join(pieces).encode("utf-8", "backslashreplace")
        try:
            # One write takes it all unless cut short (a signal, a full disk): only then is
            # `process` imported for the rest, which every hook call would pay for otherwise.
            written = os.write(fd, data)
            if written < len(data):
                from kvmhook.hook.process import write_all

                write_all(fd, data[written:])
        except OSError as error:
            self._fail(error)

    def _lock(self, fd: int) -> None:
        """Take the log's lock, waiting at most LOCK_WAIT seconds.

        Other hooks hold it for the few milliseconds a block takes; anyone
        else who can open the log could hold it for ever, and libvirtd waits
        for the hook. After the wait the block is written unlocked: it may
        interleave with another, but every line stays whole (O_APPEND).
        """
        import fcntl

        if self._unlocked:
            return  # waited once already: a hook must not wait again on every record
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._unlocked = True
                    say(
                        f"kvmhook: the log {self.path} stayed locked {LOCK_WAIT:g}s; "
                        "writing without the lock"
                    )
                    return
                time.sleep(0.01)
            except OSError as error:
                self._fail(error)
                return

    def _unlock(self, fd: int) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass  # closing the file releases the lock anyway

    def _fail(self, error: OSError) -> None:
        if not self._broken:
            self._broken = True
            say(
                f"kvmhook: cannot write the log {self.path}: {error.strerror or error}; "
                "custom scripts still run"
            )


def say(message: str) -> None:
    """`message` on stderr (where libvirt takes the reason a failed hook gives), if there is one.

    libvirtd, or whoever runs the hook, may have closed fd 2: then Python has no
    sys.stderr at all, and the message is lost, never the hook's exit status.
    """
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(message + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # stderr is gone (a closed pipe, say): nothing left to tell


def _open_log(path: str) -> int:
    """A descriptor appending to the log at `path`, created if missing.

    Raises OSError; RefusedFile (strerror in words) for a log that is a link
    or not a regular file, or a directory that others can write to (they
    could put a link or a FIFO in its place).
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o750, exist_ok=True)
    if os.stat(directory).st_mode & stat.S_IWOTH:
        raise _refused(path, f"its directory {directory} is writable by others")
    try:
        fd = os.open(path, _LOG_FLAGS, 0o640)
    except OSError as error:
        import errno

        if error.errno == errno.ELOOP and os.path.islink(path):
            raise _refused(path, "it is a symbolic link") from None
        if error.errno == errno.ENXIO:  # a FIFO without a reader, a socket, a device
            raise _refused(path, "not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refused(path, "not a regular file")
    return fd


def _refused(path: str, reason: str) -> OSError:
    """readfile.RefusedFile, imported only when the log is refused: the hook pays for that
    module on every call otherwise."""
    from kvmhook.hook.readfile import RefusedFile

    return RefusedFile(path, reason)


def _timestamp() -> str:
    now = time.time()
    local = time.localtime(now)
    millis = int(now % 1 * 1000)
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{millis:03d} " + time.strftime("%z", local)
    )


# --- reading records back ---------------------------------------------------------
# Pattern texts, compiled by `re`'s own cache on first use.
_VALUE = r'("(?:[^"\\]|\\.)*"|[^ "]+)'
_RECORD = (
    r"((\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{3}) ([+-])(\d\d)(\d\d)) pid=(\d+)"
    rf" domain={_VALUE} op={_VALUE} subop={_VALUE} script={_VALUE} (.*)"
)
_END = (
    r"(?P<timeout>timed out after [^,]*, process group stopped; )?"
    r"(?P<how>exit (?P<exit>\d+)|killed by (?P<signal>\S+)|.*?)"
    r" after (?P<duration>\d+(?:\.\d+)?)s"
)
_SURROGATES = r"[\ud800-\udfff]"
# Linux pids fit in 7 digits, exit statuses in 3: more digits is a forged or
# corrupt record (and int() refuses over 4300 digits anyway).
_MAX_DIGITS = 10


class BadRecord(ValueError):
    """A line of the log that is not a record, or a record with impossible values."""


class Record:
    """One parsed log record; field values unquoted, `text` as written (escapes kept)."""

    __slots__ = ("domain", "operation", "pid", "script", "subop", "text", "time", "when")

    def __init__(
        self,
        time: str,
        when: "datetime.datetime",
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


def parse(line: str) -> Record:
    """The record on `line` (the inverse of the format `HookLog` writes).

    Raises BadRecord, saying why, if `line` is not a record or its time or pid
    is impossible.
    """
    import re

    match = re.fullmatch(_RECORD, line.rstrip("\n"), re.DOTALL)
    if match is None:
        raise BadRecord("not a log record")
    stamp, *moment, pid, domain, operation, subop, script, text = match.groups()
    if len(pid) > _MAX_DIGITS:
        raise BadRecord(f"pid has {len(pid)} digits")
    return Record(
        stamp,
        _moment(*moment),
        int(pid),
        unquote(domain),
        unquote(operation),
        unquote(subop),
        unquote(script),
        text,
    )


def _moment(*fields: str) -> "datetime.datetime":
    import datetime

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
            _zone(sign, zone_hours, zone_minutes),
        )
    except ValueError as error:  # a month 99, a UTC offset of 25 hours...
        raise BadRecord(f"impossible time: {error}") from None


# UTC offsets made so far: a log has one or two. At most 12,000 (sign, 2 digits, 2 digits).
_ZONES: "dict[tuple[str, str, str], datetime.timezone]" = {}


def _zone(sign: str, hours: str, minutes: str) -> "datetime.timezone":
    import datetime

    key = (sign, hours, minutes)
    zone = _ZONES.get(key)
    if zone is None:
        if int(minutes) >= 60:
            raise ValueError(f"UTC offset minute {int(minutes)}")
        offset = datetime.timedelta(hours=int(hours), minutes=int(minutes))
        zone = _ZONES[key] = datetime.timezone(-offset if sign == "-" else offset)
    return zone


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


def without_surrogates(text: str) -> str:
    """`text` with lone surrogates (from bytes that were not UTF-8) as `\\xNN` / `\\uNNNN` text.

    They cannot be encoded as UTF-8: printed, they would stop the output with
    UnicodeEncodeError, or make JSON invalid UTF-8.
    """
    import re

    return re.sub(_SURROGATES, _surrogate_text, text)


def _surrogate_text(match: "re.Match[str]") -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # os.fsdecode() turns a byte that is not UTF-8 into U+DC80..U+DCFF: show
        # the byte, as the log shows such bytes in a script's output.
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


class Ending:
    """A script's `end:` record read back: what end_text() was given, as numbers."""

    __slots__ = ("duration", "exit", "how", "signal", "timed_out")

    def __init__(self, how: str, duration: float, timed_out: bool) -> None:
        self.how = how  # `exit 3`, `killed by SIGTERM`, ...
        self.duration = duration
        self.timed_out = timed_out
        self.exit: int | None = None
        self.signal: str | None = None


def parse_end(body: str) -> "Ending | None":
    """The `end:` record text `body` (without `end: `) read back; None when the script
    never started (its text says why). Raises BadRecord for impossible numbers."""
    import math
    import re

    match = re.fullmatch(_END, body)
    if match is None:
        return None
    ending = Ending(
        match.group("how"), float(match.group("duration")), bool(match.group("timeout"))
    )
    if not math.isfinite(ending.duration):  # JSON has no Infinity
        raise BadRecord(f"duration of {len(match.group('duration'))} digits")
    if match.group("exit") is not None:
        if len(match.group("exit")) > _MAX_DIGITS:
            raise BadRecord(f"exit status of {len(match.group('exit'))} digits")
        ending.exit = int(match.group("exit"))
        ending.how = f"exit {ending.exit}"  # leading zeros dropped, as a number shows
    ending.signal = match.group("signal")
    return ending
