"""Structured events of the long operations (`cert renew`, `maintenance enter`, `migrate`,
`metrics`, `network gc`), through structlog, on stderr: each command's result stays on
stdout exactly as documented.

Readable `key=value` lines on a terminal (structlog's console renderer, no
colours); one JSON object per line with `kvmhook --log-format json`, and by
default when systemd runs the command (JOURNAL_STREAM set), so the journal
and log shippers get fields rather than prose. Events carry what an operator
greps for: guest, host, certificate path and serial, state, duration_s.
structlog is imported only when the first event is emitted: the other
commands, and the qemu hook (which never imports this module), pay nothing.
"""

from __future__ import annotations

import os
import sys

FORMATS = ("auto", "text", "json")
_format = "auto"
_configured = False


def set_format(name: str) -> None:
    """`auto` (JSON under systemd, text otherwise), `text` or `json`."""
    global _format, _configured
    _format, _configured = name, False


def emit(event: str, **fields: object) -> None:
    """One event, e.g. emit("migration.done", guest="vm1", host="kvm2", duration_s=3.2)."""
    import structlog

    _configure(structlog)
    structlog.get_logger("kvmhook").info(event, **fields)


def failed(event: str, error: BaseException, **fields: object) -> None:
    """A command's failure as an event: in JSON only, for the journal and log shippers; as
    text, the command's one `Error:` line already says it."""
    if _json_lines():
        emit(event, error=" ".join(str(error).split()), **fields)


def _json_lines() -> bool:
    return _format == "json" or (_format == "auto" and "JOURNAL_STREAM" in os.environ)


def _configure(structlog: object) -> None:
    global _configured
    if _configured:
        return
    json_lines = _json_lines()
    processors = [
        structlog.processors.add_log_level,  # type: ignore[attr-defined]
        structlog.processors.TimeStamper(fmt="iso", utc=True),  # type: ignore[attr-defined]
        structlog.processors.JSONRenderer()  # type: ignore[attr-defined]
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False),  # type: ignore[attr-defined]
    ]
    structlog.configure(  # type: ignore[attr-defined]
        processors=processors,
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),  # type: ignore[attr-defined]
        cache_logger_on_first_use=False,
    )
    _configured = True
