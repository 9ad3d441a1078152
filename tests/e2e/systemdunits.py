"""The systemd units both packages ship (certificate renewal, metrics): read, expand and
verify them.

The source is packaging/systemd/; the deb installs it to /lib/systemd/system,
the rpm to /usr/lib/systemd/system.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "packaging" / "systemd"
SERVICE = "kvmhook-cert-renew.service"
TIMER = "kvmhook-cert-renew.timer"
UNITS = (SERVICE, TIMER)
SETTINGS = SOURCE / "kvmhook-cert-renew.default"
METRICS_SERVICE = "kvmhook-metrics.service"
METRICS_TIMER = "kvmhook-metrics.timer"
METRICS_UNITS = (METRICS_SERVICE, METRICS_TIMER)
# node_exporter's textfile directory (Debian's prometheus-node-exporter reads it).
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
# The alert rules, in the source tree and where both packages install them.
ALERT_RULES = REPO / "packaging" / "prometheus" / "kvmhook-alerts.yml"
INSTALLED_ALERT_RULES = "/usr/share/kvmhook/prometheus/kvmhook-alerts.yml"


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [every value, in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting before any section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def settings(text: str) -> dict[str, str]:
    """The assignments of an EnvironmentFile (shell-like, one per line)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            words = shlex.split(value)
            values[key] = " ".join(words)
    return values


def examples(text: str) -> dict[str, str]:
    """The commented-out example assignments of a settings file, as if uncommented."""
    lines = re.findall(r"^#(KVMHOOK_\w+=.*)$", text, re.MULTILINE)
    assert lines, "no example settings"
    return settings("\n".join(lines))


def exec_argv(service_text: str, overrides: dict[str, str] | None = None) -> list[str]:
    """ExecStart= as systemd runs it: Environment= defaults, then `overrides` (the
    EnvironmentFile), `${VAR}` as one word and `$VAR` split at whitespace."""
    service = parse(service_text)["Service"]
    env: dict[str, str] = {}
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value
    env.update(overrides or {})
    (command,) = service["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$\{(\w+)\}", word)
        split = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.append(env[whole.group(1)])
        elif split:
            argv += env[split.group(1)].split()
        else:
            assert "$" not in word, f"an expansion this reader does not handle: {word}"
            argv.append(word)
    return argv


def verify(*units: Path) -> str:
    """`systemd-analyze verify` of the unit files: everything it said (empty when clean).

    A unit it refuses exits non-zero; an unknown key or a bad value is only a
    warning on stderr, so any output at all is a finding. No man page lookup:
    the man pages have a test of their own."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze not found"
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        said = f"exit {result.returncode}: {said}"
    return said


def seconds(span: str) -> float:
    """A systemd time span (`4h`, `30min`, `1h 30min`, `90`) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def check_contract(service_text: str, timer_text: str) -> None:
    """The units do what issue 8 and docs/certificates.md promise: a daily, randomly delayed,
    persistent timer that is the only way in, and a oneshot `kvmhook cert renew
    --if-expiring-within auto` whose output goes to the journal."""
    timer = parse(timer_text)
    assert timer["Timer"]["OnCalendar"] == ["daily"]
    assert seconds(timer["Timer"]["RandomizedDelaySec"][-1]) >= 3600
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Timer"]["Unit"] == [SERVICE]
    assert timer["Install"] == {"WantedBy": ["timers.target"]}
    service = parse(service_text)
    assert "Install" not in service, "the service is started by the timer only, never enabled"
    assert service["Service"]["Type"] == ["oneshot"]
    argv = exec_argv(service_text)
    assert argv[:4] == ["/usr/bin/kvmhook", "cert", "renew", "--if-expiring-within"], argv
    assert argv[4] == "auto", "by default, the controller's alert period (else 15 days)"
    # stdout and stderr go to the journal (systemd's default), under one name.
    for output in ("StandardOutput", "StandardError"):
        assert service["Service"].get(output, ["journal"])[-1].startswith("journal")
    assert service["Service"]["SyslogIdentifier"] == ["kvmhook-cert-renew"]
    # Settings files of both distributions, each optional.
    assert service["Service"]["EnvironmentFile"] == [
        "-/etc/default/kvmhook-cert-renew",
        "-/etc/sysconfig/kvmhook-cert-renew",
    ]
    # The hardening leaves /etc writable: the certificates live in /etc/cloudstack
    # and /etc/pki.
    assert service["Service"].get("ProtectSystem", ["no"])[-1] in ("no", "true", "yes")
    assert not service["Service"].get("ReadOnlyPaths")


def check_metrics_contract(service_text: str, timer_text: str) -> None:
    """The metrics units do what issue 16 promises: a timer enabled on install that runs
    `kvmhook metrics --textfile DIR` every minute, the service making DIR first (the
    command does not), sandboxed to write only DIR and /var/lib/kvmhook, and both files
    saying how to turn it off."""
    off = f"systemctl disable --now {METRICS_TIMER}"
    assert off in service_text and off in timer_text, "how to turn it off"
    timer = parse(timer_text)["Timer"]
    assert seconds(timer["OnUnitActiveSec"][-1]) == 60, "every minute"
    # Started after boot (or on install, long after it), it fires at once.
    assert seconds(timer["OnBootSec"][-1]) <= 60
    assert seconds(timer["AccuracySec"][-1]) <= 5, "the default (1min) lets runs drift"
    assert timer["Unit"] == [METRICS_SERVICE]
    assert parse(timer_text)["Install"] == {"WantedBy": ["timers.target"]}
    unit = parse(service_text)
    assert "Install" not in unit, "the service is started by the timer only, never enabled"
    service = unit["Service"]
    assert service["Type"] == ["oneshot"]
    assert exec_argv(service_text) == ["/usr/bin/kvmhook", "metrics", "--textfile", TEXTFILE_DIR]
    # `kvmhook metrics --textfile DIR` never creates DIR: the service makes it, outside
    # the sandbox (+), which keeps /var read-only.
    (pre,) = service["ExecStartPre"]
    assert shlex.split(pre) == ["+/bin/mkdir", "-p", "-m", "0755", TEXTFILE_DIR], pre
    assert service["SyslogIdentifier"] == ["kvmhook-metrics"]
    assert seconds(service["TimeoutStartSec"][-1]) < 60, "a run ends before the next"
    # It only reads: the whole file system is read-only but the textfile directory and
    # its state directory, /var/lib/kvmhook (the hook log's read position).
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == [TEXTFILE_DIR]
    assert service["StateDirectory"] == ["kvmhook"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"], "libvirt's socket, no network"
    for output in ("StandardOutput", "StandardError"):
        assert service.get(output, ["journal"])[-1].startswith("journal")
