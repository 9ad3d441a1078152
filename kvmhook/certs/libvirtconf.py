"""libvirt's configuration files (libvirtd.conf, qemu.conf), edited in place.

The format is `key = value` lines; values are numbers, double-quoted strings
or `[ ... ]` lists that may span lines; `#` starts a comment. Distributions
ship every setting as a commented-out default (`#listen_tls = 0`). Editing
keeps every other line byte for byte: a changed key is rewritten on its own
line, a new one goes right after its commented-out default (or at the end).
"""

from __future__ import annotations

import re

from kvmhook.errors import TlsError

CODEC = ("utf-8", "surrogateescape")  # whatever bytes a file holds are written back as they were
_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_COMMENTED = re.compile(r"^\s*#\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


class ConfFile:
    """The lines of one libvirt configuration file."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)
        if self.lines and not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"

    def text(self) -> str:
        return "".join(self.lines)

    def get(self, key: str) -> str | None:
        """The value text of the last active `key = ...` (as written, quotes kept), or None."""
        found = None
        for index in self._active(key):
            found = _value(self.lines, index)
        return found

    def set(self, key: str, value: str) -> bool:
        """Make `key = value` (`value` as written, e.g. `"16514"` or `1`); True if it changed."""
        wanted = f"{key} = {value}\n"
        active = list(self._active(key))
        if active:
            if len(active) == 1 and _value(self.lines, active[0]) == value:
                return False
            first, *rest = active
            for index in reversed(rest):  # libvirt takes the last; keep exactly one
                del self.lines[index : _end(self.lines, index) + 1]
            del self.lines[first + 1 : _end(self.lines, first) + 1]
            self.lines[first] = wanted
            return True
        self.lines.insert(self._after_default(key), wanted)
        return True

    def _active(self, key: str) -> list[int]:
        found = []
        index = 0
        while index < len(self.lines):
            match = _ASSIGNMENT.match(self.lines[index])
            if match and match.group(1) == key:
                found.append(index)
            index = _end(self.lines, index) + 1 if match else index + 1
        return found

    def _after_default(self, key: str) -> int:
        for index, line in enumerate(self.lines):
            match = _COMMENTED.match(line)
            if match and match.group(1) == key:
                return index + 1
        return len(self.lines)


def quote(text: str) -> str:
    """A string value as libvirt's parser reads it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote(value: str) -> str:
    """A value as written (quote() undone; numbers as they are)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def read(path: str) -> str:
    """A configuration file's text (CODEC); TlsError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as source:
            return source.read().decode(*CODEC)
    except FileNotFoundError:
        raise TlsError(f"{path} does not exist") from None
    except OSError as error:
        raise TlsError(f"cannot read {path}: {error.strerror}") from None


def _value(lines: list[str], index: int) -> str:
    match = _ASSIGNMENT.match(lines[index])
    assert match is not None
    text = match.group(2)
    for line in lines[index + 1 : _end(lines, index) + 1]:
        text += " " + line.strip()
    return _strip_comment(text)


def _end(lines: list[str], index: int) -> int:
    """Index of the last line of the assignment starting at `index` (lists may span lines)."""
    depth = 0
    for end in range(index, len(lines)):
        code = _strip_comment(lines[end])
        depth += code.count("[") - code.count("]")
        if depth <= 0:
            return end
    return len(lines) - 1


def _strip_comment(text: str) -> str:
    """`text` without a trailing `# ...` outside quotes."""
    quoted = False
    for position, char in enumerate(text):
        if char == '"' and (position == 0 or text[position - 1] != "\\"):
            quoted = not quoted
        elif char == "#" and not quoted:
            return text[:position].rstrip()
    return text.strip()
