"""`kvmhook capacity`: the admin guide's over-provisioning on this host.

Host figures come from a monkeypatched psutil (2 cores, 2 GiB unless a test
says otherwise) and guests from a fake source, except where libvirt's test
driver (`test:///default`: one running guest `test`, 2 vCPUs, 8 GiB) serves
as the real, read-only source. The controller is always a fake: the client
lives in kvmhook/host/controller.py.
"""

from __future__ import annotations

import json
import sys
import types

import psutil
import pytest
from sandbox import cli_runner

import kvmhook.host
from kvmhook import config
from kvmhook.cli.capacity import capacity as capacity_command
from kvmhook.errors import ConfigError, ControllerError, FactorError, VirtError
from kvmhook.host import capacity, virt

MIB = 1024 * 1024
GIB = 2**30
TEST_URI = "test:///default"
THREE_GUESTS = [virt.GuestSize(name, vcpus=1, memory=GIB) for name in ("vm1", "vm2", "vm3")]


def invoke(*args: str, **env: str):
    return cli_runner().invoke(capacity_command, list(args), env=env, catch_exceptions=False)


def invoke_json(*args: str, **env: str) -> dict:
    result = invoke("--json", *args, **env)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def freq(current: float, max_: float | None) -> types.SimpleNamespace:
    """psutil.cpu_freq()'s answer (max is None when psutil read /proc/cpuinfo for many CPUs)."""
    return types.SimpleNamespace(current=current, min=0.0, max=max_)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty host root: no kvmhook.conf."""
    monkeypatch.setenv("KVMHOOK_ROOT", str(tmp_path))
    return tmp_path


def write_conf(root, text: str) -> str:
    path = root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def small_host(monkeypatch, root):
    """psutil sees 2 cores of at most 3000 MHz and 2 GiB of memory."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2)
    monkeypatch.setattr(psutil, "cpu_freq", lambda percpu=False: freq(1200.0, 3000.0))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=2 * GIB))


@pytest.fixture
def uris(monkeypatch):
    """libvirt runs the three guests of the guide's example: 1 vCPU and 1 GiB each.

    Returns the URIs the guests were read from.
    """
    asked: list[str] = []

    def running_guests(uri: str) -> list[virt.GuestSize]:
        asked.append(uri)
        return list(THREE_GUESTS)

    monkeypatch.setattr(virt, "running_guests", running_guests)
    return asked


def set_controller(monkeypatch, ratios=None, error: str | None = None) -> None:
    """The controller the command asks: none (ratios None), these ratios, or unreachable."""

    def controller_ratios():
        if error is not None:
            raise ControllerError(error)
        return ratios

    monkeypatch.setattr(capacity, "controller_ratios", controller_ratios)


@pytest.fixture
def no_controller(monkeypatch):
    """No controller is configured."""
    set_controller(monkeypatch)


# --- the admin guide's example -----------------------------------------------------------------


def test_guide_example_memory(small_host, uris, no_controller):
    """2 GB x 2 = 4 GB capacity; three running 1 GB guests use 3 GB and leave 1 GB free."""
    memory = invoke_json("--mem-factor", "2")["memory"]
    assert memory == {
        "physical": 2 * GIB,
        "reserved": 0,
        "reserved_source": "none",
        "factor": 2.0,
        "factor_source": "flag",
        "capacity": 4 * GIB,
        "used": 3 * GIB,
        "free": 1 * GIB,
    }


def agent_properties(root, text: str) -> None:
    path = root / "etc/cloudstack/agent/agent.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("conf", "properties", "reserved", "source"),
    [
        (None, "host.reserved.mem.mb=512\n", 512, "agent.properties"),
        (
            "[capacity]\nreserved_memory_mib = 256\n",
            "host.reserved.mem.mb=512\n",
            256,
            "kvmhook.conf",
        ),
        ("[capacity]\nreserved_memory_mib = 0\n", "host.reserved.mem.mb=512\n", 0, "kvmhook.conf"),
        (None, None, 0, "none"),
    ],
)
def test_reserved_memory_comes_off_before_the_factor(
    small_host, uris, no_controller, root, conf, properties, reserved, source
):
    """(2 GiB - reserved) x 2; kvmhook.conf first, then the agent's own key, else none."""
    if conf is not None:
        write_conf(root, conf)
    if properties is not None:
        agent_properties(root, properties)
    memory = invoke_json("--mem-factor", "2")["memory"]
    assert (memory["reserved"], memory["reserved_source"]) == (reserved * MIB, source)
    assert memory["capacity"] == (2 * GIB - reserved * MIB) * 2
    assert memory["free"] == memory["capacity"] - 3 * GIB
    text = invoke("--mem-factor", "2").output
    assert (f"reserved for the host (from {source})" in text) is bool(reserved)


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "99999999999"])
def test_a_bad_reserved_memory_exits_1_naming_where(small_host, uris, no_controller, root, value):
    agent_properties(root, f"host.reserved.mem.mb={value}\n")
    result = invoke("--mem-factor", "2")
    assert result.exit_code == 1
    assert "host.reserved.mem.mb = " in result.stderr
    assert "not a whole number of MiB" in result.stderr


def test_guide_example_cpu(small_host, uris, no_controller):
    """2 cores x 2 = 4 vCPUs of capacity; three 1-vCPU guests use 3 and leave 1 free."""
    cpu = invoke_json("--cpu-factor", "2")["cpu"]
    assert cpu == {
        "cores": 2,
        "mhz": 3000.0,
        "mhz_total": 6000.0,
        "mhz_source": "psutil max",
        "factor": 2.0,
        "factor_source": "flag",
        "capacity": 4.0,
        "used": 3,
        "free": 1.0,
    }


def test_json_keys_are_the_contract_plus_documented_extras(small_host, uris, no_controller):
    """The JSON has exactly the contract's keys, plus mhz_total and where figures came from."""
    figures = invoke_json()
    assert list(figures) == ["cpu", "memory", "guests"]
    contract = {"factor", "capacity", "used", "free"}
    assert set(figures["cpu"]) == contract | {"cores", "mhz"} | {
        "mhz_total",
        "mhz_source",
        "factor_source",
    }
    assert set(figures["memory"]) == contract | {"physical", "reserved"} | {
        "factor_source",
        "reserved_source",
    }
    assert figures["guests"] == [
        {"name": n, "vcpus": 1, "memory": GIB, "balloon": True} for n in ("vm1", "vm2", "vm3")
    ]


def test_table_by_default(small_host, uris, no_controller):
    """Without --json the command prints the figures as a table, factors and their sources."""
    result = invoke("--cpu-factor", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "cpu     2 cores x 3000 MHz = 6000 MHz (clock from psutil max)",
        "memory  2.00 GiB",
        "",
        "        factor  from              capacity        used        free",
        "cpu          2  flag                     4           3           1",
        "memory       1  default           2.00 GiB    3.00 GiB   -1.00 GiB",
        "",
        "guest  vcpus      memory",
        "vm1        1    1.00 GiB",
        "vm2        1    1.00 GiB",
        "vm3        1    1.00 GiB",
    ]
    assert result.stderr == ""


def test_table_says_when_the_clock_is_unknown_and_no_guest_runs(monkeypatch, root, no_controller):
    """A host whose clock nothing reports, without guests, says both in words."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(psutil, "cpu_freq", lambda percpu=False: None)
    monkeypatch.setattr(capacity, "CPUINFO", str(root / "no-cpuinfo"))
    monkeypatch.setattr(virt, "running_guests", lambda uri: [])
    result = invoke()
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cpu     4 cores, clock unknown (neither psutil nor /proc/cpuinfo gives it)"
    assert lines[-1] == "no running guests"


# --- guests from libvirt --------------------------------------------------------------------


def test_test_driver_guest_is_counted(small_host, no_controller):
    """With KVMHOOK_LIBVIRT_URI at the test driver, its running guest is read and counted."""
    figures = invoke_json(KVMHOOK_LIBVIRT_URI=TEST_URI)
    assert figures["guests"] == [{"name": "test", "vcpus": 2, "memory": 8 * GIB, "balloon": True}]
    assert (figures["cpu"]["used"], figures["memory"]["used"]) == (2, 8 * GIB)
    assert figures["memory"]["free"] == 2 * GIB - 8 * GIB


def test_connect_flag_beats_the_environment(small_host, no_controller):
    """--connect wins over KVMHOOK_LIBVIRT_URI."""
    figures = invoke_json("--connect", TEST_URI, KVMHOOK_LIBVIRT_URI="bogus://nowhere")
    assert [guest["name"] for guest in figures["guests"]] == ["test"]


def test_default_uri_is_the_system_qemu(small_host, uris, no_controller, monkeypatch):
    """Without --connect or KVMHOOK_LIBVIRT_URI, guests come from qemu:///system."""
    monkeypatch.delenv("KVMHOOK_LIBVIRT_URI", raising=False)
    invoke_json()
    assert uris == ["qemu:///system"]


def test_unusable_libvirt_exits_1_with_its_reason(small_host, no_controller):
    """A libvirt URI that cannot be opened exits 1 with one line naming it."""
    result = invoke("--connect", "bogus://nowhere")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot connect to bogus://nowhere: ")
    assert len(result.stderr.splitlines()) == 1


class VanishingDomain:
    """A listed domain whose info() fails as libvirt would, with a real libvirtError."""

    def __init__(self, failing_call) -> None:
        self.failing_call = failing_call

    def name(self) -> str:
        return "vm-gone"

    def info(self):
        self.failing_call()


def test_a_guest_gone_since_it_was_listed_is_left_out():
    """A guest that stopped between the listing and the reading (no such domain) is skipped."""
    with virt.connect(TEST_URI, read_only=True) as conn:
        domain = VanishingDomain(lambda: conn.lookupByName("vm-gone"))
        assert virt.guest_size(domain) is None


def test_other_libvirt_errors_reading_a_guest_are_virt_errors():
    """Any other libvirt error reading a guest is a VirtError naming the guest."""
    with virt.connect(TEST_URI, read_only=True) as conn:
        real = conn.lookupByName("test")
        domain = VanishingDomain(real.destroy)  # refused: read-only connection
        with pytest.raises(VirtError, match=r"^cannot read the size of vm-gone: .*read only"):
            virt.guest_size(domain)


# --- factors ----------------------------------------------------------------------------------


def controller(ratios=None, error: str | None = None):
    """A controller source as choose_factors takes it."""

    def ask():
        if error is not None:
            raise ControllerError(error)
        return ratios

    return ask


def must_not_ask():
    raise AssertionError("the controller was asked although both flags were given")


CONF = "[capacity]\ncpu_factor = 2\nmem_factor = 1.5\n"


@pytest.mark.parametrize(
    ("flags", "source", "conf", "expected"),
    [
        ((3, 4), must_not_ask, CONF, ((3, "flag"), (4, "flag"))),
        ((3, None), controller((2.5, 1.25)), CONF, ((3, "flag"), (1.25, "controller"))),
        ((None, None), controller((2.5, 1.25)), CONF, ((2.5, "controller"), (1.25, "controller"))),
        ((None, None), controller(), CONF, ((2, "kvmhook.conf"), (1.5, "kvmhook.conf"))),
        ((None, 3), controller(), CONF, ((2, "kvmhook.conf"), (3, "flag"))),
        (
            (None, None),
            controller(),
            "[capacity]\ncpu_factor = 2\n",
            ((2, "kvmhook.conf"), (1, "default")),
        ),
        ((None, None), controller(), "[hooks]\nx = 1\n", ((1, "default"), (1, "default"))),
        ((None, None), controller(), None, ((1, "default"), (1, "default"))),
    ],
    ids=[
        "flags-beat-all",
        "flag-then-controller",
        "controller-beats-conf",
        "conf-without-controller",
        "flag-then-conf",
        "conf-then-default",
        "no-capacity-section",
        "no-file",
    ],
)
def test_factor_precedence(root, flags, source, conf, expected):
    """Each factor comes from its flag, else the controller, else kvmhook.conf, else 1."""
    if conf is not None:
        write_conf(root, conf)
    factors = capacity.choose_factors(*flags, controller=source)
    chosen = (
        (factors.cpu.value, factors.cpu.source),
        (factors.memory.value, factors.memory.source),
    )
    assert chosen == expected
    assert factors.warnings == ()


def test_unreachable_controller_falls_back_to_kvmhook_conf_with_a_warning(root):
    """A configured controller that cannot be reached: kvmhook.conf's factors, and a warning why."""
    write_conf(root, CONF)
    factors = capacity.choose_factors(None, None, controller(error="connection refused"))
    assert (factors.cpu, factors.memory) == (
        capacity.Factor(2, "kvmhook.conf"),
        capacity.Factor(1.5, "kvmhook.conf"),
    )
    assert factors.warnings == (
        "the controller cannot be asked (connection refused): factors from kvmhook.conf",
    )


def test_cli_warns_about_the_controller_and_uses_kvmhook_conf(small_host, uris, root, monkeypatch):
    """Through the command: the unreachable controller is a warning on stderr, exit 0."""
    set_controller(monkeypatch, error="no route to host")
    write_conf(root, "[capacity]\nmem_factor = 2\n")
    result = invoke("--json")
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["cpu"]["factor_source"], figures["memory"]["factor_source"]) == (
        "default",
        "kvmhook.conf",
    )
    assert figures["memory"]["free"] == GIB
    assert result.stderr == (
        "warning: the controller cannot be asked (no route to host): factors from kvmhook.conf\n"
    )


def test_cli_takes_the_controllers_ratios(small_host, uris, monkeypatch):
    """With a controller configured, its cluster's ratios are the factors."""
    set_controller(monkeypatch, ratios=(2.0, 2.0))
    figures = invoke_json()
    assert (figures["cpu"]["free"], figures["memory"]["free"]) == (1.0, GIB)
    assert figures["cpu"]["factor_source"] == "controller"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "two", "1000.5", "1e300"])
@pytest.mark.parametrize("flag", ["--cpu-factor", "--mem-factor"])
def test_bad_factor_flags_exit_2(small_host, uris, no_controller, flag, value):
    """A factor flag that is not above 0 and at most 1000 is a usage error (exit 2) naming it."""
    result = invoke(flag, value)
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.stderr


def test_bad_factor_flag_says_what_a_factor_must_be(small_host, uris, no_controller):
    """The usage error for 0 says the range a factor must be in."""
    result = invoke("--cpu-factor", "0")
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--cpu-factor': the factor must be above 0 and at most 1000,"
        " not 0"
    )


def test_mem_factor_1e300_is_a_usage_error_not_an_overflow(root, no_controller):
    """The issue's --mem-factor 1e300 on libvirt's test driver: exit 2 naming the range."""
    result = invoke("--mem-factor", "1e300", "--connect", TEST_URI)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid value for '--mem-factor': the factor must be above 0 and at most 1000,"
        " not 1e+300"
    )


def test_factor_of_1000_is_the_largest_accepted(root, no_controller):
    """1000 itself is in range: the capacity is physical x 1000, in whole bytes."""
    figures = invoke_json("--cpu-factor", "1000", "--mem-factor", "1000", "--connect", TEST_URI)
    assert figures["memory"]["capacity"] == figures["memory"]["physical"] * 1000
    assert figures["cpu"]["capacity"] == figures["cpu"]["cores"] * 1000


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("cpu_factor = 0", "[capacity] cpu_factor must be above 0 and at most 1000, not 0"),
        ("mem_factor = -2", "[capacity] mem_factor must be above 0 and at most 1000, not -2"),
        ("mem_factor = lots", "[capacity] mem_factor = lots: not a number"),
        (
            "mem_factor = 1e308",
            "[capacity] mem_factor must be above 0 and at most 1000, not 1e+308",
        ),
        ("cpu_factor = 1001", "[capacity] cpu_factor must be above 0 and at most 1000, not 1001"),
        ("mem_factor = 1e999", "[capacity] mem_factor must be above 0 and at most 1000, not inf"),
        ("cpu_factor = nan", "[capacity] cpu_factor must be above 0 and at most 1000, not nan"),
    ],
)
def test_bad_factor_in_kvmhook_conf_exits_1(small_host, uris, no_controller, root, line, problem):
    """A bad factor in kvmhook.conf exits 1 with one line naming the file and the setting."""
    path = write_conf(root, f"[capacity]\n{line}\n")
    result = invoke()
    assert result.exit_code == 1
    assert result.stderr == f"Error: {path}: {problem}\n"


@pytest.mark.parametrize("option", ["cpu_factor", "mem_factor"])
def test_config_getters_bound_the_factors_for_every_reader(option):
    """config's getters refuse 1e308 themselves: admission in the hook reads them too."""
    settings = config.parse(f"[capacity]\n{option} = 1e308\n".encode(), "/x/kvmhook.conf")
    getter = config.cpu_factor if option == "cpu_factor" else config.mem_factor
    with pytest.raises(ConfigError, match=rf"^/x/kvmhook.conf: \[capacity\] {option} must be"):
        getter(settings)


@pytest.mark.parametrize(("ratio", "shown"), [(0.0, "0"), (1e300, "1e+300")])
def test_bad_controller_ratio_exits_1(small_host, uris, monkeypatch, ratio, shown):
    """A controller ratio out of range exits 1 naming the controller's setting."""
    set_controller(monkeypatch, ratios=(1.0, ratio))
    result = invoke()
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: the controller's memoryovercommitratio must be above 0 and at most 1000,"
        f" not {shown}\n"
    )


def test_core_refuses_bad_flag_values_too(root):
    """choose_factors itself refuses a flag value that is not above 0, naming the flag."""
    with pytest.raises(
        FactorError, match=r"^--mem-factor must be above 0 and at most 1000, not -1$"
    ):
        capacity.choose_factors(1, -1, must_not_ask)


@pytest.mark.parametrize(
    ("args", "conf", "warning"),
    [
        (["--cpu-factor", "4.5"], None, "cpu factor 4.5 (from flag) is above 4"),
        ([], "[capacity]\nmem_factor = 8\n", "memory factor 8 (from kvmhook.conf) is above 4"),
    ],
)
def test_factor_above_4_warns_on_stderr(small_host, uris, no_controller, root, args, conf, warning):
    """A factor above 4, from any source, is reported on stderr; the JSON stays clean."""
    if conf is not None:
        write_conf(root, conf)
    result = invoke("--json", *args)
    assert result.exit_code == 0
    assert result.stderr == (
        f"warning: {warning}, the admin guide's limit for XenServer:"
        " guests are promised far more than this host has\n"
    )
    json.loads(result.stdout)


def test_factor_of_exactly_4_does_not_warn(small_host, uris, no_controller):
    """4 itself is within the guide's limit: no warning."""
    result = invoke("--cpu-factor", "4", "--mem-factor", "4")
    assert result.exit_code == 0
    assert result.stderr == ""


def test_controller_ratios_asks_the_configured_controller(monkeypatch):
    """controller_ratios() is None without a controller and the cluster's ratios with one."""
    client = types.SimpleNamespace(overcommit_ratios=lambda: (3.0, 1.5))
    fake = types.ModuleType("kvmhook.host.controller")
    monkeypatch.setitem(sys.modules, "kvmhook.host.controller", fake)
    monkeypatch.setattr(kvmhook.host, "controller", fake, raising=False)
    fake.load = lambda: None
    assert capacity.controller_ratios() is None
    fake.load = lambda: client
    assert capacity.controller_ratios() == (3.0, 1.5)


def test_no_controller_conf_means_no_controller_factors(root):
    """With the real client and no controller.conf under the root, the controller gives nothing."""
    assert capacity.controller_ratios() is None


# --- host figures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (freq(1200.0, 3000.0), (3000.0, "psutil max")),
        (freq(2400.0, 0.0), (2400.0, "psutil current")),
        (freq(2400.0, None), (2400.0, "psutil current")),
    ],
)
def test_clock_from_psutil(monkeypatch, answer, expected):
    """psutil's maximum clock when it has one, else its current one."""
    monkeypatch.setattr(psutil, "cpu_freq", lambda percpu=False: answer)
    assert capacity.clock_mhz() == expected


def no_freq(percpu=False):
    return None


def freq_not_implemented(percpu=False):
    raise NotImplementedError("can't find current frequency file")


@pytest.mark.parametrize(
    "cpu_freq", [no_freq, freq_not_implemented, lambda percpu=False: freq(0.0, 0.0)]
)
def test_clock_from_proc_cpuinfo_when_psutil_has_none(monkeypatch, tmp_path, cpu_freq):
    """Without a figure from psutil, the highest "cpu MHz" of /proc/cpuinfo."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu MHz\t\t: 2445.406\n\nprocessor\t: 1\ncpu MHz\t\t: 2600.0\n"
    )
    monkeypatch.setattr(psutil, "cpu_freq", cpu_freq)
    monkeypatch.setattr(capacity, "CPUINFO", str(cpuinfo))
    assert capacity.clock_mhz() == (2600.0, "/proc/cpuinfo")


@pytest.mark.parametrize("cpuinfo_text", [None, "processor\t: 0\nBogoMIPS\t: 50.00\n"])
def test_clock_unknown_is_0(monkeypatch, tmp_path, cpuinfo_text):
    """No figure anywhere (no /proc/cpuinfo, or one without "cpu MHz" as on ARM): 0, "unknown"."""
    cpuinfo = tmp_path / "cpuinfo"
    if cpuinfo_text is not None:
        cpuinfo.write_text(cpuinfo_text)
    monkeypatch.setattr(psutil, "cpu_freq", no_freq)
    monkeypatch.setattr(capacity, "CPUINFO", str(cpuinfo))
    assert capacity.clock_mhz() == (0.0, "unknown")


def test_host_figures_from_psutil(small_host, monkeypatch):
    """Cores are psutil's logical CPUs and memory its total; an unknown count is 0."""
    assert capacity.host_figures() == capacity.HostFigures(2, 3000.0, "psutil max", 2 * GIB)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    assert capacity.host_figures().cores == 0


# --- kvmhook.conf ------------------------------------------------------------------------------


def test_config_without_a_file_is_empty(root):
    """No kvmhook.conf: no sections, every getter None."""
    settings = config.load()
    assert settings.path == str(root / "etc/kvmhook/kvmhook.conf")
    assert settings.sections() == []
    assert (config.cpu_factor(settings), config.mem_factor(settings)) == (None, None)


def test_config_reads_any_section_verbatim(root):
    """Other sections are there for other features, and `%` means itself."""
    write_conf(root, "[capacity]\ncpu_factor = 2.5\n\n[hooks]\nnote = 100% sure\n")
    settings = config.load()
    assert config.cpu_factor(settings) == 2.5
    assert settings.get("hooks", "note") == "100% sure"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cpu_factor = 2\n", "line 1: a setting before any [section]: cpu_factor = 2"),
        (
            "[capacity]\ncpu_factor 2\n",
            "line 2: neither a [section] nor name = value: cpu_factor 2",
        ),
        ("[capacity]\n[hooks]\n[capacity]\n", "line 3: a section that appears twice: [capacity]"),
        (
            "[capacity]\ncpu_factor = 2\nCPU_factor = 3\n",
            "line 3: a setting that appears twice in its section: CPU_factor = 3",
        ),
    ],
)
def test_config_syntax_errors_name_file_and_line(root, text, problem):
    """A file that is not valid INI is a ConfigError naming the file and the line."""
    path = write_conf(root, text)
    with pytest.raises(ConfigError) as caught:
        config.load()
    assert str(caught.value) == f"{path}, {problem}"


def test_config_not_utf8(root):
    """A file that is not UTF-8 text is a ConfigError naming it."""
    path = root / "etc/kvmhook/kvmhook.conf"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"[capacity]\ncpu_factor = \xff\n")
    with pytest.raises(ConfigError, match=f"^{path}: not UTF-8 text$"):
        config.load()


def test_config_unreadable(root):
    """A path that cannot be read (here a directory) is a ConfigError with the system's reason."""
    path = root / "etc/kvmhook/kvmhook.conf"
    path.mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"^cannot read {path}: Is a directory$"):
        config.load()


@pytest.mark.parametrize(
    ("devices", "balloon"),
    [
        ("<memballoon model='virtio'/>", True),
        ("<memballoon model='virtio-non-transitional'/>", True),
        ("<memballoon model='none'/>", False),
        ("", False),
    ],
)
def test_a_virtio_balloon_is_read_from_the_domain_xml(devices, balloon):
    assert virt.has_balloon(f"<domain><devices>{devices}</devices></domain>") is balloon


def test_guests_without_a_balloon_are_named_when_memory_is_overcommitted(
    small_host, no_controller, monkeypatch
):
    guests = [virt.GuestSize("vm1", 1, GIB), virt.GuestSize("vm2", 1, GIB, balloon=False)]
    monkeypatch.setattr(virt, "running_guests", lambda uri: guests)
    line = "without a virtio memory balloon (needed with a memory factor above 1): vm2"
    assert line in invoke("--mem-factor", "1.5").output
    assert line not in invoke("--mem-factor", "1").output
    assert [g["balloon"] for g in invoke_json("--mem-factor", "1.5")["guests"]] == [True, False]
