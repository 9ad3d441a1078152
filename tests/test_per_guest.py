"""Per-guest scripts (issue 7, item 3): `custom/<domain>/` runs only for that guest.

The hook runs as a real process; scripts record their path relative to the
custom dir (`vm1/all_x` or `all_x`) in `<root>/ran`.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from sandbox import field

from kvmhook.cli import main
from kvmhook.hook import discovery


def guest_dir(host, domain: str = "vm1", mode: int = 0o755):
    """Create the per-guest dir `custom/<domain>` with exactly `mode`."""
    path = host.custom / domain
    path.mkdir()
    os.chmod(path, mode)
    return path


def recorder(host, name: str, directory=None):
    """A script that appends its path relative to the custom dir to `<root>/ran`."""
    where = directory or host.custom
    label = os.path.relpath(where / name, host.custom)
    return host.script(name, f'echo "{label}" >> "{host.root}/ran"\n', directory=directory)


def ran(host) -> list[str]:
    """The scripts that ran, in order, relative to the custom dir."""
    path = host.root / "ran"
    return path.read_text().splitlines() if path.exists() else []


def hook(host, domain: str, operation: str = "start"):
    """Run the real hook for `domain`; it must exit 0 with empty stdout."""
    result = host.hook(domain, operation, "begin", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    return result


def invoke(host, *args: str):
    """Run `kvmhook hooks ARGS` in-process against the sandbox."""
    env = {"KVMHOOK_ROOT": str(host.root), "KVMHOOK_CUSTOM_DIR": None, "KVMHOOK_LOG_FILE": None}
    return CliRunner().invoke(main, ["hooks", *args], env=env, catch_exceptions=False)


def test_per_guest_scripts_run_only_for_their_guest(host):
    """`custom/vm1/` scripts run for vm1 only, for their operation or all, never for vm2."""
    vm1 = guest_dir(host)
    for name in ("all_a", "start_b", "stopped_c"):
        recorder(host, name, vm1)
    recorder(host, "all_g")
    hook(host, "vm1")
    assert ran(host) == ["vm1/all_a", "vm1/start_b", "all_g"]
    (host.root / "ran").unlink()
    hook(host, "vm2")
    assert ran(host) == ["all_g"]
    (host.root / "ran").unlink()
    hook(host, "VM1")  # matched exactly: no case folding
    assert ran(host) == ["all_g"]


def test_merged_order_with_globals_and_tie_rule(host):
    """Guest scripts merge with globals by rest, then full name, then the global one first."""
    vm1 = guest_dir(host)
    for name in ("all_10", "start_20", "all_x", "all_B"):
        recorder(host, name, vm1)
    for name in ("all_15", "start_x", "all_x", "all_a"):
        recorder(host, name)
    hook(host, "vm1")
    assert ran(host) == [
        "vm1/all_10",
        "all_15",
        "vm1/start_20",
        "vm1/all_B",
        "all_a",
        "all_x",
        "vm1/all_x",
        "start_x",
    ]
    scripts = [record for record in host.records() if " start: " in record]
    assert [field(record, "script") for record in scripts][5:7] == ["all_x", "vm1/all_x"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda path: os.chmod(path, 0o777), "writable by group or others (mode 0777)"),
        (lambda path: os.chown(path, 65534, 65534), "owned by uid 65534"),
    ],
    ids=["mode-0777", "uid-65534"],
)
def test_unsafe_guest_dir_refused_and_logged_globals_still_run(host, change, words):
    """An unsafe per-guest dir runs none of its scripts and says why; the global scripts run."""
    vm1 = guest_dir(host)
    recorder(host, "all_mine", vm1)
    recorder(host, "all_global")
    change(vm1)
    hook(host, "vm1")
    assert ran(host) == ["all_global"]
    refusals = [record for record in host.records() if "per-guest scripts of guest vm1" in record]
    assert len(refusals) == 1
    assert field(refusals[0], "script") == "vm1"
    assert f"per-guest dir {vm1} is {words}" in refusals[0]


@pytest.mark.parametrize("domain", ["..", ".", "a/b", "../custom", "", "vm1/."])
def test_path_trick_names_run_nothing_from_subdirs(host, domain):
    """A domain name that tries path tricks matches no subdirectory: only global scripts run."""
    recorder(host, "all_global")
    (host.custom / "a").mkdir(mode=0o755)
    recorder(host, "all_a", host.custom / "a")
    (host.custom / "a" / "b").mkdir(mode=0o755)
    recorder(host, "all_b", host.custom / "a" / "b")
    recorder(host, "all_vm1", guest_dir(host))
    # `..` would be the hooks dir: a script there must not run either
    recorder(host, "all_up", host.custom.parent)
    hook(host, domain)
    assert ran(host) == ["all_global"]
    assert discovery.discover(str(host.custom), "start", domain)[0][0].name == "all_global"


def test_symlinked_guest_dir_to_safe_place_runs(host):
    """A per-guest dir that is a link to a safe directory runs its scripts."""
    safe = host.root / "safe"
    safe.mkdir(mode=0o755)
    os.chmod(safe, 0o755)
    host.script("all_linked", f'echo linked >> "{host.root}/ran"\n', directory=safe)
    (host.custom / "vm1").symlink_to(safe)
    hook(host, "vm1")
    assert ran(host) == ["linked"]
    starts = [record for record in host.records() if " start: " in record]
    assert [field(record, "script") for record in starts] == ["vm1/all_linked"]


def test_guest_dir_linked_through_unsafe_dir_refused(host):
    """A per-guest dir reached via a link in a world-writable dir is refused; globals run."""
    safe = host.root / "safe"
    safe.mkdir()
    os.chmod(safe, 0o755)
    host.script("all_linked", f'echo linked >> "{host.root}/ran"\n', directory=safe)
    world = host.root / "world"
    world.mkdir()
    os.chmod(world, 0o777)
    (world / "hop").symlink_to(safe)  # anyone may replace this link
    (host.custom / "vm1").symlink_to(world / "hop")
    recorder(host, "all_global")
    hook(host, "vm1")
    assert ran(host) == ["all_global"]
    (refusal,) = [r for r in host.records() if "per-guest scripts of guest vm1 not run" in r]
    assert f"{world} is writable by group or others" in refusal


def test_guest_dir_named_like_a_script_is_not_logged_as_one(host):
    """A guest dir named `all_x` is not run or logged for other guests; it runs for its own."""
    recorder(host, "all_y", guest_dir(host, "all_x"))
    recorder(host, "all_global")
    hook(host, "vm2")
    assert ran(host) == ["all_global"]
    assert not [record for record in host.records() if "ignored" in record]
    (host.root / "ran").unlink()
    hook(host, "all_x")
    assert ran(host) == ["all_global", "all_x/all_y"]


def test_hooks_list_domain_shows_the_merged_list(host):
    """`hooks list start --domain vm1` shows globals and vm1's scripts merged, the dir described."""
    vm1 = guest_dir(host)
    for name in ("all_a", "stopped_b"):
        host.script(name, "true\n", directory=vm1)
    host.script("all_x", "true\n", directory=vm1)
    for name in ("all_b", "all_x"):
        host.script(name, "true\n")
    guest_dir(host, "vm2")
    result = invoke(host, "list", "start", "--domain", "vm1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith("run ")] == [
        f"run      {vm1 / 'all_a'}",
        f"run      {host.custom / 'all_b'}",
        f"run      {host.custom / 'all_x'}",
        f"run      {vm1 / 'all_x'}",
    ]
    assert [line for line in lines if line.startswith("ignored ")] == [
        f"ignored  {vm1}: per-guest scripts of guest vm1",
        f"ignored  {vm1 / 'stopped_b'}: runs for stopped only",
        f"ignored  {host.custom / 'vm2'}: per-guest scripts of guest vm2",
    ]
    plain = invoke(host, "list", "start").output.splitlines()
    assert [line for line in plain if line.startswith("run ")] == [
        f"run      {host.custom / 'all_b'}",
        f"run      {host.custom / 'all_x'}",
    ]


def test_hooks_list_domain_reports_an_unsafe_guest_dir(host):
    """`hooks list --domain` shows why an unsafe per-guest dir's scripts would not run."""
    vm1 = guest_dir(host, mode=0o777)
    host.script("all_a", "true\n", directory=vm1)
    result = invoke(host, "list", "start", "--domain", "vm1")
    assert result.exit_code == 0, result.output
    assert f"ignored  {vm1}: per-guest scripts of guest vm1 not run: per-guest dir {vm1}" in (
        result.output
    )
    assert not [line for line in result.output.splitlines() if line.startswith("run ")]
