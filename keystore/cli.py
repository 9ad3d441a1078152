"""The command lines of keystore-setup and keystore-cert-import.

Their positional arguments are fixed by the controller, which calls them
over SSH; every failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Callable

import click

from keystore import content
from kvmhook import exitcodes, files, locks
from kvmhook.certs import agentkeystore, certimport, keysetup, pki, startup, virtadmin
from kvmhook.cli.options import DAYS, with_exit_codes
from kvmhook.errors import KeystoreBusyError, KeystoreError, KvmhookError

# Options go first: after the first argument nothing is an option, so content
# that begins "-----BEGIN" stays an argument.
_SETTINGS = {"help_option_names": ["-h", "--help"], "allow_interspersed_args": False}


def _passphrase(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        agentkeystore.check_passphrase(value)
    except KeystoreError as error:
        raise click.BadParameter(str(error)) from None
    return value


def _waiting(prog: str) -> Callable[[str], None]:
    return lambda line: click.echo(f"{prog}: {line}", err=True)


@click.command(
    context_settings=_SETTINGS,
    epilog=with_exit_codes(
        "keystore-setup", "Example: keystore-setup agent.properties cloud.jks s3cret 365 cloud.csr"
    ),
)
@click.argument("properties_file")
@click.argument("keystore_file")
@click.argument("passphrase", callback=_passphrase)
@click.argument("validity_days", type=DAYS)
@click.argument("csr_file")
@click.option(
    "--key-type",
    type=click.Choice(["rsa", "ec"]),
    default="rsa",
    show_default=True,
    help="RSA 2048 or EC P-256.",
)
def setup_command(
    properties_file: str,
    keystore_file: str,
    passphrase: str,
    validity_days: int,
    csr_file: str,
    key_type: str,
) -> None:
    """Create a new private key in KEYSTORE_FILE (PKCS#12, alias `cloud`, with a
    self-signed placeholder valid VALIDITY_DAYS), keep PASSPHRASE in PROPERTIES_FILE
    as keystore.passphrase= (one already there is reused), and write a CSR for this
    host (CN = FQDN, SANs = FQDN and its addresses) to CSR_FILE and stdout.
    PASSPHRASE is printable ASCII (Java opens a keystore with nothing else);
    VALIDITY_DAYS is from 1 to 36500. Waits while a certificate renewal,
    rollback or other keystore tool runs."""
    with locks.certificates(KeystoreBusyError, _waiting("keystore-setup")):
        files.recover([properties_file, keystore_file, csr_file])
        csr = keysetup.setup(
            properties_file, keystore_file, passphrase, validity_days, csr_file, key_type
        )
    click.echo(csr.decode(), nl=False)


@click.command(
    context_settings=_SETTINGS,
    epilog=with_exit_codes(
        "keystore-cert-import",
        "Content arguments encode newlines as ^ and spaces as ~; empty content uses the "
        "file as it is. Modes: `ssh` when the controller runs this over SSH while adding the host "
        "(content on the command line), `agent` when the running agent renews its certificate "
        "(files already written by the agent). Neither restarts anything without --restart.",
    ),
)
@click.argument("properties_file")
@click.argument("keystore_file")
@click.argument("mode", type=click.Choice(certimport.MODES), metavar="MODE")
@click.argument("cert_file")
@click.argument("cert_content")
@click.argument("ca_file")
@click.argument("ca_content")
@click.argument("key_file")
@click.argument("key_content", required=False, default="")
@click.option(
    "--restart",
    is_flag=True,
    help="Afterwards make a running libvirtd (or virtproxyd) load the new TLS files.",
)
def import_command(
    properties_file: str,
    keystore_file: str,
    mode: str,
    cert_file: str,
    cert_content: str,
    ca_file: str,
    ca_content: str,
    key_file: str,
    key_content: str,
    restart: bool,
) -> None:
    """Check the CA-signed certificate against the key, the CA chain and the
    clock, then install it: keystore (renamed into place last), cloud.crt,
    cloud.key, cloud.ca.crt beside it, and libvirt's and QEMU's TLS files when
    /etc/libvirt/libvirtd.conf exists. A KEY_CONTENT replaces the keystore's key.
    All of them or none: an interrupted import is undone by the next one. Waits
    while a certificate renewal, rollback or other keystore tool runs."""
    with locks.certificates(KeystoreBusyError, _waiting("keystore-cert-import")):
        targets = certimport.target_paths(keystore_file, cert_file, ca_file, key_file)
        files.recover([*targets, properties_file])
        material = certimport.check(
            properties_file,
            keystore_file,
            cert_file,
            _decoded(cert_content, "certificate"),
            ca_file,
            _decoded(ca_content, "CA certificate"),
            key_file,
            _decoded(key_content, "private key"),
        ).install()
    cert = material.chain[0]
    click.echo(
        f"imported {cert.subject.rfc4514_string()} (valid until {pki.not_after(cert)} UTC, "
        f"chain of {len(material.chain)}) into {keystore_file} [{mode}]",
        err=True,
    )
    if restart:
        _reload()


def _decoded(argument: str, what: str) -> bytes | None:
    """The PEM a content argument encodes; None when it is empty (the file is used as it is)."""
    if not argument:
        return None
    try:
        return content.decode(argument)
    except UnicodeEncodeError:
        raise KeystoreError(
            f"{what} content is not ^/~-encoded PEM (non-ASCII characters)"
        ) from None


def _reload() -> None:
    """Make the daemon serving TLS here load the files just imported, online."""
    daemon = startup.detect().daemon
    try:
        virtadmin.reload_tls(daemon)
    except KvmhookError as error:
        raise KeystoreError(
            f"imported, but {daemon} did not reload its TLS files: {error}"
        ) from None


def setup_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of keystore-setup."""
    return _run(setup_command, "keystore-setup", argv)


def import_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of keystore-cert-import."""
    return _run(import_command, "keystore-cert-import", argv)


def _run(command: click.Command, prog: str, argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as error:
        sys.stderr.write(f"{prog}: {error.format_message()} (see {prog} --help)\n")
        return exitcodes.USAGE
    except (KvmhookError, OSError) as error:
        sys.stderr.write(f"{prog}: {_one_line(error)}\n")
        return exitcodes.FAILED
    return exitcodes.OK


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror}: {error.filename}"
    return " ".join(str(error).split())


__all__ = ["import_main", "setup_main"]
