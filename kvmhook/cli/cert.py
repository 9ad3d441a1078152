"""`kvmhook cert`: the host's certificates, checked and rotated."""

from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Callable

import click

from kvmhook import events, exitcodes, limits, paths
from kvmhook.certs import certificates, pki, tls

if TYPE_CHECKING:
    from cryptography import x509

    from kvmhook.certs import rotation
from kvmhook.cli.options import (
    DAYS,
    DAYS_FROM_0,
    agent_dir_option,
    connect_option,
    failure,
    with_exit_codes,
)
from kvmhook.errors import KvmhookError


@click.group()
def cert() -> None:
    """Check and rotate the agent's and libvirt's TLS certificates."""


@cert.command(
    epilog=with_exit_codes(
        "kvmhook cert status",
        "Example, from monitoring: kvmhook cert status --warn-days 21 || alert",
    ),
)
@agent_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--warn-days",
    type=DAYS_FROM_0,
    metavar="DAYS",
    default=certificates.DEFAULT_WARN_DAYS,
    show_default=True,
    help=f"A certificate expiring within this many days ({DAYS_FROM_0.span}) is a problem.",
)
def status(agent_dir: str | None, as_json: bool, warn_days: int) -> None:
    """Show the agent's certificate (cloud.crt/key/ca.crt and the keystore) and,
    when libvirtd is configured here, libvirt's, QEMU's and the consoles' (VNC)
    TLS files: subject, SANs, issuer, expiry, key match, chain, and whether all
    copies agree. Exits 1 when anything is wrong or expires within
    --warn-days; consoles' files that are not installed at all (a host
    imported before kvmhook installed them) are said, not a problem."""
    findings = certificates.inspect(agent_dir or paths.agent_dir(), warn_days)
    if as_json:
        click.echo(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        for finding in findings:
            _show(finding)
    if any(finding.problems for finding in findings):
        raise SystemExit(exitcodes.FAILED)


def _show(finding: certificates.Finding) -> None:
    if not finding.installed:
        click.echo(f"{finding.name}: not installed ({tls.console_files_hint()})")
        return
    state = "ok" if not finding.problems else "PROBLEM"
    click.echo(f"{finding.name}: {state}")
    click.echo(f"  certificate  {finding.files['cert']}")
    if finding.subject is not None:
        click.echo(f"  subject      {finding.subject}")
        click.echo(f"  names        {', '.join(finding.sans) or '-'}")
        click.echo(f"  issuer       {finding.issuer}")
        click.echo(f"  expires      {finding.not_after} ({finding.days_left} days left)")
        click.echo(f"  key matches  {_yes_no(finding.key_matches)}")
        click.echo(f"  chain        {_yes_no(finding.chain_verifies)}")
    for problem in finding.problems:
        click.echo(f"  problem      {problem}")


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "NO"


_RENEW_EXAMPLES = """\b
Examples:
  kvmhook cert renew --if-expiring-within auto          # the timer's run: the controller signs
  kvmhook cert renew --signer 'ssh ca.example.org sign-host-csr'
  kvmhook cert renew --if-expiring-within 30 --dry-run"""


def _days(ctx: click.Context, param: click.Parameter, value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    days = limits.whole_number(value, DAYS_FROM_0.low, DAYS_FROM_0.high)
    if days is None:
        raise click.BadParameter(
            f"{value!r} is neither a whole number of days nor auto (days: {DAYS_FROM_0.span})"
        )
    return days


@cert.command(epilog=with_exit_codes("kvmhook cert renew", _RENEW_EXAMPLES))
@agent_dir_option
@click.option(
    "--if-expiring-within",
    "within",
    metavar="DAYS|auto",
    callback=_days,
    help=f"Renew only if the certificate expires within DAYS days ({DAYS_FROM_0.span}); "
    "auto: the controller's "
    "ca.framework.cert.expiry.alert.period for this host's cluster, else 15. "
    "Without it, renew now.",
)
@click.option(
    "--signer",
    help="Shell command that reads the CSR on stdin and prints the certificate, then the CA(s).",
)
@click.option(
    "--controller",
    "use_controller",
    is_flag=True,
    help="Have the controller's CA sign the CSR (issueCertificate); the default when "
    "controller.conf exists and no --signer is given.",
)
@click.option(
    "--reload/--no-reload",
    default=True,
    show_default=True,
    help="Make the running libvirtd (or virtproxyd) load the new files online "
    "(virt-admin server-update-tls) and check the new serial is served.",
)
@click.option(
    "--allow-restart",
    is_flag=True,
    help="Restart the daemon (systemd) when it cannot reload its TLS files online.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; change and sign nothing.")
@click.option(
    "--days",
    type=DAYS,
    metavar="DAYS",
    default=365,
    show_default=True,
    help=f"Validity of the placeholder until the signed certificate is imported ({DAYS.span}).",
)
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--restart", is_flag=True, help="The earlier name of --reload (the default).")
@connect_option
def renew(
    agent_dir: str | None,
    within: int | str | None,
    signer: str | None,
    use_controller: bool,
    reload: bool,
    allow_restart: bool,
    dry_run: bool,
    days: int,
    key_type: str,
    restart: bool,
    source_uri: str,
) -> None:
    """Rotate the agent's key and certificate without restarting anything: a
    new key and CSR, signed by --signer or the controller, checked as
    keystore-cert-import checks and installed with it (keystore,
    cloud.crt/key/ca.crt and, when libvirtd is configured, its and QEMU's TLS
    files), each file replaced atomically beside a FILE.prev copy of the
    previous one. Then the running daemon reloads its TLS files and a fresh
    handshake on its TLS port must present the new serial; if not, the
    previous set is put back and reloaded. Then each running guest whose
    console (VNC) uses TLS re-reads its certificate files (QMP display-reload
    through libvirt, which marks the guest "tainted: custom-monitor"); no
    guest restarts. A console that cannot (QEMU older than 6.0, a guest
    gone) is listed, and the exit status is 5. Renewals and rollbacks wait
    for each other (a lock in /run/kvmhook)."""
    from kvmhook.certs import rotation, signers

    if signer is not None and use_controller:
        raise click.UsageError("--signer and --controller exclude each other: choose one signer")
    if restart and not reload:
        raise click.UsageError("--restart (the earlier name of --reload) contradicts --no-reload")
    if signer is not None:
        chosen = functools.partial(signers.command_signer, signer)
    elif use_controller:
        chosen = functools.partial(signers.controller_signer, agent_dir)
    else:
        chosen = functools.partial(signers.default_signer, agent_dir)
    say = functools.partial(click.echo, err=True)
    _report(
        lambda: _renewal(
            _noted(
                agent_dir,
                rotation.renew(
                    agent_dir,
                    chosen,
                    functools.partial(rotation.alert_period, agent_dir, say)
                    if within == "auto"
                    else within,
                    reload=reload,
                    allow_restart=allow_restart,
                    dry_run=dry_run,
                    validity_days=days,
                    key_type=key_type,
                    say=say,
                    consoles_uri=source_uri,
                ),
            )
        ),
        on_failure=functools.partial(_failed_renewal, agent_dir),
    )


@cert.command(
    epilog=with_exit_codes(
        "kvmhook cert rollback", "Example: kvmhook cert rollback && kvmhook tls status"
    )
)
@agent_dir_option
@click.option(
    "--allow-restart",
    is_flag=True,
    help="Restart the daemon (systemd) when it cannot reload its TLS files online.",
)
@connect_option
def rollback(agent_dir: str | None, allow_restart: bool, source_uri: str) -> None:
    """Put back the set the last renewal replaced (every FILE.prev), after
    checking it is whole and valid, and make the running daemon and the
    running guests' consoles serve it (same checks and exit codes as renew).
    The set rolled back from becomes the FILE.prev set: rolling back again
    returns to it."""
    from kvmhook.certs import rotation

    say = functools.partial(click.echo, err=True)
    _report(
        lambda: _rolled_back(
            rotation.rollback(agent_dir, allow_restart, say=say, consoles_uri=source_uri)
        )
    )


def _renewal(done: rotation.NotDue | rotation.DryRun | rotation.Renewed) -> str:
    """What a renewal did, in one line (a dry run: a few)."""
    from kvmhook.certs import rotation

    if isinstance(done, rotation.NotDue):
        return f"not due: {_describe(done.current)}; renewal starts {done.days} days before"
    if isinstance(done, rotation.DryRun):
        current = _describe(done.current) if done.current is not None else "a missing cert"
        return "\n".join(
            [
                f"dry run: would renew {current}",
                f"  new key and CSR, signed by {done.signer}",
                f"  then replace, each beside its {rotation.PREVIOUS} copy:"
                f" {', '.join(done.targets)}",
                f"  then {done.plan.describe()}",
            ]
        )
    was = f"serial {pki.serial(done.previous)} -> " if done.previous is not None else ""
    return _with_consoles(
        f"renewed: {done.new.subject.rfc4514_string()}, {was}serial {pki.serial(done.new)},"
        f" valid until {pki.not_after(done.new)} UTC; {done.served.describe()};"
        f" the previous set is kept as *{rotation.PREVIOUS} (kvmhook cert rollback)",
        done.consoles,
    )


def _rolled_back(done: rotation.RolledBack) -> str:
    """What a rollback did, in one line."""
    from kvmhook.certs import rotation

    cert = done.cert
    return _with_consoles(
        f"rolled back to {cert.subject.rfc4514_string()}, serial {pki.serial(cert)},"
        f" valid until {pki.not_after(cert)} UTC; {done.served.describe()}; the set rolled back"
        f" from is now the *{rotation.PREVIOUS} set",
        done.consoles,
    )


def _with_consoles(line: str, consoles: rotation.Consoles) -> str:
    """`line`, then what became of the consoles: the guests whose console could not re-read
    its files each on a line of stderr, and exit status 5."""
    if not consoles.asked:
        return line
    reloaded = len(consoles.reloaded)
    line += (
        f"\nconsoles: {reloaded} running guest{'s' if reloaded != 1 else ''} with a TLS console"
        " re-read the files (display-reload)"
    )
    if consoles.complete:
        return line
    click.echo(line)
    problems = [f"{guest}: {why}" for guest, why in consoles.failed.items()]
    if consoles.error is not None:
        problems.append(f"the running guests could not be listed: {consoles.error}")
    for problem in problems:
        click.echo(
            f"console not reloaded, it serves the certificate it had until its guest restarts:"
            f" {problem}",
            err=True,
        )
    raise SystemExit(exitcodes.CONSOLES_STALE)


def _describe(cert: x509.Certificate) -> str:
    days = (pki.not_after(cert) - pki.utcnow()).days
    return (
        f"{cert.subject.rfc4514_string()}, serial {pki.serial(cert)},"
        f" valid until {pki.not_after(cert)} UTC ({days} days left)"
    )


def _report(
    action: Callable[[], str], on_failure: Callable[[KvmhookError], None] = lambda error: None
) -> None:
    """Run a rotation and print its one line; its failure becomes one line and an exit code."""
    try:
        click.echo(action())
    except KvmhookError as error:
        on_failure(error)
        raise failure(" ".join(str(error).split()), exitcodes.of(error)) from None


def _failed_renewal(agent_dir: str | None, error: KvmhookError) -> None:
    _note(agent_dir, False)
    events.failed("certificate.renewal_failed", error, exit_code=exitcodes.of(error))


def _noted(
    agent_dir: str | None,
    done: rotation.NotDue | rotation.DryRun | rotation.Renewed,
) -> rotation.NotDue | rotation.DryRun | rotation.Renewed:
    """`done`, recorded for the renewal metrics when it renewed (consoles or not), and as an
    event. A renewal not due is no event: the daily timer's quiet run stays one line."""
    from kvmhook.certs import rotation

    if isinstance(done, rotation.Renewed):
        _note(agent_dir, True)
        events.emit(
            "certificate.renewed",
            path=paths.on_host(paths.agent_files().cert),
            serial=pki.serial(done.new),
            previous_serial=None if done.previous is None else pki.serial(done.previous),
            not_after=pki.not_after(done.new).isoformat() + "Z",
            consoles_reloaded=len(done.consoles.reloaded),
            consoles_stale=sorted(done.consoles.failed),
        )
    return done


def _note(agent_dir: str | None, succeeded: bool) -> None:
    """The renewal record (kvmhook.certs.renewalrecord) of the host's own set: a renewal of
    another --agent-dir is not the host's. A failure to write it is a warning."""
    from kvmhook.certs import renewalrecord

    if agent_dir is not None and os.path.realpath(agent_dir) != os.path.realpath(paths.agent_dir()):
        return

    try:
        renewalrecord.note(succeeded)
    except OSError as error:
        click.echo(
            f"warning: cannot record the renewal for the metrics: {error.strerror}", err=True
        )
