"""Numbers given to kvmhook's commands are bounded where they come in (kvmhook.limits).

A value out of range is a usage error (exit 2) naming the option and its
range, before anything runs: never an OverflowError traceback. --help shows
each range. The real command runs in a sandbox root, with libvirt's test
driver where a guest is needed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import testca

BIN = Path(sys.executable).parent
TEST_URI = "test:///default"  # one running guest, "test"
HUGE = "1" + "0" * 400  # beyond any float: time.monotonic() + it overflows


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A sandbox root whose agent holds a certificate valid for 10 more days."""
    root = tmp_path / "root"
    agent = root / "etc/cloudstack/agent"
    agent.mkdir(parents=True)
    _key, cert = testca.shared().intermediate.leaf(not_after=testca.now() + 10 * testca.DAY)
    (agent / "cloud.crt").write_bytes(testca.pem(cert))
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    return root


def kvmhook(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kvmhook"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def files(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


RENEW = ("cert", "renew", "--signer", "true", "--no-reload")
MIGRATE = ("migrate", "test", "localhost", "--allow-insecure", "--connect", TEST_URI)


@pytest.mark.parametrize(
    ("args", "option", "span"),
    [
        ((*RENEW, "--days", "99999999"), "--days", "from 1 to 36500"),
        ((*RENEW, "--if-expiring-within", "99999999999"), "--if-expiring-within", "0 to 36500"),
        ((*RENEW, "--if-expiring-within", "²"), "--if-expiring-within", "0 to 36500"),
        (("cert", "status", "--warn-days", "99999999999"), "--warn-days", "from 0 to 36500"),
        (("capacity", "--mem-factor", "1e300", "--connect", TEST_URI), "--mem-factor", "1000"),
        ((*MIGRATE, "--timeout", HUGE), "--timeout", "from 1 to 604800"),
        ((*MIGRATE, "--bandwidth", str(2**70)), "--bandwidth", "from 1 to 1048576"),
        (
            ("maintenance", "enter", "--to", "localhost", "--timeout", HUGE, "--connect", TEST_URI),
            "--timeout",
            "from 1 to 604800",
        ),
    ],
    ids=[
        "renew-days",
        "renew-within",
        "renew-within-unicode-digit",
        "status-warn-days",
        "capacity-mem-factor",
        "migrate-timeout",
        "migrate-bandwidth",
        "maintenance-timeout",
    ],
)
def test_out_of_range_is_a_usage_error_and_changes_nothing(root, args, option, span):
    """An absurd number: exit 2, one error line naming the option and its range, no file
    written, no traceback."""
    before = files(root)
    result = kvmhook(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}'") and span in last, last
    assert files(root) == before


@pytest.mark.parametrize(
    ("args", "exit_code", "said"),
    [
        (
            (*RENEW, "--if-expiring-within", "36500", "--dry-run"),
            0,
            "dry run: would renew",
        ),
        (("cert", "status", "--warn-days", "36500"), 1, "(warning at 36500)"),
        (
            (*MIGRATE, "--timeout", "604800", "--bandwidth", "1048576"),
            1,
            "p2p migration is not supported",  # the test driver's answer: libvirt took them
        ),
    ],
    ids=["renew-within", "status-warn-days", "migrate-timeout-and-bandwidth"],
)
def test_the_top_of_each_range_is_accepted_and_used(root, args, exit_code, said):
    """Each range's largest value goes through to the work it bounds, without overflowing."""
    result = kvmhook(*args)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert said in result.stdout + result.stderr


def test_a_placeholder_valid_for_the_longest_days_is_made(tmp_path):
    """keystore-setup makes the 36500-day placeholder renew --days allows: no date overflow."""
    agent = tmp_path / "agent"
    agent.mkdir()
    props, keystore, csr = agent / "agent.properties", agent / "cloud.jks", agent / "cloud.csr"
    result = subprocess.run(
        [str(BIN / "keystore-setup"), str(props), str(keystore), "pass", "36500", str(csr)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert csr.read_text().startswith("-----BEGIN CERTIFICATE REQUEST-----")


@pytest.mark.parametrize(
    ("args", "ranges"),
    [
        (("capacity",), ["F CPU over-provisioning factor (above 0 and at most 1000)"]),
        (("cert", "renew"), ["within DAYS days (0 to 36500)", "is imported (1 to 36500)"]),
        (("cert", "status"), ["DAYS A certificate expiring within this many days (0 to 36500)"]),
        (("migrate",), ["transfer rate (1 to 1048576)", "after S seconds (1 to 604800)"]),
        (("maintenance", "enter"), ["after S seconds (1 to 604800;"]),
    ],
)
def test_help_shows_each_range(root, args, ranges):
    """--help states every bounded option's range, under click 7.1 (RHEL 9) as under 8."""
    result = kvmhook(*args, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for wanted in ranges:
        assert wanted in text, text
