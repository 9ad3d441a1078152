"""Replacing files atomically: written beside the target, fsynced, renamed.

A Transaction stages several files and renames them into place together at
the end, in the order they were staged, so a failure while preparing them
changes nothing already there. Staged files are born with their final mode
(never readable by others, not even for a moment: mkstemp creates them 0600).
"""

from __future__ import annotations

import errno
import os
import tempfile
from types import TracebackType


class Transaction:
    """Files staged beside their targets and renamed into place on commit()."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, str]] = []
        self._created: list[str] = []

    def write(
        self,
        path: str,
        data: bytes,
        mode: int = 0o600,
        group: int | None = None,
        parent_mode: int | None = None,
    ) -> None:
        """Stage `data` for `path` with `mode` (and `group`, if given).

        An existing target's owner is kept; its mode is not: `mode` applies.
        With `parent_mode`, a missing directory is created (the target's own
        with that mode, those above it 0755) and removed again on abort.
        """
        try:
            self._stage(path, data, mode, group, parent_mode)
        except OSError as error:
            # Name the target, not the temporary file beside it.
            raise OSError(error.errno, error.strerror, path) from None

    def _stage(
        self, path: str, data: bytes, mode: int, group: int | None, parent_mode: int | None
    ) -> None:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        directory = os.path.dirname(os.path.abspath(path))
        if parent_mode is not None:
            self._make_directories(directory, parent_mode)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            os.fchmod(fd, mode)
            owner = _owner(path)
            if owner is not None or group is not None:
                uid, gid = owner if owner is not None else (-1, -1)
                os.fchown(fd, uid, gid if group is None else group)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        self._staged.append((temp, path))

    def commit(self) -> None:
        """Rename every staged file into place, in staging order, and sync their directories."""
        directories = set()
        while self._staged:
            temp, path = self._staged[0]
            try:
                os.replace(temp, path)
            except OSError as error:
                raise OSError(error.errno, error.strerror, path) from None
            self._staged.pop(0)
            directories.add(os.path.dirname(os.path.abspath(path)))
        self._created = []
        for directory in sorted(directories):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Remove every staged file and created directory; the targets stay as they were."""
        for temp, _ in self._staged:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        for directory in reversed(self._created):
            try:
                os.rmdir(directory)
            except OSError:
                pass
        self._staged = []
        self._created = []

    def _make_directories(self, directory: str, mode: int) -> None:
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for index, path in enumerate(reversed(missing)):
            os.mkdir(path, 0o700)
            self._created.append(path)
            os.chmod(path, mode if index == len(missing) - 1 else 0o755)  # whatever the umask

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
            self.abort()  # what was not renamed yet goes; what was renamed stays
            raise


def _owner(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid
