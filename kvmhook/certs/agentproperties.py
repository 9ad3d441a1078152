"""`keystore.passphrase=` in the agent's properties file, every other line kept byte for byte;
any other key read as the agent reads it (kvmhook.net.bridges: `guest.network.device`).

The agent reads the file with Java's `Properties.load(InputStream)`: bytes
are ISO-8859-1 characters, `\\` escapes, a line ending in an odd number of
backslashes continues on the next, whitespace before a value is dropped but
not after it, and of two lines with the same key the last wins. This module
reads it the same way and writes the passphrase as `Properties.store` would,
so the agent finds exactly the passphrase that opens the keystore.

Text here is the file's bytes decoded as ISO-8859-1: every byte maps to one
character and back, so lines this module does not touch stay as they were
(CRLF line ends included).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kvmhook.errors import KeystoreError

KEY = "keystore.passphrase"
ENCODING = "iso-8859-1"
_WHITESPACE = " \t\f"
_NATURAL_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)?")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
_STORED = {" ": "\\ ", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}


# A properties file is a page of settings: anything bigger is not the agent's.
MAX_SIZE = 1024 * 1024


class Entry(NamedTuple):
    """One key and value, and where its logical line (continuations and line end
    included) starts and ends in the text."""

    key: str
    value: str
    start: int
    end: int


def read(path: str) -> str | None:
    """The properties file as text (see the module's docstring); None when it does not exist.
    KeystoreError when it cannot be read, by this module or by Java."""
    from kvmhook.hook import readfile

    try:
        # The hook reads it too (the bridge rename): never block on a FIFO, never read unbounded.
        text = readfile.read(path, MAX_SIZE).decode(ENCODING)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise KeystoreError(f"cannot read properties file {path}: {error.strerror}") from None
    try:
        entries(text)
    except KeystoreError as error:
        raise KeystoreError(f"properties file {path} {error}") from None
    return text


def read_host() -> tuple[str, str | None]:
    """(path, text) of this host's agent.properties (paths.agent_files()), for the keys kvmhook
    reads besides the passphrase; text None when there is none. KeystoreError as read()."""
    from kvmhook import paths

    path = paths.agent_files().properties
    return path, read(path)


def passphrase(text: str) -> str | None:
    """The passphrase the agent would read, or None (an empty value counts as none)."""
    return value(text, KEY)


def value(text: str, key: str) -> str | None:
    """The value the agent reads for `key` (the last line wins), or None (empty counts as none)."""
    values = [entry.value for entry in entries(text) if entry.key == key]
    return values[-1] if values and values[-1] else None


def with_passphrase(text: str, value: str) -> str:
    """`text` with `keystore.passphrase=value`: an existing value stays, else one is appended
    (empty ones removed) with the file's own line end."""
    if passphrase(text) is not None:
        return text
    for entry in reversed([entry for entry in entries(text) if entry.key == KEY]):
        text = text[: entry.start] + text[entry.end :]
    ending = re.search(r"\r\n|\r|\n", text)
    newline = ending.group() if ending else "\n"
    if text and not text.endswith(("\n", "\r")):
        text += newline
    line = f"{KEY}={escape(value)}{newline}"
    if passphrase(text + line) != value:
        text += newline  # the last line continued onto this one: a blank line ends it
    return text + line


def escape(value: str) -> str:
    """`value` as `Properties.store` writes a value: ASCII, `\\` escapes and \\uXXXX."""
    out = []
    for index, char in enumerate(value):
        if char == " " and index > 0:
            out.append(char)
        elif char in _STORED:
            out.append(_STORED[char])
        elif char in "\\=:#!":
            out.append("\\" + char)
        elif " " < char <= "~":
            out.append(char)
        else:
            units = char.encode("utf-16-be", "surrogatepass")
            out.extend(f"\\u{units[i]:02X}{units[i + 1]:02X}" for i in range(0, len(units), 2))
    return "".join(out)


def entries(text: str) -> list[Entry]:
    """Every key and value in `text`, in order, as `Properties.load` finds them."""
    lines = [match for match in _NATURAL_LINE.finditer(text) if match.group()]
    found = []
    index = 0
    while index < len(lines):
        start = lines[index].start()
        logical, index = _logical_line(lines, index)
        if logical is not None:
            found.append(Entry(*_split(logical), start, lines[index - 1].end()))
    return found


def _logical_line(lines: list[re.Match], index: int) -> tuple[str | None, int]:
    """The logical line starting at natural line `index` (None for a blank or comment line),
    and the index of the natural line after it."""
    content = lines[index].group().rstrip("\r\n").lstrip(_WHITESPACE)
    index += 1
    if not content or content[0] in "#!":
        return None, index
    while _continues(content):
        content = content[:-1]
        if index == len(lines):
            return content, index  # at the end of the file, even an empty line counts
        more = lines[index].group().rstrip("\r\n").lstrip(_WHITESPACE)
        index += 1
        content += more
        if not more:  # a blank line ends it, as Java's LineReader does; so does nothing
            return content or None, index
    return content, index


def _continues(content: str) -> bool:
    """Whether the line ends in an odd number of backslashes."""
    return (len(content) - len(content.rstrip("\\"))) % 2 == 1


def _split(line: str) -> tuple[str, str]:
    """(key, value) of a logical line: the key ends at the first unescaped `=`, `:` or
    whitespace; whitespace and one `=` or `:` after it are skipped."""
    escaped = False
    end = len(line)
    for position, char in enumerate(line):
        if not escaped and (char in "=:" or char in _WHITESPACE):
            end = position
            break
        escaped = char == "\\" and not escaped
    rest = line[end:].lstrip(_WHITESPACE)
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(_WHITESPACE)
    return _unescape(line[:end]), _unescape(rest)


def _unescape(text: str) -> str:
    out = []
    position = 0
    while position < len(text):
        char = text[position]
        position += 1
        if char != "\\":
            out.append(char)
            continue
        char = text[position]
        position += 1
        if char == "u":
            digits = text[position : position + 4]
            if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                # Not the line itself: it may hold the passphrase.
                raise KeystoreError("holds a malformed \\uxxxx escape, which Java refuses too")
            out.append(chr(int(digits, 16)))
            position += 4
        else:
            out.append(_ESCAPES.get(char, char))
    # \uXXXX escapes are UTF-16 units, as in Java's strings: pairs make one character.
    return "".join(out).encode("utf-16-be", "surrogatepass").decode("utf-16-be", "surrogatepass")
