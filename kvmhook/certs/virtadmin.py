"""virt-admin: whether libvirt's TLS daemon runs here, and making it reload its TLS files online.

The one place that asks a running libvirtd (or virtproxyd) to load its CA,
certificate and key again: renewals, rollbacks and keystore-cert-import
--restart all come here.
"""

from __future__ import annotations

import os
import re
import stat

from kvmhook import paths
from kvmhook.errors import CannotReloadOnlineError, ReloadError
from kvmhook.hook import process

_UPDATE_TLS_SINCE = (6, 2, 0)  # virt-admin server-update-tls
# How virt-admin or an older daemon says it has no server-update-tls.
_UNSUPPORTED = ("unknown command", "unknown procedure", "not supported")
_TIMEOUT = 30.0


def reload_tls(daemon: str) -> None:
    """Make the running `daemon` (libvirtd, virtproxyd) load its CA, certificate and key again.

    No restart: guests, connections and the pid stay. CannotReloadOnlineError
    when virt-admin or the daemon lacks server-update-tls, ReloadError when
    the daemon refused the files (it then keeps serving the ones it had).
    """
    outcome = _virt_admin(daemon, "server-update-tls", daemon)
    if outcome.status != 0:
        said = outcome.said() or outcome.ending
        if any(sign in said for sign in _UNSUPPORTED):
            raise CannotReloadOnlineError(f"{daemon} cannot reload its TLS files online: {said}")
        raise ReloadError(f"virt-admin server-update-tls {daemon} failed: {said}")


def check_reloadable(daemon: str) -> None:
    """CannotReloadOnlineError unless virt-admin can make the running `daemon` reload TLS."""
    outcome = _virt_admin(daemon, "version")
    said = outcome.said()
    if outcome.status != 0:
        raise ReloadError(f"virt-admin cannot reach {daemon}: {said or outcome.ending}")
    found = re.search(r"Running against daemon: (\d+)\.(\d+)\.(\d+)", said)
    if found is None:
        raise ReloadError(f"virt-admin did not say {daemon}'s version: {said}")
    version = tuple(int(part) for part in found.groups())
    if version < _UPDATE_TLS_SINCE:
        raise CannotReloadOnlineError(
            f"{daemon} {'.'.join(found.groups())} cannot reload its TLS files online "
            "(server-update-tls came with libvirt 6.2)"
        )


def is_running(daemon: str) -> bool:
    """Whether `daemon` runs here: its admin socket exists (under the root prefix too)."""
    try:
        return stat.S_ISSOCK(os.stat(paths.libvirt_admin_socket(daemon)).st_mode)
    except OSError:
        return False


def _virt_admin(daemon: str, *args: str) -> process.Outcome:
    # The socket named, so that under KVMHOOK_ROOT it is that root's daemon, not this host's.
    uri = f"{daemon}:///system?socket={paths.libvirt_admin_socket(daemon)}"
    try:
        return process.run_tool(["virt-admin", "-c", uri, *args], _TIMEOUT)
    except FileNotFoundError:
        raise CannotReloadOnlineError(
            "virt-admin is not installed (libvirt-clients): it makes libvirt reload TLS online"
        ) from None
    except OSError as error:
        raise ReloadError(f"cannot run virt-admin: {error.strerror}") from None
