"""Unit tests of kvmhook/certs/pki.py, files.Transaction, keystore's content and agentproperties."""

from __future__ import annotations

import datetime
import itertools
import os
import stat
from pathlib import Path

import pytest
import testca
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keystore import content
from kvmhook import files
from kvmhook.certs import agentproperties, pki
from kvmhook.files import Transaction


@pytest.fixture(scope="module")
def ca() -> testca.Pki:
    return testca.shared()


# --- pki: loading --------------------------------------------------------------------


def test_load_certificates_keeps_bundle_order(ca):
    """Every certificate of a PEM bundle is loaded, in the bundle's order."""
    loaded = pki.load_certificates(
        testca.pem(ca.root.cert, ca.other.cert, ca.intermediate.cert), "b"
    )
    assert loaded == [ca.root.cert, ca.other.cert, ca.intermediate.cert]


def test_load_certificates_accepts_crlf_and_text_around_blocks(ca):
    """CRLF line ends and text between the PEM blocks (as `openssl x509 -text` leaves) are fine."""
    crlf = ca.root.bundle().replace(b"\n", b"\r\n")
    assert pki.load_certificates(b"subject=...\n" + crlf + b"trailer\n", "b") == [ca.root.cert]


@pytest.mark.parametrize(
    "garbage",
    [b"", b"hello world\n", b"\x00\xff\xfe" * 50, testca.key_pem(testca.new_key("ec"))],
    ids=["empty", "text", "binary", "a-key"],
)
def test_load_certificates_without_a_certificate_raises(garbage):
    """Input holding no PEM certificate raises PkiError naming what was read."""
    with pytest.raises(pki.PkiError, match=r"^CA bundle holds no PEM certificate$"):
        pki.load_certificates(garbage, "CA bundle")


def test_load_certificates_with_a_corrupt_block_raises(ca):
    """A CERTIFICATE block whose base64 is not a certificate raises PkiError, not ValueError."""
    good = ca.root.bundle()
    corrupt = b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    with pytest.raises(pki.PkiError, match="certificate holds a malformed certificate"):
        pki.load_certificates(good + corrupt, "certificate")


def test_load_certificates_accepts_trailing_spaces_on_every_line(ca):
    """A PEM whose every line (BEGIN and END too) ends in spaces loads as the same certificate."""
    spaced = b"".join(line + b"  \n" for line in ca.root.bundle().splitlines())
    assert x509.load_pem_x509_certificate(spaced) == ca.root.cert  # the library itself reads it
    assert pki.load_certificates(spaced, "certificate") == [ca.root.cert]


def test_load_private_key_reads_rsa_and_ec_pkcs8():
    """Unencrypted PKCS#8 PEM keys of both types load as the same key."""
    for kind in ("rsa", "ec"):
        key = testca.new_key(kind)
        loaded = pki.load_private_key(testca.key_pem(key), "key")
        assert testca.public_der(loaded) == testca.public_der(key)


@pytest.mark.parametrize("kind", ["garbage", "certificate", "encrypted"])
def test_load_private_key_rejects_non_keys_and_encrypted_keys(ca, kind):
    """Garbage, a certificate, or a passphrase-protected key raises PkiError."""
    from cryptography.hazmat.primitives import serialization

    data = {
        "garbage": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "certificate": ca.root.bundle(),
        "encrypted": ca.root.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    }[kind]
    with pytest.raises(pki.PkiError, match=r"^private key is not an unencrypted PEM private key"):
        pki.load_private_key(data, "private key")


def test_key_pem_round_trips():
    """key_pem writes PKCS#8 that load_private_key reads back to the same key."""
    key = testca.new_key("ec")
    text = pki.key_pem(key)
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert testca.public_der(pki.load_private_key(text, "k")) == testca.public_der(key)


# --- pki: matching, signatures, chains -----------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_key_matches_only_its_own_certificate(ca, kind):
    """key_matches is true for the key's certificate and false for another key's."""
    key, cert = ca.intermediate.leaf(kind)
    other_key, other_cert = ca.intermediate.leaf(kind)
    assert pki.key_matches(key, cert)
    assert pki.key_matches(other_key, other_cert)
    assert not pki.key_matches(key, other_cert)
    assert not pki.key_matches(other_key, cert)


def test_issued_by_checks_the_signature_not_only_the_names(ca):
    """A certificate naming the CA as issuer but signed by another key is not issued by it."""
    public = testca.new_key("ec").public_key()
    genuine = ca.intermediate.issue(public)
    forged = ca.intermediate.issue(public, signing_key=ca.other.key)
    assert forged.issuer == ca.intermediate.cert.subject
    assert pki.issued_by(genuine, ca.intermediate.cert)
    assert not pki.issued_by(forged, ca.intermediate.cert)
    assert not pki.issued_by(genuine, ca.other.cert)  # different name
    assert not pki.issued_by(genuine, ca.root.cert)  # the CA's CA did not sign it


def test_issued_by_rejects_a_ca_with_the_same_name_but_another_key(ca):
    """An impostor root with the same subject name as the real one does not verify its children."""
    impostor = testca.Authority("Test Root CA")
    assert impostor.cert.subject == ca.root.cert.subject
    assert pki.issued_by(ca.intermediate.cert, ca.root.cert)
    assert not pki.issued_by(ca.intermediate.cert, impostor.cert)
    with pytest.raises(pki.PkiError, match="is not signed by any of the given CA certificates"):
        pki.chain(ca.intermediate.cert, [impostor.cert])


def test_chain_orders_a_shuffled_bundle_from_leaf_to_root(ca):
    """In any bundle order, chain() returns leaf, intermediate, root (unrelated CAs left out)."""
    _, leaf = ca.intermediate.leaf()
    bundle = [ca.root.cert, ca.intermediate.cert, ca.other.cert, ca.ec_root.cert]
    for order in itertools.permutations(bundle):
        assert pki.chain(leaf, list(order)) == [leaf, ca.intermediate.cert, ca.root.cert]


def test_chain_of_a_certificate_signed_by_the_root_directly(ca):
    """A certificate from the root itself chains in two links."""
    _, leaf = ca.root.leaf()
    assert pki.chain(leaf, [ca.intermediate.cert, ca.root.cert]) == [leaf, ca.root.cert]


def test_chain_of_a_self_signed_root_is_itself(ca):
    """A self-signed certificate that is one of the given CA certificates is its own chain;
    one that is not is refused, naming it."""
    assert pki.chain(ca.root.cert, [ca.root.cert]) == [ca.root.cert]
    with pytest.raises(pki.PkiError, match="'CN=Test Root CA' is self-signed and is not one of"):
        pki.chain(ca.root.cert, [ca.other.cert])


@pytest.mark.parametrize(
    "given",
    ["foreign", "root-only", "intermediate-only", "empty"],
)
def test_chain_raises_when_the_bundle_does_not_reach_a_root(ca, given):
    """A foreign CA, a missing intermediate or a missing root raises PkiError naming the issuer."""
    _, leaf = ca.intermediate.leaf()
    cas = {
        "foreign": [ca.other.cert],
        "root-only": [ca.root.cert, ca.other.cert],
        "intermediate-only": [ca.intermediate.cert],
        "empty": [],
    }[given]
    with pytest.raises(pki.PkiError, match="is not signed by any of the given CA certificates"):
        pki.chain(leaf, cas)


def test_ec_keys_and_ec_signed_chains(ca):
    """An EC root → EC intermediate chain verifies for both an EC and an RSA leaf."""
    for kind in ("ec", "rsa"):
        key, leaf = ca.ec_intermediate.leaf(kind)
        assert pki.key_matches(key, leaf)
        assert pki.chain(leaf, [ca.ec_root.cert, ca.ec_intermediate.cert]) == [
            leaf,
            ca.ec_intermediate.cert,
            ca.ec_root.cert,
        ]
    assert isinstance(ca.ec_intermediate.cert.public_key(), ec.EllipticCurvePublicKey)
    forged = ca.ec_intermediate.issue(testca.new_key().public_key(), signing_key=ca.ec_root.key)
    assert not pki.issued_by(forged, ca.ec_intermediate.cert)
    with pytest.raises(pki.PkiError):
        pki.chain(forged, [ca.ec_root.cert, ca.ec_intermediate.cert])


def test_mixed_rsa_and_ec_chain(ca):
    """An EC intermediate under an RSA root chains too (RSA and ECDSA signatures in one chain)."""
    mixed = ca.root.intermediate("Mixed EC Intermediate", key_type="ec")
    _, leaf = mixed.leaf("rsa")
    assert pki.chain(leaf, [ca.root.cert, mixed.cert]) == [leaf, mixed.cert, ca.root.cert]


# --- pki: validity -------------------------------------------------------------------


def test_check_validity_accepts_a_current_certificate(ca):
    """A certificate inside its validity passes, also at both ends of it."""
    _, cert = ca.intermediate.leaf()
    pki.check_validity(cert, "certificate")
    pki.check_validity(cert, "certificate", now=pki.not_before(cert))
    pki.check_validity(cert, "certificate", now=pki.not_after(cert))


def test_check_validity_rejects_an_expired_certificate(ca):
    """An expired certificate raises PkiError saying when it expired."""
    now = testca.now()
    _, cert = ca.intermediate.leaf(not_before=now - 10 * testca.DAY, not_after=now - testca.DAY)
    with pytest.raises(pki.PkiError, match=r"^certificate 'CN=host.example' expired on .* UTC$"):
        pki.check_validity(cert, "certificate")


def test_check_validity_rejects_a_not_yet_valid_certificate(ca):
    """A certificate valid only from tomorrow raises PkiError saying from when."""
    now = testca.now()
    _, cert = ca.intermediate.leaf(not_before=now + testca.DAY, not_after=now + 10 * testca.DAY)
    with pytest.raises(pki.PkiError, match=r"^certificate 'CN=host.example' is not valid before "):
        pki.check_validity(cert, "certificate")
    pki.check_validity(cert, "certificate", now=now + 2 * testca.DAY)


def test_check_validity_just_outside_the_bounds(ca):
    """One second before not-before or after not-after is outside the validity."""
    _, cert = ca.intermediate.leaf()
    second = datetime.timedelta(seconds=1)
    with pytest.raises(pki.PkiError, match="not valid before"):
        pki.check_validity(cert, "c", now=pki.not_before(cert) - second)
    with pytest.raises(pki.PkiError, match="expired"):
        pki.check_validity(cert, "c", now=pki.not_after(cert) + second)


# --- files.Transaction ---------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path, *expected: str) -> list[str]:
    """Names in `directory` other than `expected` (staged temp files left behind)."""
    return sorted(set(os.listdir(directory)) - set(expected))


def staged_temps(directory: Path, *expected: str) -> list[str]:
    """The staged files in `directory` while a transaction is open (its journal left out)."""
    return [name for name in leftovers(directory, *expected) if not name.endswith(".journal")]


def test_transaction_failure_in_second_write_changes_nothing(tmp_path):
    """When staging the second file fails, the first target is unchanged and no temp file stays."""
    first = tmp_path / "first"
    first.write_bytes(b"old\n")
    os.chmod(first, 0o644)
    with pytest.raises(FileNotFoundError), Transaction() as staged:
        staged.write(str(first), b"new\n")
        staged.write(str(tmp_path / "missing-dir" / "second"), b"x")
    assert first.read_bytes() == b"old\n"
    assert stat.S_IMODE(first.stat().st_mode) == 0o644
    assert leftovers(tmp_path, "first") == []


def test_transaction_error_in_the_block_aborts(tmp_path):
    """An exception raised between writes removes every staged file and changes no target."""
    target = tmp_path / "target"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), Transaction() as staged:
        staged.write(str(target), b"new")
        staged.write(str(tmp_path / "fresh"), b"new")
        raise RuntimeError("checks failed")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path, "target") == []


def test_transaction_targets_change_only_at_commit(tmp_path):
    """Until commit, targets are untouched and the data sits in dot-prefixed temp files beside."""
    target = tmp_path / "target"
    target.write_bytes(b"old")
    staged = Transaction()
    staged.write(str(target), b"new")
    assert target.read_bytes() == b"old"
    temps = staged_temps(tmp_path, "target")
    assert len(temps) == 1 and temps[0].startswith(".target.")
    assert (tmp_path / temps[0]).read_bytes() == b"new"
    staged.commit()
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path, "target") == []


def test_transaction_data_is_never_written_to_a_readable_file(tmp_path, monkeypatch):
    """Even with umask 0 and an existing 0644 target, 0600 data is only written to a 0600 file."""
    target = tmp_path / "secret.key"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    modes = []
    real_write = os.write

    def watching_write(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", watching_write)
    old_umask = os.umask(0)
    try:
        staged = Transaction()
        staged.write(str(target), b"-----BEGIN PRIVATE KEY-----\n" * 1000, mode=0o600)
        staged.write(str(tmp_path / "new.key"), b"key", mode=0o600)
        temps = [tmp_path / name for name in staged_temps(tmp_path, "secret.key")]
        assert [stat.S_IMODE(temp.stat().st_mode) for temp in temps] == [0o600, 0o600]
        staged.commit()
    finally:
        os.umask(old_umask)
    assert modes and set(modes) == {0o600}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600


def test_transaction_staged_file_has_final_mode_and_group(tmp_path):
    """A file staged with mode 0640 and a group has both before it is renamed into place."""
    group = 4321
    staged = Transaction()
    staged.write(str(tmp_path / "tls.key"), b"key", mode=0o640, group=group)
    (temp,) = (tmp_path / name for name in staged_temps(tmp_path))
    assert stat.S_IMODE(temp.stat().st_mode) == 0o640
    assert temp.stat().st_gid == group
    staged.commit()
    info = (tmp_path / "tls.key").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, group)


def test_transaction_keeps_an_existing_targets_owner(tmp_path):
    """Replacing a file keeps its owner and group; a given group replaces only the group."""
    kept = tmp_path / "kept"
    regrouped = tmp_path / "regrouped"
    for path in (kept, regrouped):
        path.write_bytes(b"old")
        os.chown(path, 1234, 5678)
    with Transaction() as staged:
        staged.write(str(kept), b"new", mode=0o644)
        staged.write(str(regrouped), b"new", mode=0o640, group=91)
    assert (kept.stat().st_uid, kept.stat().st_gid) == (1234, 5678)
    assert (regrouped.stat().st_uid, regrouped.stat().st_gid) == (1234, 91)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o644


def test_transaction_commits_in_staging_order(tmp_path, monkeypatch):
    """commit() renames the files in the order they were staged (the keystore last in the tools)."""
    renamed = []
    real_replace = os.replace

    def recording_replace(source, target):
        renamed.append(os.path.basename(target))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", recording_replace)
    names = ["zeta", "alpha", "mid", "keystore"]
    (tmp_path / "sub").mkdir()
    with Transaction() as staged:
        for index, name in enumerate(names):
            directory = tmp_path / "sub" if index % 2 else tmp_path
            staged.write(str(directory / name), name.encode())
    assert renamed == names
    assert (tmp_path / "sub" / "alpha").read_bytes() == b"alpha"
    assert (tmp_path / "sub" / "keystore").read_bytes() == b"keystore"
    assert leftovers(tmp_path, "zeta", "mid", "sub") == []


def test_transaction_creates_missing_directories_with_parent_mode(tmp_path):
    """With parent_mode, missing directories are made: the target's own with that mode, those
    above it 0755; existing ones are left as they are."""
    (tmp_path / "etc").mkdir(mode=0o700)
    os.chmod(tmp_path / "etc", 0o700)
    target = tmp_path / "etc/pki/libvirt/private/serverkey.pem"
    old_umask = os.umask(0o022)  # the usual one; other umasks: see the xfail below
    try:
        with Transaction() as staged:
            staged.write(str(target), b"key", parent_mode=0o750)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"key"
    assert mode_of(tmp_path / "etc") == 0o700
    assert mode_of(tmp_path / "etc/pki") == 0o755
    assert mode_of(tmp_path / "etc/pki/libvirt") == 0o755
    assert mode_of(tmp_path / "etc/pki/libvirt/private") == 0o750


def test_transaction_abort_removes_only_the_directories_it_created(tmp_path):
    """A failure after directories were made removes them again; pre-existing ones stay."""
    (tmp_path / "etc/pki").mkdir(parents=True)
    (tmp_path / "etc/pki/qemu").write_bytes(b"a file where a directory should be")
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError), Transaction() as staged:
        staged.write(str(tmp_path / "etc/pki/CA/cacert.pem"), b"ca", 0o644, parent_mode=0o755)
        staged.write(str(tmp_path / "etc/pki/libvirt/private/k.pem"), b"k", parent_mode=0o750)
        staged.write(str(tmp_path / "etc/pki/qemu/sub/ca-cert.pem"), b"ca", parent_mode=0o755)
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_transaction_commit_keeps_created_directories(tmp_path):
    """After a commit, the directories made for the files stay, and a later failure in another
    transaction does not remove them."""
    target = tmp_path / "new/dir/file"
    with Transaction() as staged:
        staged.write(str(target), b"x", parent_mode=0o755)
    with pytest.raises(RuntimeError), Transaction() as staged:
        staged.write(str(target), b"y", parent_mode=0o755)
        raise RuntimeError("later failure")
    assert target.read_bytes() == b"x"
    assert leftovers(target.parent, "file") == []


def test_transaction_directory_modes_ignore_the_umask(tmp_path):
    """Directories made for the files get the stated modes whatever the caller's umask."""
    old_umask = os.umask(0o077)
    try:
        with Transaction() as staged:
            staged.write(str(tmp_path / "pki/qemu/ca-cert.pem"), b"ca", 0o644, parent_mode=0o755)
    finally:
        os.umask(old_umask)
    assert mode_of(tmp_path / "pki/qemu/ca-cert.pem") == 0o644  # files: fchmod, exact
    assert (mode_of(tmp_path / "pki"), mode_of(tmp_path / "pki/qemu")) == (0o755, 0o755)


def test_transaction_writes_large_data_completely(tmp_path):
    """Data larger than one write() lands whole."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    with Transaction() as staged:
        staged.write(str(tmp_path / "big"), data)
    assert (tmp_path / "big").read_bytes() == data


def test_transaction_failed_commit_leaves_no_temp_files(tmp_path):
    """When a rename fails at commit (target is a directory), no staged temp file stays behind."""
    (tmp_path / "is-a-dir").mkdir()
    with pytest.raises(OSError), Transaction() as staged:
        staged.write(str(tmp_path / "is-a-dir"), b"x")
        staged.write(str(tmp_path / "after"), b"y")
    assert leftovers(tmp_path, "is-a-dir") == []


# --- content: the ^/~ encoding -------------------------------------------------------

BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
LABELS = ["CERTIFICATE", "PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "X509 CRL"]


@st.composite
def pem_like(draw) -> bytes:
    """PEM-like text: BEGIN/END lines, optional headers, base64 lines, trailing spaces anywhere."""
    label = draw(st.sampled_from(LABELS))
    spaces = st.text(" ", max_size=3)
    lines = [f"-----BEGIN {label}-----" + draw(spaces)]
    if draw(st.booleans()):
        lines.append("Proc-Type: 4,ENCRYPTED" + draw(spaces))
        lines.append("DEK-Info: AES-256-CBC,0123456789ABCDEF" + draw(spaces))
        lines.append(draw(spaces))
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(st.text(BASE64, min_size=1, max_size=64)) + draw(spaces))
    lines.append(f"-----END {label}-----" + draw(spaces))
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    text = ending.join(lines) + draw(st.sampled_from(["", ending, ending * 2]))
    return text.encode("ascii")


@settings(max_examples=300, deadline=None)
@given(st.lists(pem_like(), min_size=1, max_size=3).map(b"".join))
@example(b"-----BEGIN CERTIFICATE----- \nMIIB  \n  \n-----END CERTIFICATE-----   \n")
@example(b" \n\n  ")
def test_encoding_round_trips_pem(pem):
    """decode(encode(x)) == x for PEM text with headers, CRLF and trailing spaces; the argument
    is one shell word (no space or newline)."""
    encoded = content.encode(pem)
    assert " " not in encoded and "\n" not in encoded
    assert content.decode(encoded) == pem


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127)))
def test_encoding_round_trips_any_ascii_without_caret_or_tilde(text):
    """Any ASCII text free of ^ and ~ round-trips."""
    text = text.replace("^", "").replace("~", "")
    assert content.decode(content.encode(text.encode())) == text.encode()


def test_encoding_of_real_certificates_and_keys(ca):
    """Real PEM certificates, bundles and keys round-trip and start with -----BEGIN."""
    for pem in (ca.bundle, testca.key_pem(testca.new_key("ec")), ca.root.bundle()):
        encoded = content.encode(pem)
        assert encoded.startswith("-----BEGIN~")
        assert content.decode(encoded) == pem


def test_decode_maps_caret_and_tilde_only():
    """^ becomes a newline, ~ a space; nothing else changes."""
    assert content.decode("a~b^c+/=^") == b"a b\nc+/=\n"
    assert content.encode(b"a b\nc\n") == "a~b^c^"


def test_decode_rejects_non_ascii():
    """Non-ASCII argument text raises UnicodeEncodeError (the tool turns it into its message)."""
    with pytest.raises(UnicodeEncodeError):
        content.decode("-----BEGIN~CERTIFICATE-----^é")


# --- properties ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keystore.passphrase=s3cret\n", "s3cret"),
        ("  keystore.passphrase = s3cret  \n", "s3cret  "),  # Java keeps trailing spaces
        ("keystore.passphrase:s3cret", "s3cret"),
        ("a=b\r\nkeystore.passphrase=x=y\r\nc=d\r\n", "x=y"),
        ("keystore.passphrase=\n", None),
        ("#keystore.passphrase=commented\n", None),
        ("keystore.passphrasex=no\nmy.keystore.passphrase=no\n", None),
        ("", None),
    ],
)
def test_passphrase_is_read_from_its_line(text, expected):
    """keystore.passphrase= (or :) is found; comments, empty values and other keys are not."""
    assert agentproperties.passphrase(text) == expected


def test_with_passphrase_appends_and_keeps_every_other_line():
    """A missing passphrase is appended after every existing line, in order, untouched."""
    text = "# agent.properties\n\nhost=10.0.0.1\n! bang comment\nport = 8250  \nguid=abc\n"
    result = agentproperties.with_passphrase(text, "s3cret")
    assert result == text + "keystore.passphrase=s3cret\n"


def test_with_passphrase_adds_a_newline_to_an_unterminated_last_line():
    """A last line without a newline gets one before the passphrase line."""
    assert agentproperties.with_passphrase("a=b", "p") == "a=b\nkeystore.passphrase=p\n"
    assert agentproperties.with_passphrase("", "p") == "keystore.passphrase=p\n"


def test_with_passphrase_keeps_an_existing_value():
    """An existing passphrase stays and the text is returned unchanged."""
    text = "a=b\nkeystore.passphrase=old\nc=d"
    assert agentproperties.with_passphrase(text, "new") == text


def test_with_passphrase_replaces_an_empty_value_line():
    """An empty keystore.passphrase= line is replaced, not duplicated."""
    result = agentproperties.with_passphrase("a=b\nkeystore.passphrase=\nc=d\n", "p")
    assert result == "a=b\nc=d\nkeystore.passphrase=p\n"
    assert agentproperties.passphrase(result) == "p"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from(" \t\f\\=:#!ab\xe9u0"), max_size=12),
        max_size=8,
    ),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1),
)
def test_with_passphrase_preserves_arbitrary_lines(lines, newline, terminated, value):
    """Whatever the other lines hold (continuations, escapes, comments, any line end), they stay
    byte for byte and mean what they meant; the passphrase is appended, read back the same."""
    lines = [line for line in lines if "keystore.passphrase" not in line and "\\u" not in line]
    text = newline.join(lines) + (newline if terminated and lines else "")
    result = agentproperties.with_passphrase(text, value)
    assert result.startswith(text)
    assert agentproperties.passphrase(result) == value
    # Java reads a lone backslash ending the file as the empty key: meaningless, and gone
    # once a line follows it.
    before = [(each.key, each.value) for each in agentproperties.entries(text) if any(each[:2])]
    after = [(each.key, each.value) for each in agentproperties.entries(result) if any(each[:2])]
    assert after == [*before, ("keystore.passphrase", value)]
