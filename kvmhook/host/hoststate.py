"""The host's maintenance state, kept in one small file the hook can read cheaply.

The file holds the state's name on its first line and, optionally, the
reason on the second. No file means Enabled. It is written atomically (the
hook never sees half a file), and read with nothing but `os`: the hook pays
for it on every prepare and migrate.
"""

from kvmhook import paths

TYPE_CHECKING = False  # typing costs import time the hook pays on every guest start
if TYPE_CHECKING:
    from collections.abc import Callable

ENABLED = "Enabled"
PREPARE = "PrepareForMaintenance"
ERROR_IN_PREPARE = "ErrorInPrepareForMaintenance"
MAINTENANCE = "Maintenance"
ERROR_IN_MAINTENANCE = "ErrorInMaintenance"
STATES = (ENABLED, PREPARE, ERROR_IN_PREPARE, MAINTENANCE, ERROR_IN_MAINTENANCE)
# While the host is being emptied or is empty for maintenance, no guest may arrive.
REFUSING = frozenset({PREPARE, ERROR_IN_PREPARE, MAINTENANCE})
REFUSAL = "host is in maintenance mode; not accepting new guests"
# The most the hook reads of the file: a state and a reason. write() keeps the
# reason well under it, so a long one (thousands of stuck guests) is cut, never
# the cause of a file the hook refuses and reads as Enabled.
_STATE_MAX = 1024 * 1024
_REASON_MAX = 64 * 1024


def read(complain: "Callable[[str], None] | None" = None) -> "tuple[str, str]":
    """(state, reason); an unreadable or unknown state counts as Enabled, never blocking guests.

    Why a file that is there could not be read goes to `complain`, if given.
    """
    from kvmhook.hook import readfile

    path = paths.maintenance_state()
    try:
        lines = readfile.read(path, _STATE_MAX).decode("utf-8").splitlines()
    except FileNotFoundError:
        return ENABLED, ""
    except (OSError, UnicodeDecodeError) as error:
        if complain is not None:
            why = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            complain(f"cannot read {path}: {why}; counted as {ENABLED}")
        return ENABLED, ""
    state = lines[0].strip() if lines else ENABLED
    if state not in STATES:
        return ENABLED, ""
    return state, lines[1].strip() if len(lines) > 1 else ""


def write(state: str, reason: str = "") -> None:
    """Record `state` (one of STATES) atomically, creating /var/lib/kvmhook if needed."""
    from kvmhook.files import Transaction

    if state not in STATES:
        raise ValueError(f"unknown maintenance state {state!r}")
    reason = " ".join(reason.split())
    if len(reason) > _REASON_MAX:
        reason = reason[: _REASON_MAX - 1] + "…"
    text = state + "\n" + (reason + "\n" if reason else "")
    with Transaction() as files:
        files.write(paths.maintenance_state(), text.encode(), mode=0o644, parent_mode=0o755)
