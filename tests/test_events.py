"""Structured events of the long operations on stderr (structlog): text on a terminal, JSON with
--log-format json or under systemd; results stay on stdout; failures as text stay one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_rotation import host  # noqa: F401  (the fixture: a set made by the real tools)

from kvmhook.host import hoststate

BIN = Path(sys.executable).parent


def kvmhook(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "KVMHOOK_LOG_FORMAT")
    }
    return subprocess.run(
        [str(BIN / "kvmhook"), *args],
        capture_output=True,
        text=True,
        env={**base, "KVMHOOK_ROOT": str(root), **env},
        timeout=120,
        check=False,
    )


def json_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_json_events_carry_fields_and_stdout_stays_the_result(tmp_path):
    result = kvmhook(tmp_path, "--log-format", "json", "metrics", "--textfile", str(tmp_path),
                     "--connect", "test:///default")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    [written] = [e for e in json_events(result.stderr) if e["event"] == "metrics.written"]
    assert written["path"] == str(tmp_path / "kvmhook.prom")
    assert written["duration_s"] >= 0 and written["level"] == "info"
    assert written["timestamp"].endswith("Z")


def test_text_on_a_terminal_and_json_under_systemd_by_default(tmp_path):
    args = ("metrics", "--textfile", str(tmp_path), "--connect", "test:///default")
    text = kvmhook(tmp_path, *args)
    line = next(line for line in text.stderr.splitlines() if "metrics.written" in line)
    assert f"path={tmp_path / 'kvmhook.prom'}" in line and not line.startswith("{")
    journal = kvmhook(tmp_path, *args, JOURNAL_STREAM="8:1234")
    assert [e["event"] for e in json_events(journal.stderr)] == ["metrics.written"]


def test_a_failure_is_one_error_line_as_text_and_an_event_in_json(host):  # noqa: F811
    text = kvmhook(host.root, "cert", "renew", "--signer", "false")
    assert text.returncode == 1
    assert text.stderr.strip().splitlines() == [
        line for line in text.stderr.strip().splitlines() if line.startswith("Error:")
    ]
    as_json = kvmhook(host.root, "--log-format", "json", "cert", "renew", "--signer", "false")
    [failed] = json_events(as_json.stderr)
    assert failed["event"] == "certificate.renewal_failed" and failed["exit_code"] == 1
    assert "signer" in failed["error"]
    assert as_json.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_a_renewal_names_path_and_serials(host):  # noqa: F811
    result = kvmhook(host.root, "--log-format", "json", "cert", "renew", "--signer", host.signer())
    assert result.returncode == 0, result.stderr
    [renewed] = [e for e in json_events(result.stderr) if e["event"] == "certificate.renewed"]
    assert renewed["path"] == "/etc/cloudstack/agent/cloud.crt"
    assert renewed["serial"] in result.stdout and renewed["previous_serial"] in result.stdout


def test_maintenance_states_are_events(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    hoststate.write(hoststate.MAINTENANCE)
    result = kvmhook(tmp_path, "--log-format", "json", "maintenance", "cancel")
    assert result.returncode == 0, result.stderr
    assert {"event": "maintenance.state", "state": "Enabled"}.items() <= json_events(result.stderr)[
        0
    ].items()


def test_the_hook_never_imports_structlog(tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmhook.qemu", "vm1", "start", "begin", "-"],
        input=b"<domain/>",
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "KVMHOOK_ROOT": str(tmp_path)},
        timeout=60,
        check=True,
    )
    assert "structlog" not in result.stderr.decode()


def test_a_renewal_not_due_is_one_line_and_no_event(host):  # noqa: F811
    """The daily timer's quiet run: its one `not due:` line, nothing on stderr."""
    result = kvmhook(host.root, "cert", "renew", "--if-expiring-within", "1", "--signer", "false")
    assert result.returncode == 0
    assert result.stdout.startswith("not due: ") and len(result.stdout.splitlines()) == 1
    assert result.stderr == ""
