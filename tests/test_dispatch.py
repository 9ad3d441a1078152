"""Unit tests of the runner's small types and of path resolution."""

from __future__ import annotations

import pytest

from kvmhook import paths
from kvmhook.hook import dispatch, process
from kvmhook.hook.discovery import Script

# --- a script's run ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "error", "failed"),
    [
        (process.Outcome(0, False, 0.0, [], 0), None, False),
        (process.Outcome(1, False, 0.0, [], 0), None, True),
        (process.Outcome(-15, False, 0.0, [], 0), None, True),
        (process.Outcome(0, True, 0.0, [], 0), None, True),
        (None, OSError(8, "Exec format error"), True),
    ],
)
def test_run_failed_means_nonzero_signal_timeout_or_not_started(outcome, error, failed):
    """A run failed unless its script exited 0 within its time."""
    run = dispatch.ScriptRun(Script("all_x", "/x"), outcome, error)
    assert run.failed is failed


# --- paths -------------------------------------------------------------------


def test_paths_default_to_the_real_host(monkeypatch):
    """Without overrides the paths are the production ones."""
    for name in ("KVMHOOK_ROOT", "KVMHOOK_CUSTOM_DIR", "KVMHOOK_LOG_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert paths.root() == "/"
    assert paths.custom_dir() == "/etc/libvirt/hooks/custom"
    assert paths.log_file() == "/var/log/libvirt/qemu-hook.log"


def test_paths_honour_kvmhook_root(monkeypatch):
    """KVMHOOK_ROOT prefixes every default path."""
    monkeypatch.delenv("KVMHOOK_CUSTOM_DIR", raising=False)
    monkeypatch.delenv("KVMHOOK_LOG_FILE", raising=False)
    monkeypatch.setenv("KVMHOOK_ROOT", "/sandbox")
    assert paths.root() == "/sandbox"
    assert paths.under_root("/etc/x") == "/sandbox/etc/x"
    assert paths.custom_dir() == "/sandbox/etc/libvirt/hooks/custom"
    assert paths.log_file() == "/sandbox/var/log/libvirt/qemu-hook.log"


def test_paths_explicit_overrides_win_over_root(monkeypatch):
    """KVMHOOK_CUSTOM_DIR and KVMHOOK_LOG_FILE override the root-derived defaults."""
    monkeypatch.setenv("KVMHOOK_ROOT", "/sandbox")
    monkeypatch.setenv("KVMHOOK_CUSTOM_DIR", "/my/scripts")
    monkeypatch.setenv("KVMHOOK_LOG_FILE", "/my/hook.log")
    assert paths.custom_dir() == "/my/scripts"
    assert paths.log_file() == "/my/hook.log"


def test_paths_empty_variables_count_as_unset(monkeypatch):
    """An empty KVMHOOK_* variable falls back to the default rather than to ''."""
    monkeypatch.setenv("KVMHOOK_ROOT", "")
    monkeypatch.setenv("KVMHOOK_CUSTOM_DIR", "")
    monkeypatch.setenv("KVMHOOK_LOG_FILE", "")
    assert paths.custom_dir() == "/etc/libvirt/hooks/custom"
    assert paths.log_file() == "/var/log/libvirt/qemu-hook.log"
