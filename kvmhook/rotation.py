"""Agent-side certificate rotation for a standalone host or a test CA.

The same steps as the controller's flow, with a local signer instead of the
management server: a new key and CSR (keystore-setup), the CSR signed by
`--signer`, the result imported (keystore-cert-import). The new key is made
in a private scratch directory and imported with the certificate, so the
installed key and certificate stay valid and in place until the signed
certificate has been checked: a failing signer changes nothing.
"""

from __future__ import annotations

import os
import secrets
import tempfile

from keystore import certimport, content, properties, setup, store
from kvmhook import pki, process
from kvmhook.errors import KeystoreError

SIGNER_TIMEOUT = 120.0


def renew(
    agent_dir: str, signer: str, validity_days: int, key_type: str = "rsa"
) -> certimport.Material:
    """Rotate the agent's key and certificate; returns what was installed."""
    props = os.path.join(agent_dir, "agent.properties")
    try:
        with open(props, encoding="utf-8") as source:
            text = source.read()
    except FileNotFoundError:
        text = ""
    passphrase = properties.passphrase(text) or secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="kvmhook-renew-") as scratch:
        scratch_props = os.path.join(scratch, "agent.properties")
        with open(scratch_props, "w", encoding="utf-8") as target:
            target.write(f"keystore.passphrase={passphrase}\n")
        scratch_keystore = os.path.join(scratch, "cloud.jks")
        csr = os.path.join(scratch, "cloud.csr")
        setup.setup(scratch_props, scratch_keystore, passphrase, validity_days, csr, key_type)
        signed = _sign(signer, csr)
        key = pki.key_pem(store.load(scratch_keystore, passphrase)[0])
    certs = pki.load_certificates(signed, "the signer's output")
    if len(certs) < 2:
        raise KeystoreError("the signer printed no CA certificate after the certificate")
    return certimport.import_certificate(
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


def _sign(signer: str, csr: str) -> bytes:
    """Run the signer with the CSR on stdin; its stdout: the certificate, then the CA(s)."""
    with open(csr, "rb") as request:
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
