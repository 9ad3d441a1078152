"""Whether the running daemon serves the expected certificate, and making it serve new files.

A handshake is made as a peer's libvirt makes it: our CA, the host's name,
our client certificate. `kvmhook tls status` checks one; `kvmhook cert
renew` and `rollback` decide, before anything changes, how the daemon will
come to serve the new files (ServingPlan), then prove that it presents the
new serial.
"""

from __future__ import annotations

import os
import socket
import ssl
import time

from cryptography import x509

from kvmhook import hostname, paths
from kvmhook.certs import pki, startup, virtadmin
from kvmhook.certs.libvirtconf import ConfFile, read, unquote
from kvmhook.errors import CannotReloadOnlineError, KvmhookError, ReloadError, TlsError

TLS_PORT = 16514  # libvirt's default tls_port
_HANDSHAKE_TIMEOUT = 5.0
# With TLS 1.3 the server judges our certificate after the handshake and says
# no by closing the connection; this long without a word, it kept it.
_VERDICT_WAIT = 0.5
# A restarted daemon needs a moment before it listens again; a reloaded one does not.
_RESTART_LISTEN_WAIT = 60.0
# How the daemon comes to serve new files.
RELOAD, RESTART, NOT_RUNNING, SKIPPED = "reload", "restart", "not running", "skipped"


def endpoint(conf_path: str) -> tuple[str, str, str]:
    """(address, port, name) to reach the daemon configured by `conf_path` over TLS."""
    try:
        conf = ConfFile(read(conf_path))
    except TlsError:
        conf = ConfFile("")  # libvirt's defaults; the configuration's own check says why
    port = unquote(conf.get("tls_port") or str(TLS_PORT))
    listen = unquote(conf.get("listen_addr") or "")
    # Loopback unless libvirtd is bound to one address: no DNS, no firewall in the way.
    address = listen if listen not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return address, port, hostname.fqdn()


def check_handshake(conf_path: str) -> tuple[bool, str]:
    """Whether a peer's handshake with the daemon succeeds, and what it found."""
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


class Served:
    """How the daemon came to serve new files, and where a handshake proved it presents
    `cert` (None: not proved, since it serves no TLS or was not asked to load them)."""

    def __init__(self, daemon: str, how: str, cert: x509.Certificate, where: str | None) -> None:
        self.daemon = daemon
        self.how = how
        self.cert = cert
        self.where = where

    def describe(self) -> str:
        if self.how == SKIPPED:
            return (
                f"{self.daemon} not reloaded (--no-reload): it serves the new certificate after"
                f" `virt-admin server-update-tls {self.daemon}`"
            )
        if self.how == NOT_RUNNING:
            return f"{self.daemon} is not running: it loads the new files when it starts"
        done = "reloaded its TLS files (no restart)" if self.how == RELOAD else "restarted"
        if self.where is None:
            return f"{self.daemon} {done}; it serves no TLS, so no handshake was checked"
        return f"{self.daemon} {done}; {self.where} presents serial {pki.serial(self.cert)}"


class ServingPlan:
    """How the running daemon will come to serve new files, decided before anything changes."""

    def __init__(self, found: startup.Startup, how: str, previous: x509.Certificate | None) -> None:
        self.found = found
        self.daemon = found.daemon
        self.how = how
        # What the daemon serves now, or None when it serves no TLS: nothing to prove then.
        self.previous = previous

    @classmethod
    def prepare(cls, reload: bool, allow_restart: bool) -> ServingPlan:
        """CannotReloadOnlineError (nothing changed) when the daemon can neither reload online
        nor, with `allow_restart`, be restarted."""
        found = startup.detect()
        if not reload:
            return cls(found, SKIPPED, None)
        if not virtadmin.is_running(found.daemon):
            return cls(found, NOT_RUNNING, None)
        how = RELOAD
        try:
            virtadmin.check_reloadable(found.daemon)
        except CannotReloadOnlineError as error:
            if not allow_restart:
                raise CannotReloadOnlineError(
                    f"{error}; run again with --allow-restart to restart {found.daemon} instead"
                ) from None
            try:
                startup.check_restart(found, listen=True)
            except KvmhookError as restart_error:
                raise CannotReloadOnlineError(f"{error}; and {restart_error}") from None
            how = RESTART
        try:
            previous = served_certificate(found.conf, verify=False)
        except (KvmhookError, OSError):
            previous = None  # not listening on TLS (yet): there is no served certificate to swap
        return cls(found, how, previous)

    def describe(self) -> str:
        """What serve() will do, for a dry run."""
        if self.how == SKIPPED:
            return f"leave {self.daemon} serving its current files (--no-reload)"
        if self.how == NOT_RUNNING:
            return f"nothing to reload: {self.daemon} is not running"
        act = (
            f"virt-admin server-update-tls {self.daemon}"
            if self.how == RELOAD
            else f"restart {self.daemon} (--allow-restart)"
        )
        if self.previous is None:
            return f"{act}; it serves no TLS now, so no handshake to check"
        return f"{act}, and check that a TLS handshake presents the new serial"

    def apply(self) -> None:
        """Make the daemon load the files on disk (nothing when not running or --no-reload)."""
        if self.how == RELOAD:
            virtadmin.reload_tls(self.daemon)
        elif self.how == RESTART:
            startup.restart(self.found, listen=True)

    def serve(self, cert: x509.Certificate) -> Served:
        """Make the daemon load the files, then prove it presents `cert`: ReloadError if not."""
        if self.how in (SKIPPED, NOT_RUNNING):
            return Served(self.daemon, self.how, cert, None)
        self.apply()
        if self.previous is None:
            return Served(self.daemon, self.how, cert, None)
        served = self._served()
        if served.serial_number != cert.serial_number:
            raise ReloadError(
                f"{self.daemon} still presents serial {pki.serial(served)}, not {pki.serial(cert)}"
            )
        address, port, _ = endpoint(self.found.conf)
        return Served(self.daemon, self.how, cert, f"{address}:{port}")

    def _served(self) -> x509.Certificate:
        deadline = time.monotonic() + (_RESTART_LISTEN_WAIT if self.how == RESTART else 0)
        while True:
            try:
                return served_certificate(self.found.conf, verify=True)
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
