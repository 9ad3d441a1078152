"""`kvmhook cert`: the host's certificates, checked and rotated."""

from __future__ import annotations

import json

import click

from kvmhook import certificates, paths, pki
from kvmhook.cli.options import agent_dir_option
from kvmhook.errors import KvmhookError


@click.group()
def cert() -> None:
    """Check and rotate the agent's and libvirt's TLS certificates."""


@cert.command(
    epilog="Example, from monitoring: kvmhook cert status --warn-days 21 || alert",
)
@agent_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--warn-days",
    type=click.IntRange(min=0),
    default=certificates.DEFAULT_WARN_DAYS,
    show_default=True,
    help="A certificate expiring within this many days is a problem.",
)
def status(agent_dir: str | None, as_json: bool, warn_days: int) -> None:
    """Show the agent's certificate (cloud.crt/key/ca.crt and the keystore) and,
    when libvirtd is configured here, libvirt's and QEMU's TLS files: subject,
    SANs, issuer, expiry, key match, chain, and whether all copies agree.
    Exits 1 when anything is wrong or expires within --warn-days."""
    findings = certificates.inspect(agent_dir or paths.agent_dir(), warn_days)
    if as_json:
        click.echo(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        for finding in findings:
            _show(finding)
    if any(finding.problems for finding in findings):
        raise SystemExit(1)


def _show(finding: certificates.Finding) -> None:
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


@cert.command(
    epilog="Example: kvmhook cert renew --signer 'ssh ca.example.org sign-host-csr'",
)
@agent_dir_option
@click.option(
    "--signer",
    required=True,
    help="Shell command that reads the CSR on stdin and prints the certificate, then the CA(s).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="Validity of the placeholder until the signed certificate is imported.",
)
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--restart", is_flag=True, help="Make a running libvirtd load the new TLS files.")
def renew(agent_dir: str | None, signer: str, days: int, key_type: str, restart: bool) -> None:
    """Rotate the agent's key and certificate: a new key and CSR, signed by
    --signer, checked and imported (keystore, cloud.crt/key/ca.crt and, when
    libvirtd is configured, its TLS files). The installed certificate stays
    until the new one is in place: a failing signer changes nothing."""
    from keystore import certimport
    from kvmhook import rotation

    try:
        material = rotation.renew(agent_dir or paths.agent_dir(), signer, days, key_type)
        if restart:
            certimport.reload_libvirt_tls()
    except KvmhookError as error:
        raise click.ClickException(str(error)) from None
    leaf = material.chain[0]
    click.echo(f"renewed: {leaf.subject.rfc4514_string()}, valid until {pki.not_after(leaf)} UTC")
