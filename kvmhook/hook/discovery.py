"""Which custom scripts run for an operation, in what order, and which files do not, and why.

A plain function of a directory and an operation, as run-parts walks a
directory: it runs nothing (`kvmhook hooks list` shows its answer). Scripts
live in the custom dir, named `<operation>_<name>` or `all_<name>`, and in its
per-guest subdirectory `<domain-name>/`, which runs only for that guest. They
run ordered by `<name>` as bytes, ties broken by the full file name, then the
global script before the guest's, so the order is the same on every machine
and in every locale. A file anyone but root or us could change, or that sits
below a directory they could change, never runs: they could choose what runs.
"""

import os
import stat

from kvmhook.hook.operations import OPERATIONS

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from kvmhook.hook.hooklog import HookLog
    from kvmhook.hook.operations import Event

ALL = "all"  # prefix of scripts that run for every operation
# Never run, as with run-parts: what editors and package managers leave behind.
LEFTOVER_SUFFIXES = (
    "~",
    ".swp",
    ".dpkg-old",
    ".dpkg-dist",
    ".dpkg-new",
    ".dpkg-tmp",
    ".rpmsave",
    ".rpmnew",
    ".rpmorig",
)


class Script:
    """A custom script that will run."""

    __slots__ = ("name", "path")

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path


class Ignored:
    """A file in the custom dir that will not run, and why.

    `notable` files have a name that asks to run for this operation; the
    hook logs why they did not. The others (other operations' scripts,
    leftovers, foreign names) are only shown by `kvmhook hooks list`.
    `broken` ones are notable files that cannot be run (unsafe, a broken
    link, not a file): under the veto policy they fail the chain, while a
    script without the execute bit is switched off, as with run-parts.
    """

    __slots__ = ("broken", "name", "notable", "reason")

    def __init__(self, name: str, reason: str, notable: bool, broken: bool = False) -> None:
        self.name = name
        self.reason = reason
        self.notable = notable
        self.broken = broken


def discover(
    directory: str, operation: str, domain: "str | None" = None
) -> tuple[list[Script], list[Ignored]]:
    """The scripts that run for `operation`, in order, and every file that does not.

    With `domain`, the scripts of `<directory>/<domain>/` (matched exactly) are
    merged in; their names are `<domain>/<file>`. A per-guest dir that is
    unsafe or unreadable is reported as a notable Ignored entry named `<domain>`
    and only its scripts are skipped. Raises CustomDirError when the custom dir
    itself is missing, unreadable or unsafe.
    """
    try:
        real, reason = _resolve(directory, "custom dir")
        entries = list(os.scandir(real)) if reason is None else []
    except OSError as error:
        raise custom_dir_error()(f"custom dir {directory}: {error.strerror or error}") from None
    if reason is not None:
        raise custom_dir_error()(f"refused custom dir {directory}: {reason}")
    # A name that could leave the custom dir matches nothing; scandir never yields one anyway.
    tricky = not domain or domain in (".", "..") or "/" in domain or "\0" in domain
    guest = None if tricky else domain
    scripts: list[tuple[bytes, bytes, int, Script]] = []
    ignored: list[Ignored] = []
    for entry in entries:
        if entry.name == guest and entry.is_dir():
            found = _guest_scripts(entry, operation, scripts, ignored)
        else:
            found = _classify(entry, operation)
        if isinstance(found, Script):
            rest = entry.name.partition("_")[2]
            scripts.append((os.fsencode(rest), os.fsencode(entry.name), 0, found))
        else:
            ignored.append(found)
    scripts.sort(key=lambda item: item[:3])
    ignored.sort(key=lambda item: os.fsencode(item.name))
    return [item[3] for item in scripts], ignored


class Found:
    """What runs for one hook call: the scripts in order and the first broken file, if any.

    `broken` (a file named to run that cannot be) fails the chain under the veto policy.
    """

    __slots__ = ("broken", "scripts")

    def __init__(self, scripts: "list[Script]", broken: "Ignored | None") -> None:
        self.scripts = scripts
        self.broken = broken

    def runs_anything(self, abort: bool) -> bool:
        """Whether the chain has work: a script to run, or a broken file to veto on."""
        return bool(self.scripts) or (abort and self.broken is not None)


def find(directory: str, event: "Event", log: "HookLog", abort: bool) -> Found:
    """discover() for `event`, with what the log says of it: a refused custom dir, each
    notable ignored file, or that nothing runs. Never raises for the custom dir's sake."""
    try:
        scripts, ignored = discover(directory, event.operation, event.domain)
    except custom_dir_error() as error:  # evaluated only when something was raised
        log.record("-", f"no scripts run: {error}")
        return Found([], None)
    for item in ignored:
        if item.notable:
            log.record(item.name, f"ignored: {item.reason}")
    broken = next((item for item in ignored if item.broken), None)
    found = Found(scripts, broken)
    if not found.runs_anything(abort):
        log.record("-", f"no scripts for {event.operation} in {directory}")
    return found


def _guest_scripts(
    entry: os.DirEntry,
    operation: str,
    scripts: "list[tuple[bytes, bytes, int, Script]]",
    ignored: list[Ignored],
) -> Ignored:
    """Add the per-guest dir `entry`'s scripts (key rank 1: after a global of the same
    name) and ignored files; return the dir's own entry, notable when it is refused."""
    name = entry.name
    try:
        if entry.is_symlink():
            real, reason = _resolve(entry.path, "per-guest dir")
        else:  # the custom dir above it is already checked
            real = entry.path
            reason = _unsafe(entry.stat(follow_symlinks=False), f"per-guest dir {real}", False)
        children = list(os.scandir(real)) if reason is None else []
    except OSError as error:
        reason = f"per-guest dir {entry.path}: {error.strerror or error}"
    if reason is not None:
        return Ignored(name, f"per-guest scripts of guest {name} not run: {reason}", True, True)
    for child in children:
        found = _classify(child, operation, name + "/")
        if isinstance(found, Script):
            rest = child.name.partition("_")[2]
            scripts.append((os.fsencode(rest), os.fsencode(child.name), 1, found))
        else:
            ignored.append(found)
    return Ignored(name, f"per-guest scripts of guest {name}", False)


def custom_dir_error() -> "type[Exception]":
    """kvmhook.errors.CustomDirError, imported only when needed: that module holds every
    exception of the project, and the hook would pay for all of them on every call."""
    from kvmhook.errors import CustomDirError

    return CustomDirError


def _classify(entry: os.DirEntry, operation: str, guest: str = "") -> "Script | Ignored":
    """`entry` of the custom dir, or of a per-guest dir when `guest` is `<domain>/`."""
    prefix, _, rest = entry.name.partition("_")
    name = guest + entry.name
    if not rest or prefix not in (operation, ALL):
        if not guest and entry.is_dir():  # d_type: no system call for a plain entry
            return Ignored(name, f"per-guest scripts of guest {name}", False)
        if rest and prefix in OPERATIONS:
            return Ignored(name, f"runs for {prefix} only", False)
        return Ignored(name, "name is not <operation>_<name> or all_<name>", False)
    if name.endswith(LEFTOVER_SUFFIXES):
        return Ignored(name, "editor or package-manager leftover", False)
    try:
        st = os.stat(entry.path)
    except FileNotFoundError:
        if entry.is_symlink():
            return Ignored(name, "broken symbolic link", True, True)
        return Ignored(name, "vanished", True)
    except OSError as error:
        return Ignored(name, f"cannot stat: {error.strerror}", True, True)
    if not stat.S_ISREG(st.st_mode):
        if not guest and stat.S_ISDIR(st.st_mode):
            return Ignored(name, f"per-guest scripts of guest {name}", False)
        return Ignored(name, "not a regular file", True, True)
    if not st.st_mode & 0o111:
        return Ignored(name, f"not executable (mode {stat.S_IMODE(st.st_mode):04o})", True)
    reason = _unsafe(st, "script", sticky_ok=False)
    if reason is None and entry.is_symlink():
        try:
            reason = _resolve(entry.path, "link target")[1]
        except OSError as error:
            reason = f"cannot check the link target: {error.strerror}"
    if reason is not None:
        return Ignored(name, f"refused: {reason}", True, True)
    return Script(name, entry.path)


def distrust(path: str, what: str) -> "str | None":
    """Why `path` could be changed by someone but root or us, or None: the trust a custom
    script gets, for the other scripts kvmhook runs (the rolling-maintenance stages).

    Checks the file, every directory above it and the directories of the links followed
    on the way, as for a custom script. Raises OSError when they cannot be examined.
    """
    return _resolve(path, what)[1]


def _resolve(path: str, what: str) -> "tuple[str, str | None]":
    """`path` resolved as realpath does, and why it is unsafe, or None.

    Unsafe: the file, a directory above it, or a directory holding one of
    the links followed on the way could be changed by someone but root or
    us; such a person could then choose what runs.
    """
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    current = "/" if path.startswith("/") else os.getcwd()
    links = 0
    while pending:
        part = pending.pop()
        candidate = os.path.dirname(current) if part == ".." else os.path.join(current, part)
        if part != ".." and os.path.islink(candidate):
            links += 1
            reason = "too many links" if links > 40 else _unsafe_path(current, "link's directory")
            if reason is not None:
                return candidate, reason
            target = os.readlink(candidate)
            pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
            if target.startswith("/"):
                current = "/"
            continue
        current = candidate
    return current, _unsafe_path(current, what)


def _unsafe_path(real: str, what: str) -> "str | None":
    """Why the resolved path `real` could be changed by someone but root or us, or None.

    Checks it and every directory above it: a script is only as safe as the
    directories that hold it. Root-owned sticky directories (such as /tmp)
    above it are fine: others cannot replace what is in them.
    """
    reason = _unsafe(os.stat(real), f"{what} {real}", sticky_ok=False)
    parent = real
    while reason is None and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
        reason = _unsafe(os.stat(parent), f"directory {parent}", sticky_ok=True)
    return reason


def _unsafe(st: os.stat_result, what: str, sticky_ok: bool) -> "str | None":
    if st.st_uid not in (0, os.geteuid()):
        return f"{what} is owned by uid {st.st_uid}, not root"
    mode = st.st_mode
    if mode & 0o022 and not (sticky_ok and stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(mode):04o})"
    return None
