"""Certificate rotation without restarts: renew before expiry, swap atomically, reload online.

A renewal (`renew`) is the controller's flow run by the agent itself:

1. due? The agent's certificate (cloud.crt) expiring later than the given
   number of days from now is left alone;
2. can the running daemon be made to load new files (virt-admin
   server-update-tls; a restart only when allowed)? Asked before anything
   changes;
3. a new key and CSR (keystore-setup, in a private scratch directory),
   signed by a command or by the controller (issueCertificate);
4. checked as keystore-cert-import checks (key, chain, dates), and the chain
   must end at a root this host already trusts;
5. every file replaced in one transaction, each one's previous content kept
   beside it as FILE.prev;
6. the daemon reloads, and a fresh TLS handshake must present the new
   certificate's serial;
7. if 6 fails, every file (and .prev) goes back to what it was, the daemon
   reloads again and must present the previous serial.

`rollback` swaps each file with its .prev (after checking that the previous
set is whole and valid) through the same steps 5 to 7.

One lock (kvmhook.locks.certificates) serializes renewals, rollbacks and the
keystore tools: a second one waits for the first.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keystore import certimport, content, properties, setup, store
from kvmhook import locks, paths, pki, process, startup, tls
from kvmhook.errors import (
    CannotReloadOnlineError,
    ControllerError,
    KeystoreError,
    KvmhookError,
    ReloadError,
    RenewalBusyError,
    RollbackFailedError,
    RolledBackError,
    RotationError,
)
from kvmhook.files import Transaction

SIGNER_TIMEOUT = 120.0
# CloudStack's default ca.framework.cert.expiry.alert.period, in days.
DEFAULT_WITHIN_DAYS = 15
# A restarted daemon needs a moment before it listens again; a reloaded one does not.
_RESTART_LISTEN_WAIT = 60.0
# Beside each file a renewal replaces: its previous content, for one rollback step.
PREVIOUS = ".prev"

Say = Callable[[str], None]


class Signer:
    """Who signs the CSR; `sign(csr)` returns the certificate, then the CA certificate(s), PEM."""

    def __init__(self, description: str, sign: Callable[[bytes], bytes]) -> None:
        self.description = description
        self.sign = sign


def command_signer(command: str) -> Signer:
    """A shell command reading the CSR on stdin and printing the certificate, then the CA(s)."""
    return Signer(f"the signer `{command}`", lambda csr: _run_signer(command, csr))


def controller_signer() -> Signer:
    """The controller's CA, through issueCertificate; RotationError when none is configured."""
    from kvmhook import controller

    client = controller.load()
    if client is None:
        raise RotationError(
            f"no controller is configured ({paths.controller_conf()} does not exist):"
            " give --signer CMD instead"
        )

    def sign(csr: bytes) -> bytes:
        certificate, cas = client.issue_certificate(csr.decode("ascii"))
        return f"{certificate.strip()}\n{cas.strip()}\n".encode()

    return Signer("the controller (issueCertificate)", sign)


def default_signer() -> Signer:
    """The controller when one is configured; else a RotationError asking for --signer."""
    if not os.path.exists(paths.controller_conf()):
        raise RotationError(
            "nobody to sign the new certificate: give --signer CMD, or configure the"
            f" controller in {paths.controller_conf()} (--controller)"
        )
    return controller_signer()


def alert_period(say: Say) -> int:
    """Days before expiry to renew: the controller's ca.framework.cert.expiry.alert.period for
    this host's cluster when a controller is configured and answers, else 15."""
    from kvmhook import controller

    try:
        client = controller.load()
        if client is None:
            return DEFAULT_WITHIN_DAYS
        return client.expiry_alert_period()
    except ControllerError as error:
        say(f"the controller did not say its expiry alert period ({error}): using 15 days")
        return DEFAULT_WITHIN_DAYS


def renew(
    agent_dir: str,
    signer: Callable[[], Signer],
    within_days: int | Callable[[], int] | None = None,
    reload: bool = True,
    allow_restart: bool = False,
    dry_run: bool = False,
    validity_days: int = 365,
    key_type: str = "rsa",
    say: Say = lambda line: None,
) -> str:
    """Renew the agent's key and certificate (see the module's steps); the line to report.

    `signer` is called only when a renewal is due; `within_days` (or the
    function giving it, called under the lock) makes a certificate expiring
    later than that many days from now not due. RolledBackError when the new
    set was installed and taken back, RollbackFailedError when taking it
    back failed too; any other KvmhookError: nothing changed.
    """
    with locks.certificates(RenewalBusyError, say):
        current = _current(agent_dir)
        if within_days is not None:
            days = within_days if isinstance(within_days, int) else within_days()
            if current is not None and pki.not_after(current) - pki.utcnow() > datetime.timedelta(
                days=days
            ):
                return f"not due: {_describe(current)}; renewal starts {days} days before"
        serving = _Serving.prepare(reload, allow_restart)
        chosen = signer()
        if dry_run:
            targets = _targets(agent_dir)
            return "\n".join(
                [
                    f"dry run: would renew {_describe(current) if current else 'a missing cert'}",
                    f"  new key and CSR, signed by {chosen.description}",
                    f"  then replace, each beside its {PREVIOUS} copy: {', '.join(targets)}",
                    f"  then {serving.plan()}",
                ]
            )
        installation = _new_set(agent_dir, chosen, validity_days, key_type)
        new = installation.material.chain[0]
        _check_trusted(agent_dir, installation.material.chain)
        paths_ = [path for each in installation.paths for path in (each, each + PREVIOUS)]
        served = _swap(
            lambda files: _stage_keeping_previous(files, installation), paths_, new, serving, say
        )
        was = f"serial {_serial(current)} -> " if current is not None else ""
        return (
            f"renewed: {new.subject.rfc4514_string()}, {was}serial {_serial(new)},"
            f" valid until {pki.not_after(new)} UTC; {served};"
            f" the previous set is kept as *{PREVIOUS} (kvmhook cert rollback)"
        )


def rollback(agent_dir: str, allow_restart: bool = False, say: Say = lambda line: None) -> str:
    """Swap every file of the set with its .prev copy, then reload; the line to report.

    Refused, changing nothing, unless every file has a .prev copy and the
    previous certificate matches its key, chains to its CA and is valid now.
    Rolling back again returns to the set rolled back from.
    """
    with locks.certificates(RenewalBusyError, say):
        targets = _targets(agent_dir)
        missing = [path + PREVIOUS for path in targets if not os.path.exists(path + PREVIOUS)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RotationError(
                f"no previous set to roll back to: {missing[0]} does not exist{more}"
            )
        previous = _check_previous(agent_dir)
        serving = _Serving.prepare(True, allow_restart)
        props = os.path.join(agent_dir, "agent.properties")
        if os.path.exists(props + PREVIOUS):  # a renewal gave it the passphrase
            targets.append(props)
        swapped = [path for target in targets for path in (target, target + PREVIOUS)]

        def stage(files: Transaction) -> None:
            for target in targets:
                now, before = _File.read(target), _File.read(target + PREVIOUS)
                before.stage(files, target)
                now.stage(files, target + PREVIOUS)

        served = _swap(stage, swapped, previous, serving, say)
        return (
            f"rolled back to {previous.subject.rfc4514_string()}, serial {_serial(previous)},"
            f" valid until {pki.not_after(previous)} UTC; {served}; the set rolled back from"
            f" is now the *{PREVIOUS} set"
        )


def _stage_keeping_previous(files: Transaction, installation: certimport.Installation) -> None:
    """The new set, each existing file's content first kept as FILE.prev (mode and group too),
    all in one transaction."""
    for path in installation.paths:
        current = _File.read(path)
        if current.data is not None:
            current.stage(files, path + PREVIOUS)
    installation.stage(files)


class _File:
    """A file's bytes, mode and group, or its absence."""

    def __init__(self, path: str, data: bytes | None, mode: int = 0, gid: int = -1) -> None:
        self.path = path
        self.data = data
        self.mode = mode
        self.gid = gid

    @classmethod
    def read(cls, path: str) -> _File:
        try:
            with open(path, "rb") as source:
                info = os.fstat(source.fileno())
                return cls(path, source.read(), stat.S_IMODE(info.st_mode), info.st_gid)
        except FileNotFoundError:
            return cls(path, None)

    def stage(self, files: Transaction, path: str) -> None:
        assert self.data is not None
        files.write(path, self.data, self.mode, self.gid)


def _swap(
    stage: Callable[[Transaction], None],
    files_: list[str],
    cert: x509.Certificate,
    serving: _Serving,
    say: Say,
) -> str:
    """Stage and commit the new files, then make the daemon serve `cert`; on failure, every
    one of `files_` goes back to what it was and the daemon serves the previous set again."""
    before = [_File.read(path) for path in files_]
    with _signals_deferred():
        try:
            with Transaction() as files:
                stage(files)
        except OSError as error:
            raise RotationError(f"cannot write {error.filename}: {error.strerror}") from None
        try:
            return serving.serve(cert)
        except (KvmhookError, OSError) as error:
            failure = _one_line(error)
        say(f"the daemon does not serve the new files ({failure}): putting the previous set back")
        try:
            _restore(before)
            if serving.previous is not None:
                again = serving.serve(serving.previous)
            else:
                serving.apply()
                again = f"{serving.daemon} loaded its previous files again"
        except (KvmhookError, OSError) as error:
            raise RollbackFailedError(
                f"{failure}; then putting the previous set back failed too: {_one_line(error)};"
                " check with `kvmhook cert status` and `kvmhook tls status`"
            ) from None
        raise RolledBackError(f"{failure}; rolled back: the previous files are back and {again}")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP wait until the swap, the reload and any rollback are done.

    The timer's TimeoutStartSec, a Ctrl-C or a closed terminal would otherwise
    kill the renewal between the swap and the reload's proof, or halfway
    through putting the previous set back: files on disk that the daemon does
    not serve. A signal that came meanwhile acts once the set is whole again.
    Children start with no signal blocked (process.run), so the reload's own
    timeout still reaches virt-admin.
    """
    deferred = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _restore(before: list[_File]) -> None:
    """Every file as it was: contents, modes and groups in one transaction, then the absent
    ones removed."""
    with Transaction() as files:
        for saved in before:
            if saved.data is not None:
                saved.stage(files, saved.path)
    for saved in before:
        if saved.data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(saved.path)


class _Serving:
    """How the running daemon comes to serve new files, decided before anything changes."""

    RELOAD, RESTART, NOT_RUNNING, SKIPPED = "reload", "restart", "not running", "skipped"

    def __init__(self, found: startup.Startup, how: str, previous: x509.Certificate | None) -> None:
        self.found = found
        self.daemon = found.daemon
        self.how = how
        # What the daemon serves now, or None when it serves no TLS: nothing to prove then.
        self.previous = previous

    @classmethod
    def prepare(cls, reload: bool, allow_restart: bool) -> _Serving:
        """CannotReloadOnlineError (nothing changed) when the daemon can neither reload online
        nor, with `allow_restart`, be restarted."""
        found = startup.detect()
        if not reload:
            return cls(found, cls.SKIPPED, None)
        if not tls.is_running(found.daemon):
            return cls(found, cls.NOT_RUNNING, None)
        how = cls.RELOAD
        try:
            tls.check_reloadable(found.daemon)
        except CannotReloadOnlineError as error:
            if not allow_restart:
                raise CannotReloadOnlineError(
                    f"{error}; run again with --allow-restart to restart {found.daemon} instead"
                ) from None
            try:
                startup.check_restart(found, listen=True)
            except KvmhookError as restart_error:
                raise CannotReloadOnlineError(f"{error}; and {restart_error}") from None
            how = cls.RESTART
        try:
            previous = tls.served_certificate(found.conf, verify=False)
        except (KvmhookError, OSError):
            previous = None  # not listening on TLS (yet): there is no served certificate to swap
        return cls(found, how, previous)

    def plan(self) -> str:
        if self.how == self.SKIPPED:
            return f"leave {self.daemon} serving its current files (--no-reload)"
        if self.how == self.NOT_RUNNING:
            return f"nothing to reload: {self.daemon} is not running"
        act = (
            f"virt-admin server-update-tls {self.daemon}"
            if self.how == self.RELOAD
            else f"restart {self.daemon} (--allow-restart)"
        )
        if self.previous is None:
            return f"{act}; it serves no TLS now, so no handshake to check"
        return f"{act}, and check that a TLS handshake presents the new serial"

    def apply(self) -> None:
        if self.how == self.RELOAD:
            tls.reload(self.daemon)
        elif self.how == self.RESTART:
            startup.restart(self.found, listen=True)

    def serve(self, cert: x509.Certificate) -> str:
        """Make the daemon load the files, then prove it presents `cert`; what happened."""
        if self.how == self.SKIPPED:
            return (
                f"{self.daemon} not reloaded (--no-reload): it serves the new certificate after"
                f" `virt-admin server-update-tls {self.daemon}`"
            )
        if self.how == self.NOT_RUNNING:
            return f"{self.daemon} is not running: it loads the new files when it starts"
        self.apply()
        done = "reloaded its TLS files (no restart)" if self.how == self.RELOAD else "restarted"
        if self.previous is None:
            return f"{self.daemon} {done}; it serves no TLS, so no handshake was checked"
        served = self._served()
        if served.serial_number != cert.serial_number:
            raise ReloadError(
                f"{self.daemon} still presents serial {_serial(served)}, not {_serial(cert)}"
            )
        address, port, _ = tls.endpoint(self.found.conf)
        return f"{self.daemon} {done}; {address}:{port} presents serial {_serial(cert)}"

    def _served(self) -> x509.Certificate:
        deadline = time.monotonic() + (_RESTART_LISTEN_WAIT if self.how == self.RESTART else 0)
        while True:
            try:
                return tls.served_certificate(self.found.conf, verify=True)
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)


def _targets(agent_dir: str) -> list[str]:
    """Every file a renewal replaces, as keystore-cert-import writes them (keystore last)."""
    return certimport.target_paths(
        os.path.join(agent_dir, "cloud.jks"),
        os.path.join(agent_dir, "cloud.crt"),
        os.path.join(agent_dir, "cloud.ca.crt"),
        os.path.join(agent_dir, "cloud.key"),
    )


def _current(agent_dir: str) -> x509.Certificate | None:
    """The agent's certificate; None when there is none (everything is then due)."""
    path = os.path.join(agent_dir, "cloud.crt")
    try:
        with open(path, "rb") as source:
            return pki.load_certificates(source.read(), path)[0]
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RotationError(f"cannot read {path}: {error.strerror}") from None


def _new_set(
    agent_dir: str, signer: Signer, validity_days: int, key_type: str
) -> certimport.Installation:
    """A new key and CSR as keystore-setup makes them, signed, and checked as
    keystore-cert-import checks; made in a private scratch directory, so nothing installed
    changes until the swap."""
    props = os.path.join(agent_dir, "agent.properties")
    passphrase = properties.passphrase(properties.read(props) or "") or secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="kvmhook-renew-") as scratch:
        scratch_props = os.path.join(scratch, "agent.properties")  # setup writes it
        scratch_keystore = os.path.join(scratch, "cloud.jks")
        csr_file = os.path.join(scratch, "cloud.csr")
        csr = setup.setup(
            scratch_props, scratch_keystore, passphrase, validity_days, csr_file, key_type
        )
        signed = signer.sign(csr)
        key = pki.key_pem(store.load(scratch_keystore, passphrase)[0])
    certs = pki.load_certificates(signed, f"what {signer.description} returned")
    if len(certs) < 2:
        raise KeystoreError(
            f"{signer.description} returned no CA certificate after the certificate"
        )
    return certimport.check(
        props,
        os.path.join(agent_dir, "cloud.jks"),
        os.path.join(agent_dir, "cloud.crt"),
        content.encode(pki.certificate_pem(certs[:1])),
        os.path.join(agent_dir, "cloud.ca.crt"),
        content.encode(pki.certificate_pem(certs[1:])),
        os.path.join(agent_dir, "cloud.key"),
        content.encode(key),
        new_passphrase=passphrase,
    )


def _check_trusted(agent_dir: str, chain: list[x509.Certificate]) -> None:
    """RotationError unless `chain` ends at a root the installed CA bundle holds.

    A certificate from another CA is refused by every peer still trusting
    this one: migrations to and from this host would stop. Changing CA is a
    keystore-cert-import of its own, not a renewal.
    """
    path = os.path.join(agent_dir, "cloud.ca.crt")
    try:
        with open(path, "rb") as source:
            trusted = pki.load_certificates(source.read(), path)
    except FileNotFoundError:
        return  # nothing trusted yet: the first certificate sets it
    except OSError as error:
        raise RotationError(f"cannot read {path}: {error.strerror}") from None
    root = chain[-1]
    if not any(ca.subject == root.subject and _public(ca) == _public(root) for ca in trusted):
        names = "; ".join(ca.subject.rfc4514_string() for ca in trusted)
        raise RotationError(
            f"the new certificate chains to the root {pki.describe(root)}, which this host does"
            f" not trust ({path} holds {names}): its peers would refuse it"
        )


def _check_previous(agent_dir: str) -> x509.Certificate:
    """The previous certificate, after the checks keystore-cert-import makes: RotationError
    when its key does not match, its chain does not verify or it is not valid now."""
    cert_file, key_file, ca_file = (
        os.path.join(agent_dir, name + PREVIOUS)
        for name in ("cloud.crt", "cloud.key", "cloud.ca.crt")
    )
    try:
        cert = pki.load_certificates(_read(cert_file), cert_file)[0]
        key = pki.load_private_key(_read(key_file), key_file)
        if not pki.key_matches(key, cert):
            raise RotationError(f"{key_file} does not match {cert_file}")
        pki.chain(cert, pki.load_certificates(_read(ca_file), ca_file))
        pki.check_validity(cert, "the previous certificate")
    except KvmhookError as error:
        raise RotationError(f"the previous set cannot be restored: {error}") from None
    return cert


def _run_signer(signer: str, csr: bytes) -> bytes:
    """Run the signer with the CSR on stdin; its stdout: the certificate, then the CA(s)."""
    with tempfile.TemporaryFile() as request:
        request.write(csr)
        request.seek(0)
        try:
            outcome = process.run(
                ["/bin/sh", "-c", signer], request.fileno(), SIGNER_TIMEOUT, 5, 1024 * 1024
            )
        except OSError as error:
            raise KeystoreError(f"cannot run the signer: {error.strerror}") from None
    stdout = b"".join(data for stream, data in outcome.segments if stream == "stdout")
    if outcome.timed_out or outcome.status != 0:
        said = " ".join(outcome.said("stderr").split()[-40:])
        how = "timed out" if outcome.timed_out else outcome.ending
        raise KeystoreError(f"the signer failed ({how}){': ' + said if said else ''}")
    return stdout


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as source:
            return source.read()
    except OSError as error:
        raise RotationError(f"cannot read {path}: {error.strerror}") from None


def _public(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "X")


def _describe(cert: x509.Certificate) -> str:
    days = (pki.not_after(cert) - pki.utcnow()).days
    return (
        f"{cert.subject.rfc4514_string()}, serial {_serial(cert)},"
        f" valid until {pki.not_after(cert)} UTC ({days} days left)"
    )


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{': ' + str(error.filename) if error.filename else ''}"
    return " ".join(str(error).split())
