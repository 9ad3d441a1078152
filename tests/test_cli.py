"""`kvmhook hooks list` and `kvmhook hooks run`, in-process (CliRunner) and as the real command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sandbox import field

from kvmhook.cli import main

XML = b"<domain><name>vm1</name>\x00\xff binary \xc3\xa9</domain>\n"


def kvmhook_command() -> str:
    """The installed `kvmhook` console script next to this interpreter."""
    found = shutil.which("kvmhook", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"kvmhook console script not installed next to {sys.executable}")
    return found


def invoke(host, *args: str, **env: str):
    """Run `kvmhook hooks ARGS` in-process with the sandbox's environment."""
    environment = {"KVMHOOK_ROOT": str(host.root), "KVMHOOK_CUSTOM_DIR": None}
    environment.update({"KVMHOOK_LOG_FILE": None, "KVMHOOK_TIMEOUT": None})
    environment.update(env)
    return CliRunner().invoke(main, ["hooks", *args], env=environment, catch_exceptions=False)


def capture(host, name: str, exit_code: int = 0, directory: Path | None = None):
    """A script that saves its arguments and stdin under `<root>/out/<name>.*`."""
    out = host.root / "out"
    out.mkdir(exist_ok=True)
    return host.script(
        name,
        f'printf "%s\\n" "$@" > "{out}/{name}.args"\n'
        f'cat > "{out}/{name}.stdin"\n'
        f"exit {exit_code}\n",
        directory=directory,
    )


def captured(host, name: str) -> tuple[list[str], bytes]:
    out = host.root / "out"
    return (out / f"{name}.args").read_text().splitlines(), (out / f"{name}.stdin").read_bytes()


# --- hooks list ----------------------------------------------------------------------


def test_list_shows_scripts_in_order_and_ignored_files_with_reasons(host):
    """`hooks list start` lists the run order, then every ignored file with its reason."""
    for name in ("start_x", "all_a", "all__x", "all_B", "stopped_x", "foo", "all_a~"):
        host.script(name, "true\n")
    host.script("all_noexec", "true\n", mode=0o644)
    host.script("all_unsafe", "true\n", mode=0o757)
    result = invoke(host, "list", "start")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    runs = [line for line in lines if line.startswith("run ")]
    assert runs == [
        f"run      {host.custom / name}" for name in ("all_B", "all__x", "all_a", "start_x")
    ]
    ignored = {line for line in lines if line.startswith("ignored ")}
    assert f"ignored  {host.custom / 'stopped_x'}: runs for stopped only" in ignored
    assert f"ignored  {host.custom / 'all_a~'}: editor or package-manager leftover" in ignored
    assert f"ignored  {host.custom / 'all_noexec'}: not executable (mode 0644)" in ignored
    assert any(line.startswith(f"ignored  {host.custom / 'foo'}: name is not") for line in ignored)
    assert any(
        line.startswith(f"ignored  {host.custom / 'all_unsafe'}: refused: ")
        and "writable by group or others (mode 0757)" in line
        for line in ignored
    )
    assert len(ignored) == 5


def test_list_invalid_operation_exits_2_with_clear_error(host):
    """An unknown operation is a usage error (exit 2) naming the bad value and the choices."""
    result = invoke(host, "list", "bogus")
    assert result.exit_code == 2
    assert "Invalid value for 'OPERATION'" in result.output
    assert "bogus" in result.output and "prepare" in result.output and "attach" in result.output


def test_list_missing_custom_dir_says_nothing_runs(host):
    """With no custom dir, list says nothing runs, exits 0 and does not create the dir."""
    host.custom.rmdir()
    result = invoke(host, "list", "start")
    assert result.exit_code == 0
    assert result.output.startswith("nothing runs: ")
    assert str(host.custom) in result.output
    assert not host.custom.exists()


def test_list_empty_custom_dir_says_no_scripts(host):
    """With no qualifying script, list says none runs for the operation."""
    host.script("stopped_x", "true\n")
    result = invoke(host, "list", "start")
    assert result.exit_code == 0
    assert f"no scripts run for start in {host.custom}" in result.output


def test_list_honours_custom_dir_override(host, tmp_path):
    """KVMHOOK_CUSTOM_DIR, not the root's default dir, is listed."""
    other = tmp_path / "scripts"
    other.mkdir()
    os.chmod(other, 0o755)
    host.script("all_default", "true\n")
    host.script("all_other", "true\n", directory=other)
    result = invoke(host, "list", "start", KVMHOOK_CUSTOM_DIR=str(other))
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        f"run      {other / 'all_other'}",
        "timeout: 600s for each script (default)",
        f"on failure: ignore for start (default, no {host.root}/etc/kvmhook/kvmhook.conf)",
    ]


def test_list_honours_kvmhook_root(host, tmp_path):
    """KVMHOOK_ROOT selects which custom dir is listed."""
    elsewhere = tmp_path / "other-root"
    custom = elsewhere / "etc/libvirt/hooks/custom"
    custom.mkdir(parents=True)
    os.chmod(custom, 0o755)
    host.script("all_here", "true\n")
    host.script("all_there", "true\n", directory=custom)
    result = invoke(host, "list", "start", KVMHOOK_ROOT=str(elsewhere))
    assert result.output.splitlines() == [
        f"run      {custom / 'all_there'}",
        "timeout: 600s for each script (default)",
        f"on failure: ignore for start (default, no {elsewhere}/etc/kvmhook/kvmhook.conf)",
    ]


# --- hooks run ----------------------------------------------------------------------


def test_run_passes_xml_and_args_and_logs(host, tmp_path):
    """`hooks run vm1 start --xml F` gives each script F's bytes and `vm1 start - -`, and logs."""
    xml = tmp_path / "vm1.xml"
    xml.write_bytes(XML)
    capture(host, "all_a")
    capture(host, "start_b")
    result = invoke(host, "run", "vm1", "start", "--xml", str(xml))
    assert result.exit_code == 0, result.output
    for name in ("all_a", "start_b"):
        assert captured(host, name) == (["vm1", "start", "-", "-"], XML)
    records = host.records()
    assert [field(r, "script") for r in records] == ["all_a"] * 2 + ["start_b"] * 2
    assert all(field(r, "domain") == "vm1" and field(r, "subop") == "-" for r in records)
    assert " end: exit 0 after " in records[1] and " end: exit 0 after " in records[3]
    assert "script=all_a start: " in result.output  # records echoed on stderr too


def test_run_passes_subop_and_extra(host):
    """SUBOP and EXTRA reach the scripts; without --xml their stdin is empty."""
    capture(host, "all_a")
    result = invoke(host, "run", "vm1", "migrate", "begin", "dest-host")
    assert result.exit_code == 0, result.output
    assert captured(host, "all_a") == (["vm1", "migrate", "begin", "dest-host"], b"")


def test_run_exits_1_naming_failed_scripts(host):
    """A failing script makes `hooks run` exit 1 naming it; the other scripts still run."""
    capture(host, "all_a", exit_code=3)
    capture(host, "all_b")
    capture(host, "all_c", exit_code=1)
    result = invoke(host, "run", "vm1", "start")
    assert result.exit_code == 1
    assert "2 of 3 scripts failed: all_a, all_c" in result.output
    for name in ("all_a", "all_b", "all_c"):
        assert captured(host, name)[0] == ["vm1", "start", "-", "-"]


def test_run_exits_1_when_a_script_cannot_start(host):
    """A script that cannot be executed counts as failed."""
    host.script("all_bad", "#!/nonexistent/interpreter\n")
    capture(host, "all_ok")
    result = invoke(host, "run", "vm1", "start")
    assert result.exit_code == 1
    assert "1 of 2 scripts failed: all_bad" in result.output


def test_run_with_no_scripts_exits_0(host):
    """With nothing to run (even no custom dir), `hooks run` exits 0."""
    host.custom.rmdir()
    result = invoke(host, "run", "vm1", "start")
    assert result.exit_code == 0
    assert "no scripts run" in result.output


def test_run_invalid_operation_exits_2(host):
    """`hooks run` rejects an unknown operation as a usage error, running nothing."""
    capture(host, "all_a")
    result = invoke(host, "run", "vm1", "bogus")
    assert result.exit_code == 2
    assert "Invalid value for 'OPERATION'" in result.output
    assert not (host.root / "out" / "all_a.args").exists()


def test_run_honours_custom_dir_and_log_file_overrides(host, tmp_path):
    """KVMHOOK_CUSTOM_DIR and KVMHOOK_LOG_FILE pick the scripts and the log `hooks run` uses."""
    other = tmp_path / "scripts"
    other.mkdir()
    os.chmod(other, 0o755)
    capture(host, "all_default")
    capture(host, "all_other", directory=other)
    log = tmp_path / "elsewhere" / "hook.log"
    result = invoke(
        host, "run", "vm1", "start", KVMHOOK_CUSTOM_DIR=str(other), KVMHOOK_LOG_FILE=str(log)
    )
    assert result.exit_code == 0, result.output
    assert (host.root / "out" / "all_other.args").exists()
    assert not (host.root / "out" / "all_default.args").exists()
    assert not host.log.exists()
    assert "script=all_other end: exit 0" in log.read_text()


# --- the timeout in force: the installed launcher's, then KVMHOOK_TIMEOUT -------------


def test_run_stops_a_script_at_the_installed_launchers_timeout(host):
    """With `timeoutSeconds = 1` in the installed launcher, `hooks run` stops a `sleep 30`
    script after about 1 s, as the hook would, and exits 1 naming it."""
    host.launcher("1")
    host.script("all_slow", "sleep 30\n")
    began = time.monotonic()
    result = invoke(host, "run", "vm1", "start", KVMHOOK_TERM_GRACE="0.2")
    elapsed = time.monotonic() - began
    assert result.exit_code == 1
    assert "1 of 1 scripts failed: all_slow" in result.output
    assert 0.9 < elapsed < 10
    records = host.records()
    assert records[0].endswith("(timeout 1s)")
    assert "end: timed out after 1s, process group stopped;" in records[-1]


def test_run_timeout_variable_overrides_the_launcher(host):
    """KVMHOOK_TIMEOUT overrides the launcher's timeoutSeconds for `hooks run`, as for the hook."""
    host.launcher("1")
    host.script("all_x", "true\n")
    result = invoke(host, "run", "vm1", "start", KVMHOOK_TIMEOUT="42")
    assert result.exit_code == 0, result.output
    assert host.records()[0].endswith("(timeout 42s)")


def test_list_shows_the_timeout_in_force_and_where_it_comes_from(host):
    """`hooks list` shows the launcher's timeoutSeconds, or KVMHOOK_TIMEOUT over it."""
    launcher = host.launcher("10 * 6")
    host.script("all_x", "true\n")
    lines = invoke(host, "list", "start").output.splitlines()
    assert f"timeout: 60s for each script (timeoutSeconds in {launcher})" in lines
    lines = invoke(host, "list", "start", KVMHOOK_TIMEOUT="2.5").output.splitlines()
    assert "timeout: 2.5s for each script (KVMHOOK_TIMEOUT)" in lines


def test_a_launcher_timeout_that_is_not_a_number_warns_and_600_applies(host):
    """A timeoutSeconds that is not a number or a product of numbers is never evaluated: list
    and run warn and use 600 s."""
    launcher = host.launcher("__import__('os').getpid()")
    host.script("all_x", "true\n")
    listing = invoke(host, "list", "start")
    assert listing.exit_code == 0
    assert "timeout: 600s for each script (default)" in listing.output.splitlines()
    assert f"warning: {launcher}: timeoutSeconds = " in listing.output
    assert "is not a number or a product of numbers; using 600" in listing.output
    result = invoke(host, "run", "vm1", "start")
    assert result.exit_code == 0, result.output
    records = host.records()
    assert "config: " in records[0] and "is not a number or a product" in records[0]
    assert records[1].endswith("(timeout 600s)")


def test_a_launcher_that_is_a_fifo_warns_and_never_hangs(host):
    """A FIFO in the launcher's place is refused without waiting for a writer: 600 s applies."""
    launcher = host.root / "etc/libvirt/hooks/qemu"
    os.mkfifo(launcher)
    result = invoke(host, "list", "start")
    assert result.exit_code == 0
    assert f"warning: cannot read {launcher}: not a regular file; using 600" in result.output
    assert "timeout: 600s for each script (default)" in result.output.splitlines()


# --- the real console script -----------------------------------------------------------


def test_real_command_runs_chain_with_xml_from_stdin(host):
    """The installed `kvmhook hooks run ... --xml -` feeds its stdin to every script."""
    capture(host, "all_a")
    capture(host, "prepare_b")
    result = subprocess.run(
        [kvmhook_command(), "hooks", "run", "vm1", "prepare", "begin", "--xml", "-"],
        input=XML,
        capture_output=True,
        env=host.env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in ("all_a", "prepare_b"):
        assert captured(host, name) == (["vm1", "prepare", "begin", "-"], XML)
    assert [field(r, "script") for r in host.records()] == ["all_a"] * 2 + ["prepare_b"] * 2
    assert b"script=prepare_b end: exit 0" in result.stderr


def test_real_command_failure_exit_1_and_list(host, tmp_path):
    """The installed command exits 1 naming a failed script, and lists with overrides."""
    other = tmp_path / "scripts"
    other.mkdir()
    os.chmod(other, 0o755)
    host.script("all_fail", "exit 7\n", directory=other)
    env = host.env(KVMHOOK_CUSTOM_DIR=str(other), KVMHOOK_LOG_FILE=str(tmp_path / "h.log"))
    result = subprocess.run(
        [kvmhook_command(), "hooks", "run", "vm1", "stopped"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert b"1 of 1 scripts failed: all_fail" in result.stderr
    assert "script=all_fail end: exit 7" in (tmp_path / "h.log").read_text()
    listing = subprocess.run(
        [kvmhook_command(), "hooks", "list", "stopped"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0
    assert listing.stdout.decode().splitlines() == [
        f"run      {other / 'all_fail'}",
        "timeout: 600s for each script (default)",
        "on failure: ignore for stopped (stopped can never abort)",
    ]


# --- hooks list: the installed hook is not kvmhook's launcher ----------------------------

NOT_LAUNCHER = "is not kvmhook's launcher"


def test_list_warns_when_cloudstacks_hook_replaced_the_launcher(host):
    """A hook copied over the launcher (cloudstack-agent's postinst does it) is named in one
    warning, read and never run; the listing goes on."""
    hook = host.root / "etc/libvirt/hooks/qemu"
    ran = host.root / "ran"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n# def handleMigrateBegin(\n")
    os.chmod(hook, 0o755)
    host.script("all_x", "true\n")
    result = invoke(host, "list", "start")
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if NOT_LAUNCHER in line]
    assert warnings == [
        f"warning: {hook} {NOT_LAUNCHER}: it is another program (CloudStack's hook, copied by"
        " cloudstack-agent?); libvirt runs it, not kvmhook. Reinstalling kvmhook puts the"
        " launcher back"
    ]
    assert f"run      {host.custom / 'all_x'}" in result.output.splitlines()
    assert not ran.exists()


def test_list_says_nothing_of_the_launcher_when_it_is_kvmhooks(host):
    """kvmhook's launcher, its timeoutSeconds edited, or no hook file at all: no warning."""
    assert NOT_LAUNCHER not in invoke(host, "list", "start").output
    host.launcher("5")
    assert NOT_LAUNCHER not in invoke(host, "list", "start").output


def test_list_warns_when_the_hook_cannot_be_read(host):
    """A FIFO in the hook's place is refused at once, and said to be no launcher."""
    hook = host.root / "etc/libvirt/hooks/qemu"
    os.mkfifo(hook)
    result = invoke(host, "list", "start")
    assert result.exit_code == 0
    assert (
        f"warning: {hook} {NOT_LAUNCHER}: it cannot be read (not a regular file)" in result.output
    )
