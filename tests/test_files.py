"""files.Transaction is all or nothing (issue 12, items 9 and 11): a commit failing or
SIGKILLed at any step leaves every target as it was, at once or after the next transaction's
recovery, in every directory involved; a symlink's target never lends its owner.

Faults come from the test-only KVMHOOK_TEST_FAULT hook of kvmhook/files.py (`fail:N`,
`kill:N`), or from os.replace itself failing where the landed code had no hook.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import testca
from test_keystore import TLS_CA, TLS_CERTS, TLS_KEYS, Agent, ok, snapshot

from keystore import cli
from kvmhook import files
from kvmhook.files import Transaction

REPO = Path(__file__).resolve().parent.parent
# The scene: targets in three directories (one made by the transaction), a symlink among them.
WRITES = [("a/one", b"new one\n"), ("a/link", b"new link\n"), ("b/two", b"new two\n")]
NEW = ("b/sub/three", b"new three\n")
EXISTING = 3
# A commit's steps: a link per existing target, the record, a rename per target (the last
# rename is step LAST_RENAME), then removing each link and the journal of each directory.
LAST_RENAME = EXISTING + 1 + len(WRITES) + 1
STEPS = LAST_RENAME + EXISTING + 3


def scene(base: Path) -> Path:
    """Two directories holding the targets' old versions, and what the symlink points to."""
    (base / "a").mkdir(parents=True)
    (base / "b").mkdir()
    (base / "a/one").write_bytes(b"old one\n")
    os.chmod(base / "a/one", 0o644)
    (base / "elsewhere").write_bytes(b"link target\n")
    (base / "a/link").symlink_to("../elsewhere")
    (base / "b/two").write_bytes(b"old two\n")
    return base


def commit(base: Path) -> None:
    """The transaction under test: every write of the scene, one in a directory it makes."""
    with Transaction() as staged:
        for name, data in WRITES:
            staged.write(str(base / name), data, mode=0o640)
        staged.write(str(base / NEW[0]), NEW[1], mode=0o600, parent_mode=0o755)


def state(base: Path) -> dict[str, tuple]:
    """Every entry under `base`: type, and bytes or link target, and mode."""
    found = {}
    for path in sorted(base.rglob("*")):
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            found[str(path.relative_to(base))] = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            found[str(path.relative_to(base))] = ("file", path.read_bytes(), info.st_mode)
        else:
            found[str(path.relative_to(base))] = ("dir", stat.S_IMODE(info.st_mode))
    return found


def leftovers(base: Path) -> list[str]:
    """Staged files, backups and journals anywhere under `base`."""
    return sorted(
        str(path.relative_to(base))
        for path in base.rglob(".*")
        if path.name.endswith((".new", ".old", ".journal"))
    )


@pytest.fixture
def old_and_new(tmp_path) -> tuple[dict, dict]:
    """The scene's state before and after a commit that nothing disturbs."""
    clean = scene(tmp_path / "clean")
    before = state(clean)
    commit(clean)
    assert leftovers(clean) == []
    return before, state(clean)


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_commit_failing_at_any_step_changes_nothing(tmp_path, monkeypatch, old_and_new, step):
    """A step of the commit failing (EBUSY) before the last rename leaves every target, the
    symlink included, as it was, and removes the directory it made; failing later, the commit
    stands. Either way no temporary file, backup or journal stays once a transaction has run."""
    old, new = old_and_new
    base = scene(tmp_path / "base")
    monkeypatch.setenv("KVMHOOK_TEST_FAULT", f"fail:{step}")
    if step <= LAST_RENAME:
        with pytest.raises(OSError) as failure:
            commit(base)
        assert failure.value.errno == errno.EBUSY
        assert failure.value.filename in [str(base / name) for name, _ in [*WRITES, NEW]]
        assert state(base) == old
        assert leftovers(base) == []
        return
    commit(base)
    assert {k: v for k, v in state(base).items() if k not in leftovers(base)} == new
    monkeypatch.delenv("KVMHOOK_TEST_FAULT")
    files.recover([str(base / "a/x"), str(base / "b/x"), str(base / "b/sub/x")])
    assert state(base) == new


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_files import commit
commit(Path({base!r}))
"""


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_killed_commit_is_undone_by_the_next_transaction(tmp_path, old_and_new, step):
    """SIGKILL at any step of a commit: the next transaction in any one of its directories
    puts every target back in all of them, leaving nothing of the killed one behind; once all
    were renamed the commit stands, and a transaction in each directory clears its journal."""
    old, new = old_and_new
    base = scene(tmp_path / "base")
    script = KILLED.format(tests=str(REPO / "tests"), base=str(base))
    killed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KVMHOOK_TEST_FAULT": f"kill:{step}", "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -9, killed.stderr
    with Transaction() as staged:
        staged.write(str(base / "b/unrelated"), b"next run\n")
    (base / "b/unrelated").unlink()
    left = leftovers(base)
    assert {name: what for name, what in state(base).items() if name not in left} == (
        old if step <= LAST_RENAME else new
    )
    if step <= LAST_RENAME:
        assert left == []
    assert all(name.endswith(".journal") for name in left)
    files.recover([str(base / "a/x"), str(base / "b/sub/x")])
    assert leftovers(base) == []


def test_the_last_step_is_counted(tmp_path, old_and_new):
    """No step past STEPS: a fault set beyond it changes nothing (the test counts right)."""
    base = scene(tmp_path / "base")
    script = KILLED.format(tests=str(REPO / "tests"), base=str(base))
    env = {**os.environ, "KVMHOOK_TEST_FAULT": f"kill:{STEPS + 1}", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    assert done.returncode == 0
    assert state(base) == old_and_new[1]


def test_a_live_transaction_is_left_alone_by_another(tmp_path):
    """A transaction staged but not committed is not taken for a killed one by a second
    transaction in the same directory; both commit."""
    first = Transaction()
    first.write(str(tmp_path / "first"), b"first\n")
    with Transaction() as second:
        second.write(str(tmp_path / "second"), b"second\n")
    assert len(leftovers(tmp_path)) == 2  # the first's staged file and journal
    first.commit()
    assert (tmp_path / "first").read_bytes() == b"first\n"
    assert (tmp_path / "second").read_bytes() == b"second\n"
    assert leftovers(tmp_path) == []


def test_a_replace_failing_midway_puts_the_renamed_files_back(tmp_path, monkeypatch):
    """The third of four renames failing (os.replace itself, EBUSY): the two renamed before
    get their old content back, the error names the third."""
    base = scene(tmp_path / "base")
    before = state(base)
    calls = []
    real_replace = os.replace

    def busy_third(source, target):
        calls.append(target)
        if len(calls) == 3:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", busy_third)
    with pytest.raises(OSError, match="Device or resource busy") as failure:
        commit(base)
    assert failure.value.filename == str(base / "b/two")
    assert state(base) == before
    assert leftovers(base) == []


def test_a_symlink_target_never_lends_its_owner(tmp_path):
    """Writing over a symlink to a file owned by uid 1234 makes a file of the writing user in
    its place (mode as asked); the file it pointed to keeps its bytes and owner."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to uid 1234")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours\n")
    os.chown(victim, 1234, 1234)
    (tmp_path / "x.key").symlink_to(victim)
    with Transaction() as staged:
        staged.write(str(tmp_path / "x.key"), b"key\n", mode=0o600)
    info = os.lstat(tmp_path / "x.key")
    assert stat.S_ISREG(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)
    assert victim.read_bytes() == b"not yours\n"
    assert (victim.stat().st_uid, victim.stat().st_gid) == (1234, 1234)


# --- the real import --------------------------------------------------------------------

# An import with libvirtd.conf: 17 targets (cloud.crt, cloud.ca.crt, cloud.key, 13 TLS
# files, the keystore), all existing, in 6 directories (the agent's, CA, libvirt,
# libvirt/private, qemu, libvirt-vnc).
IMPORT_TARGETS = 3 + len(TLS_CA + TLS_CERTS + TLS_KEYS) + 1
IMPORT_DIRECTORIES = 6
IMPORT_LAST_RENAME = IMPORT_TARGETS + 1 + IMPORT_TARGETS
IMPORT_STEPS = IMPORT_LAST_RENAME + IMPORT_TARGETS + IMPORT_DIRECTORIES


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An agent after setup and a first import (libvirtd.conf present), and a second
    certificate to import with its own key: the new set."""
    ca = testca.shared()
    agent = Agent.create(tmp_path_factory.mktemp("imported"), libvirtd=True)
    ok(agent.setup())
    ok(agent.import_cert(testca.pem(ca.intermediate.sign_csr(agent.csr.read_bytes())), ca.bundle))
    key, leaf = ca.intermediate.leaf()
    args = agent.import_args(testca.pem(leaf), ca.bundle, testca.key_pem(key))
    done = Agent(tmp_path_factory.mktemp("done"))
    shutil.copytree(agent.base, done.base, symlinks=True, dirs_exist_ok=True)
    ok(done.run(cli_path(), *[arg.replace(str(agent.base), str(done.base)) for arg in args]))
    return agent, args, NewSet(done, leaf)


class NewSet:
    """What an import of the new certificate leaves: every file as in `done` (the keystore's
    bytes differ from one PKCS#12 encoding to the next: it must hold `leaf`)."""

    def __init__(self, done: Agent, leaf) -> None:
        self.files = without_keystore(relative(snapshot(done.base), done.base))
        self.leaf = leaf

    def holds(self, agent: Agent) -> bool:
        files_ = without_keystore(relative(snapshot(agent.base), agent.base))
        return files_ == self.files and agent.load()[1] == self.leaf


def without_keystore(taken: dict) -> dict:
    return {path: value for path, value in taken.items() if not path.endswith("cloud.jks")}


def cli_path() -> Path:
    return Path(sys.executable).parent / "keystore-cert-import"


def relative(taken: dict, base: Path) -> dict:
    return {os.path.relpath(path, base): value for path, value in taken.items()}


def copy(imported, tmp_path: Path) -> tuple[Agent, list[str]]:
    agent, args, _ = imported
    shutil.copytree(agent.base, tmp_path / "host", symlinks=True)
    return Agent(tmp_path / "host"), [
        arg.replace(str(agent.base), str(tmp_path / "host")) for arg in args
    ]


@pytest.mark.parametrize("rename", range(1, IMPORT_TARGETS + 1))
def test_import_with_any_rename_failing_changes_nothing(
    imported, tmp_path, monkeypatch, capsys, rename
):
    """keystore-cert-import whose k-th rename fails (EBUSY from os.replace): exit 1, one line
    naming that file, and every file (agent dir and /etc/pki alike) as it was."""
    agent, args = copy(imported, tmp_path)
    monkeypatch.setenv("KVMHOOK_ROOT", str(agent.root))
    before = snapshot(agent.base)
    calls = []
    real_replace = os.replace

    def busy(source, target):
        calls.append(target)
        if len(calls) == rename:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", busy)
    assert cli.import_main(args) == 1
    err = capsys.readouterr().err
    assert err == f"keystore-cert-import: Device or resource busy: {calls[rename - 1]}\n"
    assert snapshot(agent.base) == before
    assert leftovers(agent.base) == []


@pytest.mark.parametrize("step", range(1, IMPORT_STEPS + 1))
def test_import_killed_at_any_step_is_undone_by_the_next_run(
    imported, tmp_path, monkeypatch, capsys, step
):
    """keystore-cert-import SIGKILLed at any step of its commit: the next run, even one that
    refuses its input, first puts every file back as it was (or, all renamed, leaves the new
    set), in the agent's directory and /etc/pki alike, and no leftover stays."""
    agent, args = copy(imported, tmp_path)
    before = snapshot(agent.base)
    killed = subprocess.run(
        [str(cli_path()), *args],
        env={**agent.env(), "KVMHOOK_TEST_FAULT": f"kill:{step}"},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -9, killed.stderr
    monkeypatch.setenv("KVMHOOK_ROOT", str(agent.root))
    other_ca = testca.shared().other
    refused = agent.import_args(testca.pem(other_ca.leaf()[1]), other_ca.bundle())
    assert cli.import_main(refused) == 1
    assert "does not match the key in" in capsys.readouterr().err
    if step <= IMPORT_LAST_RENAME:
        assert snapshot(agent.base) == before
    else:
        assert imported[2].holds(agent)
    assert leftovers(agent.base) == []


def test_the_imports_last_step_is_counted(imported, tmp_path):
    """A kill set one step past IMPORT_STEPS never happens: the import completes."""
    agent, args = copy(imported, tmp_path)
    done = subprocess.run(
        [str(cli_path()), *args],
        env={**agent.env(), "KVMHOOK_TEST_FAULT": f"kill:{IMPORT_STEPS + 1}"},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert imported[2].holds(agent)
