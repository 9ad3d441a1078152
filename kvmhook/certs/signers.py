"""Who signs a renewal's CSR: a command the operator gives, or the controller's CA."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from kvmhook import paths
from kvmhook.errors import KeystoreError, RotationError
from kvmhook.hook import process

TIMEOUT = 120.0


class Signer:
    """Who signs the CSR; `sign(csr)` returns the certificate, then the CA certificate(s), PEM."""

    def __init__(self, description: str, sign: Callable[[bytes], bytes]) -> None:
        self.description = description
        self.sign = sign


def command_signer(command: str) -> Signer:
    """A shell command reading the CSR on stdin and printing the certificate, then the CA(s)."""
    return Signer(f"the signer `{command}`", lambda csr: _run(command, csr))


def controller_signer(agent_dir: str | None = None) -> Signer:
    """The controller's CA, through issueCertificate; RotationError when none is configured.

    `agent_dir` holds the CA file that verifies the controller (see controller.load).
    """
    from kvmhook.host import controller

    client = controller.load(agent_dir)
    if client is None:
        raise RotationError(
            f"no controller is configured ({paths.controller_conf()} does not exist):"
            " give --signer CMD instead"
        )

    def sign(csr: bytes) -> bytes:
        certificate, cas = client.issue_certificate(csr.decode("ascii"))
        return f"{certificate.strip()}\n{cas.strip()}\n".encode()

    return Signer("the controller (issueCertificate)", sign)


def default_signer(agent_dir: str | None = None) -> Signer:
    """The controller when one is configured; else a RotationError asking for --signer."""
    if not os.path.exists(paths.controller_conf()):
        raise RotationError(
            "nobody to sign the new certificate: give --signer CMD, or configure the"
            f" controller in {paths.controller_conf()} (--controller)"
        )
    return controller_signer(agent_dir)


def _run(command: str, csr: bytes) -> bytes:
    """Run the signer with the CSR on stdin; its stdout: the certificate, then the CA(s)."""
    with tempfile.TemporaryFile() as request:
        request.write(csr)
        request.seek(0)
        try:
            outcome = process.run(
                ["/bin/sh", "-c", command], request.fileno(), TIMEOUT, 5, 1024 * 1024
            )
        except OSError as error:
            raise KeystoreError(f"cannot run the signer: {error.strerror}") from None
    stdout = b"".join(data for stream, data in outcome.segments if stream == "stdout")
    if outcome.timed_out or outcome.status != 0:
        said = " ".join(outcome.said("stderr").split()[-40:])
        how = "timed out" if outcome.timed_out else outcome.ending
        raise KeystoreError(f"the signer failed ({how}){': ' + said if said else ''}")
    return stdout
