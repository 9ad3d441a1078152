"""kvmhook.conf: the agent's own settings, one INI file, read only when present.

`<root>/etc/kvmhook/kvmhook.conf`. Each feature has its section (`[capacity]`
for now) and a typed getter here. A missing file, section or option means
the built-in default, so a host needs no file at all.
"""

from __future__ import annotations

import configparser

from kvmhook import paths
from kvmhook.errors import ConfigError

# What each syntax error means, most specific first; each knows the line it found wrong.
_SYNTAX_PROBLEMS = (
    (configparser.MissingSectionHeaderError, "a setting before any [section]"),
    (configparser.DuplicateSectionError, "a section that appears twice"),
    (configparser.DuplicateOptionError, "a setting that appears twice in its section"),
    (configparser.ParsingError, "neither a [section] nor name = value"),
)
_SYNTAX_ERRORS = tuple(kind for kind, _words in _SYNTAX_PROBLEMS)


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
    config = Config(paths.kvmhook_conf())
    try:
        with open(config.path, encoding="utf-8") as source:
            text = source.read()
    except FileNotFoundError:
        return config
    except OSError as error:
        raise ConfigError(f"cannot read {config.path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{config.path}: not UTF-8 text") from None
    try:
        config.read_string(text, source=config.path)
    except _SYNTAX_ERRORS as error:
        raise ConfigError(f"{config.path}, {_syntax_problem(error, text)}") from None
    return config


def _syntax_problem(error: configparser.Error, text: str) -> str:
    """`line N: what is wrong: the line` for one of _SYNTAX_ERRORS."""
    problem = next(words for kind, words in _SYNTAX_PROBLEMS if isinstance(error, kind))
    # A plain ParsingError lists every bad line, without a lineno of its own: the first will do.
    lineno = error.lineno if hasattr(error, "lineno") else error.errors[0][0]
    # read_string splits on "\n" alone, so the same split finds the same line.
    line = text.split("\n")[lineno - 1].strip()
    return f"line {lineno}: {problem}: {line}"


def cpu_factor(config: Config) -> float | None:
    """`[capacity] cpu_factor`: CPU over-provisioning factor; None when unset."""
    return config.number("capacity", "cpu_factor")


def mem_factor(config: Config) -> float | None:
    """`[capacity] mem_factor`: memory over-provisioning factor; None when unset."""
    return config.number("capacity", "mem_factor")
