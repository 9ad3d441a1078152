"""The bounds of every number an operator or a file gives, each defined once.

A value beyond them is refused where it comes in (a usage error, or a bad
setting naming its file), before arithmetic on it overflows: datetime stops
at year 9999, a float at about 1e308, libvirt's parameters at 64 bits, and a
deadline is a float. The bounds are far from anything a host needs.
"""

from __future__ import annotations

# Over-provisioning factors (kvmhook capacity, admission): the admin guide warns past 4.
MAX_FACTOR = 1000.0
FACTOR_RANGE = f"above 0 and at most {MAX_FACTOR:g}"
# A hundred years: certificate validity, the renewal and warning windows.
MAX_DAYS = 36500
# A week, in seconds: every timeout (a drain, a migration, a controller request).
MAX_SECONDS = 7 * 24 * 3600
# MiB/s, a TiB/s: beyond any link a migration runs over.
MAX_BANDWIDTH = 2**20
# Migrations a drain runs at once (--parallel): each is a QEMU stream and a thread here.
MAX_PARALLEL = 64


def whole_number(text: str, low: int, high: int) -> int | None:
    """`text` as a whole number from `low` to `high` (ASCII digits only); None otherwise."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        return None
    # Length first: int() of thousands of digits is slow, and refused by Python 3.11.
    if len(digits.lstrip("0")) > len(str(high)):
        return None
    number = int(digits)
    return number if low <= number <= high else None
