"""Replacing files atomically, one or several together: all of them, or none.

A Transaction stages each file beside its target, `.NAME.ID.new` (written,
fsynced, born with its final mode: never readable by others, not even for a
moment), and renames them into place in staging order on commit(). A failure
while staging changes nothing already there.

commit() is all or nothing, across directories too (the agent's and
/etc/pki's). Before the first rename each existing target is hard-linked to
`.NAME.ID.old` and the transaction's record, its targets and the directories
it made, is synced to disk. If a rename fails (or the commit is interrupted),
every target already renamed gets its `.old` back, a new one is removed, and
so are the directories made. If the process is killed, the next Transaction
staging into any of those directories (the keystore tools also look first
thing) rolls the killed commit back the same way; only when every file had
been renamed does the commit stand, and just its leftovers are removed.
Either way no file is left from the new set beside one from the old.

The record is a journal, `.kvmhook-ID.journal`, in the directory of the first
file staged; each other directory gets one naming it. A live transaction
holds a lock (flock) on its journals, so a journal nobody holds is a killed
one's; one of another user's, or naming a file where the transaction kept no
journal, is not acted on. A target someone replaced after the killed commit
is left alone. After a commit that stands, a journal can stay in a directory
until a transaction touches it again: it changes nothing.

For tests only, KVMHOOK_TEST_FAULT=`fail:N` makes step N of a commit (the
links, the record, the renames, the clean-up, counted from 1) fail with
EBUSY, and `kill:N` SIGKILLs the process there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import signal
import stat
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import NamedTuple

from kvmhook.hook.process import write_all

_JOURNAL = ".kvmhook-{}.journal"
_FAULT = "KVMHOOK_TEST_FAULT"


class _Staged(NamedTuple):
    temp: str
    inode: tuple[int, int]  # (st_dev, st_ino) of the new file: it keeps them when renamed


class Transaction:
    """Files staged beside their targets and renamed into place on commit()."""

    def __init__(self) -> None:
        self._id = secrets.token_hex(8)
        self._staged: dict[str, _Staged] = {}  # by target, in staging order
        self._journals: dict[str, int] = {}  # directory -> journal fd (flock-ed); the record first
        self._created: list[str] = []
        self._stuck = False  # a failed commit could not be undone: the next run must do it

    def write(
        self,
        path: str,
        data: bytes,
        mode: int = 0o600,
        group: int | None = None,
        parent_mode: int | None = None,
    ) -> None:
        """Stage `data` for `path` with `mode` (and `group`, if given).

        An existing regular file's owner is kept; its mode is not: `mode`
        applies. Anything else there (a symlink) is replaced by a file of the
        user running this, never given the owner of what a link points to.
        With `parent_mode`, a missing directory is created (the target's own
        with that mode, those above it 0755) and removed again on abort.
        Staging the same path again replaces what was staged for it.
        """
        try:
            self._stage(os.path.abspath(path), data, mode, group, parent_mode)
        except OSError as error:
            # Name the target, not the temporary file beside it.
            raise OSError(error.errno, error.strerror, path) from None

    def _stage(
        self, path: str, data: bytes, mode: int, group: int | None, parent_mode: int | None
    ) -> None:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        directory = os.path.dirname(path)
        made = self._make_directories(directory, parent_mode) if parent_mode is not None else 0
        self._join(directory)
        if made and len(self._journals) > 1:
            self._rewrite_record({"created": self._created})
        if path in self._staged:
            os.unlink(self._staged.pop(path).temp)
        temp = _beside(path, self._id, "new")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, mode)
            owner = _owner(path)
            if owner is not None or group is not None:
                uid, gid = owner if owner is not None else (-1, -1)
                os.fchown(fd, uid, gid if group is None else group)
            write_all(fd, data)
            os.fsync(fd)
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        self._staged[path] = _Staged(temp, (info.st_dev, info.st_ino))

    def _join(self, directory: str) -> None:
        """A journal of this transaction in `directory`, after undoing a killed one's there."""
        if directory in self._journals:
            return
        _recover_directory(directory)
        record = next(iter(self._journals), None)
        if record is None:  # this one is the record: whatever was made for it so far
            content: dict = {"created": self._created}
        else:
            content = {"record": _journal(record, self._id)}
        self._journals[directory] = _new_journal(directory, self._id, content)

    def commit(self) -> None:
        """Rename every staged file into place, in staging order, and sync their directories.

        On failure every target is as it was before, and the error names the
        one that failed.
        """
        if not self._staged:
            self.abort()
            return
        faults = _Faults()
        targets = [(path, os.path.lexists(path), staged) for path, staged in self._staged.items()]
        current = ""
        try:
            for current, existed, _ in targets:
                if existed:
                    faults.step()
                    os.link(current, _beside(current, self._id, "old"), follow_symlinks=False)
            faults.step()
            self._write_record(targets)
            for current, _, staged in targets:
                faults.step()
                os.replace(staged.temp, current)
        except BaseException as error:
            self._undo(targets)
            if isinstance(error, OSError):
                raise OSError(error.errno, error.strerror, current) from None
            raise
        # Done: what is left if this fails or is cut short, the next transaction here removes.
        with contextlib.suppress(OSError):
            _sync_directories(self._journals)
        tidy = True
        for path, existed, _ in targets:
            try:
                if existed:
                    faults.step()
                    _remove(_beside(path, self._id, "old"))
            except OSError:
                tidy = False  # the journals stay, to lead the next transaction to it
        self._staged = {}
        self._created = []
        self._close(remove=tidy, faults=faults)

    def _write_record(self, targets: list[tuple[str, bool, _Staged]]) -> None:
        self._rewrite_record(_record(targets, self._created))
        _sync_directories(self._journals)  # the .old links and journals, before any rename

    def _rewrite_record(self, content: dict) -> None:
        data = json.dumps(content).encode()
        fd = next(iter(self._journals.values()))
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)

    def _undo(self, targets: list[tuple[str, bool, _Staged]]) -> None:
        """Put every target back after a failed commit; when that fails too, leave it all to
        the next run's recovery."""
        record = _journal(next(iter(self._journals)), self._id)
        try:
            _roll_back(record, self._id, _record(targets, self._created))
        except OSError:
            self._stuck = True
            self._close(remove=False)
            return
        self._staged = {}
        self.abort()

    def abort(self) -> None:
        """Remove every staged file, journal and created directory; the targets stay as they
        were."""
        if self._stuck:
            return
        for staged in self._staged.values():
            _remove(staged.temp)
        self._staged = {}
        self._close(remove=True)
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        self._created = []

    def _close(self, remove: bool, faults: _Faults | None = None) -> None:
        """Release the journals; with `remove`, delete them, the record last."""
        for directory, fd in reversed(list(self._journals.items())):
            if remove:
                with contextlib.suppress(OSError):
                    if faults is not None:
                        faults.step()
                    _remove(_journal(directory, self._id))
            os.close(fd)
        self._journals = {}

    def _make_directories(self, directory: str, mode: int) -> int:
        """Make `directory` and those above it that are missing; how many were."""
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for index, path in enumerate(reversed(missing)):
            os.mkdir(path, 0o700)
            self._created.append(path)
            os.chmod(path, mode if index == len(missing) - 1 else 0o755)  # whatever the umask
        return len(missing)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def _record(targets: list[tuple[str, bool, _Staged]], created: list[str]) -> dict:
    """What a journal records before the first rename: each target, whether it existed, and
    the device and inode of its new file; the directories made for them."""
    return {
        "targets": [[path, existed, *staged.inode] for path, existed, staged in targets],
        "created": created,
    }


def recover(paths: Iterable[str]) -> None:
    """Undo (or finish) what a killed Transaction left in the directories of `paths`."""
    for directory in sorted({os.path.dirname(os.path.abspath(path)) for path in paths}):
        _recover_directory(directory)


def _recover_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        # Exclusive: no transaction is between creating its journal and locking it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        for name in sorted(os.listdir(directory)):
            if name.startswith(".kvmhook-") and name.endswith(".journal"):
                _recover_journal(os.path.join(directory, name))
    finally:
        os.close(fd)


def _recover_journal(path: str) -> None:
    """Undo or finish the transaction of the journal at `path`, unless it is alive."""
    with _dead_journal(path) as content:
        if content is None:
            return
        ident = os.path.basename(path)[len(".kvmhook-") : -len(".journal")]
        record = content.get("record")
        if isinstance(record, str):
            if os.path.exists(record):
                _recover_journal(record)
            if os.path.exists(record):
                return  # its record is being recovered by someone else: leave this to them
            _remove_leftovers(os.path.dirname(path), ident)
        else:
            _roll_back(path, ident, content)
        _remove(path)


@contextlib.contextmanager
def _dead_journal(path: str) -> Iterator[dict | None]:
    """The content of the journal at `path` while holding its lock; None when a live
    transaction holds it, or it is gone."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        info = os.fstat(fd)
        # Gone while this waited (recovered), or not this user's: never acted on.
        if info.st_nlink == 0 or info.st_uid != os.geteuid():
            yield None
            return
        yield _read_journal(fd)
    finally:
        os.close(fd)


def _roll_back(record_path: str, ident: str, content: dict) -> None:
    """Every target of the record back as it was, unless every one was renamed (then the
    commit stands); then the leftovers, the other journals and the directories made go."""
    targets = content.get("targets")
    created = [made for made in content.get("created", []) if isinstance(made, str)]
    directories = {os.path.dirname(record_path), *created}
    renamed_all = False
    if isinstance(targets, list):
        renamed_all = not any(os.path.lexists(_beside(path, ident, "new")) for path, *_ in targets)
        for path, existed, device, inode in reversed(targets):
            _restore(path, ident, existed, (device, inode), renamed_all)
        directories |= {os.path.dirname(path) for path, *_ in targets}
    else:  # killed while staging: no target was touched
        for directory in directories:
            _remove_leftovers(directory, ident)
    _sync_directories(directories)
    for directory in directories - {os.path.dirname(record_path)}:
        _remove(_journal(directory, ident))
    for made in [] if renamed_all else reversed(created):
        with contextlib.suppress(OSError):  # not empty: someone else's files are there now
            os.rmdir(made)


def _restore(
    path: str, ident: str, existed: bool, inode: tuple[int, int], renamed_all: bool
) -> None:
    """`path` as it was before transaction `ident`, unless someone replaced it since; its
    staged and backup files removed."""
    if not os.path.exists(_journal(os.path.dirname(path), ident)):
        return  # the transaction never staged there: a record naming it is not to be trusted
    new, old = _beside(path, ident, "new"), _beside(path, ident, "old")
    if not renamed_all and not os.path.lexists(new) and _inode(path) == inode:
        if existed:
            os.replace(old, path)
        else:
            os.unlink(path)
    _remove(new)
    _remove(old)


def _remove_leftovers(directory: str, ident: str) -> None:
    """The staged and backup files of transaction `ident` in `directory`."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:  # a directory it made, removed since
        return
    for name in names:
        if name.startswith(".") and name.endswith((f".{ident}.new", f".{ident}.old")):
            _remove(os.path.join(directory, name))


def _new_journal(directory: str, ident: str, content: dict) -> int:
    """A journal in `directory` holding `content`, created and locked while no recovery reads
    the directory; its fd."""
    path = _journal(directory, ident)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = -1
    try:
        fcntl.flock(directory_fd, fcntl.LOCK_SH)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, json.dumps(content).encode(), 0)
        os.fsync(fd)
    except BaseException:
        if fd >= 0:
            os.unlink(path)
            os.close(fd)
        raise
    finally:
        os.close(directory_fd)
    return fd


def _read_journal(fd: int) -> dict:
    """A journal's content; {} for one killed before it had any."""
    try:
        content = json.loads(os.pread(fd, os.fstat(fd).st_size, 0) or b"{}")
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def _journal(directory: str, ident: str) -> str:
    return os.path.join(directory, _JOURNAL.format(ident))


def _beside(path: str, ident: str, kind: str) -> str:
    """The staged (`new`) or backup (`old`) file of `path` in transaction `ident`."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{ident}.{kind}")


def _inode(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sync_directories(directories: Iterable[str]) -> None:
    for directory in sorted(directories):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # made by a killed transaction, and removed since
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _owner(path: str) -> tuple[int, int] | None:
    """The owner of the regular file at `path` (not of what a symlink there points to)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_uid, info.st_gid) if stat.S_ISREG(info.st_mode) else None


class _Faults:
    """Counts a commit's steps for KVMHOOK_TEST_FAULT (tests only; unset, it does nothing)."""

    def __init__(self) -> None:
        action, _, step = os.environ.get(_FAULT, "").partition(":")
        self._action = action
        self._at = int(step) if step.isdigit() else 0
        self._count = 0

    def step(self) -> None:
        self._count += 1
        if self._count != self._at:
            return
        if self._action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self._action == "fail":
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
