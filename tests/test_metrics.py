"""`kvmhook metrics` on sandbox roots: certificates made by the real keystore tools, states
written by the real code, hook logs written by the real hook (rotated and cut mid-line), and
the exposition checked by prometheus_client's own parser and by `promtool check metrics`."""

from __future__ import annotations

import calendar
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_rotation import host  # noqa: F401  (the fixture: a set made by the real tools)

from kvmhook.host import hoststate

BIN = Path(sys.executable).parent
NO_LIBVIRT = "bogus:///nowhere"


def metrics(root: Path, *args: str, uri: str = NO_LIBVIRT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kvmhook"), "metrics", "--connect", uri, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KVMHOOK_ROOT": str(root)},
        timeout=120,
        check=False,
    )


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} as Prometheus reads the exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exposed(root: Path, uri: str = NO_LIBVIRT) -> dict[tuple[str, tuple], float]:
    result = metrics(root, uri=uri)
    assert result.returncode == 0, result.stderr
    return samples(result.stdout)


def enddate(path: Path) -> float:
    """openssl's -enddate of the certificate in `path`, as unix time."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-in", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    when = datetime.datetime.strptime(out.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y GMT")
    return float(calendar.timegm(when.timetuple()))


# -- certificates and renewals ---------------------------------------------------------------


def test_every_certificate_of_the_set_with_openssls_end_date(host):  # noqa: F811
    found = exposed(host.root)
    certs = {
        dict(labels)["path"]: value
        for (name, labels), value in found.items()
        if name == "kvmhook_certificate_not_after_timestamp_seconds"
    }
    expected = [host.agent / name for name in ("cloud.crt", "cloud.ca.crt")] + [
        host.root / path for path in (
            "etc/pki/libvirt/servercert.pem", "etc/pki/libvirt/clientcert.pem",
            "etc/pki/qemu/server-cert.pem", "etc/pki/qemu/client-cert.pem",
            "etc/pki/libvirt-vnc/server-cert.pem", "etc/pki/CA/cacert.pem",
            "etc/pki/qemu/ca-cert.pem", "etc/pki/libvirt-vnc/ca-cert.pem",
        )
    ]  # fmt: skip
    on_host = {"/" + str(path.relative_to(host.root)): path for path in expected}
    assert set(certs) == set(on_host)
    assert certs["/etc/cloudstack/agent/cloud.crt"] == enddate(host.agent / "cloud.crt")
    # A CA bundle (intermediate + root): its certificate that expires first.
    first = min(
        enddate_of_each(host.agent / "cloud.ca.crt", host.root / "bundle"),
    )
    assert certs["/etc/cloudstack/agent/cloud.ca.crt"] == first


def enddate_of_each(bundle: Path, scratch: Path) -> list[float]:
    scratch.mkdir(exist_ok=True)
    parts = bundle.read_text().split("-----END CERTIFICATE-----")[:-1]
    ends = []
    for index, part in enumerate(parts):
        one = scratch / f"{index}.pem"
        one.write_text(part.strip() + "\n-----END CERTIFICATE-----\n")
        ends.append(enddate(one))
    return ends


def test_renewals_are_timestamped_success_and_failure(host):  # noqa: F811
    before = exposed(host.root)
    assert before[("kvmhook_certificate_renewal_last_success_timestamp_seconds", ())] == 0
    assert before[("kvmhook_certificate_renewal_last_failure_timestamp_seconds", ())] == 0
    started = time.time()
    kvmhook = str(BIN / "kvmhook")
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root)}
    failed = subprocess.run([kvmhook, "cert", "renew", "--signer", "false"], env=env, check=False)
    assert failed.returncode == 1
    after = exposed(host.root)
    assert after[("kvmhook_certificate_renewal_last_failure_timestamp_seconds", ())] >= started
    assert after[("kvmhook_certificate_renewal_last_success_timestamp_seconds", ())] == 0
    renewed = subprocess.run(
        [kvmhook, "cert", "renew", "--signer", host.signer()], env=env, check=False
    )
    assert renewed.returncode == 0
    final = exposed(host.root)
    success = final[("kvmhook_certificate_renewal_last_success_timestamp_seconds", ())]
    assert success >= after[("kvmhook_certificate_renewal_last_failure_timestamp_seconds", ())]
    not_due = subprocess.run(
        [kvmhook, "cert", "renew", "--if-expiring-within", "1", "--signer", host.signer()],
        env=env, check=False,
    )  # fmt: skip
    assert not_due.returncode == 0
    assert exposed(host.root) == final | {
        key: value for key, value in exposed(host.root).items() if "certificate_not" in key[0]
    }


# -- maintenance ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", hoststate.STATES)
def test_the_maintenance_state_is_one_gauge_per_state(tmp_path, monkeypatch, state):
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    if state != hoststate.ENABLED:
        hoststate.write(state, "why")
    found = exposed(tmp_path)
    for name in hoststate.STATES:
        value = found[("kvmhook_maintenance_state", (("state", name),))]
        assert value == (1.0 if name == state else 0.0)
    since = found[("kvmhook_maintenance_state_since_timestamp_seconds", ())]
    if state == hoststate.ENABLED:
        assert since == 0
    else:
        assert since == (tmp_path / "var/lib/kvmhook/maintenance").stat().st_mtime


# -- the hook's counters -------------------------------------------------------------------


def hook_run(root: Path, operation: str = "start", **env: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "kvmhook.qemu", "vm1", operation, "begin", "-"],
        input=b"<domain/>",
        env={"PATH": "/usr/bin:/bin", "KVMHOOK_ROOT": str(root), **env},
        capture_output=True,
        timeout=60,
        check=False,
    )


def script(root: Path, name: str, body: str, mode: int = 0o755) -> None:
    path = root / "etc/libvirt/hooks/custom" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    path.write_text(f"#!/bin/sh\n{body}\n")
    os.chmod(path, mode)


def scripts_total(found: dict, operation: str = "start") -> dict[str, float]:
    return {
        dict(labels)["result"]: value
        for (name, labels), value in found.items()
        if name == "kvmhook_hook_scripts_total" and dict(labels)["operation"] == operation
    }


@pytest.fixture
def hooked(tmp_path) -> Path:
    """A root whose hook ran start once with each kind of script result."""
    root = tmp_path / "root"
    script(root, "all_10-ok", "exit 0")
    script(root, "all_20-fails", "exit 3")
    script(root, "all_30-slow", "sleep 30")
    script(root, "all_40-not-executable", "exit 0", mode=0o644)
    script(root, "all_50-unsafe", "exit 0", mode=0o777)
    hook_run(root, KVMHOOK_TIMEOUT="0.5", KVMHOOK_TERM_GRACE="0.2")
    return root


def test_each_result_counted_once_across_runs(hooked):
    first = metrics(hooked, "--textfile", str(hooked))
    assert first.returncode == 0, first.stderr
    counted = scripts_total(samples((hooked / "kvmhook.prom").read_text()))
    assert counted == {"ok": 1, "failed": 1, "timed_out": 1, "not_executable": 1, "refused": 1}
    again = metrics(hooked, "--textfile", str(hooked))
    assert again.returncode == 0
    assert scripts_total(samples((hooked / "kvmhook.prom").read_text())) == counted
    assert "_created" not in (hooked / "kvmhook.prom").read_text()


def test_counting_survives_logrotate_and_waits_for_a_cut_line(hooked):
    assert metrics(hooked, "--textfile", str(hooked)).returncode == 0
    log = hooked / "var/log/libvirt/qemu-hook.log"
    hook_run(hooked, KVMHOOK_TIMEOUT="0.5", KVMHOOK_TERM_GRACE="0.2")  # read before rotation
    os.rename(log, f"{log}.1")  # logrotate's rename; the hook makes a new file
    hook_run(hooked, KVMHOOK_TIMEOUT="0.5", KVMHOOK_TERM_GRACE="0.2")
    with open(log, "ab") as cut:  # a line still being written
        cut.write(b"2026-12-04 00:00:00.000 +0000 pid=1 domain=vm1 op=start subop=begin script=x")
    assert metrics(hooked, "--textfile", str(hooked)).returncode == 0
    counted = scripts_total(samples((hooked / "kvmhook.prom").read_text()))
    assert counted == {"ok": 3, "failed": 3, "timed_out": 3, "not_executable": 3, "refused": 3}
    with open(log, "ab") as cut:
        cut.write(b" end: exit 0 after 0.001s\n")
    assert metrics(hooked, "--textfile", str(hooked)).returncode == 0
    counted = scripts_total(samples((hooked / "kvmhook.prom").read_text()))
    assert counted["ok"] == 4


def test_a_lost_state_counts_every_log_again_rotated_ones_too(hooked):
    assert metrics(hooked, "--textfile", str(hooked)).returncode == 0
    log = hooked / "var/log/libvirt/qemu-hook.log"
    os.rename(log, f"{log}.1")
    hook_run(hooked, KVMHOOK_TIMEOUT="0.5", KVMHOOK_TERM_GRACE="0.2")
    (hooked / "var/lib/kvmhook/metrics-hooklog.json").write_text("{broken")
    result = metrics(hooked, "--textfile", str(hooked))
    assert "counting the whole log again" in result.stderr
    assert scripts_total(samples((hooked / "kvmhook.prom").read_text()))["ok"] == 2


def test_vetoes_and_refused_guests(tmp_path):
    root = tmp_path / "root"
    script(root, "prepare_10-no", "exit 1")
    conf = root / "etc/kvmhook/kvmhook.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[hooks]\non_failure = abort\n")
    hook_run(root, "prepare")
    hoststate_file = root / "var/lib/kvmhook/maintenance"
    hoststate_file.parent.mkdir(parents=True)
    hoststate_file.write_text("Maintenance\n")
    hook_run(root, "prepare")
    found = exposed(root)
    assert found[("kvmhook_hook_vetoes_total", (("operation", "prepare"),))] == 1
    assert found[("kvmhook_hook_guests_refused_total", (("operation", "prepare"),))] == 1


def test_stdout_runs_leave_the_position_alone(hooked):
    assert metrics(hooked).returncode == 0
    assert not (hooked / "var/lib/kvmhook/metrics-hooklog.json").exists()


# -- capacity, info, the file ------------------------------------------------------------------


def test_capacity_from_libvirt_and_without_it(tmp_path):
    with_libvirt = exposed(tmp_path, uri="test:///default")  # its guest `test` runs
    assert with_libvirt[("kvmhook_libvirt_up", ())] == 1
    assert with_libvirt[("kvmhook_guests_running", ())] == 1
    assert with_libvirt[("kvmhook_cpu_cores", ())] == os.cpu_count()
    assert with_libvirt[("kvmhook_memory_used_bytes", ())] > 0
    without = metrics(tmp_path)
    assert without.returncode == 0 and "the used figures are left out" in without.stderr
    found = samples(without.stdout)
    assert found[("kvmhook_libvirt_up", ())] == 0
    assert ("kvmhook_memory_used_bytes", ()) not in found
    assert found[("kvmhook_memory_capacity_bytes", ())] > 0


def test_info_carries_the_version(tmp_path):
    from importlib.metadata import version

    assert exposed(tmp_path)[("kvmhook_info", (("version", version("kvmhook")),))] == 1


def test_a_missing_textfile_directory_is_one_line_exit_1(tmp_path):
    result = metrics(tmp_path, "--textfile", str(tmp_path / "absent"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot write {tmp_path / 'absent'}/kvmhook.prom: no such directory"
    ]


def test_promtool_accepts_the_file(host, tmp_path):  # noqa: F811
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    out = tmp_path / "out"
    out.mkdir()
    assert metrics(host.root, "--textfile", str(out), uri="test:///default").returncode == 0
    with open(out / "kvmhook.prom", "rb") as data:
        checked = subprocess.run(
            [promtool, "check", "metrics"], stdin=data, capture_output=True, check=False
        )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_full_disk_leaves_no_temporary_file_behind(host, tmp_path):  # noqa: F811
    """Written beside and renamed: on a 4 KiB tmpfs the write fails (ENOSPC), exit 1, and
    nothing is left in node_exporter's directory (the library may leave its temporary)."""
    out = tmp_path / "small"
    out.mkdir()
    script = (
        f'mount -t tmpfs -o size=4k tmpfs "{out}" && '
        f'"{BIN / "kvmhook"}" metrics --connect test:///default --textfile "{out}"; '
        f'status=$?; ls -A "{out}"; exit $status'
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True, text=True, env={**os.environ, "KVMHOOK_ROOT": str(host.root)},
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert result.stdout == ""  # ls: nothing there


def test_a_renewal_of_another_agent_dir_is_not_the_hosts(host, tmp_path):  # noqa: F811
    other = tmp_path / "other-agent"
    shutil.copytree(host.agent, other)
    kvmhook = str(BIN / "kvmhook")
    env = {**os.environ, "KVMHOOK_ROOT": str(host.root)}
    subprocess.run(
        [kvmhook, "cert", "renew", "--agent-dir", str(other), "--signer", "false"],
        env=env, check=False, capture_output=True,
    )  # fmt: skip
    assert not (host.root / "var/lib/kvmhook/cert-renewal.json").exists()
    found = exposed(host.root)
    assert found[("kvmhook_certificate_renewal_last_failure_timestamp_seconds", ())] == 0
