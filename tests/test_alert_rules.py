"""The Prometheus alert rules both packages ship (packaging/prometheus/kvmhook-alerts.yml),
checked and unit-tested by the real promtool (Debian package prometheus).

The cases are tests/data/prometheus/*.test.yml (`promtool test rules`); here every alert
must have a case where it fires and one where it does not, and a rule broken on purpose
must fail them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "packaging" / "prometheus" / "kvmhook-alerts.yml"
CASES = REPO / "tests" / "data" / "prometheus"
# Issue 16's alerts and their severities.
ALERTS = {
    "KvmhookCertificateExpiresSoon": "warning",
    "KvmhookCertificateExpiresVerySoon": "critical",
    "KvmhookCertificateRenewalFailing": "warning",
    "KvmhookHookScriptsTimingOut": "warning",
    "KvmhookMaintenanceError": "critical",
    "KvmhookInMaintenanceLong": "info",
}
# The series `kvmhook metrics` publishes that the rules may read.
METRICS = {
    "kvmhook_certificate_not_after_timestamp_seconds",
    "kvmhook_certificate_renewal_last_success_timestamp_seconds",
    "kvmhook_certificate_renewal_last_failure_timestamp_seconds",
    "kvmhook_hook_scripts_total",
    "kvmhook_maintenance_state",
    "kvmhook_maintenance_state_since_timestamp_seconds",
    "kvmhook_info",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return tool


def run(*argv: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def case_files(root: Path = CASES) -> list[Path]:
    files = sorted(root.glob("*.test.yml"))
    assert files, f"no *.test.yml in {root}"
    return files


def alert_blocks(text: str) -> dict[str, str]:
    """Each alert's rule text, from its `- alert:` line to the next rule's."""
    blocks = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def without_firing(text: str, alert: str) -> str:
    """The rules with `alert`'s expression (a block scalar's lines too) replaced by one
    that never returns anything."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == f"- alert: {alert}")
    expr = start + 1
    assert lines[expr].lstrip().startswith("expr:"), lines[expr]
    indent = len(lines[expr]) - len(lines[expr].lstrip())
    end = expr + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    return "".join([*lines[:expr], " " * indent + "expr: vector(1) == 0\n", *lines[end:]])


def test_the_rules_pass_promtool_check_rules(promtool):
    """promtool parses every rule, with its linter's findings fatal."""
    result = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests(promtool):
    """`promtool test rules` passes on every case file."""
    files = case_files()
    result = run(promtool, "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def test_the_rules_are_issue_16s_alerts_in_group_kvmhook_with_severity_and_texts():
    """One group, kvmhook; the six alerts with their severity, a summary and a description;
    no series but those `kvmhook metrics` publishes."""
    text = RULES.read_text()
    assert re.findall(r"^\s*- name: (\S+)$", text, re.MULTILINE) == ["kvmhook"]
    blocks = alert_blocks(text)
    assert sorted(blocks) == sorted(ALERTS)
    for alert, block in blocks.items():
        assert re.findall(r"^\s*severity: (\S+)$", block, re.MULTILINE) == [ALERTS[alert]]
        for annotation in ("summary", "description"):
            assert re.search(rf"^\s*{annotation}: ", block, re.MULTILINE), (alert, annotation)
    assert set(re.findall(r"\bkvmhook_\w+", text)) <= METRICS


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not():
    """In the case files each alert has an `exp_alerts: []` (silent) evaluation and one
    expecting alerts."""
    silent, fires = set(), set()
    for path in case_files():
        text = path.read_text()
        silent |= set(re.findall(r"alertname: (\w+)\n\s*exp_alerts: \[\]\n", text))
        fires |= set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels:", text))
    assert sorted(set(ALERTS) - silent) == [], "alerts without a silent case"
    assert sorted(set(ALERTS) - fires) == [], "alerts without a firing case"


def mutated(tmp_path: Path, rules_text: str) -> list[Path]:
    """The case files and `rules_text` in tmp_path, laid out as in the repository (the cases
    name the rules by a relative path)."""
    rules = tmp_path / RULES.relative_to(REPO)
    rules.parent.mkdir(parents=True)
    rules.write_text(rules_text)
    cases = tmp_path / CASES.relative_to(REPO)
    cases.mkdir(parents=True)
    for path in case_files():
        shutil.copy(path, cases / path.name)
    return case_files(cases)


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_the_cases_fail_when_an_alert_never_fires(promtool, tmp_path, alert):
    """With one alert's expression returning nothing, `promtool test rules` fails on that
    alert: the cases check real firings, not only silence."""
    text = without_firing(RULES.read_text(), alert)
    assert text != RULES.read_text()
    result = run(promtool, "test", "rules", *mutated(tmp_path, text))
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}," in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("time() < 15 * 86400", "time() < 21 * 86400", id="warning-at-20-days-left"),
        pytest.param("time() < 3 * 86400", "time() < 11 * 86400", id="critical-at-10-days-left"),
        pytest.param(
            "seconds\n          > kvmhook", "seconds\n          >= kvmhook", id="never-renewed"
        ),
        pytest.param("> 0) > 86400", "> 0) > 3600", id="in-maintenance-for-hours"),
        pytest.param(
            "unless kvmhook_hook_scripts_total",
            "and kvmhook_hook_scripts_total",
            id="old-timeout-counts",
        ),
        pytest.param(
            '{state=~"ErrorInPrepareForMaintenance|',
            '{state=~"PrepareForMaintenance|',
            id="prepare-for-maintenance",
        ),
    ],
)
def test_the_cases_fail_when_a_threshold_moves(promtool, tmp_path, old, new):
    """A rule that alerts too early or on the wrong state fails the cases: their silent
    evaluations sit just outside each threshold."""
    text = RULES.read_text()
    assert text.count(old) == 1, old
    result = run(promtool, "test", "rules", *mutated(tmp_path, text.replace(old, new)))
    assert result.returncode != 0, result.stdout
    assert re.search(r"FAILED:\n\s+alertname: Kvmhook", result.stdout + result.stderr), (
        result.stdout + result.stderr
    )
