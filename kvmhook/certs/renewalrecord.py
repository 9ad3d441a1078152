"""When `kvmhook cert renew` last succeeded and last failed: what the renewal metrics show.

One small JSON file (paths.renewal_record()), replaced atomically by each
renewal that renewed (exit 0 or 5: the set is renewed and served) or failed
(exit 1, 3, 4); a run that found nothing due, or a dry run, leaves it alone.
"""

from __future__ import annotations

import json
import time

from kvmhook import paths

SUCCESS, FAILURE = "last_success", "last_failure"
_MAX = 64 * 1024


def read() -> dict[str, float]:
    """{SUCCESS: unix time, FAILURE: unix time}, 0 for what never happened (or an unreadable
    file: the metrics then show "never" rather than fail)."""
    from kvmhook.hook import readfile

    found = {SUCCESS: 0.0, FAILURE: 0.0}
    try:
        data = json.loads(readfile.read(paths.renewal_record(), _MAX))
        for key in found:
            found[key] = float(data.get(key, 0))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return found


def note(succeeded: bool, when: float | None = None) -> None:
    """Record a renewal that succeeded or failed now. Raises OSError when it cannot be written."""
    from kvmhook.files import Transaction

    record = read()
    record[SUCCESS if succeeded else FAILURE] = time.time() if when is None else when
    with Transaction() as files:
        files.write(paths.renewal_record(), json.dumps(record).encode(), 0o644, parent_mode=0o755)
