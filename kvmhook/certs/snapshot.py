"""Files as they are now (bytes, mode and group, or absence), to be put back exactly so."""

from __future__ import annotations

import contextlib
import os
import stat

from kvmhook.files import Transaction


class SavedFile:
    """A file's bytes, mode and group, or its absence (`data` None)."""

    def __init__(self, path: str, data: bytes | None, mode: int = 0, gid: int = -1) -> None:
        self.path = path
        self.data = data
        self.mode = mode
        self.gid = gid

    @classmethod
    def read(cls, path: str) -> SavedFile:
        try:
            with open(path, "rb") as source:
                info = os.fstat(source.fileno())
                return cls(path, source.read(), stat.S_IMODE(info.st_mode), info.st_gid)
        except FileNotFoundError:
            return cls(path, None)

    def stage(self, files: Transaction, path: str) -> None:
        """Write these bytes, mode and group at `path` (another path too) with `files`."""
        assert self.data is not None
        files.write(path, self.data, self.mode, self.gid)


def take(paths: list[str]) -> list[SavedFile]:
    """Every file of `paths` as it is now."""
    return [SavedFile.read(path) for path in paths]


def restore(saved: list[SavedFile]) -> None:
    """Every file as it was: contents, modes and groups in one transaction, then the absent
    ones removed."""
    with Transaction() as files:
        for each in saved:
            if each.data is not None:
                each.stage(files, each.path)
    for each in saved:
        if each.data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(each.path)
