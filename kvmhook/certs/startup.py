"""How libvirt is started on this host, and making that start listen for TLS.

Distributions start it in one of three ways:

- modular daemons: virtqemud runs the guests, virtproxyd serves remote
  clients; TLS is `virtproxyd-tls.socket`, the settings are virtproxyd.conf's;
- a socket-activated libvirtd (Debian 12's default): TLS is
  `libvirtd-tls.socket`; libvirtd refuses `--listen` in this mode;
- a libvirtd that opens its sockets itself: `--listen` in LIBVIRTD_ARGS, which
  its unit or init script reads from /etc/default/libvirtd (Debian) or
  /etc/sysconfig/libvirtd (RHEL).

Detection reads the symlinks systemd keeps under /etc/systemd/system, so it
works under KVMHOOK_ROOT and where systemd is not running (containers).
"""

from __future__ import annotations

import os
import re
import shlex

from kvmhook import paths
from kvmhook.errors import TlsError
from kvmhook.hook import process

MONOLITHIC = "monolithic libvirtd"
SOCKET = "socket-activated libvirtd"
MODULAR = "modular daemons"

_LISTEN = ("--listen", "-l")
_ARGS = re.compile(r"^\s*(?:export\s+)?LIBVIRTD_ARGS=(.*?)\s*$")
_COMMENTED_ARGS = re.compile(r"^\s*#\s*LIBVIRTD_ARGS=")
# Any of these enabled means the modular daemons run this host.
_MODULAR_UNITS = (
    ("sockets.target", "virtqemud.socket"),
    ("sockets.target", "virtproxyd.socket"),
    ("multi-user.target", "virtqemud.service"),
)
# Stopping libvirtd waits for its running jobs to end.
_SYSTEMCTL_TIMEOUT = 120.0


class Startup:
    """How libvirt is started here: the style, the daemon serving TLS and its files."""

    def __init__(
        self,
        style: str,
        daemon: str,
        conf: str,
        defaults: str | None = None,
        socket: str | None = None,
    ) -> None:
        self.style = style
        self.daemon = daemon
        self.conf = conf  # the serving daemon's configuration (listen_tls, key_file...)
        self.defaults = defaults  # monolithic: the file holding LIBVIRTD_ARGS
        self.socket = socket  # socket activation: the TLS socket unit

    def describe(self) -> str:
        if self.defaults is not None:
            return f"{self.style} (LIBVIRTD_ARGS in {self.defaults})"
        return f"{self.style} ({self.socket})"


def detect() -> Startup:
    """The style this host's systemd links say, else a libvirtd taking --listen."""
    if any(_enabled(target, unit) for target, unit in _MODULAR_UNITS):
        conf = paths.virtproxyd_conf()
        return Startup(MODULAR, "virtproxyd", conf, socket="virtproxyd-tls.socket")
    if _enabled("sockets.target", "libvirtd.socket"):
        return Startup(SOCKET, "libvirtd", paths.libvirtd_conf(), socket="libvirtd-tls.socket")
    return Startup(MONOLITHIC, "libvirtd", paths.libvirtd_conf(), defaults=_defaults_file())


def _enabled(target: str, unit: str) -> bool:
    return os.path.lexists(os.path.join(paths.systemd_wants(target), unit))


def _defaults_file() -> str:
    debian, rhel = candidates = paths.libvirtd_defaults()
    for path in candidates:
        if os.path.exists(path):
            return path
    # Neither yet (libvirt-daemon without its -system package, as in containers):
    # the one this distribution's unit reads.
    return rhel if os.path.isdir(os.path.dirname(rhel)) else debian


def has_listen(text: str) -> bool:
    """Whether LIBVIRTD_ARGS in a defaults file has --listen (its last assignment, as in sh)."""
    lines = text.splitlines()
    index = _last_args(lines)
    return index is not None and any(arg in _LISTEN for arg in _args(lines[index]))


def with_listen(text: str, listen: bool) -> str:
    """A defaults file's `text` with --listen added to or removed from LIBVIRTD_ARGS.

    Every other line and argument is kept. Added to the last assignment, or
    on a new line after the commented-out examples (else at the end). A line
    left without arguments goes, so that the unit's own default applies again.
    """
    if has_listen(text) == listen:
        return text
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    index = _last_args(lines)
    args = [] if index is None else _args(lines[index])
    if listen:
        line = _assignment([*args, "--listen"])
        if index is None:
            lines.insert(_after_examples(lines), line)
        else:
            lines[index] = line
    else:
        assert index is not None  # has_listen found it
        kept = [arg for arg in args if arg not in _LISTEN]
        lines[index : index + 1] = [_assignment(kept)] if kept else []
    return "".join(lines)


def _last_args(lines: list[str]) -> int | None:
    found = None
    for index, line in enumerate(lines):
        if _ARGS.match(line):
            found = index
    return found


def _args(line: str) -> list[str]:
    match = _ARGS.match(line)
    assert match is not None
    try:
        words = shlex.split(match.group(1), comments=True)
    except ValueError as error:
        raise TlsError(f"cannot read LIBVIRTD_ARGS ({error}): {line.strip()}") from None
    # The unit expands $LIBVIRTD_ARGS into words, so a quoted value is several arguments.
    return [arg for word in words for arg in word.split()]


def _assignment(args: list[str]) -> str:
    return f'LIBVIRTD_ARGS="{" ".join(args)}"\n'


def _after_examples(lines: list[str]) -> int:
    found = len(lines)
    for index, line in enumerate(lines):
        if _COMMENTED_ARGS.match(line):
            found = index + 1
    return found


def socket_enabled(found: Startup) -> bool:
    """Whether the TLS socket unit is enabled (its link in sockets.target.wants)."""
    assert found.socket is not None
    return _enabled("sockets.target", found.socket)


def set_socket(found: Startup, on: bool) -> bool:
    """Enable (or disable) the TLS socket unit; False when it already was.

    Through systemctl when systemd runs this root, else by making (removing)
    the link systemctl would.
    """
    assert found.socket is not None
    if socket_enabled(found) == on:
        return False
    if _systemd_runs_root():
        _systemctl(["enable" if on else "disable", found.socket])
        return True
    link = os.path.join(paths.systemd_wants("sockets.target"), found.socket)
    try:
        if on:
            target = _unit_file(found.socket)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(target, link)
        else:
            os.unlink(link)
    except OSError as error:
        raise TlsError(f"cannot link {link}: {error.strerror}") from None
    return True


def _unit_file(unit: str) -> str:
    """Where the unit is installed, as the host names it (the link's target)."""
    for directory in paths.systemd_unit_dirs():
        if os.path.exists(os.path.join(directory, unit)):
            return paths.on_host(os.path.join(directory, unit))
    places = ", ".join(paths.systemd_unit_dirs())
    raise TlsError(f"{unit} is not installed (no unit file in {places})")


def restart_plan(found: Startup, listen: bool) -> list[list[str]]:
    """The systemctl commands that make the daemons apply the settings.

    libvirtd reads its configuration and opens its sockets only when it
    starts; SIGHUP reloads its drivers, not those.
    """
    if found.style == MONOLITHIC:
        return [["restart", "libvirtd.service"]]
    assert found.socket is not None
    service = f"{found.daemon}.service"
    # A socket-activated daemon receives its sockets when it starts: stop it,
    # switch the TLS socket, start it again (libvirt's documented order).
    plan = [["stop", service], ["start" if listen else "stop", found.socket], ["start", service]]
    if found.style == MODULAR:
        plan.append(["restart", "virtqemud.service"])  # reads qemu.conf
    return plan


def restart_hint(found: Startup, listen: bool) -> str:
    """How to apply the settings by hand."""
    commands = " && ".join(_command(args) for args in restart_plan(found, listen))
    if found.style == MONOLITHIC:
        return f"{commands} (without systemd: stop libvirtd, start it again; SIGHUP is not enough)"
    return commands


def restart(found: Startup, listen: bool) -> list[str]:
    """Run the restart plan; the commands run. TlsError when systemd does not run this root."""
    check_restart(found, listen)
    plan = restart_plan(found, listen)
    for args in plan:
        _systemctl(args)
    return [_command(args) for args in plan]


def check_restart(found: Startup, listen: bool) -> None:
    """TlsError, before anything is done, when restart() could not run here."""
    if not _systemd_runs_root():
        raise TlsError(f"not restarted ({_no_systemd()}): {restart_hint(found, listen)}")


def _systemd_runs_root() -> bool:
    # Under another root, systemctl would act on this machine, not on that root's host.
    return paths.root() == "/" and os.path.isdir("/run/systemd/system")


def _no_systemd() -> str:
    if paths.root() != "/":
        return f"KVMHOOK_ROOT is {paths.root()}, not this host"
    return "systemd is not running here"


def _command(args: list[str]) -> str:
    return " ".join(["systemctl", *args])


def _systemctl(args: list[str]) -> None:
    try:
        outcome = process.run_tool(["systemctl", *args], _SYSTEMCTL_TIMEOUT)
    except FileNotFoundError:
        raise TlsError("systemd is running but systemctl is not on PATH") from None
    except OSError as error:
        raise TlsError(f"cannot run systemctl: {error.strerror}") from None
    if outcome.status != 0:
        raise TlsError(f"{_command(args)} failed: {outcome.said() or outcome.ending}")
