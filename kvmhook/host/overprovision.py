"""The admin guide's over-provisioning, for `kvmhook capacity` and admission control alike.

capacity = (physical - reserved) x factor, per resource (reserved: memory the
host keeps for itself); used = what the running guests were given; free =
capacity - used (below 0 when the guests hold more than the factor allows).
The qemu hook imports this on `prepare` under admission control: standard
library only, no dataclass nor typing (their import time is paid on every
guest start).
"""

from __future__ import annotations

import math


class Resource:
    """One resource of this host (logical CPUs against vCPUs, or memory in bytes)."""

    __slots__ = ("capacity", "free", "used")

    def __init__(
        self, physical: int, factor: float, used: int, whole: bool = False, reserved: int = 0
    ) -> None:
        """`whole`: capacity rounded down to a whole unit (bytes: never promise a byte the
        factor does not give); CPU capacity keeps its fraction (2 cores x 1.5 = 3.0).
        `reserved`: kept out before the factor applies (never below 0 left)."""
        capacity = max(physical - reserved, 0) * factor
        self.capacity: float = math.floor(capacity) if whole else capacity
        self.used = used
        self.free = self.capacity - used

    def fits(self, more: int) -> bool:
        """Whether `more` of it can be given without going past the capacity."""
        return self.used + more <= self.capacity
