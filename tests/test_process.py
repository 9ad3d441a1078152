"""How the hook runs each custom script: rules 6-10 of the hook's contract.

Every test runs the real hook as a real process (or `kvmhook.hook.process.run`
directly) on real scripts in a sandbox host root, and checks the log, the
files the scripts leave behind, the processes still alive and the clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sandbox import field

from kvmhook.hook import process

ARGS = ("vm1", "start", "begin", "-")
HOOK_COMMAND = (sys.executable, "-m", "kvmhook.qemu")
FAST = {"KVMHOOK_TIMEOUT": "1", "KVMHOOK_TERM_GRACE": "1"}
MIB = 1024 * 1024
GIB = 1024 * MIB
# The performance target: peak memory of the hook with a 10 MiB XML
# and a script printing 1 GiB.
PEAK_RSS_LIMIT = 32 * MIB
ONE_GIB_OF_Y = f"head -c {GIB} /dev/zero | tr '\\0' y\n"


def big_xml(size: int, secret: bytes = b"") -> bytes:
    """Domain XML of about `size` bytes carrying every byte value, much of it non-ASCII."""
    filler = (bytes(range(256)) + "é✓€ domaine ñ\n".encode()) * (size // 275 + 1)
    return b"<domain><name>vm1</name><![CDATA[" + secret + filler[:size] + b"]]></domain>"


def run_hook(host, *args: str, xml: bytes | None = None, env=None, launcher=None):
    """Run the hook; check it exited 0 with empty stdout; return (result, seconds)."""
    kwargs = {} if xml is None else {"xml": xml}
    start = time.monotonic()
    result = host.hook(*(args or ARGS), env=env or host.env(), launcher=launcher, **kwargs)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"", "the hook must write nothing on its stdout"
    return result, elapsed


def texts(host, name: str) -> list[str]:
    """The texts of the log records about script `name`, in log order."""
    marker = f" script={name} "
    return [r.split(marker, 1)[1] for r in host.records() if field(r, "script") == name]


def end_of(host, name: str) -> tuple[str, float]:
    """How script `name` ended, per its single end record, and its logged duration."""
    ends = [t for t in texts(host, name) if t.startswith("end: ")]
    assert len(ends) == 1, ends
    match = re.fullmatch(r"end: (.*) after (\d+\.\d{3})s", ends[0])
    assert match, ends[0]
    return match.group(1), float(match.group(2))


def end_of_text(host, name: str) -> str:
    """The text of script `name`'s first end record."""
    return next(t for t in texts(host, name) if t.startswith("end: "))


def start_of(host, name: str) -> str:
    """The text of script `name`'s single start record."""
    starts = [t for t in texts(host, name) if t.startswith("start: ")]
    assert len(starts) == 1, starts
    return starts[0]


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie left to a non-reaping init is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def gone_soon(pid: int, within: float = 0.5) -> bool:
    """Whether `pid` is dead, allowing `within` seconds for a signal already sent to land."""
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def read_pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()]


@pytest.fixture
def pids(host):
    """A directory where scripts record pids; everything recorded is SIGKILLed at teardown."""
    directory = host.root / "pids"
    directory.mkdir()
    yield directory
    for path in directory.iterdir():
        for pid in read_pids(path):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass


# Rule 6: arguments, stdin, environment


def test_each_script_gets_exactly_the_four_hook_arguments(host):
    """Every script receives exactly the hook's four arguments, byte for byte, spaces included."""
    args = ("guest ü 1", "release", "end", "shutdown by user")
    for name in ("all_args", "release_args"):
        host.script(name, f'printf \'%s\\0\' "$#" "$@" > {host.root}/{name}.out\n')
    run_hook(host, *args)
    expected = b"4\0" + b"".join(arg.encode() + b"\0" for arg in args)
    assert (host.root / "all_args.out").read_bytes() == expected
    assert (host.root / "release_args.out").read_bytes() == expected


def test_three_scripts_get_identical_xml_bytes(host):
    """Three scripts each read the exact XML bytes sent, even after an earlier script read part."""
    xml = big_xml(300 * 1024)
    assert len(xml) > 300 * 1024 and max(xml) == 255
    # A partial reader first: a shared file offset would rob the later scripts.
    host.script("all_0", "dd bs=1000 count=1 of=/dev/null 2>/dev/null\n")
    for n in (1, 2, 3):
        host.script(f"all_{n}", f"sha256sum > {host.root}/sum{n}\n")
    run_hook(host, xml=xml)
    want = hashlib.sha256(xml).hexdigest()
    for n in (1, 2, 3):
        assert (host.root / f"sum{n}").read_text().split()[0] == want


def test_script_that_never_reads_a_large_xml_blocks_nothing(host):
    """A script printing 4 MiB that never reads an 8 MiB XML ends normally; the next gets it all."""
    xml = big_xml(8 * MIB)
    host.script("all_1", f"head -c {4 * MIB} /dev/zero\nexit 0\n")
    host.script("all_2", f"sha256sum > {host.root}/sum\n")
    _, elapsed = run_hook(host, xml=xml, env=host.env(KVMHOOK_TIMEOUT="10"))
    assert end_of(host, "all_1")[0] == "exit 0"
    assert elapsed < 5
    assert (host.root / "sum").read_text().split()[0] == hashlib.sha256(xml).hexdigest()


def environ_of_script(host, env: dict[str, str]) -> list[bytes]:
    """The environment a script was started with, as sorted NAME=value byte strings."""
    host.script("all_env", f"cat /proc/$$/environ > {host.root}/environ\n")
    run_hook(host, env=env)
    return sorted((host.root / "environ").read_bytes().split(b"\0")[:-1])


def test_scripts_get_the_hook_environment_unchanged(host):
    """A script's environment is exactly the hook's, odd bytes included, with nothing added."""
    env = host.env(
        USER="root",
        LOGNAME="root",
        TMPDIR="/tmp",
        KVMHOOK_TEST_VALUE="spaces, é and\na newline",
        KVMHOOK_TEST_BYTES=os.fsdecode(b"raw \xff\xfe bytes"),
    )
    want = sorted(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())
    assert environ_of_script(host, env) == want


def test_environment_without_a_locale_is_passed_unchanged(host):
    """A hook started with no locale variables starts its scripts with none either."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "KVMHOOK_ROOT": str(host.root)}
    want = sorted(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())
    assert environ_of_script(host, env) == want


# Rule 7: what the log holds about each run


def test_log_holds_start_output_and_end_of_each_script(host):
    """The log shows the command line, both streams tagged by line, exit status and duration."""
    path = host.script(
        "all_talk",
        'echo "out one"\necho "err one" >&2\nsleep 0.3\necho "out two"\nexit 3\n',
    )
    _, elapsed = run_hook(host, env=host.env(KVMHOOK_TIMEOUT="5"))
    records = texts(host, "all_talk")
    assert records[0] == f"start: {os.path.realpath(path)} vm1 start begin - (timeout 5s)"
    for line in ("stdout: out one", "stderr: err one", "stdout: out two"):
        assert records.count(line) == 1, records
    assert records.index("stdout: out one") < records.index("stdout: out two")
    assert records.index("stderr: err one") < records.index("stdout: out two")
    assert records[-1].startswith("end: ")
    how, duration = end_of(host, "all_talk")
    assert how == "exit 3"
    assert 0.3 <= duration < elapsed


@pytest.mark.parametrize(
    ("command", "ending"),
    [
        ("kill -USR1 $$", "killed by SIGUSR1"),
        ("kill -HUP $$", "killed by SIGHUP"),
        # Python ignores SIGPIPE; a script must start with the default (death).
        ("kill -PIPE $$", "killed by SIGPIPE"),
    ],
)
def test_end_record_names_the_signal_that_ended_the_script(host, command, ending):
    """A script ended by a signal is logged with that signal's name, not an exit code."""
    host.script("all_sig", f"{command}\nsleep 0.1\nexit 0\n")
    run_hook(host)
    assert end_of(host, "all_sig")[0] == ending


def test_scripts_start_with_every_signal_at_its_default(host):
    """A hook (or `kvmhook hooks run`) started with SIGHUP ignored, as under nohup: its scripts
    still die of SIGHUP, as they do when libvirt starts the hook (it resets every signal)."""
    host.script("all_sig", "kill -HUP $$\nsleep 0.1\nexit 0\n")
    subprocess.run(
        [sys.executable, "-m", "kvmhook.qemu", *ARGS],
        input=b"<domain/>",
        env=host.env(),
        capture_output=True,
        check=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert end_of(host, "all_sig")[0] == "killed by SIGHUP"


HOOK_PEAK_HELPER = """
import json, resource, subprocess, sys
xml = open(sys.argv[1], "rb").read()
result = subprocess.run(sys.argv[2:], input=xml, capture_output=True, timeout=120)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": result.returncode, "stdout": len(result.stdout),
                  "stderr": result.stderr.decode(errors="replace"),
                  "maxrss_kib": usage.ru_maxrss}))
"""


def hook_peak_rss(host, xml: bytes, env: dict[str, str]) -> int:
    """Run the hook from a helper process; check exit 0 and empty stdout; return its peak RSS."""
    xml_file = host.root / "domain.xml"
    xml_file.write_bytes(xml)
    helper = subprocess.run(
        [sys.executable, "-c", HOOK_PEAK_HELPER, str(xml_file), *HOOK_COMMAND, *ARGS],
        capture_output=True,
        env=env,
        timeout=150,
        check=True,
    )
    report = json.loads(helper.stdout)
    assert report["rc"] == 0, report["stderr"]
    assert report["stdout"] == 0
    return report["maxrss_kib"] * 1024


@pytest.mark.slow
def test_one_gib_of_output_is_capped_with_the_exact_dropped_count(host):
    """1 GiB of output leaves at most 1 MiB of it in the log, the exact dropped count, small RSS."""
    host.script("all_flood", ONE_GIB_OF_Y)
    peak = hook_peak_rss(host, big_xml(10 * MIB), host.env(KVMHOOK_TIMEOUT="60"))
    records = texts(host, "all_flood")
    kept_lines = [t[len("stdout: ") :] for t in records if t.startswith("stdout: ")]
    assert len(kept_lines) == 1  # no newline in the output: one record
    kept = len(kept_lines[0])
    assert kept_lines[0] == "y" * kept
    assert MIB - 1024 <= kept <= MIB
    drops = [t for t in records if t.startswith("output: ")]
    assert drops == [f"output: {GIB - kept} more bytes dropped (KVMHOOK_MAX_OUTPUT={MIB})"]
    assert end_of(host, "all_flood")[0] == "exit 0"
    assert host.log.stat().st_size < MIB + 64 * 1024
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MIB:.1f} MiB"


@pytest.mark.slow
def test_one_gib_of_short_lines_keeps_peak_memory_under_32_mib(host):
    """Peak RSS stays under 32 MiB when a script prints 1 GiB in short lines with a 10 MiB XML."""
    host.script("all_lines", f"yes ab | head -c {GIB}\n")
    peak = hook_peak_rss(host, big_xml(10 * MIB), host.env(KVMHOOK_TIMEOUT="60"))
    assert end_of(host, "all_lines")[0] == "exit 0"
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / MIB:.1f} MiB"


def output_of(host, name: str) -> tuple[int, list[str]]:
    """Bytes of output logged for `name` (counting a newline per line) and its drop records."""
    records = texts(host, name)
    lines = [t.split(": ", 1)[1] for t in records if t.startswith(("stdout: ", "stderr: "))]
    return sum(len(line) + 1 for line in lines), [t for t in records if t.startswith("output: ")]


def test_small_cap_is_never_exceeded(host):
    """With KVMHOOK_MAX_OUTPUT=100, at most 100 of 300 bytes are logged and the rest are counted."""
    host.script("all_300", "head -c 300 /dev/zero | tr '\\0' a\n")
    run_hook(host, env=host.env(KVMHOOK_MAX_OUTPUT="100"))
    kept = sum(len(t) - len("stdout: ") for t in texts(host, "all_300") if t.startswith("stdout: "))
    assert kept <= 100
    assert output_of(host, "all_300")[1] == [
        f"output: {300 - kept} more bytes dropped (KVMHOOK_MAX_OUTPUT=100)"
    ]


def test_cap_of_100_bytes_keeps_exactly_the_first_100(host):
    """With KVMHOOK_MAX_OUTPUT=100 the first 100 bytes are logged and 200 are reported dropped."""
    host.script("all_300", "printf 'first'\nhead -c 295 /dev/zero | tr '\\0' a\n")
    run_hook(host, env=host.env(KVMHOOK_MAX_OUTPUT="100"))
    assert texts(host, "all_300")[1:-1] == [
        "stdout: first" + "a" * 95,
        "output: 200 more bytes dropped (KVMHOOK_MAX_OUTPUT=100)",
    ]


def test_cap_counts_both_streams_together(host):
    """The cap bounds stdout and stderr together, and kept plus dropped is all that was printed."""
    host.script(
        "all_both",
        "i=0\nwhile [ $i -lt 100 ]; do echo 123456789; echo abcdefghi >&2; i=$((i+1)); done\n",
    )
    run_hook(host, env=host.env(KVMHOOK_MAX_OUTPUT="1500"))
    kept, drops = output_of(host, "all_both")
    assert len(drops) == 1
    dropped = int(re.fullmatch(r"output: (\d+) more bytes dropped \(.*\)", drops[0]).group(1))
    assert kept <= 1500 + 1  # + 1: a line cut by the cap is counted with a newline
    assert kept + dropped - 2000 in (0, 1)


def test_domain_xml_is_never_logged(host):
    """A secret in the domain XML never reaches the log, though scripts read the XML and print."""
    secret = b"S3CR3T-passw0rd-7f1c"
    xml = b"<domain><name>vm1</name><secret>" + secret + b"</secret></domain>"
    host.script("all_reader", 'wc -c\necho "args: $*"\necho "to stderr" >&2\n')
    host.script("all_quiet", "cat > /dev/null\nexit 1\n")
    result, _ = run_hook(host, xml=xml)
    log = host.log.read_bytes()
    assert f"stdout: {len(xml)}".encode() in log  # the script did read the XML
    assert b"stdout: args: vm1 start begin -" in log
    assert secret not in log
    assert secret not in result.stderr


# Rule 8: timeouts and process groups


def test_sleeping_script_is_stopped_at_the_timeout_and_the_rest_run(host, pids):
    """A script sleeping forever is SIGTERMed after KVMHOOK_TIMEOUT, logged; later ones run."""
    host.script("all_1", f"echo $$ > {pids}/leader\nsleep 1000\n")
    host.script("all_2", "echo next\n")
    _, elapsed = run_hook(host, xml=big_xml(4 * MIB), env=host.env(**FAST))
    assert 1.0 <= elapsed < 1 + 1 + 1
    how, duration = end_of(host, "all_1")
    assert how == "timed out after 1s, process group stopped; killed by SIGTERM"
    assert 1.0 <= duration < 2.0
    assert "stdout: next" in texts(host, "all_2")
    assert gone_soon(read_pids(pids / "leader")[0])


@pytest.mark.slow
def test_script_ignoring_sigterm_gets_sigkill_after_the_grace(host, pids):
    """A script ignoring SIGTERM is SIGKILLed when the grace ends, within timeout + grace + 1 s."""
    host.script("all_stubborn", f"trap '' TERM\necho $$ > {pids}/leader\nsleep 1000\n")
    _, elapsed = run_hook(host, env=host.env(**FAST))
    assert 2.0 <= elapsed < 1 + 1 + 1
    how, _ = end_of(host, "all_stubborn")
    assert how == "timed out after 1s, process group stopped; killed by SIGKILL"
    assert gone_soon(read_pids(pids / "leader")[0])


def test_grandchildren_holding_the_pipe_are_killed_with_the_script(host, pids):
    """Background grandchildren holding the output pipe, even SIGTERM-proof ones, die too."""
    host.script(
        "all_forks",
        f"sleep 1000 &\necho $! >> {pids}/all\n"
        f"(trap '' TERM; exec sleep 1000) &\necho $! >> {pids}/all\n"
        f"echo $$ >> {pids}/all\nsleep 1000\n",
    )
    _, elapsed = run_hook(host, env=host.env(**FAST))
    assert elapsed < 1 + 1 + 1
    assert end_of(host, "all_forks")[0].startswith("timed out after 1s")
    recorded = read_pids(pids / "all")
    assert len(recorded) == 3
    assert [pid for pid in recorded if not gone_soon(pid)] == []


@pytest.mark.slow
def test_setsid_grandchild_keeping_the_output_open_does_not_hold_the_hook(host, pids):
    """A setsid grandchild holding the output pipe cannot keep the hook past its time bound."""
    host.script(
        "all_escape",
        f"setsid sh -c 'echo $$ > {pids}/escaped; exec sleep 1000' &\n"
        f"trap '' TERM\necho $$ > {pids}/leader\nsleep 1000\n",
    )
    _, elapsed = run_hook(host, env=host.env(**FAST))
    assert elapsed < 1 + 1 + 1
    assert end_of(host, "all_escape")[0].startswith("timed out after 1s")
    escaped = read_pids(pids / "escaped")[0]
    assert alive(escaped)  # the scenario happened: it still holds the pipe's write end
    assert os.getsid(escaped) == escaped
    assert gone_soon(read_pids(pids / "leader")[0])


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_invalid_timeout_is_logged_and_the_default_applies(host, value):
    """An invalid KVMHOOK_TIMEOUT is logged by name and value, and the 600 s default is used."""
    host.script("all_quick", "exit 0\n")
    run_hook(host, env=host.env(KVMHOOK_TIMEOUT=value))
    complaints = [t for t in texts(host, "-") if "KVMHOOK_TIMEOUT" in t]
    assert len(complaints) == 1
    assert repr(value) in complaints[0]
    assert start_of(host, "all_quick").endswith(" (timeout 600s)")
    assert end_of(host, "all_quick")[0] == "exit 0"


def test_launcher_timeout_seconds_is_honoured(host, pids):
    """The installed launcher's edited `timeoutSeconds = 1` stops a sleeping script after ~1 s."""
    launcher = host.launcher("1")
    host.script("all_sleep", f"echo $$ > {pids}/leader\nsleep 1000\n")
    _, elapsed = run_hook(host, env=host.env(KVMHOOK_TERM_GRACE="1"), launcher=launcher)
    assert 1.0 <= elapsed < 1 + 1 + 1
    assert start_of(host, "all_sleep").endswith(" (timeout 1s)")
    assert end_of(host, "all_sleep")[0].startswith("timed out after 1s")
    assert gone_soon(read_pids(pids / "leader")[0])


def test_kvmhook_timeout_overrides_the_launcher_downwards(host, pids):
    """KVMHOOK_TIMEOUT=1 stops a sleeping script even though the launcher allows 600 s."""
    launcher = host.launcher()
    host.script("all_sleep", f"echo $$ > {pids}/leader\nsleep 1000\n")
    _, elapsed = run_hook(host, env=host.env(**FAST), launcher=launcher)
    assert elapsed < 1 + 1 + 1
    assert start_of(host, "all_sleep").endswith(" (timeout 1s)")
    assert end_of(host, "all_sleep")[0].startswith("timed out after 1s")


def test_kvmhook_timeout_overrides_the_launcher_upwards(host):
    """KVMHOOK_TIMEOUT=3 lets a 1.5 s script finish although the launcher says 1 s."""
    launcher = host.launcher("1")
    host.script("all_slow", "sleep 1.5\necho done\n")
    run_hook(host, env=host.env(KVMHOOK_TIMEOUT="3", KVMHOOK_TERM_GRACE="1"), launcher=launcher)
    assert start_of(host, "all_slow").endswith(" (timeout 3s)")
    assert end_of(host, "all_slow")[0] == "exit 0"
    assert "stdout: done" in texts(host, "all_slow")


# Rule 9: a background descendant outliving its script


def test_background_child_holding_stdout_is_not_waited_for_nor_signalled(host, pids):
    """The hook moves on within 1 s of a script's exit and leaves its background child alone."""
    host.script(
        "all_1",
        f"echo $$ > {pids}/group\n(sleep 30; echo late) &\necho $! > {pids}/background\n"
        "echo bye\nexit 0\n",
    )
    host.script("all_2", "echo next\n")
    _, elapsed = run_hook(host, env=host.env(KVMHOOK_TIMEOUT="20"))
    how, duration = end_of(host, "all_1")
    assert how == "exit 0"
    assert duration < 1.0
    assert elapsed < 2.0
    assert "stdout: bye" in texts(host, "all_1")
    assert "stdout: next" in texts(host, "all_2")
    assert alive(read_pids(pids / "background")[0])


# Rule 10: scripts that cannot be executed


def test_unexecutable_scripts_are_logged_with_the_os_error_and_the_rest_run(host):
    """A script without shebang and one with a missing interpreter are logged; later ones run."""
    plain = host.custom / "all_1"
    plain.write_text("echo no shebang\n")
    plain.chmod(0o755)
    host.script("all_2", "#!/nonexistent/interp\necho bad interpreter\n")
    host.script("all_3", f"touch {host.root}/ran\n")
    run_hook(host)
    # The OS error comes first; the hook may add a hint after it.
    assert end_of_text(host, "all_1").startswith("end: cannot execute: Exec format error")
    assert end_of_text(host, "all_2").startswith("end: cannot execute: No such file or directory")
    assert (host.root / "ran").exists()
    assert end_of(host, "all_3")[0] == "exit 0"


def test_script_deleted_after_listing_is_logged_and_the_rest_run(host):
    """A script removed after the hook listed it (by an earlier one) is logged; later ones run."""
    host.script("all_1", f"rm {shlex.quote(str(host.custom / 'all_2'))}\n")
    host.script("all_2", "echo should not run\n")
    host.script("all_3", f"touch {host.root}/ran\n")
    run_hook(host)
    assert start_of(host, "all_2")  # it was listed and attempted
    assert end_of_text(host, "all_2").startswith("end: cannot execute: No such file or directory")
    assert (host.root / "ran").exists()


def test_run_of_a_missing_path_raises_oserror_and_leaks_no_descriptor(tmp_path):
    """process.run on a vanished path raises FileNotFoundError and closes every pipe it made."""
    before = sorted(os.listdir("/proc/self/fd"))
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(FileNotFoundError) as raised:
            process.run([str(tmp_path / "gone"), *ARGS], fd, 1.0, 1.0, 1000)
    finally:
        os.close(fd)
    assert raised.value.strerror == "No such file or directory"
    assert sorted(os.listdir("/proc/self/fd")) == before
