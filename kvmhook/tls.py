"""The secured host: libvirt serving TLS on port 16514 with the installed
certificates, and QEMU's migration stream encrypted too. Checked (status)
and switched on or off (enable, disable).

Settings are edited in place (every other line kept), the files of one
switch replaced together, each beside a `.bak` of its previous content.
Paths written inside the files are the host's own (`/etc/pki/...`, the
KVMHOOK_ROOT prefix taken off): the daemons read them on their host.

Everything enable writes other than the three switches (listen_tls, the
start-up's TLS listener, migrate_tls_force) equals libvirt's default, so
disable turns off just those three.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import ssl
import stat
from typing import Callable

from cryptography import x509

from keystore import setup
from kvmhook import certificates, paths, process, startup
from kvmhook.errors import CannotReloadOnlineError, ReloadError, TlsError
from kvmhook.files import Transaction
from kvmhook.libvirtconf import ConfFile, quote

DEFAULT_PORT = 16514
_HANDSHAKE_TIMEOUT = 5.0
# With TLS 1.3 the server judges our certificate after the handshake and says
# no by closing the connection; this long without a word, it kept it.
_VERDICT_WAIT = 0.5
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
_CODEC = ("utf-8", "surrogateescape")  # whatever bytes a file holds are written back as they were
_UPDATE_TLS_SINCE = (6, 2, 0)  # virt-admin server-update-tls
# How virt-admin or an older daemon says it has no server-update-tls.
_UNSUPPORTED = ("unknown command", "unknown procedure", "not supported")
_VIRT_ADMIN_TIMEOUT = 30.0


class Item:
    """One check of the secured host: what, whether it holds, and why (not)."""

    __slots__ = ("detail", "name", "ok")

    def __init__(self, name: str, ok: bool, detail: str) -> None:
        self.name = name
        self.ok = ok
        self.detail = detail

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Status:
    """Every check; the host is secured when each one holds."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.secured = all(item.ok for item in items)

    def as_dict(self) -> dict:
        return {"secured": self.secured, "items": [item.as_dict() for item in self.items]}


class FileChange:
    """One file enable or disable rewrote: the keys it set, where its previous content went."""

    def __init__(self, path: str, keys: list[str], backup: str | None) -> None:
        self.path = path
        self.keys = keys
        self.backup = backup  # None: the file is new


class Change:
    """What enable or disable did: the start-up style, the files rewritten, the socket switched."""

    def __init__(self, found: startup.Startup, files: list[FileChange], socket: bool) -> None:
        self.startup = found
        self.files = files
        self.socket = socket

    @property
    def changed(self) -> bool:
        return bool(self.files) or self.socket


def status(agent_dir: str | None = None, handshake: bool = True) -> Status:
    """Whether this host is secured, item by item; what it finds never raises.

    Certificates (agent, libvirt, QEMU), the serving daemon's configuration,
    its start-up listening for TLS, a real TLS handshake with the installed
    client certificate (unless `handshake` is False), and qemu.conf.
    """
    found = startup.detect()
    # Expiry warnings are `kvmhook cert status`'s business: here, what breaks TLS now.
    findings = certificates.inspect(agent_dir or paths.agent_dir(), warn_days=0)
    items = [
        Item(f"{finding.name} certificate", not finding.problems, _finding_detail(finding))
        for finding in findings
    ]
    items.append(_item(os.path.basename(found.conf), _daemon_conf_check, found.conf))
    items.append(_item("startup", _startup_check, found))
    if handshake:
        items.append(_item("tls handshake", _handshake_check, found.conf))
    items.append(_item("qemu.conf", _qemu_conf_check, paths.qemu_conf()))
    return Status(items)


def _item(name: str, check: Callable[..., tuple[bool, str]], *args: object) -> Item:
    try:
        return Item(name, *check(*args))
    except TlsError as error:
        return Item(name, False, str(error))


def _finding_detail(finding: certificates.Finding) -> str:
    if finding.problems:
        return "; ".join(finding.problems)
    return f"{finding.subject}, issued by {finding.issuer}, valid until {finding.not_after}"


def _daemon_conf_check(path: str) -> tuple[bool, str]:
    conf = ConfFile(_read(path))
    problems = []
    if conf.get("listen_tls") != "1":
        problems.append(_wanted("listen_tls", conf.get("listen_tls"), "1"))
    tls = paths.tls_files()
    for key, role in _SERVER_FILES.items():
        value = conf.get(key)
        wanted = paths.on_host(tls[role])
        if value is not None and _string(value) != wanted:
            problems.append(_wanted(key, value, quote(wanted)))
    auth = _string(conf.get("auth_tls") or quote("none"))
    if auth not in _TLS_AUTH:
        problems.append(f'auth_tls is "{auth}": a TLS socket takes "none" or "sasl"')
    if problems:
        return False, f"{path}: {'; '.join(problems)}"
    return True, f'{path}: listen_tls = 1, auth_tls "{auth}", the installed certificate files'


def _startup_check(found: startup.Startup) -> tuple[bool, str]:
    if found.defaults is None:
        on = startup.socket_enabled(found)
        return on, f"{found.socket} is {'enabled' if on else 'not enabled'} ({found.style})"
    on = startup.has_listen(_read(found.defaults))
    has = "has" if on else "lacks"
    return on, f"LIBVIRTD_ARGS in {found.defaults} {has} --listen ({found.style})"


def _listens(found: startup.Startup) -> bool:
    """Whether libvirt's start-up opens its network sockets: the TLS socket unit, or --listen."""
    if found.defaults is None:
        return startup.socket_enabled(found)
    return os.path.exists(found.defaults) and startup.has_listen(_read(found.defaults))


def _handshake_check(conf_path: str) -> tuple[bool, str]:
    address, port, name = endpoint(conf_path)
    where = f"{address} port {port} as {name}"
    try:
        version, _ = _handshake(address, port, name)
    except ssl.SSLCertVerificationError as error:
        return False, f"{where}: the server's certificate does not verify: {error.verify_message}"
    except ssl.SSLError as error:
        return False, f"{where}: TLS failed: {error.reason or error}"
    except OSError as error:
        return False, f"{where}: {error.strerror or error}"
    return True, f"{where}: {version} with our CA, our client certificate accepted"


def endpoint(conf_path: str) -> tuple[str, str, str]:
    """(address, port, name) to reach the daemon configured by `conf_path` over TLS."""
    try:
        conf = ConfFile(_read(conf_path))
    except TlsError:
        conf = ConfFile("")  # libvirt's defaults; the configuration's own item says why
    port = _string(conf.get("tls_port") or str(DEFAULT_PORT))
    listen = _string(conf.get("listen_addr") or "")
    # Loopback unless libvirtd is bound to one address: no DNS, no firewall in the way.
    address = listen if listen not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return address, port, setup.fqdn()


def served_certificate(conf_path: str, verify: bool) -> x509.Certificate:
    """The certificate the daemon presents to a new TLS connection now.

    With `verify`, the handshake is a peer libvirt's (our CA, the name, our
    client certificate accepted), so it also proves the served chain works.
    Raises OSError (ssl.SSLError included) when it fails, TlsError when a file is missing.
    """
    address, port, name = endpoint(conf_path)
    return x509.load_der_x509_certificate(_handshake(address, port, name, verify)[1])


def _handshake(address: str, port: str, name: str, verify: bool = True) -> tuple[str, bytes]:
    """The protocol version and the server's certificate (DER) of a TLS handshake made as a
    peer's libvirt would make it; without `verify`, whatever the server presents is taken.

    Raises OSError (ssl.SSLError included) when it fails, TlsError when a file is missing.
    """
    tls = paths.tls_files()
    ca, cert, key = tls["libvirt ca"], tls["libvirt client cert"], tls["libvirt client key"]
    for path in (ca, cert, key) if verify else (cert, key):
        if not os.path.exists(path):  # ssl's own error would not name the file
            raise TlsError(f"{path} does not exist")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    if verify:
        context.load_verify_locations(ca)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    # Presented either way: under TLS 1.2 a server that requires one ends the handshake
    # before the client has seen its certificate.
    context.load_cert_chain(cert, key)
    raw = socket.create_connection((address, port), timeout=_HANDSHAKE_TIMEOUT)
    with raw, context.wrap_socket(raw, server_hostname=name) as connection:
        served = connection.getpeercert(binary_form=True)
        version = str(connection.version())
        if not verify:
            return version, served
        connection.settimeout(_VERDICT_WAIT)
        try:
            said = connection.recv(1)
        except socket.timeout:
            return version, served
        if not said:
            raise ConnectionError("the server closed the connection after the handshake")
        return version, served


def reload(daemon: str) -> None:
    """Make the running `daemon` (libvirtd, virtproxyd) load its CA, certificate and key again.

    No restart: guests, connections and the pid stay. CannotReloadOnlineError
    when virt-admin or the daemon lacks server-update-tls, ReloadError when
    the daemon refused the files (it then keeps serving the ones it had).
    """
    outcome = _virt_admin(daemon, "server-update-tls", daemon)
    if outcome.status != 0:
        said = outcome.said() or outcome.ending
        if any(sign in said for sign in _UNSUPPORTED):
            raise CannotReloadOnlineError(f"{daemon} cannot reload its TLS files online: {said}")
        raise ReloadError(f"virt-admin server-update-tls {daemon} failed: {said}")


def check_reloadable(daemon: str) -> None:
    """CannotReloadOnlineError unless virt-admin can make the running `daemon` reload TLS."""
    outcome = _virt_admin(daemon, "version")
    said = outcome.said()
    if outcome.status != 0:
        raise ReloadError(f"virt-admin cannot reach {daemon}: {said or outcome.ending}")
    found = re.search(r"Running against daemon: (\d+)\.(\d+)\.(\d+)", said)
    if found is None:
        raise ReloadError(f"virt-admin did not say {daemon}'s version: {said}")
    version = tuple(int(part) for part in found.groups())
    if version < _UPDATE_TLS_SINCE:
        raise CannotReloadOnlineError(
            f"{daemon} {'.'.join(found.groups())} cannot reload its TLS files online "
            "(server-update-tls came with libvirt 6.2)"
        )


def is_running(daemon: str) -> bool:
    """Whether `daemon` runs here: its admin socket exists (under the root prefix too)."""
    try:
        return stat.S_ISSOCK(os.stat(paths.libvirt_admin_socket(daemon)).st_mode)
    except OSError:
        return False


def _virt_admin(daemon: str, *args: str) -> process.Outcome:
    # The socket named, so that under KVMHOOK_ROOT it is that root's daemon, not this host's.
    uri = f"{daemon}:///system?socket={paths.libvirt_admin_socket(daemon)}"
    try:
        return process.run_tool(["virt-admin", "-c", uri, *args], _VIRT_ADMIN_TIMEOUT)
    except FileNotFoundError:
        raise CannotReloadOnlineError(
            "virt-admin is not installed (libvirt-clients): it makes libvirt reload TLS online"
        ) from None
    except OSError as error:
        raise ReloadError(f"cannot run virt-admin: {error.strerror}") from None


def _qemu_conf_check(path: str) -> tuple[bool, str]:
    conf = ConfFile(_read(path))
    problems = [
        _wanted(key, conf.get(key), value)
        for key, value in _qemu_on(conf).items()
        if _string(conf.get(key) or "") != _string(value)
    ]
    qemu_dir = _qemu_dir()
    override = conf.get("migrate_tls_x509_cert_dir")
    if override is not None and _string(override) != qemu_dir:
        problems.append(f"migrate_tls_x509_cert_dir is {override}, so migration skips {qemu_dir}")
    if problems:
        return False, f"{path}: {'; '.join(problems)}"
    return True, f"{path}: migration over TLS with {qemu_dir}, peers verified"


def enable() -> Change:
    """Switch TLS on: the daemon's and QEMU's settings, and the start-up's TLS listener.

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
    edits = [_conf_edit(found.conf, _daemon_on), _conf_edit(paths.qemu_conf(), _qemu_on)]
    if found.defaults is not None:
        edits.append(_args_edit(found.defaults, listen=True))
    return _switch(found, edits, on=True)


def disable() -> Change:
    """Switch TLS off: listen_tls = 0, no TLS listener at start-up, migration TLS not forced.

    Changes nothing where TLS is off already: no listener at start-up, no
    listen_tls line or listen_tls = 0, and migrate_tls_force unset or 0.
    """
    found = startup.detect()
    daemon_off = functools.partial(_daemon_off, listens=_listens(found))
    edits = [_conf_edit(found.conf, daemon_off), _conf_edit(paths.qemu_conf(), _qemu_off)]
    if found.defaults is not None:
        edits.append(_args_edit(found.defaults, listen=False))
    return _switch(found, edits, on=False)


def _daemon_on(conf: ConfFile) -> dict[str, str]:
    tls = paths.tls_files()
    wanted = {
        "listen_tls": "1",
        "listen_tcp": "0",
        "tls_port": quote(str(DEFAULT_PORT)),
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


def _qemu_on(conf: ConfFile) -> dict[str, str]:
    wanted = {
        "default_tls_x509_cert_dir": quote(_qemu_dir()),
        # Not default_tls_x509_verify: it would also demand client certificates
        # of VNC clients (whose own default is 0).
        "migrate_tls_x509_verify": "1",
    }
    if _knows_tls_force(conf):
        wanted["migrate_tls_force"] = "1"
    return wanted


def _qemu_off(conf: ConfFile) -> dict[str, str]:
    return {} if conf.get("migrate_tls_force") is None else {"migrate_tls_force": "0"}


def _knows_tls_force(conf: ConfFile) -> bool:
    """Whether this libvirt has migrate_tls_force: its qemu.conf mentions it, or its version."""
    if _FORCE_KEY.search(conf.text()):
        return True
    from kvmhook import virt  # only for a qemu.conf without libvirt's comments

    return virt.library_version() >= _FORCE_SINCE


def _qemu_dir() -> str:
    return os.path.dirname(paths.on_host(paths.tls_files()["qemu ca"]))


class _Edit:
    """One file's new text, beside its old one (None: the file does not exist)."""

    def __init__(self, path: str, before: str | None, after: str, keys: list[str]) -> None:
        self.path = path
        self.before = before
        self.after = after
        self.keys = keys


def _conf_edit(path: str, settings: Callable[[ConfFile], dict[str, str]]) -> _Edit:
    before = _read(path)
    conf = ConfFile(before)
    keys = [key for key, value in settings(conf).items() if conf.set(key, value)]
    return _Edit(path, before, conf.text(), keys)


def _args_edit(path: str, listen: bool) -> _Edit:
    before = _read(path) if os.path.exists(path) else None
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
    after = edit.after.encode(*_CODEC)
    if edit.before is None:
        files.write(edit.path, after, 0o644, parent_mode=0o755)
        return
    mode = stat.S_IMODE(os.stat(edit.path).st_mode)  # qemu.conf may hold passwords: 0600 stays
    files.write(edit.path + ".bak", edit.before.encode(*_CODEC), mode)
    files.write(edit.path, after, mode)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as source:
            return source.read().decode(*_CODEC)
    except FileNotFoundError:
        raise TlsError(f"{path} does not exist") from None
    except OSError as error:
        raise TlsError(f"cannot read {path}: {error.strerror}") from None


def _wanted(key: str, value: str | None, wanted: str) -> str:
    return f"{key} = {value}, wanted {wanted}" if value else f"{key} not set, wanted {wanted}"


def _string(value: str) -> str:
    """A libvirt configuration value without its quotes (numbers as they are)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value
