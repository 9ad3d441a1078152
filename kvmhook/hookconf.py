"""kvmhook.conf as the hook sees it: read once, parsed only when a setting may be on.

configparser costs about 10 ms to import, paid on every guest start if the
hook parsed the file each time. Most hosts have no file, or one that turns
nothing on for the hook, so the hook first looks at the raw lines and parses
(with `config`, the one place that knows the format) only when one of its own
settings is there with a value other than its default.
"""

from kvmhook import paths

# A few settings take a few hundred bytes: a bigger file is not a kvmhook.conf.
MAX_SIZE = 1024 * 1024

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from kvmhook.config import Config


class HookConf:
    """The bytes of kvmhook.conf, and the parsed file once something needed it."""

    __slots__ = ("_parsed", "data", "path")

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.data = data
        self._parsed: Config | None = None

    def may_set(self, option: str, default: str) -> bool:
        """Whether some line sets `option` to a value other than `default`.

        A shortcut only: without such a line configparser would find the option
        absent or at its default (comments start with `#` or `;`, never with a
        name), so the answer False is exact and True means "parse to know".
        """
        name = option.encode()
        for line in self.data.lower().splitlines():
            rest = line.strip()
            if not rest.startswith(name):
                continue
            rest = rest[len(name) :].lstrip()
            if rest[:1] in (b"=", b":") and rest[1:].strip() != default.encode():
                return True
        return False

    def parsed(self) -> "Config":
        """The file parsed by `config`; raises ConfigError when it cannot be."""
        if self._parsed is None:
            from kvmhook import config

            self._parsed = config.parse(self.data, self.path)
        return self._parsed


def read() -> "HookConf | None":
    """kvmhook.conf, or None when there is none.

    Raises OSError when it cannot be read: readfile.RefusedFile, saying why in
    its strerror, when it is not a regular file (a FIFO would block the hook) or
    is larger than MAX_SIZE.
    """
    from kvmhook import readfile

    path = paths.kvmhook_conf()
    try:
        return HookConf(path, readfile.read(path, MAX_SIZE))
    except FileNotFoundError:
        return None
