"""kvmhook.conf: the agent's own settings, one INI file, read only when present.

`<root>/etc/kvmhook/kvmhook.conf`. Each feature has its section (`[capacity]`,
`[hooks]`) and a typed getter here. A missing file, section or option means
the built-in default, so a host needs no file at all.
"""

from __future__ import annotations

import configparser

from kvmhook import limits, paths
from kvmhook.errors import ConfigError
from kvmhook.hook.operations import ABORTABLE, BY_NAME

# What each syntax error means, most specific first; each knows the line it found wrong.
_SYNTAX_PROBLEMS = (
    (configparser.MissingSectionHeaderError, "a setting before any [section]"),
    (configparser.DuplicateSectionError, "a section that appears twice"),
    (configparser.DuplicateOptionError, "a setting that appears twice in its section"),
    (configparser.ParsingError, "neither a [section] nor name = value"),
)
SYNTAX_ERRORS = tuple(kind for kind, _words in _SYNTAX_PROBLEMS)


class Config(configparser.ConfigParser):
    """The file as read (empty when there is none), with its path for error messages."""

    def __init__(self, path: str) -> None:
        # No interpolation: a `%` in a value means itself, as an operator expects.
        super().__init__(interpolation=None)
        self.path = path

    def number(self, section: str, option: str) -> float | None:
        """The option as a float; None when unset. Raises ConfigError when not a number."""
        value = self.get(section, option, fallback=None)
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                f"{self.path}: [{section}] {option} = {value}: not a number"
            ) from None


def load() -> Config:
    """kvmhook.conf as read; empty when the file does not exist.

    Raises ConfigError naming the file, and the line when its syntax is wrong.
    """
    from kvmhook.hook import (
        hookconf,  # one reader for the hook and the CLI: bounded, never blocking
    )

    path = paths.kvmhook_conf()
    try:
        conf = hookconf.read()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    return Config(path) if conf is None else conf.parsed()


def parse(data: bytes, path: str) -> Config:
    """The file's bytes `data` as a Config (the hook has read them already).

    Raises ConfigError naming `path`, and the line when the syntax is wrong.
    """
    config = Config(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        config.read_string(text, source=path)
    except SYNTAX_ERRORS as error:
        # The first bad line: kvmhook.conf holds no secret, so it is shown.
        lineno = _linenos(error)[0]
        # read_string splits on "\n" alone, so the same split finds the same line.
        line = text.split("\n")[lineno - 1].strip()
        raise ConfigError(f"{path}, line {lineno}: {_problem(error)}: {line}") from None
    return config


def syntax_problem(error: configparser.Error) -> str:
    """`line N: what is wrong` (`lines N, M: ...`) for one of SYNTAX_ERRORS, and not a word
    of the lines themselves: controller.conf's may hold the API secret."""
    linenos = _linenos(error)
    where = "line" if len(linenos) == 1 else "lines"
    return f"{where} {', '.join(str(lineno) for lineno in linenos)}: {_problem(error)}"


def _problem(error: configparser.Error) -> str:
    return next(words for kind, words in _SYNTAX_PROBLEMS if isinstance(error, kind))


def _linenos(error: configparser.Error) -> list[int]:
    # A plain ParsingError lists every bad line, without a lineno of its own.
    if hasattr(error, "lineno"):
        return [error.lineno]
    return [lineno for lineno, _line in error.errors]


def cpu_factor(config: Config) -> float | None:
    """`[capacity] cpu_factor`: CPU over-provisioning factor; None when unset."""
    return _factor(config, "cpu_factor")


def mem_factor(config: Config) -> float | None:
    """`[capacity] mem_factor`: memory over-provisioning factor; None when unset."""
    return _factor(config, "mem_factor")


def _factor(config: Config, option: str) -> float | None:
    """`[capacity] option`; ConfigError unless it is a number within limits.FACTOR_RANGE."""
    value = config.number("capacity", option)
    if value is not None and not 0 < value <= limits.MAX_FACTOR:  # NaN fails both
        raise ConfigError(
            f"{config.path}: [capacity] {option} must be {limits.FACTOR_RANGE}, not {value:g}"
        )
    return value


# A host's own memory kept out of capacity: more than this is no host's.
MAX_RESERVED_MIB = 16 * 1024 * 1024
RESERVED_PROPERTY = "host.reserved.mem.mb"


def reserved_memory(config: Config) -> tuple[int, str]:
    """(bytes, where from: `kvmhook.conf`, `agent.properties` or `none`) of the host's memory
    kept out of capacity: `[capacity] reserved_memory_mib`, else `host.reserved.mem.mb` in
    agent.properties (the CloudStack agent's own key), else 0. The hook's admission control
    and `kvmhook capacity` both read it here, so they agree. Raises ConfigError for a value
    that is not a whole number of MiB from 0 to MAX_RESERVED_MIB, naming where it is."""
    value = config.get("capacity", "reserved_memory_mib", fallback=None)
    source, where = "kvmhook.conf", f"{config.path}: [capacity] reserved_memory_mib"
    if value is None:
        from kvmhook.certs import agentproperties
        from kvmhook.errors import KeystoreError

        try:
            path, text = agentproperties.read_host()
        except KeystoreError as error:
            raise ConfigError(str(error)) from None
        value = None if text is None else agentproperties.value(text, RESERVED_PROPERTY)
        if value is None:
            return 0, "none"
        source, where = "agent.properties", f"{path}: {RESERVED_PROPERTY}"
    mib = limits.whole_number(value.strip(), 0, MAX_RESERVED_MIB)
    if mib is None:
        raise ConfigError(
            f"{where} = {value.strip()}: not a whole number of MiB from 0 to {MAX_RESERVED_MIB}"
        )
    return mib * 1024 * 1024, source


IGNORE, ABORT = "ignore", "abort"


def abort_on(config: Config) -> frozenset[str]:
    """The operations a failing custom script aborts: `[hooks] on_failure` and `abort_on`.

    Empty with `on_failure = ignore` (the default). Raises ConfigError for a
    value that is not understood, or an operation that must never abort.
    """
    on_failure = config.get("hooks", "on_failure", fallback=IGNORE).strip().lower()
    if on_failure not in (IGNORE, ABORT):
        raise ConfigError(
            f"{config.path}: [hooks] on_failure = {on_failure}: neither {IGNORE} nor {ABORT}"
        )
    listed = config.get("hooks", "abort_on", fallback=None)
    names = ABORTABLE if listed is None else listed.lower().replace(",", " ").split()
    for name in names:
        operation = BY_NAME.get(name)
        if operation is None:
            raise ConfigError(
                f"{config.path}: [hooks] abort_on = {listed}: {name} is not an "
                f"operation (choose from {', '.join(ABORTABLE)})"
            )
        if not operation.may_abort:
            raise ConfigError(
                f"{config.path}: [hooks] abort_on = {listed}: {name} can never "
                f"abort ({operation.never_aborts})"
            )
    if listed is not None and not names:
        raise ConfigError(
            f"{config.path}: [hooks] abort_on is empty (leave it out for every "
            f"operation that can abort: {', '.join(ABORTABLE)})"
        )
    return frozenset(names) if on_failure == ABORT else frozenset()
