"""CloudStack's rolling-maintenance stages on the host: finding, running, sequencing, the JSON.

Real processes and files: stage scripts under a sandbox KVMHOOK_ROOT that record
each call (order, arguments, environment, the maintenance state they saw), the real
state file, and the real drain against libvirt's test driver serving an empty host
(a node file without guests), which goes straight to Maintenance with nothing to
move. There is no systemd as PID 1 here: the transient-unit path is tested through
the command line it runs (kvmhook.host.rolling.systemd_command) and through a
stand-in systemd-run on PATH that runs the script as the unit would and answers
as systemd-run --wait does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sandbox import cli_runner

from kvmhook import hostname
from kvmhook.cli import main
from kvmhook.host import hoststate, rolling
from kvmhook.host import maintenance as host_maintenance

BIN = Path(sys.executable).parent
STAGES = ("PreFlight", "PreMaintenance", "Maintenance", "PostMaintenance")
HOOKS_DIR = "/etc/cloudstack/agent/hooks"  # as agent.properties names it, on the host
DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
# One recorded call: script file, KVMHOOK_STAGE, the maintenance state seen, MARKER, [args].
RECORDING = """#!/bin/sh
state=$(head -n 1 {state} 2>/dev/null || true)
args=$(IFS='|'; printf '%s' "$*")
printf '%s %s %s %s [%s]\\n' "$(basename "$0")" "$KVMHOOK_STAGE" "${{state:-none}}" \\
    "${{MARKER:-unset}}" "$args" >> {record}
echo "{stage} output"
{extra}
exit {code}
"""


@dataclass
class Site:
    """A sandbox host: its root, the hooks dir, the record the scripts append to, and the
    libvirt URI of an empty host."""

    root: Path
    hooks: Path
    record: Path
    uri: str

    @property
    def properties(self) -> Path:
        return self.root / "etc/cloudstack/agent/agent.properties"

    @property
    def state_file(self) -> Path:
        return self.root / "var/lib/kvmhook/maintenance"

    def script(
        self, stage: str, code: int = 0, suffix: str = ".sh", mode: int = 0o755, extra: str = ""
    ) -> Path:
        """A stage script that records its call, says `<stage> output` and exits `code`."""
        path = self.hooks / (stage + suffix)
        path.write_text(
            RECORDING.format(
                state=self.state_file, record=self.record, stage=stage, code=code, extra=extra
            )
        )
        os.chmod(path, mode)
        return path

    def all_scripts(self, **codes: int) -> None:
        for stage in STAGES:
            self.script(stage, codes.get(stage, 0))

    def calls(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def stages_called(self) -> list[str]:
        return [line.split()[1] for line in self.calls()]


@pytest.fixture
def site(tmp_path, monkeypatch) -> Site:
    root = tmp_path / "root"
    hooks = root / HOOKS_DIR.lstrip("/")
    hooks.mkdir(parents=True)
    for directory in [hooks, *hooks.parents]:
        if directory == tmp_path:
            break
        os.chmod(directory, 0o755)  # whatever the umask: a group-writable dir is refused
    (root / "etc/cloudstack/agent/agent.properties").write_text(
        f"# the agent's settings\nrolling.maintenance.hooks.dir={HOOKS_DIR}\n"
    )
    node = tmp_path / "empty-node.xml"
    node.write_text("<node>\n</node>\n")  # libvirt's test driver: a host with no guest
    monkeypatch.setenv("KVMHOOK_ROOT", str(root))
    monkeypatch.setenv("MARKER", "inherited")
    return Site(root, hooks, tmp_path / "record", f"test://{node}")


def invoke(*args: str):
    return cli_runner().invoke(main, list(args), catch_exceptions=False)


def roll(site: Site, *args: str):
    return invoke("maintenance", "rolling", "--connect", site.uri, *args)


def roll_json(site: Site, *args: str) -> tuple[int, dict]:
    result = roll(site, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- the sequence -------------------------------------------------------------------------


def test_the_four_stages_run_in_order_around_the_drain(site):
    """A real `kvmhook maintenance rolling`: each stage once, in CloudStack's order, with the
    payload's words as arguments (quotes group, nothing expanded) and the caller's
    environment plus KVMHOOK_STAGE; Maintenance runs in Maintenance, PostMaintenance after
    the cancel; the host ends Enabled."""
    site.all_scripts()
    result = subprocess.run(
        [
            *(str(BIN / "kvmhook"), "maintenance", "rolling", "--connect", site.uri),
            *("--payload", "a=1 'b c' $HOME"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert site.calls() == [
        "PreFlight.sh PreFlight none inherited [a=1|b c|$HOME]",
        "PreMaintenance.sh PreMaintenance none inherited [a=1|b c|$HOME]",
        "Maintenance.sh Maintenance Maintenance inherited [a=1|b c|$HOME]",
        "PostMaintenance.sh PostMaintenance Enabled inherited [a=1|b c|$HOME]",
    ]
    assert hoststate.read() == (hoststate.ENABLED, "")
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"PreFlight: exit 0 after \d+\.\d{3}s \(.*/hooks/PreFlight\.sh\)", lines[0])
    assert lines[1] == "    PreFlight output"
    assert "entering maintenance" in lines and "cancelling maintenance" in lines
    assert re.fullmatch(
        r"updated: .+ was in maintenance from \S+ to \S+; every stage succeeded", lines[-1]
    )


def test_json_has_every_stage_and_the_host_updated_with_the_maintenance_output(site):
    """--json: one object per stage, and this host as one entry of startRollingMaintenance's
    hostsupdated, its output the Maintenance stage's."""
    site.all_scripts()
    code, shown = roll_json(site)
    assert code == 0
    assert (shown["success"], shown["details"], shown["hostsskipped"]) == (True, "OK", [])
    (updated,) = shown["hostsupdated"]
    assert set(updated) == {"hostid", "hostname", "startdate", "enddate", "output"}
    assert updated["hostid"] is None  # standalone: no controller's id
    assert updated["hostname"] == hostname.fqdn()
    assert updated["output"] == "Maintenance output\n"
    assert DATE.fullmatch(updated["startdate"]) and DATE.fullmatch(updated["enddate"])
    assert [stage["name"] for stage in shown["stages"]] == list(STAGES)
    first = shown["stages"][0]
    assert first["script"] == str(site.hooks / "PreFlight.sh")
    assert (first["executor"], first["unit"], first["exitstatus"]) == ("direct", None, 0)
    assert (first["outcome"], first["output"], first["outputdropped"]) == (
        "success",
        "PreFlight output\n",
        0,
    )
    assert DATE.fullmatch(first["start"]) and DATE.fullmatch(first["end"])
    assert first["duration"] >= 0


def test_exit_70_from_premaintenance_skips_the_drain_and_maintenance(site):
    """PreMaintenance says no maintenance is needed: no drain (the state file is never
    written), no Maintenance, no PostMaintenance; the host is skipped with CloudStack's
    reason; success."""
    site.all_scripts(PreMaintenance=70)
    code, shown = roll_json(site)
    assert code == 0
    assert site.stages_called() == ["PreFlight", "PreMaintenance"]
    assert not site.state_file.exists()
    assert shown["hostsupdated"] == []
    assert shown["hostsskipped"] == [
        {
            "hostid": None,
            "hostname": hostname.fqdn(),
            "reason": "Pre-maintenance stage set to avoid maintenance",
        }
    ]
    assert [stage["outcome"] for stage in shown["stages"]] == [
        "success",
        "no-maintenance-needed",
    ]


def test_exit_70_from_preflight_still_runs_premaintenance_then_skips(site):
    """As CloudStack: PreFlight's 70 puts the host on the avoid list, PreMaintenance still
    runs, and the reason is PreFlight's."""
    site.all_scripts(PreFlight=70)
    result = roll(site)
    assert result.exit_code == 0, result.stderr
    assert site.stages_called() == ["PreFlight", "PreMaintenance"]
    assert not site.state_file.exists()
    assert result.stdout.splitlines()[-1] == (
        f"skipped: {hostname.fqdn()}: Pre-flight stage set to avoid maintenance"
    )


def test_a_failing_preflight_changes_nothing(site):
    """PreFlight exits 3: nothing else runs, the state file is untouched, exit 1 with one
    line naming the stage, its exit, its script and what it said."""
    site.all_scripts(PreFlight=3)
    hoststate.write(hoststate.ENABLED, "as before")
    before = (site.state_file.read_bytes(), site.state_file.stat().st_mtime_ns)
    result = roll(site)
    assert result.exit_code == 1
    assert site.stages_called() == ["PreFlight"]
    assert (site.state_file.read_bytes(), site.state_file.stat().st_mtime_ns) == before
    assert re.fullmatch(
        r"Error: PreFlight failed: exit 3 after \d+\.\d{3}s \(.*/PreFlight\.sh\): PreFlight"
        r" output; nothing was done",
        result.stderr.splitlines()[-1],
    )


def test_a_failing_maintenance_stage_cancels_maintenance(site):
    """The Maintenance stage fails: maintenance is cancelled (as CloudStack does), the host
    is Enabled, PostMaintenance does not run, exit 1; the host is skipped with the reason."""
    site.all_scripts(Maintenance=2)
    code, shown = roll_json(site)
    assert code == 1
    assert site.stages_called() == ["PreFlight", "PreMaintenance", "Maintenance"]
    assert hoststate.read() == (hoststate.ENABLED, "")
    assert shown["success"] is False
    assert shown["details"].endswith(
        "maintenance cancelled, the host is Enabled; PostMaintenance not run"
    )
    assert shown["hostsupdated"] == []
    (skipped,) = shown["hostsskipped"]
    assert skipped["reason"].startswith("Maintenance script failed: exit 2 after ")


def test_a_failing_postmaintenance_leaves_the_host_updated_and_enabled(site):
    """PostMaintenance fails after the cancel: the host was updated (hostsupdated) and is
    also skipped with the reason, as CloudStack's forced run reports it; exit 1."""
    site.all_scripts(PostMaintenance=1)
    code, shown = roll_json(site)
    assert code == 1
    assert hoststate.read()[0] == hoststate.ENABLED
    assert len(shown["hostsupdated"]) == 1
    assert shown["hostsskipped"][0]["reason"].startswith("Post-maintenance script failed: exit 1")
    assert shown["details"].endswith("; the host was updated and is Enabled")


def test_no_maintenance_script_skips_the_host_after_preflight(site):
    """As CloudStack checks before PreMaintenance: without a Maintenance script the host is
    skipped, nothing drained."""
    site.script("PreFlight")
    site.script("PreMaintenance")
    site.script("PostMaintenance")
    code, shown = roll_json(site)
    assert code == 0
    assert site.stages_called() == ["PreFlight"]
    assert not site.state_file.exists()
    assert shown["hostsskipped"][0]["reason"] == "There is no maintenance script on the host"


def test_a_stage_without_a_script_is_skipped_and_the_rest_go_on(site):
    """No PreFlight and no PreMaintenance script: both skipped, as the agent answers
    "Skipped stage"; the host is still updated."""
    site.script("Maintenance")
    site.script("PostMaintenance")
    code, shown = roll_json(site)
    assert code == 0
    assert site.stages_called() == ["Maintenance", "PostMaintenance"]
    skipped = shown["stages"][0]
    assert (skipped["name"], skipped["outcome"], skipped["script"], skipped["exitstatus"]) == (
        "PreFlight",
        "skipped",
        None,
        None,
    )
    assert len(shown["hostsupdated"]) == 1


def test_the_host_must_be_enabled(site):
    """From Maintenance (or any other state), nothing runs: exit 3, as CloudStack refuses a
    host that is not Enabled."""
    site.all_scripts()
    hoststate.write(hoststate.MAINTENANCE)
    result = roll(site)
    assert result.exit_code == 3
    assert site.calls() == []
    assert result.stderr.splitlines()[-1] == (
        "Error: the host is in Maintenance: a rolling maintenance starts only from Enabled;"
        " nothing was done"
    )


def test_guests_running_and_no_to_is_a_usage_error_before_any_stage(site):
    """The test driver's default host runs a guest: without --to, exit 2 before PreFlight."""
    site.all_scripts()
    result = invoke("maintenance", "rolling", "--connect", "test:///default")
    assert result.exit_code == 2
    assert site.calls() == []
    assert "guests are running here (test): name the hosts to move them to with --to" in (
        result.stderr
    )


def test_a_second_rolling_is_refused_while_one_holds_the_lock(site):
    """An enter (or rolling) under way: exit 3, nothing run."""
    site.all_scripts()
    with host_maintenance.entering():
        result = roll(site)
    assert result.exit_code == 3
    assert site.calls() == []


def test_a_bad_payload_is_a_usage_error(site):
    site.all_scripts()
    result = roll(site, "--payload", "a 'b")
    assert result.exit_code == 2
    assert "--payload" in result.stderr
    assert "cannot split it into words: No closing quotation" in result.stderr
    assert site.calls() == []


# --- timeouts -----------------------------------------------------------------------------

# Starts a child that outlives the script unless its whole process group is killed.
LINGERING = "sleep 300 &\necho $! > {pidfile}\nsleep 300"


@pytest.mark.parametrize("command", ["stage", "rolling"])
def test_a_stage_timeout_kills_the_stage_process_group(site, tmp_path, command):
    """A stage past its timeout: the script and its background child (same process group)
    are killed; exit 4, naming the timeout; under `rolling`, nothing else ran."""
    pidfile = tmp_path / "child.pid"
    site.all_scripts()
    site.script("PreFlight", extra=LINGERING.format(pidfile=pidfile))
    if command == "stage":
        result = invoke("maintenance", "stage", "PreFlight", "--timeout", "1")
    else:
        result = roll(site, "--stage-timeout", "1")
    assert result.exit_code == 4, result.stderr
    assert re.search(
        r"Error: PreFlight failed: timed out after 1\.\d{3}s: killed \(.*/PreFlight\.sh\)",
        result.stderr,
    )
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
    assert site.stages_called() == ["PreFlight"]
    assert not site.state_file.exists()


# --- the hooks dir and the scripts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("properties", "why"),
    [
        ("keystore.passphrase=x\n", "is not set"),
        (None, "(no such file) is not set"),
        ("rolling.maintenance.hooks.dir=\n", "is not set"),
        ("rolling.maintenance.hooks.dir=hooks\n", "is hooks, not an absolute path"),
        ("rolling.maintenance.hooks.dir=/nowhere\n", "is /nowhere: no such directory"),
    ],
)
@pytest.mark.parametrize("command", ["rolling", "stage"])
def test_without_a_hooks_dir_one_line_says_so_and_nothing_runs(site, properties, why, command):
    site.all_scripts()
    if properties is None:
        site.properties.unlink()
    else:
        site.properties.write_text(properties)
    result = roll(site) if command == "rolling" else invoke("maintenance", "stage", "PreFlight")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: no stage runs: rolling.maintenance.hooks.dir in {site.properties} {why}"
    )
    assert len(result.stderr.splitlines()) == 1
    assert site.calls() == []
    assert not site.state_file.exists()


def test_the_script_is_found_as_cloudstacks_agent_finds_it(site):
    """`<Stage>`, then `.sh`, then `.py`: the first that is a file (a directory is not)."""
    hooks = rolling.Hooks(str(site.hooks), in_units=False)
    assert hooks.script("PreFlight") is None
    (site.hooks / "PreFlight").mkdir()
    site.script("PreFlight", suffix=".py")
    assert hooks.script("PreFlight") == str(site.hooks / "PreFlight.py")
    site.script("PreFlight", suffix=".sh")
    assert hooks.script("PreFlight") == str(site.hooks / "PreFlight.sh")
    (site.hooks / "PreFlight").rmdir()
    site.script("PreFlight", suffix="")
    assert hooks.script("PreFlight") == str(site.hooks / "PreFlight")


def test_a_py_stage_runs_with_its_interpreter(site):
    """A Python stage script (its #! line names the interpreter) runs and is recorded."""
    path = site.hooks / "Maintenance.py"
    path.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"with open({str(site.record)!r}, 'a') as record:\n"
        "    record.write(f\"{os.path.basename(sys.argv[0])} {os.environ['KVMHOOK_STAGE']}"
        ' {sys.argv[1:]}\\n")\n'
        "print('upgraded 3 packages')\n"
    )
    os.chmod(path, 0o755)
    result = invoke("maintenance", "stage", "Maintenance", "--payload", "x y", "--json")
    assert result.exit_code == 0, result.stderr
    assert site.calls() == ["Maintenance.py Maintenance ['x', 'y']"]
    assert json.loads(result.stdout)["output"] == "upgraded 3 packages\n"


@pytest.mark.parametrize(
    ("mode", "dir_mode", "refused", "why"),
    [
        (0o644, 0o755, "PostMaintenance", r"/PostMaintenance\.sh is not executable \(mode 0644\)"),
        (
            0o777,
            0o755,
            "PostMaintenance",
            r"stage script .*/PostMaintenance\.sh is writable by group or others \(mode 0777\)",
        ),
        (
            0o755,
            0o777,
            "PreFlight",
            r"directory .*/hooks is writable by group or others \(mode 0777\)",
        ),
    ],
    ids=["not-executable", "world-writable", "world-writable-dir"],
)
def test_a_non_executable_or_unsafe_script_is_refused(site, mode, dir_mode, refused, why):
    """Every script is checked before anything runs: a refused PostMaintenance stops the
    whole run before PreFlight (exit 1, one line why); `stage` refuses it the same way. A
    hooks dir others may write refuses every script."""
    site.all_scripts()
    site.script("PostMaintenance", mode=mode)
    os.chmod(site.hooks, dir_mode)
    result = roll(site)
    assert result.exit_code == 1
    assert re.fullmatch(rf"Error: {refused} refused: .*{why}; nothing was done\n", result.stderr)
    assert site.calls() == []
    result = invoke("maintenance", "stage", refused)
    assert result.exit_code == 1
    assert re.search(rf"Error: {refused} failed: refused: .*{why}", result.stderr)
    assert site.calls() == []


# --- kvmhook maintenance stage ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code", "outcome"),
    [(0, 0, "success"), (70, 3, "no-maintenance-needed"), (5, 1, "failed")],
)
def test_stage_exits_with_the_outcomes_documented_code(site, code, exit_code, outcome):
    """One stage, nothing else: 0 for success, 3 for "no maintenance needed" (70), 1 for a
    failure; its JSON is the stage's object."""
    site.script("PreFlight", code=code)
    result = invoke("maintenance", "stage", "PreFlight", "--payload", "k=v", "--json")
    assert result.exit_code == exit_code
    shown = json.loads(result.stdout)
    assert (shown["name"], shown["exitstatus"], shown["outcome"]) == ("PreFlight", code, outcome)
    assert shown["output"] == "PreFlight output\n"
    assert site.calls() == ["PreFlight.sh PreFlight none inherited [k=v]"]
    assert not site.state_file.exists()


def test_stage_without_a_script_is_skipped(site):
    result = invoke("maintenance", "stage", "PreMaintenance")
    assert result.exit_code == 0
    assert result.stdout == (
        "PreMaintenance: no script (PreMaintenance, PreMaintenance.sh or PreMaintenance.py):"
        " skipped\n"
    )


def test_stage_text_shows_the_result_then_the_output(site):
    site.script("Maintenance", code=0)
    result = invoke("maintenance", "stage", "Maintenance")
    assert result.exit_code == 0
    first, second = result.stdout.splitlines()
    assert re.fullmatch(r"Maintenance: exit 0 after \S+s \(.*/Maintenance\.sh\)", first)
    assert second == "    Maintenance output"


def test_stage_names_are_cloudstacks(site):
    assert invoke("maintenance", "stage", "preflight").exit_code == 2


def test_output_past_the_cap_is_counted_not_kept(site, monkeypatch):
    """KVMHOOK_MAX_OUTPUT caps a stage's output as it caps a custom script's."""
    monkeypatch.setenv("KVMHOOK_MAX_OUTPUT", "10")
    site.script("PreFlight", extra="head -c 100 /dev/zero | tr '\\0' x")
    shown = json.loads(invoke("maintenance", "stage", "PreFlight", "--json").stdout)
    assert shown["output"] == "PreFlight "
    assert shown["outputdropped"] == len("PreFlight output\n") + 100 - 10


# --- with a controller --------------------------------------------------------------------


class FakeController:
    """The controller's maintenance calls; resource_state answers `states` in turn."""

    def __init__(self, states):
        self.states = list(states)
        self.calls: list[str] = []

    def host(self) -> dict:
        self.calls.append("host")
        return {"id": "7e1c-host-uuid", "name": "kvm1.example.org"}

    def resource_state(self) -> str:
        self.calls.append("resource_state")
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def prepare_maintenance(self, timeout: float = 600) -> dict:
        self.calls.append("prepare_maintenance")
        return {}

    def cancel_maintenance(self, timeout: float = 600) -> dict:
        self.calls.append("cancel_maintenance")
        return {}


def test_with_a_controller_it_drains_and_cancels_and_names_the_host(site, monkeypatch):
    """The controller's drain (enter --wait) and cancel; the host's id and name are the
    controller's; the Maintenance stage sees the state the controller reports."""
    controller = FakeController(["Enabled", "PrepareForMaintenance", "Maintenance", "Enabled"])
    monkeypatch.setattr(host_maintenance, "load_controller", lambda: controller)
    monkeypatch.setattr(host_maintenance, "POLL_SECONDS", 0.01)
    site.all_scripts()
    code, shown = roll_json(site)
    assert code == 0, shown
    assert [call for call in controller.calls if "maintenance" in call] == [
        "prepare_maintenance",
        "cancel_maintenance",
    ]
    assert site.calls()[2].startswith("Maintenance.sh Maintenance Maintenance ")
    (updated,) = shown["hostsupdated"]
    assert (updated["hostid"], updated["hostname"]) == ("7e1c-host-uuid", "kvm1.example.org")


def test_with_a_controller_a_failed_drain_stops_before_maintenance(site, monkeypatch):
    controller = FakeController(
        ["Enabled", "PrepareForMaintenance", "ErrorInPrepareForMaintenance"]
    )
    monkeypatch.setattr(host_maintenance, "load_controller", lambda: controller)
    monkeypatch.setattr(host_maintenance, "POLL_SECONDS", 0.01)
    site.all_scripts()
    code, shown = roll_json(site)
    assert code == 1
    assert site.stages_called() == ["PreFlight", "PreMaintenance"]
    assert shown["details"].startswith(
        "the drain to Maintenance failed, Maintenance and PostMaintenance not run: the"
        " controller reports ErrorInPrepareForMaintenance"
    )
    assert shown["hostsskipped"][0]["reason"].startswith("Could not enter maintenance: ")


def test_with_a_controller_to_is_a_usage_error(site, monkeypatch):
    monkeypatch.setattr(host_maintenance, "load_controller", lambda: FakeController(["Enabled"]))
    site.all_scripts()
    assert roll(site, "--to", "kvm2").exit_code == 2
    assert site.calls() == []


# --- in a transient systemd unit ----------------------------------------------------------


def test_the_systemd_run_command_line():
    """What runs under systemd: a transient unit per stage, waited for; the stage timeout is
    the unit's RuntimeMaxSec, the grace its TimeoutStopSec, its whole control group
    killed; output to a file; `$` doubled against systemd's expansion."""
    argv = rolling.systemd_command(
        "PreFlight",
        "/etc/cloudstack/agent/hooks/PreFlight.sh",
        ["a=$HOME", "b c"],
        1800,
        5.0,
        "/run/kvmhook/rolling/PreFlight.42.out",
    )
    assert argv == [
        "systemd-run",
        "--unit=kvmhook-rolling-PreFlight.service",
        "--description=kvmhook rolling maintenance: PreFlight",
        "--service-type=exec",
        "--wait",
        "--collect",
        "--no-ask-password",
        "--property=RuntimeMaxSec=1800s",
        "--property=TimeoutStopSec=5s",
        "--property=KillMode=control-group",
        "--property=StandardOutput=file:/run/kvmhook/rolling/PreFlight.42.out",
        "--property=StandardError=inherit",
        "--setenv=KVMHOOK_STAGE=PreFlight",
        "--",
        "/etc/cloudstack/agent/hooks/PreFlight.sh",
        "a=$$HOME",
        "b c",
    ]
    assert rolling.systemd_command("PreFlight", "/s", [], 0.5, 0, "/o")[7:9] == [
        "--property=RuntimeMaxSec=0.5s",
        "--property=TimeoutStopSec=0.001s",
    ]


# Stands in for systemd-run --wait: records its command line, runs the command with the
# unit's environment, output file and RuntimeMaxSec, and answers as systemd-run does.
FAKE_SYSTEMD_RUN = """#!{python}
import json, os, signal, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
options, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
command = command[:1] + [arg.replace("$$", "$") for arg in command[1:]]
unit = next(o.split("=", 1)[1] for o in options if o.startswith("--unit="))
props = dict(o.split("=", 1)[1].split("=", 1) for o in options if o.startswith("--property="))
env = {{"PATH": "/usr/bin:/bin"}}
env.update(o.split("=", 1)[1].split("=", 1) for o in options if o.startswith("--setenv="))
if os.environ.get("FAKE_EXISTS"):
    sys.stderr.write(f"Failed to start transient service unit: Unit {{unit}} already exists.\\n")
    sys.exit(1)
sys.stderr.write(f"Running as unit: {{unit}}; invocation ID: 0123\\n")
output = props["StandardOutput"].split(":", 1)[1]
assert os.stat(output).st_size == 0 and os.stat(output).st_mode & 0o777 == 0o600
with open(output, "r+b") as out:
    child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        code = child.wait(float(props["RuntimeMaxSec"].rstrip("s")))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
        sys.stderr.write("Finished with result: timeout\\n")
        sys.exit(1)
result = "success" if code == 0 else "exit-code" if code > 0 else "signal"
sys.stderr.write(f"Finished with result: {{result}}\\n")
sys.exit(code if code >= 0 else 255)
"""


@pytest.fixture
def systemd(site, tmp_path, monkeypatch) -> Path:
    """systemd "runs" here: the stand-in systemd-run first on PATH; returns its log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "systemd-run"
    fake.write_text(FAKE_SYSTEMD_RUN.format(python=sys.executable))
    os.chmod(fake, 0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "systemd-run.log"))
    monkeypatch.setattr(rolling, "systemd_runs", lambda: True)
    return tmp_path / "systemd-run.log"


def test_under_systemd_a_stage_runs_in_its_transient_unit(site, systemd):
    """The stage goes through systemd-run: the unit's name, timeout and environment (systemd's,
    plus KVMHOOK_STAGE: MARKER is not inherited), the payload unexpanded, the exit status
    propagated (70: exit 3), the output read back from the unit's file, which is removed."""
    site.script("PreMaintenance", code=70)
    result = invoke(
        "maintenance",
        "stage",
        "PreMaintenance",
        "--payload",
        "x=$HOME",
        "--timeout",
        "99",
        "--json",
    )
    assert result.exit_code == 3, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["executor"], shown["unit"]) == (
        "systemd",
        "kvmhook-rolling-PreMaintenance.service",
    )
    assert (shown["exitstatus"], shown["output"]) == (70, "PreMaintenance output\n")
    (argv,) = (json.loads(line) for line in systemd.read_text().splitlines())
    assert argv[0] == "--unit=kvmhook-rolling-PreMaintenance.service"
    assert "--property=RuntimeMaxSec=99s" in argv
    assert argv[-2:] == [str(site.hooks / "PreMaintenance.sh"), "x=$$HOME"]
    assert site.calls() == ["PreMaintenance.sh PreMaintenance none unset [x=$HOME]"]
    assert os.listdir(site.root / "run/kvmhook/rolling") == []


def test_under_systemd_a_whole_rolling_runs_each_stage_in_a_unit(site, systemd):
    site.all_scripts()
    code, shown = roll_json(site)
    assert code == 0
    assert [stage["unit"] for stage in shown["stages"]] == [
        f"kvmhook-rolling-{stage}.service" for stage in STAGES
    ]
    assert shown["hostsupdated"][0]["output"] == "Maintenance output\n"
    assert site.stages_called() == list(STAGES)


def test_under_systemd_the_units_timeout_is_the_stages(site, systemd):
    """RuntimeMaxSec reached (systemd-run: "Finished with result: timeout"): timed out, exit 4."""
    site.script("PreFlight", extra="sleep 30")
    result = invoke("maintenance", "stage", "PreFlight", "--timeout", "1")
    assert result.exit_code == 4
    assert "Error: PreFlight failed: timed out after" in result.stderr


def test_under_systemd_a_unit_that_cannot_start_is_a_failure(site, systemd, monkeypatch):
    """The same stage's unit still running from an interrupted run: systemd refuses the
    name, the stage fails with systemd-run's words, exit 1."""
    monkeypatch.setenv("FAKE_EXISTS", "1")
    site.script("PreFlight")
    result = invoke("maintenance", "stage", "PreFlight")
    assert result.exit_code == 1
    assert (
        "systemd-run could not start kvmhook-rolling-PreFlight.service: Failed to start"
        " transient service unit: Unit kvmhook-rolling-PreFlight.service already exists."
    ) in result.stderr
    assert site.calls() == []


@pytest.mark.parametrize(
    ("setting", "in_units"),
    [
        ("", True),
        ("rolling.maintenance.service.executor.disabled=true\n", False),
        ("rolling.maintenance.service.executor.disabled=TRUE\n", False),
        ("rolling.maintenance.service.executor.disabled=false\n", True),
        ("rolling.maintenance.service.executor.disabled=yes\n", True),  # Boolean.parseBoolean
    ],
)
def test_the_executor_setting_chooses_units_or_direct(site, systemd, setting, in_units):
    with site.properties.open("a") as properties:
        properties.write(setting)
    assert rolling.load_hooks(print).in_units is in_units


def test_no_units_without_systemd_or_under_another_root(site):
    """Here (no systemd as PID 1, and KVMHOOK_ROOT set) the stages run directly."""
    assert rolling.systemd_runs() is False
    assert rolling.load_hooks(print).in_units is False
