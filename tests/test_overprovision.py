"""The over-provisioning formula `kvmhook capacity` and admission control share."""

from __future__ import annotations

import subprocess
import sys

from kvmhook.host.overprovision import Resource


def test_cpu_capacity_keeps_its_fraction():
    """3 cores x 1.5 is 4.5 vCPUs; free is what the guests leave of it."""
    cpu = Resource(3, 1.5, 2)
    assert (cpu.capacity, cpu.used, cpu.free) == (4.5, 2, 2.5)


def test_memory_capacity_is_whole_bytes_rounded_down():
    """1001 bytes x 0.5 promises 500 bytes, never 500.5; the figures stay whole numbers."""
    memory = Resource(1001, 0.5, 100, whole=True)
    assert (memory.capacity, memory.used, memory.free) == (500, 100, 400)
    assert isinstance(memory.capacity, int)
    assert isinstance(memory.free, int)


def test_free_goes_below_0_when_the_guests_hold_more():
    """Guests given more than the factor allows show as negative free, not 0."""
    assert Resource(2, 1.0, 5).free == -3.0


def test_fits_up_to_the_capacity_and_not_beyond():
    """A guest fits when used + its size is at most the capacity."""
    memory = Resource(1000, 1.0, 600, whole=True)
    assert memory.fits(400)
    assert not memory.fits(401)


def test_imports_nothing_the_hook_would_pay_for():
    """Admission loads it inside the hook: no dataclasses, typing, psutil or click."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kvmhook.host.overprovision; print(' '.join(sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not {"dataclasses", "typing", "psutil", "click"} & set(loaded)
