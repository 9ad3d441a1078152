"""The hook's settings: each custom script's limits, and kvmhook.conf as the hook sees it.

The limits are resolved once, at the top of each entry point (the hook's
main, `kvmhook hooks run`), and passed down: the launcher's `timeoutSeconds`,
then KVMHOOK_TIMEOUT, KVMHOOK_TERM_GRACE and KVMHOOK_MAX_OUTPUT over it. The
hook gets `timeoutSeconds` from the launcher that imports it; `kvmhook hooks
run` reads it from the installed launcher's text, never running it.

kvmhook.conf is read once and parsed only when a setting may be on:
configparser costs about 10 ms to import, paid on every guest start if the
hook parsed the file each time. Most hosts have no file, or one that turns
nothing on for the hook, so the hook first looks at the raw lines and parses
(with `config`, the one place that knows the format) only when one of its own
settings is there with a value other than its default.
"""

import os

from kvmhook import paths

# A few settings take a few hundred bytes: a bigger file is not a kvmhook.conf.
MAX_SIZE = 1024 * 1024

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmhook.config import Config


class RawReadError(Exception):
    """A file HookConf.raw cannot read as configparser would: parse it instead."""


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

    def raw(self, section: str, option: str) -> "str | None":
        """The value of `option` in `[section]`, None when unset, read from the lines without
        configparser (about 10 ms to import) and agreeing with it. Raises RawReadError for
        anything it does not read as configparser would (an indented line, a `[DEFAULT]`
        section, a line that is neither `[section]` nor `name = value`, a section or an
        option twice, bytes that are not UTF-8): the caller then parses."""
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise RawReadError from None
        wanted, found = (f"[{section}]", option.lower()), None
        seen: set = set()
        current = None
        for line in text.split("\n"):  # as configparser splits: never on \f or \x1c
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if line[0].isspace() or stripped == "[DEFAULT]":
                raise RawReadError
            if stripped[0] == "[":
                current = stripped
                if len(stripped) < 3 or stripped[-1] != "]" or current in seen:
                    raise RawReadError
                seen.add(current)
                continue
            # configparser splits at the first `=` or `:`, whichever comes first.
            cut = min((at for at in (line.find("="), line.find(":")) if at >= 0), default=-1)
            key = (current, line[:cut].strip().lower())
            if current is None or cut < 0 or not key[1] or key in seen:
                raise RawReadError
            seen.add(key)
            if key == wanted:
                found = line[cut + 1 :].strip()
        return found

    def parsed(self) -> "Config":
        """The file parsed by `config`; raises ConfigError when it cannot be."""
        if self._parsed is None:
            from kvmhook import config

            self._parsed = config.parse(self.data, self.path)
        return self._parsed


def renames_bridges(conf: "HookConf | None", complain: "Callable[[str], None]") -> bool:
    """`[network] rename_bridges` (default yes): whether `migrate begin` renames the guest's
    bridges for this host (kvmhook.net.bridges). Parsed only when a line may turn it off; a
    file that does not parse, or a value that is no boolean, is said to `complain` and the
    default applies: a broken file never breaks a migration."""
    if conf is None or not conf.may_set("rename_bridges", "yes"):
        return True
    try:
        return conf.parsed().getboolean("network", "rename_bridges", fallback=True)
    except Exception as error:  # ConfigError, or configparser's ValueError for the value
        complain(f"{error}; [network] rename_bridges = yes applies")
        return True


def words(
    conf: "HookConf | None", section: str, option: str, complain: "Callable[[str], None]"
) -> "list[str]":
    """The comma- or space-separated words of `[section] option`, [] when unset: read from
    the raw lines (HookConf.raw), parsed only when they cannot tell, since the hook reads
    `[network] provision` and `keep` on every guest start and stop where they are set. A
    file that does not parse is said to `complain`, and [] applies."""
    if conf is None:
        return []
    try:
        value = conf.raw(section, option)
    except RawReadError:
        try:
            value = conf.parsed().get(section, option, fallback=None)
        except Exception as error:  # ConfigError: a broken file never blocks a guest
            complain(f"{error}; [{section}] {option} unset")
            return []
    return [] if value is None else value.replace(",", " ").split()


# What `[network] provision` may list (kvmhook.net.provision makes them).
PROVISION_KINDS = ("vxlan", "vlan")


def provisions(conf: "HookConf | None", complain: "Callable[[str], None]") -> "list[str]":
    """`[network] provision`: the kinds of bridges the hook makes where a guest needs them
    (default none). A word that is no kind is said to `complain` and left out."""
    kinds = []
    for word in words(conf, "network", "provision", complain):
        if word.lower() in PROVISION_KINDS:
            kinds.append(word.lower())
        elif word.lower() != "none":
            complain(f"[network] provision: {word!r} is neither vxlan nor vlan; left out")
    return kinds


def read() -> "HookConf | None":
    """kvmhook.conf, or None when there is none.

    Raises OSError when it cannot be read: readfile.RefusedFile, saying why in
    its strerror, when it is not a regular file (a FIFO would block the hook) or
    is larger than MAX_SIZE.
    """
    path = paths.kvmhook_conf()
    if not os.path.lexists(path):
        return None  # most hosts: one lstat, and readfile's import is never paid
    from kvmhook.hook import readfile

    try:
        return HookConf(path, readfile.read(path, MAX_SIZE))
    except FileNotFoundError:
        return None


# The hook's limits on each custom script, where neither the launcher's
# `timeoutSeconds` nor a KVMHOOK_* variable says otherwise.
DEFAULT_TIMEOUT = 600.0
DEFAULT_GRACE = 5.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
# The launcher is a page of text: anything bigger is not the file the packages installed.
LAUNCHER_MAX = 64 * 1024


class Limits:
    """Each custom script's limits: seconds it may run, seconds from SIGTERM to SIGKILL,
    and output bytes kept. `timeout_from` says which setting chose the timeout:
    `KVMHOOK_TIMEOUT`, `timeoutSeconds` (the launcher's) or `default`."""

    __slots__ = ("grace", "max_output", "timeout", "timeout_from")

    def __init__(self, timeout: float, grace: float, max_output: int, timeout_from: str) -> None:
        self.timeout = timeout
        self.grace = grace
        self.max_output = max_output
        self.timeout_from = timeout_from


def limits(timeout: "float | None", complain: "Callable[[str], None]") -> Limits:
    """The limits in force: the launcher's `timeout`, overridden by KVMHOOK_* variables.

    An invalid value is reported through `complain` and the one below it applies.
    """
    default, source = DEFAULT_TIMEOUT, "default"
    if timeout is not None:
        if _valid(timeout, positive=True):
            default, source = float(timeout), "timeoutSeconds"
        else:
            complain(f"timeoutSeconds={timeout!r} is not a positive number; using {default:g}")
    chosen = _env_number("KVMHOOK_TIMEOUT", float, complain, default, positive=True)
    grace = _env_number("KVMHOOK_TERM_GRACE", float, complain, DEFAULT_GRACE, positive=False)
    output = _env_number("KVMHOOK_MAX_OUTPUT", int, complain, DEFAULT_MAX_OUTPUT, positive=False)
    return Limits(
        default if chosen is None else chosen,
        DEFAULT_GRACE if grace is None else grace,
        DEFAULT_MAX_OUTPUT if output is None else int(output),
        source if chosen is None else "KVMHOOK_TIMEOUT",
    )


def _env_number(
    name: str, kind: type, complain: "Callable[[str], None]", default: float, positive: bool
) -> "float | None":
    """The variable `name` as a `kind`; None when it is unset, or invalid (said to
    `complain`, naming the `default` that then applies)."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not _valid(value, positive):
        need = "a positive number" if positive else "a number, 0 or more"
        complain(f"{name}={raw!r} is not {need}; using {default:g}")
        return None
    return value


def _valid(value: object, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # value == value rules out NaN, and the bound infinity: a hook must end.
    return value == value and (value > 0 if positive else value >= 0) and value != float("inf")


def launcher_timeout(path: str, complain: "Callable[[str], None]") -> "float | None":
    """The `timeoutSeconds` of the installed launcher at `path`, read as text: never run.

    Its value must be a decimal number or a product of them (`600`, `10 * 60`,
    `1.5`), as the admin guide has operators write it. None when there is no
    launcher, and, after a word to `complain`, when it cannot be read (a FIFO
    or a huge file is refused, never waited on), has no such line or holds
    anything else: the default applies, as in the hook.
    """
    from kvmhook.hook import readfile

    try:
        text = readfile.read(path, LAUNCHER_MAX).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        complain(f"cannot read {path}: {why}; using {DEFAULT_TIMEOUT:g}")
        return None
    raw = _assigned(text, "timeoutSeconds")
    if raw is None:
        complain(f"{path} sets no timeoutSeconds; using {DEFAULT_TIMEOUT:g}")
        return None
    value = _product(raw)
    if value is None:
        shown = raw if len(raw) <= 60 else raw[:60] + "..."
        complain(
            f"{path}: timeoutSeconds = {shown!r} is not a number or a product of numbers; "
            f"using {DEFAULT_TIMEOUT:g}"
        )
    return value


def _assigned(text: str, name: str) -> "str | None":
    """What the last top-level `name = ...` line of `text` assigns, comment removed."""
    for line in reversed(text.splitlines()):
        target, equals, value = line.partition("=")
        if equals and target.rstrip() == name and not value.startswith("="):
            return value.partition("#")[0].strip()
    return None


def _product(text: str) -> "float | None":
    """`600`, `10 * 60`, `1.5` as a number; None for anything else."""
    product = 1.0
    for factor in text.split("*"):
        digits = factor.strip()
        if not (digits.isascii() and digits.replace(".", "", 1).isdigit()):
            return None
        product *= float(digits)
    return product
