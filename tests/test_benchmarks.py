"""The benchmark stays runnable: a short run yields every figure docs/performance.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_hook_latency_benchmark_reports_every_figure():
    """A tiny run of benchmarks/hook_latency.py prints all its figures as positive numbers."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/hook_latency.py"),
            "--runs",
            "2",
            "--output-mib",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(result.stdout)
    assert set(figures["median_ms"]) == {
        "python -I -c pass",
        "hook, empty custom dir",
        "hook, 10 trivial scripts",
        "trivial script run directly",
    }
    assert all(value > 0 for value in figures["median_ms"].values())
    assert figures["startup_ratio"] > 0
    assert all(value > 0 for value in figures["peak_rss_mib"].values())


def test_hook_features_benchmark_reports_every_figure():
    """A tiny run of benchmarks/hook_features.py yields a pair for each feature, and the
    comparison with another commit of the hook."""
    script = str(REPO / "benchmarks/hook_features.py")
    result = subprocess.run(
        [sys.executable, script, "--runs", "1", "--against", "HEAD", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    figures = json.loads(result.stdout)["figures"]
    assert set(figures) == {
        "kvmhook.conf, other settings only (start)",
        "veto policy on (start)",
        "admission enforced (prepare)",
        "provision on, made bridge present (prepare)",
        "provision on, operator's bridge present (prepare)",
        "made bridge another guest uses (release)",
        "per-guest script (start)",
        "rewrite outbox (migrate vs start)",
        "XML rewritten (migrate)",
        "this tree vs HEAD, no kvmhook.conf, no script (start)",
        "this tree vs HEAD, no kvmhook.conf, one script (start)",
    }
    for figure in figures.values():
        assert figure["feature_ms"] > 0 and figure["baseline_ms"] > 0, figure


def test_bridge_making_benchmark_reports_every_figure():
    """A tiny run of benchmarks/bridge_making.py (root: a network namespace of its own) gives
    the hook's figures and pyroute2's, which the README's choice of `ip` rests on."""
    script = str(REPO / "benchmarks/bridge_making.py")
    result = subprocess.run(
        [sys.executable, script, "--runs", "1", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    figures = json.loads(result.stdout)
    assert figures["pyroute2"] is True, "python3-pyroute2 is a test dependency"
    assert set(figures["added_ms"]) == {
        "making, by the hook (ip)",
        "removing, by the hook (ip)",
        "importing pyroute2",
        "making, pyroute2 (import included)",
        "removing, pyroute2 (import included)",
    }
    assert all(value > 0 for value in figures["median_ms"].values())
