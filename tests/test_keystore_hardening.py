"""The keystore tools against hostile input (issue 12): chains `openssl verify` refuses,
passphrases and properties files as the agent's own JVM reads them, parallel runs, symlinks.

Everything runs the real console scripts on real files; what the agent would
make of them is asked of a real JVM (tests/java/PropertiesProbe.java, run in
single-file source mode, which needs a JDK: default-jdk-headless).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testca
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from test_keystore import (
    IMPORT,
    PASSPHRASE,
    SETUP,
    Agent,
    assert_refused,
    ok,
    openssl,
    snapshot,
)

from kvmhook.certs import agentkeystore, agentproperties
from kvmhook.errors import KeystoreError

PROBE = Path(__file__).parent / "java" / "PropertiesProbe.java"


def utf16_hex(value: str) -> str:
    """`value` as PropertiesProbe takes and gives strings: "u" and hex UTF-16 units."""
    return "u" + value.encode("utf-16-be", "surrogatepass").hex()


@pytest.fixture(scope="module")
def jvm():
    """Run PropertiesProbe with its arguments; its output lines. Skipped (failed under CI)
    without a JDK's java."""
    java = shutil.which("java")
    if java is None:
        pytest.skip("java is not installed (default-jdk-headless)")
    modules = subprocess.run([java, "--list-modules"], capture_output=True, text=True, timeout=60)
    if "jdk.compiler@" not in modules.stdout:
        pytest.skip("java cannot run a source file: install a JDK (default-jdk-headless)")

    def run(*args: str) -> list[str]:
        result = subprocess.run(
            [java, str(PROBE), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    return run


@pytest.fixture(scope="module")
def ca() -> testca.Pki:
    return testca.shared()


# --- item 8: the passphrase as Java's Properties reads and writes it -----------------------

ODD = [" ", "\t", "\n", "\r", "\f", "\\", "=", ":", "#", "!", "u", "a", "\x00", "\x7f", "\x85"]
ODD += ["\xe9", "\u20ac", "\U0001f600", "0", "A"]


def odd_values(count: int) -> list[str]:
    """Handpicked and random strings of characters Properties treats specially."""
    rng = random.Random(8)
    picked = ["", " lead", "trail ", "  both  ", "a\\b", "\\u0041", "=:#!", "p\u00e4ss\u20ac"]
    return picked + ["".join(rng.choices(ODD, k=rng.randint(1, 12))) for _ in range(count)]


def test_escape_writes_what_java_properties_store_writes(jvm):
    """properties.escape gives, byte for byte, the value line Properties.store writes."""
    values = odd_values(300)
    assert jvm("store", *(utf16_hex(value) for value in values)) == [
        agentproperties.escape(value) for value in values
    ]


def properties_files() -> list[bytes]:
    """Handpicked properties files Java reads in its own ways, then random ones."""
    picked = [
        b"keystore.passphrase=plain\n",
        b"  keystore.passphrase = trailing  \n",
        b"keystore.passphrase=first\nkeystore.passphrase=last\n",
        b"keystore.passphrase:colon\r\n",
        b"keystore.passphrase\tspace separated\n",
        b"keystore.passphrase  =  = kept\n",
        b"keystore.passphrase=con\\\n    tinued\n",
        b"keystore.passphrase=con\\\r\n  tinued\r\n",
        b"keystore.passphrase=blank\\\n\nother=x\n",
        b"keystore.passphrase=eof\\",
        b"keystore.passphrase=two\\\\\nnext=1\n",
        b"# keystore.passphrase=comment\\\nkeystore.passphrase=after\n",
        b"keystore.passphrase=\\\n# not a comment\n",
        b"key\\=store.passphrase=no\n",
        b"keystore\\u002Epassphrase=escaped key\n",
        b"keystore.passphrase=caf\xe9 \\u20AC \\uD83D\\uDE00\n",
        b"keystore.passphrase=\\t\\n\\r\\f\\x\\\\\n",
        b"keystore.passphrase=bad \\u12\n",
        b"keystore.passphrase=x\rother=y\r",
        b"\f keystore.passphrase=form feed\n",
        b"keystore.passphrase=\n",
        b"",
    ]
    rng = random.Random(12)
    tokens = [b" ", b"\t", b"\f", b"\\", b"=", b":", b"#", b"!", b"\n", b"\r\n", b"\r"]
    tokens += [b"keystore.passphrase", b"keystore.passphrase=", b"x", b"\xe9", b"\\u0041"]
    return picked + [b"".join(rng.choices(tokens, k=rng.randint(1, 14))) for _ in range(400)]


def read_as_python(data: bytes) -> str:
    """What agentproperties.entries finds as the last keystore.passphrase, in the probe's terms."""
    try:
        found = agentproperties.entries(data.decode(agentproperties.ENCODING))
    except KeystoreError:
        return "error"
    values = [entry.value for entry in found if entry.key == agentproperties.KEY]
    return utf16_hex(values[-1]) if values else "null"


def test_reader_finds_what_java_properties_load_finds(jvm, tmp_path):
    """For continuations, escapes, comments, separators, duplicates, line ends and Latin-1
    bytes, the passphrase read is the one Properties.load(InputStream) reads."""
    paths = []
    for index, data in enumerate(properties_files()):
        path = tmp_path / f"{index}.properties"
        path.write_bytes(data)
        paths.append(str(path))
    expected = jvm("load", *paths)
    got = [read_as_python(Path(path).read_bytes()) for path in paths]
    wrong = [
        (Path(path).read_bytes(), java, ours) for path, java, ours in zip(paths, expected, got)
    ]
    assert [case for case in wrong if case[1] != case[2]] == []


TRICKY = [" lead", "trail ", "  both  ", "back\\slash", "a=b:c#d!e", "\\u0041", "\\"]


@pytest.mark.parametrize("passphrase", TRICKY)
def test_setup_passphrase_opens_the_keystore_in_java(jvm, tmp_path, passphrase):
    """The passphrase keystore-setup writes is the one the agent's JVM reads from
    agent.properties, and it opens cloud.jks; an import reads it back the same."""
    agent = Agent.create(tmp_path)
    ok(agent.setup(passphrase=passphrase))
    assert jvm("open", str(agent.properties), str(agent.keystore)) == ["opened [cloud] key true"]
    assert jvm("load", str(agent.properties)) == [utf16_hex(passphrase)]
    assert agentproperties.passphrase(agent.properties.read_text("iso-8859-1")) == passphrase


def test_import_reads_a_tricky_passphrase_back(tmp_path, ca):
    """keystore-cert-import opens the keystore with the escaped passphrase keystore-setup
    wrote, and Java's keytool lists it with the same passphrase."""
    agent = Agent.create(tmp_path)
    tricky = " a\\b=c:d#e!f "
    ok(agent.setup(passphrase=tricky))
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    ok(agent.import_cert(testca.pem(leaf), ca.bundle))
    assert agent.load(tricky)[1] == leaf


@pytest.mark.parametrize(
    ("passphrase", "said"),
    [
        ("pass\nhost=evil.example.org", "the control character U+000A at position 5"),
        ("tab\there", "the control character U+0009 at position 4"),
        ("del\x7f", "the control character U+007F at position 4"),
        (b"pass\xff", "the byte 0xFF, which is not UTF-8, at position 5"),
        ("p\u00e4ss", "the non-ASCII character U+00E4 at position 2"),
        ("\u20acuro", "the non-ASCII character U+20AC at position 1"),
    ],
    ids=["newline", "tab", "del", "not-utf8", "latin1", "euro"],
)
def test_setup_refuses_a_passphrase_java_cannot_take(tmp_path, passphrase, said):
    """A passphrase Java cannot open a keystore with (control characters, non-ASCII, bytes
    that are not UTF-8) is a usage error: exit 2, one line naming it, nothing written."""
    agent = Agent.create(tmp_path)
    agent.properties.write_bytes(b"host=10.0.0.1\n")
    before = snapshot(agent.dir)
    result = agent.run(
        SETUP, str(agent.properties), str(agent.keystore), passphrase, "365", str(agent.csr)
    )
    assert result.returncode == 2
    line = assert_refused(result, before, snapshot(agent.dir), said, prog="keystore-setup")
    assert "PASSPHRASE" in line and "Traceback" not in line


@pytest.mark.parametrize(
    "original",
    [
        b"# CloudStack agent\r\nhost=10.0.0.1\r\nport = 8250 \r\n",
        b"# CloudStack agent\r\nhost=10.0.0.1\r\nguid=no-line-end",
        b"name=caf\xe9\nzone=\\u00e9t\xe9\n",
        b"continued=a\\\n",
    ],
    ids=["crlf", "crlf-unterminated", "latin1", "ends-continuing"],
)
def test_setup_keeps_every_other_line_byte_for_byte(jvm, tmp_path, original):
    """CRLF line ends, Latin-1 bytes and a last line that continues stay byte for byte; the
    passphrase line follows with the file's own line end, and every value reads as before."""
    agent = Agent.create(tmp_path)
    agent.properties.write_bytes(original)
    ok(agent.setup())
    written = agent.properties.read_bytes()
    assert written.startswith(original)
    newline = b"\r\n" if b"\r\n" in original else b"\n"
    assert written.endswith(b"keystore.passphrase=" + PASSPHRASE.encode() + newline)
    before = agentproperties.entries(original.decode("iso-8859-1"))
    after = agentproperties.entries(written.decode("iso-8859-1"))
    assert [entry[:2] for entry in after] == [
        *(entry[:2] for entry in before),
        (
            "keystore.passphrase",
            PASSPHRASE,
        ),
    ]
    assert jvm("open", str(agent.properties), str(agent.keystore)) == ["opened [cloud] key true"]


def test_setup_refuses_a_properties_file_java_cannot_read(tmp_path):
    """A malformed \\uXXXX escape (Java's Properties.load throws on it): one line naming the
    file but not its content, exit 1, nothing written."""
    agent = Agent.create(tmp_path)
    agent.properties.write_bytes(b"secret=hunter2\\u12\n")
    before = snapshot(agent.dir)
    line = assert_refused(
        agent.setup(),
        before,
        snapshot(agent.dir),
        f"properties file {agent.properties} holds a malformed \\uxxxx escape",
        prog="keystore-setup",
    )
    assert "hunter2" not in line


# --- item 7: whatever openssl verify refuses, the import refuses ---------------------------


def certificate(
    name: str,
    key,
    issuer: x509.Certificate | None,
    signer,
    ca: bool | None = None,
    sign: bool = True,
    length: int | None = None,
    start: int = -1,
    end: int = 365,
    extra: tuple | None = None,
) -> x509.Certificate:
    """A certificate for `key` named `name`, signed by `signer` under `issuer`'s name (its own
    when None), valid from `start` to `end` days from now. `ca`: basicConstraints CA:TRUE or
    FALSE (None: none); a CA gets keyUsage, with keyCertSign unless `sign` is False."""
    now = testca.now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(testca.name(name))
        .issuer_name(issuer.subject if issuer else testca.name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start * testca.DAY)
        .not_valid_after(now + end * testca.DAY)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, length if ca else None), True)
    if ca is not False and (ca or issuer is None):
        usage = x509.KeyUsage(True, False, False, False, False, sign, True, False, False)
        builder = builder.add_extension(usage, True)
    if extra is not None:
        builder = builder.add_extension(*extra)
    return builder.sign(signer, hashes.SHA256())


class Chains:
    """Certificates for one key, each with the CA bundle it comes with: chains openssl verify
    accepts (`good`), and chains it refuses with the certificate at fault (`bad`)."""

    def __init__(self) -> None:
        self.key = key = testca.new_key()
        root_key, inter_key, other_key = (testca.new_key() for _ in range(3))
        root = certificate("Chain Root", root_key, None, root_key, ca=True, end=3650)
        inter = certificate("Chain Intermediate", inter_key, root, root_key, ca=True)
        leaf = certificate("host.example", key, inter, inter_key)

        def intermediate(**how) -> x509.Certificate:
            return certificate("Chain Intermediate", inter_key, root, root_key, **how)

        def root_(name: str, **how) -> x509.Certificate:
            return certificate(name, root_key, None, root_key, **how)

        bare, old = root_("Bare Root"), root_("Old Root", ca=True, start=-30, end=-1)
        critical = (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), True)
        self.good = {
            "leaf-intermediate-root": (leaf, [inter, root]),
            "bundle-root-first": (leaf, [root, inter]),
            "root-without-basic-constraints": (
                certificate("host.example", key, bare, root_key),
                [bare],
            ),
        }
        self.bad = {
            "self-signed-unrelated-ca": (
                certificate("Self Signed Host", key, None, key),
                [root],
                "CN=Self Signed Host",
            ),
            "no-root": (leaf, [inter], "CN=Chain Intermediate"),
            "expired-intermediate": (
                leaf,
                [intermediate(ca=True, start=-30, end=-1), root],
                "CN=Chain Intermediate",
            ),
            "intermediate-not-yet-valid": (
                leaf,
                [intermediate(ca=True, start=1), root],
                "CN=Chain Intermediate",
            ),
            "expired-root": (certificate("host.example", key, old, root_key), [old], "CN=Old Root"),
            "intermediate-ca-false": (
                leaf,
                [intermediate(ca=False), root],
                "CN=Chain Intermediate",
            ),
            "intermediate-without-basic-constraints": (
                leaf,
                [intermediate(), root],
                "CN=Chain Intermediate",
            ),
            "intermediate-without-keycertsign": (
                leaf,
                [intermediate(ca=True, sign=False), root],
                "CN=Chain Intermediate",
            ),
            "root-path-length-0": (
                leaf,
                [inter, root_("Chain Root", ca=True, length=0, end=3650)],
                "CN=Chain Root",
            ),
            "leaf-unknown-critical-extension": (
                certificate("host.example", key, inter, inter_key, extra=critical),
                [inter, root],
                "CN=host.example",
            ),
            "intermediate-unknown-critical-extension": (
                leaf,
                [intermediate(ca=True, extra=critical), root],
                "CN=Chain Intermediate",
            ),
            "leaf-signed-by-another-key": (
                certificate("host.example", key, inter, other_key),
                [inter, root],
                "CN=host.example",
            ),
            "expired-leaf": (
                certificate("host.example", key, inter, inter_key, start=-30, end=-1),
                [inter, root],
                "CN=host.example",
            ),
        }


BAD = [
    "self-signed-unrelated-ca",
    "no-root",
    "expired-intermediate",
    "intermediate-not-yet-valid",
    "expired-root",
    "intermediate-ca-false",
    "intermediate-without-basic-constraints",
    "intermediate-without-keycertsign",
    "root-path-length-0",
    "leaf-unknown-critical-extension",
    "intermediate-unknown-critical-extension",
    "leaf-signed-by-another-key",
    "expired-leaf",
]
GOOD = ["leaf-intermediate-root", "bundle-root-first", "root-without-basic-constraints"]


@pytest.fixture(scope="module")
def chains() -> Chains:
    return Chains()


@pytest.fixture(scope="module")
def set_up(tmp_path_factory) -> Agent:
    """An agent after keystore-setup, with libvirtd.conf: copied for each import."""
    agent = Agent.create(tmp_path_factory.mktemp("set-up"), libvirtd=True)
    ok(agent.setup())
    return agent


def fresh(set_up: Agent, tmp_path: Path) -> Agent:
    shutil.copytree(set_up.base, tmp_path / "host", symlinks=True)
    return Agent(tmp_path / "host")


def openssl_verdict(tmp_path: Path, cert: x509.Certificate, cas: list) -> bool:
    """Whether `openssl verify -CAfile` accepts `cert` with the bundle `cas` (the files the
    import is given)."""
    (tmp_path / "cert.pem").write_bytes(testca.pem(cert))
    (tmp_path / "ca.pem").write_bytes(testca.pem(*cas))
    verified = openssl("verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"))
    return verified.returncode == 0


@pytest.mark.parametrize("case", BAD)
def test_import_refuses_what_openssl_verify_refuses(set_up, chains, tmp_path, case):
    """A chain `openssl verify` refuses (the certificate for the given key) is refused by the
    import too: one line naming the certificate at fault, nothing written anywhere."""
    cert, cas, culprit = chains.bad[case]
    assert not openssl_verdict(tmp_path, cert, cas), "openssl accepts it: not a hostile case"
    agent = fresh(set_up, tmp_path)
    before = snapshot(agent.base)
    result = agent.import_cert(testca.pem(cert), testca.pem(*cas), testca.key_pem(chains.key))
    assert_refused(
        result, before, snapshot(agent.base), f"'{culprit}'", prog="keystore-cert-import"
    )


@pytest.mark.parametrize("case", GOOD)
def test_import_accepts_what_openssl_verify_accepts(set_up, chains, tmp_path, case):
    """The good chains of the same family pass both openssl verify and the import."""
    cert, cas = chains.good[case]
    assert openssl_verdict(tmp_path, cert, cas)
    agent = fresh(set_up, tmp_path)
    ok(agent.import_cert(testca.pem(cert), testca.pem(*cas), testca.key_pem(chains.key)))
    assert agent.cert.read_bytes() == testca.pem(cert)


# --- item 10: one at a time ---------------------------------------------------------------


ROUNDS = 30


def test_parallel_setups_leave_a_consistent_set(jvm, tmp_path):
    """Ten keystore-setups at once, each with its own passphrase, round after round: the CSR
    always matches the keystore's key, and agent.properties' passphrase opens cloud.jks.

    EC keys: made at once, so the ten reach their renames together (unlocked, about
    one round in six went wrong)."""
    pairs = []
    for round_ in range(ROUNDS):
        agent = Agent.create(tmp_path / f"round{round_}")
        runs = [
            subprocess.Popen(
                [
                    str(SETUP),
                    "--key-type",
                    "ec",
                    str(agent.properties),
                    str(agent.keystore),
                    f"pass-{round_}-{index}",
                    "365",
                    str(agent.csr),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=agent.env(),
            )
            for index in range(10)
        ]
        for run in runs:
            assert run.wait(timeout=120) == 0, run.stderr.read() if run.stderr else ""
            if run.stderr:
                run.stderr.close()
        key = agentkeystore.load(str(agent.keystore), agent.passphrase())[0]
        csr = x509.load_pem_x509_csr(agent.csr.read_bytes())
        assert testca.public_der(csr) == testca.public_der(key), f"round {round_}"
        pairs += [str(agent.properties), str(agent.keystore)]
    assert jvm("open", *pairs) == ["opened [cloud] key true"] * ROUNDS


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the flock at `path` (its pid inside) for `seconds`."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.parametrize("tool", ["setup", "import"])
def test_keystore_tools_wait_for_a_certificate_change_under_way(tmp_path, ca, tool):
    """While a renewal (or another keystore tool) holds the certificate lock, keystore-setup and
    keystore-cert-import wait, saying for whom, then do their work."""
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    holder = hold_lock(agent.root / "run/kvmhook/cert-renew.lock", 1.5)
    started = time.monotonic()
    result = agent.setup() if tool == "setup" else agent.import_cert(testca.pem(leaf), ca.bundle)
    holder.wait(timeout=30)
    ok(result)
    assert time.monotonic() - started >= 1.0
    prog = "keystore-setup" if tool == "setup" else "keystore-cert-import"
    said = result.stderr.decode().splitlines()[0]
    assert said == (
        f"{prog}: waiting for the certificate renewal, rollback or keystore tool running as pid"
        f" {holder.pid} ({agent.root / 'run/kvmhook/cert-renew.lock'})"
    )


# --- item 11: a symlink's target never lends its owner -------------------------------------


def test_import_replaces_a_symlinked_key_with_a_file_of_its_own(tmp_path, ca):
    """A private-key path that is a symlink to a file owned by uid 1234 becomes a 0600 file
    owned by the importing user; the link's target is untouched."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to uid 1234")
    agent = Agent.create(tmp_path)
    ok(agent.setup())
    leaf = ca.intermediate.sign_csr(agent.csr.read_bytes())
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file\n")
    os.chown(victim, 1234, 1234)
    linked = tmp_path / "x.key"
    linked.symlink_to(victim)
    args = agent.import_args(testca.pem(leaf), ca.bundle)
    args[7] = str(linked)
    ok(agent.run(IMPORT, *args))
    info = os.lstat(linked)
    assert stat.S_ISREG(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
    assert linked.read_bytes() == agent.key.read_bytes()
    assert victim.read_bytes() == b"someone else's file\n"
    assert (victim.stat().st_uid, victim.stat().st_gid) == (1234, 1234)


def test_passphrase_check_names_every_kind_of_character():
    """store.check_passphrase accepts every printable ASCII character and names anything else
    by its code point and position."""
    agentkeystore.check_passphrase("".join(chr(code) for code in range(0x20, 0x7F)))
    with pytest.raises(KeystoreError, match=r"control character U\+0085 at position 2"):
        agentkeystore.check_passphrase("a\x85")
