"""The secured host: libvirt serving TLS on port 16514 with the installed
certificates, and QEMU's migration stream encrypted too. Checked (status)
and switched on or off (enable, disable).

Settings are edited in place (every other line kept), the files of one
switch replaced together, each beside a `.bak` of its previous content.
Paths written inside the files are the host's own (`/etc/pki/...`, the
KVMHOOK_ROOT prefix taken off): the daemons read them on their host.

Everything enable writes other than the four switches (listen_tls, the
start-up's TLS listener, migrate_tls_force, vnc_tls) equals libvirt's
default, so disable turns off just those four.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from typing import Callable

from kvmhook import paths
from kvmhook.certs import certificates, serving, startup
from kvmhook.certs.libvirtconf import CODEC, ConfFile, quote, read, unquote
from kvmhook.errors import TlsError
from kvmhook.files import Transaction

# libvirtd.conf's keys for its server files, and the files they must name.
_SERVER_FILES = {
    "key_file": "libvirt server key",
    "cert_file": "libvirt server cert",
    "ca_file": "libvirt ca",
}
# What libvirtd accepts on a TLS socket (polkit is for UNIX sockets).
_TLS_AUTH = ("none", "sasl")
_FORCE_KEY = re.compile(r"^\s*#?\s*migrate_tls_force\s*=", re.MULTILINE)
_FORCE_SINCE = 6_009_000  # libvirt 6.9 added migrate_tls_force


class Check:
    """One check of the secured host: what, whether it holds, and why (not)."""

    __slots__ = ("detail", "name", "ok")

    def __init__(self, name: str, ok: bool, detail: str) -> None:
        self.name = name
        self.ok = ok
        self.detail = detail

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Report:
    """Every check; the host is secured when each one holds. `warnings` (certificates near
    expiry) never change that: a host near expiry must still be drainable."""

    def __init__(self, items: list[Check], warnings: list[str]) -> None:
        self.items = items
        self.warnings = warnings
        self.secured = all(item.ok for item in items)

    def as_dict(self) -> dict:
        return {
            "secured": self.secured,
            "items": [item.as_dict() for item in self.items],
            "warnings": self.warnings,
        }


class FileChange:
    """One file enable or disable rewrote: the keys it set, where its previous content went."""

    def __init__(self, path: str, keys: list[str], backup: str | None) -> None:
        self.path = path
        self.keys = keys
        self.backup = backup  # None: the file is new


class Change:
    """What enable or disable did: the start-up style, the files rewritten, the socket switched;
    `consoles`: why the consoles' settings were left as they were (None: they were not)."""

    def __init__(self, found: startup.Startup, files: list[FileChange], socket: bool) -> None:
        self.startup = found
        self.files = files
        self.socket = socket
        self.consoles: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.files) or self.socket


def status(
    agent_dir: str | None = None, handshake: bool = True, alert_days: int | None = None
) -> Report:
    """Whether this host is secured, item by item; what it finds never raises.

    Certificates (agent, libvirt, QEMU, the consoles' when installed), the
    serving daemon's configuration, its start-up listening for TLS, a real TLS
    handshake with the installed client certificate (unless `handshake` is
    False), and qemu.conf. With `alert_days`, a warning for each certificate
    of the set, CA included, expiring within that many days.
    """
    found = startup.detect()
    # Expiry is a warning here, never a failing item: what breaks TLS now fails.
    findings = certificates.inspect(agent_dir or paths.agent_dir(), warn_days=0)
    items = [
        Check(f"{finding.name} certificate", not finding.problems, _finding_detail(finding))
        for finding in findings
    ]
    warnings = [] if alert_days is None else certificates.expiring(findings, alert_days)
    items.append(_item(os.path.basename(found.conf), _daemon_conf_check, found.conf))
    items.append(_item("startup", _startup_check, found))
    if handshake:
        items.append(_item("tls handshake", serving.check_handshake, found.conf))
    items.append(_item("qemu.conf", _qemu_conf_check, paths.qemu_conf()))
    return Report(items, warnings)


def _item(name: str, check: Callable[..., tuple[bool, str]], *args: object) -> Check:
    try:
        return Check(name, *check(*args))
    except TlsError as error:
        return Check(name, False, str(error))


def _finding_detail(finding: certificates.Finding) -> str:
    if not finding.installed:
        return f"not installed: {console_files_hint()}"
    if finding.problems:
        return "; ".join(finding.problems)
    return f"{finding.subject}, issued by {finding.issuer}, valid until {finding.not_after}"


def _daemon_conf_check(path: str) -> tuple[bool, str]:
    conf = ConfFile(read(path))
    problems = []
    if conf.get("listen_tls") != "1":
        problems.append(_wanted("listen_tls", conf.get("listen_tls"), "1"))
    tls = paths.tls_files()
    for key, role in _SERVER_FILES.items():
        value = conf.get(key)
        wanted = paths.on_host(tls[role])
        if value is not None and unquote(value) != wanted:
            problems.append(_wanted(key, value, quote(wanted)))
    auth = unquote(conf.get("auth_tls") or quote("none"))
    if auth not in _TLS_AUTH:
        problems.append(f'auth_tls is "{auth}": a TLS socket takes "none" or "sasl"')
    if problems:
        return False, f"{path}: {'; '.join(problems)}"
    return True, f'{path}: listen_tls = 1, auth_tls "{auth}", the installed certificate files'


def _startup_check(found: startup.Startup) -> tuple[bool, str]:
    if found.defaults is None:
        on = startup.socket_enabled(found)
        return on, f"{found.socket} is {'enabled' if on else 'not enabled'} ({found.style})"
    on = startup.has_listen(read(found.defaults))
    has = "has" if on else "lacks"
    return on, f"LIBVIRTD_ARGS in {found.defaults} {has} --listen ({found.style})"


def _listens(found: startup.Startup) -> bool:
    """Whether libvirt's start-up opens its network sockets: the TLS socket unit, or --listen."""
    if found.defaults is None:
        return startup.socket_enabled(found)
    return os.path.exists(found.defaults) and startup.has_listen(read(found.defaults))


def _qemu_conf_check(path: str) -> tuple[bool, str]:
    conf = ConfFile(read(path))
    problems = [
        _wanted(key, conf.get(key), value)
        for key, value in _qemu_on(conf, consoles=False).items()  # consoles: not migration
        if unquote(conf.get(key) or "") != unquote(value)
    ]
    qemu_dir = _qemu_dir()
    override = conf.get("migrate_tls_x509_cert_dir")
    if override is not None and unquote(override) != qemu_dir:
        problems.append(f"migrate_tls_x509_cert_dir is {override}, so migration skips {qemu_dir}")
    if problems:
        return False, f"{path}: {'; '.join(problems)}"
    return True, f"{path}: migration over TLS with {qemu_dir}, peers verified"


def console_files_hint() -> str:
    """What a host without the consoles' files does to get them."""
    where = os.path.dirname(paths.on_host(paths.vnc_tls_files()["vnc ca"]))
    return (
        f"the consoles have no certificate files in {where}; `kvmhook cert renew` (with"
        " --if-expiring-within omitted) or a new keystore-cert-import installs them"
    )


def enable(vnc: bool = True) -> Change:
    """Switch TLS on: the daemon's and QEMU's settings, and the start-up's TLS listener; with
    `vnc`, the consoles' TLS too when their files are installed.

    Refuses, changing nothing, when the certificate files are not installed.
    """
    missing = [path for path in paths.tls_files().values() if not os.path.exists(path)]
    if missing:
        more = " and more" if len(missing) > 2 else ""
        raise TlsError(
            f"the TLS certificate files are not installed ({', '.join(missing[:2])}{more}): "
            "import the host's certificate first (keystore-cert-import, with libvirtd.conf present)"
        )
    found = startup.detect()
    consoles = _consoles_left(vnc)
    qemu_on = functools.partial(_qemu_on, consoles=consoles is None)
    edits = [_conf_edit(found.conf, _daemon_on), _conf_edit(paths.qemu_conf(), qemu_on)]
    if found.defaults is not None:
        edits.append(_args_edit(found.defaults, listen=True))
    change = _switch(found, edits, on=True)
    change.consoles = consoles
    return change


def _consoles_left(vnc: bool) -> str | None:
    """Why enable leaves the consoles' settings as they are; None when it sets them.

    A vnc_tls_x509_cert_dir without its files would stop libvirtd from starting.
    """
    if not vnc:
        return "--no-vnc: the consoles' settings left as they are"
    missing = [path for path in paths.vnc_tls_files().values() if not os.path.exists(path)]
    if missing:
        return f"the consoles' settings left as they are: {console_files_hint()}"
    return None


def disable(vnc: bool = True) -> Change:
    """Switch TLS off: listen_tls = 0, no TLS listener at start-up, migration TLS not forced,
    and, with `vnc`, vnc_tls = 0 where it is on.

    Changes nothing where TLS is off already: no listener at start-up, no
    listen_tls line or listen_tls = 0, migrate_tls_force and vnc_tls unset or 0.
    """
    found = startup.detect()
    daemon_off = functools.partial(_daemon_off, listens=_listens(found))
    qemu_off = functools.partial(_qemu_off, consoles=vnc)
    edits = [_conf_edit(found.conf, daemon_off), _conf_edit(paths.qemu_conf(), qemu_off)]
    if found.defaults is not None:
        edits.append(_args_edit(found.defaults, listen=False))
    change = _switch(found, edits, on=False)
    change.consoles = None if vnc else "--no-vnc: the consoles' settings left as they are"
    return change


def _daemon_on(conf: ConfFile) -> dict[str, str]:
    tls = paths.tls_files()
    wanted = {
        "listen_tls": "1",
        "listen_tcp": "0",
        "tls_port": quote(str(serving.TLS_PORT)),
        **{key: quote(paths.on_host(tls[role])) for key, role in _SERVER_FILES.items()},
    }
    if conf.get("auth_tls") is None:  # an operator's choice (sasl) stays
        wanted["auth_tls"] = quote("none")
    return wanted


def _daemon_off(conf: ConfFile, listens: bool) -> dict[str, str]:
    # Explicitly when set, or when the start-up listens: libvirt's default is 1 (with --listen).
    if conf.get("listen_tls") is None and not listens:
        return {}
    return {"listen_tls": "0"}


def _qemu_on(conf: ConfFile, consoles: bool) -> dict[str, str]:
    wanted = {
        "default_tls_x509_cert_dir": quote(_qemu_dir()),
        # Not default_tls_x509_verify: it would also demand client certificates
        # of VNC clients (whose own default is 0).
        "migrate_tls_x509_verify": "1",
    }
    if _knows_tls_force(conf):
        wanted["migrate_tls_force"] = "1"
    if consoles:
        # Never vnc_tls_x509_verify: it inherits default_tls_x509_verify, the operator's
        # choice; client certificates would lock out console proxies that have none.
        wanted["vnc_tls"] = "1"
        wanted["vnc_tls_x509_cert_dir"] = quote(_vnc_dir())
    return wanted


def _qemu_off(conf: ConfFile, consoles: bool) -> dict[str, str]:
    wanted = {} if conf.get("migrate_tls_force") is None else {"migrate_tls_force": "0"}
    if consoles and conf.get("vnc_tls") not in (None, "0"):
        wanted["vnc_tls"] = "0"
    return wanted


def _knows_tls_force(conf: ConfFile) -> bool:
    """Whether this libvirt has migrate_tls_force: its qemu.conf mentions it, or its version."""
    if _FORCE_KEY.search(conf.text()):
        return True
    from kvmhook.host import virt  # only for a qemu.conf without libvirt's comments

    return virt.library_version() >= _FORCE_SINCE


def _qemu_dir() -> str:
    return os.path.dirname(paths.on_host(paths.tls_files()["qemu ca"]))


def _vnc_dir() -> str:
    return os.path.dirname(paths.on_host(paths.vnc_tls_files()["vnc ca"]))


class _Edit:
    """One file's new text, beside its old one (None: the file does not exist)."""

    def __init__(self, path: str, before: str | None, after: str, keys: list[str]) -> None:
        self.path = path
        self.before = before
        self.after = after
        self.keys = keys


def _conf_edit(path: str, settings: Callable[[ConfFile], dict[str, str]]) -> _Edit:
    before = read(path)
    conf = ConfFile(before)
    keys = [key for key, value in settings(conf).items() if conf.set(key, value)]
    return _Edit(path, before, conf.text(), keys)


def _args_edit(path: str, listen: bool) -> _Edit:
    before = read(path) if os.path.exists(path) else None
    after = startup.with_listen(before or "", listen)
    return _Edit(path, before, after, ["LIBVIRTD_ARGS"] if after != (before or "") else [])


def _switch(found: startup.Startup, edits: list[_Edit], on: bool) -> Change:
    """Write the changed files together, each after its .bak, and switch the socket unit.

    The socket is switched last before the files are renamed into place: if
    it fails, no file changes.
    """
    changed = [edit for edit in edits if edit.keys]
    try:
        with Transaction() as files:
            for edit in changed:
                _stage(files, edit)
            switched = found.socket is not None and startup.set_socket(found, on)
    except OSError as error:
        raise TlsError(f"cannot write {error.filename}: {error.strerror}") from None
    done = [
        FileChange(edit.path, edit.keys, None if edit.before is None else edit.path + ".bak")
        for edit in changed
    ]
    return Change(found, done, switched)


def _stage(files: Transaction, edit: _Edit) -> None:
    after = edit.after.encode(*CODEC)
    if edit.before is None:
        files.write(edit.path, after, 0o644, parent_mode=0o755)
        return
    mode = stat.S_IMODE(os.stat(edit.path).st_mode)  # qemu.conf may hold passwords: 0600 stays
    files.write(edit.path + ".bak", edit.before.encode(*CODEC), mode)
    files.write(edit.path, after, mode)


def _wanted(key: str, value: str | None, wanted: str) -> str:
    return f"{key} = {value}, wanted {wanted}" if value else f"{key} not set, wanted {wanted}"
