"""The benchmark stays runnable: a short run yields every figure the README quotes."""

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
