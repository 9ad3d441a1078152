"""Encrypted live migration between two secured libvirt hosts (issue 5, end to end).

Two hosts made by twohost.py, each in namespaces of its own with a private
/etc, /run and /var/{lib,cache,log}/libvirt, joined by a veth pair whose
addresses exist only inside those namespaces. Certificates come the way the
controller makes them: keystore-setup inside each host, a test CA made here
signs the CSR, keystore-cert-import inside the host installs libvirt's and
QEMU's TLS files. A running TCG guest is then live-migrated from host a to
host b over TLS, QEMU's stream included.

Root only; without the tools it skips (and under CI=true a skip fails).
"""

from __future__ import annotations

import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twohost import (
    GUEST_PREFIX,
    KVMHOOK,
    TestCA,
    guest_xml,
    migrate_argv,
    pem,
)

# Everything keystore-cert-import installs inside a host whose libvirtd.conf exists (issue 4).
TLS_FILES = (
    "/etc/pki/CA/cacert.pem",
    "/etc/pki/libvirt/servercert.pem",
    "/etc/pki/libvirt/private/serverkey.pem",
    "/etc/pki/libvirt/clientcert.pem",
    "/etc/pki/libvirt/private/clientkey.pem",
    "/etc/pki/qemu/ca-cert.pem",
    "/etc/pki/qemu/server-cert.pem",
    "/etc/pki/qemu/server-key.pem",
    "/etc/pki/qemu/client-cert.pem",
    "/etc/pki/qemu/client-key.pem",
)


def migrate(source, dest, name: str) -> subprocess.CompletedProcess:
    """Live-migrate `name` from `source` to `dest` with `kvmhook migrate`, run inside `source`."""
    return source.run(*migrate_argv(name, dest), check=False, timeout=120)


def start_guest(host, name: str) -> None:
    host.define_guest(name, guest_xml(name))
    host.virsh("start", name)
    assert host.state(name) == "running"


def remove_guest(pair, name: str) -> None:
    for host in pair.hosts:
        host.virsh("destroy", name, check=False)
        host.virsh("undefine", name, check=False)


@pytest.fixture
def guest_on_a(pair):
    """A running diskless TCG guest on host a; removed from both hosts afterwards."""
    name = f"{GUEST_PREFIX}mig-{time.monotonic_ns() % 10**8}"
    start_guest(pair.a, name)
    yield name
    remove_guest(pair, name)


@pytest.fixture(scope="module")
def migrated(pair):
    """A guest started on a, then migrated to b over TLS: (name, result, seconds)."""
    name = f"{GUEST_PREFIX}tls-{time.monotonic_ns() % 10**8}"
    start_guest(pair.a, name)
    began = time.monotonic()
    result = migrate(pair.a, pair.b, name)
    seconds = time.monotonic() - began
    yield name, result, seconds
    remove_guest(pair, name)


def test_both_hosts_are_secured(pair):
    """Each host holds the TLS files keystore-cert-import installed and accepts the other's
    TLS connection (and `kvmhook tls status` says secured, once that command exists)."""
    for host in pair.hosts:
        for inside in TLS_FILES:
            assert host.path(inside).is_file(), f"{host.short}: {inside} missing"
        assert host.path("/etc/pki/CA/cacert.pem").read_bytes() == pair.ca.bundle()
        served = x509.load_pem_x509_certificate(
            host.path("/etc/pki/libvirt/servercert.pem").read_bytes()
        )
        sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host.hostname in sans.get_values_for_type(x509.DNSName)
        assert host.address in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        status = host.run(str(KVMHOOK), "tls", "status", check=False)
        assert status.returncode == 0, f"{host.short}: {status.stdout}\n{status.stderr}"
    for source, dest in ((pair.a, pair.b), (pair.b, pair.a)):
        said = source.run("virsh", "-c", f"qemu+tls://{dest.address}/system", "hostname")
        assert said.stdout.strip() == dest.hostname


def test_guest_runs_on_the_destination_and_is_gone_from_the_source(pair, migrated):
    """After the TLS migration the guest runs on b, persistently, and a no longer knows it."""
    name, result, seconds = migrated
    assert result.returncode == 0, (
        f"kvmhook migrate failed:\n{result.stdout}\n{result.stderr}\n"
        f"b's libvirtd log:\n{pair.b.libvirtd_log()}"
    )
    assert pair.b.state(name) == "running"
    assert name in pair.b.virsh("list", "--persistent", "--name").stdout.split()
    assert name not in pair.a.guests()
    assert seconds < 30, f"kvmhook migrate took {seconds:.1f} s for a 64 MiB guest"


def test_destination_hook_log_shows_migrate_begin(pair, migrated):
    """b's kvmhook hook logged `op=migrate subop=begin` for the guest, before its prepare."""
    name = migrated[0]
    records = [r for r in pair.b.hook_log().splitlines() if f" domain={name} " in r]
    assert records, f"no hook records for {name} on b:\n{pair.b.hook_log()[-2000:]}"
    assert " op=migrate subop=begin " in records[0], records
    operations = [r.split(" op=", 1)[1].split(" script=", 1)[0] for r in records]
    assert operations[:4] == [
        "migrate subop=begin",
        "prepare subop=begin",
        "start subop=begin",
        "started subop=begin",
    ], records


def foreign_key_and_cert(ca: TestCA, host) -> tuple[bytes, bytes]:
    """A fresh key and a certificate for `host`'s name and address from `ca` (PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.hostname)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    cert = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), host.hostname, host.address)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, pem(cert)


def assert_failed_cleanly(pair, name: str, result, expected: str) -> None:
    """The migration failed with `expected` in its message; the guest runs on a, not on b."""
    said = result.stdout + result.stderr
    assert result.returncode != 0, f"kvmhook migrate succeeded:\n{said}"
    assert expected in said, said
    assert pair.a.state(name) == "running"
    assert pair.b.state(name) is None, pair.b.guests()


def test_destination_certificate_from_another_ca_fails_and_the_guest_stays(pair, guest_on_a):
    """With b's certificates and CA file from a second CA, the migration fails on the
    certificate check and the guest keeps running on a."""
    other = TestCA("other")
    # keystore-cert-import --restart: b's libvirtd loads the new files (virt-admin).
    pair.b.import_certificate(other, restart=True)
    try:
        result = migrate(pair.a, pair.b, guest_on_a)
        assert_failed_cleanly(pair, guest_on_a, result, "Failed to verify peer's certificate")
    finally:
        pair.b.import_certificate(pair.ca, restart=True)


def test_migration_stream_certificate_from_another_ca_fails(pair, guest_on_a):
    """With only b's QEMU files (the migration stream's TLS) from a second CA, libvirt's channel
    still connects but QEMU's TLS handshake refuses b: the stream is encrypted and verified."""
    qemu = pair.b.path("/etc/pki/qemu")
    saved = {path: path.read_bytes() for path in qemu.iterdir()}
    other = TestCA("stream")
    key, cert = foreign_key_and_cert(other, pair.b)
    try:
        (qemu / "ca-cert.pem").write_bytes(other.bundle())
        for role in ("server", "client"):
            (qemu / f"{role}-cert.pem").write_bytes(cert)
            (qemu / f"{role}-key.pem").write_bytes(key)
        result = migrate(pair.a, pair.b, guest_on_a)  # QEMU reads them per migration
        assert_failed_cleanly(pair, guest_on_a, result, "The certificate hasn't got a known issuer")
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
