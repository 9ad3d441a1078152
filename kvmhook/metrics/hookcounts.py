"""The hook's counters, read from its log: script runs by operation and result, vetoes, guests
refused. The hook itself counts nothing: it gains no work and no import for metrics.

Each run reads on from where the last one stopped, remembered (with the
counts so far) in paths.metrics_state(): the log file's inode and the offset
of its last complete line. When logrotate has moved the file, the rest of the
remembered inode is read from the rotated sibling that has it, then the new
file from its start; a file truncated in place is read again from its start.
Without a remembered position (the first run, or a state file that is lost
or broken) every log file is counted, rotated ones included. A line still
being written (no newline yet) is left for the next run.

Results: `ok` (exit 0), `failed` (another exit, or a signal), `timed_out`,
`not_executable` (not executable, or exec failed), `refused` (a script the
hook would not run: unsafe owner or mode, a link out of bounds).
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO

from kvmhook import paths
from kvmhook.hook import hooklog, hooklogview

RESULTS = ("ok", "failed", "timed_out", "not_executable", "refused")
_STATE_MAX = 1024 * 1024
# How much of the log one run reads at most: a runaway log must not stall the timer;
# the rest is read by the next runs. Read a piece at a time, so memory stays small.
READ_MAX = 256 * 1024 * 1024
_PIECE = 1024 * 1024
_LINE_MAX = 1024 * 1024


class Counts:
    """Counters so far: scripts[(operation, result)], vetoes[operation], refusals[operation]
    (guests the hook refused: maintenance, admission, a bridge it could not make)."""

    def __init__(self) -> None:
        self.scripts: dict[tuple[str, str], int] = {}
        self.vetoes: dict[str, int] = {}
        self.refusals: dict[str, int] = {}

    def add(self, record: hooklog.Record) -> None:
        kind, operation = record.kind, record.operation
        if record.script == "-":
            if kind == "refused":
                self.refusals[operation] = self.refusals.get(operation, 0) + 1
            return
        result = _result(kind, record.body)
        if result is not None:
            self.scripts[(operation, result)] = self.scripts.get((operation, result), 0) + 1
        elif kind == "abort":
            self.vetoes[operation] = self.vetoes.get(operation, 0) + 1

    def as_dict(self) -> dict:
        return {
            "scripts": [[op, result, n] for (op, result), n in sorted(self.scripts.items())],
            "vetoes": self.vetoes,
            "refusals": self.refusals,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Counts:
        counts = cls()
        counts.scripts = {(str(op), str(result)): int(n) for op, result, n in data["scripts"]}
        counts.vetoes = {str(op): int(n) for op, n in data["vetoes"].items()}
        counts.refusals = {str(op): int(n) for op, n in data["refusals"].items()}
        return counts


def _result(kind: str, body: str) -> str | None:
    """The result a script's record counts for, or None when it is not a script's last word."""
    if kind == "end":
        ending = hooklog.parse_end(body)
        if ending is None:
            return "not_executable"  # `cannot execute: ...`
        if ending.timed_out:
            return "timed_out"
        return "ok" if ending.exit == 0 else "failed"
    if kind == "ignored":
        if body.startswith("not executable"):
            return "not_executable"
        if body.startswith("refused:"):
            return "refused"
    return None


class Position:
    """Where the last run stopped: a file's device and inode, and an offset in it."""

    def __init__(self, device: int, inode: int, offset: int) -> None:
        self.device, self.inode, self.offset = device, inode, offset


def count(say: hooklogview.Report) -> tuple[Counts, Position | None, Position | None]:
    """(the counts now, the position they were read from, the position reached). The caller
    saves the state with save() when it may write."""
    log = paths.log_file()
    counts, start = _load(say)
    if start is None:
        counts = Counts()
        for path in hooklogview.log_files(log, say)[:-1]:
            _read(path, 0, counts, say)  # the rotated ones, oldest first: counted whole
        reached = _read(log, 0, counts, say)
        return counts, None, reached
    if _same_file(log, start):
        return counts, start, _read(log, start.offset, counts, say)
    rotated = _rotated_with(log, start)
    old = None if rotated is None else _read(rotated, start.offset, counts, say)
    live = _read(log, 0, counts, say)  # the live file is new since: from its start
    # No live file yet (logrotate's create comes later): remember the end of the old one.
    return counts, start, live or old


def _read(path: str, offset: int, counts: Counts, say: hooklogview.Report) -> Position | None:
    """Count the complete lines of `path` from `offset`; where they end (None: no file)."""
    try:
        stream = hooklogview.open_regular(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        say(f"{path}: {error.strerror}; not counted")
        return None
    with stream:
        if path.endswith(".gz"):
            _read_gzip(stream, path, counts, say)
            return None
        st = os.fstat(stream.fileno())
        if st.st_size < offset:
            offset = 0  # truncated in place (copytruncate): read again from its start
        stream.seek(offset)
        return Position(st.st_dev, st.st_ino, offset + _count_stream(stream, counts))


def _read_gzip(stream: BinaryIO, path: str, counts: Counts, say: hooklogview.Report) -> None:
    import gzip
    import zlib

    try:
        with gzip.GzipFile(fileobj=stream) as unpacked:
            _count_stream(unpacked, counts)  # type: ignore[arg-type]
    except (OSError, EOFError, zlib.error) as error:
        say(f"{path}: unreadable ({error}); the rest of it not counted")


def _count_stream(stream: BinaryIO, counts: Counts) -> int:
    """Count the complete lines of `stream`, a piece at a time, READ_MAX bytes at most;
    the bytes they took (a line still being written waits for the next run)."""
    done, tail = 0, b""
    while done + len(tail) < READ_MAX:
        piece = stream.read(min(_PIECE, READ_MAX - done - len(tail)))
        if not piece:
            break
        data = tail + piece
        end = data.rfind(b"\n") + 1
        _count_lines(data[:end], counts)
        done, tail = done + end, data[end:]
        if len(tail) > _LINE_MAX:  # a line that long is script output, never a record: skipped
            done, tail = done + len(tail), b""
    return done


def _count_lines(data: bytes, counts: Counts) -> None:
    for line in data.splitlines():
        try:
            counts.add(hooklog.parse(line.decode("utf-8", "backslashreplace")))
        except hooklog.BadRecord:
            continue  # script output, a cut line: not a record


def _same_file(path: str, position: Position) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (position.device, position.inode)


def _rotated_with(log: str, position: Position) -> str | None:
    """The rotated sibling that is the remembered file (logrotate renamed it), if any."""
    for path in reversed(hooklogview.log_files(log)[:-1]):
        if not path.endswith(".gz") and _same_file(path, position):
            return path
    return None


def _load(say: hooklogview.Report) -> tuple[Counts, Position | None]:
    """The remembered counts and position; fresh ones (and a word to `say`) when broken."""
    from kvmhook.hook import readfile

    path = paths.metrics_state()
    try:
        data = json.loads(readfile.read(path, _STATE_MAX))
        where = data["position"]
        position = Position(int(where["device"]), int(where["inode"]), int(where["offset"]))
        return Counts.from_dict(data["counts"]), position
    except FileNotFoundError:
        return Counts(), None
    except (OSError, ValueError, KeyError, TypeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not what kvmhook writes"
        say(f"{path}: {why}; counting the whole log again")
        return Counts(), None


def save(counts: Counts, position: Position | None) -> None:
    """Remember `counts` and `position` (None: no log yet, nothing remembered) atomically.

    Raises OSError when the state file cannot be written.
    """
    if position is None:
        return
    from kvmhook.files import Transaction

    state = {
        "position": {
            "device": position.device,
            "inode": position.inode,
            "offset": position.offset,
        },
        "counts": counts.as_dict(),
    }
    with Transaction() as files:
        files.write(paths.metrics_state(), json.dumps(state).encode(), 0o644, parent_mode=0o755)
