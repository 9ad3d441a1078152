"""`keystore.passphrase=` in the agent's properties file, every other line kept."""

from __future__ import annotations

import re

_PASSPHRASE = re.compile(r"^\s*keystore\.passphrase\s*[=:]\s*(.*?)\s*$")


def passphrase(text: str) -> str | None:
    """The passphrase the properties text holds, or None (an empty value counts as none)."""
    for line in text.splitlines():
        found = _PASSPHRASE.match(line)
        if found and found.group(1):
            return found.group(1)
    return None


def with_passphrase(text: str, value: str) -> str:
    """`text` with `keystore.passphrase=value`: an existing value stays, else one is appended."""
    if passphrase(text) is not None:
        return text
    lines = [line for line in text.splitlines(keepends=True) if not _PASSPHRASE.match(line)]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + f"keystore.passphrase={value}\n"
