"""The command-line encoding of PEM content: newlines as `^`, spaces as `~`.

The controller passes certificates and keys as single arguments over SSH;
this encoding keeps each one a single shell word.
"""

from __future__ import annotations


def decode(content: str) -> bytes:
    """PEM bytes from an encoded argument."""
    return content.replace("^", "\n").replace("~", " ").encode("ascii")


def encode(pem: bytes) -> str:
    """The argument form of PEM bytes (for callers and tests)."""
    return pem.decode("ascii").replace("\n", "^").replace(" ", "~")
