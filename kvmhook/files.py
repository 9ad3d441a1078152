"""Replacing files atomically: written beside the target, fsynced, renamed.

A Transaction stages several files and renames them into place together at
the end, in the order they were staged, so a failure while preparing them
changes nothing already there. Staged files are born with their final mode
(never readable by others, not even for a moment: mkstemp creates them 0600).
"""

from __future__ import annotations

import os
import tempfile
from types import TracebackType


class Transaction:
    """Files staged beside their targets and renamed into place on commit()."""

    def __init__(self) -> None:
        self._staged: list[tuple[str, str]] = []

    def write(self, path: str, data: bytes, mode: int = 0o600, group: int | None = None) -> None:
        """Stage `data` for `path` with `mode` (and `group`, if given).

        An existing target's owner is kept; its mode is not: `mode` applies.
        """
        directory = os.path.dirname(os.path.abspath(path))
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
        for temp, path in self._staged:
            os.replace(temp, path)
            directories.add(os.path.dirname(os.path.abspath(path)))
        self._staged = []
        for directory in sorted(directories):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Remove every staged file; the targets stay as they were."""
        for temp, _ in self._staged:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
        self._staged = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def _owner(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid
