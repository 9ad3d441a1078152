"""Admission control in the real hook process: kvmhook.conf and fake libvirt status files in a
sandbox root, guests sized against this machine's own CPU count and memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MIB = 1024 * 1024
CORES = os.cpu_count() or 1
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
ENFORCE = "[capacity]\nadmission = enforce\n"
OTHER_OPERATIONS = ("start", "started", "stopped", "release", "migrate", "restore", "reconnect")

# Shaped like the file libvirt 9.0 writes for a running guest (trimmed), with a top-level
# <vcpus> that must not be taken for the guest's <vcpu>.
STATUS = """\
<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
or other application using the libvirt API.
-->

<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='0' pid='4250'/>
  </vcpus>
  <qemuCaps>
    <flag name='kvm'/>
  </qemuCaps>
  <domain type='qemu' id='1'>
    <name>{name}</name>
    <uuid>7f3d2a9e-0000-4000-8000-000000000001</uuid>
    <memory unit='KiB'>{kib}</memory>
    <currentMemory unit='KiB'>{kib}</currentMemory>
    <vcpu placement='static'>{vcpus}</vcpu>
    <os>
      <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    </os>
  </domain>
</domstatus>
"""


def domain_xml(name: str = "vm1", vcpus: str = "1", memory: str = "64", unit: str = "MiB") -> bytes:
    """The domain XML libvirt passes on stdin for `prepare`."""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='{unit}'>{memory}</memory>"
        f"<currentMemory unit='KiB'>1024</currentMemory><vcpu placement='static'>{vcpus}</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    ).encode()


def conf(host, text: str) -> None:
    """Write the sandbox's /etc/kvmhook/kvmhook.conf."""
    path = host.root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def running(host, name: str, vcpus: int, memory: int) -> None:
    """A running guest's status file in the sandbox's /run/libvirt/qemu (memory in bytes)."""
    directory = host.root / "run/libvirt/qemu"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.xml").write_text(
        STATUS.format(name=name, vcpus=vcpus, kib=memory // 1024)
    )


def mib(count: int) -> str:
    return str(count // MIB) if count % MIB == 0 else f"{count / MIB:.2f}"


def vcpus(count: float) -> str:
    return f"{count:g} vCPU" + ("" if count == 1 else "s")


@pytest.fixture
def marked(host):
    """The sandbox host with a custom script recording that it ran and the XML it got."""
    host.script("all_marker", f'cat > "{host.root}/ran"\n')
    return host


def ran(host) -> bytes | None:
    """The XML the custom script got, None when it did not run."""
    path = host.root / "ran"
    return path.read_bytes() if path.exists() else None


def assert_admitted(host, *args: str, xml: bytes | None = None) -> None:
    xml = domain_xml() if xml is None else xml
    result = host.hook(*args, xml=xml)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result
    assert ran(host) == xml


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "[capacity]\nmem_factor = 0.001\n",
        "[capacity]\nadmission = off\n",
        "[capacity]\n  ADMISSION :  Off\n# admission = enforce\n",
    ],
    ids=["no file", "empty file", "no key", "off", "Off, enforce commented out"],
)
def test_off_by_default_admits_any_size(marked, text):
    """Without `admission = enforce`, prepare of a guest far larger than the host runs its
    scripts and exits 0."""
    if text is not None:
        conf(marked, text)
    running(marked, "big", CORES * 4, PHYSICAL * 2)
    huge = domain_xml(vcpus=str(CORES * 8), memory=str(PHYSICAL * 4), unit="b")
    assert_admitted(marked, "vm1", "prepare", "begin", "-", xml=huge)
    assert not any("admission" in r for r in marked.records())


def test_an_unknown_value_is_off_and_logged(marked):
    """`admission = yes` is not `enforce`: admission stays off and a `config:` record says so."""
    conf(marked, "[capacity]\nadmission = yes\n")
    running(marked, "big", CORES * 4, PHYSICAL * 2)
    assert_admitted(marked, "vm1", "prepare", "begin", "-")
    assert any(
        "config: " in r and "admission = yes: neither enforce nor off" in r
        for r in marked.records()
    ), marked.records()


def test_a_guest_that_fits_runs_its_scripts_on_the_xml_read_once(marked):
    """Enforced, a guest within capacity is admitted and the scripts get the exact XML."""
    conf(marked, ENFORCE)
    running(marked, "other", 0, PHYSICAL // 2 // 1024 * 1024)
    xml = domain_xml(vcpus=str(CORES), memory=str((PHYSICAL // 4) // MIB))
    assert_admitted(marked, "vm1", "prepare", "begin", "-", xml=xml)


def test_a_guest_past_memory_is_refused_with_the_numbers(marked):
    """With 32 MiB left, a 64 MiB guest is refused: exit 1, one line on stderr with the figures,
    logged, and no script runs."""
    conf(marked, ENFORCE + "cpu_factor = 2\nmem_factor = 1\n")
    used = (PHYSICAL - 32 * MIB) // 1024 * 1024
    running(marked, "other", 1, used)
    result = marked.hook("vm1", "prepare", "begin", "-", xml=domain_xml())
    expected = (
        f"admission: guest vm1 needs 1 vCPU and 64 MiB; this host has {vcpus(CORES * 2 - 1)}"
        f" and {mib(PHYSICAL - used)} MiB free of {vcpus(CORES * 2)} and {mib(PHYSICAL)} MiB"
        " (cpu factor 2, memory factor 1)\n"
    )
    assert (result.returncode, result.stdout, result.stderr.decode()) == (1, b"", expected)
    assert ran(marked) is None
    assert any(f"refused: {expected.strip()}; no scripts run" in r for r in marked.records())


def test_a_guest_past_the_vcpus_is_refused(marked):
    """With every vCPU of capacity taken (factor 1), a 1-vCPU guest is refused, naming 0 free."""
    conf(marked, ENFORCE)
    running(marked, "a", CORES, 64 * MIB)
    result = marked.hook("vm1", "prepare", "begin", "-", xml=domain_xml())
    assert result.returncode == 1
    assert result.stderr.decode().startswith(
        "admission: guest vm1 needs 1 vCPU and 64 MiB; this host has 0 vCPUs and "
    )
    assert f" free of {vcpus(CORES)} and " in result.stderr.decode()
    assert ran(marked) is None


def test_the_cpu_factor_makes_room(marked):
    """The same full host admits the guest once cpu_factor = 2 doubles its vCPU capacity."""
    conf(marked, ENFORCE + "cpu_factor = 2\n")
    running(marked, "a", CORES, 64 * MIB)
    assert_admitted(marked, "vm1", "prepare", "begin", "-")


def test_memory_units_and_current_vcpus_are_read_as_libvirt_means_them(marked):
    """`<memory unit='GiB'>` is counted in GiB and `<vcpu current='1'>` as the 1 vCPU it has."""
    conf(marked, ENFORCE)
    running(marked, "a", CORES - 1, 0)
    fits = domain_xml(memory="1", unit="GiB").replace(
        b"<vcpu placement='static'>1", f"<vcpu current='1'>{CORES + 4}".encode()
    )
    if PHYSICAL >= 2 * 1024 * MIB:
        assert_admitted(marked, "vm1", "prepare", "begin", "-", xml=fits)
    too_big = domain_xml(memory=str(PHYSICAL // MIB // 1024 + 1), unit="GiB")
    result = marked.hook("vm1", "prepare", "begin", "-", xml=too_big)
    assert result.returncode == 1 and b"needs 1 vCPU and " in result.stderr


def test_the_arriving_guests_own_status_file_is_not_counted_twice(marked):
    """A status file left by vm1 itself (a restart after a crash) does not count against it:
    the host, full only with it, still admits vm1."""
    conf(marked, ENFORCE)
    others = (PHYSICAL - 64 * MIB) // 1024 * 1024
    running(marked, "other", 0, others)
    running(marked, "vm1", CORES, 64 * MIB)
    assert_admitted(marked, "vm1", "prepare", "begin", "-")


@pytest.mark.parametrize("operation", OTHER_OPERATIONS)
def test_other_operations_are_never_refused(marked, operation):
    """On a host far past capacity, every operation but prepare runs its scripts and exits 0."""
    conf(marked, ENFORCE)
    running(marked, "big", CORES * 4, PHYSICAL * 2)
    assert_admitted(marked, "vm1", operation, "begin", "-")


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        (ENFORCE + "this is not a setting\n", "neither a [section] nor name = value"),
        ("admission = enforce\n", "a setting before any [section]"),
        (ENFORCE + "mem_factor = lots\n", "mem_factor = lots: not a number"),
        (ENFORCE + "cpu_factor = 0\n", "cpu_factor must be above 0 and at most 1000, not 0"),
    ],
    ids=["syntax", "no section", "not a number", "zero factor"],
)
def test_a_broken_conf_never_blocks_and_is_logged(marked, text, logged):
    """A kvmhook.conf that cannot be used turns admission off: the guest is admitted and the
    problem logged as a `config:` record."""
    conf(marked, text)
    running(marked, "big", CORES * 4, PHYSICAL * 2)
    assert_admitted(marked, "vm1", "prepare", "begin", "-")
    assert any(
        "config: " in r and logged in r and "admission control off" in r for r in marked.records()
    ), marked.records()


def test_an_unreadable_status_file_is_skipped_and_logged(marked):
    """A status file that is not libvirt's XML is not counted (logged), and never blocks."""
    conf(marked, ENFORCE)
    running(marked, "a", 0, 0)
    (marked.root / "run/libvirt/qemu/a.xml").write_text("<domstatus><domain>")
    assert_admitted(marked, "vm1", "prepare", "begin", "-")
    assert any("admission: " in r and "a.xml not counted" in r for r in marked.records())


def test_a_domain_xml_without_memory_is_admitted_unchecked(marked):
    """Domain XML the check cannot size is logged and admitted, its scripts run."""
    conf(marked, ENFORCE)
    xml = b"<domain type='qemu'><name>vm1</name></domain>"
    assert_admitted(marked, "vm1", "prepare", "begin", "-", xml=xml)
    assert any("admitted unchecked" in r for r in marked.records())


@pytest.mark.parametrize(
    ("text", "imported"),
    [
        (None, False),
        ("[capacity]\nmem_factor = 2\n", False),
        ("[capacity]\nadmission = off\n", False),
        (ENFORCE, True),
    ],
    ids=["no file", "no key", "off", "enforce"],
)
def test_configparser_and_xml_are_imported_only_when_enforced(host, text, imported):
    """The hook pays for configparser and xml.etree only with `admission = enforce`."""
    if text is not None:
        conf(host, text)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmhook.qemu", "vm1", "prepare", "begin", "-"],
        input=domain_xml(),
        capture_output=True,
        env=host.env(),
        timeout=60,
        check=True,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.decode().splitlines()}
    assert ("configparser" in modules, "xml.etree.ElementTree" in modules) == (imported, imported)


def test_reserved_memory_comes_off_the_capacity_the_hook_admits_against(host):
    """A guest that fits the physical memory x factor but not (physical - reserved) x factor:
    refused, the reserved MiB in the message; the same guest fits without the reservation."""
    reserved = PHYSICAL // MIB - 100  # leaves 100 MiB (and a fraction) for guests
    guest = domain_xml(memory="200")
    conf(host, ENFORCE + f"reserved_memory_mib = {reserved}\n")
    refused = host.hook("vm1", "prepare", "begin", "-", xml=guest)
    assert refused.returncode == 1
    assert f"{reserved} MiB reserved for the host" in refused.stderr.decode()
    conf(host, ENFORCE)
    assert host.hook("vm1", "prepare", "begin", "-", xml=guest).returncode == 0


def test_the_agents_reserved_memory_applies_when_kvmhook_conf_sets_none(host):
    properties = host.root / "etc/cloudstack/agent/agent.properties"
    properties.parent.mkdir(parents=True, exist_ok=True)
    properties.write_text(f"host.reserved.mem.mb={PHYSICAL // MIB}\n")
    conf(host, ENFORCE)
    refused = host.hook("vm1", "prepare", "begin", "-", xml=domain_xml(memory="1"))
    assert refused.returncode == 1 and "reserved for the host" in refused.stderr.decode()


@pytest.mark.parametrize(("factor", "warned"), [("1.5", True), ("1", False)])
def test_an_arriving_guest_without_a_balloon_is_a_warning_over_factor_1(host, factor, warned):
    conf(host, ENFORCE + f"mem_factor = {factor}\n")
    xml = domain_xml().replace(
        b"</domain>", b"<devices><memballoon model='none'/></devices></domain>"
    )
    assert host.hook("vm1", "prepare", "begin", "-", xml=xml).returncode == 0
    logged = any("has no virtio memory balloon" in record for record in host.records())
    assert logged is warned
