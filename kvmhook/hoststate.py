"""The host's maintenance state, kept in one small file the hook can read cheaply.

The file holds the state's name on its first line and, optionally, the
reason on the second. No file means Enabled. It is written atomically (the
hook never sees half a file), and read with nothing but `os`: the hook pays
for it on every prepare and migrate.
"""

from kvmhook import paths

ENABLED = "Enabled"
PREPARE = "PrepareForMaintenance"
ERROR_IN_PREPARE = "ErrorInPrepareForMaintenance"
MAINTENANCE = "Maintenance"
ERROR_IN_MAINTENANCE = "ErrorInMaintenance"
STATES = (ENABLED, PREPARE, ERROR_IN_PREPARE, MAINTENANCE, ERROR_IN_MAINTENANCE)
# While the host is being emptied or is empty for maintenance, no guest may arrive.
REFUSING = frozenset({PREPARE, ERROR_IN_PREPARE, MAINTENANCE})
REFUSAL = "host is in maintenance mode; not accepting new guests"


def read() -> "tuple[str, str]":
    """(state, reason); an unreadable or unknown state counts as Enabled, never blocking guests."""
    try:
        with open(paths.maintenance_state(), encoding="utf-8") as source:
            lines = source.read(4096).splitlines()
    except (OSError, UnicodeDecodeError):
        return ENABLED, ""
    state = lines[0].strip() if lines else ENABLED
    if state not in STATES:
        return ENABLED, ""
    return state, lines[1].strip() if len(lines) > 1 else ""


def refuses_new_guests() -> bool:
    """Whether prepare and migrate must be refused now."""
    return read()[0] in REFUSING


def write(state: str, reason: str = "") -> None:
    """Record `state` (one of STATES) atomically, creating /var/lib/kvmhook if needed."""
    from kvmhook.files import Transaction

    if state not in STATES:
        raise ValueError(f"unknown maintenance state {state!r}")
    text = state + "\n" + (" ".join(reason.split()) + "\n" if reason else "")
    with Transaction() as files:
        files.write(paths.maintenance_state(), text.encode(), mode=0o644, parent_mode=0o755)
