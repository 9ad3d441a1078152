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
   reloads again and must present the previous serial;
8. once the daemon serves the new set, each running guest whose console
   (VNC) uses TLS re-reads its files: QMP display-reload through libvirt
   (reload_consoles). A console that cannot (QEMU older than 6.0, a guest
   gone) is reported, never a reason to roll back: the daemon's set is good.

`rollback` swaps each file with its .prev (after checking that the previous
set is whole and valid) through the same steps 5 to 7.

One lock (kvmhook.locks.certificates) serializes renewals, rollbacks and the
keystore tools: a second one waits for the first. The signer comes from
kvmhook.certs.signers, the reload and its proof from kvmhook.certs.serving, the checks of
the sets from kvmhook.certs.certificates. renew and rollback return what they did;
`kvmhook cert` words it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import signal
import tempfile
from collections.abc import Iterator
from typing import Callable

from cryptography import x509

from kvmhook import locks, paths
from kvmhook.certs import (
    agentkeystore,
    agentproperties,
    certificates,
    certimport,
    keysetup,
    pki,
    snapshot,
)
from kvmhook.certs.serving import NOT_RUNNING, SKIPPED, Served, ServingPlan
from kvmhook.certs.signers import Signer
from kvmhook.errors import (
    ControllerError,
    KeystoreError,
    KvmhookError,
    RenewalBusyError,
    RollbackFailedError,
    RolledBackError,
    RotationError,
    VirtError,
)
from kvmhook.files import Transaction

# CloudStack's default ca.framework.cert.expiry.alert.period, in days.
DEFAULT_WITHIN_DAYS = 15
# Beside each file a renewal replaces: its previous content, for one rollback step.
PREVIOUS = ".prev"

Say = Callable[[str], None]


class NotDue:
    """The certificate expires later than `days` from now: nothing was done."""

    def __init__(self, current: x509.Certificate, days: int) -> None:
        self.current = current
        self.days = days


class DryRun:
    """What the renewal would do: have `signer` sign, replace `targets` (each beside its
    PREVIOUS copy), then serve them as `plan` says. Nothing was signed or changed."""

    def __init__(
        self, current: x509.Certificate | None, signer: str, targets: list[str], plan: ServingPlan
    ) -> None:
        self.current = current
        self.signer = signer
        self.targets = targets
        self.plan = plan


class Consoles:
    """The running guests' consoles told to re-read their certificate files: `reloaded`
    guests, `failed` {guest: why not}, or `error` when the guests could not be listed.
    `asked` is False when nothing was tried (the daemon was not reloaded, or not running)."""

    def __init__(
        self, asked: bool, outcome: dict[str, str | None] | None = None, error: str | None = None
    ) -> None:
        self.asked = asked
        self.reloaded = sorted(guest for guest, why in (outcome or {}).items() if why is None)
        self.failed = {guest: why for guest, why in sorted((outcome or {}).items()) if why}
        self.error = error

    @property
    def complete(self) -> bool:
        """Every console serves the files on disk (as far as anyone could tell)."""
        return not self.failed and self.error is None


class Renewed:
    """The new set is installed and `served`; the one it replaced (`previous`, the certificate
    or None) is kept as the PREVIOUS set; `consoles` reloaded as far as they could be."""

    def __init__(
        self,
        previous: x509.Certificate | None,
        new: x509.Certificate,
        served: Served,
        consoles: Consoles,
    ) -> None:
        self.previous = previous
        self.new = new
        self.served = served
        self.consoles = consoles


class RolledBack:
    """The PREVIOUS set (its certificate `cert`) is installed and `served`; the set rolled
    back from is now the PREVIOUS set; `consoles` reloaded as far as they could be."""

    def __init__(self, cert: x509.Certificate, served: Served, consoles: Consoles) -> None:
        self.cert = cert
        self.served = served
        self.consoles = consoles


def alert_period(agent_dir: str | None, say: Say) -> int:
    """Days before expiry to renew: the controller's ca.framework.cert.expiry.alert.period for
    this host's cluster when a controller is configured and answers, else 15. The controller
    is verified with `agent_dir`'s CA file (see controller.load)."""
    from kvmhook.host import controller

    try:
        client = controller.load(agent_dir)
        if client is None:
            return DEFAULT_WITHIN_DAYS
        return client.expiry_alert_period()
    except ControllerError as error:
        say(f"the controller did not say its expiry alert period ({error}): using 15 days")
        return DEFAULT_WITHIN_DAYS


def renew(
    agent_dir: str | None,
    signer: Callable[[], Signer],
    within_days: int | Callable[[], int] | None = None,
    reload: bool = True,
    allow_restart: bool = False,
    dry_run: bool = False,
    validity_days: int = 365,
    key_type: str = "rsa",
    say: Say = lambda line: None,
    consoles_uri: str = "qemu:///system",
) -> NotDue | DryRun | Renewed:
    """Renew the key and certificate of the agent in `agent_dir` (None: the default; see the
    module's steps); what was done.

    `signer` is called only when a renewal is due; `within_days` (or the
    function giving it, called under the lock) makes a certificate expiring
    later than that many days from now not due. RolledBackError when the new
    set was installed and taken back, RollbackFailedError when taking it
    back failed too; any other KvmhookError: nothing changed.
    """
    agent = paths.agent_files(agent_dir)
    with locks.certificates(RenewalBusyError, say):
        current = _current(agent.cert)
        if within_days is not None:
            days = within_days if isinstance(within_days, int) else within_days()
            if current is not None and pki.not_after(current) - pki.utcnow() > datetime.timedelta(
                days=days
            ):
                return NotDue(current, days)
        plan = ServingPlan.prepare(reload, allow_restart)
        chosen = signer()
        if dry_run:
            return DryRun(current, chosen.description, _targets(agent), plan)
        installation = _new_set(agent, chosen, validity_days, key_type)
        new = installation.material.chain[0]
        certificates.check_trusted(agent.ca, installation.material.chain)
        replaced = [path for each in installation.paths for path in (each, each + PREVIOUS)]
        served = _swap(
            lambda files: _stage_keeping_previous(files, installation), replaced, new, plan, say
        )
        return Renewed(current, new, served, reload_consoles(served, consoles_uri))


def rollback(
    agent_dir: str | None,
    allow_restart: bool = False,
    say: Say = lambda line: None,
    consoles_uri: str = "qemu:///system",
) -> RolledBack:
    """Swap every file of the set with its .prev copy, then reload; what was done.

    Refused, changing nothing, unless every file has a .prev copy and the
    previous certificate matches its key, chains to its CA and is valid now.
    Rolling back again returns to the set rolled back from.
    """
    agent = paths.agent_files(agent_dir)
    with locks.certificates(RenewalBusyError, say):
        targets = _targets(agent)
        sources = {target: _previous_of(target) for target in targets}
        missing = [source for source in sources.values() if not os.path.exists(source)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RotationError(
                f"no previous set to roll back to: {missing[0]} does not exist{more}"
            )
        previous = _check_previous(agent)
        plan = ServingPlan.prepare(True, allow_restart)
        if os.path.exists(agent.properties + PREVIOUS):  # a renewal gave it the passphrase
            targets.append(agent.properties)
        swapped = [path for target in targets for path in (target, target + PREVIOUS)]

        def stage(files: Transaction) -> None:
            for target in targets:
                now = snapshot.SavedFile.read(target)
                before = snapshot.SavedFile.read(sources.get(target, target + PREVIOUS))
                before.stage(files, target)
                now.stage(files, target + PREVIOUS)

        served = _swap(stage, swapped, previous, plan, say)
        return RolledBack(previous, served, reload_consoles(served, consoles_uri))


def reload_consoles(served: Served, uri: str) -> Consoles:
    """After the daemon serves the new files: every running guest whose console uses TLS
    re-reads them (QMP display-reload; no guest restarts). Nothing is asked when the daemon
    was not reloaded (--no-reload) or is not running: then no guest is reachable."""
    from kvmhook.host import virt  # here: libvirt-python costs ~50 ms to import

    if served.how in (SKIPPED, NOT_RUNNING):
        return Consoles(asked=False)
    try:
        return Consoles(asked=True, outcome=virt.reload_consoles(uri))
    except VirtError as error:
        return Consoles(asked=True, error=str(error))


def _previous_of(target: str) -> str:
    """Where the previous content of `target` is: its .prev; for a console file that has
    none (its first renewal, on a host imported before consoles had files), the .prev of
    QEMU's file of the same role, which held the same identity."""
    previous = target + PREVIOUS
    console = {path: role for role, path in paths.vnc_tls_files().items()}.get(target)
    if console is None or os.path.exists(previous):
        return previous
    return paths.tls_files()[console.replace("vnc", "qemu", 1)] + PREVIOUS


def _stage_keeping_previous(files: Transaction, installation: certimport.Installation) -> None:
    """The new set, each existing file's content first kept as FILE.prev (mode and group too),
    all in one transaction."""
    for path in installation.paths:
        current = snapshot.SavedFile.read(path)
        if current.data is not None:
            current.stage(files, path + PREVIOUS)
    installation.stage(files)


def _swap(
    stage: Callable[[Transaction], None],
    changed: list[str],
    cert: x509.Certificate,
    plan: ServingPlan,
    say: Say,
) -> Served:
    """Stage and commit the new files, then make the daemon serve `cert`; on failure, every
    file of `changed` goes back to what it was and the daemon serves the previous set again."""
    before = snapshot.take(changed)
    with _signals_deferred():
        try:
            with Transaction() as files:
                stage(files)
        except OSError as error:
            raise RotationError(f"cannot write {error.filename}: {error.strerror}") from None
        try:
            return plan.serve(cert)
        except (KvmhookError, OSError) as error:
            failure = _one_line(error)
        say(f"the daemon does not serve the new files ({failure}): putting the previous set back")
        try:
            snapshot.restore(before)
            if plan.previous is not None:
                again = plan.serve(plan.previous).describe()
            else:
                plan.apply()
                again = f"{plan.daemon} loaded its previous files again"
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


def _targets(agent: paths.AgentFiles) -> list[str]:
    """Every file a renewal replaces, as keystore-cert-import writes them (keystore last)."""
    return certimport.target_paths(agent.keystore, agent.cert, agent.ca, agent.key)


def _current(path: str) -> x509.Certificate | None:
    """The agent's certificate; None when there is none (everything is then due)."""
    try:
        with open(path, "rb") as source:
            return pki.load_certificates(source.read(), path)[0]
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RotationError(f"cannot read {path}: {error.strerror}") from None


def _new_set(
    agent: paths.AgentFiles, signer: Signer, validity_days: int, key_type: str
) -> certimport.Installation:
    """A new key and CSR as keystore-setup makes them, signed, and checked as
    keystore-cert-import checks; made in a private scratch directory, so nothing installed
    changes until the swap."""
    text = agentproperties.read(agent.properties) or ""
    passphrase = agentproperties.passphrase(text) or secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="kvmhook-renew-") as scratch:
        made = paths.agent_files(scratch)  # keystore-setup writes its properties and keystore
        csr = keysetup.setup(
            made.properties,
            made.keystore,
            passphrase,
            validity_days,
            os.path.join(scratch, "cloud.csr"),
            key_type,
        )
        signed = signer.sign(csr)
        key = pki.key_pem(agentkeystore.load(made.keystore, passphrase)[0])
    certs = pki.load_certificates(signed, f"what {signer.description} returned")
    if len(certs) < 2:
        raise KeystoreError(
            f"{signer.description} returned no CA certificate after the certificate"
        )
    return certimport.check(
        agent.properties,
        agent.keystore,
        agent.cert,
        pki.certificate_pem(certs[:1]),
        agent.ca,
        pki.certificate_pem(certs[1:]),
        agent.key,
        key,
        new_passphrase=passphrase,
    )


def _check_previous(agent: paths.AgentFiles) -> x509.Certificate:
    """The previous certificate, after the checks keystore-cert-import makes: RotationError
    when its key does not match, its chain does not verify or it is not valid now."""
    try:
        return certificates.check_set(
            agent.cert + PREVIOUS,
            agent.key + PREVIOUS,
            agent.ca + PREVIOUS,
            "the previous certificate",
        )
    except KvmhookError as error:
        raise RotationError(f"the previous set cannot be restored: {error}") from None


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{': ' + str(error.filename) if error.filename else ''}"
    return " ".join(str(error).split())
