"""This host's capacity: CPU and memory, physical, over-provisioned, used and free.

The admin guide's over-provisioning, as kvmhook.host.overprovision computes it:
capacity = (physical - reserved) x factor, per resource (reserved: the memory
the host keeps for itself, config.reserved_memory); used = what the running guests
were given; free = capacity - used. CPU is counted in logical cores against
vCPUs, memory in bytes. Free goes below 0 when the guests hold more than the
factor allows.

Factors, per resource, the first that is set: the flag (--cpu-factor,
--mem-factor); the controller's settings for this host's cluster
(cpuovercommitratio, memoryovercommitratio) when a controller is configured;
`[capacity] cpu_factor` / `mem_factor` in kvmhook.conf; 1. A configured
controller that cannot be reached gives a warning and kvmhook.conf is used
instead: the report matters most when something is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import psutil

from kvmhook import config, limits
from kvmhook.errors import ControllerError, FactorError
from kvmhook.host import overprovision, virt

CPUINFO = "/proc/cpuinfo"
# The admin guide's ceiling for XenServer. KVM sets none, but past it guests
# are promised far more than the host has.
WARN_ABOVE = 4.0

# Where a factor came from, as the JSON's factor_source says it.
FROM_FLAG = "flag"
FROM_CONTROLLER = "controller"
FROM_CONFIG = "kvmhook.conf"
FROM_DEFAULT = "default"

# The controller's (cpu, memory) over-commit ratios for this host's cluster, or
# None when no controller is configured; raises ControllerError when it cannot tell.
RatioSource = Callable[[], Optional[tuple[float, float]]]


@dataclass(frozen=True)
class HostFigures:
    """This host's physical CPU and memory."""

    cores: int  # logical CPUs: what vCPUs are scheduled on
    mhz: float  # one core's clock; 0 when unknown
    mhz_source: str  # "psutil max", "psutil current", "/proc/cpuinfo" or "unknown"
    memory: int  # bytes


@dataclass(frozen=True)
class Factor:
    """One over-provisioning factor and where it came from."""

    value: float
    source: str  # one of the FROM_* names


@dataclass(frozen=True)
class Factors:
    """The CPU and memory factors chosen, the host's reserved memory (bytes, and where it
    was set: config.reserved_memory), and what the operator should hear about them."""

    cpu: Factor
    memory: Factor
    warnings: tuple[str, ...]  # for the operator, on stderr
    reserved: int = 0
    reserved_source: str = "none"


@dataclass(frozen=True)
class Report:
    """Everything `kvmhook capacity` shows, from one reading of the host and its guests."""

    host: HostFigures
    factors: Factors
    guests: list[virt.GuestSize]

    def as_dict(self) -> dict[str, Any]:
        """The figures as `kvmhook capacity --json` prints them (a stable format)."""
        cores, mhz = self.host.cores, self.host.mhz
        cpu = overprovision.Resource(
            cores, self.factors.cpu.value, sum(guest.vcpus for guest in self.guests)
        )
        memory = overprovision.Resource(
            self.host.memory,
            self.factors.memory.value,
            sum(guest.memory for guest in self.guests),
            whole=True,
            reserved=self.factors.reserved,
        )
        return {
            "cpu": {
                "cores": cores,
                "mhz": mhz,
                "mhz_total": cores * mhz,
                "mhz_source": self.host.mhz_source,
                "factor": self.factors.cpu.value,
                "factor_source": self.factors.cpu.source,
                "capacity": cpu.capacity,
                "used": cpu.used,
                "free": cpu.free,
            },
            "memory": {
                "physical": self.host.memory,
                "reserved": self.factors.reserved,
                "reserved_source": self.factors.reserved_source,
                "factor": self.factors.memory.value,
                "factor_source": self.factors.memory.source,
                "capacity": memory.capacity,
                "used": memory.used,
                "free": memory.free,
            },
            "guests": [dataclasses.asdict(guest) for guest in self.guests],
        }


def report(
    uri: str, cpu_flag: float | None, mem_flag: float | None, controller: RatioSource
) -> Report:
    """This host's capacity, its guests read from libvirt at `uri` (read-only)."""
    factors = choose_factors(cpu_flag, mem_flag, controller)
    return Report(host_figures(), factors, virt.running_guests(uri))


def host_figures() -> HostFigures:
    """Cores, clock and memory as psutil (or, for the clock, /proc/cpuinfo) reports them."""
    mhz, mhz_source = clock_mhz()
    # cpu_count() is None when the kernel does not say: 0 shows the figure is missing.
    cores = psutil.cpu_count() or 0
    return HostFigures(cores, mhz, mhz_source, psutil.virtual_memory().total)


def clock_mhz() -> tuple[float, str]:
    """One core's clock in MHz and where it came from; (0.0, "unknown") when nothing says.

    psutil's maximum, else its current figure; inside containers and VMs
    psutil often has neither, and /proc/cpuinfo may still have "cpu MHz".
    """
    try:
        freq = psutil.cpu_freq()
    except NotImplementedError:  # psutil on Linux: a cpufreq directory without the figures
        freq = None
    if freq is not None and freq.max:
        return freq.max, "psutil max"
    if freq is not None and freq.current:
        return freq.current, "psutil current"
    mhz = _cpuinfo_mhz()
    return (mhz, "/proc/cpuinfo") if mhz else (0.0, "unknown")


def _cpuinfo_mhz() -> float:
    """The highest "cpu MHz" in /proc/cpuinfo; 0 without one (ARM has none)."""
    try:
        with open(CPUINFO, encoding="utf-8") as source:
            lines = source.readlines()
    except OSError:
        return 0.0
    figures = [float(line.split(":", 1)[1]) for line in lines if line.startswith("cpu MHz")]
    return max(figures, default=0.0)


def choose_factors(
    cpu_flag: float | None, mem_flag: float | None, controller: RatioSource
) -> Factors:
    """Each factor from its flag, else the controller, else kvmhook.conf, else 1.

    Raises FactorError for a factor out of limits.FACTOR_RANGE, ConfigError
    for a broken kvmhook.conf (its factors included). Asks the controller
    only when a flag is missing.
    """
    cpu = None if cpu_flag is None else Factor(check_factor(cpu_flag, "--cpu-factor"), FROM_FLAG)
    memory = None if mem_flag is None else Factor(check_factor(mem_flag, "--mem-factor"), FROM_FLAG)
    warnings: list[str] = []
    if cpu is None or memory is None:
        fallback = _from_controller(controller, warnings) or _from_config()
        cpu = fallback[0] if cpu is None else cpu
        memory = fallback[1] if memory is None else memory
    reserved, reserved_source = config.reserved_memory(config.load())
    for name, factor in (("cpu", cpu), ("memory", memory)):
        if factor.value > WARN_ABOVE:
            warnings.append(
                f"{name} factor {factor.value:g} (from {factor.source}) is above {WARN_ABOVE:g},"
                " the admin guide's limit for XenServer: guests are promised far more than"
                " this host has"
            )
    return Factors(cpu, memory, tuple(warnings), reserved, reserved_source)


def check_factor(value: float, what: str) -> float:
    """`value` when it is a usable factor (within limits.FACTOR_RANGE); else FactorError."""
    if not 0 < value <= limits.MAX_FACTOR:  # NaN fails both comparisons
        raise FactorError(f"{what} must be {limits.FACTOR_RANGE}, not {value:g}")
    return value


def _from_controller(controller: RatioSource, warnings: list[str]) -> tuple[Factor, Factor] | None:
    """The controller's factors; None when there is no controller or it cannot be reached."""
    try:
        ratios = controller()
    except ControllerError as error:
        warnings.append(f"the controller cannot be asked ({error}): factors from kvmhook.conf")
        return None
    if ratios is None:
        return None
    cpu, memory = ratios
    return (
        Factor(check_factor(cpu, "the controller's cpuovercommitratio"), FROM_CONTROLLER),
        Factor(check_factor(memory, "the controller's memoryovercommitratio"), FROM_CONTROLLER),
    )


def _from_config() -> tuple[Factor, Factor]:
    """kvmhook.conf's factors (checked by config), 1 for one it does not set."""
    settings = config.load()
    return _config_factor(config.cpu_factor(settings)), _config_factor(config.mem_factor(settings))


def _config_factor(value: float | None) -> Factor:
    return Factor(1.0, FROM_DEFAULT) if value is None else Factor(value, FROM_CONFIG)


def controller_ratios() -> tuple[float, float] | None:
    """The controller's (cpu, memory) over-commit ratios; None when none is configured."""
    # Imported here: the controller client matters only when a flag leaves a factor open.
    from kvmhook.host import controller

    client = controller.load()
    return None if client is None else client.overcommit_ratios()
